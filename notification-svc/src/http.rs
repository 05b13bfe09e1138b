//! notification-svc's HTTP API.
//!
//! - `PUT /customers/{customer_id}` — `{"email": "..."}`.
//! - `GET /customers/{customer_id}` — the address on file, or the default
//!   `<customer_id>@<DEFAULT_EMAIL_DOMAIN>` with `"is_default": true`.
//! - `GET /emails?order_id=ID` — the emails sent for an order, oldest first,
//!   each with its `kind` (`confirmation`, `cancellation`).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use common::runtime::http::{ApiError, ApiQuery, json_body, parse_id, parse_uuid};
use common::runtime::openapi::ErrorBody;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::NotificationStatus;
use crate::{SERVICE, db, domain};
use common::saga::timeline::{self, LogState, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

/// What notification-svc's endpoints need.
#[derive(Clone)]
pub struct HttpState {
    pub pool: PgPool,
    pub default_email_domain: Arc<str>,
}

impl FromRef<HttpState> for LogState {
    fn from_ref(state: &HttpState) -> LogState {
        LogState {
            pool: state.pool.clone(),
            service: SERVICE,
        }
    }
}

/// notification-svc's endpoints, documented.
pub fn api() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(get_customer, put_customer))
        .routes(routes!(list_emails))
        .merge(timeline::api::<NotificationSteps, HttpState>())
}

/// notification-svc's whole OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    common::runtime::openapi::service_document(SERVICE, api().into_openapi())
}

/// notification-svc's steps of a saga: the emails it sent, and why it sent
/// none when it did not.
struct NotificationSteps;

impl StepSource for NotificationSteps {
    async fn steps(conn: &mut PgConnection, order_id: Uuid) -> Result<Vec<Step>, sqlx::Error> {
        let mut steps: Vec<Step> = db::emails_for(conn, order_id)
            .await?
            .iter()
            .map(|e| {
                let (event, kind) = match e.kind.as_str() {
                    "confirmation" => ("notification.sent", StepKind::Action),
                    _ => ("email.cancellation", StepKind::Compensation),
                };
                // The recipient is personal data: the step names the email only.
                Step::new(e.sent_at, SERVICE, event, kind, "sent")
                    .detail(Some(format!("{} email", e.kind)))
            })
            .collect();
        if let Some(n) = db::notification_summary(conn, order_id).await? {
            // A fixed text, never the stored reason: a bounce's quotes the
            // address (personal data, kept out of step logs).
            let outcome = |kind, event, outcome: &str, detail: &str| {
                Some(Step::new(n.updated_at, SERVICE, event, kind, outcome).detail(Some(detail)))
            };
            let step = match n.status() {
                Some(NotificationStatus::Bounced) => outcome(
                    StepKind::Action,
                    "notification.failed",
                    "bounced",
                    "the confirmation email bounced",
                ),
                Some(NotificationStatus::Expired) => outcome(
                    StepKind::Action,
                    "notification.failed",
                    "expired",
                    "the deadline passed before the email could be sent",
                ),
                Some(NotificationStatus::Sending) => outcome(
                    StepKind::Action,
                    "notification.sent",
                    "sending",
                    "being handed to the mail relay",
                ),
                Some(NotificationStatus::Deferred) => outcome(
                    StepKind::Action,
                    "notification.deferred",
                    "deferred",
                    "the mail relay was unavailable: the confirmation is queued and retried",
                ),
                Some(NotificationStatus::Cancelled) => outcome(
                    StepKind::Compensation,
                    "order.failed",
                    "cancelled before any email",
                    "rolled back before any email",
                ),
                // Sent and retracted show as their emails.
                _ => None,
            };
            steps.extend(step);
        }
        Ok(steps)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Address {
    email: String,
}

/// A customer's email address.
#[derive(Serialize, ToSchema)]
struct Customer {
    customer_id: String,
    email: String,
    /// No address on file: the default `<customer_id>@<DEFAULT_EMAIL_DOMAIN>`.
    is_default: bool,
}

/// `PUT /customers/{customer_id}`: sets a customer's email address.
#[utoipa::path(put, path = "/customers/{customer_id}", tag = "set-up",
    params(("customer_id" = String, Path, description = "The customer")),
    request_body(content = Address, content_type = "application/json"),
    responses(
        (status = 200, description = "The address on file", body = Customer),
        (status = 400, description = "Not a valid id or address", body = ErrorBody),
    ))]
async fn put_customer(
    State(s): State<HttpState>,
    Path(customer_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let customer_id = parse_id(&customer_id, "customer_id")?;
    let Address { email } = json_body(&body, r#"{"email": "..."}"#)?;
    let email = email.trim().to_owned();
    if !domain::valid_address(&email) {
        return Err(ApiError::BadRequest(format!(
            "{email:?} is not an email address"
        )));
    }
    let mut conn = s.pool.acquire().await?;
    db::put_customer_email(&mut conn, &customer_id, &email).await?;
    Ok(Json(Customer {
        customer_id,
        email,
        is_default: false,
    })
    .into_response())
}

/// `GET /customers/{customer_id}`: the address on file, or the default.
#[utoipa::path(get, path = "/customers/{customer_id}", tag = "set-up",
    params(("customer_id" = String, Path, description = "The customer")),
    responses(
        (status = 200, description = "The address", body = Customer),
        (status = 400, description = "Not a valid id", body = ErrorBody),
    ))]
async fn get_customer(
    State(s): State<HttpState>,
    Path(customer_id): Path<String>,
) -> Result<Response, ApiError> {
    let customer_id = parse_id(&customer_id, "customer_id")?;
    let mut conn = s.pool.acquire().await?;
    let (email, is_default) = match db::get_customer_email(&mut conn, &customer_id).await? {
        Some(email) => (email, false),
        None => (
            domain::default_address(&customer_id, &s.default_email_domain),
            true,
        ),
    };
    Ok(Json(Customer {
        customer_id,
        email,
        is_default,
    })
    .into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EmailsQuery {
    /// The order.
    #[param(format = Uuid, required = true, nullable = false)]
    order_id: Option<String>,
}

/// `GET /emails?order_id=ID`: the emails sent for an order, oldest first.
#[utoipa::path(get, path = "/emails", tag = "notifications", params(EmailsQuery),
    responses(
        (status = 200, description = "The emails, oldest first", body = Vec<db::EmailRow>),
        (status = 400, description = "No order_id, or not a UUID", body = ErrorBody),
    ))]
async fn list_emails(
    State(s): State<HttpState>,
    ApiQuery(q): ApiQuery<EmailsQuery>,
) -> Result<Response, ApiError> {
    let order_id = q
        .order_id
        .ok_or_else(|| ApiError::BadRequest("order_id query parameter is required".into()))?;
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = s.pool.acquire().await?;
    Ok(Json(db::emails_for(&mut conn, order_id).await?).into_response())
}
