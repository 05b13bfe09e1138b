//! inventory-svc's HTTP API.
//!
//! - `PUT /items/{item_id}` — `{"available": N, "frozen": bool}` sets the units
//!   on sale (`frozen`, optional: a stocktake; nothing is reserved or released).
//! - `GET /items/{item_id}` — `{"item_id", "available", "held"}`: `held`
//!   counts units reserved by sagas not yet decided.
//! - `GET /reservations/{order_id}` — status (`held`, `committed`,
//!   `released`, `rejected`, `cancelled`), reason and lines.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::runtime::http::{ApiError, json_body, parse_id, parse_uuid};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;

use crate::SERVICE;
use crate::db;
use crate::domain::MAX_STOCK;
use crate::domain::ReservationStatus;
use common::saga::order::OrderLine;
use common::saga::timeline::{self, Step, StepKind, StepSource};
use sqlx::PgConnection;
use uuid::Uuid;

pub fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/items/{item_id}", get(get_item).put(put_item))
        .route("/reservations/{order_id}", get(get_reservation))
        .with_state(pool.clone())
        .merge(timeline::routes::<InventorySteps>(pool, SERVICE))
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
        None => Vec::new(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    available: i32,
    frozen: Option<bool>,
}

async fn put_item(
    State(pool): State<PgPool>,
    Path(item_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let item_id = parse_id(&item_id, "item_id")?;
    let ItemBody { available, frozen } = json_body(&body, r#"{"available": N, "frozen": bool?}"#)?;
    if !(0..=MAX_STOCK).contains(&available) {
        return Err(ApiError::BadRequest(format!(
            "available must be from 0 to {MAX_STOCK}"
        )));
    }
    let mut conn = pool.acquire().await?;
    Ok(Json(db::put_item(&mut conn, &item_id, available, frozen).await?).into_response())
}

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
        .map(|l| json!({"item_id": l.item_id, "quantity": l.quantity}))
        .collect();
    Ok(Json(json!({
        "order_id": r.order_id,
        "status": r.status,
        "reason": r.reason,
        "lines": lines,
        "awaiting_payment": r.awaiting_payment,
        "expires_at": r.expires_at,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }))
    .into_response())
}
