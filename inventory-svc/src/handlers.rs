//! Message handlers of inventory-svc, one batch at a time.
//!
//! - `payment.completed`: reserve every line (or none) → `inventory.reserved`
//!   / `inventory.failed`.
//! - `order.confirmed`: commit the held units.
//! - `order.failed`, `order.cancelled`: release held units
//!   (`inventory.released`), or tombstone so a late `payment.completed` is
//!   never applied.
//!
//! A batch costs a fixed handful of statements whatever its size: look up
//! the orders' reservations and the lines of the held ones, lock every stock
//! row the batch touches (sorted: one global order, so replicas cannot
//! deadlock), decide each reservation in the batch's order against the
//! locked levels, then write the reservations, their lines, the status
//! changes and one net update per item. Duplicates are recognised by the
//! natural key: one reservation record per order, ever.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use common::messaging::delivery::Incoming;
use common::messaging::envelope::{Envelope, SagaContext};
use common::messaging::events::{
    EventType, InventoryBackordered, InventoryReleased, InventoryReserved, PaymentActionRequired,
    PaymentCompleted, StepFailed,
};
use common::messaging::handler::{HandlerError, MessageHandler, MessageResult, StepBatch};
use common::messaging::inbox;
use common::messaging::outbox::{OutboxMessage, OutboxRows};
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::order::OrderLine;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db;
use crate::domain::{self, ReservationStatus};

pub struct InventoryHandler {
    pub pool: PgPool,
}

impl MessageHandler for InventoryHandler {
    /// Releases and commits of held stock must happen whatever it takes: a
    /// release undoes a reservation, a commit is the last step of a
    /// confirmed (charged) order and cannot be undone.
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        match EventType::from_routing_key(routing_key) {
            Some(EventType::OrderConfirmed) => Some("stock commit"),
            _ => common::messaging::handler::compensation_on_rollback(routing_key, "stock release"),
        }
    }

    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let StepBatch {
            mut results,
            forward,
            rollbacks,
            others,
        } = StepBatch::<PaymentCompleted>::sort(
            SERVICE,
            batch,
            EventType::PaymentCompleted,
            &[EventType::OrderConfirmed, EventType::PaymentActionRequired],
        );
        // A payment waiting for its 3-D Secure confirmation: its lines are
        // held like a reservation's, and announced once it is confirmed.
        // Holds first: a confirmation of a hold in the same batch then finds
        // it and announces it (below), whatever the order they arrived in.
        let mut reserve = Vec::new();
        let mut holds = HashSet::new();
        let mut confirm = Vec::new();
        for (i, env) in others {
            if env.event_type != EventType::PaymentActionRequired {
                confirm.push((i, env));
                continue;
            }
            match env.data_as::<PaymentActionRequired>() {
                Ok(waiting) => {
                    holds.insert(env.order_id);
                    let as_paid = PaymentCompleted {
                        customer_id: waiting.customer_id,
                        items: waiting.items,
                        amount_cents: waiting.amount_cents,
                        currency: waiting.currency,
                        card_last4: waiting.card_last4,
                        long_deadline_at: Some(env.deadline_at),
                    };
                    reserve.push((i, env, as_paid));
                }
                Err(e) => results[i] = Err(e.into()),
            }
        }
        reserve.extend(forward);
        let work = Work {
            reserve,
            holds,
            confirm,
            abort: rollbacks,
        };
        if !work.is_empty() {
            work.apply(uow, &mut results).await?;
        }
        Ok(results)
    }
}

/// The batch's messages, sorted by what they ask for.
struct Work {
    reserve: Vec<(usize, Envelope, PaymentCompleted)>,
    /// The orders of `reserve` only to hold (their payment waits).
    holds: HashSet<Uuid>,
    confirm: Vec<(usize, Envelope)>,
    abort: Vec<(usize, Envelope)>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.reserve.is_empty() && self.confirm.is_empty() && self.abort.is_empty()
    }

    async fn apply(
        self,
        uow: &mut UnitOfWork,
        results: &mut [MessageResult],
    ) -> Result<(), HandlerError> {
        let Work {
            reserve,
            holds,
            confirm,
            abort,
        } = self;
        if !confirm.is_empty() && common::failpoints::is_set("inventory::stock_commit") {
            return Err(HandlerError::transient(
                "failpoint inventory::stock_commit: committing held stock fails",
            ));
        }

        // What the batch starts from, in one statement.
        let mut ids: Vec<Uuid> = reserve
            .iter()
            .map(|(_, e, _)| e.order_id)
            .chain(confirm.iter().chain(&abort).map(|(_, e)| e.order_id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let finishing: Vec<Uuid> = confirm
            .iter()
            .chain(&abort)
            .map(|(_, e)| e.order_id)
            .collect();
        let items = domain::lock_order(reserve.iter().flat_map(|(_, _, p)| &p.items));
        let db::BatchState {
            existing,
            held_lines,
            stock: mut levels,
        } = db::batch_state(uow.conn(), &ids, &finishing, &items).await?;
        let status_of = |id: &Uuid| existing.get(id).and_then(|s| ReservationStatus::parse(s));
        // Orders rolled back in this very batch: the rollback wins over a
        // forward event of the same order, whatever their order in the
        // batch (nothing is reserved, held or announced for them).
        let aborting: HashSet<Uuid> = abort.iter().map(|(_, e)| e.order_id).collect();

        // New reservations: a duplicate or a late request (tombstone) is
        // recognised by the record it finds.
        let mut seen = HashSet::new();
        let (mut duplicates, mut late) = (0u64, 0u64);
        // Confirmed payments of orders whose stock is already held.
        let mut confirmed_holds: Vec<(Envelope, PaymentCompleted)> = Vec::new();
        let fresh: Vec<(Envelope, PaymentCompleted)> = reserve
            .into_iter()
            .filter_map(|(_, env, paid)| match status_of(&env.order_id) {
                _ if aborting.contains(&env.order_id) => {
                    late += 1;
                    None
                }
                Some(ReservationStatus::Cancelled) => {
                    late += 1;
                    None
                }
                Some(ReservationStatus::Held) if env.event_type == EventType::PaymentCompleted => {
                    confirmed_holds.push((env, paid));
                    None
                }
                Some(_) => {
                    duplicates += 1;
                    None
                }
                // The confirmation of a hold in this very batch: announced
                // once the hold is recorded.
                None if env.event_type == EventType::PaymentCompleted
                    && holds.contains(&env.order_id)
                    && seen.contains(&env.order_id) =>
                {
                    confirmed_holds.push((env, paid));
                    None
                }
                None if !seen.insert(env.order_id) => {
                    duplicates += 1;
                    None
                }
                None => Some((env, paid)),
            })
            .collect();

        // Decide each reservation in the batch's order, holding as we go.
        let now = Utc::now();
        let verdicts: Vec<Result<(), StepFailed>> = fresh
            .iter()
            .map(|(env, paid)| {
                if now >= env.deadline_at {
                    return Err(StepFailed {
                        code: "deadline_exceeded".into(),
                        reason: "Saga deadline passed before the reservation".into(),
                    });
                }
                domain::check_availability(&paid.items, &levels)?;
                for line in &paid.items {
                    if let Some(level) = levels.get_mut(&line.item_id) {
                        level.available -= line.quantity;
                    }
                }
                Ok(())
            })
            .collect();

        // Aborts of orders with no record yet leave a tombstone.
        let tombstones: Vec<(usize, Uuid)> = abort
            .iter()
            .filter(|(_, e)| !existing.contains_key(&e.order_id))
            .map(|(i, e)| (*i, e.order_id))
            .collect();
        // Short only of items flagged backorderable (and not a 3-D Secure
        // hold): the order waits for them. One more read, only when short.
        let short: Vec<(Uuid, Vec<String>)> = fresh
            .iter()
            .zip(&verdicts)
            .filter(|((env, _), v)| {
                !holds.contains(&env.order_id) && matches!(v, Err(f) if f.code == "out_of_stock")
            })
            .map(|((env, paid), _)| (env.order_id, domain::short_items(&paid.items, &levels)))
            .collect();
        let backordered: HashMap<Uuid, Vec<String>> = if short.is_empty() {
            HashMap::new()
        } else {
            let mut items: Vec<String> = short.iter().flat_map(|(_, i)| i.clone()).collect();
            items.sort_unstable();
            items.dedup();
            let flagged = db::backorderable(uow.conn(), &items).await?;
            short
                .into_iter()
                .filter(|(_, items)| !items.is_empty() && items.iter().all(|i| flagged.contains(i)))
                .collect()
        };
        let mut records: Vec<(Uuid, ReservationStatus, Option<&str>)> = fresh
            .iter()
            .zip(&verdicts)
            .map(|((env, _), v)| match v {
                _ if backordered.contains_key(&env.order_id) => {
                    (env.order_id, ReservationStatus::Backordered, None)
                }
                Ok(()) => (env.order_id, ReservationStatus::Held, None),
                Err(f) => (
                    env.order_id,
                    ReservationStatus::Rejected,
                    Some(f.reason.as_str()),
                ),
            })
            .collect();
        records.extend(tombstones.iter().map(|(_, id)| {
            (
                *id,
                ReservationStatus::Cancelled,
                Some("saga rolled back before any reservation"),
            )
        }));
        let lines: Vec<(Uuid, &OrderLine)> = fresh
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_ok())
            .flat_map(|((env, paid), _)| paid.items.iter().map(|l| (env.order_id, l)))
            .collect();

        // Commit or release what is held (a frozen item cannot be released:
        // that rollback is retried, then escalated).
        let mut finish: Vec<(Uuid, ReservationStatus)> = Vec::new();
        let mut changing = HashSet::new();
        for (i, env) in &confirm {
            match status_of(&env.order_id) {
                Some(ReservationStatus::Held) if changing.insert(env.order_id) => {
                    finish.push((env.order_id, ReservationStatus::Committed));
                }
                // Causally impossible (confirmation follows the reservation):
                // park it for an operator rather than guess.
                None => {
                    results[*i] = Err(HandlerError::permanent(format!(
                        "order.confirmed for order {} which has no reservation",
                        env.order_id
                    )));
                }
                _ => {}
            }
        }
        let mut releases: Vec<&Envelope> = Vec::new();
        let mut cancelled_backorders: Vec<(usize, Uuid)> = Vec::new();
        for (i, env) in &abort {
            if status_of(&env.order_id) == Some(ReservationStatus::Backordered) {
                cancelled_backorders.push((*i, env.order_id));
                continue;
            }
            if status_of(&env.order_id) != Some(ReservationStatus::Held) {
                continue;
            }
            let held = held_lines.get(&env.order_id).map_or(&[][..], Vec::as_slice);
            let frozen: Vec<&str> = held
                .iter()
                .filter(|l| levels.get(&l.item_id).is_some_and(|s| s.frozen))
                .map(|l| l.item_id.as_str())
                .collect();
            if !frozen.is_empty() {
                results[*i] = Err(HandlerError::Transient(anyhow::anyhow!(
                    "item(s) {} frozen for stocktake: the release cannot be applied yet",
                    frozen.join(", ")
                )));
            } else if changing.insert(env.order_id) {
                finish.push((env.order_id, ReservationStatus::Released));
                releases.push(env);
            }
        }

        // The events, and everything in one statement.
        let mut events: Vec<(Uuid, OutboxMessage)> = Vec::new();
        for ((env, paid), verdict) in fresh.iter().zip(&verdicts) {
            // A hold is not announced: nothing for notification-svc yet.
            if verdict.is_ok() && holds.contains(&env.order_id) {
                continue;
            }
            let ctx = SagaContext::caused_by(env, SERVICE);
            let event = match verdict {
                Ok(()) => ctx.event(EventType::InventoryReserved, &reserved_of(paid)),
                Err(_) if backordered.contains_key(&env.order_id) => {
                    let mut ctx = ctx;
                    ctx.deadline_at = paid.long_deadline_at.unwrap_or(env.deadline_at);
                    ctx.event(
                        EventType::InventoryBackordered,
                        &InventoryBackordered {
                            customer_id: paid.customer_id.clone(),
                            backordered: backordered[&env.order_id].clone(),
                        },
                    )
                }
                Err(failure) => ctx.event(EventType::InventoryFailed, failure),
            };
            events.push((env.order_id, event));
        }
        let n_reserve = events.len();
        for env in &releases {
            let items = held_lines.get(&env.order_id).cloned().unwrap_or_default();
            let event = SagaContext::caused_by(env, SERVICE)
                .event(EventType::InventoryReleased, &InventoryReleased { items });
            events.push((env.order_id, event));
        }
        let recorded = db::record_batch(
            uow.conn(),
            &db::BatchWrites {
                records: &records,
                lines: &lines,
                finish: &finish,
            },
            OutboxRows::new(events.iter().map(|(id, e)| (*id, e))),
        )
        .await?;

        let mut tombstoned = 0u64;
        for (i, id) in &tombstones {
            if recorded.inserted.contains(id) {
                tombstoned += 1;
            } else {
                // A reservation appeared since we looked (in this batch, or a
                // concurrent one): look again, on its own, shortly.
                results[*i] = Err(HandlerError::transient(format!(
                    "the reservation of order {id} changed while rolling it back; retrying"
                )));
            }
        }
        let (mut reserved, mut rejected) = (Vec::new(), 0u64);
        let mut held: Vec<(Uuid, chrono::DateTime<Utc>)> = Vec::new();
        for ((env, _), verdict) in fresh.iter().zip(&verdicts) {
            if !recorded.inserted.contains(&env.order_id) {
                late += 1;
            } else if verdict.is_ok() && holds.contains(&env.order_id) {
                held.push((env.order_id, env.deadline_at));
            } else if verdict.is_ok() {
                reserved.push(env.order_id);
            } else if !backordered.contains_key(&env.order_id) {
                rejected += 1;
            }
        }
        db::mark_holds(uow.conn(), &held).await?;
        let to_cancel: Vec<Uuid> = cancelled_backorders.iter().map(|(_, id)| *id).collect();
        let cancelled: HashSet<Uuid> = db::cancel_backorders(uow.conn(), &to_cancel)
            .await?
            .into_iter()
            .collect();
        for (i, id) in &cancelled_backorders {
            if !cancelled.contains(id) {
                // Filled by arriving stock since we looked: now held, so
                // the retry releases it.
                results[*i] = Err(HandlerError::transient(format!(
                    "the backorder of order {id} was filled while rolling it back; retrying"
                )));
            }
        }
        let mut waiting = 0u64;
        for (env, paid) in &fresh {
            if !backordered.contains_key(&env.order_id)
                || !recorded.inserted.contains(&env.order_id)
            {
                continue;
            }
            let ctx = SagaContext::caused_by(env, SERVICE);
            let pending = db::PendingReservation {
                causation_id: ctx.causation_id,
                deadline_at: paid.long_deadline_at.unwrap_or(env.deadline_at),
                trail: ctx.trail,
                data: reserved_of(paid),
            };
            db::record_backorder(uow.conn(), env.order_id, &paid.items, &pending).await?;
            waiting += 1;
            info!(order_id = %env.order_id, "backordered: the order waits for its items");
        }
        // Held stock whose payment is now confirmed: announced, once.
        let mut confirmed_n = 0u64;
        let candidates: Vec<Uuid> = confirmed_holds.iter().map(|(e, _)| e.order_id).collect();
        let claimed: HashSet<Uuid> = db::claim_holds(uow.conn(), &candidates)
            .await?
            .into_iter()
            .collect();
        for (env, paid) in &confirmed_holds {
            if !claimed.contains(&env.order_id) {
                duplicates += 1;
                continue;
            }
            confirmed_n += 1;
            info!(order_id = %env.order_id, "held stock announced: the payment is confirmed");
            uow.emit(
                SagaContext::caused_by(env, SERVICE)
                    .event(EventType::InventoryReserved, &reserved_of(paid)),
            );
        }
        let n_held = held.len() as u64;
        let committed = finish
            .iter()
            .filter(|(id, s)| *s == ReservationStatus::Committed && recorded.finished.contains(id))
            .count() as u64;
        let released: Vec<Uuid> = releases
            .iter()
            .map(|e| e.order_id)
            .filter(|id| recorded.finished.contains(id))
            .collect();
        uow.enqueued(events.into_iter().enumerate().filter_map(|(n, (id, e))| {
            let kept = if n < n_reserve {
                recorded.inserted.contains(&id)
            } else {
                recorded.finished.contains(&id)
            };
            kept.then_some(e)
        }));
        uow.on_commit(move || {
            let key = EventType::PaymentCompleted.routing_key();
            inbox::count_duplicates(SERVICE, key, duplicates);
            inbox::count_late(SERVICE, key, late);
            step_outcome(SERVICE, "reserved", reserved.len() as u64);
            step_outcome(SERVICE, "held", n_held);
            step_outcome(SERVICE, "hold_confirmed", confirmed_n);
            step_outcome(SERVICE, "backordered", waiting);
            step_outcome(SERVICE, "rejected", rejected);
            step_outcome(SERVICE, "committed", committed);
            step_outcome(SERVICE, "released", released.len() as u64);
            step_outcome(SERVICE, "cancelled_before_reservation", tombstoned);
            for order_id in reserved {
                info!(%order_id, "stock reserved");
            }
            for order_id in released {
                info!(%order_id, "stock released");
            }
        });
        Ok(())
    }
}

/// What `inventory.reserved` carries for a paid order.
fn reserved_of(paid: &PaymentCompleted) -> InventoryReserved {
    InventoryReserved {
        customer_id: paid.customer_id.clone(),
        items: paid.items.clone(),
        amount_cents: paid.amount_cents,
        currency: paid.currency.clone(),
    }
}
