//! The outbox's fast path under crashes at its exact instants, and replicas
//! sharing a batch-heavy load: the services run as real processes
//! (`saga-service`), crashed on purpose by a failpoint (see
//! `common::failpoints`) and restarted.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::time::Duration;

use saga_tests::invariants::{self, Expected, Placed};
use saga_tests::process::ProcessSystem;
use saga_tests::{Svc, eventually, metric_sum, metrics_text, order_dict};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_saga-service");

/// Fast sweeps and a long deadline, so that a restart fits in the saga.
const ENV: [(&str, &str); 4] = [
    ("SAGA_DEADLINE_MS", "30000"),
    ("OUTBOX_SWEEP_AFTER_MS", "300"),
    ("OUTBOX_POLL_MS", "100"),
    ("RUST_LOG", "warn,common=info"),
];

const ONE_EACH: [(Svc, usize); 4] = [
    (Svc::Order, 1),
    (Svc::Payment, 1),
    (Svc::Inventory, 1),
    (Svc::Notification, 1),
];

async fn shop(sys: &ProcessSystem) {
    let put = |url: String, body: Value| async move {
        let r = sys.http.put(url).json(&body).send().await.unwrap();
        assert!(r.status().is_success());
    };
    put(
        format!("{}/catalog/widget", sys.urls(Svc::Order)[0]),
        json!({"price_cents": 1000}),
    )
    .await;
    put(
        format!("{}/items/widget", sys.urls(Svc::Inventory)[0]),
        json!({"available": 10}),
    )
    .await;
}

fn replica_of(sys: &ProcessSystem, svc: Svc) -> usize {
    sys.replicas.iter().position(|r| r.svc == svc).unwrap()
}

async fn scalar<T>(sys: &ProcessSystem, svc: Svc, sql: &'static str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut pg = sys.pg(svc).await;
    let v = sqlx::query_scalar(sql).fetch_one(&mut pg).await.unwrap();
    let _ = pg.close().await;
    v
}

/// Places one order over HTTP in the background (the request waits for the
/// decision).
fn place(sys: &ProcessSystem, customer: &str) -> tokio::task::JoinHandle<Value> {
    let (http, url) = (sys.http.clone(), sys.urls(Svc::Order)[0].clone());
    let order = order_dict(customer, &[("widget", 2)]);
    tokio::spawn(async move {
        let r = http
            .post(format!("{url}/orders"))
            .header("Idempotency-Key", "crash-test")
            .json(&order)
            .send()
            .await
            .expect("POST /orders");
        r.json().await.expect("result dict")
    })
}

/// Waits for payment-svc to crash at its failpoint, then restarts it
/// without the failpoint.
async fn expect_crash_then_restart(
    sys: &mut ProcessSystem,
    i: usize,
    check: impl AsyncFnOnce(&ProcessSystem),
) {
    let status = sys
        .wait_exit(i, Duration::from_secs(30))
        .await
        .expect("payment-svc crashes at its failpoint");
    assert_eq!(status.signal(), Some(6), "aborted on purpose: {status}");
    check(sys).await;
    sys.replicas[i].env.clear();
    sys.start(i).await;
    sys.wait_healthy(i).await;
}

async fn assert_confirmed_once(sys: &ProcessSystem, result: &Value, customer: &str) {
    assert_eq!(result["status"], "success", "{result}");
    let id = result["order_id"].as_str().unwrap().to_owned();
    let get = |url: String| async move {
        sys.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    eventually(
        Duration::from_secs(15),
        "the reservation to be committed",
        || {
            let url = format!("{}/reservations/{id}", sys.urls(Svc::Inventory)[0]);
            async move { (get(url).await["status"] == "committed").then_some(()) }
        },
    )
    .await;
    let payments: i64 = scalar(sys, Svc::Payment, "select count(*) from payments").await;
    assert_eq!(payments, 1);
    let account = get(format!("{}/accounts/{customer}", sys.urls(Svc::Payment)[0])).await;
    assert_eq!(account["balance_cents"], 1_000_000 - 2000, "charged once");
    let item = get(format!("{}/items/widget", sys.urls(Svc::Inventory)[0])).await;
    assert_eq!(
        (item["available"].as_i64(), item["held"].as_i64()),
        (Some(8), Some(0))
    );
    let emails: i64 = scalar(sys, Svc::Notification, "select count(*) from emails").await;
    assert_eq!(emails, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_commit_and_publish_is_covered_by_the_sweeper() {
    let mut sys = ProcessSystem::spawn_with(
        BIN,
        &ONE_EACH,
        &ENV,
        &[(Svc::Payment, "FAILPOINTS", "outbox::after_commit=1*return")],
    )
    .await;
    shop(&sys).await;
    let payment = replica_of(&sys, Svc::Payment);

    let request = place(&sys, "crash-1");
    expect_crash_then_restart(&mut sys, payment, async |sys| {
        // The charge and its event are committed; nothing was published.
        let charged: i64 = scalar(
            sys,
            Svc::Payment,
            "select count(*) from payments where status = 'charged'",
        )
        .await;
        let unpublished: i64 = scalar(
            sys,
            Svc::Payment,
            "select count(*) from outbox where routing_key = 'payment.completed'",
        )
        .await;
        let reservations: i64 =
            scalar(sys, Svc::Inventory, "select count(*) from reservations").await;
        assert_eq!((charged, unpublished, reservations), (1, 1, 0));
    })
    .await;

    let result = request.await.unwrap();
    assert_confirmed_once(&sys, &result, "crash-1").await;
    let m = metrics_text(&sys.http, &sys.replicas[payment].url()).await;
    assert!(
        metric_sum(&m, "outbox_published_total", &[("path", "sweep")]) >= 1.0,
        "the sweeper published the committed event"
    );
    assert!(
        metric_sum(
            &m,
            "inbox_duplicates_total",
            &[("event_type", "order.created")]
        ) >= 1.0,
        "the redelivered order.created was recognised"
    );
    let left: i64 = scalar(&sys, Svc::Payment, "select count(*) from outbox").await;
    assert_eq!(left, 0);
    sys.stop_all().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_publish_and_ack_is_absorbed_as_a_duplicate() {
    let mut sys = ProcessSystem::spawn_with(
        BIN,
        &ONE_EACH,
        &ENV,
        &[(Svc::Payment, "FAILPOINTS", "consumer::before_ack=1*return")],
    )
    .await;
    shop(&sys).await;
    let payment = replica_of(&sys, Svc::Payment);

    let request = place(&sys, "crash-2");
    expect_crash_then_restart(&mut sys, payment, async |sys| {
        // Committed and confirmed: inventory-svc got the event.
        eventually(
            Duration::from_secs(15),
            "inventory-svc to reserve",
            || async {
                let n: i64 = scalar(sys, Svc::Inventory, "select count(*) from reservations").await;
                (n == 1).then_some(())
            },
        )
        .await;
    })
    .await;

    let result = request.await.unwrap();
    assert_confirmed_once(&sys, &result, "crash-2").await;
    // The saga can be decided before the restarted payment-svc has taken
    // the redelivery: wait for it.
    eventually(
        Duration::from_secs(15),
        "the unacked order.created to come back and be recognised",
        || async {
            let m = metrics_text(&sys.http, &sys.replicas[payment].url()).await;
            let seen = metric_sum(
                &m,
                "inbox_duplicates_total",
                &[("event_type", "order.created")],
            );
            (seen >= 1.0).then_some(())
        },
    )
    .await;
    sys.stop_all().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_a_batch_heavy_load_without_a_deadlock() {
    let mut sys = ProcessSystem::spawn(
        BIN,
        &[
            (Svc::Order, 2),
            (Svc::Payment, 2),
            (Svc::Inventory, 2),
            (Svc::Notification, 2),
        ],
        &[("DB_POOL_SIZE", "4")],
    )
    .await;
    // Few items and few customers: every batch contends for the same rows.
    let items = ["a", "b", "c", "d"];
    let mut stock = HashMap::new();
    for item in items {
        let order = &sys.urls(Svc::Order)[0];
        let inventory = &sys.urls(Svc::Inventory)[0];
        sys.http
            .put(format!("{order}/catalog/{item}"))
            .json(&json!({"price_cents": 100}))
            .send()
            .await
            .unwrap();
        sys.http
            .put(format!("{inventory}/items/{item}"))
            .json(&json!({"available": 100_000}))
            .send()
            .await
            .unwrap();
        stock.insert(item.to_owned(), 100_000);
    }

    let placed = Arc::new(Mutex::new(Vec::new()));
    let urls = sys.urls(Svc::Order);
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (http, urls, placed) = (sys.http.clone(), urls.clone(), placed.clone());
            tokio::spawn(async move {
                for n in 0..10 {
                    // Two or three items, in a different order each time.
                    let mut lines: Vec<(&str, i64)> =
                        items.iter().map(|i| (*i, 1 + (c + n) as i64 % 3)).collect();
                    lines.rotate_left((c + n) % 4);
                    lines.truncate(2 + (c + n) % 2);
                    let key = format!("load-{c}-{n}");
                    let order = order_dict(&format!("cust-{}", c % 4), &lines);
                    let r = http
                        .post(format!("{}/orders", urls[(c + n) % urls.len()]))
                        .header("Idempotency-Key", &key)
                        .json(&order)
                        .send()
                        .await
                        .unwrap();
                    let result: Value = r.json().await.unwrap();
                    placed.lock().await.push(Placed {
                        keyless: false,
                        key,
                        over_http: true,
                        result: Some(result),
                    });
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let placed = placed.lock().await.clone();
    invariants::wait_until_settled(&sys, &placed, Duration::from_secs(60))
        .await
        .expect("settled");
    let initial_balance = |_: &str| 1_000_000;
    let (tally, violations) = invariants::check(
        &sys,
        &placed,
        &Expected {
            initial_stock: &stock,
            initial_balance: &initial_balance,
            parked: 0,
            relay: None,
        },
    )
    .await;
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(tally.confirmed, 320, "every order confirmed: {tally:?}");

    let (mut deadlocks, mut batches, mut messages) = (0.0, 0.0, 0.0);
    for r in &sys.replicas {
        let m = metrics_text(&sys.http, &r.url()).await;
        deadlocks += metric_sum(&m, "db_retryable_errors_total", &[("kind", "deadlock")]);
        batches += metric_sum(&m, "consumer_batch_size_count", &[]);
        messages += metric_sum(&m, "consumer_batch_size_sum", &[]);
    }
    assert_eq!(deadlocks, 0.0, "no deadlock between replicas");
    assert!(
        messages > batches,
        "deliveries were handled in batches: {messages} in {batches}"
    );
    sys.stop_all().await;
}
