//! The steady stream of orders with mixed outcomes, over HTTP (with
//! idempotency keys and client retries, as a real client does, and without
//! keys, tried once) and over AMQP (`order.requested`, some published
//! twice): 3-D Secure payments the customer confirms, declines or abandons
//! (to expire at the long deadline), and items sold on backorder that new
//! stock fills, or not (to expire too).

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use saga_tests::Svc;
use saga_tests::invariants::Placed;
use saga_tests::order_with_card;
use saga_tests::process::ProcessSystem;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use saga_tests::publisher::Publisher;

/// (item, price in cents, initial stock). `rare` runs out during the run.
pub const ITEMS: [(&str, i64, i32); 3] = [
    ("gadget", 500, 100_000),
    ("widget", 300, 100_000),
    ("rare", 1000, 25),
];
/// Sold on backorder: out of stock at first, then restocked now and then.
pub const PREORDER: (&str, i64) = ("preorder", 800);
/// The 3-D Secure test card.
const THREE_D_SECURE: &str = "4000 0000 0000 3220";

/// Customers with the default balance.
pub const CUSTOMERS: usize = 20;
pub const DEFAULT_BALANCE: i64 = 1_000_000;

/// Prices and stocks [`ITEMS`], leaves `poor` without money and gives
/// `bouncer` an address that bounces.
pub async fn open_the_shop(sys: &ProcessSystem) {
    let put = |url: String, body: Value| {
        let http = sys.http.clone();
        async move {
            let r = http.put(url).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "PUT {}", r.url());
        }
    };
    let url = |svc| sys.urls(svc)[0].clone();
    for (item, price, stock) in ITEMS {
        put(
            format!("{}/catalog/{item}", url(Svc::Order)),
            json!({"price_cents": price}),
        )
        .await;
        put(
            format!("{}/items/{item}", url(Svc::Inventory)),
            json!({"available": stock}),
        )
        .await;
    }
    put(
        format!("{}/catalog/{}", url(Svc::Order), PREORDER.0),
        json!({"price_cents": PREORDER.1}),
    )
    .await;
    put(
        format!("{}/items/{}", url(Svc::Inventory), PREORDER.0),
        json!({"available": 0, "backorderable": true}),
    )
    .await;
    put(
        format!("{}/accounts/poor", url(Svc::Payment)),
        json!({"balance_cents": 0}),
    )
    .await;
    put(
        format!("{}/customers/bouncer", url(Svc::Notification)),
        json!({"email": "bouncer@mail.invalid"}),
    )
    .await;
}

/// A random order: mostly good ones, and each failure class; with
/// `long_running`, some that wait for a 3-D Secure answer or for stock.
pub fn random_order(long_running: bool) -> Value {
    let customer = format!("c-{}", rand::random_range(0..CUSTOMERS));
    let good_card = "4242 4242 4242 4242";
    let mut items: Vec<(&str, i64)> =
        vec![(ITEMS[rand::random_range(0..2)].0, rand::random_range(1..4))];
    if rand::random_bool(0.4) {
        let other = if items[0].0 == "gadget" {
            "widget"
        } else {
            "gadget"
        };
        items.push((other, rand::random_range(1..3)));
    }
    let roll = if long_running {
        rand::random_range(0..100)
    } else {
        // Skips the long-running classes (26..39).
        match rand::random_range(0..87) {
            r if r >= 26 => r + 13,
            r => r,
        }
    };
    match roll {
        0..10 => order_with_card(&customer, &[("rare", 1)], good_card),
        10..18 => order_with_card("poor", &items, good_card),
        18..22 => order_with_card(&customer, &items, "4000 0000 0000 0002"),
        22..26 => order_with_card("bouncer", &items, good_card),
        26..34 => order_with_card(&customer, &items, THREE_D_SECURE),
        34..39 => order_with_card(&customer, &[(PREORDER.0, 1)], good_card),
        _ => order_with_card(&customer, &items, good_card),
    }
}

/// Where an HTTP client sends what, and what it sends.
#[derive(Clone)]
pub struct Endpoints {
    pub orders: Vec<String>,
    pub payments: Vec<String>,
    /// Orders that wait for a 3-D Secure answer or for stock, too.
    pub long_running: bool,
}

/// Places orders over HTTP until `until`. With `keyed`, each with an
/// idempotency key, retried (same key, next replica) through crashes and
/// restarts until it gets an answer; without, tried once (a client with no
/// key cannot tell a lost answer from a lost order). A pending 3-D Secure
/// payment is confirmed, declined or abandoned, as a customer would; the
/// final result is then read back.
pub async fn http_client(
    to: Endpoints,
    keyed: bool,
    until: Instant,
    placed: Arc<Mutex<Vec<Placed>>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    while Instant::now() < until {
        let order = random_order(to.long_running);
        let key = uuid::Uuid::new_v4().to_string();
        let mut result = if keyed {
            place(&http, &to.orders, &order, Some(&key)).await
        } else {
            place_once(&http, &to.orders, &order).await
        };
        if let Some(pending) = result.clone().filter(|r| r["status"] == "pending") {
            result = finish(&http, &to, &pending).await.or(result);
        }
        placed.lock().await.push(Placed {
            key: if keyed { key } else { format!("keyless-{key}") },
            keyless: !keyed,
            over_http: true,
            result,
        });
    }
}

/// A pending order: the customer answers 3-D Secure (or not), then the
/// final result is read back (`None` if not decided within 30 s).
async fn finish(http: &reqwest::Client, to: &Endpoints, pending: &Value) -> Option<Value> {
    let order_id = pending["order_id"].as_str()?;
    if pending["next"]["step"] == "payment_confirmation" {
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..1500))).await;
        let answer = match rand::random_range(0..100) {
            0..45 => Some("confirm"),
            45..80 => Some("decline"),
            // Abandoned: rolled back at its long deadline.
            _ => None,
        };
        if let Some(answer) = answer {
            for i in 0..10 {
                let url = format!(
                    "{}/payments/{order_id}/{answer}",
                    to.payments[i % to.payments.len()]
                );
                if let Ok(r) = http.post(url).send().await
                    && r.status().as_u16() < 500
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    while Instant::now() < give_up {
        let url = format!("{}/orders/{order_id}", to.orders[i % to.orders.len()]);
        if let Ok(r) = http.get(url).send().await
            && let Ok(view) = r.json::<Value>().await
            && view["result"].is_object()
        {
            return Some(view["result"].clone());
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

async fn place(
    http: &reqwest::Client,
    urls: &[String],
    order: &Value,
    key: Option<&str>,
) -> Option<Value> {
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut i = rand::random_range(0..urls.len());
    while Instant::now() < give_up {
        let mut request = http.post(format!("{}/orders", urls[i % urls.len()]));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Ok(r) = request.json(order).send().await
            && r.status().as_u16() < 500
            && let Ok(body) = r.json::<Value>().await
        {
            return Some(body);
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// One attempt, no key: the answer, if it came.
async fn place_once(http: &reqwest::Client, urls: &[String], order: &Value) -> Option<Value> {
    let url = format!("{}/orders", urls[rand::random_range(0..urls.len())]);
    let r = http.post(url).json(order).send().await.ok()?;
    if r.status().as_u16() >= 500 {
        return None;
    }
    r.json::<Value>().await.ok()
}

/// New stock for the backordered item every 2–4 s, sometimes none (so some
/// backorders are filled and others outlive their long deadline).
pub async fn restock(inventory: Vec<String>, until: Instant) {
    let http = reqwest::Client::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rand::random_range(2000..4000))).await;
        let units = rand::random_range(0..4);
        let url = format!(
            "{}/items/{}",
            inventory[rand::random_range(0..inventory.len())],
            PREORDER.0
        );
        let _ = http
            .put(url)
            .json(&json!({"available": units}))
            .send()
            .await;
    }
}

/// Publishes `order.requested` messages until `until`; one in three twice.
pub async fn amqp_client(
    publisher: Arc<Mutex<Publisher>>,
    long_running: bool,
    until: Instant,
    placed: Arc<Mutex<Vec<Placed>>>,
) {
    while Instant::now() < until {
        let key = format!("amqp-{}", uuid::Uuid::new_v4());
        let body = serde_json::to_vec(&random_order(long_running)).expect("json");
        let copies = if rand::random_bool(1.0 / 3.0) { 2 } else { 1 };
        let mut sent = false;
        for _ in 0..copies {
            let props = BasicProperties::default().with_message_id(key.as_str().into());
            sent |= publisher
                .lock()
                .await
                .publish("order.requested", &body, props)
                .await;
        }
        if sent {
            placed.lock().await.push(Placed {
                key,
                keyless: false,
                over_http: false,
                result: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}
