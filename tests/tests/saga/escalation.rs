//! A compensation that keeps failing is escalated, and an operator can retry
//! it once the cause is fixed.

use std::time::Duration;

use saga_tests::{Svc, TestSystem, eventually, metric_sum, order_dict};
use serde_json::{Value, json};

use crate::SETTLE;

#[tokio::test(flavor = "multi_thread")]
async fn a_refund_that_keeps_failing_is_escalated_then_applied_once_when_an_operator_retries_it() {
    // Inventory is down, so the saga times out after the charge.
    let sys = TestSystem::builder()
        .deadline_ms(2000)
        .retry_max_attempts(3)
        .without(Svc::Inventory)
        .spawn()
        .await;
    sys.set_price("productA", 1500).await;
    sys.set_balance("ivy", 10_000).await;

    let order = order_dict("ivy", &[("productA", 2)]);
    let placing = tokio::spawn({
        let http = sys.http.clone();
        let url = format!("{}/orders", sys.url(Svc::Order));
        async move {
            http.post(url)
                .json(&order)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    // Once charged, the customer's account is frozen: the refund cannot land.
    eventually(SETTLE, "the charge", || async {
        (sys.balance("ivy").await? == 7000).then_some(())
    })
    .await;
    sys.put(
        Svc::Payment,
        "/accounts/ivy",
        json!({"balance_cents": 7000, "frozen": true}),
    )
    .await;

    let result = placing.await.unwrap();
    assert_eq!(result["error"], "Order timed out");

    // 3 attempts (200 ms and 1 s apart), then escalated — not parked. Both
    // rollback events (order.cancelled and order.failed) try to refund, so
    // one or two escalations open.
    let escalations = eventually(SETTLE, "the escalation", || async {
        let list = sys
            .get(Svc::Payment, "/admin/escalations?status=open")
            .await?;
        (!list.as_array()?.is_empty()).then_some(list)
    })
    .await;
    let e = &escalations[0];
    assert_eq!(e["step"], "refund");
    assert_eq!(e["attempts"], 3);
    assert!(e["last_error"].as_str().unwrap().contains("frozen"), "{e}");
    assert!(e["routing_key"] == "order.cancelled" || e["routing_key"] == "order.failed");
    let order_id = e["order_id"].as_str().unwrap().to_owned();
    assert_eq!(sys.payment(&order_id).await.unwrap()["status"], "charged");
    assert_eq!(sys.balance("ivy").await, Some(7000));
    let m = sys.metrics(Svc::Payment).await;
    assert!(
        m.contains("compensations_escalated_total{service=\"payment-svc\",step=\"refund\"}"),
        "{m}"
    );
    // The operator finds it: stuck, its refund escalated.
    let stuck = eventually(SETTLE, "the saga listed as stuck", || async {
        let list = sys.get(Svc::Order, "/sagas?stuck=true").await?;
        list["sagas"]
            .as_array()?
            .iter()
            .find(|s| s["order_id"] == order_id.as_str())
            .cloned()
    })
    .await;
    assert_eq!(
        stuck["stuck_reason"],
        "compensation not done: failed_not_refunded"
    );
    let violations = sys.get(Svc::Order, "/sagas/violations").await.unwrap();
    assert_eq!(violations["violations"][0]["order_id"], order_id.as_str());
    assert_eq!(violations["violations"][0]["kind"], "failed_not_refunded");
    // Counters only, and at least: metrics are shared by every test
    // system in this process.
    let m = sys.metrics(Svc::Order).await;
    let kind = [("kind", "failed_not_refunded")];
    assert!(
        metric_sum(&m, "saga_invariant_violations_total", &kind) >= 1.0,
        "{m}"
    );
    let escalated = [
        ("service", "payment-svc"),
        ("step", "refund"),
        ("outcome", "escalated"),
    ];
    assert!(metric_sum(&m, "saga_steps_total", &escalated) >= 1.0, "{m}");
    let view = sys
        .get(Svc::Order, &format!("/sagas/{order_id}"))
        .await
        .unwrap();
    let refund = view["compensations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service"] == "payment-svc")
        .unwrap_or_else(|| panic!("no refund in {view}"));
    assert_eq!(refund["state"], "escalated", "{view}");

    // The cause is fixed; the operator retries.
    sys.put(
        Svc::Payment,
        "/accounts/ivy",
        json!({"balance_cents": 7000, "frozen": false}),
    )
    .await;
    let id = e["id"].as_str().unwrap();
    let retry = sys
        .http
        .post(format!(
            "{}/admin/escalations/{id}/retry",
            sys.url(Svc::Payment)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 202);

    eventually(SETTLE, "the refund and the escalation resolved", || async {
        let list = sys
            .get(Svc::Payment, "/admin/escalations?status=resolved")
            .await?;
        let resolved = list.as_array()?.iter().any(|x| x["id"] == id);
        (resolved && sys.payment(&order_id).await?["status"] == "refunded").then_some(())
    })
    .await;
    assert_eq!(sys.balance("ivy").await, Some(10_000));
    // The other rollback event (order.failed / order.cancelled) may have been
    // escalated too; retrying it must not refund twice.
    for other in sys
        .get(Svc::Payment, "/admin/escalations?status=open")
        .await
        .unwrap()
        .as_array()
        .unwrap()
    {
        let id = other["id"].as_str().unwrap();
        sys.http
            .post(format!(
                "{}/admin/escalations/{id}/retry",
                sys.url(Svc::Payment)
            ))
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sys.balance("ivy").await, Some(10_000));
    let again = sys
        .http
        .post(format!(
            "{}/admin/escalations/{id}/retry",
            sys.url(Svc::Payment)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "a resolved escalation is not retried");
    // Refunded: the reconciler resolves its finding; no longer stuck.
    eventually(SETTLE, "the finding resolved", || async {
        let list = sys.get(Svc::Order, "/sagas?stuck=true").await?;
        list["sagas"].as_array()?.is_empty().then_some(())
    })
    .await;
    let all = sys
        .get(Svc::Order, "/sagas/violations?all=true")
        .await
        .unwrap();
    assert!(!all["violations"][0]["resolved_at"].is_null(), "{all}");
    sys.shutdown().await;
}
