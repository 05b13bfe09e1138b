//! The operations files, tested with the real tools: the Prometheus config,
//! alert rules and their unit tests (promtool), compose.yaml (Docker
//! Compose's own `config`, which needs no Docker engine), the Grafana
//! dashboard, and a real Prometheus scraping a test system with the shipped
//! alerts loaded.
//!
//! Needs `promtool`, `prometheus` and Docker Compose v2 on the machine:
//! `scripts/test-deps.sh` installs them. A missing tool fails the test.

mod compose;
mod dashboard;
mod promtool;
mod scrape;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_owned()
}

/// A file under the repository's root.
pub fn repo_file(rel: &str) -> PathBuf {
    let path = repo_root().join(rel);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A program on `PATH`, or a failure telling how to install it.
pub fn tool(name: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: run scripts/test-deps.sh (it installs the ops test's tools)"
        )
    })
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `cmd` to completion; fails with its output unless it exits 0.
/// Returns its standard output.
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Functions and aggregation operators: names followed by `(` are skipped
/// anyway, but aggregations may be followed by `by (…)`/`without (…)`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// PromQL keywords; those taking a label list are followed by `(…)`.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
];
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression reads (a small scanner: enough for
/// the expressions of this repository's rules and dashboards). Grafana
/// variables (`$__rate_interval`) are ignored.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_quoted = |mut i: usize, quote: char| -> usize {
        i += 1;
        while i < chars.len() && chars[i] != quote {
            if chars[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    let skip_until = |mut i: usize, close: char| -> usize {
        while i < chars.len() && chars[i] != close {
            if matches!(chars[i], '"' | '\'' | '`') {
                i = skip_quoted(i, chars[i]);
            } else {
                i += 1;
            }
        }
        i + 1
    };
    let next_non_space = |mut i: usize| -> usize {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_quoted(i, c);
        } else if c == '{' {
            i = skip_until(i, '}');
        } else if c == '[' {
            i = skip_until(i, ']');
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let lower = ident.to_ascii_lowercase();
            let next = next_non_space(i);
            let followed_by_paren = chars.get(next) == Some(&'(');
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if followed_by_paren {
                    i = skip_until(next, ')');
                }
            } else if KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.contains(&lower.as_str())
                || followed_by_paren
            {
                // Not a metric.
            } else {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Series Prometheus makes itself.
const BUILTIN_METRICS: &[&str] = &[
    "up",
    "ALERTS",
    "ALERTS_FOR_STATE",
    "scrape_duration_seconds",
];

/// The text of every Rust source file of the four services and `common`.
fn service_sources() -> &'static str {
    static SOURCES: OnceLock<String> = OnceLock::new();
    SOURCES.get_or_init(|| {
        fn walk(dir: &Path, out: &mut String) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && let Ok(text) = std::fs::read_to_string(&path)
                {
                    out.push_str(&text);
                    out.push('\n');
                }
            }
        }
        let mut out = String::new();
        for krate in [
            "common",
            "order-svc",
            "payment-svc",
            "inventory-svc",
            "notification-svc",
        ] {
            walk(&repo_root().join(krate).join("src"), &mut out);
        }
        assert!(
            out.contains("\"sagas_decided_total\""),
            "the services' sources were not found"
        );
        out
    })
}

/// Whether the services record a metric of this name (a histogram's
/// `_bucket`/`_sum`/`_count` series count as its name).
pub fn metric_is_recorded(name: &str) -> bool {
    if BUILTIN_METRICS.contains(&name) {
        return true;
    }
    let sources = service_sources();
    let recorded = |n: &str| sources.contains(&format!("\"{n}\""));
    recorded(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(recorded))
}

/// Fails listing every (where, metric) whose metric the services do not record.
pub fn assert_metrics_recorded<'a>(exprs: impl IntoIterator<Item = (String, &'a str)>) {
    let mut unknown = Vec::new();
    let mut seen = 0;
    for (place, expr) in exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in `{expr}`");
        for name in names {
            seen += 1;
            if !metric_is_recorded(&name) {
                unknown.push(format!("{place}: `{name}` in `{expr}`"));
            }
        }
    }
    assert!(seen > 0, "no expressions to check");
    assert!(
        unknown.is_empty(),
        "metrics that no service records (no string literal with the name in common/ or *-svc/src):\n{}",
        unknown.join("\n")
    );
}

#[test]
fn the_promql_scanner_finds_metric_names_only() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le) (rate(saga_duration_seconds_bucket{outcome="x"}[$__rate_interval]))) > 4"#
        ),
        ["saga_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "max by (job, instance) (broker_connected) == 0 or (up{job=~\"a|b\"} == 1 unless on (job, instance) broker_connected)"
        ),
        ["broker_connected", "up"]
    );
    assert_eq!(
        names(
            "sum by (kind) (x_total unless x_total offset 10m) / sum without(le)(rate(y_total[5m])) and z > 1e3"
        ),
        ["x_total", "y_total", "z"]
    );
    assert!(metric_is_recorded("saga_duration_seconds_bucket"));
    assert!(metric_is_recorded("up"));
    assert!(!metric_is_recorded("no_such_metric_total"));
}
