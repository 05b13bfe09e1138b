//! The order side of the saga: placing orders (start) and deciding them
//! (end), a batch at a time, shared by the HTTP API, the message handlers
//! and the timeout watcher.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::messaging::envelope::{SagaContext, TrailEntry, derive_event_id};
use common::messaging::events::{EventType, OrderCancelled, OrderCreated, OrderDecided};
use common::messaging::outbox::{OutboxMessage, OutboxRows};
use common::messaging::publisher::Publisher;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions as metric;
use common::saga::card::{CardBinding, CardSealer};
use common::saga::order::{PendingStep, SagaResult};
use sqlx::PgPool;
use sqlx::types::Json;
use tracing::{debug, info};
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewOrder, OrderRow, StepRow};
use crate::decisions::{DecisionWaiters, Waiter};
use crate::domain::{self, Decision, FailedStep, InvalidOrder, OrderStatus, ValidOrder};
use crate::progress::Progress;
use crate::watcher::NextWake;

/// Currency of every amount (the catalog's).
pub const CURRENCY: &str = "USD";

/// The AMQP `type` of a decision handed to another replica.
pub const DECISION_NOTICE: &str = "order.decision";

/// How often a waiting request re-reads its order (in case the hand-over
/// of its decision was lost).
const RECHECK: Duration = Duration::from_secs(1);

/// Where to publish an AMQP client's result.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    pub reply_to: String,
    pub correlation_id: String,
}

/// An order to place.
pub struct PlaceRequest {
    /// The id a new order gets, fixed before the first attempt: placed
    /// again (the answer to a COMMIT lost, say), the request finds the
    /// order it placed, with or without an idempotency key.
    pub order_id: Uuid,
    pub order: ValidOrder,
    /// The client's idempotency key (HTTP `Idempotency-Key`, AMQP `message_id`).
    pub key: Option<String>,
    /// Where an AMQP client wants the result dict.
    pub reply: Option<ReplyTarget>,
    /// Whether the caller waits for the decision (HTTP).
    pub wait: bool,
}

/// A placed order.
pub struct Placement {
    pub order_id: Uuid,
    /// False if the idempotency key was seen before: this is that order.
    pub new: bool,
    pub deadline_at: DateTime<Utc>,
    /// Already decided (an earlier order with the same key).
    pub result: Option<SagaResult>,
    /// Registered before the commit, if the caller waits.
    pub waiter: Option<Waiter>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Invalid(#[from] InvalidOrder),
    #[error("idempotency key {0:?} was already used for a different order")]
    KeyReused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the service is shutting down")]
    Unavailable,
}

/// A decision to make, and what caused it.
pub struct DecisionInput {
    pub order_id: Uuid,
    pub decision: Decision,
    /// The message that caused it (an event id, or `timeout:<order id>`).
    pub cause: String,
    /// The causing event and the events before it, oldest first.
    pub trail: Vec<TrailEntry>,
}

/// A decision just recorded, for metrics once it is committed.
#[derive(Debug, Clone, Copy)]
struct Decided {
    outcome: OrderStatus,
    failed_step: Option<FailedStep>,
    duration: Duration,
}

impl Decided {
    fn record(self) {
        let outcome = if self.outcome == OrderStatus::Confirmed {
            "confirmed"
        } else {
            "failed"
        };
        let step = self.failed_step.map_or("none", FailedStep::label);
        metrics::counter!(metric::SAGAS_DECIDED, "outcome" => outcome, "failed_step" => step)
            .increment(1);
        metrics::histogram!(metric::SAGA_DURATION_SECONDS, "outcome" => outcome)
            .record(self.duration.as_secs_f64());
    }
}

/// order-svc's state: the pool, the card sealer, the saga deadline, and who
/// is waiting for what.
pub struct OrderSaga {
    pub pool: PgPool,
    pub sealer: CardSealer,
    pub deadline: Duration,
    /// The deadline of a saga that waits for an outside answer (3-D Secure),
    /// from its creation.
    pub long_deadline: Duration,
    pub waiters: Arc<DecisionWaiters>,
    pub progress: Arc<Progress>,
    pub publisher: Publisher,
    /// This replica's own queue: decisions for its waiting requests made by
    /// another replica arrive there.
    pub replica_queue: String,
    /// The timeout watcher's next look, moved earlier by new orders.
    pub next_wake: Arc<NextWake>,
}

impl OrderSaga {
    /// Places a batch of orders in `uow`: new ones are inserted (one
    /// statement) with their `order.created`; a key seen before yields its
    /// order. Returns one outcome per request, in order.
    ///
    /// Existing orders that get a new reply target are locked, together with
    /// `also_lock` (the orders the rest of the caller's batch decides), in
    /// one sorted statement: the one global order every transaction locks
    /// orders in, so that concurrent batches cannot deadlock.
    pub async fn place_batch(
        &self,
        uow: &mut UnitOfWork,
        requests: &[PlaceRequest],
        also_lock: &[Uuid],
    ) -> Result<Vec<Result<Placement, PlaceError>>, sqlx::Error> {
        let fingerprints: Vec<String> = requests
            .iter()
            .map(|r| domain::fingerprint(&r.order))
            .collect();
        let mut keys: Vec<&str> = requests.iter().filter_map(|r| r.key.as_deref()).collect();
        keys.sort_unstable();
        keys.dedup();
        // Prices for every item named, and which keys placed an order
        // already (a retry; rare), in one round trip.
        let mut item_ids: Vec<&str> = requests
            .iter()
            .flat_map(|r| r.order.items.iter().map(|it| it.item_id.as_str()))
            .collect();
        item_ids.sort_unstable();
        item_ids.dedup();
        let (catalog, taken) = db::placement_state(uow.conn(), &item_ids, &keys).await?;
        let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
        let mut existing: HashMap<String, OrderRow> = if taken.is_empty() {
            HashMap::new()
        } else {
            db::find_by_keys(uow.conn(), &taken)
                .await?
                .into_iter()
                .filter_map(|row| Some((row.idempotency_key.clone()?, row)))
                .collect()
        };

        // Price the orders to create; a key used twice in this batch creates
        // one order.
        let mut first_with_key: HashMap<&str, usize> = HashMap::new();
        let mut to_create: Vec<usize> = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            match r.key.as_deref() {
                Some(k) if existing.contains_key(k) => {}
                Some(k) => {
                    if let std::collections::hash_map::Entry::Vacant(v) = first_with_key.entry(k) {
                        v.insert(i);
                        to_create.push(i);
                    }
                }
                None => to_create.push(i),
            }
        }
        let mut priced: HashMap<
            usize,
            Result<(Vec<common::saga::order::OrderLine>, i64), InvalidOrder>,
        > = HashMap::new();
        for &i in &to_create {
            let lines = domain::price(&requests[i].order.items, &catalog);
            priced.insert(
                i,
                lines.and_then(|lines| {
                    let amount = domain::amount_cents(&lines)?;
                    Ok((lines, amount))
                }),
            );
        }

        let order_ids: HashMap<usize, Uuid> = to_create
            .iter()
            .filter(|i| priced[i].is_ok())
            .map(|&i| (i, requests[i].order_id))
            .collect();
        // Both from one clock, so that the deadline is exactly the configured
        // one after the creation.
        let created_at = Utc::now();
        let deadline_at = created_at
            + chrono::TimeDelta::from_std(self.deadline).unwrap_or(chrono::TimeDelta::MAX);
        let creatable: Vec<usize> = to_create
            .iter()
            .copied()
            .filter(|i| order_ids.contains_key(i))
            .collect();
        let new_rows: Vec<NewOrder<'_>> = creatable
            .iter()
            .filter_map(|&i| {
                let (lines, amount) = priced[&i].as_ref().ok()?;
                let r = &requests[i];
                Some(NewOrder {
                    order_id: order_ids[&i],
                    customer_id: &r.order.customer_id,
                    items: lines,
                    amount_cents: *amount,
                    currency: CURRENCY,
                    card_brand: r.order.card.brand(),
                    card_last4: r.order.card.last4(),
                    idempotency_key: r.key.as_deref(),
                    fingerprint: &fingerprints[i],
                    reply_to: r.reply.as_ref().map(|t| t.reply_to.as_str()),
                    reply_correlation_id: r.reply.as_ref().map(|t| t.correlation_id.as_str()),
                    waiter: r.wait.then_some(self.replica_queue.as_str()),
                    created_at,
                    deadline_at,
                })
            })
            .collect();
        let events: Vec<(Uuid, OutboxMessage)> = creatable
            .iter()
            .filter_map(|&i| {
                let order_id = order_ids[&i];
                Some((
                    order_id,
                    self.created_event(
                        &requests[i],
                        order_id,
                        deadline_at,
                        priced[&i].as_ref().ok()?,
                    ),
                ))
            })
            .collect();
        let inserted: HashMap<Uuid, db::Inserted> = if new_rows.is_empty() {
            HashMap::new()
        } else {
            let rows = OutboxRows::new(events.iter().map(|(id, e)| (*id, e)));
            db::insert_orders(uow.conn(), &new_rows, rows)
                .await?
                .into_iter()
                .map(|row| (row.order_id, row))
                .collect()
        };
        drop(new_rows);
        uow.enqueued(
            events
                .into_iter()
                .filter(|(id, _)| inserted.contains_key(id))
                .map(|(_, e)| e),
        );
        // A key taken by a concurrent request since we looked: that order.
        // An order id taken: this very request placed it before (its
        // COMMIT's answer was lost), with or without a key: that order.
        let lost: Vec<&str> = order_ids
            .iter()
            .filter(|(_, id)| !inserted.contains_key(id))
            .filter_map(|(i, _)| requests[*i].key.as_deref())
            .collect();
        if !lost.is_empty() {
            for row in db::find_by_keys(uow.conn(), &lost).await? {
                if let Some(k) = row.idempotency_key.clone() {
                    existing.insert(k, row);
                }
            }
        }
        let placed_before: Vec<Uuid> = order_ids
            .iter()
            .filter(|(i, id)| !inserted.contains_key(id) && requests[**i].key.is_none())
            .map(|(_, id)| *id)
            .collect();
        let placed_before: HashMap<Uuid, OrderRow> = if placed_before.is_empty() {
            HashMap::new()
        } else {
            db::find_by_ids(uow.conn(), &placed_before)
                .await?
                .into_iter()
                .map(|row| (row.order_id, row))
                .collect()
        };

        // The existing orders that get a new reply target, and the caller's:
        // locked in one global order.
        let mut to_lock: Vec<Uuid> = also_lock.to_vec();
        let mut needs_reply_target = false;
        for (i, r) in requests.iter().enumerate() {
            if r.reply.is_none()
                || order_ids
                    .get(&i)
                    .is_some_and(|id| inserted.contains_key(id))
            {
                continue;
            }
            if let Some(row) = r.key.as_deref().and_then(|k| existing.get(k)) {
                to_lock.push(row.order_id);
                needs_reply_target = true;
            }
        }
        to_lock.sort_unstable();
        to_lock.dedup();
        let locked: HashMap<Uuid, OrderRow> = if to_lock.len() > 1 || needs_reply_target {
            if needs_reply_target {
                common::failpoints::pause_while_set("order::before_reply_target").await;
            }
            db::lock_orders(uow.conn(), &to_lock)
                .await?
                .into_iter()
                .map(|row| (row.order_id, row))
                .collect()
        } else {
            HashMap::new()
        };

        let mut created = 0u64;
        let earliest = inserted.values().map(|r| r.deadline_at).min();
        let mut outcomes = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let own = order_ids.get(&i).and_then(|id| inserted.get(id));
            let outcome = match (own, r.key.as_deref()) {
                (Some(row), _) => {
                    created += 1;
                    let (order_id, customer_id) = (row.order_id, r.order.customer_id.clone());
                    uow.on_commit(move || {
                        info!(%order_id, "order created; saga started");
                        debug!(%order_id, customer_id = ?customer_id, "order placed for");
                    });
                    Ok(Placement {
                        order_id: row.order_id,
                        new: true,
                        deadline_at: row.deadline_at,
                        result: None,
                        waiter: r.wait.then(|| self.waiters.register(row.order_id)),
                    })
                }
                (None, _) if matches!(priced.get(&i), Some(Err(_))) => match priced.get(&i) {
                    Some(Err(invalid)) => Err(PlaceError::Invalid(invalid.clone())),
                    _ => Err(vanished("")),
                },
                (None, Some(k)) => match existing.get(k) {
                    Some(row) if row.request_fingerprint != fingerprints[i] => {
                        Err(PlaceError::KeyReused(k.to_owned()))
                    }
                    Some(row) => self.existing_placement(uow, r, row, &locked).await,
                    // The key's first request in this batch created (or
                    // failed to create) the order.
                    None => match first_with_key.get(k).copied() {
                        Some(j) if fingerprints[j] != fingerprints[i] => {
                            Err(PlaceError::KeyReused(k.to_owned()))
                        }
                        Some(j) => match order_ids.get(&j).and_then(|id| inserted.get(id)) {
                            Some(row) => self.same_batch_placement(uow, r, &requests[j], row).await,
                            None => match priced.get(&j) {
                                Some(Err(invalid)) => Err(PlaceError::Invalid(invalid.clone())),
                                _ => Err(vanished(k)),
                            },
                        },
                        None => Err(vanished(k)),
                    },
                },
                (None, None) => match placed_before.get(&r.order_id) {
                    Some(row) if row.request_fingerprint == fingerprints[i] => {
                        self.existing_placement(uow, r, row, &locked).await
                    }
                    _ => Err(PlaceError::Db(sqlx::Error::Protocol(format!(
                        "order {} was neither inserted nor found",
                        r.order_id
                    )))),
                },
            };
            outcomes.push(outcome);
        }
        if let Some(deadline) = earliest {
            let next_wake = self.next_wake.clone();
            uow.on_commit(move || {
                metrics::counter!(metric::SAGAS_STARTED).increment(created);
                next_wake.placed(deadline);
            });
        }
        Ok(outcomes)
    }

    /// `order.created` for a new order: the saga starts.
    fn created_event(
        &self,
        request: &PlaceRequest,
        order_id: Uuid,
        deadline_at: DateTime<Utc>,
        (lines, amount_cents): &(Vec<common::saga::order::OrderLine>, i64),
    ) -> OutboxMessage {
        let ctx = SagaContext {
            order_id,
            deadline_at,
            causation_id: created_cause(request.key.as_deref(), order_id),
            producer: SERVICE,
            trail: Vec::new(),
        };
        ctx.event(
            EventType::OrderCreated,
            &OrderCreated {
                customer_id: request.order.customer_id.clone(),
                items: lines.clone(),
                amount_cents: *amount_cents,
                currency: CURRENCY.to_owned(),
                payment: self.sealer.seal(
                    &request.order.card,
                    CardBinding {
                        order_id,
                        amount_cents: *amount_cents,
                    },
                ),
                long_deadline_at: chrono::TimeDelta::from_std(self.long_deadline)
                    .ok()
                    .zip(chrono::TimeDelta::from_std(self.deadline).ok())
                    .map(|(long, short)| deadline_at - short + long.max(short)),
            },
        )
    }

    /// The placement of an order a key already created; a new reply target
    /// is added (and answered at once if the saga is decided).
    async fn existing_placement(
        &self,
        uow: &mut UnitOfWork,
        request: &PlaceRequest,
        row: &OrderRow,
        locked: &HashMap<Uuid, OrderRow>,
    ) -> Result<Placement, PlaceError> {
        let mut result = row.result();
        if let Some(reply) = &request.reply {
            // Under the order's lock (taken by `place_batch`), read afresh:
            // a decision made since the row was read has answered its
            // targets already (this one gets a late reply), and one made
            // after our commit will see it.
            let locked = locked
                .get(&row.order_id)
                .ok_or_else(|| vanished(row.idempotency_key.as_deref().unwrap_or_default()))?;
            result = locked.result();
            let already = row.reply_to.as_deref() == Some(reply.reply_to.as_str())
                && row.reply_correlation_id.as_deref() == Some(reply.correlation_id.as_str());
            if !already
                && db::add_reply_target(
                    uow.conn(),
                    row.order_id,
                    &reply.reply_to,
                    &reply.correlation_id,
                )
                .await?
                && let Some(result) = &result
            {
                // Decided already: its replies went out before this target existed.
                uow.emit(reply_message(
                    &format!("late-reply:{}", row.order_id),
                    &reply.reply_to,
                    &reply.correlation_id,
                    result,
                ));
            }
        }
        Ok(Placement {
            order_id: row.order_id,
            new: false,
            deadline_at: row.deadline_at,
            waiter: (request.wait && result.is_none()).then(|| self.waiters.register(row.order_id)),
            result,
        })
    }

    /// A second request for a key whose order this batch creates.
    async fn same_batch_placement(
        &self,
        uow: &mut UnitOfWork,
        request: &PlaceRequest,
        first: &PlaceRequest,
        row: &db::Inserted,
    ) -> Result<Placement, PlaceError> {
        if let Some(reply) = &request.reply {
            let same = first.reply.as_ref().is_some_and(|f| {
                f.reply_to == reply.reply_to && f.correlation_id == reply.correlation_id
            });
            if !same {
                db::add_reply_target(
                    uow.conn(),
                    row.order_id,
                    &reply.reply_to,
                    &reply.correlation_id,
                )
                .await?;
            }
        }
        Ok(Placement {
            order_id: row.order_id,
            new: false,
            deadline_at: row.deadline_at,
            result: None,
            waiter: request.wait.then(|| self.waiters.register(row.order_id)),
        })
    }

    /// Records each decision if its saga is still undecided (set-based),
    /// with everything a decision causes: the timeline, the terminal
    /// event(s), replies to AMQP clients, and — after the commit — the
    /// waiting requests' answers. A confirmation that comes too late turns
    /// into a timeout failure.
    pub async fn decide_batch(
        &self,
        uow: &mut UnitOfWork,
        inputs: Vec<DecisionInput>,
    ) -> Result<(), sqlx::Error> {
        let mut by_order: HashMap<Uuid, DecisionInput> = HashMap::new();
        let mut confirms = Vec::new();
        let mut fails = Vec::new();
        for input in inputs {
            if by_order.contains_key(&input.order_id) {
                continue;
            }
            match input.decision {
                Decision::Confirm => confirms.push(input.order_id),
                Decision::Fail { .. } => fails.push(input.order_id),
            }
            by_order.insert(input.order_id, input);
        }

        let mut decided: Vec<OrderRow> = Vec::new();
        if !confirms.is_empty() {
            let timelines: Vec<Vec<StepRow>> = confirms
                .iter()
                .map(|id| timeline(&by_order[id], None))
                .collect();
            let rows: Vec<(Uuid, Json<&[StepRow]>)> = confirms
                .iter()
                .zip(&timelines)
                .map(|(id, t)| (*id, Json(t.as_slice())))
                .collect();
            let done = db::confirm_orders(uow.conn(), &rows).await?;
            let confirmed: HashSet<Uuid> = done.iter().map(|r| r.order_id).collect();
            decided.extend(done);
            // Not confirmed: decided already, or past its deadline — then it
            // fails as a timeout, now.
            let missed: Vec<Uuid> = confirms
                .into_iter()
                .filter(|id| !confirmed.contains(id))
                .collect();
            if !missed.is_empty() {
                for row in db::lock_pending(uow.conn(), &missed).await? {
                    if let Some(input) = by_order.get_mut(&row.order_id) {
                        input.decision = self.timeout_decision(&row);
                        fails.push(row.order_id);
                    }
                }
            }
        }
        if !fails.is_empty() {
            let inputs: Vec<&DecisionInput> =
                fails.iter().filter_map(|id| by_order.get(id)).collect();
            decided.extend(self.fail(uow, &inputs, &HashMap::new()).await?);
        }
        self.record_decisions(uow, decided, &mut by_order).await
    }

    /// Records failures (one statement); returns the orders it decided.
    async fn fail(
        &self,
        uow: &mut UnitOfWork,
        inputs: &[&DecisionInput],
        rows: &HashMap<Uuid, &OrderRow>,
    ) -> Result<Vec<OrderRow>, sqlx::Error> {
        let timelines: Vec<Vec<StepRow>> = inputs
            .iter()
            .map(|i| timeline(i, rows.get(&i.order_id).copied()))
            .collect();
        let failures: Vec<db::Failure<'_>> = inputs
            .iter()
            .zip(&timelines)
            .filter_map(|(i, t)| match &i.decision {
                Decision::Fail { step, reason } => Some(db::Failure {
                    order_id: i.order_id,
                    error: step.error(),
                    reason,
                    timeline: Json(t.as_slice()),
                }),
                Decision::Confirm => None,
            })
            .collect();
        db::fail_orders(uow.conn(), &failures).await
    }

    /// Everything a batch of recorded decisions causes.
    async fn record_decisions(
        &self,
        uow: &mut UnitOfWork,
        decided: Vec<OrderRow>,
        inputs: &mut HashMap<Uuid, DecisionInput>,
    ) -> Result<(), sqlx::Error> {
        if decided.is_empty() {
            return Ok(());
        }
        let mut targets = reply_targets(uow, &decided).await?;

        let mut after = Vec::with_capacity(decided.len());
        for row in decided {
            let Some(input) = inputs.remove(&row.order_id) else {
                continue;
            };
            let result = row
                .result()
                .unwrap_or_else(|| SagaResult::order_failed(row.order_id, "", ""));
            let ctx = decision_context(&row, &input.cause);
            let data = OrderDecided {
                customer_id: row.customer_id.clone(),
                amount_cents: row.amount_cents,
                result: result.clone(),
            };
            let failed_step = match &input.decision {
                Decision::Confirm => {
                    uow.emit(ctx.event(EventType::OrderConfirmed, &data));
                    None
                }
                Decision::Fail { step, reason } => {
                    if *step == FailedStep::Timeout {
                        uow.emit(ctx.event(
                            EventType::OrderCancelled,
                            &OrderCancelled {
                                customer_id: row.customer_id.clone(),
                                reason: reason.clone(),
                            },
                        ));
                    }
                    uow.emit(ctx.event(EventType::OrderFailed, &data));
                    Some(*step)
                }
            };
            for (to, corr) in targets.remove(&row.order_id).unwrap_or_default() {
                uow.emit(reply_message(&input.cause, &to, &corr, &result));
            }

            info!(order_id = %row.order_id, status = %row.status, error = ?row.error,
                  reason = ?row.reason, "saga decided");
            let duration = (row.decided_at.unwrap_or_else(Utc::now) - row.created_at)
                .to_std()
                .unwrap_or_default();
            let decided = Decided {
                outcome: row.status(),
                failed_step,
                duration,
            };
            after.push((row.order_id, row.waiter, result, decided));
        }

        let waiters = self.waiters.clone();
        let progress = self.progress.clone();
        let publisher = self.publisher.clone();
        let me = self.replica_queue.clone();
        uow.on_commit(move || {
            for (order_id, waiter, result, decided) in after {
                decided.record();
                progress.forget(order_id);
                match waiter {
                    Some(queue) if queue != me => {
                        publisher.publish_transient(decision_notice(order_id, &queue, &result));
                    }
                    _ => waiters.resolve(order_id, &result),
                }
            }
        });
        Ok(())
    }

    /// A timeout failure, naming the step still awaited.
    fn timeout_decision(&self, row: &OrderRow) -> Decision {
        let deadline_ms = (row.deadline_at - row.created_at).num_milliseconds();
        let reason = if let Some(awaiting) = &row.awaiting {
            domain::long_timeout_reason(deadline_ms, awaiting)
        } else {
            domain::timeout_reason(deadline_ms, &self.progress.steps_seen(row.order_id))
        };
        Decision::Fail {
            step: FailedStep::Timeout,
            reason,
        }
    }

    /// Sagas that wait for an outside answer (a payment's 3-D Secure
    /// confirmation, backordered items): each goes on under its long
    /// deadline (`long_at`, from the event), and whoever waits for it — an
    /// HTTP request, an AMQP client's `reply_to` — is told it is pending. Its
    /// final result follows when it is decided.
    pub async fn await_answers(
        &self,
        uow: &mut UnitOfWork,
        awaits: &[(Uuid, DateTime<Utc>, String, &'static str)],
    ) -> Result<(), sqlx::Error> {
        if awaits.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = awaits.iter().map(|(id, _, _, _)| *id).collect();
        let longs: Vec<DateTime<Utc>> = awaits.iter().map(|(_, at, _, _)| *at).collect();
        let what: Vec<&str> = awaits.iter().map(|(_, _, _, what)| *what).collect();
        let rows = db::await_answers(
            uow.conn(),
            &ids,
            &longs,
            &what,
            self.long_deadline.max(self.deadline),
        )
        .await?;
        let mut targets = reply_targets(uow, &rows).await?;
        let mut told = Vec::with_capacity(rows.len());
        for row in rows {
            let result = pending_result(&row);
            let cause = awaits
                .iter()
                .find(|(id, _, _, _)| *id == row.order_id)
                .map_or_else(String::new, |(_, _, cause, _)| cause.clone());
            for (to, corr) in targets.remove(&row.order_id).unwrap_or_default() {
                uow.emit(reply_message(&cause, &to, &corr, &result));
            }
            info!(order_id = %row.order_id, deadline_at = %row.deadline_at,
                  awaiting = ?row.awaiting, "saga pending: it waits for an outside answer");
            told.push((row.order_id, row.waiter, result));
        }
        let waiters = self.waiters.clone();
        let publisher = self.publisher.clone();
        let me = self.replica_queue.clone();
        uow.on_commit(move || {
            for (order_id, waiter, result) in told {
                match waiter {
                    Some(queue) if queue != me => {
                        publisher.publish_transient(decision_notice(order_id, &queue, &result));
                    }
                    _ => waiters.resolve(order_id, &result),
                }
            }
        });
        Ok(())
    }

    /// Fails up to `limit` overdue sagas (the timeout watcher's pass);
    /// returns how many it failed.
    pub async fn fail_overdue(&self, limit: i64) -> Result<usize, sqlx::Error> {
        let mut uow = UnitOfWork::begin(&self.pool).await?;
        let rows = db::lock_overdue(uow.conn(), limit).await?;
        let n = self.fail_as_timeouts(&mut uow, rows).await?;
        uow.commit(&self.publisher).await?;
        Ok(n)
    }

    /// Fails one order if it is still undecided past its deadline (the
    /// waiting request's own deadline).
    pub async fn fail_if_overdue(&self, order_id: Uuid) -> Result<(), sqlx::Error> {
        let mut uow = UnitOfWork::begin(&self.pool).await?;
        let rows: Vec<OrderRow> = db::lock_pending(uow.conn(), &[order_id])
            .await?
            .into_iter()
            .filter(|r| r.deadline_at <= Utc::now())
            .collect();
        self.fail_as_timeouts(&mut uow, rows).await?;
        uow.commit(&self.publisher).await
    }

    async fn fail_as_timeouts(
        &self,
        uow: &mut UnitOfWork,
        rows: Vec<OrderRow>,
    ) -> Result<usize, sqlx::Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut inputs: HashMap<Uuid, DecisionInput> = rows
            .iter()
            .map(|row| {
                (
                    row.order_id,
                    DecisionInput {
                        order_id: row.order_id,
                        decision: self.timeout_decision(row),
                        cause: format!("timeout:{}", row.order_id),
                        trail: Vec::new(),
                    },
                )
            })
            .collect();
        let by_id: HashMap<Uuid, &OrderRow> = rows.iter().map(|r| (r.order_id, r)).collect();
        let refs: Vec<&DecisionInput> = inputs.values().collect();
        let decided = self.fail(uow, &refs, &by_id).await?;
        let n = decided.len();
        self.record_decisions(uow, decided, &mut inputs).await?;
        Ok(n)
    }

    /// Waits for the saga's result. Never waits past the deadline: at the
    /// deadline it fails the saga itself (the watcher would too), so a client
    /// always gets an answer within the deadline plus a few milliseconds.
    pub async fn wait_for_result(
        &self,
        placement: Placement,
    ) -> Result<Option<SagaResult>, sqlx::Error> {
        if let Some(result) = placement.result {
            return Ok(Some(result));
        }
        let order_id = placement.order_id;
        let waiter = placement
            .waiter
            .unwrap_or_else(|| self.waiters.register(order_id));
        // An order placed earlier may have been decided before the waiter
        // was registered: look once.
        let mut check_now = !placement.new;
        loop {
            if check_now {
                let mut conn = self.pool.acquire().await?;
                let Some(row) = db::get_order(&mut conn, order_id).await? else {
                    return Ok(None);
                };
                drop(conn);
                if let Some(result) = row.result().or_else(|| pending_of(&row)) {
                    return Ok(Some(result));
                }
            }
            let until_deadline = (placement.deadline_at - Utc::now())
                .to_std()
                .unwrap_or_default();
            if until_deadline.is_zero() {
                self.fail_if_overdue(order_id).await?;
                if let Some(result) = waiter.wait(Duration::from_millis(50)).await {
                    return Ok(Some(result));
                }
                check_now = true;
                continue;
            }
            if let Some(result) = waiter.wait(until_deadline.min(RECHECK)).await {
                return Ok(Some(result));
            }
            check_now = true;
        }
    }
}

/// Every AMQP client's reply target of each of `rows`: the order's first
/// one and those added since (one more statement only if some were).
async fn reply_targets(
    uow: &mut UnitOfWork,
    rows: &[OrderRow],
) -> Result<HashMap<Uuid, Vec<(String, String)>>, sqlx::Error> {
    let mut targets: HashMap<Uuid, Vec<(String, String)>> = HashMap::new();
    let extra: Vec<Uuid> = rows
        .iter()
        .filter(|r| r.extra_reply_targets)
        .map(|r| r.order_id)
        .collect();
    if !extra.is_empty() {
        for (id, to, corr) in db::extra_reply_targets(uow.conn(), &extra).await? {
            targets.entry(id).or_default().push((to, corr));
        }
    }
    for row in rows {
        if let (Some(to), Some(corr)) = (&row.reply_to, &row.reply_correlation_id) {
            targets
                .entry(row.order_id)
                .or_default()
                .push((to.clone(), corr.clone()));
        }
    }
    Ok(targets)
}

fn vanished(key: &str) -> PlaceError {
    PlaceError::Db(sqlx::Error::Protocol(format!(
        "idempotency key {key:?} vanished between insert and lookup"
    )))
}

/// The cause of an order's `order.created`: the client's key, or — without
/// one — the order itself, spelled with a control character no key can
/// contain (keys are printable), so the two never collide.
pub fn created_cause(key: Option<&str>, order_id: Uuid) -> String {
    key.map_or_else(|| format!("\u{1f}order\u{1f}{order_id}"), str::to_owned)
}

/// The context of the events a decision emits.
fn decision_context(row: &OrderRow, cause: &str) -> SagaContext {
    SagaContext {
        order_id: row.order_id,
        deadline_at: row.deadline_at,
        causation_id: cause.to_owned(),
        producer: SERVICE,
        trail: Vec::new(),
    }
}

/// The timeline a decision records: `order.created`, the steps that led
/// here (the deciding event's trail), the decision's own events. Their ids
/// are derived from their causes, so they are known before the decision is.
fn timeline(input: &DecisionInput, row: Option<&OrderRow>) -> Vec<StepRow> {
    let now = Utc::now();
    let detail = match &input.decision {
        Decision::Fail { reason, .. } => Some(reason.clone()),
        Decision::Confirm => None,
    };
    let mut steps = Vec::with_capacity(input.trail.len() + 3);
    if !input
        .trail
        .iter()
        .any(|t| t.event_type == EventType::OrderCreated)
        && let Some(row) = row
    {
        steps.push(created_step_row(row));
    }
    let last = input.trail.len().saturating_sub(1);
    for (n, t) in input.trail.iter().enumerate() {
        steps.push(StepRow {
            step: t.event_type.routing_key().to_owned(),
            source: t.producer.clone(),
            event_id: Some(t.event_id),
            detail: if n == last { detail.clone() } else { None },
            occurred_at: t.occurred_at,
            recorded_at: now,
        });
    }
    let events: &[EventType] = match &input.decision {
        Decision::Confirm => &[EventType::OrderConfirmed],
        Decision::Fail {
            step: FailedStep::Timeout,
            ..
        } => &[EventType::OrderCancelled, EventType::OrderFailed],
        Decision::Fail { .. } => &[EventType::OrderFailed],
    };
    for kind in events {
        steps.push(StepRow {
            step: kind.routing_key().to_owned(),
            source: SERVICE.to_owned(),
            event_id: Some(derive_event_id(&input.cause, SERVICE, kind.routing_key())),
            detail: detail.clone(),
            occurred_at: now,
            recorded_at: now,
        });
    }
    steps
}

/// The pending result of a saga that waits for an outside answer.
pub fn pending_result(row: &OrderRow) -> SagaResult {
    SagaResult::Pending {
        order_id: row.order_id,
        next: PendingStep {
            step: row
                .awaiting
                .clone()
                .unwrap_or_else(|| domain::AWAITING_PAYMENT.to_owned()),
            deadline_at: row.deadline_at,
            detail: domain::awaiting_detail(row.awaiting.as_deref().unwrap_or_default())
                .replace("{order_id}", &row.order_id.to_string()),
        },
    }
}

/// A pending result, for an undecided saga that waits for an answer.
fn pending_of(row: &OrderRow) -> Option<SagaResult> {
    (row.status() == OrderStatus::Pending && row.awaiting.is_some()).then(|| pending_result(row))
}

/// The timeline entry of an order's `order.created`.
pub fn created_step_row(row: &OrderRow) -> StepRow {
    let cause = created_cause(row.idempotency_key.as_deref(), row.order_id);
    StepRow {
        step: EventType::OrderCreated.routing_key().to_owned(),
        source: SERVICE.to_owned(),
        event_id: Some(derive_event_id(
            &cause,
            SERVICE,
            EventType::OrderCreated.routing_key(),
        )),
        detail: None,
        occurred_at: row.created_at,
        recorded_at: row.created_at,
    }
}

/// The reply carrying `result` to an AMQP client.
fn reply_message(
    cause: &str,
    reply_to: &str,
    correlation_id: &str,
    result: &SagaResult,
) -> OutboxMessage {
    let id = derive_event_id(
        cause,
        SERVICE,
        &format!("reply\u{1f}{reply_to}\u{1f}{correlation_id}"),
    );
    OutboxMessage::reply(
        id,
        reply_to,
        correlation_id,
        serde_json::to_vec(result).unwrap_or_default(),
    )
}

/// A decision handed to the replica whose request waits for it.
fn decision_notice(order_id: Uuid, queue: &str, result: &SagaResult) -> OutboxMessage {
    OutboxMessage {
        id: Uuid::now_v7(),
        exchange: String::new(),
        routing_key: queue.to_owned(),
        message_type: DECISION_NOTICE.to_owned(),
        correlation_id: Some(order_id.to_string()),
        body: serde_json::to_vec(result).unwrap_or_default(),
        mandatory: false,
        traceparent: None,
    }
}

/// Replies to an AMQP client whose order was rejected as invalid.
pub fn rejection_reply(
    message_id: &str,
    reply: &ReplyTarget,
    invalid: &InvalidOrder,
) -> OutboxMessage {
    reply_message(
        &format!("rejected:{message_id}"),
        &reply.reply_to,
        &reply.correlation_id,
        &invalid.result(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_a_key_spelled_like_an_order_never_shares_its_event_ids() {
        let id = Uuid::now_v7();
        for key in [format!("http:{id}"), format!("order:{id}"), id.to_string()] {
            assert_ne!(
                created_cause(Some(&key), id),
                created_cause(None, id),
                "{key}"
            );
        }
    }
}
