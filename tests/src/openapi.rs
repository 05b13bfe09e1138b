//! The HTTP contract, checked: every answer a test reads through the
//! harness's helpers is validated against the OpenAPI document of the
//! service that gave it (the document the service itself serves at
//! `GET /openapi.json`, generated from its handlers).
//!
//! An answer is in contract when its path and method are documented, its
//! status is one the operation documents, and its body is JSON where the
//! document says so and validates against that status's schema (JSON
//! Schema 2020-12, formats checked, and every object closed: a field the
//! document does not name is out of contract too, so a field added to an
//! answer without its document fails here). A test that sees an answer out
//! of contract fails, naming what differs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::{Value, json};

use crate::Svc;

/// A service's OpenAPI document, as the code generates it.
pub fn document(svc: Svc) -> utoipa::openapi::OpenApi {
    match svc {
        Svc::Order => order_svc::http::openapi(),
        Svc::Payment => payment_svc::http::openapi(),
        Svc::Inventory => inventory_svc::http::openapi(),
        Svc::Notification => notification_svc::http::openapi(),
    }
}

/// Where a service's document is committed.
pub fn committed_path(svc: Svc) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs/openapi")
        .join(format!("{}.json", svc.identity().name))
}

static DOCUMENTS: LazyLock<[Value; 4]> = LazyLock::new(|| {
    Svc::ALL.map(|svc| serde_json::to_value(document(svc)).expect("the document is JSON"))
});

/// A response's compiled body schema (none: it documents no JSON body).
type Compiled = Arc<Option<jsonschema::Validator>>;
/// Service index, path template, method, status.
type OperationKey = (usize, String, String, String);

static VALIDATORS: LazyLock<Mutex<HashMap<OperationKey, Compiled>>> =
    LazyLock::new(Default::default);

/// The documented path template `path` (query string ignored) matches:
/// the one with the most literal segments (`/sagas/stats` before
/// `/sagas/{order_id}`).
fn template<'d>(doc: &'d Value, path: &str) -> Option<&'d str> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .keys()
        .filter_map(|tpl| {
            let parts: Vec<&str> = tpl.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literal = 0;
            for (p, s) in parts.iter().zip(&segments) {
                if p.starts_with('{') && p.ends_with('}') {
                    if s.is_empty() {
                        return None;
                    }
                } else if p == s {
                    literal += 1;
                } else {
                    return None;
                }
            }
            Some((literal, tpl.as_str()))
        })
        .max_by_key(|(literal, _)| *literal)
        .map(|(_, tpl)| tpl)
}

/// The documented path template of `path` at `svc`, if any.
pub fn path_template(svc: Svc, path: &str) -> Option<String> {
    template(&DOCUMENTS[svc.index()], path).map(str::to_owned)
}

/// Checks one answer: `Err` says how it is out of contract.
pub fn check(
    svc: Svc,
    method: &str,
    path: &str,
    status: u16,
    body: Option<&Value>,
) -> Result<(), String> {
    let index = svc.index();
    let doc = &DOCUMENTS[index];
    let method = method.to_ascii_lowercase();
    let what = format!(
        "{} {} {path} -> {status}",
        svc.identity().name,
        method.to_uppercase()
    );
    let tpl = template(doc, path).ok_or_else(|| format!("{what}: path not documented"))?;
    let operation = doc["paths"][tpl]
        .get(&method)
        .ok_or_else(|| format!("{what}: method not documented for {tpl}"))?;
    let code = status.to_string();
    let response = operation["responses"]
        .get(&code)
        .ok_or_else(|| format!("{what}: status not documented for {tpl}"))?;
    let key = (index, tpl.to_owned(), method.clone(), code);
    let compiled = {
        let mut cache = VALIDATORS.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| Arc::new(compile(doc, response)))
            .clone()
    };
    match (compiled.as_ref(), body) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(format!(
            "{what}: the document says the body is JSON; it is not (or there is none)"
        )),
        (Some(validator), Some(body)) => {
            let errors: Vec<String> = validator
                .iter_errors(body)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{what}: body out of contract: {}; body: {body}",
                    errors.join("; ")
                ))
            }
        }
    }
}

/// Panics if the answer is out of contract.
pub fn assert_in_contract(svc: Svc, method: &str, path: &str, status: u16, body: Option<&Value>) {
    if let Err(e) = check(svc, method, path, status, body) {
        panic!("HTTP contract broken: {e}");
    }
}

/// The validator of a response's JSON body, if it documents one: its
/// schema, with the document's components beside it so that their
/// `#/components/schemas/…` references resolve.
fn compile(doc: &Value, response: &Value) -> Option<jsonschema::Validator> {
    let schema = response["content"]["application/json"].get("schema")?;
    let mut root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/$defs/answer",
        "$defs": {"answer": schema},
        "components": doc["components"],
    });
    close_objects(&mut root);
    Some(
        jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|e| panic!("the OpenAPI document has an invalid schema: {e}")),
    )
}

/// Closes every object schema (`unevaluatedProperties: false`), so that an
/// answer with a field its document does not name fails. A schema composed
/// with `allOf` (a flattened struct) is closed where it is composed, not in
/// its parts, whose fields are only all evaluated together.
fn close_objects(root: &mut Value) {
    let mut parts = HashSet::new();
    collect_all_of_refs(root, &mut parts);
    if let Some(schemas) = root["components"]["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            let is_part = parts.contains(&format!("#/components/schemas/{name}"));
            close(schema, is_part);
        }
    }
    if let Some(answer) = root["$defs"].get_mut("answer") {
        close(answer, false);
    }
}

fn collect_all_of_refs(node: &Value, parts: &mut HashSet<String>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Array(items)) = map.get("allOf") {
                for item in items {
                    if let Some(Value::String(r)) = item.get("$ref") {
                        parts.insert(r.clone());
                    }
                }
            }
            map.values().for_each(|v| collect_all_of_refs(v, parts));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_all_of_refs(v, parts)),
        _ => {}
    }
}

/// Closes `node` (unless it is a part of an `allOf`) and the object
/// schemas inside it.
fn close(node: &mut Value, is_part: bool) {
    let Value::Object(map) = node else { return };
    let composed = map.contains_key("allOf");
    let open =
        !map.contains_key("additionalProperties") && !map.contains_key("unevaluatedProperties");
    if open && !is_part && (map.contains_key("properties") || composed) {
        map.insert("unevaluatedProperties".to_owned(), Value::Bool(false));
    }
    for (key, child) in map.iter_mut() {
        match (key.as_str(), child) {
            ("allOf", Value::Array(items)) => items.iter_mut().for_each(|i| close(i, true)),
            ("properties" | "$defs", Value::Object(props)) => {
                props.values_mut().for_each(|p| close(p, false))
            }
            ("oneOf" | "anyOf", Value::Array(items)) => {
                items.iter_mut().for_each(|i| close(i, false))
            }
            ("items" | "additionalProperties", child) => close(child, false),
            _ => {}
        }
    }
}
