//! Recovery time: each service, as a lone process, is SIGKILLed in the
//! middle of a steady stream of orders and restarted at once. Its broker
//! connection is gone, its unacked deliveries go back to the queue, its
//! committed events may be unpublished; the new process must pick all of it
//! up fast enough that no saga whose deadline had more than 2 s left when
//! the process died times out.
//!
//! Prints, for each kill, how long until the new process was ready and
//! until the first saga through it was decided, and the orders that timed
//! out. A second test kills payment-svc at the worst instant (its charge
//! committed, `payment.completed` not yet published) of a saga with 2.5 s
//! to live. A binary of its own, its tests one at a time: their timings must
//! not share the machine with other tests.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use saga_tests::process::ProcessSystem;
use saga_tests::publisher::Publisher;
use saga_tests::{Svc, order_dict};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

/// What a saga may lose to a crash: the time a killed service takes to be
/// back, at most.
const ALLOWED_LOSS: Duration = Duration::from_secs(2);

/// Orders per second, published as `order.requested`.
const RATE: u64 = 25;

fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A saga as order-svc recorded it.
#[derive(sqlx::FromRow)]
struct Saga {
    deadline_at: DateTime<Utc>,
    decided_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    status: String,
    reason: Option<String>,
}

/// One SIGKILL and restart.
struct Kill {
    svc: Svc,
    at: DateTime<Utc>,
    ready_after: Duration,
}

static SERIAL: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_killed_between_a_commit_and_its_publish_costs_its_saga_only_the_restart() {
    let _serial = SERIAL.lock().await;
    let mut sys = ProcessSystem::spawn_with(
        env!("CARGO_BIN_EXE_saga-service"),
        &[
            (Svc::Order, 1),
            (Svc::Payment, 1),
            (Svc::Inventory, 1),
            (Svc::Notification, 1),
        ],
        &[("SAGA_DEADLINE_MS", "2500")],
        &[(Svc::Payment, "FAILPOINTS", "outbox::after_commit=1*return")],
    )
    .await;
    let http = sys.http.clone();
    for (svc, path, body) in [
        (Svc::Order, "/catalog/productA", json!({"price_cents": 100})),
        (Svc::Inventory, "/items/productA", json!({"available": 10})),
    ] {
        let r = http
            .put(format!("{}{path}", sys.urls(svc)[0]))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let url = format!("{}/orders", sys.urls(Svc::Order)[0]);
    let request = tokio::spawn(async move {
        http.post(url)
            .json(&order_dict("crash", &[("productA", 1)]))
            .send()
            .await
            .expect("POST /orders")
            .json::<serde_json::Value>()
            .await
            .expect("result dict")
    });
    let payment = sys
        .replicas
        .iter()
        .position(|r| r.svc == Svc::Payment)
        .unwrap();
    sys.wait_exit(payment, Duration::from_secs(10))
        .await
        .expect("payment-svc crashes right after committing the charge");
    let crashed = Utc::now();
    sys.replicas[payment].env.clear();
    sys.start(payment).await;

    let result = request.await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    let mut pg = sys.pg(Svc::Order).await;
    let (created, deadline, decided): (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("select created_at, deadline_at, decided_at from orders")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    report(&format!(
        "recovery: payment-svc killed {} ms into a saga, {} ms before its deadline; decided {} ms after the kill",
        (crashed - created).num_milliseconds(),
        (deadline - crashed).num_milliseconds(),
        (decided - crashed).num_milliseconds(),
    ));
    let unclean = sys.stop_all().await;
    assert!(unclean.is_empty(), "{unclean:?}");
    let _ = std::fs::remove_dir_all(&sys.log_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_service_restarted_at_once_costs_no_saga_with_more_than_2s_left() {
    let _serial = SERIAL.lock().await;
    let mut sys = ProcessSystem::spawn(
        env!("CARGO_BIN_EXE_saga-service"),
        &[
            (Svc::Order, 1),
            (Svc::Payment, 1),
            (Svc::Inventory, 1),
            (Svc::Notification, 1),
        ],
        &[("DEFAULT_BALANCE_CENTS", "100000000")],
    )
    .await;
    let http = sys.http.clone();
    for (svc, path, body) in [
        (Svc::Order, "/catalog/productA", json!({"price_cents": 100})),
        (
            Svc::Inventory,
            "/items/productA",
            json!({"available": 1_000_000}),
        ),
    ] {
        let r = http
            .put(format!("{}{path}", sys.urls(svc)[0]))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    // A steady stream of orders that all succeed unless something is lost.
    let publisher = Arc::new(Mutex::new(Publisher::new(&sys.amqp_url)));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let (publisher, stop) = (publisher.clone(), stop.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut n = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                let body =
                    serde_json::to_vec(&order_dict(&format!("c{}", n % 16), &[("productA", 1)]))
                        .unwrap();
                let props = BasicProperties::default()
                    .with_message_id(Uuid::new_v4().to_string().as_str().into());
                publisher
                    .lock()
                    .await
                    .publish("order.requested", &body, props)
                    .await;
                n += 1;
            }
            n
        }
    });

    let mut kills = Vec::new();
    for svc in [Svc::Payment, Svc::Inventory, Svc::Notification, Svc::Order] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let i = sys.replicas.iter().position(|r| r.svc == svc).unwrap();
        let at = Utc::now();
        let started = Instant::now();
        sys.kill(i).await;
        sys.start(i).await;
        sys.wait_healthy(i).await;
        kills.push(Kill {
            svc,
            at,
            ready_after: started.elapsed(),
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let published = load.await.unwrap();
    let settled =
        saga_tests::eventually(Duration::from_secs(60), "every order decided", || async {
            let mut pg = sys.pg(Svc::Order).await;
            let (all, pending): (i64, i64) = sqlx::query_as(
                "select count(*), count(*) filter (where status = 'PENDING') from orders",
            )
            .fetch_one(&mut pg)
            .await
            .unwrap();
            (all == i64::from(published) && pending == 0).then_some(())
        });
    settled.await;

    let mut pg = sys.pg(Svc::Order).await;
    let orders: Vec<Saga> = sqlx::query_as(
        "select deadline_at, decided_at, created_at, status, reason from orders order by created_at",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    for k in &kills {
        // The first saga created after the kill and confirmed: the service
        // is doing its job again.
        let back = orders
            .iter()
            .filter(|o| o.created_at >= k.at && o.status == "CONFIRMED")
            .filter_map(|o| o.decided_at)
            .min();
        let left: Vec<i64> = orders
            .iter()
            .filter(|o| o.status == "FAILED" && o.deadline_at >= k.at)
            .map(|o| (o.deadline_at - k.at).num_milliseconds())
            .filter(|ms| *ms <= 6000)
            .collect();
        report(&format!(
            "recovery: SIGKILL {:<16} ready again after {:>5} ms, first new saga decided {:>5} ms after the kill; {} sagas timed out (time left at the kill: {left:?} ms)",
            k.svc.identity().name,
            k.ready_after.as_millis(),
            back.map_or(-1, |b| (b - k.at).num_milliseconds()),
            left.len(),
        ));
    }
    // Every order succeeds unless a kill cost it; a kill may cost only the
    // sagas it left with less than ALLOWED_LOSS.
    let lost: Vec<String> = orders
        .iter()
        .filter(|o| o.status != "CONFIRMED")
        .filter(|o| {
            !kills.iter().any(|k| {
                o.deadline_at >= k.at
                    && (o.deadline_at - k.at).to_std().unwrap_or_default() <= ALLOWED_LOSS
            })
        })
        .map(|o| {
            let kill =
                kills
                    .iter()
                    .rfind(|k| k.at <= o.deadline_at)
                    .map_or("no kill".into(), |k| {
                        format!(
                            "{} ms left at the kill of {}",
                            (o.deadline_at - k.at).num_milliseconds(),
                            k.svc.identity().name
                        )
                    });
            format!(
                "{} ({}): {kill}",
                o.status,
                o.reason.as_deref().unwrap_or_default()
            )
        })
        .collect();
    report(&format!(
        "recovery: {} orders at {RATE}/s, {} FAILED in all",
        orders.len(),
        orders.iter().filter(|o| o.status == "FAILED").count(),
    ));
    let unclean = sys.stop_all().await;
    assert!(unclean.is_empty(), "{unclean:?}");
    assert!(
        lost.is_empty(),
        "sagas with more than {ALLOWED_LOSS:?} left at a kill timed out:\n{}",
        lost.join("\n")
    );
    let _ = std::fs::remove_dir_all(&sys.log_dir);
}

/// Defect 4 of issue 23: a process that crashed on one message returned
/// its whole prefetch; RabbitMQ 3.x counts that return for every message,
/// so after ten crashes on the culprit its batch-mates reached the limit
/// with it and were parked as `crash_loop` too (and RabbitMQ 4.x counts no
/// return of a closed channel, so nothing was ever parked). On the broker
/// installed here: payment-svc crashes (a real abort) whenever a batch
/// holds the marked message; it is restarted each time. The marked one
/// ends parked as a crash loop after a few crashes; its batch-mates are
/// charged, none parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_only_the_message_that_keeps_crashing_the_process_is_parked() {
    use common::messaging::envelope::SagaContext;
    use common::messaging::events::{EventType, OrderCreated};

    let _serial = SERIAL.lock().await;
    let mut sys = ProcessSystem::spawn_with(
        env!("CARGO_BIN_EXE_saga-service"),
        &[(Svc::Payment, 1)],
        &[("DEFAULT_BALANCE_CENTS", "100000")],
        &[(Svc::Payment, "FAILPOINTS", "judge::crash_on_marked=return")],
    )
    .await;
    // Stopped while the messages queue up, so that they arrive together.
    sys.terminate(0).await.expect("a clean stop");
    let conn = sys.amqp().await;
    let mut orders = Vec::new();
    for customer in ["alice", "crash-the-process", "bob", "carol"] {
        let order_id = Uuid::now_v7();
        let event = SagaContext {
            order_id,
            deadline_at: Utc::now() + chrono::Duration::seconds(120),
            causation_id: format!("crash-loop:{order_id}"),
            producer: "order-svc",
            trail: Vec::new(),
        }
        .event(
            EventType::OrderCreated,
            &OrderCreated {
                customer_id: customer.into(),
                items: Vec::new(),
                amount_cents: 1000,
                currency: "USD".into(),
                payment: saga_tests::sealed_test_card(order_id, 1000),
                long_deadline_at: None,
            },
        );
        sys.publish(
            &conn,
            "order.created",
            &event.body,
            BasicProperties::default().with_message_id(event.id.to_string().into()),
        )
        .await;
        orders.push((customer, order_id, event.id));
    }
    sys.start(0).await;
    let started = Instant::now();
    let mut crashes = 0;
    let parked = loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still crashing after {crashes} crashes"
        );
        if sys.wait_exit(0, Duration::from_millis(200)).await.is_some() {
            crashes += 1;
            sys.start(0).await;
            continue;
        }
        let parked = saga_tests::parked(&conn, "payment-svc.parking").await;
        if !parked.is_empty() {
            break parked;
        }
    };
    report(&format!(
        "crash loop: {crashes} crashes before the culprit was parked"
    ));
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].1.contains("crashing the process"), "{parked:?}");
    let culprit = orders[1].2.to_string();
    assert_eq!(parked[0].0, culprit, "{parked:?}");
    let mut pg = sys.pg(Svc::Payment).await;
    for (customer, order_id, _) in orders {
        let status: Option<String> =
            sqlx::query_scalar("select status from payments where order_id = $1")
                .bind(order_id)
                .fetch_optional(&mut pg)
                .await
                .unwrap();
        if customer == "crash-the-process" {
            assert_eq!(status, None);
        } else {
            assert_eq!(status.as_deref(), Some("charged"), "{customer}");
        }
    }
    let unclean = sys.stop_all().await;
    assert!(unclean.is_empty(), "{unclean:?}");
    let _ = std::fs::remove_dir_all(&sys.log_dir);
}
