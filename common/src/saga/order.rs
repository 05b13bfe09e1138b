//! Shapes shared by every party of the saga: an order line and the result dict
//! that a client receives.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of an order as it travels through the saga (priced by order-svc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub item_id: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

/// The result dict of a saga, exactly as the mission defines it:
/// `{"status": "success", "order_id": ...}` or
/// `{"status": "failure", "error": ..., "reason": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum SagaResult {
    Success { order_id: Uuid },
    Failure { error: String, reason: String },
}

impl SagaResult {
    pub fn failure(error: impl Into<String>, reason: impl Into<String>) -> Self {
        SagaResult::Failure {
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
    }
}
