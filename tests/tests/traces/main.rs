//! OpenTelemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, one order
//! is one trace (its id the order id) across the four services, each
//! handling's span a child of the publish of the event it handled.
//!
//! A test binary of its own: the ops tests assert exact saga counters of
//! their process.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use saga_tests::{TestSystem, order_dict};
use serde_json::Value;

type Received = Arc<Mutex<Vec<Value>>>;

/// A collector that keeps what it receives.
async fn collector() -> (String, Received) {
    let received: Received = Arc::default();
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|State(r): State<Received>, body: Bytes| async move {
                let export: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                r.lock().unwrap().push(export);
                StatusCode::OK
            }),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// `(service, span)` of every span received.
fn spans(received: &Received) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for export in received.lock().unwrap().iter() {
        for rs in export["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or_default()
                .to_owned();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    all.push((service.clone(), span.clone()));
                }
            }
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn one_order_is_one_trace_across_the_four_services() {
    let (url, received) = collector().await;
    let sys = TestSystem::builder().otlp_endpoint(&url).spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("otto", 100_000).await;
    let (_, result) = sys
        .post_order(&order_dict("otto", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    let order_id = result["order_id"].as_str().unwrap().replace('-', "");
    sys.wait_for_stock("productA", (9, 0)).await;
    // Stopping flushes what the exporters hold.
    sys.shutdown().await;

    let trace: Vec<(String, Value)> = spans(&received)
        .into_iter()
        .filter(|(_, s)| s["traceId"] == order_id.as_str())
        .collect();
    let services: HashSet<&str> = trace.iter().map(|(svc, _)| svc.as_str()).collect();
    for svc in [
        "order-svc",
        "payment-svc",
        "inventory-svc",
        "notification-svc",
    ] {
        assert!(services.contains(svc), "no span of {svc}: {trace:#?}");
    }
    let names: HashSet<(&str, &str)> = trace
        .iter()
        .map(|(svc, s)| (svc.as_str(), s["name"].as_str().unwrap()))
        .collect();
    for expected in [
        ("order-svc", "order.created publish"),
        ("payment-svc", "order.created process"),
        ("payment-svc", "payment.completed publish"),
        ("inventory-svc", "payment.completed process"),
        ("notification-svc", "inventory.reserved process"),
        ("order-svc", "notification.sent process"),
        ("order-svc", "order.confirmed publish"),
        ("inventory-svc", "order.confirmed process"),
    ] {
        assert!(names.contains(&expected), "no {expected:?} in {names:?}");
    }
    // Each handling hangs under the publish of what it handled, and each
    // publish (but the first) under the handling that caused it.
    let by_id: HashMap<&str, &Value> = trace
        .iter()
        .map(|(_, s)| (s["spanId"].as_str().unwrap(), s))
        .collect();
    for (svc, s) in &trace {
        let name = s["name"].as_str().unwrap();
        if name == "order.created publish" {
            continue;
        }
        let parent = s["parentSpanId"].as_str().unwrap_or_default();
        let Some(p) = by_id.get(parent) else {
            panic!("{svc} {name}: parent {parent:?} is not in the trace");
        };
        let expected = if name.ends_with(" process") {
            name.replace(" process", " publish")
        } else {
            String::new()
        };
        if !expected.is_empty() {
            assert_eq!(p["name"], expected.as_str(), "{svc} {name}");
        }
    }
}
