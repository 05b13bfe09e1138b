//! Services survive losing the broker or the database and carry on.

use std::time::Duration;

use saga_tests::{Svc, TestSystem, eventually, order_dict};

use crate::stock_the_shop;

#[tokio::test(flavor = "multi_thread")]
async fn services_reconnect_when_the_broker_drops_their_connections() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let (_, before) = sys.post_order(&order_dict("rb", &[("productA", 1)])).await;
    assert_eq!(before["status"], "success");

    // The management API lists connections a moment after they open.
    eventually(
        Duration::from_secs(15),
        "four service connections listed",
        || async { (sys.broker_connections().await >= 4).then_some(()) },
    )
    .await;
    let closed = sys.drop_broker_connections().await;
    assert!(closed >= 4, "closed {closed}");

    // Every service reconnects on its own, re-declares and resumes.
    for svc in Svc::ALL {
        sys.wait_healthy(svc).await;
    }
    let (_, after) = sys.post_order(&order_dict("rb", &[("productA", 1)])).await;
    assert_eq!(after["status"], "success");
    sys.wait_for_stock("productA", (8, 0)).await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn services_recover_when_the_database_drops_their_connections() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    let (_, before) = sys.post_order(&order_dict("rd", &[("productA", 1)])).await;
    assert_eq!(before["status"], "success");

    let killed = sys.drop_db_connections().await;
    assert!(killed >= 4, "terminated {killed}");

    for svc in Svc::ALL {
        sys.wait_healthy(svc).await;
    }
    // A client retries on 503 with its idempotency key; the saga completes.
    let order = order_dict("rd", &[("productA", 2)]);
    let result = eventually(
        Duration::from_secs(20),
        "the order to be decided",
        || async {
            let (status, body) = sys.post_order_with_key(&order, Some("rd-2")).await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(result["status"], "success");
    sys.wait_for_stock("productA", (7, 0)).await;
    sys.shutdown().await;
}

/// `AMQP_URL` may list a cluster's nodes: a node that is down is skipped
/// and every service works through the next.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_node_that_is_down_is_failed_over_to_the_next() {
    let sys = saga_tests::TestSystem::builder()
        .dead_broker_node_first()
        .spawn()
        .await;
    crate::stock_the_shop(&sys).await;
    let (_, result) = sys
        .post_order(&saga_tests::order_dict("fo", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    sys.shutdown().await;
}

/// `DATABASE_URL` may name a primary and its standbys: a host that does not
/// answer is skipped and the writable one used.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_host_that_is_down_is_skipped_for_the_writable_one() {
    let sys = saga_tests::TestSystem::builder()
        .dead_database_host_first()
        .spawn()
        .await;
    crate::stock_the_shop(&sys).await;
    let (_, result) = sys
        .post_order(&saga_tests::order_dict("pgfo", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    sys.shutdown().await;
}
