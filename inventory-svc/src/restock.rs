//! New stock, and the backorders it fills (`PUT /items/{item_id}`).
//!
//! Setting an item's stock and reserving the backorders it now covers is
//! one transaction: stock rows are locked first, in item order — the order
//! every batch locks them in — then reservations, so the two cannot
//! deadlock. Each filled backorder is announced (`inventory.reserved`,
//! under the saga's long deadline).

use chrono::Utc;
use common::messaging::envelope::SagaContext;
use common::messaging::events::EventType;
use common::messaging::publisher::Publisher;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use sqlx::PgPool;
use tracing::info;

use crate::SERVICE;
use crate::db::{self, StockRow};
use crate::domain;

/// Sets `item_id`'s units on sale (and its flags, if given) and fills the
/// backorders waiting for it that the stock now covers, oldest first.
pub async fn restock(
    pool: &PgPool,
    publisher: &Publisher,
    item_id: &str,
    available: i32,
    frozen: Option<bool>,
    backorderable: Option<bool>,
) -> Result<StockRow, sqlx::Error> {
    let mut uow = UnitOfWork::begin(pool).await?;
    let mut items = db::backorder_items(uow.conn(), item_id).await?;
    items.push(item_id.to_owned());
    items.sort_unstable();
    items.dedup();
    let refs: Vec<&str> = items.iter().map(String::as_str).collect();
    db::lock_stock(uow.conn(), &refs).await?;
    let item = db::put_item(uow.conn(), item_id, available, frozen, backorderable).await?;
    let filled = fill_backorders(&mut uow, item_id).await?;
    uow.commit(publisher).await?;
    if filled > 0 {
        step_outcome(SERVICE, "backorder_filled", filled);
    }
    Ok(item)
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
