//! Transactional outbox: events are written in the handler's transaction and
//! published afterwards by the [`OutboxRelay`], with publisher confirms.
//!
//! Guarantees:
//! - nothing is published that was not committed (the relay only sees
//!   committed rows);
//! - nothing committed is lost (a row is marked published only after the
//!   broker confirmed it; a crash before that re-sends it, and the
//!   consumers' inboxes absorb the duplicate);
//! - several replicas can relay one database: each batch is claimed with
//!   `FOR UPDATE SKIP LOCKED`, so no row is sent by two relays at once.
//!
//! The relay holds its batch's row locks while it publishes. That keeps one
//! pool connection busy for the few milliseconds a pipelined batch takes to be
//! confirmed, and buys exclusive ownership without a lease column.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use crate::broker::{Broker, reconnect_backoff};
use crate::telemetry::metric;

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxMessage {
    /// AMQP `message_id`; also the primary key, so enqueueing the same id
    /// twice is a no-op.
    pub id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    /// AMQP `type`.
    pub message_type: String,
    pub correlation_id: Option<String>,
    pub payload: serde_json::Value,
    /// Saga events are mandatory (an unroutable one is an error and is
    /// retried); replies to a client's queue are not (the client may be gone).
    pub mandatory: bool,
    pub traceparent: Option<String>,
}

impl OutboxMessage {
    /// A direct reply to a client's `reply_to` queue, through the default exchange.
    pub fn reply(
        id: Uuid,
        reply_to: &str,
        correlation_id: &str,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            id,
            exchange: String::new(),
            routing_key: reply_to.to_owned(),
            message_type: "order.result".to_owned(),
            correlation_id: Some(correlation_id.to_owned()),
            payload,
            mandatory: false,
            traceparent: None,
        }
    }
}

/// Inserts messages into the outbox (in the caller's transaction). Ids
/// already present are skipped.
pub async fn enqueue(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(messages.len());
    let mut exchanges = Vec::with_capacity(messages.len());
    let mut keys = Vec::with_capacity(messages.len());
    let mut types = Vec::with_capacity(messages.len());
    let mut correlations = Vec::with_capacity(messages.len());
    let mut traces = Vec::with_capacity(messages.len());
    let mut mandatory = Vec::with_capacity(messages.len());
    let mut payloads = Vec::with_capacity(messages.len());
    for m in messages {
        ids.push(m.id);
        exchanges.push(m.exchange.as_str());
        keys.push(m.routing_key.as_str());
        types.push(m.message_type.as_str());
        correlations.push(m.correlation_id.as_deref());
        traces.push(m.traceparent.as_deref());
        mandatory.push(m.mandatory);
        payloads.push(&m.payload);
    }
    sqlx::query(
        r#"
        insert into outbox
            (id, exchange, routing_key, message_type, correlation_id, traceparent, mandatory, payload)
        select * from unnest(
            $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[], $8::jsonb[]
        )
        on conflict (id) do nothing
        "#,
    )
    .bind(ids)
    .bind(exchanges)
    .bind(keys)
    .bind(types)
    .bind(correlations)
    .bind(traces)
    .bind(mandatory)
    .bind(payloads)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    id: Uuid,
    exchange: String,
    routing_key: String,
    message_type: String,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    mandatory: bool,
    payload: serde_json::Value,
    created_at: DateTime<Utc>,
    attempts: i32,
}

/// What one relay pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayOutcome {
    /// This many rows were confirmed (and possibly some failed).
    Published(usize),
    /// Nothing was due.
    Idle,
}

/// Why a relay pass failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
}

/// The longest the relay waits for a batch's confirms (it holds the rows'
/// locks meanwhile) before it gives up on the connection.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the relay.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows claimed and published per pass.
    pub batch_size: i64,
    /// How often to look for rows when no notification arrives.
    pub poll_interval: Duration,
}

/// Publishes committed outbox rows to the broker.
pub struct OutboxRelay {
    service: &'static str,
    pool: PgPool,
    broker: Broker,
    settings: RelaySettings,
}

impl OutboxRelay {
    pub fn new(
        service: &'static str,
        pool: PgPool,
        broker: Broker,
        settings: RelaySettings,
    ) -> Self {
        Self {
            service,
            pool,
            broker,
            settings,
        }
    }

    /// Relays until `cancel` fires, then flushes what is due (if the broker
    /// is reachable) and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listen_stop = CancellationToken::new();
        let listener = {
            let wake = wake.clone();
            tokio::spawn(crate::pg_notify::listen(
                self.pool.clone(),
                &["outbox"],
                listen_stop.clone(),
                move |_| wake.notify_one(),
            ))
        };
        let mut db_backoff = reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));

        'connection: loop {
            let Some(conn) = self.broker.connection(&cancel).await else {
                break;
            };
            let channel = match Broker::confirm_channel(&conn).await {
                Ok(channel) => channel,
                Err(error) => {
                    warn!(service = self.service, %error, "relay could not open a channel");
                    self.broker.report_broken();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let flushing = cancel.is_cancelled();
                match self.relay_once(&channel).await {
                    Ok(RelayOutcome::Published(n)) if n as i64 >= self.settings.batch_size => {
                        db_backoff =
                            reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
                        continue;
                    }
                    Ok(_) => {
                        db_backoff =
                            reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
                        if flushing {
                            break 'connection;
                        }
                    }
                    Err(error @ (RelayError::Broker(_) | RelayError::ConfirmTimeout(_))) => {
                        warn!(service = self.service, %error, "relay lost the broker");
                        self.broker.report_broken();
                        if flushing {
                            break 'connection;
                        }
                        continue 'connection;
                    }
                    Err(RelayError::Db(error)) => {
                        warn!(service = self.service, %error, "relay database error");
                        if flushing {
                            break 'connection;
                        }
                        let delay = db_backoff.next().unwrap_or(Duration::from_secs(2));
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
                tokio::select! {
                    // One more pass after cancellation: the flush.
                    _ = cancel.cancelled() => {}
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
        listen_stop.cancel();
        let _ = listener.await;
    }

    /// Claims up to one batch of due rows, publishes them (pipelined) and
    /// marks the confirmed ones published, in one transaction.
    pub async fn relay_once(&self, channel: &Channel) -> Result<RelayOutcome, RelayError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PendingRow> = sqlx::query_as(
            r#"
            select id, exchange, routing_key, message_type, correlation_id, traceparent,
                   mandatory, payload, created_at, attempts
            from outbox
            where published_at is null
              and next_attempt_at <= now()
            order by seq
            limit $1
            for update skip locked
            "#,
        )
        .bind(self.settings.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(RelayOutcome::Idle);
        }

        let outcomes = tokio::time::timeout(CONFIRM_TIMEOUT, self.publish_batch(channel, &rows))
            .await
            .map_err(|_| RelayError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
        let mut published = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Ok(()) => published.push(row),
                Err(reason) => failed.push((row, reason)),
            }
        }
        let now = Utc::now();
        let ids: Vec<Uuid> = published.iter().map(|r| r.id).collect();
        sqlx::query("update outbox set published_at = now() where id = any($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        for (row, reason) in &failed {
            // Back off: 1 s, 2 s, 4 s ... capped at 5 minutes.
            let delay_s = 2f64.powi(row.attempts.min(8)).min(300.0);
            error!(service = self.service, id = %row.id, routing_key = %row.routing_key,
                   attempts = row.attempts + 1, %reason, "outbox row not accepted by the broker; will retry");
            sqlx::query(
                r#"
                update outbox
                set attempts = attempts + 1,
                    last_error = $2,
                    next_attempt_at = now() + make_interval(secs => $3)
                where id = $1
                "#,
            )
            .bind(row.id)
            .bind(reason)
            .bind(delay_s)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        metrics::counter!(metric::OUTBOX_PUBLISHED, "service" => self.service)
            .increment(published.len() as u64);
        if !failed.is_empty() {
            metrics::counter!(metric::OUTBOX_PUBLISH_FAILURES, "service" => self.service)
                .increment(failed.len() as u64);
        }
        metrics::histogram!(metric::OUTBOX_BATCH_ROWS, "service" => self.service)
            .record(rows.len() as f64);
        let lag = metrics::histogram!(metric::OUTBOX_LAG_SECONDS, "service" => self.service);
        for row in &published {
            lag.record((now - row.created_at).as_seconds_f64().max(0.0));
        }
        debug!(
            service = self.service,
            published = published.len(),
            failed = failed.len(),
            "relay pass"
        );
        Ok(RelayOutcome::Published(published.len()))
    }
}

impl OutboxRelay {
    /// Publishes every row (pipelined: all publishes first, then the
    /// confirms); per row, `Ok` or why the broker did not take it.
    async fn publish_batch(
        &self,
        channel: &Channel,
        rows: &[PendingRow],
    ) -> Result<Vec<Result<(), String>>, RelayError> {
        let mut confirms = Vec::with_capacity(rows.len());
        for row in rows {
            let body = serde_json::to_vec(&row.payload).unwrap_or_default();
            let confirm = channel
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: row.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties(self.service, row),
                )
                .await?;
            confirms.push(confirm);
        }
        let mut outcomes = Vec::with_capacity(rows.len());
        for (row, confirm) in rows.iter().zip(confirms) {
            outcomes.push(match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                Confirmation::Ack(Some(returned)) if row.mandatory => {
                    Err(format!("unroutable: {}", returned.reply_text))
                }
                // A non-mandatory message with no route (a client's reply
                // queue that is gone) is done: nobody is waiting for it.
                Confirmation::Ack(Some(_)) => Ok(()),
                Confirmation::Nack(_) => Err("nacked by the broker".to_owned()),
            });
        }
        Ok(outcomes)
    }
}

fn properties(service: &str, row: &PendingRow) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_message_id(row.id.to_string().into())
        .with_type(row.message_type.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_app_id(service.into())
        .with_timestamp(row.created_at.timestamp().max(0) as u64);
    if let Some(c) = &row.correlation_id {
        props = props.with_correlation_id(c.as_str().into());
    }
    if let Some(tp) = &row.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
        props = props.with_headers(headers);
    }
    props
}
