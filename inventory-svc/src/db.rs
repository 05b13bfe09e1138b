//! Every SQL statement of inventory-svc; the hot path's are set-based (one
//! statement for a whole batch of orders).
//!
//! Deadlock prevention: every transaction that touches stock rows first
//! locks all of them with one `SELECT … ORDER BY item_id FOR UPDATE`, i.e.
//! in one global order; the updates that follow touch only rows it holds.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use common::messaging::outbox::{OutboxRows, insert_cte};
use common::saga::order::OrderLine;
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use uuid::Uuid;

use crate::domain::{ReservationStatus, StockLevel};

/// What a batch starts from, read in one round trip: the reservation status
/// of each order that has a record, the lines of those held among
/// `finishing` (orders to commit or release), and the stock of every item
/// those lines and `items` name — locked in one global order (sorted), so
/// concurrent batches cannot deadlock.
pub struct BatchState {
    pub existing: HashMap<Uuid, String>,
    pub held_lines: HashMap<Uuid, Vec<OrderLine>>,
    pub stock: HashMap<String, StockLevel>,
}

pub async fn batch_state(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    finishing: &[Uuid],
    items: &[String],
) -> Result<BatchState, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        kind: String,
        key: String,
        text: Option<String>,
        number: Option<i32>,
        frozen: Option<bool>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        r#"
        with existing as (
            select order_id, status from reservations where order_id = any($1)
        ),
        held_lines as (
            select l.order_id, l.item_id, l.quantity
            from reservation_lines l join existing e on e.order_id = l.order_id
            where e.status = 'held' and l.order_id = any($2)
        ),
        locked as (
            select item_id, available, frozen from stock
            where item_id in (select unnest($3::text[]) union select item_id from held_lines)
            order by item_id
            for update
        )
        select 'reservation' as kind, order_id::text as key, status as text,
               null::int as number, null::bool as frozen
        from existing
        union all
        select 'line', order_id::text, item_id, quantity, null from held_lines
        union all
        select 'stock', item_id, null, available, frozen from locked
        "#,
    )
    .bind(order_ids)
    .bind(finishing)
    .bind(items)
    .fetch_all(conn)
    .await?;
    let mut state = BatchState {
        existing: HashMap::new(),
        held_lines: HashMap::new(),
        stock: HashMap::new(),
    };
    for Row {
        kind,
        key,
        text,
        number,
        frozen,
    } in rows
    {
        match kind.as_str() {
            "reservation" => {
                if let (Ok(id), Some(status)) = (key.parse(), text) {
                    state.existing.insert(id, status);
                }
            }
            "line" => {
                if let (Ok(id), Some(item_id), Some(quantity)) = (key.parse(), text, number) {
                    state.held_lines.entry(id).or_default().push(OrderLine {
                        item_id,
                        quantity,
                        unit_price_cents: 0,
                    });
                }
            }
            _ => {
                state.stock.insert(
                    key,
                    StockLevel {
                        available: number.unwrap_or(0),
                        frozen: frozen.unwrap_or(false),
                    },
                );
            }
        }
    }
    for lines in state.held_lines.values_mut() {
        lines.sort_by(|a, b| a.item_id.cmp(&b.item_id));
    }
    Ok(state)
}

/// A batch's writes, for [`record_batch`].
pub struct BatchWrites<'a> {
    /// New records: reservations (held or rejected) and tombstones.
    pub records: &'a [(Uuid, ReservationStatus, Option<&'a str>)],
    /// The lines of the new held reservations.
    pub lines: &'a [(Uuid, &'a OrderLine)],
    /// Held reservations to commit or release.
    pub finish: &'a [(Uuid, ReservationStatus)],
}

/// What [`record_batch`] changed.
pub struct Recorded {
    /// Orders that got a new record.
    pub inserted: HashSet<Uuid>,
    /// Orders whose held reservation was committed or released.
    pub finished: HashSet<Uuid>,
}

/// Writes a batch in one statement: the new records and lines, the
/// commits and releases of held reservations, one net update per stock
/// row (units moved only for what was actually inserted or finished), and
/// the batch's events, keeping those of the orders it changed. For stock
/// rows locked by [`batch_state`]; the check constraints keep both columns
/// non-negative.
pub async fn record_batch(
    conn: &mut PgConnection,
    writes: &BatchWrites<'_>,
    events: OutboxRows<'_>,
) -> Result<Recorded, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
            with inserted as (
                insert into reservations (order_id, status, reason)
                select * from unnest($1::uuid[], $2::text[], $3::text[])
                on conflict (order_id) do nothing
                returning order_id, status
            ),
            new_lines as (
                insert into reservation_lines (order_id, item_id, quantity)
                select l.order_id, l.item_id, l.qty
                from unnest($4::uuid[], $5::text[], $6::int[]) as l(order_id, item_id, qty)
                where l.order_id in (select order_id from inserted where status = 'held')
                returning item_id, quantity
            ),
            finished as (
                update reservations r set status = d.status, updated_at = now()
                from unnest($7::uuid[], $8::text[]) as d(order_id, status)
                where r.order_id = d.order_id and r.status = 'held'
                returning r.order_id, r.status
            ),
            moves as (
                select item_id, -quantity as available, quantity as held from new_lines
                union all
                select l.item_id,
                       case when f.status = 'released' then l.quantity else 0 end,
                       -l.quantity
                from finished f join reservation_lines l on l.order_id = f.order_id
            ),
            stocked as (
                update stock s
                set available = s.available + m.available, held = s.held + m.held, updated_at = now()
                from (select item_id, sum(available)::int as available, sum(held)::int as held
                      from moves group by item_id) m
                where s.item_id = m.item_id
            ),
            events as ({})
            select 'inserted', order_id from inserted
            union all
            select 'finished', order_id from finished
            "#,
            insert_cte(
                9,
                Some("select order_id from inserted union all select order_id from finished")
            )
        )
    });
    let (mut ids, mut statuses, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    for (id, status, reason) in writes.records {
        ids.push(*id);
        statuses.push(status.as_str());
        reasons.push(*reason);
    }
    let (mut line_orders, mut line_items, mut line_qtys) = (Vec::new(), Vec::new(), Vec::new());
    for (id, line) in writes.lines {
        line_orders.push(*id);
        line_items.push(line.item_id.as_str());
        line_qtys.push(line.quantity);
    }
    let (fin_ids, fin_statuses): (Vec<Uuid>, Vec<&str>) = writes
        .finish
        .iter()
        .map(|(id, s)| (*id, s.as_str()))
        .unzip();
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(ids)
        .bind(statuses)
        .bind(reasons)
        .bind(line_orders)
        .bind(line_items)
        .bind(line_qtys)
        .bind(fin_ids)
        .bind(fin_statuses);
    let rows = events.bind(query).fetch_all(conn).await?;
    let mut recorded = Recorded {
        inserted: HashSet::new(),
        finished: HashSet::new(),
    };
    for row in rows {
        let kind: String = row.try_get(0)?;
        let id: Uuid = row.try_get(1)?;
        if kind == "inserted" {
            recorded.inserted.insert(id);
        } else {
            recorded.finished.insert(id);
        }
    }
    Ok(recorded)
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ReservationRow {
    pub order_id: Uuid,
    pub status: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Held for a payment still waiting for its confirmation.
    pub awaiting_payment: bool,
    /// Until when such a hold lasts (the saga's long deadline).
    pub expires_at: Option<DateTime<Utc>>,
}

impl ReservationRow {
    pub fn status(&self) -> Option<ReservationStatus> {
        ReservationStatus::parse(&self.status)
    }
}

/// Marks new holds as waiting for their payment's confirmation, held until
/// `expires_at` (one statement; none if empty).
pub async fn mark_holds(
    conn: &mut PgConnection,
    holds: &[(Uuid, DateTime<Utc>)],
) -> Result<(), sqlx::Error> {
    if holds.is_empty() {
        return Ok(());
    }
    let (ids, until): (Vec<Uuid>, Vec<DateTime<Utc>>) = holds.iter().copied().unzip();
    sqlx::query(
        r#"
        update reservations r set awaiting_payment = true, expires_at = x.until
        from unnest($1::uuid[], $2::timestamptz[]) as x(order_id, until)
        where r.order_id = x.order_id and r.status = 'held'
        "#,
    )
    .bind(ids)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(())
}

/// The holds among `order_ids` whose payment is now confirmed: no longer
/// waiting, each returned once (so announced once).
pub async fn claim_holds(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        r#"
        update reservations set awaiting_payment = false, updated_at = now()
        where order_id = any($1) and awaiting_payment and status = 'held'
        returning order_id
        "#,
    )
    .bind(order_ids)
    .fetch_all(conn)
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

/// An item's stock (`GET`/`PUT /items/{item_id}`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StockRow {
    pub item_id: String,
    pub available: i32,
    pub held: i32,
    pub frozen: bool,
    /// Sold while out of stock: an order short of it waits for it.
    pub backorderable: bool,
}

pub async fn get_item(
    conn: &mut PgConnection,
    item_id: &str,
) -> Result<Option<StockRow>, sqlx::Error> {
    sqlx::query_as(
        "select item_id, available, held, frozen, backorderable from stock where item_id = $1",
    )
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
    backorderable: Option<bool>,
) -> Result<StockRow, sqlx::Error> {
    sqlx::query_as(
        r#"
        insert into stock (item_id, available, frozen, backorderable)
        values ($1, $2, coalesce($3, false), coalesce($4, false))
        on conflict (item_id) do update
            set available = excluded.available,
                frozen = coalesce($3, stock.frozen),
                backorderable = coalesce($4, stock.backorderable),
                updated_at = now()
        returning item_id, available, held, frozen, backorderable
        "#,
    )
    .bind(item_id)
    .bind(available)
    .bind(frozen)
    .bind(backorderable)
    .fetch_one(conn)
    .await
}

// ----- backorders -----

/// What a backordered reservation publishes once its stock arrives: the
/// saga's context (long deadline, trail) and `inventory.reserved`'s payload.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PendingReservation {
    pub causation_id: String,
    pub deadline_at: DateTime<Utc>,
    pub trail: Vec<common::messaging::envelope::TrailEntry>,
    pub data: common::messaging::events::InventoryReserved,
}

/// The items among `item_ids` flagged backorderable.
pub async fn backorderable(
    conn: &mut PgConnection,
    item_ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<String> =
        sqlx::query_scalar("select item_id from stock where item_id = any($1) and backorderable")
            .bind(item_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Records a backordered reservation's lines (nothing held) and what it
/// will publish.
pub async fn record_backorder(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[OrderLine],
    pending: &PendingReservation,
) -> Result<(), sqlx::Error> {
    let items: Vec<&str> = lines.iter().map(|l| l.item_id.as_str()).collect();
    let qtys: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        r#"
        insert into reservation_lines (order_id, item_id, quantity)
        select $1, * from unnest($2::text[], $3::int[])
        on conflict do nothing
        "#,
    )
    .bind(order_id)
    .bind(items)
    .bind(qtys)
    .execute(&mut *conn)
    .await?;
    sqlx::query("update reservations set pending = $2 where order_id = $1")
        .bind(order_id)
        .bind(sqlx::types::Json(pending))
        .execute(conn)
        .await?;
    Ok(())
}

/// Rolled back while waiting: nothing was held, nothing to return. Returns
/// the ones cancelled (one filled meanwhile is not).
pub async fn cancel_backorders(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        r#"
        update reservations
        set status = 'released', pending = null, updated_at = now(),
            reason = 'backorder cancelled: the saga was rolled back'
        where order_id = any($1) and status = 'backordered'
        returning order_id
        "#,
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await
}

/// The items of the backordered reservations waiting for `item_id` (read
/// without locks: the caller locks stock first, in item order).
pub async fn backorder_items(
    conn: &mut PgConnection,
    item_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        select distinct l2.item_id from reservations r
        join reservation_lines l on l.order_id = r.order_id and l.item_id = $1
        join reservation_lines l2 on l2.order_id = r.order_id
        where r.status = 'backordered'
        "#,
    )
    .bind(item_id)
    .fetch_all(conn)
    .await
}

/// Backordered reservations waiting for `item_id` and still within their
/// saga's long deadline (an expired one's rollback is on its way: it must
/// not starve the newer ones), oldest first, 100 at most, locked.
pub async fn backorders_for(
    conn: &mut PgConnection,
    item_id: &str,
) -> Result<Vec<(Uuid, sqlx::types::Json<PendingReservation>)>, sqlx::Error> {
    sqlx::query_as(
        r#"
        select r.order_id, r.pending from reservations r
        where r.status = 'backordered' and r.pending is not null
          and (r.pending->>'deadline_at')::timestamptz > now()
          and exists (select 1 from reservation_lines l
                      where l.order_id = r.order_id and l.item_id = $1)
        order by r.created_at
        limit 100
        for update skip locked
        "#,
    )
    .bind(item_id)
    .fetch_all(conn)
    .await
}

/// Locks the stock of `item_ids` (in one global order) and reads it.
pub async fn lock_stock(
    conn: &mut PgConnection,
    item_ids: &[&str],
) -> Result<HashMap<String, StockLevel>, sqlx::Error> {
    let rows: Vec<(String, i32, bool)> = sqlx::query_as(
        r#"
        select item_id, available, frozen from stock where item_id = any($1)
        order by item_id for update
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

/// Holds a backordered reservation's lines now that they are in stock.
pub async fn fill_backorder(
    conn: &mut PgConnection,
    order_id: Uuid,
    lines: &[OrderLine],
) -> Result<(), sqlx::Error> {
    let items: Vec<&str> = lines.iter().map(|l| l.item_id.as_str()).collect();
    let qtys: Vec<i32> = lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        r#"
        update stock s set available = s.available - m.q, held = s.held + m.q, updated_at = now()
        from unnest($1::text[], $2::int[]) as m(item_id, q)
        where s.item_id = m.item_id
        "#,
    )
    .bind(items)
    .bind(qtys)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        r#"
        update reservations set status = 'held', pending = null, reason = null, updated_at = now()
        where order_id = $1 and status = 'backordered'
        "#,
    )
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
}
