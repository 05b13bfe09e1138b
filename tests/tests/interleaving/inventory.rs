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

use std::collections::{HashMap, HashSet};

use chrono::{Duration, Utc};
use common::messaging::envelope::SagaContext;
use common::messaging::events::{
    EventType, OrderCancelled, OrderDecided, PaymentActionRequired, PaymentCompleted,
};
use common::messaging::judge::Verdict;
use common::messaging::outbox::OutboxMessage;
use common::messaging::topology::INVENTORY_SVC;
use common::saga::order::{OrderLine, SagaResult};
use inventory_svc::handlers::InventoryHandler;
use proptest::prelude::*;
use saga_tests::Svc;
use uuid::Uuid;

use crate::harness::{self, Fault, Lab, Queue, describe, ensure, order_of, verdict};

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

#[tokio::test(flavor = "multi_thread")]
async fn inventory_keeps_its_promises_under_every_interleaving() {
    let _serial = harness::SERIAL.lock().await;
    let lab = Lab::new(
        INVENTORY_SVC,
        Svc::Inventory,
        &inventory_svc::MIGRATOR,
        |pool, _| InventoryHandler { pool },
    )
    .await;
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        harness::explore("inventory-svc", 96, history(), |h| {
            handle.block_on(Run::new(&lab, &h).play())
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
    let lab = Lab::new(
        INVENTORY_SVC,
        Svc::Inventory,
        &inventory_svc::MIGRATOR,
        |pool, _| InventoryHandler { pool },
    )
    .await;
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
        let run = Run::new(&lab, &history);
        let (items, id) = (run.items.clone(), run.orders[0]);
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
    lab: &'a Lab<InventoryHandler>,
    history: &'a History,
    items: Vec<String>,
    orders: Vec<Uuid>,
    queue: Queue,
    sent: Vec<common::messaging::delivery::Incoming>,
    /// Per item: what was stocked (available + held + committed).
    supply: Vec<i64>,
    /// The decision sent for each order (its messages, to send again).
    decisions: HashMap<usize, Vec<OutboxMessage>>,
    confirmed: HashSet<usize>,
    /// Orders whose rollback was handled, with the number of
    /// `inventory.reserved` they had then.
    rolled_back: HashMap<Uuid, usize>,
    /// Orders whose confirmation was handled.
    committed: HashSet<Uuid>,
    log: Vec<String>,
    /// Where the outbox ended when the history began.
    since: i64,
}

impl<'a> Run<'a> {
    fn new(lab: &'a Lab<InventoryHandler>, history: &'a History) -> Self {
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        Run {
            lab,
            history,
            items: (0..ITEMS).map(|i| format!("item{i}-{tag}")).collect(),
            orders: history.orders.iter().map(|_| Uuid::now_v7()).collect(),
            queue: Queue::default(),
            sent: Vec::new(),
            supply: history.stock.iter().map(|(n, _)| i64::from(*n)).collect(),
            decisions: HashMap::new(),
            confirmed: HashSet::new(),
            rolled_back: HashMap::new(),
            committed: HashSet::new(),
            log: Vec::new(),
            since: 0,
        }
    }

    async fn play(mut self) -> Result<(), String> {
        self.since = self.lab.outbox_end().await;
        let mut conn = self.lab.pool.acquire().await.map_err(|e| e.to_string())?;
        for (item, (available, backorderable)) in self.items.iter().zip(&self.history.stock) {
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
        drop(conn);
        for step in &self.history.steps {
            self.step(step).await?;
            self.check().await.map_err(|e| self.explain(e))?;
        }
        // Whatever is left is delivered, in batches, without faults.
        for _ in 0..200 {
            if self.queue.is_empty() {
                break;
            }
            self.step(&Step::Deliver {
                size: 8,
                fault: Fault::None,
            })
            .await?;
            self.check().await.map_err(|e| self.explain(e))?;
        }
        harness::cover_committed(&self.lab.outbox(self.since).await);
        ensure(self.queue.is_empty(), || {
            self.explain(format!("{} messages never settled", self.queue.len()))
        })?;
        ensure(self.queue.dead.is_empty(), || {
            let dead: Vec<String> = self
                .queue
                .dead
                .iter()
                .map(|(m, why)| format!("{} ({why})", m.routing_key))
                .collect();
            self.explain(format!("messages parked or escalated: {dead:?}"))
        })
    }

    fn explain(&self, violation: String) -> String {
        format!("{violation}\nwhat happened:\n  {}", self.log.join("\n  "))
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
            order_id: self.orders[order],
            deadline_at,
            causation_id: format!("{cause}:{}", self.orders[order]),
            producer: "checker",
            trail: Vec::new(),
        }
    }

    fn send(&mut self, message: &OutboxMessage) {
        let incoming = harness::incoming(message);
        self.sent.push(incoming.clone());
        self.queue.publish(incoming);
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let n_orders = self.orders.len();
        match *step {
            Step::Send { order, what } => {
                let order = order % n_orders;
                let spec = &self.history.orders[order];
                let amount: i64 = spec.lines.iter().map(|(_, q)| i64::from(*q) * 100).sum();
                let lines = self.lines(order);
                match what {
                    Send::Hold if spec.three_ds => {
                        let ctx = self.context(order, "hold", true);
                        let m = ctx.event(
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
                        self.log
                            .push(format!("send payment.action_required #{order}"));
                        self.send(&m);
                    }
                    Send::Paid | Send::Hold => {
                        let ctx = self.context(order, "paid", false);
                        let long = spec.three_ds.then(|| Utc::now() + Duration::seconds(600));
                        let m = ctx.event(
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
                        self.log.push(format!("send payment.completed #{order}"));
                        self.send(&m);
                    }
                    Send::Decide { confirm, timeout } => {
                        if let Some(messages) = self.decisions.get(&order).cloned() {
                            self.log
                                .push(format!("send the decision of #{order} again"));
                            for m in &messages {
                                self.send(m);
                            }
                            return Ok(());
                        }
                        let id = self.orders[order];
                        let announced = self.lab.outbox(self.since).await.iter().any(|e| {
                            e.order_id == Some(id) && e.routing_key == "inventory.reserved"
                        });
                        let ctx = self.context(order, "decision", false);
                        let mut messages = Vec::new();
                        if confirm && announced {
                            messages.push(ctx.event(
                                EventType::OrderConfirmed,
                                &OrderDecided {
                                    customer_id: "c".into(),
                                    amount_cents: amount,
                                    result: SagaResult::Success { order_id: id },
                                },
                            ));
                            self.confirmed.insert(order);
                            self.log.push(format!("send order.confirmed #{order}"));
                        } else {
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
                                    amount_cents: amount,
                                    result: SagaResult::order_failed(id, "Order timed out", "x"),
                                },
                            ));
                            self.log.push(format!(
                                "send {}order.failed #{order}",
                                if timeout { "order.cancelled + " } else { "" }
                            ));
                        }
                        for m in &messages {
                            self.send(m);
                        }
                        self.decisions.insert(order, messages);
                    }
                }
            }
            Step::Resend { nth } => {
                if !self.sent.is_empty() {
                    let again = self.sent[nth % self.sent.len()].clone();
                    self.log
                        .push(format!("send a copy of {}", describe(&again, &self.orders)));
                    self.queue.publish(again);
                }
            }
            Step::Deliver { size, fault } => {
                let outcomes = self.queue.deliver(&self.lab.judge, size, fault).await;
                if outcomes.is_empty() {
                    return Ok(());
                }
                let outbox = self.lab.outbox(self.since).await;
                let described: Vec<String> = outcomes
                    .iter()
                    .map(|o| {
                        format!(
                            "{} → {}",
                            describe(&o.message, &self.orders),
                            verdict(&o.verdict)
                        )
                    })
                    .collect();
                self.log.push(format!(
                    "deliver a batch{}: [{}]",
                    match fault {
                        Fault::None => "",
                        Fault::CrashBeforeAck => " (crash before the ack)",
                        Fault::CommitLost => " (the COMMIT's answer lost)",
                    },
                    described.join(", ")
                ));
                for o in outcomes {
                    if o.crashed || !matches!(o.verdict, Verdict::Ack) {
                        continue;
                    }
                    let Some(order_id) = order_of(&o.message) else {
                        continue;
                    };
                    match o.message.routing_key.as_str() {
                        "order.failed" | "order.cancelled" => {
                            let reserved = outbox
                                .iter()
                                .filter(|e| {
                                    e.order_id == Some(order_id)
                                        && e.routing_key == "inventory.reserved"
                                })
                                .count();
                            self.rolled_back.entry(order_id).or_insert(reserved);
                        }
                        "order.confirmed" => {
                            self.committed.insert(order_id);
                        }
                        _ => {}
                    }
                }
            }
            Step::Restock { item, units } => {
                let (held, committed) = self.units(item).await?;
                self.supply[item] = i64::from(units) + held + committed;
                inventory_svc::restock::restock(
                    &self.lab.pool,
                    &self.lab.publisher,
                    &self.items[item],
                    units,
                    None,
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
                self.log
                    .push(format!("restock item{item} to {units} available"));
            }
            Step::ExpireHolds => {
                sqlx::query(
                    "update reservations set expires_at = now() - interval '1 second' \
                     where order_id = any($1) and awaiting_payment",
                )
                .bind(&self.orders)
                .execute(&self.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
                let released = inventory_svc::expiry::release_expired(
                    &self.lab.pool,
                    std::time::Duration::ZERO,
                )
                .await
                .map_err(|e| e.to_string())?;
                self.log.push(format!("holds expire ({released} released)"));
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
        .fetch_one(&self.lab.pool)
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
            .fetch_one(&self.lab.pool)
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
                .bind(&self.orders)
                .fetch_all(&self.lab.pool)
                .await
                .map_err(|e| e.to_string())?;
        let status: HashMap<Uuid, String> = statuses.into_iter().collect();
        let outbox = self.lab.outbox(self.since).await;
        for (n, id) in self.orders.iter().enumerate() {
            let count = |key: &str| {
                outbox
                    .iter()
                    .filter(|e| e.order_id == Some(*id) && e.routing_key == key)
                    .count()
            };
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
            if let Some(&before) = self.rolled_back.get(id) {
                ensure(
                    !matches!(current, Some("held" | "backordered" | "committed")),
                    || {
                        format!(
                            "#{n}: its rollback was handled, yet its reservation is {current:?}"
                        )
                    },
                )?;
                ensure(reserved <= before, || {
                    format!("#{n}: inventory.reserved after its rollback was handled")
                })?;
            }
            if self.committed.contains(id) {
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
