//! LISTEN/NOTIFY as a wake-up hint.
//!
//! A notification can be lost (across a reconnect, say), so whoever listens
//! also polls; a notification only makes things happen sooner.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::reconnect_backoff;

/// Listens on `channels` until `cancel` fires, calling `on_notify` for every
/// notification; reconnects with backoff when the database goes away.
pub async fn listen(
    pool: PgPool,
    channels: &'static [&'static str],
    cancel: CancellationToken,
    on_notify: impl Fn(PgNotification) + Send + 'static,
) {
    let mut backoff = reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5));
    while !cancel.is_cancelled() {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = cancel.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(error) => {
                    warn!(%error, "LISTEN failed; falling back to polling until it works");
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff = reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            // `try_recv` yields `None` when the connection drops; the next
            // call reconnects. Dropping it at cancellation only loses a hint.
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(notification)) => on_notify(notification),
                Ok(None) => {
                    // Reconnected lazily on the next try_recv; wake the caller
                    // once, since notifications may have been missed.
                    warn!("LISTEN connection lost; reconnecting");
                    break;
                }
                Err(error) => {
                    warn!(%error, "LISTEN connection failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))) => {}
        }
    }
}
