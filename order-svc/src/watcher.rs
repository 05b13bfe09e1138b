//! The timeout watcher: fails every saga still undecided at its deadline
//! (reason: the deadline and the step awaited) and emits `order.cancelled`
//! and `order.failed`, so every service compensates.
//!
//! Safe with several replicas: each pass locks the overdue rows with
//! `FOR UPDATE SKIP LOCKED`, and the decision itself is conditional, so no
//! saga is cancelled twice. It only reads order-svc's own table, so it
//! catches sagas whose other services are down, not only slow.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::saga::OrderSaga;

/// Overdue sagas failed per transaction.
const BATCH: i64 = 100;

pub async fn run(saga: Arc<OrderSaga>, scan: Duration, cancel: CancellationToken) {
    loop {
        match saga.fail_overdue(BATCH).await {
            Ok(n) if n as i64 >= BATCH => {
                info!(n, "timed out a full batch of sagas; scanning again");
                continue;
            }
            Ok(0) => {}
            Ok(n) => info!(n, "timed out sagas"),
            Err(error) => warn!(%error, "timeout scan failed; will retry"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(scan) => {}
        }
    }
}
