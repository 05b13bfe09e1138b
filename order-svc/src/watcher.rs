//! The timeout watcher: fails every saga still undecided at its deadline
//! (reason: the deadline and the step awaited) and emits `order.cancelled`
//! and `order.failed`, so every service compensates.
//!
//! It sleeps until the earliest deadline of an undecided saga — at most
//! `scan`, to catch orders another replica placed and then lost — and is
//! woken early only when this replica places an order due before that.
//! Idle, it costs one indexed query per `scan`; under load, one query per
//! wake-up, and a pass only when something is overdue. Safe with several
//! replicas: each pass locks the overdue rows with `FOR UPDATE SKIP
//! LOCKED`, and the decision itself is conditional, so no saga is cancelled
//! twice. It only reads order-svc's own table, so it catches sagas whose
//! other services are down, not only slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use common::metric_definitions as metric;

use crate::db;
use crate::saga::OrderSaga;

/// Overdue sagas failed per transaction.
const BATCH: i64 = 100;

/// When the watcher plans to look next, so that a new order due earlier can
/// wake it.
#[derive(Default)]
pub struct NextWake {
    at_ms: AtomicI64,
    wake: Notify,
}

impl NextWake {
    /// An order due at `deadline` was placed here.
    pub fn placed(&self, deadline: DateTime<Utc>) {
        if deadline.timestamp_millis() < self.at_ms.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    fn plan(&self, at: DateTime<Utc>) {
        self.at_ms.store(at.timestamp_millis(), Ordering::Relaxed);
    }
}

pub async fn run(saga: Arc<OrderSaga>, scan: Duration, cancel: CancellationToken) {
    loop {
        let now = Utc::now();
        let next = match next_deadline(&saga).await {
            Ok(next) => next,
            Err(error) => {
                warn!(%error, "timeout scan failed; will retry");
                None
            }
        };
        if next.is_some_and(|at| at <= now) {
            match saga.fail_overdue(BATCH).await {
                Ok(n) if n as i64 >= BATCH => {
                    info!(n, "timed out a full batch of sagas; scanning again");
                    continue;
                }
                Ok(0) => {}
                Ok(n) => info!(n, "timed out sagas"),
                Err(error) => {
                    common::store::pool::note_error(&error);
                    warn!(%error, "timeout pass failed; will retry");
                }
            }
        }
        let latest = now + scan;
        let wake_at = match next {
            // A hair after the deadline, so the confirmation race is over.
            Some(at) if at > now => (at + Duration::from_millis(5)).min(latest),
            Some(_) => now + Duration::from_millis(50).min(scan),
            None => latest,
        };
        saga.next_wake.plan(wake_at);
        let sleep = (wake_at - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = saga.next_wake.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// The earliest deadline of an undecided saga.
async fn next_deadline(saga: &OrderSaga) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let mut conn = saga.pool.acquire().await?;
    db::next_deadline(&mut conn).await
}

/// Reads the `sagas_undecided{age}`, `sagas_long_running` and
/// `saga_long_running_oldest_seconds` gauges every few seconds (one count over
/// the index of pending deadlines).
pub async fn sample_undecided(pool: sqlx::PgPool, cancel: CancellationToken) {
    common::store::gauges::every_interval(cancel, || async {
        let mut conn = pool.acquire().await?;
        let (fresh, running, overdue, long_running, oldest) =
            db::undecided_by_age(&mut conn).await?;
        metrics::gauge!(metric::SAGAS_LONG_RUNNING).set(long_running as f64);
        metrics::gauge!(metric::SAGA_LONG_RUNNING_OLDEST_SECONDS).set(oldest);
        for (age, n) in [
            ("under_1s", fresh),
            ("1s_to_deadline", running),
            ("past_deadline", overdue),
        ] {
            metrics::gauge!(metric::SAGAS_UNDECIDED, "age" => age).set(n as f64);
        }
        Ok(())
    })
    .await;
}
