//! Who may publish what: the authenticity of internal events.
//!
//! Every event type belongs to one service (`payment.*` to payment-svc,
//! `order.created` / `order.confirmed` / ... to order-svc); a service applies
//! an internal event only if it comes from the broker user that service
//! publishes as. The proof is RabbitMQ's *validated user id*: every service
//! stamps the AMQP `user_id` property with the user of its own connection,
//! and the broker refuses (closes the channel of) any publish whose `user_id`
//! is not the publishing connection's user. A message with another user, or
//! none, was not published by the owner: it is parked with its reason and
//! counted, and changes nothing.
//!
//! By default every service is trusted as the user of this service's own
//! `AMQP_URL` (the local set-up, where the four services share one user):
//! any *other* broker user — even one with full permissions on the vhost — is
//! still refused. `PRODUCER_USERS=order-svc=orders,payment-svc=payments,…`
//! names a user per service (see `scripts/broker-users.sh`), which makes the
//! check finer: payment-svc's user can then no longer publish `order.*`.
//!
//! `order.requested` is the public entry: any user allowed to publish it on
//! the vhost may (its payload is validated like an HTTP request). The
//! consumer's own control headers (retry attempt, original routing key,
//! escalation id) are honoured only on messages this service's user sent;
//! such a message is this service's own re-publication (a retry, an
//! operator's retry of an escalation) of an event checked when it first
//! arrived, and is not checked against the event's owner again. A message
//! whose routing key is not an event type (put straight into a work queue
//! through the default exchange) is refused.
//!
//! Caveat: a broker user tagged `impersonator` may set any `user_id`; never
//! give that tag to anything that talks to this vhost.

use std::collections::HashMap;

use crate::messaging::events::EventType;
use crate::messaging::topology::SERVICES;

/// The service that owns (publishes) an event type; `None` for the public
/// entry, `order.requested`.
pub fn owner(event: EventType) -> Option<&'static str> {
    match event {
        EventType::OrderRequested => None,
        EventType::OrderCreated
        | EventType::OrderConfirmed
        | EventType::OrderFailed
        | EventType::OrderCancelled => Some("order-svc"),
        EventType::PaymentCompleted
        | EventType::PaymentFailed
        | EventType::PaymentRefunded
        | EventType::PaymentActionRequired => Some("payment-svc"),
        EventType::InventoryReserved
        | EventType::InventoryFailed
        | EventType::InventoryReleased
        | EventType::InventoryBackordered => Some("inventory-svc"),
        EventType::NotificationSent
        | EventType::NotificationFailed
        | EventType::NotificationDeferred => Some("notification-svc"),
    }
}

/// The broker user each service publishes as.
#[derive(Debug, Clone)]
pub struct ProducerTrust {
    own_user: String,
    users: HashMap<&'static str, String>,
}

/// Why a message is not trusted. Always a permanent refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("{event} must be published by {owner} (broker user {expected:?}); it came from {}", sender_text(.sender))]
    WrongProducer {
        event: EventType,
        owner: &'static str,
        expected: String,
        sender: Option<String>,
    },
    #[error("control headers ({headers}) are only honoured from this service's own user; the message came from {}", sender_text(.sender))]
    ForgedHeaders {
        headers: String,
        sender: Option<String>,
    },
}

fn sender_text(sender: &Option<String>) -> String {
    match sender {
        Some(user) => format!("broker user {user:?}"),
        None => "a publisher that did not set a validated user id".to_owned(),
    }
}

impl ProducerTrust {
    /// `own_user` is this service's broker user (trusted for every service
    /// not named in `spec`); `spec` is `PRODUCER_USERS`:
    /// `service=user,service=user`.
    pub fn new(own_user: impl Into<String>, spec: Option<&str>) -> Result<Self, String> {
        let mut users = HashMap::new();
        for entry in spec.unwrap_or("").split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let (service, user) = entry
                .split_once('=')
                .ok_or_else(|| format!("PRODUCER_USERS entry {entry:?} is not service=user"))?;
            let service = SERVICES
                .iter()
                .find(|s| s.name == service.trim())
                .ok_or_else(|| format!("PRODUCER_USERS names an unknown service {service:?}"))?;
            let user = user.trim();
            if user.is_empty() {
                return Err(format!("PRODUCER_USERS gives {} no user", service.name));
            }
            users.insert(service.name, user.to_owned());
        }
        Ok(Self {
            own_user: own_user.into(),
            users,
        })
    }

    /// This service's own broker user.
    pub fn own_user(&self) -> &str {
        &self.own_user
    }

    /// The broker user `service` publishes as.
    pub fn user_of(&self, service: &str) -> &str {
        self.users
            .get(service)
            .map_or(&self.own_user, String::as_str)
    }

    /// True if `sender` is this service's own user.
    pub fn is_own(&self, sender: Option<&str>) -> bool {
        sender == Some(self.own_user.as_str())
    }

    /// Whether an event of type `event` from `sender` (the delivery's
    /// validated `user_id`) may be applied.
    pub fn check(&self, event: EventType, sender: Option<&str>) -> Result<(), Untrusted> {
        let Some(owner) = owner(event) else {
            return Ok(());
        };
        let expected = self.user_of(owner);
        if sender == Some(expected) {
            return Ok(());
        }
        Err(Untrusted::WrongProducer {
            event,
            owner,
            expected: expected.to_owned(),
            sender: sender.map(str::to_owned),
        })
    }
}

/// The user name in an AMQP URL (`guest` when the URL names none, as the
/// client library then logs in as guest).
pub fn amqp_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_internal_event_has_exactly_one_owner_and_the_entry_has_none() {
        for event in EventType::ALL {
            let owner = owner(event);
            if event == EventType::OrderRequested {
                assert_eq!(owner, None);
            } else {
                let owner = owner.unwrap();
                assert!(SERVICES.iter().any(|s| s.name == owner), "{event}");
                let prefix = event.routing_key().split('.').next().unwrap();
                assert_eq!(owner, format!("{prefix}-svc"), "{event}");
            }
        }
    }

    #[test]
    fn with_one_shared_user_only_that_user_is_trusted() {
        let trust = ProducerTrust::new("guest", None).unwrap();
        assert!(
            trust
                .check(EventType::PaymentCompleted, Some("guest"))
                .is_ok()
        );
        assert!(
            trust
                .check(EventType::PaymentCompleted, Some("mallory"))
                .is_err()
        );
        assert!(trust.check(EventType::PaymentCompleted, None).is_err());
        assert!(
            trust
                .check(EventType::OrderRequested, Some("mallory"))
                .is_ok()
        );
        assert!(trust.check(EventType::OrderRequested, None).is_ok());
    }

    #[test]
    fn per_service_users_trust_each_owner_only_for_its_own_events() {
        let trust = ProducerTrust::new("inventory", Some("payment-svc=payments, order-svc=orders"))
            .unwrap();
        assert!(
            trust
                .check(EventType::PaymentCompleted, Some("payments"))
                .is_ok()
        );
        assert!(
            trust
                .check(EventType::OrderFailed, Some("payments"))
                .is_err()
        );
        assert!(trust.check(EventType::OrderFailed, Some("orders")).is_ok());
        // Not named: the service's own user.
        assert!(
            trust
                .check(EventType::InventoryReserved, Some("inventory"))
                .is_ok()
        );
        let err = trust
            .check(EventType::OrderFailed, Some("payments"))
            .unwrap_err();
        assert!(err.to_string().contains("order-svc"), "{err}");
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(ProducerTrust::new("u", Some("payment-svc")).is_err());
        assert!(ProducerTrust::new("u", Some("bank-svc=x")).is_err());
        assert!(ProducerTrust::new("u", Some("payment-svc=")).is_err());
        assert!(ProducerTrust::new("u", Some(" ")).is_ok());
    }

    #[test]
    fn the_user_comes_from_the_url() {
        assert_eq!(amqp_user("amqp://alice:pw@127.0.0.1:5672/%2f"), "alice");
        assert_eq!(amqp_user("amqp://127.0.0.1:5672/%2f"), "guest");
    }
}
