//! Bounded tables: old outbox rows, inbox ids, resolved escalations and
//! forgotten crash suspects are deleted once they are older than the
//! retention window (open escalations stay until an operator resolves them).
//!
//! The window must outlast every way a message can come back (see
//! [`crate::messaging::retry::check_window`], checked at start-up); a message
//! older than the window is refused by the consumer rather than applied twice.
//! Inbox ids are kept [`MARGIN`] longer than that: a producer whose clock runs
//! ahead makes its messages look younger than they are, and a message must
//! never be both accepted and forgotten.
//!
//! One replica per service cleans at a time (a transaction-level advisory
//! lock), in batches of [`BATCH`] rows found through an index, so the hot
//! path never meets a table-locking mass `DELETE`.
//!
//! Every service updates rows on its hot path (decisions, reservations,
//! stock, balances), which leaves dead row versions behind. PostgreSQL's
//! autovacuum removes them and keeps the planner's statistics fresh; on a
//! server where it is turned off, the cleaning replica does it itself
//! (`VACUUM (ANALYZE, SKIP_LOCKED)` of its database) after each pass, so a
//! long run does not slow down as its tables bloat.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metric_definitions as metric;

/// How much longer than the refusal window inbox ids are kept.
pub const MARGIN: Duration = Duration::from_secs(3600);

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// Advisory lock key of the cleaner ("saga-retention" in ASCII).
const LOCK_KEY: i64 = 0x7361_6761_2d72_6574;

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

/// Escalations resolved more than `$1` seconds ago, at most `$2` of them.
const DELETE_OLD_ESCALATIONS: &str = r#"
    delete from escalations where id in (
        select id from escalations
        where status = 'resolved' and resolved_at < now() - make_interval(secs => $1)
        limit $2
    )
"#;

/// Crash suspects last seen more than `$1` seconds ago (their message long
/// gone), at most `$2` of them.
const DELETE_OLD_SUSPECTS: &str = r#"
    delete from crash_suspects where id in (
        select id from crash_suspects
        where last_seen < now() - make_interval(secs => $1)
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
        let Some(mut tx) = super::pool::try_begin_exclusive(pool, LOCK_KEY).await? else {
            return Ok(None);
        };
        let o = delete_batch(&mut tx, DELETE_OLD_OUTBOX, secs).await?;
        let i = delete_batch(&mut tx, DELETE_OLD_INBOX, secs + MARGIN.as_secs_f64()).await?;
        let e = delete_batch(&mut tx, DELETE_OLD_ESCALATIONS, secs).await?;
        let c = delete_batch(&mut tx, DELETE_OLD_SUSPECTS, secs).await?;
        tx.commit().await?;
        outbox += o;
        inbox += i;
        if o < BATCH as u64 && i < BATCH as u64 && e < BATCH as u64 && c < BATCH as u64 {
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
    let mut maintenance = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match clean_once(&pool, retention).await {
            Ok(Some((outbox, inbox))) => {
                if maintenance.is_none() {
                    maintenance = Some(autovacuum_is_off(&pool).await);
                }
                if maintenance == Some(true) {
                    vacuum(service, &pool).await;
                }
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

/// True if the server runs no autovacuum (then the services vacuum their
/// own databases).
async fn autovacuum_is_off(pool: &PgPool) -> bool {
    let setting: Result<String, _> = sqlx::query_scalar("select current_setting('autovacuum')")
        .fetch_one(pool)
        .await;
    let off = setting.is_ok_and(|s| s == "off");
    if off {
        info!("autovacuum is off on this server: each service vacuums its own database");
    }
    off
}

/// Dead row versions worth a vacuum.
const VACUUM_THRESHOLD: i64 = 1000;

async fn vacuum(service: &'static str, pool: &PgPool) {
    // Idle, there is nothing to remove: one statistics read, no vacuum.
    let dead: Option<i64> =
        sqlx::query_scalar("select sum(n_dead_tup)::bigint from pg_stat_user_tables")
            .fetch_one(pool)
            .await
            .unwrap_or(None);
    if dead.unwrap_or(0) < VACUUM_THRESHOLD {
        return;
    }
    let started = std::time::Instant::now();
    match sqlx::raw_sql("vacuum (analyze, skip_locked)")
        .execute(pool)
        .await
    {
        Ok(_) => debug!(
            service,
            ms = started.elapsed().as_millis() as u64,
            "vacuumed"
        ),
        Err(error) => warn!(service, %error, "vacuum failed; will retry"),
    }
}
