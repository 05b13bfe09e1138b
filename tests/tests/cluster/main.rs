//! The system, three replicas of each service, on a 3-node RabbitMQ cluster
//! (`scripts/cluster-up.sh`), under
//! a steady stream of mixed orders: the node every service is connected to
//! is killed (SIGKILL) and restarted, a second node is stopped (a partition,
//! as far as the others can tell) and started again, and service replicas
//! are killed. At the end every client has a definitive answer and every
//! invariant holds from every database. A binary of its own: it starts and
//! stops broker nodes.
//!
//! `CLUSTER_SECS` sets the length of the load (default 30).

#[path = "../chaos/load.rs"]
#[allow(dead_code)] // its AMQP client is not used here
mod load;

use std::collections::HashMap;
use std::io::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use saga_tests::Svc;
use saga_tests::invariants;
use saga_tests::process::ProcessSystem;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::load::ITEMS;

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// `scripts/cluster-up.sh [arg]`: the AMQP_URL list it prints last.
fn cluster_up(arg: Option<&str>) -> String {
    let mut cmd = Command::new(repo_root().join("scripts/cluster-up.sh"));
    if let Some(arg) = arg {
        cmd.arg(arg);
    }
    let out = cmd.output().expect("run scripts/cluster-up.sh");
    assert!(
        out.status.success(),
        "cluster-up.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

fn rabbitmqctl(node: usize, args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .arg("-n")
        .arg(format!("saga-{node}@localhost"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl -n saga-{node} {args:?}");
}

/// SIGKILL of a node's Erlang VM (its pid file, from cluster-up.sh).
fn kill_node(node: usize) {
    let pid_file = repo_root().join(format!("run/cluster/saga-{node}/pid"));
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
    let status = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {}", pid.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_system_converges_on_a_cluster_losing_nodes_and_replicas() {
    let run_for = Duration::from_secs(
        std::env::var("CLUSTER_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let started = Instant::now();
    // Nodes of another checkout keep their data elsewhere: this run's own.
    cluster_up(Some("stop"));
    let urls = cluster_up(None);
    report(&format!("cluster: up in {:?}: {urls}", started.elapsed()));
    let bases: Vec<String> = urls
        .split(',')
        .map(|u| u.trim_end_matches("/%2f").to_owned())
        .collect();
    saga_tests::use_broker_cluster(bases, "http://127.0.0.1:15681".into());

    let mut sys = ProcessSystem::spawn(
        env!("CARGO_BIN_EXE_saga-service"),
        &[
            (Svc::Order, 3),
            (Svc::Payment, 3),
            (Svc::Inventory, 3),
            (Svc::Notification, 3),
        ],
        &[
            ("DB_POOL_SIZE", "4"),
            ("OUTBOX_POLL_MS", "200"),
            ("SHUTDOWN_GRACE_MS", "5000"),
            ("DEFAULT_BALANCE_CENTS", &load::DEFAULT_BALANCE.to_string()),
        ],
    )
    .await;
    report(&format!("cluster: logs in {}", sys.log_dir.display()));

    load::open_the_shop(&sys).await;

    // Load over HTTP (AMQP clients would need the node list too).
    let until = Instant::now() + run_for;
    let placed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(load::http_client(
            load::Endpoints {
                orders: sys.urls(Svc::Order),
                payments: sys.urls(Svc::Payment),
                long_running: false,
            },
            true,
            until,
            placed.clone(),
        )));
    }

    // The faults, spread over the run.
    let step = run_for / 6;
    let mut failovers = 0;
    let mut longest_stall = Duration::ZERO;
    tokio::time::sleep(step).await;
    report("cluster: SIGKILL saga-1 (every service's node)");
    kill_node(1);
    failovers += 1;
    let down = Instant::now();
    tokio::time::sleep(step).await;
    report("cluster: SIGKILL a payment-svc replica and an order-svc replica");
    let payment = sys
        .replicas
        .iter()
        .position(|r| r.svc == Svc::Payment)
        .expect("a payment replica");
    let order = sys
        .replicas
        .iter()
        .position(|r| r.svc == Svc::Order)
        .expect("an order replica");
    sys.kill(payment).await;
    sys.kill(order).await;
    let back = Instant::now();
    let _ = tokio::task::spawn_blocking(|| cluster_up(None)).await;
    longest_stall = longest_stall.max(down.elapsed());
    report(&format!("cluster: saga-1 back in {:?}", back.elapsed()));
    sys.start(payment).await;
    sys.start(order).await;
    tokio::time::sleep(step).await;
    report("cluster: stop_app saga-2 (cut off from the cluster)");
    let cut = Instant::now();
    tokio::task::spawn_blocking(|| rabbitmqctl(2, &["stop_app"]))
        .await
        .unwrap();
    tokio::time::sleep(step).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(2, &["start_app"]))
        .await
        .unwrap();
    longest_stall = longest_stall.max(cut.elapsed());
    report("cluster: saga-2 back");

    for t in tasks {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .expect("a load task did not finish within 3 minutes of the end of the load")
            .unwrap();
    }
    let placed = placed.lock().await.clone();
    let settled = invariants::wait_until_settled(&sys, &placed, Duration::from_secs(240)).await;
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
    let expected = invariants::Expected {
        initial_stock: &initial_stock,
        initial_balance: &initial_balance,
        parked: 0,
        relay: None,
    };
    let (tally, violations) = invariants::check(&sys, &placed, &expected).await;
    let mut pg = sys.pg(Svc::Order).await;
    let timeouts: i64 =
        sqlx::query_scalar("select count(*) from orders where error = 'Order timed out'")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    drop(pg);
    let unclean = sys.stop_all().await;
    report(&format!(
        "cluster: {}s of load; {} orders, {} answered, {} confirmed, {} failed ({} timeouts); \
         {} node failover(s); longest node outage {:?}; settled in {:?}",
        run_for.as_secs(),
        tally.orders,
        placed.iter().filter(|p| p.result.is_some()).count(),
        tally.confirmed,
        tally.failed,
        timeouts,
        failovers,
        longest_stall,
        settled.as_ref().map_or(Duration::ZERO, |d| *d),
    ));
    let mut problems = violations;
    if let Err(e) = settled {
        problems.insert(0, e);
    }
    problems.extend(unclean);
    assert!(tally.confirmed > 0, "sagas confirmed: {tally:?}");
    assert!(
        placed.iter().all(|p| !p.over_http || p.result.is_some()),
        "every HTTP client got a definitive answer"
    );
    assert!(
        problems.is_empty(),
        "{} invariant violations (logs in {}):\n{}",
        problems.len(),
        sys.log_dir.display(),
        problems.join("\n")
    );
    let _ = std::fs::remove_dir_all(&sys.log_dir);
    cluster_up(Some("stop"));
}
