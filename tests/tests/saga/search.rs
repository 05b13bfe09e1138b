//! `GET /sagas`: recent sagas, newest first, filtered.

use saga_tests::{Svc, TestSystem, order_dict};
use serde_json::Value;

use crate::stock_the_shop;

async fn search(sys: &TestSystem, query: &str) -> (u16, Value) {
    let r = sys
        .http
        .get(format!("{}/sagas{query}", sys.url(Svc::Order)))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn ids(found: &Value) -> Vec<String> {
    found["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["order_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn recent_sagas_are_listed_newest_first_and_filtered() {
    let sys = TestSystem::spawn().await;
    stock_the_shop(&sys).await;
    sys.set_balance("poor", 100).await;
    let mut placed = Vec::new();
    for customer in ["s1", "poor", "s1"] {
        let (_, result) = sys
            .post_order(&order_dict(customer, &[("productA", 1)]))
            .await;
        placed.push(result["order_id"].as_str().unwrap().to_owned());
    }

    let (status, all) = search(&sys, "").await;
    assert_eq!(status, 200, "{all}");
    let newest_first: Vec<String> = placed.iter().rev().cloned().collect();
    assert_eq!(ids(&all), newest_first);
    let failed = &all["sagas"][1];
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["error"], "Payment failed");
    assert_eq!(failed["reason"], "Insufficient funds");
    assert_eq!(failed["stuck"], false);
    assert!(failed["duration_ms"].as_i64().unwrap() >= 0);
    assert_eq!(all["sagas"][0]["status"], "CONFIRMED");

    let (_, found) = search(&sys, "?status=failed").await;
    assert_eq!(ids(&found), [placed[1].clone()]);
    let (_, found) = search(&sys, "?status=CONFIRMED&limit=1").await;
    assert_eq!(ids(&found), [placed[2].clone()]);
    let (_, found) = search(&sys, "?since=2999-01-01T00:00:00Z").await;
    assert!(ids(&found).is_empty());
    let (_, found) = search(&sys, "?stuck=true").await;
    assert!(
        ids(&found).is_empty(),
        "nothing is undecided past its deadline"
    );

    for bad in [
        "?status=LOST",
        "?limit=0",
        "?limit=501",
        "?since=yesterday",
        "?colour=red",
    ] {
        let (status, body) = search(&sys, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    sys.shutdown().await;
}
