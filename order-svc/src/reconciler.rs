//! The invariant reconciler: checks decided sagas against what every other
//! service says happened, after the fact.
//!
//! A decided saga promises: CONFIRMED means charged (once), stock committed
//! and one confirmation email; FAILED means refunded if charged, released if
//! reserved, and no confirmation left unretracted. Compensations are retried
//! and may be escalated, so a promise may be kept late; once a saga is past
//! its deadline plus `grace`, a promise not kept is a *finding*: recorded in
//! `saga_findings`, counted in `saga_invariant_violations_total{kind}`,
//! logged, listed by `GET /sagas/violations` (`sagactl saga list
//! --violations`), and it makes the saga "stuck" in `GET /sagas?stuck=true`.
//! Open findings are checked again on every pass and resolved once the
//! services agree (an operator retried the escalated refund, say).
//!
//! It walks sagas in order-id order (UUIDv7: creation order) from a stored
//! watermark, a bounded batch per pass, asking each service for its steps of
//! the batch in requests of at most 500 (`POST /sagas/steps`). One replica
//! passes at a time (a session-level advisory lock). Idle it costs a lock and
//! two indexed queries per interval; nothing is on the saga's critical path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::messaging::topology::{INVENTORY_SVC, NOTIFICATION_SVC, PAYMENT_SVC};
use common::metric_definitions as metric;
use common::saga::timeline::Step;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::db;
use crate::domain::OrderStatus;
use crate::saga::OrderSaga;
use crate::timeline::Peers;

/// Sagas checked per pass at most (besides the open findings).
const BATCH: i64 = 200;
/// The advisory lock that lets one replica pass at a time.
const LOCK_KEY: i64 = 0x5a6a_7265_636f_6e63; // "Zjreconc"

/// A promise of a decided saga that another service's record contradicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub detail: String,
}

/// Every kind of finding (the `kind` label: a fixed set).
pub const KINDS: [&str; 6] = [
    "confirmed_not_charged",
    "confirmed_stock_not_committed",
    "confirmed_email_count",
    "failed_not_refunded",
    "failed_not_released",
    "failed_confirmation_not_retracted",
];

/// The service whose record a kind of finding comes from.
pub fn service_of(kind: &str) -> &'static str {
    match kind {
        "confirmed_not_charged" | "failed_not_refunded" => PAYMENT_SVC.name,
        "confirmed_stock_not_committed" | "failed_not_released" => INVENTORY_SVC.name,
        _ => NOTIFICATION_SVC.name,
    }
}

/// What the services' steps say about a decided saga (pure). A service whose
/// steps are unknown (`None`: it did not answer) is not judged.
pub fn check(
    status: OrderStatus,
    payment: Option<&[Step]>,
    inventory: Option<&[Step]>,
    notification: Option<&[Step]>,
) -> Vec<Finding> {
    // An escalated compensation's outcome is `<step> escalated`: not done.
    let has = |steps: &[Step], outcome: &str| steps.iter().any(|s| s.outcome == outcome);
    let describe = |steps: &[Step]| {
        let outcomes: Vec<&str> = steps.iter().map(|s| s.outcome.as_str()).collect();
        if outcomes.is_empty() {
            "no record".to_owned()
        } else {
            outcomes.join(", ")
        }
    };
    let mut found = Vec::new();
    let mut finding = |kind, detail: String| found.push(Finding { kind, detail });
    let confirmed = match status {
        OrderStatus::Pending => return Vec::new(),
        OrderStatus::Confirmed => true,
        OrderStatus::Failed => false,
    };
    if let Some(payment) = payment {
        let charged = has(payment, "charged") && !has(payment, "refunded");
        if confirmed && !charged {
            let detail = format!("confirmed, but payment-svc has: {}", describe(payment));
            finding("confirmed_not_charged", detail);
        }
        if !confirmed && charged {
            let detail = format!("failed, but payment-svc has: {}", describe(payment));
            finding("failed_not_refunded", detail);
        }
    }
    if let Some(inventory) = inventory {
        let committed = has(inventory, "committed");
        let held = has(inventory, "reserved") && !committed && !has(inventory, "released");
        if confirmed && !committed {
            let detail = format!("confirmed, but inventory-svc has: {}", describe(inventory));
            finding("confirmed_stock_not_committed", detail);
        }
        if !confirmed && (held || committed) {
            let detail = format!("failed, but inventory-svc has: {}", describe(inventory));
            finding("failed_not_released", detail);
        }
    }
    if let Some(notification) = notification {
        let confirmations = notification
            .iter()
            .filter(|s| s.event == "notification.sent" && s.outcome == "sent")
            .count();
        let retracted = notification
            .iter()
            .any(|s| s.event == "email.cancellation" && s.outcome == "sent");
        // A confirmation queued while the mail relay is down is on its way.
        let queued = notification.iter().any(|s| s.outcome == "deferred");
        if confirmed && confirmations != 1 && !(confirmations == 0 && queued) {
            let detail = format!("confirmed with {confirmations} confirmation emails");
            finding("confirmed_email_count", detail);
        }
        if !confirmed && confirmations > 0 && !retracted {
            let detail = "failed, but a confirmation email went out and no cancellation".to_owned();
            finding("failed_confirmation_not_retracted", detail);
        }
    }
    found
}

/// What one pass did.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct PassReport {
    /// Sagas checked (new ones and those with open findings).
    pub checked: usize,
    /// The batch of new sagas was full: more are waiting.
    #[serde(skip)]
    pub new_batch_full: bool,
    /// The watermark moved past the new sagas checked.
    #[serde(skip)]
    pub advanced: bool,
    /// Services that did not answer (their part is checked again).
    pub unanswered: usize,
    /// Findings new in this pass.
    pub new_findings: usize,
    /// Findings resolved in this pass.
    pub resolved: usize,
    /// Findings open after the pass.
    pub open: i64,
    /// Another replica was passing: nothing done.
    pub skipped: bool,
}

#[derive(Clone)]
pub struct Reconciler {
    pub saga: Arc<OrderSaga>,
    pub peers: Peers,
    pub grace: Duration,
    /// Resolved findings older than this are deleted (the retention window).
    pub retention: Duration,
}

impl Reconciler {
    /// One pass: the next batch of sagas past deadline and grace, and the
    /// oldest-checked open findings.
    ///
    /// One replica at a time: a session-level advisory lock on a connection
    /// held for the pass. The peers are asked with no transaction open; the
    /// findings are recorded in one short transaction.
    pub async fn pass(&self) -> anyhow::Result<PassReport> {
        let mut conn = self.saga.pool.acquire().await?;
        if !db::try_advisory_lock(&mut conn, LOCK_KEY).await? {
            return Ok(PassReport {
                skipped: true,
                ..PassReport::default()
            });
        }
        let report = self.pass_locked(&mut conn).await;
        if let Err(error) = db::prune_findings(&mut conn, self.retention).await {
            warn!(%error, "old resolved findings not deleted this time");
        }
        // Released with the connection anyway if this fails (the pool
        // closes a connection whose unlock errored).
        if let Err(error) = db::advisory_unlock(&mut conn, LOCK_KEY).await {
            conn.close_on_drop();
            warn!(%error, "reconciler lock not released; its connection is closed");
        }
        report
    }

    async fn pass_locked(&self, conn: &mut sqlx::PgConnection) -> anyhow::Result<PassReport> {
        let settled = self.saga.deadline + self.grace;
        let batch = db::sagas_to_reconcile(conn, settled, BATCH).await?;
        let ids: Vec<Uuid> = batch.sagas.iter().map(|(id, _)| *id).collect();
        let mut report = PassReport {
            checked: ids.len(),
            new_batch_full: batch.new_sagas as i64 >= BATCH,
            ..PassReport::default()
        };
        if ids.is_empty() {
            // Only long-running sagas passed (kept for later), or nothing.
            if let Some(last) = batch.watermark {
                db::advance_reconciler(conn, last).await?;
                report.advanced = true;
            }
            report.open = self.count_open(conn).await?;
            return Ok(report);
        }

        let mut logs: HashMap<&str, HashMap<Uuid, Vec<Step>>> = HashMap::new();
        let mut unanswered = Vec::new();
        for (service, answer) in self.peers.step_logs_of(&ids).await {
            match answer {
                Ok(by_order) => {
                    logs.insert(service, by_order);
                }
                Err(why) => unanswered.push(format!("{service}: {why}")),
            }
        }
        // A service that answered but never saw the order has no steps.
        let none: Vec<Step> = Vec::new();
        let steps = |service: &str, id: &Uuid| {
            logs.get(service)
                .map(|l| l.get(id).unwrap_or(&none).as_slice())
        };
        let mut found = Vec::new();
        for (id, status) in &batch.sagas {
            for f in check(
                *status,
                steps(PAYMENT_SVC.name, id),
                steps(INVENTORY_SVC.name, id),
                steps(NOTIFICATION_SVC.name, id),
            ) {
                found.push((*id, f));
            }
        }
        // Only what an answering service could confirm is resolved.
        let judged: Vec<&str> = KINDS
            .into_iter()
            .filter(|k| logs.contains_key(service_of(k)))
            .collect();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let outcome = db::record_findings(&mut tx, &ids, &judged, &found).await?;
        // The batch is checked again next pass until every service answers.
        report.advanced = unanswered.is_empty() && batch.watermark.is_some();
        if let (Some(last), true) = (batch.watermark, report.advanced) {
            db::advance_reconciler(&mut tx, last).await?;
        }
        if unanswered.is_empty() {
            db::forget_checked_later(&mut tx, &ids).await?;
        }
        tx.commit().await?;
        report.open = self.count_open(conn).await?;
        report.new_findings = outcome.new.len();
        report.resolved = outcome.resolved;
        report.unanswered = unanswered.len();

        for (id, f) in found
            .iter()
            .filter(|(id, f)| outcome.new.contains(&(*id, f.kind.to_owned())))
        {
            warn!(order_id = %id, kind = f.kind, detail = ?f.detail, "saga invariant violated");
            metrics::counter!(metric::SAGA_INVARIANT_VIOLATIONS, "kind" => f.kind).increment(1);
        }
        if !unanswered.is_empty() {
            warn!(
                services = ?unanswered,
                "reconciler: some services did not answer; their part is checked next pass"
            );
        }
        Ok(report)
    }

    /// Open findings: the gauges, and their total.
    async fn count_open(&self, conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
        let open_by_kind = db::open_findings(conn).await?;
        for service in [PAYMENT_SVC.name, INVENTORY_SVC.name, NOTIFICATION_SVC.name] {
            let pending: i64 = open_by_kind
                .iter()
                .filter(|(kind, _)| kind.starts_with("failed_") && service_of(kind) == service)
                .map(|(_, n)| n)
                .sum();
            metrics::gauge!(metric::COMPENSATIONS_PENDING, "service" => service)
                .set(pending as f64);
        }
        let open: i64 = open_by_kind.iter().map(|(_, n)| n).sum();
        metrics::gauge!(metric::SAGA_INVARIANT_VIOLATIONS_OPEN).set(open as f64);
        Ok(open)
    }

    /// Passes every `interval` until cancelled. A full batch of new sagas
    /// that moved the watermark passes again at once (a backlog is worked
    /// off, not spread over intervals); a service that does not answer
    /// doubles the wait, up to 8 intervals.
    pub async fn run(self, interval: Duration, cancel: CancellationToken) {
        let mut backoff = 1u32;
        loop {
            let wait = match self.pass().await {
                Ok(report) if report.unanswered > 0 => {
                    backoff = (backoff * 2).min(8);
                    interval * backoff
                }
                Ok(report) => {
                    backoff = 1;
                    if report.new_findings > 0 || report.resolved > 0 {
                        info!(?report, "reconciler pass");
                    }
                    if report.new_batch_full && report.advanced {
                        Duration::ZERO
                    } else {
                        interval
                    }
                }
                Err(error) => {
                    warn!(error = %format!("{error:#}"), "reconciler pass failed; will retry");
                    backoff = (backoff * 2).min(8);
                    interval * backoff
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use common::saga::timeline::{CompensationState, StepKind};

    use super::*;

    fn step(service: &str, event: &str, kind: StepKind, outcome: &str) -> Step {
        Step::new(Utc::now(), service, event, kind, outcome)
    }

    fn charged() -> Step {
        step(
            "payment-svc",
            "payment.completed",
            StepKind::Action,
            "charged",
        )
    }
    fn refunded() -> Step {
        step(
            "payment-svc",
            "payment.refunded",
            StepKind::Compensation,
            "refunded",
        )
    }
    fn reserved() -> Step {
        step(
            "inventory-svc",
            "inventory.reserved",
            StepKind::Action,
            "reserved",
        )
    }
    fn committed() -> Step {
        step(
            "inventory-svc",
            "order.confirmed",
            StepKind::Action,
            "committed",
        )
    }
    fn released() -> Step {
        step(
            "inventory-svc",
            "inventory.released",
            StepKind::Compensation,
            "released",
        )
    }
    fn confirmation() -> Step {
        step(
            "notification-svc",
            "notification.sent",
            StepKind::Action,
            "sent",
        )
    }
    fn cancellation() -> Step {
        step(
            "notification-svc",
            "email.cancellation",
            StepKind::Compensation,
            "sent",
        )
    }

    fn kinds(found: Vec<Finding>) -> Vec<&'static str> {
        found.into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn a_confirmed_saga_kept_its_promises() {
        let found = check(
            OrderStatus::Confirmed,
            Some(&[charged()]),
            Some(&[reserved(), committed()]),
            Some(&[confirmation()]),
        );
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_confirmed_saga_refunded_uncommitted_or_unannounced_is_found() {
        let found = check(
            OrderStatus::Confirmed,
            Some(&[charged(), refunded()]),
            Some(&[reserved()]),
            Some(&[]),
        );
        assert_eq!(
            kinds(found),
            [
                "confirmed_not_charged",
                "confirmed_stock_not_committed",
                "confirmed_email_count"
            ]
        );
        let twice = check(
            OrderStatus::Confirmed,
            Some(&[charged()]),
            Some(&[reserved(), committed()]),
            Some(&[confirmation(), confirmation()]),
        );
        assert_eq!(kinds(twice), ["confirmed_email_count"]);
    }

    #[test]
    fn a_failed_saga_rolled_back_kept_its_promises() {
        for (payment, inventory, notification) in [
            (vec![], vec![], vec![]),
            (vec![charged(), refunded()], vec![], vec![]),
            (
                vec![charged(), refunded()],
                vec![reserved(), released()],
                vec![],
            ),
            (
                vec![charged(), refunded()],
                vec![reserved(), released()],
                vec![confirmation(), cancellation()],
            ),
        ] {
            let found = check(
                OrderStatus::Failed,
                Some(&payment),
                Some(&inventory),
                Some(&notification),
            );
            assert!(found.is_empty(), "{found:?}");
        }
    }

    #[test]
    fn a_failed_saga_still_charged_held_or_confirmed_is_found() {
        let found = check(
            OrderStatus::Failed,
            Some(&[charged()]),
            Some(&[reserved()]),
            Some(&[confirmation()]),
        );
        assert_eq!(
            kinds(found),
            [
                "failed_not_refunded",
                "failed_not_released",
                "failed_confirmation_not_retracted"
            ]
        );
    }

    #[test]
    fn an_escalated_refund_is_not_a_refund() {
        let escalated = step(
            "payment-svc",
            "order.failed",
            StepKind::Compensation,
            "refund escalated",
        )
        .state(CompensationState::Escalated);
        let found = check(
            OrderStatus::Failed,
            Some(&[charged(), escalated]),
            Some(&[]),
            None,
        );
        assert_eq!(kinds(found), ["failed_not_refunded"]);
    }

    #[test]
    fn every_kind_is_declared() {
        let all = [
            check(OrderStatus::Confirmed, Some(&[]), Some(&[]), Some(&[])),
            check(
                OrderStatus::Failed,
                Some(&[charged()]),
                Some(&[reserved()]),
                Some(&[confirmation()]),
            ),
        ];
        let all: Vec<Finding> = all.into_iter().flatten().collect();
        assert_eq!(all.len(), KINDS.len());
        for f in all {
            assert!(KINDS.contains(&f.kind), "{}", f.kind);
        }
    }

    #[test]
    fn a_service_that_did_not_answer_is_not_judged() {
        let found = check(OrderStatus::Failed, None, Some(&[reserved()]), None);
        assert_eq!(kinds(found), ["failed_not_released"]);
    }
}
