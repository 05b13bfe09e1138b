//! Messages are handled in batches: what one message of a batch does never
//! changes what happens to the others.

use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use saga_tests::{Svc, TestSystem, eventually, metric_sum, parked, sealed_test_card};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::stock_the_shop;

fn envelope(event_type: &str, order_id: Uuid, data: Value) -> (Uuid, Vec<u8>) {
    let event_id = Uuid::now_v7();
    let env = json!({
        "event_id": event_id, "event_type": event_type, "version": 1,
        "order_id": order_id, "causation_id": "test", "occurred_at": Utc::now(),
        "deadline_at": Utc::now() + chrono::Duration::seconds(60),
        "producer": "test", "data": data,
    });
    (event_id, serde_json::to_vec(&env).unwrap())
}

async fn publish(sys: &TestSystem, conn: &lapin::Connection, key: &str, id: Uuid, body: &[u8]) {
    let props = BasicProperties::default().with_message_id(id.to_string().into());
    sys.publish(conn, key, body, props).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_in_a_batch_is_parked_and_the_rest_of_the_batch_is_applied() {
    let mut sys = TestSystem::builder().retry_max_attempts(2).spawn().await;
    stock_the_shop(&sys).await;
    // Requests wait in payment-svc's queue, so they arrive as one batch.
    sys.stop(Svc::Payment).await;
    let conn = sys.amqp().await;
    let created = |customer: &str, order_id: Uuid| {
        let sealed = sealed_test_card(order_id, 1500);
        json!({
            "customer_id": customer, "amount_cents": 1500, "currency": "USD", "payment": sealed,
            "items": [{"item_id": "no-such-item", "quantity": 1, "unit_price_cents": 1500}],
        })
    };
    let mut good = Vec::new();
    for n in 0..5 {
        let order_id = Uuid::now_v7();
        let (id, body) = envelope(
            "order.created",
            order_id,
            created(&format!("batch-{n}"), order_id),
        );
        publish(&sys, &conn, "order.created", id, &body).await;
        good.push(order_id);
    }
    // Poison the database rejects (a NUL byte in a text column): it fails
    // the batch's statements, so the batch is retried one message at a time.
    let poison_id = Uuid::now_v7();
    let (db_poison, body) = envelope(
        "order.created",
        poison_id,
        created("nul\u{0}byte", poison_id),
    );
    publish(&sys, &conn, "order.created", db_poison, &body).await;
    // Poison that does not even decode: parked on its own, at once.
    let undecodable = Uuid::now_v7();
    publish(&sys, &conn, "order.created", undecodable, b"{not json").await;

    sys.start(Svc::Payment).await;
    sys.wait_healthy(Svc::Payment).await;

    for order_id in &good {
        eventually(
            Duration::from_secs(15),
            "every good order to be charged",
            || async {
                (sys.payment(&order_id.to_string()).await?["status"] == "charged").then_some(())
            },
        )
        .await;
    }
    for n in 0..5 {
        assert_eq!(
            sys.balance(&format!("batch-{n}")).await,
            Some(1_000_000 - 1500)
        );
    }
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while reasons.len() < 2 && tokio::time::Instant::now() < deadline {
        reasons.extend(parked(&conn, "payment-svc.parking").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reason = |id: Uuid| {
        reasons
            .iter()
            .find(|(m, _)| *m == id.to_string())
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    assert!(
        // Parked at once: a retry cannot make the database take a NUL.
        reason(db_poison).contains("the database refuses this message's data"),
        "{reasons:?}"
    );
    assert!(
        reason(undecodable).contains("not a valid event envelope"),
        "{reasons:?}"
    );
    let m = sys.metrics(Svc::Payment).await;
    assert!(
        metric_sum(
            &m,
            "consumer_batch_fallbacks_total",
            &[("service", "payment-svc")]
        ) >= 1.0
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_orders_for_the_last_unit_in_one_batch_reserve_it_once() {
    let mut sys = TestSystem::spawn().await;
    sys.set_stock("last-one", 1).await;
    sys.stop(Svc::Inventory).await;
    let conn = sys.amqp().await;
    let paid = json!({
        "customer_id": "c", "amount_cents": 100, "currency": "USD", "card_last4": "4242",
        "items": [{"item_id": "last-one", "quantity": 1, "unit_price_cents": 100}],
    });
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    for order_id in [a, b] {
        let (id, body) = envelope("payment.completed", order_id, paid.clone());
        publish(&sys, &conn, "payment.completed", id, &body).await;
    }

    sys.start(Svc::Inventory).await;
    sys.wait_healthy(Svc::Inventory).await;

    let statuses = eventually(Duration::from_secs(15), "both reservations", || async {
        let ra = sys.reservation(&a.to_string()).await?;
        let rb = sys.reservation(&b.to_string()).await?;
        Some([ra, rb])
    })
    .await;
    let held: Vec<&Value> = statuses.iter().filter(|r| r["status"] == "held").collect();
    let rejected: Vec<&Value> = statuses
        .iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    assert_eq!((held.len(), rejected.len()), (1, 1), "{statuses:?}");
    assert_eq!(
        rejected[0]["reason"],
        "Out of stock: last-one (requested 1, available 0)"
    );
    assert_eq!(sys.stock("last-one").await, (0, 1));
    sys.shutdown().await;
}
