//! Concurrent multi-item reservations never deadlock.

use futures_util::future::join_all;
use saga_tests::{Svc, TestSystem, order_dict};

#[tokio::test(flavor = "multi_thread")]
async fn overlapping_multi_item_orders_in_opposite_item_orders_all_complete_with_consistent_stock()
{
    let sys = TestSystem::builder()
        .deadline_ms(30_000)
        .pool_size(6)
        .spawn()
        .await;
    let items = ["w", "x", "y", "z"];
    for item in items {
        sys.set_price(item, 100).await;
        sys.set_stock(item, 1000).await;
    }
    // The same items, listed in opposite orders, and overlapping pairs.
    let shapes: [&[(&str, i64)]; 4] = [
        &[("w", 1), ("x", 2), ("y", 3), ("z", 4)],
        &[("z", 4), ("y", 3), ("x", 2), ("w", 1)],
        &[("x", 2), ("z", 4)],
        &[("z", 4), ("w", 1)],
    ];
    let orders: Vec<_> = (0..80)
        .map(|i| order_dict(&format!("dl-{i}"), shapes[i % shapes.len()]))
        .collect();

    let results = join_all(orders.iter().map(|o| sys.post_order(o))).await;

    assert!(
        results.iter().all(|(_, r)| r["status"] == "success"),
        "{results:?}"
    );
    // 20 orders of each shape: w 3 shapes x 1 = 60, x 3 x 2 = 120,
    // y 2 x 3 = 120, z 4 x 4 = 320.
    for (item, sold) in [("w", 60), ("x", 120), ("y", 120), ("z", 320)] {
        sys.wait_for_stock(item, (1000 - sold, 0)).await;
    }
    let mut pg = sys.pg(Svc::Order).await;
    let pending: i64 =
        sqlx::query_scalar("select count(*) from orders where status <> 'CONFIRMED'")
            .fetch_one(&mut pg)
            .await
            .unwrap();
    assert_eq!(pending, 0);
    // Deadlocks would be retried and counted; with one global lock order
    // there are none to count.
    let m = sys.metrics(Svc::Inventory).await;
    let deadlocks = m
        .lines()
        .filter(|l| {
            l.starts_with("db_retryable_errors_total")
                && l.contains("inventory-svc")
                && l.contains("deadlock")
        })
        .count();
    println!("inventory-svc deadlock metric lines: {deadlocks}");
    sys.shutdown().await;
}
