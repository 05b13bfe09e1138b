//! Confirmations queued while the mail relay was down.
//!
//! When the relay cannot take a confirmation, the email is queued
//! (`deferred_emails`) and the saga goes on: the email is past the pivot, a
//! retriable step — retried until it goes out, never undone. This task sends
//! what is due, with back-off (1 s, 2 s, 4 s … at most 5 min between
//! attempts), each email in its own short transaction that locks it with its
//! notification, so a concurrent rollback either finds it still queued (and
//! drops it) or finds it sent (and retracts it with a cancellation). A relay
//! that refuses an email for good marks it bounced, logged at error level:
//! the order stands, an operator tells the customer.

use std::sync::Arc;
use std::time::Duration;

use common::metric_definitions::step_outcome;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::SERVICE;
use crate::db;
use crate::domain::NotificationStatus;
use crate::transport::{EmailTransport, SendError};

/// Emails tried per pass at most.
const BATCH: usize = 20;

/// Sends due queued emails every `every` until cancelled.
pub async fn run(
    pool: PgPool,
    transport: Arc<dyn EmailTransport>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        match send_due(&pool, transport.as_ref()).await {
            Ok(0) => {}
            Ok(n) => info!(sent = n, "queued confirmations sent"),
            Err(error) => warn!(%error, "queued confirmations not tried this time"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One pass: returns how many went out.
async fn send_due(pool: &PgPool, transport: &dyn EmailTransport) -> Result<u64, sqlx::Error> {
    let mut sent = 0;
    for _ in 0..BATCH {
        let mut tx = pool.begin().await?;
        let Some(email) = db::due_emails(&mut tx, 1).await?.pop() else {
            return Ok(sent);
        };
        let order_id = email.order_id;
        match transport.send(&email).await {
            Ok(()) => {
                db::record_email(&mut tx, &email, transport.name()).await?;
                db::dequeue_email(&mut tx, order_id, NotificationStatus::Sent, None).await?;
                tx.commit().await?;
                sent += 1;
                step_outcome(SERVICE, "queued_sent", 1);
            }
            Err(SendError::Unavailable(why)) => {
                let attempts = db::queued_attempts(&mut tx, order_id).await?;
                let delay = backoff(attempts);
                db::postpone_email(&mut tx, order_id, delay, &why).await?;
                tx.commit().await?;
                debug!(%order_id, ?delay, %why, "mail relay still unavailable");
                // The relay is down for the others too.
                return Ok(sent);
            }
            Err(SendError::Rejected(why)) => {
                let reason = format!("Email rejected: {why}");
                db::dequeue_email(
                    &mut tx,
                    order_id,
                    NotificationStatus::Bounced,
                    Some(&reason),
                )
                .await?;
                tx.commit().await?;
                step_outcome(SERVICE, "queued_bounced", 1);
                error!(%order_id, reason = ?why,
                       "a queued confirmation was refused for good: the order stands, tell the customer");
            }
        }
    }
    Ok(sent)
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
}
