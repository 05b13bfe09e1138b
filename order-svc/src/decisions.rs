//! Wake-ups for HTTP requests waiting on a saga's decision.
//!
//! Whichever replica decides a saga sends `NOTIFY order_decided, '<id>'` in
//! the deciding transaction; each replica listens and wakes its local
//! waiters. Waiters also re-check the database periodically, so a lost
//! notification costs latency, never an answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

/// Local waiters, by order id.
#[derive(Default)]
pub struct DecisionWaiters {
    waiting: Mutex<HashMap<Uuid, (Arc<Notify>, usize)>>,
}

impl DecisionWaiters {
    /// Registers interest in `order_id` until the returned guard drops.
    pub fn register(self: &Arc<Self>, order_id: Uuid) -> WaiterGuard {
        let mut map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(order_id)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        WaiterGuard {
            waiters: self.clone(),
            order_id,
            notify: entry.0.clone(),
        }
    }

    /// Wakes everyone waiting on `order_id`.
    pub fn wake(&self, order_id: Uuid) {
        let map = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(&order_id) {
            notify.notify_waiters();
        }
    }
}

/// Interest in one order's decision.
pub struct WaiterGuard {
    waiters: Arc<DecisionWaiters>,
    order_id: Uuid,
    notify: Arc<Notify>,
}

impl WaiterGuard {
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for WaiterGuard {
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
    async fn a_wake_reaches_an_enabled_waiter_and_guards_clean_up() {
        let waiters = Arc::new(DecisionWaiters::default());
        let id = Uuid::now_v7();
        {
            let guard = waiters.register(id);
            let notified = guard.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiters.wake(id);
            tokio::time::timeout(std::time::Duration::from_secs(1), notified)
                .await
                .expect("woken");
        }
        assert!(waiters.waiting.lock().unwrap().is_empty());
    }
}
