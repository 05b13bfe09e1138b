//! Message handlers of notification-svc.
//!
//! - `inventory.reserved`: email the confirmation → `notification.sent`, or
//!   `notification.failed` if the address bounces.
//! - `order.failed`, `order.cancelled`: if a confirmation went out, email a
//!   cancellation; if nothing went out yet, tombstone so a late
//!   `inventory.reserved` sends nothing.
//!
//! Sending happens inside the handler's transaction, before the commit: with
//! the default transport the email *is* the row, so it is exactly-once; with
//! SMTP a crash between the send and the commit re-sends it on redelivery
//! (at-least-once, as email always is).

use std::sync::Arc;

use chrono::Utc;
use common::compensation::{Compensation, compensation_for};
use common::consumer::{HandlerError, Incoming, MessageHandler};
use common::envelope::{Envelope, SagaContext};
use common::events::{EventType, InventoryReserved, NotificationSent, StepFailed};
use common::inbox::UnitOfWork;
use common::order::SagaResult;
use sqlx::PgPool;
use tracing::info;

use crate::SERVICE;
use crate::db;
use crate::domain::{self, Email, NotificationStatus};
use crate::transport::{EmailTransport, SendError};

pub struct NotificationHandler {
    pub pool: PgPool,
    pub transport: Arc<dyn EmailTransport>,
    /// Domain of the default address of customers without one on file.
    pub default_email_domain: String,
}

impl MessageHandler for NotificationHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::compensation::on_rollback(routing_key, "cancellation email")
    }

    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        let env = Envelope::decode(&msg.body)?;
        match env.event_type {
            EventType::InventoryReserved => self.on_inventory_reserved(env).await,
            t if t.is_abort() => self.on_abort(env).await,
            other => Err(HandlerError::permanent(format!(
                "{SERVICE} does not handle {other}"
            ))),
        }
    }
}

fn outcome(name: &'static str) {
    common::telemetry::step_outcome(SERVICE, name);
}

impl NotificationHandler {
    async fn send(
        &self,
        uow: &mut UnitOfWork,
        email: &Email,
    ) -> Result<Result<(), StepFailed>, HandlerError> {
        match self.transport.send(email).await {
            Ok(()) => {
                db::record_email(uow.conn(), email, self.transport.name()).await?;
                Ok(Ok(()))
            }
            Err(SendError::Rejected(reason)) => Ok(Err(StepFailed {
                code: "email_rejected".into(),
                reason: format!("Email rejected: {reason}"),
            })),
            Err(e @ SendError::Unavailable(_)) => Err(HandlerError::Transient(e.into())),
        }
    }

    async fn on_inventory_reserved(&self, env: Envelope) -> Result<(), HandlerError> {
        let reserved: InventoryReserved = env.data_as()?;
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let recipient = match db::get_customer_email(uow.conn(), &reserved.customer_id).await? {
            Some(address) => address,
            None => domain::default_address(&reserved.customer_id, &self.default_email_domain),
        };
        let expired = Utc::now() >= env.deadline_at;
        let precheck = if expired {
            Err(StepFailed {
                code: "deadline_exceeded".into(),
                reason: "Saga deadline passed before the confirmation email".into(),
            })
        } else {
            domain::check_deliverable(&recipient)
        };
        let status = match &precheck {
            Ok(()) => NotificationStatus::Sent,
            Err(_) if expired => NotificationStatus::Expired,
            Err(_) => NotificationStatus::Bounced,
        };
        // Claim the order's record first: it serializes us against a
        // concurrent rollback, which then sees the email we send.
        if !db::insert_notification(
            uow.conn(),
            env.order_id,
            &reserved.customer_id,
            Some(&recipient),
            status,
            precheck.as_ref().err().map(|f| f.reason.as_str()),
        )
        .await?
        {
            uow.abandon_late(SERVICE, &env).await?;
            return Ok(());
        }
        let email = domain::confirmation(
            env.order_id,
            &recipient,
            &reserved.items,
            reserved.amount_cents,
            &reserved.currency,
        );
        let result = match precheck {
            Ok(()) => self.send(&mut uow, &email).await?,
            Err(f) => Err(f),
        };
        let ctx = SagaContext::caused_by(&env, SERVICE);
        match result {
            Ok(()) => {
                uow.emit(ctx.event(
                    EventType::NotificationSent,
                    &NotificationSent {
                        email_id: email.id,
                        kind: email.kind.as_str().to_owned(),
                    },
                ));
                uow.commit().await?;
                outcome("sent");
            }
            Err(failure) => {
                if status == NotificationStatus::Sent {
                    // The relay refused it after all.
                    db::set_status(uow.conn(), env.order_id, NotificationStatus::Bounced).await?;
                }
                info!(order_id = %env.order_id, reason = %failure.reason, "confirmation not sent");
                uow.emit(ctx.event(EventType::NotificationFailed, &failure));
                uow.commit().await?;
                outcome("bounced");
            }
        }
        Ok(())
    }

    async fn on_abort(&self, env: Envelope) -> Result<(), HandlerError> {
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let customer_id = env.data_str("customer_id").unwrap_or_default().to_owned();
        let current = if db::insert_notification(
            uow.conn(),
            env.order_id,
            &customer_id,
            None,
            NotificationStatus::Cancelled,
            Some("saga rolled back before any email"),
        )
        .await?
        {
            None
        } else {
            db::lock_notification(uow.conn(), env.order_id).await?
        };
        match (
            compensation_for(current.as_ref().and_then(db::NotificationRow::status)),
            current,
        ) {
            (Compensation::Undo, Some(row)) => {
                let reason = abort_reason(&env);
                let recipient = row.recipient.unwrap_or_default();
                let email = domain::cancellation(env.order_id, &recipient, &reason);
                // A cancellation that cannot be delivered is still recorded
                // as attempted: the saga is already rolled back.
                if let Err(SendError::Unavailable(e)) = self.transport.send(&email).await {
                    return Err(HandlerError::Transient(anyhow::anyhow!(
                        "email relay unavailable: {e}"
                    )));
                }
                db::record_email(uow.conn(), &email, self.transport.name()).await?;
                db::set_status(uow.conn(), env.order_id, NotificationStatus::Retracted).await?;
                uow.commit().await?;
                outcome("cancellation_sent");
                info!(order_id = %env.order_id, "cancellation email sent");
            }
            _ => uow.commit().await?,
        }
        Ok(())
    }
}

/// The reason to give the customer: the failure's reason, or the cancellation's.
fn abort_reason(env: &Envelope) -> String {
    if let Some(SagaResult::Failure { reason, .. }) = env
        .data
        .get("result")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
    {
        return reason;
    }
    env.data
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("the order could not be completed")
        .to_owned()
}
