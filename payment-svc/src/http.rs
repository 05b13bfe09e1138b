//! payment-svc's HTTP API.
//!
//! - `PUT`/`GET /accounts/{customer_id}` — `{"balance_cents": N, "frozen": bool}`
//!   (`frozen` optional; a frozen account can be neither charged nor refunded).
//! - `GET /payments/{order_id}` — amount, status (`charged`, `declined`,
//!   `refunded`, `cancelled`, `action_required`, `voided`), decline code and
//!   reason, card brand and last 4.
//! - `POST /payments/{order_id}/confirm`, `/decline` — the gateway's answer
//!   to a payment waiting for the customer's 3-D Secure confirmation.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};
use common::runtime::openapi::ErrorBody;

use crate::domain::MAX_BALANCE_CENTS;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::SERVICE;
use crate::db;
use crate::domain::{self, PaymentStatus};
use crate::gateway::{self, AnswerError};
use chrono::{DateTime, Utc};
use common::messaging::events::StepFailed;
use common::messaging::publisher::Publisher;
use common::saga::timeline::{self, LogState, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

/// payment-svc's endpoints, documented.
pub fn api() -> OpenApiRouter<Gateway> {
    OpenApiRouter::new()
        .routes(routes!(get_account, put_account))
        .routes(routes!(get_payment))
        .routes(routes!(confirm_payment))
        .routes(routes!(decline_payment))
        .merge(timeline::api::<PaymentSteps, Gateway>())
}

/// payment-svc's whole OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    common::runtime::openapi::service_document(SERVICE, api().into_openapi())
}

/// What payment-svc's endpoints need (the gateway's answers publish).
#[derive(Clone)]
pub struct Gateway {
    pub pool: PgPool,
    pub publisher: Publisher,
    pub default_balance_cents: i64,
}

impl FromRef<Gateway> for PgPool {
    fn from_ref(gateway: &Gateway) -> PgPool {
        gateway.pool.clone()
    }
}

impl FromRef<Gateway> for LogState {
    fn from_ref(gateway: &Gateway) -> LogState {
        LogState {
            pool: gateway.pool.clone(),
            service: SERVICE,
        }
    }
}

/// The answer of the gateway endpoints: where the payment stands now.
#[derive(Serialize, ToSchema)]
struct GatewayOutcome {
    order_id: Uuid,
    /// `charged` or `declined`.
    status: String,
    /// Why it was declined (`authentication_declined`...).
    #[schema(required = true)]
    decline_code: Option<String>,
    #[schema(required = true)]
    reason: Option<String>,
}

/// `POST /payments/{order_id}/confirm`: the customer passed 3-D Secure.
#[utoipa::path(post, path = "/payments/{order_id}/confirm", tag = "payments",
    params(("order_id" = Uuid, Path, description = "The order whose payment waits")),
    responses(
        (status = 200, description = "Applied: charged (or declined, if the account cannot pay); the saga goes on", body = GatewayOutcome),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No payment for that order", body = ErrorBody),
        (status = 409, description = "The payment no longer waits, or it is too late to confirm", body = ErrorBody),
    ))]
async fn confirm_payment(
    State(gateway): State<Gateway>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    gateway_answer(gateway, &order_id, Ok(())).await
}

/// `POST /payments/{order_id}/decline`: the customer failed (or abandoned)
/// 3-D Secure.
#[utoipa::path(post, path = "/payments/{order_id}/decline", tag = "payments",
    params(("order_id" = Uuid, Path, description = "The order whose payment waits")),
    responses(
        (status = 200, description = "Applied: declined; the saga is rolled back", body = GatewayOutcome),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No payment for that order", body = ErrorBody),
        (status = 409, description = "The payment no longer waits", body = ErrorBody),
    ))]
async fn decline_payment(
    State(gateway): State<Gateway>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    gateway_answer(gateway, &order_id, Err(domain::authentication_declined())).await
}

/// Applies the gateway's answer (see [`gateway::answer`]) and says where
/// the payment stands: 409 once it no longer waits or it is too late, 404
/// for an order with no payment.
async fn gateway_answer(
    gateway: Gateway,
    order_id: &str,
    answer: Result<(), StepFailed>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(order_id, "order_id")?;
    let outcome = gateway::answer(
        &gateway.pool,
        &gateway.publisher,
        order_id,
        answer,
        gateway.default_balance_cents,
    )
    .await
    .map_err(|e| match e {
        AnswerError::NoPayment => ApiError::NotFound(e.to_string()),
        AnswerError::Db(db) => ApiError::from(db),
        AnswerError::Inconsistent => ApiError::Internal(anyhow::anyhow!("{e}")),
        _ => ApiError::Conflict(e.to_string()),
    })?;
    let status = if outcome.is_ok() {
        PaymentStatus::Charged
    } else {
        PaymentStatus::Declined
    };
    let failure = outcome.err();
    Ok(Json(GatewayOutcome {
        order_id,
        status: status.as_str().to_owned(),
        decline_code: failure.as_ref().map(|f| f.code.clone()),
        reason: failure.map(|f| f.reason),
    })
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AccountBody {
    /// From 0 to `MAX_BALANCE_CENTS`.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    balance_cents: i64,
    /// A frozen account can be neither charged nor refunded (absent: kept;
    /// not frozen for a new account).
    frozen: Option<bool>,
}

/// `PUT /accounts/{customer_id}`: sets a customer's balance.
#[utoipa::path(put, path = "/accounts/{customer_id}", tag = "set-up",
    params(("customer_id" = String, Path, description = "The customer")),
    request_body(content = AccountBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The account", body = db::AccountRow),
        (status = 400, description = "Not a valid id or body", body = ErrorBody),
    ))]
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

/// `GET /accounts/{customer_id}`: a customer's balance.
#[utoipa::path(get, path = "/accounts/{customer_id}", tag = "set-up",
    params(("customer_id" = String, Path, description = "The customer")),
    responses(
        (status = 200, description = "The account", body = db::AccountRow),
        (status = 400, description = "Not a valid id", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ))]
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

/// The answer of `GET /payments/{order_id}`.
#[derive(Serialize, ToSchema)]
struct PaymentView {
    order_id: Uuid,
    customer_id: String,
    amount_cents: i64,
    currency: String,
    /// `charged`, `declined`, `refunded`, `cancelled`, `action_required`
    /// or `voided`.
    status: String,
    #[schema(required = true)]
    decline_code: Option<String>,
    #[schema(required = true)]
    reason: Option<String>,
    card: CardView,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The card a payment was made with (never its number); null where the
/// payment was cancelled before the card was read.
#[derive(Serialize, ToSchema)]
struct CardView {
    #[schema(required = true)]
    brand: Option<String>,
    #[schema(required = true)]
    last4: Option<String>,
}

/// `GET /payments/{order_id}`: an order's payment.
#[utoipa::path(get, path = "/payments/{order_id}", tag = "payments",
    params(("order_id" = Uuid, Path, description = "The order")),
    responses(
        (status = 200, description = "The payment", body = PaymentView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No payment for that order", body = ErrorBody),
    ))]
async fn get_payment(
    State(pool): State<PgPool>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = pool.acquire().await?;
    let p = db::get_payment(&mut conn, order_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no payment for order {order_id}")))?;
    Ok(Json(PaymentView {
        order_id: p.order_id,
        customer_id: p.customer_id,
        amount_cents: p.amount_cents,
        currency: p.currency,
        status: p.status,
        decline_code: p.decline_code,
        reason: p.reason,
        card: CardView {
            brand: p.card_brand,
            last4: p.card_last4,
        },
        created_at: p.created_at,
        updated_at: p.updated_at,
    })
    .into_response())
}
