//! OrderService: takes orders (HTTP `POST /orders` or an `order.requested`
//! message), starts each saga, and decides it exactly once.
//!
//! Consumes: `order.requested`, `payment.completed`, `payment.failed`,
//! `payment.refunded`, `inventory.reserved`, `inventory.failed`,
//! `inventory.released`, `notification.sent`, `notification.failed`.
//! Emits: `order.created`, `order.confirmed`, `order.failed`,
//! `order.cancelled`, and the result dict to a client's `reply_to`.
//!
//! The decision is a conditional update (`status = 'PENDING'`) in this
//! service's database, so CONFIRMED and FAILED race safely; a timeout watcher
//! fails every saga still undecided at its deadline.
//!
//! # Layout
//! - [`domain`]: validation, pricing, decision table (pure).
//! - [`saga`]: placing and deciding orders (transactions + outbox).
//! - [`handlers`]: message → transaction.
//! - [`http`]: the API; [`decisions`]: wake-ups for waiting requests.
//! - [`watcher`]: the timeout watcher; [`db`]: every SQL statement.

pub mod db;
pub mod decisions;
pub mod domain;
pub mod handlers;
pub mod http;
pub mod saga;
pub mod watcher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::card::CardSealer;
use common::config::CommonConfig;
use common::service::{BackgroundTask, Service, ServiceRuntime};
use common::topology::ORDER_SVC;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::decisions::DecisionWaiters;
use crate::saga::OrderSaga;

/// This service's name (queue prefix, metrics label).
pub const SERVICE: &str = ORDER_SVC.name;

/// order-svc's own migrations (the shared outbox/inbox ones are added by common).
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// order-svc's configuration.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "order-svc", version, about = "OrderService of the order saga")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Saga deadline, from order creation, in ms.
    #[arg(long, env = "SAGA_DEADLINE_MS", default_value_t = 5000)]
    pub saga_deadline_ms: u64,
    /// payment-svc's card-sealing public key (base64). Unset: the built-in
    /// development key pair (never use it in production).
    #[arg(long, env = "CARD_SEAL_PUBLIC_KEY")]
    pub card_seal_public_key: Option<String>,
    /// How often the timeout watcher looks for overdue sagas, in ms.
    #[arg(long, env = "TIMEOUT_SCAN_MS", default_value_t = 100)]
    pub timeout_scan_ms: u64,
}

impl Config {
    /// Defaults with the given broker and database (tests, tools).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            saga_deadline_ms: 5000,
            card_seal_public_key: None,
            timeout_scan_ms: 100,
        }
    }
}

pub struct App {
    runtime: ServiceRuntime,
    saga: Arc<OrderSaga>,
    timeout_scan: Duration,
}

impl Service for App {
    type Config = Config;

    async fn build(config: Config) -> anyhow::Result<Self> {
        let sealer = CardSealer::new(config.card_seal_public_key.as_deref())?;
        if sealer.is_dev_key() {
            warn!(
                "CARD_SEAL_PUBLIC_KEY is not set: cards are sealed with the public development key"
            );
        }
        let runtime = ServiceRuntime::build(ORDER_SVC, config.common, &MIGRATOR).await?;
        let saga = Arc::new(OrderSaga {
            pool: runtime.pool.clone(),
            sealer,
            deadline: Duration::from_millis(config.saga_deadline_ms),
            waiters: Arc::new(DecisionWaiters::default()),
        });
        Ok(Self {
            runtime,
            saga,
            timeout_scan: Duration::from_millis(config.timeout_scan_ms),
        })
    }

    fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let saga = self.saga.clone();
        let watcher: BackgroundTask = {
            let saga = saga.clone();
            let scan = self.timeout_scan;
            Box::new(move |stop| Box::pin(watcher::run(saga, scan, stop)))
        };
        let wakeups: BackgroundTask = {
            let pool = saga.pool.clone();
            let waiters = saga.waiters.clone();
            Box::new(move |stop| {
                Box::pin(common::pg_notify::listen(
                    pool,
                    &["order_decided"],
                    stop,
                    move |n| {
                        if let Ok(id) = n.payload().parse() {
                            waiters.wake(id);
                        }
                    },
                ))
            })
        };
        let handler = handlers::OrderHandler { saga: saga.clone() };
        let routes = http::routes(saga);
        self.runtime
            .run(handler, routes, vec![watcher, wakeups], cancel)
            .await
    }
}
