//! Tables stay bounded, and a replay older than the retention window is
//! refused rather than applied twice.

use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use saga_tests::{Svc, TestSystem, eventually};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn the_cleaner_removes_only_rows_older_than_the_window() {
    let sys = TestSystem::spawn().await;
    let pool = sqlx::PgPool::connect(&sys.database_url(Svc::Payment))
        .await
        .unwrap();
    sqlx::raw_sql(
        r#"
        insert into inbox (message_id, message_type, received_at)
        select gen_random_uuid(), 'order.created', now() - interval '8 days' from generate_series(1, 2500);
        insert into inbox (message_id, message_type) values (gen_random_uuid(), 'order.created');
        insert into outbox (id, exchange, routing_key, message_type, payload, published_at)
        select gen_random_uuid(), 'saga.events', 'x', 'x', '{}', now() - interval '8 days' from generate_series(1, 1500);
        insert into outbox (id, exchange, routing_key, message_type, payload, published_at)
        values (gen_random_uuid(), 'saga.events', 'x', 'x', '{}', now() - interval '1 day');
        "#,
    )
    .execute(&pool)
    .await
    .unwrap();

    let deleted = common::store::retention::clean_once(&pool, Duration::from_secs(7 * 24 * 3600))
        .await
        .unwrap();

    assert_eq!(deleted, Some((1500, 2500)));
    let left: (i64, i64) =
        sqlx::query_as("select (select count(*) from outbox), (select count(*) from inbox)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(left, (1, 1));
    pool.close().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_older_than_the_retention_window_is_parked_not_applied() {
    let sys = TestSystem::spawn().await;
    let conn = sys.amqp().await;
    let order_id = Uuid::now_v7();
    let event_id = Uuid::now_v7();
    let old = Utc::now() - chrono::Duration::days(8);
    // A forward step; a compensation this old is escalated instead (see
    // tests/regression).
    let env = json!({
        "event_id": event_id, "event_type": "order.created", "version": 1,
        "order_id": order_id, "causation_id": null, "occurred_at": old,
        "deadline_at": old, "producer": "test", "data": {"customer_id": "c"},
    });
    sys.publish(
        &conn,
        "order.created",
        env.to_string().as_bytes(),
        BasicProperties::default().with_message_id(event_id.to_string().into()),
    )
    .await;

    let reason = eventually(
        Duration::from_secs(10),
        "the replay to be parked",
        || async {
            let ch = conn.create_channel().await.unwrap();
            let m = ch
                .basic_get(
                    "payment-svc.parking".into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()?;
            match m
                .delivery
                .properties
                .headers()
                .as_ref()?
                .inner()
                .get("x-parked-reason")?
            {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            }
        },
    )
    .await;
    assert!(
        reason.contains("older than the 604800s retention window"),
        "{reason}"
    );
    assert!(
        sys.payment(&order_id.to_string()).await.is_none(),
        "nothing applied"
    );
    sys.shutdown().await;
}
