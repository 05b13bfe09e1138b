//! Message handlers of payment-svc.
//!
//! - `order.created`: charge, or decline → `payment.completed` / `payment.failed`.
//! - `order.failed`, `order.cancelled`: refund a charge (`payment.refunded`),
//!   or leave a tombstone so that a late `order.created` is never applied.

use chrono::{Datelike as _, Utc};
use common::card::CardOpener;
use common::compensation::{Compensation, compensation_for};
use common::consumer::{HandlerError, Incoming, MessageHandler};
use common::envelope::{Envelope, SagaContext};
use common::events::{EventType, OrderCreated, PaymentCompleted, PaymentRefunded};
use common::inbox::UnitOfWork;
use sqlx::PgPool;
use tracing::{error, info};

use crate::SERVICE;
use crate::db::{self, NewPayment, Posting};
use crate::domain::{self, PaymentStatus};

pub struct PaymentHandler {
    pub pool: PgPool,
    pub opener: CardOpener,
    /// Balance of a customer the ledger has not seen before.
    pub default_balance_cents: i64,
}

impl MessageHandler for PaymentHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::compensation::on_rollback(routing_key, "refund")
    }

    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        let env = Envelope::decode(&msg.body)?;
        match env.event_type {
            EventType::OrderCreated => self.on_order_created(env).await,
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

impl PaymentHandler {
    async fn on_order_created(&self, env: Envelope) -> Result<(), HandlerError> {
        let order: OrderCreated = env.data_as()?;
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let ctx = SagaContext::caused_by(&env, SERVICE);

        let verdict = if Utc::now() >= env.deadline_at {
            Err(domain::decline(
                "deadline_exceeded",
                "Saga deadline passed before the payment",
            ))
        } else {
            match self.opener.open(&order.payment) {
                Ok(card) => {
                    let today = Utc::now();
                    domain::screen_card(&card, (today.year(), today.month()))
                }
                Err(e) => {
                    error!(error = %e, "cannot open the sealed card: check CARD_SEAL_SECRET_KEY");
                    Err(domain::decline(
                        "card_unreadable",
                        "Card data could not be read",
                    ))
                }
            }
        };
        let verdict = match verdict {
            Ok(()) => {
                db::ensure_account(uow.conn(), &order.customer_id, self.default_balance_cents)
                    .await?;
                match db::debit(uow.conn(), &order.customer_id, order.amount_cents).await? {
                    Posting::Done => Ok(()),
                    Posting::Insufficient => Err(domain::insufficient_funds()),
                    Posting::Frozen => Err(domain::decline("account_frozen", "Account frozen")),
                }
            }
            Err(declined) => Err(declined),
        };

        let (status, failure) = match &verdict {
            Ok(()) => (PaymentStatus::Charged, None),
            Err(f) => (PaymentStatus::Declined, Some(f)),
        };
        let inserted = db::insert_payment(
            uow.conn(),
            &NewPayment {
                order_id: env.order_id,
                customer_id: &order.customer_id,
                amount_cents: order.amount_cents,
                currency: &order.currency,
                status,
                decline_code: failure.map(|f| f.code.as_str()),
                reason: failure.map(|f| f.reason.as_str()),
                card_brand: Some(&order.payment.brand),
                card_last4: Some(&order.payment.last4),
            },
        )
        .await?;
        if !inserted {
            // The order already has a payment record: the saga's rollback
            // got here first (tombstone). Undo the debit by not committing.
            uow.abandon_late(SERVICE, &env).await?;
            return Ok(());
        }

        match verdict {
            Ok(()) => {
                uow.emit(ctx.event(
                    EventType::PaymentCompleted,
                    &PaymentCompleted {
                        customer_id: order.customer_id.clone(),
                        items: order.items,
                        amount_cents: order.amount_cents,
                        currency: order.currency,
                        card_last4: order.payment.last4,
                    },
                ));
                uow.commit().await?;
                outcome("charged");
                info!(order_id = %env.order_id, amount_cents = order.amount_cents, "charged");
            }
            Err(declined) => {
                uow.emit(ctx.event(EventType::PaymentFailed, &declined));
                uow.commit().await?;
                outcome("declined");
                info!(order_id = %env.order_id, code = %declined.code, "declined");
            }
        }
        Ok(())
    }

    async fn on_abort(&self, env: Envelope) -> Result<(), HandlerError> {
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let customer_id = env.data_str("customer_id").unwrap_or_default().to_owned();
        let tombstone = NewPayment {
            order_id: env.order_id,
            customer_id: &customer_id,
            amount_cents: 0,
            currency: crate::CURRENCY,
            status: PaymentStatus::Cancelled,
            decline_code: None,
            reason: Some("saga rolled back before any charge"),
            card_brand: None,
            card_last4: None,
        };
        // Insert-or-lock: either the tombstone goes in (nothing was charged)
        // or the existing record is locked against a concurrent charge.
        let current = if db::insert_payment(uow.conn(), &tombstone).await? {
            None
        } else {
            db::lock_payment(uow.conn(), env.order_id).await?
        };
        let current_status = current.as_ref().and_then(db::PaymentRow::status);
        match (compensation_for(current_status), current) {
            (Compensation::Undo, Some(payment)) => {
                if db::credit(uow.conn(), &payment.customer_id, payment.amount_cents).await?
                    != Posting::Done
                {
                    // Retried with backoff, then escalated for an operator.
                    return Err(HandlerError::Transient(anyhow::anyhow!(
                        "account {:?} is frozen: the refund of {} cents cannot be credited yet",
                        payment.customer_id,
                        payment.amount_cents
                    )));
                }
                db::set_status(uow.conn(), env.order_id, PaymentStatus::Refunded).await?;
                let ctx = SagaContext::caused_by(&env, SERVICE);
                uow.emit(ctx.event(
                    EventType::PaymentRefunded,
                    &PaymentRefunded {
                        customer_id: payment.customer_id.clone(),
                        amount_cents: payment.amount_cents,
                    },
                ));
                uow.commit().await?;
                outcome("refunded");
                info!(order_id = %env.order_id, amount_cents = payment.amount_cents, "refunded");
            }
            (Compensation::Tombstone, _) => {
                uow.commit().await?;
                outcome("cancelled_before_charge");
                info!(order_id = %env.order_id, "rollback before any charge; tombstone recorded");
            }
            _ => uow.commit().await?,
        }
        Ok(())
    }
}
