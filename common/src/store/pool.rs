//! PostgreSQL: database creation, the pool, migrations, and which errors are
//! worth retrying.
//!
//! Each service owns one database. `DATABASE_URL` may name a primary and its
//! standbys (libpq's multi-host form): the pool connects to the writable one
//! and follows it after a failover.
//!
//! Each service owns one database. The outbox and inbox tables come from
//! `common/migrations` and are merged with the service's own migrations into
//! one [`Migrator`], so every service gets the same shared schema without a
//! copy of its SQL.

use std::borrow::Cow;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _, PgPool};
use tracing::info;

use crate::metric_definitions as metric;

/// The shared tables (outbox, inbox, escalations).
pub static COMMON_MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("DATABASE_URL names no database")]
    NoDatabase,
    #[error("database name {0:?} must be letters, digits and underscores")]
    BadName(String),
    #[error("could not create database {name:?}: {source}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not connect: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// The common migrations followed by the service's own.
pub fn migrator(service: &Migrator) -> Migrator {
    let mut all: Vec<_> = COMMON_MIGRATIONS
        .migrations
        .iter()
        .chain(service.migrations.iter())
        .cloned()
        .collect();
    all.sort_by_key(|m| m.version);
    Migrator {
        migrations: Cow::Owned(all),
        ..Migrator::DEFAULT
    }
}

/// Creates the database named in `url` if it does not exist, opens a pool
/// on it and runs the migrations (sqlx takes an advisory lock, so replicas
/// starting together are safe).
pub async fn connect_and_migrate(
    url: &str,
    pool_size: u32,
    migrations: &Migrator,
) -> Result<PgPool, DbError> {
    // Bounded waits: a lock held by a stuck transaction, or a runaway
    // statement, fails (and is retried) instead of hanging a handler.
    let hosts: Vec<PgConnectOptions> = host_urls(url)
        .iter()
        .map(|u| {
            PgConnectOptions::from_str(u).map(|o| {
                o.options([
                    ("lock_timeout", "5s"),
                    ("statement_timeout", "30s"),
                    ("idle_in_transaction_session_timeout", "60s"),
                ])
            })
        })
        .collect::<Result<_, _>>()
        .map_err(DbError::Url)?;
    let options = if hosts.len() == 1 {
        hosts[0].clone()
    } else {
        writable_host(&hosts).await?
    };
    ensure_database(&options).await?;
    // No ping before each acquire (a broken connection fails its statement,
    // which is retried like any database error), and a couple of warm
    // connections so the first batch after a quiet spell does not connect.
    let pool = PgPoolOptions::new()
        // A connection opened before its host was found demoted (a
        // switchover) is closed rather than used again.
        .before_acquire(|_, meta| Box::pin(async move { Ok(!opened_before_demotion(meta.age)) }))
        .after_release(|_, meta| Box::pin(async move { Ok(!opened_before_demotion(meta.age)) }))
        .max_connections(pool_size)
        .min_connections(pool_size.min(2))
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(60))
        .connect_with(options)
        .await
        .map_err(DbError::Connect)?;
    migrator(migrations)
        .run(&pool)
        .await
        .map_err(DbError::Migrate)?;
    if hosts.len() > 1 {
        tokio::spawn(follow_primary(pool.clone(), hosts));
    }
    Ok(pool)
}

/// When a database host was last found demoted (a standby now), in
/// milliseconds since the Unix epoch; 0: never.
static DEMOTED_AT_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// True for an error that says the connection's server takes no writes
/// any more: SQLSTATE 25006 (`read_only_sql_transaction`), what a primary
/// demoted to a standby answers on the connections it kept.
pub fn is_demoted_host(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// Notes a database error: after a demoted host's error every pooled
/// connection opened before it is closed instead of used again (on its
/// release, or before its next use), so the retry that follows connects
/// afresh — to the writable host (see [`connect_and_migrate`]).
pub fn note_error(e: &sqlx::Error) {
    if is_demoted_host(e) {
        mark_demoted();
    }
}

fn mark_demoted() {
    let previous = DEMOTED_AT_MS.swap(now_ms(), Ordering::AcqRel);
    if now_ms().saturating_sub(previous) > 1000 {
        tracing::warn!(
            "the database host takes no writes (a standby now): its pooled connections are \
             replaced"
        );
    }
}

/// True if a connection `age` old was opened before the last demotion.
fn opened_before_demotion(age: Duration) -> bool {
    let demoted_at = DEMOTED_AT_MS.load(Ordering::Acquire);
    if demoted_at == 0 {
        return false;
    }
    let opened_at = now_ms().saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
    opened_at <= demoted_at
}

/// A transaction holding the advisory lock `key` until it ends, or `None`
/// if another session holds it: one replica at a time does the job.
pub async fn try_begin_exclusive(
    pool: &PgPool,
    key: i64,
) -> Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
    Ok(locked.then_some(tx))
}

/// `DATABASE_URL` with libpq's multi-host form (`postgres://u@h1:5432,h2:5432/db?…`)
/// as one URL per host (`target_session_attrs`, which the driver does not
/// know, dropped: a writable host is what is always looked for).
pub fn host_urls(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let query: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("target_session_attrs="))
        .collect();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}{path}{query}"))
        .collect()
}

/// The first host that answers and is not a standby.
async fn writable_host(hosts: &[PgConnectOptions]) -> Result<PgConnectOptions, DbError> {
    let mut last = None;
    for options in hosts {
        // The server's `postgres` database: the service's may not exist yet.
        let probe = async {
            let mut conn = options.clone().database("postgres").connect().await?;
            let standby: bool = sqlx::query_scalar("select pg_is_in_recovery()")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(standby)
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(false)) => return Ok(options.clone()),
            Ok(Ok(true)) => {}
            Ok(Err(e)) => last = Some(e),
            Err(_) => {}
        }
    }
    Err(DbError::Connect(last.unwrap_or_else(|| {
        sqlx::Error::Configuration("no host of DATABASE_URL is a writable primary".into())
    })))
}

/// With several hosts: every few seconds, checks that the pool's host is
/// still the writable primary, and points the pool's new connections at the
/// one that is when it is not (after a failover the old connections fail,
/// their batches are retried, and the pool reconnects — to the new primary).
async fn follow_primary(pool: PgPool, hosts: Vec<PgConnectOptions>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if pool.is_closed() {
            return;
        }
        let current = pool.connect_options();
        let still_primary = async {
            let mut conn = current.connect().await?;
            let standby: bool = sqlx::query_scalar("select pg_is_in_recovery()")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(!standby)
        };
        if matches!(
            tokio::time::timeout(Duration::from_secs(5), still_primary).await,
            Ok(Ok(true))
        ) {
            continue;
        }
        match writable_host(&hosts).await {
            Ok(options) => {
                info!(host = ?options.get_host(), "database primary moved: new connections go there");
                pool.set_connect_options(options);
                mark_demoted();
            }
            Err(error) => tracing::warn!(%error, "no writable database host found; looking again"),
        }
    }
}

/// `CREATE DATABASE` unless it exists, through the server's `postgres` database.
pub async fn ensure_database(options: &PgConnectOptions) -> Result<(), DbError> {
    let name = options
        .get_database()
        .ok_or(DbError::NoDatabase)?
        .to_owned();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::BadName(name));
    }
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(DbError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(DbError::Connect)?;
    if !exists {
        let created = sqlx::query(AssertSqlSafe(format!("create database \"{name}\"")))
            .execute(&mut admin)
            .await;
        match created {
            Ok(_) => {
                info!(database = %name, "created database");
                // Its owner (this service's role) only: no other role may
                // even connect.
                let revoke = format!("revoke connect on database \"{name}\" from public");
                if let Err(error) = sqlx::query(AssertSqlSafe(revoke)).execute(&mut admin).await {
                    tracing::warn!(%error, database = %name, "could not revoke public access");
                }
            }
            // Another replica created it first (42P04, or a unique violation
            // on pg_database when both raced).
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(source) => return Err(DbError::Create { name, source }),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// A retryable database failure, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryableKind {
    Deadlock,
    Serialization,
    LockTimeout,
    Connection,
    Other,
}

impl RetryableKind {
    pub fn label(self) -> &'static str {
        match self {
            RetryableKind::Deadlock => "deadlock",
            RetryableKind::Serialization => "serialization",
            RetryableKind::LockTimeout => "lock_timeout",
            RetryableKind::Connection => "connection",
            RetryableKind::Other => "other",
        }
    }
}

/// Classifies an error: `Some` if trying again later may succeed.
pub fn retryable(e: &sqlx::Error) -> Option<RetryableKind> {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Some(RetryableKind::Connection),
        sqlx::Error::Database(db) => {
            let code = db.code()?;
            Some(match code.as_ref() {
                "40P01" => RetryableKind::Deadlock,
                // A demoted primary: the wrong host, as a lost connection is.
                "25006" => RetryableKind::Connection,
                "40001" => RetryableKind::Serialization,
                "55P03" | "57014" => RetryableKind::LockTimeout,
                c if c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") => {
                    RetryableKind::Connection
                }
                _ => return None,
            })
        }
        _ => None,
    }
}

/// True for a database error that no retry can fix, because the data itself
/// is refused: SQLSTATE class 22 (data exception: an invalid byte sequence
/// such as a NUL, an untranslatable character, a number out of range) and
/// class 23 (a CHECK or NOT NULL constraint) — but not a unique violation,
/// which a concurrent insert can cause and a retry resolves.
pub fn permanent(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code().is_some_and(|code| {
        code.starts_with("22") || (code.starts_with("23") && code != "23505" && code != "23P01")
    })
}

/// Counts a retryable error in `db_retryable_errors_total`.
pub fn record_retryable(service: &'static str, kind: RetryableKind) {
    metrics::counter!(metric::DB_RETRYABLE_ERRORS, "service" => service, "kind" => kind.label())
        .increment(1);
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn a_multi_host_url_is_one_url_per_host() {
        assert_eq!(
            host_urls(
                "postgres://svc:pw@db1:5432,db2:5433/payments?sslmode=disable&target_session_attrs=read-write"
            ),
            [
                "postgres://svc:pw@db1:5432/payments?sslmode=disable",
                "postgres://svc:pw@db2:5433/payments?sslmode=disable"
            ]
        );
        assert_eq!(
            host_urls("postgres://svc@h1,h2/db"),
            ["postgres://svc@h1/db", "postgres://svc@h2/db"]
        );
        let one = "postgres://svc@127.0.0.1:5432/db?target_session_attrs=read-write";
        assert_eq!(host_urls(one), [one]);
    }
}
