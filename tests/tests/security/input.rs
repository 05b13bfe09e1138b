//! Every bad input gets a clear 4xx and creates nothing.

use std::time::Duration;

use reqwest::StatusCode;
use saga_tests::{Svc, TestSystem, order_dict};
use serde_json::{Value, json};

/// A raw request: `content_type` (or none) and a body as given.
async fn send(
    sys: &TestSystem,
    method: reqwest::Method,
    svc: Svc,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = sys
        .http
        .request(method, format!("{}{path}", sys.url(svc)))
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn put(sys: &TestSystem, svc: Svc, path: &str, body: Value) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(&body).unwrap();
    send(
        sys,
        reqwest::Method::PUT,
        svc,
        path,
        Some("application/json"),
        bytes,
    )
    .await
}

async fn count(sys: &TestSystem, svc: Svc, sql: &str) -> i64 {
    let mut pg = sys.pg(svc).await;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut pg)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx_and_creates_nothing() {
    let sys = TestSystem::spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    let order = serde_json::to_vec(&order_dict("input", &[("productA", 1)])).unwrap();
    let post = reqwest::Method::POST;

    // Not JSON by its Content-Type (a cross-site form post): 415.
    for ct in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
    ] {
        let (status, body) =
            send(&sys, post.clone(), Svc::Order, "/orders", ct, order.clone()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {body}");
        // Refused before the handler, and still the result dict.
        assert_eq!(
            body,
            json!({"status": "failure", "error": "Invalid order",
                   "reason": "Content-Type must be application/json"})
        );
    }
    // Too large, refused while reading: 413.
    let mut huge = order_dict("input", &[("productA", 1)]);
    huge["customer_id"] = json!("x".repeat(100 * 1024));
    let huge = serde_json::to_vec(&huge).unwrap();
    let (status, body) = send(
        &sys,
        post.clone(),
        Svc::Order,
        "/orders",
        Some("application/json"),
        huge,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Refused by the framework, not a handler: still the result dict.
    assert_eq!(body["status"], "failure", "{body}");
    assert_eq!(body["error"], "Invalid order", "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );

    // Invalid orders: unknown fields, invisible characters in ids.
    let mut typo = order_dict("input", &[("productA", 1)]);
    typo["coupon"] = json!("FREE");
    let mut bidi = order_dict("input\u{202E}", &[("productA", 1)]);
    bidi["items"][0]["item_id"] = json!("productA");
    for bad in [typo, bidi] {
        let (status, body) = send(
            &sys,
            post.clone(),
            Svc::Order,
            "/orders",
            Some("application/json"),
            serde_json::to_vec(&bad).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["status"], "failure");
        assert_eq!(body["error"], "Invalid order");
    }

    // Set-up endpoints: ids in the path checked like ids in a body.
    for path in [
        "/accounts/a%00b",
        "/accounts/a%E2%80%AEb",
        "/accounts/a%0Ab",
    ] {
        let (status, body) = put(&sys, Svc::Payment, path, json!({"balance_cents": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("customer_id"),
            "{body}"
        );
    }
    let (status, _) = put(&sys, Svc::Inventory, "/items/a%00", json!({"available": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Not UTF-8 at all: refused before the handler, as JSON too.
    let (status, body) = put(
        &sys,
        Svc::Payment,
        "/accounts/%FF",
        json!({"balance_cents": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    let (status, _) = put(
        &sys,
        Svc::Order,
        "/catalog/a%E2%80%8Bb",
        json!({"price_cents": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = put(
        &sys,
        Svc::Notification,
        "/customers/a%00",
        json!({"email": "a@b.example"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Unknown fields are not ignored.
    let (status, body) = put(
        &sys,
        Svc::Payment,
        "/accounts/input",
        json!({"balance_cents": 1, "frozn": true}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown field"),
        "{body}"
    );
    let (status, _) = put(
        &sys,
        Svc::Inventory,
        "/items/productA",
        json!({"available": 1, "price": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Out of range: free items, prices, balances and stock near the
    // integer limits (which later refunds or releases would overflow).
    for (svc, path, body) in [
        (Svc::Order, "/catalog/productA", json!({"price_cents": 0})),
        (
            Svc::Order,
            "/catalog/productA",
            json!({"price_cents": 4_611_686_018_427_387_904_i64}),
        ),
        (Svc::Order, "/catalog/productA", json!({"price_cents": -1})),
        (
            Svc::Payment,
            "/accounts/input",
            json!({"balance_cents": 9_000_000_000_000_000_000_i64}),
        ),
        (
            Svc::Payment,
            "/accounts/input",
            json!({"balance_cents": -5}),
        ),
        (
            Svc::Inventory,
            "/items/productA",
            json!({"available": 2_147_483_647}),
        ),
        (Svc::Inventory, "/items/productA", json!({"available": -1})),
    ] {
        let (status, answer) = put(&sys, svc, path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
    }

    // Nothing was created, and nothing changed.
    assert_eq!(
        count(&sys, Svc::Order, "select count(*) from orders").await,
        0
    );
    assert_eq!(
        count(&sys, Svc::Payment, "select count(*) from accounts").await,
        0
    );
    assert_eq!(
        count(&sys, Svc::Notification, "select count(*) from customers").await,
        0
    );
    let (_, price) = send(
        &sys,
        reqwest::Method::GET,
        Svc::Order,
        "/catalog/productA",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(price["price_cents"], 1500, "{price}");
    assert_eq!(sys.stock("productA").await, (10, 0));

    // The same order, well formed, goes through.
    let (status, body) = send(
        &sys,
        post,
        Svc::Order,
        "/orders",
        Some("application/json; charset=utf-8"),
        order,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "success", "{body}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parking_and_delay_queues_are_bounded_and_refuse_rather_than_drop() {
    let sys = TestSystem::spawn().await;
    let mgmt =
        std::env::var("TEST_RABBITMQ_MGMT").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    for queue in [
        "payment-svc.parking",
        "payment-svc.retry.200ms",
        "order-svc.retry.120s",
    ] {
        let q: Value = sys
            .http
            .get(format!("{mgmt}/api/queues/{}/{queue}", sys.prefix))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let args = &q["arguments"];
        assert_eq!(args["x-max-length"], 100_000, "{queue}: {args}");
        assert_eq!(
            args["x-max-length-bytes"],
            512 * 1024 * 1024,
            "{queue}: {args}"
        );
        assert_eq!(args["x-overflow"], "reject-publish", "{queue}: {args}");
    }
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let sys = TestSystem::builder()
        .http_header_timeout_ms(500)
        .spawn()
        .await;
    let addr = sys.url(Svc::Order).trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // The server closes the connection (answering 408 or nothing) once the
    // deadline passes; it never waits for the rest.
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "the connection was still open after 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // Everyone else is served as usual.
    let (_, health) = send(
        &sys,
        reqwest::Method::GET,
        Svc::Order,
        "/health",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(health["status"], "ok", "{health}");
    sys.shutdown().await;
}

/// Issue 24: `http_requests_total` was labelled with the raw HTTP method,
/// recorded before authentication: one client sending invented methods
/// made as many series as it liked. Every label now comes from a fixed set.
#[tokio::test(flavor = "multi_thread")]
async fn invented_methods_and_paths_make_no_new_metric_series() {
    let sys = TestSystem::spawn().await;
    for n in 0..40 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{n}").as_bytes()).unwrap();
        let _ = sys
            .http
            .request(method, format!("{}/orders/x{n}", sys.url(Svc::Order)))
            .send()
            .await
            .unwrap();
        let _ = sys
            .http
            .get(format!("{}/no/such/path/{n}", sys.url(Svc::Order)))
            .send()
            .await
            .unwrap();
    }
    let text = sys.metrics(Svc::Order).await;
    let series: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .collect();
    let methods: std::collections::HashSet<&str> = series
        .iter()
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    assert!(methods.contains("other"), "{methods:?}");
    assert!(
        methods.iter().all(|m| !m.starts_with("INVENTED")),
        "{methods:?}"
    );
    let paths: std::collections::HashSet<&str> = series
        .iter()
        .filter_map(|l| l.split("path=\"").nth(1)?.split('"').next())
        .collect();
    assert!(
        paths.iter().all(|p| !p.contains("/no/such/path")),
        "{paths:?}"
    );
    sys.shutdown().await;
}

/// Issue 24: outside development mode, a service without its tokens
/// served everything to anyone (a warning was all). It now refuses to
/// start, naming the variables.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_without_tokens_refuses_to_start_outside_development_mode() {
    use common::runtime::service::Service as _;
    let mut common = common::runtime::config::CommonConfig::new(
        "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
        "postgres://127.0.0.1:5432/never_created".to_owned(),
    );
    common.dev_mode = false;
    common.http_addr = Some("127.0.0.1:0".into());
    let refused = inventory_svc::App::build(inventory_svc::Config::new(common)).await;
    let error = format!("{:#}", refused.err().expect("it refuses to start"));
    assert!(
        error.contains("API_TOKEN") && error.contains("ADMIN_TOKEN"),
        "{error}"
    );
}
