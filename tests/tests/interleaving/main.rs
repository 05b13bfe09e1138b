//! The interleaving checker: each service's real handler, behind the real
//! judge, against its own database, fed histories that nobody wrote down —
//! every event kind the choreography lets reach the service, duplicates,
//! deadlines already past, batches cut every way, crashes between commit
//! and ack, COMMIT answers lost — and checked after every step against a
//! small model of what the service promises. In the spirit of
//! FoundationDB's simulation tests and TigerBeetle's VOPR; docs/failure-model.md
//! says what it found.
//!
//! Deterministic: the histories come from `CHECKER_SEED` (fixed by
//! default); a violation is shrunk to a minimal history, printed with the
//! seed. `CHECKER_CASES=N` runs a longer soak:
//! `CHECKER_CASES=5000 cargo test -p saga-tests --test interleaving`.

mod crash_loop;
mod harness;
mod inventory;
mod notification;
mod order;
mod payment;
