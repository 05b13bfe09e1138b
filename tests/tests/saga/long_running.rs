//! Long-running sagas: a payment that needs the customer's 3-D Secure
//! confirmation is answered "pending" within the deadline, goes on under the
//! long deadline, and is confirmed or rolled back like any other saga.

use std::time::{Duration, Instant};

use saga_tests::{Svc, TestSystem, eventually, order_dict, order_with_card};
use serde_json::Value;

use crate::{SETTLE, stock_the_shop};

const THREE_D_SECURE: &str = "4000 0000 0000 3220";

async fn gateway(sys: &TestSystem, order_id: &str, answer: &str) -> (u16, Value) {
    let r = sys
        .http
        .post(format!(
            "{}/payments/{order_id}/{answer}",
            sys.url(Svc::Payment)
        ))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Places a 3-D Secure order; returns its id once answered "pending".
async fn place_pending(sys: &TestSystem, customer: &str) -> String {
    let started = Instant::now();
    let (status, result) = sys
        .post_order(&order_with_card(
            customer,
            &[("productA", 2)],
            THREE_D_SECURE,
        ))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the ordinary deadline"
    );
    assert_eq!(status, 202, "{result}");
    assert_eq!(result["status"], "pending", "{result}");
    assert_eq!(result["next"]["step"], "payment_confirmation", "{result}");
    result["order_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_3d_secure_payment_confirmed_after_8_s_confirms_the_order() {
    let sys = TestSystem::builder().long_deadline_ms(20_000).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("tess", 100_000).await;
    let placed_at = Instant::now();
    let id = place_pending(&sys, "tess").await;

    let order = sys.order(&id).await;
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["awaiting"]["step"], "payment_confirmation", "{order}");
    assert_eq!(sys.payment(&id).await.unwrap()["status"], "action_required");
    assert_eq!(
        sys.balance("tess").await,
        Some(100_000),
        "nothing charged yet"
    );
    // The stock is held for it, until its long deadline, and not announced.
    sys.wait_for_stock("productA", (8, 2)).await;
    let hold = sys.reservation(&id).await.unwrap();
    assert_eq!(hold["status"], "held", "{hold}");
    assert_eq!(hold["awaiting_payment"], true, "{hold}");
    assert!(hold["expires_at"].is_string(), "{hold}");
    assert!(sys.email_kinds(&id).await.is_empty());

    // The customer confirms 8 s after placing: past the ordinary deadline.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(placed_at.elapsed())).await;
    let (status, answer) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "charged");

    let order = eventually(SETTLE, "the order confirmed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "CONFIRMED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["status"], "success");
    assert!(order["awaiting"].is_null(), "{order}");
    assert_eq!(sys.balance("tess").await, Some(100_000 - 3000));
    sys.wait_for_stock("productA", (8, 0)).await;
    assert_eq!(sys.email_kinds(&id).await, ["confirmation"]);
    // The reconciler, which passed it while it waited, checks it once
    // decided, and finds its promises kept.
    eventually(SETTLE, "the long saga reconciled", || async {
        let mut pg = sys.pg(Svc::Order).await;
        let later: i64 = sqlx::query_scalar("select count(*) from reconcile_later")
            .fetch_one(&mut pg)
            .await
            .ok()?;
        (later == 0).then_some(())
    })
    .await;
    let found = sys
        .get(Svc::Order, "/sagas/violations?all=true")
        .await
        .unwrap();
    assert!(
        found["violations"].as_array().unwrap().is_empty(),
        "{found}"
    );
    // A second answer changes nothing.
    let (status, again) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(sys.balance("tess").await, Some(100_000 - 3000));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_never_confirmed_is_rolled_back_at_its_long_deadline_and_a_late_confirmation_refused() {
    let sys = TestSystem::builder().long_deadline_ms(7_000).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("lars", 100_000).await;
    let placed_at = Instant::now();
    let id = place_pending(&sys, "lars").await;
    sys.wait_for_stock("productA", (8, 2)).await;

    let order = eventually(Duration::from_secs(15), "the long deadline", || async {
        let order = sys.order(&id).await;
        (order["status"] == "FAILED").then_some(order)
    })
    .await;
    let took = placed_at.elapsed();
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(10),
        "rolled back at its long deadline, after {took:?}"
    );
    assert_eq!(order["result"]["error"], "Order timed out");
    assert!(
        order["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("payment confirmation"),
        "{order}"
    );
    eventually(SETTLE, "the authorisation voided", || async {
        (sys.payment(&id).await?["status"] == "voided").then_some(())
    })
    .await;

    // The gateway's answer comes too late: refused, nothing applied.
    let (status, answer) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(sys.payment(&id).await.unwrap()["status"], "voided");
    assert_eq!(sys.balance("lars").await, Some(100_000));
    sys.wait_for_stock("productA", (10, 0)).await;
    assert_eq!(sys.reservation(&id).await.unwrap()["status"], "released");
    assert!(sys.email_kinds(&id).await.is_empty());
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declined_3d_secure_fails_the_order_and_answers_are_checked() {
    let sys = TestSystem::builder().long_deadline_ms(20_000).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("dana", 100_000).await;
    let id = place_pending(&sys, "dana").await;

    let (status, answer) = gateway(&sys, &id, "decline").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "declined");
    let order = eventually(SETTLE, "the order failed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "FAILED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["error"], "Payment failed");
    assert_eq!(
        order["result"]["reason"],
        "3-D Secure authentication declined"
    );
    assert_eq!(sys.balance("dana").await, Some(100_000));
    sys.wait_for_stock("productA", (10, 0)).await;

    let (status, _) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 409, "decided: no second answer");
    let (status, _) = gateway(&sys, "0190f5c0-0000-7000-8000-000000000000", "confirm").await;
    assert_eq!(status, 404);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ordinary_orders_keep_their_5_s_bound_while_long_ones_are_pending() {
    let sys = TestSystem::builder()
        .long_deadline_ms(60_000)
        .fault_delay(Svc::Notification, "6000")
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    sys.set_balance("long", 100_000).await;
    sys.set_balance("short", 100_000).await;
    let long = place_pending(&sys, "long").await;

    // An ordinary order whose confirmation email is slow: failed at 5 s, as
    // always, while the long one waits.
    let started = Instant::now();
    let (_, result) = sys
        .post_order(&order_dict("short", &[("productB", 1)]))
        .await;
    assert_eq!(result["error"], "Order timed out", "{result}");
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    let short = sys.order(result["order_id"].as_str().unwrap()).await;
    assert!(short["awaiting"].is_null());

    assert_eq!(sys.order(&long).await["status"], "PENDING");
    let stuck = sys.get(Svc::Order, "/sagas?stuck=true").await.unwrap();
    assert!(
        stuck["sagas"].as_array().unwrap().is_empty(),
        "a long saga within its long deadline is not stuck: {stuck}"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_3d_secure_order_for_stock_that_is_not_there_fails_at_once() {
    let sys = TestSystem::builder().long_deadline_ms(60_000).spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 1).await;
    sys.set_balance("omar", 100_000).await;
    let (status, result) = sys
        .post_order(&order_with_card("omar", &[("productA", 2)], THREE_D_SECURE))
        .await;
    // Pending first, or failed outright if the shortage was found in time.
    let id = result["order_id"].as_str().unwrap().to_owned();
    assert!(status == 202 || result["status"] == "failure", "{result}");
    let order = eventually(SETTLE, "the order failed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "FAILED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["error"], "Inventory reservation failed");
    eventually(SETTLE, "the authorisation voided", || async {
        (sys.payment(&id).await?["status"] == "voided").then_some(())
    })
    .await;
    assert_eq!(sys.balance("omar").await, Some(100_000));
    assert_eq!(sys.stock("productA").await, (1, 0));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hold_outliving_its_saga_is_released_by_inventory_itself() {
    let mut sys = TestSystem::builder()
        .long_deadline_ms(3_000)
        .hold_expiry_grace_ms(300)
        .spawn()
        .await;
    stock_the_shop(&sys).await;
    sys.set_balance("hana", 100_000).await;
    let id = place_pending(&sys, "hana").await;
    sys.wait_for_stock("productA", (8, 2)).await;
    // No order-svc: no timeout watcher, no rollback.
    sys.stop(Svc::Order).await;

    sys.wait_for_stock("productA", (10, 0)).await;
    let hold = sys.reservation(&id).await.unwrap();
    assert_eq!(hold["status"], "released", "{hold}");
    assert!(
        hold["reason"].as_str().unwrap().contains("hold expired"),
        "{hold}"
    );

    // order-svc back: the saga is failed at once, the authorisation voided,
    // and the released stock is not released twice.
    sys.start(Svc::Order).await;
    sys.wait_healthy(Svc::Order).await;
    let order = eventually(SETTLE, "the order failed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "FAILED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["error"], "Order timed out");
    eventually(SETTLE, "the authorisation voided", || async {
        (sys.payment(&id).await?["status"] == "voided").then_some(())
    })
    .await;
    assert_eq!(sys.stock("productA").await, (10, 0));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_amqp_reply_to_hears_pending_then_the_final_result() {
    let sys = TestSystem::builder().long_deadline_ms(20_000).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("ama", 100_000).await;
    let conn = sys.amqp().await;
    let (reply_queue, mut replies) = saga_tests::Tap::reply_queue(&conn).await;
    let body =
        serde_json::to_vec(&order_with_card("ama", &[("productB", 1)], THREE_D_SECURE)).unwrap();
    sys.publish(
        &conn,
        "order.requested",
        &body,
        lapin::BasicProperties::default()
            .with_message_id("ama-3ds-1".into())
            .with_correlation_id("ama-corr".into())
            .with_reply_to(reply_queue.as_str().into()),
    )
    .await;

    let first = replies
        .next(Duration::from_secs(5))
        .await
        .expect("a pending reply");
    let pending: Value = serde_json::from_slice(&first.data).unwrap();
    assert_eq!(pending["status"], "pending", "{pending}");
    assert_eq!(
        first.properties.correlation_id().as_ref().unwrap().as_str(),
        "ama-corr"
    );
    let id = pending["order_id"].as_str().unwrap().to_owned();

    let (status, _) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 200);
    let last = replies
        .next(Duration::from_secs(10))
        .await
        .expect("the final reply");
    let result: Value = serde_json::from_slice(&last.data).unwrap();
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["order_id"], id.as_str());
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_mail_relay_down_the_order_is_confirmed_and_its_email_sent_when_it_is_back() {
    // A relay address that refuses connections yet (held: no other test
    // can take the port meanwhile).
    let relay = saga_tests::smtp::DownRelay::reserve();
    let sys = TestSystem::builder().smtp_url(&relay.url()).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("mia", 100_000).await;
    let started = Instant::now();
    let (_, result) = sys.post_order(&order_dict("mia", &[("productA", 1)])).await;
    assert_eq!(result["status"], "success", "{result}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let id = result["order_id"].as_str().unwrap().to_owned();
    // Past the pivot: confirmed, stock committed, the email queued.
    sys.wait_for_stock("productA", (9, 0)).await;
    assert!(sys.email_kinds(&id).await.is_empty());
    let view = sys.get(Svc::Order, &format!("/sagas/{id}")).await.unwrap();
    assert!(
        view["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["event"] == "notification.deferred"),
        "{view}"
    );

    // The relay is back: the queued confirmation goes out, once.
    let smtp = relay.start();
    eventually(SETTLE, "the queued email sent", || async {
        (sys.email_kinds(&id).await == ["confirmation"]).then_some(())
    })
    .await;
    let received = smtp.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(received[0].subject().contains("is confirmed"));
    assert_eq!(sys.order(&id).await["status"], "CONFIRMED");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backordered_item_keeps_the_order_pending_until_it_arrives() {
    let sys = TestSystem::builder().long_deadline_ms(30_000).spawn().await;
    sys.set_price("productC", 2500).await;
    sys.put(
        Svc::Inventory,
        "/items/productC",
        serde_json::json!({"available": 0, "backorderable": true}),
    )
    .await;
    sys.set_balance("bo", 100_000).await;
    let started = Instant::now();
    let (status, result) = sys.post_order(&order_dict("bo", &[("productC", 2)])).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status, 202, "{result}");
    assert_eq!(result["next"]["step"], "stock_arrival", "{result}");
    let id = result["order_id"].as_str().unwrap().to_owned();
    assert_eq!(sys.reservation(&id).await.unwrap()["status"], "backordered");
    assert!(sys.email_kinds(&id).await.is_empty());

    // The items arrive: the backorder is reserved, the saga confirmed.
    let item = sys
        .put(
            Svc::Inventory,
            "/items/productC",
            serde_json::json!({"available": 5}),
        )
        .await;
    assert_eq!(item["backorderable"], true, "{item}");
    let order = eventually(SETTLE, "the order confirmed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "CONFIRMED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["status"], "success");
    sys.wait_for_stock("productC", (3, 0)).await;
    assert_eq!(sys.email_kinds(&id).await, ["confirmation"]);
    assert_eq!(sys.balance("bo").await, Some(100_000 - 5000));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backorder_that_never_arrives_is_rolled_back_at_the_long_deadline() {
    let sys = TestSystem::builder().long_deadline_ms(6_000).spawn().await;
    sys.set_price("productC", 2500).await;
    sys.put(
        Svc::Inventory,
        "/items/productC",
        serde_json::json!({"available": 1, "backorderable": true}),
    )
    .await;
    sys.set_balance("bx", 100_000).await;
    let (status, result) = sys.post_order(&order_dict("bx", &[("productC", 2)])).await;
    assert_eq!(status, 202, "{result}");
    let id = result["order_id"].as_str().unwrap().to_owned();
    let order = eventually(Duration::from_secs(15), "the long deadline", || async {
        let order = sys.order(&id).await;
        (order["status"] == "FAILED").then_some(order)
    })
    .await;
    assert!(
        order["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("backordered items"),
        "{order}"
    );
    eventually(SETTLE, "refunded and released", || async {
        let refunded = sys.payment(&id).await?["status"] == "refunded";
        let released = sys.reservation(&id).await?["status"] == "released";
        (refunded && released).then_some(())
    })
    .await;
    assert_eq!(sys.balance("bx").await, Some(100_000));
    // Stock arriving now fills nothing.
    sys.put(
        Svc::Inventory,
        "/items/productC",
        serde_json::json!({"available": 5}),
    )
    .await;
    assert_eq!(sys.stock("productC").await, (5, 0));
    assert_eq!(sys.order(&id).await["status"], "FAILED");
    sys.shutdown().await;
}

/// The hold and the confirmation of one order reaching inventory-svc in one
/// batch (it was down while the customer confirmed): the hold is recorded
/// and announced, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_hold_and_its_confirmation_in_one_batch_are_reserved_and_announced() {
    let mut sys = TestSystem::builder().long_deadline_ms(30_000).spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("ines", 100_000).await;
    sys.stop(Svc::Inventory).await;
    let id = place_pending(&sys, "ines").await;
    let (status, answer) = gateway(&sys, &id, "confirm").await;
    assert_eq!(status, 200, "{answer}");

    sys.start(Svc::Inventory).await;
    sys.wait_healthy(Svc::Inventory).await;
    let order = eventually(SETTLE, "the order confirmed", || async {
        let order = sys.order(&id).await;
        (order["status"] == "CONFIRMED").then_some(order)
    })
    .await;
    assert_eq!(order["result"]["status"], "success");
    sys.wait_for_stock("productA", (8, 0)).await;
    assert_eq!(sys.email_kinds(&id).await, ["confirmation"]);
    sys.shutdown().await;
}
