//! Throughput and latency of the whole saga on the peers' workload
//! (`../shared/peers/WORKLOAD.md`). See `saga_tests::bench` and
//! docs/benchmarks.md.
//!
//! ```text
//! saga-bench --orders 10000 --concurrency 64          # a running system (ORDER_SVC_URL, …)
//! saga-bench --spawn --orders 10000 --concurrency 64  # starts its own (scripts/bench.sh)
//! saga-bench --rate 300 --entry amqp                   # open loop, order.requested
//! saga-bench --find-knee --plot target/bench           # highest rate with p99 < 250 ms
//! ```
//!
//! Prints a progress bar and a summary on stderr, and one JSON line last on
//! stdout, in the peers' shape plus `cpu_ms_per_saga`, `commits_per_saga`
//! and `messages_per_saga`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use saga_tests::Svc;
use saga_tests::bench::driver::{Client, Entry, Load};
use saga_tests::bench::target::Target;
use saga_tests::bench::{Bench, RunReport, report, workload};
use saga_tests::invariants::{self, Expected, Placed};
use saga_tests::process::ProcessSystem;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "saga-bench",
    about = "Benchmark of the order saga on the peers' workload"
)]
struct Args {
    /// Orders measured (after the warm-up).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    orders: usize,
    /// Orders in flight (closed loop).
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Open loop: orders started per second, on a fixed schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// Search the highest open-loop rate whose p99 stays under --knee-p99-ms,
    /// then measure at half of it (--rate: where the search starts).
    #[arg(long)]
    find_knee: bool,
    /// The p99 bound of --find-knee, in ms.
    #[arg(long, default_value_t = 250.0)]
    knee_p99_ms: f64,
    /// Length of each --find-knee step, in seconds.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// How orders enter the system.
    #[arg(long, value_enum, default_value_t = Entry::Http)]
    entry: Entry,
    /// Orders placed first and left out of the figures [default: N/10, at most 1000].
    #[arg(long)]
    warmup: Option<usize>,
    /// Write SVG charts (latency histogram, throughput over time) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Start the four services as processes in a fresh vhost and fresh
    /// databases (with --replicas of each) instead of using a running system.
    #[arg(long)]
    spawn: bool,
    /// Processes of each service, with --spawn.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// With --spawn: run on the local 3-node RabbitMQ cluster of
    /// `scripts/cluster-up.sh` (started first) instead of the local broker.
    #[arg(long)]
    cluster: bool,
    /// Seed of the order mix [default: random].
    #[arg(long)]
    seed: Option<u64>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut system = None;
    let target = if args.spawn {
        if args.cluster {
            saga_tests::use_broker_cluster(
                (1..=3)
                    .map(|i| format!("amqp://guest:guest@127.0.0.1:568{i}"))
                    .collect(),
                "http://127.0.0.1:15681".into(),
            );
        }
        let bin = std::env::current_exe()?.with_file_name("saga-service");
        let layout: Vec<(Svc, usize)> = Svc::ALL.iter().map(|s| (*s, args.replicas)).collect();
        let sys = ProcessSystem::spawn(
            bin.to_str().unwrap_or("saga-service"),
            &layout,
            &[("RUST_LOG", "warn")],
        )
        .await;
        eprintln!(
            "# services up ({} replica(s) each); logs in {}",
            args.replicas,
            sys.log_dir.display()
        );
        let target = Target::of(&sys);
        system = Some(sys);
        target
    } else {
        eprintln!(
            "# against the running system at {}",
            Target::from_env().order_urls.join(", ")
        );
        Target::from_env()
    };
    let entry = match args.entry {
        Entry::Http => "http",
        Entry::Amqp => "amqp",
    };
    let client = Client::new(args.entry, &target).await?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut bench = Bench::new(target, client, seed, args.plot.clone());
    eprintln!("# loadavg before: {}; seed {seed}", loadavg());

    let (line, ok) = if args.find_knee {
        let step = Duration::from_secs_f64(args.step_secs);
        let (steps, knee, half) = bench
            .find_knee(args.rate.unwrap_or(100.0), args.knee_p99_ms, step)
            .await?;
        let ok = steps.iter().all(RunReport::ok) && half.as_ref().is_none_or(RunReport::ok);
        let knee = knee.map(|k| &steps[k]);
        if let Some(h) = &half {
            eprintln!("{}", summary(h));
        }
        let mut line = knee.map_or_else(
            || json!({"system": "order-saga"}),
            |k| k.json(args.replicas, entry),
        );
        line["mode"] = json!("find-knee");
        line["knee_p99_limit_ms"] = json!(args.knee_p99_ms);
        line["knee_per_s"] = json!(knee.map(|k| match k.load {
            Load::Open { rate } => rate,
            Load::Closed { .. } => 0.0,
        }));
        if let Some(h) = &half {
            line["half_knee"] = h.json(args.replicas, entry);
        }
        line["invariants_ok"] = json!(ok);
        (line, ok)
    } else {
        let load = match args.rate {
            Some(rate) => Load::Open { rate },
            None => Load::Closed {
                concurrency: args.concurrency,
            },
        };
        let warmup = args.warmup.unwrap_or((args.orders / 10).min(1000));
        let label = match load {
            Load::Open { rate } => format!("open {rate}/s"),
            Load::Closed { concurrency } => format!("closed C={concurrency}"),
        };
        let mut run = bench.run(&label, load, warmup, args.orders, true).await?;
        // A system we started: also every invariant from its own databases.
        if let Some(sys) = &system {
            let placed: Vec<Placed> = run
                .samples
                .iter()
                .map(|s| Placed {
                    keyless: false,
                    key: s.key.clone(),
                    over_http: true,
                    result: Some(s.result.clone()),
                })
                .collect();
            let all = workload::initial_stock();
            let stock = run
                .items
                .iter()
                .map(|i| (i.clone(), all.get(i).copied().unwrap_or(0)))
                .collect();
            let balance = workload::initial_balance;
            if let Err(e) =
                invariants::wait_until_settled(sys, &placed, Duration::from_secs(60)).await
            {
                run.violations.push(e);
            }
            let expected = Expected {
                initial_stock: &stock,
                initial_balance: &balance,
                parked: 0,
                relay: None,
            };
            let (_, violations) = invariants::check(sys, &[], &expected).await;
            run.violations.extend(violations);
        }
        eprintln!("{}", summary(&run));
        let ok = run.ok();
        (run.json(args.replicas, entry), ok)
    };
    eprintln!("# loadavg after:  {}", loadavg());
    if let Some(mut sys) = system {
        sys.stop_all().await;
        if ok {
            let _ = std::fs::remove_dir_all(&sys.log_dir);
        }
    }
    println!("{line}");
    Ok(())
}

fn summary(r: &RunReport) -> String {
    let mut s = report::table(
        &r.label,
        &r.figures,
        r.confirmed,
        r.failed,
        &r.costs,
        r.ok(),
    );
    for v in r.violations.iter().take(20) {
        s.push_str(&format!("\n# violation: {v}"));
    }
    s
}
