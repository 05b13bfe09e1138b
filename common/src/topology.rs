//! The broker topology: who consumes what, and the queues that carry it.
//!
//! Every service declares the *whole* topology when it connects, not just its
//! own queues. An event published before its consumer ever started then waits
//! in that consumer's durable queue instead of being dropped as unroutable,
//! whatever order the services start in. Declarations are idempotent.
//!
//! Per service `S` (e.g. `payment-svc`):
//! - `S.events` — quorum queue bound to `saga.events` with the routing keys
//!   `S` reacts to. Manual acks, bounded prefetch. A message delivered more
//!   than [`DELIVERY_LIMIT`] times (a handler that crashes the process every
//!   time) is dead-lettered to `S.parking` by the broker itself.
//! - `S.retry.<delay>` — delay queues for transient failures: a message is
//!   re-published there with a per-message TTL and dead-letters back into
//!   `S.events` when it expires. Several tiers, so a long delay never holds a
//!   short one behind it.
//! - `S.parking` — the parking lot (dead-letter queue): messages that cannot
//!   be handled, with the reason in their `x-parked-reason` header. Nothing
//!   consumes it; an operator inspects it in the management UI.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::events::{EXCHANGE, EventType};

/// Deliveries of one message after which the broker parks it (crash loops).
pub const DELIVERY_LIMIT: i64 = 10;

/// The delay tiers of the retry queues; attempt `n` (1-based) waits in tier
/// `min(n - 1, last)`, plus up to 50 % jitter.
pub const RETRY_TIERS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// A service of the saga: its name, its default database and port, and the
/// events it consumes.
#[derive(Debug, Clone, Copy)]
pub struct ServiceIdentity {
    /// Binary, queue-prefix and metrics-label name, e.g. `payment-svc`.
    pub name: &'static str,
    /// Default PostgreSQL database name.
    pub database: &'static str,
    /// Default HTTP port on 127.0.0.1.
    pub http_port: u16,
    /// Routing keys bound to the service's queue.
    pub consumes: &'static [EventType],
}

impl ServiceIdentity {
    pub fn queue(&self) -> String {
        format!("{}.events", self.name)
    }

    pub fn parking_queue(&self) -> String {
        format!("{}.parking", self.name)
    }

    pub fn retry_queue(&self, tier: usize) -> String {
        format!("{}.retry.{}", self.name, tier_label(RETRY_TIERS[tier]))
    }
}

fn tier_label(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

pub const ORDER_SVC: ServiceIdentity = ServiceIdentity {
    name: "order-svc",
    database: "orders",
    http_port: 8080,
    // Every step's outcome: failures decide the saga, successes build the
    // timeline, notification.sent confirms it.
    consumes: &[
        EventType::OrderRequested,
        EventType::PaymentCompleted,
        EventType::PaymentFailed,
        EventType::PaymentRefunded,
        EventType::InventoryReserved,
        EventType::InventoryFailed,
        EventType::InventoryReleased,
        EventType::NotificationSent,
        EventType::NotificationFailed,
    ],
};

pub const PAYMENT_SVC: ServiceIdentity = ServiceIdentity {
    name: "payment-svc",
    database: "payments",
    http_port: 8081,
    consumes: &[
        EventType::OrderCreated,
        EventType::OrderFailed,
        EventType::OrderCancelled,
    ],
};

pub const INVENTORY_SVC: ServiceIdentity = ServiceIdentity {
    name: "inventory-svc",
    database: "inventory",
    http_port: 8082,
    consumes: &[
        EventType::PaymentCompleted,
        EventType::OrderConfirmed,
        EventType::OrderFailed,
        EventType::OrderCancelled,
    ],
};

pub const NOTIFICATION_SVC: ServiceIdentity = ServiceIdentity {
    name: "notification-svc",
    database: "notifications",
    http_port: 8083,
    consumes: &[
        EventType::InventoryReserved,
        EventType::OrderFailed,
        EventType::OrderCancelled,
    ],
};

/// The four services of the saga.
pub const SERVICES: [ServiceIdentity; 4] =
    [ORDER_SVC, PAYMENT_SVC, INVENTORY_SVC, NOTIFICATION_SVC];

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares the exchange and every service's queues and bindings.
pub async fn declare_all(channel: &Channel) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for svc in SERVICES {
        declare_service(channel, &svc).await?;
    }
    Ok(())
}

async fn declare_service(channel: &Channel, svc: &ServiceIdentity) -> Result<(), lapin::Error> {
    let quorum = ("x-queue-type", text("quorum"));
    // At-least-once dead-lettering: the source keeps a message until the
    // target queue confirms it (needs reject-publish overflow).
    let at_least_once = [
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ];

    channel
        .queue_declare(
            svc.parking_queue().into(),
            durable(),
            table(std::slice::from_ref(&quorum)),
        )
        .await?;

    let queue = svc.queue();
    let mut args = vec![
        quorum.clone(),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&svc.parking_queue())),
    ];
    args.extend(at_least_once.iter().cloned());
    channel
        .queue_declare(queue.as_str().into(), durable(), table(&args))
        .await?;
    for event in svc.consumes {
        channel
            .queue_bind(
                queue.as_str().into(),
                EXCHANGE.into(),
                event.routing_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }

    for tier in 0..RETRY_TIERS.len() {
        let mut args = vec![
            quorum.clone(),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&queue)),
        ];
        args.extend(at_least_once.iter().cloned());
        channel
            .queue_declare(svc.retry_queue(tier).into(), durable(), table(&args))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_a_consumer_so_none_is_unroutable() {
        for t in EventType::ALL {
            let consumed = SERVICES.iter().any(|s| s.consumes.contains(&t));
            assert!(consumed, "{t} has no consumer: it would be unroutable");
        }
    }

    #[test]
    fn queue_names_follow_the_documented_scheme() {
        assert_eq!(PAYMENT_SVC.queue(), "payment-svc.events");
        assert_eq!(PAYMENT_SVC.parking_queue(), "payment-svc.parking");
        assert_eq!(PAYMENT_SVC.retry_queue(0), "payment-svc.retry.200ms");
        assert_eq!(PAYMENT_SVC.retry_queue(4), "payment-svc.retry.120s");
    }
}
