//! Shapes shared by every party of the saga: the order dict a client sends
//! (described by [`OrderRequest`]; order-svc validates it), an order line
//! and the result dict that a client receives.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest id (customer, item) anywhere: order dicts, path segments.
pub const MAX_ID_LEN: usize = 128;
/// Most lines an order dict may have (order-svc's validation; the schema
/// of `order.requested` says the same).
pub const MAX_ITEMS: usize = 100;
/// Most units of one line of an order dict.
pub const MAX_QUANTITY: i64 = 10_000;

/// Checks an id (already trimmed) as every service accepts it: 1 to
/// [`MAX_ID_LEN`] bytes, no control characters and no invisible format
/// characters (bidirectional overrides, zero-width characters, BOM), which
/// would make two ids look alike in a log or a UI. `name` names it in the
/// message.
pub fn check_id(id: &str, name: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{name} must not be empty"));
    }
    if id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control() || is_format_char(c)) {
        return Err(format!(
            "{name} must be at most {MAX_ID_LEN} printable characters"
        ));
    }
    Ok(())
}

/// Unicode's format characters (general category Cf): invisible, and able
/// to reorder or hide the text around them.
fn is_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
        | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}' | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// What a client reads about the order dict, in its JSON Schema
/// (`docs/schemas/order.requested.json`) and in order-svc's OpenAPI
/// document alike: the schema's rules, and the ones order-svc applies that
/// JSON Schema cannot state (the same list as docs/events.md and the
/// contracts test `order_schema`, which checks each of them against
/// `order_svc::domain::validate_order`).
pub const ORDER_REQUEST_DESCRIPTION: &str = "The order dict a client publishes to the exchange \
     `saga.events` with routing key `order.requested` (the same body `POST /orders` takes). \
     Invalid input is answered with `{\"status\": \"failure\", \"error\": \"Invalid order\", \
     \"reason\": …}` (by `POST /orders` with status 400) and, over AMQP, parked. Beyond this \
     schema, order-svc also refuses: a card number failing the Luhn checksum; an item_id given \
     twice; an id (customer_id, item_id) that, once its surrounding whitespace is trimmed, has a \
     control character or an invisible format character (bidirectional override, zero-width \
     character, BOM) or is longer than 128 bytes in UTF-8 (the schema's maxLength counts \
     characters); a quantity written as a JSON float, even an integral one such as `2.0` (JSON \
     Schema counts it as an integer; order-svc wants `2`).";

/// The order dict a client sends (`order.requested`, `POST /orders`), as a
/// type, for its JSON Schema (`docs/schemas/order.requested.json`) and the
/// request body of `POST /orders` in order-svc's OpenAPI document only.
///
/// order-svc does not deserialize into it: it validates the JSON itself
/// (`order_svc::domain::validate_order`), with messages naming the field at
/// fault. The rules here are the same ones, as far as JSON Schema can say
/// them; what it cannot (the Luhn checksum, an item given twice, control
/// and invisible characters in ids, ids counted in bytes, integral floats
/// such as `2.0` for a quantity) is listed in
/// [`ORDER_REQUEST_DESCRIPTION`], the description both documents show, and
/// the contracts test holds the two together. `deny_unknown_fields` is for
/// the schemas only (`additionalProperties: false`, as order-svc refuses
/// unknown fields).
#[derive(Debug, JsonSchema, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "order.requested",
    deny_unknown_fields,
    description = ORDER_REQUEST_DESCRIPTION
)]
#[schema(description = ORDER_REQUEST_DESCRIPTION)]
pub struct OrderRequest {
    /// The customer: 1 to 128 printable characters (no control or
    /// invisible format characters), surrounding whitespace ignored.
    #[schemars(length(min = 1, max = MAX_ID_LEN), pattern(r"\S"))]
    #[schema(min_length = 1, max_length = 128, pattern = r"\S")]
    pub customer_id: String,
    /// What to order: each item once, with its total quantity.
    #[schemars(length(min = 1, max = MAX_ITEMS))]
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<OrderRequestItem>,
    /// The card to charge. Checked for shape only here; an expired or
    /// declined card fails the payment step instead.
    pub payment_info: PaymentInfo,
}

/// One requested line of an order dict.
#[derive(Debug, JsonSchema, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRequestItem {
    /// The item, as in the catalog: 1 to 128 printable characters.
    #[schemars(length(min = 1, max = MAX_ID_LEN), pattern(r"\S"))]
    #[schema(min_length = 1, max_length = 128, pattern = r"\S")]
    pub item_id: String,
    /// How many units.
    #[schemars(range(min = 1, max = MAX_QUANTITY))]
    #[schema(minimum = 1, maximum = 10_000)]
    pub quantity: i64,
}

/// The card of an order dict, in clear: order-svc seals it for
/// payment-svc at once.
#[derive(Debug, JsonSchema, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentInfo {
    /// 12 to 19 digits, spaces and dashes allowed between them; must pass
    /// the Luhn checksum.
    #[schemars(pattern(r"^[ -]*(?:[0-9][ -]*){12,19}$"))]
    #[schema(pattern = r"^[ -]*(?:[0-9][ -]*){12,19}$")]
    pub card_number: String,
    /// `MM/YY` (`MM/YYYY` is accepted too).
    #[schemars(pattern(r"^\s*(?:0?[1-9]|1[0-2])\s*/\s*(?:[0-9]{2}|[0-9]{4})\s*$"))]
    #[schema(pattern = r"^\s*(?:0?[1-9]|1[0-2])\s*/\s*(?:[0-9]{2}|[0-9]{4})\s*$")]
    pub expiry_date: String,
    /// 3 or 4 digits.
    #[schemars(pattern(r"^\s*[0-9]{3,4}\s*$"))]
    #[schema(pattern = r"^\s*[0-9]{3,4}\s*$")]
    pub cvv: String,
}

/// One line of an order as it travels through the saga (priced by order-svc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct OrderLine {
    /// The item, as in the catalog.
    pub item_id: String,
    /// How many units.
    pub quantity: i32,
    /// The price of one unit, in integer cents.
    pub unit_price_cents: i64,
}

/// The result dict of a saga, as the mission defines it:
/// `{"status": "success", "order_id": ...}` or
/// `{"status": "failure", "order_id": ..., "error": ..., "reason": ...}` —
/// the failure naming its order whenever one was created (so that it can be
/// looked up), and none for input refused before any order existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
#[serde(tag = "status", rename_all = "lowercase")]
#[schemars(
    description = "The result dict of a saga: `success`, `failure` (naming its order whenever \
                   one was created) or, for a saga waiting for an outside answer, `pending`."
)]
pub enum SagaResult {
    /// The saga succeeded.
    Success {
        /// The order.
        order_id: Uuid,
    },
    /// The saga failed, or the order was refused before any existed.
    Failure {
        /// The order; absent when the input was refused before any order
        /// existed (`Invalid order`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        order_id: Option<Uuid>,
        /// The step that failed: `Payment failed`, `Inventory reservation
        /// failed`, `Notification failed`, `Order timed out`, `Invalid order`.
        error: String,
        /// Why, for a human.
        reason: String,
    },
    /// Not decided yet, by design: a step waits for an outside answer (a
    /// 3-D Secure confirmation) under the saga's long deadline. The final
    /// result follows (`GET /orders/{id}`, `reply_to`, `order.confirmed` /
    /// `order.failed`).
    Pending {
        /// The order.
        order_id: Uuid,
        /// What it waits for.
        next: PendingStep,
    },
}

/// What a pending saga waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, utoipa::ToSchema)]
pub struct PendingStep {
    /// `payment_confirmation` (3-D Secure) or `stock_arrival` (a backorder).
    pub step: String,
    /// When the saga is rolled back if the answer has not come.
    pub deadline_at: chrono::DateTime<chrono::Utc>,
    /// What is awaited, for a human.
    pub detail: String,
}

impl SagaResult {
    /// A failure before any order existed (invalid input).
    pub fn failure(error: impl Into<String>, reason: impl Into<String>) -> Self {
        SagaResult::Failure {
            order_id: None,
            error: error.into(),
            reason: reason.into(),
        }
    }

    /// The failure of the saga of `order_id`.
    pub fn order_failed(
        order_id: Uuid,
        error: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        SagaResult::Failure {
            order_id: Some(order_id),
            error: error.into(),
            reason: reason.into(),
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, SagaResult::Success { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_with_invisible_or_control_characters_are_refused() {
        assert!(check_id("user-123", "id").is_ok());
        assert!(check_id("Jörg", "id").is_ok());
        for bad in [
            "",
            "a\u{0}b",
            "a\nb",
            "admin\u{202E}nimda",
            "zero\u{200B}width",
            "\u{FEFF}bom",
        ] {
            assert!(check_id(bad, "id").is_err(), "{bad:?}");
        }
        assert!(check_id(&"x".repeat(MAX_ID_LEN), "id").is_ok());
        assert!(check_id(&"x".repeat(MAX_ID_LEN + 1), "id").is_err());
    }

    #[test]
    fn the_order_request_schemas_show_the_public_description_not_the_doc_comment() {
        let json_schema = schemars::schema_for!(OrderRequest).to_value();
        assert_eq!(json_schema["description"], ORDER_REQUEST_DESCRIPTION);
        let openapi =
            serde_json::to_value(<OrderRequest as utoipa::PartialSchema>::schema()).unwrap();
        assert_eq!(openapi["description"], ORDER_REQUEST_DESCRIPTION);
        // Closed in both, as order-svc refuses unknown fields.
        assert_eq!(json_schema["additionalProperties"], false);
        assert_eq!(openapi["additionalProperties"], false);
    }

    #[test]
    fn result_dicts_have_exactly_the_mission_shape() {
        let id = Uuid::nil();
        assert_eq!(
            serde_json::to_value(SagaResult::Success { order_id: id }).unwrap(),
            json!({"status": "success", "order_id": id})
        );
        assert_eq!(
            serde_json::to_value(SagaResult::failure("Payment failed", "Insufficient funds"))
                .unwrap(),
            json!({"status": "failure", "error": "Payment failed", "reason": "Insufficient funds"})
        );
        let failed = SagaResult::order_failed(id, "Payment failed", "Insufficient funds");
        let text = serde_json::to_string(&failed).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"status":"failure","order_id":"{id}","error":"Payment failed","reason":"Insufficient funds"}}"#
            )
        );
        assert_eq!(serde_json::from_str::<SagaResult>(&text).unwrap(), failed);
    }
}
