//! HTTP pieces every service shares: `/health`, `/metrics`, request metrics,
//! and the JSON error type.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tracing::error;

use crate::broker::Broker;
use crate::telemetry;

/// An error answered as JSON `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or invalid; the message says why.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with the current state (e.g. an idempotency key reused
    /// for a different request).
    #[error("{0}")]
    Conflict(String),
    /// 503: a dependency is unavailable; retry later.
    #[error("service unavailable, retry later")]
    Unavailable,
    /// 500: unexpected; the body is generic and the cause is logged.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::retryable(&e).is_some() {
            error!(error = %e, "database unavailable");
            ApiError::Unavailable
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(e) => {
                error!(error = format!("{e:#}"), "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

#[derive(Clone)]
struct HealthState {
    service: &'static str,
    broker: Broker,
    pool: PgPool,
}

/// `/health` (readiness: broker connected and database reachable) and
/// `/metrics` (Prometheus text).
pub fn ops_routes(service: &'static str, broker: Broker, pool: PgPool) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(HealthState {
            service,
            broker,
            pool,
        })
}

async fn health(State(s): State<HealthState>) -> Response {
    let broker = s.broker.is_connected();
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("select 1").execute(&s.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let up = |b: bool| if b { "up" } else { "down" };
    let status = if broker && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": s.service,
        "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
        "broker": up(broker),
        "database": up(database),
    });
    (status, Json(body)).into_response()
}

async fn metrics_text() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}

/// Middleware: `http_requests_total` and `http_request_duration_seconds` by
/// service, method, matched route and status.
pub async fn track_metrics(
    State(service): State<&'static str>,
    req: Request,
    next: Next,
) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let labels = [
        ("service", service.to_owned()),
        ("method", method),
        ("path", path),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels[..3])
        .record(started.elapsed().as_secs_f64());
    response
}
