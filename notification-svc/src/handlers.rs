//! Message handlers of notification-svc, one batch at a time.
//!
//! - `inventory.reserved`: email the confirmation → `notification.sent`, or
//!   `notification.failed` if the address bounces. A batch claims every
//!   order's notification record with one statement first (which serialises
//!   it against a concurrent rollback, which then sees the email), sends, and
//!   records the emails with one more.
//! - `order.failed`, `order.cancelled`: if a confirmation went out, email a
//!   cancellation; if nothing went out yet, tombstone so a late
//!   `inventory.reserved` sends nothing.
//!
//! With the default transport the email *is* the row, written in the
//! batch's transaction: exactly-once. With SMTP the email leaves the process,
//! so its record is committed as `sending` before the send and marked `sent`
//! with the batch: a crash in between re-sends it on redelivery
//! (at-least-once, as email always is), and a rollback that finds `sending`
//! sends the cancellation, since the confirmation may have gone out.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use common::messaging::delivery::Incoming;
use common::messaging::envelope::{Envelope, SagaContext};
use common::messaging::events::{EventType, InventoryReserved, NotificationSent, StepFailed};
use common::messaging::handler::{HandlerError, MessageHandler, MessageResult, StepBatch};
use common::messaging::inbox;
use common::messaging::outbox::OutboxRows;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::compensation::{Compensation, compensation_for};
use common::saga::order::SagaResult;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewNotification};
use crate::domain::{self, Email, NotificationStatus};
use crate::transport::{EmailTransport, SendError};

pub struct NotificationHandler {
    pub pool: PgPool,
    pub transport: Arc<dyn EmailTransport>,
    /// Domain of the default address of customers without one on file.
    pub default_email_domain: String,
}

impl MessageHandler for NotificationHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::messaging::handler::compensation_on_rollback(routing_key, "cancellation email")
    }

    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let StepBatch {
            mut results,
            forward,
            rollbacks: aborts,
            ..
        } = StepBatch::<InventoryReserved>::sort(SERVICE, batch, EventType::InventoryReserved, &[]);
        let confirmations: Vec<(Envelope, InventoryReserved)> =
            forward.into_iter().map(|(_, env, r)| (env, r)).collect();
        if !confirmations.is_empty() {
            self.confirm(uow, confirmations).await?;
        }
        for (i, env) in aborts {
            results[i] = self.on_abort(uow, &env).await;
        }
        Ok(results)
    }
}

/// A confirmation to send, decided before the send.
struct Planned {
    env: Envelope,
    reserved: InventoryReserved,
    recipient: String,
    precheck: Result<(), StepFailed>,
    /// The status to record; `None` for a confirmation resumed from a
    /// `sending` record, which already has one.
    status: Option<NotificationStatus>,
}

impl Planned {
    /// Its notification record, with `status`.
    fn record(&self, status: NotificationStatus) -> NewNotification<'_> {
        NewNotification {
            order_id: self.env.order_id,
            customer_id: &self.reserved.customer_id,
            recipient: Some(&self.recipient),
            status,
            reason: self.precheck.as_ref().err().map(|f| f.reason.as_str()),
        }
    }
}

impl NotificationHandler {
    /// Sends the confirmation of every new order of the batch.
    ///
    /// With an external transport (SMTP) each email is first claimed as
    /// `sending` in a transaction of its own, committed before the send, and
    /// marked `sent` with the batch: a crash in between leaves `sending`,
    /// which a redelivery resumes (sends again) and a rollback treats as
    /// sent (a cancellation follows).
    async fn confirm(
        &self,
        uow: &mut UnitOfWork,
        requests: Vec<(Envelope, InventoryReserved)>,
    ) -> Result<(), HandlerError> {
        let order_ids: Vec<Uuid> = requests.iter().map(|(e, _)| e.order_id).collect();
        let mut customers: Vec<&str> = requests
            .iter()
            .map(|(_, r)| r.customer_id.as_str())
            .collect();
        customers.sort_unstable();
        customers.dedup();
        let (mut existing, on_file) =
            db::confirmation_state(uow.conn(), &order_ids, &customers).await?;
        drop(customers);
        let external = self.transport.is_external();
        let mut seen = HashSet::new();
        let (mut duplicates, mut late) = (0u64, 0u64);
        let now = Utc::now();
        let mut planned: Vec<Planned> = Vec::new();
        for (env, reserved) in requests {
            let resumed = match existing.get_mut(&env.order_id) {
                Some(r) if r.status == NotificationStatus::Cancelled.as_str() => {
                    late += 1;
                    continue;
                }
                Some(r) if r.status == NotificationStatus::Sending.as_str() => {
                    Some(r.recipient.take())
                }
                Some(_) => {
                    duplicates += 1;
                    continue;
                }
                None => None,
            };
            if !seen.insert(env.order_id) {
                duplicates += 1;
                continue;
            }
            let is_resumed = resumed.is_some();
            let recipient = resumed.flatten().unwrap_or_else(|| {
                on_file
                    .get(&reserved.customer_id)
                    .cloned()
                    .unwrap_or_else(|| {
                        domain::default_address(&reserved.customer_id, &self.default_email_domain)
                    })
            });
            let expired = now >= env.deadline_at;
            let precheck = if expired {
                Err(StepFailed {
                    code: "deadline_exceeded".into(),
                    reason: "Saga deadline passed before the confirmation email".into(),
                })
            } else {
                domain::check_deliverable(&recipient)
            };
            // A resumed `sending` record stays as it is if the email is not
            // sent again: it may have gone out, so a rollback retracts it.
            let status = match (&precheck, is_resumed) {
                (_, true) => None,
                (Ok(()), false) if external => Some(NotificationStatus::Sending),
                (Ok(()), false) => Some(NotificationStatus::Sent),
                (Err(_), false) if expired => Some(NotificationStatus::Expired),
                (Err(_), false) => Some(NotificationStatus::Bounced),
            };
            planned.push(Planned {
                env,
                reserved,
                recipient,
                precheck,
                status,
            });
        }
        drop(existing);

        let mut claimed: HashSet<Uuid> = HashSet::new();
        if external {
            // Claimed and committed before anything else of the batch, then
            // locked: a concurrent rollback waits for our record of the send.
            let sending: Vec<NewNotification<'_>> = planned
                .iter()
                .filter_map(|p| match p.status {
                    Some(s @ NotificationStatus::Sending) => Some(p.record(s)),
                    _ => None,
                })
                .collect();
            let mut to_lock = if sending.is_empty() {
                Vec::new()
            } else {
                db::claim_sending(&self.pool, &sending).await?
            };
            drop(sending);
            to_lock.extend(
                planned
                    .iter()
                    .filter(|p| p.status.is_none())
                    .map(|p| p.env.order_id),
            );
            if !to_lock.is_empty() {
                claimed.extend(db::lock_sending(uow.conn(), &to_lock).await?);
            }
        }
        // Claim the other records in the batch's transaction: it serialises
        // us against a concurrent rollback, which then sees the email.
        let records: Vec<NewNotification<'_>> = planned
            .iter()
            .filter_map(|p| match p.status {
                Some(NotificationStatus::Sending) | None => None,
                Some(s) => Some(p.record(s)),
            })
            .collect();
        if !records.is_empty() {
            claimed.extend(db::insert_notifications(uow.conn(), &records).await?);
        }
        drop(records);

        let mut sent_emails: Vec<Email> = Vec::new();
        let mut queued: Vec<Email> = Vec::new();
        // Once the relay is found down, the rest of the batch is queued
        // without trying it again (each try may take its whole timeout).
        let mut relay_down = false;
        let mut refused: Vec<Uuid> = Vec::new();
        let mut events = Vec::new();
        for p in planned {
            if !claimed.contains(&p.env.order_id) {
                late += 1;
                continue;
            }
            let email = domain::confirmation(
                p.env.order_id,
                &p.recipient,
                &p.reserved.items,
                p.reserved.amount_cents,
                &p.reserved.currency,
            );
            let sent = if relay_down && p.precheck.is_ok() {
                Err(SendError::Unavailable(
                    "the relay was down earlier in this batch".into(),
                ))
            } else if p.precheck.is_ok() {
                self.transport.send(&email).await
            } else {
                Ok(())
            };
            let outcome = match p.precheck {
                Ok(()) => match sent {
                    Ok(()) => Ok(()),
                    Err(SendError::Rejected(reason)) => {
                        refused.push(p.env.order_id);
                        Err(StepFailed {
                            code: "email_rejected".into(),
                            reason: format!("Email rejected: {reason}"),
                        })
                    }
                    // The relay is down: the email is queued and retried
                    // (crate::queue), the saga goes on past the pivot.
                    Err(SendError::Unavailable(why)) => {
                        relay_down = true;
                        info!(order_id = %p.env.order_id, %why,
                              "mail relay unavailable: the confirmation is queued");
                        let ctx = SagaContext::caused_by(&p.env, SERVICE);
                        events.push(ctx.event(
                            EventType::NotificationDeferred,
                            &NotificationSent {
                                email_id: email.id,
                                kind: email.kind.as_str().to_owned(),
                            },
                        ));
                        queued.push(email);
                        continue;
                    }
                },
                Err(f) => Err(f),
            };
            let ctx = SagaContext::caused_by(&p.env, SERVICE);
            match outcome {
                Ok(()) => {
                    events.push(ctx.event(
                        EventType::NotificationSent,
                        &NotificationSent {
                            email_id: email.id,
                            kind: email.kind.as_str().to_owned(),
                        },
                    ));
                    sent_emails.push(email);
                }
                Err(failure) => {
                    info!(order_id = %p.env.order_id, reason = %failure.reason, "confirmation not sent");
                    events.push(ctx.event(EventType::NotificationFailed, &failure));
                }
            }
        }
        if !sent_emails.is_empty() && common::failpoints::is_set("notification::after_send") {
            return Err(HandlerError::transient(
                "failpoint notification::after_send: the batch fails after its emails went out",
            ));
        }
        let bounced = (events.len() - sent_emails.len() - queued.len()) as u64;
        db::defer_emails(uow.conn(), &queued).await?;
        if !events.is_empty() {
            // The emails sent, the ones the relay refused after all, and the
            // events: one statement.
            let refs: Vec<&Email> = sent_emails.iter().collect();
            let delivered: Vec<Uuid> = if external {
                sent_emails.iter().map(|e| e.order_id).collect()
            } else {
                Vec::new()
            };
            let rows = OutboxRows::new(events.iter().map(|e| (Uuid::nil(), e)));
            db::record_confirmations(
                uow.conn(),
                &refs,
                self.transport.name(),
                &delivered,
                &refused,
                rows,
            )
            .await?;
            uow.enqueued(events);
        }
        let sent = sent_emails.len() as u64;
        let queued_n = queued.len() as u64;
        uow.on_commit(move || {
            let key = EventType::InventoryReserved.routing_key();
            inbox::count_duplicates(SERVICE, key, duplicates);
            inbox::count_late(SERVICE, key, late);
            step_outcome(SERVICE, "sent", sent);
            step_outcome(SERVICE, "bounced", bounced);
            step_outcome(SERVICE, "deferred", queued_n);
        });
        Ok(())
    }

    /// Sends a cancellation after a confirmation, or tombstones an order
    /// that got no email yet.
    async fn on_abort(&self, uow: &mut UnitOfWork, env: &Envelope) -> MessageResult {
        let customer_id = env.data_str("customer_id").unwrap_or_default().to_owned();
        let current = if db::insert_notification(
            uow.conn(),
            env.order_id,
            &customer_id,
            None,
            NotificationStatus::Cancelled,
            Some("saga rolled back before any email"),
        )
        .await?
        {
            None
        } else {
            db::lock_notification(uow.conn(), env.order_id).await?
        };
        let order_id = env.order_id;
        match (
            compensation_for(current.as_ref().and_then(db::NotificationRow::status)),
            current,
        ) {
            // Queued, never sent: dropped from the queue; nothing to retract.
            (Compensation::Undo, Some(row))
                if row.status() == Some(NotificationStatus::Deferred) =>
            {
                db::drop_queued_email(uow.conn(), order_id).await?;
                db::set_status(uow.conn(), order_id, NotificationStatus::Cancelled).await?;
                uow.on_commit(move || {
                    step_outcome(SERVICE, "cancelled_before_email", 1);
                    info!(%order_id, "rollback: the queued confirmation is dropped");
                });
            }
            (Compensation::Undo, Some(row)) => {
                let reason = abort_reason(env);
                let recipient = row.recipient.unwrap_or_default();
                let email = domain::cancellation(order_id, &recipient, &reason);
                // A cancellation that cannot be delivered is still recorded
                // as attempted: the saga is already rolled back.
                if let Err(SendError::Unavailable(e)) = self.transport.send(&email).await {
                    return Err(HandlerError::Transient(anyhow::anyhow!(
                        "email relay unavailable: {e}"
                    )));
                }
                db::record_email(uow.conn(), &email, self.transport.name()).await?;
                db::set_status(uow.conn(), order_id, NotificationStatus::Retracted).await?;
                uow.on_commit(move || {
                    step_outcome(SERVICE, "cancellation_sent", 1);
                    info!(%order_id, "cancellation email sent");
                });
            }
            (Compensation::Tombstone, _) => {
                uow.on_commit(move || step_outcome(SERVICE, "cancelled_before_email", 1));
            }
            _ => {}
        }
        Ok(())
    }
}

/// The reason to give the customer: the failure's reason, or the cancellation's.
fn abort_reason(env: &Envelope) -> String {
    if let Some(SagaResult::Failure { reason, .. }) = env
        .data
        .get("result")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
    {
        return reason;
    }
    env.data
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("the order could not be completed")
        .to_owned()
}
