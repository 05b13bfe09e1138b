//! InventoryService: reserves stock for each paid order, commits it when the
//! order is confirmed and releases it when the saga is rolled back.
//!
//! Consumes: `payment.completed`, `order.confirmed`, `order.failed`,
//! `order.cancelled`.
//! Emits: `inventory.reserved`, `inventory.failed`, `inventory.released`.
//!
//! See [`domain`] for why reserve-then-commit, and [`db`] for how
//! concurrent multi-item reservations avoid deadlocks.

pub mod db;
pub mod domain;
pub mod expiry;
pub mod handlers;
pub mod http;
pub mod restock;

use std::net::SocketAddr;

use common::messaging::topology::INVENTORY_SVC;
use common::runtime::config::CommonConfig;
use common::runtime::service::{BackgroundTask, Service, ServiceRuntime, Tasks};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::handlers::InventoryHandler;

/// This service's name (queue prefix, metrics label).
pub const SERVICE: &str = INVENTORY_SVC.name;

/// inventory-svc's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// inventory-svc's configuration.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "inventory-svc",
    version,
    about = "InventoryService of the order saga"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Stock held for a payment waiting for its confirmation, still held this
    /// long after its expiry (the saga's long deadline), is released by
    /// inventory-svc itself, in ms.
    #[arg(long, env = "HOLD_EXPIRY_GRACE_MS", default_value_t = 60_000)]
    pub hold_expiry_grace_ms: u64,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            hold_expiry_grace_ms: 60_000,
        }
    }
}

pub struct App {
    runtime: ServiceRuntime,
    hold_expiry_grace: std::time::Duration,
}

impl Service for App {
    type Config = Config;

    async fn build(config: Config) -> anyhow::Result<Self> {
        let runtime = ServiceRuntime::build(INVENTORY_SVC, config.common, &MIGRATOR).await?;
        Ok(Self {
            runtime,
            hold_expiry_grace: std::time::Duration::from_millis(config.hold_expiry_grace_ms),
        })
    }

    fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let pool = self.runtime.pool.clone();
        let handler = InventoryHandler { pool: pool.clone() };
        let expiry: BackgroundTask = {
            let (pool, grace) = (pool.clone(), self.hold_expiry_grace);
            Box::new(move |stop| Box::pin(expiry::run(pool, grace, stop)))
        };
        let routes = http::api().with_state(http::ItemsState {
            pool,
            publisher: self.runtime.publisher.clone(),
        });
        let tasks = Tasks {
            intake: vec![expiry],
            support: Vec::new(),
        };
        self.runtime.run(handler, routes, tasks, cancel).await
    }
}
