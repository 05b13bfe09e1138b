//! Every SQL statement of payment-svc. Functions take `&mut PgConnection` so
//! the caller decides the transaction; the hot path's are set-based (one
//! statement for a whole batch of orders).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
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

/// The payment status of each order that already has a record.
pub async fn existing_payments(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, String>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("select order_id, status from payments where order_id = any($1)")
            .bind(order_ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Inserts payment records (one statement); returns the orders that got
/// one (an order that already has a record keeps it).
pub async fn insert_payments(
    conn: &mut PgConnection,
    payments: &[NewPayment<'_>],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut order_ids = Vec::with_capacity(payments.len());
    let mut customers = Vec::with_capacity(payments.len());
    let mut amounts = Vec::with_capacity(payments.len());
    let mut currencies = Vec::with_capacity(payments.len());
    let mut statuses = Vec::with_capacity(payments.len());
    let mut codes = Vec::with_capacity(payments.len());
    let mut reasons = Vec::with_capacity(payments.len());
    let mut brands = Vec::with_capacity(payments.len());
    let mut last4s = Vec::with_capacity(payments.len());
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
    sqlx::query_scalar(
        r#"
        insert into payments (order_id, customer_id, amount_cents, currency, status,
                              decline_code, reason, card_brand, card_last4)
        select * from unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[])
        on conflict (order_id) do nothing
        returning order_id
        "#,
    )
    .bind(order_ids)
    .bind(customers)
    .bind(amounts)
    .bind(currencies)
    .bind(statuses)
    .bind(codes)
    .bind(reasons)
    .bind(brands)
    .bind(last4s)
    .fetch_all(conn)
    .await
}

/// Opens the accounts of customers the ledger has not seen, with
/// `default_balance` (one statement; existing accounts are untouched).
pub async fn open_missing_accounts(
    conn: &mut PgConnection,
    customer_ids: &[&str],
    default_balance: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into accounts (customer_id, balance_cents)
        select c, $2 from unnest($1::text[]) as t(c)
        on conflict (customer_id) do nothing
        "#,
    )
    .bind(customer_ids)
    .bind(default_balance)
    .execute(conn)
    .await?;
    Ok(())
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

/// Subtracts each customer's total from their balance, for accounts locked
/// by [`lock_accounts`] (one statement; the check constraint keeps every
/// balance non-negative).
pub async fn debit_accounts(
    conn: &mut PgConnection,
    debits: &HashMap<&str, i64>,
) -> Result<(), sqlx::Error> {
    let (customers, amounts): (Vec<&str>, Vec<i64>) = debits.iter().map(|(c, a)| (*c, *a)).unzip();
    sqlx::query(
        r#"
        update accounts a
        set balance_cents = a.balance_cents - d.amount, updated_at = now()
        from unnest($1::text[], $2::bigint[]) as d(customer_id, amount)
        where a.customer_id = d.customer_id
        "#,
    )
    .bind(customers)
    .bind(amounts)
    .execute(conn)
    .await?;
    Ok(())
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

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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
