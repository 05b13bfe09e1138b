//! What becomes of each message of a batch, decided without the broker:
//! screened (size, sender, age), handled as one unit of work (apart, if it
//! may have crashed the process: [`crash_loop`]),
//! handled again one message at a time if the batch fails as a whole, and a
//! [`Verdict`] per message. The consumer ([`crate::messaging::consumer`])
//! takes the deliveries and carries the verdicts out on the broker; the
//! interleaving checker (`tests/tests/interleaving`) drives this very code
//! against a model of the broker.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use sqlx::PgPool;
use tracing::debug;

use crate::messaging::crash_loop;
use crate::messaging::delivery::Incoming;
use crate::messaging::events::{EXCHANGE, EventType};
use crate::messaging::handler::{HandlerError, MessageHandler, MessageResult};
use crate::messaging::publisher::Publisher;
use crate::messaging::topology::ServiceIdentity;
use crate::messaging::trust::{ProducerTrust, Untrusted};
use crate::messaging::unit_of_work::UnitOfWork;
use crate::metric_definitions as metric;
use crate::store::pool as db;

/// What marks the message a test wants to crash the process on (with the
/// `judge::crash_on_marked` failpoint): found anywhere in its body.
pub const CRASH_MARK: &[u8] = b"crash-the-process";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Messages larger than this are parked unread.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What becomes of one delivery.
#[derive(Debug)]
pub enum Verdict {
    Ack,
    Retry(String),
    Park { reason: String, label: &'static str },
    Escalate { step: &'static str, error: String },
}

impl Verdict {
    /// The `outcome` label of what becomes of the message.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Ack => "ok",
            Verdict::Retry(_) => "retry",
            Verdict::Park { .. } => "parked",
            Verdict::Escalate { .. } => "escalated",
        }
    }
}

/// What the judge needs to know of the consumer's settings.
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// Messages older than this are refused (parked): the service may no
    /// longer remember whether they were applied. See [`crate::store::retention`].
    pub replay_window: Duration,
    /// A batch (or a single message) whose handler runs longer than this is
    /// abandoned, rolled back, and its messages retried.
    pub handler_timeout: Duration,
    /// Which broker user may publish which event.
    pub trust: ProducerTrust,
}

/// Judges the batches of one service's queue.
pub struct Judge<H> {
    service: ServiceIdentity,
    pool: PgPool,
    publisher: Publisher,
    settings: JudgeSettings,
    handler: Arc<H>,
}

impl<H: MessageHandler> Judge<H> {
    pub fn new(
        service: ServiceIdentity,
        pool: PgPool,
        publisher: Publisher,
        settings: JudgeSettings,
        handler: Arc<H>,
    ) -> Self {
        Self {
            service,
            pool,
            publisher,
            settings,
            handler,
        }
    }

    /// The handler (its [`MessageHandler::compensation`] decides escalations).
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The verdict on every message: screened, then handled as a batch (and
    /// one by one if the batch fails). Messages delivered again after a
    /// possible crash are handled apart, as suspects (see
    /// [`crate::messaging::crash_loop`]).
    pub async fn judge(&self, messages: &[Incoming]) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = messages.iter().map(|m| self.screen(m)).collect();
        let (suspects, fresh): (Vec<usize>, Vec<usize>) = (0..messages.len())
            .filter(|&i| verdicts[i].is_none())
            .partition(|&i| messages[i].redelivered);
        if !fresh.is_empty() {
            self.judge_batch(messages, &fresh, &mut verdicts).await;
        }
        if !suspects.is_empty() {
            self.judge_suspects(messages, &suspects, &mut verdicts)
                .await;
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Ack))
            .collect()
    }

    /// Handles `work` (indices into `messages`) as one batch, and one by
    /// one if the batch fails.
    async fn judge_batch(
        &self,
        messages: &[Incoming],
        work: &[usize],
        verdicts: &mut [Option<Verdict>],
    ) {
        let picked;
        let batch: &[Incoming] = if work.len() == messages.len() {
            messages
        } else {
            picked = work
                .iter()
                .map(|&i| messages[i].clone())
                .collect::<Vec<_>>();
            &picked
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
                for &i in work {
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
    }

    /// Handles messages delivered again after a possible crash (see
    /// [`crate::messaging::crash_loop`]): those never suspected before
    /// together, the others each on its own, each counted (durably) just
    /// before it is handled; one counted twice already is the culprit,
    /// parked or escalated unhandled.
    async fn judge_suspects(
        &self,
        messages: &[Incoming],
        suspects: &[usize],
        verdicts: &mut [Option<Verdict>],
    ) {
        let ids: Vec<uuid::Uuid> = suspects
            .iter()
            .map(|&i| crash_loop::digest(&messages[i]))
            .collect();
        let counted = match crash_loop::counts(&self.pool, &ids).await {
            Ok(counted) => counted,
            Err(error) => return self.cannot_count(messages, suspects, &error, verdicts),
        };
        let (mut together, mut alone) = (Vec::new(), Vec::new());
        for (&i, id) in suspects.iter().zip(&ids) {
            if counted.contains_key(id) {
                alone.push((i, *id));
            } else {
                together.push((i, *id));
            }
        }
        if !together.is_empty() {
            let (work, group): (Vec<usize>, Vec<uuid::Uuid>) = together.into_iter().unzip();
            if let Err(error) = crash_loop::suspect(&self.pool, &group).await {
                return self.cannot_count(messages, &work, &error, verdicts);
            }
            metrics::counter!(metric::CONSUMER_SUSPECTS, "service" => self.service.name, "handled" => "together")
                .increment(work.len() as u64);
            self.judge_batch(messages, &work, verdicts).await;
            self.forget(&group).await;
        }
        for (i, id) in alone {
            let times = match crash_loop::suspect(&self.pool, &[id]).await {
                Ok(times) => times.get(&id).copied().unwrap_or(1),
                Err(error) => {
                    self.cannot_count(messages, &[i], &error, verdicts);
                    continue;
                }
            };
            if times > crash_loop::TIMES_BEFORE_PARKING {
                let reason = format!(
                    "it crashed the process {times} times, the last on its own: its handler \
                     keeps crashing the process"
                );
                verdicts[i] = Some(match self.handler.compensation(&messages[i].routing_key) {
                    Some(step) => Verdict::Escalate {
                        step,
                        error: reason,
                    },
                    None => Verdict::Park {
                        reason,
                        label: "crash_loop",
                    },
                });
            } else {
                metrics::counter!(metric::CONSUMER_SUSPECTS, "service" => self.service.name, "handled" => "alone")
                    .increment(1);
                self.judge_batch(messages, &[i], verdicts).await;
            }
            self.forget(&[id]).await;
        }
    }

    /// Suspects handled (or parked) without a crash: forgotten.
    async fn forget(&self, ids: &[uuid::Uuid]) {
        if let Err(error) = crash_loop::clear(&self.pool, ids).await {
            tracing::warn!(%error, "could not forget suspects handled without a crash");
        }
    }

    /// The database cannot count suspects: they are retried later.
    fn cannot_count(
        &self,
        messages: &[Incoming],
        work: &[usize],
        error: &sqlx::Error,
        verdicts: &mut [Option<Verdict>],
    ) {
        for &i in work {
            let failure = HandlerError::Db(sqlx::Error::Protocol(format!(
                "could not count a suspected crash: {error}"
            )));
            verdicts[i] = Some(self.verdict(&messages[i], Err(failure)));
        }
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
        // The type inside must be the routing key, spelled as it: a string.
        match &head.event_type {
            Some(inside)
                if event != EventType::OrderRequested
                    && inside.as_str() != Some(event.routing_key()) =>
            {
                Some((
                    format!(
                        "routing key {} does not match the envelope's event_type {}",
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
            if batch.iter().any(|m| contains(&m.body, CRASH_MARK))
                && crate::failpoints::is_set("judge::crash_on_marked")
            {
                crate::failpoints::crash("judge::crash_on_marked");
            }
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
}

/// What the consumer reads of a body before any handler does: the
/// envelope's type and age (both absent for bodies that are not JSON
/// objects, which the handler then refuses). A field that is there but of
/// the wrong shape is kept as such, never taken for absent.
#[derive(Default)]
struct MessageHead {
    event_type: Option<serde_json::Value>,
    occurred_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl MessageHead {
    fn read(body: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(default)]
            event_type: Option<serde_json::Value>,
            #[serde(default)]
            occurred_at: Option<serde_json::Value>,
        }
        let Ok(raw) = serde_json::from_slice::<Raw>(body) else {
            return MessageHead::default();
        };
        MessageHead {
            event_type: raw.event_type,
            occurred_at: raw
                .occurred_at
                .and_then(|at| serde_json::from_value(at).ok()),
        }
    }

    /// How old the envelope is (by its `occurred_at`).
    fn age(&self) -> Option<Duration> {
        (chrono::Utc::now() - self.occurred_at?).to_std().ok()
    }
}
