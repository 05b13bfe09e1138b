//! The message contract as JSON Schema (draft 2020-12), generated from the
//! Rust types that produce and consume the messages, so that the published
//! schemas cannot say something the code does not do.
//!
//! This module owns:
//! - [`envelope_schema`]: `docs/schemas/envelope.json`, the body of every
//!   internal event on `saga.events` — the [`Envelope`], with `data` chosen
//!   by `event_type` ([`data_schema`] says which type each event carries);
//! - [`order_requested_schema`]: `docs/schemas/order.requested.json`, the
//!   order dict a client publishes ([`OrderRequest`]);
//! - [`order_result_schema`]: `docs/schemas/order.result.json`, the result
//!   dict a client gets back on its `reply_to` queue ([`SagaResult`]);
//! - [`strict`]: a schema with every object closed, for tests that check
//!   our own producers write nothing the schema does not document;
//! - [`render`]: the files' exact text.
//!
//! The committed files are compared with what this module generates by the
//! test `the_committed_schemas_are_generated_from_the_code`; after changing a
//! message type, regenerate them with
//! `cargo test -p common --lib -- --ignored write_schemas write_asyncapi`
//! (docs/events.md, "Machine-readable contracts"; the AsyncAPI document,
//! [`crate::messaging::asyncapi`], points at these files).

use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::messaging::envelope::{Envelope, SCHEMA_VERSION};
use crate::messaging::events::{self, EventType};
use crate::saga::order::{OrderRequest, SagaResult};

/// `docs/schemas/` file of the envelope of every internal event.
pub const ENVELOPE_FILE: &str = "envelope.json";
/// `docs/schemas/` file of the client's order dict.
pub const ORDER_REQUESTED_FILE: &str = "order.requested.json";
/// `docs/schemas/` file of the result dict replied to `reply_to`.
pub const ORDER_RESULT_FILE: &str = "order.result.json";

/// The draft every schema here follows.
pub const DRAFT: &str = "https://json-schema.org/draft/2020-12/schema";

const GENERATED: &str = "Generated from the Rust types by common::messaging::schema; do not edit. \
     Regenerate: cargo test -p common --lib -- --ignored write_schemas write_asyncapi";

fn generator() -> SchemaGenerator {
    SchemaSettings::draft2020_12().into_generator()
}

/// The schema of the `data` an event of `event_type` carries, registered in
/// `generator`'s definitions (a `$ref` to it); `None` for `order.requested`,
/// whose body is the order dict, not an envelope.
///
/// The match is exhaustive on purpose: a new event type does not compile
/// until someone says what it carries. What is written here is checked
/// against the producers by the contracts test, which validates every
/// message a run of the saga publishes.
pub fn data_schema(generator: &mut SchemaGenerator, event_type: EventType) -> Option<Schema> {
    Some(match event_type {
        EventType::OrderRequested => return None,
        EventType::OrderCreated => generator.subschema_for::<events::OrderCreated>(),
        EventType::PaymentCompleted => generator.subschema_for::<events::PaymentCompleted>(),
        EventType::PaymentFailed | EventType::InventoryFailed | EventType::NotificationFailed => {
            generator.subschema_for::<events::StepFailed>()
        }
        EventType::PaymentRefunded => generator.subschema_for::<events::PaymentRefunded>(),
        EventType::PaymentActionRequired => {
            generator.subschema_for::<events::PaymentActionRequired>()
        }
        EventType::InventoryReserved => generator.subschema_for::<events::InventoryReserved>(),
        EventType::InventoryReleased => generator.subschema_for::<events::InventoryReleased>(),
        EventType::InventoryBackordered => {
            generator.subschema_for::<events::InventoryBackordered>()
        }
        // A deferred notification names the queued email as a sent one
        // names the sent email.
        EventType::NotificationSent | EventType::NotificationDeferred => {
            generator.subschema_for::<events::NotificationSent>()
        }
        EventType::OrderConfirmed | EventType::OrderFailed => {
            generator.subschema_for::<events::OrderDecided>()
        }
        EventType::OrderCancelled => generator.subschema_for::<events::OrderCancelled>(),
    })
}

/// The event types whose body is an [`Envelope`] (all but `order.requested`).
pub fn envelope_event_types() -> impl Iterator<Item = EventType> {
    EventType::ALL
        .into_iter()
        .filter(|t| *t != EventType::OrderRequested)
}

/// `docs/schemas/envelope.json`: the body of every internal event.
///
/// The root is a `oneOf` of one schema per event type, each at
/// `#/$defs/<routing key>` (so a document such as the AsyncAPI one can point
/// at one event's envelope): the common [`Envelope`] (`#/$defs/Envelope`)
/// with `event_type` fixed to that key and `data` to that event's type. No
/// two of them accept the same message, as they differ in `event_type`.
/// Objects are left open: a consumer ignores fields it does not know, which
/// is what lets a field be added without a new version.
pub fn envelope_schema() -> Value {
    let mut generator = generator();
    let base = generator.subschema_for::<Envelope>().to_value();
    let mut variants = Vec::new();
    let mut per_event = Map::new();
    // The envelope event types are the ones that carry data: `data_schema`
    // says which (all but `order.requested`), so none is assumed to.
    let carried: Vec<(EventType, Value)> = EventType::ALL
        .into_iter()
        .filter_map(|t| Some((t, data_schema(&mut generator, t)?.to_value())))
        .collect();
    for (event_type, data) in carried {
        let key = event_type.routing_key();
        per_event.insert(
            key.to_owned(),
            json!({
                "title": format!("{key} envelope"),
                "allOf": [base.clone()],
                "properties": {
                    "event_type": {"const": key},
                    "data": data,
                },
                "required": ["event_type", "data"],
            }),
        );
        variants.push(json!({"$ref": format!("#/$defs/{key}")}));
    }
    let mut defs = generator.take_definitions(true);
    // Each event's description is its catalogue entry (the doc comment of
    // its `EventType` variant), not written twice.
    for (key, variant) in per_event.iter_mut() {
        if let Some(description) = event_type_description(&defs, key) {
            variant["description"] = description.into();
        }
    }
    // The schema describes this version and no other: a message of another
    // version is parked, whatever it looks like.
    defs["Envelope"]["properties"]["version"] = json!({
        "description": "The envelope schema's version; this schema describes version \
                        SCHEMA_VERSION only. A consumer parks a message of a version it does not \
                        understand."
            .replace("SCHEMA_VERSION", &SCHEMA_VERSION.to_string()),
        "type": "integer",
        "const": SCHEMA_VERSION,
    });
    defs.extend(per_event);
    let mut schema = json!({
        "$schema": DRAFT,
        "$comment": GENERATED,
        "title": format!("Saga event envelope, version {SCHEMA_VERSION}"),
        "description": "The body of every internal event on the exchange `saga.events` (every \
                        routing key but `order.requested`, whose body is the order dict): the \
                        envelope, with `data` chosen by `event_type`. `#/$defs/<routing key>` is \
                        the schema of one event type's messages. Fields not listed here may be \
                        added without a new `version`: consumers must ignore them.",
        "oneOf": variants,
        "$defs": defs,
    });
    unwrap_descriptions(&mut schema);
    schema
}

/// The description of the `EventType` variant serialized as `key`, as
/// schemars wrote it from the variant's doc comment.
fn event_type_description(defs: &Map<String, Value>, key: &str) -> Option<String> {
    defs.get("EventType")?
        .get("oneOf")?
        .as_array()?
        .iter()
        .find(|v| v.get("const").and_then(Value::as_str) == Some(key))?
        .get("description")?
        .as_str()
        .map(str::to_owned)
}

/// `docs/schemas/order.requested.json`: the order dict a client publishes
/// with routing key `order.requested` (and `POST /orders` takes). Closed:
/// order-svc refuses unknown fields (a typo would otherwise be ignored).
pub fn order_requested_schema() -> Value {
    let mut schema = generator()
        .into_root_schema_for::<OrderRequest>()
        .to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$comment".into(), GENERATED.into());
    }
    unwrap_descriptions(&mut schema);
    schema
}

/// Descriptions come from doc comments, hard-wrapped at 80 columns: joins
/// the lines of each paragraph, so that a reader (or a documentation
/// generator) sees sentences, not the source's line breaks.
fn unwrap_descriptions(v: &mut Value) {
    match v {
        Value::Object(obj) => {
            for (key, child) in obj.iter_mut() {
                match child {
                    Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|paragraph| paragraph.replace('\n', " "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => unwrap_descriptions(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

/// `docs/schemas/order.result.json`: the result dict order-svc publishes
/// to a client's `reply_to` queue (the same dict `order.confirmed` and
/// `order.failed` carry as `data.result`, and `POST /orders` answers).
pub fn order_result_schema() -> Value {
    let mut schema = generator().into_root_schema_for::<SagaResult>().to_value();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("$comment".into(), GENERATED.into());
        obj.insert("title".into(), "order.result".into());
    }
    unwrap_descriptions(&mut schema);
    schema
}

/// What an event type means, from the catalogue (the doc comment of its
/// [`EventType`] variant, unwrapped).
pub fn event_description(event_type: EventType) -> String {
    let mut schema = generator().into_root_schema_for::<EventType>().to_value();
    unwrap_descriptions(&mut schema);
    schema["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["const"] == event_type.routing_key())
        .and_then(|v| v["description"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Every generated file: its name under `docs/schemas/` and its schema.
pub fn files() -> [(&'static str, Value); 3] {
    [
        (ENVELOPE_FILE, envelope_schema()),
        (ORDER_REQUESTED_FILE, order_requested_schema()),
        (ORDER_RESULT_FILE, order_result_schema()),
    ]
}

/// `schema` with every object that lists its properties closed
/// (`additionalProperties: false`), except the per-event wrappers of the
/// envelope schema (they only narrow `#/$defs/Envelope`, which is closed).
///
/// The published schemas are open so that fields can be added compatibly;
/// validating our own producers' messages against this one proves they
/// write no field the schema does not document.
pub fn strict(schema: &Value) -> Value {
    let mut schema = schema.clone();
    close(&mut schema);
    schema
}

fn close(v: &mut Value) {
    match v {
        Value::Object(obj) => {
            if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
                obj.insert("additionalProperties".into(), false.into());
            }
            for (key, child) in obj.iter_mut() {
                match (key.as_str(), child) {
                    ("$defs", Value::Object(defs)) => {
                        for (name, def) in defs.iter_mut() {
                            if EventType::from_routing_key(name).is_none() {
                                close(def);
                            }
                        }
                    }
                    // Property names are not schemas.
                    ("properties", Value::Object(props)) => props.values_mut().for_each(close),
                    (_, child) => close(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close),
        _ => {}
    }
}

/// A schema's text as committed: 2-space indented JSON, keywords in a
/// fixed reading order (identity, then documentation, then constraints,
/// then definitions last) and everything else sorted, whatever order the
/// maps iterate in, so that regenerating never reorders a file.
pub fn render(schema: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, schema, 0, false);
    out.push('\n');
    out
}

/// Keywords first, in this order; then any other key, sorted.
const KEYWORD_ORDER: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$ref",
    "title",
    "description",
    "type",
    "const",
    "enum",
    "format",
    "contentEncoding",
    "contentMediaType",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "items",
    "allOf",
    "oneOf",
    "anyOf",
    "properties",
    "required",
    "additionalProperties",
];

fn key_rank(key: &str) -> usize {
    if key == "$defs" {
        return usize::MAX;
    }
    KEYWORD_ORDER
        .iter()
        .position(|k| *k == key)
        .unwrap_or(KEYWORD_ORDER.len())
}

/// Writes `v` at `indent`; `names` when `v`'s keys are names (of
/// properties or definitions), sorted plainly rather than as keywords.
fn write_value(out: &mut String, v: &Value, indent: usize, names: bool) {
    match v {
        Value::Object(obj) if !obj.is_empty() => {
            let mut keys: Vec<&String> = obj.keys().collect();
            if names {
                keys.sort();
            } else {
                keys.sort_by(|a, b| key_rank(a).cmp(&key_rank(b)).then(a.cmp(b)));
            }
            out.push_str("{\n");
            for (i, key) in keys.iter().enumerate() {
                push_indent(out, indent + 1);
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push_str(": ");
                let children_are_names = !names && matches!(key.as_str(), "properties" | "$defs");
                write_value(out, &obj[key.as_str()], indent + 1, children_are_names);
                if i + 1 < keys.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            push_indent(out, indent);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                push_indent(out, indent + 1);
                write_value(out, item, indent + 1, false);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            push_indent(out, indent);
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn push_indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::messaging::envelope::SagaContext;
    use crate::messaging::events::{
        InventoryBackordered, InventoryReleased, InventoryReserved, NotificationSent,
        OrderCancelled, OrderCreated, OrderDecided, PaymentActionRequired, PaymentCompleted,
        PaymentRefunded, StepFailed,
    };
    use crate::saga::card::{CardBinding, CardDetails, CardSealer};
    use crate::saga::order::{OrderLine, PendingStep, SagaResult};

    /// The committed files, as `include_str!` sees them (so a change to
    /// one rebuilds this test).
    const COMMITTED: [(&str, &str); 3] = [
        (
            ENVELOPE_FILE,
            include_str!("../../../docs/schemas/envelope.json"),
        ),
        (
            ORDER_REQUESTED_FILE,
            include_str!("../../../docs/schemas/order.requested.json"),
        ),
        (
            ORDER_RESULT_FILE,
            include_str!("../../../docs/schemas/order.result.json"),
        ),
    ];

    fn schema_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas")
    }

    #[test]
    fn the_committed_schemas_are_generated_from_the_code() {
        for ((name, generated), (committed_name, committed)) in files().iter().zip(COMMITTED) {
            assert_eq!(*name, committed_name);
            assert!(
                render(generated) == committed,
                "docs/schemas/{name} is out of date: regenerate it with \
                 `cargo test -p common --lib -- --ignored write_schemas write_asyncapi`"
            );
        }
    }

    #[test]
    #[ignore = "rewrites docs/schemas/ from the code"]
    fn write_schemas() {
        let dir = schema_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for (name, schema) in files() {
            std::fs::write(dir.join(name), render(&schema)).unwrap();
            println!("wrote docs/schemas/{name}");
        }
    }

    #[test]
    fn the_schemas_are_valid_draft_2020_12() {
        for (name, schema) in files() {
            assert_eq!(schema["$schema"], DRAFT, "{name}");
            if let Err(e) = jsonschema::meta::validate(&schema) {
                panic!("{name} is not a valid JSON Schema: {e}");
            }
            jsonschema::meta::validate(&strict(&schema)).unwrap();
        }
    }

    #[test]
    fn render_is_independent_of_map_order_and_reads_keywords_first() {
        let text = render(&json!({"$defs": {"b": {}, "a": true}, "type": "object",
                                  "$schema": DRAFT, "properties": {"type": {"type": "string"}}}));
        assert!(text.starts_with("{\n  \"$schema\""), "{text}");
        assert!(text.trim_end().ends_with("}\n}"), "{text}");
        assert!(text.find("\"a\"").unwrap() < text.find("\"b\"").unwrap());
        let reparsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(render(&reparsed), text);
    }

    #[test]
    fn every_envelope_event_type_has_its_own_schema_and_order_requested_none() {
        let schema = envelope_schema();
        let variants = schema["oneOf"].as_array().unwrap();
        assert_eq!(variants.len(), EventType::ALL.len() - 1);
        for t in envelope_event_types() {
            let def = &schema["$defs"][t.routing_key()];
            assert_eq!(def["properties"]["event_type"]["const"], t.routing_key());
            assert!(def["properties"]["data"]["$ref"].is_string(), "{t}: {def}");
            assert!(def["description"].is_string(), "{t} has no description");
        }
        assert!(data_schema(&mut generator(), EventType::OrderRequested).is_none());
        assert!(schema["$defs"]["order.requested"].is_null());
    }

    fn validator(schema: &Value) -> jsonschema::Validator {
        jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .expect("the schema compiles")
    }

    fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
        v.iter_errors(instance)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect()
    }

    fn lines() -> Vec<OrderLine> {
        vec![OrderLine {
            item_id: "productA".into(),
            quantity: 2,
            unit_price_cents: 1500,
        }]
    }

    /// One real value of every event's data, built as its producer builds
    /// it, in an envelope made by the producers' own code path.
    fn sample_events() -> Vec<(EventType, Value)> {
        let order_id = Uuid::now_v7();
        let ctx = SagaContext {
            order_id,
            deadline_at: Utc::now(),
            causation_id: "client-key-1".into(),
            producer: "order-svc",
            trail: Vec::new(),
        };
        let card = CardSealer::new(None).unwrap().seal(
            &CardDetails {
                card_number: "4242424242424242".into(),
                expiry_date: "12/30".into(),
                cvv: "123".into(),
            },
            CardBinding {
                order_id,
                amount_cents: 3000,
            },
        );
        let failed = StepFailed {
            code: "insufficient_funds".into(),
            reason: "Insufficient funds".into(),
        };
        let email = NotificationSent {
            email_id: Uuid::new_v4(),
            kind: "confirmation".into(),
        };
        let decided = |result| OrderDecided {
            customer_id: "user123".into(),
            amount_cents: 3000,
            result,
        };
        let samples = vec![
            ctx.event(
                EventType::OrderCreated,
                &OrderCreated {
                    customer_id: "user123".into(),
                    items: lines(),
                    amount_cents: 3000,
                    currency: "USD".into(),
                    payment: card.clone(),
                    long_deadline_at: Some(Utc::now()),
                },
            ),
            // Optional fields absent.
            ctx.event(
                EventType::OrderCreated,
                &OrderCreated {
                    customer_id: "user123".into(),
                    items: lines(),
                    amount_cents: 3000,
                    currency: "USD".into(),
                    payment: card,
                    long_deadline_at: None,
                },
            ),
            ctx.event(
                EventType::PaymentCompleted,
                &PaymentCompleted {
                    customer_id: "user123".into(),
                    items: lines(),
                    amount_cents: 3000,
                    currency: "USD".into(),
                    card_last4: "4242".into(),
                    long_deadline_at: Some(Utc::now()),
                },
            ),
            ctx.event(EventType::PaymentFailed, &failed),
            ctx.event(
                EventType::PaymentRefunded,
                &PaymentRefunded {
                    customer_id: "user123".into(),
                    amount_cents: 3000,
                },
            ),
            ctx.event(
                EventType::PaymentActionRequired,
                &PaymentActionRequired {
                    customer_id: "user123".into(),
                    items: lines(),
                    amount_cents: 3000,
                    currency: "USD".into(),
                    card_last4: "3220".into(),
                    action: "3ds_confirmation".into(),
                },
            ),
            ctx.event(
                EventType::InventoryReserved,
                &InventoryReserved {
                    customer_id: "user123".into(),
                    items: lines(),
                    amount_cents: 3000,
                    currency: "USD".into(),
                },
            ),
            ctx.event(EventType::InventoryFailed, &failed),
            ctx.event(
                EventType::InventoryReleased,
                &InventoryReleased { items: lines() },
            ),
            ctx.event(
                EventType::InventoryBackordered,
                &InventoryBackordered {
                    customer_id: "user123".into(),
                    backordered: vec!["productC".into()],
                },
            ),
            ctx.event(EventType::NotificationSent, &email),
            ctx.event(EventType::NotificationFailed, &failed),
            ctx.event(EventType::NotificationDeferred, &email),
            ctx.event(
                EventType::OrderConfirmed,
                &decided(SagaResult::Success { order_id }),
            ),
            ctx.event(
                EventType::OrderFailed,
                &decided(SagaResult::order_failed(
                    order_id,
                    "Payment failed",
                    "Insufficient funds",
                )),
            ),
            // A decision's result may also be a pending one's shape (the
            // result dict type is shared) and an input failure's.
            ctx.event(
                EventType::OrderFailed,
                &decided(SagaResult::failure("Invalid order", "items is required")),
            ),
            ctx.event(
                EventType::OrderConfirmed,
                &decided(SagaResult::Pending {
                    order_id,
                    next: PendingStep {
                        step: "payment_confirmation".into(),
                        deadline_at: Utc::now(),
                        detail: "3-D Secure".into(),
                    },
                }),
            ),
            ctx.event(
                EventType::OrderCancelled,
                &OrderCancelled {
                    customer_id: "user123".into(),
                    reason: "Saga deadline of 5000 ms exceeded while waiting for payment".into(),
                },
            ),
        ];
        // A later event carries a trail.
        let first = Envelope::decode(&samples[0].body).unwrap();
        let later = SagaContext::caused_by(&first, "payment-svc").event(
            EventType::PaymentFailed,
            &StepFailed {
                code: "card_declined".into(),
                reason: "Card declined".into(),
            },
        );
        samples
            .iter()
            .chain([&later])
            .map(|m| {
                let t = EventType::from_routing_key(&m.routing_key).unwrap();
                (t, serde_json::from_slice(&m.body).unwrap())
            })
            .collect()
    }

    #[test]
    fn real_events_of_every_type_validate_against_the_schema() {
        let schema = envelope_schema();
        let open = validator(&schema);
        let closed = validator(&strict(&schema));
        let samples = sample_events();
        for t in envelope_event_types() {
            assert!(
                samples.iter().any(|(s, _)| *s == t),
                "no sample of {t}: add one"
            );
        }
        assert!(samples.iter().any(|(_, v)| v["trail"].is_array()));
        for (t, body) in &samples {
            assert_eq!(errors(&open, body), Vec::<String>::new(), "{t}: {body}");
            assert_eq!(errors(&closed, body), Vec::<String>::new(), "{t}: {body}");
        }
    }

    #[test]
    fn a_message_the_schema_does_not_describe_is_refused() {
        let schema = envelope_schema();
        let open = validator(&schema);
        let closed = validator(&strict(&schema));
        let samples = sample_events();
        let body = |t: EventType| samples.iter().find(|(s, _)| *s == t).unwrap().1.clone();

        // Another event's data under this event type.
        let mut v = body(EventType::PaymentFailed);
        v["data"] = body(EventType::OrderCancelled)["data"].clone();
        assert!(!open.is_valid(&v));
        // A required field missing, of the envelope or of the data.
        let mut v = body(EventType::PaymentCompleted);
        v["data"].as_object_mut().unwrap().remove("card_last4");
        assert!(!open.is_valid(&v));
        let mut v = body(EventType::PaymentCompleted);
        v.as_object_mut().unwrap().remove("deadline_at");
        assert!(!open.is_valid(&v));
        // A field of the wrong type; a malformed id or time.
        let mut v = body(EventType::PaymentRefunded);
        v["data"]["amount_cents"] = "3000".into();
        assert!(!open.is_valid(&v));
        let mut v = body(EventType::PaymentRefunded);
        v["order_id"] = "not-a-uuid".into();
        assert!(!open.is_valid(&v));
        let mut v = body(EventType::PaymentRefunded);
        v["occurred_at"] = "yesterday".into();
        assert!(!open.is_valid(&v));
        // Another version, an unknown event type, order.requested.
        let mut v = body(EventType::PaymentRefunded);
        v["version"] = (SCHEMA_VERSION + 1).into();
        assert!(!open.is_valid(&v));
        let mut v = body(EventType::PaymentRefunded);
        v["event_type"] = "payment.exploded".into();
        assert!(!open.is_valid(&v));
        v["event_type"] = "order.requested".into();
        assert!(!open.is_valid(&v));
        // A result dict of no known status.
        let mut v = body(EventType::OrderConfirmed);
        v["data"]["result"]["status"] = "maybe".into();
        assert!(!open.is_valid(&v));

        // An unknown field is allowed (consumers ignore it: a compatible
        // addition), but not written by our producers.
        let mut v = body(EventType::InventoryReleased);
        v["data"]["warehouse"] = "north".into();
        v["priority"] = 1.into();
        assert!(open.is_valid(&v));
        assert!(!closed.is_valid(&v));
    }

    #[test]
    fn every_result_dict_validates_against_the_result_schema() {
        let v = validator(&strict(&order_result_schema()));
        let id = Uuid::now_v7();
        for result in [
            SagaResult::Success { order_id: id },
            SagaResult::order_failed(id, "Payment failed", "Insufficient funds"),
            SagaResult::failure("Invalid order", "items is required"),
            SagaResult::Pending {
                order_id: id,
                next: PendingStep {
                    step: "stock_arrival".into(),
                    deadline_at: Utc::now(),
                    detail: "productC".into(),
                },
            },
        ] {
            let dict = serde_json::to_value(&result).unwrap();
            assert_eq!(errors(&v, &dict), Vec::<String>::new(), "{dict}");
        }
        assert!(!v.is_valid(&json!({"status": "success"})));
        assert!(!v.is_valid(&json!({"status": "failure", "error": "x"})));
        assert!(event_description(EventType::PaymentRefunded).contains("refunded"));
    }

    #[test]
    fn the_order_dict_schema_takes_the_documented_order_and_refuses_malformed_ones() {
        let v = validator(&order_requested_schema());
        let good = json!({
            "customer_id": "user123",
            "items": [{"item_id": "productA", "quantity": 2}, {"item_id": "productB", "quantity": 1}],
            "payment_info": {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "123"},
        });
        assert_eq!(errors(&v, &good), Vec::<String>::new());
        let with = |pointer: &str, value: Value| {
            let mut o = good.clone();
            *o.pointer_mut(pointer).unwrap() = value;
            o
        };
        assert!(v.is_valid(&with(
            "/payment_info/card_number",
            "4242-4242-4242-4242".into()
        )));
        assert!(v.is_valid(&with("/payment_info/cvv", "1234".into())));
        for bad in [
            with("/customer_id", "".into()),
            with("/items", json!([])),
            with("/items/0/quantity", 0.into()),
            with("/items/0/quantity", 10_001.into()),
            with("/payment_info/card_number", "4242".into()),
            with("/payment_info/card_number", "4242x4242x4242x4242".into()),
            with("/payment_info/expiry_date", "13/30".into()),
            with("/payment_info/expiry_date", "2030-12".into()),
            with("/payment_info/cvv", "12".into()),
            with("/payment_info/cvv", "12345".into()),
        ] {
            assert!(!v.is_valid(&bad), "accepted {bad}");
        }
        // Unknown fields are refused, at every level (order-svc does too).
        for pointer in ["", "/items/0", "/payment_info"] {
            let mut extra = good.clone();
            extra.pointer_mut(pointer).unwrap()["note"] = "hi".into();
            assert!(!v.is_valid(&extra), "accepted {extra}");
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("payment_info");
        assert!(!v.is_valid(&missing));
    }
}
