//! Every SQL statement of inventory-svc; the hot path's are set-based (one
//! statement for a whole batch of orders).
//!
//! Deadlock prevention: every transaction that touches stock rows first
//! locks all of them with one `SELECT … ORDER BY item_id FOR UPDATE`, i.e.
//! in one global order; the updates that follow touch only rows it holds.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use common::saga::order::OrderLine;
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

/// Net change of one item's stock columns within a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockDelta {
    pub available: i32,
    pub held: i32,
}

impl StockDelta {
    /// Adds `qty` units moved by `how`.
    pub fn add(&mut self, how: StockMove, qty: i32) {
        let (to_available, to_held) = how.signs();
        self.available += to_available * qty;
        self.held += to_held * qty;
    }
}

/// Applies every item's net change, for rows already locked by
/// [`lock_stock`] (one statement; the check constraints keep both columns
/// non-negative).
pub async fn apply_deltas(
    conn: &mut PgConnection,
    deltas: &HashMap<String, StockDelta>,
) -> Result<(), sqlx::Error> {
    let mut items = Vec::with_capacity(deltas.len());
    let mut available = Vec::with_capacity(deltas.len());
    let mut held = Vec::with_capacity(deltas.len());
    for (item, d) in deltas {
        if *d == StockDelta::default() {
            continue;
        }
        items.push(item.as_str());
        available.push(d.available);
        held.push(d.held);
    }
    if items.is_empty() {
        return Ok(());
    }
    sqlx::query(
        r#"
        update stock s
        set available = s.available + d.available,
            held = s.held + d.held,
            updated_at = now()
        from unnest($1::text[], $2::int[], $3::int[]) as d(item_id, available, held)
        where s.item_id = d.item_id
        "#,
    )
    .bind(items)
    .bind(available)
    .bind(held)
    .execute(conn)
    .await?;
    Ok(())
}

/// The reservation status of each order that has a record.
pub async fn existing_reservations(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, String>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("select order_id, status from reservations where order_id = any($1)")
            .bind(order_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Inserts reservation records (one statement); returns the orders that got
/// one (an order that already has a record keeps it).
pub async fn insert_reservations(
    conn: &mut PgConnection,
    records: &[(Uuid, ReservationStatus, Option<&str>)],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut ids = Vec::with_capacity(records.len());
    let mut statuses = Vec::with_capacity(records.len());
    let mut reasons = Vec::with_capacity(records.len());
    for (id, status, reason) in records {
        ids.push(*id);
        statuses.push(status.as_str());
        reasons.push(*reason);
    }
    sqlx::query_scalar(
        r#"
        insert into reservations (order_id, status, reason)
        select * from unnest($1::uuid[], $2::text[], $3::text[])
        on conflict (order_id) do nothing
        returning order_id
        "#,
    )
    .bind(ids)
    .bind(statuses)
    .bind(reasons)
    .fetch_all(conn)
    .await
}

/// Inserts the lines of several reservations (one statement).
pub async fn insert_lines_of(
    conn: &mut PgConnection,
    lines: &[(Uuid, &OrderLine)],
) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(lines.len());
    let mut items = Vec::with_capacity(lines.len());
    let mut qtys = Vec::with_capacity(lines.len());
    for (id, line) in lines {
        ids.push(*id);
        items.push(line.item_id.as_str());
        qtys.push(line.quantity);
    }
    sqlx::query(
        r#"
        insert into reservation_lines (order_id, item_id, quantity)
        select * from unnest($1::uuid[], $2::text[], $3::int[])
        "#,
    )
    .bind(ids)
    .bind(items)
    .bind(qtys)
    .execute(conn)
    .await?;
    Ok(())
}

/// The lines of several reservations, by order.
pub async fn lines_of(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<OrderLine>>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        r#"
        select order_id, item_id, quantity from reservation_lines
        where order_id = any($1) order by order_id, item_id
        "#,
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    let mut out: HashMap<Uuid, Vec<OrderLine>> = HashMap::new();
    for (order_id, item_id, quantity) in rows {
        out.entry(order_id).or_default().push(OrderLine {
            item_id,
            quantity,
            unit_price_cents: 0,
        });
    }
    Ok(out)
}

/// Moves held reservations to their new status (one statement); returns the
/// orders whose reservation was still held (only those move stock).
pub async fn finish_held(
    conn: &mut PgConnection,
    changes: &[(Uuid, ReservationStatus)],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let (ids, statuses): (Vec<Uuid>, Vec<&str>) =
        changes.iter().map(|(id, s)| (*id, s.as_str())).unzip();
    sqlx::query_scalar(
        r#"
        update reservations r
        set status = d.status, updated_at = now()
        from unnest($1::uuid[], $2::text[]) as d(order_id, status)
        where r.order_id = d.order_id and r.status = 'held'
        returning r.order_id
        "#,
    )
    .bind(ids)
    .bind(statuses)
    .fetch_all(conn)
    .await
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
