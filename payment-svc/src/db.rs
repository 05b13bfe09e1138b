//! Every SQL statement of payment-svc.

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

/// Creates the account with the default balance unless it exists.
pub async fn ensure_account(
    conn: &mut PgConnection,
    customer_id: &str,
    default_balance: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into accounts (customer_id, balance_cents) values ($1, $2)
        on conflict (customer_id) do nothing
        "#,
    )
    .bind(customer_id)
    .bind(default_balance)
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

/// Debits the account if it is not frozen and the balance covers the amount.
/// One conditional statement: concurrent charges of one customer serialize
/// on the row and can never take the balance below zero.
pub async fn debit(
    conn: &mut PgConnection,
    customer_id: &str,
    amount: i64,
) -> Result<Posting, sqlx::Error> {
    let n = sqlx::query(
        r#"
        update accounts set balance_cents = balance_cents - $2, updated_at = now()
        where customer_id = $1 and balance_cents >= $2 and not frozen
        "#,
    )
    .bind(customer_id)
    .bind(amount)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 1 {
        return Ok(Posting::Done);
    }
    Ok(match get_account(conn, customer_id).await? {
        Some(a) if !a.frozen => Posting::Insufficient,
        _ => Posting::Frozen,
    })
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
