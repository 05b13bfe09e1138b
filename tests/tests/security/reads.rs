//! Expensive reads (issue 24, item 10): a search reads a range of an index,
//! never a walk of the whole orders table; and reads that may still be
//! heavy run a few at a time, each under a statement timeout, so that a
//! burst of them never takes the connections the saga needs.

use common::runtime::http::ApiError;
use order_svc::db::{SagaSearch, explain_search, search_sagas};
use order_svc::domain::OrderStatus;
use order_svc::http::ExpensiveReads;
use saga_tests::{Sandbox, Svc};
use serde_json::Value;

/// Rows the plan read from `orders` (returned or filtered out), all loops.
fn rows_read_from_orders(plan: &Value) -> f64 {
    let mut total = 0.0;
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        match node {
            Value::Array(items) => stack.extend(items),
            Value::Object(fields) => {
                if fields.get("Relation Name").and_then(Value::as_str) == Some("orders") {
                    let num = |k: &str| fields.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                    total += (num("Actual Rows") + num("Rows Removed by Filter"))
                        * num("Actual Loops").max(1.0);
                }
                stack.extend(fields.values());
            }
            _ => {}
        }
    }
    total
}

/// order-svc's database of a sandbox of its own, migrated.
async fn order_database(connections: u32) -> (Sandbox, sqlx::PgPool) {
    let sandbox = Sandbox::new().await;
    let pool = common::store::pool::connect_and_migrate(
        &sandbox.database_url(Svc::Order),
        connections,
        &order_svc::MIGRATOR,
    )
    .await
    .expect("order-svc's database");
    (sandbox, pool)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_search_reads_an_index_range_not_the_whole_orders_table() {
    let (sandbox, pool) = order_database(2).await;
    // A day of 20,000 decided orders (one every 4 s), and, older than all
    // of them, 3 still PENDING. Ids are time-ordered like UUIDv7.
    sqlx::raw_sql(
        r#"
        insert into orders (order_id, customer_id, status, items, amount_cents, currency,
                            card_brand, card_last4, request_fingerprint, created_at,
                            deadline_at, decided_at)
        select (lpad(to_hex((extract(epoch from t) * 1000)::bigint), 12, '0')
                || substr(md5(i::text), 1, 20))::uuid,
               'customer', case when i <= 3 then 'PENDING'
                                when i % 4 = 0 then 'FAILED' else 'CONFIRMED' end,
               '[]', 1500, 'USD', 'visa', '4242', 'f', t, t + interval '5 s',
               case when i > 3 then t + interval '1 s' end
        from generate_series(1, 20003) i,
             lateral (select now() - interval '2 days' + (i * interval '4 s') as t) x;
        analyze orders;
        "#,
    )
    .execute(&pool)
    .await
    .expect("insert the orders");

    let mut conn = pool.acquire().await.unwrap();
    let cases = [
        (
            "PENDING",
            SagaSearch {
                status: Some(OrderStatus::Pending),
                limit: 50,
                ..SagaSearch::default()
            },
            3,
        ),
        (
            "since tomorrow",
            SagaSearch {
                since: Some(chrono::Utc::now() + chrono::Duration::days(1)),
                limit: 50,
                ..SagaSearch::default()
            },
            0,
        ),
        (
            "the newest",
            SagaSearch {
                limit: 50,
                ..SagaSearch::default()
            },
            50,
        ),
    ];
    for (what, search, expected) in cases {
        let found = search_sagas(&mut conn, &search).await.unwrap();
        assert_eq!(found.len(), expected, "{what}");
        let plan = explain_search(&mut conn, &search).await.unwrap();
        let read = rows_read_from_orders(&plan);
        assert!(
            read < 1000.0,
            "{what}: the search read {read} rows of orders\n{plan:#}"
        );
    }
    drop(conn);
    pool.close().await;
    sandbox.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expensive_reads_run_a_few_at_a_time_each_under_a_timeout() {
    let (sandbox, pool) = order_database(8).await;
    let reads = ExpensiveReads::new(pool.clone());

    // Every turn taken: the next one waits a moment, then is refused (503),
    // and the pool still has connections for the saga.
    let mut held = Vec::new();
    for _ in 0..ExpensiveReads::CONCURRENCY {
        held.push(reads.begin().await.expect("a turn"));
    }
    assert!(matches!(reads.begin().await, Err(ApiError::Unavailable)));
    assert!(pool.acquire().await.is_ok());
    drop(held);

    // A read that runs too long is cancelled by the database (a 503).
    let mut read = reads.begin().await.expect("a turn again");
    let slow = sqlx::query("select pg_sleep(10)")
        .execute(&mut *read.tx)
        .await
        .expect_err("cancelled");
    assert!(
        matches!(ApiError::from(slow), ApiError::Unavailable),
        "not a 503"
    );
    drop(read);
    pool.close().await;
    sandbox.close().await;
}
