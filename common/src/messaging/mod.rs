//! Everything between a service's database and the broker.
//!
//! The contract:
//! - [`events`]: the event catalogue (routing keys, payloads);
//! - [`envelope`]: the envelope every event travels in, deterministic ids,
//!   the saga's trail;
//! - [`schema`]: the same, as the JSON Schemas of `docs/schemas/`, and
//!   [`asyncapi`]: who sends and receives what, as `docs/asyncapi.yaml`.
//!
//! The broker:
//! - [`topology`]: exchange, queues and bindings, who consumes what;
//! - [`broker`]: one supervised connection per process.
//!
//! The hot path, for each batch of deliveries:
//! - [`delivery`]: a delivery as handlers see it;
//! - [`handler`]: what a service implements — a batch in, a result per
//!   message out, and which failures are worth retrying;
//! - [`judge`]: runs the handler on the whole batch in one [`unit_of_work`]
//!   (one message at a time if the batch fails, so one bad message never
//!   sinks others) and gives each message its verdict;
//! - [`consumer`]: takes what is ready, has it judged, acks after the
//!   commit, retries or parks what failed; [`fault`] can slow it down on
//!   purpose (tests, benchmarks);
//! - [`outbox`]: the durable record of every event a commit caused, and the
//!   sweeper that publishes whatever the fast path did not;
//! - [`publisher`]: the fast path — publishes committed events right after
//!   the commit, pipelined, and tells the outbox what the broker confirmed.
//!
//! Duplicates and failures:
//! - [`retry`]: the delay tiers of broker-level retries;
//! - [`crash_loop`]: which redelivered message keeps crashing the process;
//! - [`inbox`]: the counters of duplicates and late events (recognised by
//!   their natural keys);
//! - [`escalation`]: compensations that kept failing, for an operator.
//!
//! Trust:
//! - [`trust`]: which broker user may publish which event; everything else
//!   is parked unread;
//! - [`permissions`]: what each broker user may do at all, as the broker
//!   enforces it.

pub mod asyncapi;
pub mod broker;
pub mod consumer;
pub mod crash_loop;
pub mod delivery;
pub mod envelope;
pub mod escalation;
pub mod events;
pub mod fault;
pub mod handler;
pub mod inbox;
pub mod judge;
pub mod outbox;
pub mod permissions;
pub mod publisher;
pub mod retry;
pub mod schema;
pub mod topology;
pub mod trust;
pub mod unit_of_work;
