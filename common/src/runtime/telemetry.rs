//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with `RUST_LOG` filtering; `LOG_FORMAT=json` for JSON
//!   lines. Every per-saga log line carries `order_id`, which is also the
//!   trace id of each message's `traceparent` header, so one saga can be
//!   followed across all four services' logs.
//! - Metrics: one Prometheus recorder per process, rendered at `GET /metrics`.
//!   Every metric shared by the services carries a `service` label; the names
//!   are in [`crate::metric_definitions`].

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::metric_definitions as metric;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
            let full = |name: &str| metrics_exporter_prometheus::Matcher::Full(name.to_owned());
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .and_then(|b| b.set_buckets_for_metric(full(metric::OUTBOX_BATCH_ROWS), &sizes))
                .and_then(|b| b.set_buckets_for_metric(full(metric::CONSUMER_BATCH_SIZE), &sizes))
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
