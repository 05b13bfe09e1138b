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

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, FromRef, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use common::metric_definitions as metric;
use common::runtime::auth::ApiClient;
use common::runtime::http::{ApiError, ApiQuery, json_body, parse_id, parse_uuid};
use common::runtime::openapi::ErrorBody;
use common::saga::order::{OrderLine, SagaResult};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::db;
use crate::domain::OrderStatus;
use crate::domain::{self, InvalidOrder};
use crate::placer::Placer;
use crate::reconciler::Reconciler;
use crate::saga::{OrderSaga, PlaceError, PlaceRequest, created_step_row};
use crate::timeline::{self, Peers};
use common::saga::choreography;

/// What order-svc's endpoints need.
#[derive(Clone)]
pub struct HttpState {
    pub saga: Arc<OrderSaga>,
    pub placer: Placer,
    pub peers: Peers,
    pub reconciler: Reconciler,
    pub reads: ExpensiveReads,
}

impl FromRef<HttpState> for PgPool {
    fn from_ref(state: &HttpState) -> PgPool {
        state.saga.pool.clone()
    }
}

impl FromRef<HttpState> for ExpensiveReads {
    fn from_ref(state: &HttpState) -> ExpensiveReads {
        state.reads.clone()
    }
}

/// Reads that may walk many orders (searches, stats, findings): at most
/// [`Self::CONCURRENCY`] at once — more wait a moment, then get a 503 — and
/// each bounded by a statement timeout, so that no burst of them takes the
/// connections the saga needs.
#[derive(Clone)]
pub struct ExpensiveReads {
    pool: PgPool,
    permits: Arc<tokio::sync::Semaphore>,
}

/// A read transaction with its statement timeout, holding its permit.
pub struct ReadTx {
    pub tx: sqlx::Transaction<'static, sqlx::Postgres>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ExpensiveReads {
    /// Expensive reads at once; the pool has 4× as many connections by default.
    pub const CONCURRENCY: usize = 2;
    /// How long one may run (longer: cancelled, a 503).
    pub const STATEMENT_TIMEOUT_MS: u32 = 3000;
    /// How long one waits for its turn.
    const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn new(pool: PgPool) -> ExpensiveReads {
        ExpensiveReads {
            pool,
            permits: Arc::new(tokio::sync::Semaphore::new(Self::CONCURRENCY)),
        }
    }

    /// Waits for a turn, then opens a read transaction with its timeout.
    pub async fn begin(&self) -> Result<ReadTx, ApiError> {
        let permit = tokio::time::timeout(Self::QUEUE_WAIT, self.permits.clone().acquire_owned())
            .await
            // Counted with the other answers (`http_requests_total`, 503).
            .map_err(|_| ApiError::Unavailable)?
            .map_err(|_| ApiError::Unavailable)?;
        let mut tx = self.pool.begin().await?;
        // Planned for the values at hand every time: a cached generic plan
        // would walk the key with a filter where the values allow a range.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "set local statement_timeout = {}; set local plan_cache_mode = force_custom_plan",
            Self::STATEMENT_TIMEOUT_MS
        )))
        .execute(&mut *tx)
        .await?;
        Ok(ReadTx {
            tx,
            _permit: permit,
        })
    }
}

/// order-svc's endpoints, documented (the Saga Explorer's included).
pub fn api() -> OpenApiRouter<HttpState> {
    OpenApiRouter::new()
        .routes(routes!(place_order, find_order))
        .routes(routes!(get_order))
        .routes(routes!(search_sagas))
        .routes(routes!(get_choreography))
        .routes(routes!(list_violations))
        .routes(routes!(reconcile_now))
        .routes(routes!(get_saga))
        .routes(routes!(get_catalog_item, put_catalog_item))
        .merge(crate::explorer::api())
}

/// order-svc's whole OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    common::runtime::openapi::service_document(crate::SERVICE, api().into_openapi())
}

fn failure(status: StatusCode, error: &str, reason: impl Into<String>) -> Response {
    (status, Json(SagaResult::failure(error, reason))).into_response()
}

/// `POST /orders`: places an order and answers once its saga is decided.
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body(content = common::saga::order::OrderRequest, description = "The order dict", content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 200,
        description = "The client's idempotency key (1 to 200 visible ASCII characters): the same key \
                       and order answer the same saga, never a second one")),
    responses(
        (status = 200, description = "Decided: `success`, or `failure` with the error and reason",
            body = SagaResult, headers(("Location" = String, description = "/orders/{order_id}"))),
        (status = 202, description = "Pending: a step waits for an outside answer (3-D Secure) under \
            the long deadline; `next` says what and until when", body = SagaResult,
            headers(("Location" = String, description = "/orders/{order_id}"))),
        (status = 400, description = "Invalid order (nothing created): a failure dict with error \
            `Invalid order`", body = SagaResult),
        (status = 409, description = "The idempotency key was used for a different order", body = SagaResult),
        (status = 401, description = "No token, or a wrong one: a failure dict", body = SagaResult),
        (status = 408, description = "Not answered in time: a failure dict", body = SagaResult),
        (status = 413, description = "The body is too large (nothing created): a failure dict with \
            error `Invalid order`", body = SagaResult),
        (status = 415, description = "Not `application/json` (nothing created): a failure dict with \
            error `Invalid order`", body = SagaResult),
        (status = 500, description = "Unexpected (the cause is logged): a failure dict", body = SagaResult),
        (status = 503, description = "Unavailable for now (a dependency down, too many requests in \
            flight, shutting down): a failure dict; retry with the same key", body = SagaResult),
    ))]
async fn place_order(
    State(HttpState { saga, placer, .. }): State<HttpState>,
    client: Option<Extension<ApiClient>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // A named client's keys are its own: another never meets them.
    let client = client.map_or_else(ApiClient::anonymous, |Extension(c)| c);
    let key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(k)) if !k.trim().is_empty() && k.len() <= domain::MAX_KEY_LEN => {
            Some(client.scoped_key(k.trim()))
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
                    order_id: Uuid::now_v7(),
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
        // A value the database refused is invalid input: the client gets a
        // failure dict like for any other invalid order.
        Err(PlaceError::Db(e)) => {
            return match ApiError::from(e) {
                ApiError::BadRequest(reason) => {
                    failure(StatusCode::BAD_REQUEST, domain::INVALID_ORDER, reason)
                }
                other => other.into_response(),
            };
        }
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

/// `GET /orders/{order_id}`: the order, its status and its saga's timeline.
#[utoipa::path(get, path = "/orders/{order_id}", tag = "orders",
    params(("order_id" = Uuid, Path, description = "The order id")),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
    ))]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SagaQuery {
    /// `PENDING`, `CONFIRMED` or `FAILED` (any case).
    status: Option<String>,
    /// Only sagas created at or after this instant (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// How many at most (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Only stuck sagas: undecided past the deadline, a compensation not
    /// done, or an invariant violated.
    stuck: Option<bool>,
}

/// The answer of `GET /sagas`.
#[derive(Serialize, ToSchema)]
struct SagaList {
    sagas: Vec<db::SagaSummary>,
}

/// `GET /sagas`: recent sagas, newest first, filtered.
#[utoipa::path(get, path = "/sagas", tag = "sagas", params(SagaQuery),
    responses(
        (status = 200, description = "The sagas, newest first", body = SagaList),
        (status = 400, description = "A parameter out of range, or unknown", body = ErrorBody),
        (status = 503, description = "Too many expensive reads at once, or this one ran too long: retry", body = ErrorBody),
    ))]
async fn search_sagas(
    State(reads): State<ExpensiveReads>,
    ApiQuery(q): ApiQuery<SagaQuery>,
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
    let mut read = reads.begin().await?;
    let sagas = db::search_sagas(&mut read.tx, &search).await?;
    Ok(Json(SagaList { sagas }).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ByKey {
    /// The key the order was placed with.
    #[param(required = true, nullable = false)]
    idempotency_key: Option<String>,
}

/// `GET /orders?idempotency_key=K`: the order a key placed (a client that
/// lost its answer finds its order this way).
#[utoipa::path(get, path = "/orders", tag = "orders", params(ByKey),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "No idempotency_key", body = ErrorBody),
        (status = 404, description = "No order with that key", body = ErrorBody),
    ))]
async fn find_order(
    State(HttpState { saga, .. }): State<HttpState>,
    client: Option<Extension<ApiClient>>,
    ApiQuery(ByKey { idempotency_key }): ApiQuery<ByKey>,
) -> Result<Response, ApiError> {
    let key = idempotency_key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::BadRequest("idempotency_key is required".into()))?;
    if key.len() > domain::MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "idempotency_key must be 1 to {} printable characters",
            domain::MAX_KEY_LEN
        )));
    }
    let client = client.map_or_else(ApiClient::anonymous, |Extension(c)| c);
    let key = client.scoped_key(&key);
    let mut conn = saga.pool.acquire().await?;
    let order = db::find_by_keys(&mut conn, &[key.as_str()])
        .await?
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no order with idempotency key {key:?}")))?;
    Ok(Json(order_view(&mut conn, order).await?).into_response())
}

/// `GET /sagas/{order_id}`: the saga across the four services.
#[utoipa::path(get, path = "/sagas/{order_id}", tag = "sagas",
    params(("order_id" = Uuid, Path, description = "The order (saga) id")),
    responses(
        (status = 200, description = "Every step in order, the decision, compensations, emails", body = timeline::SagaView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No such saga", body = ErrorBody),
    ))]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ViolationQuery {
    /// How many at most (default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Resolved findings too.
    all: Option<bool>,
}

/// The answer of `GET /sagas/violations`.
#[derive(Serialize, ToSchema)]
struct ViolationList {
    violations: Vec<db::FindingRow>,
}

/// `GET /sagas/violations[?all=true&limit=N]`: what the reconciler found,
/// newest first; open findings only unless `all`.
#[utoipa::path(get, path = "/sagas/violations", tag = "sagas", params(ViolationQuery),
    responses(
        (status = 200, description = "The findings, newest first", body = ViolationList),
        (status = 400, description = "A parameter out of range, or unknown", body = ErrorBody),
        (status = 503, description = "Too many expensive reads at once, or this one ran too long: retry", body = ErrorBody),
    ))]
async fn list_violations(
    State(reads): State<ExpensiveReads>,
    ApiQuery(q): ApiQuery<ViolationQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_SEARCH_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be from 1 to {MAX_SEARCH_LIMIT}"
        )));
    }
    let mut read = reads.begin().await?;
    let found = db::findings(&mut read.tx, q.all.unwrap_or(false), limit).await?;
    Ok(Json(ViolationList { violations: found }).into_response())
}

/// `POST /admin/reconcile`: one reconciler pass now; answers what it did.
#[utoipa::path(post, path = "/admin/reconcile", tag = "operations",
    responses(
        (status = 200, description = "What the pass did", body = crate::reconciler::PassReport),
        (status = 500, description = "The pass failed; the cause is logged", body = ErrorBody),
    ))]
async fn reconcile_now(
    State(HttpState { reconciler, .. }): State<HttpState>,
) -> Result<Response, ApiError> {
    let report = reconciler
        .pass()
        .await
        .map_err(|e| ApiError::Internal(e.context("reconciler pass")))?;
    Ok(Json(report).into_response())
}

/// The answer of `GET /sagas/choreography`.
#[derive(Serialize, ToSchema)]
struct Choreography {
    /// Every reaction of every service.
    reactions: &'static [choreography::Reaction],
    /// The same as a Mermaid flowchart.
    mermaid: String,
}

/// `GET /sagas/choreography`: who reacts to what, as declared once in code.
#[utoipa::path(get, path = "/sagas/choreography", tag = "sagas",
    responses((status = 200, description = "The declared choreography", body = Choreography)))]
async fn get_choreography() -> Response {
    Json(Choreography {
        reactions: choreography::REACTIONS,
        mermaid: choreography::mermaid(),
    })
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

/// The answer of `GET /orders/{order_id}`.
#[derive(Serialize, ToSchema)]
struct OrderView {
    order_id: Uuid,
    customer_id: String,
    /// `PENDING`, `CONFIRMED` or `FAILED`.
    status: String,
    items: Vec<OrderLine>,
    amount_cents: i64,
    currency: String,
    card: CardView,
    created_at: DateTime<Utc>,
    deadline_at: DateTime<Utc>,
    #[schema(required = true)]
    decided_at: Option<DateTime<Utc>>,
    /// The result dict, once decided.
    #[schema(required = true)]
    result: Option<SagaResult>,
    /// What an undecided saga waits for, and until when.
    #[schema(required = true)]
    awaiting: Option<Awaiting>,
    /// The saga's timeline as order-svc recorded it.
    steps: Vec<db::StepRow>,
}

/// The card an order was paid with (never its number).
#[derive(Serialize, ToSchema)]
struct CardView {
    brand: String,
    last4: String,
}

/// The outside answer a long-running saga waits for.
#[derive(Serialize, ToSchema)]
struct Awaiting {
    /// `payment_confirmation` (3-D Secure) or `stock_arrival` (a
    /// backorder).
    step: String,
    deadline_at: DateTime<Utc>,
}

/// An order, its status and its saga's timeline.
async fn order_view(
    conn: &mut sqlx::PgConnection,
    order: db::OrderRow,
) -> Result<OrderView, sqlx::Error> {
    let steps = recorded_steps(conn, &order).await?;
    let result = order.result();
    Ok(OrderView {
        // A saga that waits for an outside answer, and until when.
        awaiting: order
            .awaiting
            .clone()
            .filter(|_| result.is_none())
            .map(|step| Awaiting {
                step,
                deadline_at: order.deadline_at,
            }),
        order_id: order.order_id,
        customer_id: order.customer_id,
        status: order.status,
        items: order.items.0,
        amount_cents: order.amount_cents,
        currency: order.currency,
        card: CardView {
            brand: order.card_brand,
            last4: order.card_last4,
        },
        created_at: order.created_at,
        deadline_at: order.deadline_at,
        decided_at: order.decided_at,
        result,
        steps,
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Price {
    /// From 1 to `MAX_PRICE_CENTS`.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    price_cents: i64,
}

/// A catalog item's price.
#[derive(Serialize, ToSchema)]
struct CatalogItem {
    item_id: String,
    price_cents: i64,
}

/// `PUT /catalog/{item_id}`: sets an item's price.
#[utoipa::path(put, path = "/catalog/{item_id}", tag = "set-up",
    params(("item_id" = String, Path, description = "The item")),
    request_body(content = Price, content_type = "application/json"),
    responses(
        (status = 200, description = "The price set", body = CatalogItem),
        (status = 400, description = "Not a valid id or price", body = ErrorBody),
    ))]
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
    Ok(Json(CatalogItem {
        item_id,
        price_cents,
    })
    .into_response())
}

/// `GET /catalog/{item_id}`: an item's price.
#[utoipa::path(get, path = "/catalog/{item_id}", tag = "set-up",
    params(("item_id" = String, Path, description = "The item")),
    responses(
        (status = 200, description = "The price", body = CatalogItem),
        (status = 400, description = "Not a valid id", body = ErrorBody),
        (status = 404, description = "No such item", body = ErrorBody),
    ))]
async fn get_catalog_item(
    State(HttpState { saga, .. }): State<HttpState>,
    Path(item_id): Path<String>,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let mut conn = saga.pool.acquire().await?;
    let price_cents = db::get_price(&mut conn, &item_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no catalog item {item_id:?}")))?;
    Ok(Json(CatalogItem {
        item_id,
        price_cents,
    })
    .into_response())
}
