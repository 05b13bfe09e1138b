//! Setting the workload up through the services' public set-up endpoints:
//! prices in order-svc's catalog, stock in inventory-svc, balances in
//! payment-svc. Every value is absolute, so a run can be repeated against
//! the same deployment: each run first resets what its orders touch.

use std::collections::BTreeSet;

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use super::target::Target;
use super::workload::{Order, PRICE, initial_balance, initial_stock};

/// Prices, stock and balances for every item and customer `orders` name.
pub async fn reset(
    http: &reqwest::Client,
    target: &Target,
    orders: &[Order],
) -> anyhow::Result<()> {
    let items: BTreeSet<&str> = orders
        .iter()
        .flat_map(|o| o.lines.iter().map(|(i, _)| i.as_str()))
        .collect();
    let customers: BTreeSet<&str> = orders.iter().map(|o| o.customer.as_str()).collect();
    let stock = initial_stock();
    let mut puts: Vec<(String, Value)> = Vec::new();
    for item in &items {
        let available = stock.get(*item).copied().unwrap_or(0);
        puts.push((
            format!("{}/catalog/{item}", target.order_urls[0]),
            json!({ "price_cents": PRICE }),
        ));
        puts.push((
            format!("{}/items/{item}", target.inventory_url),
            json!({ "available": available }),
        ));
    }
    for customer in &customers {
        puts.push((
            format!("{}/accounts/{customer}", target.payment_url),
            json!({ "balance_cents": initial_balance(customer) }),
        ));
    }
    let failures: Vec<String> = futures_util::stream::iter(puts)
        .map(|(url, body)| async move {
            match http.put(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("PUT {url}: {}", r.status())),
                Err(e) => Some(format!("PUT {url}: {e}")),
            }
        })
        .buffer_unordered(64)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    if let Some(first) = failures.first() {
        anyhow::bail!(
            "setting up the workload failed ({} requests), e.g. {first}",
            failures.len()
        );
    }
    Ok(())
}
