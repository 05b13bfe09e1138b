//! inventory-svc's HTTP API.
//!
//! - `PUT /items/{item_id}` — `{"available": N, "frozen": bool, "backorderable":
//!   bool}` sets the units on sale (`frozen`, optional: a stocktake; nothing is
//!   reserved or released; `backorderable`, optional: an order short of it
//!   waits for it). New stock fills waiting backorders, oldest first.
//! - `GET /items/{item_id}` — `{"item_id", "available", "held"}`: `held`
//!   counts units reserved by sagas not yet decided.
//! - `GET /reservations/{order_id}` — status (`held`, `committed`,
//!   `released`, `rejected`, `cancelled`), reason and lines.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};
use common::runtime::openapi::ErrorBody;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::SERVICE;
use crate::db;
use crate::domain::MAX_STOCK;
use crate::domain::ReservationStatus;
use crate::restock;
use chrono::{DateTime, Utc};
use common::messaging::publisher::Publisher;
use common::saga::order::OrderLine;
use common::saga::timeline::{self, LogState, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

/// What inventory-svc's endpoints need: setting the stock may fill
/// backorders, and publishes.
#[derive(Clone)]
pub struct ItemsState {
    pub pool: PgPool,
    pub publisher: Publisher,
}

impl FromRef<ItemsState> for PgPool {
    fn from_ref(state: &ItemsState) -> PgPool {
        state.pool.clone()
    }
}

impl FromRef<ItemsState> for LogState {
    fn from_ref(state: &ItemsState) -> LogState {
        LogState {
            pool: state.pool.clone(),
            service: SERVICE,
        }
    }
}

/// inventory-svc's endpoints, documented.
pub fn api() -> OpenApiRouter<ItemsState> {
    OpenApiRouter::new()
        .routes(routes!(get_item, put_item))
        .routes(routes!(get_reservation))
        .merge(timeline::api::<InventorySteps, ItemsState>())
}

/// inventory-svc's whole OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    common::runtime::openapi::service_document(SERVICE, api().into_openapi())
}

/// inventory-svc's steps of a saga, from its reservation.
struct InventorySteps;

impl StepSource for InventorySteps {
    async fn steps(conn: &mut PgConnection, order_id: Uuid) -> Result<Vec<Step>, sqlx::Error> {
        let Some(r) = db::get_reservation(conn, order_id).await? else {
            return Ok(Vec::new());
        };
        let lines = db::lines(conn, order_id).await?;
        Ok(reservation_steps(&r, &lines))
    }
}

fn reservation_steps(r: &db::ReservationRow, lines: &[OrderLine]) -> Vec<Step> {
    let held = lines
        .iter()
        .map(|l| format!("{} x {:?}", l.quantity, l.item_id))
        .collect::<Vec<_>>()
        .join(", ");
    let reserved = || {
        Step::new(
            r.created_at,
            SERVICE,
            "inventory.reserved",
            StepKind::Action,
            "reserved",
        )
        .detail(Some(held.clone()))
    };
    match r.status() {
        Some(ReservationStatus::Held) => vec![reserved()],
        Some(ReservationStatus::Committed) => vec![
            reserved(),
            Step::new(
                r.updated_at,
                SERVICE,
                "order.confirmed",
                StepKind::Action,
                "committed",
            ),
        ],
        Some(ReservationStatus::Released) => vec![
            reserved(),
            Step::new(
                r.updated_at,
                SERVICE,
                "inventory.released",
                StepKind::Compensation,
                "released",
            )
            .detail(Some(held.clone())),
        ],
        Some(ReservationStatus::Rejected) => vec![
            Step::new(
                r.created_at,
                SERVICE,
                "inventory.failed",
                StepKind::Action,
                "rejected",
            )
            .detail(r.reason.clone()),
        ],
        Some(ReservationStatus::Cancelled) => vec![Step::new(
            r.created_at,
            SERVICE,
            "order.failed",
            StepKind::Compensation,
            "cancelled before any reservation",
        )],
        Some(ReservationStatus::Backordered) => vec![
            Step::new(
                r.created_at,
                SERVICE,
                "inventory.backordered",
                StepKind::Action,
                "backordered",
            )
            .detail(Some(format!("waiting for {held}"))),
        ],
        None => Vec::new(),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    /// Units on sale, from 0 to `MAX_STOCK`.
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    available: i32,
    /// A stocktake: nothing is reserved or released (absent: kept; not
    /// frozen for a new item).
    frozen: Option<bool>,
    /// An order short of it waits for it (absent: kept).
    backorderable: Option<bool>,
}

/// `PUT /items/{item_id}`: sets the units on sale; new stock fills waiting
/// backorders, oldest first.
#[utoipa::path(put, path = "/items/{item_id}", tag = "set-up",
    params(("item_id" = String, Path, description = "The item")),
    request_body(content = ItemBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The item's stock", body = db::StockRow),
        (status = 400, description = "Not a valid id or body", body = ErrorBody),
    ))]
async fn put_item(
    State(state): State<ItemsState>,
    Path(item_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let ItemBody {
        available,
        frozen,
        backorderable,
    } = json_body(
        &body,
        r#"{"available": N, "frozen": bool?, "backorderable": bool?}"#,
    )?;
    if !(0..=MAX_STOCK).contains(&available) {
        return Err(ApiError::BadRequest(format!(
            "available must be from 0 to {MAX_STOCK}"
        )));
    }
    let item = restock::restock(
        &state.pool,
        &state.publisher,
        &item_id,
        available,
        frozen,
        backorderable,
    )
    .await?;
    Ok(Json(item).into_response())
}

/// `GET /items/{item_id}`: an item's stock; `held` counts units reserved by
/// sagas not yet decided.
#[utoipa::path(get, path = "/items/{item_id}", tag = "set-up",
    params(("item_id" = String, Path, description = "The item")),
    responses(
        (status = 200, description = "The item's stock", body = db::StockRow),
        (status = 400, description = "Not a valid id", body = ErrorBody),
        (status = 404, description = "No such item", body = ErrorBody),
    ))]
async fn get_item(
    State(pool): State<PgPool>,
    Path(item_id): Path<String>,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let mut conn = pool.acquire().await?;
    let item = db::get_item(&mut conn, &item_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no item {item_id:?}")))?;
    Ok(Json(item).into_response())
}

/// The answer of `GET /reservations/{order_id}`.
#[derive(Serialize, ToSchema)]
struct ReservationView {
    order_id: Uuid,
    /// `held`, `committed`, `released`, `rejected`, `cancelled` or
    /// `backordered`.
    status: String,
    #[schema(required = true)]
    reason: Option<String>,
    lines: Vec<ReservedLine>,
    /// Held for a payment still waiting for its confirmation.
    awaiting_payment: bool,
    /// Until when such a hold lasts.
    #[schema(required = true)]
    expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// One line of a reservation.
#[derive(Serialize, ToSchema)]
struct ReservedLine {
    item_id: String,
    quantity: i32,
}

/// `GET /reservations/{order_id}`: an order's reservation.
#[utoipa::path(get, path = "/reservations/{order_id}", tag = "inventory",
    params(("order_id" = Uuid, Path, description = "The order")),
    responses(
        (status = 200, description = "The reservation", body = ReservationView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 404, description = "No reservation for that order", body = ErrorBody),
    ))]
async fn get_reservation(
    State(pool): State<PgPool>,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order_id = parse_uuid(&order_id, "order_id")?;
    let mut conn = pool.acquire().await?;
    let r = db::get_reservation(&mut conn, order_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no reservation for order {order_id}")))?;
    let lines: Vec<_> = db::lines(&mut conn, order_id)
        .await?
        .into_iter()
        .map(|l| ReservedLine {
            item_id: l.item_id,
            quantity: l.quantity,
        })
        .collect();
    Ok(Json(ReservationView {
        order_id: r.order_id,
        status: r.status,
        reason: r.reason,
        lines,
        awaiting_payment: r.awaiting_payment,
        expires_at: r.expires_at,
        created_at: r.created_at,
        updated_at: r.updated_at,
    })
    .into_response())
}
