//! A real Prometheus scrapes a test system, with the shipped alert rules
//! loaded: the saga counters arrive, every target is up, every rule
//! evaluates without error and none fires on a healthy run, and every
//! dashboard query is valid PromQL.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use saga_tests::{Svc, TestSystem, order_dict};
use serde_json::Value;
use uuid::Uuid;

use crate::{assert_metrics_recorded, dashboard, repo_file, tool};

const JOBS: [(Svc, &str); 4] = [
    (Svc::Order, "order-svc"),
    (Svc::Payment, "payment-svc"),
    (Svc::Inventory, "inventory-svc"),
    (Svc::Notification, "notification-svc"),
];

/// A Prometheus process in a temporary directory of its own; killed and the
/// directory removed on drop (also when the test fails).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    base_url: String,
}

impl Prometheus {
    /// Starts `prometheus` on a free loopback port with `config` (YAML).
    fn start(config: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = std::env::temp_dir().join(format!(
            "saga-ops-prometheus-{}-{}",
            std::process::id(),
            Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("data")).expect("create the temporary directory");
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let port = free_port();
        let child = Command::new(bin)
            .current_dir(&dir)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("cannot start prometheus: {e}");
            }
        };
        Prometheus {
            child,
            dir,
            base_url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Polls `check` every 200 ms until it returns `Some`; fails after
    /// `timeout` with `what`, the last state seen and Prometheus's log.
    async fn wait_for<T, F, Fut>(&self, timeout: Duration, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check().await {
                Ok(v) => return v,
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last: {last}\n--- prometheus log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn api(
        &self,
        http: &reqwest::Client,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base_url), params)
            .map_err(|e| e.to_string())?;
        let r = http.get(url).send().await.map_err(|e| e.to_string())?;
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{path} {params:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query: (labels, value) of each series.
    async fn query(
        &self,
        http: &reqwest::Client,
        promql: &str,
    ) -> Result<Vec<(Value, f64)>, String> {
        let data = self
            .api(http, "/api/v1/query", &[("query", promql)])
            .await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), value)
            })
            .collect())
    }

    /// Waits until `promql` has exactly one series, of value `expected`.
    async fn wait_for_value(&self, http: &reqwest::Client, promql: &str, expected: f64) {
        self.wait_for(
            Duration::from_secs(20),
            &format!("{promql} == {expected}"),
            || async {
                let result = self.query(http, promql).await?;
                match result.as_slice() {
                    [(_, v)] if *v == expected => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// host:port of a base URL.
fn host_port(base_url: &str) -> &str {
    base_url
        .strip_prefix("http://")
        .unwrap_or(base_url)
        .trim_end_matches('/')
}

fn prometheus_config(system: &TestSystem, rules: &Path) -> String {
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules:?}\n\
         scrape_configs:\n"
    );
    for (svc, job) in JOBS {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [\"{}\"]\n",
            host_port(system.url(svc))
        ));
    }
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_saga_and_evaluates_the_shipped_alerts() {
    let rules = repo_file("deploy/prometheus/rules/saga-alerts.yml");
    tool("prometheus");
    let sys = TestSystem::spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("ops-rich", 1_000_000).await;
    sys.set_balance("ops-poor", 100).await;

    for _ in 0..3 {
        let (status, result) = sys
            .post_order(&order_dict("ops-rich", &[("productA", 1)]))
            .await;
        assert_eq!(status, 200, "{result}");
        assert_eq!(result["status"], "success", "{result}");
    }
    let (_, result) = sys
        .post_order(&order_dict("ops-poor", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "failure", "{result}");
    assert_eq!(result["reason"], "Insufficient funds", "{result}");

    let prometheus = Prometheus::start(&prometheus_config(&sys, &rules));
    let http = reqwest::Client::new();
    prometheus
        .wait_for(
            Duration::from_secs(15),
            "prometheus to be ready",
            || async {
                let r = http
                    .get(format!("{}/-/ready", prometheus.base_url))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(r.status().to_string())
                }
            },
        )
        .await;

    // Every job's one target is up.
    prometheus
        .wait_for(
            Duration::from_secs(15),
            "up == 1 for the four jobs",
            || async {
                let up = prometheus.query(&http, "up").await?;
                let ok = JOBS.iter().all(|(_, job)| {
                    up.iter()
                        .filter(|(m, _)| m["job"] == *job)
                        .map(|(_, v)| *v)
                        .eq([1.0])
                });
                if ok && up.len() == JOBS.len() {
                    Ok(())
                } else {
                    Err(format!("{up:?}"))
                }
            },
        )
        .await;

    // The saga counters, as order-svc reports them. (The four services share
    // one recorder in this process, so every job reports the same
    // counters: look at order-svc's.)
    prometheus
        .wait_for_value(&http, r#"sum(sagas_started_total{job="order-svc"})"#, 4.0)
        .await;
    prometheus
        .wait_for_value(
            &http,
            r#"sum(sagas_decided_total{job="order-svc",outcome="confirmed"})"#,
            3.0,
        )
        .await;
    prometheus
        .wait_for_value(
            &http,
            r#"sum(sagas_decided_total{job="order-svc",outcome="failed"})"#,
            1.0,
        )
        .await;
    prometheus
        .wait_for_value(
            &http,
            r#"sum(sagas_decided_total{job="order-svc",outcome="failed",failed_step="payment"})"#,
            1.0,
        )
        .await;
    prometheus
        .wait_for_value(
            &http,
            r#"sum(saga_duration_seconds_count{job="order-svc"})"#,
            4.0,
        )
        .await;

    // Every shipped rule has been evaluated against the real series
    // without error.
    let rules = prometheus
        .wait_for(Duration::from_secs(15), "every rule evaluated", || async {
            let data = prometheus.api(&http, "/api/v1/rules", &[]).await?;
            let rules: Vec<Value> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let pending: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if rules.is_empty() || !pending.is_empty() {
                Err(format!("not ok: {pending:?}"))
            } else {
                Ok(rules)
            }
        })
        .await;
    let alerts_doc = std::fs::read_to_string(repo_file("docs/alerts.md")).expect("docs/alerts.md");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or_default();
        assert_eq!(rule["type"], "alerting", "{name}");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|a| !a.is_empty()),
                "{name}: no {annotation} annotation"
            );
        }
        let description = rule["annotations"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(
            description.contains("sagactl") && description.contains("docs/alerts.md#"),
            "{name}: the description names no runbook command: {description}"
        );
        let anchor = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        assert_eq!(
            anchor,
            format!("docs/alerts.md#{}", name.to_lowercase()),
            "{name}"
        );
        assert!(
            alerts_doc.contains(&format!("## {name}")),
            "docs/alerts.md has no section for {name}"
        );
    }
    assert_metrics_recorded(rules.iter().map(|r| {
        (
            format!("alert {}", r["name"]),
            r["query"].as_str().unwrap_or_default(),
        )
    }));

    // A healthy run raises no alert.
    let firing = prometheus
        .query(&http, r#"ALERTS{alertstate="firing"}"#)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        firing.is_empty(),
        "alerts fire on a healthy run: {firing:?}"
    );

    // Every dashboard query is valid PromQL (Grafana's variables replaced).
    for (place, expr) in dashboard::queries(&dashboard::dashboard()) {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1s")
            .replace("$__range", "1m");
        let result = prometheus.query(&http, &promql).await;
        assert!(result.is_ok(), "{place}: {promql}: {result:?}");
    }

    drop(prometheus);
    sys.shutdown().await;
}
