//! Message handlers of inventory-svc.
//!
//! - `payment.completed`: reserve every line (or none) → `inventory.reserved`
//!   / `inventory.failed`.
//! - `order.confirmed`: commit the held units.
//! - `order.failed`, `order.cancelled`: release held units
//!   (`inventory.released`), or tombstone so a late `payment.completed` is
//!   never applied.

use chrono::Utc;
use common::compensation::{Compensation, compensation_for};
use common::consumer::{HandlerError, Incoming, MessageHandler};
use common::envelope::{Envelope, SagaContext};
use common::events::{
    EventType, InventoryReleased, InventoryReserved, PaymentCompleted, StepFailed,
};
use common::inbox::UnitOfWork;
use sqlx::PgPool;
use tracing::info;

use crate::SERVICE;
use crate::db::{self, StockMove};
use crate::domain::{self, ReservationStatus};

pub struct InventoryHandler {
    pub pool: PgPool,
}

impl MessageHandler for InventoryHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::compensation::on_rollback(routing_key, "stock release")
    }

    async fn handle(&self, msg: Incoming) -> Result<(), HandlerError> {
        let env = Envelope::decode(&msg.body)?;
        match env.event_type {
            EventType::PaymentCompleted => self.on_payment_completed(env).await,
            EventType::OrderConfirmed => self.on_order_confirmed(env).await,
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

impl InventoryHandler {
    async fn on_payment_completed(&self, env: Envelope) -> Result<(), HandlerError> {
        let paid: PaymentCompleted = env.data_as()?;
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let verdict = if Utc::now() >= env.deadline_at {
            Err(StepFailed {
                code: "deadline_exceeded".into(),
                reason: "Saga deadline passed before the reservation".into(),
            })
        } else {
            let stock = db::lock_stock(uow.conn(), &domain::lock_order(&paid.items)).await?;
            domain::check_availability(&paid.items, &stock)
        };
        let (status, reason) = match &verdict {
            Ok(()) => (ReservationStatus::Held, None),
            Err(f) => (ReservationStatus::Rejected, Some(f.reason.as_str())),
        };
        if !db::insert_reservation(uow.conn(), env.order_id, status, reason).await? {
            // Rolled back before we got here (tombstone): apply nothing.
            uow.abandon_late(SERVICE, &env).await?;
            return Ok(());
        }
        let ctx = SagaContext::caused_by(&env, SERVICE);
        match verdict {
            Ok(()) => {
                db::move_units(uow.conn(), &paid.items, StockMove::Hold).await?;
                db::insert_lines(uow.conn(), env.order_id, &paid.items).await?;
                uow.emit(ctx.event(
                    EventType::InventoryReserved,
                    &InventoryReserved {
                        customer_id: paid.customer_id,
                        items: paid.items,
                        amount_cents: paid.amount_cents,
                        currency: paid.currency,
                    },
                ));
                uow.commit().await?;
                outcome("reserved");
                info!(order_id = %env.order_id, "stock reserved");
            }
            Err(failure) => {
                uow.emit(ctx.event(EventType::InventoryFailed, &failure));
                uow.commit().await?;
                outcome("rejected");
                info!(order_id = %env.order_id, reason = %failure.reason, "reservation rejected");
            }
        }
        Ok(())
    }

    async fn on_order_confirmed(&self, env: Envelope) -> Result<(), HandlerError> {
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        let Some(reservation) = db::lock_reservation(uow.conn(), env.order_id).await? else {
            // Causally impossible (confirmation follows the reservation):
            // park it for an operator rather than guess.
            return Err(HandlerError::permanent(format!(
                "order.confirmed for order {} which has no reservation",
                env.order_id
            )));
        };
        if reservation.status() == Some(ReservationStatus::Held) {
            let lines = db::lines(uow.conn(), env.order_id).await?;
            db::lock_stock(uow.conn(), &domain::lock_order(&lines)).await?;
            db::move_units(uow.conn(), &lines, StockMove::Commit).await?;
            db::set_status(uow.conn(), env.order_id, ReservationStatus::Committed).await?;
            outcome("committed");
        }
        uow.commit().await?;
        Ok(())
    }

    async fn on_abort(&self, env: Envelope) -> Result<(), HandlerError> {
        let Some(mut uow) = UnitOfWork::begin_for(&self.pool, SERVICE, &env).await? else {
            return Ok(());
        };
        // Insert-or-lock, as in payment-svc.
        let current = if db::insert_reservation(
            uow.conn(),
            env.order_id,
            ReservationStatus::Cancelled,
            Some("saga rolled back before any reservation"),
        )
        .await?
        {
            None
        } else {
            db::lock_reservation(uow.conn(), env.order_id)
                .await?
                .and_then(|r| r.status())
        };
        match compensation_for(current) {
            Compensation::Undo => {
                let lines = db::lines(uow.conn(), env.order_id).await?;
                let stock = db::lock_stock(uow.conn(), &domain::lock_order(&lines)).await?;
                let frozen: Vec<&str> = stock
                    .iter()
                    .filter(|(_, level)| level.frozen)
                    .map(|(id, _)| id.as_str())
                    .collect();
                if !frozen.is_empty() {
                    // Retried with backoff, then escalated for an operator.
                    return Err(HandlerError::Transient(anyhow::anyhow!(
                        "item(s) {} frozen for stocktake: the release cannot be applied yet",
                        frozen.join(", ")
                    )));
                }
                db::move_units(uow.conn(), &lines, StockMove::Release).await?;
                db::set_status(uow.conn(), env.order_id, ReservationStatus::Released).await?;
                let ctx = SagaContext::caused_by(&env, SERVICE);
                uow.emit(ctx.event(
                    EventType::InventoryReleased,
                    &InventoryReleased { items: lines },
                ));
                uow.commit().await?;
                outcome("released");
                info!(order_id = %env.order_id, "stock released");
            }
            Compensation::Tombstone => {
                uow.commit().await?;
                outcome("cancelled_before_reservation");
            }
            Compensation::Nothing => uow.commit().await?,
        }
        Ok(())
    }
}
