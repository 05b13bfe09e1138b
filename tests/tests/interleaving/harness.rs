//! What every service's checker shares: a laboratory (the service's own
//! database, created for the run, and its real handler behind the real
//! [`Judge`]), a model of the broker's queue (deliveries, batches,
//! redeliveries, retries), and the proptest runner that makes a failure
//! deterministic and minimal.
//!
//! The broker model delivers what is ready in order, a batch at a time, and
//! carries out each verdict as the consumer does on RabbitMQ: an ack
//! removes the message, a retry puts it back at the end of the queue with
//! one attempt more (published by the service itself, as a delay queue
//! returns it), a park or an escalation takes it out for good. Two faults
//! can hit a batch: the process crashes after the commit and before the
//! ack (every message of the batch is delivered again, counted as a
//! redelivery by the broker), or the answer to the COMMIT is lost after it
//! took effect (the `unit_of_work::commit_lost` failpoint: the batch
//! fails, and the judge handles its messages again one at a time).

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;

use common::messaging::broker::Broker;
use common::messaging::delivery::{
    H_ORIGINAL_EXCHANGE, H_ORIGINAL_ROUTING_KEY, H_RETRY_ATTEMPT, Incoming,
};
use common::messaging::envelope::SagaContext;
use common::messaging::handler::MessageHandler;
use common::messaging::judge::{Judge, JudgeSettings, Verdict};
use common::messaging::outbox::{Confirmed, OutboxMessage};
use common::messaging::publisher::Publisher;
use common::messaging::topology::{QueueType, ServiceIdentity};
use common::messaging::trust::ProducerTrust;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use saga_tests::Sandbox;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use uuid::Uuid;

/// The broker user every event of a checker is published as (the services
/// all trust it: one shared user, as on a development machine).
pub const USER: &str = "checker";

/// Attempts before a failing message is given up on (as configured).
pub const MAX_ATTEMPTS: u32 = 5;

/// Serialises the checkers of this binary: the commit-lost failpoint is
/// process-wide.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the histories of a run made the service do (events committed,
/// verdicts), counted: the report says what was explored.
static COVERAGE: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one `what` for the run's report.
pub fn cover(what: &str) {
    if let Ok(mut c) = COVERAGE.lock() {
        *c.entry(what.to_owned()).or_default() += 1;
    }
}

fn take_coverage() -> String {
    let mut c = COVERAGE
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default();
    let parts: Vec<String> = std::mem::take(&mut c)
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    parts.join(", ")
}

/// How many histories each checker tries: `CHECKER_CASES`, or a number
/// that fits the CI budget.
pub fn cases(default: u32) -> u32 {
    std::env::var("CHECKER_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The seed of the run: `CHECKER_SEED` (a number), or a fixed one, so that
/// CI explores the same histories every time and a failure reproduces.
pub fn seed() -> u64 {
    std::env::var("CHECKER_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0x5a6a_2026)
}

/// Runs `check` on `cases` histories drawn from `strategy` (in a runtime of
/// its own per case); on a failure, shrinks it and panics with the minimal
/// history and the seed that reproduces it.
pub fn explore<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), String>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    let cases = cases(default_cases);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let started = std::time::Instant::now();
    take_coverage();
    let outcome = runner.run(&strategy, |case| check(case).map_err(TestCaseError::fail));
    match outcome {
        Ok(()) => eprintln!(
            "{name}: {cases} histories, no violation ({:.1} s; CHECKER_SEED={seed}); they made: {}",
            started.elapsed().as_secs_f64(),
            take_coverage()
        ),
        Err(TestError::Fail(why, minimal)) => panic!(
            "{name}: a violation — {why}\nminimal history (CHECKER_SEED={seed} CHECKER_CASES={cases} reproduces it):\n{minimal:#?}"
        ),
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    }
}

/// Draws one value (for a unit test of a strategy).
#[allow(dead_code)]
pub fn sample<S: Strategy>(strategy: &S) -> S::Value {
    let mut runner = TestRunner::deterministic();
    strategy.new_tree(&mut runner).expect("a value").current()
}

/// A service's database for the run (its migrations applied) and its
/// handler behind the real judge. Removed with the sandbox.
pub struct Lab<H> {
    pub sandbox: Sandbox,
    pub pool: PgPool,
    pub publisher: Publisher,
    pub judge: Judge<H>,
}

impl<H: MessageHandler> Lab<H> {
    pub async fn new(
        service: ServiceIdentity,
        database: saga_tests::Svc,
        migrator: &Migrator,
        handler: impl FnOnce(PgPool, Publisher) -> H,
    ) -> Lab<H> {
        let sandbox = Sandbox::new().await;
        let pool =
            common::store::pool::connect_and_migrate(&sandbox.database_url(database), 4, migrator)
                .await
                .expect("the service's database");
        // Never run: what a batch commits stays in the outbox, where the
        // checker reads it (the relay's own tests prove that the outbox
        // gets published).
        let broker = Broker::new(
            sandbox.amqp_url.clone(),
            "checker".to_owned(),
            QueueType::Quorum,
        );
        let (publisher, _task) = Publisher::new(service.name, broker, Confirmed::default());
        let handler = Arc::new(handler(pool.clone(), publisher.clone()));
        let judge = Judge::new(
            service,
            pool.clone(),
            publisher.clone(),
            JudgeSettings {
                replay_window: std::time::Duration::from_secs(3600),
                handler_timeout: std::time::Duration::from_secs(10),
                trust: ProducerTrust::new(USER, None).expect("trust"),
            },
            handler,
        );
        Lab {
            sandbox,
            pool,
            publisher,
            judge,
        }
    }

    /// Where the outbox ends now: a history reads only what it committed.
    pub async fn outbox_end(&self) -> i64 {
        sqlx::query_scalar("select coalesce(max(seq), 0) from outbox")
            .fetch_one(&self.pool)
            .await
            .expect("read the outbox")
    }

    /// Every event the service committed after `since` (an
    /// [`Lab::outbox_end`]), oldest first.
    pub async fn outbox(&self, since: i64) -> Vec<Committed> {
        let rows: Vec<(String, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "select routing_key, correlation_id, body from outbox where seq > $1 order by seq",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .expect("read the outbox");
        rows.into_iter()
            .map(|(routing_key, correlation_id, body)| {
                let body: serde_json::Value =
                    serde_json::from_slice(&body.unwrap_or_default()).unwrap_or_default();
                Committed {
                    routing_key,
                    order_id: body["order_id"].as_str().and_then(|s| s.parse().ok()),
                    correlation_id,
                    status: body["status"].as_str().map(str::to_owned),
                }
            })
            .collect()
    }

    pub async fn close(self) {
        self.pool.close().await;
        self.sandbox.close().await;
    }
}

/// Counts what a history made the service commit, for the report.
pub fn cover_committed(events: &[Committed]) {
    for e in events {
        match e.status.as_deref() {
            Some(status) if e.routing_key.starts_with("replies-") => {
                cover(&format!("{status} replies"))
            }
            _ => cover(&e.routing_key),
        }
    }
}

/// An event in the service's outbox.
#[derive(Debug, Clone)]
pub struct Committed {
    pub routing_key: String,
    pub order_id: Option<Uuid>,
    pub correlation_id: Option<String>,
    /// A reply's result: `success`, `failure` or `pending`.
    pub status: Option<String>,
}

/// A message as a publisher sent it: delivered for the first time.
pub fn incoming(message: &OutboxMessage) -> Incoming {
    Incoming {
        routing_key: message.routing_key.clone(),
        message_id: Some(message.id.to_string()),
        correlation_id: message.correlation_id.clone(),
        reply_to: None,
        message_type: Some(message.message_type.clone()),
        traceparent: None,
        body: message.body.clone(),
        attempt: 1,
        max_attempts: MAX_ATTEMPTS,
        escalation_id: None,
        delivery_count: 0,
        redelivered: false,
        sender: Some(USER.to_owned()),
        control_headers: Vec::new(),
    }
}

/// What can go wrong with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The process crashes after the commit, before the ack.
    CrashBeforeAck,
    /// The COMMIT takes effect and its answer is lost.
    CommitLost,
    /// The process dies in the middle of the batch: after what the handler
    /// did outside its transaction (an email handed to a relay), before the
    /// commit.
    CrashBeforeCommit,
}

pub fn fault() -> impl Strategy<Value = Fault> {
    proptest::prop_oneof![
        8 => proptest::strategy::Just(Fault::None),
        1 => proptest::strategy::Just(Fault::CrashBeforeAck),
        1 => proptest::strategy::Just(Fault::CommitLost),
    ]
}

/// What became of one delivery of a batch.
#[derive(Debug)]
pub struct Outcome {
    pub message: Incoming,
    pub verdict: Verdict,
    /// The process crashed before the ack: the verdict was not carried out
    /// and the message is delivered again.
    pub crashed: bool,
}

/// The queue of one service, as the broker keeps it.
pub struct Queue {
    ready: VecDeque<Incoming>,
    /// Messages taken out for good: parked or escalated, with the reason.
    pub dead: Vec<(Incoming, String)>,
    /// RabbitMQ 3.x's rule: every return of a delivery (a crash) counts
    /// one more delivery; 4.x counts none when a channel closes.
    pub counts_returns: bool,
    /// A batch not judged within this long has crashed the process.
    pub crash_after: std::time::Duration,
    /// How many batches that crashed the process each message (by digest)
    /// was in: one that went through three may be parked as a crash loop
    /// (the service cannot tell bad luck from a culprit).
    pub crashes: HashMap<Uuid, usize>,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            ready: VecDeque::new(),
            dead: Vec::new(),
            counts_returns: true,
            crash_after: std::time::Duration::from_secs(20),
            crashes: HashMap::new(),
        }
    }
}

impl Queue {
    pub fn publish(&mut self, message: Incoming) {
        self.ready.push_back(message);
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ready.len()
    }

    /// Delivers up to `size` ready messages as one batch, judges it and
    /// carries out the verdicts (or not, if the process crashes).
    pub async fn deliver<H: MessageHandler>(
        &mut self,
        judge: &Judge<H>,
        size: usize,
        fault: Fault,
    ) -> Vec<Outcome> {
        let n = size.max(1).min(self.ready.len());
        let batch: Vec<Incoming> = self.ready.drain(..n).collect();
        if batch.is_empty() {
            return Vec::new();
        }
        let failpoint = match fault {
            Fault::CommitLost => Some(("unit_of_work::commit_lost", "1*return")),
            Fault::CrashBeforeCommit => Some(("unit_of_work::before_commit", "return")),
            _ => None,
        };
        if let Some((name, actions)) = failpoint {
            fail::cfg(name, actions).expect("failpoint");
        }
        let judged = tokio::time::timeout(
            if fault == Fault::CrashBeforeCommit {
                std::time::Duration::from_millis(60)
            } else {
                self.crash_after
            },
            judge.judge(&batch),
        )
        .await;
        if let Some((name, _)) = failpoint {
            fail::remove(name);
        }
        let (verdicts, crashed) = match judged {
            Ok(verdicts) => (verdicts, fault == Fault::CrashBeforeAck),
            // Died before the commit (or the batch never finished): nothing
            // of it was committed or settled.
            Err(_) => (
                batch
                    .iter()
                    .map(|_| Verdict::Retry("the process died in the batch".into()))
                    .collect(),
                true,
            ),
        };
        if crashed {
            let digests: std::collections::HashSet<Uuid> = batch
                .iter()
                .map(common::messaging::crash_loop::digest)
                .collect();
            for digest in digests {
                *self.crashes.entry(digest).or_default() += 1;
            }
            // Returned to the head of the queue, in order, each counted as
            // delivered once more.
            for message in batch.iter().rev() {
                let mut again = message.clone();
                again.redelivered = true;
                if self.counts_returns {
                    again.delivery_count += 1;
                }
                self.ready.push_front(again);
            }
        }
        cover(match fault {
            Fault::None => "batches",
            Fault::CrashBeforeAck => "crashes before the ack",
            Fault::CommitLost => "COMMIT answers lost",
            Fault::CrashBeforeCommit => "crashes before the commit",
        });
        let mut outcomes = Vec::with_capacity(batch.len());
        for (message, verdict) in batch.into_iter().zip(verdicts) {
            if !crashed {
                cover(&format!("{} {}", message.routing_key, verdict.label()));
            }
            if !crashed {
                match &verdict {
                    Verdict::Ack => {}
                    Verdict::Retry(_) => self.ready.push_back(retried(&message)),
                    Verdict::Park { reason, .. } => {
                        self.dead.push((message.clone(), reason.clone()))
                    }
                    Verdict::Escalate { error, .. } => {
                        self.dead.push((message.clone(), error.clone()))
                    }
                }
            }
            outcomes.push(Outcome {
                message,
                verdict,
                crashed,
            });
        }
        outcomes
    }
}

/// The message as it comes back from a delay queue: one attempt more,
/// re-published by the service itself with its control headers.
fn retried(message: &Incoming) -> Incoming {
    let mut again = message.clone();
    again.attempt += 1;
    again.delivery_count = 0;
    again.redelivered = false;
    again.control_headers = vec![H_RETRY_ATTEMPT, H_ORIGINAL_ROUTING_KEY, H_ORIGINAL_EXCHANGE];
    again
}

/// A history being played: the messages sent so far, the queue, what
/// happened (for the report of a violation), and the orders whose rollback
/// was handled.
pub struct Player<'a, H> {
    pub lab: &'a Lab<H>,
    pub queue: Queue,
    pub orders: Vec<Uuid>,
    sent: Vec<Incoming>,
    log: Vec<String>,
    /// Where the outbox ended when the history began.
    since: i64,
    /// Orders whose rollback was handled (acked), with how many events the
    /// outbox held then.
    pub rolled_back: HashMap<Uuid, usize>,
    /// Messages acked, by order and routing key.
    pub acked: HashMap<(Uuid, String), usize>,
    /// Every message acked, in order, with how many events the outbox held
    /// then.
    pub acked_log: Vec<(Incoming, usize)>,
    rest_rounds: usize,
}

impl<'a, H: MessageHandler> Player<'a, H> {
    pub async fn new(lab: &'a Lab<H>, orders: usize) -> Player<'a, H> {
        Player {
            lab,
            queue: Queue::default(),
            orders: (0..orders).map(|_| Uuid::now_v7()).collect(),
            sent: Vec::new(),
            log: Vec::new(),
            since: lab.outbox_end().await,
            rolled_back: HashMap::new(),
            acked: HashMap::new(),
            acked_log: Vec::new(),
            rest_rounds: 0,
        }
    }

    /// Notes what happened.
    pub fn note(&mut self, what: String) {
        self.log.push(what);
    }

    /// The violation, with what led to it.
    pub fn explain(&self, violation: String) -> String {
        format!("{violation}\nwhat happened:\n  {}", self.log.join("\n  "))
    }

    /// Publishes a message to the service's queue.
    pub fn send(&mut self, message: &OutboxMessage) {
        self.send_incoming(incoming(message));
    }

    /// Publishes a delivery as given (a client's `order.requested`, say).
    pub fn send_incoming(&mut self, incoming: Incoming) {
        self.log
            .push(format!("send {}", describe(&incoming, &self.orders)));
        self.sent.push(incoming.clone());
        self.queue.publish(incoming);
    }

    /// Publishes a copy of the `nth` message sent so far (modulo), same id.
    pub fn resend(&mut self, nth: usize) {
        if self.sent.is_empty() {
            return;
        }
        let again = self.sent[nth % self.sent.len()].clone();
        self.log
            .push(format!("send a copy of {}", describe(&again, &self.orders)));
        self.queue.publish(again);
    }

    /// Every event the service committed in this history, oldest first.
    pub async fn outbox(&self) -> Vec<Committed> {
        self.lab.outbox(self.since).await
    }

    /// Delivers a batch and notes what became of it.
    pub async fn deliver(&mut self, size: usize, fault: Fault) -> Vec<Outcome> {
        let outcomes = self.queue.deliver(&self.lab.judge, size, fault).await;
        if outcomes.is_empty() {
            return outcomes;
        }
        let described: Vec<String> = outcomes
            .iter()
            .map(|o| {
                format!(
                    "{} → {}",
                    describe(&o.message, &self.orders),
                    verdict(&o.verdict)
                )
            })
            .collect();
        self.log.push(format!(
            "deliver a batch{}: [{}]",
            match fault {
                Fault::None => "",
                Fault::CrashBeforeAck => " (crash before the ack)",
                Fault::CommitLost => " (the COMMIT's answer lost)",
                Fault::CrashBeforeCommit => " (crash before the commit)",
            },
            described.join(", ")
        ));
        let committed = self.outbox().await.len();
        for o in &outcomes {
            if o.crashed || !matches!(o.verdict, Verdict::Ack) {
                continue;
            }
            self.acked_log.push((o.message.clone(), committed));
            let Some(order_id) = order_of(&o.message) else {
                continue;
            };
            *self
                .acked
                .entry((order_id, o.message.routing_key.clone()))
                .or_default() += 1;
            if matches!(
                o.message.routing_key.as_str(),
                "order.failed" | "order.cancelled"
            ) {
                self.rolled_back.entry(order_id).or_insert(committed);
            }
        }
        outcomes
    }

    /// Delivers one more batch of what is left (no fault); false once
    /// nothing is left (or the history is taking too long to settle).
    pub async fn deliver_rest(&mut self) -> bool {
        if self.queue.is_empty() || self.rest_rounds >= 200 {
            return false;
        }
        self.rest_rounds += 1;
        self.deliver(8, Fault::None).await;
        true
    }

    /// Fails if a message never settled, or ended parked or escalated —
    /// but for one that was in three batches the process crashed on, which
    /// it may park as a crash loop (it cannot tell bad luck from a culprit).
    pub async fn finish(&self) -> Result<(), String> {
        cover_committed(&self.outbox().await);
        ensure(self.queue.is_empty(), || {
            self.explain(format!("{} messages never settled", self.queue.len()))
        })?;
        let dead: Vec<String> = self
            .queue
            .dead
            .iter()
            .filter(|(m, why)| {
                !(why.contains("keeps crashing the process")
                    && self
                        .queue
                        .crashes
                        .get(&common::messaging::crash_loop::digest(m))
                        .is_some_and(|n| *n >= 3))
            })
            .map(|(m, why)| format!("{} ({why})", describe(m, &self.orders)))
            .collect();
        ensure(dead.is_empty(), || {
            self.explain(format!("messages parked or escalated: {dead:?}"))
        })
    }

    /// Whether `key` for `order_id` is in the outbox after its rollback was
    /// handled.
    pub fn after_rollback(&self, outbox: &[Committed], order_id: Uuid, key: &str) -> bool {
        self.rolled_back.get(&order_id).is_some_and(|&then| {
            outbox[then.min(outbox.len())..]
                .iter()
                .any(|e| e.order_id == Some(order_id) && e.routing_key == key)
        })
    }

    /// How many events of `key` for `order_id` the outbox holds.
    pub fn count(outbox: &[Committed], order_id: Uuid, key: &str) -> usize {
        outbox
            .iter()
            .filter(|e| e.order_id == Some(order_id) && e.routing_key == key)
            .count()
    }
}

/// Waits (10 s at most) until `condition` holds.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The context of an event the checker sends for `order_id`: its deadline
/// a minute away, or already past if `expired`.
pub fn context(order_id: Uuid, expired: bool, cause: &str) -> SagaContext {
    let now = chrono::Utc::now();
    SagaContext {
        order_id,
        deadline_at: if expired {
            now - chrono::Duration::seconds(1)
        } else {
            now + chrono::Duration::seconds(60)
        },
        causation_id: format!("{cause}:{order_id}"),
        producer: "checker",
        trail: Vec::new(),
    }
}

/// Fails the check with `what` unless `ok`.
pub fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// The order a message is about.
pub fn order_of(message: &common::messaging::delivery::Incoming) -> Option<Uuid> {
    serde_json::from_slice::<serde_json::Value>(&message.body)
        .ok()
        .and_then(|v| v["order_id"].as_str().and_then(|s| s.parse().ok()))
}

/// A message, for the log of a history: its type, its order's number in
/// the history, and how often it came back.
pub fn describe(message: &common::messaging::delivery::Incoming, orders: &[Uuid]) -> String {
    let n = order_of(message)
        .and_then(|id| orders.iter().position(|o| *o == id))
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    let mut s = format!("{} #{n}", message.routing_key);
    if message.delivery_count > 0 {
        s.push_str(&format!(" (redelivered {}×)", message.delivery_count));
    }
    if message.attempt > 1 {
        s.push_str(&format!(" (attempt {})", message.attempt));
    }
    s
}

/// A verdict, for the log of a history.
pub fn verdict(v: &Verdict) -> String {
    match v {
        Verdict::Ack => "ack".to_owned(),
        Verdict::Retry(why) => format!("retry ({why})"),
        Verdict::Park { reason, .. } => format!("parked ({reason})"),
        Verdict::Escalate { error, .. } => format!("escalated ({error})"),
    }
}
