//! Message handlers: each message becomes one transaction.
//!
//! - `order.requested` (body: the order dict; AMQP `message_id` = idempotency
//!   key): validate, create the order, emit `order.created`. Invalid orders
//!   are answered with a failure dict (to `reply_to`) and parked.
//! - `payment.failed`, `inventory.failed`, `notification.failed`: decide FAILED.
//! - `notification.sent`: decide CONFIRMED (FAILED if the deadline passed).
//! - `payment.completed`, `inventory.reserved`, `payment.refunded`,
//!   `inventory.released`: recorded in the saga's timeline.

use std::sync::Arc;

use common::consumer::{HandlerError, Incoming, MessageHandler};
use common::envelope::Envelope;
use common::events::{EventType, StepFailed};
use common::inbox::UnitOfWork;
use common::telemetry::metric;
use tracing::warn;

use crate::SERVICE;
use crate::db::{self, NewStep};
use crate::domain::{self, StepEffect};
use crate::saga::{OrderSaga, PlaceError, ReplyTarget, rejection_reply};

pub struct OrderHandler {
    pub saga: Arc<OrderSaga>,
}

impl MessageHandler for OrderHandler {
    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        if msg.routing_key == EventType::OrderRequested.routing_key() {
            return self.on_order_requested(msg).await;
        }
        let env = Envelope::decode(&msg.body)?;
        if !common::topology::ORDER_SVC
            .consumes
            .contains(&env.event_type)
        {
            return Err(HandlerError::permanent(format!(
                "{SERVICE} does not handle {}",
                env.event_type
            )));
        }
        self.on_step(env).await
    }
}

impl OrderHandler {
    async fn on_order_requested(&self, msg: Incoming) -> Result<(), HandlerError> {
        let Some(message_id) = msg.message_id.as_deref().filter(|id| !id.is_empty()) else {
            return Err(HandlerError::permanent(
                "order.requested must carry an AMQP message_id (it is the order's idempotency key)",
            ));
        };
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
        let placed = match order {
            Ok(order) => {
                self.saga
                    .place(&order, Some(message_id), reply.as_ref())
                    .await
            }
            Err(invalid) => Err(PlaceError::Invalid(invalid)),
        };
        match placed {
            Ok(_) => Ok(()),
            Err(PlaceError::Invalid(invalid)) => {
                self.reject(message_id, reply.as_ref(), &invalid).await?;
                Err(HandlerError::permanent(format!("invalid order: {invalid}")))
            }
            Err(PlaceError::KeyReused(key)) => {
                // The first order with this key stands; this message is parked.
                warn!(%key, "order.requested reuses a message_id for a different order");
                Err(HandlerError::permanent(format!(
                    "message_id {key:?} was already used for a different order"
                )))
            }
            Err(PlaceError::Db(e)) => Err(e.into()),
        }
    }

    /// Answers an invalid order with a failure dict before it is parked.
    async fn reject(
        &self,
        message_id: &str,
        reply: Option<&ReplyTarget>,
        invalid: &domain::InvalidOrder,
    ) -> Result<(), HandlerError> {
        metrics::counter!(metric::ORDERS_REJECTED, "source" => "amqp").increment(1);
        if let Some(reply) = reply {
            let mut uow = UnitOfWork::begin(&self.saga.pool).await?;
            uow.emit(rejection_reply(message_id, reply, invalid));
            uow.commit().await?;
        }
        Ok(())
    }

    async fn on_step(&self, env: Envelope) -> Result<(), HandlerError> {
        let failure = match env.event_type {
            EventType::PaymentFailed
            | EventType::InventoryFailed
            | EventType::NotificationFailed => Some(env.data_as::<StepFailed>()?),
            _ => None,
        };
        let Some(mut uow) = UnitOfWork::begin_for(&self.saga.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        db::record_step(
            uow.conn(),
            &NewStep {
                order_id: env.order_id,
                step: env.event_type.routing_key(),
                event_id: Some(env.event_id),
                source: &env.producer,
                detail: failure.as_ref().map(|f| f.reason.as_str()),
                occurred_at: env.occurred_at,
            },
        )
        .await?;
        let cause = env.event_id.to_string();
        let decided = match domain::effect_of(env.event_type, failure.as_ref()) {
            StepEffect::Record => None,
            StepEffect::Confirm => {
                self.saga
                    .decide(&mut uow, env.order_id, domain::Decision::Confirm, &cause)
                    .await?
            }
            StepEffect::Fail(decision) => {
                self.saga
                    .decide(&mut uow, env.order_id, decision, &cause)
                    .await?
            }
        };
        uow.commit().await?;
        if let Some(d) = decided {
            d.record();
        }
        Ok(())
    }
}
