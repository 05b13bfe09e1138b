//! The messaging contract as an AsyncAPI 3.0 document, `docs/asyncapi.yaml`,
//! generated from the code that defines it, so that it cannot drift:
//!
//! - a channel per routing key on `saga.events` ([`EventType::ALL`]), with
//!   the AMQP binding of the exchange as [`crate::messaging::topology`]
//!   declares it;
//! - who publishes (`send`) and who consumes (`receive`) each key, from the
//!   choreography ([`crate::saga::choreography`]) the topology binds queues
//!   from: a service sends what its reactions may emit, receives what it is
//!   bound to (its durable queue, or — order-svc — its replicas' transient
//!   queues), and a client sends `order.requested` and is replied to (the
//!   [`Verb`] of each operation's key);
//! - the reply: the channel `order.result`, whose address is null (each
//!   request names its own queue in its AMQP `reply_to` property, which no
//!   AsyncAPI runtime expression can point at, so the reply names the
//!   channel only and its description says where the result dict goes);
//! - the messages: payloads by `$ref` to the JSON Schemas of
//!   `docs/schemas/` ([`crate::messaging::schema`]), the AMQP headers table
//!   (`traceparent`) and, as the extension `x-amqp-properties`, the AMQP
//!   properties each message carries (`message_id`, `correlation_id`,
//!   `type`, `reply_to`…), which are not headers.
//!
//! [`document`] builds it as an ordered tree and [`render`] writes it as
//! YAML (a small emitter: block mappings and sequences, plain scalars where
//! YAML reads them back unchanged, quoted otherwise). The committed file is
//! compared with it by `the_committed_asyncapi_document_is_generated_from_the_code`;
//! the contracts test validates it with the AsyncAPI parser itself.

use std::fmt::Write as _;

use crate::messaging::envelope::SCHEMA_VERSION;
use crate::messaging::events::{EXCHANGE, EventType};
use crate::messaging::schema::{self, ENVELOPE_FILE, ORDER_REQUESTED_FILE, ORDER_RESULT_FILE};
use crate::messaging::topology::{ORDER_SVC, SERVICES};
use crate::saga::choreography::{self, Delivery, Trigger};

/// Where the document lives, relative to the repository.
pub const ASYNCAPI_FILE: &str = "docs/asyncapi.yaml";

/// The channel (and message) of the result dict sent to a client's
/// `reply_to` queue; also the AMQP `type` of that reply.
pub const REPLY: &str = "order.result";

/// The party that is not one of the services: whoever places orders.
pub const CLIENT: &str = "client";

const AMQP_BINDING_VERSION: &str = "0.3.0";

/// A YAML node whose mappings keep the order they were built in.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
}

fn s(text: impl Into<String>) -> Node {
    Node::Str(text.into())
}

fn map<K: Into<String>>(entries: impl IntoIterator<Item = (K, Node)>) -> Node {
    Node::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn list(items: impl IntoIterator<Item = Node>) -> Node {
    Node::List(items.into_iter().collect())
}

fn reference(target: impl Into<String>) -> Node {
    map([("$ref", s(target))])
}

impl Node {
    /// The value at `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The same tree as JSON (mapping order is lost), e.g. to use one of
    /// the document's schemas with a JSON Schema validator.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::Str(text) => Value::from(text.as_str()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
            Node::List(items) => Value::Array(items.iter().map(Node::to_json).collect()),
        }
    }

    /// The keys of a mapping, in order.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Node::Map(entries) => entries.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// What a party does with a routing key: the middle word of an operation's
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    /// Publishes it (AsyncAPI action `send`).
    Sends,
    /// Consumes it from its durable work queue (action `receive`).
    Receives,
    /// Consumes it without acks on transient queues of its own: order-svc's
    /// replicas (action `receive`).
    Observes,
}

impl Verb {
    /// The word in an operation's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Sends => "sends",
            Verb::Receives => "receives",
            Verb::Observes => "observes",
        }
    }

    /// The AsyncAPI operation's `action`.
    pub fn action(self) -> &'static str {
        match self {
            Verb::Sends => "send",
            Verb::Receives | Verb::Observes => "receive",
        }
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation's key: `<party>.<verb>.<channel>`, e.g.
/// `payment-svc.receives.order.created`.
pub fn operation_id(party: &str, verb: Verb, key: &str) -> String {
    format!("{party}.{verb}.{key}")
}

/// What a service does when it sends `event`: the steps of its reactions
/// that may emit it.
fn steps_emitting(service: &str, event: EventType) -> Vec<&'static str> {
    choreography::REACTIONS
        .iter()
        .filter(|r| r.service == service && r.outcomes.iter().any(|o| o.contains(&event)))
        .map(|r| r.step)
        .collect()
}

/// The steps of `service` that `event` triggers with `delivery`.
fn steps_on(service: &str, event: EventType, delivery: Delivery) -> Vec<&'static str> {
    choreography::REACTIONS
        .iter()
        .filter(|r| {
            r.service == service && r.delivery == delivery && r.on.contains(&Trigger::Event(event))
        })
        .map(|r| r.step)
        .collect()
}

/// Every (party, verb, event) the choreography and topology define, in
/// catalogue order: the operations the document must list.
pub fn expected_operations() -> Vec<(String, Verb, EventType)> {
    let mut ops = vec![(CLIENT.to_owned(), Verb::Sends, EventType::OrderRequested)];
    for event in EventType::ALL {
        for svc in SERVICES {
            if !steps_emitting(svc.name, event).is_empty() {
                ops.push((svc.name.to_owned(), Verb::Sends, event));
            }
            if svc.is_consumed(event) {
                ops.push((svc.name.to_owned(), Verb::Receives, event));
            }
            if svc.observes().contains(&event) {
                ops.push((svc.name.to_owned(), Verb::Observes, event));
            }
        }
    }
    ops.sort_by_key(|(party, verb, event)| {
        (
            EventType::ALL.iter().position(|e| e == event),
            *verb != Verb::Sends,
            party.clone(),
        )
    });
    ops
}

/// The whole document.
pub fn document() -> Node {
    map([
        ("asyncapi", s("3.0.0")),
        ("id", s("urn:order-saga:saga.events")),
        ("info", info()),
        ("defaultContentType", s("application/json")),
        ("servers", servers()),
        ("channels", channels()),
        ("operations", operations()),
        ("components", components()),
    ])
}

fn info() -> Node {
    map([
        ("title", s("Order saga: the saga.events exchange")),
        ("version", s(SCHEMA_VERSION.to_string())),
        (
            "description",
            s(format!(
                "Every message of the order saga goes through one durable topic exchange, \
                 `{EXCHANGE}`; the routing key is the event name (also the AMQP `type` \
                 property). Four services (order-svc, payment-svc, inventory-svc, \
                 notification-svc) react to each other's events; a client places an order by \
                 publishing `order.requested` and gets the result dict on its `reply_to` \
                 queue. Generated from the code (common::messaging::asyncapi); docs/events.md \
                 is the same contract for humans.\n\n\
                 Payloads are the JSON Schemas (draft 2020-12) of docs/schemas/: every event \
                 but `order.requested` is an envelope whose `version` is this document's \
                 version; fields may be added to a version, so consumers ignore fields they \
                 do not know. Every service binds a durable queue `<service>.events` to the \
                 keys it receives (manual acks, redeliveries deduplicated), and parks what it \
                 cannot handle in `<service>.parking`; each order-svc replica also observes \
                 some keys on a transient queue of its own, `order-svc.replica.<id>`, which \
                 also receives decisions other replicas hand it (AMQP `type` \
                 `order.decision`, body the result dict; internal, through the default \
                 exchange). Clients may bind queues of their own to any key."
            )),
        ),
        ("license", map([("name", s("MIT OR Apache-2.0"))])),
    ])
}

fn servers() -> Node {
    map([(
        "local",
        map([
            ("host", s("127.0.0.1:5672")),
            ("protocol", s("amqp")),
            ("protocolVersion", s("0.9.1")),
            (
                "description",
                s(
                    "The development broker (scripts/dev-up.sh): the services' AMQP_URL, \
                   amqp://guest:guest@127.0.0.1:5672/%2f by default; the virtual host is the \
                   URL's path.",
                ),
            ),
        ]),
    )])
}

fn channel_description(event: EventType) -> String {
    let meaning = schema::event_description(event);
    match event {
        EventType::OrderRequested => format!(
            "{meaning} The body is the order dict (docs/schemas/{ORDER_REQUESTED_FILE}); the \
             result dict is replied to the request's `reply_to` queue."
        ),
        _ => {
            format!(
                "{meaning} The body is an envelope (docs/schemas/{ENVELOPE_FILE}#/$defs/{})",
                event.routing_key()
            ) + "."
        }
    }
}

fn channels() -> Node {
    let mut entries: Vec<(String, Node)> = EventType::ALL
        .iter()
        .map(|event| {
            let key = event.routing_key();
            (
                key.to_owned(),
                map([
                    ("address", s(key)),
                    ("title", s(key)),
                    ("description", s(channel_description(*event))),
                    (
                        "messages",
                        map([(key, reference(format!("#/components/messages/{key}")))]),
                    ),
                    (
                        "bindings",
                        reference(format!("#/components/channelBindings/{EXCHANGE}")),
                    ),
                ]),
            )
        })
        .collect();
    entries.push((
        REPLY.to_owned(),
        map([
            // Each client names its own queue: the address is the
            // request's `reply_to` (see the operations' `reply`).
            ("address", Node::Null),
            ("title", s("reply_to")),
            (
                "description",
                s(
                    "The client's own queue, named by the AMQP `reply_to` property of its \
                   `order.requested` (a property, not an entry of the headers table, so no \
                   AsyncAPI runtime expression can point at it: the address is left null): \
                   RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`) or a server-named \
                   queue (`amq.gen-…`); any other address is refused (the request is parked, \
                   no order placed). No `reply_to`, no reply. order-svc publishes the result \
                   dict there through the default exchange (routing key = the queue's name, \
                   `expiration` 600000 ms; one with no queue, its client gone, is dropped and \
                   counted) once the saga is decided, and a `pending` one first if the saga \
                   waits for an outside answer (3-D Secure, a backorder), within the deadline.",
                ),
            ),
            (
                "messages",
                map([(REPLY, reference(format!("#/components/messages/{REPLY}")))]),
            ),
            (
                "bindings",
                map([(
                    "amqp",
                    map([
                        ("is", s("routingKey")),
                        ("exchange", map([("type", s("default"))])),
                        ("bindingVersion", s(AMQP_BINDING_VERSION)),
                    ]),
                )]),
            ),
        ]),
    ));
    Node::Map(entries)
}

/// The reply of `order.requested`: the reply channel and its message, no
/// `address`. An Operation Reply Address must have a `location`, a runtime
/// expression into the request's headers table or payload
/// (`$message.header#/…`, `$message.payload#/…`), and `reply_to` is in
/// neither: it is an AMQP property. So the reply names only the channel,
/// whose address is null (known at runtime) and whose description says it
/// is the queue the `reply_to` property names.
fn reply() -> Node {
    map([
        ("channel", reference(format!("#/channels/{REPLY}"))),
        (
            "messages",
            list([reference(format!("#/channels/{REPLY}/messages/{REPLY}"))]),
        ),
    ])
}

fn operation(party: &str, verb: Verb, event: EventType) -> Node {
    let key = event.routing_key();
    let steps = |v: Vec<&str>| v.join(", ");
    let (summary, description, amqp) = match verb {
        Verb::Sends if party == CLIENT => (
            "A client places an order.".to_owned(),
            "Published with a `message_id` (the idempotency key: the same one twice is one \
             order) and, to get the result dict back, `reply_to` (+ `correlation_id`)."
                .to_owned(),
            map([
                ("deliveryMode", Node::Int(2)),
                ("bindingVersion", s(AMQP_BINDING_VERSION)),
            ]),
        ),
        Verb::Sends => (
            format!("{party}: {}.", steps(steps_emitting(party, event))),
            format!(
                "Written to {party}'s outbox in the transaction of the state change that \
                 causes it, then published with publisher confirms; at least once (a consumer \
                 may see it twice)."
            ),
            map([
                ("deliveryMode", Node::Int(2)),
                ("mandatory", Node::Bool(true)),
                ("timestamp", Node::Bool(true)),
                ("bindingVersion", s(AMQP_BINDING_VERSION)),
            ]),
        ),
        Verb::Receives => (
            format!(
                "{party}: {}.",
                steps(steps_on(party, event, Delivery::Durable))
            ),
            format!(
                "Consumed from the durable queue `{party}.events` (bound to `{EXCHANGE}` with \
                 this key; manual acks, in batches), deduplicated; what cannot be handled is \
                 retried, then parked in `{party}.parking`."
            ),
            map([
                ("ack", Node::Bool(true)),
                ("bindingVersion", s(AMQP_BINDING_VERSION)),
            ]),
        ),
        Verb::Observes => (
            format!(
                "{party}: {}.",
                steps(steps_on(party, event, Delivery::Observed))
            ),
            format!(
                "Each {party} replica binds its own exclusive, transient queue \
                 `{party}.replica.<id>` to this key, consumed without acks: a hint of how far \
                 a saga has got, nothing depends on it being seen."
            ),
            map([
                ("ack", Node::Bool(false)),
                ("bindingVersion", s(AMQP_BINDING_VERSION)),
            ]),
        ),
    };
    let mut entries = vec![
        ("action".to_owned(), s(verb.action())),
        ("channel".to_owned(), reference(format!("#/channels/{key}"))),
        ("summary".to_owned(), s(summary)),
        ("description".to_owned(), s(description)),
        (
            "messages".to_owned(),
            list([reference(format!("#/channels/{key}/messages/{key}"))]),
        ),
        ("bindings".to_owned(), map([("amqp", amqp)])),
    ];
    if event == EventType::OrderRequested {
        entries.push(("reply".to_owned(), reply()));
    }
    Node::Map(entries)
}

fn operations() -> Node {
    Node::Map(
        expected_operations()
            .into_iter()
            .map(|(party, verb, event)| {
                (
                    operation_id(&party, verb, event.routing_key()),
                    operation(&party, verb, event),
                )
            })
            .collect(),
    )
}

/// A JSON Schema (as a node) of string properties: `(name, description)`.
fn properties_schema(description: &str, props: &[(&str, Node)], required: &[&str]) -> Node {
    map([
        ("description", s(description)),
        ("type", s("object")),
        (
            "properties",
            Node::Map(
                props
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
            ),
        ),
        ("required", list(required.iter().map(|r| s(*r)))),
    ])
}

fn described(ty: &str, description: &str) -> Node {
    map([("type", s(ty)), ("description", s(description))])
}

fn constant(value: Node, description: &str) -> Node {
    map([("const", value), ("description", s(description))])
}

const AMQP_PROPERTIES: &str = "AMQP basic properties of the message (properties, not entries of \
     the headers table), as a JSON Schema of their values.";

fn event_properties() -> Node {
    properties_schema(
        AMQP_PROPERTIES,
        &[
            (
                "message_id",
                map([
                    ("type", s("string")),
                    ("format", s("uuid")),
                    (
                        "description",
                        s(
                            "The envelope's `event_id`, stable across re-publishing: consumers \
                           deduplicate on it.",
                        ),
                    ),
                ]),
            ),
            (
                "correlation_id",
                map([
                    ("type", s("string")),
                    ("format", s("uuid")),
                    ("description", s("The envelope's `order_id`: the saga.")),
                ]),
            ),
            (
                "type",
                described("string", "The routing key (= the envelope's `event_type`)."),
            ),
            ("content_type", constant(s("application/json"), "JSON.")),
            ("delivery_mode", constant(Node::Int(2), "Persistent.")),
            (
                "app_id",
                described("string", "The emitting service (informational)."),
            ),
            (
                "user_id",
                described(
                    "string",
                    "The broker user the emitting service connects as, validated by RabbitMQ. \
                     A service applies an event only from the user of the service that owns \
                     its type (PRODUCER_USERS); any other is parked.",
                ),
            ),
            (
                "timestamp",
                described(
                    "integer",
                    "When this copy was published (Unix seconds, the emitting service's clock), \
                     stamped at each publish of the outbox row, not at its commit: a row \
                     published again (the sweeper re-sends one whose confirm never came) \
                     carries the later time. Copies re-published to retry and parking queues, \
                     or replayed by `sagactl dlq replay`, keep the time they had.",
                ),
            ),
        ],
        &[
            "message_id",
            "correlation_id",
            "type",
            "content_type",
            "delivery_mode",
            "app_id",
            "user_id",
            "timestamp",
        ],
    )
}

fn request_properties() -> Node {
    properties_schema(
        AMQP_PROPERTIES,
        &[
            (
                "message_id",
                map([
                    ("type", s("string")),
                    ("minLength", Node::Int(1)),
                    ("maxLength", Node::Int(200)),
                    (
                        "description",
                        s(
                            "Required: the client's idempotency key. The same `message_id` twice \
                           is one order; again after the decision, it gets the result again. \
                           Without one the request is answered `Invalid order` and parked.",
                        ),
                    ),
                ]),
            ),
            (
                "reply_to",
                described(
                    "string",
                    "Optional: the client's reply queue the result dict is published to \
                     (default exchange): `amq.rabbitmq.reply-to` or a server-named `amq.gen-…` \
                     queue; any other is refused.",
                ),
            ),
            (
                "correlation_id",
                described(
                    "string",
                    "Optional: copied onto the reply; defaults to the `message_id`.",
                ),
            ),
            ("content_type", constant(s("application/json"), "JSON.")),
            (
                "delivery_mode",
                map([
                    ("enum", list([Node::Int(1), Node::Int(2)])),
                    ("description", s("2 (persistent) is recommended.")),
                ]),
            ),
        ],
        &["message_id"],
    )
}

fn reply_properties() -> Node {
    properties_schema(
        AMQP_PROPERTIES,
        &[
            (
                "message_id",
                map([
                    ("type", s("string")),
                    ("format", s("uuid")),
                    (
                        "description",
                        s("Derived from the cause and the queue: a re-sent reply has the same id."),
                    ),
                ]),
            ),
            (
                "correlation_id",
                described(
                    "string",
                    "The request's `correlation_id`, or its `message_id` if it had none.",
                ),
            ),
            ("type", constant(s(REPLY), "Always `order.result`.")),
            ("content_type", constant(s("application/json"), "JSON.")),
            ("delivery_mode", constant(Node::Int(2), "Persistent.")),
            ("app_id", constant(s(ORDER_SVC.name), "order-svc.")),
            (
                "user_id",
                described("string", "order-svc's broker user, validated by RabbitMQ."),
            ),
            (
                "timestamp",
                described(
                    "integer",
                    "When this copy of the reply was published (Unix seconds, order-svc's \
                     clock), not when it was committed: a reply published again carries the \
                     later time.",
                ),
            ),
        ],
        &["message_id", "correlation_id", "type", "content_type"],
    )
}

fn message(
    key: &str,
    summary: String,
    payload: String,
    headers: Option<&str>,
    properties: &str,
    event: bool,
) -> Node {
    let mut entries = vec![
        ("name".to_owned(), s(key)),
        ("title".to_owned(), s(key)),
        ("summary".to_owned(), s(summary)),
        ("contentType".to_owned(), s("application/json")),
    ];
    if let Some(headers) = headers {
        entries.push((
            "headers".to_owned(),
            reference(format!("#/components/schemas/{headers}")),
        ));
    }
    entries.push(("payload".to_owned(), reference(payload)));
    if event {
        entries.push((
            "correlationId".to_owned(),
            reference("#/components/correlationIds/order_id"),
        ));
    }
    entries.push((
        "bindings".to_owned(),
        map([(
            "amqp",
            map([
                ("messageType", s(key)),
                ("bindingVersion", s(AMQP_BINDING_VERSION)),
            ]),
        )]),
    ));
    entries.push((
        "x-amqp-properties".to_owned(),
        reference(format!("#/components/schemas/{properties}")),
    ));
    Node::Map(entries)
}

fn messages() -> Node {
    let mut entries: Vec<(String, Node)> = EventType::ALL
        .iter()
        .map(|event| {
            let key = event.routing_key();
            let node = if *event == EventType::OrderRequested {
                message(
                    key,
                    schema::event_description(*event),
                    format!("./schemas/{ORDER_REQUESTED_FILE}"),
                    Some("TraceHeaders"),
                    "RequestProperties",
                    false,
                )
            } else {
                message(
                    key,
                    schema::event_description(*event),
                    format!("./schemas/{ENVELOPE_FILE}#/$defs/{key}"),
                    Some("EventHeaders"),
                    "EventProperties",
                    true,
                )
            };
            (key.to_owned(), node)
        })
        .collect();
    entries.push((
        REPLY.to_owned(),
        message(
            REPLY,
            "The result dict of an order placed over AMQP: `success`, `failure` or \
             `pending` (then the final one follows)."
                .to_owned(),
            format!("./schemas/{ORDER_RESULT_FILE}"),
            None,
            "ReplyProperties",
            false,
        ),
    ));
    Node::Map(entries)
}

fn traceparent(description: &str) -> Node {
    map([
        ("type", s("string")),
        (
            "pattern",
            s("^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"),
        ),
        ("description", s(description)),
    ])
}

fn components() -> Node {
    map([
        (
            "channelBindings",
            map([(
                EXCHANGE,
                map([(
                    "amqp",
                    map([
                        ("is", s("routingKey")),
                        (
                            "exchange",
                            map([
                                ("name", s(EXCHANGE)),
                                ("type", s("topic")),
                                ("durable", Node::Bool(true)),
                                ("autoDelete", Node::Bool(false)),
                                ("vhost", s("/")),
                            ]),
                        ),
                        ("bindingVersion", s(AMQP_BINDING_VERSION)),
                    ]),
                )]),
            )]),
        ),
        ("messages", messages()),
        (
            "schemas",
            map([
                ("EventProperties", event_properties()),
                ("RequestProperties", request_properties()),
                ("ReplyProperties", reply_properties()),
                (
                    "EventHeaders",
                    map([
                        (
                            "description",
                            s(
                                "The AMQP headers table of an event. Copies re-published to a \
                               service's retry and parking queues carry `x-…` headers too (see \
                               docs/events.md); none of them on this exchange is honoured unless \
                               the consuming service's own user published it.",
                            ),
                        ),
                        ("type", s("object")),
                        (
                            "properties",
                            map([(
                                "traceparent",
                                traceparent(
                                    "W3C trace context, set on every event the services \
                                     publish; its trace id is the order id (32 hex digits), so \
                                     every log line and span of one saga shares it.",
                                ),
                            )]),
                        ),
                    ]),
                ),
                (
                    "TraceHeaders",
                    map([
                        (
                            "description",
                            s("The AMQP headers table of a request: nothing is required."),
                        ),
                        ("type", s("object")),
                        (
                            "properties",
                            map([(
                                "traceparent",
                                traceparent("Optional W3C trace context of the client."),
                            )]),
                        ),
                    ]),
                ),
            ]),
        ),
        (
            "correlationIds",
            map([(
                "order_id",
                map([
                    (
                        "description",
                        s(
                            "The saga: the envelope's `order_id`, also the AMQP `correlation_id` \
                           property.",
                        ),
                    ),
                    ("location", s("$message.payload#/order_id")),
                ]),
            )]),
        ),
    ])
}

/// The document as committed (YAML, with a header comment).
pub fn render() -> String {
    let mut out = String::from(
        "# The AsyncAPI 3.0 document of the saga.events exchange. Generated from the code by\n\
         # common::messaging::asyncapi; do not edit. Regenerate:\n\
         #   cargo test -p common --lib -- --ignored write_schemas write_asyncapi\n",
    );
    if let Node::Map(entries) = document() {
        for (key, value) in &entries {
            write_entry(&mut out, 0, key, value);
        }
    }
    out
}

/// Longest line the emitter aims for when folding long text.
const WIDTH: usize = 96;

fn write_entry(out: &mut String, indent: usize, key: &str, value: &Node) {
    let pad = " ".repeat(indent);
    let key = yaml_key(key);
    match value {
        Node::Map(entries) if !entries.is_empty() => {
            let _ = writeln!(out, "{pad}{key}:");
            for (k, v) in entries {
                write_entry(out, indent + 2, k, v);
            }
        }
        Node::List(items) if !items.is_empty() => {
            let _ = writeln!(out, "{pad}{key}:");
            for item in items {
                write_item(out, indent + 2, item);
            }
        }
        scalar => {
            let _ = writeln!(out, "{pad}{key}: {}", yaml_scalar(scalar, indent + 2));
        }
    }
}

fn write_item(out: &mut String, indent: usize, item: &Node) {
    let pad = " ".repeat(indent);
    match item {
        Node::Map(entries) if !entries.is_empty() => {
            // The first entry goes on the dash's line, the rest under it.
            let mut block = String::new();
            for (k, v) in entries {
                write_entry(&mut block, indent + 2, k, v);
            }
            out.push_str(&pad);
            out.push_str("- ");
            out.push_str(&block[indent + 2..]);
        }
        Node::List(_) => {
            let _ = writeln!(out, "{pad}-");
            if let Node::List(items) = item {
                for i in items {
                    write_item(out, indent + 2, i);
                }
            }
        }
        scalar => {
            let _ = writeln!(out, "{pad}- {}", yaml_scalar(scalar, indent + 2));
        }
    }
}

fn yaml_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
        && !key.starts_with('-');
    if plain {
        key.to_owned()
    } else {
        serde_json::Value::from(key).to_string()
    }
}

/// A scalar whose block form (if any) is indented at `indent`.
fn yaml_scalar(node: &Node, indent: usize) -> String {
    match node {
        Node::Null => "null".to_owned(),
        Node::Bool(b) => b.to_string(),
        Node::Int(i) => i.to_string(),
        Node::Str(text) => yaml_string(text, indent),
        Node::Map(_) => "{}".to_owned(),
        Node::List(_) => "[]".to_owned(),
    }
}

fn yaml_string(text: &str, indent: usize) -> String {
    if is_plain(text) && text.len() + indent < WIDTH {
        return text.to_owned();
    }
    let quotable = text.chars().all(|c| !c.is_control());
    if quotable && text.len() + indent + 2 < WIDTH {
        // Single-quoted: everything literal but the quote, doubled.
        return format!("'{}'", text.replace('\'', "''"));
    }
    let foldable = !text.is_empty()
        && !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.contains("  ")
        && !text.contains(" \n")
        && !text.contains("\n ")
        && !text.contains('\t')
        && !text.contains("\n\n\n")
        && !text.ends_with('\n')
        && text.chars().all(|c| !c.is_control() || c == '\n');
    if !foldable {
        return serde_json::Value::from(text).to_string();
    }
    // Folded: a single line break reads back as a space, an empty line as
    // a line break; so each paragraph is wrapped, paragraphs are separated
    // by an empty line.
    let mut lines: Vec<String> = Vec::new();
    for (i, paragraph) in text.split('\n').enumerate() {
        if i > 0 {
            lines.push(String::new());
        }
        if paragraph.is_empty() {
            continue;
        }
        let mut line = String::new();
        for word in paragraph.split(' ') {
            if !line.is_empty() && indent + line.len() + 1 + word.len() > WIDTH {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    let pad = " ".repeat(indent);
    let mut out = String::from(">-");
    for line in lines {
        out.push('\n');
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(&line);
        }
    }
    out
}

/// Whether YAML reads `text` back unchanged as a plain scalar (a string:
/// nothing that looks like a number, boolean or null).
fn is_plain(text: &str) -> bool {
    let Some(first) = text.chars().next() else {
        return false;
    };
    let reserved = [
        "true", "false", "null", "yes", "no", "on", "off", "y", "n", "~",
    ];
    (first.is_ascii_alphanumeric() || matches!(first, '$' | '/' | '_' | '.'))
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _-./$()+@,#".contains(c))
        && !text.ends_with(' ')
        && !text.contains(" #")
        && !reserved.contains(&text.to_ascii_lowercase().as_str())
        && text.parse::<f64>().is_err()
        && !text.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../../../docs/asyncapi.yaml");

    #[test]
    fn the_committed_asyncapi_document_is_generated_from_the_code() {
        assert!(
            render() == COMMITTED,
            "{ASYNCAPI_FILE} is out of date: regenerate it with \
             `cargo test -p common --lib -- --ignored write_schemas write_asyncapi`"
        );
    }

    #[test]
    #[ignore = "rewrites docs/asyncapi.yaml from the code"]
    fn write_asyncapi() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(ASYNCAPI_FILE);
        std::fs::write(&path, render()).unwrap();
        println!("wrote {ASYNCAPI_FILE}");
    }

    #[test]
    fn every_routing_key_is_a_channel_and_every_service_operation_is_listed() {
        let doc = document();
        let channels = doc.get("channels").unwrap();
        for event in EventType::ALL {
            let channel = channels.get(event.routing_key()).unwrap();
            assert_eq!(
                channel.get("address"),
                Some(&s(event.routing_key())),
                "{event}"
            );
        }
        let ops = doc.get("operations").unwrap().keys();
        for expected in [
            "client.sends.order.requested",
            "order-svc.receives.order.requested",
            "order-svc.sends.order.created",
            "payment-svc.receives.order.created",
            "payment-svc.sends.payment.completed",
            "inventory-svc.receives.payment.completed",
            "order-svc.observes.payment.completed",
            "notification-svc.receives.inventory.reserved",
            "order-svc.receives.notification.deferred",
            "inventory-svc.receives.order.confirmed",
            "payment-svc.receives.order.cancelled",
            "inventory-svc.receives.payment.action_required",
        ] {
            assert!(ops.contains(&expected), "{expected} missing: {ops:?}");
        }
        // Every event is sent by someone and received by someone.
        for event in EventType::ALL {
            let key = event.routing_key();
            assert!(
                ops.iter().any(|o| o.ends_with(&format!(".sends.{key}"))),
                "nobody sends {key}"
            );
            assert!(
                ops.iter().any(|o| o.ends_with(&format!(".receives.{key}"))
                    || o.ends_with(&format!(".observes.{key}"))),
                "nobody receives {key}"
            );
        }
    }

    #[test]
    fn yaml_scalars_are_plain_only_when_they_read_back_as_the_same_string() {
        for plain in [
            "saga.events",
            "order-svc",
            "application/json",
            "$message.payload#/order_id",
        ] {
            assert_eq!(yaml_string(plain, 0), plain);
        }
        for quoted in [
            "1",
            "3.0",
            "true",
            "no",
            "a: b",
            "x #y",
            "",
            "127.0.0.1:5672",
            "- x",
        ] {
            let out = yaml_string(quoted, 0);
            assert_eq!(out, format!("'{quoted}'"));
        }
        assert_eq!(yaml_string("it's", 0), "'it''s'");
        assert_eq!(yaml_string("a\tb", 0), r#""a\tb""#);
        let long = "word ".repeat(40).trim_end().to_owned() + "\nsecond paragraph";
        let folded = yaml_string(&long, 4);
        assert!(folded.starts_with(">-\n    word"), "{folded}");
        assert!(folded.lines().all(|l| l.len() <= WIDTH), "{folded}");
        // Unfolding gives the text back.
        let body: Vec<&str> = folded.lines().skip(1).map(str::trim_start).collect();
        let mut unfolded = String::new();
        for line in body {
            if line.is_empty() {
                unfolded.push('\n');
            } else {
                if !unfolded.is_empty() && !unfolded.ends_with('\n') {
                    unfolded.push(' ');
                }
                unfolded.push_str(line);
            }
        }
        assert_eq!(unfolded, long);
    }
}
