//! Configuration shared by every service, from the environment (or flags).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` | broker (vhost percent-encoded) |
//! | `DATABASE_URL` | `postgres://<role>@127.0.0.1:5432/<db>` | the service's own database (created if missing), as its own role (`order_svc`, `payment_svc`, … — `scripts/db-roles.sh`) |
//! | `HTTP_ADDR` | `127.0.0.1:<port>` | HTTP API, `/health`, `/metrics` |
//! | `DB_POOL_SIZE` | 8 | PostgreSQL connections in the pool |
//! | `PREFETCH` | 256 | unacked deliveries at most |
//! | `BATCH_SIZE` | 128 | deliveries handled in one transaction at most |
//! | `QUEUE_TYPE` | `quorum` | kind of the work, delay and parking queues: `quorum` or `classic` |
//! | `RETRY_MAX_ATTEMPTS` | 8 | attempts before a failing message is parked |
//! | `HANDLER_TIMEOUT_MS` | 30000 | a batch still being handled after this is abandoned and retried |
//! | `FAULT_DELAY_MS` | unset | delay before each batch: `N` or `MIN-MAX` |
//! | `OUTBOX_BATCH_SIZE` | 256 | rows per sweeper pass |
//! | `OUTBOX_POLL_MS` | 500 | how often the sweeper looks for rows the fast path left |
//! | `OUTBOX_SWEEP_AFTER_MS` | 1000 | a row not confirmed this long after its commit is swept |
//! | `SHUTDOWN_GRACE_MS` | 10000 | time allowed to drain on SIGTERM |
//! | `RETENTION_SECS` | 604800 | keep published outbox rows and inbox ids this long (7 days) |
//! | `CLEANUP_INTERVAL_SECS` | 15 | how often the retention cleaner runs (and vacuums, if the server's autovacuum is off) |
//! | `API_TOKEN` | unset | bearer token for placing and reading orders and sagas (see `runtime::auth`) |
//! | `API_CLIENTS` | unset | named API clients, `name=token,…`: each opens what `API_TOKEN` opens, as itself, with idempotency keys of its own |
//! | `ADMIN_TOKEN` | unset | bearer token for set-up, reads of accounts/stock/customers, `/admin/…`; with neither token the HTTP API is open (development only) |
//! | `DEV_MODE` | unset | `1`: development mode — the built-in card keys are accepted; without it a service refuses to start on them |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | unset | OpenTelemetry collector (OTLP/HTTP base URL) the saga's spans are exported to; unset: none |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` | or `http/json` |
//! | `HTTP_MAX_IN_FLIGHT` | 1024 | HTTP requests handled at once; more are shed with 503 |
//! | `HTTP_HEADER_TIMEOUT_MS` | 10000 | a connection that has not sent a request's headers in this time is closed |
//! | `HTTP_REQUEST_TIMEOUT_MS` | 30000 | a request (body included) not answered in this time gets 408 |
//! | `PRODUCER_USERS` | unset | broker user per service, `order-svc=orders,payment-svc=payments,…`; unnamed services: this service's own `AMQP_URL` user (see `messaging::trust`) |

use std::fmt;
use std::time::Duration;

use crate::messaging::fault::FaultDelay;
use crate::messaging::topology::{QueueType, ServiceIdentity};
use crate::messaging::trust::{ProducerTrust, amqp_user};
use crate::runtime::auth::{HttpAuth, Secret};

/// The local broker's default vhost `/`.
pub use crate::messaging::broker::DEFAULT_AMQP_URL;

/// Settings every service reads.
#[derive(clap::Args, Clone)]
pub struct CommonConfig {
    /// AMQP broker URL, or several nodes' URLs comma-separated (a cluster:
    /// the service fails over between them); the vhost is percent-encoded
    /// (`%2f` is `/`).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// PostgreSQL URL of this service's own database (created if missing)
    /// [default: postgres://<service role>@127.0.0.1:5432/<service database>].
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// HTTP listen address [default: 127.0.0.1:<service port>].
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
    /// Unacked deliveries at most (the broker's prefetch).
    #[arg(long, env = "PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Deliveries handled in one transaction at most.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,
    /// Kind of the work, delay and parking queues: `quorum` or `classic`
    /// (every service of a system must use the same).
    #[arg(long, env = "QUEUE_TYPE", default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,
    /// Attempts (first delivery + retries) before a failing message is parked.
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value_t = 8)]
    pub retry_max_attempts: u32,
    /// A batch still being handled after this is abandoned (rolled back)
    /// and its messages retried, in ms.
    #[arg(long, env = "HANDLER_TIMEOUT_MS", default_value_t = 30_000)]
    pub handler_timeout_ms: u64,
    /// Artificial delay before handling each batch: `N` or `MIN-MAX` ms.
    #[arg(long, env = "FAULT_DELAY_MS")]
    pub fault_delay_ms: Option<FaultDelay>,
    /// Outbox rows published per sweeper pass.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 256)]
    pub outbox_batch_size: i64,
    /// How often the outbox sweeper looks for rows the fast path left, in ms.
    #[arg(long, env = "OUTBOX_POLL_MS", default_value_t = 500)]
    pub outbox_poll_ms: u64,
    /// An outbox row not confirmed this long after its commit is published
    /// by the sweeper, in ms.
    #[arg(long, env = "OUTBOX_SWEEP_AFTER_MS", default_value_t = 1000)]
    pub outbox_sweep_after_ms: u64,
    /// Time allowed to drain on SIGTERM, in ms.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Keep published outbox rows and inbox ids this long, in seconds; older
    /// messages are refused. Must exceed the retry horizon plus an hour.
    #[arg(long, env = "RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,
    /// How often the retention cleaner runs (and, on a server whose
    /// autovacuum is off, vacuums the service's database), in seconds.
    #[arg(long, env = "CLEANUP_INTERVAL_SECS", default_value_t = 15)]
    pub cleanup_interval_secs: u64,
    /// The broker user each service publishes as, `service=user,…`; a
    /// service not named is trusted as this service's own broker user.
    /// Events from any other user are parked.
    #[arg(long, env = "PRODUCER_USERS")]
    pub producer_users: Option<String>,
    /// HTTP requests handled at once; more are refused with 503.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub http_max_in_flight: usize,
    /// A connection that has not sent a whole request head within this is
    /// closed (slow clients), in ms.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// A request (reading its body included) not answered within this gets
    /// 408, in ms. Must exceed the saga deadline: `POST /orders` waits for
    /// the decision.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub http_request_timeout_ms: u64,
    /// Bearer token for placing and reading orders and sagas.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,
    /// Bearer token for everything else but `/health` and `/metrics`.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Bearer token of the card gateway (payment-svc): it may only answer
    /// 3-D Secure (`POST /payments/{order_id}/confirm`, `/decline`).
    #[arg(long, env = "GATEWAY_TOKEN", hide_env_values = true)]
    pub gateway_token: Option<Secret>,
    /// Named API clients, `name=token,name=token…`: each opens what the API
    /// token opens, as itself, with idempotency keys of its own.
    #[arg(long, env = "API_CLIENTS", hide_env_values = true)]
    pub api_clients: Option<Secret>,
    /// Development mode: the public development card keys are accepted.
    #[arg(long, env = "DEV_MODE", action = clap::ArgAction::Set, default_value_t = false,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub dev_mode: bool,
    /// OpenTelemetry collector (OTLP over HTTP) to export the saga's spans
    /// to, e.g. `http://127.0.0.1:4318`; unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,
    /// `http/protobuf` or `http/json`.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "http/protobuf"
    )]
    pub otel_exporter_otlp_protocol: String,
}

impl CommonConfig {
    /// Defaults with the given broker and database (tests, tools).
    pub fn new(amqp_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            database_url: Some(database_url.into()),
            http_addr: None,
            db_pool_size: 8,
            prefetch: 256,
            batch_size: 128,
            queue_type: QueueType::Quorum,
            retry_max_attempts: 8,
            handler_timeout_ms: 30_000,
            fault_delay_ms: None,
            outbox_batch_size: 256,
            outbox_poll_ms: 500,
            outbox_sweep_after_ms: 1000,
            shutdown_grace_ms: 10_000,
            retention_secs: 7 * 24 * 3600,
            cleanup_interval_secs: 15,
            producer_users: None,
            http_max_in_flight: 1024,
            http_header_timeout_ms: 10_000,
            http_request_timeout_ms: 30_000,
            api_token: None,
            admin_token: None,
            gateway_token: None,
            api_clients: None,
            dev_mode: false,
            otel_exporter_otlp_endpoint: None,
            otel_exporter_otlp_protocol: "http/protobuf".to_owned(),
        }
    }

    /// The service's database, as its own role by default
    /// (`postgres://payment_svc@127.0.0.1:5432/payments`; the roles are made
    /// by `scripts/db-roles.sh`).
    pub fn database_url(&self, svc: &ServiceIdentity) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "postgres://{}@127.0.0.1:5432/{}",
                svc.database_role(),
                svc.database
            )
        })
    }

    pub fn http_addr(&self, svc: &ServiceIdentity) -> String {
        self.http_addr
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", svc.http_port))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }

    /// The HTTP API's tokens (`API_TOKEN`, `ADMIN_TOKEN`).
    pub fn http_auth(&self) -> Result<HttpAuth, String> {
        HttpAuth::new(self.api_token.as_ref(), self.admin_token.as_ref())?
            .with_gateway(self.gateway_token.as_ref())?
            .with_clients(self.api_clients.as_ref())
    }

    /// Who may publish which events (`AMQP_URL`'s user, `PRODUCER_USERS`).
    pub fn producer_trust(&self) -> Result<ProducerTrust, String> {
        let first = crate::messaging::broker::node_urls(&self.amqp_url).swap_remove(0);
        ProducerTrust::new(amqp_user(&first), self.producer_users.as_deref())
    }
}

impl fmt::Debug for CommonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommonConfig")
            .field(
                "amqp_url",
                &crate::messaging::broker::node_urls(&self.amqp_url)
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("http_addr", &self.http_addr)
            .field("db_pool_size", &self.db_pool_size)
            .field("prefetch", &self.prefetch)
            .field("batch_size", &self.batch_size)
            .field("queue_type", &self.queue_type)
            .field("retry_max_attempts", &self.retry_max_attempts)
            .field("handler_timeout_ms", &self.handler_timeout_ms)
            .field(
                "fault_delay_ms",
                &self.fault_delay_ms.map(|d| d.to_string()),
            )
            .field("outbox_batch_size", &self.outbox_batch_size)
            .field("outbox_poll_ms", &self.outbox_poll_ms)
            .field("outbox_sweep_after_ms", &self.outbox_sweep_after_ms)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("retention_secs", &self.retention_secs)
            .field("cleanup_interval_secs", &self.cleanup_interval_secs)
            .field("producer_users", &self.producer_users)
            .field("http_max_in_flight", &self.http_max_in_flight)
            .field("http_header_timeout_ms", &self.http_header_timeout_ms)
            .field("http_request_timeout_ms", &self.http_request_timeout_ms)
            .field("api_token", &self.api_token)
            .field("admin_token", &self.admin_token)
            .field("api_clients", &self.api_clients)
            .field("gateway_token", &self.gateway_token)
            .field("dev_mode", &self.dev_mode)
            .field(
                "otel_exporter_otlp_endpoint",
                &self.otel_exporter_otlp_endpoint,
            )
            .field(
                "otel_exporter_otlp_protocol",
                &self.otel_exporter_otlp_protocol,
            )
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
    }
}
