//! One saga's timeline, as each service saw it.
//!
//! A choreography has no orchestrator holding the whole story, and the
//! critical path must not pay for one. So each service serves its own step
//! log for an order — read from the state rows it keeps anyway (a payment, a
//! reservation, an email) and its escalations — at
//! `GET /sagas/{order_id}/steps`, and order-svc merges the four logs when
//! someone asks (`GET /sagas/{order_id}`). Nothing is written for it.

use std::future::Future;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::messaging::escalation::{self, EscalationRow};
use crate::runtime::http::{ApiError, json_body, parse_uuid};
use crate::runtime::openapi::ErrorBody;
pub use crate::saga::choreography::StepKind;

/// Where a compensation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompensationState {
    /// Not applied yet (in flight, or waiting for a retry).
    Pending,
    /// Applied.
    Done,
    /// Its retries ran out and an operator retried it: running again.
    Retrying,
    /// Its retries ran out: an operator must act (`sagactl escalations`).
    Escalated,
}

/// One thing a service did for a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub at: DateTime<Utc>,
    pub service: String,
    /// The event it emitted or handled (`payment.completed`), or what it did
    /// (`email.confirmation`).
    pub event: String,
    pub kind: StepKind,
    /// The business outcome (`charged`, `declined`, `released`...).
    pub outcome: String,
    #[schema(required = true)]
    pub detail: Option<String>,
    /// For compensations: where they stand.
    #[schema(required = true)]
    pub state: Option<CompensationState>,
}

impl Step {
    pub fn new(
        at: DateTime<Utc>,
        service: &str,
        event: &str,
        kind: StepKind,
        outcome: &str,
    ) -> Step {
        Step {
            at,
            service: service.to_owned(),
            event: event.to_owned(),
            kind,
            outcome: outcome.to_owned(),
            detail: None,
            state: (kind == StepKind::Compensation).then_some(CompensationState::Done),
        }
    }

    pub fn detail(mut self, detail: Option<impl Into<String>>) -> Step {
        self.detail = detail.map(Into::into);
        self
    }

    pub fn state(mut self, state: CompensationState) -> Step {
        self.state = Some(state);
        self
    }
}

/// A service's steps for one order: `GET /sagas/{order_id}/steps`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepLog {
    pub service: String,
    pub order_id: Uuid,
    pub steps: Vec<Step>,
}

/// An escalated compensation as a step of its saga.
pub fn escalation_step(service: &str, e: &EscalationRow) -> Step {
    let state = match e.status.as_str() {
        "resolved" => CompensationState::Done,
        "retrying" => CompensationState::Retrying,
        _ => CompensationState::Escalated,
    };
    Step::new(
        e.updated_at,
        service,
        &e.routing_key,
        StepKind::Compensation,
        &format!("{} escalated", e.step),
    )
    .detail(Some(format!(
        "{} ({} attempts): {}",
        e.status, e.attempts, e.last_error
    )))
    .state(state)
}

/// A service's own steps for an order, read from its state rows.
pub trait StepSource: Send + Sync + 'static {
    /// The steps, in any order (the log sorts them).
    fn steps(
        conn: &mut PgConnection,
        order_id: Uuid,
    ) -> impl Future<Output = Result<Vec<Step>, sqlx::Error>> + Send;
}

/// What the step-log endpoints need; a service's HTTP state provides it
/// (`FromRef`).
#[derive(Clone)]
pub struct LogState {
    pub pool: PgPool,
    pub service: &'static str,
}

/// Most orders one `POST /sagas/steps` asks about.
pub const MAX_ORDERS_PER_QUERY: usize = 500;

/// The body of `POST /sagas/steps`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepQuery {
    /// At most `MAX_ORDERS_PER_QUERY`.
    #[schema(max_items = 500)]
    pub order_ids: Vec<Uuid>,
}

/// The answer of `POST /sagas/steps`: a log per order asked about.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepLogs {
    pub logs: Vec<StepLog>,
}

/// - `GET /sagas/{order_id}/steps`: the service's steps for the order (its
///   state rows and escalations), oldest first; an empty list for an order
///   the service never saw.
/// - `POST /sagas/steps` `{"order_ids": [...]}` (at most
///   [`MAX_ORDERS_PER_QUERY`]): the same for many orders at once (the
///   invariant reconciler's question).
pub fn api<S: StepSource, St>() -> OpenApiRouter<St>
where
    St: Clone + Send + Sync + 'static,
    LogState: FromRef<St>,
{
    // The handlers are generic over the service's step source, which the
    // `routes!` macro cannot name: routed by hand, documented here.
    OpenApiRouter::with_openapi(StepLogApi::openapi())
        .route("/sagas/{order_id}/steps", get(step_log::<S>))
        .route("/sagas/steps", post(step_logs::<S>))
}

#[derive(OpenApi)]
#[openapi(paths(step_log, step_logs))]
struct StepLogApi;

async fn log_of<S: StepSource>(
    conn: &mut PgConnection,
    service: &'static str,
    order_id: Uuid,
) -> Result<StepLog, sqlx::Error> {
    let mut steps = S::steps(conn, order_id).await?;
    for e in escalation::for_order(conn, order_id).await? {
        steps.push(escalation_step(service, &e));
    }
    steps.sort_by_key(|s| s.at);
    Ok(StepLog {
        service: service.to_owned(),
        order_id,
        steps,
    })
}

/// `GET /sagas/{order_id}/steps`: this service's steps for the order.
#[utoipa::path(get, path = "/sagas/{order_id}/steps", tag = "sagas",
    params(("order_id" = Uuid, Path, description = "The order (saga) id")),
    responses(
        (status = 200, description = "The steps, oldest first (none for an order this service never saw)", body = StepLog),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
    ))]
async fn step_log<S: StepSource>(
    State(LogState { pool, service }): State<LogState>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = pool.acquire().await?;
    Ok(Json(log_of::<S>(&mut conn, service, order_id).await?).into_response())
}

/// `POST /sagas/steps`: the same for many orders at once.
#[utoipa::path(post, path = "/sagas/steps", tag = "sagas", request_body = StepQuery,
    responses(
        (status = 200, description = "A log per order asked about", body = StepLogs),
        (status = 400, description = "Not a list of UUIDs, or too many", body = ErrorBody),
    ))]
async fn step_logs<S: StepSource>(
    State(LogState { pool, service }): State<LogState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let StepQuery { order_ids } = json_body(&body, r#"{"order_ids": ["<uuid>", ...]}"#)?;
    if order_ids.len() > MAX_ORDERS_PER_QUERY {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_ORDERS_PER_QUERY} order_ids per query"
        )));
    }
    let mut conn = pool.acquire().await?;
    let mut logs = Vec::with_capacity(order_ids.len());
    // One short indexed read per order on one connection: an operator's
    // (or the reconciler's) question, never on the saga's path.
    for order_id in order_ids {
        logs.push(log_of::<S>(&mut conn, service, order_id).await?);
    }
    Ok(Json(StepLogs { logs }).into_response())
}
