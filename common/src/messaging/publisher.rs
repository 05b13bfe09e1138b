//! The outbox's fast path: events are published right after the commit that
//! wrote them, by one task per process on one confirm channel.
//!
//! Committing tasks never wait for the broker: they hand their committed
//! events over ([`Publisher::publish_committed`]) and go on. The task sends
//! each hand-over's messages in one go (pipelined), collects the confirms as
//! they arrive, and passes the confirmed ids to the outbox's janitor, which
//! deletes their rows. Anything not confirmed — no broker at the moment, a
//! channel that died, a returned or nacked message, a full hand-over queue —
//! simply stays in the outbox, where the sweeper finds it. The fast path
//! can therefore drop work at any moment without losing a message.
//!
//! Transient hints (a decision for another replica's waiting request) go
//! the same way without touching the outbox: losing one costs latency only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::Channel;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::messaging::broker::Broker;
use crate::messaging::outbox::{
    Confirmed, OutboxMessage, Sender, confirmation_outcome, record_lag, send_all,
};
use crate::metric_definitions as metric;

/// Hand-overs queued for the publisher at most; beyond that, events wait
/// for the sweeper.
const QUEUE_CAPACITY: usize = 4096;

/// How long the publisher waits, at shutdown, for confirms still on their way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

enum Job {
    /// Events of a committed transaction (their rows are in the outbox).
    Committed {
        messages: Vec<OutboxMessage>,
        committed_at: Instant,
    },
    /// A hint that needs no durability.
    Transient(OutboxMessage),
}

/// Hands committed events to the publishing task (cheap to clone).
#[derive(Clone)]
pub struct Publisher {
    service: &'static str,
    jobs: mpsc::Sender<Job>,
    tally: Arc<Tally>,
}

/// Hand-overs of committed events, and how many the task has finished
/// (confirmed, or left to the sweeper).
#[derive(Default)]
struct Tally {
    handed: AtomicU64,
    settled: AtomicU64,
    changed: Notify,
}

impl Tally {
    fn settle_one(&self) {
        self.settled.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

impl Publisher {
    /// The handle and the task that does the publishing (run it with
    /// [`PublisherTask::run`]).
    pub fn new(
        service: &'static str,
        broker: Broker,
        confirmed: Confirmed,
    ) -> (Self, PublisherTask) {
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        let tally = Arc::new(Tally::default());
        (
            Self {
                service,
                jobs,
                tally: tally.clone(),
            },
            PublisherTask {
                service,
                broker,
                confirmed,
                queue,
                tally,
            },
        )
    }

    /// Publishes events whose outbox rows were just committed.
    pub fn publish_committed(&self, messages: Vec<OutboxMessage>) {
        if messages.is_empty() {
            return;
        }
        let n = messages.len();
        let job = Job::Committed {
            messages,
            committed_at: Instant::now(),
        };
        if self.jobs.try_send(job).is_ok() {
            self.tally.handed.fetch_add(1, Ordering::AcqRel);
        } else {
            metrics::counter!(metric::OUTBOX_FAST_PATH_SKIPPED, "service" => self.service)
                .increment(n as u64);
        }
    }

    /// Waits until everything handed over so far is settled: confirmed by
    /// the broker, or left to the sweeper.
    pub async fn wait_settled(&self) {
        let target = self.tally.handed.load(Ordering::Acquire);
        loop {
            let changed = self.tally.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.tally.settled.load(Ordering::Acquire) >= target {
                return;
            }
            changed.await;
        }
    }

    /// Publishes a transient message (not persistent, not in the outbox).
    pub fn publish_transient(&self, message: OutboxMessage) {
        let _ = self.jobs.try_send(Job::Transient(message));
    }
}

/// The publishing task of a process.
pub struct PublisherTask {
    service: &'static str,
    broker: Broker,
    confirmed: Confirmed,
    queue: mpsc::Receiver<Job>,
    tally: Arc<Tally>,
}

/// The confirms of one hand-over: (committed ids or none for a transient
/// message, when it was committed, the outcome of each).
type ConfirmsOf = (
    Vec<Uuid>,
    Option<Instant>,
    Result<Vec<Result<(), String>>, lapin::Error>,
);

impl PublisherTask {
    /// Publishes hand-overs until `stop` fires; then publishes what is
    /// queued, waits (boundedly) for the confirms on their way, and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut channel: Option<Channel> = None;
        let mut confirms = FuturesUnordered::new();
        let mut stopping = false;
        loop {
            tokio::select! {
                biased;
                Some(done) = confirms.next(), if !confirms.is_empty() => {
                    if self.settle(done) {
                        channel = None;
                    }
                }
                job = self.queue.recv() => {
                    let Some(job) = job else { break };
                    let (messages, ids, committed_at, persistent) = match job {
                        Job::Committed { messages, committed_at } => {
                            let ids = messages.iter().map(|m| m.id).collect();
                            (messages, ids, Some(committed_at), true)
                        }
                        Job::Transient(m) => (vec![m], Vec::new(), None, false),
                    };
                    let sent = self.send(&mut channel, &messages, persistent).await;
                    let service = self.service;
                    match sent {
                        Some(pending) => confirms.push(async move {
                            let mut outcomes = Vec::with_capacity(pending.len());
                            for (m, confirm) in messages.iter().zip(pending) {
                                match confirm.await {
                                    Ok(c) => outcomes.push(confirmation_outcome(service, m, c)),
                                    Err(e) => return (ids, committed_at, Err(e)),
                                }
                            }
                            (ids, committed_at, Ok(outcomes))
                        }),
                        None => {
                            self.skipped(&ids);
                            if committed_at.is_some() {
                                self.tally.settle_one();
                            }
                        }
                    }
                }
                _ = stop.cancelled(), if !stopping => {
                    // No new hand-overs; publish what is queued, then end.
                    stopping = true;
                    self.queue.close();
                }
            }
        }
        let drain = async {
            while let Some(done) = confirms.next().await {
                self.settle(done);
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            warn!(
                service = self.service,
                "confirms still missing at shutdown; the sweeper will re-send those rows"
            );
        }
        if let Some(ch) = channel {
            let _ = ch.close(200, "publisher stopping".into()).await;
        }
    }

    /// Sends on the current channel, or on a fresh one if it is gone (a
    /// reconnect replaces the connection under it); `None` if no broker.
    async fn send(
        &self,
        channel: &mut Option<Channel>,
        messages: &[OutboxMessage],
        persistent: bool,
    ) -> Option<Vec<lapin::PublisherConfirm>> {
        for _ in 0..2 {
            if channel.as_ref().is_some_and(|c| !c.status().connected()) {
                *channel = None;
            }
            if channel.is_none() {
                *channel = self.open_channel().await;
            }
            let ch = channel.as_ref()?;
            let sender = Sender {
                service: self.service,
                user: self.broker.user(),
            };
            match send_all(ch, sender, messages, persistent).await {
                Ok(pending) => return Some(pending),
                Err(error) => {
                    debug!(service = self.service, %error, "publisher channel failed; opening another");
                    *channel = None;
                }
            }
        }
        warn!(
            service = self.service,
            "publisher cannot send; the sweeper will send what is left"
        );
        None
    }

    async fn open_channel(&self) -> Option<Channel> {
        let conn = self.broker.current()?;
        match Broker::confirm_channel(&conn).await {
            Ok(ch) => Some(ch),
            Err(error) => {
                warn!(service = self.service, %error, "publisher could not open a channel");
                self.broker.report_broken(&conn);
                None
            }
        }
    }

    fn skipped(&self, ids: &[Uuid]) {
        if !ids.is_empty() {
            metrics::counter!(metric::OUTBOX_FAST_PATH_SKIPPED, "service" => self.service)
                .increment(ids.len() as u64);
        }
    }

    /// Records a hand-over's confirms; true if its channel failed.
    fn settle(&self, confirms: ConfirmsOf) -> bool {
        let committed = confirms.1.is_some();
        let broken = self.record(confirms);
        if committed {
            self.tally.settle_one();
        }
        broken
    }

    fn record(&self, (ids, committed_at, outcome): ConfirmsOf) -> bool {
        match outcome {
            Ok(outcomes) => {
                let mut ok = Vec::with_capacity(ids.len());
                for (id, outcome) in ids.iter().zip(&outcomes) {
                    match outcome {
                        Ok(()) => ok.push(*id),
                        // Left in the outbox: the sweeper retries it with
                        // back-off and logs why.
                        Err(reason) => {
                            debug!(service = self.service, %id, %reason, "fast path not accepted")
                        }
                    }
                }
                if let Some(at) = committed_at {
                    record_lag(self.service, at, ok.len());
                    metrics::counter!(metric::OUTBOX_PUBLISHED, "service" => self.service, "path" => "fast")
                        .increment(ok.len() as u64);
                }
                self.confirmed.push(ok);
                false
            }
            Err(error) => {
                warn!(service = self.service, %error, "confirms lost with the channel; the sweeper will send those rows");
                self.skipped(&ids);
                true
            }
        }
    }
}
