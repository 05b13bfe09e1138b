//! Telling the message that crashes the process from its batch-mates.
//!
//! When a process dies in the middle of a batch, the broker delivers every
//! unacked message again (AMQP's `redelivered` flag); any of them may be the
//! one that killed it. The broker's own count of deliveries cannot tell:
//! RabbitMQ 3.x counts every return of every prefetched message (so the
//! culprit's batch-mates reach its limit with it), and 4.x does not count a
//! return at all when a channel closes (so its limit never trips). The
//! consumer therefore keeps its own durable count, per message, of the
//! times it was handled as a *suspect* — counted, and committed, just
//! before it is handled:
//! - suspects never counted are handled together, as a batch (a broker
//!   connection lost returns whole prefetches: the common case, no crash);
//! - a suspect counted before was in a batch that did crash: it is handled
//!   on its own;
//! - one counted twice already crashed the process on its own: the
//!   culprit. It is parked, or escalated if it must happen whatever it
//!   takes (a compensation), without being handled again.
//!
//! A suspect handled without a crash is forgotten at once; one never
//! handled (the process died on another first) is not counted. So an
//! innocent message is counted twice at most, and never parked. Each
//! culprit costs at most three crashes; on RabbitMQ 3.x a message still in the prefetch
//! through the crashes of three culprits reaches the broker's own limit
//! (10, [`crate::messaging::topology::DELIVERY_LIMIT`]), the last resort.

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::messaging::delivery::Incoming;

/// A suspect handled this many times already, and back, is the culprit.
pub const TIMES_BEFORE_PARKING: i32 = 2;

/// The message's identity across deliveries: a digest of its routing key
/// and body (a redelivery carries the very same bytes).
pub fn digest(msg: &Incoming) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(msg.routing_key.as_bytes());
    hash.update([0x1f]);
    hash.update(&msg.body);
    let bytes: [u8; 16] = hash.finalize()[..16]
        .try_into()
        .expect("a SHA-256 digest is longer than 16 bytes");
    Uuid::from_bytes(bytes)
}

/// How many times each of `ids` was handled as a suspect (absent: never).
pub async fn counts(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, i32>, sqlx::Error> {
    let rows: Vec<(Uuid, i32)> =
        sqlx::query_as("select id, times from crash_suspects where id = any($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Counts one more time each of `ids` is handled as a suspect (committed
/// at once, before it is handled); returns the count of each.
pub async fn suspect(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, i32>, sqlx::Error> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let rows: Vec<(Uuid, i32)> = sqlx::query_as(
        r#"
        insert into crash_suspects (id, times)
        select id, 1 from unnest($1::uuid[]) as t(id)
        on conflict (id) do update
            set times = crash_suspects.times + 1, last_seen = now()
        returning id, times
        "#,
    )
    .bind(sorted)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Forgets suspects that were handled without a crash.
pub async fn clear(pool: &PgPool, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("delete from crash_suspects where id = any($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: &str, body: &[u8]) -> Incoming {
        Incoming {
            routing_key: key.into(),
            message_id: None,
            correlation_id: None,
            reply_to: None,
            message_type: None,
            traceparent: None,
            body: body.to_vec(),
            attempt: 1,
            max_attempts: 5,
            escalation_id: None,
            delivery_count: 0,
            redelivered: false,
            sender: None,
            control_headers: Vec::new(),
        }
    }

    #[test]
    fn a_message_is_known_by_its_routing_key_and_bytes_whatever_its_delivery() {
        let a = msg("order.failed", b"{}");
        let mut again = a.clone();
        again.redelivered = true;
        again.delivery_count = 7;
        assert_eq!(digest(&a), digest(&again));
        assert_ne!(digest(&a), digest(&msg("order.created", b"{}")));
        assert_ne!(digest(&a), digest(&msg("order.failed", b"{ }")));
    }
}
