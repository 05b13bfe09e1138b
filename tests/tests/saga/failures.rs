//! Each failure class returns the right dict and leaves every database
//! compensated.

use std::time::{Duration, Instant};

use saga_tests::{Svc, TestSystem, eventually, order_dict, order_with_card};
use serde_json::{Value, json};

use crate::{SETTLE, stock_the_shop};

async fn order_id_of(sys: &TestSystem, customer: &str) -> String {
    let mut pg = sys.pg(Svc::Order).await;
    sqlx::query_scalar::<_, uuid::Uuid>("select order_id from orders where customer_id = $1")
        .bind(customer)
        .fetch_one(&mut pg)
        .await
        .unwrap()
        .to_string()
}

/// The order FAILED, no stock moved, no confirmation email.
async fn assert_rolled_back(sys: &TestSystem, id: &str) {
    assert_eq!(sys.order(id).await["status"], "FAILED");
    sys.wait_for_stock("productA", (10, 0)).await;
    sys.wait_for_stock("productB", (10, 0)).await;
    // A confirmation may only stand if a cancellation followed it.
    let kinds = sys.email_kinds(id).await;
    assert!(
        !kinds.contains(&"confirmation".to_owned()) || kinds.contains(&"cancellation".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_funds_fails_the_payment_and_changes_nothing() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("poor", 1000).await;

    let (status, result) = sys
        .post_order(&order_dict("poor", &[("productA", 1)]))
        .await;

    assert_eq!(status, 200);
    let id = order_id_of(&sys, "poor").await;
    assert_eq!(
        result,
        json!({"status": "failure", "order_id": id, "error": "Payment failed", "reason": "Insufficient funds"})
    );
    assert_rolled_back(&sys, &id).await;
    assert_eq!(sys.payment(&id).await.unwrap()["status"], "declined");
    assert_eq!(sys.balance("poor").await, Some(1000));
    assert!(sys.email_kinds(&id).await.is_empty());
    assert!(
        sys.reservation(&id)
            .await
            .is_none_or(|r| r["status"] == "cancelled")
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declining_test_card_fails_the_payment() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;

    let (_, result) = sys
        .post_order(&order_with_card(
            "carol",
            &[("productA", 1)],
            "4000 0000 0000 0002",
        ))
        .await;

    let id = order_id_of(&sys, "carol").await;
    assert_eq!(
        result,
        json!({"status": "failure", "order_id": id, "error": "Payment failed", "reason": "Card declined"})
    );
    assert_rolled_back(&sys, &id).await;
    assert_eq!(
        sys.payment(&id).await.unwrap()["decline_code"],
        "card_declined"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_stock_refunds_the_payment_and_names_the_item() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("dave", 100_000).await;

    let (_, result) = sys
        .post_order(&order_dict("dave", &[("productA", 1), ("productB", 11)]))
        .await;

    assert_eq!(result["status"], "failure");
    assert_eq!(result["error"], "Inventory reservation failed");
    assert_eq!(
        result["reason"],
        "Out of stock: productB (requested 11, available 10)"
    );
    let id = order_id_of(&sys, "dave").await;
    eventually(SETTLE, "the refund", || async {
        (sys.payment(&id).await?["status"] == "refunded").then_some(())
    })
    .await;
    assert_eq!(sys.balance("dave").await, Some(100_000));
    assert_rolled_back(&sys, &id).await;
    assert_eq!(sys.reservation(&id).await.unwrap()["status"], "rejected");
    assert!(sys.email_kinds(&id).await.is_empty());
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bouncing_email_refunds_the_payment_and_releases_the_stock() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("erin", 100_000).await;
    sys.set_email("erin", "erin@mailhost.invalid").await;

    let (_, result) = sys
        .post_order(&order_dict("erin", &[("productA", 3)]))
        .await;

    assert_eq!(result["error"], "Notification failed");
    assert_eq!(
        result["reason"],
        "Email bounced: the address on file is undeliverable"
    );
    let id = order_id_of(&sys, "erin").await;
    eventually(SETTLE, "refund and release", || async {
        let refunded = sys.payment(&id).await?["status"] == "refunded";
        let released = sys.reservation(&id).await?["status"] == "released";
        (refunded && released).then_some(())
    })
    .await;
    assert_eq!(sys.balance("erin").await, Some(100_000));
    assert_rolled_back(&sys, &id).await;
    assert!(sys.email_kinds(&id).await.is_empty());
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_past_its_deadline_is_failed_on_time_and_rolled_back() {
    // The notification step is slower than the whole deadline.
    let sys = TestSystem::builder()
        .deadline_ms(2000)
        .fault_delay(Svc::Notification, "3000")
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    sys.set_balance("frank", 100_000).await;

    let started = Instant::now();
    let (status, result) = sys
        .post_order(&order_dict("frank", &[("productA", 2)]))
        .await;
    let took = started.elapsed();

    assert_eq!(status, 200);
    assert_eq!(result["status"], "failure");
    assert_eq!(result["error"], "Order timed out");
    assert_eq!(
        result["reason"],
        "Saga deadline of 2000 ms exceeded while waiting for notification"
    );
    assert!(
        took < Duration::from_millis(2000 + 1000),
        "answered after {took:?}"
    );

    let id = order_id_of(&sys, "frank").await;
    eventually(SETTLE, "refund and release", || async {
        let refunded = sys.payment(&id).await?["status"] == "refunded";
        let released = sys.reservation(&id).await?["status"] == "released";
        (refunded && released).then_some(())
    })
    .await;
    assert_eq!(sys.balance("frank").await, Some(100_000));
    assert_rolled_back(&sys, &id).await;
    // The delayed confirmation request arrives after the deadline: no email.
    let mut pg = sys.pg(Svc::Notification).await;
    let status: String = eventually(
        SETTLE,
        "notification-svc to see the late request",
        || async {
            let mut pg = sys.pg(Svc::Notification).await;
            sqlx::query_scalar("select status from notifications where order_id = $1::uuid")
                .bind(&id)
                .fetch_optional(&mut pg)
                .await
                .unwrap()
        },
    )
    .await;
    assert!(
        ["expired", "cancelled"].contains(&status.as_str()),
        "{status}"
    );
    let sent: i64 = sqlx::query_scalar("select count(*) from emails where order_id = $1::uuid")
        .bind(&id)
        .fetch_one(&mut pg)
        .await
        .unwrap();
    assert_eq!(sent, 0);
    let timeline: Vec<Value> = sys.order(&id).await["steps"].as_array().unwrap().clone();
    assert!(timeline.iter().any(|s| s["step"] == "order.cancelled"));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saga_whose_service_is_down_times_out_and_compensates_when_it_returns() {
    let mut sys = TestSystem::builder()
        .deadline_ms(1500)
        .without(Svc::Inventory)
        .spawn()
        .await;
    stock_the_shop_without_inventory(&sys).await;
    sys.set_balance("gina", 50_000).await;

    let (_, result) = sys
        .post_order(&order_dict("gina", &[("productA", 1)]))
        .await;

    assert_eq!(result["error"], "Order timed out");
    assert_eq!(
        result["reason"],
        "Saga deadline of 1500 ms exceeded while waiting for inventory"
    );
    let id = order_id_of(&sys, "gina").await;
    eventually(SETTLE, "the refund", || async {
        (sys.payment(&id).await?["status"] == "refunded").then_some(())
    })
    .await;
    // inventory-svc comes back: it must not reserve for the dead saga.
    sys.start(Svc::Inventory).await;
    sys.wait_healthy(Svc::Inventory).await;
    sys.set_stock("productA", 10).await;
    eventually(SETTLE, "inventory-svc to close the saga", || async {
        (sys.reservation(&id).await?["status"] != "held").then_some(())
    })
    .await;
    sys.wait_for_stock("productA", (10, 0)).await;
    assert_eq!(sys.balance("gina").await, Some(50_000));
    sys.shutdown().await;
}

async fn stock_the_shop_without_inventory(sys: &TestSystem) {
    sys.set_price("productA", 1500).await;
    sys.set_price("productB", 700).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_orders_get_400_with_a_reason_and_create_nothing() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;

    let cases = [
        (
            json!({"customer_id": "x", "items": [], "payment_info": {}}),
            "items must not be empty",
        ),
        (
            order_dict("x", &[("unknown-item", 1)]),
            "unknown item(s): unknown-item",
        ),
        (
            order_dict("x", &[("productA", 0)]),
            "items[0].quantity must be an integer from 1 to 10000",
        ),
        (
            order_with_card("x", &[("productA", 1)], "4242 4242 4242 4241"),
            "payment_info.card_number is not a valid card number (checksum)",
        ),
        (json!("not an object"), "the order must be a JSON object"),
    ];
    for (body, reason) in cases {
        let (status, result) = sys.post_order(&body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            result,
            json!({"status": "failure", "error": "Invalid order", "reason": reason})
        );
    }
    let r = sys
        .http
        .post(format!("{}/orders", sys.url(Svc::Order)))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut pg = sys.pg(Svc::Order).await;
    let orders: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(&mut pg)
        .await
        .unwrap();
    let outbox: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(&mut pg)
        .await
        .unwrap();
    assert_eq!((orders, outbox), (0, 0));
    sys.shutdown().await;
}
