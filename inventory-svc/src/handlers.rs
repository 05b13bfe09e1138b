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
use common::messaging::consumer::{HandlerError, MessageHandler, MessageResult};
use common::messaging::delivery::Incoming;
use common::messaging::envelope::{Envelope, SagaContext};
use common::messaging::events::{
    EventType, InventoryReleased, InventoryReserved, PaymentCompleted, StepFailed,
};
use common::messaging::inbox;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::order::OrderLine;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, StockDelta, StockMove};
use crate::domain::{self, ReservationStatus};

pub struct InventoryHandler {
    pub pool: PgPool,
}

impl MessageHandler for InventoryHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::messaging::consumer::compensation_on_rollback(routing_key, "stock release")
    }

    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let mut results: Vec<MessageResult> = Vec::with_capacity(batch.len());
        let mut work = Work::default();
        for (i, msg) in batch.iter().enumerate() {
            results.push(work.add(i, msg));
        }
        if !work.is_empty() {
            work.apply(uow, &mut results).await?;
        }
        Ok(results)
    }
}

/// The batch's messages, sorted by what they ask for.
#[derive(Default)]
struct Work {
    reserve: Vec<(usize, Envelope, PaymentCompleted)>,
    confirm: Vec<(usize, Envelope)>,
    abort: Vec<(usize, Envelope)>,
}

impl Work {
    fn add(&mut self, i: usize, msg: &Incoming) -> MessageResult {
        let env = Envelope::decode(&msg.body)?;
        match env.event_type {
            EventType::PaymentCompleted => {
                let paid = env.data_as()?;
                self.reserve.push((i, env, paid));
            }
            EventType::OrderConfirmed => self.confirm.push((i, env)),
            t if t.is_abort() => self.abort.push((i, env)),
            other => {
                return Err(HandlerError::permanent(format!(
                    "{SERVICE} does not handle {other}"
                )));
            }
        }
        Ok(())
    }

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
            confirm,
            abort,
        } = self;

        // What every order of the batch already has.
        let mut ids: Vec<Uuid> = reserve
            .iter()
            .map(|(_, e, _)| e.order_id)
            .chain(confirm.iter().chain(&abort).map(|(_, e)| e.order_id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let existing = db::existing_reservations(uow.conn(), &ids).await?;
        let status_of = |id: &Uuid| existing.get(id).and_then(|s| ReservationStatus::parse(s));
        let held: Vec<Uuid> = confirm
            .iter()
            .chain(&abort)
            .map(|(_, e)| e.order_id)
            .filter(|id| status_of(id) == Some(ReservationStatus::Held))
            .collect();
        let held_lines = if held.is_empty() {
            HashMap::new()
        } else {
            db::lines_of(uow.conn(), &held).await?
        };

        // New reservations: a duplicate or a late request (tombstone) is
        // recognised by the record it finds.
        let mut seen = HashSet::new();
        let (mut duplicates, mut late) = (0u64, 0u64);
        let fresh: Vec<(Envelope, PaymentCompleted)> = reserve
            .into_iter()
            .filter_map(|(_, env, paid)| match status_of(&env.order_id) {
                Some(ReservationStatus::Cancelled) => {
                    late += 1;
                    None
                }
                Some(_) => {
                    duplicates += 1;
                    None
                }
                None if !seen.insert(env.order_id) => {
                    duplicates += 1;
                    None
                }
                None => Some((env, paid)),
            })
            .collect();

        // Lock every stock row the batch touches, in one global order.
        let items = domain::lock_order(
            fresh
                .iter()
                .flat_map(|(_, p)| &p.items)
                .chain(held_lines.values().flatten()),
        );
        let mut levels = if items.is_empty() {
            HashMap::new()
        } else {
            db::lock_stock(uow.conn(), &items).await?
        };

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
        let mut records: Vec<(Uuid, ReservationStatus, Option<&str>)> = fresh
            .iter()
            .zip(&verdicts)
            .map(|((env, _), v)| match v {
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
        let inserted: HashSet<Uuid> = if records.is_empty() {
            HashSet::new()
        } else {
            db::insert_reservations(uow.conn(), &records)
                .await?
                .into_iter()
                .collect()
        };
        let mut tombstoned = 0u64;
        for (i, id) in &tombstones {
            if inserted.contains(id) {
                tombstoned += 1;
            } else {
                // A reservation appeared since we looked (in this batch, or a
                // concurrent one): look again, on its own, shortly.
                results[*i] = Err(HandlerError::transient(format!(
                    "the reservation of order {id} changed while rolling it back; retrying"
                )));
            }
        }

        let mut deltas: HashMap<String, StockDelta> = HashMap::new();
        let mut new_lines: Vec<(Uuid, &OrderLine)> = Vec::new();
        for ((env, paid), v) in fresh.iter().zip(&verdicts) {
            if v.is_ok() && inserted.contains(&env.order_id) {
                for line in &paid.items {
                    new_lines.push((env.order_id, line));
                    deltas
                        .entry(line.item_id.clone())
                        .or_default()
                        .add(StockMove::Hold, line.quantity);
                }
            }
        }
        if !new_lines.is_empty() {
            db::insert_lines_of(uow.conn(), &new_lines).await?;
        }

        // Commit or release what is held (a frozen item cannot be released:
        // that rollback is retried, then escalated).
        let mut changes: Vec<(Uuid, ReservationStatus)> = Vec::new();
        let mut changing = HashSet::new();
        for (i, env) in &confirm {
            match status_of(&env.order_id) {
                Some(ReservationStatus::Held) if changing.insert(env.order_id) => {
                    changes.push((env.order_id, ReservationStatus::Committed));
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
        for (i, env) in &abort {
            if status_of(&env.order_id) != Some(ReservationStatus::Held) {
                continue;
            }
            let lines = held_lines.get(&env.order_id).map_or(&[][..], Vec::as_slice);
            let frozen: Vec<&str> = lines
                .iter()
                .filter(|l| levels.get(&l.item_id).is_some_and(|s| s.frozen))
                .map(|l| l.item_id.as_str())
                .collect();
            if frozen.is_empty() {
                if changing.insert(env.order_id) {
                    changes.push((env.order_id, ReservationStatus::Released));
                }
            } else {
                results[*i] = Err(HandlerError::Transient(anyhow::anyhow!(
                    "item(s) {} frozen for stocktake: the release cannot be applied yet",
                    frozen.join(", ")
                )));
            }
        }
        let finished: HashSet<Uuid> = if changes.is_empty() {
            HashSet::new()
        } else {
            db::finish_held(uow.conn(), &changes)
                .await?
                .into_iter()
                .collect()
        };
        let (mut committed, mut released) = (0u64, HashSet::new());
        for (id, status) in &changes {
            if !finished.contains(id) {
                continue;
            }
            let how = if *status == ReservationStatus::Committed {
                committed += 1;
                StockMove::Commit
            } else {
                released.insert(*id);
                StockMove::Release
            };
            for line in held_lines.get(id).into_iter().flatten() {
                deltas
                    .entry(line.item_id.clone())
                    .or_default()
                    .add(how, line.quantity);
            }
        }
        db::apply_deltas(uow.conn(), &deltas).await?;

        // The events.
        let (mut reserved, mut rejected) = (Vec::new(), 0u64);
        let mut released_ids = Vec::new();
        for ((env, paid), verdict) in fresh.into_iter().zip(verdicts) {
            if !inserted.contains(&env.order_id) {
                late += 1;
                continue;
            }
            let ctx = SagaContext::caused_by(&env, SERVICE);
            match verdict {
                Ok(()) => {
                    reserved.push(env.order_id);
                    uow.emit(ctx.event(
                        EventType::InventoryReserved,
                        &InventoryReserved {
                            customer_id: paid.customer_id,
                            items: paid.items,
                            amount_cents: paid.amount_cents,
                            currency: paid.currency,
                        },
                    ));
                }
                Err(failure) => {
                    rejected += 1;
                    info!(order_id = %env.order_id, reason = %failure.reason, "reservation rejected");
                    uow.emit(ctx.event(EventType::InventoryFailed, &failure));
                }
            }
        }
        for (_, env) in &abort {
            if released.remove(&env.order_id) {
                released_ids.push(env.order_id);
                let lines = held_lines.get(&env.order_id).cloned().unwrap_or_default();
                uow.emit(SagaContext::caused_by(env, SERVICE).event(
                    EventType::InventoryReleased,
                    &InventoryReleased { items: lines },
                ));
            }
        }
        uow.on_commit(move || {
            let key = EventType::PaymentCompleted.routing_key();
            inbox::count_duplicates(SERVICE, key, duplicates);
            inbox::count_late(SERVICE, key, late);
            step_outcome(SERVICE, "reserved", reserved.len() as u64);
            step_outcome(SERVICE, "rejected", rejected);
            step_outcome(SERVICE, "committed", committed);
            step_outcome(SERVICE, "released", released_ids.len() as u64);
            step_outcome(SERVICE, "cancelled_before_reservation", tombstoned);
            for order_id in reserved {
                info!(%order_id, "stock reserved");
            }
            for order_id in released_ids {
                info!(%order_id, "stock released");
            }
        });
        Ok(())
    }
}
