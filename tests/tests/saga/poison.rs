//! Malformed and poison messages are parked with their reason; valid orders
//! keep flowing.

use lapin::BasicProperties;
use saga_tests::{TestSystem, drain_parked, order_dict};
use serde_json::json;

use crate::stock_the_shop;

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_parked_with_their_reason_and_orders_keep_flowing() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let conn = sys.amqp().await;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());

    let good_envelope_bad_data = json!({
        "event_id": uuid::Uuid::now_v7(), "event_type": "order.created", "version": 1,
        "order_id": uuid::Uuid::now_v7(), "causation_id": null, "occurred_at": chrono::Utc::now(),
        "deadline_at": chrono::Utc::now(), "producer": "test", "data": {"amount_cents": "lots"},
    });
    let mut unknown_type = good_envelope_bad_data.clone();
    unknown_type["event_type"] = json!("order.exploded");
    let huge = vec![b' '; 2 * 1024 * 1024];

    sys.publish(&conn, "order.created", b"{not json", props("malformed"))
        .await;
    sys.publish(
        &conn,
        "order.created",
        good_envelope_bad_data.to_string().as_bytes(),
        props("wrong-types"),
    )
    .await;
    sys.publish(
        &conn,
        "order.created",
        unknown_type.to_string().as_bytes(),
        props("unknown-type"),
    )
    .await;
    sys.publish(&conn, "order.created", &huge, props("huge"))
        .await;
    // An order request without its idempotency key, and an invalid one.
    let order = serde_json::to_vec(&order_dict("p", &[("productA", 1)])).unwrap();
    sys.publish(&conn, "order.requested", &order, BasicProperties::default())
        .await;
    sys.publish(&conn, "order.requested", b"[]", props("invalid-order"))
        .await;

    // Valid orders still go through.
    let (_, result) = sys.post_order(&order_dict("p", &[("productA", 1)])).await;
    assert_eq!(result["status"], "success");

    let payment = drain_parked(&conn, "payment-svc.parking", 4).await;
    let reason = |id: &str| {
        payment
            .iter()
            .find(|(m, _)| m == id)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    assert!(
        reason("malformed").contains("not a valid event envelope"),
        "{payment:?}"
    );
    assert!(
        reason("wrong-types").contains("data of order.created is invalid"),
        "{payment:?}"
    );
    assert!(
        reason("unknown-type")
            .contains("routing key order.created does not match the envelope's event_type"),
        "{payment:?}"
    );
    assert!(reason("huge").contains("exceeds"), "{payment:?}");

    let orders = drain_parked(&conn, "order-svc.parking", 2).await;
    assert!(
        orders
            .iter()
            .any(|(_, r)| r.contains("must carry an AMQP message_id")),
        "{orders:?}"
    );
    assert!(
        orders
            .iter()
            .any(|(id, r)| id == "invalid-order" && r.contains("the order must be a JSON object")),
        "{orders:?}"
    );

    let m = sys.metrics(saga_tests::Svc::Payment).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("messages_parked_total") && l.contains("payment-svc"))
    );
    sys.shutdown().await;
}

/// An order.requested published without a message_id (as from the
/// management UI) gets a failure dict naming the missing idempotency key on
/// its reply_to, and is parked.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_without_a_message_id_is_told_why_on_its_reply_to() {
    let sys = saga_tests::TestSystem::spawn().await;
    let conn = sys.amqp().await;
    let (reply_queue, mut replies) = saga_tests::Tap::reply_queue(&conn).await;
    let body = serde_json::to_vec(&saga_tests::order_dict("ui-user", &[("productA", 1)])).unwrap();
    sys.publish(
        &conn,
        "order.requested",
        &body,
        lapin::BasicProperties::default()
            .with_correlation_id("from-the-ui".into())
            .with_reply_to(reply_queue.as_str().into()),
    )
    .await;
    let reply = replies
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("a reply");
    let result: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(result["status"], "failure", "{result}");
    assert_eq!(result["error"], "Invalid order");
    assert!(
        result["reason"].as_str().unwrap().contains("message_id"),
        "{result}"
    );
    assert!(
        result.get("order_id").is_none(),
        "no order was created: {result}"
    );
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "from-the-ui"
    );
    let parked = saga_tests::drain_parked(&conn, "order-svc.parking", 1).await;
    assert!(
        parked[0].1.contains("must carry an AMQP message_id"),
        "{parked:?}"
    );
    sys.shutdown().await;
}
