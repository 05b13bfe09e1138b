//! Escalations: compensations that kept failing.
//!
//! A compensation (refund, stock release, cancellation email) must not be
//! given up on, and must not be parked silently either. When its retries are
//! exhausted the consumer records it here — the saga, the step, the last
//! error and the message itself — logs it at error level and counts it in
//! `compensations_escalated_total`. Once the cause is fixed, an operator
//! retries it (`POST /admin/escalations/{id}/retry`): the stored message is
//! re-published to the service's queue with a fresh set of attempts, and the
//! escalation is marked resolved when it succeeds. The inbox and the per-order
//! state machines make a compensation idempotent, so retrying twice, or
//! retrying one that already went through, never applies it twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::messaging::delivery::Incoming;
use crate::messaging::envelope::Envelope;
use crate::metric_definitions as metric;

/// An escalated compensation (`GET /admin/escalations`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EscalationRow {
    pub id: Uuid,
    pub message_id: Uuid,
    #[schema(required = true)]
    pub order_id: Option<Uuid>,
    pub step: String,
    pub routing_key: String,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub attempts: i32,
    pub last_error: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[schema(required = true)]
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Records a compensation whose retries are exhausted (again, if it was
/// retried before: the attempts add up and the escalation reopens).
pub async fn record(
    pool: &PgPool,
    service: &'static str,
    step: &'static str,
    msg: &Incoming,
    error: &str,
) -> Result<Uuid, sqlx::Error> {
    let env = Envelope::decode(&msg.body).ok();
    let message_id = env
        .as_ref()
        .map(|e| e.event_id)
        .or_else(|| msg.message_id.as_deref().and_then(|m| m.parse().ok()))
        .unwrap_or_else(Uuid::now_v7);
    let id: Uuid = sqlx::query_scalar(
        r#"
        insert into escalations (id, message_id, order_id, step, routing_key, body, attempts, last_error, status)
        values ($1, $2, $3, $4, $5, $6, $7, $8, 'open')
        on conflict (message_id) do update
            -- After an operator's retry the attempts add up; the same
            -- attempt recorded twice (its ack was lost) counts once.
            set attempts = case when escalations.status = 'retrying'
                                then escalations.attempts + excluded.attempts
                                else greatest(escalations.attempts, excluded.attempts) end,
                last_error = excluded.last_error,
                status = 'open',
                updated_at = now()
        returning id
        "#,
    )
    .bind(Uuid::now_v7())
    .bind(message_id)
    .bind(env.as_ref().map(|e| e.order_id))
    .bind(step)
    .bind(&msg.routing_key)
    .bind(&msg.body)
    .bind(msg.attempt as i32)
    .bind(error)
    .fetch_one(pool)
    .await?;
    metrics::counter!(metric::COMPENSATIONS_ESCALATED, "service" => service, "step" => step)
        .increment(1);
    metric::step_escalated(service, step);
    tracing::error!(
        escalation_id = %id,
        order_id = ?env.as_ref().map(|e| e.order_id),
        step,
        attempts = msg.attempt,
        %error,
        "compensation escalated: it kept failing; fix the cause, then POST /admin/escalations/{id}/retry"
    );
    Ok(id)
}

/// Marks an escalation resolved (its retried message went through).
pub async fn resolve(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"
        update escalations set status = 'resolved', resolved_at = now(), updated_at = now()
        where id = $1 and status <> 'resolved'
        "#,
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn list(pool: &PgPool, status: Option<&str>) -> Result<Vec<EscalationRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        select * from escalations
        where $1::text is null or status = $1
        order by created_at
        limit 1000
        "#,
    )
    .bind(status)
    .fetch_all(pool)
    .await
}

/// One saga's escalations, oldest first.
pub async fn for_order(
    conn: &mut sqlx::PgConnection,
    order_id: Uuid,
) -> Result<Vec<EscalationRow>, sqlx::Error> {
    // Without the stored message (the step needs none of it).
    sqlx::query_as(
        r#"
        select id, message_id, order_id, step, routing_key, ''::bytea as body, attempts,
               last_error, status, created_at, updated_at, resolved_at
        from escalations where order_id = $1 order by created_at
        "#,
    )
    .bind(order_id)
    .fetch_all(conn)
    .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<EscalationRow>, sqlx::Error> {
    sqlx::query_as("select * from escalations where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Marks an escalation as being retried; `None` if unknown.
pub async fn begin_retry(pool: &PgPool, id: Uuid) -> Result<Option<EscalationRow>, sqlx::Error> {
    sqlx::query_as(
        r#"
        update escalations set status = 'retrying', updated_at = now()
        where id = $1 and status <> 'resolved'
        returning *
        "#,
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Puts an escalation whose retry could not be started back to `open`.
pub async fn reopen(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update escalations set status = 'open', updated_at = now() where id = $1 and status = 'retrying'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}
