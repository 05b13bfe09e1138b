//! The broker permissions each user needs, and no more: derived from the
//! [topology](crate::messaging::topology) and the
//! [choreography](crate::saga::choreography), so that they follow every
//! change to who publishes and consumes what.
//!
//! A service's user may declare, bind, read and purge only its own queues
//! (`<service>.events`, `.parking`, `.retry.*`, `.replica.*`); publish to
//! `saga.events` only the events it owns, and bind its queues only to the
//! events it consumes or observes (topic permissions, checked by the broker
//! on publish and on bind); put messages back into its own queues through
//! `saga.requeue` only. No service may publish through the default exchange
//! — which reaches every queue — but order-svc, whose replies go to the
//! client's reply queue. Nobody but the operator may declare or delete an
//! exchange, or create a queue that dead-letters: the whole topology is
//! declared once by an administrator (`sagactl broker setup`, or the
//! services themselves when they run as an administrator, as in
//! development).
//!
//! The client user may publish `order.requested` only, and use only its own
//! reply queues (server-named `amq.gen-…`, or RabbitMQ's direct reply-to).

use crate::messaging::events::{EXCHANGE, EventType, REQUEUE_EXCHANGE};
use crate::messaging::topology::{ORDER_SVC, SERVICES, ServiceIdentity};
use crate::messaging::trust;

/// A user's permissions on one vhost: three regular expressions over
/// resource names (RabbitMQ's `set_permissions`), and per topic exchange
/// two over routing keys (`set_topic_permissions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    pub topics: Vec<TopicPermission>,
}

/// Which routing keys a user may publish (`write`) and bind queues to
/// (`read`) on a topic exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermission {
    pub exchange: &'static str,
    pub write: String,
    pub read: String,
}

/// Matches nothing: RabbitMQ's way of granting no permission.
const NOTHING: &str = "^$";

/// The permissions of `svc`'s broker user.
pub fn for_service(svc: &ServiceIdentity) -> Permissions {
    let name = regex_escape(svc.name);
    let own_queues = format!(r"{name}\.(events|parking|retry\..+|replica\..+)");
    let exchanges = format!(
        "{}|{}",
        regex_escape(EXCHANGE),
        regex_escape(REQUEUE_EXCHANGE)
    );
    // Replies go through the default exchange to the client's reply queue
    // (order-svc confines the reply address, see `reply_to`).
    let default_exchange = if svc.name == ORDER_SVC.name {
        "|amq\\.default"
    } else {
        ""
    };
    let publishes: Vec<EventType> = EventType::ALL
        .into_iter()
        .filter(|e| trust::owner(*e) == Some(svc.name))
        .collect();
    let mut binds = svc.consumes();
    binds.extend(svc.observes());
    binds.sort_by_key(|e| e.routing_key());
    binds.dedup();
    Permissions {
        configure: format!("^{own_queues}$"),
        write: format!("^({exchanges}{default_exchange}|{own_queues})$"),
        read: format!("^({exchanges}|{own_queues})$"),
        topics: vec![
            TopicPermission {
                exchange: EXCHANGE,
                write: any_of(&publishes),
                read: any_of(&binds),
            },
            TopicPermission {
                exchange: REQUEUE_EXCHANGE,
                write: format!(r"^{name}\."),
                read: format!(r"^{name}\."),
            },
        ],
    }
}

/// The permissions of the client user that places orders over AMQP.
pub fn for_client() -> Permissions {
    let replies = r"amq\.gen-.*";
    Permissions {
        configure: format!("^{replies}$"),
        write: format!("^({}|{replies})$", regex_escape(EXCHANGE)),
        read: format!("^{replies}$"),
        topics: vec![
            TopicPermission {
                exchange: EXCHANGE,
                write: any_of(&[EventType::OrderRequested]),
                read: NOTHING.to_owned(),
            },
            TopicPermission {
                exchange: REQUEUE_EXCHANGE,
                write: NOTHING.to_owned(),
                read: NOTHING.to_owned(),
            },
        ],
    }
}

/// Every service's permissions, by service.
pub fn all_services() -> Vec<(ServiceIdentity, Permissions)> {
    SERVICES.iter().map(|s| (*s, for_service(s))).collect()
}

/// A regular expression that matches exactly these routing keys.
fn any_of(events: &[EventType]) -> String {
    if events.is_empty() {
        return NOTHING.to_owned();
    }
    let keys: Vec<String> = events
        .iter()
        .map(|e| regex_escape(e.routing_key()))
        .collect();
    format!("^({})$", keys.join("|"))
}

/// Escapes what a resource name or routing key may hold that a regular
/// expression would read as syntax.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(
            c,
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' | '\\'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::topology::{NOTIFICATION_SVC, PAYMENT_SVC};

    #[test]
    fn a_service_publishes_only_its_own_events_and_binds_only_what_it_reacts_to() {
        let p = for_service(&NOTIFICATION_SVC);
        let events = &p.topics[0];
        assert_eq!(events.exchange, "saga.events");
        assert_eq!(
            events.write,
            r"^(notification\.sent|notification\.failed|notification\.deferred)$"
        );
        // Not `order.requested`: the client's card never reaches it.
        assert!(!events.read.contains("requested"), "{}", events.read);
        assert!(
            events.read.contains(r"inventory\.reserved"),
            "{}",
            events.read
        );
        assert_eq!(
            p.configure,
            r"^notification-svc\.(events|parking|retry\..+|replica\..+)$"
        );
        assert!(!p.write.contains("amq"), "{}", p.write);
    }

    #[test]
    fn only_order_svc_may_use_the_default_exchange() {
        assert!(for_service(&ORDER_SVC).write.contains(r"amq\.default"));
        assert!(!for_service(&PAYMENT_SVC).write.contains("amq"));
        assert!(!for_client().write.contains("default"));
    }
}
