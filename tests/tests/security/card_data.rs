//! No card data at rest: after orders have been placed — confirmed,
//! declined, invalid, parked — no table of any service, no message in any
//! queue and no log line holds a card number or a CVV.

use std::sync::Mutex;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use saga_tests::{EXCHANGE, Svc, TestSystem, order_with_card};
use serde_json::json;
use sqlx::Row as _;

/// A Luhn-valid Visa test number and a CVV that appear nowhere else.
const PAN: &str = "4000 0566 5566 5556";
const PAN_DIGITS: &str = "4000056655665556";
const CVV: &str = "7391";

/// Every log line of this test process, at debug level.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of the process (debug level and up: personal data
/// included, card data never) to [`LOGS`].
fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

fn with_cvv(mut order: serde_json::Value) -> serde_json::Value {
    order["payment_info"]["cvv"] = json!(CVV);
    order
}

/// Every row of every table of one service's database, as text.
async fn every_row(sys: &TestSystem, svc: Svc) -> Vec<(String, String)> {
    let mut pg = sys.pg(svc).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables \
         where table_schema = 'public' and table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut pg)
    .await
    .unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let sql = format!("select t::text as row from \"{table}\" t");
        for row in sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut pg)
            .await
            .unwrap()
        {
            rows.push((table.clone(), row.get::<String, _>("row")));
        }
    }
    rows
}

fn leaks(text: &str) -> bool {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    text.contains(PAN)
        || digits.contains(PAN_DIGITS)
        || text.contains(&format!("\"{CVV}\""))
        || text.contains(&format!("\\\"{CVV}\\\""))
        || text.to_ascii_lowercase().contains("cvv")
}

#[tokio::test(flavor = "multi_thread")]
async fn no_table_no_queue_and_no_log_line_keeps_a_card_number_or_cvv() {
    capture_logs();
    let mut sys = TestSystem::spawn().await;
    sys.set_price("productA", 1500).await;
    sys.set_stock("productA", 10).await;

    // Confirmed, and failed for lack of stock (the charge refunded).
    let (_, ok) = sys
        .post_order(&with_cvv(order_with_card("pan", &[("productA", 1)], PAN)))
        .await;
    assert_eq!(ok["status"], "success", "{ok}");
    let (_, out) = sys
        .post_order(&with_cvv(order_with_card("pan", &[("productA", 50)], PAN)))
        .await;
    assert_eq!(out["status"], "failure", "{out}");

    // Over AMQP, an invalid one: parked.
    let conn = sys.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let mut invalid = with_cvv(order_with_card("pan", &[("productA", 1)], PAN));
    invalid["coupon"] = json!("FREE");
    // And the card in other shapes the redaction must see through: another
    // spelling, a JSON number, a body encoded twice (issue 24, item 6).
    let mut respelled = invalid.clone();
    respelled["payment_info"] = json!({"cardNumber": PAN, "CVC": CVV, "expiry_date": "12/30"});
    let mut numeric = invalid.clone();
    numeric["payment_info"]["card_number"] = json!(PAN_DIGITS.parse::<u64>().unwrap());
    let twice = serde_json::to_vec(&json!(invalid.to_string())).unwrap();
    let bodies = [
        serde_json::to_vec(&invalid).unwrap(),
        serde_json::to_vec(&respelled).unwrap(),
        serde_json::to_vec(&numeric).unwrap(),
        twice,
    ];
    for (n, body) in bodies.iter().enumerate() {
        ch.basic_publish(
            EXCHANGE.into(),
            "order.requested".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_message_id(format!("invalid-with-card-{n}").into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Read the parked messages through the management API (left in place).
    let parked_in_order = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let queued = sys.queued_messages().await;
            let parked = queued
                .iter()
                .filter(|(q, _, _)| q == "order-svc.parking")
                .count();
            if parked >= bodies.len() {
                return queued;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the invalid orders are parked");
    for (_, payload, _) in parked_in_order
        .iter()
        .filter(|(q, _, _)| q == "order-svc.parking")
    {
        assert!(payload.contains("****5556"), "{payload}");
        let digits: String = payload.chars().filter(char::is_ascii_digit).collect();
        assert!(!digits.contains(PAN_DIGITS), "{payload}");
        assert!(!payload.contains(CVV), "{payload}");
    }

    // One waiting in payment-svc's queue while it is down, then handled.
    sys.stop(Svc::Payment).await;
    let waiting = {
        let http = sys.http.clone();
        let url = format!("{}/orders", sys.url(Svc::Order));
        let order = with_cvv(order_with_card("pan", &[("productA", 1)], PAN));
        tokio::spawn(async move { http.post(url).json(&order).send().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The sealed card is in flight (order-svc's outbox row is published and
    // gone; the message waits in payment-svc's queue, sealed): that is the
    // card on its way to the payment step, not at rest. Once payment-svc
    // has used it, nothing is left.
    sys.start(Svc::Payment).await;
    let answer = waiting.await.unwrap().unwrap();
    assert!(answer.status().is_success());

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut found = Vec::new();
    for svc in Svc::ALL {
        for (table, row) in every_row(&sys, svc).await {
            if leaks(&row) {
                found.push(format!("{svc:?} table {table}: {row}"));
            }
        }
    }
    for (queue, payload, props) in sys.queued_messages().await {
        if leaks(&payload) || leaks(&props) {
            found.push(format!("queue {queue}: {payload} {props}"));
        }
    }
    let logs =
        String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(logs.contains("order created"), "the logs were not captured");
    // Not `leaks`: log lines legitimately name the field (`payment_info.cvv
    // must be 3 or 4 digits`); its value must never appear.
    let leaks_in_log = |line: &str| {
        let digits: String = line.chars().filter(char::is_ascii_digit).collect();
        line.contains(PAN)
            || digits.contains(PAN_DIGITS)
            || line.contains(&format!("\"{CVV}\""))
            || line.contains(&format!("\\\"{CVV}\\\""))
    };
    for line in logs.lines().filter(|l| leaks_in_log(l)) {
        found.push(format!("log: {line}"));
    }
    assert!(found.is_empty(), "card data at rest:\n{}", found.join("\n"));
    sys.shutdown().await;
}
