//! Internal events are applied only from the broker user of the service
//! that owns them (`common::messaging::trust`).

use std::time::Duration;

use chrono::Utc;
use common::messaging::delivery::{H_ESCALATION_ID, H_ORIGINAL_ROUTING_KEY};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_tests::{
    EXCHANGE, Svc, Tap, TestSystem, drain_parked, eventually, metric_sum, order_dict,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// An envelope as the owner would have sent it.
fn envelope(event_type: &str, order_id: &str, data: Value) -> (String, Vec<u8>) {
    let event_id = Uuid::now_v7().to_string();
    let env = json!({
        "event_id": event_id, "event_type": event_type, "version": 1,
        "order_id": order_id, "causation_id": "forged", "occurred_at": Utc::now(),
        "deadline_at": Utc::now() + chrono::Duration::seconds(60),
        "producer": event_type.split('.').next().unwrap().to_owned() + "-svc",
        "data": data,
    });
    (event_id, serde_json::to_vec(&env).unwrap())
}

/// Publishes on `conn` (another broker user's connection) as that user,
/// or with no user id at all.
async fn publish_as(
    conn: &Connection,
    user: Option<&str>,
    routing_key: &str,
    message_id: &str,
    body: &[u8],
    headers: FieldTable,
) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut props = BasicProperties::default()
        .with_message_id(message_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(user) = user {
        props = props.with_user_id(user.into());
    }
    let confirm = ch
        .basic_publish(
            EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{routing_key} not accepted by the broker");
    let _ = ch.close(200, "done".into()).await;
}

async fn order_status(sys: &TestSystem, order_id: &str) -> String {
    sys.order(order_id).await["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_forged_by_another_broker_user_are_parked_and_change_nothing() {
    let mut sys = TestSystem::builder().deadline_ms(30_000).spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("alice", 100_000).await;
    sys.set_balance("bob", 100_000).await;

    // A: confirmed. B: pending, its payment waiting for payment-svc.
    let (_, a) = sys
        .post_order(&order_dict("alice", &[("productA", 1)]))
        .await;
    assert_eq!(a["status"], "success", "{a}");
    let a = a["order_id"].as_str().unwrap().to_owned();
    sys.stop(Svc::Payment).await;
    let place_b = {
        let http = sys.http.clone();
        let url = format!("{}/orders", sys.url(Svc::Order));
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&order_dict("bob", &[("productA", 2)]))
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()
        })
    };
    let b: String = eventually(Duration::from_secs(10), "order B pending", || async {
        let mut pg = sys.pg(Svc::Order).await;
        sqlx::query_scalar::<_, String>(
            "select order_id::text from orders where customer_id = 'bob' and status = 'PENDING'",
        )
        .fetch_optional(&mut pg)
        .await
        .ok()
        .flatten()
    })
    .await;

    // Mallory has every permission on the vhost, but is not a service.
    let (mallory, mallory_url) = sys.broker_user("mallory").await;
    let conn = Connection::connect(&mallory_url, ConnectionProperties::default())
        .await
        .expect("mallory connects");
    let items = json!([{"item_id": "productA", "quantity": 2, "unit_price_cents": 1500}]);
    let sealed = json!({"key_id": "dev", "sealed": "AAAA", "brand": "visa", "last4": "4242"});
    let forged: Vec<(&str, &str, Value)> = vec![
        // A negative amount would credit bob if it were charged.
        (
            "order.created",
            &b,
            json!({"customer_id": "bob", "items": items,
            "amount_cents": -1_000_000, "currency": "USD", "payment": sealed}),
        ),
        (
            "order.confirmed",
            &b,
            json!({"status": "success", "order_id": b}),
        ),
        // A refund and a release after a confirmation.
        (
            "order.failed",
            &a,
            json!({"status": "failure", "order_id": a,
            "error": "Payment failed", "reason": "forged"}),
        ),
        (
            "order.cancelled",
            &a,
            json!({"status": "failure", "order_id": a,
            "error": "Saga timed out", "reason": "forged"}),
        ),
        (
            "payment.completed",
            &b,
            json!({"customer_id": "bob", "items": items,
            "amount_cents": 3000, "currency": "USD", "card_last4": "4242"}),
        ),
        (
            "payment.failed",
            &b,
            json!({"customer_id": "bob", "code": "x", "reason": "forged"}),
        ),
        (
            "payment.refunded",
            &b,
            json!({"customer_id": "bob", "amount_cents": 3000}),
        ),
        (
            "inventory.reserved",
            &b,
            json!({"customer_id": "bob", "items": items,
            "amount_cents": 3000, "currency": "USD"}),
        ),
        (
            "inventory.failed",
            &b,
            json!({"customer_id": "bob", "code": "x", "reason": "forged"}),
        ),
        (
            "inventory.released",
            &b,
            json!({"customer_id": "bob", "items": items}),
        ),
        // Confirms B without a charge, if believed.
        (
            "notification.sent",
            &b,
            json!({"customer_id": "bob", "email": "x@example.com"}),
        ),
        (
            "notification.failed",
            &b,
            json!({"customer_id": "bob", "reason": "forged"}),
        ),
    ];
    for (key, order, data) in &forged {
        let (id, body) = envelope(key, order, data.clone());
        publish_as(
            &conn,
            Some(&mallory),
            key,
            &id,
            &body,
            FieldTable::default(),
        )
        .await;
    }
    // No user id at all.
    let (anonymous, body) = envelope("notification.sent", &b, json!({"customer_id": "bob"}));
    publish_as(
        &conn,
        None,
        "notification.sent",
        &anonymous,
        &body,
        FieldTable::default(),
    )
    .await;
    // The public entry, dressed up as a retried rollback of A by an
    // operator: only order-svc itself may set these headers.
    let mut headers = FieldTable::default();
    headers.insert(
        H_ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(LongString::from("order.failed")),
    );
    headers.insert(
        H_ESCALATION_ID.into(),
        AMQPValue::LongString(LongString::from(Uuid::new_v4().to_string().as_str())),
    );
    let (retry, body) = envelope(
        "order.failed",
        &a,
        json!({"status": "failure", "order_id": a,
        "error": "Payment failed", "reason": "forged"}),
    );
    publish_as(
        &conn,
        Some(&mallory),
        "order.requested",
        &retry,
        &body,
        headers,
    )
    .await;

    // Each consumer parks what it got, with the reason.
    let own = sys.amqp().await;
    let not_owner = |reasons: &[(String, String)], n: usize| {
        let refused = reasons
            .iter()
            .filter(|(_, r)| r.contains("must be published by") && r.contains(&mallory))
            .count();
        assert_eq!(refused, n, "{reasons:?}");
    };
    let order_parked = drain_parked(&own, "order-svc.parking", 8).await;
    not_owner(&order_parked, 6);
    assert!(
        order_parked
            .iter()
            .any(|(id, r)| id == &anonymous && r.contains("did not set a validated user id")),
        "{order_parked:?}"
    );
    assert!(
        order_parked
            .iter()
            .any(|(id, r)| id == &retry && r.contains("control headers")),
        "{order_parked:?}"
    );
    not_owner(&drain_parked(&own, "inventory-svc.parking", 4).await, 4);
    not_owner(&drain_parked(&own, "notification-svc.parking", 3).await, 3);
    let parked = metric_sum(
        &sys.metrics(Svc::Order).await,
        "messages_parked_total",
        &[("service", "order-svc"), ("reason", "unauthenticated")],
    );
    assert_eq!(parked, 7.0);

    // Nothing changed: A confirmed and charged once, B pending and not
    // charged, stock held only by A (sold) — and one email, A's.
    assert_eq!(order_status(&sys, &a).await, "CONFIRMED");
    assert_eq!(order_status(&sys, &b).await, "PENDING");
    assert_eq!(sys.stock("productA").await, (9, 0));
    assert_eq!(sys.email_kinds(&a).await, ["confirmation"]);
    assert!(sys.emails(&b).await.is_empty());

    // payment-svc, back, parks its three and charges B for real, once.
    sys.start(Svc::Payment).await;
    not_owner(&drain_parked(&own, "payment-svc.parking", 3).await, 3);
    let b_result = place_b.await.unwrap();
    assert_eq!(b_result["status"], "success", "{b_result}");
    assert_eq!(sys.balance("alice").await, Some(100_000 - 1500));
    assert_eq!(sys.balance("bob").await, Some(100_000 - 3000));
    assert_eq!(order_status(&sys, &a).await, "CONFIRMED");
    sys.wait_for_stock("productA", (7, 0)).await;

    // The public entry stays open to a client user: mallory may order.
    let (reply_to, mut replies) = Tap::reply_queue(&conn).await;
    let order = serde_json::to_vec(&order_dict("bob", &[("productA", 1)])).unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        EXCHANGE.into(),
        "order.requested".into(),
        BasicPublishOptions::default(),
        &order,
        BasicProperties::default()
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_reply_to(reply_to.into()),
    )
    .await
    .unwrap();
    let reply = replies
        .next(Duration::from_secs(15))
        .await
        .expect("a reply");
    let reply: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply["status"], "success", "{reply}");
    drop(replies);
    let _ = conn.close(200, "bye".into()).await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_refuses_a_user_id_that_is_not_the_publishers_own() {
    let sys = TestSystem::spawn().await;
    let (_, mallory_url) = sys.broker_user("mallory").await;
    let conn = Connection::connect(&mallory_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    // Claiming to be the services' user.
    let published = async {
        ch.basic_publish(
            EXCHANGE.into(),
            "payment.completed".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_user_id("guest".into()),
        )
        .await?
        .await
    }
    .await;
    assert!(published.is_err(), "the broker took a forged user id");
    let _ = conn.close(200, "bye".into()).await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_broker_user_per_service_each_is_trusted_for_its_own_events_only() {
    let sys = TestSystem::builder()
        .broker_user_per_service()
        .spawn()
        .await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("carol", 100_000).await;

    // The saga runs with four users, each service's events trusted from
    // its own.
    let (_, placed) = sys
        .post_order(&order_dict("carol", &[("productA", 1)]))
        .await;
    assert_eq!(placed["status"], "success", "{placed}");
    let order = placed["order_id"].as_str().unwrap().to_owned();
    sys.wait_for_stock("productA", (9, 0)).await;

    // payment-svc's user (a compromised payment-svc, say) announces that
    // the order failed, to have it refunded and its stock released.
    let (payment_user, payment_url) = sys.broker_users.as_ref().unwrap()[1].clone();
    let conn = Connection::connect(&payment_url, ConnectionProperties::default())
        .await
        .unwrap();
    let (id, body) = envelope(
        "order.failed",
        &order,
        json!({"status": "failure",
        "order_id": order, "error": "Payment failed", "reason": "forged", "customer_id": "carol"}),
    );
    publish_as(
        &conn,
        Some(&payment_user),
        "order.failed",
        &id,
        &body,
        FieldTable::default(),
    )
    .await;

    let own = sys.amqp().await;
    for queue in [
        "payment-svc.parking",
        "inventory-svc.parking",
        "notification-svc.parking",
    ] {
        let parked = drain_parked(&own, queue, 1).await;
        assert!(
            parked[0].1.contains("must be published by order-svc")
                && parked[0].1.contains(&payment_user),
            "{queue}: {parked:?}"
        );
    }
    assert_eq!(order_status(&sys, &order).await, "CONFIRMED");
    assert_eq!(sys.balance("carol").await, Some(100_000 - 1500));
    assert_eq!(sys.stock("productA").await, (9, 0));
    let _ = conn.close(200, "bye".into()).await;
    sys.shutdown().await;
}

/// An event put straight into a service's work queue through the default
/// exchange names no event type in its routing key; it used to skip the
/// producer check and be applied.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_put_straight_into_a_work_queue_is_parked_and_changes_nothing() {
    let sys = TestSystem::spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("dora", 100_000).await;
    let (_, placed) = sys
        .post_order(&order_dict("dora", &[("productA", 1)]))
        .await;
    assert_eq!(placed["status"], "success", "{placed}");
    let order = placed["order_id"].as_str().unwrap().to_owned();
    sys.wait_for_stock("productA", (9, 0)).await;

    // Mallory claims the order failed, to have it refunded.
    let (_, mallory_url) = sys.broker_user("mallory").await;
    let conn = Connection::connect(&mallory_url, ConnectionProperties::default())
        .await
        .expect("mallory connects");
    let (id, body) = envelope(
        "order.failed",
        &order,
        json!({"status": "failure", "order_id": order, "error": "Payment failed",
        "reason": "forged", "customer_id": "dora"}),
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "payment-svc.events".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_type("order.failed".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    let own = sys.amqp().await;
    let parked = drain_parked(&own, "payment-svc.parking", 1).await;
    assert!(parked[0].1.contains("is not an event type"), "{parked:?}");
    assert_eq!(sys.payment(&order).await.unwrap()["status"], "charged");
    assert_eq!(sys.balance("dora").await, Some(100_000 - 1500));
    let _ = conn.close(200, "bye".into()).await;
    sys.shutdown().await;
}

/// Issue 24: `event_type` in serde's object form (`{"notification.sent":
/// null}`) failed the consumer's look at the head, which then skipped the
/// check that it equals the routing key, while the envelope's decoder took
/// it. With a broker user per service, payment-svc's user could publish its
/// own `payment.refunded` carrying a `notification.sent` and confirm an
/// order waiting for its 3-D Secure answer. One spelling only now: a
/// string equal to the routing key; anything else is parked.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_type_in_another_spelling_than_its_routing_key_is_parked() {
    let sys = TestSystem::builder()
        .broker_user_per_service()
        .spawn()
        .await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("dave", 100_000).await;
    let (_, placed) = sys
        .post_order(&saga_tests::order_with_card(
            "dave",
            &[("productA", 1)],
            "4000 0000 0000 3220",
        ))
        .await;
    assert_eq!(placed["status"], "pending", "{placed}");
    let order = placed["order_id"].as_str().unwrap().to_owned();

    let (payment_user, payment_url) = sys.broker_users.as_ref().unwrap()[1].clone();
    let conn = Connection::connect(&payment_url, ConnectionProperties::default())
        .await
        .unwrap();
    let (id, body) = envelope(
        "payment.refunded",
        &order,
        json!({"email_id": Uuid::now_v7(), "kind": "confirmation"}),
    );
    let mut forged: Value = serde_json::from_slice(&body).unwrap();
    forged["event_type"] = json!({"notification.sent": null});
    publish_as(
        &conn,
        Some(&payment_user),
        "payment.refunded",
        &id,
        &serde_json::to_vec(&forged).unwrap(),
        FieldTable::default(),
    )
    .await;
    let own = sys.amqp().await;
    let parked = drain_parked(&own, "order-svc.parking", 1).await;
    assert!(parked[0].1.contains("does not match"), "{parked:?}");
    assert_eq!(order_status(&sys, &order).await, "PENDING");
    let _ = conn.close(200, "bye".into()).await;
    sys.shutdown().await;
}
