//! The steady stream of orders with mixed outcomes, over HTTP (with
//! idempotency keys and client retries, as a real client does) and over AMQP
//! (`order.requested`, some published twice).

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

/// A random order: mostly good ones, and each failure class.
pub fn random_order() -> Value {
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
    match rand::random_range(0..100) {
        0..10 => order_with_card(&customer, &[("rare", 1)], good_card),
        10..20 => order_with_card("poor", &items, good_card),
        20..25 => order_with_card(&customer, &items, "4000 0000 0000 0002"),
        25..30 => order_with_card("bouncer", &items, good_card),
        _ => order_with_card(&customer, &items, good_card),
    }
}

/// Places orders over HTTP until `until`, retrying each one (same key, next
/// replica) through crashes and restarts until it gets a decision.
pub async fn http_client(urls: Vec<String>, until: Instant, placed: Arc<Mutex<Vec<Placed>>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    while Instant::now() < until {
        let order = random_order();
        let key = uuid::Uuid::new_v4().to_string();
        let result = place(&http, &urls, &order, &key).await;
        placed.lock().await.push(Placed {
            key,
            over_http: true,
            result,
        });
    }
}

async fn place(http: &reqwest::Client, urls: &[String], order: &Value, key: &str) -> Option<Value> {
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut i = rand::random_range(0..urls.len());
    while Instant::now() < give_up {
        let sent = http
            .post(format!("{}/orders", urls[i % urls.len()]))
            .header("Idempotency-Key", key)
            .json(order)
            .send()
            .await;
        if let Ok(r) = sent
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

/// Publishes `order.requested` messages until `until`; one in three twice.
pub async fn amqp_client(
    publisher: Arc<Mutex<Publisher>>,
    until: Instant,
    placed: Arc<Mutex<Vec<Placed>>>,
) {
    while Instant::now() < until {
        let key = format!("amqp-{}", uuid::Uuid::new_v4());
        let body = serde_json::to_vec(&random_order()).expect("json");
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
                over_http: false,
                result: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}
