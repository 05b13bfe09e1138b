//! The broker topology: who consumes what, and the queues that carry it.
//!
//! Every service declares the *whole* topology when it connects, not just its
//! own queues. An event published before its consumer ever started then waits
//! in that consumer's durable queue instead of being dropped as unroutable,
//! whatever order the services start in. Declarations are idempotent.
//!
//! Per service `S` (e.g. `payment-svc`):
//! - `S.events` — the work queue, bound to `saga.events` with the routing
//!   keys `S` reacts to. Manual acks, bounded prefetch. A quorum queue by
//!   default ([`QueueType`]): a message delivered more than
//!   [`DELIVERY_LIMIT`] times (a handler that crashes the process every time)
//!   is dead-lettered to `S.parking` by the broker itself.
//! - `S.retry.<delay>` — delay queues for transient failures: a message is
//!   re-published there with a per-message TTL and dead-letters back into
//!   `S.events` when it expires. Several tiers, so a long delay never holds a
//!   short one behind it.
//! - `S.parking` — the parking lot (dead-letter queue): messages that cannot
//!   be handled, with the reason in their `x-parked-reason` header. Nothing
//!   consumes it; an operator inspects it in the management UI.
//!
//! A service may also *observe* events without consuming them durably: each
//! of its replicas declares its own exclusive, transient queue
//! ([`ServiceIdentity::replica_queue`]) bound to those keys. order-svc uses
//! this to learn how far each saga has got (for the timeout's reason) and to
//! receive decisions made by another replica, without a durable delivery,
//! an ack or a database write per event.

use std::fmt;
use std::str::FromStr;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::messaging::events::{EXCHANGE, EventType, REQUEUE_EXCHANGE};
use crate::messaging::retry::RETRY_TIERS;
use crate::saga::choreography::{self, Delivery, Trigger};

/// Deliveries of one message after which the broker parks it (crash loops;
/// quorum queues only).
pub const DELIVERY_LIMIT: i64 = 10;

/// The kind of the work, delay and parking queues (`QUEUE_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Raft-replicated, fsynced before confirming; redeliveries are counted,
    /// so a crash-looping message is parked by the broker
    /// ([`DELIVERY_LIMIT`]); dead-lettering is at-least-once. The default.
    #[default]
    Quorum,
    /// Classic queues, version 2 (durable, persistent messages, confirmed
    /// once written to disk). One node only; no delivery limit, and
    /// dead-lettering out of the delay queues is at-most-once.
    Classic,
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "QUEUE_TYPE must be quorum or classic, got {other:?}"
            )),
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        })
    }
}

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
}

impl ServiceIdentity {
    /// Routing keys bound to the service's durable work queue: the events it
    /// reacts to in the [choreography](crate::saga::choreography).
    pub fn consumes(&self) -> Vec<EventType> {
        choreography::triggers(self.name, Delivery::Durable)
    }

    /// Whether `event` is one the service consumes (no allocation: the
    /// consumers ask this of every message).
    pub fn is_consumed(&self, event: EventType) -> bool {
        choreography::REACTIONS.iter().any(|r| {
            r.service == self.name
                && r.delivery == Delivery::Durable
                && r.on.contains(&Trigger::Event(event))
        })
    }

    /// Routing keys each replica observes on its own transient queue.
    pub fn observes(&self) -> Vec<EventType> {
        choreography::triggers(self.name, Delivery::Observed)
    }

    pub fn queue(&self) -> String {
        format!("{}.events", self.name)
    }

    pub fn parking_queue(&self) -> String {
        format!("{}.parking", self.name)
    }

    pub fn retry_queue(&self, tier: usize) -> String {
        format!("{}.retry.{}", self.name, tier_label(RETRY_TIERS[tier]))
    }

    /// The PostgreSQL role the service connects as by default: its name
    /// with `_` for `-` (`payment_svc`).
    pub fn database_role(&self) -> String {
        self.name.replace('-', "_")
    }

    /// The transient queue of one replica, `<service>.replica.<id>`.
    pub fn replica_queue(&self, replica_id: &str) -> String {
        format!("{}.replica.{replica_id}", self.name)
    }
}

fn tier_label(d: std::time::Duration) -> String {
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
};

pub const PAYMENT_SVC: ServiceIdentity = ServiceIdentity {
    name: "payment-svc",
    database: "payments",
    http_port: 8081,
};

pub const INVENTORY_SVC: ServiceIdentity = ServiceIdentity {
    name: "inventory-svc",
    database: "inventory",
    http_port: 8082,
};

pub const NOTIFICATION_SVC: ServiceIdentity = ServiceIdentity {
    name: "notification-svc",
    database: "notifications",
    http_port: 8083,
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

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Messages a parking or delay queue holds at most; more are refused
/// (`reject-publish`: the publisher gets a nack, counted in
/// `queue_overflows_total`), never dropped.
pub const BOUNDED_QUEUE_MAX_LENGTH: i64 = 100_000;
/// Bytes of message bodies a parking or delay queue holds at most.
pub const BOUNDED_QUEUE_MAX_BYTES: i64 = 512 * 1024 * 1024;

/// Declares the exchanges and every service's queues and bindings — those
/// this connection's user may. An administrator (the development setup,
/// `sagactl broker setup`) declares everything; a service's own user
/// ([`crate::messaging::permissions`]) only checks that the exchanges
/// exist and declares its own queues again (they were created by the
/// setup: creating a queue that dead-letters needs more than it has), and
/// skips the others' queues.
pub async fn declare_all(conn: &Connection, queue_type: QueueType) -> Result<(), lapin::Error> {
    let mut channel = conn.create_channel().await?;
    for exchange in [EXCHANGE, REQUEUE_EXCHANGE] {
        declare_exchange(conn, &mut channel, exchange).await?;
    }
    let mut bounds = Bounds::Unknown;
    for svc in SERVICES {
        match declare_service(conn, &mut channel, &svc, queue_type, &mut bounds).await {
            Ok(()) => {}
            // Another service's queues, for a user confined to its own.
            Err(error) if is_access_refused(&error) => {
                tracing::debug!(
                    service = svc.name,
                    "not this user's queues: left to their own user"
                );
                channel = conn.create_channel().await?;
            }
            Err(error) => return Err(error),
        }
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Declares a durable topic exchange unless it exists: a service's own user
/// may not declare one (nor, so, delete it).
async fn declare_exchange(
    conn: &Connection,
    channel: &mut Channel,
    name: &str,
) -> Result<(), lapin::Error> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    if channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok()
    {
        return Ok(());
    }
    *channel = conn.create_channel().await?;
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .inspect_err(|error| {
            if is_access_refused(error) {
                tracing::error!(
                    exchange = name,
                    "the exchange does not exist and this broker user may not declare it: \
                     run `sagactl broker setup` as an administrator first (docs/security.md)"
                );
            }
        })
}

/// Whether the broker's parking and delay queues carry length bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bounds {
    Unknown,
    /// Declared by an earlier version without them: the rest are only
    /// checked for existence (each refused declaration costs a channel and
    /// an error line in the broker's and the client's logs).
    Legacy,
}

/// Declares a parking or delay queue with its length bounds. A queue that
/// already exists without them (declared by an earlier version) cannot be
/// changed by a declaration — the broker refuses it and closes the channel —
/// so it is kept as it is, with a warning: bound it with a policy
/// (docs/security.md).
async fn declare_bounded(
    conn: &Connection,
    channel: &mut Channel,
    name: &str,
    mut args: Vec<(&'static str, AMQPValue)>,
    bounds: &mut Bounds,
) -> Result<(), lapin::Error> {
    if *bounds == Bounds::Legacy {
        match channel
            .queue_declare(name.into(), passive(), FieldTable::default())
            .await
        {
            Ok(_) => return Ok(()),
            // Not there yet (a new queue): declared in full, below.
            Err(_) => *channel = conn.create_channel().await?,
        }
    }
    args.push((
        "x-max-length",
        AMQPValue::LongLongInt(BOUNDED_QUEUE_MAX_LENGTH),
    ));
    args.push((
        "x-max-length-bytes",
        AMQPValue::LongLongInt(BOUNDED_QUEUE_MAX_BYTES),
    ));
    if !args.iter().any(|(k, _)| *k == "x-overflow") {
        args.push(("x-overflow", text("reject-publish")));
    }
    match channel
        .queue_declare(name.into(), durable(), table(&args))
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if is_precondition_failed(&error) => {
            tracing::warn!(
                queue = name,
                "parking and delay queues exist without length bounds (declared by an earlier \
                 version); kept as they are: bound them with a policy (docs/security.md)"
            );
            *bounds = Bounds::Legacy;
            *channel = conn.create_channel().await?;
            channel
                .queue_declare(name.into(), passive(), FieldTable::default())
                .await
                .map(|_| ())
        }
        Err(error) => Err(error),
    }
}

/// The broker's 403: the user may not do this.
pub fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if e.get_id() == 403)
}

/// The broker's 406: a queue exists with other arguments.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if e.get_id() == 406)
}

/// The arguments every queue of a kind gets.
fn kind_args(queue_type: QueueType) -> Vec<(&'static str, AMQPValue)> {
    match queue_type {
        QueueType::Quorum => {
            let mut args = vec![("x-queue-type", text("quorum"))];
            if let Some(n) = quorum_group_size() {
                args.push(("x-quorum-initial-group-size", AMQPValue::LongLongInt(n)));
            }
            args
        }
        QueueType::Classic => vec![
            ("x-queue-type", text("classic")),
            ("x-queue-version", AMQPValue::LongInt(2)),
        ],
    }
}

/// `QUORUM_INITIAL_GROUP_SIZE`: how many nodes a quorum queue is replicated
/// on when it is first declared. Unset: RabbitMQ's default (every node of
/// the cluster, up to its limit) — and no argument at all, so queues
/// declared before keep matching (RabbitMQ refuses a redeclaration whose
/// arguments differ). Read once.
pub fn quorum_group_size() -> Option<i64> {
    static SIZE: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::env::var("QUORUM_INITIAL_GROUP_SIZE")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 1)
    })
}

/// Dead-lettering arguments: at-least-once where the queue type offers it
/// (the source keeps a message until the target confirms it; needs
/// reject-publish overflow).
fn dead_letter_args(queue_type: QueueType, target: &str) -> Vec<(&'static str, AMQPValue)> {
    let mut args = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(target)),
    ];
    if queue_type == QueueType::Quorum {
        args.push(("x-dead-letter-strategy", text("at-least-once")));
        args.push(("x-overflow", text("reject-publish")));
    }
    args
}

async fn declare_service(
    conn: &Connection,
    channel: &mut Channel,
    svc: &ServiceIdentity,
    queue_type: QueueType,
    bounds: &mut Bounds,
) -> Result<(), lapin::Error> {
    declare_bounded(
        conn,
        channel,
        &svc.parking_queue(),
        kind_args(queue_type),
        bounds,
    )
    .await?;

    let queue = svc.queue();
    let mut args = kind_args(queue_type);
    if queue_type == QueueType::Quorum {
        args.push(("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)));
    }
    args.extend(dead_letter_args(queue_type, &svc.parking_queue()));
    channel
        .queue_declare(queue.as_str().into(), durable(), table(&args))
        .await?;
    for event in svc.consumes() {
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
        let mut args = kind_args(queue_type);
        args.extend(dead_letter_args(queue_type, &queue));
        declare_bounded(conn, channel, &svc.retry_queue(tier), args, bounds).await?;
    }

    // The way back into its own queues, by their names.
    let mut own = vec![queue, svc.parking_queue()];
    own.extend((0..RETRY_TIERS.len()).map(|tier| svc.retry_queue(tier)));
    for name in &own {
        channel
            .queue_bind(
                name.as_str().into(),
                REQUEUE_EXCHANGE.into(),
                name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares a replica's own transient queue (exclusive to this connection,
/// deleted with it) and binds it to what the service observes.
pub async fn declare_replica_queue(
    channel: &Channel,
    svc: &ServiceIdentity,
    name: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            // Bounded: a replica that stops reading loses old hints, never memory.
            table(&[
                ("x-max-length", AMQPValue::LongLongInt(100_000)),
                ("x-overflow", text("drop-head")),
            ]),
        )
        .await?;
    for event in svc.observes() {
        channel
            .queue_bind(
                name.into(),
                EXCHANGE.into(),
                event.routing_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_a_durable_consumer_so_none_is_unroutable() {
        for t in EventType::ALL {
            let consumed = SERVICES.iter().any(|s| s.is_consumed(t));
            assert!(consumed, "{t} has no consumer: it would be unroutable");
        }
    }

    #[test]
    fn bindings_are_the_documented_contract() {
        // docs/events.md's routing-key table: external consumers and the
        // broker's existing bindings depend on these.
        let keys = |events: Vec<EventType>| {
            let mut keys: Vec<_> = events.iter().map(|e| e.routing_key()).collect();
            keys.sort_unstable();
            keys
        };
        assert_eq!(
            keys(ORDER_SVC.consumes()),
            [
                "inventory.backordered",
                "inventory.failed",
                "inventory.released",
                "notification.deferred",
                "notification.failed",
                "notification.sent",
                "order.requested",
                "payment.action_required",
                "payment.failed",
                "payment.refunded"
            ]
        );
        assert_eq!(
            keys(ORDER_SVC.observes()),
            ["inventory.reserved", "payment.completed"]
        );
        assert_eq!(
            keys(PAYMENT_SVC.consumes()),
            ["order.cancelled", "order.created", "order.failed"]
        );
        assert_eq!(
            keys(INVENTORY_SVC.consumes()),
            [
                "order.cancelled",
                "order.confirmed",
                "order.failed",
                "payment.action_required",
                "payment.completed"
            ]
        );
        assert_eq!(
            keys(NOTIFICATION_SVC.consumes()),
            ["inventory.reserved", "order.cancelled", "order.failed"]
        );
        for svc in SERVICES {
            for e in EventType::ALL {
                assert_eq!(svc.is_consumed(e), svc.consumes().contains(&e));
            }
        }
    }

    #[test]
    fn queue_names_follow_the_documented_scheme() {
        assert_eq!(PAYMENT_SVC.queue(), "payment-svc.events");
        assert_eq!(PAYMENT_SVC.parking_queue(), "payment-svc.parking");
        assert_eq!(PAYMENT_SVC.retry_queue(0), "payment-svc.retry.200ms");
        assert_eq!(PAYMENT_SVC.retry_queue(4), "payment-svc.retry.120s");
        assert_eq!(ORDER_SVC.replica_queue("ab12"), "order-svc.replica.ab12");
    }

    #[test]
    fn queue_types_parse_from_their_documented_names() {
        assert_eq!("quorum".parse(), Ok(QueueType::Quorum));
        assert_eq!("Classic".parse(), Ok(QueueType::Classic));
        assert!("stream".parse::<QueueType>().is_err());
    }
}
