//! deploy/prometheus/ checked by promtool: the config, the rules, and the
//! rules' unit tests.

use std::collections::BTreeMap;
use std::process::Command;

use crate::{repo_file, run_ok, tool};

const CONFIG: &str = "deploy/prometheus/prometheus.yml";
const RULES: &str = "deploy/prometheus/rules/saga-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/rules/saga-alerts.test.yml";

#[test]
fn promtool_accepts_the_prometheus_config_and_the_rule_files_it_loads() {
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(repo_file(CONFIG)),
        "promtool check config",
    );
    // The glob must find the alerts (and not the unit tests beside them).
    assert!(out.contains("1 rule files found"), "{out}");
    assert!(out.contains("saga-alerts.yml"), "{out}");
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(repo_file(RULES)),
        "promtool check rules",
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_alert_unit_tests_pass() {
    let out = run_ok(
        Command::new(tool("promtool"))
            .args(["test", "rules"])
            .arg(repo_file(RULE_TESTS)),
        "promtool test rules",
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every alert has a unit test where it fires and one where it stays quiet
/// (read from the test file's `alertname:` / `exp_alerts:` lines).
#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let rules = std::fs::read_to_string(repo_file(RULES)).expect("read the rules");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 9, "alerts found: {alerts:?}");

    let tests = std::fs::read_to_string(repo_file(RULE_TESTS)).expect("read the tests");
    // alert -> (fires in some case, quiet in some case)
    let mut cases: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:").map(str::trim) else {
            continue;
        };
        let expectation = lines[i + 1..]
            .iter()
            .find(|l| l.starts_with("exp_alerts:"))
            .expect("exp_alerts after alertname");
        let entry = cases.entry(name).or_default();
        if expectation.trim_end() == "exp_alerts: []" {
            entry.1 = true;
        } else {
            entry.0 = true;
        }
    }
    for alert in &alerts {
        assert_eq!(
            cases.get(alert),
            Some(&(true, true)),
            "{alert}: needs a unit test where it fires and one where it does not (in {RULE_TESTS})"
        );
    }
    for name in cases.keys() {
        assert!(
            alerts.contains(name),
            "{RULE_TESTS} tests an unknown alert {name}"
        );
    }
}
