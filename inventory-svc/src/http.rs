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
use crate::domain::ReservationStatus;
use crate::domain::{self, MAX_STOCK};
use axum::routing::put;
use chrono::Utc;
use common::messaging::envelope::SagaContext;
use common::messaging::events::EventType;
use common::messaging::publisher::Publisher;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::order::OrderLine;
use common::saga::timeline::{self, Step, StepKind, StepSource};
use sqlx::PgConnection;
use tracing::info;
use uuid::Uuid;

/// What setting the stock needs: it may fill backorders.
#[derive(Clone)]
struct ItemsState {
    pool: PgPool,
    publisher: Publisher,
}

pub fn routes(pool: PgPool, publisher: Publisher) -> Router {
    Router::new()
        .route("/items/{item_id}", put(put_item))
        .with_state(ItemsState {
            pool: pool.clone(),
            publisher,
        })
        .merge(
            Router::new()
                .route("/items/{item_id}", get(get_item))
                .route("/reservations/{order_id}", get(get_reservation))
                .with_state(pool.clone()),
        )
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    available: i32,
    frozen: Option<bool>,
    backorderable: Option<bool>,
}

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
    // The new stock, and the backorders it fills, in one transaction. Stock
    // rows are locked first, in item order — the order every batch locks
    // them in — then reservations, so the two cannot deadlock.
    let mut uow = UnitOfWork::begin(&state.pool).await?;
    let mut items = db::backorder_items(uow.conn(), &item_id).await?;
    items.push(item_id.clone());
    items.sort_unstable();
    items.dedup();
    let refs: Vec<&str> = items.iter().map(String::as_str).collect();
    db::lock_stock(uow.conn(), &refs).await?;
    let item = db::put_item(uow.conn(), &item_id, available, frozen, backorderable).await?;
    let filled = fill_backorders(&mut uow, &item_id).await?;
    uow.commit(&state.publisher).await?;
    if filled > 0 {
        step_outcome(SERVICE, "backorder_filled", filled);
    }
    Ok(Json(item).into_response())
}

/// Reserves, oldest first, the backorders waiting for `item_id` that the
/// stock now covers, and announces each (`inventory.reserved`, under the
/// saga's long deadline). Returns how many.
async fn fill_backorders(uow: &mut UnitOfWork, item_id: &str) -> Result<u64, sqlx::Error> {
    let mut filled = 0;
    for (order_id, pending) in db::backorders_for(uow.conn(), item_id).await? {
        let pending = pending.0;
        if Utc::now() >= pending.deadline_at {
            // Its rollback is on its way.
            continue;
        }
        let lines = db::lines(uow.conn(), order_id).await?;
        let items: Vec<&str> = lines.iter().map(|l| l.item_id.as_str()).collect();
        let levels = db::lock_stock(uow.conn(), &items).await?;
        if domain::check_availability(&lines, &levels).is_err() {
            continue;
        }
        db::fill_backorder(uow.conn(), order_id, &lines).await?;
        let ctx = SagaContext {
            order_id,
            deadline_at: pending.deadline_at,
            causation_id: pending.causation_id,
            producer: SERVICE,
            trail: pending.trail,
        };
        uow.emit(ctx.event(EventType::InventoryReserved, &pending.data));
        info!(%order_id, "backorder filled: stock reserved");
        filled += 1;
    }
    Ok(filled)
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
