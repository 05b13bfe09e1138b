//! notification-svc's HTTP API.
//!
//! - `PUT /customers/{customer_id}` — `{"email": "..."}`.
//! - `GET /customers/{customer_id}` — the address on file, or the default
//!   `<customer_id>@<DEFAULT_EMAIL_DOMAIN>` with `"is_default": true`.
//! - `GET /emails?order_id=ID` — the emails sent for an order, oldest first,
//!   each with its `kind` (`confirmation`, `cancellation`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::domain::NotificationStatus;
use crate::{SERVICE, db, domain};
use common::saga::timeline::{self, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Clone)]
struct HttpState {
    pool: PgPool,
    default_email_domain: Arc<str>,
}

pub fn routes(pool: PgPool, default_email_domain: &str) -> Router {
    Router::new()
        .route(
            "/customers/{customer_id}",
            get(get_customer).put(put_customer),
        )
        .route("/emails", get(list_emails))
        .with_state(HttpState {
            pool: pool.clone(),
            default_email_domain: default_email_domain.into(),
        })
        .merge(timeline::routes::<NotificationSteps>(pool, SERVICE))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Address {
    email: String,
}

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
    Ok(
        Json(json!({"customer_id": customer_id, "email": email, "is_default": false}))
            .into_response(),
    )
}

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
    Ok(
        Json(json!({"customer_id": customer_id, "email": email, "is_default": is_default}))
            .into_response(),
    )
}

#[derive(Deserialize)]
struct EmailsQuery {
    order_id: Option<String>,
}

async fn list_emails(
    State(s): State<HttpState>,
    Query(q): Query<EmailsQuery>,
) -> Result<Response, ApiError> {
    let order_id = q
        .order_id
        .ok_or_else(|| ApiError::BadRequest("order_id query parameter is required".into()))?;
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = s.pool.acquire().await?;
    Ok(Json(db::emails_for(&mut conn, order_id).await?).into_response())
}
