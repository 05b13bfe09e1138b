//! Shared building blocks of the order saga.
//!
//! Every service is a consumer of `saga.events` that turns each message into
//! one PostgreSQL transaction (inbox claim + state change + outbox events) and
//! lets the outbox relay publish what it committed. This crate holds
//! everything that pattern needs, so the services hold only their domain.
//!
//! # Layout
//! - [`events`], [`envelope`], [`order`], [`card`]: the contract — event
//!   catalogue, envelope, result dict, sealed card hand-off.
//! - [`topology`]: exchange, queues, bindings, and who consumes what.
//! - [`broker`]: the supervised AMQP connection.
//! - [`consumer`]: the consume → handle → ack / retry / park loop.
//! - [`inbox`]: dedup inbox and the per-message unit of work.
//! - [`outbox`]: transactional outbox and its relay.
//! - [`db`], [`pg_notify`]: database set-up, migrations, retryable errors,
//!   LISTEN/NOTIFY wake-ups.
//! - [`service`]: the runtime that wires a service together and shuts it
//!   down in order; [`config`], [`http`], [`telemetry`], [`shutdown`],
//!   [`fault`] support it.

pub mod broker;
pub mod card;
pub mod compensation;
pub mod config;
pub mod consumer;
pub mod db;
pub mod envelope;
pub mod escalation;
pub mod events;
pub mod fault;
pub mod http;
pub mod inbox;
pub mod order;
pub mod outbox;
pub mod pg_notify;
pub mod retention;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
