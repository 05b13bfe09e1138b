//! Message handlers of order-svc, one batch at a time.
//!
//! - `order.requested` (body: the order dict; AMQP `message_id` = idempotency
//!   key): validate, create the order, emit `order.created` — the batch's
//!   orders in one statement. Invalid orders are answered with a failure
//!   dict (to `reply_to`) and parked.
//! - `payment.failed`, `inventory.failed`, `notification.failed`: decide FAILED.
//! - `notification.sent`: decide CONFIRMED (FAILED if the deadline passed).
//! - `payment.refunded`, `inventory.released`: added to the saga's timeline.
//! - `payment.action_required`, `inventory.backordered`: the saga waits for an
//!   outside answer (a 3-D Secure confirmation, the items) under its long
//!   deadline; whoever waits is told "pending".
//!
//! A saga is decided exactly once: decisions are conditional updates on the
//! order's row, so a duplicate or late outcome changes nothing.

use std::sync::Arc;

use sha2::Digest as _;

use common::messaging::delivery::Incoming;
use common::messaging::envelope::Envelope;
use common::messaging::events::{EventType, StepFailed};
use common::messaging::handler::{HandlerError, MessageHandler, MessageResult};
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions as metric;
use tracing::warn;

use crate::SERVICE;
use crate::db::{self, NewStep};
use crate::domain::{self, StepEffect};
use crate::saga::{
    DecisionInput, OrderSaga, PlaceError, PlaceRequest, ReplyTarget, rejection_reply,
};

/// A saga that now waits for an outside answer: (order, long deadline,
/// cause, what it waits for).
type Await = (
    uuid::Uuid,
    chrono::DateTime<chrono::Utc>,
    String,
    &'static str,
);

pub struct OrderHandler {
    pub saga: Arc<OrderSaga>,
}

impl MessageHandler for OrderHandler {
    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let mut results: Vec<MessageResult> = Vec::with_capacity(batch.len());
        // Orders to place, and the index of each one's message.
        let mut requests: Vec<PlaceRequest> = Vec::new();
        let mut requested_by: Vec<usize> = Vec::new();
        let mut decisions: Vec<DecisionInput> = Vec::new();
        let mut timeline: Vec<NewStep> = Vec::new();
        let mut awaits: Vec<Await> = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            let result = if msg.routing_key == EventType::OrderRequested.routing_key() {
                self.order_requested(uow, msg).map(|request| {
                    requests.push(request);
                    requested_by.push(i);
                })
            } else {
                self.step(msg, &mut decisions, &mut timeline, &mut awaits)
            };
            results.push(result);
        }

        // Every order the batch decides or marks pending, locked first in
        // one global order (with the ones placing adds a reply target to),
        // so that concurrent batches cannot deadlock.
        let mut touched: Vec<uuid::Uuid> = decisions
            .iter()
            .map(|d| d.order_id)
            .chain(awaits.iter().map(|a| a.0))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        if requests.is_empty() && touched.len() > 1 {
            db::lock_in_order(uow.conn(), &touched).await?;
        }
        if !requests.is_empty() {
            let outcomes = self.saga.place_batch(uow, &requests, &touched).await?;
            for ((i, request), outcome) in requested_by.iter().zip(&requests).zip(outcomes) {
                results[*i] = match outcome {
                    Ok(_) => Ok(()),
                    Err(PlaceError::Invalid(invalid)) => {
                        let key = request.key.as_deref().unwrap_or_default();
                        self.reject(uow, key, request.reply.as_ref(), &invalid);
                        Err(HandlerError::permanent(format!("invalid order: {invalid}")))
                    }
                    Err(PlaceError::KeyReused(key)) => {
                        // The first order with this key stands; this message is parked.
                        warn!(%key, "order.requested reuses a message_id for a different order");
                        Err(HandlerError::permanent(format!(
                            "message_id {key:?} was already used for a different order"
                        )))
                    }
                    Err(PlaceError::Db(e)) => return Err(e.into()),
                    Err(PlaceError::Unavailable) => Err(HandlerError::transient("shutting down")),
                };
            }
        }
        if !decisions.is_empty() {
            self.saga.decide_batch(uow, decisions).await?;
        }
        self.saga.await_answers(uow, &awaits).await?;
        db::record_steps(uow.conn(), &timeline).await?;
        Ok(results)
    }
}

impl OrderHandler {
    /// An order dict from a client, validated (invalid: answered and parked).
    fn order_requested(
        &self,
        uow: &mut UnitOfWork,
        msg: &Incoming,
    ) -> Result<PlaceRequest, HandlerError> {
        const NO_KEY: &str =
            "order.requested must carry an AMQP message_id (it is the order's idempotency key)";
        // A reply goes only to a client's own reply queue: no order is placed
        // for a request that names another (nothing could tell its client).
        if let Some(reply_to) = msg.reply_to.as_deref().filter(|r| !r.is_empty())
            && !domain::reply_address_allowed(reply_to)
        {
            return Err(HandlerError::permanent(format!(
                "reply_to {reply_to:?} refused: {}",
                domain::REPLY_ADDRESS_REFUSED
            )));
        }
        let Some(message_id) = msg.message_id.as_deref().filter(|id| !id.is_empty()) else {
            // Told why (as easily happens publishing from the management
            // UI), then parked. The reply's id comes from the message itself,
            // so a redelivery answers with the same one.
            if let Some(reply_to) = msg.reply_to.as_deref().filter(|r| !r.is_empty()) {
                let digest = sha2::Sha256::digest(&msg.body);
                let cause: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
                let reply = ReplyTarget {
                    reply_to: reply_to.to_owned(),
                    correlation_id: msg.correlation_id.clone().unwrap_or_default(),
                };
                let invalid =
                    domain::InvalidOrder(format!("the message has no message_id: {NO_KEY}"));
                self.reject(
                    uow,
                    &format!("no-message-id:{reply_to}:{cause}"),
                    Some(&reply),
                    &invalid,
                );
            }
            return Err(HandlerError::permanent(NO_KEY));
        };
        if message_id.len() > domain::MAX_KEY_LEN || message_id.chars().any(char::is_control) {
            return Err(HandlerError::permanent(format!(
                "the message_id of order.requested must be 1 to {} printable characters",
                domain::MAX_KEY_LEN
            )));
        }
        let reply = msg
            .reply_to
            .as_ref()
            .filter(|r| !r.is_empty())
            .map(|reply_to| ReplyTarget {
                reply_to: reply_to.clone(),
                correlation_id: msg
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| message_id.to_owned()),
            });
        let order = serde_json::from_slice(&msg.body)
            .map_err(|e| domain::InvalidOrder(format!("the body is not valid JSON ({e})")))
            .and_then(|v| domain::validate_order(&v));
        match order {
            Ok(order) => Ok(PlaceRequest {
                order_id: uuid::Uuid::now_v7(),
                order,
                key: Some(message_id.to_owned()),
                reply,
                wait: false,
            }),
            Err(invalid) => {
                self.reject(uow, message_id, reply.as_ref(), &invalid);
                Err(HandlerError::permanent(format!("invalid order: {invalid}")))
            }
        }
    }

    /// Answers an invalid order with a failure dict (committed with the
    /// batch) before it is parked.
    fn reject(
        &self,
        uow: &mut UnitOfWork,
        message_id: &str,
        reply: Option<&ReplyTarget>,
        invalid: &domain::InvalidOrder,
    ) {
        uow.on_commit(|| {
            metrics::counter!(metric::ORDERS_REJECTED, "source" => "amqp").increment(1);
        });
        if let Some(reply) = reply {
            uow.emit(rejection_reply(message_id, reply, invalid));
        }
    }

    /// A step's outcome: a decision to make, or a timeline entry.
    fn step(
        &self,
        msg: &Incoming,
        decisions: &mut Vec<DecisionInput>,
        timeline: &mut Vec<NewStep>,
        awaits: &mut Vec<Await>,
    ) -> MessageResult {
        let env = Envelope::decode(&msg.body)?;
        if !common::messaging::topology::ORDER_SVC.is_consumed(env.event_type) {
            return Err(HandlerError::permanent(format!(
                "{SERVICE} does not handle {}",
                env.event_type
            )));
        }
        let failure = match env.event_type {
            EventType::PaymentFailed
            | EventType::InventoryFailed
            | EventType::NotificationFailed => Some(env.data_as::<StepFailed>()?),
            _ => None,
        };
        let decision = match domain::effect_of(env.event_type, failure.as_ref()) {
            StepEffect::Record => {
                timeline.push(NewStep {
                    order_id: env.order_id,
                    step: env.event_type.routing_key().to_owned(),
                    event_id: Some(env.event_id),
                    source: env.producer.clone(),
                    detail: None,
                    occurred_at: env.occurred_at,
                });
                return Ok(());
            }
            StepEffect::Await => {
                // Its long deadline is the event's (payment-svc has it from
                // order.created), at most SAGA_LONG_DEADLINE_MS after creation.
                let what =
                    domain::awaited_after(env.event_type).unwrap_or(domain::AWAITING_PAYMENT);
                awaits.push((
                    env.order_id,
                    env.deadline_at,
                    env.event_id.to_string(),
                    what,
                ));
                timeline.push(NewStep {
                    order_id: env.order_id,
                    step: env.event_type.routing_key().to_owned(),
                    event_id: Some(env.event_id),
                    source: env.producer.clone(),
                    detail: Some(format!("awaiting {what}")),
                    occurred_at: env.occurred_at,
                });
                return Ok(());
            }
            StepEffect::Confirm => domain::Decision::Confirm,
            StepEffect::Fail(decision) => decision,
        };
        let mut trail = env.trail.clone();
        trail.push(env.as_trail_entry());
        decisions.push(DecisionInput {
            order_id: env.order_id,
            decision,
            cause: env.event_id.to_string(),
            trail,
        });
        Ok(())
    }
}
