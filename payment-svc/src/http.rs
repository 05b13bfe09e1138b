//! payment-svc's HTTP API.
//!
//! - `PUT`/`GET /accounts/{customer_id}` — `{"balance_cents": N, "frozen": bool}`
//!   (`frozen` optional; a frozen account can be neither charged nor refunded).
//! - `GET /payments/{order_id}` — amount, status (`charged`, `declined`,
//!   `refunded`, `cancelled`, `action_required`, `voided`), decline code and
//!   reason, card brand and last 4.
//! - `POST /payments/{order_id}/confirm`, `/decline` — the gateway's answer
//!   to a payment waiting for the customer's 3-D Secure confirmation.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};

use crate::domain::MAX_BALANCE_CENTS;
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::SERVICE;
use crate::db;
use crate::domain::{self, PaymentStatus};
use axum::routing::post;
use chrono::Utc;
use common::messaging::envelope::SagaContext;
use common::messaging::events::{EventType, StepFailed};
use common::messaging::publisher::Publisher;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::timeline::{self, Step, StepKind, StepSource};
use sqlx::PgConnection;
use tracing::info;
use uuid::Uuid;

pub fn routes(pool: PgPool, publisher: Publisher, default_balance_cents: i64) -> Router {
    let gateway = Gateway {
        pool: pool.clone(),
        publisher,
        default_balance_cents,
    };
    Router::new()
        .route("/accounts/{customer_id}", get(get_account).put(put_account))
        .route("/payments/{order_id}", get(get_payment))
        .with_state(pool.clone())
        .merge(
            Router::new()
                .route("/payments/{order_id}/confirm", post(confirm_payment))
                .route("/payments/{order_id}/decline", post(decline_payment))
                .with_state(gateway),
        )
        .merge(timeline::routes::<PaymentSteps>(pool, SERVICE))
}

/// What the gateway's answers need.
#[derive(Clone)]
struct Gateway {
    pool: PgPool,
    publisher: Publisher,
    default_balance_cents: i64,
}

/// `POST /payments/{order_id}/confirm`: the customer passed 3-D Secure.
async fn confirm_payment(
    State(gateway): State<Gateway>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    gateway_answer(gateway, &order_id, Ok(())).await
}

/// `POST /payments/{order_id}/decline`: the customer failed (or abandoned)
/// 3-D Secure.
async fn decline_payment(
    State(gateway): State<Gateway>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    gateway_answer(gateway, &order_id, Err(domain::authentication_declined())).await
}

/// Applies the gateway's answer to a payment waiting for it, once: charges
/// (or declines) and publishes `payment.completed` (or `payment.failed`)
/// under the saga's long deadline, in one transaction. 409 once the payment
/// no longer waits (answered, or voided by the saga's rollback) or past the
/// long deadline; 404 for an order with no payment.
async fn gateway_answer(
    gateway: Gateway,
    order_id: &str,
    answer: Result<(), StepFailed>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(order_id, "order_id")?;
    let mut uow = UnitOfWork::begin(&gateway.pool).await?;
    let payment = db::lock_payment(uow.conn(), order_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no payment for order {order_id}")))?;
    if payment.status() != Some(PaymentStatus::ActionRequired) {
        return Err(ApiError::Conflict(format!(
            "the payment of order {order_id} is {}: it no longer waits for a confirmation",
            payment.status
        )));
    }
    let (Some(deadline_at), Some(completion)) =
        (payment.action_deadline_at, payment.completion.clone())
    else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "payment of order {order_id} waits with no deadline or completion recorded"
        )));
    };
    if Utc::now() >= deadline_at {
        return Err(ApiError::Conflict(format!(
            "the order {order_id} is past its long deadline ({deadline_at}): it is rolled back, \
             not confirmed"
        )));
    }
    // A confirmation must leave the rest of the saga its ordinary time.
    let confirm_by = completion.0.confirm_by.unwrap_or(deadline_at);
    if answer.is_ok() && Utc::now() >= confirm_by {
        return Err(ApiError::Conflict(format!(
            "the order {order_id} can no longer be confirmed: confirmations are taken until \
             {confirm_by}, to leave the rest of the saga its time before the long deadline \
             ({deadline_at}); it will be rolled back"
        )));
    }
    let outcome = db::settle_confirmation(
        uow.conn(),
        &payment,
        answer.as_ref().map(|_| ()),
        gateway.default_balance_cents,
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
    let (status, event) = match &outcome {
        Ok(()) => (
            PaymentStatus::Charged,
            ctx.event(EventType::PaymentCompleted, &completion.data),
        ),
        Err(failure) => (
            PaymentStatus::Declined,
            ctx.event(EventType::PaymentFailed, failure),
        ),
    };
    uow.emit(event);
    let outcome_label = if outcome.is_ok() {
        "charged_after_action"
    } else {
        "declined_after_action"
    };
    uow.on_commit(move || {
        step_outcome(SERVICE, outcome_label, 1);
        info!(%order_id, outcome = outcome_label, "3-D Secure answer applied");
    });
    uow.commit(&gateway.publisher).await?;
    let failure = outcome.err();
    Ok(Json(json!({
        "order_id": order_id,
        "status": status.as_str(),
        "decline_code": failure.as_ref().map(|f| f.code.clone()),
        "reason": failure.map(|f| f.reason),
    }))
    .into_response())
}

/// payment-svc's steps of a saga, from its payment row.
struct PaymentSteps;

impl StepSource for PaymentSteps {
    async fn steps(conn: &mut PgConnection, order_id: Uuid) -> Result<Vec<Step>, sqlx::Error> {
        Ok(db::get_payment(conn, order_id)
            .await?
            .map(|p| payment_steps(&p))
            .unwrap_or_default())
    }
}

fn payment_steps(p: &db::PaymentRow) -> Vec<Step> {
    let amount = format!("{} {}", p.amount_cents, p.currency);
    // A payment that waited for 3-D Secure was charged when confirmed.
    let waited = p.action_deadline_at.map(|until| {
        Step::new(
            p.created_at,
            SERVICE,
            "payment.action_required",
            StepKind::Action,
            "action_required",
        )
        .detail(Some(format!(
            "3-D Secure confirmation accepted until {until}"
        )))
    });
    let charged_at = if waited.is_some() {
        p.updated_at
    } else {
        p.created_at
    };
    let charged = || {
        Step::new(
            charged_at,
            SERVICE,
            "payment.completed",
            StepKind::Action,
            "charged",
        )
        .detail(Some(amount.clone()))
    };
    let mut steps: Vec<Step> = waited.into_iter().collect();
    steps.extend(match p.status() {
        Some(PaymentStatus::Charged) => vec![charged()],
        Some(PaymentStatus::Refunded) => vec![
            charged(),
            Step::new(
                p.updated_at,
                SERVICE,
                "payment.refunded",
                StepKind::Compensation,
                "refunded",
            )
            .detail(Some(amount.clone())),
        ],
        Some(PaymentStatus::Declined) => vec![
            Step::new(
                p.created_at,
                SERVICE,
                "payment.failed",
                StepKind::Action,
                "declined",
            )
            .detail(Some(format!(
                "{}: {}",
                p.decline_code.as_deref().unwrap_or("declined"),
                p.reason.as_deref().unwrap_or_default()
            ))),
        ],
        Some(PaymentStatus::Cancelled) => vec![Step::new(
            p.created_at,
            SERVICE,
            "order.failed",
            StepKind::Compensation,
            "cancelled before any charge",
        )],
        Some(PaymentStatus::Voided) => vec![
            Step::new(
                p.updated_at,
                SERVICE,
                "order.failed",
                StepKind::Compensation,
                "voided",
            )
            .detail(Some("the authorisation was voided: nothing was charged")),
        ],
        Some(PaymentStatus::ActionRequired) | None => Vec::new(),
    });
    steps
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountBody {
    balance_cents: i64,
    frozen: Option<bool>,
}

async fn put_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let customer_id = parse_id(&customer_id, "customer_id")?;
    let AccountBody {
        balance_cents,
        frozen,
    } = json_body(&body, r#"{"balance_cents": N, "frozen": bool?}"#)?;
    if !(0..=MAX_BALANCE_CENTS).contains(&balance_cents) {
        return Err(ApiError::BadRequest(format!(
            "balance_cents must be from 0 to {MAX_BALANCE_CENTS}"
        )));
    }
    let mut conn = pool.acquire().await?;
    Ok(
        Json(db::put_account(&mut conn, &customer_id, balance_cents, frozen).await?)
            .into_response(),
    )
}

async fn get_account(
    State(pool): State<PgPool>,
    Path(customer_id): Path<String>,
) -> Result<Response, ApiError> {
    let customer_id = parse_id(&customer_id, "customer_id")?;
    let mut conn = pool.acquire().await?;
    let account = db::get_account(&mut conn, &customer_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no account for customer {customer_id:?}")))?;
    Ok(Json(account).into_response())
}

async fn get_payment(
    State(pool): State<PgPool>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = pool.acquire().await?;
    let p = db::get_payment(&mut conn, order_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no payment for order {order_id}")))?;
    Ok(Json(json!({
        "order_id": p.order_id,
        "customer_id": p.customer_id,
        "amount_cents": p.amount_cents,
        "currency": p.currency,
        "status": p.status,
        "decline_code": p.decline_code,
        "reason": p.reason,
        "card": {"brand": p.card_brand, "last4": p.card_last4},
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    }))
    .into_response())
}
