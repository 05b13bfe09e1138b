//! `docs/schemas/order.requested.json` against the validator order-svc
//! really runs (`order_svc::domain::validate_order`): on a corpus of order
//! dicts, valid and not, the two must agree — but for the rules JSON Schema
//! cannot state, each listed here, which the schema must take, the
//! validator refuse and the schema's description name. A rule changed on
//! one side only fails this test.

use order_svc::domain::{MAX_ITEMS, validate_order};
use serde_json::{Value, json};

use crate::schemas::{committed, errors, validator};

fn good() -> Value {
    json!({
        "customer_id": "user123",
        "items": [{"item_id": "productA", "quantity": 2}, {"item_id": "productB", "quantity": 1}],
        "payment_info": {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "123"},
    })
}

/// `good()` with the value at `pointer` replaced (or added, for a new key
/// of an object).
fn with(pointer: &str, value: Value) -> Value {
    let mut order = good();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = order.pointer_mut(parent).unwrap();
    match parent {
        Value::Object(obj) => {
            obj.insert(key.to_owned(), value);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = value,
        _ => unreachable!(),
    }
    order
}

fn without(pointer: &str) -> Value {
    let mut order = good();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    order
        .pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
    order
}

fn items(n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| json!({"item_id": format!("item-{i}"), "quantity": 1}))
            .collect(),
    )
}

#[test]
fn the_order_schema_agrees_with_the_validator() {
    let schema = validator(&committed("order.requested.json"));
    // (case, order dict) on which both must agree.
    let agreeing: Vec<(&str, Value)> = vec![
        ("the documented example", good()),
        ("not an object", json!([1, 2])),
        ("customer_id missing", without("/customer_id")),
        ("customer_id empty", with("/customer_id", json!(""))),
        ("customer_id blank", with("/customer_id", json!("   "))),
        (
            "customer_id padded",
            with("/customer_id", json!("  user123  ")),
        ),
        ("customer_id a number", with("/customer_id", json!(123))),
        (
            "customer_id 128 chars",
            with("/customer_id", json!("x".repeat(128))),
        ),
        (
            "customer_id 129 chars",
            with("/customer_id", json!("x".repeat(129))),
        ),
        ("an unknown field", with("/coupon", json!("SAVE10"))),
        ("items missing", without("/items")),
        (
            "items not a list",
            with("/items", json!({"item_id": "productA"})),
        ),
        ("items empty", with("/items", json!([]))),
        ("MAX_ITEMS items", with("/items", items(MAX_ITEMS))),
        ("MAX_ITEMS + 1 items", with("/items", items(MAX_ITEMS + 1))),
        ("an item not an object", with("/items/0", json!("productA"))),
        (
            "an item's unknown field",
            with("/items/0/colour", json!("red")),
        ),
        ("item_id missing", {
            let mut o = good();
            o["items"][0].as_object_mut().unwrap().remove("item_id");
            o
        }),
        ("item_id empty", with("/items/0/item_id", json!(""))),
        ("quantity missing", {
            let mut o = good();
            o["items"][0].as_object_mut().unwrap().remove("quantity");
            o
        }),
        ("quantity 0", with("/items/0/quantity", json!(0))),
        ("quantity -1", with("/items/0/quantity", json!(-1))),
        ("quantity 1", with("/items/0/quantity", json!(1))),
        ("quantity 10000", with("/items/0/quantity", json!(10_000))),
        ("quantity 10001", with("/items/0/quantity", json!(10_001))),
        ("quantity 1.5", with("/items/0/quantity", json!(1.5))),
        ("quantity a string", with("/items/0/quantity", json!("2"))),
        ("payment_info missing", without("/payment_info")),
        (
            "payment_info not an object",
            with("/payment_info", json!("4242")),
        ),
        (
            "payment_info's unknown field",
            with("/payment_info/name", json!("J. Doe")),
        ),
        ("card_number missing", without("/payment_info/card_number")),
        (
            "card digits only",
            with("/payment_info/card_number", json!("4242424242424242")),
        ),
        (
            "card with dashes",
            with("/payment_info/card_number", json!("4242-4242-4242-4242")),
        ),
        (
            "card with letters",
            with("/payment_info/card_number", json!("4242 4242 4242 424X")),
        ),
        (
            "card 11 digits",
            with("/payment_info/card_number", json!("42424242424")),
        ),
        (
            "card 20 digits",
            with("/payment_info/card_number", json!("42424242424242424242")),
        ),
        (
            "card a number",
            with("/payment_info/card_number", json!(4242424242424242u64)),
        ),
        (
            "card 19 digits",
            with("/payment_info/card_number", json!("4242424242424242428")),
        ),
        (
            "expiry MM/YYYY",
            with("/payment_info/expiry_date", json!("12/2030")),
        ),
        (
            "expiry M/YY",
            with("/payment_info/expiry_date", json!("1/30")),
        ),
        (
            "expiry padded",
            with("/payment_info/expiry_date", json!(" 12 / 30 ")),
        ),
        (
            "expiry month 13",
            with("/payment_info/expiry_date", json!("13/30")),
        ),
        (
            "expiry month 00",
            with("/payment_info/expiry_date", json!("00/30")),
        ),
        (
            "expiry with a dash",
            with("/payment_info/expiry_date", json!("12-30")),
        ),
        (
            "expiry year of 3",
            with("/payment_info/expiry_date", json!("12/203")),
        ),
        ("expiry missing", without("/payment_info/expiry_date")),
        ("cvv 4 digits", with("/payment_info/cvv", json!("1234"))),
        ("cvv 2 digits", with("/payment_info/cvv", json!("12"))),
        ("cvv 5 digits", with("/payment_info/cvv", json!("12345"))),
        ("cvv a letter", with("/payment_info/cvv", json!("12a"))),
        ("cvv a number", with("/payment_info/cvv", json!(123))),
        ("cvv missing", without("/payment_info/cvv")),
    ];
    // What JSON Schema cannot say: the schema takes it, the validator does
    // not, and the schema's description says so (the words it uses).
    let validator_only: Vec<(&str, &str, Value)> = vec![
        (
            "a card failing the Luhn checksum",
            "Luhn checksum",
            with("/payment_info/card_number", json!("4242 4242 4242 4241")),
        ),
        (
            "an item given twice",
            "an item_id given twice",
            with(
                "/items",
                json!([{"item_id": "productA", "quantity": 1}, {"item_id": "productA", "quantity": 2}]),
            ),
        ),
        (
            "a control character in an id",
            "a control character",
            with("/customer_id", json!("user\u{0}123")),
        ),
        (
            "an invisible format character in an id",
            "an invisible format character",
            with("/customer_id", json!("user\u{202E}123")),
        ),
        (
            "an id of 128 characters but more bytes",
            "longer than 128 bytes",
            with("/customer_id", json!("é".repeat(128))),
        ),
        // JSON Schema's integers include 2.0; order-svc wants 2.
        (
            "an integral float quantity",
            "`2.0`",
            with("/items/0/quantity", json!(2.0)),
        ),
    ];
    let description = committed("order.requested.json")["description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let mut disagreements = Vec::new();
    for (case, order) in &agreeing {
        let by_code = validate_order(order);
        let by_schema = errors(&schema, order);
        if by_code.is_ok() != by_schema.is_empty() {
            disagreements.push(format!(
                "{case}: validate_order says {:?}, the schema says {by_schema:?}",
                by_code.as_ref().map(|_| "valid").map_err(|e| e.0.clone())
            ));
        }
    }
    for (case, said, order) in &validator_only {
        assert!(schema.is_valid(order), "{case}: the schema refuses it now");
        assert!(
            description.contains(said),
            "{case}: the schema's description does not say {said:?}: {description}"
        );
        assert!(
            validate_order(order).is_err(),
            "{case}: validate_order accepts it"
        );
    }
    assert!(
        disagreements.is_empty(),
        "order.requested.json and validate_order disagree:\n{}",
        disagreements.join("\n")
    );
    // The corpus has both kinds.
    let valid = agreeing
        .iter()
        .filter(|(_, o)| validate_order(o).is_ok())
        .count();
    assert!(valid >= 8 && valid < agreeing.len() - 20, "{valid}");
}
