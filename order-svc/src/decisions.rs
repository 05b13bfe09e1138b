//! Requests waiting for a saga's decision, and how they learn it.
//!
//! A waiter is registered before its order is committed, so no decision can
//! slip between the two. Whoever decides a saga hands the result to
//! [`DecisionWaiters::resolve`] right after the commit: in this replica
//! directly, from another replica through this replica's own queue (see
//! [`crate::replica`]). A waiter also re-reads the order now and then, so a
//! lost hand-over costs latency, never an answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::saga::order::SagaResult;
use tokio::sync::Notify;
use uuid::Uuid;

/// Local waiters, by order id.
#[derive(Default)]
pub struct DecisionWaiters {
    waiting: Mutex<HashMap<Uuid, (Arc<Slot>, usize)>>,
}

#[derive(Default)]
struct Slot {
    notify: Notify,
    result: OnceLock<SagaResult>,
}

impl DecisionWaiters {
    /// Registers interest in `order_id` until the returned waiter drops.
    pub fn register(self: &Arc<Self>, order_id: Uuid) -> Waiter {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(order_id).or_default();
        entry.1 += 1;
        Waiter {
            waiters: self.clone(),
            order_id,
            slot: entry.0.clone(),
        }
    }

    /// Hands the decision to everyone waiting on `order_id`.
    pub fn resolve(&self, order_id: Uuid, result: &SagaResult) {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((slot, _)) = map.get(&order_id) {
            let _ = slot.result.set(result.clone());
            slot.notify.notify_waiters();
        }
    }

    /// How many orders have someone waiting.
    pub fn len(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Interest in one order's decision.
pub struct Waiter {
    waiters: Arc<DecisionWaiters>,
    order_id: Uuid,
    slot: Arc<Slot>,
}

impl Waiter {
    pub fn order_id(&self) -> Uuid {
        self.order_id
    }

    /// The decision, if it has been handed over.
    pub fn result(&self) -> Option<SagaResult> {
        self.slot.result.get().cloned()
    }

    /// Waits for the decision at most `timeout`.
    pub async fn wait(&self, timeout: Duration) -> Option<SagaResult> {
        let notified = self.slot.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(result) = self.result() {
            return Some(result);
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        self.result()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self
            .waiters
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.order_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.order_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_decision_reaches_every_waiter_and_waiters_clean_up() {
        let waiters = Arc::new(DecisionWaiters::default());
        let id = Uuid::now_v7();
        let result = SagaResult::Success { order_id: id };
        {
            let a = waiters.register(id);
            let b = waiters.register(id);
            let (got, _) = tokio::join!(a.wait(Duration::from_secs(5)), async {
                tokio::task::yield_now().await;
                waiters.resolve(id, &result);
            });
            assert_eq!(got, Some(result.clone()));
            assert_eq!(b.result(), Some(result.clone()));
            // A decision handed over before the wait starts is not missed.
            assert_eq!(b.wait(Duration::from_millis(1)).await, Some(result));
        }
        assert!(waiters.is_empty());
    }

    #[tokio::test]
    async fn a_wait_without_a_decision_times_out_empty() {
        let waiters = Arc::new(DecisionWaiters::default());
        let w = waiters.register(Uuid::now_v7());
        assert_eq!(w.wait(Duration::from_millis(10)).await, None);
        waiters.resolve(Uuid::now_v7(), &SagaResult::failure("x", "y"));
        assert_eq!(w.result(), None);
    }
}
