//! order-svc's HTTP API.
//!
//! - `POST /orders` — the order dict; optional `Idempotency-Key` header.
//!   Answers once the saga is decided (within the deadline): 200 with the
//!   result dict, `Location: /orders/{id}`; 202 with
//!   `{"status": "pending", "order_id", "next"}` when a step waits for an
//!   outside answer (3-D Secure) under the long deadline. 400 with a failure dict for
//!   invalid input (nothing is created); 409 if the key was used for a
//!   different order.
//! - `GET /orders/{order_id}` — the order, its status and the saga timeline.
//! - `GET /orders?idempotency_key=K` — the same, for the order a key placed.
//! - `GET /sagas?status=&since=&limit=&stuck=true` — recent sagas, newest
//!   first: status, amount, outcome, duration; `stuck`: undecided past the
//!   deadline, or failed with a compensation not done.
//! - `GET /sagas/{order_id}` — the saga across all four services: every
//!   step in order, the decision, compensations and their state, emails
//!   ([`crate::timeline`]).
//! - `GET /sagas/choreography` — the declared choreography and its Mermaid
//!   diagram.
//! - `GET /sagas/violations[?all=true&limit=N]` — the invariant reconciler's
//!   findings ([`crate::reconciler`]); `POST /admin/reconcile` runs a pass now.
//! - `PUT`/`GET /catalog/{item_id}` — `{"price_cents": N}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::metric_definitions as metric;
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};
use common::saga::order::SagaResult;
use serde::Deserialize;
use serde_json::json;

use crate::db;
use crate::domain::OrderStatus;
use crate::domain::{self, InvalidOrder};
use crate::placer::Placer;
use crate::reconciler::Reconciler;
use crate::saga::{OrderSaga, PlaceError, PlaceRequest, created_step_row};
use crate::timeline::{self, Peers};
use common::saga::choreography;

#[derive(Clone)]
struct HttpState {
    saga: Arc<OrderSaga>,
    placer: Placer,
    peers: Peers,
    reconciler: Reconciler,
}

pub fn routes(
    saga: Arc<OrderSaga>,
    placer: Placer,
    peers: Peers,
    reconciler: Reconciler,
) -> Router {
    Router::new()
        .route("/orders", post(place_order).get(find_order))
        .route("/orders/{order_id}", get(get_order))
        .route("/sagas", get(search_sagas))
        .route("/sagas/choreography", get(get_choreography))
        .route("/sagas/violations", get(list_violations))
        .route("/admin/reconcile", post(reconcile_now))
        .route("/sagas/{order_id}", get(get_saga))
        .route(
            "/catalog/{item_id}",
            get(get_catalog_item).put(put_catalog_item),
        )
        .with_state(HttpState {
            saga,
            placer,
            peers,
            reconciler,
        })
}

fn failure(status: StatusCode, error: &str, reason: impl Into<String>) -> Response {
    (status, Json(SagaResult::failure(error, reason))).into_response()
}

async fn place_order(
    State(HttpState { saga, placer, .. }): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(k)) if !k.trim().is_empty() && k.len() <= domain::MAX_KEY_LEN => {
            Some(k.trim().to_owned())
        }
        Some(_) => {
            return failure(
                StatusCode::BAD_REQUEST,
                domain::INVALID_ORDER,
                format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    domain::MAX_KEY_LEN
                ),
            );
        }
    };
    let order = serde_json::from_slice(&body)
        .map_err(|e| InvalidOrder(format!("the body is not valid JSON ({e})")))
        .and_then(|v| domain::validate_order(&v));
    let placed = match order {
        Ok(order) => {
            placer
                .place(PlaceRequest {
                    order,
                    key,
                    reply: None,
                    wait: true,
                })
                .await
        }
        Err(invalid) => Err(PlaceError::Invalid(invalid)),
    };
    let placement = match placed {
        Ok(placement) => placement,
        Err(PlaceError::Invalid(invalid)) => {
            metrics::counter!(metric::ORDERS_REJECTED, "source" => "http").increment(1);
            return failure(StatusCode::BAD_REQUEST, domain::INVALID_ORDER, invalid.0);
        }
        Err(e @ PlaceError::KeyReused(_)) => {
            return failure(
                StatusCode::CONFLICT,
                "Idempotency key reused",
                e.to_string(),
            );
        }
        Err(PlaceError::Db(e)) => return ApiError::from(e).into_response(),
        Err(PlaceError::Unavailable) => return ApiError::Unavailable.into_response(),
    };
    let order_id = placement.order_id;
    match saga.wait_for_result(placement).await {
        Ok(Some(result)) => {
            let location = format!("/orders/{order_id}");
            // Pending: accepted, decided later (a 3-D Secure confirmation).
            let status = if matches!(result, SagaResult::Pending { .. }) {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            (status, [(header::LOCATION, location)], Json(result)).into_response()
        }
        Ok(None) => {
            ApiError::Internal(anyhow::anyhow!("order {order_id} vanished")).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn get_order(
    State(HttpState { saga, .. }): State<HttpState>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = saga.pool.acquire().await?;
    let order = db::get_order(&mut conn, order_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no order {order_id}")))?;
    Ok(Json(order_view(&mut conn, order).await?).into_response())
}

/// Most sagas one search lists.
const MAX_SEARCH_LIMIT: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SagaQuery {
    status: Option<String>,
    since: Option<String>,
    limit: Option<i64>,
    stuck: Option<bool>,
}

/// `GET /sagas`: recent sagas, newest first, filtered.
async fn search_sagas(
    State(HttpState { saga, .. }): State<HttpState>,
    Query(q): Query<SagaQuery>,
) -> Result<Response, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(OrderStatus::parse(&s.to_ascii_uppercase()).ok_or_else(|| {
            ApiError::BadRequest("status must be PENDING, CONFIRMED or FAILED".into())
        })?),
    };
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|_| ApiError::BadRequest("since must be an RFC 3339 timestamp".into()))?
                .with_timezone(&chrono::Utc),
        ),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_SEARCH_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_SEARCH_LIMIT}"
        )));
    }
    let search = db::SagaSearch {
        status,
        since,
        stuck_only: q.stuck.unwrap_or(false),
        limit,
    };
    let mut conn = saga.pool.acquire().await?;
    let sagas = db::search_sagas(&mut conn, &search).await?;
    Ok(Json(json!({ "sagas": sagas })).into_response())
}

#[derive(Deserialize)]
struct ByKey {
    idempotency_key: Option<String>,
}

/// `GET /orders?idempotency_key=K`: the order a key placed (a client that
/// lost its answer finds its order this way).
async fn find_order(
    State(HttpState { saga, .. }): State<HttpState>,
    Query(ByKey { idempotency_key }): Query<ByKey>,
) -> Result<Response, ApiError> {
    let key = idempotency_key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::BadRequest("idempotency_key is required".into()))?;
    let mut conn = saga.pool.acquire().await?;
    let order = db::find_by_keys(&mut conn, &[key.as_str()])
        .await?
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no order with idempotency key {key:?}")))?;
    Ok(Json(order_view(&mut conn, order).await?).into_response())
}

/// `GET /sagas/{order_id}`: the saga across the four services.
async fn get_saga(
    State(HttpState { saga, peers, .. }): State<HttpState>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let (order, steps) = {
        let mut conn = saga.pool.acquire().await?;
        let order = db::get_order(&mut conn, order_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no saga {order_id}")))?;
        let steps = recorded_steps(&mut conn, &order).await?;
        (order, steps)
    };
    // The connection is back in the pool while the peers answer.
    Ok(Json(timeline::saga_view(&peers, &order, steps).await).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViolationQuery {
    limit: Option<i64>,
    all: Option<bool>,
}

/// `GET /sagas/violations[?all=true&limit=N]`: what the reconciler found,
/// newest first; open findings only unless `all`.
async fn list_violations(
    State(HttpState { saga, .. }): State<HttpState>,
    Query(q): Query<ViolationQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_SEARCH_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_SEARCH_LIMIT}"
        )));
    }
    let mut conn = saga.pool.acquire().await?;
    let found = db::findings(&mut conn, q.all.unwrap_or(false), limit).await?;
    Ok(Json(json!({ "violations": found })).into_response())
}

/// `POST /admin/reconcile`: one reconciler pass now; answers what it did.
async fn reconcile_now(
    State(HttpState { reconciler, .. }): State<HttpState>,
) -> Result<Response, ApiError> {
    let report = reconciler
        .pass()
        .await
        .map_err(|e| ApiError::Internal(e.context("reconciler pass")))?;
    Ok(Json(report).into_response())
}

/// `GET /sagas/choreography`: who reacts to what, as declared once in code.
async fn get_choreography() -> Response {
    Json(json!({
        "reactions": choreography::REACTIONS,
        "mermaid": choreography::mermaid(),
    }))
    .into_response()
}

/// The events order-svc recorded for a saga: recorded with the decision
/// (until then the timeline starts with the order), then what came after.
async fn recorded_steps(
    conn: &mut sqlx::PgConnection,
    order: &db::OrderRow,
) -> Result<Vec<db::StepRow>, sqlx::Error> {
    let mut steps = if order.timeline.0.is_empty() {
        vec![created_step_row(order)]
    } else {
        order.timeline.0.clone()
    };
    steps.extend(db::steps(conn, order.order_id).await?);
    Ok(steps)
}

/// An order, its status and its saga's timeline.
async fn order_view(
    conn: &mut sqlx::PgConnection,
    order: db::OrderRow,
) -> Result<serde_json::Value, sqlx::Error> {
    let steps = recorded_steps(conn, &order).await?;
    Ok(json!({
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "status": order.status,
        "items": order.items.0,
        "amount_cents": order.amount_cents,
        "currency": order.currency,
        "card": {"brand": order.card_brand, "last4": order.card_last4},
        "created_at": order.created_at,
        "deadline_at": order.deadline_at,
        "decided_at": order.decided_at,
        "result": order.result(),
        // A saga that waits for an outside answer, and until when.
        "awaiting": order.awaiting.as_ref().filter(|_| order.result().is_none()).map(|step| json!({
            "step": step,
            "deadline_at": order.deadline_at,
        })),
        "steps": steps,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    price_cents: i64,
}

async fn put_catalog_item(
    State(HttpState { saga, .. }): State<HttpState>,
    Path(item_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let Price { price_cents } = json_body(&body, r#"{"price_cents": N}"#)?;
    if !(1..=domain::MAX_PRICE_CENTS).contains(&price_cents) {
        return Err(ApiError::BadRequest(format!(
            "price_cents must be from 1 to {}",
            domain::MAX_PRICE_CENTS
        )));
    }
    let mut conn = saga.pool.acquire().await?;
    db::put_price(&mut conn, &item_id, price_cents).await?;
    Ok(Json(json!({"item_id": item_id, "price_cents": price_cents})).into_response())
}

async fn get_catalog_item(
    State(HttpState { saga, .. }): State<HttpState>,
    Path(item_id): Path<String>,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let mut conn = saga.pool.acquire().await?;
    let price_cents = db::get_price(&mut conn, &item_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no catalog item {item_id:?}")))?;
    Ok(Json(json!({"item_id": item_id, "price_cents": price_cents})).into_response())
}
