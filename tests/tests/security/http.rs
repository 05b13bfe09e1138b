//! The HTTP API's bearer tokens (`common::runtime::auth`).

use reqwest::{Method, StatusCode};
use saga_tests::{Svc, TestSystem, Tokens, order_dict};
use serde_json::{Value, json};

/// A request with `token` (or none) as its bearer token.
async fn call(
    sys: &TestSystem,
    method: Method,
    svc: Svc,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    // Not the harness's client: that one carries the admin token.
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", sys.url(svc)));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_open_what_they_should_and_nothing_else() {
    let tokens = Tokens::random();
    let sys = TestSystem::builder().tokens(tokens.clone()).spawn().await;
    let (api, admin) = (Some(tokens.api.as_str()), Some(tokens.admin.as_str()));
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    let order = order_dict("tok", &[("productA", 1)]);

    // Open: health (which says auth is on) and metrics.
    for svc in Svc::ALL {
        let (status, health) = call(&sys, Method::GET, svc, "/health", None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(health["auth"], "enabled", "{health}");
        let r = reqwest::get(format!("{}/metrics", sys.url(svc)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    // Orders: the API token (or the admin one); nothing without.
    for token in [None, Some("wrong-token-wrong-token")] {
        let (status, body) = call(
            &sys,
            Method::POST,
            Svc::Order,
            "/orders",
            token,
            Some(order.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        // `POST /orders` answers with the result dict, whatever refuses it.
        assert_eq!(
            body,
            serde_json::json!({"status": "failure", "error": "Unauthorized",
                               "reason": "missing or invalid bearer token"})
        );
    }
    let mut pg = sys.pg(Svc::Order).await;
    let orders: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(&mut pg)
        .await
        .unwrap();
    assert_eq!(orders, 0, "an order was created without a token");
    let (status, placed) = call(
        &sys,
        Method::POST,
        Svc::Order,
        "/orders",
        api,
        Some(order.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(placed["status"], "success", "{placed}");
    let path = format!("/orders/{}", placed["order_id"].as_str().unwrap());
    assert_eq!(
        call(&sys, Method::GET, Svc::Order, &path, api, None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&sys, Method::GET, Svc::Order, &path, None, None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // A saga's view, across the services: order-svc asks the others with
    // its own token, and every one answers; their step logs need a token.
    let order_id = placed["order_id"].as_str().unwrap();
    let (status, view) = call(
        &sys,
        Method::GET,
        Svc::Order,
        &format!("/sagas/{order_id}"),
        api,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    for svc in ["payment-svc", "inventory-svc", "notification-svc"] {
        assert_eq!(view["sources"][svc], "ok", "{view}");
    }
    for svc in [Svc::Payment, Svc::Inventory, Svc::Notification] {
        let steps = format!("/sagas/{order_id}/steps");
        assert_eq!(
            call(&sys, Method::GET, svc, &steps, None, None).await.0,
            StatusCode::UNAUTHORIZED
        );
        let query = Some(json!({"order_ids": [order_id]}));
        assert_eq!(
            call(&sys, Method::POST, svc, "/sagas/steps", None, query.clone())
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        let (status, logs) = call(&sys, Method::POST, svc, "/sagas/steps", api, query).await;
        assert_eq!(status, StatusCode::OK, "{logs}");
        assert_eq!(logs["logs"][0]["order_id"], order_id);
    }

    // Set-up, reads of accounts and addresses, admin: the admin token only.
    let admin_calls: [(Method, Svc, &str, Option<Value>); 10] = [
        (Method::POST, Svc::Order, "/admin/reconcile", None),
        (
            Method::PUT,
            Svc::Order,
            "/catalog/productA",
            Some(json!({"price_cents": 0})),
        ),
        (
            Method::PUT,
            Svc::Payment,
            "/accounts/tok",
            Some(json!({"balance_cents": 1})),
        ),
        (Method::GET, Svc::Payment, "/accounts/tok", None),
        (
            Method::PUT,
            Svc::Inventory,
            "/items/productA",
            Some(json!({"available": 0})),
        ),
        (
            Method::PUT,
            Svc::Notification,
            "/customers/tok",
            Some(json!({"email": "evil@example.com"})),
        ),
        (Method::GET, Svc::Notification, "/customers/tok", None),
        (Method::GET, Svc::Notification, "/emails", None),
        (Method::GET, Svc::Payment, "/admin/escalations", None),
        (
            Method::POST,
            Svc::Payment,
            "/admin/escalations/00000000-0000-0000-0000-000000000000/retry",
            None,
        ),
    ];
    for (method, svc, path, body) in &admin_calls {
        let none = call(&sys, method.clone(), *svc, path, None, body.clone()).await;
        assert_eq!(
            none.0,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: {none:?}"
        );
        let with_api = call(&sys, method.clone(), *svc, path, api, body.clone()).await;
        assert_eq!(
            with_api.0,
            StatusCode::FORBIDDEN,
            "{method} {path}: {with_api:?}"
        );
        assert_eq!(with_api.1["error"], "this endpoint needs the admin token");
    }
    // Nothing those refused calls asked for happened.
    sys.wait_for_stock("productA", (9, 0)).await;
    let (_, price) = call(
        &sys,
        Method::GET,
        Svc::Order,
        "/catalog/productA",
        admin,
        None,
    )
    .await;
    assert_eq!(price["price_cents"], 1500, "{price}");
    let (status, _) = call(
        &sys,
        Method::GET,
        Svc::Payment,
        "/accounts/tok",
        admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &sys,
        Method::PUT,
        Svc::Order,
        "/catalog/productB",
        admin,
        Some(json!({"price_cents": 700})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tokens_the_api_is_open_and_says_so() {
    let sys = TestSystem::spawn().await;
    for svc in Svc::ALL {
        let (_, health) = call(&sys, Method::GET, svc, "/health", None, None).await;
        assert_eq!(health["auth"], "disabled", "{health}");
        assert_eq!(health["mode"], "development", "{health}");
    }
    sys.shutdown().await;
}

/// Places `order` as the client with `token`, with an `Idempotency-Key`.
async fn place_with_key(
    sys: &TestSystem,
    token: &str,
    key: &str,
    order: &Value,
) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/orders", sys.url(Svc::Order)))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(order)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Issue 24, item 8: idempotency keys were global — any API client could
/// look up another's order by its key, or squat a key so that its owner
/// got a 409. Named API clients (`API_CLIENTS`) have a token each, and
/// keys of their own.
#[tokio::test(flavor = "multi_thread")]
async fn named_clients_have_idempotency_keys_of_their_own() {
    let tokens = Tokens::random();
    let (shop, partner) = ("shop-token-0123456789abcdef", "partner-token-0123456789abc");
    let sys = TestSystem::builder()
        .tokens(tokens.clone())
        .api_clients(&format!("shop={shop},partner={partner}"))
        .spawn()
        .await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("keys", 100_000).await;
    let one = order_dict("keys", &[("productA", 1)]);
    let two = order_dict("keys", &[("productA", 2)]);

    let (status, placed) = place_with_key(&sys, shop, "order-1", &one).await;
    assert_eq!(status, StatusCode::OK, "{placed}");
    let shop_order = placed["order_id"].as_str().unwrap().to_owned();

    // The partner neither finds the shop's order by its key...
    let by_key = "/orders?idempotency_key=order-1";
    let (status, _) = call(&sys, Method::GET, Svc::Order, by_key, Some(partner), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &sys,
        Method::GET,
        Svc::Order,
        by_key,
        Some(&tokens.api),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // ...nor collides with it: the same key, another order, its own.
    let (status, theirs) = place_with_key(&sys, partner, "order-1", &two).await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    assert_ne!(theirs["order_id"], placed["order_id"]);

    // The shop still finds its own, and placing again answers it.
    let (status, found) = call(&sys, Method::GET, Svc::Order, by_key, Some(shop), None).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["order_id"], shop_order.as_str());
    let (_, again) = place_with_key(&sys, shop, "order-1", &one).await;
    assert_eq!(again["order_id"], shop_order.as_str());

    // Nor by spelling the stored form of the shop's key.
    let stored = "/orders?idempotency_key=shop%1Forder-1";
    let (status, _) = call(
        &sys,
        Method::GET,
        Svc::Order,
        stored,
        Some(&tokens.api),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A client's token opens the API only.
    let (status, _) = call(
        &sys,
        Method::GET,
        Svc::Payment,
        "/accounts/keys",
        Some(shop),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    sys.shutdown().await;
}
