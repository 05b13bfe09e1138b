//! The consumer loop every service runs on its queue, one batch at a time.
//!
//! It takes the deliveries that are ready (the first one waited for, the
//! rest only if already here, up to `batch_size`) and runs the service's
//! [`MessageHandler`] on the whole batch in one [`UnitOfWork`]: one
//! transaction, set-based statements, one commit. Then, per message:
//! - `Ok` → acked (one `multiple` ack for the batch, after the commit);
//! - [`HandlerError::Transient`] / [`HandlerError::Db`] → re-published to a
//!   delay queue with exponential backoff and jitter, then acked; after
//!   `max_attempts` it is parked instead (a compensation is escalated);
//! - [`HandlerError::Permanent`] → parked: re-published to the service's
//!   parking queue with the reason in `x-parked-reason`, then acked.
//!
//! If the batch fails as a whole (a database error, a deadlock, a panic, a
//! timeout), nothing of it is committed and every message is handled again
//! on its own, so one bad message never holds others back or changes their
//! outcome. Every re-publish waits for its publisher confirm before the ack,
//! so a crash in between re-delivers the original, which the handler
//! recognises as a duplicate.

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
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::messaging::broker::{Broker, SETUP_TIMEOUT, timeout_error};
use crate::messaging::delivery::{
    H_LAST_ERROR, H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY, H_PARKED_AT, H_PARKED_BY,
    H_PARKED_REASON, H_PARKED_SENDER, H_RETRY_ATTEMPT, Incoming,
};
use crate::messaging::envelope::Envelope;
use crate::messaging::escalation;
use crate::messaging::events::{EXCHANGE, EventType};
use crate::messaging::fault::FaultDelay;
use crate::messaging::publisher::Publisher;
use crate::messaging::retry;
use crate::messaging::topology::{DELIVERY_LIMIT, ServiceIdentity};
use crate::messaging::trust::{ProducerTrust, Untrusted};
use crate::messaging::unit_of_work::UnitOfWork;
use crate::metric_definitions as metric;
use crate::runtime::traces;
use crate::store::pool as db;

/// Messages larger than this are parked unread.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

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

    pub fn transient(msg: impl std::fmt::Display) -> Self {
        HandlerError::Transient(anyhow::anyhow!("{msg}"))
    }
}

impl From<crate::messaging::envelope::DecodeError> for HandlerError {
    fn from(e: crate::messaging::envelope::DecodeError) -> Self {
        HandlerError::Permanent(e.into())
    }
}

/// The outcome of one message of a batch.
pub type MessageResult = Result<(), HandlerError>;

/// A service's reaction to its messages.
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles `batch` in `uow`, which the consumer commits afterwards, and
    /// returns one result per message, in order.
    ///
    /// - `Ok(())`: applied, or recognised as already applied (a duplicate)
    ///   or as too late (its saga is over).
    /// - `Err` for one message: a transient error means the handler wrote
    ///   nothing for it (it is retried later, on its own); a permanent one
    ///   means it is parked — what the handler wrote for it (a rejection
    ///   reply, say) is committed with the batch.
    /// - `Err` for the batch: nothing is committed, and each message is
    ///   handled again in a batch of its own. A [`HandlerError::Db`] for one
    ///   message counts as one for the batch: the failed statement aborted
    ///   the transaction they share.
    ///
    /// Must be idempotent: a message can be handled more than once
    /// (redelivery), and must be recognised as a duplicate the second time.
    fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> impl Future<Output = Result<Vec<MessageResult>, HandlerError>> + Send;

    /// The step a message with this routing key performs, if it is one that
    /// must happen whatever it takes: a compensation (e.g. `"refund"`) or a
    /// terminal step that cannot be undone (e.g. `"stock commit"`). Such a
    /// message is escalated (see [`crate::messaging::escalation`]) when it
    /// cannot be applied — retries exhausted, too old to tell, a process
    /// that crashes on it — never parked.
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        let _ = routing_key;
        None
    }
}

/// A step service's batch, sorted by what each message asks for.
pub struct StepBatch<T> {
    /// One result per message: a message that is malformed, or of a type
    /// this service does not take, already has its error here.
    pub results: Vec<MessageResult>,
    /// The forward requests, with their data decoded: (index, envelope, data).
    pub forward: Vec<(usize, Envelope, T)>,
    /// The rollbacks (`order.failed`, `order.cancelled`).
    pub rollbacks: Vec<(usize, Envelope)>,
    /// Messages of the other types the service takes.
    pub others: Vec<(usize, Envelope)>,
}

impl<T: serde::de::DeserializeOwned> StepBatch<T> {
    /// Sorts `batch` for `service`, whose forward request is `forward`, and
    /// which also takes `others`.
    pub fn sort(
        service: &str,
        batch: &[Incoming],
        forward: EventType,
        others: &[EventType],
    ) -> StepBatch<T> {
        let mut sorted = StepBatch {
            results: Vec::with_capacity(batch.len()),
            forward: Vec::new(),
            rollbacks: Vec::new(),
            others: Vec::new(),
        };
        for (i, msg) in batch.iter().enumerate() {
            let result = Envelope::decode(&msg.body)
                .map_err(HandlerError::from)
                .and_then(|env| match env.event_type {
                    t if t == forward => {
                        let data = env.data_as::<T>()?;
                        sorted.forward.push((i, env, data));
                        Ok(())
                    }
                    t if t.is_abort() => {
                        sorted.rollbacks.push((i, env));
                        Ok(())
                    }
                    t if others.contains(&t) => {
                        sorted.others.push((i, env));
                        Ok(())
                    }
                    other => Err(HandlerError::permanent(format!(
                        "{service} does not handle {other}"
                    ))),
                });
            sorted.results.push(result);
        }
        sorted
    }
}

/// For [`MessageHandler::compensation`]: `step` for the rollback events
/// (`order.failed`, `order.cancelled`), `None` otherwise.
pub fn compensation_on_rollback(routing_key: &str, step: &'static str) -> Option<&'static str> {
    EventType::from_routing_key(routing_key)
        .filter(|t| t.is_abort())
        .map(|_| step)
}

/// Settings of a consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Unacked deliveries at most (the broker's prefetch).
    pub prefetch: u16,
    /// Deliveries handled in one transaction at most.
    pub batch_size: usize,
    /// Attempts (first delivery + broker retries) before a message is parked.
    pub max_attempts: u32,
    /// Artificial delay before each batch (tests, benchmarks).
    pub fault_delay: Option<FaultDelay>,
    /// Messages older than this are refused (parked): the service may no
    /// longer remember whether they were applied. See [`crate::store::retention`].
    pub replay_window: Duration,
    /// A batch (or a single message) whose handler runs longer than this is
    /// abandoned, rolled back, and its messages retried.
    pub handler_timeout: Duration,
    /// Which broker user may publish which event.
    pub trust: ProducerTrust,
}

/// Consumes a service's queue until cancelled.
pub struct Consumer<H> {
    service: ServiceIdentity,
    broker: Broker,
    pool: PgPool,
    publisher: Publisher,
    settings: ConsumerSettings,
    handler: Arc<H>,
}

/// What becomes of one delivery.
enum Verdict {
    Ack,
    Retry(String),
    Park { reason: String, label: &'static str },
    Escalate { step: &'static str, error: String },
}

impl Verdict {
    /// The `outcome` label of what becomes of the message.
    fn label(&self) -> &'static str {
        match self {
            Verdict::Ack => "ok",
            Verdict::Retry(_) => "retry",
            Verdict::Park { .. } => "parked",
            Verdict::Escalate { .. } => "escalated",
        }
    }
}

impl<H: MessageHandler> Consumer<H> {
    pub fn new(
        service: ServiceIdentity,
        broker: Broker,
        pool: PgPool,
        publisher: Publisher,
        settings: ConsumerSettings,
        handler: Arc<H>,
    ) -> Self {
        Self {
            service,
            broker,
            pool,
            publisher,
            settings,
            handler,
        }
    }

    /// Runs until `cancel` fires: then finishes the batch in hand (commit,
    /// ack) and returns; prefetched deliveries go back to the queue.
    /// Survives broker loss.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let Some(conn) = self.broker.connection(&cancel).await else {
                return;
            };
            match self.consume(&conn, &cancel).await {
                Ok(()) => return,
                Err(error) => {
                    warn!(service = self.service.name, %error, "consumer lost its channel; restarting");
                    self.broker.report_broken(&conn);
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
            let republisher = Broker::confirm_channel(conn).await?;
            let deliveries = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("{}-{}", self.service.name, uuid::Uuid::new_v4().simple()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, republisher, deliveries))
        };
        let (channel, republisher, mut deliveries) = tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .unwrap_or_else(|_| Err(timeout_error("starting the consumer")))?;
        info!(service = self.service.name, %queue, prefetch = self.settings.prefetch,
              batch_size = self.settings.batch_size, "consuming");

        let max = self.settings.batch_size.max(1);
        let result = loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => break Err(error),
                    None => break Err(amqp_error("consumer cancelled by the broker".to_owned())),
                },
            };
            let mut batch = vec![first];
            let mut stream_error = None;
            while batch.len() < max {
                match deliveries.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    Some(Some(Err(error))) => {
                        stream_error = Some(error);
                        break;
                    }
                    _ => break,
                }
            }
            if let Err(error) = self.process(batch, &channel, &republisher).await {
                break Err(error);
            }
            if let Some(error) = stream_error {
                break Err(error);
            }
        };
        let _ = channel.close(200, "consumer stopping".into()).await;
        let _ = republisher.close(200, "consumer stopping".into()).await;
        result
    }

    /// Handles one batch and settles every delivery of it.
    async fn process(
        &self,
        mut deliveries: Vec<Delivery>,
        channel: &Channel,
        republisher: &Channel,
    ) -> Result<(), lapin::Error> {
        let max_attempts = self.settings.max_attempts;
        let messages: Vec<Incoming> = deliveries
            .iter_mut()
            .map(|d| Incoming::take(d, max_attempts))
            .collect();
        metrics::histogram!(metric::CONSUMER_BATCH_SIZE, "service" => self.service.name)
            .record(messages.len() as f64);
        let span = info_span!("batch", service = self.service.name, size = messages.len());
        async {
            if let Some(delay) = self.settings.fault_delay {
                tokio::time::sleep(delay.sample()).await;
            }
            let started = Instant::now();
            let started_at = std::time::SystemTime::now();
            let verdicts = self.judge_all(&messages).await;
            let took = started.elapsed().as_secs_f64();
            traces::consumed(
                self.service.name,
                messages.iter().zip(verdicts.iter().map(Verdict::label)),
                messages.len(),
                started_at,
                std::time::SystemTime::now(),
            );
            for msg in &messages {
                metrics::histogram!(metric::MESSAGE_HANDLING_SECONDS,
                    "service" => self.service.name, "event_type" => event_label(&msg.routing_key))
                .record(took);
            }

            let settle = self.settle(&deliveries, &messages, verdicts, channel, republisher);
            match tokio::time::timeout(SETUP_TIMEOUT, settle).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(timeout_error("settling a batch")),
            }
        }
        .instrument(span)
        .await
    }

    /// The verdict on every message: screened, then handled as a batch (and
    /// one by one if the batch fails).
    async fn judge_all(&self, messages: &[Incoming]) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = messages.iter().map(|m| self.screen(m)).collect();
        let work: Vec<usize> = (0..messages.len())
            .filter(|&i| verdicts[i].is_none())
            .collect();
        if work.is_empty() {
            return verdicts.into_iter().flatten().collect();
        }
        let screened_out;
        let batch: &[Incoming] = if work.len() == messages.len() {
            messages
        } else {
            screened_out = work
                .iter()
                .map(|&i| messages[i].clone())
                .collect::<Vec<_>>();
            &screened_out
        };
        match self.run_batch(batch).await {
            Ok(results) => {
                for (&i, result) in work.iter().zip(results) {
                    verdicts[i] = Some(self.verdict(&messages[i], result));
                }
            }
            Err(error) if batch.len() > 1 => {
                metrics::counter!(metric::CONSUMER_BATCH_FALLBACKS, "service" => self.service.name)
                    .increment(1);
                debug!(%error, size = batch.len(), "batch failed; handling its messages one by one");
                for &i in &work {
                    let single = std::slice::from_ref(&messages[i]);
                    let result = match self.run_batch(single).await {
                        Ok(mut results) => results.pop().unwrap_or(Ok(())),
                        Err(error) => Err(error),
                    };
                    verdicts[i] = Some(self.verdict(&messages[i], result));
                }
            }
            Err(error) => {
                verdicts[work[0]] = Some(self.verdict(&messages[work[0]], Err(error)));
            }
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Ack))
            .collect()
    }

    /// Messages refused before any handler sees them: parked, or escalated
    /// if they carry a step that must happen (see
    /// [`MessageHandler::compensation`]).
    fn screen(&self, msg: &Incoming) -> Option<Verdict> {
        if msg.body.len() > MAX_BODY_BYTES {
            return Some(Verdict::Park {
                reason: format!(
                    "message body of {} bytes exceeds the {MAX_BODY_BYTES}-byte limit",
                    msg.body.len()
                ),
                label: "too_large",
            });
        }
        let head = MessageHead::read(&msg.body);
        if let Some((reason, label)) = self.untrusted(msg, &head) {
            // Never escalated, even if it claims to be a compensation: it
            // was not sent by the service that owns it.
            return Some(Verdict::Park { reason, label });
        }
        let refusal = if msg.escalation_id.is_some() {
            None
        } else if let Some(age) = head.age()
            && age > self.settings.replay_window
        {
            Some((
                format!(
                    "message is {}s old, older than the {}s retention window: the service may \
                     no longer know whether it was applied, so it is refused",
                    age.as_secs(),
                    self.settings.replay_window.as_secs()
                ),
                "too_old",
            ))
        } else if msg.delivery_count >= DELIVERY_LIMIT {
            // The broker's last delivery before it dead-letters the message
            // itself: whatever handles it keeps killing the process.
            Some((
                format!(
                    "delivered {} times without being settled: its handler keeps crashing the process",
                    msg.delivery_count + 1
                ),
                "crash_loop",
            ))
        } else {
            None
        };
        let (reason, label) = refusal?;
        Some(match self.handler.compensation(&msg.routing_key) {
            Some(step) => Verdict::Escalate {
                step,
                error: reason,
            },
            None => Verdict::Park { reason, label },
        })
    }

    /// Why a message must not be applied although it is well-formed: it was
    /// not published by the service that owns its event type, it carries
    /// control headers that only this service may set, or its routing key
    /// is not the event type it contains. See [`crate::messaging::trust`].
    fn untrusted(&self, msg: &Incoming, head: &MessageHead) -> Option<(String, &'static str)> {
        let trust = &self.settings.trust;
        let sender = msg.sender.as_deref();
        if !msg.control_headers.is_empty() && !trust.is_own(sender) {
            let error = Untrusted::ForgedHeaders {
                headers: msg.control_headers.join(", "),
                sender: msg.sender.clone(),
            };
            return Some((error.to_string(), "forged"));
        }
        // Events arrive through the exchange, by their routing key. A
        // message put straight into the work queue (the default exchange)
        // names no event and so would escape the producer check.
        let Some(event) = EventType::from_routing_key(&msg.routing_key) else {
            let error = format!(
                "routing key {:?} is not an event type: events are published to {EXCHANGE} \
                 with their event type as the routing key",
                msg.routing_key
            );
            return Some((error, "unroutable"));
        };
        // Our own re-publication (a retry, an operator's retry of an
        // escalation) of a message checked when it first arrived: stamped
        // with our user, as the broker requires, and so not the owner's.
        let reissued = !msg.control_headers.is_empty() && trust.is_own(sender);
        if !reissued && let Err(error) = trust.check(event, sender) {
            return Some((error.to_string(), "unauthenticated"));
        }
        match head.event_type.as_deref() {
            Some(inside) if event != EventType::OrderRequested && inside != event.routing_key() => {
                Some((
                    format!(
                        "routing key {} does not match the envelope's event_type {:?}",
                        event.routing_key(),
                        inside
                    ),
                    "mismatch",
                ))
            }
            _ => None,
        }
    }

    /// Runs the handler on `batch` in one transaction and commits it.
    async fn run_batch(&self, batch: &[Incoming]) -> Result<Vec<MessageResult>, HandlerError> {
        let work = async {
            if crate::failpoints::is_set("consumer::hang") {
                // A handler stuck on, say, a half-open database socket.
                std::future::pending::<()>().await;
            }
            let mut uow = UnitOfWork::begin(&self.pool).await?;
            let mut results = self.handler.handle_batch(&mut uow, batch).await?;
            if results.len() != batch.len() {
                return Err(HandlerError::Transient(anyhow::anyhow!(
                    "handler returned {} results for {} messages",
                    results.len(),
                    batch.len()
                )));
            }
            // A statement that failed for one message has aborted the whole
            // transaction: PostgreSQL answers its COMMIT with a rollback, not
            // an error. Committing it would publish events of changes that
            // never happened, so the batch fails as a whole (and is handled
            // again one message at a time).
            if let Some(failed) = results
                .iter()
                .position(|r| matches!(r, Err(HandlerError::Db(_))))
                && let Err(error) = results.swap_remove(failed)
            {
                return Err(error);
            }
            uow.commit(&self.publisher).await?;
            Ok(results)
        };
        let timeout = self.settings.handler_timeout;
        match tokio::time::timeout(timeout, AssertUnwindSafe(work).catch_unwind()).await {
            Ok(Ok(results)) => results,
            Ok(Err(_)) => Err(HandlerError::transient("handler panicked")),
            Err(_) => Err(HandlerError::transient(format!(
                "handler did not finish within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    fn verdict(&self, msg: &Incoming, result: MessageResult) -> Verdict {
        let error = match result {
            Ok(()) => return Verdict::Ack,
            Err(HandlerError::Permanent(e)) => {
                return Verdict::Park {
                    reason: format!("{e:#}"),
                    label: "invalid",
                };
            }
            Err(HandlerError::Db(e)) if db::permanent(&e) => {
                let reason = format!("the database refuses this message's data: {e}");
                return match self.handler.compensation(&msg.routing_key) {
                    Some(step) => Verdict::Escalate {
                        step,
                        error: reason,
                    },
                    None => Verdict::Park {
                        reason,
                        label: "invalid",
                    },
                };
            }
            Err(HandlerError::Db(e)) => {
                if let Some(kind) = db::retryable(&e) {
                    db::record_retryable(self.service.name, kind);
                }
                format!("database: {e}")
            }
            Err(HandlerError::Transient(e)) => format!("{e:#}"),
        };
        if msg.is_last_attempt() {
            if let Some(step) = self.handler.compensation(&msg.routing_key) {
                return Verdict::Escalate { step, error };
            }
            Verdict::Park {
                reason: format!(
                    "gave up after {} attempts; last error: {error}",
                    msg.attempt
                ),
                label: "exhausted",
            }
        } else {
            debug!(%error, attempt = msg.attempt, "transient failure; will retry");
            Verdict::Retry(error)
        }
    }

    /// Re-publishes what must be retried or parked, records escalations, then
    /// acks the whole batch with one `multiple` ack.
    async fn settle(
        &self,
        deliveries: &[Delivery],
        messages: &[Incoming],
        verdicts: Vec<Verdict>,
        channel: &Channel,
        republisher: &Channel,
    ) -> Result<(), lapin::Error> {
        let mut resolved = Vec::new();
        for ((delivery, msg), verdict) in deliveries.iter().zip(messages).zip(verdicts) {
            let event_type = event_label(&msg.routing_key);
            match verdict {
                Verdict::Ack => {
                    self.count(event_type, "ok");
                    if let Some(id) = msg.escalation_id {
                        resolved.push(id);
                    }
                }
                Verdict::Escalate { step, error } => {
                    match escalation::record(&self.pool, self.service.name, step, msg, &error).await
                    {
                        Ok(_) => self.count(event_type, "escalated"),
                        Err(db_error) => {
                            // Cannot record it (database down): keep retrying.
                            warn!(error = %db_error, "could not record the escalation; retrying the compensation");
                            self.count(event_type, "retry");
                            self.retry(republisher, delivery, msg, &error).await?;
                        }
                    }
                }
                Verdict::Retry(error) => {
                    self.count(event_type, "retry");
                    self.retry(republisher, delivery, msg, &error).await?;
                }
                Verdict::Park { reason, label } => {
                    self.count(event_type, "parked");
                    metrics::counter!(metric::MESSAGES_PARKED,
                        "service" => self.service.name, "reason" => label)
                    .increment(1);
                    // Debug-formatted: both may quote what a sender wrote,
                    // so control characters are escaped, not printed.
                    warn!(reason = ?reason, message_id = ?msg.message_id,
                          event_type, "parking message");
                    self.park(republisher, delivery, msg, &reason).await?;
                }
            }
        }
        if crate::failpoints::is_set("consumer::before_ack") {
            self.publisher.wait_settled().await;
            crate::failpoints::crash("consumer::before_ack");
        }
        if let Some(last) = deliveries.last() {
            // On the consuming channel itself, not through the delivery's
            // `Acker`, which hands the ack to lapin's internal RPC task that
            // then sends it on this channel: a task hop and a wake-up of
            // lapin's I/O thread saved per batch (4 % fewer context switches
            // in the services at one saga at a time, 2-5 % less of their CPU
            // at 272 sagas/s; docs/benchmarks.md).
            let acked = channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await;
            if let Err(error) = acked {
                // The channel is gone: the broker re-delivers the batch and
                // the handler recognises what it already applied.
                let nack = channel.basic_nack(
                    last.delivery_tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                );
                let _ = tokio::time::timeout(Duration::from_secs(5), nack).await;
                return Err(error);
            }
        }
        for id in resolved {
            if let Err(error) = escalation::resolve(&self.pool, id).await {
                warn!(%error, escalation_id = %id, "could not mark the escalation resolved");
            }
        }
        Ok(())
    }

    fn count(&self, event_type: &'static str, outcome: &'static str) {
        metrics::counter!(metric::MESSAGES_HANDLED,
            "service" => self.service.name, "event_type" => event_type, "outcome" => outcome)
        .increment(1);
    }

    /// Re-publishes to the delay tier for the next attempt.
    async fn retry(
        &self,
        republisher: &Channel,
        delivery: &Delivery,
        msg: &Incoming,
        error: &str,
    ) -> Result<(), lapin::Error> {
        let tier = retry::tier_for(msg.attempt);
        let delay = retry::delay_for(msg.attempt);
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
            .with_user_id(self.settings.trust.own_user().into())
            .with_expiration(delay.as_millis().to_string().into());
        let queue = self.service.retry_queue(tier);
        self.overflow_checked(
            republish(republisher, &queue, &msg.body, props).await,
            &queue,
            "retry",
        )
    }

    /// A refused re-publish (a full queue) is counted and logged, and fails
    /// the batch: its messages stay unacked, are delivered again, and are
    /// never dropped.
    fn overflow_checked(
        &self,
        outcome: Result<(), RepublishError>,
        queue: &str,
        kind: &'static str,
    ) -> Result<(), lapin::Error> {
        match outcome {
            Ok(()) => Ok(()),
            Err(RepublishError::Amqp(error)) => Err(error),
            Err(RepublishError::Refused) => {
                metrics::counter!(metric::QUEUE_OVERFLOWS,
                    "service" => self.service.name, "queue" => kind)
                .increment(1);
                tracing::error!(
                    service = self.service.name,
                    queue,
                    "queue is full: the message stays in the work queue until it has room"
                );
                Err(amqp_error(format!("{queue} is full")))
            }
        }
    }

    /// Re-publishes to the parking queue with the reason.
    async fn park(
        &self,
        republisher: &Channel,
        delivery: &Delivery,
        msg: &Incoming,
        reason: &str,
    ) -> Result<(), lapin::Error> {
        let mut headers = copied_headers(delivery);
        headers.insert(H_PARKED_REASON.into(), long_str(&truncate(reason, 4000)));
        headers.insert(H_PARKED_BY.into(), long_str(self.service.name));
        headers.insert(
            H_PARKED_AT.into(),
            long_str(&chrono::Utc::now().to_rfc3339()),
        );
        headers.insert(
            H_PARKED_SENDER.into(),
            long_str(msg.sender.as_deref().unwrap_or("")),
        );
        // Re-published as this service (the broker only accepts our own
        // user id); who sent it first is in x-parked-sender.
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_user_id(self.settings.trust.own_user().into());
        let queue = self.service.parking_queue();
        // Nothing parked keeps card data (PCI DSS: no CVV at rest).
        let body = crate::saga::card::redact_message(&msg.body);
        self.overflow_checked(
            republish(republisher, &queue, &body, props).await,
            &queue,
            "parking",
        )
    }
}

/// Publishes `body` to `queue` through the default exchange and waits for
/// the broker's confirm.
async fn republish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), RepublishError> {
    let confirm = channel
        .basic_publish(
            ShortString::from(""),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await?
        .await?;
    match confirm {
        lapin::Confirmation::Ack(None) | lapin::Confirmation::NotRequested => Ok(()),
        lapin::Confirmation::Nack(_) => Err(RepublishError::Refused),
        lapin::Confirmation::Ack(Some(_)) => Err(RepublishError::Amqp(amqp_error(format!(
            "re-publish to {queue} was unroutable"
        )))),
    }
}

/// Why a re-publish did not happen.
enum RepublishError {
    /// The queue is full (`reject-publish`): the broker nacked it.
    Refused,
    Amqp(lapin::Error),
}

impl From<lapin::Error> for RepublishError {
    fn from(e: lapin::Error) -> Self {
        RepublishError::Amqp(e)
    }
}

/// What the consumer reads of a body before any handler does: the
/// envelope's type and age (both absent for bodies that are not envelopes,
/// which the handler then refuses).
#[derive(Default, serde::Deserialize)]
struct MessageHead {
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    occurred_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl MessageHead {
    fn read(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_default()
    }

    /// How old the envelope is (by its `occurred_at`).
    fn age(&self) -> Option<Duration> {
        (chrono::Utc::now() - self.occurred_at?).to_std().ok()
    }
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
            H_ORIGINAL_EXCHANGE.into(),
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
