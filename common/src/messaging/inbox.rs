//! Telling a new message from one already handled, and counting them.
//!
//! Every saga message carries a natural key: the order id, with at most one
//! payment, one reservation, one notification and one decision per order.
//! Handlers recognise a duplicate from the state row itself (an insert that
//! conflicts, an update whose condition no longer holds), in the same
//! set-based statements that apply the message, and count it here. No
//! message needs an inbox row; the `inbox` table of earlier releases stays,
//! empty, for a replica of the previous version during an upgrade (the
//! retention cleaner still prunes it).

use crate::messaging::consumer::event_label;
use crate::metric_definitions as metric;

/// Counts messages recognised as already handled (`inbox_duplicates_total`).
pub fn count_duplicates(service: &'static str, message_type: &str, n: u64) {
    if n > 0 {
        metrics::counter!(metric::INBOX_DUPLICATES,
            "service" => service, "event_type" => event_label(message_type))
        .increment(n);
    }
}

/// Counts forward events that arrived after their saga was rolled back
/// (`late_events_ignored_total`).
pub fn count_late(service: &'static str, message_type: &str, n: u64) {
    if n > 0 {
        metrics::counter!(metric::LATE_EVENTS,
            "service" => service, "event_type" => event_label(message_type))
        .increment(n);
    }
}
