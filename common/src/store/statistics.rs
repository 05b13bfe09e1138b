//! The planner's statistics of a service's tables, kept fresh where the
//! server's autovacuum is off.
//!
//! PostgreSQL plans each statement from its statistics of the tables it
//! reads, and the hot path keeps a prepared statement's plan until those
//! statistics change (see [`crate::messaging::unit_of_work::BEGIN`]). A
//! table last analyzed when it held a handful of rows (a new deployment, a
//! benchmark's fresh database) is planned as if it still did: lookups by
//! order id become sequential scans whose cost grows with the table
//! (measured: notification-svc scanning its 4,400 notifications three times
//! per batch, inventory-svc its reservations once). Autovacuum would analyze
//! such a table as it grows; on a server that runs without it, this task
//! analyzes each table of the service's own (those its role owns, in its
//! schemas) once it holds more than twice the rows the planner believes —
//! a plan's shape (an index lookup or a scan) changes with the order of
//! magnitude of a table, not with its last 10 %, and a table that only
//! churns (the outbox) is never due. It looks once a second while the
//! process commits work (one read of `pg_stat_user_tables`) and not at all
//! while it is idle; one replica at a time analyzes (an advisory lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often the statistics are checked while the service is busy.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Advisory lock key of the analyzing replica (not the retention cleaner's).
const LOCK_KEY: i64 = 0x6761_2d61_6e61_6c79;

/// Transactions of the hot path committed by this process.
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Counts a committed transaction (work that may have changed the tables).
pub fn count_commit() {
    COMMITS.fetch_add(1, Ordering::Relaxed);
}

/// The service's tables that hold more than twice the rows the planner
/// believes they do (plus a few), as quoted names.
const DUE_FOR_ANALYZE: &str = r#"
    select format('%I.%I', s.schemaname, s.relname)
    from pg_stat_user_tables s
    join pg_class c on c.oid = s.relid
    where s.n_live_tup > 50 + 2 * greatest(c.reltuples, 0)
      and s.schemaname = any(current_schemas(false))
      and pg_has_role(c.relowner, 'USAGE')
    order by 1
"#;

/// Keeps the statistics of `pool`'s tables fresh until `cancel` fires, if
/// the server's autovacuum is off (returns once it has read that it is on).
pub async fn run(service: &'static str, pool: PgPool, cancel: CancellationToken) {
    let mut seen = COMMITS.load(Ordering::Relaxed);
    let mut autovacuum_checked = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        let now = COMMITS.load(Ordering::Relaxed);
        if now == seen {
            continue;
        }
        seen = now;
        if !autovacuum_checked {
            match sqlx::query_scalar::<_, String>("select current_setting('autovacuum')")
                .fetch_one(&pool)
                .await
            {
                Ok(setting) if setting == "off" => {
                    info!(
                        service,
                        "autovacuum is off: the service analyzes its own tables as they grow"
                    );
                    autovacuum_checked = true;
                }
                Ok(_) => return,
                Err(error) => {
                    debug!(service, %error, "could not read the autovacuum setting; will retry");
                    continue;
                }
            }
        }
        if let Err(error) = analyze_due(&pool).await {
            warn!(service, %error, "could not analyze the tables; will retry");
        }
    }
}

/// Analyzes the tables due for it, in one transaction, unless another
/// replica is doing so; returns them.
pub async fn analyze_due(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let due: Vec<String> = sqlx::query_scalar(DUE_FOR_ANALYZE).fetch_all(pool).await?;
    if due.is_empty() {
        return Ok(due);
    }
    let Some(mut tx) = super::pool::try_begin_exclusive(pool, LOCK_KEY).await? else {
        return Ok(Vec::new());
    };
    // Names quoted by format('%I') above, from the catalogue.
    let sql = format!("analyze (skip_locked) {}", due.join(", "));
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *tx).await?;
    tx.commit().await?;
    debug!(tables = ?due, "analyzed");
    Ok(due)
}
