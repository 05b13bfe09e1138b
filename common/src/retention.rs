//! Bounded tables: published outbox rows and inbox ids are deleted once they
//! are older than the retention window.
//!
//! The window must outlast every way a message can come back:
//! - a retried message (the delay tiers, up to `RETRY_MAX_ATTEMPTS`) — checked
//!   at start-up: a service refuses to start if its window is shorter than
//!   [`retry_horizon`];
//! - a replayed or long-queued message — refused by the consumer if it is
//!   older than the window (`occurred_at`), because the inbox may have
//!   forgotten it: it is parked with the reason instead of being applied twice.
//!
//! One replica per service cleans at a time (a transaction-level advisory
//! lock), in batches of [`BATCH`] rows found through an index, so the hot
//! path never meets a table-locking mass `DELETE`.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::telemetry::metric;
use crate::topology::RETRY_TIERS;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// Advisory lock key of the cleaner ("saga-retention" in ASCII).
const LOCK_KEY: i64 = 0x7361_6761_2d72_6574;

/// The longest a message can take to come back through the retry tiers:
/// every delay before the last attempt, with its maximum jitter (+50 %).
pub fn retry_horizon(max_attempts: u32) -> Duration {
    (1..max_attempts.max(1))
        .map(|attempt| {
            let tier = (attempt as usize - 1).min(RETRY_TIERS.len() - 1);
            RETRY_TIERS[tier].mul_f64(1.5)
        })
        .sum()
}

/// Why a retention window is too short.
#[derive(Debug, thiserror::Error)]
#[error(
    "RETENTION_SECS ({retention_s}s) must exceed the retry horizon ({horizon_s}s for \
     RETRY_MAX_ATTEMPTS={max_attempts}) plus one hour: otherwise a retried message could \
     outlive its inbox entry and be applied twice"
)]
pub struct WindowTooShort {
    pub retention_s: u64,
    pub horizon_s: u64,
    pub max_attempts: u32,
}

/// Checks the window against the retry horizon (with an hour to spare).
pub fn check_window(retention: Duration, max_attempts: u32) -> Result<(), WindowTooShort> {
    let horizon = retry_horizon(max_attempts);
    if retention < horizon + Duration::from_secs(3600) {
        return Err(WindowTooShort {
            retention_s: retention.as_secs(),
            horizon_s: horizon.as_secs(),
            max_attempts,
        });
    }
    Ok(())
}

/// Published outbox rows older than `$1` seconds, at most `$2` of them.
const DELETE_OLD_OUTBOX: &str = r#"
    delete from outbox where id in (
        select id from outbox
        where published_at < now() - make_interval(secs => $1)
        limit $2
    )
"#;

/// Inbox ids older than `$1` seconds, at most `$2` of them.
const DELETE_OLD_INBOX: &str = r#"
    delete from inbox where message_id in (
        select message_id from inbox
        where received_at < now() - make_interval(secs => $1)
        limit $2
    )
"#;

async fn delete_batch(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sql: &'static str,
    older_than_secs: f64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(sql)
        .bind(older_than_secs)
        .bind(BATCH)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// Deletes what is older than `retention`; `None` if another replica is
/// cleaning right now.
pub async fn clean_once(
    pool: &PgPool,
    retention: Duration,
) -> Result<Option<(u64, u64)>, sqlx::Error> {
    let secs = retention.as_secs_f64();
    let (mut outbox, mut inbox) = (0, 0);
    loop {
        let mut tx = pool.begin().await?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(None);
        }
        let o = delete_batch(&mut tx, DELETE_OLD_OUTBOX, secs).await?;
        let i = delete_batch(&mut tx, DELETE_OLD_INBOX, secs).await?;
        tx.commit().await?;
        outbox += o;
        inbox += i;
        if o < BATCH as u64 && i < BATCH as u64 {
            return Ok(Some((outbox, inbox)));
        }
        // Let the hot path breathe between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Cleans every `interval` until `cancel` fires.
pub async fn run_cleaner(
    service: &'static str,
    pool: PgPool,
    retention: Duration,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match clean_once(&pool, retention).await {
            Ok(Some((outbox, inbox))) => {
                metrics::counter!(metric::RETENTION_DELETED, "service" => service, "table" => "outbox")
                    .increment(outbox);
                metrics::counter!(metric::RETENTION_DELETED, "service" => service, "table" => "inbox")
                    .increment(inbox);
                if outbox + inbox > 0 {
                    info!(service, outbox, inbox, "retention: deleted old rows");
                }
            }
            Ok(None) => debug!(service, "retention: another replica is cleaning"),
            Err(error) => warn!(service, %error, "retention: cleaning failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_horizon_sums_the_tiers_with_jitter() {
        assert_eq!(retry_horizon(1), Duration::ZERO);
        assert_eq!(retry_horizon(2), Duration::from_millis(300));
        // 8 attempts: 0.2 + 1 + 5 + 30 + 120 + 120 + 120 = 396.2 s, × 1.5.
        assert_eq!(retry_horizon(8), Duration::from_millis(594_300));
    }

    #[test]
    fn a_window_shorter_than_the_horizon_is_refused() {
        assert!(check_window(Duration::from_secs(7 * 24 * 3600), 8).is_ok());
        let err = check_window(Duration::from_secs(600), 8).unwrap_err();
        assert!(err.to_string().contains("RETENTION_SECS (600s)"));
    }
}
