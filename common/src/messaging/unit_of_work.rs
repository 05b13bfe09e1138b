//! The unit of work: one PostgreSQL transaction carrying a batch's state
//! changes and the events they cause.
//!
//! A handler writes through [`UnitOfWork::conn`], queues the events it causes
//! with [`UnitOfWork::emit`] and what must happen only once the commit is
//! durable (metrics, waking a waiting request) with
//! [`UnitOfWork::on_commit`]. [`UnitOfWork::commit`] inserts the events into
//! the outbox with one statement, commits, runs the callbacks and hands the
//! events to the publisher's fast path. Dropped without a commit, nothing of
//! it happened.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::messaging::outbox::{self, OutboxMessage};
use crate::messaging::publisher::Publisher;

/// How a unit of work begins (one round trip, like a plain `BEGIN`): its
/// statements are planned once per connection (a generic plan) instead of
/// again at each execution for the arrays each batch binds — planning took
/// a fifth of the hot path's statement time — with random reads priced for
/// a working set that is in memory, so that a lookup of a batch's keys
/// (which a generic plan assumes to be ten) stays an index scan rather than
/// a scan of a 1,000-row table for two keys. A cached plan is made again
/// when the statistics of its tables change (see
/// [`crate::store::statistics`]). Only the hot path's transactions: the
/// other queries (searches with optional filters) keep PostgreSQL's choice.
pub const BEGIN: &str =
    "begin; set local plan_cache_mode = force_generic_plan; set local random_page_cost = 1.1";

type Callback = Box<dyn FnOnce() + Send>;

/// One transaction: state changes, outbox events, after-commit callbacks.
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
    outgoing: Vec<OutboxMessage>,
    /// Events a handler wrote to the outbox in its own statement.
    enqueued: Vec<OutboxMessage>,
    on_commit: Vec<Callback>,
}

impl UnitOfWork {
    pub async fn begin(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            tx: pool.begin_with(BEGIN).await?,
            outgoing: Vec::new(),
            enqueued: Vec::new(),
            on_commit: Vec::new(),
        })
    }

    /// The transaction's connection, for the handler's own statements.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Queues an event; it is inserted into the outbox at commit.
    pub fn emit(&mut self, message: OutboxMessage) {
        self.outgoing.push(message);
    }

    /// Events the handler already wrote to the outbox in one of its own
    /// statements (see [`crate::messaging::outbox::insert_cte`]): published
    /// after the commit like the others, not inserted again.
    pub fn enqueued(&mut self, messages: impl IntoIterator<Item = OutboxMessage>) {
        self.enqueued.extend(messages);
    }

    /// Runs `f` once the transaction has committed (never if it does not).
    pub fn on_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_commit.push(Box::new(f));
    }

    /// Inserts the queued events into the outbox, commits, runs the
    /// callbacks and hands the events to `publisher`.
    pub async fn commit(mut self, publisher: &Publisher) -> Result<(), sqlx::Error> {
        if !self.outgoing.is_empty() {
            outbox::enqueue(&mut self.tx, &self.outgoing).await?;
        }
        // Where a test kills the process in the middle of a batch: after
        // what the handler did outside the transaction, before its commit.
        crate::failpoints::pause_while_set("unit_of_work::before_commit").await;
        self.tx.commit().await?;
        crate::store::statistics::count_commit();
        crate::failpoints::crash_if_set("outbox::after_commit");
        if crate::failpoints::is_set("unit_of_work::commit_lost") {
            // The COMMIT took effect, and its answer was lost with the
            // connection: the caller cannot tell it from a failed one.
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "failpoint unit_of_work::commit_lost: the answer to COMMIT was lost",
            )));
        }
        for f in self.on_commit {
            f();
        }
        let mut events = self.outgoing;
        events.extend(self.enqueued);
        publisher.publish_committed(events);
        Ok(())
    }
}
