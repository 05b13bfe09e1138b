//! The Saga Explorer (`/explorer`) in a real browser: headless Chromium
//! driven over WebDriver by `fantoccini`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test-deps.sh
//! installs them; nothing is downloaded). Each test starts its own
//! `chromedriver` on a free port (killed when the test ends, also on panic)
//! and its own [`TestSystem`]. `CHROMIUM` and `CHROMEDRIVER` override the
//! binaries' paths. The screenshot goes to `target/test-artifacts/`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use saga_tests::{Svc, TestSystem, Tokens, order_dict};
use serde_json::{Value, json};

/// How long the page may take to show something.
const PATIENCE: Duration = Duration::from_secs(15);

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

fn chromedriver_bin() -> String {
    std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned())
}

/// A `chromedriver` child process, killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let bin = chromedriver_bin();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install chromium and chromium-driver")
            });
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ready = http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if let Some(r) = ready {
                let status: Value = r.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "chromedriver did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// A headless Chromium session.
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1440,1500",
                ],
            }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` (a function body; `arguments[i]` are `args`) until it
/// returns something truthy; panics with the last value after [`PATIENCE`].
async fn wait_js(browser: &Client, what: &str, script: &str, args: Vec<Value>) -> Value {
    let started = Instant::now();
    loop {
        let v = browser
            .execute(script, args.clone())
            .await
            .unwrap_or_else(|e| Value::String(format!("script error: {e}")));
        let truthy = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty() && !s.starts_with("script error"),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        if started.elapsed() > PATIENCE {
            let banner = browser
                .execute(
                    "return document.getElementById('error').textContent",
                    vec![],
                )
                .await
                .unwrap_or_default();
            panic!("the page never showed {what} (last: {v}; error banner: {banner})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the list's row for `order_id`, once it contains `status`.
async fn wait_for_row(browser: &Client, order_id: &str, status: &str) -> String {
    let v = wait_js(
        browser,
        &format!("{order_id} as {status} in the list"),
        r#"const row = document.querySelector(`#saga-rows tr[data-order-id="${arguments[0]}"]`);
           return row && row.innerText.includes(arguments[1]) ? row.innerText : null;"#,
        vec![json!(order_id), json!(status)],
    )
    .await;
    v.as_str().unwrap_or_default().to_owned()
}

/// The order ids the list shows.
async fn listed(browser: &Client) -> Vec<String> {
    let v = browser
        .execute(
            "return [...document.querySelectorAll('#saga-rows tr[data-order-id]')]
                 .map(r => r.getAttribute('data-order-id'))",
            vec![],
        )
        .await
        .expect("list ids");
    serde_json::from_value(v).unwrap_or_default()
}

/// Clicks the list's row for `order_id` (again if a refresh replaced it
/// under the click).
async fn click_row(browser: &Client, order_id: &str) {
    let css = format!(r#"#saga-rows tr[data-order-id="{order_id}"] td"#);
    for attempt in 0.. {
        let clicked = match browser.find(Locator::Css(&css)).await {
            Ok(cell) => cell.click().await,
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) if attempt >= 5 => panic!("cannot click the row of {order_id}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The steps table's and the timeline chart's text, once the open saga is
/// `order_id` and both show every one of `events`.
async fn wait_for_steps(browser: &Client, order_id: &str, events: &[&str]) -> (String, String) {
    let v = wait_js(
        browser,
        &format!("the steps {events:?} of {order_id}"),
        r#"if (document.getElementById('detail-id').textContent !== arguments[0]) return null;
           const table = document.getElementById('step-rows').innerText;
           const svg = document.querySelector('#timeline svg');
           const chart = svg ? svg.textContent : '';
           return arguments[1].every(e => table.includes(e) && chart.includes(e))
               ? [table, chart] : null;"#,
        vec![json!(order_id), json!(events)],
    )
    .await;
    (
        v[0].as_str().unwrap_or_default().to_owned(),
        v[1].as_str().unwrap_or_default().to_owned(),
    )
}

async fn stat(browser: &Client, name: &str) -> String {
    browser
        .find(Locator::Css(&format!(r#"[data-stat="{name}"]"#)))
        .await
        .expect("stat tile")
        .text()
        .await
        .expect("stat text")
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("target/test-artifacts");
    dir
}

/// Places one order that is confirmed and one that fails (insufficient
/// funds): their ids.
async fn two_orders(sys: &TestSystem) -> (String, String) {
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("explorer-rich", 100_000).await;
    sys.set_balance("explorer-poor", 100).await;
    let (status, ok) = sys
        .post_order(&order_dict("explorer-rich", &[("productA", 1)]))
        .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["status"], "success", "{ok}");
    let (status, failed) = sys
        .post_order(&order_dict("explorer-poor", &[("productA", 1)]))
        .await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["status"], "failure", "{failed}");
    let id = |v: &Value| v["order_id"].as_str().expect("order_id").to_owned();
    (id(&ok), id(&failed))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_explorer_lists_sagas_and_draws_their_timelines() {
    let started = Instant::now();
    let (sys, driver) = tokio::join!(TestSystem::spawn(), Chromedriver::start());
    let (ok_id, failed_id) = two_orders(&sys).await;
    let base = sys.url(Svc::Order).to_owned();

    // The page itself: embedded, strict about what it loads.
    let page = sys
        .http
        .get(format!("{base}/explorer"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let js = sys
        .http
        .get(format!("{base}/explorer/app.js"))
        .send()
        .await
        .unwrap();
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );

    // The headline's data, and what it refuses.
    let stats = sys
        .get(Svc::Order, "/sagas/stats?minutes=60")
        .await
        .unwrap();
    assert_eq!(stats["window_minutes"], 60, "{stats}");
    assert_eq!(stats["started"], 2, "{stats}");
    assert_eq!(stats["confirmed"], 1, "{stats}");
    assert_eq!(stats["failed"], 1, "{stats}");
    assert_eq!(stats["pending"], 0, "{stats}");
    assert_eq!(stats["failed_by_reason"], json!({"Payment failed": 1}));
    assert!(stats["p50_ms"].as_f64().unwrap() <= stats["p99_ms"].as_f64().unwrap());
    let default = sys.get(Svc::Order, "/sagas/stats").await.unwrap();
    assert_eq!(default["window_minutes"], 5, "{default}");
    for bad in [
        "?minutes=0",
        "?minutes=1441",
        "?minutes=soon",
        "?colour=red",
    ] {
        let r = sys
            .http
            .get(format!("{base}/sagas/stats{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }

    let browser = driver.browser().await;
    browser
        .goto(&format!("{base}/explorer"))
        .await
        .expect("open the explorer");
    assert_eq!(browser.title().await.unwrap(), "Saga Explorer · order-svc");

    // The list shows both sagas, with their statuses.
    let row = wait_for_row(&browser, &ok_id, "CONFIRMED").await;
    assert!(row.contains("explorer-rich"), "{row}");
    let row = wait_for_row(&browser, &failed_id, "FAILED").await;
    assert!(row.contains("Payment failed"), "{row}");

    // The headline counts them.
    wait_js(
        &browser,
        "2 sagas started in the headline",
        r#"return document.querySelector('[data-stat="started"]').textContent === '2';"#,
        vec![],
    )
    .await;
    assert_eq!(stat(&browser, "confirmed").await, "1");
    assert_eq!(stat(&browser, "failed").await, "1");
    assert_eq!(stat(&browser, "pending").await, "0");
    assert_ne!(stat(&browser, "p50_ms").await, "–");
    let reasons = browser
        .find(Locator::Id("failed-by-reason"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(reasons.contains("Payment failed: 1"), "{reasons}");

    // The failed saga: its failure is marked on the timeline.
    click_row(&browser, &failed_id).await;
    let (table, _) = wait_for_steps(
        &browser,
        &failed_id,
        &["order.created", "payment.failed", "order.failed"],
    )
    .await;
    assert!(table.contains("payment-svc"), "{table}");
    let marked = browser
        .execute(
            "return document.querySelectorAll('#timeline .bar.failed').length",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        marked.as_u64().unwrap_or(0) >= 1,
        "failures marked: {marked}"
    );
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join("explorer-failed.png"), png).expect("save the screenshot");

    // The status filter narrows the list.
    browser
        .find(Locator::Id("filter-status"))
        .await
        .unwrap()
        .select_by_value("FAILED")
        .await
        .unwrap();
    wait_js(
        &browser,
        "only the failed saga",
        r#"const ids = [...document.querySelectorAll('#saga-rows tr[data-order-id]')]
               .map(r => r.getAttribute('data-order-id'));
           return ids.length === 1 && ids[0] === arguments[0];"#,
        vec![json!(failed_id)],
    )
    .await;
    browser
        .find(Locator::Id("filter-status"))
        .await
        .unwrap()
        .select_by_value("CONFIRMED")
        .await
        .unwrap();
    wait_js(
        &browser,
        "only the confirmed saga",
        r#"const ids = [...document.querySelectorAll('#saga-rows tr[data-order-id]')]
               .map(r => r.getAttribute('data-order-id'));
           return ids.length === 1 && ids[0] === arguments[0];"#,
        vec![json!(ok_id)],
    )
    .await;
    assert_eq!(listed(&browser).await, vec![ok_id.clone()]);

    // The confirmed saga: every step, from each service, on its timeline.
    click_row(&browser, &ok_id).await;
    let (table, chart) = wait_for_steps(
        &browser,
        &ok_id,
        &[
            "order.created",
            "payment.completed",
            "inventory.reserved",
            "order.confirmed",
        ],
    )
    .await;
    for service in ["order-svc", "payment-svc", "inventory-svc"] {
        assert!(table.contains(service), "{service} in {table}");
    }
    assert!(chart.contains("deadline"), "the deadline is drawn: {chart}");
    let bars = browser
        .execute(
            "return document.querySelectorAll('#timeline .bar').length",
            vec![],
        )
        .await
        .unwrap();
    assert!(bars.as_u64().unwrap_or(0) >= 4, "one bar per step: {bars}");

    // The choreography: the Mermaid source and the diagram drawn from it.
    let mermaid = wait_js(
        &browser,
        "the choreography",
        "const pre = document.getElementById('choreo-mermaid').textContent;
         return document.querySelectorAll('#choreo-diagram svg .reaction').length > 0 ? pre : null;",
        vec![],
    )
    .await;
    assert!(
        mermaid
            .as_str()
            .unwrap_or_default()
            .starts_with("flowchart"),
        "{mermaid}"
    );

    // Nothing the page loaded broke its Content-Security-Policy.
    let violations = browser
        .execute(
            "return document.body.getAttribute('data-csp-violations')",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(violations, Value::Null, "CSP violations");

    let png = browser.screenshot().await.expect("screenshot");
    let path = artifacts().join("explorer.png");
    std::fs::write(&path, png).expect("save the screenshot");
    eprintln!(
        "screenshot: {} ({:.1} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );

    browser.close().await.expect("close the browser");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tokens_the_page_asks_for_the_api_token() {
    let tokens = Tokens::random();
    let (sys, driver) = tokio::join!(
        TestSystem::builder().tokens(tokens.clone()).spawn(),
        Chromedriver::start()
    );
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;
    sys.set_balance("explorer-rich", 100_000).await;
    let (status, placed) = sys
        .post_order(&order_dict("explorer-rich", &[("productA", 1)]))
        .await;
    assert_eq!(status, 200, "{placed}");
    let order_id = placed["order_id"].as_str().unwrap().to_owned();
    let base = sys.url(Svc::Order).to_owned();

    // The page loads without a token; its data does not.
    let anonymous = reqwest::Client::new();
    for path in ["/explorer", "/explorer/app.js", "/explorer/style.css"] {
        let r = anonymous.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    for path in ["/sagas", "/sagas/stats", "/explorer/other"] {
        let r = anonymous.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }

    let browser = driver.browser().await;
    browser.goto(&format!("{base}/explorer")).await.unwrap();
    wait_js(
        &browser,
        "the token prompt",
        "return !document.getElementById('token-form').hidden",
        vec![],
    )
    .await;
    assert!(listed(&browser).await.is_empty());

    // A wrong token is refused, and asked for again.
    let input = browser.find(Locator::Id("token-input")).await.unwrap();
    input.send_keys("not-the-token-0123456789").await.unwrap();
    browser
        .find(Locator::Id("token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &browser,
        "the wrong token refused",
        "return !document.getElementById('token-form').hidden
             && document.getElementById('token-message').textContent.includes('refused')",
        vec![],
    )
    .await;

    // The API token opens the data, and is kept for the tab.
    let input = browser.find(Locator::Id("token-input")).await.unwrap();
    input.send_keys(&tokens.api).await.unwrap();
    browser
        .find(Locator::Id("token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_row(&browser, &order_id, "CONFIRMED").await;
    browser.refresh().await.unwrap();
    wait_for_row(&browser, &order_id, "CONFIRMED").await;
    let prompt_hidden = browser
        .execute(
            "return document.getElementById('token-form').hidden",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(prompt_hidden, true, "the kept token is used after a reload");

    browser.close().await.unwrap();
    sys.shutdown().await;
}
