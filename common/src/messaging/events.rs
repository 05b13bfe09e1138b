//! The event catalogue: every event type of the saga, its routing key, and the
//! shape of its `data`.
//!
//! This module *is* the messaging contract (docs/events.md describes the same
//! thing for humans): adding a field is backwards compatible, renaming or
//! removing one is not and needs a new envelope `version`. The JSON Schemas
//! in `docs/schemas/` are generated from these types
//! ([`crate::messaging::schema`]): their doc comments are the schemas'
//! descriptions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::saga::card::SealedCard;
use crate::saga::order::{OrderLine, SagaResult};

/// The topic exchange every service publishes to and consumes from.
pub const EXCHANGE: &str = "saga.events";

/// The topic exchange a service puts messages back into its own queues
/// through (retries, parked messages, an operator's retry of an
/// escalation): the routing key is the queue's name. Its broker user may
/// use only its own queues' names (see [`crate::messaging::permissions`]);
/// the default exchange, which reaches every queue, stays closed to it.
pub const REQUEUE_EXCHANGE: &str = "saga.requeue";

/// Every event of the saga. The serialized form is the routing key, as a
/// string (no other form is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, JsonSchema, utoipa::ToSchema)]
pub enum EventType {
    /// A client asks for an order (body: the order dict, not an envelope).
    #[serde(rename = "order.requested")]
    OrderRequested,
    /// order-svc accepted and priced the order; the saga starts.
    #[serde(rename = "order.created")]
    OrderCreated,
    /// payment-svc charged the customer.
    #[serde(rename = "payment.completed")]
    PaymentCompleted,
    /// payment-svc could not charge (the saga fails).
    #[serde(rename = "payment.failed")]
    PaymentFailed,
    /// payment-svc refunded a charge (compensation).
    #[serde(rename = "payment.refunded")]
    PaymentRefunded,
    /// The payment needs the customer's action (3-D Secure): nothing is
    /// charged yet; the saga goes on, under its long deadline, when the
    /// gateway's answer arrives (`POST /payments/{id}/confirm` or `/decline`).
    #[serde(rename = "payment.action_required")]
    PaymentActionRequired,
    /// inventory-svc holds stock for every line of the order.
    #[serde(rename = "inventory.reserved")]
    InventoryReserved,
    /// inventory-svc could not reserve (the saga fails).
    #[serde(rename = "inventory.failed")]
    InventoryFailed,
    /// inventory-svc released a reservation (compensation).
    #[serde(rename = "inventory.released")]
    InventoryReleased,
    /// Items flagged backorderable are short: the order waits for them
    /// under its long deadline; inventory-svc reserves them when they arrive
    /// (`PUT /items/{id}`) and publishes `inventory.reserved`.
    #[serde(rename = "inventory.backordered")]
    InventoryBackordered,
    /// notification-svc sent the confirmation email.
    #[serde(rename = "notification.sent")]
    NotificationSent,
    /// notification-svc could not send the confirmation (the saga fails).
    #[serde(rename = "notification.failed")]
    NotificationFailed,
    /// The mail relay is down: the confirmation is queued and sent once it is
    /// back. Past the pivot: the saga is confirmed, the email retried.
    #[serde(rename = "notification.deferred")]
    NotificationDeferred,
    /// Terminal: the saga succeeded (data carries the result dict).
    #[serde(rename = "order.confirmed")]
    OrderConfirmed,
    /// Terminal: the saga failed (data carries the result dict); every service
    /// compensates what it did.
    #[serde(rename = "order.failed")]
    OrderFailed,
    /// The saga was cancelled before it completed (its deadline passed); every
    /// service compensates what it did and applies nothing more.
    #[serde(rename = "order.cancelled")]
    OrderCancelled,
}

impl EventType {
    /// Every event type, in saga order.
    pub const ALL: [EventType; 16] = [
        EventType::OrderRequested,
        EventType::OrderCreated,
        EventType::PaymentCompleted,
        EventType::PaymentFailed,
        EventType::PaymentRefunded,
        EventType::PaymentActionRequired,
        EventType::InventoryReserved,
        EventType::InventoryFailed,
        EventType::InventoryReleased,
        EventType::InventoryBackordered,
        EventType::NotificationSent,
        EventType::NotificationFailed,
        EventType::NotificationDeferred,
        EventType::OrderConfirmed,
        EventType::OrderFailed,
        EventType::OrderCancelled,
    ];

    /// The routing key on [`EXCHANGE`] (also the AMQP `type` property).
    pub fn routing_key(self) -> &'static str {
        match self {
            EventType::OrderRequested => "order.requested",
            EventType::OrderCreated => "order.created",
            EventType::PaymentCompleted => "payment.completed",
            EventType::PaymentFailed => "payment.failed",
            EventType::PaymentRefunded => "payment.refunded",
            EventType::PaymentActionRequired => "payment.action_required",
            EventType::InventoryReserved => "inventory.reserved",
            EventType::InventoryFailed => "inventory.failed",
            EventType::InventoryReleased => "inventory.released",
            EventType::InventoryBackordered => "inventory.backordered",
            EventType::NotificationSent => "notification.sent",
            EventType::NotificationFailed => "notification.failed",
            EventType::NotificationDeferred => "notification.deferred",
            EventType::OrderConfirmed => "order.confirmed",
            EventType::OrderFailed => "order.failed",
            EventType::OrderCancelled => "order.cancelled",
        }
    }

    /// The event type for a routing key, if it is one of ours.
    pub fn from_routing_key(key: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.routing_key() == key)
    }

    /// True for the events that end a saga or roll it back: every service
    /// that acted compensates when it sees one of them.
    pub fn is_abort(self) -> bool {
        matches!(self, EventType::OrderFailed | EventType::OrderCancelled)
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        EventType::from_routing_key(&key)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown event type {key:?}")))
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.routing_key())
    }
}

/// `order.created`: the priced order, with the card sealed for payment-svc.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OrderCreated {
    /// The customer who placed the order.
    pub customer_id: String,
    /// The order's lines, priced from the catalog.
    pub items: Vec<OrderLine>,
    /// The order's total, in integer cents.
    pub amount_cents: i64,
    /// ISO 4217 code of every amount: `USD`.
    pub currency: String,
    /// The card, sealed for payment-svc: only payment-svc holds the key
    /// that opens it.
    pub payment: SealedCard,
    /// The long deadline a step that needs an outside answer (a 3-D Secure
    /// confirmation) may take until; absent from an order-svc that has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_deadline_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `payment.action_required`: the card needs the customer's confirmation
/// (3-D Secure). Nothing is charged; the envelope's `deadline_at` is the
/// saga's long deadline.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PaymentActionRequired {
    /// The customer to charge once confirmed.
    pub customer_id: String,
    /// The lines: inventory-svc holds them while the confirmation is awaited.
    pub items: Vec<OrderLine>,
    /// The amount to charge, in integer cents.
    pub amount_cents: i64,
    /// ISO 4217 code: `USD`.
    pub currency: String,
    /// The card's last 4 digits.
    pub card_last4: String,
    /// What is awaited: `3ds_confirmation`.
    pub action: String,
}

/// `payment.completed`: the charge succeeded; carries what the next steps need.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PaymentCompleted {
    /// The customer charged.
    pub customer_id: String,
    /// The order's lines (to reserve).
    pub items: Vec<OrderLine>,
    /// The amount charged, in integer cents.
    pub amount_cents: i64,
    /// ISO 4217 code: `USD`.
    pub currency: String,
    /// The card's last 4 digits.
    pub card_last4: String,
    /// The saga's long deadline (from `order.created`): a backordered item
    /// may take until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_deadline_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `inventory.backordered`: short items flagged backorderable; the order
/// waits for them (the envelope's `deadline_at` is the long deadline).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InventoryBackordered {
    /// The customer who placed the order.
    pub customer_id: String,
    /// The ids of the items awaited.
    pub backordered: Vec<String>,
}

/// A step's failure: a stable machine code and a human reason. Used by
/// `payment.failed`, `inventory.failed` and `notification.failed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct StepFailed {
    /// Stable, documented code, e.g. `insufficient_funds`, `out_of_stock`.
    pub code: String,
    /// Human readable; becomes the `reason` of the result dict.
    pub reason: String,
}

/// `payment.refunded`: a charge was refunded (compensation).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PaymentRefunded {
    /// The customer refunded.
    pub customer_id: String,
    /// The amount refunded, in integer cents.
    pub amount_cents: i64,
}

/// `inventory.reserved`: stock is held for every line of the order.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InventoryReserved {
    /// The customer who placed the order.
    pub customer_id: String,
    /// The lines reserved.
    pub items: Vec<OrderLine>,
    /// The order's total, in integer cents.
    pub amount_cents: i64,
    /// ISO 4217 code: `USD`.
    pub currency: String,
}

/// `inventory.released`: held stock was released (compensation).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct InventoryReleased {
    /// The lines released (`unit_price_cents` is 0 here).
    pub items: Vec<OrderLine>,
}

/// `notification.sent` (the confirmation email went out) and
/// `notification.deferred` (it is queued until the mail relay is back).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NotificationSent {
    /// The email's id at notification-svc.
    pub email_id: Uuid,
    /// What the email is: `confirmation`.
    pub kind: String,
}

/// `order.confirmed` / `order.failed`: the saga's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OrderDecided {
    /// The customer who placed the order.
    pub customer_id: String,
    /// The order's total, in integer cents.
    pub amount_cents: i64,
    /// The result dict, exactly as the client receives it.
    pub result: SagaResult,
}

/// `order.cancelled`: the saga was cancelled (its deadline passed).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct OrderCancelled {
    /// The customer who placed the order.
    pub customer_id: String,
    /// Why, naming the step still awaited.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_round_trip_through_serde_and_lookup() {
        for t in EventType::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.routing_key()));
            assert_eq!(EventType::from_routing_key(t.routing_key()), Some(t));
        }
        assert_eq!(EventType::from_routing_key("order.exploded"), None);
    }
}
