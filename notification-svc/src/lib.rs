//! NotificationService: emails the order confirmation (the saga's last
//! forward step), and a cancellation email if the saga is rolled back after
//! the confirmation went out.
//!
//! Consumes: `inventory.reserved`, `order.failed`, `order.cancelled`.
//! Emits: `notification.sent`, `notification.failed`.
//!
//! A recipient on the reserved `.invalid` top-level domain "bounces"
//! (`notification.failed`), which fails the saga. The transport is pluggable
//! ([`transport`]): log by default, SMTP when `SMTP_URL` is set.

pub mod db;
pub mod domain;
pub mod handlers;
pub mod http;
pub mod queue;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;

use common::messaging::topology::NOTIFICATION_SVC;
use common::runtime::config::CommonConfig;
use common::runtime::service::{BackgroundTask, Service, ServiceRuntime, Tasks};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::handlers::NotificationHandler;
use crate::transport::{EmailTransport, LogTransport, SmtpTransport};

/// This service's name (queue prefix, metrics label).
pub const SERVICE: &str = NOTIFICATION_SVC.name;

/// notification-svc's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// notification-svc's configuration.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "notification-svc",
    version,
    about = "NotificationService of the order saga"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Hand emails to this SMTP relay: `smtps://host[:465]` (TLS),
    /// `smtp://host[:587]?tls=required` (STARTTLS) or `smtp://host[:25]`
    /// (no TLS: a local relay only). Unset: emails are only recorded and
    /// logged.
    #[arg(long, env = "SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Certificates (PEM) to trust for the relay's TLS besides the public
    /// roots: a relay with a private CA.
    #[arg(long, env = "SMTP_CA_FILE")]
    pub smtp_ca_file: Option<std::path::PathBuf>,
    /// Sender address of every email.
    #[arg(long, env = "EMAIL_FROM", default_value = "orders@shop.example")]
    pub email_from: String,
    /// Customers without an address on file get `<customer_id>@<this>`.
    #[arg(long, env = "DEFAULT_EMAIL_DOMAIN", default_value = "example.com")]
    pub default_email_domain: String,
    /// How often queued emails (confirmations the relay could not take, and
    /// every cancellation) are looked at, besides when one is queued (each
    /// with its own back-off), in ms.
    #[arg(long, env = "EMAIL_RETRY_MS", default_value_t = 2000)]
    pub email_retry_ms: u64,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            smtp_url: None,
            smtp_ca_file: None,
            email_from: "orders@shop.example".into(),
            default_email_domain: "example.com".into(),
            email_retry_ms: 2000,
        }
    }
}

pub struct App {
    runtime: ServiceRuntime,
    handler: NotificationHandler,
    email_retry: std::time::Duration,
}

impl Service for App {
    type Config = Config;

    async fn build(config: Config) -> anyhow::Result<Self> {
        let transport: Arc<dyn EmailTransport> = match &config.smtp_url {
            Some(url) => {
                let ca = match &config.smtp_ca_file {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("cannot read SMTP_CA_FILE {}: {e}", path.display())
                    })?),
                    None => None,
                };
                Arc::new(SmtpTransport::new(url, &config.email_from, ca.as_deref())?)
            }
            None => Arc::new(LogTransport),
        };
        let runtime = ServiceRuntime::build(NOTIFICATION_SVC, config.common, &MIGRATOR).await?;
        let handler = NotificationHandler {
            pool: runtime.pool.clone(),
            transport,
            default_email_domain: config.default_email_domain,
            relay: Arc::new(queue::RelayHealth::default()),
        };
        Ok(Self {
            runtime,
            handler,
            email_retry: std::time::Duration::from_millis(config.email_retry_ms.max(100)),
        })
    }

    fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let routes = http::api().with_state(http::HttpState {
            pool: self.runtime.pool.clone(),
            default_email_domain: self.handler.default_email_domain.as_str().into(),
        });
        let queue: BackgroundTask = {
            let (pool, transport) = (self.runtime.pool.clone(), self.handler.transport.clone());
            let (relay, every) = (self.handler.relay.clone(), self.email_retry);
            Box::new(move |stop| Box::pin(queue::run(pool, transport, relay, every, stop)))
        };
        let tasks = Tasks {
            intake: vec![queue],
            support: Vec::new(),
        };
        self.runtime.run(self.handler, routes, tasks, cancel).await
    }
}
