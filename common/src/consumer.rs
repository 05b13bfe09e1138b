//! The consumer loop every service runs on its queue.
//!
//! For each delivery (at most `prefetch` in flight, handled concurrently):
//! decode the metadata, run the service's [`MessageHandler`], then
//! - `Ok` → ack (the handler has committed);
//! - [`HandlerError::Transient`] / [`HandlerError::Db`] → re-publish to a
//!   delay queue with exponential backoff and jitter, then ack; after
//!   `max_attempts` the message is parked instead;
//! - [`HandlerError::Permanent`] → park: re-publish to the service's parking
//!   queue with the reason in `x-parked-reason`, then ack.
//!
//! Every re-publish waits for its publisher confirm before the ack, so a crash
//! in between re-delivers the original (and the inbox absorbs the copy).
//! Nothing blocks the consumer while a message waits to be retried, and a
//! poison message never stops the others.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use sqlx::PgPool;

use crate::broker::{Broker, SETUP_TIMEOUT, timeout_error};
use crate::events::EventType;
use crate::fault::FaultDelay;
use crate::telemetry::metric;
use crate::topology::{RETRY_TIERS, ServiceIdentity};
use crate::{db, escalation};

/// Messages larger than this are parked unread.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A handler running longer than this is abandoned and its message retried.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// Header carrying the routing key a message was first published with (a
/// message coming back from a delay queue arrives with the queue's name).
pub const H_ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// Header counting broker-level retries of a message (1 = first retry).
pub const H_RETRY_ATTEMPT: &str = "x-retry-attempt";
/// Header with the last error that made a message be retried.
pub const H_LAST_ERROR: &str = "x-last-error";
/// Header with the reason a message was parked.
pub const H_PARKED_REASON: &str = "x-parked-reason";
/// Header naming the service that parked a message.
pub const H_PARKED_BY: &str = "x-parked-by";
/// Header carrying the escalation an operator is retrying.
pub const H_ESCALATION_ID: &str = "x-escalation-id";

/// A delivery, as handlers see it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The routing key the message was published with.
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub message_type: Option<String>,
    pub traceparent: Option<String>,
    pub body: Vec<u8>,
    /// 1 on first delivery, +1 per broker-level retry.
    pub attempt: u32,
    /// Attempts after which a failing message is given up on.
    pub max_attempts: u32,
    /// Set when an operator retries an escalated compensation.
    pub escalation_id: Option<uuid::Uuid>,
}

impl Incoming {
    fn from_delivery(d: &Delivery, max_attempts: u32) -> Self {
        let p = &d.properties;
        let headers = p.headers().as_ref();
        let header_str = |k: &str| headers.and_then(|h| h.inner().get(k)).and_then(amqp_str);
        let retried = headers
            .and_then(|h| h.inner().get(H_RETRY_ATTEMPT))
            .and_then(amqp_int)
            .unwrap_or(0);
        Self {
            routing_key: header_str(H_ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| d.routing_key.to_string()),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
            message_type: p.kind().as_ref().map(|s| s.to_string()),
            traceparent: header_str("traceparent"),
            body: d.data.clone(),
            attempt: u32::try_from(retried)
                .unwrap_or(u32::MAX - 1)
                .saturating_add(1),
            max_attempts,
            escalation_id: header_str(H_ESCALATION_ID).and_then(|s| s.parse().ok()),
        }
    }

    /// True on the last attempt before the message is given up on.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

fn amqp_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn amqp_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A handler's failure, classified for the consumer.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Try again later (a dependency is down, a race to retry).
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// A database error: retried, and counted by kind when it is a known
    /// retryable one (deadlock, serialization failure, lost connection).
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Will never succeed (malformed or invalid message): parked at once.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

impl HandlerError {
    pub fn permanent(msg: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(anyhow::anyhow!("{msg}"))
    }
}

impl From<crate::envelope::DecodeError> for HandlerError {
    fn from(e: crate::envelope::DecodeError) -> Self {
        HandlerError::Permanent(e.into())
    }
}

/// A service's reaction to its messages.
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one message. Must be idempotent: it can run more than once
    /// for the same message (redelivery), and must commit before returning `Ok`.
    fn handle(&self, msg: Incoming) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The compensation a message with this routing key performs, if it is
    /// one (e.g. `"refund"`). A compensation whose retries are exhausted is
    /// escalated (see [`crate::escalation`]), never parked.
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        let _ = routing_key;
        None
    }
}

/// Settings of a consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Unacked deliveries in flight (and handlers running) at most.
    pub prefetch: u16,
    /// Attempts (first delivery + broker retries) before a message is parked.
    pub max_attempts: u32,
    /// Artificial delay before each message (tests, benchmarks).
    pub fault_delay: Option<FaultDelay>,
    /// Messages older than this are refused (parked): the inbox no longer
    /// remembers whether they were applied. See [`crate::retention`].
    pub replay_window: Duration,
}

/// Consumes a service's queue until cancelled.
pub struct Consumer<H> {
    service: ServiceIdentity,
    broker: Broker,
    pool: PgPool,
    settings: ConsumerSettings,
    handler: Arc<H>,
}

impl<H: MessageHandler> Consumer<H> {
    pub fn new(
        service: ServiceIdentity,
        broker: Broker,
        pool: PgPool,
        settings: ConsumerSettings,
        handler: Arc<H>,
    ) -> Self {
        Self {
            service,
            broker,
            pool,
            settings,
            handler,
        }
    }

    /// Runs until `cancel` fires: then stops taking deliveries, lets the
    /// handlers in flight finish and ack, and returns. Survives broker loss.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let Some(conn) = self.broker.connection(&cancel).await else {
                return;
            };
            match self.consume(&conn, &cancel).await {
                Ok(()) => return,
                Err(error) => {
                    warn!(service = self.service.name, %error, "consumer lost its channel; restarting");
                    self.broker.report_broken();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    async fn consume(
        &self,
        conn: &Connection,
        cancel: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        let queue = self.service.queue();
        let setup = async {
            let channel = conn.create_channel().await?;
            channel
                .basic_qos(self.settings.prefetch, BasicQosOptions::default())
                .await?;
            let publisher = Broker::confirm_channel(conn).await?;
            let deliveries = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("{}-{}", self.service.name, uuid::Uuid::new_v4().simple()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, publisher, deliveries))
        };
        let (channel, publisher, mut deliveries) = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .unwrap_or_else(|_| Err(timeout_error("starting the consumer")))?;
        info!(service = self.service.name, %queue, prefetch = self.settings.prefetch, "consuming");

        let mut in_flight = JoinSet::new();
        let result = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = done {
                        error!(service = self.service.name, error = %e, "delivery task failed");
                    }
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let task = DeliveryTask {
                            service: self.service,
                            handler: self.handler.clone(),
                            publisher: publisher.clone(),
                            pool: self.pool.clone(),
                            settings: self.settings.clone(),
                        };
                        in_flight.spawn(task.run(delivery));
                    }
                    Some(Err(error)) => break Err(error),
                    None => break Err(amqp_error("consumer cancelled by the broker".to_owned())),
                },
            }
        };
        // Let the handlers in flight finish (and ack) before the channel
        // closes; prefetched deliveries not started go back to the queue.
        while in_flight.join_next().await.is_some() {}
        let _ = channel.close(200, "consumer stopping".into()).await;
        let _ = publisher.close(200, "consumer stopping".into()).await;
        result
    }
}

/// Everything one delivery's task needs.
struct DeliveryTask<H> {
    service: ServiceIdentity,
    handler: Arc<H>,
    publisher: Channel,
    pool: PgPool,
    settings: ConsumerSettings,
}

enum Verdict {
    Ack,
    Retry(String),
    Park { reason: String, label: &'static str },
    Escalate { step: &'static str, error: String },
}

impl<H: MessageHandler> DeliveryTask<H> {
    async fn run(self, delivery: Delivery) {
        let msg = Incoming::from_delivery(&delivery, self.settings.max_attempts);
        let event_type = event_label(&msg.routing_key);
        let span = info_span!(
            "handle",
            service = self.service.name,
            event_type,
            message_id = msg.message_id.as_deref().unwrap_or(""),
            order_id = msg.correlation_id.as_deref().unwrap_or(""),
            trace_id = msg
                .traceparent
                .as_deref()
                .and_then(|t| t.get(3..35))
                .unwrap_or(""),
            attempt = msg.attempt,
        );
        async move {
            if let Some(delay) = self.settings.fault_delay {
                tokio::time::sleep(delay.sample()).await;
            }
            let started = Instant::now();
            let verdict = self.judge(msg.clone()).await;
            metrics::histogram!(metric::MESSAGE_HANDLING_SECONDS,
                "service" => self.service.name, "event_type" => event_type)
            .record(started.elapsed().as_secs_f64());

            let settle = async { match &verdict {
                Verdict::Ack => {
                    self.count(event_type, "ok");
                    if let Some(id) = msg.escalation_id
                        && let Err(error) = escalation::resolve(&self.pool, id).await
                    {
                        warn!(%error, escalation_id = %id, "could not mark the escalation resolved");
                    }
                    delivery.acker.ack(BasicAckOptions::default()).await.map(|_| ())
                }
                Verdict::Escalate { step, error } => {
                    match escalation::record(&self.pool, self.service.name, step, &msg, error).await {
                        Ok(_) => {
                            self.count(event_type, "escalated");
                            delivery.acker.ack(BasicAckOptions::default()).await.map(|_| ())
                        }
                        Err(db_error) => {
                            // Cannot record it (database down): keep retrying.
                            warn!(error = %db_error, "could not record the escalation; retrying the compensation");
                            self.count(event_type, "retry");
                            self.retry(&delivery, &msg, error).await
                        }
                    }
                }
                Verdict::Retry(error) => {
                    self.count(event_type, "retry");
                    self.retry(&delivery, &msg, error).await
                }
                Verdict::Park { reason, label } => {
                    self.count(event_type, "parked");
                    metrics::counter!(metric::MESSAGES_PARKED,
                        "service" => self.service.name, "reason" => *label)
                    .increment(1);
                    warn!(%reason, "parking message");
                    self.park(&delivery, reason).await
                }
            }};
            let settled = tokio::time::timeout(SETUP_TIMEOUT, settle)
                .await
                .unwrap_or_else(|_| Err(timeout_error("settling the delivery")));
            if let Err(error) = settled {
                // The channel is gone: the broker re-delivers the message.
                warn!(%error, "could not settle the delivery; it will be redelivered");
                let nack = delivery.acker.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                });
                let _ = tokio::time::timeout(Duration::from_secs(5), nack).await;
            }
        }
        .instrument(span)
        .await
    }

    async fn judge(&self, msg: Incoming) -> Verdict {
        if msg.body.len() > MAX_BODY_BYTES {
            return Verdict::Park {
                reason: format!(
                    "message body of {} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
                    msg.body.len()
                ),
                label: "too_large",
            };
        }
        if msg.escalation_id.is_none()
            && let Some(age) = message_age(&msg.body)
            && age > self.settings.replay_window
        {
            return Verdict::Park {
                reason: format!(
                    "message is {}s old, older than the {}s retention window: the inbox no longer \
                     knows whether it was applied, so it is refused",
                    age.as_secs(),
                    self.settings.replay_window.as_secs()
                ),
                label: "too_old",
            };
        }
        let attempt = msg.attempt;
        let compensation = self.handler.compensation(&msg.routing_key);
        let outcome = AssertUnwindSafe(self.handler.handle(msg))
            .catch_unwind()
            .await;
        let error = match outcome {
            Ok(Ok(())) => return Verdict::Ack,
            Ok(Err(HandlerError::Permanent(e))) => {
                return Verdict::Park {
                    reason: format!("{e:#}"),
                    label: "invalid",
                };
            }
            Ok(Err(HandlerError::Db(e))) => {
                if let Some(kind) = db::retryable(&e) {
                    db::record_retryable(self.service.name, kind);
                }
                format!("database: {e}")
            }
            Ok(Err(HandlerError::Transient(e))) => format!("{e:#}"),
            Err(_) => "handler panicked".to_owned(),
        };
        if attempt >= self.settings.max_attempts {
            if let Some(step) = compensation {
                return Verdict::Escalate { step, error };
            }
            Verdict::Park {
                reason: format!("gave up after {attempt} attempts; last error: {error}"),
                label: "exhausted",
            }
        } else {
            debug!(%error, "transient failure; will retry");
            Verdict::Retry(error)
        }
    }

    fn count(&self, event_type: &'static str, outcome: &'static str) {
        metrics::counter!(metric::MESSAGES_HANDLED,
            "service" => self.service.name, "event_type" => event_type, "outcome" => outcome)
        .increment(1);
    }

    /// Re-publishes to the delay tier for the next attempt, then acks.
    async fn retry(
        &self,
        delivery: &Delivery,
        msg: &Incoming,
        error: &str,
    ) -> Result<(), lapin::Error> {
        let tier = (msg.attempt as usize - 1).min(RETRY_TIERS.len() - 1);
        let delay = RETRY_TIERS[tier].mul_f64(rand::random_range(1.0..1.5));
        let mut headers = copied_headers(delivery);
        headers.insert(
            H_RETRY_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(msg.attempt)),
        );
        headers.insert(H_LAST_ERROR.into(), long_str(&truncate(error, 1000)));
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_expiration(delay.as_millis().to_string().into());
        self.republish(&self.service.retry_queue(tier), delivery, props)
            .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Re-publishes to the parking queue with the reason, then acks.
    async fn park(&self, delivery: &Delivery, reason: &str) -> Result<(), lapin::Error> {
        let mut headers = copied_headers(delivery);
        headers.insert(H_PARKED_REASON.into(), long_str(&truncate(reason, 4000)));
        headers.insert(H_PARKED_BY.into(), long_str(self.service.name));
        headers.insert(
            "x-parked-at".into(),
            long_str(&chrono::Utc::now().to_rfc3339()),
        );
        let props = delivery.properties.clone().with_headers(headers);
        self.republish(&self.service.parking_queue(), delivery, props)
            .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn republish(
        &self,
        queue: &str,
        delivery: &Delivery,
        props: BasicProperties,
    ) -> Result<(), lapin::Error> {
        let confirm = self
            .publisher
            .basic_publish(
                ShortString::from(""),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                props,
            )
            .await?
            .await?;
        match confirm {
            lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => Ok(()),
            _ => Err(amqp_error(format!(
                "re-publish to {queue} was not accepted"
            ))),
        }
    }
}

/// How old an envelope is (by its `occurred_at`); `None` for other bodies.
fn message_age(body: &[u8]) -> Option<Duration> {
    #[derive(serde::Deserialize)]
    struct OccurredAt {
        occurred_at: chrono::DateTime<chrono::Utc>,
    }
    let at = serde_json::from_slice::<OccurredAt>(body).ok()?.occurred_at;
    (chrono::Utc::now() - at).to_std().ok()
}

/// The delivery's headers, plus the original routing key if not yet recorded.
fn copied_headers(delivery: &Delivery) -> FieldTable {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    if !headers.inner().contains_key(H_ORIGINAL_ROUTING_KEY) {
        headers.insert(
            H_ORIGINAL_ROUTING_KEY.into(),
            long_str(delivery.routing_key.as_str()),
        );
        headers.insert(
            "x-original-exchange".into(),
            long_str(delivery.exchange.as_str()),
        );
    }
    headers
}

fn amqp_error(message: String) -> lapin::Error {
    lapin::Error::from(std::io::Error::other(message))
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A bounded metrics label for a routing key or message type.
pub fn event_label(key: &str) -> &'static str {
    EventType::from_routing_key(key).map_or("unknown", EventType::routing_key)
}
