//! Every SQL statement of inventory-svc.
//!
//! Deadlock prevention: every transaction that touches several stock rows
//! first locks them with one `SELECT … ORDER BY item_id FOR UPDATE`, i.e. in
//! one global order; the updates that follow touch only rows it holds.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use common::order::OrderLine;
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{ReservationStatus, StockLevel};

/// Locks the stock rows of `item_ids` (sorted) and returns their levels.
pub async fn lock_stock(
    conn: &mut PgConnection,
    item_ids: &[String],
) -> Result<HashMap<String, StockLevel>, sqlx::Error> {
    let rows: Vec<(String, i32, bool)> = sqlx::query_as(
        r#"
        select item_id, available, frozen from stock
        where item_id = any($1)
        order by item_id
        for update
        "#,
    )
    .bind(item_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, available, frozen)| (id, StockLevel { available, frozen }))
        .collect())
}

fn columns(lines: &[OrderLine]) -> (Vec<&str>, Vec<i32>) {
    lines
        .iter()
        .map(|l| (l.item_id.as_str(), l.quantity))
        .unzip()
}

/// A movement of an order's units between the stock columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockMove {
    /// available → held (reservation).
    Hold,
    /// held → available (rollback).
    Release,
    /// held → sold (confirmation).
    Commit,
}

impl StockMove {
    /// Signs applied to (available, held).
    fn signs(self) -> (i32, i32) {
        match self {
            StockMove::Hold => (-1, 1),
            StockMove::Release => (1, -1),
            StockMove::Commit => (0, -1),
        }
    }
}

/// Moves every line's units, for rows already locked by [`lock_stock`]
/// (the check constraints keep both columns non-negative).
pub async fn move_units(
    conn: &mut PgConnection,
    lines: &[OrderLine],
    how: StockMove,
) -> Result<(), sqlx::Error> {
    let (items, qtys) = columns(lines);
    let (to_available, to_held) = how.signs();
    sqlx::query(
        r#"
        update stock s
        set available = s.available + $3 * l.qty,
            held = s.held + $4 * l.qty,
            updated_at = now()
        from unnest($1::text[], $2::int[]) as l(item_id, qty)
        where s.item_id = l.item_id
        "#,
    )
    .bind(items)
    .bind(qtys)
    .bind(to_available)
    .bind(to_held)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the order's reservation record; false if it already has one.
pub async fn insert_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: ReservationStatus,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        r#"
        insert into reservations (order_id, status, reason) values ($1, $2, $3)
        on conflict (order_id) do nothing
        "#,
    )
    .bind(order_id)
    .bind(status.as_str())
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

pub async fn insert_lines(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[OrderLine],
) -> Result<(), sqlx::Error> {
    let (items, qtys) = columns(lines);
    sqlx::query(
        r#"
        insert into reservation_lines (order_id, item_id, quantity)
        select $1, item_id, qty from unnest($2::text[], $3::int[]) as l(item_id, qty)
        "#,
    )
    .bind(order_id)
    .bind(items)
    .bind(qtys)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ReservationRow {
    pub order_id: Uuid,
    pub status: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ReservationRow {
    pub fn status(&self) -> Option<ReservationStatus> {
        ReservationStatus::parse(&self.status)
    }
}

pub async fn lock_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<ReservationRow>, sqlx::Error> {
    sqlx::query_as("select * from reservations where order_id = $1 for update")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

pub async fn get_reservation(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<ReservationRow>, sqlx::Error> {
    sqlx::query_as("select * from reservations where order_id = $1")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

pub async fn lines(conn: &mut PgConnection, order_id: Uuid) -> Result<Vec<OrderLine>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "select item_id, quantity from reservation_lines where order_id = $1 order by item_id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(item_id, quantity)| OrderLine {
            item_id,
            quantity,
            unit_price_cents: 0,
        })
        .collect())
}

pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: ReservationStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("update reservations set status = $2, updated_at = now() where order_id = $1")
        .bind(order_id)
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StockRow {
    pub item_id: String,
    pub available: i32,
    pub held: i32,
    pub frozen: bool,
}

pub async fn get_item(
    conn: &mut PgConnection,
    item_id: &str,
) -> Result<Option<StockRow>, sqlx::Error> {
    sqlx::query_as("select item_id, available, held, frozen from stock where item_id = $1")
        .bind(item_id)
        .fetch_optional(conn)
        .await
}

/// Sets the units on sale, and the frozen flag if given (new items: not frozen).
pub async fn put_item(
    conn: &mut PgConnection,
    item_id: &str,
    available: i32,
    frozen: Option<bool>,
) -> Result<StockRow, sqlx::Error> {
    sqlx::query_as(
        r#"
        insert into stock (item_id, available, frozen) values ($1, $2, coalesce($3, false))
        on conflict (item_id) do update
            set available = excluded.available,
                frozen = coalesce($3, stock.frozen),
                updated_at = now()
        returning item_id, available, held, frozen
        "#,
    )
    .bind(item_id)
    .bind(available)
    .bind(frozen)
    .fetch_one(conn)
    .await
}
