//! Regressions: each defect found by reading the code, reproduced at the
//! exact instant it happens (failpoints, `common::failpoints`, configured
//! in this process) and proved fixed. Run them as a group with
//! `cargo test -p saga-tests --test regression`.
//!
//! Failpoints are process-wide, so the tests of this binary run one at a
//! time (each holds [`SERIAL`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::messaging::broker::Broker;
use common::messaging::delivery::Incoming;
use common::messaging::topology::QueueType;
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use saga_tests::{Sandbox, Svc, TestSystem, eventually, metric_sum, order_dict};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A failpoint turned on for as long as the value lives.
struct Failpoint(&'static str);

impl Failpoint {
    fn on(name: &'static str, actions: &str) -> Failpoint {
        fail::cfg(name, actions).expect("failpoint actions");
        Failpoint(name)
    }
}

impl Drop for Failpoint {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

async fn stock_the_shop(sys: &TestSystem) {
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
}

async fn escalations(sys: &TestSystem, svc: Svc) -> Vec<Value> {
    sys.get(svc, "/admin/escalations")
        .await
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

async fn parked_count(conn: &lapin::Connection, queue: &str) -> usize {
    let ch = conn.create_channel().await.unwrap();
    let mut n = 0;
    while ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_some()
    {
        n += 1;
    }
    n
}

/// An envelope of `event_type` for a new order, `age` old.
fn envelope(event_type: &str, age: chrono::Duration, data: Value) -> (Uuid, Vec<u8>) {
    let event_id = Uuid::now_v7();
    let at = Utc::now() - age;
    let env = json!({
        "event_id": event_id, "event_type": event_type, "version": 1,
        "order_id": Uuid::now_v7(), "causation_id": "test", "occurred_at": at,
        "deadline_at": at + chrono::Duration::seconds(60), "producer": "test", "data": data,
    });
    (event_id, serde_json::to_vec(&env).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_stock_commit_that_keeps_failing_is_escalated_not_parked() {
    let _serial = SERIAL.lock().await;
    stock_commit_escalated_then_retried(TestSystem::builder()).await;
}

/// With a broker user per service, the retries and the operator's retry are
/// stamped with inventory-svc's user, not order-svc's (who owns
/// `order.confirmed`): they were parked as unauthenticated.
#[tokio::test(flavor = "multi_thread")]
async fn regression_retries_stay_trusted_with_a_broker_user_per_service() {
    let _serial = SERIAL.lock().await;
    stock_commit_escalated_then_retried(TestSystem::builder().confined_broker_users()).await;
}

async fn stock_commit_escalated_then_retried(options: saga_tests::Options) {
    let sys = options.retry_max_attempts(2).spawn().await;
    stock_the_shop(&sys).await;
    let failing = Failpoint::on("inventory::stock_commit", "return");

    let (_, result) = sys
        .post_order(&order_dict("commit", &[("productA", 2)]))
        .await;
    assert_eq!(result["status"], "success");
    let id = result["order_id"].as_str().unwrap().to_owned();
    let escalation = eventually(
        Duration::from_secs(15),
        "the stock commit to be escalated",
        || async {
            escalations(&sys, Svc::Inventory)
                .await
                .into_iter()
                .find(|e| e["step"] == "stock commit")
        },
    )
    .await;
    assert_eq!(escalation["routing_key"], "order.confirmed");
    assert_eq!(escalation["status"], "open");
    let conn = sys.amqp().await;
    assert_eq!(parked_count(&conn, "inventory-svc.parking").await, 0);
    assert_eq!(sys.stock("productA").await, (8, 2), "still held, not lost");

    // The cause is fixed; an operator retries it.
    drop(failing);
    let r = sys
        .http
        .post(format!(
            "{}/admin/escalations/{}/retry",
            sys.url(Svc::Inventory),
            escalation["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    sys.wait_for_stock("productA", (8, 0)).await;
    assert_eq!(sys.reservation(&id).await.unwrap()["status"], "committed");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_handler_that_hangs_is_abandoned_and_its_batch_retried() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::builder().handler_timeout_ms(300).spawn().await;
    stock_the_shop(&sys).await;
    let retries = |m: &str| metric_sum(m, "messages_handled_total", &[("outcome", "retry")]);
    let before = retries(&sys.metrics(Svc::Payment).await);
    // The first batch any consumer takes hangs, as on a half-open socket.
    let _hang = Failpoint::on("consumer::hang", "1*return");

    let (_, result) = sys
        .post_order(&order_dict("hang", &[("productA", 1)]))
        .await;

    assert_eq!(result["status"], "success");
    assert!(retries(&sys.metrics(Svc::Payment).await) > before);
    sys.shutdown().await;
}

/// An escalation at once: payment-svc's refund for a cancellation too old
/// to apply (8 days). Returns it as the admin endpoint lists it.
async fn escalate_a_stale_cancellation(sys: &TestSystem) -> Value {
    let conn = sys.amqp().await;
    let (event_id, body) = envelope(
        "order.cancelled",
        chrono::Duration::days(8),
        json!({"customer_id": "c", "reason": "r"}),
    );
    sys.publish(
        &conn,
        "order.cancelled",
        &body,
        BasicProperties::default().with_message_id(event_id.to_string().into()),
    )
    .await;
    eventually(Duration::from_secs(10), "an escalation", || async {
        escalations(sys, Svc::Payment).await.into_iter().next()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_compensation_too_old_to_apply_is_escalated_not_parked() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::spawn().await;
    let escalation = escalate_a_stale_cancellation(&sys).await;
    assert_eq!(escalation["step"], "refund");
    assert!(
        escalation["last_error"]
            .as_str()
            .unwrap()
            .contains("older than the 604800s retention window"),
        "{escalation}"
    );
    let conn = sys.amqp().await;
    assert_eq!(parked_count(&conn, "payment-svc.parking").await, 0);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_inbox_ids_outlive_the_refusal_window_by_a_margin() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::spawn().await;
    let pool = sqlx::PgPool::connect(&sys.database_url(Svc::Payment))
        .await
        .unwrap();
    let window = Duration::from_secs(7 * 24 * 3600);
    sqlx::raw_sql(
        r#"
        insert into inbox (message_id, message_type, received_at)
        values (gen_random_uuid(), 'x', now() - interval '7 days 30 minutes'),
               (gen_random_uuid(), 'x', now() - interval '7 days 2 hours');
        "#,
    )
    .execute(&pool)
    .await
    .unwrap();

    let deleted = common::store::retention::clean_once(&pool, window)
        .await
        .unwrap();

    // Refused from 7 days on, remembered until 7 days and an hour.
    assert_eq!(deleted, Some((0, 1)));
    pool.close().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_escalation_recorded_twice_counts_its_attempts_once() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::spawn().await;
    let pool = sqlx::PgPool::connect(&sys.database_url(Svc::Payment))
        .await
        .unwrap();
    let (event_id, body) = envelope("order.failed", chrono::Duration::zero(), json!({}));
    let msg = Incoming {
        routing_key: "order.failed".into(),
        message_id: Some(event_id.to_string()),
        correlation_id: None,
        reply_to: None,
        message_type: None,
        traceparent: None,
        body,
        attempt: 8,
        max_attempts: 8,
        escalation_id: None,
        delivery_count: 0,
        redelivered: false,
        sender: Some("guest".into()),
        control_headers: Vec::new(),
    };
    // The last attempt, recorded, and recorded again: its ack was lost and
    // the broker delivered it once more.
    for _ in 0..2 {
        common::messaging::escalation::record(&pool, "payment-svc", "refund", &msg, "frozen")
            .await
            .unwrap();
    }
    let attempts: i32 = sqlx::query_scalar("select attempts from escalations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 8);
    pool.close().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_graceful_stop_of_a_lone_order_svc_lets_in_flight_sagas_finish() {
    let _serial = SERIAL.lock().await;
    let mut sys = TestSystem::builder()
        .fault_delay(Svc::Notification, "800")
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    let order = order_dict("deploy", &[("productA", 1)]);
    let (http, url) = (sys.http.clone(), sys.url(Svc::Order).to_owned());
    let request = tokio::spawn(async move {
        let r = http
            .post(format!("{url}/orders"))
            .header("Idempotency-Key", "in-flight")
            .json(&order)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()
    });
    // In flight: placed, not decided.
    eventually(Duration::from_secs(5), "the order to be placed", || async {
        let o = sys
            .get(Svc::Order, "/orders?idempotency_key=in-flight")
            .await?;
        (o["status"] == "PENDING").then_some(())
    })
    .await;

    sys.stop(Svc::Order).await;

    let result = request.await.unwrap();
    assert_eq!(result["status"], "success", "{result}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_late_report_about_an_old_connection_does_not_tear_down_the_new_one() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::new().await;
    let broker = Broker::new(sandbox.amqp_url.clone(), "regression", QueueType::Quorum);
    let cancel = CancellationToken::new();
    tokio::spawn(broker.clone().supervise(cancel.clone()));
    let first = broker.connection(&cancel).await.unwrap();

    broker.report_broken(&first);
    let second = eventually(Duration::from_secs(15), "a new connection", || async {
        broker.current().filter(|c| !Arc::ptr_eq(c, &first))
    })
    .await;
    // A component that saw the first connection fail reports it late.
    broker.report_broken(&first);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let current = broker.current().expect("still connected");
    assert!(
        Arc::ptr_eq(&current, &second),
        "the new connection was torn down"
    );
    cancel.cancel();
    sandbox.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_retry_that_cannot_be_published_leaves_the_escalation_open() {
    let _serial = SERIAL.lock().await;
    let sys = TestSystem::spawn().await;
    let escalation = escalate_a_stale_cancellation(&sys).await;
    let id = escalation["id"].as_str().unwrap().to_owned();
    let _broken = Failpoint::on("escalation::publish", "return");

    let r = sys
        .http
        .post(format!(
            "{}/admin/escalations/{id}/retry",
            sys.url(Svc::Payment)
        ))
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 503);
    let open = sys
        .get(Svc::Payment, "/admin/escalations?status=open")
        .await
        .unwrap();
    assert!(
        open.as_array().unwrap().iter().any(|e| e["id"] == id),
        "still listed as open: {open}"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_new_reply_target_added_while_the_saga_is_decided_gets_the_result() {
    let _serial = SERIAL.lock().await;
    // The saga times out (notification is slower than the deadline): the
    // watcher decides it, independently of the consumer.
    let sys = TestSystem::builder()
        .deadline_ms(1500)
        .fault_delay(Svc::Notification, "4000")
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    let conn = sys.amqp().await;
    let (first, mut first_replies) = saga_tests::Tap::reply_queue(&conn).await;
    let (second, mut second_replies) = saga_tests::Tap::reply_queue(&conn).await;
    let body = serde_json::to_vec(&order_dict("late-target", &[("productA", 1)])).unwrap();
    let request = |reply_to: &str| {
        BasicProperties::default()
            .with_message_id("same-order".into())
            .with_reply_to(reply_to.into())
    };
    sys.publish(&conn, "order.requested", &body, request(&first))
        .await;
    eventually(Duration::from_secs(5), "the order to be placed", || async {
        sys.get(Svc::Order, "/orders?idempotency_key=same-order")
            .await
            .map(|_| ())
    })
    .await;

    // The re-sent request has read the order, still PENDING, and is about to
    // add its reply target when the saga is decided.
    let paused = Failpoint::on("order::before_reply_target", "return");
    sys.publish(&conn, "order.requested", &body, request(&second))
        .await;
    eventually(
        Duration::from_secs(10),
        "the saga to be decided",
        || async {
            let o = sys
                .get(Svc::Order, "/orders?idempotency_key=same-order")
                .await?;
            (o["status"] == "FAILED").then_some(())
        },
    )
    .await;
    drop(paused);

    let first = first_replies
        .next(Duration::from_secs(10))
        .await
        .expect("the first client's reply");
    let second = second_replies
        .next(Duration::from_secs(10))
        .await
        .expect("the second client's reply, sent late");
    assert_eq!(first.data, second.data, "the same result dict");
    sys.shutdown().await;
}

/// Issue 7, item 2: the relay took the confirmation, then the batch failed
/// (a crash, a failed commit) and kept failing until the saga timed out.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_confirmation_the_relay_took_but_was_never_recorded_is_followed_by_a_cancellation()
 {
    let _serial = SERIAL.lock().await;
    let smtp = saga_tests::smtp::SmtpSink::start().await;
    let sys = TestSystem::builder()
        .deadline_ms(2000)
        .smtp_url(&smtp.url)
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    let failing = Failpoint::on("notification::after_send", "return");

    let (_, result) = sys
        .post_order(&order_dict("mailed", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "failure", "{result}");
    let subjects = eventually(
        Duration::from_secs(20),
        "a cancellation email after the confirmation",
        || async {
            let subjects: Vec<String> = smtp
                .received()
                .iter()
                .map(|e| e.subject().to_owned())
                .collect();
            subjects
                .iter()
                .any(|s| s.contains("was cancelled"))
                .then_some(subjects)
        },
    )
    .await;
    drop(failing);
    assert!(
        subjects[0].contains("is confirmed"),
        "the confirmation went out first: {subjects:?}"
    );
    assert!(
        subjects.last().unwrap().contains("was cancelled"),
        "{subjects:?}"
    );

    let mut pg = sys.pg(Svc::Notification).await;
    let (order_id, status): (Uuid, String) =
        sqlx::query_as("select order_id, status from notifications where customer_id = 'mailed'")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(status, "retracted");
    let kinds: Vec<String> =
        sqlx::query_scalar("select kind from emails where order_id = $1 order by kind")
            .bind(order_id)
            .fetch_all(&mut pg)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        ["cancellation"],
        "the confirmation was never recorded"
    );
    assert_eq!(sys.order(&order_id.to_string()).await["status"], "FAILED");
    sys.wait_for_stock("productA", (10, 0)).await;
    sys.shutdown().await;
}

/// Found by the chaos test (a confirmed order with no payment and no
/// debit): in one batch, a rollback's statement failed (a deadlock there; a
/// NUL byte here), the handler returned that error for that message only,
/// and the consumer committed the batch — but the failed statement had
/// aborted the transaction, PostgreSQL answers the COMMIT of an aborted
/// transaction with a rollback and no error, and the fast path published
/// the batch's `payment.completed` for charges that never happened.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_statement_failing_for_one_message_does_not_publish_the_rest_of_its_rolled_back_batch()
 {
    let _serial = SERIAL.lock().await;
    let mut sys = TestSystem::builder().spawn().await;
    sys.set_balance("honest", 100_000).await;
    // Both wait in payment-svc's queue, so they arrive as one batch.
    sys.stop(Svc::Payment).await;
    let conn = sys.amqp().await;
    let mut tap = saga_tests::Tap::new(&conn, &["payment.*"]).await;

    let charged = Uuid::now_v7();
    let sealed = saga_tests::sealed_test_card(charged, 1500);
    let envelope = |event_type: &str, order_id: Uuid, data: Value| {
        let event_id = Uuid::now_v7();
        let body = json!({
            "event_id": event_id, "event_type": event_type, "version": 1,
            "order_id": order_id, "causation_id": "test", "occurred_at": Utc::now(),
            "deadline_at": Utc::now() + chrono::Duration::seconds(60),
            "producer": "test", "data": data,
        });
        (event_id, serde_json::to_vec(&body).unwrap())
    };
    let (id, body) = envelope(
        "order.created",
        charged,
        json!({
            "customer_id": "honest", "amount_cents": 1500, "currency": "USD", "payment": sealed,
            "items": [{"item_id": "productA", "quantity": 1, "unit_price_cents": 1500}],
        }),
    );
    let props = |id: Uuid| BasicProperties::default().with_message_id(id.to_string().into());
    sys.publish(&conn, "order.created", &body, props(id)).await;
    // A rollback whose tombstone the database refuses (a NUL byte in a text
    // column), after the charge in the same transaction.
    let (poison, body) = envelope(
        "order.failed",
        Uuid::now_v7(),
        json!({
            "status": "failure", "error": "Payment failed", "reason": "x", "customer_id": "nul\u{0}",
        }),
    );
    sys.publish(&conn, "order.failed", &body, props(poison))
        .await;
    sys.start(Svc::Payment).await;

    // Whatever payment-svc announces, it did: the charge is there, and the
    // money moved once.
    tap.next_for(
        "payment.completed",
        &charged.to_string(),
        Duration::from_secs(15),
    )
    .await
    .expect("payment-svc announces the charge");
    let payment = sys
        .payment(&charged.to_string())
        .await
        .expect("a payment row for the announced charge");
    assert_eq!(payment["status"], "charged", "{payment}");
    assert_eq!(sys.balance("honest").await, Some(100_000 - 1500));
    sys.shutdown().await;
}
