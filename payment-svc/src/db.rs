//! Every SQL statement of payment-svc. Functions take `&mut PgConnection` so
//! the caller decides the transaction; the hot path's are set-based (one
//! statement for a whole batch of orders).

use std::collections::HashMap;
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

/// Voids a waiting authorisation (nothing was charged) and forgets what it
/// would have published.
pub async fn void(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        update payments set status = 'voided', completion = null, updated_at = now()
        where order_id = $1 and status = 'action_required'
        "#,
    )
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
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

/// Inserts the order's payment record; false if the order already has one
/// (charged, declined, or a rollback tombstone).
pub async fn insert_payment(
    conn: &mut PgConnection,
    p: &NewPayment<'_>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        r#"
        insert into payments (order_id, customer_id, amount_cents, currency, status,
                              decline_code, reason, card_brand, card_last4)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        on conflict (order_id) do nothing
        "#,
    )
    .bind(p.order_id)
    .bind(p.customer_id)
    .bind(p.amount_cents)
    .bind(p.currency)
    .bind(p.status.as_str())
    .bind(p.decline_code)
    .bind(p.reason)
    .bind(p.card_brand)
    .bind(p.card_last4)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// What a batch of charges starts from, read in one round trip: the orders
/// that already have a payment record (their status), and the accounts of
/// `customer_ids` — opened with `default_balance` if new, locked in one
/// global order (sorted), so concurrent batches cannot deadlock.
pub struct ChargeState {
    pub existing: HashMap<Uuid, String>,
    pub accounts: HashMap<String, (i64, bool)>,
}

pub async fn charge_state(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    customer_ids: &[&str],
    default_balance: i64,
) -> Result<ChargeState, sqlx::Error> {
    // An account opened here is invisible to `locked` (one snapshot per
    // statement): it comes back through `opened`'s RETURNING instead.
    #[derive(sqlx::FromRow)]
    struct Row {
        kind: String,
        key: String,
        balance: Option<i64>,
        frozen: Option<bool>,
        status: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        r#"
        with opened as (
            insert into accounts (customer_id, balance_cents)
            select c, $3 from unnest($2::text[]) as t(c)
            on conflict (customer_id) do nothing
            returning customer_id, balance_cents, frozen
        ),
        locked as (
            select customer_id, balance_cents, frozen from accounts
            where customer_id = any($2)
            order by customer_id
            for update
        )
        select 'payment' as kind, order_id::text as key, null::bigint as balance,
               null::bool as frozen, status
        from payments where order_id = any($1)
        union all
        select 'account', customer_id, balance_cents, frozen, null from locked
        union all
        select 'account', customer_id, balance_cents, frozen, null from opened
        "#,
    )
    .bind(order_ids)
    .bind(customer_ids)
    .bind(default_balance)
    .fetch_all(&mut *conn)
    .await?;
    let mut state = ChargeState {
        existing: HashMap::new(),
        accounts: HashMap::new(),
    };
    for Row {
        kind,
        key,
        balance,
        frozen,
        status,
    } in rows
    {
        if kind == "payment" {
            if let (Ok(id), Some(status)) = (key.parse(), status) {
                state.existing.insert(id, status);
            }
        } else {
            state
                .accounts
                .insert(key, (balance.unwrap_or(0), frozen.unwrap_or(true)));
        }
    }
    // Opened by a concurrent batch that committed while this statement ran:
    // neither seen nor opened here. Lock it now.
    let missing: Vec<&str> = customer_ids
        .iter()
        .copied()
        .filter(|c| !state.accounts.contains_key(*c))
        .collect();
    if !missing.is_empty() {
        state.accounts.extend(lock_accounts(conn, &missing).await?);
    }
    Ok(state)
}

/// Records a batch's payments, debits every account by its charged total and
/// writes the batch's events, keeping only those of the orders that got a
/// record — one statement. Returns those orders (an order that already had
/// a record, e.g. a tombstone written since [`charge_state`], keeps it).
pub async fn record_charges(
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

/// Locks the accounts of `customer_ids`, in one global order (sorted), so
/// that concurrent batches cannot deadlock; returns (balance, frozen).
pub async fn lock_accounts(
    conn: &mut PgConnection,
    customer_ids: &[&str],
) -> Result<HashMap<String, (i64, bool)>, sqlx::Error> {
    let rows: Vec<(String, i64, bool)> = sqlx::query_as(
        r#"
        select customer_id, balance_cents, frozen from accounts
        where customer_id = any($1)
        order by customer_id
        for update
        "#,
    )
    .bind(customer_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(c, b, f)| (c, (b, f))).collect())
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

pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: PaymentStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("update payments set status = $2, updated_at = now() where order_id = $1")
        .bind(order_id)
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// What a debit or credit did.
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

/// Credits the account unless it is frozen.
pub async fn credit(
    conn: &mut PgConnection,
    customer_id: &str,
    amount: i64,
) -> Result<Posting, sqlx::Error> {
    let n = sqlx::query(
        r#"
        update accounts set balance_cents = balance_cents + $2, updated_at = now()
        where customer_id = $1 and not frozen
        "#,
    )
    .bind(customer_id)
    .bind(amount)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(if n == 1 {
        Posting::Done
    } else {
        Posting::Frozen
    })
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
