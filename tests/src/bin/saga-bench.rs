//! Throughput and latency of the whole saga, on the peers' workload
//! (`../shared/peers/WORKLOAD.md`): 1,000 items and 10,000 customers, orders
//! of 2 random items with 1–3 units each at 10.00, 5 % from a customer with no
//! money, 5 % containing a sold-out item. Starts the four services as
//! processes (`saga-service`, next to this binary) in a fresh vhost and fresh
//! databases, places `N` orders over HTTP keeping `C` in flight, checks every
//! invariant, and prints one JSON line.
//!
//! Run with `scripts/bench.sh` (release build), e.g. `N=10000 C=64 scripts/bench.sh`.
//! `REPLICAS=2` runs two processes of each service.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use saga_tests::invariants::{self, Expected, Placed};
use saga_tests::process::ProcessSystem;
use saga_tests::{Svc, order_dict};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const ITEMS: usize = 1000;
const CUSTOMERS: usize = 10_000;
const STOCK: i64 = 1_000_000;
const BALANCE: i64 = 1_000_000_000_000;
const PRICE: i64 = 1000;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The `i`-th order of the mix.
fn order(i: usize) -> Value {
    let a = rand::random_range(0..ITEMS);
    let b = (a + rand::random_range(1..ITEMS)) % ITEMS;
    let item = |n: usize| format!("item-{n:04}");
    let (ia, ib) = (item(a), item(b));
    let q = || rand::random_range(1..=3);
    match i % 20 {
        0 => order_dict("cust-poor", &[(&ia, q()), (&ib, q())]),
        1 => order_dict(
            &format!("cust-{:04}", rand::random_range(0..CUSTOMERS)),
            &[(&ia, q()), ("sold-out", 1)],
        ),
        _ => order_dict(
            &format!("cust-{:04}", rand::random_range(0..CUSTOMERS)),
            &[(&ia, q()), (&ib, q())],
        ),
    }
}

/// CPU seconds (user + system) used so far by each process, by pid, for the
/// processes the saga runs on: RabbitMQ, PostgreSQL, the services.
fn cpu_by_process() -> HashMap<u32, (String, f64)> {
    let ticks = 100.0; // USER_HZ on Linux
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // comm is in parentheses and may contain spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let group = match comm {
            "beam.smp" => "rabbitmq",
            "postgres" => "postgresql",
            c if c.starts_with("saga-service") => "services",
            c if c.starts_with("saga-bench") => "load driver",
            _ => continue,
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
            continue;
        };
        let secs = (u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0)) / ticks;
        out.insert(pid, (group.to_owned(), secs));
    }
    out
}

/// CPU milliseconds per saga, by group, between two snapshots.
fn cpu_per_saga(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
    n: usize,
) -> String {
    let mut by_group: HashMap<&str, f64> = HashMap::new();
    for (pid, (group, secs)) in after {
        let start = before.get(pid).map_or(0.0, |b| b.1);
        *by_group.entry(group.as_str()).or_default() += secs - start;
    }
    let mut parts: Vec<String> = by_group
        .iter()
        .map(|(g, secs)| format!("{g} {:.1}", secs * 1000.0 / n as f64))
        .collect();
    parts.sort();
    format!("CPU ms per saga: {}", parts.join(", "))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    (sorted[rank] * 10.0).round() / 10.0
}

#[tokio::main]
async fn main() {
    let n = env_or("N", 10_000);
    let c = env_or("C", 64);
    let replicas = env_or("REPLICAS", 1);
    let bin = std::env::current_exe()
        .expect("exe")
        .with_file_name("saga-service");
    let layout: Vec<(Svc, usize)> = Svc::ALL.iter().map(|s| (*s, replicas)).collect();
    let sys = ProcessSystem::spawn(
        bin.to_str().expect("path"),
        &layout,
        &[
            ("DEFAULT_BALANCE_CENTS", &BALANCE.to_string()),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    eprintln!(
        "# services up ({replicas} replica(s) each); logs in {}",
        sys.log_dir.display()
    );

    // Seed: the catalog, the stock, the poor customer.
    let http = reqwest::Client::new();
    let (order_url, inventory_url, payment_url) = (
        sys.urls(Svc::Order)[0].clone(),
        sys.urls(Svc::Inventory)[0].clone(),
        sys.urls(Svc::Payment)[0].clone(),
    );
    let mut initial_stock: HashMap<String, i64> = (0..ITEMS)
        .map(|i| (format!("item-{i:04}"), STOCK))
        .collect();
    initial_stock.insert("sold-out".into(), 0);
    let seeds: Vec<_> = initial_stock
        .iter()
        .flat_map(|(item, stock)| {
            [
                (
                    format!("{order_url}/catalog/{item}"),
                    json!({"price_cents": PRICE}),
                ),
                (
                    format!("{inventory_url}/items/{item}"),
                    json!({"available": stock}),
                ),
            ]
        })
        .chain([(
            format!("{payment_url}/accounts/cust-poor"),
            json!({"balance_cents": 0}),
        )])
        .collect();
    for chunk in seeds.chunks(64) {
        join_all(chunk.iter().map(|(url, body)| {
            let http = http.clone();
            async move {
                let r = http.put(url).json(body).send().await.expect("seed");
                assert!(r.status().is_success(), "seeding {url}: {}", r.status());
            }
        }))
        .await;
    }

    // Drive: N orders, C in flight, round-robin over order-svc replicas.
    let order_urls = Arc::new(sys.urls(Svc::Order));
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let placed = Arc::new(Mutex::new(Vec::with_capacity(n)));
    eprintln!("# loadavg before: {}", loadavg());
    let cpu_before = cpu_by_process();
    let started = Instant::now();
    let workers: Vec<_> = (0..c)
        .map(|_| {
            let (http, urls, next, latencies, placed) = (
                http.clone(),
                order_urls.clone(),
                next.clone(),
                latencies.clone(),
                placed.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let body = order(i);
                    let key = format!("bench-{i}");
                    let t = Instant::now();
                    let result = loop {
                        let sent = http
                            .post(format!("{}/orders", urls[i % urls.len()]))
                            .header("Idempotency-Key", &key)
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(r) = sent
                            && r.status().is_success()
                            && let Ok(v) = r.json::<Value>().await
                        {
                            break v;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    };
                    latencies
                        .lock()
                        .await
                        .push(t.elapsed().as_secs_f64() * 1000.0);
                    placed.lock().await.push(Placed {
                        key,
                        over_http: true,
                        result: Some(result),
                    });
                }
            })
        })
        .collect();
    join_all(workers).await;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("# loadavg after:  {}", loadavg());
    eprintln!("# {}", cpu_per_saga(&cpu_before, &cpu_by_process(), n));

    let placed = placed.lock().await.clone();
    let mut lat = latencies.lock().await.clone();
    lat.sort_by(f64::total_cmp);
    let settled = invariants::wait_until_settled(&sys, &placed, Duration::from_secs(120)).await;
    let initial_balance = |c: &str| if c == "cust-poor" { 0 } else { BALANCE };
    let expected = Expected {
        initial_stock: &initial_stock,
        initial_balance: &initial_balance,
        parked: 0,
    };
    let (tally, violations) = invariants::check(&sys, &placed, &expected).await;
    for v in violations.iter().take(20) {
        eprintln!("# violation: {v}");
    }
    if let Err(e) = &settled {
        eprintln!("# {e}");
    }
    let line = json!({
        "system": "order-saga",
        "n": n,
        "concurrency": c,
        "replicas": replicas,
        "elapsed_s": (elapsed * 100.0).round() / 100.0,
        "sagas_per_s": ((n as f64 / elapsed) * 10.0).round() / 10.0,
        "p50_ms": percentile(&lat, 50.0),
        "p95_ms": percentile(&lat, 95.0),
        "p99_ms": percentile(&lat, 99.0),
        "confirmed": tally.confirmed,
        "failed": tally.failed,
        "invariants_ok": violations.is_empty() && settled.is_ok(),
    });
    let mut sys = sys;
    sys.stop_all().await;
    if line["invariants_ok"] == true {
        let _ = std::fs::remove_dir_all(&sys.log_dir);
    }
    println!("{line}");
}
