//! The rollback rule every step shares.
//!
//! When a saga is rolled back (`order.failed` / `order.cancelled`), a service
//! looks at what it did for the order:
//! - nothing yet → write a *tombstone*, so the forward request, if it arrives
//!   late (messages are not ordered), finds the order closed and is not applied;
//! - an effect still in force (a charge, held stock, a sent confirmation) →
//!   *undo* it, once;
//! - anything else (declined, already undone, committed) → nothing.

/// A step's per-order state, as far as rollback is concerned.
pub trait StepState: Copy {
    /// True if the step's effect is in force and must be undone.
    fn needs_undo(self) -> bool;
}

/// What a rollback does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    Tombstone,
    Undo,
    Nothing,
}

pub fn compensation_for<S: StepState>(current: Option<S>) -> Compensation {
    match current {
        None => Compensation::Tombstone,
        Some(s) if s.needs_undo() => Compensation::Undo,
        Some(_) => Compensation::Nothing,
    }
}
