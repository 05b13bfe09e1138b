//! Transactional outbox: the events a transaction causes are written in that
//! transaction, so nothing is published that was not committed and nothing
//! committed is lost.
//!
//! Getting them to the broker has two paths:
//! - the **fast path** ([`crate::messaging::publisher`]): right after the
//!   commit, the committing task hands its events to the publisher, which
//!   sends them pipelined on a confirm channel; each confirmed id is handed to
//!   the [`Janitor`], which deletes the rows in batches;
//! - the **sweeper** ([`Sweeper`]): every row still present some time after
//!   its commit ([`OutboxSettings::sweep_after`]) was not confirmed — the
//!   process crashed between commit and confirm, the broker was away, or it
//!   returned the message — so the sweeper publishes it, waits for the
//!   confirms and deletes it. Rows are claimed with `FOR UPDATE SKIP LOCKED`,
//!   so replicas share the work.
//!
//! Either path may publish a row the other also publishes (a confirm that was
//! on its way when the sweeper looked): consumers recognise the duplicate by
//! its id or by their natural keys. Deleting a confirmed row does not wait
//! for its WAL flush: if that delete is lost in a crash, the row is simply
//! published once more.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use crate::messaging::broker::{Broker, reconnect_backoff};
use crate::messaging::delivery::H_TRACEPARENT;
use crate::metric_definitions as metric;

/// The AMQP `type` of a reply to a client (the result dict).
pub const REPLY_TYPE: &str = "order.result";
/// How long a reply waits in a client's queue (AMQP `expiration`, ms): one
/// nobody reads does not stay there for ever.
pub const REPLY_EXPIRATION_MS: u32 = 600_000;
/// Publishes of a reply the broker refuses (its queue full) before it is
/// dropped and counted (`replies_dropped_total{reason="refused"}`).
pub const REPLY_MAX_ATTEMPTS: i32 = 4;

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
    /// The body, as published (JSON).
    pub body: Vec<u8>,
    /// Saga events are mandatory (an unroutable one is an error and is
    /// retried); replies to a client's queue are not (the client may be gone).
    pub mandatory: bool,
    pub traceparent: Option<String>,
}

impl OutboxMessage {
    /// A direct reply to a client's `reply_to` queue, through the default
    /// exchange. Mandatory, so that one with no queue to go to is known
    /// (and counted, then dropped: see [`confirmation_outcome`]) — but for
    /// RabbitMQ's direct reply-to, which answers a mandatory publish with
    /// a return even when it delivered it.
    pub fn reply(id: Uuid, reply_to: &str, correlation_id: &str, body: Vec<u8>) -> Self {
        Self {
            id,
            exchange: String::new(),
            routing_key: reply_to.to_owned(),
            message_type: REPLY_TYPE.to_owned(),
            correlation_id: Some(correlation_id.to_owned()),
            body,
            mandatory: !reply_to.starts_with("amq.rabbitmq.reply-to"),
            traceparent: None,
        }
    }

    /// Whether this is a reply to a client.
    pub fn is_reply(&self) -> bool {
        self.message_type == REPLY_TYPE && self.exchange.is_empty()
    }

    /// The message's AMQP properties; `persistent` for everything the
    /// outbox holds, transient for hints that need no durability.
    pub fn properties(&self, sender: Sender<'_>, persistent: bool) -> BasicProperties {
        let mut props = BasicProperties::default()
            .with_message_id(self.id.to_string().into())
            .with_type(self.message_type.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(if persistent { 2 } else { 1 })
            .with_app_id(sender.service.into())
            .with_user_id(sender.user.into())
            .with_timestamp(Utc::now().timestamp().max(0) as u64);
        if let Some(c) = &self.correlation_id {
            props = props.with_correlation_id(c.as_str().into());
        }
        if self.is_reply() {
            props = props.with_expiration(REPLY_EXPIRATION_MS.to_string().into());
        }
        if let Some(tp) = &self.traceparent {
            let mut headers = FieldTable::default();
            headers.insert(
                H_TRACEPARENT.into(),
                AMQPValue::LongString(LongString::from(tp.as_str())),
            );
            props = props.with_headers(headers);
        }
        props
    }
}

/// Who publishes: the service (AMQP `app_id`, informational) and its broker
/// user (AMQP `user_id`, validated by the broker: see
/// [`crate::messaging::trust`]).
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub service: &'a str,
    pub user: &'a str,
}

/// Outbox rows as column arrays, for one set-based insert: on their own
/// ([`enqueue`]) or inside a handler's own statement ([`insert_cte`]), where
/// each row is tagged with the order it belongs to, so that the statement
/// keeps only the events of the orders it actually changed.
pub struct OutboxRows<'a> {
    ids: Vec<Uuid>,
    exchanges: Vec<&'a str>,
    keys: Vec<&'a str>,
    types: Vec<&'a str>,
    correlations: Vec<Option<&'a str>>,
    traces: Vec<Option<&'a str>>,
    mandatory: Vec<bool>,
    bodies: Vec<&'a [u8]>,
    orders: Vec<Uuid>,
}

impl<'a> OutboxRows<'a> {
    /// The rows of `messages`, each tagged with its order.
    pub fn new(messages: impl IntoIterator<Item = (Uuid, &'a OutboxMessage)>) -> Self {
        let messages = messages.into_iter();
        let n = messages.size_hint().0;
        let mut rows = OutboxRows {
            ids: Vec::with_capacity(n),
            exchanges: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            correlations: Vec::with_capacity(n),
            traces: Vec::with_capacity(n),
            mandatory: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
            orders: Vec::with_capacity(n),
        };
        for (order, m) in messages {
            rows.ids.push(m.id);
            rows.exchanges.push(m.exchange.as_str());
            rows.keys.push(m.routing_key.as_str());
            rows.types.push(m.message_type.as_str());
            rows.correlations.push(m.correlation_id.as_deref());
            rows.traces.push(m.traceparent.as_deref());
            rows.mandatory.push(m.mandatory);
            rows.bodies.push(m.body.as_slice());
            rows.orders.push(order);
        }
        rows
    }

    /// Binds the nine arrays as the query's next nine parameters (see
    /// [`insert_cte`]).
    pub fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        query
            .bind(self.ids)
            .bind(self.exchanges)
            .bind(self.keys)
            .bind(self.types)
            .bind(self.correlations)
            .bind(self.traces)
            .bind(self.mandatory)
            .bind(self.bodies)
            .bind(self.orders)
    }
}

/// The statement that inserts the rows bound by [`OutboxRows::bind`] at
/// parameters `$first`…`$first+8` — with `keep` (a subquery, e.g. `select
/// order_id from changed`), only those whose order is in it. Used as
/// `events as (…)` in a handler's own statement, its events are written by
/// the same round trip as its state.
pub fn insert_cte(first: usize, keep: Option<&str>) -> String {
    let p = |i: usize| format!("${}", first + i);
    format!(
        "insert into outbox (id, exchange, routing_key, message_type, correlation_id, traceparent, mandatory, body) \
         select e.id, e.exchange, e.routing_key, e.message_type, e.correlation_id, e.traceparent, e.mandatory, e.body \
         from unnest({}::uuid[], {}::text[], {}::text[], {}::text[], {}::text[], {}::text[], {}::bool[], {}::bytea[], {}::uuid[]) \
             as e(id, exchange, routing_key, message_type, correlation_id, traceparent, mandatory, body, order_id) \
         {} \
         on conflict (id) do nothing",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        keep.map_or_else(String::new, |k| format!("where e.order_id in ({k})"))
    )
}

/// Inserts messages into the outbox (in the caller's transaction), with one
/// statement. Ids already present are skipped.
pub async fn enqueue(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), sqlx::Error> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_cte(1, None));
    let rows = OutboxRows::new(messages.iter().map(|m| (Uuid::nil(), m)));
    rows.bind(sqlx::query(AssertSqlSafe(SQL.as_str())))
        .execute(conn)
        .await?;
    Ok(())
}

/// Settings of the outbox's background work.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Rows the sweeper claims per pass.
    pub batch_size: i64,
    /// How often the sweeper looks for rows the fast path left behind.
    pub sweep_interval: Duration,
    /// A row this much older than its commit was not confirmed by the fast
    /// path: the sweeper publishes it.
    pub sweep_after: Duration,
}

/// Ids the broker confirmed, waiting for the [`Janitor`] to delete their rows.
#[derive(Clone, Default)]
pub struct Confirmed {
    inner: Arc<ConfirmedInner>,
}

#[derive(Default)]
struct ConfirmedInner {
    ids: Mutex<Vec<Uuid>>,
    added: Notify,
}

impl Confirmed {
    pub fn push(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut pending = self.inner.ids.lock().unwrap_or_else(|p| p.into_inner());
        let before = pending.len();
        pending.extend(ids);
        if pending.len() > before {
            self.inner.added.notify_one();
        }
    }

    fn take(&self, max: usize) -> Vec<Uuid> {
        let mut pending = self.inner.ids.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() <= max {
            std::mem::take(&mut *pending)
        } else {
            pending.drain(..max).collect()
        }
    }

    fn len(&self) -> usize {
        self.inner
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Deletes the rows of confirmed messages, in batches.
pub struct Janitor {
    pool: PgPool,
    confirmed: Confirmed,
}

/// Rows one janitor statement deletes at most; this many waiting rows are
/// deleted at once.
const JANITOR_BATCH: usize = 2000;
/// How long the janitor lets confirmations gather before a delete: one
/// delete per quarter second at most, however light or heavy the load.
const JANITOR_LINGER: Duration = Duration::from_millis(250);

impl Janitor {
    pub fn new(pool: PgPool, confirmed: Confirmed) -> Self {
        Self { pool, confirmed }
    }

    /// Deletes confirmed rows until `cancel` fires, then once more.
    pub async fn run(self, cancel: CancellationToken) {
        let mut vacuum = Vacuum::default();
        loop {
            let stopping = tokio::select! {
                _ = cancel.cancelled() => true,
                _ = self.confirmed.inner.added.notified() => false,
            };
            if !stopping {
                let linger = tokio::time::sleep(JANITOR_LINGER);
                tokio::pin!(linger);
                while self.confirmed.len() < JANITOR_BATCH {
                    tokio::select! {
                        _ = &mut linger => break,
                        _ = self.confirmed.inner.added.notified() => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            }
            while !self.confirmed.is_empty() {
                let ids = self.confirmed.take(JANITOR_BATCH);
                let deleted = delete_rows(&self.pool, &ids).await;
                if deleted.is_ok() {
                    vacuum.after_deleting(&self.pool, ids.len()).await;
                }
                if let Err(error) = deleted {
                    // Harmless if never retried: the sweeper re-sends the
                    // rows and consumers absorb the copies.
                    warn!(%error, rows = ids.len(), "could not delete confirmed outbox rows; will retry");
                    self.confirmed.push(ids);
                    if stopping {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Rows deleted after which the janitor vacuums the outbox itself.
const VACUUM_AFTER_ROWS: usize = 20_000;
/// The janitor vacuums the outbox at most this often.
const VACUUM_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the outbox small. Every event row lives a fraction of a second, so
/// under load the table and its index fill with dead rows far faster than
/// autovacuum (one visit per database a minute, by default) removes them,
/// and every insert and sweep then wades through them. The janitor knows
/// how many rows it deleted: past a threshold it vacuums the table (a few
/// milliseconds, the live rows being few).
#[derive(Default)]
struct Vacuum {
    deleted_since: usize,
    last: Option<Instant>,
    refused: bool,
}

impl Vacuum {
    async fn after_deleting(&mut self, pool: &PgPool, rows: usize) {
        self.deleted_since += rows;
        if self.refused
            || self.deleted_since < VACUUM_AFTER_ROWS
            || self.last.is_some_and(|at| at.elapsed() < VACUUM_INTERVAL)
        {
            return;
        }
        self.last = Some(Instant::now());
        self.deleted_since = 0;
        if let Err(error) = sqlx::raw_sql("vacuum (skip_locked) outbox")
            .execute(pool)
            .await
        {
            // e.g. not the table's owner: leave it to autovacuum.
            warn!(%error, "could not vacuum the outbox; leaving it to autovacuum");
            self.refused = true;
        }
    }
}

/// Deletes outbox rows by id, without waiting for the WAL flush (one round
/// trip: ids are UUIDs, so they are safe to inline).
async fn delete_rows(pool: &PgPool, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    let mut sql = String::with_capacity(100 + ids.len() * 39);
    sql.push_str("begin; set local synchronous_commit = off; delete from outbox where id in (");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('\'');
        sql.push_str(&id.hyphenated().to_string());
        sql.push('\'');
    }
    sql.push_str("); commit;");
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
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
    body: Vec<u8>,
    created_at: DateTime<Utc>,
    attempts: i32,
}

impl PendingRow {
    fn is_reply(&self) -> bool {
        self.message_type == REPLY_TYPE && self.exchange.is_empty()
    }

    fn message(&self) -> OutboxMessage {
        OutboxMessage {
            id: self.id,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            message_type: self.message_type.clone(),
            correlation_id: self.correlation_id.clone(),
            body: self.body.clone(),
            mandatory: self.mandatory,
            traceparent: self.traceparent.clone(),
        }
    }
}

/// What one sweeper pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepOutcome {
    /// This many rows were confirmed (and possibly some failed).
    Published(usize),
    /// Nothing was due.
    Idle,
}

/// Why a sweeper pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker did not confirm within {0:?}")]
    ConfirmTimeout(Duration),
}

/// The longest the sweeper waits for a batch's confirms (it holds the rows'
/// locks meanwhile) before it gives up on the connection.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes the rows the fast path left behind.
pub struct Sweeper {
    service: &'static str,
    pool: PgPool,
    broker: Broker,
    settings: OutboxSettings,
}

impl Sweeper {
    pub fn new(
        service: &'static str,
        pool: PgPool,
        broker: Broker,
        settings: OutboxSettings,
    ) -> Self {
        Self {
            service,
            pool,
            broker,
            settings,
        }
    }

    /// Sweeps every `sweep_interval` until `cancel` fires, then publishes
    /// every row left (if the broker is reachable) and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let mut db_backoff = reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
        let mut swept_once = false;
        'connection: loop {
            let Some(conn) = self.broker.connection(&cancel).await else {
                break;
            };
            let channel = match Broker::confirm_channel(&conn).await {
                Ok(channel) => channel,
                Err(error) => {
                    warn!(service = self.service, %error, "outbox sweeper could not open a channel");
                    self.broker.report_broken(&conn);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let flushing = cancel.is_cancelled();
                // At shutdown every row left is due: the fast path is done.
                // At start-up too: the rows already there are, but for the
                // few this process has just committed, those of the process
                // it replaces, which died before publishing them; waiting
                // `sweep_after` would spend that much of their sagas'
                // deadlines. (Rows still in a fast path, ours or a live
                // replica's, are then published twice; consumers drop the
                // copy.)
                let after = if flushing || !swept_once {
                    Duration::ZERO
                } else {
                    self.settings.sweep_after
                };
                match self.sweep_once(&channel, after).await {
                    Ok(SweepOutcome::Published(n)) if n as i64 >= self.settings.batch_size => {
                        db_backoff =
                            reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
                        continue;
                    }
                    Ok(_) => {
                        swept_once = true;
                        db_backoff =
                            reconnect_backoff(Duration::from_millis(50), Duration::from_secs(2));
                        if flushing {
                            break 'connection;
                        }
                    }
                    Err(error @ (SweepError::Broker(_) | SweepError::ConfirmTimeout(_))) => {
                        warn!(service = self.service, %error, "outbox sweeper lost the broker");
                        self.broker.report_broken(&conn);
                        if flushing {
                            break 'connection;
                        }
                        continue 'connection;
                    }
                    Err(SweepError::Db(error)) => {
                        warn!(service = self.service, %error, "outbox sweeper database error");
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
                    _ = tokio::time::sleep(self.settings.sweep_interval) => {}
                }
            }
        }
    }

    /// Claims up to one batch of rows committed more than `after` ago,
    /// publishes them (pipelined), deletes the confirmed ones and backs off
    /// the others, in one transaction.
    pub async fn sweep_once(
        &self,
        channel: &Channel,
        after: Duration,
    ) -> Result<SweepOutcome, SweepError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<PendingRow> = sqlx::query_as(
            r#"
            select id, exchange, routing_key, message_type, correlation_id, traceparent,
                   mandatory, coalesce(body, convert_to(payload::text, 'UTF8')) as body,
                   created_at, attempts
            from outbox
            where published_at is null
              and created_at <= now() - make_interval(secs => $2)
              and next_attempt_at <= now()
            order by seq
            limit $1
            for update skip locked
            "#,
        )
        .bind(self.settings.batch_size)
        .bind(after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(SweepOutcome::Idle);
        }

        let messages: Vec<OutboxMessage> = rows.iter().map(PendingRow::message).collect();
        let outcomes = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            publish_confirmed(
                channel,
                Sender {
                    service: self.service,
                    user: self.broker.user(),
                },
                &messages,
            ),
        )
        .await
        .map_err(|_| SweepError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
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
        sqlx::query("delete from outbox where id = any($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        // A reply its client's queue keeps refusing (full) is dropped after
        // a few attempts: the client is not reading it.
        let (dropped, failed): (Vec<_>, Vec<_>) = failed
            .into_iter()
            .partition(|(row, _)| row.is_reply() && row.attempts + 1 >= REPLY_MAX_ATTEMPTS);
        if !dropped.is_empty() {
            let ids: Vec<Uuid> = dropped.iter().map(|(r, _)| r.id).collect();
            sqlx::query("delete from outbox where id = any($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            metrics::counter!(metric::REPLIES_DROPPED,
                "service" => self.service, "reason" => "refused")
            .increment(dropped.len() as u64);
            for (row, reason) in &dropped {
                warn!(service = self.service, id = %row.id, reply_to = ?row.routing_key,
                      %reason, "reply dropped after {REPLY_MAX_ATTEMPTS} refused publishes");
            }
        }
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

        metrics::counter!(metric::OUTBOX_PUBLISHED, "service" => self.service, "path" => "sweep")
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
            "outbox sweep"
        );
        Ok(SweepOutcome::Published(published.len()))
    }
}

/// Publishes every message (pipelined: all publishes first, then the
/// confirms); per message, `Ok` or why the broker did not take it.
pub async fn publish_confirmed(
    channel: &Channel,
    sender: Sender<'_>,
    messages: &[OutboxMessage],
) -> Result<Vec<Result<(), String>>, lapin::Error> {
    let confirms = send_all(channel, sender, messages, true).await?;
    let mut outcomes = Vec::with_capacity(messages.len());
    for (message, confirm) in messages.iter().zip(confirms) {
        outcomes.push(confirmation_outcome(
            sender.service,
            message,
            confirm.await?,
        ));
    }
    Ok(outcomes)
}

/// Sends every message; returns their pending confirms, in order. The sends
/// are started together, so lapin writes them out in one go.
pub async fn send_all(
    channel: &Channel,
    sender: Sender<'_>,
    messages: &[OutboxMessage],
    persistent: bool,
) -> Result<Vec<lapin::PublisherConfirm>, lapin::Error> {
    let sends = messages.iter().map(|m| {
        channel.basic_publish(
            m.exchange.as_str().into(),
            m.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: m.mandatory,
                ..BasicPublishOptions::default()
            },
            &m.body,
            m.properties(sender, persistent),
        )
    });
    let sent: Result<Vec<_>, _> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .collect();
    if sent.is_ok() {
        crate::runtime::traces::published(sender.service, messages);
    }
    sent
}

/// What a broker confirmation means for the row.
pub fn confirmation_outcome(
    service: &str,
    message: &OutboxMessage,
    confirm: Confirmation,
) -> Result<(), String> {
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        // A reply with no queue to go to (its client gone, its channel
        // closed): it never will have one. Done, and counted.
        Confirmation::Ack(Some(_)) if message.is_reply() => {
            metrics::counter!(metric::REPLIES_DROPPED,
                "service" => service.to_owned(), "reason" => "unroutable")
            .increment(1);
            debug!(service, reply_to = ?message.routing_key, "reply dropped: no such queue");
            Ok(())
        }
        Confirmation::Ack(Some(returned)) if message.mandatory => {
            Err(format!("unroutable: {}", returned.reply_text))
        }
        // A non-mandatory message with no route (a client's reply queue that
        // is gone) is done: nobody is waiting for it.
        Confirmation::Ack(Some(_)) => Ok(()),
        Confirmation::Nack(_) => Err("nacked by the broker".to_owned()),
    }
}

/// Time since `since`, for the lag histogram.
pub fn record_lag(service: &'static str, since: Instant, n: usize) {
    let lag = metrics::histogram!(metric::OUTBOX_LAG_SECONDS, "service" => service);
    let secs = since.elapsed().as_secs_f64();
    for _ in 0..n {
        lag.record(secs);
    }
}
