//! Every SQL statement of order-svc. Functions take `&mut PgConnection` so the
//! caller decides the transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use common::order::{OrderLine, SagaResult};
use serde::Serialize;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{Decision, OrderStatus};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub items: Json<Vec<OrderLine>>,
    pub amount_cents: i64,
    pub currency: String,
    pub card_brand: String,
    pub card_last4: String,
    pub request_fingerprint: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

impl OrderRow {
    pub fn status(&self) -> OrderStatus {
        OrderStatus::parse(&self.status).unwrap_or(OrderStatus::Pending)
    }

    /// The result dict, once decided.
    pub fn result(&self) -> Option<SagaResult> {
        match self.status() {
            OrderStatus::Pending => None,
            OrderStatus::Confirmed => Some(SagaResult::Success {
                order_id: self.order_id,
            }),
            OrderStatus::Failed => Some(SagaResult::failure(
                self.error.clone().unwrap_or_default(),
                self.reason.clone().unwrap_or_default(),
            )),
        }
    }
}

const ORDER_COLUMNS: &str = "order_id, customer_id, status, items, amount_cents, currency, card_brand, \
     card_last4, request_fingerprint, error, reason, created_at, deadline_at, decided_at";

pub async fn get_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where order_id = $1"
    )))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

/// The order's row, locked until the transaction ends.
pub async fn lock_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where order_id = $1 for update"
    )))
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

pub async fn find_by_key(
    conn: &mut PgConnection,
    key: &str,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where idempotency_key = $1"
    )))
    .bind(key)
    .fetch_optional(conn)
    .await
}

/// A new order, PENDING.
pub struct NewOrder<'a> {
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub items: &'a [OrderLine],
    pub amount_cents: i64,
    pub currency: &'a str,
    pub card_brand: &'a str,
    pub card_last4: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub fingerprint: &'a str,
    pub deadline_ms: i64,
}

/// Inserts the order; `None` if its idempotency key is already taken.
pub async fn insert_order(
    conn: &mut PgConnection,
    o: &NewOrder<'_>,
) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        insert into orders (order_id, customer_id, status, items, amount_cents, currency,
                            card_brand, card_last4, idempotency_key, request_fingerprint, deadline_at)
        values ($1, $2, 'PENDING', $3, $4, $5, $6, $7, $8, $9,
                now() + make_interval(secs => $10::double precision / 1000))
        on conflict (idempotency_key) do nothing
        returning {ORDER_COLUMNS}
        "#
    )))
    .bind(o.order_id)
    .bind(o.customer_id)
    .bind(Json(o.items))
    .bind(o.amount_cents)
    .bind(o.currency)
    .bind(o.card_brand)
    .bind(o.card_last4)
    .bind(o.idempotency_key)
    .bind(o.fingerprint)
    .bind(o.deadline_ms)
    .fetch_optional(conn)
    .await
}

/// Records the decision if the order is still PENDING (and, to confirm,
/// still within its deadline). `None` if someone else decided first or the
/// deadline passed: a saga is decided exactly once.
pub async fn decide(
    conn: &mut PgConnection,
    order_id: Uuid,
    decision: &Decision,
) -> Result<Option<OrderRow>, sqlx::Error> {
    match decision {
        Decision::Confirm => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                r#"
                update orders set status = 'CONFIRMED', decided_at = clock_timestamp()
                where order_id = $1 and status = 'PENDING' and deadline_at > clock_timestamp()
                returning {ORDER_COLUMNS}
                "#
            )))
            .bind(order_id)
            .fetch_optional(conn)
            .await
        }
        Decision::Fail { step, reason } => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                r#"
                update orders set status = 'FAILED', error = $2, reason = $3, decided_at = clock_timestamp()
                where order_id = $1 and status = 'PENDING'
                returning {ORDER_COLUMNS}
                "#
            )))
            .bind(order_id)
            .bind(step.error())
            .bind(reason)
            .fetch_optional(conn)
            .await
        }
    }
}

/// PENDING orders past their deadline, locked; rows another replica is
/// already failing are skipped.
pub async fn lock_overdue(conn: &mut PgConnection, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        select order_id from orders
        where status = 'PENDING' and deadline_at <= clock_timestamp()
        order by deadline_at
        limit $1
        for update skip locked
        "#,
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Wakes the HTTP requests waiting on this order (in every replica) at commit.
pub async fn notify_decided(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify('order_decided', $1)")
        .bind(order_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// One entry of the saga timeline.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub step: String,
    pub source: String,
    pub event_id: Option<Uuid>,
    pub detail: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

pub struct NewStep<'a> {
    pub order_id: Uuid,
    pub step: &'a str,
    pub event_id: Option<Uuid>,
    pub source: &'a str,
    pub detail: Option<&'a str>,
    pub occurred_at: DateTime<Utc>,
}

pub async fn record_step(conn: &mut PgConnection, s: &NewStep<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into saga_steps (order_id, step, event_id, source, detail, occurred_at)
        values ($1, $2, $3, $4, $5, $6)
        on conflict do nothing
        "#,
    )
    .bind(s.order_id)
    .bind(s.step)
    .bind(s.event_id)
    .bind(s.source)
    .bind(s.detail)
    .bind(s.occurred_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn steps(conn: &mut PgConnection, order_id: Uuid) -> Result<Vec<StepRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        select step, source, event_id, detail, occurred_at, recorded_at
        from saga_steps where order_id = $1 order by id
        "#,
    )
    .bind(order_id)
    .fetch_all(conn)
    .await
}

/// Adds a reply target; false if it was already there.
pub async fn add_reply_target(
    conn: &mut PgConnection,
    order_id: Uuid,
    reply_to: &str,
    correlation_id: &str,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        r#"
        insert into reply_targets (order_id, reply_to, correlation_id) values ($1, $2, $3)
        on conflict do nothing
        "#,
    )
    .bind(order_id)
    .bind(reply_to)
    .bind(correlation_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

pub async fn reply_targets(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("select reply_to, correlation_id from reply_targets where order_id = $1")
        .bind(order_id)
        .fetch_all(conn)
        .await
}

pub async fn catalog_prices(
    conn: &mut PgConnection,
    item_ids: &[String],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select item_id, price_cents from catalog where item_id = any($1)")
            .bind(item_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

pub async fn get_price(conn: &mut PgConnection, item_id: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("select price_cents from catalog where item_id = $1")
        .bind(item_id)
        .fetch_optional(conn)
        .await
}

pub async fn put_price(
    conn: &mut PgConnection,
    item_id: &str,
    price_cents: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into catalog (item_id, price_cents) values ($1, $2)
        on conflict (item_id) do update set price_cents = excluded.price_cents, updated_at = now()
        "#,
    )
    .bind(item_id)
    .bind(price_cents)
    .execute(conn)
    .await?;
    Ok(())
}
