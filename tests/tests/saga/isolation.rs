//! Concurrent orders never oversell.

use std::time::Duration;

use futures_util::future::join_all;
use saga_tests::{Svc, TestSystem, eventually, order_dict};

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_orders_for_thirty_units_confirm_exactly_thirty() {
    // The deadline is generous: this test is about isolation, not speed.
    let sys = TestSystem::builder()
        .deadline_ms(30_000)
        .pool_size(6)
        .spawn()
        .await;
    sys.set_price("scarce", 100).await;
    sys.set_stock("scarce", 30).await;

    let orders: Vec<_> = (0..100)
        .map(|i| order_dict(&format!("buyer-{i}"), &[("scarce", 1)]))
        .collect();
    let results = join_all(orders.iter().map(|o| sys.post_order(o))).await;

    let confirmed = results
        .iter()
        .filter(|(_, r)| r["status"] == "success")
        .count();
    let out_of_stock = results
        .iter()
        .filter(|(_, r)| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("Out of stock: scarce"))
        })
        .count();
    assert_eq!((confirmed, out_of_stock), (30, 70), "{results:?}");
    sys.wait_for_stock("scarce", (0, 0)).await;

    let mut pg = sys.pg(Svc::Payment).await;
    let by_status = || async {
        let mut pg = sys.pg(Svc::Payment).await;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select status, count(*) from payments group by status order by status")
                .fetch_all(&mut pg)
                .await
                .unwrap();
        rows
    };
    eventually(Duration::from_secs(20), "70 refunds", || async {
        (by_status().await == vec![("charged".to_owned(), 30), ("refunded".to_owned(), 70)])
            .then_some(())
    })
    .await;
    let negative: i64 = sqlx::query_scalar("select count(*) from accounts where balance_cents < 0")
        .fetch_one(&mut pg)
        .await
        .unwrap();
    assert_eq!(negative, 0);
    let mut pg = sys.pg(Svc::Notification).await;
    let confirmations: i64 =
        sqlx::query_scalar("select count(*) from emails where kind = 'confirmation'")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(confirmations, 30);
    sys.shutdown().await;
}
