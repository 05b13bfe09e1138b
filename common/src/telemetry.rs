//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with `RUST_LOG` filtering; `LOG_FORMAT=json` for JSON
//!   lines. Handler spans carry `order_id`, `event_type`, `message_id` and a
//!   `trace_id` equal to the order id, so one saga can be followed across all
//!   four services' logs (the same id travels in each message's
//!   `traceparent` header).
//! - Metrics: one Prometheus recorder per process, rendered at `GET /metrics`.
//!   Every metric shared by the services carries a `service` label. Label
//!   values come from fixed sets (never ids or error strings).

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Metric names (Prometheus conventions: `_total` counters, `_seconds` histograms).
pub mod metric {
    /// Messages handled, by `service`, `event_type` and `outcome` (`ok`, `retry`, `parked`).
    pub const MESSAGES_HANDLED: &str = "messages_handled_total";
    /// Time to handle one message, by `service` and `event_type`.
    pub const MESSAGE_HANDLING_SECONDS: &str = "message_handling_seconds";
    /// Messages parked in a dead-letter queue, by `service` and `reason`.
    pub const MESSAGES_PARKED: &str = "messages_parked_total";
    /// Duplicate messages absorbed by an inbox, by `service` and `event_type`.
    pub const INBOX_DUPLICATES: &str = "inbox_duplicates_total";
    /// Forward events not applied because their saga was already over, by `service` and `event_type`.
    pub const LATE_EVENTS: &str = "late_events_ignored_total";
    /// Outbox rows published and confirmed, by `service`.
    pub const OUTBOX_PUBLISHED: &str = "outbox_published_total";
    /// Outbox rows the broker refused or returned, by `service`.
    pub const OUTBOX_PUBLISH_FAILURES: &str = "outbox_publish_failures_total";
    /// Rows per relay pass that found work, by `service`.
    pub const OUTBOX_BATCH_ROWS: &str = "outbox_batch_rows";
    /// From commit to broker confirm, by `service`.
    pub const OUTBOX_LAG_SECONDS: &str = "outbox_lag_seconds";
    /// 1 while the broker connection is up, by `service`.
    pub const BROKER_CONNECTED: &str = "broker_connected";
    /// Failed broker connection attempts, by `service`.
    pub const BROKER_CONNECT_FAILURES: &str = "broker_connect_failures_total";
    /// Retryable database errors, by `service` and `kind` (`deadlock`, `serialization`, `lock_timeout`, `connection`, `other`).
    pub const DB_RETRYABLE_ERRORS: &str = "db_retryable_errors_total";
    /// Sagas started (orders created), order-svc.
    pub const SAGAS_STARTED: &str = "sagas_started_total";
    /// Sagas decided, by `outcome` (`confirmed`, `failed`) and `failed_step` (`none`, `payment`, `inventory`, `notification`, `timeout`).
    pub const SAGAS_DECIDED: &str = "sagas_decided_total";
    /// From order creation to decision, by `outcome`.
    pub const SAGA_DURATION_SECONDS: &str = "saga_duration_seconds";
    /// Orders rejected as invalid input, by `source` (`http`, `amqp`).
    pub const ORDERS_REJECTED: &str = "orders_rejected_total";
    /// Compensations whose retries were exhausted and that were escalated, by `service` and `step`.
    pub const COMPENSATIONS_ESCALATED: &str = "compensations_escalated_total";
    /// Old published outbox rows and inbox ids deleted by the cleaner, by `service` and `table`.
    pub const RETENTION_DELETED: &str = "retention_deleted_rows_total";
    /// Business outcomes of a service's step, by `service` and `outcome`
    /// (e.g. `charged`, `declined`, `refunded`, `reserved`, `released`, `sent`, `bounced`).
    pub const STEP_OUTCOMES: &str = "saga_step_outcomes_total";
}

/// Counts one business outcome of a service's step (`saga_step_outcomes_total`).
pub fn step_outcome(service: &'static str, outcome: &'static str) {
    metrics::counter!(metric::STEP_OUTCOMES, "service" => service, "outcome" => outcome)
        .increment(1);
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            metric::OUTBOX_BATCH_ROWS.to_owned(),
                        ),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .expect("non-empty buckets") // startup invariant
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Drains histogram buffers every 5 s until `cancel` fires. Without it, the
/// exporter's histograms grow until the next scrape (CRATES.md, M1).
pub async fn run_upkeep(cancel: CancellationToken) {
    let handle = prometheus();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Installs the global tracing subscriber (idempotent).
///
/// `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` switches to JSON.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn,amq_protocol=warn"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if json {
        registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .try_init()
    } else {
        let ansi = std::io::stdout().is_terminal();
        registry
            .with(tracing_subscriber::fmt::layer().compact().with_ansi(ansi))
            .try_init()
    };
}
