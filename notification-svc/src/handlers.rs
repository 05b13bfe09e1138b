//! Message handlers of notification-svc, one batch at a time.
//!
//! - `inventory.reserved`: email the confirmation → `notification.sent`,
//!   `notification.failed` if the address bounces, or `notification.deferred`
//!   if the mail relay is down (the email is queued: [`crate::queue`]).
//! - `order.failed`, `order.cancelled`: a cancellation follows every
//!   confirmation the relay may have taken; a queued confirmation never
//!   sent is dropped; an order that got no email yet is tombstoned, so a
//!   late `inventory.reserved` sends nothing. A rollback wins over the
//!   confirmation of the same order in its batch, whatever their order.
//!
//! With the default transport the email *is* the row, written in the
//! batch's transaction: exactly-once. With SMTP the email leaves the
//! process: its record is committed as `sending` (and as one the relay may
//! have) before the send, the send holds no lock, and a crash before the
//! outcome is recorded re-sends it on redelivery (at-least-once, as email
//! always is). `relay_may_have_it` outlives every status that follows (a
//! resumed send the relay now refuses, or queues): a rollback that finds it
//! sends the cancellation. Nothing a batch does waits for an external
//! relay more than once: a rollback queues its cancellation, and once a
//! send finds the relay down the batches queue their confirmations without
//! trying it until the queue gets one through.

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
use common::saga::order::SagaResult;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewNotification};
use crate::domain::{self, Email, NotificationStatus};
use crate::queue::RelayHealth;
use crate::transport::{EmailTransport, SendError};

pub struct NotificationHandler {
    pub pool: PgPool,
    pub transport: Arc<dyn EmailTransport>,
    /// Domain of the default address of customers without one on file.
    pub default_email_domain: String,
    /// What batches know of the mail relay (shared with the queued sender).
    pub relay: Arc<RelayHealth>,
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
            rollbacks,
            ..
        } = StepBatch::<InventoryReserved>::sort(SERVICE, batch, EventType::InventoryReserved, &[]);
        // A rollback wins over the confirmation of the same order in the
        // same batch, whatever their order: no email goes out for it.
        let aborting: HashSet<Uuid> = rollbacks.iter().map(|(_, e)| e.order_id).collect();
        let mut late = 0u64;
        let confirmations: Vec<(Envelope, InventoryReserved)> = forward
            .into_iter()
            .filter_map(|(_, env, r)| {
                if aborting.contains(&env.order_id) {
                    late += 1;
                    None
                } else {
                    Some((env, r))
                }
            })
            .collect();
        uow.on_commit(move || {
            inbox::count_late(SERVICE, EventType::InventoryReserved.routing_key(), late);
        });
        if !confirmations.is_empty() {
            // The rollbacks' records are locked together with the
            // confirmations' records, in one sorted statement: one global
            // order for the batch.
            let mut rolled_back: Vec<Uuid> = aborting.iter().copied().collect();
            rolled_back.sort_unstable();
            self.confirm(uow, confirmations, &rolled_back).await?;
        }
        if !rollbacks.is_empty() {
            self.roll_back(uow, &rollbacks, &mut results).await?;
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
    /// The precheck failed because the saga's deadline had passed.
    expired: bool,
    /// Resumed from a `sending` record: an earlier attempt may have gone
    /// out (a crash before its outcome was recorded).
    resumed: bool,
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
            relay_may_have_it: status == NotificationStatus::Sending,
        }
    }

    fn email(&self) -> Email {
        domain::confirmation(
            self.env.order_id,
            &self.recipient,
            &self.reserved.items,
            self.reserved.amount_cents,
            &self.reserved.currency,
        )
    }
}

impl NotificationHandler {
    /// Sends the confirmation of every new order of the batch.
    ///
    /// With a transport that only records emails, the email *is* the row,
    /// written in the batch's transaction: exactly-once. With an external
    /// relay (SMTP) each email is first claimed as `sending` in a
    /// transaction of its own, committed before the send — from then on the
    /// relay may have it, and a rollback sends a cancellation whatever
    /// follows — and the sends happen with no lock held: only then does the
    /// batch lock its records (in one global order) and record what the
    /// relay said of each, for those still `sending` (a rollback may have
    /// retracted one meanwhile). A crash in between leaves `sending`, which
    /// a redelivery resumes (sends again: at-least-once, as email always
    /// is).
    async fn confirm(
        &self,
        uow: &mut UnitOfWork,
        requests: Vec<(Envelope, InventoryReserved)>,
        also_lock: &[Uuid],
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
            planned.push(Planned {
                env,
                reserved,
                recipient,
                precheck,
                expired,
                resumed: is_resumed,
            });
        }
        drop(existing);
        let mut tally = Tally {
            duplicates,
            late,
            ..Tally::default()
        };
        if self.transport.is_external() {
            self.confirm_through_relay(uow, planned, also_lock, &mut tally)
                .await?;
        } else {
            self.confirm_recorded(uow, planned, &mut tally).await?;
        }
        uow.on_commit(move || tally.record());
        Ok(())
    }

    /// Confirmations with a transport that only records them (and logs).
    async fn confirm_recorded(
        &self,
        uow: &mut UnitOfWork,
        planned: Vec<Planned>,
        tally: &mut Tally,
    ) -> Result<(), HandlerError> {
        let records: Vec<NewNotification<'_>> = planned
            .iter()
            .map(|p| {
                p.record(match &p.precheck {
                    Ok(()) => NotificationStatus::Sent,
                    Err(_) if p.expired => NotificationStatus::Expired,
                    Err(_) => NotificationStatus::Bounced,
                })
            })
            .collect();
        // Claimed in the batch's transaction: a concurrent rollback waits for
        // it, and then sees the email.
        let claimed: HashSet<Uuid> = if records.is_empty() {
            HashSet::new()
        } else {
            db::insert_notifications(uow.conn(), &records)
                .await?
                .into_iter()
                .collect()
        };
        drop(records);
        let mut sent_emails = Vec::new();
        let mut events = Vec::new();
        for p in planned {
            if !claimed.contains(&p.env.order_id) {
                tally.late += 1;
                continue;
            }
            let ctx = SagaContext::caused_by(&p.env, SERVICE);
            match &p.precheck {
                Ok(()) => {
                    let email = p.email();
                    // Never fails: it only logs.
                    let _ = self.transport.send(&email).await;
                    events.push(sent_event(&ctx, &email));
                    sent_emails.push(email);
                }
                Err(failure) => {
                    info!(order_id = %p.env.order_id, reason = %failure.reason, "confirmation not sent");
                    tally.bounced += 1;
                    events.push(ctx.event(EventType::NotificationFailed, failure));
                }
            }
        }
        tally.sent += sent_emails.len() as u64;
        self.record(uow, &sent_emails, &[], &[], &[], events).await
    }

    /// Confirmations through an external relay (see [`Self::confirm`]).
    async fn confirm_through_relay(
        &self,
        uow: &mut UnitOfWork,
        planned: Vec<Planned>,
        also_lock: &[Uuid],
        tally: &mut Tally,
    ) -> Result<(), HandlerError> {
        // Known down: nothing is tried (each try may take its whole
        // timeout); the confirmations are queued until the queue gets an
        // email through.
        let relay_down = self.relay.is_down();
        let mut to_claim = Vec::new();
        // New records written with the batch: refused by the precheck, or
        // queued untried (the relay cannot have them).
        let mut record_now: Vec<(Planned, NotificationStatus)> = Vec::new();
        let mut outcomes: Vec<(Planned, Option<Result<(), SendError>>)> = Vec::new();
        for p in planned {
            match (p.resumed, p.precheck.is_ok()) {
                (false, true) if relay_down => record_now.push((p, NotificationStatus::Deferred)),
                (false, true) => to_claim.push(p),
                (false, false) => {
                    let status = if p.expired {
                        NotificationStatus::Expired
                    } else {
                        NotificationStatus::Bounced
                    };
                    record_now.push((p, status));
                }
                // Resumed: its record is `sending` already.
                (true, true) if relay_down => outcomes.push((p, Some(Err(relay_was_down())))),
                (true, true) => to_claim.push(p),
                // Expired meanwhile: not sent again; the record stays
                // `sending` (the first attempt may have gone out).
                (true, false) => outcomes.push((p, None)),
            }
        }

        // Claimed and committed before any send: the relay may have them
        // from then on.
        let fresh: Vec<NewNotification<'_>> = to_claim
            .iter()
            .filter(|p| !p.resumed)
            .map(|p| p.record(NotificationStatus::Sending))
            .collect();
        let claimed: HashSet<Uuid> = if fresh.is_empty() {
            HashSet::new()
        } else {
            db::claim_sending(&self.pool, &fresh)
                .await?
                .into_iter()
                .collect()
        };
        drop(fresh);

        // The sends, with no lock held. Once the relay is found down, the
        // rest is queued without trying it. Each is looked at afresh just
        // before its send: one a rollback retracted meanwhile is not sent
        // (the rollback's cancellation waits a send's length, see
        // `roll_back`, so a send begun before it never lands after it).
        let mut found_down = false;
        // Claimed now and never taken by the relay: not possibly delivered.
        let mut untried: Vec<Uuid> = Vec::new();
        for p in to_claim {
            if !p.resumed && !claimed.contains(&p.env.order_id) {
                tally.late += 1;
                continue;
            }
            if !db::still_sending(uow.conn(), p.env.order_id).await? {
                tally.late += 1;
                continue;
            }
            let sent = if found_down {
                if !p.resumed {
                    untried.push(p.env.order_id);
                }
                Err(relay_was_down())
            } else {
                let sent = self.transport.send(&p.email()).await;
                if matches!(
                    sent,
                    Err(SendError::Unavailable(_) | SendError::Uncertain(_))
                ) {
                    self.relay.mark_down();
                    found_down = true;
                }
                if !p.resumed && matches!(sent, Err(SendError::Unavailable(_))) {
                    untried.push(p.env.order_id);
                }
                sent
            };
            outcomes.push((p, Some(sent)));
        }
        if common::failpoints::is_set("notification::after_send") {
            return Err(HandlerError::transient(
                "failpoint notification::after_send: the batch fails after its emails went out",
            ));
        }

        // Now the records, in one global order: the existing ones locked
        // (only those still `sending` take the outcome: a rollback may have
        // retracted one meanwhile), then the new ones inserted.
        let mut ids: Vec<Uuid> = outcomes.iter().map(|(p, _)| p.env.order_id).collect();
        ids.extend(also_lock);
        ids.sort_unstable();
        ids.dedup();
        let locked = db::lock_notifications(uow.conn(), &ids).await?;
        let new_records: Vec<NewNotification<'_>> = record_now
            .iter()
            .map(|(p, status)| p.record(*status))
            .collect();
        let recorded: HashSet<Uuid> = if new_records.is_empty() {
            HashSet::new()
        } else {
            db::insert_notifications(uow.conn(), &new_records)
                .await?
                .into_iter()
                .collect()
        };
        drop(new_records);
        for (p, status) in record_now {
            if !recorded.contains(&p.env.order_id) {
                // A rollback got there first.
                tally.late += 1;
            } else if status == NotificationStatus::Deferred {
                outcomes.push((p, Some(Err(relay_was_down()))));
            } else {
                outcomes.push((p, None));
            }
        }
        let still_sending = |id: &Uuid| {
            locked
                .get(id)
                .is_some_and(|r| r.status() == Some(NotificationStatus::Sending))
        };
        let (mut sent_emails, mut delivered, mut refused, mut refused_for_sure) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut queued, mut uncertain) = (Vec::new(), Vec::new());
        let mut events = Vec::new();
        for (p, outcome) in outcomes {
            let id = p.env.order_id;
            let ctx = SagaContext::caused_by(&p.env, SERVICE);
            // Recorded with the batch (new), or found `sending` (tried now).
            let ours = recorded.contains(&id) || still_sending(&id);
            match outcome {
                // Not sent: the precheck failed (its record says why).
                None => {
                    if let Err(failure) = &p.precheck
                        && ours
                    {
                        info!(order_id = %id, reason = %failure.reason, "confirmation not sent");
                        tally.bounced += 1;
                        events.push(ctx.event(EventType::NotificationFailed, failure));
                    }
                }
                Some(Ok(())) => {
                    let email = p.email();
                    if ours {
                        events.push(sent_event(&ctx, &email));
                        delivered.push(id);
                    } else {
                        tally.late += 1;
                    }
                    // What the relay took is recorded, whatever happened since.
                    sent_emails.push(email);
                }
                Some(Err(_)) if !ours => tally.late += 1,
                Some(Err(SendError::Rejected(reason))) => {
                    refused.push(id);
                    if !p.resumed {
                        refused_for_sure.push(id);
                    }
                    tally.bounced += 1;
                    events.push(ctx.event(
                        EventType::NotificationFailed,
                        &StepFailed {
                            code: "email_rejected".into(),
                            reason: format!("Email rejected: {reason}"),
                        },
                    ));
                }
                // The relay is down: the email is queued and retried
                // (crate::queue), the saga goes on past the pivot.
                Some(Err(e)) => {
                    info!(order_id = %id, why = %e,
                          "mail relay unavailable: the confirmation is queued");
                    if e.may_have_delivered() {
                        uncertain.push(id);
                    }
                    let email = p.email();
                    events.push(ctx.event(
                        EventType::NotificationDeferred,
                        &NotificationSent {
                            email_id: email.id,
                            kind: email.kind.as_str().to_owned(),
                        },
                    ));
                    queued.push(email);
                }
            }
        }
        tally.sent += delivered.len() as u64;
        tally.deferred += queued.len() as u64;
        db::defer_emails(uow.conn(), &queued, &uncertain, &untried).await?;
        self.record(
            uow,
            &sent_emails,
            &delivered,
            &refused,
            &refused_for_sure,
            events,
        )
        .await
    }

    /// Records the emails sent, the notifications sent or refused, and the
    /// batch's events: one statement.
    async fn record(
        &self,
        uow: &mut UnitOfWork,
        sent_emails: &[Email],
        delivered: &[Uuid],
        refused: &[Uuid],
        refused_for_sure: &[Uuid],
        events: Vec<common::messaging::outbox::OutboxMessage>,
    ) -> Result<(), HandlerError> {
        if events.is_empty() && sent_emails.is_empty() {
            return Ok(());
        }
        let refs: Vec<&Email> = sent_emails.iter().collect();
        let rows = OutboxRows::new(events.iter().map(|e| (Uuid::nil(), e)));
        db::record_confirmations(
            uow.conn(),
            &refs,
            self.transport.name(),
            delivered,
            refused,
            refused_for_sure,
            rows,
        )
        .await?;
        uow.enqueued(events);
        Ok(())
    }

    /// Rolls back the notifications of the batch's failed orders, on their
    /// records locked in one global order: a cancellation follows every
    /// confirmation the relay may have taken (sent, being sent, or tried
    /// with an outcome not known for sure), a queued confirmation never
    /// sent is dropped, and an order that got no email yet is tombstoned so
    /// a late `inventory.reserved` sends nothing. No call to an external
    /// relay here: its cancellations are queued (see [`crate::queue`]).
    async fn roll_back(
        &self,
        uow: &mut UnitOfWork,
        aborts: &[(usize, Envelope)],
        results: &mut [MessageResult],
    ) -> Result<(), HandlerError> {
        let mut ids: Vec<Uuid> = aborts.iter().map(|(_, e)| e.order_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let locked = db::lock_notifications(uow.conn(), &ids).await?;
        let external = self.transport.is_external();
        let mut handled = HashSet::new();
        let mut tombstones: Vec<(usize, Uuid, String)> = Vec::new();
        let mut statuses: Vec<(Uuid, NotificationStatus)> = Vec::new();
        let mut drop_queued: Vec<Uuid> = Vec::new();
        let mut cancellations: Vec<(Email, std::time::Duration)> = Vec::new();
        let (mut dropped, mut cancelled) = (0u64, Vec::new());
        for (i, env) in aborts {
            let order_id = env.order_id;
            if !handled.insert(order_id) {
                continue;
            }
            let Some(row) = locked.get(&order_id) else {
                let customer = env.data_str("customer_id").unwrap_or_default().to_owned();
                tombstones.push((*i, order_id, customer));
                continue;
            };
            let status = row.status();
            let queued = status == Some(NotificationStatus::Deferred);
            let retract = !matches!(
                status,
                Some(NotificationStatus::Retracted | NotificationStatus::Cancelled)
            ) && (row.relay_may_have_it
                || matches!(
                    status,
                    Some(NotificationStatus::Sent | NotificationStatus::Sending)
                ));
            if queued {
                drop_queued.push(order_id);
            }
            if retract {
                let reason = abort_reason(env);
                let recipient = row.recipient.clone().unwrap_or_default();
                // A batch may be handing its confirmation to the relay right
                // now: the cancellation waits as long as that send can last.
                let after = if status == Some(NotificationStatus::Sending) {
                    crate::transport::SEND_TIMEOUT + std::time::Duration::from_secs(1)
                } else {
                    std::time::Duration::ZERO
                };
                cancellations.push((domain::cancellation(order_id, &recipient, &reason), after));
                statuses.push((order_id, NotificationStatus::Retracted));
                cancelled.push(order_id);
            } else if queued {
                // Queued, never sent: dropped; nothing to retract.
                statuses.push((order_id, NotificationStatus::Cancelled));
                dropped += 1;
            }
        }
        let tombstoned = if tombstones.is_empty() {
            HashSet::new()
        } else {
            let records: Vec<NewNotification<'_>> = tombstones
                .iter()
                .map(|(_, order_id, customer)| NewNotification {
                    order_id: *order_id,
                    customer_id: customer,
                    recipient: None,
                    status: NotificationStatus::Cancelled,
                    reason: Some("saga rolled back before any email"),
                    relay_may_have_it: false,
                })
                .collect();
            db::insert_notifications(uow.conn(), &records)
                .await?
                .into_iter()
                .collect::<HashSet<Uuid>>()
        };
        for (i, order_id, _) in &tombstones {
            if !tombstoned.contains(order_id) {
                // A confirmation claimed its record since we looked: look
                // again, on its own, shortly.
                results[*i] = Err(HandlerError::transient(format!(
                    "the notification of order {order_id} appeared while rolling it back; retrying"
                )));
            }
        }
        if !statuses.is_empty() || !drop_queued.is_empty() {
            let refs: Vec<(&Email, std::time::Duration)> =
                cancellations.iter().map(|(e, after)| (e, *after)).collect();
            let just_emails: Vec<&Email> = cancellations.iter().map(|(e, _)| e).collect();
            let (queue, sent): (&[(&Email, std::time::Duration)], &[&Email]) = if external {
                (&refs, &[])
            } else {
                for email in &just_emails {
                    // Never fails: it only logs.
                    let _ = self.transport.send(email).await;
                }
                (&[], &just_emails)
            };
            db::roll_back(
                uow.conn(),
                &db::Rollbacks {
                    statuses: &statuses,
                    drop_queued: &drop_queued,
                    queue,
                    sent,
                    transport: self.transport.name(),
                },
            )
            .await?;
        }
        let relay = self.relay.clone();
        let (n_tombstoned, queued) = (tombstoned.len() as u64, external && !cancelled.is_empty());
        uow.on_commit(move || {
            step_outcome(SERVICE, "cancelled_before_email", n_tombstoned + dropped);
            if queued {
                step_outcome(SERVICE, "cancellation_queued", cancelled.len() as u64);
                relay.wake_queue();
            } else {
                step_outcome(SERVICE, "cancellation_sent", cancelled.len() as u64);
            }
            for order_id in cancelled {
                info!(%order_id, "rollback: a cancellation follows the confirmation");
            }
        });
        Ok(())
    }
}

/// What a batch of confirmations did, for the metrics once committed.
#[derive(Default)]
struct Tally {
    duplicates: u64,
    late: u64,
    sent: u64,
    bounced: u64,
    deferred: u64,
}

impl Tally {
    fn record(self) {
        let key = EventType::InventoryReserved.routing_key();
        inbox::count_duplicates(SERVICE, key, self.duplicates);
        inbox::count_late(SERVICE, key, self.late);
        step_outcome(SERVICE, "sent", self.sent);
        step_outcome(SERVICE, "bounced", self.bounced);
        step_outcome(SERVICE, "deferred", self.deferred);
    }
}

/// Why a confirmation was queued untried.
fn relay_was_down() -> SendError {
    SendError::Unavailable("the mail relay was found down".into())
}

/// `notification.sent` for a confirmation.
fn sent_event(ctx: &SagaContext, email: &Email) -> common::messaging::outbox::OutboxMessage {
    ctx.event(
        EventType::NotificationSent,
        &NotificationSent {
            email_id: email.id,
            kind: email.kind.as_str().to_owned(),
        },
    )
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
