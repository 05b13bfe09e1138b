//! What a run costs, measured rather than estimated: CPU by component (from
//! `/proc`), each service's peak resident memory, PostgreSQL write
//! transactions (transaction ids the server assigned) and RabbitMQ messages
//! (the management API's counters for the vhost).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use sqlx::Connection as _;

use super::target::Target;

/// CPU seconds used so far, by pid: (component, seconds).
pub type CpuSnapshot = HashMap<u32, (&'static str, f64)>;

/// The service a process runs, from its command line, if it is one.
fn service_of(pid: u32, comm: &str) -> Option<&'static str> {
    const NAMES: [&str; 4] = [
        "order-svc",
        "payment-svc",
        "inventory-svc",
        "notification-svc",
    ];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let exe = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned());
    let name = if comm.starts_with("saga-service") {
        args.get(1).cloned()
    } else {
        exe
    }?;
    NAMES.into_iter().find(|n| *n == name)
}

/// Which component a process belongs to.
fn component(pid: u32, comm: &str) -> Option<&'static str> {
    match comm {
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => Some("rabbitmq"),
        "postgres" => Some("postgresql"),
        c if c.starts_with("saga-bench") => Some("driver"),
        c => service_of(pid, c).map(|_| "services"),
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// (comm, fields after it) of `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may contain spaces.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let fields = stat[close + 2..].split(' ').map(str::to_owned).collect();
    Some((comm, fields))
}

/// Every process on the machine: (pid, comm, CPU seconds, user + system,
/// used so far).
pub fn processes() -> Vec<(u32, String, f64)> {
    let ticks = 100.0; // USER_HZ on Linux
    pids()
        .into_iter()
        .filter_map(|pid| {
            let (comm, fields) = stat(pid)?;
            let used: f64 = [fields.get(11)?, fields.get(12)?]
                .iter()
                .map(|f| f.parse::<f64>().unwrap_or(0.0))
                .sum();
            Some((pid, comm, used / ticks))
        })
        .collect()
}

/// CPU (user + system) used so far by every process of the system.
pub fn cpu() -> CpuSnapshot {
    processes()
        .into_iter()
        .filter_map(|(pid, comm, secs)| Some((pid, (component(pid, &comm)?, secs))))
        .collect()
}

/// CPU milliseconds per saga by component between two snapshots.
pub fn cpu_per_saga(
    before: &CpuSnapshot,
    after: &CpuSnapshot,
    sagas: usize,
) -> BTreeMap<&'static str, f64> {
    let mut by: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (pid, (group, secs)) in after {
        let start = before.get(pid).map_or(0.0, |b| b.1);
        *by.entry(group).or_default() += (secs - start).max(0.0) * 1000.0 / sagas.max(1) as f64;
    }
    by
}

/// The services' processes: the ones the benchmark started, or those
/// found running.
fn service_pids(target: &Target) -> Vec<(u32, &'static str)> {
    match &target.pids {
        Some(p) => p.clone(),
        None => pids()
            .into_iter()
            .filter_map(|pid| {
                let (comm, _) = stat(pid)?;
                Some((pid, service_of(pid, &comm)?))
            })
            .collect(),
    }
}

/// Starts each service's peak resident memory afresh (writing `5` to
/// `/proc/<pid>/clear_refs`), so that [`peak_rss_mib`] tells the peak of
/// the run that follows rather than of the process's whole life (a
/// `--find-knee` search overloads the system before its run at half the
/// knee). Where that is not allowed (another user's process), the peak
/// stays the lifetime one.
pub fn reset_peak_rss(target: &Target) {
    for (pid, _) in service_pids(target) {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// Peak resident memory (`VmHWM`) of each service, in MiB (the largest
/// replica's), since the process started or [`reset_peak_rss`].
pub fn peak_rss_mib(target: &Target) -> BTreeMap<&'static str, f64> {
    let mut out: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (pid, svc) in service_pids(target) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let e = out.entry(svc).or_default();
        *e = e.max(kib / 1024.0);
    }
    out
}

/// Write transactions started so far on the server: the next transaction
/// id it will assign. Only a transaction that writes gets one, and each such
/// commit waits for its WAL flush — the cost the figure is for; the
/// read-only ones (the checks' queries, a GET) flush nothing and are not
/// counted. Read from the server's transaction counter rather than from
/// `pg_stat_database.xact_commit`, whose per-backend counts reach the
/// statistics late (up to a minute when many backends flush at once: a run
/// after a busy check phase took in tens of thousands of earlier
/// commits). The counter is the whole server's: on a shared server, other
/// tenants' writes during the run count too.
pub async fn pg_commits(target: &Target) -> Option<i64> {
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::PgConnection::connect(&target.pg),
    )
    .await
    .ok()?
    .ok()?;
    let n: Option<i64> =
        sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut conn)
            .await
            .ok();
    let _ = conn.close().await;
    n
}

/// Messages published into the vhost so far and deliveries out of it, from
/// the management API (its counters refresh every few seconds).
pub async fn rabbit_messages(http: &reqwest::Client, target: &Target) -> Option<(f64, f64)> {
    let (base, user, pass, vhost) = &target.mgmt;
    let vhost: String = vhost
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let v: Value = http
        .get(format!("{base}/api/vhosts/{vhost}"))
        .basic_auth(user, Some(pass))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let stats = &v["message_stats"];
    Some((
        stats["publish"].as_f64().unwrap_or(0.0),
        stats["deliver_get"].as_f64().unwrap_or(0.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process, as if it were one of the system's services.
    fn this_process() -> Target {
        Target {
            order_urls: Vec::new(),
            payment_url: String::new(),
            inventory_url: String::new(),
            notification_url: String::new(),
            amqp_url: String::new(),
            mgmt: Default::default(),
            pg: String::new(),
            pids: Some(vec![(std::process::id(), "order-svc")]),
        }
    }

    #[test]
    fn a_peak_started_afresh_forgets_what_came_before() {
        let target = this_process();
        // 96 MiB written (so resident), then given back to the system.
        let block = vec![1u8; 96 << 20];
        std::hint::black_box(&block);
        drop(block);
        let lifetime = peak_rss_mib(&target)["order-svc"];
        assert!(lifetime >= 96.0, "peak {lifetime} MiB");

        reset_peak_rss(&target);
        let fresh = peak_rss_mib(&target)["order-svc"];
        assert!(
            fresh < lifetime - 64.0,
            "peak {fresh} MiB after the reset, {lifetime} MiB before"
        );
    }
}
