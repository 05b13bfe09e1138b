//! The invariants of a run, checked through the services' public query
//! endpoints (so they hold for any deployment the benchmark can reach):
//!
//! - every order got the answer its kind calls for, exactly: normal orders
//!   confirmed, the customer without money failed with "Insufficient
//!   funds", the sold-out item failed with "Out of stock: sold-out …";
//! - each order's state in every service matches: a confirmed one is
//!   charged its amount, its stock committed, its confirmation sent; a
//!   declined one has no charge, no reservation, no email; an out-of-stock
//!   one is refunded, its reservation rejected, no email;
//! - stock and money add up: every item's `available` fell by exactly the
//!   units confirmed, nothing is left `held`, every balance fell by exactly
//!   what its confirmed orders cost.
//!
//! Compensations land a moment after the answers, so the check is repeated
//! until it holds or `settle_timeout` passes; the time it took is the
//! settle time.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::time::Instant;

use super::driver::Sample;
use super::target::Target;
use super::workload::{Kind, initial_balance, initial_stock};

/// What the check found.
#[derive(Debug, Default)]
pub struct Checked {
    pub confirmed: usize,
    pub failed: usize,
    pub violations: Vec<String>,
    /// From the start of the check until everything held (zero if it held
    /// at the first look).
    pub settle: Duration,
}

/// What a kind of order must have been told: (status, error, reason prefix).
fn expected_answer(kind: Kind) -> (&'static str, &'static str, &'static str) {
    match kind {
        Kind::Normal => ("success", "", ""),
        Kind::Poor => ("failure", "Payment failed", "Insufficient funds"),
        Kind::SoldOut => (
            "failure",
            "Inventory reservation failed",
            "Out of stock: sold-out",
        ),
    }
}

async fn get(http: &reqwest::Client, url: String) -> Option<Value> {
    let r = http.get(url).send().await.ok()?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Some(Value::Null);
    }
    r.error_for_status().ok()?.json().await.ok()
}

/// Problems with one order's state across the services (empty: fine).
async fn check_order(http: &reqwest::Client, t: &Target, s: &Sample) -> Vec<String> {
    let mut v = Vec::new();
    // A failure dict may not name its order: find it by the key.
    let found;
    let id = match s.result["order_id"].as_str() {
        Some(id) => id,
        None => {
            found = get(
                http,
                format!("{}/orders?idempotency_key={}", t.order_urls[0], s.key),
            )
            .await;
            match found.as_ref().and_then(|o| o["order_id"].as_str()) {
                Some(id) => id,
                None => {
                    return vec![format!(
                        "order {} ({:?}): not found by its key",
                        s.order.index, s.order.kind
                    )];
                }
            }
        }
    };
    let told_success = s.result["status"] == "success";
    let fetch = |url: String| get(http, url);
    let (order, payment, reservation, emails) = tokio::join!(
        fetch(format!("{}/orders/{id}", t.order_urls[0])),
        fetch(format!("{}/payments/{id}", t.payment_url)),
        fetch(format!("{}/reservations/{id}", t.inventory_url)),
        fetch(format!("{}/emails?order_id={id}", t.notification_url)),
    );
    let (Some(order), Some(payment), Some(reservation), Some(emails)) =
        (order, payment, reservation, emails)
    else {
        return vec![format!("order {id}: a service did not answer")];
    };
    let status = order["status"].as_str().unwrap_or("missing");
    let payment = payment["status"].as_str().unwrap_or("none");
    let reservation = reservation["status"].as_str().unwrap_or("none");
    let kinds: Vec<&str> = emails
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    if told_success {
        if status != "CONFIRMED" {
            v.push(format!("order {id}: told success, but {status}"));
        }
        if payment != "charged" {
            v.push(format!("confirmed order {id}: payment {payment}"));
        }
        if reservation != "committed" {
            v.push(format!("confirmed order {id}: reservation {reservation}"));
        }
        if kinds != ["confirmation"] {
            v.push(format!("confirmed order {id}: emails {kinds:?}"));
        }
    } else {
        if status != "FAILED" {
            v.push(format!("order {id}: told failure, but {status}"));
        }
        if payment == "charged" {
            v.push(format!("failed order {id}: payment still charged"));
        }
        if matches!(reservation, "held" | "committed") {
            v.push(format!("failed order {id}: reservation {reservation}"));
        }
        let confirmations = kinds.iter().filter(|k| **k == "confirmation").count();
        let cancellations = kinds.iter().filter(|k| **k == "cancellation").count();
        if confirmations > cancellations {
            v.push(format!(
                "failed order {id}: confirmation without cancellation"
            ));
        }
        match s.order.kind {
            Kind::Poor if payment != "declined" => {
                v.push(format!("poor order {id}: payment {payment}, expected declined"))
            }
            Kind::SoldOut if payment != "refunded" || reservation != "rejected" => v.push(format!(
                "sold-out order {id}: payment {payment}, reservation {reservation}; expected refunded, rejected"
            )),
            _ => {}
        }
    }
    v
}

/// Checks the run's orders (repeating until everything holds or the
/// timeout passes).
pub async fn check(
    http: &reqwest::Client,
    target: &Target,
    samples: &[Sample],
    settle_timeout: Duration,
) -> Checked {
    let started = Instant::now();
    let mut out = Checked::default();

    // The answers, exactly.
    for s in samples {
        let (status, error, reason) = expected_answer(s.order.kind);
        let told = s.result["status"].as_str().unwrap_or("?");
        if told == "success" {
            out.confirmed += 1;
        } else {
            out.failed += 1;
        }
        let matches = told == status
            && (status == "success"
                || (s.result["error"] == error
                    && s.result["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with(reason))));
        if !matches {
            out.violations.push(format!(
                "order {} ({:?}) was told {}",
                s.order.index, s.order.kind, s.result
            ));
        }
    }

    // Stock and money: what the confirmed orders took.
    let mut sold: HashMap<&str, i64> = HashMap::new();
    let mut spent: HashMap<&str, i64> = HashMap::new();
    for s in samples {
        for (item, _) in &s.order.lines {
            sold.entry(item).or_default();
        }
        spent.entry(&s.order.customer).or_default();
        if s.result["status"] == "success" {
            for (item, q) in &s.order.lines {
                *sold.entry(item).or_default() += q;
            }
            *spent.entry(&s.order.customer).or_default() += s.order.amount_cents();
        }
    }
    let stock = initial_stock();

    let mut pending: Vec<&Sample> = samples.iter().collect();
    let mut totals_ok = false;
    let mut last = Vec::new();
    let mut first_pass = true;
    loop {
        let results: Vec<(usize, Vec<String>)> =
            futures_util::stream::iter(pending.iter().enumerate())
                .map(|(n, s)| async move { (n, check_order(http, target, s).await) })
                .buffer_unordered(64)
                .collect()
                .await;
        let mut failing = Vec::new();
        last.clear();
        for (n, problems) in results {
            if !problems.is_empty() {
                failing.push(pending[n]);
                last.extend(problems);
            }
        }
        pending = failing;
        if !totals_ok {
            let problems = check_totals(http, target, &sold, &spent, &stock).await;
            totals_ok = problems.is_empty();
            last.extend(problems);
        }
        if pending.is_empty() && totals_ok {
            if first_pass {
                out.settle = Duration::ZERO;
                return out;
            }
            break;
        }
        first_pass = false;
        if started.elapsed() >= settle_timeout {
            out.violations.append(&mut last);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out.settle = started.elapsed();
    out
}

async fn check_totals(
    http: &reqwest::Client,
    t: &Target,
    sold: &HashMap<&str, i64>,
    spent: &HashMap<&str, i64>,
    stock: &HashMap<String, i64>,
) -> Vec<String> {
    let items = futures_util::stream::iter(sold.iter())
        .map(|(item, n)| async move {
            let v = get(http, format!("{}/items/{item}", t.inventory_url)).await;
            let want = stock.get(*item).copied().unwrap_or(0) - n;
            match v {
                Some(v)
                    if v["available"].as_i64() == Some(want) && v["held"].as_i64() == Some(0) =>
                {
                    None
                }
                Some(v) => Some(format!("{item}: {v}; expected available {want}, held 0")),
                None => Some(format!("{item}: not readable")),
            }
        })
        .buffer_unordered(64)
        .filter_map(|p| async move { p })
        .collect::<Vec<_>>();
    let accounts = futures_util::stream::iter(spent.iter())
        .map(|(customer, n)| async move {
            let v = get(http, format!("{}/accounts/{customer}", t.payment_url)).await;
            let want = initial_balance(customer) - n;
            match v {
                Some(v) if v["balance_cents"].as_i64() == Some(want) => None,
                Some(v) => Some(format!("{customer}: {v}; expected balance {want}")),
                None => Some(format!("{customer}: not readable")),
            }
        })
        .buffer_unordered(64)
        .filter_map(|p| async move { p })
        .collect::<Vec<_>>();
    let (mut a, b) = tokio::join!(items, accounts);
    a.extend(b);
    a
}
