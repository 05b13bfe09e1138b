//! Shapes shared by every party of the saga: an order line and the result dict
//! that a client receives.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest id (customer, item) anywhere: order dicts, path segments.
pub const MAX_ID_LEN: usize = 128;

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

/// One line of an order as it travels through the saga (priced by order-svc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub item_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

/// The result dict of a saga, as the mission defines it:
/// `{"status": "success", "order_id": ...}` or
/// `{"status": "failure", "order_id": ..., "error": ..., "reason": ...}` —
/// the failure naming its order whenever one was created (so that it can be
/// looked up), and none for input refused before any order existed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum SagaResult {
    Success {
        order_id: Uuid,
    },
    Failure {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        order_id: Option<Uuid>,
        error: String,
        reason: String,
    },
    /// Not decided yet, by design: a step waits for an outside answer (a
    /// 3-D Secure confirmation) under the saga's long deadline. The final
    /// result follows (`GET /orders/{id}`, `reply_to`, `order.confirmed` /
    /// `order.failed`).
    Pending {
        order_id: Uuid,
        next: PendingStep,
    },
}

/// What a pending saga waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStep {
    /// `payment_confirmation`.
    pub step: String,
    /// When the saga is rolled back if the answer has not come.
    pub deadline_at: chrono::DateTime<chrono::Utc>,
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
