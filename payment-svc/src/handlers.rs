//! Message handlers of payment-svc, one batch at a time.
//!
//! - `order.created`: charge, or decline → `payment.completed` /
//!   `payment.failed`. The whole batch is charged with a handful of
//!   set-based statements: open missing accounts, lock the batch's accounts
//!   in one global order, record every payment, debit every account.
//! - `order.failed`, `order.cancelled`: refund a charge (`payment.refunded`),
//!   or leave a tombstone so that a late `order.created` is never applied.
//!
//! Duplicates are recognised by the natural key: one payment record per
//! order, ever.

use std::collections::HashSet;

use chrono::{Datelike as _, Utc};
use common::messaging::delivery::Incoming;
use common::messaging::envelope::{Envelope, SagaContext};
use common::messaging::events::{
    EventType, OrderCreated, PaymentActionRequired, PaymentCompleted, PaymentRefunded, StepFailed,
};
use common::messaging::handler::{HandlerError, MessageHandler, MessageResult, StepBatch};
use common::messaging::inbox;
use common::messaging::outbox::{OutboxMessage, OutboxRows};
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::card::{CardBinding, CardError, CardOpener};
use common::saga::compensation::{Compensation, compensation_for};
use sqlx::PgPool;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewPayment, PendingCompletion};
use crate::domain::{self, Approval, PaymentStatus};

pub struct PaymentHandler {
    pub pool: PgPool,
    pub opener: CardOpener,
    /// Balance of a customer the ledger has not seen before.
    pub default_balance_cents: i64,
}

/// An `order.created` of the batch, decoded.
struct ChargeRequest {
    env: Envelope,
    order: OrderCreated,
}

impl MessageHandler for PaymentHandler {
    fn compensation(&self, routing_key: &str) -> Option<&'static str> {
        common::messaging::handler::compensation_on_rollback(routing_key, "refund")
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
        } = StepBatch::<OrderCreated>::sort(SERVICE, batch, EventType::OrderCreated, &[]);
        if !forward.is_empty() || !rollbacks.is_empty() {
            self.apply(uow, forward, rollbacks, &mut results).await?;
        }
        Ok(results)
    }
}

/// What the gateway and the ledger say about one charge.
type Verdict = Result<Approval, StepFailed>;

/// What a rollback does to an order's payment, decided under its lock.
enum Undo {
    /// Nothing recorded yet: a tombstone, so a late `order.created` is
    /// never charged.
    Tombstone(usize),
    /// Charged: refunded (its account credited).
    Refund(usize),
    /// Waiting for its 3-D Secure confirmation: voided (nothing charged).
    Void(usize),
}

impl PaymentHandler {
    /// The gateway's verdict on a card, before any money moves.
    fn screen(&self, req: &ChargeRequest) -> Verdict {
        if Utc::now() >= req.env.deadline_at {
            return Err(domain::decline(
                "deadline_exceeded",
                "Saga deadline passed before the payment",
            ));
        }
        if req.order.amount_cents <= 0 {
            return Err(domain::decline(
                "invalid_amount",
                "The amount to charge must be positive",
            ));
        }
        let binding = CardBinding {
            order_id: req.env.order_id,
            amount_cents: req.order.amount_cents,
        };
        match self.opener.open(&req.order.payment, binding) {
            Ok(card) => {
                let today = Utc::now();
                domain::screen_card(&card, (today.year(), today.month()))
                    .map(|()| domain::approval(&card))
            }
            Err(CardError::WrongOrder) => {
                warn!(order_id = %req.env.order_id, "sealed card bound to another order or amount refused");
                Err(domain::decline(
                    "card_not_for_this_order",
                    "Card data was sealed for another order",
                ))
            }
            Err(e) => {
                error!(error = %e, "cannot open the sealed card: check CARD_SEAL_SECRET_KEY");
                Err(domain::decline(
                    "card_unreadable",
                    "Card data could not be read",
                ))
            }
        }
    }

    /// Charges every new order of the batch and rolls back the orders the
    /// batch fails, with a handful of set-based statements whatever its
    /// size. A rollback wins over the charge of the same order in the same
    /// batch, whatever their order: that order is never charged.
    ///
    /// Locks are taken in one global order, the one [`crate::gateway`]
    /// takes too: the payment rows to roll back (sorted), then every
    /// account the batch debits or credits (sorted), then the new payment
    /// records (sorted) — so concurrent batches cannot deadlock.
    async fn apply(
        &self,
        uow: &mut UnitOfWork,
        forward: Vec<(usize, Envelope, OrderCreated)>,
        aborts: Vec<(usize, Envelope)>,
        results: &mut [MessageResult],
    ) -> Result<(), HandlerError> {
        let aborting: HashSet<Uuid> = aborts.iter().map(|(_, e)| e.order_id).collect();
        let (mut duplicates, mut late) = (0u64, 0u64);
        let mut requests = Vec::with_capacity(forward.len());
        for (_, env, order) in forward {
            if aborting.contains(&env.order_id) {
                late += 1;
            } else {
                requests.push(ChargeRequest { env, order });
            }
        }
        // The gateway first: no money moves for a declined card.
        let screened: Vec<Verdict> = requests.iter().map(|r| self.screen(r)).collect();
        let mut order_ids: Vec<Uuid> = requests.iter().map(|r| r.env.order_id).collect();
        let mut undoing: Vec<Uuid> = aborting.iter().copied().collect();
        undoing.sort_unstable();
        order_ids.extend(&undoing);
        order_ids.sort_unstable();
        order_ids.dedup();
        let mut customers: Vec<&str> = requests
            .iter()
            .zip(&screened)
            .filter(|(_, v)| v.is_ok())
            .map(|(r, _)| r.order.customer_id.as_str())
            .collect();
        customers.sort_unstable();
        customers.dedup();
        let mut state = db::batch_state(
            uow.conn(),
            &order_ids,
            &customers,
            &undoing,
            self.default_balance_cents,
        )
        .await?;

        // An order that already has a record is a duplicate, or late (a
        // rollback got here first and left a tombstone): nothing to do.
        let mut seen = HashSet::new();
        let mut fresh = Vec::with_capacity(requests.len());
        for (req, verdict) in requests.into_iter().zip(screened) {
            match state.existing.get(&req.env.order_id) {
                Some(p) if p.status == PaymentStatus::Cancelled.as_str() => late += 1,
                Some(_) => duplicates += 1,
                None if !seen.insert(req.env.order_id) => duplicates += 1,
                None => fresh.push((req, verdict)),
            }
        }

        // The ledger, in the batch's order, against the locked balances.
        for (req, verdict) in &mut fresh {
            // Declined, or waiting for the customer: no money moves now.
            if *verdict != Ok(Approval::Charge) {
                continue;
            }
            let amount = req.order.amount_cents;
            *verdict = match state.accounts.get_mut(req.order.customer_id.as_str()) {
                _ if amount < 0 => Err(domain::decline("invalid_amount", "Invalid amount")),
                Some((_, true)) | None => Err(domain::decline("account_frozen", "Account frozen")),
                Some((balance, false)) if *balance < amount => Err(domain::insufficient_funds()),
                Some((balance, false)) => {
                    *balance -= amount;
                    Ok(Approval::Charge)
                }
            };
        }

        // The rollbacks, against the locked payment rows.
        let mut undos: Vec<Undo> = Vec::new();
        let mut handled = HashSet::new();
        for (i, env) in &aborts {
            if !handled.insert(env.order_id) {
                continue;
            }
            match state.existing.get(&env.order_id) {
                None => undos.push(Undo::Tombstone(*i)),
                Some(p) => match compensation_for(p.status()) {
                    Compensation::Undo if p.status() == Some(PaymentStatus::ActionRequired) => {
                        undos.push(Undo::Void(*i));
                    }
                    Compensation::Undo => match state.accounts.get(&p.customer_id) {
                        Some((_, false)) => undos.push(Undo::Refund(*i)),
                        // Nothing written for this message: retried with
                        // backoff, then escalated for an operator.
                        _ => {
                            results[*i] = Err(HandlerError::Transient(anyhow::anyhow!(
                                "account {:?} is frozen: the refund of {} cents cannot be credited yet",
                                p.customer_id,
                                p.amount_cents
                            )));
                        }
                    },
                    _ => {}
                },
            }
        }
        let envelope = |i: usize| {
            aborts
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, e)| e)
                .expect("an abort of this batch")
        };

        // New records: the charges and declines, and the tombstones.
        let mut events: Vec<(Uuid, OutboxMessage)> = fresh
            .iter()
            .map(|(req, verdict)| {
                let ctx = SagaContext::caused_by(&req.env, SERVICE);
                let event = match verdict {
                    Ok(Approval::RequiresAction) => action_required_event(req),
                    Ok(Approval::Charge) => {
                        ctx.event(EventType::PaymentCompleted, &completed_of(req))
                    }
                    Err(failure) => ctx.event(EventType::PaymentFailed, failure),
                };
                (req.env.order_id, event)
            })
            .collect();
        let tombstone_customers: Vec<(Uuid, String)> = undos
            .iter()
            .filter_map(|u| match u {
                Undo::Tombstone(i) => {
                    let env = envelope(*i);
                    Some((
                        env.order_id,
                        env.data_str("customer_id").unwrap_or_default().to_owned(),
                    ))
                }
                _ => None,
            })
            .collect();
        let mut records: Vec<NewPayment<'_>> = fresh
            .iter()
            .map(|(r, v)| NewPayment {
                order_id: r.env.order_id,
                customer_id: &r.order.customer_id,
                amount_cents: r.order.amount_cents,
                currency: &r.order.currency,
                status: match v {
                    Ok(Approval::Charge) => PaymentStatus::Charged,
                    Ok(Approval::RequiresAction) => PaymentStatus::ActionRequired,
                    Err(_) => PaymentStatus::Declined,
                },
                decline_code: v.as_ref().err().map(|f| f.code.as_str()),
                reason: v.as_ref().err().map(|f| f.reason.as_str()),
                card_brand: Some(&r.order.payment.brand),
                card_last4: Some(&r.order.payment.last4),
            })
            .chain(
                tombstone_customers
                    .iter()
                    .map(|(order_id, customer_id)| NewPayment {
                        order_id: *order_id,
                        customer_id,
                        amount_cents: 0,
                        currency: crate::CURRENCY,
                        status: PaymentStatus::Cancelled,
                        decline_code: None,
                        reason: Some("saga rolled back before any charge"),
                        card_brand: None,
                        card_last4: None,
                    }),
            )
            .collect();
        // One global order for the new records' keys too.
        records.sort_by_key(|r| r.order_id);
        let inserted: HashSet<Uuid> = if records.is_empty() {
            HashSet::new()
        } else {
            let rows = OutboxRows::new(events.iter().map(|(id, e)| (*id, e)));
            db::record_payments(uow.conn(), &records, rows)
                .await?
                .into_iter()
                .collect()
        };
        drop(records);
        // What a confirmation needs later, for those that wait (rare: one
        // more statement only when the batch has some).
        let awaiting: Vec<(Uuid, chrono::DateTime<Utc>, PendingCompletion)> = fresh
            .iter()
            .filter(|(r, v)| {
                *v == Ok(Approval::RequiresAction) && inserted.contains(&r.env.order_id)
            })
            .map(|(r, _)| (r.env.order_id, long_deadline(r), pending_completion(r)))
            .collect();
        db::await_confirmations(uow.conn(), &awaiting).await?;

        // Refunds and voids of the locked payments: one statement.
        let refunds: Vec<(Uuid, OutboxMessage)> = undos
            .iter()
            .filter_map(|u| match u {
                Undo::Refund(i) => {
                    let env = envelope(*i);
                    let p = &state.existing[&env.order_id];
                    Some((
                        env.order_id,
                        SagaContext::caused_by(env, SERVICE).event(
                            EventType::PaymentRefunded,
                            &PaymentRefunded {
                                customer_id: p.customer_id.clone(),
                                amount_cents: p.amount_cents,
                            },
                        ),
                    ))
                }
                _ => None,
            })
            .collect();
        let voids: Vec<Uuid> = undos
            .iter()
            .filter_map(|u| match u {
                Undo::Void(i) => Some(envelope(*i).order_id),
                _ => None,
            })
            .collect();
        let undone = if refunds.is_empty() && voids.is_empty() {
            db::Undone::default()
        } else {
            let ids: Vec<Uuid> = refunds.iter().map(|(id, _)| *id).collect();
            let rows = OutboxRows::new(refunds.iter().map(|(id, e)| (*id, e)));
            db::undo_payments(uow.conn(), &ids, &voids, rows).await?
        };

        let (mut charged, mut declined, mut raced, mut waiting) = (Vec::new(), 0, 0, 0);
        let mut published = Vec::with_capacity(inserted.len() + undone.refunded.len());
        let mut forward_events = std::mem::take(&mut events).into_iter();
        for ((req, verdict), (_, event)) in fresh.into_iter().zip(forward_events.by_ref()) {
            if !inserted.contains(&req.env.order_id) {
                raced += 1;
                continue;
            }
            match verdict {
                Ok(Approval::Charge) => charged.push((req.env.order_id, req.order.amount_cents)),
                Ok(Approval::RequiresAction) => {
                    waiting += 1;
                    info!(order_id = %req.env.order_id, "3-D Secure confirmation required");
                }
                Err(failure) => {
                    declined += 1;
                    info!(order_id = %req.env.order_id, code = %failure.code, "declined");
                }
            }
            published.push(event);
        }
        let mut tombstoned = 0u64;
        for undo in &undos {
            if let Undo::Tombstone(i) = undo {
                let order_id = envelope(*i).order_id;
                if inserted.contains(&order_id) {
                    tombstoned += 1;
                } else {
                    // A payment appeared since we looked (a concurrent
                    // batch): look again, on its own, shortly.
                    results[*i] = Err(HandlerError::transient(format!(
                        "the payment of order {order_id} appeared while rolling it back; retrying"
                    )));
                }
            }
        }
        let refunded: Vec<(Uuid, i64)> = refunds
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| undone.refunded.contains(id))
            .map(|id| (id, state.existing[&id].amount_cents))
            .collect();
        published.extend(
            refunds
                .into_iter()
                .filter(|(id, _)| undone.refunded.contains(id))
                .map(|(_, e)| e),
        );
        let voided = undone.voided.len() as u64;
        uow.enqueued(published);
        uow.on_commit(move || {
            let key = EventType::OrderCreated.routing_key();
            inbox::count_duplicates(SERVICE, key, duplicates);
            inbox::count_late(SERVICE, key, late + raced);
            step_outcome(SERVICE, "charged", charged.len() as u64);
            step_outcome(SERVICE, "declined", declined);
            step_outcome(SERVICE, "action_required", waiting);
            step_outcome(SERVICE, "refunded", refunded.len() as u64);
            step_outcome(SERVICE, "voided", voided);
            step_outcome(SERVICE, "cancelled_before_charge", tombstoned);
            for (order_id, amount_cents) in charged {
                info!(%order_id, amount_cents, "charged");
            }
            for (order_id, amount_cents) in refunded {
                info!(%order_id, amount_cents, "refunded");
            }
        });
        Ok(())
    }
}

/// The saga's long deadline: the confirmation is accepted until then.
fn long_deadline(req: &ChargeRequest) -> chrono::DateTime<Utc> {
    req.order
        .long_deadline_at
        .map_or(req.env.deadline_at, |long| long.max(req.env.deadline_at))
}

/// `payment.action_required`, stamped with the long deadline: the saga
/// goes on under it.
fn action_required_event(req: &ChargeRequest) -> OutboxMessage {
    let mut ctx = SagaContext::caused_by(&req.env, SERVICE);
    ctx.deadline_at = long_deadline(req);
    ctx.event(
        EventType::PaymentActionRequired,
        &PaymentActionRequired {
            customer_id: req.order.customer_id.clone(),
            items: req.order.items.clone(),
            amount_cents: req.order.amount_cents,
            currency: req.order.currency.clone(),
            card_last4: req.order.payment.last4.clone(),
            action: "3ds_confirmation".to_owned(),
        },
    )
}

/// What `payment.completed` carries once the customer confirms: the
/// saga's context (the trail through `order.created`) and the payload.
fn pending_completion(req: &ChargeRequest) -> PendingCompletion {
    let ctx = SagaContext::caused_by(&req.env, SERVICE);
    // The ordinary deadline is what the rest of the saga needs after it.
    let rest = (req.env.deadline_at - req.env.occurred_at).max(chrono::TimeDelta::zero());
    PendingCompletion {
        confirm_by: Some(long_deadline(req) - rest),
        causation_id: ctx.causation_id,
        trail: ctx.trail,
        data: completed_of(req),
    }
}

/// What `payment.completed` carries for a charged order.
fn completed_of(req: &ChargeRequest) -> PaymentCompleted {
    PaymentCompleted {
        customer_id: req.order.customer_id.clone(),
        items: req.order.items.clone(),
        amount_cents: req.order.amount_cents,
        currency: req.order.currency.clone(),
        card_last4: req.order.payment.last4.clone(),
        long_deadline_at: req.order.long_deadline_at,
    }
}
