//! PaymentService: charges the customer for an order and refunds the charge
//! when the saga is rolled back. The payment gateway is simulated on this
//! service's own ledger (see [`domain`]).
//!
//! Consumes: `order.created`, `order.failed`, `order.cancelled`.
//! Emits: `payment.completed`, `payment.failed`, `payment.refunded`.
//!
//! Only this service holds the key that opens the sealed card of
//! `order.created`; it stores the card's brand and last 4 digits, never the
//! number or CVV.

pub mod db;
pub mod domain;
pub mod gateway;
pub mod handlers;
pub mod http;

use std::net::SocketAddr;

use common::messaging::topology::PAYMENT_SVC;
use common::runtime::auth::Secret;
use common::runtime::config::CommonConfig;
use common::runtime::service::{Service, ServiceRuntime, Tasks};
use common::saga::card::CardOpener;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::handlers::PaymentHandler;

/// This service's name (queue prefix, metrics label).
pub const SERVICE: &str = PAYMENT_SVC.name;

/// The currency of every amount.
pub const CURRENCY: &str = "USD";

/// payment-svc's own migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// payment-svc's configuration.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "payment-svc",
    version,
    about = "PaymentService of the order saga"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// The card-sealing secret key (base64). Unset: the built-in development
    /// key pair (never use it in production).
    #[arg(long, env = "CARD_SEAL_SECRET_KEY", hide_env_values = true)]
    pub card_seal_secret_key: Option<Secret>,
    /// Balance of a customer the ledger has not seen, in cents [default:
    /// 1000000 (10,000.00) in development mode (`DEV_MODE=1`), 0 otherwise:
    /// in production, accounts are funded explicitly, or every new customer
    /// id would be free money].
    #[arg(long, env = "DEFAULT_BALANCE_CENTS")]
    pub default_balance_cents: Option<i64>,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            card_seal_secret_key: None,
            default_balance_cents: None,
        }
    }
}

pub struct App {
    runtime: ServiceRuntime,
    handler: PaymentHandler,
}

impl Service for App {
    type Config = Config;

    async fn build(config: Config) -> anyhow::Result<Self> {
        let opener = CardOpener::new(config.card_seal_secret_key.as_ref().map(Secret::expose))?;
        if opener.is_dev_key() {
            if !config.common.dev_mode {
                anyhow::bail!(
                    "CARD_SEAL_SECRET_KEY is unset or is the public development key: set a key of \
                     your own (see README, production notes), or DEV_MODE=1 on a development machine"
                );
            }
            warn!("development mode: cards are opened with the public development key");
        }
        let default_balance_cents = match config.default_balance_cents {
            Some(cents) if !(0..=domain::MAX_BALANCE_CENTS).contains(&cents) => {
                anyhow::bail!(
                    "DEFAULT_BALANCE_CENTS must be between 0 and {}",
                    domain::MAX_BALANCE_CENTS
                )
            }
            Some(cents) => cents,
            None if config.common.dev_mode => domain::DEV_DEFAULT_BALANCE_CENTS,
            None => 0,
        };
        let runtime = ServiceRuntime::build(PAYMENT_SVC, config.common, &MIGRATOR).await?;
        let handler = PaymentHandler {
            pool: runtime.pool.clone(),
            opener,
            default_balance_cents,
        };
        Ok(Self { runtime, handler })
    }

    fn local_addr(&self) -> SocketAddr {
        self.runtime.local_addr()
    }

    async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let routes = http::api().with_state(http::Gateway {
            pool: self.runtime.pool.clone(),
            publisher: self.runtime.publisher.clone(),
            default_balance_cents: self.handler.default_balance_cents,
        });
        self.runtime
            .run(self.handler, routes, Tasks::default(), cancel)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24: the configuration's `Debug` printed the card-sealing secret
    /// key in clear.
    #[test]
    fn the_card_secret_key_never_prints() {
        let mut config = Config::new(CommonConfig::new("amqp://x", "postgres://x/y"));
        config.card_seal_secret_key = Some("s3cret-key-material".parse().unwrap());
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }
}
