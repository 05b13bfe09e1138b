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

/// An order's notification record, locked.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Locked {
    pub order_id: Uuid,
    pub status: String,
    pub recipient: Option<String>,
    pub relay_may_have_it: bool,
}

impl Locked {
    pub fn status(&self) -> Option<NotificationStatus> {
        NotificationStatus::parse(&self.status)
    }
}

/// Locks the notification records of `order_ids` in one global order
/// (sorted), so that batches and the queued sender cannot deadlock.
pub async fn lock_notifications(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, Locked>, sqlx::Error> {
    if order_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<Locked> = sqlx::query_as(
        "select order_id, status, recipient, relay_may_have_it from notifications \
         where order_id = any($1) order by order_id for update",
    )
    .bind(order_ids)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.order_id, r)).collect())
}

/// Records a batch's sent emails, marks `sent` the notifications claimed as
/// `sending` whose email went out (`delivered`) and `bounced` those whose
/// email the relay refused (`refused`; of those, `refused_for_sure` were
/// never tried before, so the relay has nothing of them), and writes the
/// batch's events — one statement.
pub async fn record_confirmations(
    conn: &mut PgConnection,
    emails: &[&Email],
    transport: &str,
    delivered: &[Uuid],
    refused: &[Uuid],
    refused_for_sure: &[Uuid],
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
                update notifications
                set status = 'bounced', updated_at = now(),
                    relay_may_have_it = relay_may_have_it and not (order_id = any($10))
                where order_id = any($9) and status = 'sending'
            ),
            events as ({})
            select 1
            "#,
            insert_cte(11, None)
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
        .bind(refused)
        .bind(refused_for_sure);
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
    /// A confirmation is about to be handed to the relay.
    pub relay_may_have_it: bool,
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
    let mut relay = Vec::with_capacity(records.len());
    let mut sorted: Vec<&NewNotification<'_>> = records.iter().collect();
    // One global order for new keys too (see `lock_notifications`).
    sorted.sort_by_key(|r| r.order_id);
    for r in sorted {
        ids.push(r.order_id);
        customers.push(r.customer_id);
        recipients.push(r.recipient);
        statuses.push(r.status.as_str());
        reasons.push(r.reason);
        relay.push(r.relay_may_have_it);
    }
    sqlx::query_scalar(
        r#"
        insert into notifications (order_id, customer_id, recipient, status, reason,
                                   relay_may_have_it)
        select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::bool[])
        on conflict (order_id) do nothing
        returning order_id
        "#,
    )
    .bind(ids)
    .bind(customers)
    .bind(recipients)
    .bind(statuses)
    .bind(reasons)
    .bind(relay)
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
/// notifications `deferred` (those still `sending`: one a rollback retracted
/// meanwhile stays retracted); `uncertain` ones may have been taken by the
/// relay all the same, `untried` ones were claimed by this batch and never
/// taken (no earlier attempt either). One statement; none if empty.
pub async fn defer_emails(
    conn: &mut PgConnection,
    emails: &[Email],
    uncertain: &[Uuid],
    untried: &[Uuid],
) -> Result<(), sqlx::Error> {
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
        with deferred as (
            update notifications
            set status = 'deferred', updated_at = now(),
                relay_may_have_it = case when order_id = any($8) then false
                                         else relay_may_have_it or order_id = any($7) end
            where order_id = any($1) and status in ('sending', 'deferred')
            returning order_id
        )
        insert into deferred_emails (order_id, email_id, kind, recipient, subject, body)
        select q.* from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                               $6::text[]) as q(order_id, email_id, kind, recipient, subject, body)
        where q.order_id in (select order_id from deferred)
        on conflict (order_id) do nothing
        "#,
    )
    .bind(&ids)
    .bind(email_ids)
    .bind(kinds)
    .bind(recipients)
    .bind(subjects)
    .bind(bodies)
    .bind(uncertain)
    .bind(untried)
    .execute(conn)
    .await?;
    Ok(())
}

/// What a rollback does to the notification records it locked (see
/// [`lock_notifications`]), in one statement.
pub struct Rollbacks<'a> {
    /// Records whose status changes (retracted, or cancelled before any email).
    pub statuses: &'a [(Uuid, NotificationStatus)],
    /// Orders whose queued confirmation is dropped (it never went out, or
    /// a cancellation takes its place in the queue).
    pub drop_queued: &'a [Uuid],
    /// Cancellations handed to the queued sender (an external relay: no
    /// call to it inside a batch), each due once its confirmation, if one
    /// is being handed to the relay right now, is done: no sooner than the
    /// given delay, nor than a queued confirmation's lease.
    pub queue: &'a [(&'a Email, std::time::Duration)],
    /// Cancellations sent already (a transport that only records them).
    pub sent: &'a [&'a Email],
    pub transport: &'a str,
}

pub async fn roll_back(conn: &mut PgConnection, r: &Rollbacks<'_>) -> Result<(), sqlx::Error> {
    let (ids, statuses): (Vec<Uuid>, Vec<&str>) =
        r.statuses.iter().map(|(id, s)| (*id, s.as_str())).unzip();
    let columns = |emails: &[&Email]| {
        let mut c = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for e in emails {
            c.0.push(e.order_id);
            c.1.push(e.id);
            c.2.push(e.kind.as_str().to_owned());
            c.3.push(e.recipient.clone());
            c.4.push(e.subject.clone());
            c.5.push(e.body.clone());
        }
        c
    };
    let queued: Vec<&Email> = r.queue.iter().map(|(e, _)| *e).collect();
    let delays: Vec<f64> = r.queue.iter().map(|(_, d)| d.as_secs_f64()).collect();
    let q = columns(&queued);
    let sent = columns(r.sent);
    sqlx::query(
        r#"
        with dropped as (
            delete from deferred_emails
            where order_id = any($3) and order_id <> all($4)
        ),
        changed as (
            update notifications n set status = s.status, updated_at = now()
            from unnest($1::uuid[], $2::text[]) as s(order_id, status)
            where n.order_id = s.order_id
        ),
        queue as (
            select * from unnest($4::uuid[], $5::uuid[], $6::text[], $7::text[], $8::text[],
                                 $9::text[], $17::float8[])
                as q(order_id, email_id, kind, recipient, subject, body, after_secs)
        ),
        replaced as (
            -- A queued confirmation becomes its cancellation, due once the
            -- confirmation, if it is being handed to the relay, is done.
            update deferred_emails d
            set email_id = q.email_id, kind = q.kind, recipient = q.recipient,
                subject = q.subject, body = q.body, attempts = 0, last_error = null,
                -- The statement's own clock, not the transaction's start:
                -- the batch's sends may have taken seconds before it.
                next_attempt_at = greatest(clock_timestamp() + make_interval(secs => q.after_secs),
                                           d.in_flight_until)
            from queue q
            where d.order_id = q.order_id
        ),
        queued as (
            insert into deferred_emails (order_id, email_id, kind, recipient, subject, body,
                                         next_attempt_at)
            select q.order_id, q.email_id, q.kind, q.recipient, q.subject, q.body,
                   clock_timestamp() + make_interval(secs => q.after_secs)
            from queue q
            where not exists (select 1 from deferred_emails d where d.order_id = q.order_id)
            on conflict (order_id) do nothing
        )
        insert into emails (id, order_id, kind, recipient, subject, body, transport)
        select e.id, e.order_id, e.kind, e.recipient, e.subject, e.body, $16
        from unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::text[], $15::text[])
            as e(order_id, id, kind, recipient, subject, body)
        on conflict do nothing
        "#,
    )
    .bind(ids)
    .bind(statuses)
    .bind(r.drop_queued)
    .bind(q.0)
    .bind(q.1)
    .bind(q.2)
    .bind(q.3)
    .bind(q.4)
    .bind(q.5)
    .bind(sent.0)
    .bind(sent.1)
    .bind(sent.2)
    .bind(sent.3)
    .bind(sent.4)
    .bind(sent.5)
    .bind(r.transport)
    .bind(delays)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether the order's notification is still `sending` (not retracted by a
/// rollback meanwhile): read just before an email goes to the relay.
pub async fn still_sending(conn: &mut PgConnection, order_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select status = 'sending' from notifications where order_id = $1")
        .bind(order_id)
        .fetch_optional(conn)
        .await
        .map(|s| s.unwrap_or(false))
}

/// A queued email handed to the relay, for [`settle_queued`].
#[derive(Debug, Clone)]
pub struct Leased {
    pub email: Email,
    /// Attempts before this one.
    pub attempts: i32,
    /// The relay may have had the confirmation before this attempt.
    pub may_have_had_it: bool,
}

/// Takes the queued email due first (skipping any a rollback holds) for
/// `lease`: it is not taken again before the lease ends, unless settled.
/// A confirmation is marked as one the relay may have from now on. Commits
/// at once: nothing is locked while the relay is being talked to.
pub async fn lease_due(
    pool: &PgPool,
    lease: std::time::Duration,
) -> Result<Option<Leased>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Uuid, String, String, String, String, i32)> = sqlx::query_as(
        r#"
        select d.order_id, d.email_id, d.kind, d.recipient, d.subject, d.body, d.attempts
        from deferred_emails d join notifications n using (order_id)
        where d.next_attempt_at <= now()
          and (d.kind = 'cancellation' or n.status = 'deferred')
        order by d.next_attempt_at
        limit 1
        for update of d, n skip locked
        "#,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((order_id, id, kind, recipient, subject, body, attempts)) = row else {
        return Ok(None);
    };
    let kind = if kind == crate::domain::EmailKind::Cancellation.as_str() {
        crate::domain::EmailKind::Cancellation
    } else {
        crate::domain::EmailKind::Confirmation
    };
    let may_have_had_it: bool = sqlx::query_scalar(
        r#"
        with leased as (
            update deferred_emails
            set attempts = attempts + 1,
                in_flight_until = now() + make_interval(secs => $2),
                next_attempt_at = now() + make_interval(secs => $2)
            where order_id = $1
        ),
        before as (
            select relay_may_have_it from notifications where order_id = $1
        ),
        flagged as (
            update notifications set relay_may_have_it = true
            where order_id = $1 and $3
        )
        select coalesce((select relay_may_have_it from before), false)
        "#,
    )
    .bind(order_id)
    .bind(lease.as_secs_f64())
    .bind(kind == crate::domain::EmailKind::Confirmation)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Leased {
        email: Email {
            id,
            order_id,
            kind,
            recipient,
            subject,
            body,
        },
        attempts,
        may_have_had_it,
    }))
}

/// What the relay said about a leased email.
#[derive(Debug, Clone)]
pub enum QueuedOutcome<'a> {
    Sent,
    /// Refused for good.
    Rejected(&'a str),
    /// Try again after this long; `taken` is false if the relay certainly
    /// did not take it (then a confirmation is as unknown to the relay as
    /// before this attempt).
    Later {
        after: std::time::Duration,
        error: &'a str,
        taken: bool,
    },
}

/// Records what became of a leased email: sent (off the queue, recorded; a
/// confirmation's notification `sent`, unless a rollback retracted it
/// meanwhile), refused for good (off the queue; a confirmation `bounced`),
/// or to be tried again later. A queued email a rollback replaced or
/// dropped meanwhile stays as the rollback left it.
pub async fn settle_queued(
    pool: &PgPool,
    leased: &Leased,
    outcome: QueuedOutcome<'_>,
    transport: &str,
) -> Result<(), sqlx::Error> {
    let email = &leased.email;
    let confirmation = email.kind == crate::domain::EmailKind::Confirmation;
    let mut tx = pool.begin().await?;
    // The notification first, then its queued email: the order a rollback
    // locks them in.
    sqlx::query("select 1 from notifications where order_id = $1 for update")
        .bind(email.order_id)
        .execute(&mut *tx)
        .await?;
    let still_queued: bool = sqlx::query_scalar(
        "select exists (select 1 from deferred_emails where order_id = $1 and email_id = $2 \
         for update)",
    )
    .bind(email.order_id)
    .bind(email.id)
    .fetch_one(&mut *tx)
    .await?;
    match outcome {
        QueuedOutcome::Sent => {
            record_email(&mut tx, email, transport).await?;
            if still_queued {
                sqlx::query("delete from deferred_emails where order_id = $1")
                    .bind(email.order_id)
                    .execute(&mut *tx)
                    .await?;
                if confirmation {
                    sqlx::query(
                        "update notifications set status = 'sent', updated_at = now() \
                         where order_id = $1 and status = 'deferred'",
                    )
                    .bind(email.order_id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        QueuedOutcome::Rejected(reason) if still_queued => {
            sqlx::query("delete from deferred_emails where order_id = $1")
                .bind(email.order_id)
                .execute(&mut *tx)
                .await?;
            if confirmation {
                sqlx::query(
                    "update notifications set status = 'bounced', updated_at = now(), \
                     reason = $2 where order_id = $1 and status = 'deferred'",
                )
                .bind(email.order_id)
                .bind(format!("Email rejected: {reason}"))
                .execute(&mut *tx)
                .await?;
            }
        }
        QueuedOutcome::Later {
            after,
            error,
            taken,
        } if still_queued => {
            sqlx::query(
                r#"
                update deferred_emails
                set in_flight_until = null, last_error = $3,
                    next_attempt_at = now() + make_interval(secs => $2)
                where order_id = $1
                "#,
            )
            .bind(email.order_id)
            .bind(after.as_secs_f64())
            .bind(error)
            .execute(&mut *tx)
            .await?;
            if confirmation && !taken && !leased.may_have_had_it {
                sqlx::query(
                    "update notifications set relay_may_have_it = false \
                     where order_id = $1 and status = 'deferred'",
                )
                .bind(email.order_id)
                .execute(&mut *tx)
                .await?;
            }
        }
        _ => {}
    }
    tx.commit().await
}
