//! Gauges read from a service's own tables every few seconds: the outbox
//! backlog (rows committed and not yet confirmed by the broker) and the
//! escalations not resolved. Two indexed counts per interval, idle or busy;
//! nothing on the hot path. A service reads its own the same way with
//! [`every_interval`] (order-svc: undecided sagas by age).

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metric_definitions as metric;

/// How often the gauges are read.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Reads the shared gauges of `service` every [`INTERVAL`] until cancelled.
pub async fn run(service: &'static str, pool: PgPool, cancel: CancellationToken) {
    every_interval(cancel, || sample(service, &pool)).await;
}

async fn sample(service: &'static str, pool: &PgPool) -> Result<(), sqlx::Error> {
    let (backlog, escalations): (i64, i64) = sqlx::query_as(
        r#"
        select (select count(*) from outbox where published_at is null),
               (select count(*) from escalations where status <> 'resolved')
        "#,
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!(metric::OUTBOX_BACKLOG, "service" => service).set(backlog as f64);
    metrics::gauge!(metric::ESCALATIONS_OPEN, "service" => service).set(escalations as f64);
    Ok(())
}

/// Runs `read` every [`INTERVAL`] until cancelled (a service's own gauges).
pub async fn every_interval<F, Fut>(cancel: CancellationToken, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), sqlx::Error>>,
{
    loop {
        if let Err(error) = read().await {
            // The database being down shows in /health and its own metrics.
            debug!(%error, "gauges not read this time");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
