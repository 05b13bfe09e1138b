//! inventory-svc under every interleaving of what can reach it.
//!
//! A history is a few orders over two items, and a script: payments
//! (`payment.completed`), 3-D Secure holds (`payment.action_required`),
//! the saga's decision (`order.confirmed` only once inventory-svc announced
//! the reservation; else `order.failed`, with `order.cancelled` for a
//! timeout), duplicates, batches of any size with a crash before the ack or
//! a lost COMMIT answer, new stock (which fills backorders), and holds
//! outliving their long deadline. Events may carry a deadline already past.
//!
//! What inventory-svc promises, checked after every step:
//! - units are conserved: per item, available + held + committed is what
//!   was stocked, and `held` is the sum of the held reservations' lines;
//! - once the rollback of an order is handled (acked), nothing is held or
//!   backordered for it, ever again, and no `inventory.reserved` follows;
//! - a confirmed order's units are committed once its confirmation is
//!   handled;
//! - per order, at most one `inventory.reserved`, one `inventory.failed` and
//!   one `inventory.released`, never both reserved and failed;
//! - no message is parked or escalated (every one of them can be applied).

use std::collections::HashMap;

use chrono::{Duration, Utc};
use common::messaging::envelope::SagaContext;
use common::messaging::events::{
    EventType, OrderCancelled, OrderDecided, PaymentActionRequired, PaymentCompleted,
};
use common::messaging::outbox::OutboxMessage;
use common::messaging::topology::INVENTORY_SVC;
use common::saga::order::{OrderLine, SagaResult};
use inventory_svc::handlers::InventoryHandler;
use proptest::prelude::*;
use saga_tests::Svc;
use uuid::Uuid;

use crate::harness::{self, Fault, Lab, Player, ensure};

const ITEMS: usize = 2;

#[derive(Debug, Clone)]
struct OrderSpec {
    /// (item, quantity)
    lines: Vec<(usize, i32)>,
    /// Paid with a 3-D Secure card: held first, confirmed later.
    three_ds: bool,
    /// Its events arrive with their deadline already past.
    expired: bool,
}

#[derive(Debug, Clone, Copy)]
enum Send {
    /// `payment.completed` (for a 3-D Secure order: its confirmation).
    Paid,
    /// `payment.action_required` (a plain order sends `Paid` instead).
    Hold,
    /// The saga's decision: a confirmation if asked for and possible.
    Decide { confirm: bool, timeout: bool },
}

#[derive(Debug, Clone)]
enum Step {
    Send {
        order: usize,
        what: Send,
    },
    /// A copy of the `nth` message sent so far (modulo), same id.
    Resend {
        nth: usize,
    },
    Deliver {
        size: usize,
        fault: Fault,
    },
    /// `PUT /items/{item}` with `units` available.
    Restock {
        item: usize,
        units: i32,
    },
    /// Every hold's long deadline passes; the expiry pass runs.
    ExpireHolds,
}

#[derive(Debug, Clone)]
struct History {
    /// (available, backorderable) per item.
    stock: Vec<(i32, bool)>,
    orders: Vec<OrderSpec>,
    steps: Vec<Step>,
}

fn order_spec() -> impl Strategy<Value = OrderSpec> {
    (
        proptest::collection::vec((0..ITEMS, 1..=2i32), 1..=2),
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.15),
    )
        .prop_map(|(mut lines, three_ds, expired)| {
            lines.sort_by_key(|l| l.0);
            lines.dedup_by_key(|l| l.0);
            OrderSpec {
                lines,
                three_ds,
                expired,
            }
        })
}

fn step() -> impl Strategy<Value = Step> {
    let send = prop_oneof![
        2 => Just(Send::Paid),
        1 => Just(Send::Hold),
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(confirm, timeout)| Send::Decide { confirm, timeout }),
    ];
    prop_oneof![
        5 => (0..3usize, send).prop_map(|(order, what)| Step::Send { order, what }),
        1 => (0..16usize).prop_map(|nth| Step::Resend { nth }),
        5 => (1..=6usize, harness::fault()).prop_map(|(size, fault)| Step::Deliver { size, fault }),
        1 => (0..ITEMS, 0..=4i32).prop_map(|(item, units)| Step::Restock { item, units }),
        1 => Just(Step::ExpireHolds),
    ]
}

fn history() -> impl Strategy<Value = History> {
    (
        proptest::collection::vec((0..=4i32, any::<bool>()), ITEMS),
        proptest::collection::vec(order_spec(), 1..=3),
        proptest::collection::vec(step(), 1..=28),
    )
        .prop_map(|(stock, orders, steps)| History {
            stock,
            orders,
            steps,
        })
}

async fn lab() -> Lab<InventoryHandler> {
    Lab::new(
        INVENTORY_SVC,
        Svc::Inventory,
        &inventory_svc::MIGRATOR,
        |pool, _| InventoryHandler { pool },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_keeps_its_promises_under_every_interleaving() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        harness::explore("inventory-svc", 96, history(), |h| {
            handle.block_on(async { Run::new(&lab, &h).await.play().await })
        });
    });
    lab.close().await;
}

/// Defect 1 of issue 23: a payment (or a 3-D Secure hold) and the rollback
/// of the same order in one batch, before any reservation existed. The
/// rollback's tombstone and the fresh reservation went into one insert, the
/// reservation won, the rollback was acked: units held for a failed order,
/// and its compensation gone. Found by the checker on its own.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_rollback_in_the_batch_of_its_payment_wins_whatever_their_order() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let order = |three_ds| OrderSpec {
        lines: vec![(0, 2), (1, 1)],
        three_ds,
        expired: false,
    };
    let fail = Send::Decide {
        confirm: false,
        timeout: true,
    };
    let batch = Step::Deliver {
        size: 3,
        fault: Fault::None,
    };
    for (three_ds, forward, first_the_rollback) in [
        (false, Send::Paid, false),
        (false, Send::Paid, true),
        (true, Send::Hold, false),
        (true, Send::Hold, true),
    ] {
        let steps = if first_the_rollback {
            vec![
                Step::Send {
                    order: 0,
                    what: fail,
                },
                Step::Send {
                    order: 0,
                    what: forward,
                },
            ]
        } else {
            vec![
                Step::Send {
                    order: 0,
                    what: forward,
                },
                Step::Send {
                    order: 0,
                    what: fail,
                },
            ]
        };
        let history = History {
            stock: vec![(5, false), (5, false)],
            orders: vec![order(three_ds)],
            steps: steps.into_iter().chain([batch.clone()]).collect(),
        };
        let run = Run::new(&lab, &history).await;
        let (items, id) = (run.items.clone(), run.p.orders[0]);
        if let Err(violation) = run.play().await {
            panic!("{history:#?}\n{violation}");
        }
        let (status, held): (String, i32) = sqlx::query_as(
            "select r.status, (select sum(held)::int from stock where item_id = any($2)) \
             from reservations r where order_id = $1",
        )
        .bind(id)
        .bind(&items)
        .fetch_one(&lab.pool)
        .await
        .unwrap();
        assert_eq!((status.as_str(), held), ("cancelled", 0), "{history:#?}");
    }
    lab.close().await;
}

/// One history played against the laboratory.
struct Run<'a> {
    p: Player<'a, InventoryHandler>,
    history: &'a History,
    items: Vec<String>,
    /// Per item: what was stocked (available + held + committed).
    supply: Vec<i64>,
    /// The decision sent for each order (its messages, to send again).
    decisions: HashMap<usize, Vec<OutboxMessage>>,
}

impl<'a> Run<'a> {
    async fn new(lab: &'a Lab<InventoryHandler>, history: &'a History) -> Run<'a> {
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        Run {
            p: Player::new(lab, history.orders.len()).await,
            history,
            items: (0..ITEMS).map(|i| format!("item{i}-{tag}")).collect(),
            supply: history.stock.iter().map(|(n, _)| i64::from(*n)).collect(),
            decisions: HashMap::new(),
        }
    }

    async fn play(mut self) -> Result<(), String> {
        let pool = &self.p.lab.pool;
        for (item, (available, backorderable)) in self.items.iter().zip(&self.history.stock) {
            let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
            inventory_svc::db::put_item(
                &mut conn,
                item,
                *available,
                Some(false),
                Some(*backorderable),
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        for step in &self.history.steps {
            self.step(step).await?;
            self.check().await.map_err(|e| self.p.explain(e))?;
        }
        while self.p.deliver_rest().await {
            self.check().await.map_err(|e| self.p.explain(e))?;
        }
        self.p.finish().await
    }

    fn lines(&self, order: usize) -> Vec<OrderLine> {
        self.history.orders[order]
            .lines
            .iter()
            .map(|(item, quantity)| OrderLine {
                item_id: self.items[*item].clone(),
                quantity: *quantity,
                unit_price_cents: 100,
            })
            .collect()
    }

    fn context(&self, order: usize, cause: &str, long: bool) -> SagaContext {
        let spec = &self.history.orders[order];
        let now = Utc::now();
        let deadline_at = match (spec.expired, long) {
            (true, _) => now - Duration::seconds(1),
            (false, true) => now + Duration::seconds(600),
            (false, false) => now + Duration::seconds(60),
        };
        SagaContext {
            order_id: self.p.orders[order],
            deadline_at,
            causation_id: format!("{cause}:{}", self.p.orders[order]),
            producer: "checker",
            trail: Vec::new(),
        }
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let n_orders = self.p.orders.len();
        match *step {
            Step::Send { order, what } => {
                let order = order % n_orders;
                let spec = &self.history.orders[order];
                let amount: i64 = spec.lines.iter().map(|(_, q)| i64::from(*q) * 100).sum();
                let lines = self.lines(order);
                match what {
                    Send::Hold if spec.three_ds => {
                        let m = self.context(order, "hold", true).event(
                            EventType::PaymentActionRequired,
                            &PaymentActionRequired {
                                customer_id: "c".into(),
                                items: lines,
                                amount_cents: amount,
                                currency: "USD".into(),
                                card_last4: "3220".into(),
                                action: "3ds_confirmation".into(),
                            },
                        );
                        self.p.send(&m);
                    }
                    Send::Paid | Send::Hold => {
                        let long = spec.three_ds.then(|| Utc::now() + Duration::seconds(600));
                        let m = self.context(order, "paid", false).event(
                            EventType::PaymentCompleted,
                            &PaymentCompleted {
                                customer_id: "c".into(),
                                items: lines,
                                amount_cents: amount,
                                currency: "USD".into(),
                                card_last4: "4242".into(),
                                long_deadline_at: long,
                            },
                        );
                        self.p.send(&m);
                    }
                    Send::Decide { confirm, timeout } => {
                        if let Some(messages) = self.decisions.get(&order).cloned() {
                            for m in &messages {
                                self.p.send(m);
                            }
                            return Ok(());
                        }
                        let id = self.p.orders[order];
                        let outbox = self.p.outbox().await;
                        let announced =
                            Player::<InventoryHandler>::count(&outbox, id, "inventory.reserved")
                                > 0;
                        let messages = decision(
                            &self.context(order, "decision", false),
                            amount,
                            confirm && announced,
                            timeout,
                        );
                        for m in &messages {
                            self.p.send(m);
                        }
                        self.decisions.insert(order, messages);
                    }
                }
            }
            Step::Resend { nth } => self.p.resend(nth),
            Step::Deliver { size, fault } => {
                self.p.deliver(size, fault).await;
            }
            Step::Restock { item, units } => {
                let (held, committed) = self.units(item).await?;
                self.supply[item] = i64::from(units) + held + committed;
                inventory_svc::restock::restock(
                    &self.p.lab.pool,
                    &self.p.lab.publisher,
                    &self.items[item],
                    units,
                    None,
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
                self.p
                    .note(format!("restock item{item} to {units} available"));
            }
            Step::ExpireHolds => {
                sqlx::query(
                    "update reservations set expires_at = now() - interval '1 second' \
                     where order_id = any($1) and awaiting_payment",
                )
                .bind(&self.p.orders)
                .execute(&self.p.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
                let released = inventory_svc::expiry::release_expired(
                    &self.p.lab.pool,
                    std::time::Duration::ZERO,
                )
                .await
                .map_err(|e| e.to_string())?;
                self.p.note(format!("holds expire ({released} released)"));
            }
        }
        Ok(())
    }

    /// An item's held units, and the units of its committed reservations.
    async fn units(&self, item: usize) -> Result<(i64, i64), String> {
        let (held, committed): (i32, i64) = sqlx::query_as(
            r#"
            select s.held,
                   coalesce((select sum(l.quantity) from reservation_lines l
                             join reservations r using (order_id)
                             where l.item_id = s.item_id and r.status = 'committed'), 0)::bigint
            from stock s where s.item_id = $1
            "#,
        )
        .bind(&self.items[item])
        .fetch_one(&self.p.lab.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok((i64::from(held), committed))
    }

    /// Every promise, against the database and the outbox.
    async fn check(&self) -> Result<(), String> {
        for item in 0..ITEMS {
            let (available, held, held_lines, committed): (i32, i32, i64, i64) = sqlx::query_as(
                r#"
                select s.available, s.held,
                       coalesce((select sum(l.quantity) from reservation_lines l
                                 join reservations r using (order_id)
                                 where l.item_id = s.item_id and r.status = 'held'), 0)::bigint,
                       coalesce((select sum(l.quantity) from reservation_lines l
                                 join reservations r using (order_id)
                                 where l.item_id = s.item_id and r.status = 'committed'), 0)::bigint
                from stock s where s.item_id = $1
                "#,
            )
            .bind(&self.items[item])
            .fetch_one(&self.p.lab.pool)
            .await
            .map_err(|e| e.to_string())?;
            let total = i64::from(available) + i64::from(held) + committed;
            ensure(total == self.supply[item], || {
                format!(
                    "item{item}: units not conserved: available {available} + held {held} + \
                     committed {committed} = {total}, stocked {}",
                    self.supply[item]
                )
            })?;
            ensure(i64::from(held) == held_lines, || {
                format!(
                    "item{item}: held {held}, but the held reservations' lines hold {held_lines}"
                )
            })?;
        }
        let statuses: Vec<(Uuid, String)> =
            sqlx::query_as("select order_id, status from reservations where order_id = any($1)")
                .bind(&self.p.orders)
                .fetch_all(&self.p.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
        let status: HashMap<Uuid, String> = statuses.into_iter().collect();
        let outbox = self.p.outbox().await;
        for (n, id) in self.p.orders.iter().enumerate() {
            let count = |key| Player::<InventoryHandler>::count(&outbox, *id, key);
            let (reserved, failed, released) = (
                count("inventory.reserved"),
                count("inventory.failed"),
                count("inventory.released"),
            );
            ensure(reserved <= 1 && failed <= 1 && released <= 1, || {
                format!(
                    "#{n}: {reserved} inventory.reserved, {failed} inventory.failed, {released} inventory.released"
                )
            })?;
            ensure(reserved + failed <= 1, || {
                format!("#{n}: both reserved and failed")
            })?;
            let current = status.get(id).map(String::as_str);
            // The deadline rule: no forward step after the deadline its
            // event carries.
            if self.history.orders[n].expired {
                ensure(
                    !matches!(current, Some("held" | "backordered" | "committed")),
                    || {
                        format!(
                            "#{n}: its events were past their deadline, yet its reservation is {current:?}"
                        )
                    },
                )?;
            }
            if self.p.rolled_back.contains_key(id) {
                ensure(
                    !matches!(current, Some("held" | "backordered" | "committed")),
                    || {
                        format!(
                            "#{n}: its rollback was handled, yet its reservation is {current:?}"
                        )
                    },
                )?;
                ensure(
                    !self.p.after_rollback(&outbox, *id, "inventory.reserved"),
                    || format!("#{n}: inventory.reserved after its rollback was handled"),
                )?;
            }
            if self
                .p
                .acked
                .contains_key(&(*id, "order.confirmed".to_owned()))
            {
                ensure(current == Some("committed"), || {
                    format!(
                        "#{n}: its confirmation was handled, yet its reservation is {current:?}"
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// The saga's decision for an order: `order.confirmed`, or `order.failed`
/// (after `order.cancelled` for a timeout).
pub fn decision(
    ctx: &SagaContext,
    amount_cents: i64,
    confirm: bool,
    timeout: bool,
) -> Vec<OutboxMessage> {
    let id = ctx.order_id;
    if confirm {
        return vec![ctx.event(
            EventType::OrderConfirmed,
            &OrderDecided {
                customer_id: "c".into(),
                amount_cents,
                result: SagaResult::Success { order_id: id },
            },
        )];
    }
    let mut messages = Vec::new();
    if timeout {
        messages.push(ctx.event(
            EventType::OrderCancelled,
            &OrderCancelled {
                customer_id: "c".into(),
                reason: "timed out".into(),
            },
        ));
    }
    messages.push(ctx.event(
        EventType::OrderFailed,
        &OrderDecided {
            customer_id: "c".into(),
            amount_cents,
            result: SagaResult::order_failed(id, "Order timed out", "x"),
        },
    ));
    messages
}

/// One of issue 23's smaller defects: new stock looked at the 100 oldest
/// backorders of the item and skipped the expired ones among them in Rust,
/// so a hundred stale backorders starved every newer one. They are now
/// left out in SQL.
#[tokio::test(flavor = "multi_thread")]
async fn regression_stale_backorders_do_not_starve_a_live_one() {
    let _serial = harness::SERIAL.lock().await;
    let lab = lab().await;
    let history = History {
        stock: vec![(0, true), (0, false)],
        orders: (0..101)
            .map(|_| OrderSpec {
                lines: vec![(0, 1)],
                three_ds: false,
                expired: false,
            })
            .collect(),
        steps: Vec::new(),
    };
    let mut run = Run::new(&lab, &history).await;
    let mut conn = lab.pool.acquire().await.unwrap();
    for (item, (available, backorderable)) in run.items.iter().zip(&history.stock) {
        inventory_svc::db::put_item(
            &mut conn,
            item,
            *available,
            Some(false),
            Some(*backorderable),
        )
        .await
        .unwrap();
    }
    drop(conn);
    for order in 0..101 {
        run.step(&Step::Send {
            order,
            what: Send::Paid,
        })
        .await
        .unwrap();
    }
    while !run.p.queue.is_empty() {
        run.p.deliver(32, Fault::None).await;
    }
    // The first hundred outlive their saga's long deadline.
    sqlx::query(
        "update reservations set pending = jsonb_set(pending, '{deadline_at}', \
         to_jsonb(now() - interval '1 second')) where order_id = any($1)",
    )
    .bind(&run.p.orders[..100])
    .execute(&lab.pool)
    .await
    .unwrap();
    run.step(&Step::Restock { item: 0, units: 1 })
        .await
        .unwrap();
    let status: String = sqlx::query_scalar("select status from reservations where order_id = $1")
        .bind(run.p.orders[100])
        .fetch_one(&lab.pool)
        .await
        .unwrap();
    assert_eq!(status, "held", "the live backorder is filled");
    lab.close().await;
}
