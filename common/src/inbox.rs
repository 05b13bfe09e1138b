//! The dedup inbox, and the unit of work every handler runs in.
//!
//! A [`UnitOfWork`] is one PostgreSQL transaction that (1) claims the incoming
//! message id in the inbox, (2) carries the handler's state change, and (3)
//! inserts the events it causes into the outbox. It commits all three or
//! nothing; the consumer acks only after the commit. A redelivered or
//! duplicated message finds its id already claimed and changes nothing.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::outbox::{self, OutboxMessage};
use crate::telemetry::metric;

/// Whether a message id was seen before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    New,
    Duplicate,
}

/// Records `message_id` as handled; `Duplicate` if it already was. A
/// concurrent claim of the same id waits for the first transaction to end.
pub async fn claim(
    conn: &mut PgConnection,
    message_id: Uuid,
    message_type: &str,
) -> Result<Claim, sqlx::Error> {
    let inserted = sqlx::query(
        r#"
        insert into inbox (message_id, message_type)
        values ($1, $2)
        on conflict (message_id) do nothing
        "#,
    )
    .bind(message_id)
    .bind(message_type)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(if inserted == 1 {
        Claim::New
    } else {
        Claim::Duplicate
    })
}

/// One handler's transaction: inbox claim, state change, outbox events.
pub struct UnitOfWork {
    tx: Transaction<'static, Postgres>,
    outgoing: Vec<OutboxMessage>,
}

impl UnitOfWork {
    /// Begins a transaction without an inbox claim (HTTP requests, timers).
    pub async fn begin(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            tx: pool.begin().await?,
            outgoing: Vec::new(),
        })
    }

    /// Begins a transaction and claims `message_id`; `None` (and nothing
    /// held) if the message was already handled.
    pub async fn begin_claimed(
        pool: &PgPool,
        service: &'static str,
        message_id: Uuid,
        message_type: &str,
    ) -> Result<Option<Self>, sqlx::Error> {
        let mut uow = Self::begin(pool).await?;
        match claim(&mut uow.tx, message_id, message_type).await? {
            Claim::New => Ok(Some(uow)),
            Claim::Duplicate => {
                uow.tx.rollback().await?;
                metrics::counter!(
                    metric::INBOX_DUPLICATES,
                    "service" => service,
                    "event_type" => crate::consumer::event_label(message_type)
                )
                .increment(1);
                tracing::debug!(%message_id, "duplicate message absorbed by the inbox");
                Ok(None)
            }
        }
    }

    /// [`UnitOfWork::begin_claimed`] for an event: claims its `event_id`.
    pub async fn begin_for(
        pool: &PgPool,
        service: &'static str,
        env: &Envelope,
    ) -> Result<Option<Self>, sqlx::Error> {
        Self::begin_claimed(pool, service, env.event_id, env.event_type.routing_key()).await
    }

    /// Gives up a forward step that arrived after the saga was rolled back
    /// (a tombstone is in the way): nothing is committed, not even the inbox
    /// claim, and the message is acked. Counted in `late_events_ignored_total`.
    pub async fn abandon_late(
        self,
        service: &'static str,
        env: &Envelope,
    ) -> Result<(), sqlx::Error> {
        self.tx.rollback().await?;
        metrics::counter!(
            metric::LATE_EVENTS,
            "service" => service,
            "event_type" => env.event_type.routing_key()
        )
        .increment(1);
        tracing::info!(
            order_id = %env.order_id,
            event_type = %env.event_type,
            "arrived after the saga's rollback; not applied"
        );
        Ok(())
    }

    /// The transaction's connection, for the handler's own statements.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Queues an event; it is inserted into the outbox at commit.
    pub fn emit(&mut self, message: OutboxMessage) {
        self.outgoing.push(message);
    }

    /// Inserts the queued events into the outbox and commits.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if !self.outgoing.is_empty() {
            outbox::enqueue(&mut self.tx, &self.outgoing).await?;
        }
        self.tx.commit().await
    }
}
