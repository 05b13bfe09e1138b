//! The simulated payment gateway and the payment state machine (pure).
//!
//! Declines are reproducible from data: the well-known test card numbers that
//! payment providers publish (Stripe's list) decline with their documented
//! reason, an expiry date in the past declines as expired, and a customer
//! whose ledger balance is below the amount is declined for insufficient
//! funds (checked in SQL, atomically with the debit).

use common::messaging::events::StepFailed;
use common::saga::card::{CardDetails, parse_expiry};
use common::saga::compensation::StepState;

/// The most an account may hold, in cents (10^15: ten trillion in currency
/// units). Far below `i64::MAX`, so no sum of refunds and credits can ever
/// overflow the balance column.
pub const MAX_BALANCE_CENTS: i64 = 1_000_000_000_000_000;

/// A new customer's balance in development mode (10,000.00); in
/// production, accounts are funded explicitly (`PUT /accounts/{id}`).
pub const DEV_DEFAULT_BALANCE_CENTS: i64 = 1_000_000;

/// A test card that always declines, with its code and reason.
pub const DECLINING_TEST_CARDS: [(&str, &str, &str); 7] = [
    ("4000000000000002", "card_declined", "Card declined"),
    (
        "4000000000009995",
        "insufficient_funds",
        "Insufficient funds",
    ),
    ("4000000000009987", "lost_card", "Card reported lost"),
    ("4000000000009979", "stolen_card", "Card reported stolen"),
    ("4000000000000069", "expired_card", "Card expired"),
    ("4000000000000127", "incorrect_cvc", "Incorrect CVC"),
    ("4000000000000119", "processing_error", "Processing error"),
];

/// The well-known test card that needs 3-D Secure: the gateway answers
/// "requires action" and the customer's confirmation arrives later
/// (`POST /payments/{order_id}/confirm` or `/decline`).
pub const THREE_D_SECURE_TEST_CARD: &str = "4000000000003220";

/// What the gateway says about a card that passed its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// Charge now.
    Charge,
    /// Needs the customer's 3-D Secure confirmation: nothing is charged
    /// until it comes.
    RequiresAction,
}

/// The gateway's answer for a card that passed [`screen_card`].
pub fn approval(card: &CardDetails) -> Approval {
    if card.card_number == THREE_D_SECURE_TEST_CARD {
        Approval::RequiresAction
    } else {
        Approval::Charge
    }
}

/// The decline of a payment whose 3-D Secure confirmation failed.
pub fn authentication_declined() -> StepFailed {
    decline(
        "authentication_failed",
        "3-D Secure authentication declined",
    )
}

pub fn decline(code: &str, reason: &str) -> StepFailed {
    StepFailed {
        code: code.to_owned(),
        reason: reason.to_owned(),
    }
}

pub fn insufficient_funds() -> StepFailed {
    decline("insufficient_funds", "Insufficient funds")
}

/// Checks the card against the gateway's rules, as of `today` (year, month).
pub fn screen_card(card: &CardDetails, today: (i32, u32)) -> Result<(), StepFailed> {
    if let Some((_, code, reason)) = DECLINING_TEST_CARDS
        .iter()
        .find(|(number, _, _)| *number == card.card_number)
    {
        return Err(decline(code, reason));
    }
    match parse_expiry(&card.expiry_date) {
        // Valid through the last day of the expiry month.
        Some(expiry) if expiry >= today => Ok(()),
        Some(_) => Err(decline("expired_card", "Card expired")),
        None => Err(decline("invalid_expiry", "Invalid card expiry date")),
    }
}

/// A payment's status (the `payments.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Charged,
    Declined,
    Refunded,
    /// Tombstone: the saga was rolled back before any charge.
    Cancelled,
    /// Waits for the customer's 3-D Secure confirmation; nothing charged.
    ActionRequired,
    /// An authorisation that waited and was rolled back: nothing charged.
    Voided,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Charged => "charged",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Refunded => "refunded",
            PaymentStatus::Cancelled => "cancelled",
            PaymentStatus::ActionRequired => "action_required",
            PaymentStatus::Voided => "voided",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            PaymentStatus::Charged,
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Cancelled,
            PaymentStatus::ActionRequired,
            PaymentStatus::Voided,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

impl StepState for PaymentStatus {
    /// A charge is refunded; an authorisation waiting for its confirmation
    /// is voided.
    fn needs_undo(self) -> bool {
        matches!(self, PaymentStatus::Charged | PaymentStatus::ActionRequired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::saga::compensation::{Compensation, compensation_for};

    fn card(number: &str, expiry: &str) -> CardDetails {
        CardDetails {
            card_number: number.into(),
            expiry_date: expiry.into(),
            cvv: "123".into(),
        }
    }

    #[test]
    fn good_cards_pass_and_test_cards_decline_with_their_reason() {
        assert_eq!(
            screen_card(&card("4242424242424242", "12/30"), (2026, 11)),
            Ok(())
        );
        let declined = screen_card(&card("4000000000000002", "12/30"), (2026, 11)).unwrap_err();
        assert_eq!(declined.reason, "Card declined");
        let lost = screen_card(&card("4000000000009987", "12/30"), (2026, 11)).unwrap_err();
        assert_eq!(lost.code, "lost_card");
    }

    #[test]
    fn the_3d_secure_test_card_requires_action() {
        let card = card("4000000000003220", "12/30");
        assert_eq!(screen_card(&card, (2026, 11)), Ok(()));
        assert_eq!(approval(&card), Approval::RequiresAction);
        assert_eq!(
            approval(&super::tests::card("4242424242424242", "12/30")),
            Approval::Charge
        );
    }

    #[test]
    fn a_card_is_valid_through_its_expiry_month() {
        assert_eq!(
            screen_card(&card("4242424242424242", "11/26"), (2026, 11)),
            Ok(())
        );
        let expired = screen_card(&card("4242424242424242", "10/26"), (2026, 11)).unwrap_err();
        assert_eq!(expired.reason, "Card expired");
    }

    #[test]
    fn rollback_refunds_only_a_charge_and_tombstones_an_absent_payment() {
        assert_eq!(
            compensation_for::<PaymentStatus>(None),
            Compensation::Tombstone
        );
        assert_eq!(
            compensation_for(Some(PaymentStatus::Charged)),
            Compensation::Undo
        );
        assert_eq!(
            compensation_for(Some(PaymentStatus::ActionRequired)),
            Compensation::Undo
        );
        for s in [
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Cancelled,
            PaymentStatus::Voided,
        ] {
            assert_eq!(compensation_for(Some(s)), Compensation::Nothing);
        }
    }
}
