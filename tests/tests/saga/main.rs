//! End-to-end tests of the saga: four services in-process, real RabbitMQ and
//! PostgreSQL, one vhost and four databases per test.

mod batches;
mod deadlock;
mod escalation;
mod failures;
mod happy_path;
mod idempotency;
mod isolation;
mod long_running;
mod ordering;
mod poison;
mod recovery;
mod retention;
mod search;
mod timeline;

use std::time::Duration;

use saga_tests::TestSystem;

/// Waits long enough for any compensation still in flight.
pub const SETTLE: Duration = Duration::from_secs(10);

/// Prices `productA` at 15.00 and `productB` at 7.00 with 10 of each in stock.
pub async fn stock_the_shop(sys: &TestSystem) {
    sys.set_price("productA", 1500).await;
    sys.set_price("productB", 700).await;
    sys.set_stock("productA", 10).await;
    sys.set_stock("productB", 10).await;
}
