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
use crate::db::{self, NewPayment, PendingCompletion, Posting};
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
            rollbacks: aborts,
            ..
        } = StepBatch::<OrderCreated>::sort(SERVICE, batch, EventType::OrderCreated, &[]);
        let charges: Vec<ChargeRequest> = forward
            .into_iter()
            .map(|(_, env, order)| ChargeRequest { env, order })
            .collect();
        if !charges.is_empty() {
            self.charge(uow, charges).await?;
        }
        for (i, env) in aborts {
            results[i] = self.on_abort(uow, &env).await;
        }
        Ok(results)
    }
}

/// What the gateway and the ledger say about one charge.
type Verdict = Result<Approval, StepFailed>;

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

    /// Charges every new order of the batch: one statement reads what the
    /// batch starts from, one writes every payment, debit and event.
    async fn charge(
        &self,
        uow: &mut UnitOfWork,
        requests: Vec<ChargeRequest>,
    ) -> Result<(), HandlerError> {
        // The gateway first: no money moves for a declined card.
        let screened: Vec<Verdict> = requests.iter().map(|r| self.screen(r)).collect();
        let order_ids: Vec<Uuid> = requests.iter().map(|r| r.env.order_id).collect();
        let mut customers: Vec<&str> = requests
            .iter()
            .zip(&screened)
            .filter(|(_, v)| v.is_ok())
            .map(|(r, _)| r.order.customer_id.as_str())
            .collect();
        customers.sort_unstable();
        customers.dedup();
        let mut state = db::charge_state(
            uow.conn(),
            &order_ids,
            &customers,
            self.default_balance_cents,
        )
        .await?;

        // An order that already has a record is a duplicate, or late (a
        // rollback got here first and left a tombstone): nothing to do.
        let mut seen = HashSet::new();
        let (mut duplicates, mut late) = (0, 0);
        let mut fresh = Vec::with_capacity(requests.len());
        for (req, verdict) in requests.into_iter().zip(screened) {
            match state.existing.get(&req.env.order_id) {
                Some(status) if status == PaymentStatus::Cancelled.as_str() => late += 1,
                Some(_) => duplicates += 1,
                None if !seen.insert(req.env.order_id) => duplicates += 1,
                None => fresh.push((req, verdict)),
            }
        }
        uow.on_commit(move || {
            inbox::count_duplicates(SERVICE, EventType::OrderCreated.routing_key(), duplicates);
            inbox::count_late(SERVICE, EventType::OrderCreated.routing_key(), late);
        });
        if fresh.is_empty() {
            return Ok(());
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

        let events: Vec<OutboxMessage> = fresh
            .iter()
            .map(|(req, verdict)| {
                let ctx = SagaContext::caused_by(&req.env, SERVICE);
                match verdict {
                    Ok(Approval::RequiresAction) => action_required_event(req),
                    Ok(Approval::Charge) => {
                        ctx.event(EventType::PaymentCompleted, &completed_of(req))
                    }
                    Err(failure) => ctx.event(EventType::PaymentFailed, failure),
                }
            })
            .collect();
        let records: Vec<NewPayment<'_>> = fresh
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
            .collect();
        let rows = OutboxRows::new(fresh.iter().map(|(r, _)| r.env.order_id).zip(&events));
        // An order that got no record met a tombstone written since we
        // looked: it is late; its debit and event were left out with it (its
        // amount still counted above, which can only make a later order of
        // the same customer in this batch decline, never overdraw).
        let inserted: HashSet<Uuid> = db::record_charges(uow.conn(), &records, rows)
            .await?
            .into_iter()
            .collect();
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

        let (mut charged, mut declined, mut raced) = (Vec::new(), 0, 0);
        let mut waiting = 0;
        let mut published = Vec::with_capacity(inserted.len());
        for ((req, verdict), event) in fresh.into_iter().zip(events) {
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
        uow.enqueued(published);
        uow.on_commit(move || {
            step_outcome(SERVICE, "charged", charged.len() as u64);
            step_outcome(SERVICE, "declined", declined);
            step_outcome(SERVICE, "action_required", waiting);
            inbox::count_late(SERVICE, EventType::OrderCreated.routing_key(), raced);
            for (order_id, amount_cents) in charged {
                info!(%order_id, amount_cents, "charged");
            }
        });
        Ok(())
    }

    /// Refunds a charge, or tombstones an order not charged yet.
    async fn on_abort(&self, uow: &mut UnitOfWork, env: &Envelope) -> MessageResult {
        let customer_id = env.data_str("customer_id").unwrap_or_default().to_owned();
        let tombstone = NewPayment {
            order_id: env.order_id,
            customer_id: &customer_id,
            amount_cents: 0,
            currency: crate::CURRENCY,
            status: PaymentStatus::Cancelled,
            decline_code: None,
            reason: Some("saga rolled back before any charge"),
            card_brand: None,
            card_last4: None,
        };
        // Insert-or-lock: either the tombstone goes in (nothing was charged)
        // or the existing record is locked against a concurrent charge.
        let current = if db::insert_payment(uow.conn(), &tombstone).await? {
            None
        } else {
            db::lock_payment(uow.conn(), env.order_id).await?
        };
        let current_status = current.as_ref().and_then(db::PaymentRow::status);
        let order_id = env.order_id;
        match (compensation_for(current_status), current) {
            // Waiting for a confirmation: nothing was charged; the
            // authorisation is voided and a late confirmation refused.
            (Compensation::Undo, Some(_))
                if current_status == Some(PaymentStatus::ActionRequired) =>
            {
                db::void(uow.conn(), order_id).await?;
                uow.on_commit(move || {
                    step_outcome(SERVICE, "voided", 1);
                    info!(%order_id, "authorisation voided: the saga was rolled back");
                });
            }
            (Compensation::Undo, Some(payment)) => {
                if db::credit(uow.conn(), &payment.customer_id, payment.amount_cents).await?
                    != Posting::Done
                {
                    // Nothing written for this message: retried with
                    // backoff, then escalated for an operator.
                    return Err(HandlerError::Transient(anyhow::anyhow!(
                        "account {:?} is frozen: the refund of {} cents cannot be credited yet",
                        payment.customer_id,
                        payment.amount_cents
                    )));
                }
                db::set_status(uow.conn(), order_id, PaymentStatus::Refunded).await?;
                let ctx = SagaContext::caused_by(env, SERVICE);
                uow.emit(ctx.event(
                    EventType::PaymentRefunded,
                    &PaymentRefunded {
                        customer_id: payment.customer_id.clone(),
                        amount_cents: payment.amount_cents,
                    },
                ));
                let amount_cents = payment.amount_cents;
                uow.on_commit(move || {
                    step_outcome(SERVICE, "refunded", 1);
                    info!(%order_id, amount_cents, "refunded");
                });
            }
            (Compensation::Tombstone, _) => {
                uow.on_commit(move || {
                    step_outcome(SERVICE, "cancelled_before_charge", 1);
                    info!(%order_id, "rollback before any charge; tombstone recorded");
                });
            }
            _ => {}
        }
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
