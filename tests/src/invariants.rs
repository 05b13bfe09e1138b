//! The end state of a run, checked from each service's own database: every
//! order decided, each outcome fully applied or fully compensated, stock and
//! money adding up, clients told the truth, nothing parked but what was
//! expected, no escalation open. Used by the chaos test and the benchmark.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::{Sandbox, Svc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use sqlx::PgConnection;
use tokio::time::Instant;
use uuid::Uuid;

/// What a client placed (its idempotency key) and what it was told.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The idempotency key; for a keyless request, a label of the client's.
    pub key: String,
    /// Placed without an idempotency key (its order is known by the id in
    /// its answer, if it got one).
    pub keyless: bool,
    pub over_http: bool,
    /// The result dict (HTTP only), if the client got one: the final one,
    /// for an order that was pending first.
    pub result: Option<Value>,
}

/// What the end state is checked against.
pub struct Expected<'a> {
    /// Every stocked item and its initial `available`.
    pub initial_stock: &'a HashMap<String, i64>,
    /// A customer's balance before the run.
    pub initial_balance: &'a (dyn Fn(&str) -> i64 + Sync),
    /// Messages that must end up parked (poison injected on purpose).
    pub parked: u32,
    /// What the mail relay received, when the services used one: the
    /// truth about confirmations and cancellations (one the relay took
    /// whose answer was lost is in no database).
    pub relay: Option<&'a [crate::smtp::ReceivedEmail]>,
}

async fn count(sandbox: &Sandbox, svc: Svc, sql: &'static str) -> Option<i64> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut pg = sandbox.pg_try(svc).await?;
        sqlx::query_scalar(sql).fetch_one(&mut pg).await.ok()
    })
    .await
    .ok()?
}

/// Messages still queued in the services' queues and delay queues.
async fn queued(amqp_url: &str) -> Option<u32> {
    tokio::time::timeout(Duration::from_secs(10), queued_now(amqp_url))
        .await
        .ok()?
}

async fn queued_now(amqp_url: &str) -> Option<u32> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .ok()?;
    let ch = conn.create_channel().await.ok()?;
    let mut total = 0;
    for svc in Svc::ALL {
        let id = svc.identity();
        let names = std::iter::once(id.queue())
            .chain((0..common::messaging::retry::RETRY_TIERS.len()).map(|t| id.retry_queue(t)));
        for name in names {
            let q = ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()?;
            total += q.message_count();
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Some(total)
}

/// Waits until every placed order exists and is decided, every outbox is
/// published and every queue is empty (three checks in a row).
pub async fn wait_until_settled(
    sys: &Sandbox,
    placed: &[Placed],
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let keys: Vec<String> = placed
        .iter()
        .filter(|p| !p.keyless && (!p.over_http || p.result.is_some()))
        .map(|p| p.key.clone())
        .collect();
    let keyless: Vec<Uuid> = placed
        .iter()
        .filter(|p| p.keyless)
        .filter_map(|p| p.result.as_ref()?["order_id"].as_str()?.parse().ok())
        .collect();
    let mut quiet = 0;
    let mut last = String::new();
    while started.elapsed() < timeout {
        let pending = count(
            sys,
            Svc::Order,
            "select count(*) from orders where status = 'PENDING'",
        )
        .await;
        let mut unpublished = Some(0);
        for svc in Svc::ALL {
            let n = count(
                sys,
                svc,
                "select count(*) from outbox where published_at is null",
            )
            .await;
            unpublished = unpublished.zip(n).map(|(a, b)| a + b);
        }
        let present = match sys.pg_try(Svc::Order).await {
            Some(mut pg) => sqlx::query_scalar::<_, i64>(
                "select count(*) from orders where idempotency_key = any($1) or order_id = any($2)",
            )
            .bind(&keys)
            .bind(&keyless)
            .fetch_one(&mut pg)
            .await
            .ok(),
            None => None,
        };
        let queued = queued(&sys.amqp_url).await;
        last = format!(
            "pending orders {pending:?}, orders present {present:?} of {}, unpublished outbox rows {unpublished:?}, queued messages {queued:?}",
            keys.len() + keyless.len()
        );
        let settled = pending == Some(0)
            && present == Some((keys.len() + keyless.len()) as i64)
            && unpublished == Some(0)
            && queued == Some(0);
        quiet = if settled { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("not settled after {timeout:?}: {last}"))
}

/// What the databases hold at the end.
#[derive(Debug, Default)]
pub struct Tally {
    pub orders: usize,
    pub confirmed: usize,
    pub failed: usize,
    pub parked: u32,
    pub escalations: i64,
}

async fn pg(sandbox: &Sandbox, svc: Svc) -> PgConnection {
    sandbox.pg(svc).await
}

/// Checks every invariant; returns the tally and the violations found.
pub async fn check(
    sys: &Sandbox,
    placed: &[Placed],
    expected: &Expected<'_>,
) -> (Tally, Vec<String>) {
    let mut v = Vec::new();
    let mut tally = Tally::default();

    type OrderRow = (
        Uuid,
        String,
        String,
        Option<String>,
        i64,
        sqlx::types::Json<Vec<common::saga::order::OrderLine>>,
    );
    let orders: Vec<OrderRow> = sqlx::query_as(
        "select order_id, customer_id, status, idempotency_key, amount_cents, items from orders",
    )
    .fetch_all(&mut pg(sys, Svc::Order).await)
    .await
    .unwrap();
    let payments: HashMap<Uuid, (String, i64, String)> =
        sqlx::query_as::<_, (Uuid, String, i64, String)>(
            "select order_id, customer_id, amount_cents, status from payments",
        )
        .fetch_all(&mut pg(sys, Svc::Payment).await)
        .await
        .unwrap()
        .into_iter()
        .map(|(o, c, a, s)| (o, (c, a, s)))
        .collect();
    let balances: HashMap<String, i64> =
        sqlx::query_as("select customer_id, balance_cents from accounts")
            .fetch_all(&mut pg(sys, Svc::Payment).await)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let reservations: HashMap<Uuid, String> =
        sqlx::query_as("select order_id, status from reservations")
            .fetch_all(&mut pg(sys, Svc::Inventory).await)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let stock: HashMap<String, (i32, i32)> =
        sqlx::query_as::<_, (String, i32, i32)>("select item_id, available, held from stock")
            .fetch_all(&mut pg(sys, Svc::Inventory).await)
            .await
            .unwrap()
            .into_iter()
            .map(|(i, a, h)| (i, (a, h)))
            .collect();
    let mut emails: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (order_id, kind) in sqlx::query_as::<_, (Uuid, String)>("select order_id, kind from emails")
        .fetch_all(&mut pg(sys, Svc::Notification).await)
        .await
        .unwrap()
    {
        emails.entry(order_id).or_default().push(kind);
    }

    let mut sold: HashMap<String, i64> = HashMap::new();
    let mut spent: HashMap<String, i64> = HashMap::new();
    let known: HashSet<Uuid> = orders.iter().map(|o| o.0).collect();
    tally.orders = orders.len();
    for (id, customer, status, _, amount, items) in &orders {
        let payment = payments.get(id).map(|p| p.2.as_str());
        let reservation = reservations.get(id).map(String::as_str);
        let kinds = emails.get(id).cloned().unwrap_or_default();
        let confirmations = kinds.iter().filter(|k| *k == "confirmation").count();
        let cancellations = kinds.iter().filter(|k| *k == "cancellation").count();
        match status.as_str() {
            "CONFIRMED" => {
                tally.confirmed += 1;
                if payment != Some("charged") || payments[id].1 != *amount {
                    // What the order saw of its saga, to tell where the
                    // charge went.
                    let timeline: Option<String> =
                        sqlx::query_scalar("select timeline::text from orders where order_id = $1")
                            .bind(id)
                            .fetch_optional(&mut pg(sys, Svc::Order).await)
                            .await
                            .ok()
                            .flatten();
                    v.push(format!(
                        "confirmed order {id}: payment {payment:?}; timeline {}",
                        timeline.unwrap_or_default()
                    ));
                }
                if reservation != Some("committed") {
                    v.push(format!("confirmed order {id}: reservation {reservation:?}"));
                }
                if (confirmations, cancellations) != (1, 0) {
                    v.push(format!("confirmed order {id}: emails {kinds:?}"));
                }
                for line in items.iter() {
                    *sold.entry(line.item_id.clone()).or_default() += i64::from(line.quantity);
                }
                *spent.entry(customer.clone()).or_default() += amount;
            }
            "FAILED" => {
                tally.failed += 1;
                if payment == Some("charged") {
                    v.push(format!("failed order {id}: payment still charged"));
                }
                if matches!(reservation, Some("held") | Some("committed")) {
                    v.push(format!("failed order {id}: reservation {reservation:?}"));
                }
                if confirmations > cancellations {
                    v.push(format!(
                        "failed order {id}: confirmation without cancellation ({kinds:?})"
                    ));
                }
            }
            other => v.push(format!("order {id} is {other}")),
        }
    }
    // Nothing applied for an order order-svc does not know.
    for (id, p) in &payments {
        if !known.contains(id) && p.2 == "charged" {
            v.push(format!("payment {id} charged for an unknown order"));
        }
    }
    for (id, r) in &reservations {
        if !known.contains(id) && matches!(r.as_str(), "held" | "committed") {
            v.push(format!("reservation {id} {r} for an unknown order"));
        }
    }
    // Stock and money add up.
    for (item, initial) in expected.initial_stock {
        let (available, held) = stock.get(item).copied().unwrap_or_default();
        let want = initial - sold.get(item).copied().unwrap_or(0);
        if i64::from(available) != want || held != 0 {
            v.push(format!(
                "{item}: available {available}, held {held}; expected {want}, 0"
            ));
        }
    }
    // Every saga is decided: nothing is held or waits for stock any more.
    for (item, (_, held)) in &stock {
        if *held != 0 && !expected.initial_stock.contains_key(item) {
            v.push(format!("{item}: {held} units still held"));
        }
    }
    for (id, r) in &reservations {
        if matches!(r.as_str(), "held" | "backordered") {
            v.push(format!(
                "reservation {id} still {r} with every saga decided"
            ));
        }
    }
    let customers: HashSet<&String> = balances.keys().chain(spent.keys()).collect();
    for c in customers {
        let initial = (expected.initial_balance)(c);
        let want = initial - spent.get(c).copied().unwrap_or(0);
        let actual = balances.get(c).copied().unwrap_or(initial);
        if actual != want {
            v.push(format!("{c}: balance {actual}, expected {want}"));
        }
    }
    // What clients were told matches what happened.
    let by_key: HashMap<&str, &str> = orders
        .iter()
        .filter_map(|o| Some((o.3.as_deref()?, o.2.as_str())))
        .collect();
    let by_id: HashMap<String, &str> = orders
        .iter()
        .map(|o| (o.0.to_string(), o.2.as_str()))
        .collect();
    for p in placed {
        let Some(result) = &p.result else { continue };
        let told = result["status"].as_str().unwrap_or("?");
        let status = if p.keyless {
            result["order_id"]
                .as_str()
                .and_then(|id| by_id.get(id).copied())
        } else {
            by_key.get(p.key.as_str()).copied()
        };
        let agrees = matches!(
            (told, status),
            ("success", Some("CONFIRMED")) | ("failure", Some("FAILED"))
        );
        if !agrees {
            v.push(format!(
                "client {} was told {result} but the order is {status:?}",
                p.key
            ));
        }
    }
    // What the relay received: never a confirmation alone for a failed
    // order (a cancellation after it), never a cancellation of a confirmed
    // one.
    if let Some(relay) = expected.relay {
        // Each email names its order in full in its body.
        let ids: Vec<(String, Uuid)> = orders.iter().map(|o| (o.0.to_string(), o.0)).collect();
        let mut seen: HashMap<Uuid, Vec<&str>> = HashMap::new();
        for email in relay {
            let kind = if email.subject().ends_with("is confirmed") {
                "confirmation"
            } else {
                "cancellation"
            };
            if let Some((_, id)) = ids
                .iter()
                .find(|(text, _)| email.data.contains(text.as_str()))
            {
                seen.entry(*id).or_default().push(kind);
            }
        }
        for (id, kinds) in &seen {
            let status = orders
                .iter()
                .find(|o| o.0 == *id)
                .map_or("?", |o| o.2.as_str());
            let first_confirmation = kinds.iter().position(|k| *k == "confirmation");
            let last_cancellation = kinds.iter().rposition(|k| *k == "cancellation");
            match status {
                "FAILED"
                    if first_confirmation.is_some() && last_cancellation < first_confirmation =>
                {
                    v.push(format!(
                        "failed order {id}: the relay got a confirmation and no cancellation after it ({kinds:?})"
                    ));
                }
                "CONFIRMED" if last_cancellation.is_some() => {
                    v.push(format!(
                        "confirmed order {id}: the relay got a cancellation ({kinds:?})"
                    ));
                }
                _ => {}
            }
        }
    }
    // Only the injected poison is parked; no compensation is left escalated.
    let conn = Connection::connect(&sys.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for svc in Svc::ALL {
        let q = ch
            .queue_declare(
                svc.identity().parking_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        tally.parked += q.message_count();
    }
    let _ = conn.close(200, "done".into()).await;
    if tally.parked != expected.parked {
        v.push(format!(
            "{} messages parked, but {} were expected (injected poison)",
            tally.parked, expected.parked
        ));
    }
    for svc in Svc::ALL {
        tally.escalations += count(
            sys,
            svc,
            "select count(*) from escalations where status <> 'resolved'",
        )
        .await
        .unwrap_or(-1);
    }
    if tally.escalations != 0 {
        v.push(format!("{} escalations open", tally.escalations));
    }
    (tally, v)
}
