//! Chaos: the four services as real processes (two replicas of three of
//! them), a steady stream of orders with mixed outcomes — 3-D Secure
//! payments confirmed, declined and abandoned, backorders filled and
//! expired, HTTP orders with and without idempotency keys, AMQP orders —
//! and everything that can go wrong: SIGKILLs at random moments, a graceful
//! restart of each service, a broker restart, a database restart, random
//! latency, COMMIT answers lost after the commit (1 % of them, a
//! failpoint), a mail relay that goes down and one that hangs after taking
//! an email, duplicated and late copies of internal events, poison
//! messages. At the end every invariant is checked from each service's own
//! database and from what the mail relay received, and the report says how
//! many sagas timed out and how many of those overlapped a broker or
//! database restart (the others must stay under 2 % of the orders).
//!
//! `CHAOS_SECS` sets the length of the run (default 30);
//! `CHAOS_REAL_RESTARTS=0` closes connections server-side instead of
//! restarting RabbitMQ and PostgreSQL. This test is a binary of its own so
//! that those restarts disturb no other test.

mod faults;
mod load;

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use saga_tests::Svc;
use saga_tests::invariants;
use saga_tests::process::ProcessSystem;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::faults::FaultCounts;
use crate::load::ITEMS;
use saga_tests::publisher::Publisher;

/// Unbuffered and uncaptured: the report shows even when the test passes.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Each fault, how long until what it hit was ready again, and the sagas
/// that timed out in its wake (those whose deadline fell after it and
/// before the next fault).
/// Returns the share of orders (in %) that timed out without overlapping
/// a broker or database restart (long-running sagas that outlived their
/// long deadline on purpose are not counted).
async fn report_recovery(sys: &ProcessSystem, counts: &FaultCounts) -> f64 {
    let mut pg = sys.pg(Svc::Order).await;
    let (created, deadlines): (i64, Vec<DateTime<Utc>>) = sqlx::query_as(
        "select (select count(*) from orders), \
                coalesce((select array_agg(deadline_at order by deadline_at) from orders \
                          where error = 'Order timed out' and awaiting is null), '{}')",
    )
    .fetch_one(&mut pg)
    .await
    .expect("orders");
    let spans: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "select created_at, deadline_at from orders \
         where error = 'Order timed out' and awaiting is null",
    )
    .fetch_all(&mut pg)
    .await
    .expect("timed-out orders");
    let faults = counts.log.lock().await.clone();
    report(&format!(
        "chaos: {} of {created} sagas timed out ({:.1} %)",
        deadlines.len(),
        100.0 * deadlines.len() as f64 / created.max(1) as f64
    ));
    let before_any = deadlines
        .iter()
        .filter(|d| faults.first().is_none_or(|f| **d < f.at))
        .count();
    if before_any > 0 {
        report(&format!("chaos:   {before_any} before the first fault"));
    }
    let restarts: Vec<(DateTime<Utc>, DateTime<Utc>)> = faults
        .iter()
        .filter(|f| {
            f.what.contains("RabbitMQ")
                || f.what.contains("PostgreSQL")
                || f.what.contains("broker")
                || f.what.contains("database")
        })
        .map(|f| {
            let end = f.at + chrono::TimeDelta::from_std(f.outage + f.recovery).unwrap_or_default();
            (f.at, end)
        })
        .collect();
    let overlapping = spans
        .iter()
        .filter(|(from, to)| restarts.iter().any(|(at, end)| from < end && to > at))
        .count();
    let outside = spans.len() - overlapping;
    let outside_share = 100.0 * outside as f64 / created.max(1) as f64;
    report(&format!(
        "chaos:   of those, {overlapping} overlapped a broker or database restart, {outside} did not ({outside_share:.2} % of the orders)"
    ));
    for (n, fault) in faults.iter().enumerate() {
        let next = faults.get(n + 1).map(|f| f.at);
        let left: Vec<i64> = deadlines
            .iter()
            .filter(|d| **d >= fault.at && next.is_none_or(|next| **d < next))
            .map(|d| (*d - fault.at).num_milliseconds())
            .collect();
        report(&format!(
            "chaos:   {}: lasted {} ms, ready {} ms later; {} sagas timed out, with {} ms left at the fault",
            fault.what,
            fault.outage.as_millis(),
            fault.recovery.as_millis(),
            left.len(),
            left.iter()
                .max()
                .map_or("-".into(), |m| format!("up to {m}")),
        ));
    }
    outside_share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_system_converges_through_crashes_restarts_duplicates_and_poison() {
    let run_for = Duration::from_secs(
        std::env::var("CHAOS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let relay = saga_tests::smtp::SmtpSink::start_controlled().await;
    let mut sys = ProcessSystem::spawn(
        env!("CARGO_BIN_EXE_saga-service"),
        &[
            (Svc::Order, 2),
            (Svc::Payment, 2),
            (Svc::Inventory, 2),
            (Svc::Notification, 1),
        ],
        &[
            ("FAULT_DELAY_MS", "0-25"),
            ("DB_POOL_SIZE", "4"),
            ("OUTBOX_POLL_MS", "200"),
            ("SHUTDOWN_GRACE_MS", "5000"),
            ("DEFAULT_BALANCE_CENTS", &load::DEFAULT_BALANCE.to_string()),
            // Long-running sagas (3-D Secure, backorders) decided within the run.
            ("SAGA_LONG_DEADLINE_MS", "10000"),
            ("SMTP_URL", &relay.url),
            ("EMAIL_RETRY_MS", "500"),
            ("FAILPOINTS", "unit_of_work::commit_lost=1%return"),
        ],
    )
    .await;
    let relay = Arc::new(relay);
    report(&format!("chaos: logs in {}", sys.log_dir.display()));

    load::open_the_shop(&sys).await;

    // Load, duplicates and faults, all at once.
    let until = Instant::now() + run_for;
    let counts = Arc::new(FaultCounts::default());
    let placed = Arc::new(Mutex::new(Vec::new()));
    let publisher = Arc::new(Mutex::new(Publisher::new(&sys.amqp_url)));
    faults::inject_poison(&publisher, &counts).await;
    let mut tasks = Vec::new();
    let endpoints = load::Endpoints {
        orders: sys.urls(Svc::Order),
        payments: sys.urls(Svc::Payment),
        long_running: true,
    };
    for client in 0..6 {
        tasks.push(tokio::spawn(load::http_client(
            endpoints.clone(),
            client >= 2,
            until,
            placed.clone(),
        )));
    }
    tasks.push(tokio::spawn(load::restock(sys.urls(Svc::Inventory), until)));
    tasks.push(tokio::spawn(faults::unsettle_the_relay(
        relay.clone(),
        run_for,
        counts.clone(),
    )));
    tasks.push(tokio::spawn(load::amqp_client(
        publisher.clone(),
        true,
        until,
        placed.clone(),
    )));
    tasks.push(tokio::spawn(faults::duplicate_events(
        sys.amqp_url.clone(),
        publisher.clone(),
        until,
        counts.clone(),
    )));
    faults::run(&mut sys, run_for, &counts).await;
    // Bounded, so that a stuck client is a failure, not a hung test.
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("a load task did not finish within 3 minutes of the end of the load")
            .unwrap();
    }
    // Late copies still in flight land during settling.
    let placed = placed.lock().await.clone();

    let settled = invariants::wait_until_settled(&sys, &placed, Duration::from_secs(240)).await;
    let poison = counts.poison.load(Ordering::Relaxed) as u32;
    let poison_copies = counts.poison_copies.load(Ordering::Relaxed) as u32;
    let initial_stock: HashMap<String, i64> = ITEMS
        .iter()
        .map(|(item, _, stock)| ((*item).to_owned(), i64::from(*stock)))
        .collect();
    let initial_balance = |c: &str| {
        if c == "poor" {
            0
        } else {
            load::DEFAULT_BALANCE
        }
    };
    let received = relay.received();
    let expected = invariants::Expected {
        initial_stock: &initial_stock,
        initial_balance: &initial_balance,
        parked: poison_copies,
        relay: Some(&received),
    };
    let (tally, violations) = invariants::check(&sys, &placed, &expected).await;
    let timeouts_outside_restarts = report_recovery(&sys, &counts).await;
    let long_running: (i64, i64) = sqlx::query_as(
        "select count(*) filter (where awaiting = 'payment_confirmation'), \
                count(*) filter (where awaiting = 'stock_arrival') from orders",
    )
    .fetch_one(&mut sys.pg(Svc::Order).await)
    .await
    .expect("orders");
    let unclean = sys.stop_all().await;

    report(&format!(
        "chaos: {} keyless HTTP orders; {} 3-D Secure and {} backordered sagas; {} emails received by the relay",
        placed.iter().filter(|p| p.keyless).count(),
        long_running.0,
        long_running.1,
        received.len(),
    ));
    report(&format!(
        "chaos: {}s of load; {} orders ({} over HTTP, {} answered), {} confirmed, {} failed; \
         {} SIGKILLs, {} graceful restarts; broker: {}; database: {}; \
         {} duplicate and {} delayed copies of events injected; {} poison injected ({} copies), {} parked; \
         {} escalations open; settled in {:?}",
        run_for.as_secs(),
        tally.orders,
        placed.iter().filter(|p| p.over_http).count(),
        placed.iter().filter(|p| p.result.is_some()).count(),
        tally.confirmed,
        tally.failed,
        counts.kills.load(Ordering::Relaxed),
        counts.graceful_restarts.load(Ordering::Relaxed),
        counts.broker_restart.lock().await,
        counts.database_restart.lock().await,
        counts.duplicates.load(Ordering::Relaxed),
        counts.delayed_copies.load(Ordering::Relaxed),
        poison,
        poison_copies,
        tally.parked,
        tally.escalations,
        settled.as_ref().map_or(Duration::ZERO, |d| *d),
    ));
    let mut problems = violations;
    if timeouts_outside_restarts >= 2.0 {
        problems.push(format!(
            "{timeouts_outside_restarts:.2} % of the orders timed out outside the broker and database restarts"
        ));
    }
    if let Err(e) = settled {
        problems.insert(0, e);
    }
    problems.extend(counts.unclean_exits.lock().await.iter().cloned());
    problems.extend(unclean);
    assert!(
        tally.confirmed > 0 && tally.failed > 0,
        "mixed outcomes expected: {tally:?}"
    );
    assert!(
        problems.is_empty(),
        "{} invariant violations (logs in {}):\n{}",
        problems.len(),
        sys.log_dir.display(),
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&sys.log_dir);
}
