//! WORKLOAD v1 (`../shared/peers/WORKLOAD.md`): 1,000 items at 10.00 with
//! 1,000,000 units each plus one sold out, 10,000 customers with 10^12
//! cents plus one without money; orders of 2 distinct random items with 1–3
//! units each. Order `i` is deterministic: `i % 20 == 0` comes from the
//! customer without money, `i % 20 == 1` contains the sold-out item, the
//! rest (90 %) must be confirmed.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

pub const ITEMS: usize = 1000;
pub const CUSTOMERS: usize = 10_000;
pub const STOCK: i64 = 1_000_000;
pub const BALANCE: i64 = 1_000_000_000_000;
pub const PRICE: i64 = 1000;
pub const POOR: &str = "cust-poor";
pub const SOLD_OUT: &str = "sold-out";

/// What an order is meant to end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Confirmed.
    Normal,
    /// "Payment failed" / "Insufficient funds"; nothing charged.
    Poor,
    /// "Inventory reservation failed" / "Out of stock: sold-out …"; refunded.
    SoldOut,
}

impl Kind {
    pub fn of(i: usize) -> Kind {
        match i % 20 {
            0 => Kind::Poor,
            1 => Kind::SoldOut,
            _ => Kind::Normal,
        }
    }
}

/// One order of the workload.
#[derive(Debug, Clone)]
pub struct Order {
    pub index: usize,
    pub kind: Kind,
    pub customer: String,
    pub lines: Vec<(String, i64)>,
}

impl Order {
    /// Order `i` of the run seeded `seed`.
    pub fn nth(seed: u64, i: usize) -> Order {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let a = rng.random_range(0..ITEMS);
        let b = (a + rng.random_range(1..ITEMS)) % ITEMS;
        let who = rng.random_range(0..CUSTOMERS);
        let (qa, qb) = (rng.random_range(1..=3i64), rng.random_range(1..=3i64));
        let kind = Kind::of(i);
        let customer = match kind {
            Kind::Poor => POOR.to_owned(),
            _ => format!("cust-{who:04}"),
        };
        let lines = match kind {
            Kind::SoldOut => vec![(item(a), qa), (SOLD_OUT.to_owned(), 1)],
            _ => vec![(item(a), qa), (item(b), qb)],
        };
        Order {
            index: i,
            kind,
            customer,
            lines,
        }
    }

    /// The order dict, with the test card that always succeeds.
    pub fn dict(&self) -> Value {
        json!({
            "customer_id": self.customer,
            "items": self.lines.iter().map(|(id, q)| json!({"item_id": id, "quantity": q})).collect::<Vec<_>>(),
            "payment_info": {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "123"},
        })
    }

    pub fn amount_cents(&self) -> i64 {
        self.lines.iter().map(|(_, q)| q * PRICE).sum()
    }
}

pub fn item(n: usize) -> String {
    format!("item-{n:04}")
}

/// Initial stock of every item an order can name.
pub fn initial_stock() -> HashMap<String, i64> {
    let mut stock: HashMap<String, i64> = (0..ITEMS).map(|i| (item(i), STOCK)).collect();
    stock.insert(SOLD_OUT.to_owned(), 0);
    stock
}

/// A customer's balance before a run.
pub fn initial_balance(customer: &str) -> i64 {
    if customer == POOR { 0 } else { BALANCE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_ninety_five_five_and_deterministic() {
        let orders: Vec<Order> = (0..2000).map(|i| Order::nth(7, i)).collect();
        let count = |k| orders.iter().filter(|o| o.kind == k).count();
        assert_eq!(
            (count(Kind::Normal), count(Kind::Poor), count(Kind::SoldOut)),
            (1800, 100, 100)
        );
        for o in &orders {
            assert_eq!(o.lines.len(), 2);
            assert_ne!(o.lines[0].0, o.lines[1].0);
            assert!(o.lines.iter().all(|(_, q)| (1..=3).contains(q)));
        }
        assert_eq!(Order::nth(7, 42).lines, orders[42].lines);
        assert_ne!(Order::nth(8, 42).lines, orders[42].lines);
    }
}
