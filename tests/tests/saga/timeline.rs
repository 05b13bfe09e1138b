//! `GET /sagas/{order_id}`: one saga across all four services, merged at
//! read time from each service's own step log.

use saga_tests::{Svc, TestSystem, eventually, metric_sum, order_dict};
use serde_json::Value;

use crate::{SETTLE, stock_the_shop};

async fn saga(sys: &TestSystem, id: &str) -> (u16, Value) {
    let r = sys
        .http
        .get(format!("{}/sagas/{id}", sys.url(Svc::Order)))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `(service, event, outcome)` of every step, in order.
fn steps(view: &Value) -> Vec<(String, String, String)> {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["event"].as_str().unwrap().to_owned(),
                s["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has_step(view: &Value, service: &str, event: &str, outcome: &str) -> bool {
    steps(view)
        .iter()
        .any(|(s, e, o)| s == service && e == event && o == outcome)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_saga_shows_every_services_steps_in_order() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("tina", 100_000).await;
    let (_, result) = sys
        .post_order(&order_dict("tina", &[("productA", 2)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    let id = result["order_id"].as_str().unwrap();

    // inventory-svc commits the held stock once it hears the confirmation.
    let view = eventually(SETTLE, "the stock committed", || async {
        let (_, view) = saga(&sys, id).await;
        has_step(&view, "inventory-svc", "order.confirmed", "committed").then_some(view)
    })
    .await;
    assert_eq!(view["status"], "CONFIRMED");
    assert_eq!(view["result"]["status"], "success");
    assert_eq!(view["decision"]["outcome"], "confirmed");
    for service in [
        "order-svc",
        "payment-svc",
        "inventory-svc",
        "notification-svc",
    ] {
        assert_eq!(view["sources"][service], "ok", "{view}");
    }
    let order: Vec<(&str, &str, &str)> = vec![
        ("order-svc", "order.created", "ok"),
        ("payment-svc", "payment.completed", "charged"),
        ("inventory-svc", "inventory.reserved", "reserved"),
        ("notification-svc", "notification.sent", "sent"),
        ("order-svc", "order.confirmed", "ok"),
    ];
    let seen = steps(&view);
    let positions: Vec<usize> = order
        .iter()
        .map(|(s, e, o)| {
            seen.iter()
                .position(|x| x.0 == *s && x.1 == *e && x.2 == *o)
                .unwrap_or_else(|| panic!("no {s} {e} {o} in {seen:?}"))
        })
        .collect();
    assert!(positions.is_sorted(), "steps out of order: {seen:?}");
    let payment = &view["steps"][positions[1]];
    assert_eq!(payment["kind"], "action");
    assert_eq!(payment["detail"], "3000 USD");
    let mut last = 0;
    for s in view["steps"].as_array().unwrap() {
        let at = s["since_start_ms"].as_i64().unwrap();
        assert!(at >= last, "time goes forward: {view}");
        assert!(s["since_previous_ms"].as_i64().unwrap() >= 0);
        last = at;
    }
    assert!(view["duration_ms"].as_i64().unwrap() <= 5000);
    assert_eq!(view["emails"].as_array().unwrap().len(), 1);
    assert_eq!(view["emails"][0]["kind"], "confirmation");
    assert!(view["compensations"].as_array().unwrap().is_empty());
    assert!(
        !view.to_string().contains("tina@"),
        "no email address in the timeline"
    );
    let m = sys.metrics(Svc::Payment).await;
    for (service, step) in [
        ("payment-svc", "charge"),
        ("inventory-svc", "reserve_stock"),
        ("notification-svc", "send_confirmation"),
        ("inventory-svc", "commit_stock"),
    ] {
        for outcome in ["started", "succeeded"] {
            let labels = [("service", service), ("step", step), ("outcome", outcome)];
            assert!(
                metric_sum(&m, "saga_steps_total", &labels) >= 1.0,
                "{step} {outcome}"
            );
        }
    }
    // Read every few seconds from each service's tables.
    eventually(SETTLE, "the sampled gauges", || async {
        let m = sys.metrics(Svc::Order).await;
        ["outbox_backlog{", "escalations_open{", "sagas_undecided{"]
            .iter()
            .all(|g| m.contains(g))
            .then_some(())
    })
    .await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_saga_shows_its_decision_and_every_compensation_done() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("erin", 100_000).await;
    sys.set_email("erin", "erin@mailhost.invalid").await;
    let (_, result) = sys
        .post_order(&order_dict("erin", &[("productA", 1)]))
        .await;
    assert_eq!(result["error"], "Notification failed", "{result}");
    let id = result["order_id"].as_str().unwrap();

    let view = eventually(SETTLE, "both compensations done", || async {
        let (_, view) = saga(&sys, id).await;
        let done: Vec<&str> = view["compensations"]
            .as_array()?
            .iter()
            .filter(|c| c["state"] == "done")
            .filter_map(|c| c["step"].as_str())
            .collect();
        (done.contains(&"payment.refunded") && done.contains(&"inventory.released")).then_some(view)
    })
    .await;
    assert_eq!(view["status"], "FAILED");
    assert_eq!(view["decision"]["outcome"], "failed");
    assert_eq!(view["decision"]["failed_step"], "notification");
    assert_eq!(view["decision"]["error"], "Notification failed");
    assert!(has_step(
        &view,
        "notification-svc",
        "notification.failed",
        "bounced"
    ));
    assert!(has_step(
        &view,
        "payment-svc",
        "payment.refunded",
        "refunded"
    ));
    assert!(has_step(
        &view,
        "inventory-svc",
        "inventory.released",
        "released"
    ));
    assert!(has_step(&view, "order-svc", "order.failed", "failed"));
    assert!(view["emails"].as_array().unwrap().is_empty());
    let notification_steps: Vec<&Value> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == "notification-svc")
        .collect();
    assert!(
        !format!("{notification_steps:?}").contains('@'),
        "no address in notification-svc's steps: {notification_steps:?}"
    );
    assert!(
        view["compensations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "done"),
        "{view}"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_does_not_answer_is_named_and_order_svcs_record_stands_in() {
    let mut sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("uma", 100_000).await;
    let (_, result) = sys.post_order(&order_dict("uma", &[("productB", 1)])).await;
    let id = result["order_id"].as_str().unwrap().to_owned();
    sys.stop(Svc::Payment).await;

    let (status, view) = saga(&sys, &id).await;
    assert_eq!(status, 200, "{view}");
    assert!(
        view["sources"]["payment-svc"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{view}"
    );
    assert_eq!(view["sources"]["inventory-svc"], "ok");
    // What order-svc heard of the charge.
    assert!(
        has_step(&view, "payment-svc", "payment.completed", "ok"),
        "{view}"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_saga_is_404_and_a_malformed_id_400() {
    let sys = TestSystem::spawn().await;
    let (status, body) = saga(&sys, "0190f5c0-0000-7000-8000-000000000000").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no saga"));
    let (status, _) = saga(&sys, "not-a-uuid").await;
    assert_eq!(status, 400);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_choreography_is_served_with_its_diagram() {
    let sys = TestSystem::spawn().await;
    let (status, body) = saga(&sys, "choreography").await;
    assert_eq!(status, 200, "{body}");
    let reactions = body["reactions"].as_array().unwrap();
    let charge = reactions
        .iter()
        .find(|r| r["service"] == "payment-svc" && r["step"] == "charge")
        .expect("the charge is declared");
    assert_eq!(charge["undo"]["step"], "refund");
    assert!(body["mermaid"].as_str().unwrap().starts_with("flowchart"));
    assert_eq!(
        body["mermaid"].as_str().unwrap(),
        common::saga::choreography::mermaid()
    );
    sys.shutdown().await;
}
