//! Order rules, free of I/O: validating the order dict, pricing it, and the
//! saga's decision table.

use std::collections::{HashMap, HashSet};

use common::messaging::events::{EventType, StepFailed};
use common::saga::card::{CardDetails, luhn_valid, parse_expiry};
use common::saga::order::{OrderLine, SagaResult, check_id};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Limits that keep one order bounded (in common, where the schema of
/// `order.requested` states them too).
pub use common::saga::order::{MAX_ID_LEN, MAX_ITEMS, MAX_QUANTITY};
/// The highest price of one unit, in cents (10,000,000.00): with at most
/// [`MAX_ITEMS`] lines of [`MAX_QUANTITY`] units, an order's amount stays
/// below 10^16, far from `i64`'s limit, whatever the catalog says.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000;
/// Longest idempotency key (HTTP `Idempotency-Key`, AMQP `message_id`).
pub const MAX_KEY_LEN: usize = 200;

/// Where an AMQP client may have its replies sent (`reply_to`): RabbitMQ's
/// direct reply-to (`amq.rabbitmq.reply-to…`: to the very channel that
/// published), or a server-named queue (`amq.gen-…`, declared with an empty
/// name: only clients declare those, and nobody can guess another's).
/// Never a service's queue: order-svc publishes replies as its own trusted
/// user, and anything else would let a client fill any queue, or write into
/// another client's.
pub fn reply_address_allowed(reply_to: &str) -> bool {
    (reply_to.starts_with("amq.rabbitmq.reply-to") || reply_to.starts_with("amq.gen-"))
        && reply_to.len() <= 255
        && !reply_to.chars().any(char::is_control)
}

/// Why a `reply_to` is refused.
pub const REPLY_ADDRESS_REFUSED: &str = "reply_to must be RabbitMQ's direct reply-to \
     (amq.rabbitmq.reply-to) or a server-named queue (amq.gen-…, declared with an empty \
     name); the message is parked and no order is placed";

/// The `error` of the failure dict for invalid input.
pub const INVALID_ORDER: &str = "Invalid order";

/// One requested line, before pricing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedItem {
    pub item_id: String,
    pub quantity: i32,
}

/// An order dict that passed validation.
#[derive(Debug, Clone)]
pub struct ValidOrder {
    pub customer_id: String,
    pub items: Vec<RequestedItem>,
    pub card: CardDetails,
}

/// Why an order dict is invalid; the message never quotes card data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOrder(pub String);

impl InvalidOrder {
    pub fn result(&self) -> SagaResult {
        SagaResult::failure(INVALID_ORDER, &self.0)
    }
}

fn invalid(msg: impl Into<String>) -> InvalidOrder {
    InvalidOrder(msg.into())
}

/// Validates the order dict. Card fields are checked for shape only (an
/// expired or declined card is the payment step's business).
///
/// The same rules are published as JSON Schema,
/// `docs/schemas/order.requested.json` (generated from
/// [`common::saga::order::OrderRequest`]); a change here needs the same
/// change there, which the contracts test
/// (`the_order_schema_agrees_with_the_validator`) checks.
pub fn validate_order(v: &Value) -> Result<ValidOrder, InvalidOrder> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("the order must be a JSON object"))?;
    only_fields(obj, &["customer_id", "items", "payment_info"], "")?;

    let customer_id = required_id(obj.get("customer_id"), "customer_id")?;

    let items = obj
        .get("items")
        .ok_or_else(|| invalid("items is required"))?
        .as_array()
        .ok_or_else(|| invalid("items must be a list"))?;
    if items.is_empty() {
        return Err(invalid("items must not be empty"));
    }
    if items.len() > MAX_ITEMS {
        return Err(invalid(format!(
            "items has {} entries; at most {MAX_ITEMS} are allowed",
            items.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut requested = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item = item
            .as_object()
            .ok_or_else(|| invalid(format!("items[{i}] must be an object")))?;
        only_fields(item, &["item_id", "quantity"], &format!("items[{i}]."))?;
        let item_id = required_id(item.get("item_id"), &format!("items[{i}].item_id"))?;
        let quantity = item
            .get("quantity")
            .ok_or_else(|| invalid(format!("items[{i}].quantity is required")))?
            .as_i64()
            .filter(|q| (1..=MAX_QUANTITY).contains(q))
            .ok_or_else(|| {
                invalid(format!(
                    "items[{i}].quantity must be an integer from 1 to {MAX_QUANTITY}"
                ))
            })?;
        if !seen.insert(item_id.clone()) {
            return Err(invalid(format!(
                "items[{i}].item_id {item_id:?} appears twice; give each item once with its total quantity"
            )));
        }
        requested.push(RequestedItem {
            item_id,
            quantity: quantity as i32,
        });
    }

    let payment = obj
        .get("payment_info")
        .ok_or_else(|| invalid("payment_info is required"))?
        .as_object()
        .ok_or_else(|| invalid("payment_info must be an object"))?;
    only_fields(
        payment,
        &["card_number", "expiry_date", "cvv"],
        "payment_info.",
    )?;
    let field = |name: &str| -> Result<&str, InvalidOrder> {
        payment
            .get(name)
            .ok_or_else(|| invalid(format!("payment_info.{name} is required")))?
            .as_str()
            .ok_or_else(|| invalid(format!("payment_info.{name} must be a string")))
    };

    let card_number: String = field("card_number")?
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .collect();
    if !(12..=19).contains(&card_number.len()) || !card_number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("payment_info.card_number must be 12 to 19 digits"));
    }
    if !luhn_valid(&card_number) {
        return Err(invalid(
            "payment_info.card_number is not a valid card number (checksum)",
        ));
    }
    let expiry_date = field("expiry_date")?.trim().to_owned();
    parse_expiry(&expiry_date).ok_or_else(|| invalid("payment_info.expiry_date must be MM/YY"))?;
    let cvv = field("cvv")?.trim().to_owned();
    if !(3..=4).contains(&cvv.len()) || !cvv.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("payment_info.cvv must be 3 or 4 digits"));
    }

    Ok(ValidOrder {
        customer_id,
        items: requested,
        card: CardDetails {
            card_number,
            expiry_date,
            cvv,
        },
    })
}

/// Refuses fields the order dict does not have (a typo would otherwise be
/// silently ignored).
fn only_fields(
    obj: &serde_json::Map<String, Value>,
    allowed: &[&str],
    path: &str,
) -> Result<(), InvalidOrder> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(unknown) => {
            let shown: String = unknown.chars().take(40).collect();
            Err(invalid(format!(
                "unknown field {path}{shown:?}; expected {}",
                allowed.join(", ")
            )))
        }
    }
}

fn required_id(v: Option<&Value>, name: &str) -> Result<String, InvalidOrder> {
    let s = v
        .ok_or_else(|| invalid(format!("{name} is required")))?
        .as_str()
        .ok_or_else(|| invalid(format!("{name} must be a string")))?
        .trim();
    check_id(s, name).map_err(invalid)?;
    Ok(s.to_owned())
}

/// Prices the requested items from the catalog.
pub fn price(
    items: &[RequestedItem],
    catalog: &HashMap<String, i64>,
) -> Result<Vec<OrderLine>, InvalidOrder> {
    let unknown: Vec<&str> = items
        .iter()
        .filter(|i| !catalog.contains_key(&i.item_id))
        .map(|i| i.item_id.as_str())
        .collect();
    if !unknown.is_empty() {
        return Err(invalid(format!("unknown item(s): {}", unknown.join(", "))));
    }
    Ok(items
        .iter()
        .map(|i| OrderLine {
            item_id: i.item_id.clone(),
            quantity: i.quantity,
            unit_price_cents: catalog[&i.item_id],
        })
        .collect())
}

/// The order's total; an amount that does not fit is invalid input, never a
/// wrapped (negative) charge.
pub fn amount_cents(lines: &[OrderLine]) -> Result<i64, InvalidOrder> {
    lines
        .iter()
        .try_fold(0i64, |total, l| {
            i64::from(l.quantity)
                .checked_mul(l.unit_price_cents)
                .and_then(|line| total.checked_add(line))
        })
        .filter(|total| *total > 0)
        .ok_or_else(|| invalid("the order's total amount must be positive and not too large"))
}

/// What was ordered, hashed: a retry with the same idempotency key must
/// order the same thing. The card is represented only by its last 4 digits.
pub fn fingerprint(order: &ValidOrder) -> String {
    let mut items: Vec<_> = order
        .items
        .iter()
        .map(|i| (&i.item_id, i.quantity))
        .collect();
    items.sort();
    let canonical = serde_json::json!({
        "customer_id": order.customer_id,
        "items": items,
        "card_last4": order.card.last4(),
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Order status (the `orders.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Failed,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(OrderStatus::Pending),
            "CONFIRMED" => Some(OrderStatus::Confirmed),
            "FAILED" => Some(OrderStatus::Failed),
            _ => None,
        }
    }
}

/// Which step failed a saga (the `failed_step` metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedStep {
    Payment,
    Inventory,
    Notification,
    Timeout,
}

impl FailedStep {
    pub const ALL: [FailedStep; 4] = [
        FailedStep::Payment,
        FailedStep::Inventory,
        FailedStep::Notification,
        FailedStep::Timeout,
    ];

    /// The step a failure dict's `error` names.
    pub fn from_error(error: &str) -> Option<FailedStep> {
        FailedStep::ALL.into_iter().find(|s| s.error() == error)
    }

    pub fn label(self) -> &'static str {
        match self {
            FailedStep::Payment => "payment",
            FailedStep::Inventory => "inventory",
            FailedStep::Notification => "notification",
            FailedStep::Timeout => "timeout",
        }
    }

    /// The `error` of the failure dict: names the step that failed.
    pub fn error(self) -> &'static str {
        match self {
            FailedStep::Payment => "Payment failed",
            FailedStep::Inventory => "Inventory reservation failed",
            FailedStep::Notification => "Notification failed",
            FailedStep::Timeout => "Order timed out",
        }
    }
}

/// A decision to record for a pending saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Confirm,
    Fail { step: FailedStep, reason: String },
}

impl Decision {
    pub fn status(&self) -> OrderStatus {
        match self {
            Decision::Confirm => OrderStatus::Confirmed,
            Decision::Fail { .. } => OrderStatus::Failed,
        }
    }
}

/// What an incoming step event means for the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEffect {
    /// Progress or compensation: only recorded in the timeline.
    Record,
    /// The last forward step succeeded: confirm (if still in time).
    Confirm,
    /// A step failed: fail the saga.
    Fail(Decision),
    /// A step waits for an outside answer: the saga goes on under its long
    /// deadline, and whoever waits is told it is pending.
    Await,
}

/// What a saga waiting for a 3-D Secure confirmation waits for (the
/// `awaiting` column, the pending result's `next.step`).
pub const AWAITING_PAYMENT: &str = "payment_confirmation";
/// What a saga short of backordered items waits for.
pub const AWAITING_STOCK: &str = "stock_arrival";

/// The waits of a saga, in the order they can come: a saga only ever moves
/// forward through them.
pub const AWAITS_IN_ORDER: [&str; 2] = [AWAITING_PAYMENT, AWAITING_STOCK];

/// What a saga waits for after `event`, if it is an outside answer.
pub fn awaited_after(event: EventType) -> Option<&'static str> {
    match event {
        EventType::PaymentActionRequired => Some(AWAITING_PAYMENT),
        EventType::InventoryBackordered => Some(AWAITING_STOCK),
        _ => None,
    }
}

/// What a pending saga's client is told it waits for.
pub fn awaiting_detail(awaiting: &str) -> &'static str {
    if awaiting == AWAITING_STOCK {
        "items of the order are backordered; it is confirmed when they arrive"
    } else {
        "the payment needs the customer's 3-D Secure confirmation; the gateway answers with \
         POST /payments/{order_id}/confirm or /decline on payment-svc"
    }
}

/// The reason of a long-running saga's timeout.
pub fn long_timeout_reason(deadline_ms: i64, awaiting: &str) -> String {
    let what = if awaiting == AWAITING_STOCK {
        "the backordered items"
    } else {
        "the payment confirmation (3-D Secure)"
    };
    format!("Long deadline of {deadline_ms} ms exceeded while waiting for {what}")
}

/// The decision table of the choreography, as seen by order-svc.
pub fn effect_of(event: EventType, failure: Option<&StepFailed>) -> StepEffect {
    let fail = |step| {
        let reason = failure.map_or_else(|| "unknown".to_owned(), |f| f.reason.clone());
        StepEffect::Fail(Decision::Fail { step, reason })
    };
    match event {
        EventType::PaymentFailed => fail(FailedStep::Payment),
        EventType::InventoryFailed => fail(FailedStep::Inventory),
        EventType::NotificationFailed => fail(FailedStep::Notification),
        // Sent, or queued while the mail relay is down: past the pivot
        // either way (a queued email is retried, never undone).
        EventType::NotificationSent | EventType::NotificationDeferred => StepEffect::Confirm,
        EventType::PaymentActionRequired | EventType::InventoryBackordered => StepEffect::Await,
        _ => StepEffect::Record,
    }
}

/// The reason of a timeout: names the deadline and the step still awaited.
pub fn timeout_reason(deadline_ms: i64, steps_seen: &[String]) -> String {
    let seen = |e: EventType| steps_seen.iter().any(|s| s == e.routing_key());
    let waiting_for = if !seen(EventType::PaymentCompleted) {
        "payment"
    } else if !seen(EventType::InventoryReserved) {
        "inventory"
    } else if !seen(EventType::NotificationSent) {
        "notification"
    } else {
        "confirmation"
    };
    format!("Saga deadline of {deadline_ms} ms exceeded while waiting for {waiting_for}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order() -> Value {
        json!({
            "customer_id": "user123",
            "items": [{"item_id": "productA", "quantity": 2}, {"item_id": "productB", "quantity": 1}],
            "payment_info": {"card_number": "4242-4242-4242-4242", "expiry_date": "12/30", "cvv": "123"}
        })
    }

    fn reason(v: Value) -> String {
        validate_order(&v).unwrap_err().0
    }

    #[test]
    fn the_mission_example_with_a_test_card_is_valid() {
        let o = validate_order(&order()).unwrap();
        assert_eq!(o.customer_id, "user123");
        assert_eq!(o.items.len(), 2);
        assert_eq!(o.card.card_number, "4242424242424242");
    }

    #[test]
    fn each_invalid_field_is_named_in_the_reason() {
        let mut v = order();
        v["items"] = json!([]);
        assert_eq!(reason(v), "items must not be empty");

        let mut v = order();
        v["items"][1]["quantity"] = json!(0);
        assert!(reason(v).starts_with("items[1].quantity"));

        let mut v = order();
        v["items"][0]["quantity"] = json!("2");
        assert!(reason(v).starts_with("items[0].quantity"));

        let mut v = order();
        v.as_object_mut().unwrap().remove("customer_id");
        assert_eq!(reason(v), "customer_id is required");

        let mut v = order();
        v["items"][1]["item_id"] = json!("productA");
        assert!(reason(v).contains("appears twice"));

        let mut v = order();
        v["payment_info"]["expiry_date"] = json!("2030-12");
        assert_eq!(reason(v), "payment_info.expiry_date must be MM/YY");

        let mut v = order();
        v["payment_info"]["cvv"] = json!("12");
        assert_eq!(reason(v), "payment_info.cvv must be 3 or 4 digits");

        assert_eq!(reason(json!([1, 2])), "the order must be a JSON object");

        let mut v = order();
        v["coupon"] = json!("FREE");
        assert!(reason(v).starts_with("unknown field \"coupon\""));
        let mut v = order();
        v["items"][0]["price_cents"] = json!(0);
        assert!(reason(v).starts_with("unknown field items[0].\"price_cents\""));
        let mut v = order();
        v["payment_info"]["pin"] = json!("1234");
        assert!(reason(v).starts_with("unknown field payment_info.\"pin\""));

        let mut v = order();
        v["customer_id"] = json!("admin\u{202E}nimda");
        assert!(reason(v).starts_with("customer_id must be at most"));
    }

    #[test]
    fn card_errors_never_quote_the_card() {
        for bad in ["4242424242424241", "XXXX-XXXX-XXXX-1234", "42"] {
            let mut v = order();
            v["payment_info"]["card_number"] = json!(bad);
            let r = reason(v);
            assert!(r.starts_with("payment_info.card_number"), "{r}");
            assert!(!r.contains(bad));
        }
    }

    #[test]
    fn pricing_names_unknown_items() {
        let o = validate_order(&order()).unwrap();
        let mut catalog = HashMap::from([("productA".to_owned(), 1500)]);
        assert_eq!(
            price(&o.items, &catalog).unwrap_err().0,
            "unknown item(s): productB"
        );
        catalog.insert("productB".into(), 700);
        let lines = price(&o.items, &catalog).unwrap();
        assert_eq!(amount_cents(&lines), Ok(2 * 1500 + 700));
        let huge = [OrderLine {
            item_id: "x".into(),
            quantity: 10_000,
            unit_price_cents: i64::MAX / 2,
        }];
        assert!(amount_cents(&huge).is_err());
    }

    #[test]
    fn fingerprints_ignore_item_order_but_not_content() {
        let a = validate_order(&order()).unwrap();
        let mut v = order();
        v["items"] =
            json!([{"item_id": "productB", "quantity": 1}, {"item_id": "productA", "quantity": 2}]);
        let b = validate_order(&v).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        v["items"][0]["quantity"] = json!(3);
        assert_ne!(fingerprint(&a), fingerprint(&validate_order(&v).unwrap()));
    }

    #[test]
    fn failures_name_their_step_and_keep_the_services_reason() {
        let f = StepFailed {
            code: "insufficient_funds".into(),
            reason: "Insufficient funds".into(),
        };
        assert_eq!(
            effect_of(EventType::PaymentFailed, Some(&f)),
            StepEffect::Fail(Decision::Fail {
                step: FailedStep::Payment,
                reason: "Insufficient funds".into()
            })
        );
        assert_eq!(FailedStep::Payment.error(), "Payment failed");
        assert_eq!(
            effect_of(EventType::NotificationSent, None),
            StepEffect::Confirm
        );
        assert_eq!(
            effect_of(EventType::PaymentCompleted, None),
            StepEffect::Record
        );
    }

    #[test]
    fn timeout_reasons_name_the_step_awaited() {
        let steps = vec!["order.created".to_owned(), "payment.completed".to_owned()];
        assert_eq!(
            timeout_reason(5000, &steps),
            "Saga deadline of 5000 ms exceeded while waiting for inventory"
        );
        assert!(timeout_reason(5000, &[]).ends_with("waiting for payment"));
    }

    #[test]
    fn replies_go_to_a_clients_own_reply_queue_only() {
        for ok in [
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNDY4MDcwNQAAAAAAAAAA.x",
            "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        ] {
            assert!(reply_address_allowed(ok), "{ok}");
        }
        for refused in [
            "payment-svc.events",
            "order-svc.retry.1s",
            "order-svc.parking",
            "my-replies",
            "",
            "amq.gen-\n",
        ] {
            assert!(!reply_address_allowed(refused), "{refused:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! The validator, fuzzed: whatever a client sends, it answers (never
    //! panics), an accepted order is within every bound, and its reason for
    //! refusing never quotes card data.

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    /// Arbitrary JSON, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::hash_map(".{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Order dicts that are nearly right: the mission's shape with any
    /// values in its fields.
    fn near_orders() -> impl Strategy<Value = Value> {
        (
            any_json(),
            any_json(),
            any_json(),
            any_json(),
            any_json(),
            ".{0,30}",
        )
            .prop_map(|(customer, item_id, quantity, expiry, cvv, number)| {
                json!({
                    "customer_id": customer,
                    "items": [{"item_id": item_id, "quantity": quantity}],
                    "payment_info": {"card_number": number, "expiry_date": expiry, "cvv": cvv},
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn the_validator_answers_everything_and_accepts_only_bounded_orders(
            v in prop_oneof![any_json(), near_orders()]
        ) {
            match validate_order(&v) {
                Ok(order) => {
                    prop_assert!(check_id(&order.customer_id, "customer_id").is_ok());
                    prop_assert!(!order.items.is_empty() && order.items.len() <= MAX_ITEMS);
                    for item in &order.items {
                        prop_assert!(check_id(&item.item_id, "item_id").is_ok());
                        prop_assert!((1..=MAX_QUANTITY).contains(&i64::from(item.quantity)));
                    }
                    prop_assert!(luhn_valid(&order.card.card_number));
                }
                Err(InvalidOrder(reason)) => {
                    let number = v.pointer("/payment_info/card_number").and_then(Value::as_str);
                    if let Some(number) = number.filter(|n| n.len() >= 12) {
                        prop_assert!(!reason.contains(number), "{reason}");
                    }
                }
            }
        }

        #[test]
        fn amounts_never_overflow_and_are_positive_when_accepted(
            lines in prop::collection::vec((1i32..=10_000, 0i64..=i64::MAX), 1..=MAX_ITEMS)
        ) {
            let lines: Vec<OrderLine> = lines
                .into_iter()
                .enumerate()
                .map(|(i, (quantity, unit_price_cents))| OrderLine {
                    item_id: format!("i{i}"),
                    quantity,
                    unit_price_cents,
                })
                .collect();
            if let Ok(total) = amount_cents(&lines) {
                prop_assert!(total > 0);
            }
        }
    }
}
