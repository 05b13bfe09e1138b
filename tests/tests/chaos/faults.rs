//! What goes wrong during the run: SIGKILLed and restarted services, a
//! graceful restart of each service, one broker restart, one database
//! restart, duplicated and delayed copies of internal events, and a few
//! poison messages.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_tests::process::ProcessSystem;
use saga_tests::smtp::{RelayMode, SmtpSink};
use saga_tests::{Svc, Tap};
use tokio::process::Command;
use tokio::sync::Mutex;
use tokio::time::Instant;

use saga_tests::publisher::Publisher;

/// What the faults did, for the report.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub kills: AtomicUsize,
    pub graceful_restarts: AtomicUsize,
    pub duplicates: AtomicUsize,
    pub delayed_copies: AtomicUsize,
    pub poison: AtomicUsize,
    /// Parked copies the poison should produce (a message reaches every
    /// service bound to its routing key).
    pub poison_copies: AtomicUsize,
    pub broker_restart: Mutex<String>,
    pub database_restart: Mutex<String>,
    pub unclean_exits: Mutex<Vec<String>>,
    /// Every fault, in order, for the recovery report.
    pub log: Mutex<Vec<Fault>>,
}

/// One fault: what, when, how long it lasted (the process down, the
/// server restarting) and how long the services then took to be ready.
#[derive(Debug, Clone)]
pub struct Fault {
    pub what: String,
    pub at: DateTime<Utc>,
    pub outage: Duration,
    pub recovery: Duration,
}

impl FaultCounts {
    /// Records a fault that began at `at` (`started`) and ended at `ended`;
    /// everything it hit is ready now.
    async fn record(&self, what: String, at: DateTime<Utc>, started: Instant, ended: Instant) {
        self.log.lock().await.push(Fault {
            what,
            at,
            outage: ended - started,
            recovery: ended.elapsed(),
        });
    }
}

/// Kills a random replica every 1–2.5 s (restarting it 0.3–1.5 s later),
/// every service at least once; restarts the broker at a third of the
/// run and the database at two thirds; ends with a graceful (SIGTERM)
/// restart of one replica of each service, whose exit must be clean.
pub async fn run(sys: &mut ProcessSystem, run_for: Duration, counts: &FaultCounts) {
    let started = Instant::now();
    let end = started + run_for;
    let (mut broker_done, mut database_done) = (false, false);
    let mut killed: HashSet<Svc> = HashSet::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rand::random_range(1000..2500))).await;
        let elapsed = started.elapsed();
        let (at, fault_started) = (Utc::now(), Instant::now());
        if !broker_done && elapsed > run_for / 3 {
            broker_done = true;
            let how = restart_broker(sys).await;
            let ended = Instant::now();
            wait_all_healthy(sys).await;
            counts.record(how.clone(), at, fault_started, ended).await;
            *counts.broker_restart.lock().await = how;
            continue;
        }
        if !database_done && elapsed > run_for * 2 / 3 {
            database_done = true;
            let how = restart_database(sys).await;
            let ended = Instant::now();
            wait_all_healthy(sys).await;
            counts.record(how.clone(), at, fault_started, ended).await;
            *counts.database_restart.lock().await = how;
            continue;
        }
        // Prefer a service not killed yet.
        let candidates: Vec<usize> = (0..sys.replicas.len())
            .filter(|&i| !killed.contains(&sys.replicas[i].svc))
            .collect();
        let i = if candidates.is_empty() {
            rand::random_range(0..sys.replicas.len())
        } else {
            candidates[rand::random_range(0..candidates.len())]
        };
        killed.insert(sys.replicas[i].svc);
        sys.kill(i).await;
        counts.kills.fetch_add(1, Ordering::Relaxed);
        let down = Duration::from_millis(rand::random_range(300..1500));
        tokio::time::sleep(down).await;
        let ended = Instant::now();
        sys.start(i).await;
        sys.wait_healthy(i).await;
        let what = format!(
            "SIGKILL {}, restarted {} ms later",
            sys.replicas[i].name(),
            down.as_millis()
        );
        counts.record(what, at, fault_started, ended).await;
    }
    // Every service crashes at least once.
    for svc in Svc::ALL {
        if !killed.contains(&svc)
            && let Some(i) = sys.replicas.iter().position(|r| r.svc == svc)
        {
            let (at, fault_started) = (Utc::now(), Instant::now());
            sys.kill(i).await;
            counts.kills.fetch_add(1, Ordering::Relaxed);
            let ended = Instant::now();
            sys.start(i).await;
            sys.wait_healthy(i).await;
            let what = format!("SIGKILL {}, restarted at once", sys.replicas[i].name());
            counts.record(what, at, fault_started, ended).await;
        }
    }
    // A graceful restart of each service, once it is up (a SIGTERM before
    // the process has installed its handler would just kill it).
    for svc in Svc::ALL {
        if let Some(i) = sys.replicas.iter().position(|r| r.svc == svc) {
            sys.wait_healthy(i).await;
            let (at, fault_started) = (Utc::now(), Instant::now());
            if let Err(how) = sys.terminate(i).await {
                counts
                    .unclean_exits
                    .lock()
                    .await
                    .push(format!("{} on SIGTERM: {how}", sys.replicas[i].name()));
            }
            counts.graceful_restarts.fetch_add(1, Ordering::Relaxed);
            let ended = Instant::now();
            sys.start(i).await;
            sys.wait_healthy(i).await;
            let what = format!("SIGTERM {}, restarted at once", sys.replicas[i].name());
            counts.record(what, at, fault_started, ended).await;
        }
    }
}

async fn wait_all_healthy(sys: &ProcessSystem) {
    for i in 0..sys.replicas.len() {
        sys.wait_healthy(i).await;
    }
}

async fn run_cmd(program: &str, args: &[&str]) -> bool {
    let status = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status(),
    )
    .await;
    matches!(status, Ok(Ok(s)) if s.success())
}

fn real_restarts() -> bool {
    std::env::var("CHAOS_REAL_RESTARTS").as_deref() != Ok("0")
}

/// Restarts RabbitMQ (the application, so every connection drops and every
/// queue recovers from disk); where that is not possible, closes this
/// vhost's connections from the server side.
async fn restart_broker(sys: &ProcessSystem) -> String {
    if real_restarts() && run_cmd("rabbitmqctl", &["stop_app"]).await {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = run_cmd("rabbitmqctl", &["start_app"]).await;
        run_cmd("rabbitmqctl", &["await_startup"]).await;
        assert!(started, "RabbitMQ did not start again");
        return "restarted RabbitMQ (rabbitmqctl stop_app; start_app)".into();
    }
    let n = sys.drop_broker_connections().await;
    format!("closed {n} broker connections server-side")
}

/// Restarts PostgreSQL; where that is not possible, terminates this test's
/// database sessions from the server side.
async fn restart_database(sys: &ProcessSystem) -> String {
    if real_restarts()
        && let Some(version) = std::fs::read_dir("/etc/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
        && run_cmd(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &version, "main", "restart"],
        )
        .await
    {
        return format!("restarted PostgreSQL {version} (pg_ctlcluster restart)");
    }
    let n = sys.drop_db_connections().await;
    format!("terminated {n} database sessions server-side")
}

/// Watches every internal event and re-publishes copies: 15 % at once
/// (duplicates), 5 % 3–8 s later (reordered, often after the saga ended).
pub async fn duplicate_events(
    amqp_url: String,
    publisher: Arc<Mutex<Publisher>>,
    until: Instant,
    counts: Arc<FaultCounts>,
) {
    while Instant::now() < until {
        let tap = async {
            let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
                .await
                .ok()?;
            let tap = Tap::try_new(&conn, &["#"]).await.ok()?;
            Some((conn, tap))
        };
        let Ok(Some((_conn, mut tap))) = tokio::time::timeout(Duration::from_secs(5), tap).await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let Some(d) = tap.next(left).await else {
                break;
            };
            if d.routing_key.as_str() == "order.requested" {
                continue;
            }
            let roll: f64 = rand::random();
            if roll < 0.15 {
                counts.duplicates.fetch_add(1, Ordering::Relaxed);
                publisher
                    .lock()
                    .await
                    .publish(d.routing_key.as_str(), &d.data, d.properties.clone())
                    .await;
            } else if roll < 0.20 {
                counts.delayed_copies.fetch_add(1, Ordering::Relaxed);
                let publisher = publisher.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(rand::random_range(3000..8000))).await;
                    publisher
                        .lock()
                        .await
                        .publish(d.routing_key.as_str(), &d.data, d.properties.clone())
                        .await;
                });
            }
        }
    }
}

/// The mail relay misbehaves twice: down (connections closed at once) for
/// 3 s at a quarter of the run, hanging after taking each email for 3 s at
/// half of it.
pub async fn unsettle_the_relay(relay: Arc<SmtpSink>, run_for: Duration, counts: Arc<FaultCounts>) {
    for (at, mode, what) in [
        (run_for / 4, RelayMode::Down, "the mail relay down for 3 s"),
        (
            run_for / 4,
            RelayMode::Hangs,
            "the mail relay hanging after DATA for 3 s",
        ),
    ] {
        tokio::time::sleep(at).await;
        let (now, started) = (Utc::now(), Instant::now());
        relay.set_mode(mode);
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.set_mode(RelayMode::Up);
        counts
            .record(what.into(), now, started, Instant::now())
            .await;
    }
}

/// Messages no service can handle, which must end up parked (and only them).
pub async fn inject_poison(publisher: &Mutex<Publisher>, counts: &FaultCounts) {
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    let poison: [(&str, &[u8], BasicProperties); 3] = [
        ("order.created", b"{definitely not json", props("poison-1")),
        (
            "payment.completed",
            br#"{"event_id": 42}"#,
            props("poison-2"),
        ),
        // An order without its idempotency key.
        (
            "order.requested",
            br#"{"customer_id": "x"}"#,
            BasicProperties::default(),
        ),
    ];
    for (key, body, p) in poison {
        assert!(
            publisher.lock().await.publish(key, body, p).await,
            "poison published"
        );
        counts.poison.fetch_add(1, Ordering::Relaxed);
        let consumers = common::messaging::topology::SERVICES
            .iter()
            .filter(|s| s.consumes().iter().any(|e| e.routing_key() == key))
            .count();
        counts.poison_copies.fetch_add(consumers, Ordering::Relaxed);
    }
}
