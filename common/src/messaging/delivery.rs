//! A delivery as handlers see it, and the headers the consumer reads and
//! writes.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

/// Header carrying the routing key a message was first published with (a
/// message coming back from a delay queue arrives with the queue's name).
pub const H_ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// Header with the exchange a message was first published to.
pub const H_ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// Header counting broker-level retries of a message (1 = first retry).
pub const H_RETRY_ATTEMPT: &str = "x-retry-attempt";
/// Header with the last error that made a message be retried.
pub const H_LAST_ERROR: &str = "x-last-error";
/// Header with the reason a message was parked.
pub const H_PARKED_REASON: &str = "x-parked-reason";
/// Header naming the service that parked a message.
pub const H_PARKED_BY: &str = "x-parked-by";
/// Header with the broker user that published a parked message (empty: it
/// set no user id).
pub const H_PARKED_SENDER: &str = "x-parked-sender";
/// Header with when a message was parked (RFC 3339).
pub const H_PARKED_AT: &str = "x-parked-at";
/// Header carrying the escalation an operator is retrying.
pub const H_ESCALATION_ID: &str = "x-escalation-id";
/// W3C trace context.
pub const H_TRACEPARENT: &str = "traceparent";
/// How many times a quorum queue delivered the message before (set by the
/// broker on redelivery).
pub const H_DELIVERY_COUNT: &str = "x-delivery-count";

/// A delivery, as handlers see it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The routing key the message was published with.
    pub routing_key: String,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub message_type: Option<String>,
    pub traceparent: Option<String>,
    pub body: Vec<u8>,
    /// 1 on first delivery, +1 per broker-level retry.
    pub attempt: u32,
    /// Attempts after which a failing message is given up on.
    pub max_attempts: u32,
    /// Set when an operator retries an escalated compensation.
    pub escalation_id: Option<uuid::Uuid>,
    /// Earlier deliveries of this very message (the broker's count; 0 on a
    /// first delivery). Informational: RabbitMQ versions count differently
    /// (see [`crate::messaging::crash_loop`]).
    pub delivery_count: i64,
    /// Delivered before and not settled (AMQP's `redelivered`): the process
    /// may have crashed on it.
    pub redelivered: bool,
    /// The publisher's broker user (the AMQP `user_id`, which the broker
    /// validated), if it set one.
    pub sender: Option<String>,
    /// The consumer's own control headers the message carries (retry
    /// attempt, original routing key, escalation id): honoured only if this
    /// service's user sent it (see [`crate::messaging::trust`]).
    pub control_headers: Vec<&'static str>,
}

/// The headers only the consuming service itself may set.
pub const CONTROL_HEADERS: [&str; 4] = [
    H_RETRY_ATTEMPT,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_EXCHANGE,
    H_ESCALATION_ID,
];

impl Incoming {
    /// Takes the message out of a delivery (its body is moved, not copied).
    pub fn take(d: &mut Delivery, max_attempts: u32) -> Self {
        let p = &d.properties;
        let headers = p.headers().as_ref();
        let header_str = |k: &str| headers.and_then(|h| h.inner().get(k)).and_then(amqp_str);
        let retried = headers
            .and_then(|h| h.inner().get(H_RETRY_ATTEMPT))
            .and_then(amqp_int)
            .unwrap_or(0);
        Self {
            routing_key: header_str(H_ORIGINAL_ROUTING_KEY)
                .unwrap_or_else(|| d.routing_key.to_string()),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
            reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
            message_type: p.kind().as_ref().map(|s| s.to_string()),
            traceparent: header_str(H_TRACEPARENT),
            body: std::mem::take(&mut d.data),
            attempt: u32::try_from(retried)
                .unwrap_or(u32::MAX - 1)
                .saturating_add(1),
            max_attempts,
            escalation_id: header_str(H_ESCALATION_ID).and_then(|s| s.parse().ok()),
            delivery_count: headers
                .and_then(|h| h.inner().get(H_DELIVERY_COUNT))
                .and_then(amqp_int)
                .unwrap_or(0),
            redelivered: d.redelivered,
            sender: p.user_id().as_ref().map(|u| u.to_string()),
            control_headers: headers.map_or_else(Vec::new, |h| {
                CONTROL_HEADERS
                    .into_iter()
                    .filter(|k| h.inner().contains_key(*k))
                    .collect()
            }),
        }
    }

    /// True on the last attempt before the message is given up on.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// A string header value.
pub fn amqp_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn amqp_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A string header lookup.
pub fn header(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).and_then(amqp_str)
}
