//! Holds that outlive their saga are released by inventory-svc itself.
//!
//! Stock held for a payment waiting for its 3-D Secure confirmation lasts
//! until the saga's long deadline (`reservations.expires_at`). order-svc's
//! timeout watcher fails the saga at that deadline and the rollback releases
//! the hold; if that never comes (order-svc gone for good), the units would
//! be lost to every other customer. So a hold still waiting `grace` after it
//! expired is released here (one statement per pass, through a partial
//! index of waiting holds; a frozen item's hold waits for its stocktake). The
//! saga's own rollback, when it comes, finds the hold released and does
//! nothing more; a confirmation after the long deadline is refused by
//! payment-svc.

use std::time::Duration;

use common::metric_definitions::step_outcome;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::SERVICE;

/// Releases expired holds every `grace / 2` (at most every 10 s) until
/// cancelled.
pub async fn run(pool: PgPool, grace: Duration, cancel: CancellationToken) {
    let every = (grace / 2).clamp(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match release_expired(&pool, grace).await {
            Ok(0) => {}
            Ok(n) => {
                step_outcome(SERVICE, "hold_expired", n);
                info!(released = n, "expired holds released");
            }
            Err(error) => warn!(%error, "expired holds not released this time"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

pub async fn release_expired(pool: &PgPool, grace: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Stock rows first, in item order (as every batch locks them), then the
    // reservations: no deadlock with a batch or a PUT /items.
    let items: Vec<String> = sqlx::query_scalar(
        r#"
        select distinct l.item_id from reservations r join reservation_lines l using (order_id)
        where r.awaiting_payment and r.status = 'held'
          and r.expires_at < now() - make_interval(secs => $1)
        "#,
    )
    .bind(grace.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if items.is_empty() {
        return Ok(0);
    }
    sqlx::query("select 1 from stock where item_id = any($1) order by item_id for update")
        .bind(&items)
        .execute(&mut *tx)
        .await?;
    let released: i64 = sqlx::query_scalar(
        r#"
        with expired as (
            update reservations r
            set status = 'released', awaiting_payment = false, updated_at = now(),
                reason = 'hold expired: the payment was not confirmed by the long deadline'
            where r.awaiting_payment and r.status = 'held'
              and r.expires_at < now() - make_interval(secs => $1)
              and not exists (select 1 from reservation_lines l join stock s using (item_id)
                              where l.order_id = r.order_id and s.frozen)
            returning r.order_id
        ),
        returned as (
            update stock s
            set available = s.available + m.quantity, held = s.held - m.quantity,
                updated_at = now()
            from (select l.item_id, sum(l.quantity)::int as quantity
                  from reservation_lines l join expired using (order_id)
                  group by l.item_id) m
            where s.item_id = m.item_id
        )
        select count(*) from expired
        "#,
    )
    .bind(grace.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(released as u64)
}
