//! The planner's statistics of a service's tables, kept fresh where the
//! server's autovacuum is off.
//!
//! PostgreSQL plans each statement from its statistics of the tables it
//! reads, and a prepared statement keeps its plan until those statistics
//! change. A table last analyzed when it held a handful of rows (a new
//! deployment, a benchmark's fresh database) is planned as if it still did:
//! the hot path's lookups by order id become sequential scans whose cost
//! grows with the table (measured: notification-svc scanning its 4,400
//! notifications three times per batch, inventory-svc its reservations once).
//! Autovacuum analyzes a table once the rows changed since its last analysis
//! exceed `autovacuum_analyze_threshold` + `autovacuum_analyze_scale_factor`
//! × its size (50 + 10 % by default); on a server that runs without it, this
//! task does the same for the service's own tables, by the server's own
//! settings. It looks once a second while the service commits work (one
//! read of `pg_stat_user_tables`) and not at all while it is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the statistics are checked while the service is busy.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Transactions of the hot path committed by this process.
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Counts a committed transaction (work that may have changed the tables).
pub fn count_commit() {
    COMMITS.fetch_add(1, Ordering::Relaxed);
}

/// The tables that hold more than twice the rows the planner believes they
/// do (plus a few), as quoted names: a plan's shape (an index lookup or a
/// scan) changes with the order of magnitude of a table, not with its last
/// 10 %, and a table that only churns (the outbox) is never due.
const DUE_FOR_ANALYZE: &str = r#"
    select format('%I.%I', s.schemaname, s.relname)
    from pg_stat_user_tables s
    join pg_class c on c.oid = s.relid
    where s.n_live_tup > 50 + 2 * greatest(c.reltuples, 0)
    order by 1
"#;

/// Keeps the statistics of `pool`'s tables fresh until `cancel` fires, if
/// the server's autovacuum is off (returns at once otherwise).
pub async fn run(service: &'static str, pool: PgPool, cancel: CancellationToken) {
    if !super::retention::autovacuum_is_off(&pool).await {
        return;
    }
    let mut seen = COMMITS.load(Ordering::Relaxed);
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
        if let Err(error) = analyze_due(&pool).await {
            warn!(service, %error, "could not analyze the tables; will retry");
        }
    }
}

/// Analyzes the tables due for it, in one statement; returns them.
pub async fn analyze_due(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let due: Vec<String> = sqlx::query_scalar(DUE_FOR_ANALYZE).fetch_all(pool).await?;
    if !due.is_empty() {
        // Names quoted by format('%I') above, from the catalogue.
        let sql = format!("analyze (skip_locked) {}", due.join(", "));
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(pool).await?;
        debug!(tables = ?due, "analyzed");
    }
    Ok(due)
}
