//! Emails queued for the mail relay: confirmations it could not take when
//! they were due, and every cancellation (a rollback never calls the relay
//! itself: a relay that hangs would hold the rollback's whole batch).
//!
//! A confirmation is past the pivot, a retriable step — retried until it
//! goes out, never undone; a cancellation likewise. This task sends what is
//! due, with back-off (1 s, 2 s, 4 s … at most 5 min between attempts), one
//! email at a time: it takes the email on a short lease (committed, so no
//! lock is held while the relay is being talked to, and a confirmation is
//! from then on one the relay may have), sends it, and records the outcome.
//! A crash in between leaves the lease to run out: the email is tried again
//! (at least once, as email always is), and a rollback meanwhile sends a
//! cancellation, due only after the lease, so that it never overtakes its
//! confirmation. A relay that refuses an email for good marks a
//! confirmation bounced, logged at error level: the order stands, an
//! operator tells the customer.
//!
//! [`RelayHealth`] is what batches know of the relay: once a send finds it
//! down, they queue their confirmations without trying it (a relay that
//! hangs costs one timeout, not one per email) until this task gets an
//! email through.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::metric_definitions::step_outcome;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::SERVICE;
use crate::db::{self, QueuedOutcome};
use crate::domain::EmailKind;
use crate::transport::{EmailTransport, SendError};

/// Emails tried per pass at most.
const BATCH: usize = 20;

/// How long a queued email is taken for while it is handed to the relay:
/// longer than any SMTP exchange can last.
pub const LEASE: Duration = Duration::from_secs(30);

/// How long batches leave the relay alone after a send found it down,
/// unless the queue gets an email through before.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// What the service knows of the mail relay, and how to wake the queue.
#[derive(Default)]
pub struct RelayHealth {
    down_until: Mutex<Option<Instant>>,
    wake: Notify,
}

impl RelayHealth {
    /// True while a recent send found the relay down.
    pub fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .map(|d| d.is_some_and(|until| Instant::now() < until))
            .unwrap_or(false)
    }

    pub fn mark_down(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some(Instant::now() + DOWN_FOR);
        }
    }

    pub fn mark_up(&self) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = None;
        }
    }

    /// Has the queue look now (an email was queued).
    pub fn wake_queue(&self) {
        self.wake.notify_one();
    }
}

/// Sends due queued emails every `every` (and when woken) until cancelled.
pub async fn run(
    pool: PgPool,
    transport: Arc<dyn EmailTransport>,
    health: Arc<RelayHealth>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        match send_due(&pool, transport.as_ref(), &health).await {
            Ok(0) => {}
            Ok(n) => info!(sent = n, "queued emails sent"),
            Err(error) => warn!(%error, "queued emails not tried this time"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = health.wake.notified() => {}
        }
    }
}

/// One pass: returns how many went out.
pub async fn send_due(
    pool: &PgPool,
    transport: &dyn EmailTransport,
    health: &RelayHealth,
) -> Result<u64, sqlx::Error> {
    let mut sent = 0;
    for _ in 0..BATCH {
        let Some(leased) = db::lease_due(pool, LEASE).await? else {
            return Ok(sent);
        };
        let email = &leased.email;
        let (order_id, kind) = (email.order_id, email.kind.as_str());
        let result = transport.send(email).await;
        if common::failpoints::is_set("notification::queue_after_send") {
            // A crash between the relay's answer and its record: the lease
            // runs out and the email is tried again.
            std::future::pending::<()>().await;
        }
        match result {
            Ok(()) => {
                db::settle_queued(pool, &leased, QueuedOutcome::Sent, transport.name()).await?;
                health.mark_up();
                sent += 1;
                step_outcome(SERVICE, queued_label(email.kind, "sent"), 1);
            }
            Err(e @ (SendError::Unavailable(_) | SendError::Uncertain(_))) => {
                let delay = backoff(leased.attempts);
                let why = e.to_string();
                let later = QueuedOutcome::Later {
                    after: delay,
                    error: &why,
                    taken: e.may_have_delivered(),
                };
                db::settle_queued(pool, &leased, later, transport.name()).await?;
                health.mark_down();
                debug!(%order_id, kind, ?delay, %why, "mail relay still unavailable");
                // The relay is down for the others too.
                return Ok(sent);
            }
            Err(SendError::Rejected(why)) => {
                db::settle_queued(
                    pool,
                    &leased,
                    QueuedOutcome::Rejected(&why),
                    transport.name(),
                )
                .await?;
                step_outcome(SERVICE, queued_label(email.kind, "bounced"), 1);
                error!(%order_id, kind, reason = ?why,
                       "a queued email was refused for good: tell the customer");
            }
        }
    }
    Ok(sent)
}

fn queued_label(kind: EmailKind, outcome: &str) -> &'static str {
    match (kind, outcome) {
        (EmailKind::Confirmation, "sent") => "queued_sent",
        (EmailKind::Confirmation, _) => "queued_bounced",
        (EmailKind::Cancellation, "sent") => "cancellation_sent",
        (EmailKind::Cancellation, _) => "cancellation_bounced",
    }
}

/// 1 s, 2 s, 4 s … at most 5 min.
fn backoff(attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 9)).unwrap_or(0);
    Duration::from_secs(2u64.pow(exp)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(20), Duration::from_secs(300));
    }

    #[test]
    fn the_relay_is_left_alone_only_while_it_is_down() {
        let health = RelayHealth::default();
        assert!(!health.is_down());
        health.mark_down();
        assert!(health.is_down());
        health.mark_up();
        assert!(!health.is_down());
    }
}
