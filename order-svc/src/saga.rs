//! The order side of the saga: placing an order (start) and deciding it
//! (end), shared by the HTTP API, the message handlers and the timeout
//! watcher.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::card::CardSealer;
use common::envelope::{SagaContext, derive_event_id};
use common::events::{EventType, OrderCancelled, OrderCreated, OrderDecided};
use common::inbox::UnitOfWork;
use common::order::SagaResult;
use common::outbox::OutboxMessage;
use common::telemetry::metric;
use sqlx::{PgConnection, PgPool};
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewOrder, NewStep, OrderRow};
use crate::decisions::DecisionWaiters;
use crate::domain::{self, Decision, FailedStep, InvalidOrder, OrderStatus, ValidOrder};

/// Currency of every amount (the catalog's).
pub const CURRENCY: &str = "USD";

/// Where to publish an AMQP client's result.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    pub reply_to: String,
    pub correlation_id: String,
}

/// Result of placing an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// A new saga started.
    New(Uuid),
    /// The idempotency key was seen before: this is that order.
    Existing(Uuid),
}

impl Placed {
    pub fn order_id(self) -> Uuid {
        match self {
            Placed::New(id) | Placed::Existing(id) => id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Invalid(#[from] InvalidOrder),
    #[error("idempotency key {0:?} was already used for a different order")]
    KeyReused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A decision just recorded, for metrics once it is committed.
#[derive(Debug, Clone, Copy)]
pub struct Decided {
    outcome: OrderStatus,
    failed_step: Option<FailedStep>,
    duration: Duration,
}

impl Decided {
    /// Counts the decision; call after the commit.
    pub fn record(self) {
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

/// order-svc's state: the pool, the card sealer and the saga deadline.
pub struct OrderSaga {
    pub pool: PgPool,
    pub sealer: CardSealer,
    pub deadline: Duration,
    pub waiters: Arc<DecisionWaiters>,
}

impl OrderSaga {
    /// Creates the order and emits `order.created`, or finds the order an
    /// idempotency key already created. A reply target, if given, receives
    /// the result dict once the saga is decided (at once if it already is).
    pub async fn place(
        &self,
        order: &ValidOrder,
        key: Option<&str>,
        reply: Option<&ReplyTarget>,
    ) -> Result<Placed, PlaceError> {
        let fingerprint = domain::fingerprint(order);
        let mut uow = UnitOfWork::begin(&self.pool).await?;
        // Two attempts: a concurrent request with the same key may insert
        // between our lookup and our insert; then the second pass finds it.
        for _ in 0..2 {
            if let Some(key) = key
                && let Some(existing) = db::find_by_key(uow.conn(), key).await?
            {
                if existing.request_fingerprint != fingerprint {
                    return Err(PlaceError::KeyReused(key.to_owned()));
                }
                if let Some(reply) = reply {
                    self.add_reply_target(&mut uow, &existing, reply).await?;
                }
                uow.commit().await?;
                return Ok(Placed::Existing(existing.order_id));
            }

            let item_ids: Vec<String> = order.items.iter().map(|i| i.item_id.clone()).collect();
            let catalog = db::catalog_prices(uow.conn(), &item_ids).await?;
            let lines = domain::price(&order.items, &catalog)?;
            let amount_cents = domain::amount_cents(&lines);
            let order_id = Uuid::now_v7();
            let new = NewOrder {
                order_id,
                customer_id: &order.customer_id,
                items: &lines,
                amount_cents,
                currency: CURRENCY,
                card_brand: order.card.brand(),
                card_last4: order.card.last4(),
                idempotency_key: key,
                fingerprint: &fingerprint,
                deadline_ms: self.deadline.as_millis() as i64,
            };
            let Some(row) = db::insert_order(uow.conn(), &new).await? else {
                continue; // lost the race for this key: read the winner
            };

            let ctx = SagaContext {
                order_id,
                deadline_at: row.deadline_at,
                causation_id: key.map_or_else(|| format!("http:{order_id}"), str::to_owned),
                producer: SERVICE,
            };
            let created = ctx.event(
                EventType::OrderCreated,
                &OrderCreated {
                    customer_id: order.customer_id.clone(),
                    items: lines,
                    amount_cents,
                    currency: CURRENCY.to_owned(),
                    payment: self.sealer.seal(&order.card),
                },
            );
            record_emitted(uow.conn(), &created, order_id, None).await?;
            uow.emit(created);
            if let Some(reply) = reply {
                db::add_reply_target(uow.conn(), order_id, &reply.reply_to, &reply.correlation_id)
                    .await?;
            }
            uow.commit().await?;
            metrics::counter!(metric::SAGAS_STARTED).increment(1);
            info!(%order_id, customer_id = %order.customer_id, amount_cents, "order created; saga started");
            return Ok(Placed::New(order_id));
        }
        Err(PlaceError::Db(sqlx::Error::Protocol(
            "idempotency key vanished between insert and lookup".into(),
        )))
    }

    async fn add_reply_target(
        &self,
        uow: &mut UnitOfWork,
        order: &OrderRow,
        reply: &ReplyTarget,
    ) -> Result<(), sqlx::Error> {
        let new = db::add_reply_target(
            uow.conn(),
            order.order_id,
            &reply.reply_to,
            &reply.correlation_id,
        )
        .await?;
        // Already decided: answer now (the decision's own replies went out
        // before this target existed).
        if new && let Some(result) = order.result() {
            uow.emit(reply_message(
                &format!("late-reply:{}", order.order_id),
                &reply.reply_to,
                &reply.correlation_id,
                &result,
            ));
        }
        Ok(())
    }

    /// Records `decision` if the saga is still undecided, with everything a
    /// decision causes: the terminal event(s), replies to AMQP clients, the
    /// timeline entry and the wake-up of HTTP waiters. A confirmation that
    /// comes too late turns into a timeout failure.
    pub async fn decide(
        &self,
        uow: &mut UnitOfWork,
        order_id: Uuid,
        decision: Decision,
        cause: &str,
    ) -> Result<Option<Decided>, sqlx::Error> {
        let mut decision = decision;
        let row = match db::decide(uow.conn(), order_id, &decision).await? {
            Some(row) => row,
            None => {
                // Decided already, unknown, or a confirmation past the deadline.
                let Some(row) = db::lock_order(uow.conn(), order_id).await? else {
                    return Ok(None);
                };
                if row.status() != OrderStatus::Pending {
                    return Ok(None);
                }
                decision = self.timeout_decision(uow.conn(), &row).await?;
                match db::decide(uow.conn(), order_id, &decision).await? {
                    Some(row) => row,
                    None => return Ok(None),
                }
            }
        };

        let ctx = SagaContext {
            order_id,
            deadline_at: row.deadline_at,
            causation_id: cause.to_owned(),
            producer: SERVICE,
        };
        let result = row.result().unwrap_or_else(|| SagaResult::failure("", ""));
        let decided = OrderDecided {
            customer_id: row.customer_id.clone(),
            amount_cents: row.amount_cents,
            result: result.clone(),
        };
        let mut events = Vec::new();
        let failed_step = match &decision {
            Decision::Confirm => {
                events.push(ctx.event(EventType::OrderConfirmed, &decided));
                None
            }
            Decision::Fail { step, reason } => {
                if *step == FailedStep::Timeout {
                    events.push(ctx.event(
                        EventType::OrderCancelled,
                        &OrderCancelled {
                            customer_id: row.customer_id.clone(),
                            reason: reason.clone(),
                        },
                    ));
                }
                events.push(ctx.event(EventType::OrderFailed, &decided));
                Some(*step)
            }
        };
        for event in events {
            let detail = match &decision {
                Decision::Fail { reason, .. } => Some(reason.as_str()),
                Decision::Confirm => None,
            };
            record_emitted(uow.conn(), &event, order_id, detail).await?;
            uow.emit(event);
        }
        for (reply_to, correlation_id) in db::reply_targets(uow.conn(), order_id).await? {
            uow.emit(reply_message(cause, &reply_to, &correlation_id, &result));
        }
        db::notify_decided(uow.conn(), order_id).await?;
        let duration = (row.decided_at.unwrap_or_else(Utc::now) - row.created_at)
            .to_std()
            .unwrap_or_default();
        info!(%order_id, status = %row.status, error = ?row.error, reason = ?row.reason, "saga decided");
        Ok(Some(Decided {
            outcome: row.status(),
            failed_step,
            duration,
        }))
    }

    async fn timeout_decision(
        &self,
        conn: &mut PgConnection,
        row: &OrderRow,
    ) -> Result<Decision, sqlx::Error> {
        let steps: Vec<String> = db::steps(conn, row.order_id)
            .await?
            .into_iter()
            .map(|s| s.step)
            .collect();
        let deadline_ms = (row.deadline_at - row.created_at).num_milliseconds();
        Ok(Decision::Fail {
            step: FailedStep::Timeout,
            reason: domain::timeout_reason(deadline_ms, &steps),
        })
    }

    /// Fails one order if it is overdue (the HTTP waiter's own deadline).
    pub async fn fail_if_overdue(&self, order_id: Uuid) -> Result<(), sqlx::Error> {
        let mut uow = UnitOfWork::begin(&self.pool).await?;
        let Some(row) = db::lock_order(uow.conn(), order_id).await? else {
            return Ok(());
        };
        if row.status() != OrderStatus::Pending || row.deadline_at > Utc::now() {
            return Ok(());
        }
        let decision = self.timeout_decision(uow.conn(), &row).await?;
        let decided = self
            .decide(&mut uow, order_id, decision, &format!("timeout:{order_id}"))
            .await?;
        uow.commit().await?;
        if let Some(d) = decided {
            d.record();
        }
        Ok(())
    }

    /// Fails up to `limit` overdue sagas (the timeout watcher's pass);
    /// returns how many it failed.
    pub async fn fail_overdue(&self, limit: i64) -> Result<usize, sqlx::Error> {
        let mut uow = UnitOfWork::begin(&self.pool).await?;
        let overdue = db::lock_overdue(uow.conn(), limit).await?;
        let mut decided = Vec::with_capacity(overdue.len());
        for order_id in overdue {
            let Some(row) = db::get_order(uow.conn(), order_id).await? else {
                continue;
            };
            let decision = self.timeout_decision(uow.conn(), &row).await?;
            if let Some(d) = self
                .decide(&mut uow, order_id, decision, &format!("timeout:{order_id}"))
                .await?
            {
                decided.push(d);
            }
        }
        uow.commit().await?;
        let n = decided.len();
        decided.into_iter().for_each(Decided::record);
        Ok(n)
    }

    /// Waits for the saga's result. Never waits past the deadline: at the
    /// deadline it fails the saga itself (the watcher would too), so a client
    /// always gets an answer within the deadline plus a few milliseconds.
    pub async fn wait_for_result(&self, order_id: Uuid) -> Result<Option<SagaResult>, sqlx::Error> {
        let guard = self.waiters.register(order_id);
        loop {
            let notified = guard.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let mut conn = self.pool.acquire().await?;
            let Some(row) = db::get_order(&mut conn, order_id).await? else {
                return Ok(None);
            };
            drop(conn);
            if let Some(result) = row.result() {
                return Ok(Some(result));
            }
            let now = Utc::now();
            if row.deadline_at <= now {
                self.fail_if_overdue(order_id).await?;
                continue;
            }
            let until_deadline = (row.deadline_at - now).to_std().unwrap_or_default();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(until_deadline.min(Duration::from_millis(500))) => {}
            }
        }
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
        serde_json::to_value(result).unwrap_or_default(),
    )
}

/// Adds an event order-svc emits to the saga's timeline.
async fn record_emitted(
    conn: &mut PgConnection,
    event: &OutboxMessage,
    order_id: Uuid,
    detail: Option<&str>,
) -> Result<(), sqlx::Error> {
    db::record_step(
        conn,
        &NewStep {
            order_id,
            step: &event.routing_key,
            event_id: Some(event.id),
            source: SERVICE,
            detail,
            occurred_at: Utc::now(),
        },
    )
    .await
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
