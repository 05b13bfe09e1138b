//! The contract on the wire: a spy queue bound to `#` on the test's own
//! `saga.events` captures every message while representative sagas run
//! (confirmed, with the mail relay down and up; insufficient funds; out of
//! stock; 3-D Secure confirmed; 3-D Secure never confirmed, cancelled at
//! its long deadline; a backorder filled; an email bounced), and each must
//! validate against its published schema — `docs/schemas/envelope.json`
//! (open, and closed: no undocumented field) or `order.requested.json` —
//! with its AMQP properties and headers as `docs/asyncapi.yaml` describes
//! them. The result dicts replied to `reply_to` must validate against
//! `order.result.json` (open, and closed), with their AMQP properties as
//! the document describes them. Every event type must have been seen.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::messaging::delivery::header;
use common::messaging::events::EventType;
use lapin::message::Delivery;
use lapin::{BasicProperties, Connection};
use saga_tests::smtp::DownRelay;
use saga_tests::{Svc, Tap, TestSystem, eventually, order_dict, order_with_card};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

use crate::schemas::{Contract, errors};

const THREE_D_SECURE: &str = "4000 0000 0000 3220";
const SETTLE: Duration = Duration::from_secs(20);

/// A message as it was on the wire.
#[derive(Debug, Clone)]
struct Captured {
    routing_key: String,
    /// The AMQP properties, by their names in `docs/asyncapi.yaml`.
    properties: Value,
    /// The AMQP headers table (string values).
    headers: Value,
    body: Vec<u8>,
}

impl Captured {
    fn of(d: &Delivery) -> Captured {
        let p = &d.properties;
        let mut props = Map::new();
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
        for (name, value) in [
            ("message_id", text(p.message_id())),
            ("correlation_id", text(p.correlation_id())),
            ("type", text(p.kind())),
            ("content_type", text(p.content_type())),
            ("reply_to", text(p.reply_to())),
            ("app_id", text(p.app_id())),
            ("user_id", text(p.user_id())),
            ("delivery_mode", p.delivery_mode().map(Value::from)),
            ("timestamp", p.timestamp().map(Value::from)),
        ] {
            if let Some(value) = value {
                props.insert(name.to_owned(), value);
            }
        }
        let table = p.headers().clone().unwrap_or_default();
        let headers: Map<String, Value> = table
            .inner()
            .keys()
            .map(|k| {
                let name = k.as_str();
                let value = header(&table, name).map_or(Value::Null, Value::from);
                (name.to_owned(), value)
            })
            .collect();
        Captured {
            routing_key: d.routing_key.as_str().to_owned(),
            properties: Value::Object(props),
            headers: Value::Object(headers),
            body: d.data.clone(),
        }
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The saga it belongs to (an event's `correlation_id`).
    fn order_id(&self) -> Option<&str> {
        self.properties["correlation_id"].as_str()
    }
}

/// The spy: a queue of the test's own bound to `#` on `saga.events`,
/// drained into `seen` by a task.
struct Spy {
    seen: Arc<Mutex<Vec<Captured>>>,
    task: JoinHandle<()>,
}

impl Spy {
    async fn start(conn: &Connection) -> Spy {
        let mut tap = Tap::new(conn, &["#"]).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match tap.next(Duration::from_secs(60)).await {
                    Some(d) => sink.lock().unwrap().push(Captured::of(&d)),
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Spy { seen, task }
    }

    fn all(&self) -> Vec<Captured> {
        self.seen.lock().unwrap().clone()
    }

    fn has(&self, event: EventType, order_id: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.routing_key == event.routing_key() && c.order_id() == Some(order_id))
    }

    async fn wait_for(&self, event: EventType, order_id: &str) {
        eventually(SETTLE, &format!("{event} of {order_id}"), || async {
            self.has(event, order_id).then_some(())
        })
        .await;
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client placing orders over AMQP, as docs/events.md says, each with a
/// reply queue of its own; every reply is kept for validation.
struct Client<'a> {
    sys: &'a TestSystem,
    conn: Connection,
    replies: Vec<Captured>,
}

/// An order placed, waiting for its replies.
struct Placed {
    replies: Tap,
}

impl Client<'_> {
    async fn place(&mut self, key: &str, order: &Value) -> Placed {
        let (queue, replies) = Tap::reply_queue(&self.conn).await;
        self.sys
            .publish(
                &self.conn,
                "order.requested",
                &serde_json::to_vec(order).unwrap(),
                BasicProperties::default()
                    .with_message_id(key.into())
                    .with_correlation_id(format!("corr-{key}").as_str().into())
                    .with_reply_to(queue.as_str().into()),
            )
            .await;
        Placed { replies }
    }

    /// The next reply to `placed`: its result dict.
    async fn reply(&mut self, placed: &mut Placed, timeout: Duration) -> Value {
        let d = placed.replies.next(timeout).await.expect("a reply");
        let captured = Captured::of(&d);
        let result = captured.json().expect("a JSON reply");
        self.replies.push(captured);
        result
    }

    /// Places `order` and returns its first reply.
    async fn order(&mut self, key: &str, order: &Value) -> (Placed, Value) {
        let mut placed = self.place(key, order).await;
        let result = self.reply(&mut placed, Duration::from_secs(10)).await;
        (placed, result)
    }
}

fn order_id(result: &Value) -> String {
    result["order_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no order_id in {result}"))
        .to_owned()
}

async fn gateway_confirms(sys: &TestSystem, order_id: &str) {
    let r = sys
        .http
        .post(format!(
            "{}/payments/{order_id}/confirm",
            sys.url(Svc::Payment)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "confirming {order_id}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_message_on_the_wire_matches_its_published_schema() {
    // The mail relay, down (its port held but refusing connections) until
    // it is started on that same port below.
    let relay = DownRelay::reserve();
    let sys = TestSystem::builder()
        .long_deadline_ms(8_000)
        .smtp_url(&relay.url())
        .spawn()
        .await;
    let conn = sys.amqp().await;
    let spy = Spy::start(&conn).await;

    sys.set_price("productA", 1500).await;
    sys.set_price("productB", 700).await;
    sys.set_price("productC", 2500).await;
    sys.set_stock("productA", 100).await;
    sys.set_stock("productB", 1).await;
    sys.put(
        Svc::Inventory,
        "/items/productC",
        json!({"available": 0, "backorderable": true}),
    )
    .await;
    sys.set_balance("rich", 10_000_000).await;
    sys.set_balance("poor", 100).await;
    sys.set_balance("bouncy", 1_000_000).await;
    sys.set_email("bouncy", "bouncy@mail.invalid").await;

    let mut client = Client {
        sys: &sys,
        conn: sys.amqp().await,
        replies: Vec::new(),
    };

    // 3-D Secure never confirmed: cancelled at its long deadline (8 s),
    // while the others run.
    let (mut never_confirmed, pending) = client
        .order(
            "never-confirmed",
            &order_with_card("rich", &[("productA", 1)], THREE_D_SECURE),
        )
        .await;
    assert_eq!(pending["status"], "pending", "{pending}");
    let cancelled_id = order_id(&pending);

    // Confirmed with the mail relay down: the email is deferred.
    let (_, result) = client
        .order("relay-down", &order_dict("rich", &[("productA", 1)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    let deferred_id = order_id(&result);
    spy.wait_for(EventType::NotificationDeferred, &deferred_id)
        .await;
    // The relay is back; the queued email goes out.
    let _smtp = relay.start();
    eventually(SETTLE, "the queued email sent", || async {
        (sys.email_kinds(&deferred_id).await == ["confirmation"]).then_some(())
    })
    .await;

    // Confirmed, the email sent.
    let (_, result) = client
        .order("happy", &order_dict("rich", &[("productA", 2)]))
        .await;
    assert_eq!(result["status"], "success", "{result}");
    spy.wait_for(EventType::NotificationSent, &order_id(&result))
        .await;

    // Insufficient funds.
    let (_, result) = client
        .order("poor", &order_dict("poor", &[("productA", 1)]))
        .await;
    assert_eq!(result["error"], "Payment failed", "{result}");

    // Out of stock (charged, then refunded).
    let (_, result) = client
        .order("out-of-stock", &order_dict("rich", &[("productB", 5)]))
        .await;
    assert_eq!(result["error"], "Inventory reservation failed", "{result}");
    let out_of_stock_id = order_id(&result);

    // 3-D Secure, confirmed: pending, then success.
    let (mut placed, pending) = client
        .order(
            "3ds-confirmed",
            &order_with_card("rich", &[("productA", 1)], THREE_D_SECURE),
        )
        .await;
    assert_eq!(pending["status"], "pending", "{pending}");
    gateway_confirms(&sys, &order_id(&pending)).await;
    let result = client.reply(&mut placed, SETTLE).await;
    assert_eq!(result["status"], "success", "{result}");

    // A backorder: pending until the stock arrives.
    let (mut placed, pending) = client
        .order("backorder", &order_dict("rich", &[("productC", 2)]))
        .await;
    assert_eq!(pending["next"]["step"], "stock_arrival", "{pending}");
    sys.put(Svc::Inventory, "/items/productC", json!({"available": 5}))
        .await;
    let result = client.reply(&mut placed, SETTLE).await;
    assert_eq!(result["status"], "success", "{result}");

    // The confirmation email bounces: the saga fails and is rolled back.
    let (_, result) = client
        .order("bounce", &order_dict("bouncy", &[("productA", 1)]))
        .await;
    assert_eq!(result["error"], "Notification failed", "{result}");
    let bounced_id = order_id(&result);

    // The never-confirmed one, at its long deadline.
    let result = client.reply(&mut never_confirmed, SETTLE).await;
    assert_eq!(result["error"], "Order timed out", "{result}");

    // The compensations.
    spy.wait_for(EventType::OrderCancelled, &cancelled_id).await;
    spy.wait_for(EventType::InventoryReleased, &cancelled_id)
        .await;
    spy.wait_for(EventType::PaymentRefunded, &out_of_stock_id)
        .await;
    spy.wait_for(EventType::PaymentRefunded, &bounced_id).await;
    spy.wait_for(EventType::InventoryReleased, &bounced_id)
        .await;
    // Whatever is still on its way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let captured = spy.all();

    // Every event type was produced.
    let seen: BTreeSet<&str> = captured.iter().map(|c| c.routing_key.as_str()).collect();
    let missing: Vec<&str> = EventType::ALL
        .iter()
        .map(|t| t.routing_key())
        .filter(|k| !seen.contains(k))
        .collect();
    assert!(missing.is_empty(), "never seen on the wire: {missing:?}");

    // Every message matches its contract.
    let contract = Contract::load();
    let mut failures = Vec::new();
    for c in &captured {
        for problem in check_event(&contract, c) {
            failures.push(format!(
                "{} (message_id {}): {problem}\n  body: {}",
                c.routing_key,
                c.properties["message_id"],
                String::from_utf8_lossy(&c.body)
            ));
        }
    }
    for r in &client.replies {
        for problem in check_reply(&contract, r) {
            failures.push(format!(
                "reply {}: {problem}\n  body: {}",
                r.properties["correlation_id"],
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} messages break the published contract:\n{}",
        failures.len(),
        captured.len() + client.replies.len(),
        failures.join("\n")
    );
    assert!(client.replies.len() >= 10, "{}", client.replies.len());

    // The check has teeth on real traffic: a real order.created without
    // its sealed card, or with a field nobody documented, is refused.
    let created = captured
        .iter()
        .find(|c| c.routing_key == "order.created")
        .unwrap();
    let mut body = created.json().unwrap();
    body["data"]["payment"]
        .as_object_mut()
        .unwrap()
        .remove("sealed");
    assert!(!contract.envelope.is_valid(&body));
    let mut body = created.json().unwrap();
    body["data"]["coupon"] = "SAVE10".into();
    assert!(contract.envelope.is_valid(&body));
    assert!(!contract.envelope_strict.is_valid(&body));
    // Nor does a real reply with a field nobody documented pass.
    for reply in &client.replies {
        let mut body = reply.json().unwrap();
        body["coupon"] = "SAVE10".into();
        assert!(contract.order_result.is_valid(&body), "{body}");
        assert!(!contract.order_result_strict.is_valid(&body), "{body}");
    }
    sys.shutdown().await;
}

/// What is wrong with a message captured on `saga.events`.
fn check_event(contract: &Contract, c: &Captured) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(event_type) = EventType::from_routing_key(&c.routing_key) else {
        return vec!["a routing key not in the catalogue".to_owned()];
    };
    let Some(body) = c.json() else {
        return vec!["the body is not JSON".to_owned()];
    };
    if event_type == EventType::OrderRequested {
        problems.extend(
            errors(&contract.order_requested, &body)
                .into_iter()
                .map(|e| format!("order.requested.json: {e}")),
        );
        problems.extend(
            errors(&contract.request_properties, &c.properties)
                .into_iter()
                .map(|e| format!("AMQP properties: {e}")),
        );
        return problems;
    }
    problems.extend(contract.envelope_errors(event_type, &body));
    problems.extend(
        errors(&contract.event_properties, &c.properties)
            .into_iter()
            .map(|e| format!("AMQP properties: {e}")),
    );
    problems.extend(
        errors(&contract.event_headers, &c.headers)
            .into_iter()
            .map(|e| format!("headers: {e}")),
    );
    // What the AsyncAPI document says the properties equal.
    let props = &c.properties;
    for (property, field) in [
        ("message_id", "event_id"),
        ("correlation_id", "order_id"),
        ("type", "event_type"),
        ("app_id", "producer"),
    ] {
        if props[property] != body[field] {
            problems.push(format!(
                "AMQP {property} {} is not the envelope's {field} {}",
                props[property], body[field]
            ));
        }
    }
    if body["event_type"] != c.routing_key.as_str() {
        problems.push("routed with another key than its event_type".to_owned());
    }
    let trace = c.headers["traceparent"].as_str().unwrap_or_default();
    let order = body["order_id"]
        .as_str()
        .unwrap_or_default()
        .replace('-', "");
    if !trace.starts_with(&format!("00-{order}-")) {
        problems.push(format!("traceparent {trace:?} does not carry the order id"));
    }
    problems
}

/// What is wrong with a result dict replied to `reply_to`.
fn check_reply(contract: &Contract, r: &Captured) -> Vec<String> {
    let Some(body) = r.json() else {
        return vec!["the body is not JSON".to_owned()];
    };
    let mut problems = contract.result_errors(&body);
    problems.extend(
        errors(&contract.reply_properties, &r.properties)
            .into_iter()
            .map(|e| format!("AMQP properties: {e}")),
    );
    problems
}
