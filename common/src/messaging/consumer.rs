//! The consumer loop every service runs on its queue, one batch at a time.
//!
//! It takes the deliveries that are ready (the first one waited for, the
//! rest only if already here, up to `batch_size`), has the [`Judge`] run the
//! service's handler on the whole batch in one unit of work (one
//! transaction, set-based statements, one commit), then carries out each
//! message's [`Verdict`]:
//! - `Ack` → acked (one `multiple` ack for the batch, after the commit);
//! - `Retry` → re-published to a delay queue with exponential backoff and
//!   jitter, then acked;
//! - `Park` → re-published to the service's parking queue with the reason
//!   in `x-parked-reason`, then acked;
//! - `Escalate` → recorded for an operator (a compensation that must happen
//!   whatever it takes), then acked.
//!
//! Every re-publish waits for its publisher confirm before the ack, so a
//! crash in between re-delivers the original, which the handler recognises
//! as a duplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, info_span, warn};

use crate::messaging::broker::{Broker, SETUP_TIMEOUT, timeout_error};
use crate::messaging::delivery::{
    H_LAST_ERROR, H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY, H_PARKED_AT, H_PARKED_BY,
    H_PARKED_REASON, H_PARKED_SENDER, H_RETRY_ATTEMPT, Incoming,
};
use crate::messaging::escalation;
use crate::messaging::events::{EventType, REQUEUE_EXCHANGE};
use crate::messaging::fault::FaultDelay;
use crate::messaging::handler::MessageHandler;
use crate::messaging::judge::{Judge, JudgeSettings, Verdict};
use crate::messaging::publisher::Publisher;
use crate::messaging::retry;
use crate::messaging::topology::ServiceIdentity;
use crate::messaging::trust::ProducerTrust;
use crate::metric_definitions as metric;
use crate::runtime::traces;

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
    judge: Judge<H>,
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
        let judge = Judge::new(
            service,
            pool.clone(),
            publisher.clone(),
            JudgeSettings {
                replay_window: settings.replay_window,
                handler_timeout: settings.handler_timeout,
                trust: settings.trust.clone(),
            },
            handler,
        );
        Self {
            service,
            broker,
            pool,
            publisher,
            settings,
            judge,
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
            let verdicts = self.judge.judge(&messages).await;
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

/// Publishes `body` back into one of this service's own `queue`s (through
/// [`REQUEUE_EXCHANGE`], by the queue's name) and waits for the broker's
/// confirm.
async fn republish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), RepublishError> {
    let confirm = channel
        .basic_publish(
            REQUEUE_EXCHANGE.into(),
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
