//! The envelope every internal event travels in, the deterministic ids of
//! the events a handler emits, and the saga's trail.
//!
//! ```json
//! {"event_id": "…", "event_type": "payment.completed", "version": 1,
//!  "order_id": "…", "causation_id": "…", "occurred_at": "…",
//!  "deadline_at": "…", "producer": "payment-svc", "data": {…},
//!  "trail": [{"event_type": "order.created", "event_id": "…",
//!             "producer": "order-svc", "occurred_at": "…"}]}
//! ```
//!
//! The trail lists the events that led to this one, oldest first. It is how
//! order-svc learns the saga's timeline without consuming every step: the
//! event that decides a saga carries the steps before it.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messaging::events::{EXCHANGE, EventType};
use crate::messaging::outbox::OutboxMessage;

/// The envelope schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// Namespace of the UUIDv5 event ids derived from their cause.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5a6a_0e7e_8d1b_4c3e_9f00_0000_5a6a_0001);

/// An event on the wire. `T` is the event's data; consumers first decode a
/// `Envelope<serde_json::Value>` and then the data for the type they expect.
///
/// Its JSON Schema (`docs/schemas/envelope.json`) is generated from this
/// type by [`crate::messaging::schema`]; the doc comments of the fields are
/// the schema's descriptions.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[schemars(
    rename = "Envelope",
    description = "The envelope every internal event travels in on the exchange `saga.events` \
                   (everything but `order.requested`). `data` depends on `event_type`."
)]
pub struct Envelope<T = serde_json::Value> {
    /// Unique id; also the AMQP `message_id`, stable across re-publishing.
    pub event_id: Uuid,
    /// The event's type: its routing key, and the AMQP `type` property.
    pub event_type: EventType,
    /// The envelope schema's version (`SCHEMA_VERSION`); a consumer parks a
    /// message of a version it does not understand.
    pub version: u32,
    /// The saga's id; also the AMQP `correlation_id`.
    pub order_id: Uuid,
    /// Id of the message that caused this event (an event id, or the client's
    /// message id / idempotency key for `order.created`).
    pub causation_id: Option<String>,
    /// When the event was produced (RFC 3339, UTC).
    pub occurred_at: DateTime<Utc>,
    /// When the saga must be decided; no forward step is applied after it.
    pub deadline_at: DateTime<Utc>,
    /// The service that emitted the event.
    pub producer: String,
    /// The event's payload; its shape depends on `event_type`.
    pub data: T,
    /// The events that led to this one, oldest first (absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trail: Vec<TrailEntry>,
}

/// One earlier event of the saga, as carried in a later event's trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TrailEntry {
    /// That event's type.
    pub event_type: EventType,
    /// That event's `event_id`.
    pub event_id: Uuid,
    /// The service that emitted it.
    pub producer: String,
    /// When it was produced.
    pub occurred_at: DateTime<Utc>,
}

impl<T> Envelope<T> {
    /// This event as an entry of a later event's trail.
    pub fn as_trail_entry(&self) -> TrailEntry {
        TrailEntry {
            event_type: self.event_type,
            event_id: self.event_id,
            producer: self.producer.clone(),
            occurred_at: self.occurred_at,
        }
    }
}

/// Why a message is not a valid envelope. Always a permanent failure.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not a valid event envelope: {0}")]
    Envelope(#[source] serde_json::Error),
    #[error("unsupported envelope version {0} (this build understands {SCHEMA_VERSION})")]
    Version(u32),
    #[error("data of {event_type} is invalid: {source}")]
    Data {
        event_type: EventType,
        #[source]
        source: serde_json::Error,
    },
}

impl Envelope<serde_json::Value> {
    /// Parses a message body.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let env: Self = serde_json::from_slice(body).map_err(DecodeError::Envelope)?;
        if env.version != SCHEMA_VERSION {
            return Err(DecodeError::Version(env.version));
        }
        Ok(env)
    }

    /// A string field of the data, if present (e.g. `customer_id`, which
    /// every rollback event carries).
    pub fn data_str(&self, field: &str) -> Option<&str> {
        self.data.get(field).and_then(serde_json::Value::as_str)
    }

    /// Decodes the data as the event's payload type.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        T::deserialize(&self.data).map_err(|source| DecodeError::Data {
            event_type: self.event_type,
            source,
        })
    }
}

/// What a handler knows about the saga it is acting in: enough to stamp the
/// events it emits.
#[derive(Debug, Clone)]
pub struct SagaContext {
    pub order_id: Uuid,
    pub deadline_at: DateTime<Utc>,
    /// The message being handled (becomes `causation_id`).
    pub causation_id: String,
    /// The emitting service.
    pub producer: &'static str,
    /// The trail the emitted events carry.
    pub trail: Vec<TrailEntry>,
}

impl SagaContext {
    /// The context of an event being handled by `producer`.
    pub fn caused_by(env: &Envelope, producer: &'static str) -> Self {
        let mut trail = Vec::with_capacity(env.trail.len() + 1);
        trail.extend(env.trail.iter().cloned());
        trail.push(env.as_trail_entry());
        Self {
            order_id: env.order_id,
            deadline_at: env.deadline_at,
            causation_id: env.event_id.to_string(),
            producer,
            trail,
        }
    }

    /// The id of the event of type `kind` this handler emits. Derived from the
    /// cause, so a handler that runs twice for one message emits the same ids
    /// and downstream inboxes absorb the repeat.
    pub fn derived_id(&self, kind: &str) -> Uuid {
        derive_event_id(&self.causation_id, self.producer, kind)
    }

    /// An event on [`EXCHANGE`], ready for the outbox.
    pub fn event<T: Serialize>(&self, event_type: EventType, data: &T) -> OutboxMessage {
        let event_id = self.derived_id(event_type.routing_key());
        let env = Envelope {
            event_id,
            event_type,
            version: SCHEMA_VERSION,
            order_id: self.order_id,
            causation_id: Some(self.causation_id.clone()),
            occurred_at: Utc::now(),
            deadline_at: self.deadline_at,
            producer: self.producer.to_owned(),
            data,
            trail: self.trail.clone(),
        };
        OutboxMessage {
            id: event_id,
            exchange: EXCHANGE.to_owned(),
            routing_key: event_type.routing_key().to_owned(),
            message_type: event_type.routing_key().to_owned(),
            correlation_id: Some(self.order_id.to_string()),
            body: serde_json::to_vec(&env).expect("envelopes serialize"),
            mandatory: true,
            traceparent: Some(traceparent(self.order_id, event_id)),
        }
    }
}

/// UUIDv5 of (cause, producer, kind).
pub fn derive_event_id(cause: &str, producer: &str, kind: &str) -> Uuid {
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{cause}\u{1f}{producer}\u{1f}{kind}").as_bytes(),
    )
}

/// A W3C `traceparent` whose trace id is the order id, so every log line and
/// span of one saga, in every service, shares one trace id.
pub fn traceparent(order_id: Uuid, event_id: Uuid) -> String {
    let span = &event_id.simple().to_string()[16..];
    format!("00-{}-{span}-01", order_id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(cause: &str) -> SagaContext {
        SagaContext {
            order_id: Uuid::now_v7(),
            deadline_at: Utc::now(),
            causation_id: cause.into(),
            producer: "payment-svc",
            trail: Vec::new(),
        }
    }

    #[test]
    fn emitted_ids_depend_only_on_cause_producer_and_kind() {
        let a = ctx("m1").event(EventType::PaymentCompleted, &serde_json::json!({}));
        let b = ctx("m1").event(EventType::PaymentCompleted, &serde_json::json!({"x": 1}));
        let c = ctx("m2").event(EventType::PaymentCompleted, &serde_json::json!({}));
        let d = ctx("m1").event(EventType::PaymentFailed, &serde_json::json!({}));
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, d.id);
    }

    #[test]
    fn an_emitted_event_decodes_back_with_its_metadata() {
        let c = ctx("cause");
        let msg = c.event(EventType::PaymentFailed, &serde_json::json!({"code": "x"}));
        let body = msg.body.clone();
        let env = Envelope::decode(&body).unwrap();
        assert_eq!(env.event_id, msg.id);
        assert_eq!(env.order_id, c.order_id);
        assert_eq!(env.causation_id.as_deref(), Some("cause"));
        assert_eq!(env.event_type, EventType::PaymentFailed);
        assert_eq!(msg.routing_key, "payment.failed");
        let tp = msg.traceparent.unwrap();
        assert!(tp.starts_with(&format!("00-{}-", c.order_id.simple())));
        assert_eq!(tp.len(), 55);
    }

    #[test]
    fn an_event_carries_the_trail_of_its_cause_plus_the_cause() {
        let first = ctx("request").event(EventType::OrderCreated, &serde_json::json!({}));
        let first = Envelope::decode(&first.body).unwrap();
        assert!(first.trail.is_empty());
        let second = SagaContext::caused_by(&first, "payment-svc")
            .event(EventType::PaymentCompleted, &serde_json::json!({}));
        let second = Envelope::decode(&second.body).unwrap();
        let third = SagaContext::caused_by(&second, "inventory-svc");
        let kinds: Vec<_> = third.trail.iter().map(|t| t.event_type).collect();
        assert_eq!(
            kinds,
            [EventType::OrderCreated, EventType::PaymentCompleted]
        );
        assert_eq!(third.trail[1].event_id, second.event_id);
    }

    #[test]
    fn unknown_versions_and_types_are_rejected() {
        let c = ctx("cause");
        let body = c
            .event(EventType::PaymentFailed, &serde_json::json!({}))
            .body;
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["version"] = 2.into();
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Version(2))
        ));
        v["version"] = 1.into();
        v["event_type"] = "payment.exploded".into();
        assert!(matches!(
            Envelope::decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Envelope(_))
        ));
    }
}
