//! Every SQL statement of order-svc. Functions take `&mut PgConnection` so the
//! caller decides the transaction; the hot path's are set-based (one
//! statement for a whole batch of orders).

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use common::messaging::outbox::{OutboxRows, insert_cte};
use common::saga::order::{OrderLine, SagaResult};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use uuid::Uuid;

use crate::domain::OrderStatus;

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
    pub idempotency_key: Option<String>,
    pub request_fingerprint: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub reply_to: Option<String>,
    pub reply_correlation_id: Option<String>,
    pub extra_reply_targets: bool,
    pub waiter: Option<String>,
    /// The timeline recorded with the decision.
    pub timeline: Json<Vec<StepRow>>,
    /// What an undecided saga waits for under its long deadline
    /// (`payment_confirmation`); `None` for an ordinary one.
    pub awaiting: Option<String>,
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
            OrderStatus::Failed => Some(SagaResult::order_failed(
                self.order_id,
                self.error.clone().unwrap_or_default(),
                self.reason.clone().unwrap_or_default(),
            )),
        }
    }
}

const ORDER_COLUMNS: &str = "order_id, customer_id, status, items, amount_cents, currency, card_brand, \
     card_last4, idempotency_key, request_fingerprint, error, reason, created_at, deadline_at, \
     decided_at, reply_to, reply_correlation_id, extra_reply_targets, waiter, timeline, awaiting";

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

/// The orders placed with these idempotency keys.
pub async fn find_by_keys(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where idempotency_key = any($1)"
    )))
    .bind(keys)
    .fetch_all(conn)
    .await
}

/// The orders `order_ids` (those that exist).
pub async fn find_by_ids(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where order_id = any($1)"
    )))
    .bind(order_ids)
    .fetch_all(conn)
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
    pub reply_to: Option<&'a str>,
    pub reply_correlation_id: Option<&'a str>,
    pub waiter: Option<&'a str>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
}

/// What the database assigned a new order.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Inserted {
    pub order_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
}

/// Inserts orders and their `order.created` events (one statement); an
/// order whose idempotency key or id is already taken is skipped (not
/// returned), and so is its event.
pub async fn insert_orders(
    conn: &mut PgConnection,
    orders: &[NewOrder<'_>],
    events: OutboxRows<'_>,
) -> Result<Vec<Inserted>, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
            with inserted as (
                insert into orders (order_id, customer_id, status, items, amount_cents, currency,
                                    card_brand, card_last4, idempotency_key, request_fingerprint,
                                    reply_to, reply_correlation_id, waiter, created_at, deadline_at)
                select o, c, 'PENDING', i, a, cur, b, l4, k, f, rt, rc, w, ca, d
                from unnest($1::uuid[], $2::text[], $3::jsonb[], $4::bigint[], $5::text[], $6::text[],
                            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                            $13::timestamptz[], $14::timestamptz[])
                    as t(o, c, i, a, cur, b, l4, k, f, rt, rc, w, ca, d)
                on conflict do nothing
                returning order_id, created_at, deadline_at
            ),
            events as ({})
            select order_id, created_at, deadline_at from inserted
            "#,
            insert_cte(15, Some("select order_id from inserted"))
        )
    });
    let n = orders.len();
    let mut ids = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut items = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut brands = Vec::with_capacity(n);
    let mut last4s = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut fingerprints = Vec::with_capacity(n);
    let mut reply_tos = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut waiters = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut deadlines = Vec::with_capacity(n);
    for o in orders {
        ids.push(o.order_id);
        customers.push(o.customer_id);
        items.push(Json(o.items));
        amounts.push(o.amount_cents);
        currencies.push(o.currency);
        brands.push(o.card_brand);
        last4s.push(o.card_last4);
        keys.push(o.idempotency_key);
        fingerprints.push(o.fingerprint);
        reply_tos.push(o.reply_to);
        correlations.push(o.reply_correlation_id);
        waiters.push(o.waiter);
        created.push(o.created_at);
        deadlines.push(o.deadline_at);
    }
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(ids)
        .bind(customers)
        .bind(items)
        .bind(amounts)
        .bind(currencies)
        .bind(brands)
        .bind(last4s)
        .bind(keys)
        .bind(fingerprints)
        .bind(reply_tos)
        .bind(correlations)
        .bind(waiters)
        .bind(created)
        .bind(deadlines);
    events
        .bind(query)
        .fetch_all(conn)
        .await?
        .iter()
        .map(|row| {
            Ok(Inserted {
                order_id: row.try_get(0)?,
                created_at: row.try_get(1)?,
                deadline_at: row.try_get(2)?,
            })
        })
        .collect()
}

/// What placing a batch starts from, in one round trip: the prices of
/// `item_ids`, and which of `keys` already placed an order.
pub async fn placement_state(
    conn: &mut PgConnection,
    item_ids: &[&str],
    keys: &[&str],
) -> Result<(HashMap<String, i64>, Vec<String>), sqlx::Error> {
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        r#"
        select 'price', item_id, price_cents from catalog where item_id = any($1)
        union all
        select 'key', idempotency_key, null from orders where idempotency_key = any($2)
        "#,
    )
    .bind(item_ids)
    .bind(keys)
    .fetch_all(conn)
    .await?;
    let mut prices = HashMap::new();
    let mut taken = Vec::new();
    for (kind, key, price) in rows {
        match (kind.as_str(), price) {
            ("price", Some(p)) => {
                prices.insert(key, p);
            }
            _ => taken.push(key),
        }
    }
    Ok((prices, taken))
}

/// Confirms the orders still PENDING and within their deadline, each with
/// its timeline (one statement); returns them. An order decided already,
/// past its deadline or unknown is left alone: a saga is decided exactly
/// once.
pub async fn confirm_orders(
    conn: &mut PgConnection,
    confirms: &[(Uuid, Json<&[StepRow]>)],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    let (ids, timelines): (Vec<Uuid>, Vec<&Json<&[StepRow]>>) =
        confirms.iter().map(|(id, t)| (*id, t)).unzip();
    sqlx::query_as(
        r#"
        update orders o
        set status = 'CONFIRMED', decided_at = clock_timestamp(), timeline = d.timeline
        from unnest($1::uuid[], $2::jsonb[]) as d(order_id, timeline)
        where o.order_id = d.order_id and o.status = 'PENDING' and o.deadline_at > clock_timestamp()
        returning o.*
        "#,
    )
    .bind(ids)
    .bind(timelines)
    .fetch_all(conn)
    .await
}

/// A failure to record: the order, its error and reason, its timeline.
pub struct Failure<'a> {
    pub order_id: Uuid,
    pub error: &'a str,
    pub reason: &'a str,
    pub timeline: Json<&'a [StepRow]>,
}

/// Fails the orders still PENDING, each with its error, reason and timeline
/// (one statement); returns them.
pub async fn fail_orders(
    conn: &mut PgConnection,
    failures: &[Failure<'_>],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    let n = failures.len();
    let (mut ids, mut errors, mut reasons, mut timelines) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for f in failures {
        ids.push(f.order_id);
        errors.push(f.error);
        reasons.push(f.reason);
        timelines.push(&f.timeline);
    }
    sqlx::query_as(
        r#"
        update orders o
        set status = 'FAILED', error = d.error, reason = d.reason,
            decided_at = clock_timestamp(), timeline = d.timeline
        from unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[])
            as d(order_id, error, reason, timeline)
        where o.order_id = d.order_id and o.status = 'PENDING'
        returning o.*
        "#,
    )
    .bind(ids)
    .bind(errors)
    .bind(reasons)
    .bind(timelines)
    .fetch_all(conn)
    .await
}

/// The orders `order_ids`, locked until the transaction ends (in one
/// global order).
pub async fn lock_orders(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {ORDER_COLUMNS} from orders where order_id = any($1) order by order_id for update"
    )))
    .bind(order_ids)
    .fetch_all(conn)
    .await
}

/// Locks the orders `order_ids` until the transaction ends, in the one
/// global order (sorted) every transaction locks orders in.
pub async fn lock_in_order(conn: &mut PgConnection, order_ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("select 1 from orders where order_id = any($1) order by order_id for update")
        .bind(order_ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// The orders among `order_ids` still PENDING, locked until the
/// transaction ends.
pub async fn lock_pending(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        select {ORDER_COLUMNS} from orders
        where order_id = any($1) and status = 'PENDING'
        order by order_id
        for update
        "#
    )))
    .bind(order_ids)
    .fetch_all(conn)
    .await
}

/// PENDING orders past their deadline, locked; rows another replica is
/// already failing are skipped.
pub async fn lock_overdue(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        r#"
        select {ORDER_COLUMNS} from orders
        where status = 'PENDING' and deadline_at <= clock_timestamp()
        order by deadline_at
        limit $1
        for update skip locked
        "#
    )))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The earliest deadline of a PENDING order, if any.
pub async fn next_deadline(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("select min(deadline_at) from orders where status = 'PENDING'")
        .fetch_one(conn)
        .await
}

/// One entry of the saga timeline.
#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StepRow {
    pub step: String,
    pub source: String,
    #[schema(required = true)]
    pub event_id: Option<Uuid>,
    #[schema(required = true)]
    pub detail: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

pub struct NewStep {
    pub order_id: Uuid,
    pub step: String,
    pub event_id: Option<Uuid>,
    pub source: String,
    pub detail: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// Appends timeline entries, in the given order (one statement); an event
/// already recorded for its order is skipped.
pub async fn record_steps(conn: &mut PgConnection, steps: &[NewStep]) -> Result<(), sqlx::Error> {
    if steps.is_empty() {
        return Ok(());
    }
    let n = steps.len();
    let (mut orders, mut names, mut events, mut sources, mut details, mut times) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in steps {
        orders.push(s.order_id);
        names.push(s.step.as_str());
        events.push(s.event_id);
        sources.push(s.source.as_str());
        details.push(s.detail.as_deref());
        times.push(s.occurred_at);
    }
    sqlx::query(
        r#"
        insert into saga_steps (order_id, step, event_id, source, detail, occurred_at)
        select o, s, e, src, d, t
        from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
            with ordinality as x(o, s, e, src, d, t, n)
        order by n
        on conflict do nothing
        "#,
    )
    .bind(orders)
    .bind(names)
    .bind(events)
    .bind(sources)
    .bind(details)
    .bind(times)
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

/// Sagas that now wait for an outside answer: marks each pending one with
/// what it waits for and moves its deadline to its long deadline (`longs`,
/// at most `cap` after its creation). Returns the ones changed, with their
/// new deadline (a duplicate, or a saga already decided, changes nothing).
pub async fn await_answers(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    longs: &[DateTime<Utc>],
    awaiting: &[&str],
    cap: std::time::Duration,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        update orders o
        set awaiting = x.awaiting,
            deadline_at = greatest(o.deadline_at,
                                   least(x.long_at, o.created_at + make_interval(secs => $4)))
        from unnest($1::uuid[], $2::timestamptz[], $3::text[]) as x(order_id, long_at, awaiting)
        where o.order_id = x.order_id and o.status = 'PENDING'
          -- Forward only, in the saga's order of waits (a late copy of an
          -- earlier wait never takes the saga back).
          and coalesce(array_position($5::text[], o.awaiting), 0)
            < coalesce(array_position($5::text[], x.awaiting), 0)
        returning o.*
        "#,
    )
    .bind(order_ids)
    .bind(longs)
    .bind(awaiting)
    .bind(cap.as_secs_f64())
    .bind(crate::domain::AWAITS_IN_ORDER)
    .fetch_all(conn)
    .await
}

/// Adds a reply target to an order placed earlier; false if it was already
/// there.
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
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query("update orders set extra_reply_targets = true where order_id = $1 and not extra_reply_targets")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(n == 1)
}

/// The reply targets added to these orders after they were placed.
pub async fn extra_reply_targets(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<(Uuid, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "select order_id, reply_to, correlation_id from reply_targets where order_id = any($1)",
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await
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

/// One saga in a search's list.
#[derive(Debug, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct SagaSummary {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub amount_cents: i64,
    #[schema(required = true)]
    pub error: Option<String>,
    #[schema(required = true)]
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    #[schema(required = true)]
    pub decided_at: Option<DateTime<Utc>>,
    /// From creation to decision (to now, while undecided), in ms.
    pub duration_ms: i64,
    /// Undecided past its deadline, or failed with a compensation not done.
    pub stuck: bool,
    /// What a long-running saga waits for (`payment_confirmation`), if it
    /// is one.
    #[schema(required = true)]
    pub awaiting: Option<String>,
    /// Why it is stuck: `undecided past its deadline`, `compensation not
    /// done: <kind>` or `invariant violated: <kind>` (the reconciler's
    /// findings).
    #[schema(required = true)]
    pub stuck_reason: Option<String>,
}

/// What `GET /sagas` asks for.
#[derive(Debug, Default)]
pub struct SagaSearch {
    pub status: Option<OrderStatus>,
    pub since: Option<DateTime<Utc>>,
    pub stuck_only: bool,
    pub limit: i64,
}

/// Recent sagas, newest first (order ids are UUIDv7, so the primary key
/// orders them by creation: no extra index on the hot path's table). Every
/// filter narrows a range of an index rather than filtering a walk of the
/// table: `since` becomes a lower bound on the key, `PENDING` reads the
/// timeout watcher's partial index (the few sagas in flight), stuck ones
/// come from two small sets.
pub async fn search_sagas(
    conn: &mut PgConnection,
    search: &SagaSearch,
) -> Result<Vec<SagaSummary>, sqlx::Error> {
    sqlx::query_as_with(
        sqlx::AssertSqlSafe(search_statement(search, "")),
        search_arguments(search)?,
    )
    .fetch_all(conn)
    .await
}

/// The plan PostgreSQL runs [`search_sagas`] with, executed (`EXPLAIN
/// ANALYZE`, JSON): for the tests that check what a search reads.
pub async fn explain_search(
    conn: &mut PgConnection,
    search: &SagaSearch,
) -> Result<serde_json::Value, sqlx::Error> {
    let plan: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar_with(
        sqlx::AssertSqlSafe(search_statement(search, "explain (analyze, format json) ")),
        search_arguments(search)?,
    )
    .fetch_one(conn)
    .await?;
    Ok(plan.0)
}

/// The values of [`search_statement`]'s `$1`…`$5`.
fn search_arguments(search: &SagaSearch) -> Result<sqlx::postgres::PgArguments, sqlx::Error> {
    use sqlx::Arguments as _;
    let mut args = sqlx::postgres::PgArguments::default();
    let added = args
        .add(search.status.map(OrderStatus::as_str))
        .and_then(|()| args.add(search.since))
        .and_then(|()| args.add(search.stuck_only))
        .and_then(|()| args.add(search.limit))
        .and_then(|()| args.add(lowest_id_since(search.since)));
    added.map_err(sqlx::Error::Encode)?;
    Ok(args)
}

/// The smallest UUIDv7 of an order created at `since` or later (a second
/// earlier, for clocks a little apart); the nil UUID without one.
fn lowest_id_since(since: Option<DateTime<Utc>>) -> Uuid {
    since.map_or(Uuid::nil(), |since| {
        let floor_ms =
            u128::try_from((since - chrono::Duration::seconds(1)).timestamp_millis()).unwrap_or(0);
        Uuid::from_u128(floor_ms.min((1 << 48) - 1) << 80)
    })
}

fn search_statement(search: &SagaSearch, prefix: &str) -> String {
    // Only PENDING orders are few: the others are found walking the key
    // down from the newest, which meets them soon enough.
    let pending_only = if search.status == Some(OrderStatus::Pending) {
        "and o.order_id in (select order_id from orders where status = 'PENDING')"
    } else {
        ""
    };
    format!(
        r#"{prefix}
        select o.order_id, o.customer_id, o.status, o.amount_cents, o.error, o.reason,
               o.created_at, o.deadline_at, o.decided_at, o.awaiting,
               (extract(epoch from coalesce(o.decided_at, now()) - o.created_at) * 1000)::bigint
                   as duration_ms,
               s.reason is not null as stuck,
               s.reason as stuck_reason
        from orders o
        left join lateral (
            select min(kind) as kind from saga_findings
            where order_id = o.order_id and resolved_at is null
        ) f on true
        cross join lateral (
            select case
                when o.status = 'PENDING' and o.deadline_at < now()
                    then 'undecided past its deadline'
                -- The reconciler found a promise not kept (a refund not
                -- done, say): the saga needs an operator or is catching up.
                when f.kind is not null and o.status = 'FAILED'
                    then 'compensation not done: ' || f.kind
                when f.kind is not null
                    then 'invariant violated: ' || f.kind
            end as reason
        ) s
        where o.order_id >= $5
          and ($1::text is null or o.status = $1)
          and ($2::timestamptz is null or o.created_at >= $2)
          {pending_only}
          and (not $3 or s.reason is not null)
          -- Stuck ones come from two small indexed sets, not a walk of
          -- every order.
          and (not $3 or o.order_id in (
                  select order_id from orders
                  where status = 'PENDING' and deadline_at < now()
                  union
                  select order_id from saga_findings where resolved_at is null))
        order by o.order_id desc
        limit $4
        "#
    )
}

// ----- The Saga Explorer's headline (`GET /sagas/stats`) -----

/// The sagas started in the last `window_minutes`: how many, how they
/// ended, and how long the decided ones took.
#[derive(Debug, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct SagaStats {
    pub window_minutes: i32,
    pub started: i64,
    pub confirmed: i64,
    pub failed: i64,
    pub pending: i64,
    /// Long-running sagas (waiting for an outside answer, e.g. 3-D Secure):
    /// still waiting, and decided. The percentiles leave them out.
    pub long_running_pending: i64,
    pub long_running_decided: i64,
    /// Failed sagas by their error (e.g. `"Payment failed"`).
    #[schema(value_type = std::collections::BTreeMap<String, i64>)]
    pub failed_by_reason: Json<std::collections::BTreeMap<String, i64>>,
    /// Median and 99th percentile of creation to decision, in ms (null
    /// when none was decided).
    #[schema(required = true)]
    pub p50_ms: Option<f64>,
    #[schema(required = true)]
    pub p99_ms: Option<f64>,
}

/// [`SagaStats`] of the sagas created in the last `minutes`, in one
/// statement. Order ids are UUIDv7: the window's lowest possible id (a
/// second early, for clock skew between the id and `created_at`) bounds a
/// range scan of the primary key.
pub async fn saga_stats(conn: &mut PgConnection, minutes: i32) -> Result<SagaStats, sqlx::Error> {
    let since = Utc::now() - chrono::Duration::minutes(i64::from(minutes));
    let lowest_id = lowest_id_since(Some(since));
    sqlx::query_as(
        r#"
        with recent as (
            select status, error, created_at, decided_at, awaiting is not null as long_running
            from orders
            where order_id >= $1 and created_at >= $2
        ),
        reasons as (
            select coalesce(error, 'unknown') as error, count(*) as n
            from recent where status = 'FAILED'
            group by 1
        )
        select $3::int4 as window_minutes,
               count(*) as started,
               count(*) filter (where status = 'CONFIRMED') as confirmed,
               count(*) filter (where status = 'FAILED') as failed,
               count(*) filter (where status = 'PENDING') as pending,
               count(*) filter (where long_running and status = 'PENDING')
                   as long_running_pending,
               count(*) filter (where long_running and status <> 'PENDING')
                   as long_running_decided,
               (select coalesce(jsonb_object_agg(error, n), '{}'::jsonb) from reasons)
                   as failed_by_reason,
               percentile_cont(0.5) within group (
                   order by (extract(epoch from decided_at - created_at) * 1000)::float8
               ) filter (where not long_running) as p50_ms,
               percentile_cont(0.99) within group (
                   order by (extract(epoch from decided_at - created_at) * 1000)::float8
               ) filter (where not long_running) as p99_ms
        from recent
        "#,
    )
    .bind(lowest_id)
    .bind(since)
    .bind(minutes)
    .fetch_one(conn)
    .await
}

// ----- the invariant reconciler -----

/// Takes a session-level advisory lock if free.
pub async fn try_advisory_lock(conn: &mut PgConnection, key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await
}

pub async fn advisory_unlock(conn: &mut PgConnection, key: i64) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// The sagas a reconciler pass checks.
pub struct ReconcileBatch {
    /// Decided sagas past the watermark, and sagas with open findings.
    pub sagas: Vec<(Uuid, OrderStatus)>,
    /// Where the watermark moves once they are checked.
    pub watermark: Option<Uuid>,
    /// How many of `sagas` are new (past the watermark).
    pub new_sagas: usize,
}

/// The next sagas decided more than `settled` ago, after the watermark, in
/// order-id order, up to the first one still undecided or decided more
/// recently (it waits there: the watcher decides it, its compensations are
/// on their way), plus every saga with an open finding.
pub async fn sagas_to_reconcile(
    conn: &mut PgConnection,
    settled: std::time::Duration,
    limit: i64,
) -> Result<ReconcileBatch, sqlx::Error> {
    let next: Vec<(Uuid, String, bool, bool)> = sqlx::query_as(
        r#"
        select order_id, status, awaiting is not null,
               coalesce(decided_at < now() - make_interval(secs => $1), false)
        from orders
        where order_id > coalesce((select last_order_id from reconciler_progress),
                                  '00000000-0000-0000-0000-000000000000')
          and created_at < now() - make_interval(secs => $1)
        order by order_id
        limit $2
        "#,
    )
    .bind(settled.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    // Up to the first saga still undecided (the watcher decides it), or
    // decided too recently for its compensations to be done; one that
    // waits under its long deadline is passed and checked once settled.
    let mut sagas: Vec<(Uuid, OrderStatus)> = Vec::new();
    let mut later: Vec<Uuid> = Vec::new();
    let mut watermark = None;
    for (id, status, waits, settled_down) in &next {
        match OrderStatus::parse(status).unwrap_or(OrderStatus::Pending) {
            OrderStatus::Pending if *waits => later.push(*id),
            OrderStatus::Pending => break,
            _ if !settled_down => break,
            decided => sagas.push((*id, decided)),
        }
        watermark = Some(*id);
    }
    if !later.is_empty() {
        sqlx::query("insert into reconcile_later select unnest($1::uuid[]) on conflict do nothing")
            .bind(&later)
            .execute(&mut *conn)
            .await?;
    }
    // How far the watermark moves (a full batch means more are waiting).
    let passed = sagas.len() + later.len();
    // Long-running sagas passed earlier, decided and settled since.
    let settled_later: Vec<(Uuid, String)> = sqlx::query_as(
        r#"
        select o.order_id, o.status from reconcile_later l join orders o using (order_id)
        where o.status <> 'PENDING' and o.decided_at < now() - make_interval(secs => $1)
        limit $2
        "#,
    )
    .bind(settled.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    for (id, status) in settled_later {
        sagas.push((
            id,
            OrderStatus::parse(&status).unwrap_or(OrderStatus::Pending),
        ));
    }
    let new_sagas = passed;
    // The open findings checked longest ago first, as many as new sagas at
    // most: every one is seen again within a few passes.
    let open: Vec<(Uuid, String)> = sqlx::query_as(
        r#"
        select o.order_id, o.status
        from (select order_id, min(checked_at) as checked_at from saga_findings
              where resolved_at is null group by order_id
              order by checked_at limit $1) f
        join orders o using (order_id)
        "#,
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    for (id, status) in open {
        if !sagas.iter().any(|(s, _)| *s == id) {
            sagas.push((
                id,
                OrderStatus::parse(&status).unwrap_or(OrderStatus::Pending),
            ));
        }
    }
    Ok(ReconcileBatch {
        sagas,
        watermark,
        new_sagas,
    })
}

/// What recording a pass's findings changed.
pub struct FindingsOutcome {
    /// Findings that were not open before: `(order_id, kind)`.
    pub new: Vec<(Uuid, String)>,
    pub resolved: usize,
}

/// Records the findings of the sagas `checked` (one statement each way):
/// opens (or reopens) what was found, resolves what was open, of the kinds
/// `judged` this time, and is not found any more.
pub async fn record_findings(
    conn: &mut PgConnection,
    checked: &[Uuid],
    judged: &[&str],
    found: &[(Uuid, crate::reconciler::Finding)],
) -> Result<FindingsOutcome, sqlx::Error> {
    let ids: Vec<Uuid> = found.iter().map(|(id, _)| *id).collect();
    let kinds: Vec<&str> = found.iter().map(|(_, f)| f.kind).collect();
    let details: Vec<&str> = found.iter().map(|(_, f)| f.detail.as_str()).collect();
    let new: Vec<(Uuid, String)> = sqlx::query_as(
        r#"
        with found as (
            select * from unnest($1::uuid[], $2::text[], $3::text[]) as x(order_id, kind, detail)
        ),
        before as (
            select f.order_id, f.kind from saga_findings f join found using (order_id, kind)
            where f.resolved_at is null
        ),
        upserted as (
            insert into saga_findings (order_id, kind, detail)
            select order_id, kind, detail from found
            on conflict (order_id, kind) do update
                set detail = excluded.detail, checked_at = now(), resolved_at = null,
                    found_at = case when saga_findings.resolved_at is null
                                    then saga_findings.found_at else now() end
            returning order_id, kind
        )
        select order_id, kind from upserted
        except
        select order_id, kind from before
        "#,
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&details)
    .fetch_all(&mut *conn)
    .await?;
    let resolved = sqlx::query(
        r#"
        update saga_findings f set resolved_at = now(), checked_at = now()
        where f.order_id = any($1) and f.resolved_at is null and f.kind = any($4)
          and not exists (
              select 1 from unnest($2::uuid[], $3::text[]) as x(order_id, kind)
              where x.order_id = f.order_id and x.kind = f.kind)
        "#,
    )
    .bind(checked)
    .bind(&ids)
    .bind(&kinds)
    .bind(judged)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(FindingsOutcome {
        new,
        resolved: resolved as usize,
    })
}

/// Deletes findings resolved longer than `retention` ago (a bounded
/// table, like the outbox and the inbox; open ones stay).
pub async fn prune_findings(
    conn: &mut PgConnection,
    retention: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        r#"
        delete from saga_findings where (order_id, kind) in (
            select order_id, kind from saga_findings
            where resolved_at < now() - make_interval(secs => $1)
            limit 1000
        )
        "#,
    )
    .bind(retention.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected())
}

/// Long-running sagas checked by every service: not checked again.
pub async fn forget_checked_later(
    conn: &mut PgConnection,
    checked: &[Uuid],
) -> Result<(), sqlx::Error> {
    sqlx::query("delete from reconcile_later where order_id = any($1)")
        .bind(checked)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn advance_reconciler(conn: &mut PgConnection, last: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into reconciler_progress (last_order_id) values ($1)
        on conflict (id) do update set last_order_id = greatest(reconciler_progress.last_order_id, excluded.last_order_id)
        "#,
    )
    .bind(last)
    .execute(conn)
    .await?;
    Ok(())
}

/// Open findings by kind.
pub async fn open_findings(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "select kind, count(*) from saga_findings where resolved_at is null group by kind",
    )
    .fetch_all(conn)
    .await
}

/// Undecided sagas by age: created under 1 s ago, older but not past the
/// deadline, past the deadline; and the long-running ones (waiting for an
/// outside answer) with the age of the oldest, in seconds (through the index
/// of pending deadlines).
pub async fn undecided_by_age(
    conn: &mut PgConnection,
) -> Result<(i64, i64, i64, i64, f64), sqlx::Error> {
    sqlx::query_as(
        r#"
        select count(*) filter (where created_at > now() - interval '1 second'),
               count(*) filter (where created_at <= now() - interval '1 second'
                                  and deadline_at > now()),
               count(*) filter (where deadline_at <= now()),
               count(*) filter (where awaiting is not null),
               coalesce(extract(epoch from now() - min(created_at)
                                filter (where awaiting is not null)), 0)::float8
        from orders where status = 'PENDING'
        "#,
    )
    .fetch_one(conn)
    .await
}

/// A reconciler finding, as `GET /sagas/violations` lists it.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct FindingRow {
    pub order_id: Uuid,
    pub kind: String,
    pub detail: String,
    pub found_at: DateTime<Utc>,
    pub checked_at: DateTime<Utc>,
    #[schema(required = true)]
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Findings, newest first: the open ones, or all (`resolved` too).
pub async fn findings(
    conn: &mut PgConnection,
    include_resolved: bool,
    limit: i64,
) -> Result<Vec<FindingRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        select order_id, kind, detail, found_at, checked_at, resolved_at from saga_findings
        where $1 or resolved_at is null
        order by found_at desc, order_id, kind
        limit $2
        "#,
    )
    .bind(include_resolved)
    .bind(limit)
    .fetch_all(conn)
    .await
}
