//! Every SQL statement of notification-svc.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{Email, NotificationStatus};

pub async fn get_customer_email(
    conn: &mut PgConnection,
    customer_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select email from customers where customer_id = $1")
        .bind(customer_id)
        .fetch_optional(conn)
        .await
}

pub async fn put_customer_email(
    conn: &mut PgConnection,
    customer_id: &str,
    email: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into customers (customer_id, email) values ($1, $2)
        on conflict (customer_id) do update set email = excluded.email, updated_at = now()
        "#,
    )
    .bind(customer_id)
    .bind(email)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the order's notification record; false if it already has one.
pub async fn insert_notification(
    conn: &mut PgConnection,
    order_id: Uuid,
    customer_id: &str,
    recipient: Option<&str>,
    status: NotificationStatus,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        r#"
        insert into notifications (order_id, customer_id, recipient, status, reason)
        values ($1, $2, $3, $4, $5)
        on conflict (order_id) do nothing
        "#,
    )
    .bind(order_id)
    .bind(customer_id)
    .bind(recipient)
    .bind(status.as_str())
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NotificationRow {
    pub order_id: Uuid,
    pub customer_id: String,
    pub recipient: Option<String>,
    pub status: String,
}

impl NotificationRow {
    pub fn status(&self) -> Option<NotificationStatus> {
        NotificationStatus::parse(&self.status)
    }
}

pub async fn lock_notification(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<NotificationRow>, sqlx::Error> {
    sqlx::query_as(
        "select order_id, customer_id, recipient, status from notifications where order_id = $1 for update",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await
}

pub async fn set_status(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: NotificationStatus,
) -> Result<(), sqlx::Error> {
    sqlx::query("update notifications set status = $2, updated_at = now() where order_id = $1")
        .bind(order_id)
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn record_email(
    conn: &mut PgConnection,
    email: &Email,
    transport: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        insert into emails (id, order_id, kind, recipient, subject, body, transport)
        values ($1, $2, $3, $4, $5, $6, $7)
        on conflict do nothing
        "#,
    )
    .bind(email.id)
    .bind(email.order_id)
    .bind(email.kind.as_str())
    .bind(&email.recipient)
    .bind(&email.subject)
    .bind(&email.body)
    .bind(transport)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EmailRow {
    pub id: Uuid,
    pub order_id: Uuid,
    pub kind: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub transport: String,
    pub sent_at: DateTime<Utc>,
}

pub async fn emails_for(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<EmailRow>, sqlx::Error> {
    sqlx::query_as("select * from emails where order_id = $1 order by sent_at, kind")
        .bind(order_id)
        .fetch_all(conn)
        .await
}
