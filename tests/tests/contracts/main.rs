//! The contracts as an outside party uses them.
//!
//! - Here: the Python client of `examples/python/place_order.py` (pika)
//!   places orders over AMQP against a running system and prints the result
//!   dicts.
//! - [`wire`]: every message a run of representative sagas publishes
//!   validates against the published JSON Schemas (`docs/schemas/`), with
//!   the AMQP properties and headers `docs/asyncapi.yaml` describes.
//! - [`asyncapi`]: `docs/asyncapi.yaml` lists every routing key and every
//!   producer and consumer, and the official AsyncAPI parser finds it valid.
//! - [`order_schema`]: `docs/schemas/order.requested.json` says what
//!   order-svc's validator does.
//! - [`schemas`]: loading the committed files into validators;
//! - [`openapi`]: each service's OpenAPI document is what its code
//!   generates and what it serves, and every documented operation answers
//!   in contract.

mod asyncapi;
mod openapi;
mod order_schema;
mod schemas;
mod wire;

use std::process::Command;

use saga_tests::{TestSystem, order_dict};
use serde_json::Value;

/// Runs the example client with `order`; its exit code and the replies it
/// printed.
async fn place_with_python(sys: &TestSystem, order: &Value, key: &str) -> (i32, Vec<Value>) {
    let dir = std::env::temp_dir().join(format!("saga-contract-{key}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("order.json");
    std::fs::write(&file, order.to_string()).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/place_order.py");
    let amqp_url = sys.amqp_url.clone();
    let key = key.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(&file)
            .env("AMQP_URL", amqp_url)
            .env("ORDER_KEY", key)
            .env("ORDER_TIMEOUT_SECS", "20")
            .output()
            .expect("python3 runs (scripts/test-deps.sh installs pika)")
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let replies = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        out.status.code().is_some(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), replies)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_places_orders_and_gets_their_result_dicts() {
    let sys = TestSystem::spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_price("productB", 700).await;
    sys.set_stock("productA", 10).await;
    sys.set_stock("productB", 10).await;
    sys.set_balance("poor", 100).await;

    let (code, replies) =
        place_with_python(&sys, &order_dict("py-user", &[("productA", 2)]), "py-1").await;
    assert_eq!(code, 0, "{replies:?}");
    let result = replies.last().expect("a result dict");
    assert_eq!(result["status"], "success", "{result}");
    let id = result["order_id"].as_str().unwrap();
    assert_eq!(sys.order(id).await["status"], "CONFIRMED");

    let (code, replies) =
        place_with_python(&sys, &order_dict("poor", &[("productA", 1)]), "py-2").await;
    assert_eq!(code, 1, "{replies:?}");
    let result = replies.last().expect("a result dict");
    assert_eq!(result["status"], "failure");
    assert_eq!(result["error"], "Payment failed");
    assert_eq!(result["reason"], "Insufficient funds");
    assert!(result["order_id"].is_string(), "{result}");
    sys.shutdown().await;
}
