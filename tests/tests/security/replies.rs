//! Replies to AMQP clients (issue 24, item 4): order-svc publishes them as
//! its own trusted user, so they go only to a client's own reply queue,
//! expire, and one that cannot be delivered is dropped and counted, never
//! retried for ever.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use saga_tests::{Svc, Tap, TestSystem, drain_parked, eventually, metric_sum, order_dict, parked};
use serde_json::Value;

async fn stock(sys: &TestSystem) {
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 100).await;
    sys.set_balance("replier", 1_000_000).await;
}

fn request(key: &str, reply_to: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(key.into())
        .with_reply_to(reply_to.into())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_to_that_is_not_the_clients_own_reply_queue_is_refused_and_places_no_order() {
    let sys = TestSystem::spawn().await;
    stock(&sys).await;
    let conn = sys.amqp().await;
    let body = serde_json::to_vec(&order_dict("replier", &[("productA", 1)])).unwrap();
    // Another service's work queue, a delay queue (a reply would sit there
    // for ever), a name of the client's choosing.
    let targets = [
        "payment-svc.events",
        "inventory-svc.retry.120s",
        "my-replies",
    ];
    for (n, target) in targets.iter().enumerate() {
        sys.publish(
            &conn,
            "order.requested",
            &body,
            request(&format!("bad-reply-{n}"), target),
        )
        .await;
    }
    let refused = drain_parked(&conn, "order-svc.parking", targets.len()).await;
    for (_, reason) in &refused {
        assert!(reason.contains("reply_to"), "{refused:?}");
    }
    for n in 0..targets.len() {
        assert!(
            sys.get(
                Svc::Order,
                &format!("/orders?idempotency_key=bad-reply-{n}")
            )
            .await
            .is_none(),
            "an order was placed for a refused reply_to"
        );
    }
    // Nothing reached payment-svc's queue: it parked nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(parked(&conn, "payment-svc.parking").await, vec![]);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_expire_and_one_that_cannot_be_delivered_is_dropped_and_counted() {
    let sys = TestSystem::spawn().await;
    stock(&sys).await;
    let conn = sys.amqp().await;
    let body = serde_json::to_vec(&order_dict("replier", &[("productA", 1)])).unwrap();

    // Delivered, with an expiration.
    let (queue, mut replies) = Tap::reply_queue(&conn).await;
    sys.publish(&conn, "order.requested", &body, request("replied", &queue))
        .await;
    let reply = replies
        .next(Duration::from_secs(10))
        .await
        .expect("a reply");
    let result: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(
        reply.properties.expiration().as_ref().map(|e| e.as_str()),
        Some("600000")
    );

    // No such queue any more (the client went away): dropped at once.
    sys.publish(
        &conn,
        "order.requested",
        &body,
        request("gone", "amq.gen-a-client-long-gone"),
    )
    .await;
    // A queue that refuses everything (full): dropped after 4 refusals.
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let full = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    sys.publish(
        &conn,
        "order.requested",
        &body,
        request("full", full.name().as_str()),
    )
    .await;

    let dropped = |reason: &'static str| {
        let sys = &sys;
        move || async move {
            let metrics = sys.metrics(Svc::Order).await;
            (metric_sum(
                &metrics,
                "replies_dropped_total",
                &[("service", "order-svc"), ("reason", reason)],
            ) >= 1.0)
                .then_some(())
        }
    };
    eventually(
        Duration::from_secs(10),
        "the unroutable reply dropped",
        dropped("unroutable"),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the refused reply dropped",
        dropped("refused"),
    )
    .await;
    // Both orders went through all the same.
    for key in ["gone", "full"] {
        let order = sys
            .get(Svc::Order, &format!("/orders?idempotency_key={key}"))
            .await
            .expect("the order");
        assert_eq!(order["status"], "CONFIRMED", "{order}");
    }
    sys.shutdown().await;
}
