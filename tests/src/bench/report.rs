//! The figures of a run: latency percentiles, throughput, the summary table
//! and the charts (SVG: a latency histogram and throughput over time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use super::driver::Sample;

/// Latency and throughput of the measured orders.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub n: usize,
    pub elapsed: Duration,
    pub sagas_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The `p`-th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The figures of `samples` over the `elapsed` they took.
pub fn figures(samples: &[Sample], elapsed: Duration) -> Figures {
    let mut lat: Vec<f64> = samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    Figures {
        n: samples.len(),
        elapsed,
        sagas_per_s: round1(samples.len() as f64 / elapsed.as_secs_f64().max(1e-9)),
        p50_ms: round1(percentile(&lat, 50.0)),
        p95_ms: round1(percentile(&lat, 95.0)),
        p99_ms: round1(percentile(&lat, 99.0)),
        max_ms: round1(lat.last().copied().unwrap_or(0.0)),
    }
}

/// What a run cost.
#[derive(Debug, Clone, Default)]
pub struct Costs {
    pub cpu_ms_per_saga: BTreeMap<&'static str, f64>,
    pub commits_per_saga: Option<f64>,
    pub messages_per_saga: Option<f64>,
    pub deliveries_per_saga: Option<f64>,
    pub peak_rss_mib: BTreeMap<&'static str, f64>,
    pub settle: Duration,
}

impl Costs {
    /// CPU of the system itself (PostgreSQL, RabbitMQ, services), per saga.
    pub fn system_cpu_ms(&self) -> f64 {
        self.cpu_ms_per_saga
            .iter()
            .filter(|(k, _)| **k != "driver")
            .map(|(_, v)| v)
            .sum()
    }
}

/// The human summary printed before the JSON line.
pub fn table(
    title: &str,
    f: &Figures,
    confirmed: usize,
    failed: usize,
    costs: &Costs,
    ok: bool,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "┌─ {title}");
    let _ = writeln!(
        t,
        "│ sagas         {} in {:.2} s: {} sagas/s ({} confirmed, {} failed)",
        f.n,
        f.elapsed.as_secs_f64(),
        f.sagas_per_s,
        confirmed,
        failed
    );
    let _ = writeln!(
        t,
        "│ latency ms    p50 {}   p95 {}   p99 {}   max {}",
        f.p50_ms, f.p95_ms, f.p99_ms, f.max_ms
    );
    let cpu: Vec<String> = costs
        .cpu_ms_per_saga
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    let _ = writeln!(
        t,
        "│ CPU ms/saga   {:.2} for the system ({})",
        costs.system_cpu_ms(),
        cpu.join(", ")
    );
    let opt = |x: Option<f64>| x.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
    let _ = writeln!(
        t,
        "│ per saga      {} PostgreSQL commits, {} messages published, {} delivered",
        opt(costs.commits_per_saga),
        opt(costs.messages_per_saga),
        opt(costs.deliveries_per_saga)
    );
    let rss: Vec<String> = costs
        .peak_rss_mib
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    let _ = writeln!(t, "│ peak RSS MiB  {}", rss.join(", "));
    let _ = writeln!(
        t,
        "│ settled       {} ms after the last answer; invariants {}",
        costs.settle.as_millis(),
        if ok { "hold" } else { "VIOLATED" }
    );
    let _ = write!(t, "└─");
    t
}

/// Writes `<dir>/<name>-latency.svg` and `<dir>/<name>-throughput.svg`.
pub fn plot(dir: &Path, name: &str, samples: &[Sample]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut lat: Vec<f64> = samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let top = percentile(&lat, 99.9).max(1.0);
    let buckets = 60usize;
    let width = top / buckets as f64;
    let mut counts = vec![0u32; buckets + 1];
    for l in &lat {
        counts[((l / width) as usize).min(buckets)] += 1;
    }
    let path = dir.join(format!("{name}-latency.svg"));
    {
        let root = SVGBackend::new(&path, (800, 450)).into_drawing_area();
        root.fill(&WHITE)?;
        let ymax = counts.iter().copied().max().unwrap_or(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{name}: latency of {} sagas (p50 {:.1} ms, p99 {:.1} ms)",
                    lat.len(),
                    percentile(&lat, 50.0),
                    percentile(&lat, 99.0)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                0f64..top * (1.0 + 1.0 / buckets as f64),
                0u32..ymax + ymax / 10 + 1,
            )?;
        chart
            .configure_mesh()
            .x_desc("latency (ms); the last bar gathers everything above p99.9")
            .y_desc("sagas")
            .draw()?;
        chart.draw_series(counts.iter().enumerate().map(|(i, c)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0), (x0 + width, *c)], BLUE.mix(0.6).filled())
        }))?;
        root.present()?;
    }

    // Completions per 100 ms, over the run.
    let end = samples
        .iter()
        .map(|s| (s.started + s.latency).as_secs_f64())
        .fold(0.0, f64::max);
    let slots = ((end / 0.1).ceil() as usize).max(1);
    let mut done = vec![0u32; slots + 1];
    for s in samples {
        done[(((s.started + s.latency).as_secs_f64() / 0.1) as usize).min(slots)] += 1;
    }
    let per_s: Vec<(f64, f64)> = done
        .iter()
        .enumerate()
        .map(|(i, n)| (i as f64 * 0.1, f64::from(*n) * 10.0))
        .collect();
    let path = dir.join(format!("{name}-throughput.svg"));
    let root = SVGBackend::new(&path, (800, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = per_s.iter().map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: sagas completed per second"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..end.max(0.1), 0f64..ymax * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("time since the start (s), 100 ms bins")
        .y_desc("sagas/s")
        .draw()?;
    chart.draw_series(LineSeries::new(per_s, &RED))?;
    root.present()?;
    Ok(())
}
