//! What the broker itself refuses: each service's user is confined to its
//! own queues, the events it owns and the events it reacts to
//! (`common::messaging::permissions`); the client user to placing orders.

use std::future::Future;

use common::messaging::events::REQUEUE_EXCHANGE;
use common::messaging::permissions;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use saga_tests::{EXCHANGE, TestSystem, order_dict};

/// Runs `attempt` on a fresh channel of `conn`; fails unless the broker
/// refuses it.
async fn refused<F, Fut>(conn: &Connection, what: &str, attempt: F)
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<(), lapin::Error>>,
{
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let outcome = attempt(channel.clone()).await;
    let error = outcome.expect_err(&format!("the broker let this through: {what}"));
    assert!(
        error.to_string().contains("ACCESS_REFUSED") || !channel.status().connected(),
        "{what}: {error}"
    );
}

/// Publishes and waits for the broker's confirm: an error if the channel
/// was closed, or the message not accepted.
async fn publish(ch: Channel, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await?;
    if confirm.is_ack() {
        Ok(())
    } else {
        Err(lapin::Error::from(std::io::Error::other("nacked")))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_confined_broker_users_the_saga_runs_and_each_is_refused_outside_its_permissions() {
    let sys = TestSystem::builder().confined_broker_users().spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("carol", 100_000).await;
    sys.set_balance("dave", 100).await;

    // The saga runs: a success, and a failure rolled back.
    let (_, placed) = sys
        .post_order(&order_dict("carol", &[("productA", 1)]))
        .await;
    assert_eq!(placed["status"], "success", "{placed}");
    let (_, failed) = sys
        .post_order(&order_dict("dave", &[("productA", 1)]))
        .await;
    assert_eq!(failed["status"], "failure", "{failed}");
    sys.wait_for_stock("productA", (9, 0)).await;

    // notification-svc's user — a compromised notification-svc, say.
    let (_, url) = sys.broker_users.as_ref().unwrap()[3].clone();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    refused(
        &conn,
        "bind its own queue to order.requested (every AMQP client's card)",
        |ch| async move {
            ch.queue_bind(
                "notification-svc.events".into(),
                EXCHANGE.into(),
                "order.requested".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        },
    )
    .await;
    refused(&conn, "publish order.failed", |ch| {
        publish(ch, EXCHANGE, "order.failed")
    })
    .await;
    refused(
        &conn,
        "publish into payment-svc.events through the default exchange",
        |ch| publish(ch, "", "payment-svc.events"),
    )
    .await;
    refused(
        &conn,
        "publish into payment-svc.events through saga.requeue",
        |ch| publish(ch, REQUEUE_EXCHANGE, "payment-svc.events"),
    )
    .await;
    refused(&conn, "purge payment-svc.events", |ch| async move {
        ch.queue_purge("payment-svc.events".into(), QueuePurgeOptions::default())
            .await
            .map(|_| ())
    })
    .await;
    refused(&conn, "consume payment-svc.events", |ch| async move {
        ch.basic_consume(
            "payment-svc.events".into(),
            "spy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ())
    })
    .await;
    refused(
        &conn,
        "declare a queue outside its own names",
        |ch| async move {
            ch.queue_declare(
                "payment-svc.spy".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(|_| ())
        },
    )
    .await;
    refused(&conn, "delete the exchange", |ch| async move {
        ch.exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
            .await
    })
    .await;
    let _ = conn.close(200, "bye".into()).await;

    // The client user: orders in, nothing else.
    let (_, client_url) = sys
        .sandbox
        .broker_user_with("order_client", Some(&permissions::for_client()))
        .await;
    let client = Connection::connect(&client_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = client.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    publish(ch, EXCHANGE, "order.requested")
        .await
        .expect("the client places orders");
    refused(&client, "the client publishes payment.completed", |ch| {
        publish(ch, EXCHANGE, "payment.completed")
    })
    .await;
    refused(
        &client,
        "the client binds its reply queue to the saga's events",
        |ch| async move {
            let q = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            ch.queue_bind(
                q.name().as_str().into(),
                EXCHANGE.into(),
                "order.requested".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        },
    )
    .await;
    let _ = client.close(200, "bye".into()).await;
    sys.shutdown().await;
}
