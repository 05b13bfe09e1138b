//! One AMQP connection per service process, kept alive by a supervisor.
//!
//! lapin's built-in auto-recovery still has open bugs (see CRATES.md, L1), so
//! recovery is explicit and simple: [`Broker::supervise`] connects with
//! backoff, declares the topology, and hands the connection out. Components
//! (consumers, the outbox relay) open their own channels on it; when anything
//! fails they call [`Broker::report_broken`], the supervisor drops the
//! connection and makes a new one, and every component starts over on the new
//! connection. Nothing is lost: unacked deliveries are redelivered by the
//! broker, unconfirmed outbox rows are re-sent by the relay, and inboxes absorb
//! the duplicates.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::messaging::topology::{self, QueueType};
use crate::metric_definitions as metric;

/// The longest a connection or channel set-up may take before it is
/// abandoned (and the connection recycled).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// First delay between reconnection attempts.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts (jitter adds up to as much
/// again). Short, because every second between the broker's return and our
/// next attempt is a second of every saga's 5 s deadline; an attempt against
/// a broker that is down costs a refused socket.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// A live connection, shared by the service's components.
pub type SharedConnection = Arc<Connection>;

/// Handle to the service's broker connection (cheap to clone).
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The broker's nodes (`AMQP_URL`, comma-separated): tried in turn,
    /// starting from the last one that worked.
    urls: Vec<String>,
    /// Index in `urls` of the node to try first.
    preferred: std::sync::atomic::AtomicUsize,
    /// The user the connection logs in as: every publish is stamped with it
    /// as the AMQP `user_id`, which the broker validates.
    user: String,
    connection_name: String,
    queue_type: QueueType,
    current: watch::Sender<Option<SharedConnection>>,
    /// Wakes the supervisor when a component saw the connection fail.
    broken: tokio::sync::Notify,
}

impl Broker {
    /// `connection_name` shows in the management UI's connection list;
    /// `queue_type` is the kind of queue the topology is declared with.
    pub fn new(
        url: impl Into<String>,
        connection_name: impl Into<String>,
        queue_type: QueueType,
    ) -> Self {
        let (current, _) = watch::channel(None);
        let urls = node_urls(&url.into());
        Self {
            inner: Arc::new(Inner {
                // Every node of a cluster knows the same users.
                user: crate::messaging::trust::amqp_user(&urls[0]),
                urls,
                preferred: std::sync::atomic::AtomicUsize::new(0),
                connection_name: connection_name.into(),
                queue_type,
                current,
                broken: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The broker user this process publishes as (the AMQP `user_id`).
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// True while a connection with a declared topology is up.
    pub fn is_connected(&self) -> bool {
        self.inner
            .current
            .borrow()
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// The live connection, if there is one now.
    pub fn current(&self) -> Option<SharedConnection> {
        self.inner
            .current
            .borrow()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// Waits for a live connection; `None` once `cancel` fires.
    pub async fn connection(&self, cancel: &CancellationToken) -> Option<SharedConnection> {
        let mut rx = self.inner.current.subscribe();
        loop {
            if let Some(conn) = rx.borrow_and_update().as_ref()
                && conn.status().connected()
            {
                return Some(conn.clone());
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                changed = rx.changed() => if changed.is_err() { return None },
                // The status can turn bad without a watch update.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// A confirm-mode channel on the current connection.
    pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
        let open = async {
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok(channel)
        };
        tokio::time::timeout(SETUP_TIMEOUT, open)
            .await
            .unwrap_or_else(|_| Err(timeout_error("opening a confirm channel")))
    }

    /// Tells the supervisor that `conn` looks dead. A report about a
    /// connection that is no longer the current one (a component that saw
    /// the old connection fail late) changes nothing.
    pub fn report_broken(&self, conn: &Connection) {
        let current = self.inner.current.borrow();
        if current.as_ref().is_some_and(|c| std::ptr::eq(&**c, conn)) {
            self.inner.broken.notify_one();
        }
    }

    /// Keeps a connection up until `cancel` fires. Run it in its own task.
    pub async fn supervise(self, cancel: CancellationToken) {
        let mut backoff = reconnect_backoff(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY);
        while !cancel.is_cancelled() {
            let conn = match self.connect().await {
                Ok(conn) => conn,
                Err(error) => {
                    let delay = backoff.next().unwrap_or(RECONNECT_MAX_DELAY);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                    metrics::counter!(metric::BROKER_CONNECT_FAILURES).increment(1);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            backoff = reconnect_backoff(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY);
            info!(name = %self.inner.connection_name, "broker connected, topology declared");
            metrics::gauge!(metric::BROKER_CONNECTED).set(1.0);
            let conn = Arc::new(conn);
            let mut events = conn.events_listener();
            // A report stored while there was no current connection was
            // about an old one.
            let _ = self.inner.broken.notified().now_or_never();
            self.inner.current.send_replace(Some(conn.clone()));

            // Wait until the connection fails, a component reports it, or we stop.
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.inner.broken.notified() => break,
                    event = events.next() => match event {
                        Some(lapin::Event::Error(error)) => {
                            warn!(%error, "broker connection error");
                            break;
                        }
                        Some(_) => continue,
                        None => break,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if !conn.status().connected() { break; }
                    }
                }
            }
            metrics::gauge!(metric::BROKER_CONNECTED).set(0.0);
            self.inner.current.send_replace(None);
            if !cancel.is_cancelled() {
                warn!("broker connection lost; reconnecting");
            }
            // Closing an already dead connection fails; that is fine.
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        }
    }

    /// Connects to a node — the one that worked last, else each of the
    /// others in turn — and declares the topology (idempotent: nothing the
    /// cluster already has changes). The last node's error if none answers.
    async fn connect(&self) -> Result<Connection, BrokerError> {
        use std::sync::atomic::Ordering;
        let n = self.inner.urls.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut last_error = BrokerError::Timeout;
        for i in (0..n).map(|k| (first + k) % n) {
            match self.connect_to(&self.inner.urls[i]).await {
                Ok(conn) => {
                    if n > 1 {
                        info!(node = %node_label(&self.inner.urls[i]), "connected to broker node");
                    }
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(error) => {
                    if n > 1 {
                        warn!(node = %node_label(&self.inner.urls[i]), %error,
                              "broker node unavailable; trying the next");
                    }
                    last_error = error;
                }
            }
        }
        Err(last_error)
    }

    /// Connects to one node and declares the topology, within
    /// [`SETUP_TIMEOUT`]: a broker that is still starting can accept the
    /// socket and then stall.
    async fn connect_to(&self, url: &str) -> Result<Connection, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(self.inner.connection_name.as_str().into());
        let connect = async {
            let conn = Connection::connect(url, props).await?;
            topology::declare_all(&conn, self.inner.queue_type).await?;
            Ok::<_, lapin::Error>(conn)
        };
        Ok(tokio::time::timeout(SETUP_TIMEOUT, connect)
            .await
            .map_err(|_| BrokerError::Timeout)??)
    }
}

/// The local broker: `AMQP_URL`'s default.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A node's `host:port`, for logs (never its credentials).
fn node_label(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('/').next().unwrap_or(rest)
}

/// The node URLs of `AMQP_URL`: comma-separated, blanks ignored (at least
/// the default node).
pub fn node_urls(amqp_url: &str) -> Vec<String> {
    let urls: Vec<String> = amqp_url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        vec![DEFAULT_AMQP_URL.to_owned()]
    } else {
        urls
    }
}

/// Reconnect delays: exponential from `min` to `max`, with jitter, endless.
pub fn reconnect_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(min)
        .with_max_delay(max)
        .without_max_times()
        .build()
}

/// A lapin error for an operation that timed out.
pub fn timeout_error(what: &str) -> lapin::Error {
    lapin::Error::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

#[cfg(test)]
mod node_tests {
    use super::*;

    #[test]
    fn amqp_url_lists_its_nodes_comma_separated() {
        assert_eq!(
            node_urls("amqp://a:1/%2f, amqp://b:2/%2f,,"),
            ["amqp://a:1/%2f", "amqp://b:2/%2f"]
        );
        assert_eq!(node_urls(""), [DEFAULT_AMQP_URL]);
        assert_eq!(node_label("amqp://u:secret@node2:5672/%2f"), "node2:5672");
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("timed out connecting to the broker")]
    Timeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_grows_and_stays_capped() {
        let delays: Vec<_> = reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .take(30)
            .collect();
        assert_eq!(delays.len(), 30);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[10] >= Duration::from_millis(500));
    }
}
