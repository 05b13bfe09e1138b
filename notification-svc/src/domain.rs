//! Notification rules (pure): addresses, the simulated bounce, the emails'
//! text, and the rollback rule.

use common::messaging::events::StepFailed;
use common::saga::compensation::StepState;
use common::saga::order::OrderLine;
use uuid::Uuid;

/// The address of a customer who has none on file:
/// `<customer_id>@<default domain>`, with characters not allowed in an
/// address's local part replaced by `-`.
pub fn default_address(customer_id: &str, domain: &str) -> String {
    let local: String = customer_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{local}@{domain}")
}

/// A plausible address: one `@`, non-empty parts, no spaces, at most 254 bytes.
pub fn valid_address(address: &str) -> bool {
    let mut parts = address.split('@');
    matches!((parts.next(), parts.next(), parts.next()), (Some(l), Some(d), None)
        if !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.'))
        && address.len() <= 254
        && !address.chars().any(char::is_whitespace)
}

/// The simulated bounce: the reserved `.invalid` top-level domain (RFC 2606)
/// never resolves, so mail to it cannot be delivered.
pub fn check_deliverable(address: &str) -> Result<(), StepFailed> {
    let domain = address
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if domain == "invalid" || domain.ends_with(".invalid") {
        return Err(StepFailed {
            code: "email_bounced".to_owned(),
            // Not the address itself: the reason reaches every API client
            // and the logs.
            reason: "Email bounced: the address on file is undeliverable".to_owned(),
        });
    }
    Ok(())
}

/// Which email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailKind {
    Confirmation,
    Cancellation,
}

impl EmailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EmailKind::Confirmation => "confirmation",
            EmailKind::Cancellation => "cancellation",
        }
    }
}

/// An email to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub id: Uuid,
    pub order_id: Uuid,
    pub kind: EmailKind,
    pub recipient: String,
    pub subject: String,
    pub body: String,
}

/// Namespace of email ids: one id per (order, kind), so a re-send after a
/// redelivery is recognisably the same email.
const EMAIL_NAMESPACE: Uuid = Uuid::from_u128(0x5a6a_0e7e_8d1b_4c3e_9f00_0000_5a6a_0002);

fn email_id(order_id: Uuid, kind: EmailKind) -> Uuid {
    Uuid::new_v5(
        &EMAIL_NAMESPACE,
        format!("{order_id}/{}", kind.as_str()).as_bytes(),
    )
}

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

pub fn confirmation(
    order_id: Uuid,
    recipient: &str,
    items: &[OrderLine],
    amount_cents: i64,
    currency: &str,
) -> Email {
    let mut body = format!("Thank you for your order {order_id}.\n\n");
    for l in items {
        body.push_str(&format!(
            "  {} x {} at {}\n",
            l.quantity,
            l.item_id,
            money(l.unit_price_cents, currency)
        ));
    }
    body.push_str(&format!(
        "\nTotal charged: {}\n",
        money(amount_cents, currency)
    ));
    Email {
        id: email_id(order_id, EmailKind::Confirmation),
        order_id,
        kind: EmailKind::Confirmation,
        recipient: recipient.to_owned(),
        subject: format!("Your order {} is confirmed", short(order_id)),
        body,
    }
}

pub fn cancellation(order_id: Uuid, recipient: &str, reason: &str) -> Email {
    Email {
        id: email_id(order_id, EmailKind::Cancellation),
        order_id,
        kind: EmailKind::Cancellation,
        recipient: recipient.to_owned(),
        subject: format!("Your order {} was cancelled", short(order_id)),
        body: format!(
            "We are sorry: your order {order_id} could not be completed and was cancelled.\n\
             Reason: {reason}\nAny charge has been refunded.\n"
        ),
    }
}

fn short(order_id: Uuid) -> String {
    order_id.simple().to_string()[..8].to_owned()
}

/// A notification's status (the `notifications.status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationStatus {
    /// The confirmation is being handed to an external relay: it may have
    /// gone out (a crash between the relay's answer and the record leaves
    /// it here).
    Sending,
    /// The confirmation went out.
    Sent,
    /// The confirmation bounced.
    Bounced,
    /// The deadline passed before the confirmation could be sent.
    Expired,
    /// Tombstone: rolled back before any email.
    Cancelled,
    /// The confirmation went out, then a cancellation followed it.
    Retracted,
    /// The mail relay was down: the confirmation is queued and retried (the
    /// saga is confirmed: past the pivot).
    Deferred,
}

impl NotificationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Sending => "sending",
            NotificationStatus::Sent => "sent",
            NotificationStatus::Bounced => "bounced",
            NotificationStatus::Expired => "expired",
            NotificationStatus::Cancelled => "cancelled",
            NotificationStatus::Retracted => "retracted",
            NotificationStatus::Deferred => "deferred",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            NotificationStatus::Sending,
            NotificationStatus::Sent,
            NotificationStatus::Bounced,
            NotificationStatus::Expired,
            NotificationStatus::Cancelled,
            NotificationStatus::Retracted,
            NotificationStatus::Deferred,
        ]
        .into_iter()
        .find(|n| n.as_str() == s)
    }
}

impl StepState for NotificationStatus {
    /// A sent confirmation is "undone" by a cancellation email, and so is
    /// one that may have been sent; a queued one is dropped from the queue.
    fn needs_undo(self) -> bool {
        matches!(
            self,
            NotificationStatus::Sent | NotificationStatus::Sending | NotificationStatus::Deferred
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::saga::compensation::{Compensation, compensation_for};

    #[test]
    fn default_addresses_are_derived_from_the_customer_id() {
        assert_eq!(
            default_address("user123", "example.com"),
            "user123@example.com"
        );
        assert_eq!(default_address("a b/c", "example.com"), "a-b-c@example.com");
        assert!(valid_address(&default_address("a b/c", "example.com")));
    }

    #[test]
    fn only_the_invalid_tld_bounces() {
        assert!(check_deliverable("jane@example.com").is_ok());
        let bounce = check_deliverable("jane@mail.invalid").unwrap_err();
        assert_eq!(bounce.code, "email_bounced");
        // No address in a reason: it reaches every API client and the logs.
        assert!(!bounce.reason.contains("jane"), "{}", bounce.reason);
        assert!(check_deliverable("x@INVALID").is_err());
    }

    #[test]
    fn addresses_are_checked_for_shape() {
        assert!(valid_address("a@b.c"));
        for bad in ["", "a", "a@", "@b.c", "a@b", "a b@c.d", "a@b@c.d"] {
            assert!(!valid_address(bad), "{bad}");
        }
    }

    #[test]
    fn an_email_is_identified_by_its_order_and_kind() {
        let id = Uuid::now_v7();
        let a = confirmation(id, "a@b.c", &[], 100, "USD");
        let b = confirmation(id, "x@y.z", &[], 200, "USD");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, cancellation(id, "a@b.c", "r").id);
        assert!(a.body.contains("1.00 USD"));
    }

    #[test]
    fn rollback_sends_a_cancellation_only_after_a_confirmation() {
        assert_eq!(
            compensation_for::<NotificationStatus>(None),
            Compensation::Tombstone
        );
        assert_eq!(
            compensation_for(Some(NotificationStatus::Sent)),
            Compensation::Undo
        );
        assert_eq!(
            compensation_for(Some(NotificationStatus::Sending)),
            Compensation::Undo,
            "a confirmation that may have gone out is followed by a cancellation"
        );
        assert_eq!(
            compensation_for(Some(NotificationStatus::Bounced)),
            Compensation::Nothing
        );
        assert_eq!(
            compensation_for(Some(NotificationStatus::Retracted)),
            Compensation::Nothing
        );
    }
}
