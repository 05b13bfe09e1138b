//! Every SQL statement of notification-svc; the hot path's are set-based
//! (one statement for a whole batch of orders).

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use common::messaging::outbox::{OutboxRows, insert_cte};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
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

/// An order's notification record, as a batch of confirmations sees it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub status: String,
    pub recipient: Option<String>,
}

/// What a batch of confirmations starts from, in one round trip: the
/// notification record of each order that has one, and the addresses on
/// file of `customer_ids`.
pub async fn confirmation_state(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    customer_ids: &[&str],
) -> Result<(HashMap<Uuid, Recorded>, HashMap<String, String>), sqlx::Error> {
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        r#"
        select 'notification', order_id::text, status, recipient
        from notifications where order_id = any($1)
        union all
        select 'customer', customer_id, email, null from customers where customer_id = any($2)
        "#,
    )
    .bind(order_ids)
    .bind(customer_ids)
    .fetch_all(conn)
    .await?;
    let (mut existing, mut emails) = (HashMap::new(), HashMap::new());
    for (kind, key, value, recipient) in rows {
        if kind == "notification" {
            if let Ok(id) = key.parse() {
                existing.insert(
                    id,
                    Recorded {
                        status: value,
                        recipient,
                    },
                );
            }
        } else {
            emails.insert(key, value);
        }
    }
    Ok((existing, emails))
}

/// Commits `records` (all `sending`) on a connection of their own, before
/// any email goes out; returns the orders that got one. Waits at most a
/// second for a concurrent transaction writing the same order (the batch
/// is then retried) rather than risk waiting on a batch that waits on ours.
pub async fn claim_sending(
    pool: &PgPool,
    records: &[NewNotification<'_>],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set local lock_timeout = '1s'")
        .execute(&mut *tx)
        .await?;
    let claimed = insert_notifications(&mut tx, records).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// Locks the records of `order_ids` that are still `sending` (a rollback
/// that got there first has retracted them); returns their orders.
pub async fn lock_sending(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "select order_id from notifications where order_id = any($1) and status = 'sending' \
         order by order_id for update",
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await
}

/// Records a batch's sent emails, marks `sent` the notifications claimed as
/// `sending` whose email went out (`delivered`) and `bounced` those whose
/// email the relay refused, and writes the batch's events — one statement.
pub async fn record_confirmations(
    conn: &mut PgConnection,
    emails: &[&Email],
    transport: &str,
    delivered: &[Uuid],
    refused: &[Uuid],
    events: OutboxRows<'_>,
) -> Result<(), sqlx::Error> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            r#"
            with recorded as (
                insert into emails (id, order_id, kind, recipient, subject, body, transport)
                select i, o, k, r, s, b, $7
                from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
                    as t(i, o, k, r, s, b)
                on conflict do nothing
            ),
            delivered as (
                update notifications set status = 'sent', updated_at = now()
                where order_id = any($8) and status = 'sending'
            ),
            refused as (
                update notifications set status = 'bounced', updated_at = now()
                where order_id = any($9)
            ),
            events as ({})
            select 1
            "#,
            insert_cte(10, None)
        )
    });
    let mut ids = Vec::with_capacity(emails.len());
    let mut orders = Vec::with_capacity(emails.len());
    let mut kinds = Vec::with_capacity(emails.len());
    let mut recipients = Vec::with_capacity(emails.len());
    let mut subjects = Vec::with_capacity(emails.len());
    let mut bodies = Vec::with_capacity(emails.len());
    for e in emails {
        ids.push(e.id);
        orders.push(e.order_id);
        kinds.push(e.kind.as_str());
        recipients.push(e.recipient.as_str());
        subjects.push(e.subject.as_str());
        bodies.push(e.body.as_str());
    }
    let query = sqlx::query(AssertSqlSafe(SQL.as_str()))
        .bind(ids)
        .bind(orders)
        .bind(kinds)
        .bind(recipients)
        .bind(subjects)
        .bind(bodies)
        .bind(transport)
        .bind(delivered)
        .bind(refused);
    events.bind(query).execute(conn).await?;
    Ok(())
}

/// A notification record to insert.
pub struct NewNotification<'a> {
    pub order_id: Uuid,
    pub customer_id: &'a str,
    pub recipient: Option<&'a str>,
    pub status: NotificationStatus,
    pub reason: Option<&'a str>,
}

/// Inserts notification records (one statement); returns the orders that
/// got one (an order that already has a record keeps it).
pub async fn insert_notifications(
    conn: &mut PgConnection,
    records: &[NewNotification<'_>],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut ids = Vec::with_capacity(records.len());
    let mut customers = Vec::with_capacity(records.len());
    let mut recipients = Vec::with_capacity(records.len());
    let mut statuses = Vec::with_capacity(records.len());
    let mut reasons = Vec::with_capacity(records.len());
    for r in records {
        ids.push(r.order_id);
        customers.push(r.customer_id);
        recipients.push(r.recipient);
        statuses.push(r.status.as_str());
        reasons.push(r.reason);
    }
    sqlx::query_scalar(
        r#"
        insert into notifications (order_id, customer_id, recipient, status, reason)
        select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
        on conflict (order_id) do nothing
        returning order_id
        "#,
    )
    .bind(ids)
    .bind(customers)
    .bind(recipients)
    .bind(statuses)
    .bind(reasons)
    .fetch_all(conn)
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

/// The notification's state for the saga's timeline.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NotificationSummary {
    pub status: String,
    pub updated_at: DateTime<Utc>,
}

impl NotificationSummary {
    pub fn status(&self) -> Option<NotificationStatus> {
        NotificationStatus::parse(&self.status)
    }
}

pub async fn notification_summary(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Option<NotificationSummary>, sqlx::Error> {
    sqlx::query_as("select status, updated_at from notifications where order_id = $1")
        .bind(order_id)
        .fetch_optional(conn)
        .await
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

/// An email sent (`GET /emails`); `kind` is `confirmation` or
/// `cancellation`, `transport` how it left (`smtp`, `log`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
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

// ----- confirmations queued while the mail relay is down -----

/// Queues the confirmations the relay could not take and marks their
/// notifications `deferred` (one statement each; none if empty).
pub async fn defer_emails(conn: &mut PgConnection, emails: &[Email]) -> Result<(), sqlx::Error> {
    if emails.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = emails.iter().map(|e| e.order_id).collect();
    let email_ids: Vec<Uuid> = emails.iter().map(|e| e.id).collect();
    let kinds: Vec<&str> = emails.iter().map(|e| e.kind.as_str()).collect();
    let recipients: Vec<&str> = emails.iter().map(|e| e.recipient.as_str()).collect();
    let subjects: Vec<&str> = emails.iter().map(|e| e.subject.as_str()).collect();
    let bodies: Vec<&str> = emails.iter().map(|e| e.body.as_str()).collect();
    sqlx::query(
        r#"
        insert into deferred_emails (order_id, email_id, kind, recipient, subject, body)
        select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
        on conflict (order_id) do nothing
        "#,
    )
    .bind(&ids)
    .bind(email_ids)
    .bind(kinds)
    .bind(recipients)
    .bind(subjects)
    .bind(bodies)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "update notifications set status = 'deferred', updated_at = now() where order_id = any($1)",
    )
    .bind(&ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queued confirmations due for another attempt, locked with their
/// notification (skipping any a rollback holds), oldest due first.
pub async fn due_emails(conn: &mut PgConnection, limit: i64) -> Result<Vec<Email>, sqlx::Error> {
    let rows: Vec<(Uuid, Uuid, String, String, String)> = sqlx::query_as(
        r#"
        select d.order_id, d.email_id, d.recipient, d.subject, d.body
        from deferred_emails d join notifications n using (order_id)
        where d.next_attempt_at <= now() and n.status = 'deferred'
        order by d.next_attempt_at
        limit $1
        for update of d, n skip locked
        "#,
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(order_id, id, recipient, subject, body)| Email {
            id,
            order_id,
            kind: crate::domain::EmailKind::Confirmation,
            recipient,
            subject,
            body,
        })
        .collect())
}

/// A queued confirmation went out (or was refused for good): off the queue,
/// its notification `sent` (or `bounced`).
pub async fn dequeue_email(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: NotificationStatus,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("delete from deferred_emails where order_id = $1")
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "update notifications set status = $2, reason = coalesce($3, reason), updated_at = now() where order_id = $1",
    )
    .bind(order_id)
    .bind(status.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Attempts so far of a queued confirmation.
pub async fn queued_attempts(conn: &mut PgConnection, order_id: Uuid) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select attempts from deferred_emails where order_id = $1")
        .bind(order_id)
        .fetch_one(conn)
        .await
}

/// A queued confirmation the relay still cannot take: tried again later.
pub async fn postpone_email(
    conn: &mut PgConnection,
    order_id: Uuid,
    delay: std::time::Duration,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        update deferred_emails
        set attempts = attempts + 1, last_error = $3,
            next_attempt_at = now() + make_interval(secs => $2)
        where order_id = $1
        "#,
    )
    .bind(order_id)
    .bind(delay.as_secs_f64())
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// A rollback drops a queued confirmation (it never went out).
pub async fn drop_queued_email(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("delete from deferred_emails where order_id = $1")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(())
}
