//! The Grafana dashboard: valid JSON, well-formed panels, and every query
//! reads metrics the services record.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::{assert_metrics_recorded, metric_names, repo_file};

pub const DASHBOARD: &str = "deploy/grafana/dashboards/saga.json";

pub fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_file(DASHBOARD)).expect("read the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (place, PromQL) of every panel target and annotation query.
pub fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((
                    format!("panel {:?} {}", panel["title"], target["refId"]),
                    expr.to_owned(),
                ));
            }
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            out.push((
                format!("annotation {:?}", annotation["name"]),
                expr.to_owned(),
            ));
        }
    }
    out
}

#[test]
fn the_dashboard_is_valid_and_queries_recorded_metrics_only() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "order-saga");
    assert!(dash["title"].is_string());

    let mut ids = BTreeSet::new();
    let mut graphs = 0;
    for panel in panels(&dash) {
        let title = &panel["title"];
        assert!(
            panel["id"].as_u64().is_some_and(|id| ids.insert(id)),
            "panel {title}: missing or duplicate id"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "panel {title}: gridPos.{key}"
            );
        }
        if panel["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title}: data source"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "panel {title}: empty query"
            );
        }
    }
    assert!(graphs >= 10, "only {graphs} panels");

    // The data source variable defaults to the provisioned data source.
    let variable = &dash["templating"]["list"][0];
    assert_eq!(variable["name"], "datasource");
    assert_eq!(variable["current"]["value"], "prometheus");

    let queries = queries(&dash);
    assert_metrics_recorded(
        queries
            .iter()
            .map(|(place, expr)| (place.clone(), expr.as_str())),
    );

    // The key metrics each have a panel.
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    for metric in [
        "sagas_started_total",
        "sagas_decided_total",
        "saga_duration_seconds_bucket",
        "sagas_undecided",
        "outbox_backlog",
        "messages_parked_total",
        "escalations_open",
        "saga_invariant_violations_total",
        "broker_connected",
        "message_handling_seconds_bucket",
        "up",
    ] {
        assert!(used.contains(metric), "no panel shows {metric}");
    }
}
