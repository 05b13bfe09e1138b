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

/// The plan a service's unit of work uses for a lookup by a batch's keys:
/// the statement prepared once and planned once (a generic plan), then
/// reused until the statistics of its table change.
async fn plan_of_lookup(pool: &sqlx::PgPool) -> String {
    let keys = format!("{{{},{}}}", Uuid::now_v7(), Uuid::now_v7());
    let mut tx = pool
        .begin_with(common::messaging::unit_of_work::BEGIN)
        .await
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "explain execute lookup('{keys}')"
    )))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    rows.join("\n")
}

async fn insert_payments(pool: &sqlx::PgPool, n: i32) {
    sqlx::query(
        r#"
        insert into payments (order_id, customer_id, amount_cents, currency, status)
        select gen_random_uuid(), 'c' || i, 100, 'USD', 'charged' from generate_series(1, $1) i
        "#,
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_planned_on_a_small_table_is_replanned_by_index_once_it_grew() {
    let sys = TestSystem::spawn().await;
    // Connected as the service connects, with one connection: the
    // prepared statement lives on it.
    let pool = common::store::pool::connect_and_migrate(
        &sys.database_url(Svc::Payment),
        1,
        &payment_svc::MIGRATOR,
    )
    .await
    .unwrap();
    insert_payments(&pool, 5).await;
    sqlx::raw_sql("analyze payments")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("prepare lookup(uuid[]) as select * from payments where order_id = any($1)")
        .execute(&pool)
        .await
        .unwrap();
    // Right for five rows, and cached: without a new analysis it stays
    // the plan however large the table grows.
    let small = plan_of_lookup(&pool).await;
    assert!(small.contains("Seq Scan on payments"), "{small}");

    insert_payments(&pool, 5000).await;
    // The table's counts reach the statistics within seconds (each backend
    // reports them at most once a second, idle ones after up to 10 s). The
    // services' own task may analyze it first (it runs while any test
    // system in this process commits work); either way, once analyzed the
    // table is no longer due.
    eventually(Duration::from_secs(20), "payments analyzed", || async {
        common::store::statistics::analyze_due(&pool).await.unwrap();
        let believed: f32 =
            sqlx::query_scalar("select reltuples from pg_class where relname = 'payments'")
                .fetch_one(&pool)
                .await
                .unwrap();
        (believed >= 4000.0).then_some(())
    })
    .await;
    let again = common::store::statistics::analyze_due(&pool).await.unwrap();
    assert!(!again.iter().any(|t| t == "public.payments"), "{again:?}");

    let grown = plan_of_lookup(&pool).await;
    assert!(grown.contains("payments_pkey"), "{grown}");
    assert!(!grown.contains("Seq Scan"), "{grown}");
    pool.close().await;
    sys.shutdown().await;
}
