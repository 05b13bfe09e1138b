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

use std::collections::{HashMap, HashSet};

use chrono::{Datelike as _, Utc};
use common::messaging::consumer::{HandlerError, MessageHandler, MessageResult};
use common::messaging::delivery::Incoming;
use common::messaging::envelope::{Envelope, SagaContext};
use common::messaging::events::{
    EventType, OrderCreated, PaymentCompleted, PaymentRefunded, StepFailed,
};
use common::messaging::inbox;
use common::messaging::unit_of_work::UnitOfWork;
use common::metric_definitions::step_outcome;
use common::saga::card::CardOpener;
use common::saga::compensation::{Compensation, compensation_for};
use sqlx::PgPool;
use tracing::{error, info};
use uuid::Uuid;

use crate::SERVICE;
use crate::db::{self, NewPayment, Posting};
use crate::domain::{self, PaymentStatus};

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
        common::messaging::consumer::compensation_on_rollback(routing_key, "refund")
    }

    async fn handle_batch(
        &self,
        uow: &mut UnitOfWork,
        batch: &[Incoming],
    ) -> Result<Vec<MessageResult>, HandlerError> {
        let mut results: Vec<MessageResult> = Vec::with_capacity(batch.len());
        let mut charges = Vec::new();
        let mut aborts = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            let decoded = Envelope::decode(&msg.body).map_err(HandlerError::from);
            results.push(match decoded {
                Err(e) => Err(e),
                Ok(env) => match env.event_type {
                    EventType::OrderCreated => match env.data_as::<OrderCreated>() {
                        Ok(order) => {
                            charges.push(ChargeRequest { env, order });
                            Ok(())
                        }
                        Err(e) => Err(e.into()),
                    },
                    t if t.is_abort() => {
                        aborts.push((i, env));
                        Ok(())
                    }
                    other => Err(HandlerError::permanent(format!(
                        "{SERVICE} does not handle {other}"
                    ))),
                },
            });
        }
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
type Verdict = Result<(), StepFailed>;

impl PaymentHandler {
    /// The gateway's verdict on a card, before any money moves.
    fn screen(&self, req: &ChargeRequest) -> Verdict {
        if Utc::now() >= req.env.deadline_at {
            return Err(domain::decline(
                "deadline_exceeded",
                "Saga deadline passed before the payment",
            ));
        }
        match self.opener.open(&req.order.payment) {
            Ok(card) => {
                let today = Utc::now();
                domain::screen_card(&card, (today.year(), today.month()))
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

    /// Charges every new order of the batch.
    async fn charge(
        &self,
        uow: &mut UnitOfWork,
        requests: Vec<ChargeRequest>,
    ) -> Result<(), HandlerError> {
        // Orders that already have a record: a duplicate, or a rollback that
        // got here first (tombstone). Nothing to do for either.
        let order_ids: Vec<Uuid> = requests.iter().map(|r| r.env.order_id).collect();
        let existing = db::existing_payments(uow.conn(), &order_ids).await?;
        let mut seen = HashSet::new();
        let (mut duplicates, mut late) = (0, 0);
        let fresh: Vec<ChargeRequest> = requests
            .into_iter()
            .filter(|r| match existing.get(&r.env.order_id) {
                Some(status) if status == PaymentStatus::Cancelled.as_str() => {
                    late += 1;
                    false
                }
                Some(_) => {
                    duplicates += 1;
                    false
                }
                None => {
                    seen.insert(r.env.order_id) || {
                        duplicates += 1;
                        false
                    }
                }
            })
            .collect();
        uow.on_commit(move || {
            inbox::count_duplicates(SERVICE, EventType::OrderCreated.routing_key(), duplicates);
            inbox::count_late(SERVICE, EventType::OrderCreated.routing_key(), late);
        });
        if fresh.is_empty() {
            return Ok(());
        }

        // The gateway first, then the ledger: accounts locked in one
        // global order, balances checked in the batch's order.
        let mut verdicts: Vec<Verdict> = fresh.iter().map(|r| self.screen(r)).collect();
        let customers: Vec<&str> = {
            let mut c: Vec<&str> = fresh
                .iter()
                .zip(&verdicts)
                .filter(|(_, v)| v.is_ok())
                .map(|(r, _)| r.order.customer_id.as_str())
                .collect();
            c.sort_unstable();
            c.dedup();
            c
        };
        let mut debits: HashMap<&str, i64> = HashMap::new();
        if !customers.is_empty() {
            db::open_missing_accounts(uow.conn(), &customers, self.default_balance_cents).await?;
            let mut accounts = db::lock_accounts(uow.conn(), &customers).await?;
            for (req, verdict) in fresh.iter().zip(verdicts.iter_mut()) {
                if verdict.is_err() {
                    continue;
                }
                let customer = req.order.customer_id.as_str();
                *verdict = match accounts.get_mut(customer) {
                    Some((_, true)) | None => {
                        Err(domain::decline("account_frozen", "Account frozen"))
                    }
                    _ if req.order.amount_cents < 0 => {
                        Err(domain::decline("invalid_amount", "Invalid amount"))
                    }
                    Some((balance, false)) if *balance < req.order.amount_cents => {
                        Err(domain::insufficient_funds())
                    }
                    Some((balance, false)) => {
                        *balance -= req.order.amount_cents;
                        *debits.entry(customer).or_default() += req.order.amount_cents;
                        Ok(())
                    }
                };
            }
        }

        let records: Vec<NewPayment<'_>> = fresh
            .iter()
            .zip(&verdicts)
            .map(|(r, v)| NewPayment {
                order_id: r.env.order_id,
                customer_id: &r.order.customer_id,
                amount_cents: r.order.amount_cents,
                currency: &r.order.currency,
                status: if v.is_ok() {
                    PaymentStatus::Charged
                } else {
                    PaymentStatus::Declined
                },
                decline_code: v.as_ref().err().map(|f| f.code.as_str()),
                reason: v.as_ref().err().map(|f| f.reason.as_str()),
                card_brand: Some(&r.order.payment.brand),
                card_last4: Some(&r.order.payment.last4),
            })
            .collect();
        let inserted: HashSet<Uuid> = db::insert_payments(uow.conn(), &records)
            .await?
            .into_iter()
            .collect();
        // An order not inserted got a tombstone from a concurrent rollback
        // since we looked: it is late, and its debit must not happen (its
        // amount still counted above, which can only make a later order of
        // the same customer in this batch decline, never overdraw).
        for (r, v) in fresh.iter().zip(&verdicts) {
            if v.is_ok() && !inserted.contains(&r.env.order_id) {
                let customer = r.order.customer_id.as_str();
                if let Some(total) = debits.get_mut(customer) {
                    *total -= r.order.amount_cents;
                }
            }
        }
        debits.retain(|_, total| *total != 0);
        if !debits.is_empty() {
            db::debit_accounts(uow.conn(), &debits).await?;
        }

        let (mut charged, mut declined, mut raced) = (Vec::new(), 0, 0);
        for (req, verdict) in fresh.into_iter().zip(verdicts) {
            if !inserted.contains(&req.env.order_id) {
                raced += 1;
                continue;
            }
            let ctx = SagaContext::caused_by(&req.env, SERVICE);
            match verdict {
                Ok(()) => {
                    charged.push((req.env.order_id, req.order.amount_cents));
                    uow.emit(ctx.event(
                        EventType::PaymentCompleted,
                        &PaymentCompleted {
                            customer_id: req.order.customer_id,
                            items: req.order.items,
                            amount_cents: req.order.amount_cents,
                            currency: req.order.currency,
                            card_last4: req.order.payment.last4,
                        },
                    ));
                }
                Err(failure) => {
                    declined += 1;
                    info!(order_id = %req.env.order_id, code = %failure.code, "declined");
                    uow.emit(ctx.event(EventType::PaymentFailed, &failure));
                }
            }
        }
        uow.on_commit(move || {
            step_outcome(SERVICE, "charged", charged.len() as u64);
            step_outcome(SERVICE, "declined", declined);
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
