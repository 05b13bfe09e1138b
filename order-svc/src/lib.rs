//! OrderService: takes orders (HTTP `POST /orders` or an `order.requested`
//! message), starts each saga, and decides it exactly once.
//!
//! Consumes: `order.requested`, `payment.failed`, `payment.refunded`,
//! `inventory.failed`, `inventory.released`, `notification.sent`,
//! `notification.failed`. Observes (without consuming durably):
//! `payment.completed`, `inventory.reserved`.
//! Emits: `order.created`, `order.confirmed`, `order.failed`,
//! `order.cancelled`, and the result dict to a client's `reply_to`.
//!
//! The decision is a conditional update (`status = 'PENDING'`) in this
//! service's database, so CONFIRMED and FAILED race safely; a timeout watcher
//! fails every saga still undecided at its deadline.
//!
//! # Layout
//! - [`domain`]: validation, pricing, decision table (pure).
//! - [`saga`]: placing and deciding orders, a batch at a time.
//! - [`handlers`]: a batch of messages → one transaction.
//! - [`placer`]: group commit for HTTP orders; [`http`]: the API.
//! - [`decisions`]: requests waiting for a decision; [`replica`]: this
//!   replica's own queue (decisions made elsewhere, observed progress);
//!   [`progress`]: how far each saga has got.
//! - [`watcher`]: the timeout watcher; [`db`]: every SQL statement.

pub mod db;
pub mod decisions;
pub mod domain;
pub mod explorer;
pub mod handlers;
pub mod http;
pub mod placer;
pub mod progress;
pub mod reconciler;
pub mod replica;
pub mod saga;
pub mod timeline;
pub mod watcher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::messaging::topology::ORDER_SVC;
use common::runtime::config::CommonConfig;
use common::runtime::service::{BackgroundTask, Service, ServiceRuntime, Tasks};
use common::saga::card::CardSealer;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::decisions::DecisionWaiters;
use crate::placer::{Placer, PlacerTask};
use crate::progress::Progress;
use crate::reconciler::Reconciler;
use crate::saga::OrderSaga;
use crate::timeline::Peers;
use crate::watcher::NextWake;

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
    /// Deadline of a saga that waits for an outside answer (a payment's
    /// 3-D Secure confirmation), from order creation, in ms.
    #[arg(long, env = "SAGA_LONG_DEADLINE_MS", default_value_t = 900_000)]
    pub saga_long_deadline_ms: u64,
    /// payment-svc's card-sealing public key (base64). Unset: the built-in
    /// development key pair (never use it in production).
    #[arg(long, env = "CARD_SEAL_PUBLIC_KEY")]
    pub card_seal_public_key: Option<String>,
    /// The longest the timeout watcher sleeps, in ms. It wakes at the
    /// earliest deadline of an undecided saga anyway; this bounds how late a
    /// saga placed by a replica that died is timed out by another.
    #[arg(long, env = "TIMEOUT_SCAN_MS", default_value_t = 1000)]
    pub timeout_scan_ms: u64,
    /// payment-svc's base URL: `GET /sagas/{id}` asks it for its steps.
    #[arg(long, env = "PAYMENT_SVC_URL", default_value = "http://127.0.0.1:8081")]
    pub payment_svc_url: String,
    /// inventory-svc's base URL (as above).
    #[arg(
        long,
        env = "INVENTORY_SVC_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub inventory_svc_url: String,
    /// notification-svc's base URL (as above).
    #[arg(
        long,
        env = "NOTIFICATION_SVC_URL",
        default_value = "http://127.0.0.1:8083"
    )]
    pub notification_svc_url: String,
    /// How often the invariant reconciler checks decided sagas against the
    /// other services, in ms; 0: only on demand (`POST /admin/reconcile`).
    #[arg(long, env = "RECONCILE_INTERVAL_MS", default_value_t = 30_000)]
    pub reconcile_interval_ms: u64,
    /// How long after its deadline a saga's compensations may still be
    /// catching up before the reconciler reports a promise not kept, in ms.
    #[arg(long, env = "RECONCILE_GRACE_MS", default_value_t = 30_000)]
    pub reconcile_grace_ms: u64,
}

impl Config {
    /// Defaults with the given broker and database (tests, tools).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            saga_deadline_ms: 5000,
            saga_long_deadline_ms: 900_000,
            card_seal_public_key: None,
            timeout_scan_ms: 1000,
            payment_svc_url: "http://127.0.0.1:8081".into(),
            inventory_svc_url: "http://127.0.0.1:8082".into(),
            notification_svc_url: "http://127.0.0.1:8083".into(),
            reconcile_interval_ms: 30_000,
            reconcile_grace_ms: 30_000,
        }
    }
}

pub struct App {
    runtime: ServiceRuntime,
    saga: Arc<OrderSaga>,
    placer: Placer,
    placer_task: PlacerTask,
    timeout_scan: Duration,
    peers: Peers,
    reconciler: Reconciler,
    reconcile_interval: Duration,
}

impl Service for App {
    type Config = Config;

    async fn build(config: Config) -> anyhow::Result<Self> {
        let sealer = CardSealer::new(config.card_seal_public_key.as_deref())?;
        if sealer.is_dev_key() {
            if !config.common.dev_mode {
                anyhow::bail!(
                    "CARD_SEAL_PUBLIC_KEY is unset or is the public development key: set \
                     payment-svc's public key (see README, production notes), or DEV_MODE=1 on a \
                     development machine"
                );
            }
            warn!("development mode: cards are sealed with the public development key");
        }
        if config.common.http_request_timeout_ms <= config.saga_deadline_ms {
            warn!(
                http_request_timeout_ms = config.common.http_request_timeout_ms,
                saga_deadline_ms = config.saga_deadline_ms,
                "HTTP_REQUEST_TIMEOUT_MS is not above SAGA_DEADLINE_MS: a POST /orders waiting \
                 for its saga's decision may be answered 408 before it is decided"
            );
        }
        // The peers' step logs are API endpoints: either token opens them.
        let peers = Peers::new(
            [
                &config.payment_svc_url,
                &config.inventory_svc_url,
                &config.notification_svc_url,
            ],
            config
                .common
                .api_token
                .clone()
                .or_else(|| config.common.admin_token.clone()),
        )?;
        let retention = config.common.retention();
        let runtime = ServiceRuntime::build(ORDER_SVC, config.common, &MIGRATOR).await?;
        let replica_id = uuid::Uuid::new_v4().simple().to_string();
        let saga = Arc::new(OrderSaga {
            pool: runtime.pool.clone(),
            sealer,
            deadline: Duration::from_millis(config.saga_deadline_ms),
            long_deadline: Duration::from_millis(config.saga_long_deadline_ms),
            waiters: Arc::new(DecisionWaiters::default()),
            progress: Arc::new(Progress::default()),
            publisher: runtime.publisher.clone(),
            replica_queue: ORDER_SVC.replica_queue(&replica_id[..12]),
            next_wake: Arc::new(NextWake::default()),
        });
        let (placer, placer_task) = Placer::new();
        Ok(Self {
            runtime,
            saga: saga.clone(),
            placer,
            placer_task,
            timeout_scan: Duration::from_millis(config.timeout_scan_ms),
            reconciler: Reconciler {
                saga,
                peers: peers.clone(),
                grace: Duration::from_millis(config.reconcile_grace_ms),
                retention,
            },
            reconcile_interval: Duration::from_millis(config.reconcile_interval_ms),
            peers,
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
        let replica: BackgroundTask = {
            let saga = saga.clone();
            let broker = self.runtime.broker.clone();
            let trust = self.runtime.trust.clone();
            Box::new(move |stop| Box::pin(replica::run(saga, broker, trust, stop)))
        };
        let placer: BackgroundTask = {
            let saga = saga.clone();
            let task = self.placer_task;
            Box::new(move |stop| Box::pin(task.run(saga, stop)))
        };
        let handler = handlers::OrderHandler { saga: saga.clone() };
        let undecided: BackgroundTask = {
            let pool = saga.pool.clone();
            Box::new(move |stop| Box::pin(watcher::sample_undecided(pool, stop)))
        };
        let mut intake = vec![watcher, replica, undecided];
        if !self.reconcile_interval.is_zero() {
            let reconciler = self.reconciler.clone();
            let interval = self.reconcile_interval;
            intake.push(Box::new(move |stop| {
                Box::pin(reconciler.run(interval, stop))
            }));
        }
        let reads = http::ExpensiveReads::new(saga.pool.clone());
        let routes = http::api().with_state(http::HttpState {
            reads,
            saga,
            placer: self.placer,
            peers: self.peers,
            reconciler: self.reconciler,
        });
        let tasks = Tasks {
            intake,
            support: vec![placer],
        };
        self.runtime.run(handler, routes, tasks, cancel).await
    }
}
