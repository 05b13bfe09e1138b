//! The card gateway's answer to a payment that waits for the customer's
//! 3-D Secure confirmation (`POST /payments/{order_id}/confirm`, `/decline`).
//!
//! Applied once, in one transaction: the payment is charged (its account
//! debited) or declined, and `payment.completed` (or `payment.failed`) is
//! published under the saga's long deadline. Locks are taken in the order
//! every batch takes them — the payment row, then the customer's account —
//! so an answer and a batch cannot deadlock (see [`crate::db`]).

use chrono::Utc;
use common::messaging::envelope::SagaContext;
use common::messaging::events::{EventType, StepFailed};
use common::messaging::publisher::Publisher;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db;
use crate::domain::PaymentStatus;

/// Why an answer was not applied.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("no payment for that order")]
    NoPayment,
    #[error("the payment is {0}: it no longer waits for a confirmation")]
    NoLongerWaits(String),
    #[error("the order is past its long deadline ({0}): it is rolled back, not confirmed")]
    PastDeadline(chrono::DateTime<Utc>),
    #[error(
        "the order can no longer be confirmed: confirmations are taken until {confirm_by}, to \
         leave the rest of the saga its time before the long deadline ({deadline_at}); it will \
         be rolled back"
    )]
    TooLate {
        confirm_by: chrono::DateTime<Utc>,
        deadline_at: chrono::DateTime<Utc>,
    },
    #[error("the payment waits with no deadline or completion recorded")]
    Inconsistent,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Applies `answer` (`Ok` = confirmed) to the payment of `order_id`;
/// returns what became of it: charged (`Ok`), or declined with why.
pub async fn answer(
    pool: &PgPool,
    publisher: &Publisher,
    order_id: Uuid,
    answer: Result<(), StepFailed>,
    default_balance: i64,
) -> Result<Result<(), StepFailed>, AnswerError> {
    let mut uow = UnitOfWork::begin(pool).await?;
    let payment = db::lock_payment(uow.conn(), order_id)
        .await?
        .ok_or(AnswerError::NoPayment)?;
    if payment.status() != Some(PaymentStatus::ActionRequired) {
        return Err(AnswerError::NoLongerWaits(payment.status));
    }
    let (Some(deadline_at), Some(completion)) =
        (payment.action_deadline_at, payment.completion.clone())
    else {
        return Err(AnswerError::Inconsistent);
    };
    if Utc::now() >= deadline_at {
        return Err(AnswerError::PastDeadline(deadline_at));
    }
    // A confirmation must leave the rest of the saga its ordinary time.
    let confirm_by = completion.0.confirm_by.unwrap_or(deadline_at);
    if answer.is_ok() && Utc::now() >= confirm_by {
        return Err(AnswerError::TooLate {
            confirm_by,
            deadline_at,
        });
    }
    let outcome = db::settle_confirmation(
        uow.conn(),
        &payment,
        answer.as_ref().map(|_| ()),
        default_balance,
    )
    .await?;
    let completion = completion.0;
    let ctx = SagaContext {
        order_id,
        deadline_at,
        causation_id: completion.causation_id,
        producer: SERVICE,
        trail: completion.trail,
    };
    uow.emit(match &outcome {
        Ok(()) => ctx.event(EventType::PaymentCompleted, &completion.data),
        Err(failure) => ctx.event(EventType::PaymentFailed, failure),
    });
    let label = if outcome.is_ok() {
        "charged_after_action"
    } else {
        "declined_after_action"
    };
    uow.on_commit(move || {
        step_outcome(SERVICE, label, 1);
        info!(%order_id, outcome = label, "3-D Secure answer applied");
    });
    uow.commit(publisher).await?;
    Ok(outcome)
}
