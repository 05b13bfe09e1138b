//! Every SQL statement of payment-svc. Functions take `&mut PgConnection` so
//! the caller decides the transaction; the hot path's are set-based (one
//! statement for a whole batch of orders).
//!
//! Deadlock prevention: every transaction takes its row locks in one global
//! order — the existing payment rows it changes (sorted by order), then the
//! accounts it debits or credits (sorted by customer), then the payment
//! records it creates (sorted by order). A batch takes the first two in one
//! statement ([`batch_state`]), the gateway's answer one row of each
//! ([`lock_payment`], then [`debit`]).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use common::messaging::envelope::TrailEntry;
use common::messaging::events::{PaymentCompleted, StepFailed};
use common::messaging::outbox::{OutboxRows, insert_cte};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgConnection, Row as _};
use uuid::Uuid;

use crate::domain::PaymentStatus;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PaymentRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub status: String,
    pub decline_code: Option<String>,
    pub reason: Option<String>,
    pub card_brand: Option<String>,
    pub card_last4: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Until when a 3-D Secure confirmation is accepted.
    pub action_deadline_at: Option<DateTime<Utc>>,
    /// What `payment.completed` carries once confirmed.
    #[serde(skip)]
    pub completion: Option<Json<PendingCompletion>>,
}

/// What a payment waiting for its confirmation keeps for it: the saga's
/// context and `payment.completed`'s payload (no card data).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PendingCompletion {
    pub causation_id: String,
    pub trail: Vec<TrailEntry>,
    pub data: PaymentCompleted,
    /// The last moment a confirmation is taken: the long deadline less the
    /// time the rest of the saga needs (its ordinary deadline), so that a
    /// confirmed payment can still be decided in time.
    #[serde(default)]
    pub confirm_by: Option<DateTime<Utc>>,
}

/// Keeps, for each payment that waits for its confirmation, until when it
/// is accepted and what it will publish (one statement; none if empty).
pub async fn await_confirmations(
    conn: &mut PgConnection,
    waiting: &[(Uuid, DateTime<Utc>, PendingCompletion)],
) -> Result<(), sqlx::Error> {
    if waiting.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = waiting.iter().map(|(id, _, _)| *id).collect();
    let deadlines: Vec<DateTime<Utc>> = waiting.iter().map(|(_, at, _)| *at).collect();
    let completions: Vec<Json<&PendingCompletion>> =
        waiting.iter().map(|(_, _, c)| Json(c)).collect();
    sqlx::query(
        r#"
        update payments p set action_deadline_at = x.deadline_at, completion = x.completion
        from unnest($1::uuid[], $2::timestamptz[], $3::jsonb[]) as x(order_id, deadline_at, completion)
        where p.order_id = x.order_id
        "#,
    )
    .bind(ids)
    .bind(deadlines)
    .bind(completions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the gateway's answer to a payment waiting for its confirmation:
/// charged (the account debited) or declined. Returns what happened.
pub async fn settle_confirmation(
    conn: &mut PgConnection,
    payment: &PaymentRow,
    answer: Result<(), &StepFailed>,
    default_balance: i64,
) -> Result<Result<(), StepFailed>, sqlx::Error> {
    let outcome = match answer {
        Err(failure) => Err(failure.clone()),
        Ok(()) => match debit(
            conn,
            &payment.customer_id,
            payment.amount_cents,
            default_balance,
        )
        .await?
        {
            Posting::Done => Ok(()),
            Posting::Insufficient => Err(crate::domain::insufficient_funds()),
            Posting::Frozen => Err(crate::domain::decline("account_frozen", "Account frozen")),
        },
    };
    let (status, code, reason) = match &outcome {
        Ok(()) => (PaymentStatus::Charged, None, None),
        Err(f) => (
            PaymentStatus::Declined,
            Some(f.code.as_str()),
            Some(f.reason.as_str()),
        ),
    };
    sqlx::query(
        r#"
        update payments set status = $2, decline_code = $3, reason = $4, completion = null,
                            updated_at = now()
        where order_id = $1
        "#,
    )
    .bind(payment.order_id)
    .bind(status.as_str())
    .bind(code)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(outcome)
}

impl PaymentRow {
    pub fn status(&self) -> Option<PaymentStatus> {
        PaymentStatus::parse(&self.status)
    }
}

/// A payment record to insert.
pub struct NewPayment<'a> {
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub amount_cents: i64,
    pub currency: &'a str,
    pub status: PaymentStatus,
    pub decline_code: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub card_brand: Option<&'a str>,
    pub card_last4: Option<&'a str>,
}

/// A payment a batch finds: its customer, amount and status.
pub struct Existing {
    pub customer_id: String,
    pub amount_cents: i64,
    pub status: String,
}

impl Existing {
    pub fn status(&self) -> Option<PaymentStatus> {
        PaymentStatus::parse(&self.status)
    }
}

/// What a batch starts from, read in one round trip: the payment of each of
/// `order_ids` that has one — those of `undoing` (orders rolled back)
/// locked — and the accounts of `customer_ids` and of the charged payments
/// to refund, opened with `default_balance` if new and locked. In the
/// global lock order: payment rows, then accounts, each sorted.
pub struct BatchState {
    pub existing: HashMap<Uuid, Existing>,
    /// (balance, frozen) per customer.
    pub accounts: HashMap<String, (i64, bool)>,
}

pub async fn batch_state(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    customer_ids: &[&str],
    undoing: &[Uuid],
    default_balance: i64,
) -> Result<BatchState, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        kind: String,
        key: String,
        customer_id: Option<String>,
        number: Option<i64>,
        status: Option<String>,
        frozen: Option<bool>,
    }
    // The accounts are locked by an upsert whose rows come sorted, and only
    // once `undoing` (which they read) has locked its rows: the order holds
    // within the statement. An existing account is "updated" to itself,
    // which locks it like `FOR UPDATE` and opens new ones in the same pass.
    let rows: Vec<Row> = sqlx::query_as(
        r#"
        with undoing as (
            select order_id, customer_id, amount_cents, status from payments
            where order_id = any($4)
            order by order_id
            for update
        ),
        existing as (
            select order_id, customer_id, amount_cents, status from payments
            where order_id = any($1) and order_id <> all($4)
            union all
            select order_id, customer_id, amount_cents, status from undoing
        ),
        locked as (
            insert into accounts (customer_id, balance_cents)
            select c, $3 from (
                select unnest($2::text[]) as c
                union
                select customer_id from undoing where status = 'charged'
            ) t
            order by c
            on conflict (customer_id) do update set frozen = accounts.frozen
            returning customer_id, balance_cents, frozen
        )
        select 'payment' as kind, order_id::text as key, customer_id, amount_cents as number,
               status, null::bool as frozen
        from existing
        union all
        select 'account', customer_id, null, balance_cents, null, frozen from locked
        "#,
    )
    .bind(order_ids)
    .bind(customer_ids)
    .bind(default_balance)
    .bind(undoing)
    .fetch_all(&mut *conn)
    .await?;
    let mut state = BatchState {
        existing: HashMap::new(),
        accounts: HashMap::new(),
    };
    for row in rows {
        if row.kind == "payment" {
            if let (Ok(id), Some(customer_id), Some(status)) =
                (row.key.parse(), row.customer_id, row.status)
            {
                state.existing.insert(
                    id,
                    Existing {
                        customer_id,
                        amount_cents: row.number.unwrap_or(0),
                        status,
                    },
                );
            }
        } else {
            state.accounts.insert(
                row.key,
                (row.number.unwrap_or(0), row.frozen.unwrap_or(true)),
            );
        }
    }
    Ok(state)
}

/// Records a batch's new payments (charges, declines, payments waiting for
/// their confirmation, and rollback tombstones; sorted by order), debits
/// every account by its charged total and writes the batch's events,
/// keeping only those of the orders that got a record — one statement.
/// Returns those orders (an order that already had a record, e.g. one
/// written by a concurrent batch since [`batch_state`], keeps it).
pub async fn record_payments(
    conn: &mut PgConnection,
    payments: &[NewPayment<'_>],
    events: OutboxRows<'_>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
            with pay as (
                insert into payments (order_id, customer_id, amount_cents, currency, status,
                                      decline_code, reason, card_brand, card_last4)
                select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                                     $6::text[], $7::text[], $8::text[], $9::text[])
                on conflict (order_id) do nothing
                returning order_id, customer_id, amount_cents, status
            ),
            debited as (
                update accounts a
                set balance_cents = a.balance_cents - d.total, updated_at = now()
                from (select customer_id, sum(amount_cents) as total from pay
                      where status = 'charged' group by customer_id) d
                where a.customer_id = d.customer_id
            ),
            events as ({})
            select order_id from pay
            "#,
            insert_cte(10, Some("select order_id from pay"))
        )
    });
    let n = payments.len();
    let (mut order_ids, mut customers, mut amounts, mut currencies, mut statuses) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut codes, mut reasons, mut brands, mut last4s) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for p in payments {
        order_ids.push(p.order_id);
        customers.push(p.customer_id);
        amounts.push(p.amount_cents);
        currencies.push(p.currency);
        statuses.push(p.status.as_str());
        codes.push(p.decline_code);
        reasons.push(p.reason);
        brands.push(p.card_brand);
        last4s.push(p.card_last4);
    }
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(order_ids)
        .bind(customers)
        .bind(amounts)
        .bind(currencies)
        .bind(statuses)
        .bind(codes)
        .bind(reasons)
        .bind(brands)
        .bind(last4s);
    let rows = events.bind(query).fetch_all(conn).await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// What [`undo_payments`] changed.
#[derive(Debug, Default)]
pub struct Undone {
    pub refunded: HashSet<Uuid>,
    pub voided: HashSet<Uuid>,
}

/// Rolls back payments locked by [`batch_state`]: refunds the charged ones
/// among `refunds` (their accounts, locked too, credited), voids the ones
/// among `voids` still waiting for their confirmation, and writes the
/// refunds' events — one statement.
pub async fn undo_payments(
    conn: &mut PgConnection,
    refunds: &[Uuid],
    voids: &[Uuid],
    events: OutboxRows<'_>,
) -> Result<Undone, sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
            with refunded as (
                update payments set status = 'refunded', updated_at = now()
                where order_id = any($1) and status = 'charged'
                returning order_id, customer_id, amount_cents
            ),
            voided as (
                update payments set status = 'voided', completion = null, updated_at = now()
                where order_id = any($2) and status = 'action_required'
                returning order_id
            ),
            credited as (
                update accounts a
                set balance_cents = a.balance_cents + d.total, updated_at = now()
                from (select customer_id, sum(amount_cents) as total from refunded
                      group by customer_id) d
                where a.customer_id = d.customer_id
            ),
            events as ({})
            select 'refunded' as kind, order_id from refunded
            union all
            select 'voided', order_id from voided
            "#,
            insert_cte(3, Some("select order_id from refunded"))
        )
    });
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(refunds)
        .bind(voids);
    let rows = events.bind(query).fetch_all(conn).await?;
    let mut undone = Undone::default();
    for row in rows {
        let kind: String = row.try_get(0)?;
        let id: Uuid = row.try_get(1)?;
        if kind == "refunded" {
            undone.refunded.insert(id);
        } else {
            undone.voided.insert(id);
        }
    }
    Ok(undone)
}

pub async fn lock_payment(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("select * from payments where order_id = $1 for update")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

pub async fn get_payment(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as("select * from payments where order_id = $1")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

/// What a debit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posting {
    Done,
    /// The balance does not cover the debit.
    Insufficient,
    /// The account is frozen (or missing).
    Frozen,
}

/// Debits an account (opened with `default_balance` if new), unless frozen
/// or short.
pub async fn debit(
    conn: &mut PgConnection,
    customer_id: &str,
    amount: i64,
    default_balance: i64,
) -> Result<Posting, sqlx::Error> {
    sqlx::query(
        "insert into accounts (customer_id, balance_cents) values ($1, $2) on conflict do nothing",
    )
    .bind(customer_id)
    .bind(default_balance)
    .execute(&mut *conn)
    .await?;
    let (balance, frozen): (i64, bool) = sqlx::query_as(
        "select balance_cents, frozen from accounts where customer_id = $1 for update",
    )
    .bind(customer_id)
    .fetch_one(&mut *conn)
    .await?;
    if frozen {
        return Ok(Posting::Frozen);
    }
    if balance < amount {
        return Ok(Posting::Insufficient);
    }
    sqlx::query(
        "update accounts set balance_cents = balance_cents - $2, updated_at = now() where customer_id = $1",
    )
    .bind(customer_id)
    .bind(amount)
    .execute(conn)
    .await?;
    Ok(Posting::Done)
}

/// A customer's account (`GET`/`PUT /accounts/{customer_id}`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AccountRow {
    pub customer_id: String,
    pub balance_cents: i64,
    pub frozen: bool,
}

pub async fn get_account(
    conn: &mut PgConnection,
    customer_id: &str,
) -> Result<Option<AccountRow>, sqlx::Error> {
    sqlx::query_as("select customer_id, balance_cents, frozen from accounts where customer_id = $1")
        .bind(customer_id)
        .fetch_optional(conn)
        .await
}

/// Sets the balance, and the frozen flag if given (new accounts: not frozen).
pub async fn put_account(
    conn: &mut PgConnection,
    customer_id: &str,
    balance: i64,
    frozen: Option<bool>,
) -> Result<AccountRow, sqlx::Error> {
    sqlx::query_as(
        r#"
        insert into accounts (customer_id, balance_cents, frozen) values ($1, $2, coalesce($3, false))
        on conflict (customer_id) do update
            set balance_cents = excluded.balance_cents,
                frozen = coalesce($3, accounts.frozen),
                updated_at = now()
        returning customer_id, balance_cents, frozen
        "#,
    )
    .bind(customer_id)
    .bind(balance)
    .bind(frozen)
    .fetch_one(conn)
    .await
}
