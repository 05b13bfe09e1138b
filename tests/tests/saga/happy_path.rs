use std::time::Duration;

use lapin::BasicProperties;
use saga_tests::{Svc, Tap, TestSystem, order_dict};
use serde_json::{Value, json};

use crate::stock_the_shop;

#[tokio::test(flavor = "multi_thread")]
async fn an_order_over_http_is_confirmed_and_every_service_has_done_its_part() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("user123", 10_000).await;

    let (status, result) = sys
        .post_order(&order_dict("user123", &[("productA", 2), ("productB", 1)]))
        .await;

    assert_eq!(status, 200);
    assert_eq!(result["status"], "success");
    assert_eq!(
        result.as_object().unwrap().len(),
        2,
        "exactly status and order_id: {result}"
    );
    let id = result["order_id"].as_str().unwrap().to_owned();

    let order = sys.order(&id).await;
    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(order["amount_cents"], 2 * 1500 + 700);
    assert_eq!(order["card"], json!({"brand": "visa", "last4": "4242"}));
    let steps: Vec<&str> = order["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "order.created",
            "payment.completed",
            "inventory.reserved",
            "notification.sent",
            "order.confirmed"
        ]
    );

    let payment = sys.payment(&id).await.unwrap();
    assert_eq!(payment["status"], "charged");
    assert_eq!(payment["amount_cents"], 3700);
    assert_eq!(sys.balance("user123").await, Some(10_000 - 3700));
    // The stock was reserved, then committed when the order was confirmed.
    saga_tests::eventually(
        Duration::from_secs(5),
        "the reservation to be committed",
        || async {
            let r = sys.reservation(&id).await?;
            (r["status"] == "committed").then_some(())
        },
    )
    .await;
    sys.wait_for_stock("productA", (8, 0)).await;
    sys.wait_for_stock("productB", (9, 0)).await;
    assert_eq!(sys.email_kinds(&id).await, ["confirmation"]);
    let email = &sys.emails(&id).await[0];
    assert_eq!(email["recipient"], "user123@example.com");

    let metrics = sys.metrics(Svc::Order).await;
    assert!(metrics.contains("sagas_decided_total{outcome=\"confirmed\",failed_step=\"none\"}"));
    assert!(metrics.contains("saga_duration_seconds_bucket"));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_published_with_reply_to_gets_its_result_dict_back() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let conn = sys.amqp().await;
    let (reply_queue, mut replies) = Tap::reply_queue(&conn).await;
    let mut terminal = Tap::new(&conn, &["order.confirmed"]).await;

    let body = serde_json::to_vec(&order_dict("amqp-user", &[("productB", 3)])).unwrap();
    sys.publish(
        &conn,
        "order.requested",
        &body,
        BasicProperties::default()
            .with_message_id("client-order-1".into())
            .with_correlation_id("my-correlation".into())
            .with_reply_to(reply_queue.as_str().into()),
    )
    .await;

    let reply = replies
        .next(Duration::from_secs(10))
        .await
        .expect("a reply");
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "my-correlation"
    );
    let result: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(result["status"], "success");
    let id = result["order_id"].as_str().unwrap();
    assert_eq!(sys.order(id).await["status"], "CONFIRMED");
    assert_eq!(sys.payment(id).await.unwrap()["amount_cents"], 2100);

    // The terminal event carries the same result dict.
    let confirmed = terminal
        .next(Duration::from_secs(5))
        .await
        .expect("order.confirmed");
    let env: Value = serde_json::from_slice(&confirmed.data).unwrap();
    assert_eq!(env["data"]["result"], result);
    assert_eq!(env["event_type"], "order.confirmed");
    assert_eq!(
        confirmed
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        id
    );
    assert_eq!(
        confirmed.properties.kind().as_ref().unwrap().as_str(),
        "order.confirmed"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_an_smtp_relay_the_confirmation_is_handed_to_it_once_and_recorded_sent() {
    let smtp = saga_tests::smtp::SmtpSink::start().await;
    let sys = TestSystem::builder().smtp_url(&smtp.url).spawn().await;
    stock_the_shop(&sys).await;
    sys.put(
        Svc::Notification,
        "/customers/mail-1",
        json!({"email": "jane@shop.example"}),
    )
    .await;

    let (_, result) = sys
        .post_order(&order_dict("mail-1", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    let id = result["order_id"].as_str().unwrap().to_owned();

    let received = smtp.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].recipients, ["<jane@shop.example>"]);
    assert!(
        received[0].subject().contains("is confirmed"),
        "{received:?}"
    );
    let mut pg = sys.pg(Svc::Notification).await;
    let status: String =
        sqlx::query_scalar("select status from notifications where order_id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(status, "sent");
    let transport: String = sqlx::query_scalar(
        "select transport from emails where order_id = $1::uuid and kind = 'confirmation'",
    )
    .bind(&id)
    .fetch_one(&mut pg)
    .await
    .unwrap();
    assert_eq!(transport, "smtp");
    sys.shutdown().await;
}
