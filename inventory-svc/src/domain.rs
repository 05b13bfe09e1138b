//! Stock rules (pure): can an order be reserved, and what each saga event does
//! to a reservation.
//!
//! Model: reserve-then-commit. A reservation *holds* units (they leave
//! `available` at once, so concurrent orders can never oversell) and the
//! saga's decision either commits them (`order.confirmed`) or releases them
//! (`order.failed` / `order.cancelled`). Compared with deducting stock
//! outright, the units of undecided sagas stay visible as `held` and a
//! release puts back exactly what was held.

use std::collections::HashMap;

use common::messaging::events::StepFailed;
use common::saga::compensation::StepState;
use common::saga::order::OrderLine;

/// The most units of one item the stock may hold (available plus held):
/// far below the `integer` column's limit, so no release can overflow it.
pub const MAX_STOCK: i32 = 1_000_000_000;

/// An item's stock, as locked for a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StockLevel {
    pub available: i32,
    /// Frozen for a stocktake: nothing can be reserved or released.
    pub frozen: bool,
}

/// The items of `lines` that `stock` cannot cover.
pub fn short_items(lines: &[OrderLine], stock: &HashMap<String, StockLevel>) -> Vec<String> {
    lines
        .iter()
        .filter(|l| stock.get(&l.item_id).map_or(0, |s| s.available) < l.quantity)
        .map(|l| l.item_id.clone())
        .collect()
}

/// Checks every line against the stock (items not stocked count as 0). The
/// error names every short item, or the frozen ones.
pub fn check_availability(
    lines: &[OrderLine],
    stock: &HashMap<String, StockLevel>,
) -> Result<(), StepFailed> {
    let frozen: Vec<&str> = lines
        .iter()
        .filter(|l| stock.get(&l.item_id).is_some_and(|s| s.frozen))
        .map(|l| l.item_id.as_str())
        .collect();
    if !frozen.is_empty() {
        return Err(StepFailed {
            code: "item_frozen".to_owned(),
            reason: format!(
                "Item unavailable (frozen for stocktake): {}",
                frozen.join(", ")
            ),
        });
    }
    let short: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            let have = stock.get(&l.item_id).map_or(0, |s| s.available);
            (have < l.quantity)
                .then(|| format!("{} (requested {}, available {have})", l.item_id, l.quantity))
        })
        .collect();
    if short.is_empty() {
        Ok(())
    } else {
        Err(StepFailed {
            code: "out_of_stock".to_owned(),
            reason: format!("Out of stock: {}", short.join(", ")),
        })
    }
}

/// Item ids in the one global order every transaction locks stock rows in,
/// so concurrent multi-item reservations cannot deadlock.
pub fn lock_order<'a>(lines: impl IntoIterator<Item = &'a OrderLine>) -> Vec<String> {
    let mut ids: Vec<String> = lines.into_iter().map(|l| l.item_id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A reservation's status (the `reservations.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    Held,
    Committed,
    Released,
    Rejected,
    /// Tombstone: the saga was rolled back before any reservation.
    Cancelled,
    /// Short of backorderable items: waits for them (nothing held yet).
    Backordered,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "held",
            ReservationStatus::Committed => "committed",
            ReservationStatus::Released => "released",
            ReservationStatus::Rejected => "rejected",
            ReservationStatus::Cancelled => "cancelled",
            ReservationStatus::Backordered => "backordered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ReservationStatus::Held,
            ReservationStatus::Committed,
            ReservationStatus::Released,
            ReservationStatus::Rejected,
            ReservationStatus::Cancelled,
            ReservationStatus::Backordered,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl StepState for ReservationStatus {
    fn needs_undo(self) -> bool {
        self == ReservationStatus::Held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::saga::compensation::{Compensation, compensation_for};

    fn line(item: &str, quantity: i32) -> OrderLine {
        OrderLine {
            item_id: item.into(),
            quantity,
            unit_price_cents: 100,
        }
    }

    #[test]
    fn enough_stock_passes_and_shortages_name_every_short_item() {
        let level = |available| StockLevel {
            available,
            frozen: false,
        };
        let mut stock = HashMap::from([("a".to_owned(), level(5)), ("b".to_owned(), level(1))]);
        assert!(check_availability(&[line("a", 5), line("b", 1)], &stock).is_ok());
        let err =
            check_availability(&[line("a", 6), line("b", 1), line("z", 1)], &stock).unwrap_err();
        assert_eq!(err.code, "out_of_stock");
        assert_eq!(
            err.reason,
            "Out of stock: a (requested 6, available 5), z (requested 1, available 0)"
        );
        stock.insert(
            "b".into(),
            StockLevel {
                available: 1,
                frozen: true,
            },
        );
        let err = check_availability(&[line("a", 1), line("b", 1)], &stock).unwrap_err();
        assert_eq!(err.code, "item_frozen");
    }

    #[test]
    fn stock_rows_are_locked_in_one_global_order() {
        assert_eq!(lock_order(&[line("b", 1), line("a", 1)]), vec!["a", "b"]);
    }

    #[test]
    fn rollback_releases_only_held_stock() {
        assert_eq!(
            compensation_for::<ReservationStatus>(None),
            Compensation::Tombstone
        );
        assert_eq!(
            compensation_for(Some(ReservationStatus::Held)),
            Compensation::Undo
        );
        assert_eq!(
            compensation_for(Some(ReservationStatus::Committed)),
            Compensation::Nothing
        );
        assert_eq!(
            compensation_for(Some(ReservationStatus::Rejected)),
            Compensation::Nothing
        );
    }
}
