//! The committed contract files (`docs/schemas/*.json`, `docs/asyncapi.yaml`)
//! as the other modules of this test use them: loaded from the repository
//! as an outside client would read them (not regenerated: the drift tests
//! in `common` tie them to the code), compiled into validators.

use std::path::PathBuf;

use common::messaging::asyncapi;
use common::messaging::events::EventType;
use common::messaging::schema::{self, ENVELOPE_FILE, ORDER_REQUESTED_FILE, ORDER_RESULT_FILE};
use serde_json::{Value, json};

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A committed schema of `docs/schemas/`.
pub fn committed(file: &str) -> Value {
    let path = repo().join("docs/schemas").join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"))
}

/// A validator that also checks `format` (uuid, date-time), which JSON
/// Schema 2020-12 only annotates by default.
pub fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("the schema compiles")
}

/// Why `instance` does not validate (empty: it does).
pub fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect()
}

/// Every schema a message on the wire is checked against.
pub struct Contract {
    /// `envelope.json` as published: open, as consumers read it.
    pub envelope: jsonschema::Validator,
    /// The same, closed: our producers write no undocumented field.
    pub envelope_strict: jsonschema::Validator,
    /// One event type's envelope (`#/$defs/<routing key>`), for precise
    /// errors when the whole one refuses a message.
    per_event: Vec<(EventType, jsonschema::Validator)>,
    pub order_requested: jsonschema::Validator,
    /// `order.result.json` as published (open), and closed.
    pub order_result: jsonschema::Validator,
    pub order_result_strict: jsonschema::Validator,
    /// The AMQP properties of an event, a request and a reply, and an
    /// event's headers table, as `docs/asyncapi.yaml` describes them.
    pub event_properties: jsonschema::Validator,
    pub request_properties: jsonschema::Validator,
    pub reply_properties: jsonschema::Validator,
    pub event_headers: jsonschema::Validator,
}

impl Contract {
    pub fn load() -> Contract {
        let envelope = committed(ENVELOPE_FILE);
        let per_event = schema::envelope_event_types()
            .map(|t| {
                let mut one = envelope.clone();
                let obj = one.as_object_mut().unwrap();
                obj.remove("oneOf");
                obj.insert("$ref".into(), json!(format!("#/$defs/{}", t.routing_key())));
                (t, validator(&one))
            })
            .collect();
        let order_result = committed(ORDER_RESULT_FILE);
        let doc = asyncapi::document().to_json();
        let component = |name: &str| validator(&doc["components"]["schemas"][name]);
        Contract {
            envelope_strict: validator(&schema::strict(&envelope)),
            envelope: validator(&envelope),
            per_event,
            order_requested: validator(&committed(ORDER_REQUESTED_FILE)),
            order_result_strict: validator(&schema::strict(&order_result)),
            order_result: validator(&order_result),
            event_properties: component("EventProperties"),
            request_properties: component("RequestProperties"),
            reply_properties: component("ReplyProperties"),
            event_headers: component("EventHeaders"),
        }
    }

    /// Why an envelope body of `event_type` does not validate, open and
    /// strict (empty: it does).
    pub fn envelope_errors(&self, event_type: EventType, body: &Value) -> Vec<String> {
        let mut out = Vec::new();
        if !self.envelope.is_valid(body) {
            let precise = self
                .per_event
                .iter()
                .find(|(t, _)| *t == event_type)
                .map(|(_, v)| errors(v, body))
                .unwrap_or_default();
            out.push(format!(
                "does not validate against {ENVELOPE_FILE}: {}",
                if precise.is_empty() {
                    errors(&self.envelope, body).join("; ")
                } else {
                    precise.join("; ")
                }
            ));
        } else if !self.envelope_strict.is_valid(body) {
            out.push(format!(
                "carries fields {ENVELOPE_FILE} does not document: {}",
                errors(&self.envelope_strict, body).join("; ")
            ));
        }
        out
    }

    /// Why a result dict does not validate, open and strict (empty: it
    /// does).
    pub fn result_errors(&self, body: &Value) -> Vec<String> {
        if !self.order_result.is_valid(body) {
            errors(&self.order_result, body)
                .into_iter()
                .map(|e| format!("{ORDER_RESULT_FILE}: {e}"))
                .collect()
        } else if !self.order_result_strict.is_valid(body) {
            vec![format!(
                "carries fields {ORDER_RESULT_FILE} does not document: {}",
                errors(&self.order_result_strict, body).join("; ")
            )]
        } else {
            Vec::new()
        }
    }
}
