//! Telling a new message from one already handled.
//!
//! Most saga messages carry a natural key: the order id, with at most one
//! payment, one reservation, one notification and one decision per order.
//! Their handlers recognise a duplicate from the state row itself (an
//! insert that conflicts, an update whose condition no longer holds), in the
//! same set-based statements that apply the message, and count it here.
//! For a message without such a key, [`claim`] records its id in the
//! service's `inbox` table in the handler's transaction: a redelivery finds
//! it claimed.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::messaging::consumer::event_label;
use crate::metric_definitions as metric;

/// Claims message ids in the inbox (one statement); returns the ids that
/// were new. A concurrent claim of the same id waits for the first
/// transaction to end.
pub async fn claim(
    conn: &mut PgConnection,
    message_ids: &[Uuid],
    message_type: &str,
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let new: Vec<Uuid> = sqlx::query_scalar(
        r#"
        insert into inbox (message_id, message_type)
        select id, $2 from unnest($1::uuid[]) as t(id)
        on conflict (message_id) do nothing
        returning message_id
        "#,
    )
    .bind(message_ids)
    .bind(message_type)
    .fetch_all(conn)
    .await?;
    Ok(new.into_iter().collect())
}

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
