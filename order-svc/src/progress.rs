//! How far each undecided saga has got, as this replica observed it.
//!
//! order-svc does not consume the forward steps (`payment.completed`,
//! `inventory.reserved`): it only observes them on its replica's transient
//! queue (see [`crate::replica`]) and remembers the furthest step per order,
//! in memory. That is all a timeout needs to name the step it was waiting
//! for, and it costs no durable delivery, ack or database write per step.
//! Forgotten once the saga is decided; a replica that restarts forgets it
//! too, and then names the earliest step it cannot rule out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::messaging::events::EventType;
use uuid::Uuid;

/// The forward steps, in saga order.
const FORWARD: [EventType; 4] = [
    EventType::OrderCreated,
    EventType::PaymentCompleted,
    EventType::InventoryReserved,
    EventType::NotificationSent,
];

fn rank(step: EventType) -> Option<usize> {
    FORWARD.iter().position(|s| *s == step)
}

/// The furthest step seen per order.
#[derive(Default)]
pub struct Progress {
    seen: Mutex<HashMap<Uuid, (usize, Instant)>>,
}

impl Progress {
    /// Notes that `order_id` reached `step` (a step behind what is known
    /// already changes nothing).
    pub fn record(&self, order_id: Uuid, step: EventType) {
        let Some(r) = rank(step) else { return };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(order_id).or_insert((0, Instant::now()));
        if r > entry.0 {
            entry.0 = r;
        }
    }

    /// The forward steps `order_id` is known to have passed, oldest first
    /// (`order.created` at least).
    pub fn steps_seen(&self, order_id: Uuid) -> Vec<String> {
        let furthest = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&order_id)
            .map_or(0, |e| e.0);
        FORWARD[..=furthest]
            .iter()
            .map(|s| s.routing_key().to_owned())
            .collect()
    }

    /// Forgets a decided saga.
    pub fn forget(&self, order_id: Uuid) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&order_id);
    }

    /// Forgets everything first seen longer ago than `age` (sagas decided
    /// by another replica).
    pub fn prune(&self, age: Duration) {
        let now = Instant::now();
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (_, at)| now.duration_since(*at) < age);
    }

    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_furthest_step_wins_whatever_the_arrival_order() {
        let p = Progress::default();
        let id = Uuid::now_v7();
        assert_eq!(p.steps_seen(id), ["order.created"]);
        p.record(id, EventType::InventoryReserved);
        p.record(id, EventType::PaymentCompleted);
        assert_eq!(
            p.steps_seen(id),
            ["order.created", "payment.completed", "inventory.reserved"]
        );
        p.record(id, EventType::OrderFailed);
        assert_eq!(p.steps_seen(id).len(), 3);
        p.forget(id);
        assert!(p.is_empty());
    }

    #[test]
    fn old_entries_are_pruned() {
        let p = Progress::default();
        p.record(Uuid::now_v7(), EventType::PaymentCompleted);
        p.prune(Duration::from_secs(60));
        assert_eq!(p.len(), 1);
        p.prune(Duration::ZERO);
        assert!(p.is_empty());
    }
}
