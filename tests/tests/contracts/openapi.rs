//! The HTTP contract: the OpenAPI documents.
//!
//! - The committed `docs/openapi/<service>.json` are what the code generates
//!   (regenerate them with `scripts/write-contracts.sh`, which sets
//!   `UPDATE_CONTRACTS=1` for `committed_openapi_documents_match_the_code`).
//! - Each service serves its document at `GET /openapi.json`, without a
//!   token.
//! - Every documented operation of every service is called, on its success
//!   and its error paths, and every answer is in contract (its status
//!   documented, its body valid against the documented schema) — the
//!   harness's helpers check the same for every other test.

use std::collections::BTreeSet;

use saga_tests::openapi::{check, committed_path, document, path_template};
use saga_tests::{Svc, TestSystem, Tokens, order_dict, order_with_card};
use serde_json::{Value, json};
use uuid::Uuid;

#[test]
fn committed_openapi_documents_match_the_code() {
    let update = std::env::var("UPDATE_CONTRACTS").is_ok_and(|v| v == "1");
    for svc in Svc::ALL {
        let generated = common::runtime::openapi::to_committed_json(&document(svc)).unwrap();
        let path = committed_path(svc);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from what the code generates: run \
             `scripts/write-contracts.sh` and commit it",
            path.display()
        );
    }
}

#[test]
fn documents_are_openapi_3_1_with_both_bearer_tokens() {
    for svc in Svc::ALL {
        let doc = serde_json::to_value(document(svc)).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], svc.identity().name);
        let schemes = &doc["components"]["securitySchemes"];
        for scheme in ["api_token", "admin_token"] {
            assert_eq!(schemes[scheme]["type"], "http", "{scheme}");
            assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
        }
        // What the middleware decides, the document says.
        assert_eq!(doc["paths"]["/health"]["get"].get("security"), None);
        let escalations = &doc["paths"]["/admin/escalations"]["get"];
        assert_eq!(escalations["security"], json!([{"admin_token": []}]));
        assert!(escalations["responses"]["403"].is_object());
    }
    let order = serde_json::to_value(document(Svc::Order)).unwrap();
    let place = &order["paths"]["/orders"]["post"];
    assert_eq!(
        place["security"],
        json!([{"api_token": []}, {"admin_token": []}])
    );
    for status in ["200", "202", "400", "401", "409", "413", "415", "503"] {
        assert!(
            place["responses"][status].is_object(),
            "POST /orders {status}"
        );
    }
    assert_eq!(
        place["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/OrderRequest"
    );
}

/// utoipa takes limits as literals: they must be the validators' constants.
#[test]
fn documented_limits_are_the_validators_limits() {
    use common::saga::order::{MAX_ID_LEN, MAX_ITEMS, MAX_QUANTITY};
    let schemas =
        |svc| serde_json::to_value(document(svc)).unwrap()["components"]["schemas"].clone();
    let order = schemas(Svc::Order);
    let request = &order["OrderRequest"]["properties"];
    assert_eq!(request["customer_id"]["maxLength"], json!(MAX_ID_LEN));
    assert_eq!(request["items"]["maxItems"], json!(MAX_ITEMS));
    let item = &order["OrderRequestItem"]["properties"];
    assert_eq!(item["item_id"]["maxLength"], json!(MAX_ID_LEN));
    assert_eq!(item["quantity"]["maximum"], json!(MAX_QUANTITY));
    assert_eq!(
        order["Price"]["properties"]["price_cents"]["maximum"],
        json!(order_svc::domain::MAX_PRICE_CENTS)
    );
    assert_eq!(
        schemas(Svc::Inventory)["ItemBody"]["properties"]["available"]["maximum"],
        json!(inventory_svc::domain::MAX_STOCK)
    );
    assert_eq!(
        schemas(Svc::Payment)["AccountBody"]["properties"]["balance_cents"]["maximum"],
        json!(payment_svc::domain::MAX_BALANCE_CENTS)
    );
    assert_eq!(
        schemas(Svc::Payment)["StepQuery"]["properties"]["order_ids"]["maxItems"],
        json!(common::saga::timeline::MAX_ORDERS_PER_QUERY)
    );
    let place = &serde_json::to_value(document(Svc::Order)).unwrap()["paths"]["/orders"]["post"];
    let key = &place["parameters"][0];
    assert_eq!(key["name"], "Idempotency-Key");
    assert_eq!(
        key["schema"]["maxLength"],
        json!(order_svc::domain::MAX_KEY_LEN)
    );
}

/// A client of one system that checks every answer against the contract
/// and remembers which operations it called.
struct Caller<'a> {
    sys: &'a TestSystem,
    tokens: Tokens,
    plain: reqwest::Client,
    called: BTreeSet<(&'static str, String, String)>,
}

enum Token {
    Anonymous,
    Api,
    Admin,
}

impl Caller<'_> {
    async fn call(
        &mut self,
        svc: Svc,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Token,
    ) -> (u16, Option<Value>) {
        let url = format!("{}{path}", self.sys.url(svc));
        let mut req = self
            .plain
            .request(method.parse().unwrap(), &url)
            .header("Idempotency-Key", Uuid::new_v4().to_string());
        req = match token {
            Token::Anonymous => req,
            Token::Api => req.bearer_auth(&self.tokens.api),
            Token::Admin => req.bearer_auth(&self.tokens.admin),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let json = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = r.bytes().await.unwrap();
        let body: Option<Value> = if json {
            Some(
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{method} {path}: declared JSON, is not ({e})")),
            )
        } else {
            None
        };
        if let Err(e) = check(svc, method, path, status, body.as_ref()) {
            panic!("HTTP contract broken: {e}");
        }
        let tpl = path_template(svc, path).unwrap_or_default();
        self.called
            .insert((svc.identity().name, tpl, method.to_ascii_lowercase()));
        (status, body)
    }
}

/// One call and the status it must get: (service, method, path, body,
/// token, status).
type Expected = (Svc, &'static str, String, Option<Value>, Token, u16);

impl Caller<'_> {
    /// Makes each call and checks its status (and, as every call does, its
    /// contract).
    async fn expect_all(&mut self, calls: Vec<Expected>) {
        for (svc, method, path, body, token, status) in calls {
            let (got, answer) = self.call(svc, method, &path, body, token).await;
            assert_eq!(got, status, "{method} {path}: {answer:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_answers_in_contract() {
    let tokens = Tokens::random();
    let sys = TestSystem::builder().tokens(tokens.clone()).spawn().await;
    let mut c = Caller {
        sys: &sys,
        tokens,
        plain: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        called: BTreeSet::new(),
    };
    use Svc::*;
    use Token::*;
    let p = |path: &str| path.to_owned();

    // Set-up and its errors; the middleware's answers.
    c.expect_all(vec![
        (
            Order,
            "PUT",
            p("/catalog/productA"),
            Some(json!({"price_cents": 1500})),
            Admin,
            200,
        ),
        (
            Order,
            "PUT",
            p("/catalog/productA"),
            Some(json!({"price_cents": -1})),
            Admin,
            400,
        ),
        (Order, "GET", p("/catalog/productA"), None, Admin, 200),
        (Order, "GET", p("/catalog/nothing"), None, Admin, 404),
        (
            Inventory,
            "PUT",
            p("/items/productA"),
            Some(json!({"available": 10})),
            Admin,
            200,
        ),
        (
            Inventory,
            "PUT",
            p("/items/productA"),
            Some(json!({"available": "ten"})),
            Admin,
            400,
        ),
        (Inventory, "GET", p("/items/productA"), None, Admin, 200),
        (Inventory, "GET", p("/items/nothing"), None, Admin, 404),
        (
            Payment,
            "PUT",
            p("/accounts/alice"),
            Some(json!({"balance_cents": 100000})),
            Admin,
            200,
        ),
        (Payment, "GET", p("/accounts/alice"), None, Admin, 200),
        (Payment, "GET", p("/accounts/nobody"), None, Admin, 404),
        (
            Notification,
            "PUT",
            p("/customers/alice"),
            Some(json!({"email": "alice@example.com"})),
            Admin,
            200,
        ),
        (
            Notification,
            "PUT",
            p("/customers/alice"),
            Some(json!({"email": "nope"})),
            Admin,
            400,
        ),
        (Notification, "GET", p("/customers/bob"), None, Admin, 200),
        (Order, "GET", p("/sagas"), None, Anonymous, 401),
        (Payment, "GET", p("/accounts/alice"), None, Api, 403),
    ])
    .await;
    let r = c
        .plain
        .post(format!("{}/orders", sys.url(Order)))
        .bearer_auth(&c.tokens.api)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 415);
    check(Order, "POST", "/orders", status, Some(&body)).unwrap();

    // Orders: decided, pending, invalid, a key reused.
    let order = order_dict("alice", &[("productA", 1)]);
    let (status, ok) = c.call(Order, "POST", "/orders", Some(order), Api).await;
    assert_eq!(status, 200, "{ok:?}");
    let order_id = ok.unwrap()["order_id"].as_str().unwrap().to_owned();
    let pending_order = order_with_card("alice", &[("productA", 1)], "4000 0000 0000 3220");
    let (status, pending) = c
        .call(Order, "POST", "/orders", Some(pending_order), Api)
        .await;
    assert_eq!(status, 202, "{pending:?}");
    let pending_id = pending.unwrap()["order_id"].as_str().unwrap().to_owned();
    let key = Uuid::new_v4().to_string();
    for (i, order) in [
        order_dict("alice", &[("productA", 1)]),
        order_dict("alice", &[("productA", 2)]),
    ]
    .into_iter()
    .enumerate()
    {
        let r = c
            .plain
            .post(format!("{}/orders", sys.url(Order)))
            .bearer_auth(&c.tokens.api)
            .header("Idempotency-Key", &key)
            .json(&order)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, if i == 0 { 200 } else { 409 }, "{body}");
        check(Order, "POST", "/orders", status, Some(&body)).unwrap();
    }
    let unknown = Uuid::new_v4();
    let ids = json!({"order_ids": [order_id, pending_id]});
    let mut calls: Vec<Expected> = vec![
        (
            Order,
            "POST",
            p("/orders"),
            Some(json!({"customer_id": "alice"})),
            Api,
            400,
        ),
        (
            Order,
            "GET",
            format!("/orders?idempotency_key={key}"),
            None,
            Api,
            200,
        ),
        (
            Order,
            "GET",
            p("/orders?idempotency_key=unknown"),
            None,
            Api,
            404,
        ),
        (Order, "GET", format!("/orders/{order_id}"), None, Api, 200),
        (
            Order,
            "GET",
            format!("/orders/{pending_id}"),
            None,
            Api,
            200,
        ),
        (Order, "GET", format!("/orders/{unknown}"), None, Api, 404),
        (Order, "GET", p("/orders/not-a-uuid"), None, Api, 400),
        // The gateway's answers: the pending payment confirmed, then too late.
        (
            Payment,
            "POST",
            format!("/payments/{pending_id}/confirm"),
            None,
            Admin,
            200,
        ),
        (
            Payment,
            "POST",
            format!("/payments/{pending_id}/decline"),
            None,
            Admin,
            409,
        ),
        (
            Payment,
            "POST",
            format!("/payments/{unknown}/decline"),
            None,
            Admin,
            404,
        ),
        (
            Payment,
            "GET",
            format!("/payments/{order_id}"),
            None,
            Admin,
            200,
        ),
        (
            Payment,
            "GET",
            format!("/payments/{unknown}"),
            None,
            Admin,
            404,
        ),
        (
            Inventory,
            "GET",
            format!("/reservations/{order_id}"),
            None,
            Admin,
            200,
        ),
        (Inventory, "GET", p("/reservations/x"), None, Admin, 400),
        (
            Notification,
            "GET",
            format!("/emails?order_id={order_id}"),
            None,
            Admin,
            200,
        ),
        (Notification, "GET", p("/emails"), None, Admin, 400),
        // Sagas, as an operator reads them.
        (Order, "GET", p("/sagas"), None, Api, 200),
        (
            Order,
            "GET",
            p("/sagas?status=confirmed&limit=5"),
            None,
            Api,
            200,
        ),
        (Order, "GET", p("/sagas?stuck=true"), None, Api, 200),
        (Order, "GET", p("/sagas/choreography"), None, Api, 200),
        (Order, "GET", p("/sagas/violations"), None, Api, 200),
        (Order, "GET", p("/sagas/stats"), None, Api, 200),
        (Order, "GET", p("/sagas/stats?minutes=60"), None, Api, 200),
        (Order, "GET", p("/sagas?limit=0"), None, Api, 400),
        (Order, "GET", p("/sagas/stats?minutes=0"), None, Api, 400),
        // Refused by the query's parsing, not the handler: JSON all the same
        // (the contract check says so).
        (Order, "GET", p("/sagas?color=red"), None, Api, 400),
        (Order, "GET", p("/sagas?limit=ten"), None, Api, 400),
        (Order, "GET", p("/sagas/stats?minutes=x"), None, Api, 400),
        (Order, "GET", format!("/sagas/{order_id}"), None, Api, 200),
        (Order, "GET", format!("/sagas/{unknown}"), None, Api, 404),
        (Order, "POST", p("/admin/reconcile"), None, Admin, 200),
        // The Saga Explorer's page.
        (Order, "GET", p("/explorer"), None, Anonymous, 200),
        (Order, "GET", p("/explorer/app.js"), None, Anonymous, 200),
        (Order, "GET", p("/explorer/style.css"), None, Anonymous, 200),
        (
            Order,
            "GET",
            p("/explorer/favicon.svg"),
            None,
            Anonymous,
            200,
        ),
        (Order, "GET", p("/explorer/"), None, Anonymous, 308),
    ];
    for svc in [Payment, Inventory, Notification] {
        calls.extend([
            (
                svc,
                "GET",
                format!("/sagas/{order_id}/steps"),
                None,
                Api,
                200,
            ),
            (svc, "POST", p("/sagas/steps"), Some(ids.clone()), Api, 200),
            (
                svc,
                "POST",
                p("/sagas/steps"),
                Some(json!({"order_ids": "x"})),
                Api,
                400,
            ),
        ]);
    }
    // What every service has.
    for svc in Svc::ALL {
        calls.extend([
            (svc, "GET", p("/health"), None, Anonymous, 200),
            (svc, "GET", p("/metrics"), None, Anonymous, 200),
            (svc, "GET", p("/admin/escalations"), None, Admin, 200),
            (
                svc,
                "GET",
                p("/admin/escalations?status=nope"),
                None,
                Admin,
                400,
            ),
            (
                svc,
                "POST",
                format!("/admin/escalations/{unknown}/retry"),
                None,
                Admin,
                404,
            ),
        ]);
    }
    c.expect_all(calls).await;
    for svc in Svc::ALL {
        let (status, served) = c.call(svc, "GET", "/openapi.json", None, Anonymous).await;
        assert_eq!(status, 200);
        assert_eq!(
            served.unwrap(),
            serde_json::to_value(document(svc)).unwrap()
        );
    }

    // Every documented operation was called.
    let mut missing = Vec::new();
    for svc in Svc::ALL {
        let doc = serde_json::to_value(document(svc)).unwrap();
        for (tpl, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let name = svc.identity().name;
                if !c.called.contains(&(name, tpl.clone(), method.clone())) {
                    missing.push(format!("{name} {} {tpl}", method.to_uppercase()));
                }
            }
        }
    }
    assert!(missing.is_empty(), "operations never called: {missing:?}");
    sys.shutdown().await;
}

#[test]
fn the_checker_catches_answers_out_of_contract() {
    let id = Uuid::new_v4();
    let good = json!({"status": "success", "order_id": id});
    check(Svc::Order, "POST", "/orders", 200, Some(&good)).unwrap();
    // A body of the wrong shape, a status not documented, an undocumented
    // path or method.
    let wrong = json!({"status": "succeeded", "order_id": id});
    assert!(check(Svc::Order, "POST", "/orders", 200, Some(&wrong)).is_err());
    let not_uuid = json!({"status": "success", "order_id": "42"});
    assert!(check(Svc::Order, "POST", "/orders", 200, Some(&not_uuid)).is_err());
    assert!(check(Svc::Order, "POST", "/orders", 418, Some(&good)).is_err());
    assert!(check(Svc::Order, "GET", "/nowhere", 200, None).is_err());
    assert!(check(Svc::Order, "DELETE", "/orders", 200, None).is_err());
    let health = json!({"service": "order-svc", "status": "ok", "broker": "up",
                        "database": "sideways", "auth": "enabled", "mode": "production"});
    assert!(check(Svc::Order, "GET", "/health", 200, Some(&health)).is_err());
    // The in-flight bound refuses /health like any endpoint.
    let shed = json!({"error": "too many requests in flight, retry later"});
    check(Svc::Order, "GET", "/health", 503, Some(&shed)).unwrap();
    assert!(check(Svc::Order, "GET", "/health", 200, Some(&shed)).is_err());
}

#[test]
fn the_checker_refuses_undocumented_fields_and_bodies_that_are_not_json() {
    let id = Uuid::new_v4();
    let extra = json!({"status": "success", "order_id": id, "bonus": 1});
    assert!(check(Svc::Order, "POST", "/orders", 200, Some(&extra)).is_err());
    // A nested object is closed too, and so is a flattened one.
    let error = json!({"error": "no", "detail": "undocumented"});
    assert!(check(Svc::Order, "GET", "/orders/x", 400, Some(&error)).is_err());
    assert!(check(Svc::Order, "GET", "/orders/x", 400, None).is_err());
    let step = json!({"at": "2026-01-01T00:00:00Z", "service": "payment-svc", "event": "payment.completed",
                      "kind": "action", "outcome": "charged", "detail": null, "state": null,
                      "since_start_ms": 1, "since_previous_ms": 1});
    let view = |steps: Value| {
        json!({"order_id": id, "status": "CONFIRMED", "result": null,
        "created_at": "2026-01-01T00:00:00Z", "deadline_at": "2026-01-01T00:00:05Z",
        "decided_at": null, "duration_ms": null, "decision": null, "steps": steps,
        "compensations": [], "emails": [], "sources": {"payment-svc": "ok"}})
    };
    check(
        Svc::Order,
        "GET",
        &format!("/sagas/{id}"),
        200,
        Some(&view(json!([step]))),
    )
    .unwrap();
    let mut odd = step;
    odd["color"] = json!("red");
    assert!(
        check(
            Svc::Order,
            "GET",
            &format!("/sagas/{id}"),
            200,
            Some(&view(json!([odd])))
        )
        .is_err()
    );
}
