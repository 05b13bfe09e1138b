//! payment-svc's HTTP API.
//!
//! - `PUT`/`GET /accounts/{customer_id}` — `{"balance_cents": N, "frozen": bool}`
//!   (`frozen` optional; a frozen account can be neither charged nor refunded).
//! - `GET /payments/{order_id}` — amount, status (`charged`, `declined`,
//!   `refunded`, `cancelled`), decline code and reason, card brand and last 4.

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
use crate::domain::PaymentStatus;
use common::saga::timeline::{self, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

pub fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/accounts/{customer_id}", get(get_account).put(put_account))
        .route("/payments/{order_id}", get(get_payment))
        .with_state(pool.clone())
        .merge(timeline::routes::<PaymentSteps>(pool, SERVICE))
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
    let charged = || {
        Step::new(
            p.created_at,
            SERVICE,
            "payment.completed",
            StepKind::Action,
            "charged",
        )
        .detail(Some(amount.clone()))
    };
    match p.status() {
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
        None => Vec::new(),
    }
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
