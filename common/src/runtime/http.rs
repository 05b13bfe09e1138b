//! HTTP pieces every service shares: `/health`, `/metrics`, request metrics,
//! and the JSON error type.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tracing::error;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::messaging::broker::Broker;
use crate::messaging::delivery::{H_ESCALATION_ID, H_ORIGINAL_ROUTING_KEY};
use crate::messaging::escalation::{self, EscalationRow};
use crate::messaging::topology::ServiceIdentity;
use crate::metric_definitions as metric;
use crate::runtime::openapi::ErrorBody;
use crate::runtime::telemetry;
use crate::store::pool as db;

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
        if db::retryable(&e).is_some() {
            error!(error = %e, "database unavailable");
            ApiError::Unavailable
        } else if db::permanent(&e) {
            ApiError::BadRequest("a value was refused as invalid".to_owned())
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
        (status, Json(ErrorBody::new(self.to_string()))).into_response()
    }
}

/// `Query<T>` whose refusal (an unknown parameter, a value of the wrong
/// type) is a 400 `{"error": ...}` like every other bad request, not
/// axum's plain-text one.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// A UUID path segment (`what` names it in the 400 message).
pub fn parse_uuid(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("{what} must be a UUID")))
}

/// A customer or item id from a path segment (percent-decoded), checked
/// like the same id in a body: a 400 if it is not one.
pub fn parse_id(raw: &str, what: &str) -> Result<String, ApiError> {
    crate::saga::order::check_id(raw, what).map_err(ApiError::BadRequest)?;
    Ok(raw.to_owned())
}

/// A JSON body; a 400 naming the expected shape if it does not parse.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    expected: &str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("expected {expected}: {e}")))
}

/// What the operational endpoints need.
#[derive(Clone)]
pub struct OpsState {
    pub service: ServiceIdentity,
    pub broker: Broker,
    pub pool: PgPool,
    /// Reported by `/health`: whether the API needs tokens.
    pub auth_enabled: bool,
    /// Reported by `/health`: development mode (`DEV_MODE`).
    pub dev_mode: bool,
}

/// `/health` (readiness: broker connected and database reachable),
/// `/metrics` (Prometheus text), and the escalation admin endpoints:
/// `GET /admin/escalations[?status=open|retrying|resolved]` and
/// `POST /admin/escalations/{id}/retry`.
pub fn ops_api() -> OpenApiRouter<OpsState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics_text))
        .routes(routes!(list_escalations))
        .routes(routes!(retry_escalation))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EscalationQuery {
    /// Only escalations in this state.
    #[param(inline, pattern = "^(open|retrying|resolved)$")]
    status: Option<String>,
}

/// `GET /admin/escalations`: compensations whose retries ran out, newest
/// first.
#[utoipa::path(get, path = "/admin/escalations", tag = "operations", params(EscalationQuery),
    responses(
        (status = 200, description = "The escalations", body = Vec<EscalationRow>),
        (status = 400, description = "An unknown status", body = ErrorBody),
    ))]
async fn list_escalations(
    State(s): State<OpsState>,
    ApiQuery(q): ApiQuery<EscalationQuery>,
) -> Result<Response, ApiError> {
    if let Some(status) = &q.status
        && !["open", "retrying", "resolved"].contains(&status.as_str())
    {
        return Err(ApiError::BadRequest(
            "status must be open, retrying or resolved".into(),
        ));
    }
    let rows = escalation::list(&s.pool, q.status.as_deref()).await?;
    Ok(Json(rows).into_response())
}

/// The answer of `POST /admin/escalations/{id}/retry`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryAccepted {
    pub id: Uuid,
    /// `retrying`.
    pub status: String,
}

/// `POST /admin/escalations/{id}/retry`: re-publishes an escalated
/// compensation to the service's queue, with a fresh set of attempts.
/// Answers 202: the outcome shows in the list.
#[utoipa::path(post, path = "/admin/escalations/{id}/retry", tag = "operations",
    params(("id" = Uuid, Path, description = "The escalation's id")),
    responses(
        (status = 202, description = "Re-published; the outcome shows in the list", body = RetryAccepted),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such escalation", body = ErrorBody),
        (status = 409, description = "The escalation is already resolved", body = ErrorBody),
    ))]
async fn retry_escalation(
    State(s): State<OpsState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_uuid(&id, "id")?;
    match escalation::get(&s.pool, id).await? {
        None => return Err(ApiError::NotFound(format!("no escalation {id}"))),
        Some(e) if e.status == "resolved" => {
            return Err(ApiError::Conflict(format!(
                "escalation {id} is already resolved"
            )));
        }
        Some(_) => {}
    }
    let conn = s.broker.current().ok_or(ApiError::Unavailable)?;
    let row = escalation::begin_retry(&s.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no escalation {id}")))?;
    let mut headers = FieldTable::default();
    headers.insert(
        H_ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(LongString::from(row.routing_key.as_str())),
    );
    headers.insert(
        H_ESCALATION_ID.into(),
        AMQPValue::LongString(LongString::from(id.to_string().as_str())),
    );
    let props = BasicProperties::default()
        .with_message_id(row.message_id.to_string().into())
        .with_type(row.routing_key.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_user_id(s.broker.user().into())
        .with_headers(headers);
    let publish = async {
        if crate::failpoints::is_set("escalation::publish") {
            return Err(crate::messaging::broker::timeout_error(
                "failpoint escalation::publish",
            ));
        }
        let channel = Broker::confirm_channel(&conn).await?;
        let confirm = channel
            .basic_publish(
                crate::messaging::events::REQUEUE_EXCHANGE.into(),
                s.service.queue().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &row.body,
                props,
            )
            .await?
            .await?;
        let _ = channel.close(200, "done".into()).await;
        Ok::<_, lapin::Error>(confirm)
    };
    match publish.await {
        Ok(Confirmation::Ack(None)) => {}
        Ok(_) | Err(_) => {
            // Not retried after all: back in the open list.
            escalation::reopen(&s.pool, id).await?;
            return Err(ApiError::Unavailable);
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(RetryAccepted {
            id,
            status: "retrying".to_owned(),
        }),
    )
        .into_response())
}

/// The answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub service: String,
    /// `ok` (200) or `unavailable` (503).
    #[schema(pattern = "^(ok|unavailable)$")]
    pub status: String,
    /// `up` or `down`.
    #[schema(pattern = "^(up|down)$")]
    pub broker: String,
    /// `up` or `down`.
    #[schema(pattern = "^(up|down)$")]
    pub database: String,
    /// `enabled` or `disabled` (development: every endpoint open).
    #[schema(pattern = "^(enabled|disabled)$")]
    pub auth: String,
    /// `production` or `development` (`DEV_MODE`).
    #[schema(pattern = "^(production|development)$")]
    pub mode: String,
}

/// What `GET /health` answers with 503: its own verdict, or the in-flight
/// bound's refusal (which answers every endpoint alike).
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only a schema: the answers are built as either type
enum HealthOr503 {
    Health(Health),
    Error(ErrorBody),
}

/// `GET /health`: readiness — the broker connected and the database
/// reachable.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: the broker or the database is down (a Health \
            body); or too many requests in flight (an error body)", body = HealthOr503),
    ))]
async fn health(State(s): State<OpsState>) -> Response {
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
    let body = Health {
        service: s.service.name.to_owned(),
        status: if status == StatusCode::OK {
            "ok"
        } else {
            "unavailable"
        }
        .to_owned(),
        broker: up(broker).to_owned(),
        database: up(database).to_owned(),
        auth: if s.auth_enabled {
            "enabled"
        } else {
            "disabled"
        }
        .to_owned(),
        mode: if s.dev_mode {
            "development"
        } else {
            "production"
        }
        .to_owned(),
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: every metric, in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4",
        content_type = "text/plain; version=0.0.4", body = String)))]
async fn metrics_text() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
}

/// Bodies larger than this are refused with 413 while they are read
/// (never buffered whole): an order of 100 lines is under 20 KiB.
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// Middleware: a request that carries a body must say it is JSON (415
/// otherwise). A browser form posted cross-site (`text/plain`,
/// `application/x-www-form-urlencoded`) is refused before any handler sees
/// it.
pub async fn require_json(req: Request, next: Next) -> Response {
    let has_body = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|len| len.trim() != "0")
        && (req
            .headers()
            .contains_key(axum::http::header::CONTENT_LENGTH)
            || req
                .headers()
                .contains_key(axum::http::header::TRANSFER_ENCODING));
    let is_json = media_type(req.headers()).is_some_and(|m| m.eq_ignore_ascii_case(JSON));
    if has_body && !is_json {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(ErrorBody::new("Content-Type must be application/json")),
        )
            .into_response();
    }
    next.run(req).await
}

/// Middleware: at most as many requests in flight as `permits` holds; the
/// next one is shed at once with 503 and `Retry-After`, rather than queued
/// without bound.
pub async fn limit_in_flight(
    State(permits): State<std::sync::Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => {
            metrics::counter!(metric::HTTP_REQUESTS_SHED).increment(1);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "1")],
                Json(ErrorBody::new("too many requests in flight, retry later")),
            )
                .into_response()
        }
    }
}

/// A request's method as a metrics label: one of the methods the API
/// knows, or `other` — the label comes from the request, before any
/// authentication, and must not let a client create series at will.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: `http_requests_total` and `http_request_duration_seconds` by
/// service, method, matched route and status — every label from a fixed
/// set (the routes' templates, not the paths asked for).
pub async fn track_metrics(
    State(service): State<&'static str>,
    req: Request,
    next: Next,
) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method()).to_owned();
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

const JSON: &str = "application/json";

/// The media type of `Content-Type` without its parameters
/// (`text/plain; charset=utf-8` → `text/plain`).
fn media_type(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?;
    value.split(';').next().map(str::trim)
}

/// Plain-text error bodies longer than this are not carried over into the
/// JSON one (the status's reason is used instead).
const MAX_ERROR_TEXT_BYTES: usize = 4096;

/// Middleware: every error answer is JSON `{"error": "..."}`, as the API
/// documents — also those that are produced outside the handlers as plain
/// text or with no body at all: a path or body that axum's extractors
/// refuse, the body limit, the timeout, a panic, an unknown route or
/// method. Their text becomes the message (without one, the status's
/// reason). Answers with another media type (an HTML page) stay as they are.
pub async fn errors_as_json(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let plain = !response
        .headers()
        .contains_key(axum::http::header::CONTENT_TYPE)
        || media_type(response.headers()).is_some_and(|m| m.eq_ignore_ascii_case("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(JSON),
    );
    let body = serde_json::to_vec(&ErrorBody::new(message)).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The route that answers with the saga's result dict.
pub const PLACE_ORDER: (&str, &str) = ("POST", "/orders");

/// The `error` of the failure dict an answer of `POST /orders` made outside
/// its handler gets (the dict's `reason` carries the original message).
pub fn failure_error(status: StatusCode) -> String {
    match status.as_u16() {
        // The input was refused: nothing was created.
        400 | 413 | 415 | 422 => "Invalid order".to_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("Service unavailable")
            .to_owned(),
    }
}

/// Middleware, outside [`errors_as_json`]: every answer of `POST /orders`
/// is the saga's result dict — a refusal made before the handler (the body
/// limit's 413, a 415, the timeout's 408, the in-flight bound's 503, a
/// missing token's 401) becomes `{"status": "failure", "error", "reason"}`
/// with the original message as its reason.
pub async fn failure_dicts(req: Request, next: Next) -> Response {
    let placing = req.method().as_str() == PLACE_ORDER.0 && req.uri().path() == PLACE_ORDER.1;
    let response = next.run(req).await;
    let status = response.status();
    if !placing || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_TEXT_BYTES)
        .await
        .unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if answer.get("status").is_some() {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let reason = answer["error"]
        .as_str()
        .map_or_else(|| failure_error(status).to_lowercase(), str::to_owned);
    let dict = crate::saga::order::SagaResult::failure(failure_error(status), reason);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(JSON),
    );
    let body = serde_json::to_vec(&dict).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use serde_json::{Value, json};
    use tower_http::catch_panic::CatchPanicLayer;

    use super::*;

    /// Serves `router` behind the layers every service has, on a free port.
    async fn serve(router: Router) -> String {
        let router = router
            .layer(CatchPanicLayer::new())
            .layer(axum::middleware::from_fn(errors_as_json));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }

    async fn answer(request: reqwest::RequestBuilder) -> (u16, String, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let media = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.text().await.unwrap();
        (
            status,
            media,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    #[tokio::test]
    async fn every_answer_of_post_orders_is_the_result_dict() {
        use axum::routing::post;
        async fn unavailable() -> ApiError {
            ApiError::Unavailable
        }
        async fn slow() -> &'static str {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            "late"
        }
        async fn panics() -> &'static str {
            panic!("a bug")
        }
        async fn decided() -> Response {
            (
                StatusCode::CONFLICT,
                Json(
                    json!({"status": "failure", "error": "Idempotency key reused", "reason": "k"}),
                ),
            )
                .into_response()
        }
        let serve = |router: Router| async move {
            let router = router
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    std::time::Duration::from_millis(100),
                ))
                .layer(CatchPanicLayer::new())
                .layer(axum::middleware::from_fn(errors_as_json))
                .layer(axum::middleware::from_fn(failure_dicts));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, router).await });
            base
        };
        let http = reqwest::Client::new();
        let json = "application/json".to_owned();
        for (handler, status, error) in [
            (post(unavailable), 503, "Service Unavailable"),
            (post(slow), 408, "Request Timeout"),
            (post(panics), 500, "Internal Server Error"),
        ] {
            let base = serve(Router::new().route("/orders", handler.get(unavailable))).await;
            let (got, media, body) = answer(http.post(format!("{base}/orders"))).await;
            assert_eq!((got, &media), (status, &json), "{body}");
            assert_eq!(body["status"], "failure", "{body}");
            assert_eq!(body["error"], error, "{body}");
            assert!(
                body["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{body}"
            );
            // Another route keeps the API's plain error.
            let (_, _, other) = answer(http.get(format!("{base}/orders"))).await;
            assert!(other.get("status").is_none(), "{other}");
        }
        // A result dict from the handler stays as it is.
        let base = serve(Router::new().route("/orders", post(decided))).await;
        let (got, _, body) = answer(http.post(format!("{base}/orders"))).await;
        assert_eq!(
            (got, body),
            (
                409,
                json!({"status": "failure", "error": "Idempotency key reused", "reason": "k"})
            )
        );
    }

    #[tokio::test]
    async fn errors_made_outside_the_handlers_are_json_too() {
        async fn item(Path(id): Path<String>) -> String {
            id
        }
        async fn panics() -> &'static str {
            panic!("a bug")
        }
        async fn conflict() -> ApiError {
            ApiError::Conflict("taken".into())
        }
        async fn page() -> Response {
            (
                StatusCode::NOT_FOUND,
                [("content-type", "text/html")],
                "<h1>no such saga</h1>",
            )
                .into_response()
        }
        let base = serve(
            Router::new()
                .route("/items/{id}", get(item))
                .route("/panic", get(panics))
                .route("/conflict", get(conflict))
                .route("/page", get(page)),
        )
        .await;
        let http = reqwest::Client::new();
        let json = "application/json".to_owned();

        // A path segment that is not UTF-8: axum's own plain-text refusal.
        let (status, media, body) = answer(http.get(format!("{base}/items/%FF"))).await;
        assert_eq!((status, &media), (400, &json));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        // A panic: 500, and nothing of the panic's message.
        assert_eq!(
            answer(http.get(format!("{base}/panic"))).await,
            (500, json.clone(), json!({"error": "Service panicked"}))
        );
        // No such route, no such method: no body at all before.
        assert_eq!(
            answer(http.get(format!("{base}/nowhere"))).await,
            (404, json.clone(), json!({"error": "not found"}))
        );
        assert_eq!(
            answer(http.delete(format!("{base}/items/a"))).await,
            (405, json.clone(), json!({"error": "method not allowed"}))
        );
        // JSON errors and other media types pass as they are; so do successes.
        assert_eq!(
            answer(http.get(format!("{base}/conflict"))).await,
            (409, json.clone(), json!({"error": "taken"}))
        );
        assert_eq!(
            answer(http.get(format!("{base}/page"))).await,
            (
                404,
                "text/html".to_owned(),
                Value::String("<h1>no such saga</h1>".into())
            )
        );
        let (status, _, body) = answer(http.get(format!("{base}/items/a%20b"))).await;
        assert_eq!((status, body), (200, Value::String("a b".into())));
    }
}
