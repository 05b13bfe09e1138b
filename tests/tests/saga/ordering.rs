//! Messages are not ordered: a rollback can overtake the request it undoes.

use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use saga_tests::{Svc, TestSystem, eventually, sealed_test_card};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{SETTLE, stock_the_shop};

fn envelope(event_type: &str, order_id: Uuid, data: Value) -> (Uuid, Vec<u8>) {
    let event_id = Uuid::now_v7();
    let env = json!({
        "event_id": event_id,
        "event_type": event_type,
        "version": 1,
        "order_id": order_id,
        "causation_id": "test",
        "occurred_at": Utc::now(),
        "deadline_at": Utc::now() + chrono::Duration::seconds(60),
        "producer": "test",
        "data": data,
    });
    (event_id, serde_json::to_vec(&env).unwrap())
}

async fn publish_event(
    sys: &TestSystem,
    conn: &lapin::Connection,
    event_type: &str,
    order_id: Uuid,
    data: Value,
) {
    let (event_id, body) = envelope(event_type, order_id, data);
    let props = BasicProperties::default()
        .with_message_id(event_id.to_string().into())
        .with_correlation_id(order_id.to_string().into())
        .with_type(event_type.into());
    sys.publish(conn, event_type, &body, props).await;
}

async fn status_of(
    sys: &TestSystem,
    svc: Svc,
    sql: &'static str,
    order_id: Uuid,
) -> Option<String> {
    let mut pg = sys.pg(svc).await;
    sqlx::query_scalar(sql)
        .bind(order_id)
        .fetch_optional(&mut pg)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancellation_that_overtakes_the_forward_events_leaves_nothing_applied() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("late", 100_000).await;
    let conn = sys.amqp().await;
    let order_id = Uuid::now_v7();
    let items = json!([{"item_id": "productA", "quantity": 2, "unit_price_cents": 1500}]);

    // The rollback arrives first everywhere...
    publish_event(
        &sys,
        &conn,
        "order.cancelled",
        order_id,
        json!({"customer_id": "late", "reason": "test"}),
    )
    .await;
    eventually(SETTLE, "tombstones in every service", || async {
        let p = status_of(
            &sys,
            Svc::Payment,
            "select status from payments where order_id = $1",
            order_id,
        )
        .await?;
        let r = status_of(
            &sys,
            Svc::Inventory,
            "select status from reservations where order_id = $1",
            order_id,
        )
        .await?;
        let n = status_of(
            &sys,
            Svc::Notification,
            "select status from notifications where order_id = $1",
            order_id,
        )
        .await?;
        (p == "cancelled" && r == "cancelled" && n == "cancelled").then_some(())
    })
    .await;

    // ...then the forward events it cancels.
    let sealed = sealed_test_card(order_id, 3000);
    publish_event(&sys, &conn, "order.created", order_id, json!({
        "customer_id": "late", "items": items, "amount_cents": 3000, "currency": "USD", "payment": sealed,
    }))
    .await;
    publish_event(&sys, &conn, "payment.completed", order_id, json!({
        "customer_id": "late", "items": items, "amount_cents": 3000, "currency": "USD", "card_last4": "4242",
    }))
    .await;
    publish_event(
        &sys,
        &conn,
        "inventory.reserved",
        order_id,
        json!({
            "customer_id": "late", "items": items, "amount_cents": 3000, "currency": "USD",
        }),
    )
    .await;

    eventually(
        SETTLE,
        "each service to ignore its late request",
        || async {
            let m = sys.metrics(Svc::Payment).await;
            let ignored = |svc: &str| {
                m.lines().any(|l| {
                    l.starts_with("late_events_ignored_total")
                        && l.contains(&format!("service=\"{svc}\""))
                })
            };
            (ignored("payment-svc") && ignored("inventory-svc") && ignored("notification-svc"))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        sys.payment(&order_id.to_string()).await.unwrap()["status"],
        "cancelled"
    );
    assert_eq!(sys.balance("late").await, Some(100_000));
    assert_eq!(
        sys.reservation(&order_id.to_string()).await.unwrap()["status"],
        "cancelled"
    );
    sys.wait_for_stock("productA", (10, 0)).await;
    assert!(sys.emails(&order_id.to_string()).await.is_empty());
    sys.shutdown().await;
}
