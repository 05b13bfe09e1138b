//! The API every service implements: a [`MessageHandler`] takes a batch of
//! deliveries in one unit of work and answers one [`MessageResult`] per
//! message; [`HandlerError`] says whether a failure is worth retrying.
//! [`StepBatch`] sorts a step service's batch by what each message asks for.
//!
//! Which errors are retried and which park a message is decided here (the
//! variants of [`HandlerError`]) and in [`crate::store::pool`] (which
//! database errors are permanent); the consumer only applies it.

use std::future::Future;

use crate::messaging::delivery::Incoming;
use crate::messaging::envelope::Envelope;
use crate::messaging::events::EventType;
use crate::messaging::unit_of_work::UnitOfWork;

/// A handler's failure, classified for the consumer.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Try again later (a dependency is down, a race to retry).
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// A database error: retried, and counted by kind when it is a known
    /// retryable one (deadlock, serialization failure, lost connection, a
    /// demoted host).
    #[error("database: {0}")]
    Db(sqlx::Error),
    /// Will never succeed (malformed or invalid message): parked at once.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

impl HandlerError {
    pub fn permanent(msg: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(anyhow::anyhow!("{msg}"))
    }

    pub fn transient(msg: impl std::fmt::Display) -> Self {
        HandlerError::Transient(anyhow::anyhow!("{msg}"))
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        // A demoted host's error retires the pool's old connections at once.
        crate::store::pool::note_error(&e);
        HandlerError::Db(e)
    }
}

impl From<crate::messaging::envelope::DecodeError> for HandlerError {
    fn from(e: crate::messaging::envelope::DecodeError) -> Self {
        HandlerError::Permanent(e.into())
    }
}

/// The outcome of one message of a batch.
pub type MessageResult = Result<(), HandlerError>;

/// A service's reaction to its messages.
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles `batch` in `uow`, which the consumer commits afterwards, and
    /// returns one result per message, in order.
    ///
    /// - `Ok(())`: applied, or recognised as already applied (a duplicate)
    ///   or as too late (its saga is over).
    /// - `Err` for one message: a transient error means the handler wrote
    ///   nothing for it (it is retried later, on its own); a permanent one
    ///   means it is parked — what the handler wrote for it (a rejection
    ///   reply, say) is committed with the batch.
    /// - `Err` for the batch: nothing is committed, and each message is
    ///   handled again in a batch of its own. A [`HandlerError::Db`] for one
    ///   message counts as one for the batch: the failed statement aborted
    ///   the transaction they share.
    ///
    /// Must be idempotent: a message can be handled more than once
    /// (redelivery), and must be recognised as a duplicate the second time.
    fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> impl Future<Output = Result<Vec<MessageResult>, HandlerError>> + Send;

    /// The step a message with this routing key performs, if it is one that
    /// must happen whatever it takes: a compensation (e.g. `"refund"`) or a
    /// terminal step that cannot be undone (e.g. `"stock commit"`). Such a
    /// message is escalated (see [`crate::messaging::escalation`]) when it
    /// cannot be applied — retries exhausted, too old to tell, a process
    /// that crashes on it — never parked.
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        let _ = routing_key;
        None
    }
}

/// A step service's batch, sorted by what each message asks for.
pub struct StepBatch<T> {
    /// One result per message: a message that is malformed, or of a type
    /// this service does not take, already has its error here.
    pub results: Vec<MessageResult>,
    /// The forward requests, with their data decoded: (index, envelope, data).
    pub forward: Vec<(usize, Envelope, T)>,
    /// The rollbacks (`order.failed`, `order.cancelled`).
    pub rollbacks: Vec<(usize, Envelope)>,
    /// Messages of the other types the service takes.
    pub others: Vec<(usize, Envelope)>,
}

impl<T: serde::de::DeserializeOwned> StepBatch<T> {
    /// Sorts `batch` for `service`, whose forward request is `forward`, and
    /// which also takes `others`.
    pub fn sort(
        service: &str,
        batch: &[Incoming],
        forward: EventType,
        others: &[EventType],
    ) -> StepBatch<T> {
        let mut sorted = StepBatch {
            results: Vec::with_capacity(batch.len()),
            forward: Vec::new(),
            rollbacks: Vec::new(),
            others: Vec::new(),
        };
        for (i, msg) in batch.iter().enumerate() {
            let result = Envelope::decode(&msg.body)
                .map_err(HandlerError::from)
                .and_then(|env| match env.event_type {
                    t if t == forward => {
                        let data = env.data_as::<T>()?;
                        sorted.forward.push((i, env, data));
                        Ok(())
                    }
                    t if t.is_abort() => {
                        sorted.rollbacks.push((i, env));
                        Ok(())
                    }
                    t if others.contains(&t) => {
                        sorted.others.push((i, env));
                        Ok(())
                    }
                    other => Err(HandlerError::permanent(format!(
                        "{service} does not handle {other}"
                    ))),
                });
            sorted.results.push(result);
        }
        sorted
    }
}

/// For [`MessageHandler::compensation`]: `step` for the rollback events
/// (`order.failed`, `order.cancelled`), `None` otherwise.
pub fn compensation_on_rollback(routing_key: &str, step: &'static str) -> Option<&'static str> {
    EventType::from_routing_key(routing_key)
        .filter(|t| t.is_abort())
        .map(|_| step)
}
