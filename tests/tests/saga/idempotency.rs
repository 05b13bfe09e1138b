//! Duplicates change nothing: a client's retried order, and internal events
//! delivered twice.

use std::time::Duration;

use lapin::BasicProperties;
use saga_tests::{Svc, Tap, TestSystem, eventually, order_dict};
use serde_json::Value;

use crate::{SETTLE, stock_the_shop};

async fn count(sys: &TestSystem, svc: Svc, sql: &'static str) -> i64 {
    let mut pg = sys.pg(svc).await;
    sqlx::query_scalar(sql).fetch_one(&mut pg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_order_requested_message_id_twice_gives_one_order() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let conn = sys.amqp().await;
    let (reply_queue, mut replies) = Tap::reply_queue(&conn).await;

    let body = serde_json::to_vec(&order_dict("twice", &[("productA", 1)])).unwrap();
    for _ in 0..2 {
        sys.publish(
            &conn,
            "order.requested",
            &body,
            BasicProperties::default()
                .with_message_id("same-key".into())
                .with_reply_to(reply_queue.as_str().into()),
        )
        .await;
    }

    let reply = replies
        .next(Duration::from_secs(10))
        .await
        .expect("a reply");
    let result: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(result["status"], "success");
    // The reply's correlation id defaults to the message id.
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "same-key"
    );
    assert!(
        replies.next(Duration::from_secs(2)).await.is_none(),
        "one reply only"
    );
    assert_eq!(
        count(&sys, Svc::Order, "select count(*) from orders").await,
        1
    );
    assert_eq!(
        count(&sys, Svc::Payment, "select count(*) from payments").await,
        1
    );
    sys.wait_for_stock("productA", (9, 0)).await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_http_request_with_the_same_idempotency_key_returns_the_same_order() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let order = order_dict("retrier", &[("productA", 2)]);

    let (first, second) = tokio::join!(
        sys.post_order_with_key(&order, Some("key-1")),
        sys.post_order_with_key(&order, Some("key-1")),
    );
    let (third_status, third) = sys.post_order_with_key(&order, Some("key-1")).await;

    assert_eq!(first.1["status"], "success");
    assert_eq!(first.1, second.1);
    assert_eq!((third_status, &third), (200, &first.1));
    assert_eq!(
        count(&sys, Svc::Order, "select count(*) from orders").await,
        1
    );
    sys.wait_for_stock("productA", (8, 0)).await;

    let different = order_dict("retrier", &[("productA", 3)]);
    let (status, body) = sys.post_order_with_key(&different, Some("key-1")).await;
    assert_eq!(status, 409);
    assert_eq!(body["status"], "failure");
    assert_eq!(
        count(&sys, Svc::Order, "select count(*) from orders").await,
        1
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_events_published_twice_by_hand_charge_and_reserve_once() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("dup", 100_000).await;
    let conn = sys.amqp().await;
    let mut tap = Tap::new(&conn, &["order.created", "payment.completed"]).await;

    let (_, result) = sys.post_order(&order_dict("dup", &[("productA", 2)])).await;
    assert_eq!(result["status"], "success");
    let id = result["order_id"].as_str().unwrap().to_owned();
    let created = tap
        .next_for("order.created", &id, Duration::from_secs(5))
        .await
        .unwrap();
    let paid = tap
        .next_for("payment.completed", &id, Duration::from_secs(5))
        .await
        .unwrap();
    eventually(SETTLE, "the reservation to be committed", || async {
        (sys.reservation(&id).await?["status"] == "committed").then_some(())
    })
    .await;
    let balance = sys.balance("dup").await.unwrap();
    let stock = sys.stock("productA").await;
    assert_eq!(stock, (8, 0));
    assert_eq!(balance, 100_000 - 3000);

    // Publish exact copies (same message id) of both events, twice each.
    for d in [&created, &paid, &created, &paid] {
        sys.publish(&conn, d.routing_key.as_str(), &d.data, d.properties.clone())
            .await;
    }

    eventually(SETTLE, "both copies to be absorbed", || async {
        let m = sys.metrics(Svc::Payment).await;
        let absorbed = |svc: &str, ev: &str| {
            m.lines().any(|l| {
                l.starts_with("inbox_duplicates_total")
                    && l.contains(&format!("service=\"{svc}\""))
                    && l.contains(&format!("event_type=\"{ev}\""))
            })
        };
        (absorbed("payment-svc", "order.created") && absorbed("inventory-svc", "payment.completed"))
            .then_some(())
    })
    .await;
    // Let any (wrong) second effect land before checking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sys.balance("dup").await, Some(balance));
    assert_eq!(sys.stock("productA").await, stock);
    assert_eq!(
        count(&sys, Svc::Payment, "select count(*) from payments").await,
        1
    );
    assert_eq!(
        count(
            &sys,
            Svc::Inventory,
            "select count(*) from reservation_lines"
        )
        .await,
        1
    );
    assert_eq!(sys.email_kinds(&id).await, ["confirmation"]);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_is_found_by_its_idempotency_key_whatever_its_outcome() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("nokey", 0).await;
    let (_, declined) = sys
        .post_order_with_key(
            &order_dict("nokey", &[("productA", 1)]),
            Some("lost-answer"),
        )
        .await;
    assert_eq!(declined["reason"], "Insufficient funds");

    let found = sys
        .get(Svc::Order, "/orders?idempotency_key=lost-answer")
        .await
        .expect("found by its key");
    assert_eq!(found["status"], "FAILED");
    assert_eq!(found["result"], declined);
    let id = found["order_id"].as_str().unwrap();
    assert_eq!(sys.order(id).await["order_id"], found["order_id"]);
    assert!(
        sys.get(Svc::Order, "/orders?idempotency_key=never-used")
            .await
            .is_none()
    );
    sys.shutdown().await;
}
