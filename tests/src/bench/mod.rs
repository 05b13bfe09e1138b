//! `saga-bench`: throughput and latency of the whole saga on the peers'
//! workload (`../shared/peers/WORKLOAD.md`), against a system it starts
//! itself (`--spawn`, what `scripts/bench.sh` does) or one already running
//! (located by the environment, see [`target`]) — so a user can measure
//! their own deployment, replicas and clusters included.
//!
//! A run: set the workload up through the public set-up endpoints
//! ([`setup`]), warm up (not counted), place the measured orders closed loop
//! or open loop, over HTTP or AMQP ([`driver`]), wait until the system has
//! drained, read what it cost ([`measure`]), then check every invariant
//! through the public query endpoints ([`check`]) and report ([`report`]).
//! `--find-knee` searches the highest open-loop rate whose p99 stays under
//! a bound, and measures latency at half of it.

pub mod check;
pub mod driver;
pub mod measure;
pub mod report;
pub mod setup;
pub mod target;
pub mod workload;

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::time::Instant;

use common::messaging::retry::RETRY_TIERS;
use common::messaging::topology::SERVICES;

use self::driver::{Client, Load, Sample};
use self::report::{Costs, Figures};
use self::target::Target;
use self::workload::Order;

/// How long to let the database's and the broker's statistics catch up.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// One measured run.
pub struct RunReport {
    pub label: String,
    pub load: Load,
    pub figures: Figures,
    pub confirmed: usize,
    pub failed: usize,
    pub violations: Vec<String>,
    pub costs: Costs,
    pub samples: Vec<Sample>,
    /// Every item the run's orders (warm-up included) name.
    pub items: Vec<String>,
}

impl RunReport {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The JSON line, in the peers' shape plus the costs.
    pub fn json(&self, replicas: usize, entry: &str) -> Value {
        let (concurrency, rate) = match self.load {
            Load::Closed { concurrency } => (json!(concurrency), Value::Null),
            Load::Open { rate } => (Value::Null, json!(rate)),
        };
        let f = &self.figures;
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "system": "order-saga",
            "n": f.n,
            "concurrency": concurrency,
            "rate": rate,
            "entry": entry,
            "replicas": replicas,
            "elapsed_s": round2(f.elapsed.as_secs_f64()),
            "sagas_per_s": f.sagas_per_s,
            "p50_ms": f.p50_ms,
            "p95_ms": f.p95_ms,
            "p99_ms": f.p99_ms,
            "confirmed": self.confirmed,
            "failed": self.failed,
            "invariants_ok": self.ok(),
            "settle_ms": self.costs.settle.as_millis() as u64,
            "cpu_ms_per_saga": round2(self.costs.system_cpu_ms()),
            "cpu_ms_per_saga_by_component": self.costs.cpu_ms_per_saga.iter()
                .map(|(k, v)| ((*k).to_owned(), json!(round2(*v)))).collect::<serde_json::Map<_, _>>(),
            "commits_per_saga": self.costs.commits_per_saga.map(round2),
            "messages_per_saga": self.costs.messages_per_saga.map(round2),
            "deliveries_per_saga": self.costs.deliveries_per_saga.map(round2),
            "peak_rss_mib": self.costs.peak_rss_mib.iter()
                .map(|(k, v)| ((*k).to_owned(), json!(round2(*v)))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// A benchmark session against one system.
pub struct Bench {
    pub http: reqwest::Client,
    pub target: Target,
    pub client: Client,
    pub seed: u64,
    /// Distinguishes this session's idempotency keys from earlier ones.
    pub session: String,
    pub plot: Option<PathBuf>,
    pub settle_timeout: Duration,
    next_index: usize,
}

impl Bench {
    pub fn new(target: Target, client: Client, seed: u64, plot: Option<PathBuf>) -> Bench {
        Bench {
            http: target::http_client()
                .build()
                .expect("an HTTP client with default settings builds"),
            target,
            client,
            seed,
            session: format!("bench-{:08x}", rand::random::<u32>()),
            plot,
            settle_timeout: Duration::from_secs(120),
            next_index: 0,
        }
    }

    fn orders(&mut self, n: usize) -> Vec<Order> {
        let first = self.next_index;
        self.next_index += n;
        (first..first + n)
            .map(|i| Order::nth(self.seed, i))
            .collect()
    }

    /// Warms up with `warmup` orders, then measures `n` under `load`.
    /// `costs` also reads commits and messages (which takes a few seconds:
    /// the broker's counters refresh every 5 s).
    pub async fn run(
        &mut self,
        label: &str,
        load: Load,
        warmup: usize,
        n: usize,
        costs: bool,
    ) -> anyhow::Result<RunReport> {
        let warm = self.orders(warmup);
        let measured = self.orders(n);
        let all: Vec<Order> = warm.iter().chain(&measured).cloned().collect();
        setup::reset(&self.http, &self.target, &all).await?;
        let mut items: Vec<String> = all
            .iter()
            .flat_map(|o| o.lines.iter().map(|(i, _)| i.clone()))
            .collect();
        items.sort_unstable();
        items.dedup();

        let bar = progress(warmup as u64, &format!("{label}: warm-up"));
        let mut samples = driver::drive(&self.client, &self.session, warm, load, &bar).await;
        bar.finish_and_clear();

        drained(&self.target.amqp_url).await;
        // PostgreSQL backends report their counts at most once a second,
        // and an idle one only after 10 s; the broker's counters refresh
        // every 5 s. Costs are read on an idle system, before and after.
        let (commits0, messages0) = if costs {
            tokio::time::sleep(STATS_SETTLE).await;
            (
                measure::pg_commits(&self.target).await,
                measure::rabbit_messages(&self.http, &self.target).await,
            )
        } else {
            (None, None)
        };
        let cpu0 = measure::cpu();
        measure::reset_peak_rss(&self.target);
        let bar = progress(n as u64, label);
        let started = Instant::now();
        let measured_samples =
            driver::drive(&self.client, &self.session, measured, load, &bar).await;
        let elapsed = started.elapsed();
        bar.finish_and_clear();

        // Until the last compensation and commitment: the queues drain.
        let done = Instant::now();
        drained(&self.target.amqp_url).await;
        let settle = done.elapsed();
        let cpu1 = measure::cpu();
        let mut report_costs = Costs {
            cpu_ms_per_saga: measure::cpu_per_saga(&cpu0, &cpu1, n),
            peak_rss_mib: measure::peak_rss_mib(&self.target),
            settle,
            ..Costs::default()
        };
        if costs {
            tokio::time::sleep(STATS_SETTLE).await;
            if let (Some(a), Some(b)) = (commits0, measure::pg_commits(&self.target).await) {
                report_costs.commits_per_saga = Some((b - a) as f64 / n as f64);
            }
            if let (Some((p0, d0)), Some((p1, d1))) = (
                messages0,
                measure::rabbit_messages(&self.http, &self.target).await,
            ) {
                report_costs.messages_per_saga = Some((p1 - p0) / n as f64);
                report_costs.deliveries_per_saga = Some((d1 - d0) / n as f64);
            }
        }

        let figures = report::figures(&measured_samples, elapsed);
        samples.extend(measured_samples.iter().cloned());
        let checked = check::check(&self.http, &self.target, &samples, self.settle_timeout).await;
        report_costs.settle += checked.settle;
        let (confirmed, failed) = count(&measured_samples);
        if let Some(dir) = &self.plot {
            let name = label.replace([' ', '/'], "-");
            if let Err(e) = report::plot(dir, &name, &measured_samples) {
                eprintln!("# could not draw the charts: {e:#}");
            }
        }
        Ok(RunReport {
            label: label.to_owned(),
            load,
            figures,
            confirmed,
            failed,
            violations: checked.violations,
            costs: report_costs,
            samples: measured_samples,
            items,
        })
    }

    /// The highest open-loop rate whose p99 stays under `p99_limit_ms`
    /// (every answer as expected, and the rate actually achieved), found by
    /// doubling from `start` and then bisecting; each step lasts `step`.
    /// Returns the steps, the knee's index among them, and a run at half
    /// the knee.
    pub async fn find_knee(
        &mut self,
        start: f64,
        p99_limit_ms: f64,
        step: Duration,
    ) -> anyhow::Result<(Vec<RunReport>, Option<usize>, Option<RunReport>)> {
        let mut steps: Vec<RunReport> = Vec::new();
        let (mut good, mut bad): (Option<usize>, Option<f64>) = (None, None);
        let mut rate = start.max(1.0);
        for _ in 0..14 {
            let n = ((rate * step.as_secs_f64()) as usize).max(20);
            let warmup = (rate as usize).max(10);
            let r = self
                .run(
                    &format!("open {rate:.0}/s"),
                    Load::Open { rate },
                    warmup,
                    n,
                    false,
                )
                .await?;
            let achieved = r.figures.sagas_per_s >= 0.95 * rate;
            let ok = r.ok() && achieved && r.figures.p99_ms <= p99_limit_ms;
            eprintln!(
                "# {:>6.0}/s offered: {:.1}/s achieved, p50 {} ms, p99 {} ms, invariants {} → {}",
                rate,
                r.figures.sagas_per_s,
                r.figures.p50_ms,
                r.figures.p99_ms,
                if r.ok() { "ok" } else { "VIOLATED" },
                if ok {
                    "under the knee"
                } else {
                    "over the knee"
                }
            );
            steps.push(r);
            if ok {
                good = Some(steps.len() - 1);
            } else {
                bad = Some(rate);
            }
            let lo = good.map_or(0.0, |g| match steps[g].load {
                Load::Open { rate } => rate,
                Load::Closed { .. } => 0.0,
            });
            rate = match bad {
                None => rate * 2.0,
                Some(hi) if hi - lo <= (lo * 0.05).max(5.0) => break,
                Some(hi) if lo == 0.0 => hi / 2.0,
                Some(hi) => (lo + hi) / 2.0,
            };
        }
        let half = match good.map(|g| steps[g].load) {
            Some(Load::Open { rate }) => {
                let half = rate / 2.0;
                let n = ((half * step.as_secs_f64()) as usize).max(20);
                Some(
                    self.run(
                        &format!("half the knee {half:.0}/s"),
                        Load::Open { rate: half },
                        (half as usize).max(10),
                        n,
                        true,
                    )
                    .await?,
                )
            }
            _ => None,
        };
        Ok((steps, good, half))
    }
}

fn count(samples: &[Sample]) -> (usize, usize) {
    let confirmed = samples
        .iter()
        .filter(|s| s.result["status"] == "success")
        .count();
    (confirmed, samples.len() - confirmed)
}

fn progress(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>24} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Waits until no service queue holds a message ready for delivery, three
/// looks in a row (at most a minute).
async fn drained(amqp_url: &str) {
    let Ok(conn) = Connection::connect(amqp_url, ConnectionProperties::default()).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let names: Vec<String> = SERVICES
        .iter()
        .flat_map(|s| {
            std::iter::once(s.queue()).chain((0..RETRY_TIERS.len()).map(|t| s.retry_queue(t)))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < deadline {
        let mut ready = 0;
        for name in &names {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if let Ok(q) = ch
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
            {
                ready += q.message_count();
            }
        }
        quiet = if ready == 0 { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "done".into()).await;
}
