//! Shared building blocks of the order saga.
//!
//! Every service consumes its queue on `saga.events` in batches: each batch
//! becomes one PostgreSQL transaction (state changes + outbox rows), and the
//! events it caused are published right after the commit. This crate holds
//! everything that pattern needs, so the services hold only their domain.
//!
//! # Layout
//! - [`saga`]: what the four services agree on beyond messages — the result
//!   dict and order lines, the sealed card hand-off, the rollback rule.
//! - [`messaging`]: the event contract (catalogue, envelope), the broker
//!   topology and its supervised connection, the batch consumer, the
//!   transactional outbox with its publisher and sweeper, dedup helpers and
//!   escalations.
//! - [`store`]: PostgreSQL — database creation, the pool, migrations,
//!   retryable errors, retention.
//! - [`runtime`]: what turns a handler into a running service — wiring and
//!   orderly shutdown, HTTP operations routes, configuration, telemetry.
//! - [`metric_definitions`]: the names of the metrics recorded here.
//! - [`failpoints`]: crash points for the tests (compiled out otherwise).
//!
//! Dependencies point one way: `saga` ← `messaging` ← `runtime`, with
//! `store` beside `messaging` (the outbox writes through a store
//! connection; the store knows nothing of messages).

pub mod failpoints;
pub mod messaging;
pub mod metric_definitions;
pub mod runtime;
pub mod saga;
pub mod store;
