//! Every metric name the shared code records (Prometheus conventions:
//! `_total` counters, `_seconds` histograms). Label values come from fixed
//! sets, never ids or error strings. Services add their own next to their
//! code; the README lists them all.

/// Messages handled, by `service`, `event_type` and `outcome` (`ok`, `retry`, `parked`, `escalated`).
pub const MESSAGES_HANDLED: &str = "messages_handled_total";
/// Time to handle the batch a message was in, by `service` and `event_type`.
pub const MESSAGE_HANDLING_SECONDS: &str = "message_handling_seconds";
/// Deliveries handled per transaction, by `service`.
pub const CONSUMER_BATCH_SIZE: &str = "consumer_batch_size";
/// Batches that failed as a whole and were retried one message at a time, by `service`.
pub const CONSUMER_BATCH_FALLBACKS: &str = "consumer_batch_fallbacks_total";
/// Messages delivered again after a possible crash, handled as suspects, by `service` and `handled` (`together`, `alone`).
pub const CONSUMER_SUSPECTS: &str = "consumer_suspects_total";
/// Messages parked in a dead-letter queue, by `service` and `reason`.
pub const MESSAGES_PARKED: &str = "messages_parked_total";
/// Duplicate messages recognised (by an inbox or a natural key) and not applied again, by `service` and `event_type`.
pub const INBOX_DUPLICATES: &str = "inbox_duplicates_total";
/// Forward events not applied because their saga was already over, by `service` and `event_type`.
pub const LATE_EVENTS: &str = "late_events_ignored_total";
/// Outbox rows published and confirmed, by `service` and `path` (`fast`: right after the commit; `sweep`: by the sweeper).
pub const OUTBOX_PUBLISHED: &str = "outbox_published_total";
/// Outbox rows the broker refused or returned, by `service`.
pub const OUTBOX_PUBLISH_FAILURES: &str = "outbox_publish_failures_total";
/// Replies to AMQP clients dropped, by `service` and `reason` (`unroutable`: no such queue any more; `refused`: the queue refused it 4 times).
pub const REPLIES_DROPPED: &str = "replies_dropped_total";
/// Rows per sweeper pass that found work, by `service`.
pub const OUTBOX_BATCH_ROWS: &str = "outbox_batch_rows";
/// From commit to broker confirm, by `service`.
pub const OUTBOX_LAG_SECONDS: &str = "outbox_lag_seconds";
/// Committed events the fast path could not publish (no broker): the sweeper sends them, by `service`.
pub const OUTBOX_FAST_PATH_SKIPPED: &str = "outbox_fast_path_skipped_total";
/// 1 while the broker connection is up, by `service`.
pub const BROKER_CONNECTED: &str = "broker_connected";
/// Failed broker connection attempts, by `service`.
pub const BROKER_CONNECT_FAILURES: &str = "broker_connect_failures_total";
/// Retryable database errors, by `service` and `kind` (`deadlock`, `serialization`, `lock_timeout`, `connection`, `other`).
pub const DB_RETRYABLE_ERRORS: &str = "db_retryable_errors_total";
/// Sagas started (orders created), order-svc.
pub const SAGAS_STARTED: &str = "sagas_started_total";
/// Sagas decided, by `outcome` (`confirmed`, `failed`) and `failed_step` (`none`, `payment`, `inventory`, `notification`, `timeout`).
pub const SAGAS_DECIDED: &str = "sagas_decided_total";
/// From order creation to decision, by `outcome`.
pub const SAGA_DURATION_SECONDS: &str = "saga_duration_seconds";
/// Orders rejected as invalid input, by `source` (`http`, `amqp`).
pub const ORDERS_REJECTED: &str = "orders_rejected_total";
/// Compensations whose retries were exhausted and that were escalated, by `service` and `step`.
pub const COMPENSATIONS_ESCALATED: &str = "compensations_escalated_total";
/// Old outbox rows and inbox ids deleted by the cleaner, by `service` and `table`.
pub const RETENTION_DELETED: &str = "retention_deleted_rows_total";
/// HTTP requests refused at once because too many were in flight.
pub const HTTP_REQUESTS_SHED: &str = "http_requests_shed_total";
/// Messages refused by a full parking or retry queue (`reject-publish`), by
/// `service` and `queue` (`parking`, `retry`): never dropped silently.
pub const QUEUE_OVERFLOWS: &str = "queue_overflows_total";
/// Business outcomes of a service's step, by `service` and `outcome`
/// (e.g. `charged`, `declined`, `refunded`, `reserved`, `released`, `sent`, `bounced`).
pub const STEP_OUTCOMES: &str = "saga_step_outcomes_total";

/// Outbox rows committed and not yet confirmed by the broker, by `service`
/// (read every 5 s).
pub const OUTBOX_BACKLOG: &str = "outbox_backlog";
/// Escalated compensations not resolved (open or being retried), by
/// `service` (read every 5 s).
pub const ESCALATIONS_OPEN: &str = "escalations_open";
/// Undecided sagas by `age` (`under_1s`, `1s_to_deadline`, `past_deadline`),
/// order-svc (read every 5 s).
pub const SAGAS_UNDECIDED: &str = "sagas_undecided";
/// Undecided sagas waiting for an outside answer (3-D Secure) under their
/// long deadline, order-svc (read every 5 s).
pub const SAGAS_LONG_RUNNING: &str = "sagas_long_running";
/// Age of the oldest of those, in seconds (0 when none).
pub const SAGA_LONG_RUNNING_OLDEST_SECONDS: &str = "saga_long_running_oldest_seconds";
/// Compensations of failed sagas not done past deadline + grace, by the
/// `service` that owes them (order-svc's reconciler, after each pass).
pub const COMPENSATIONS_PENDING: &str = "compensations_pending";
/// Saga steps by `service`, `step` (`charge`, `reserve_stock`,
/// `send_confirmation`, `commit_stock`, `refund`, `release_stock`,
/// `send_cancellation`), `outcome` (`started`, `succeeded`, `failed`,
/// `deferred` (waits for an outside answer), `compensated`, `escalated`) and `reason` (why it failed, from a fixed
/// set, else `none`).
pub const SAGA_STEPS: &str = "saga_steps_total";

/// Decided sagas whose services' records contradict the decision, found by
/// order-svc's reconciler, by `kind` (e.g. `failed_not_refunded`).
pub const SAGA_INVARIANT_VIOLATIONS: &str = "saga_invariant_violations_total";
/// Reconciler findings not resolved yet (order-svc).
pub const SAGA_INVARIANT_VIOLATIONS_OPEN: &str = "saga_invariant_violations_open";

/// Counts business outcomes of a service's step (`saga_step_outcomes_total`)
/// and the saga-level view of the same (`saga_steps_total`).
pub fn step_outcome(service: &'static str, outcome: &'static str, n: u64) {
    if n == 0 {
        return;
    }
    metrics::counter!(STEP_OUTCOMES, "service" => service, "outcome" => outcome).increment(n);
    if let Some((step, result, reason)) = saga_step(outcome) {
        let count = |outcome: &'static str| {
            metrics::counter!(SAGA_STEPS,
                "service" => service, "step" => step, "outcome" => outcome, "reason" => reason)
            .increment(n);
        };
        // A step starts once: an outcome that completes a deferred one
        // (reason `after_*`) does not start it again.
        if matches!(result, "succeeded" | "failed" | "deferred") && !reason.starts_with("after_") {
            count("started");
        }
        count(result);
    }
}

/// A business outcome as `(step, outcome, reason)` of `saga_steps_total`.
fn saga_step(outcome: &str) -> Option<(&'static str, &'static str, &'static str)> {
    Some(match outcome {
        "charged" => ("charge", "succeeded", "none"),
        "declined" => ("charge", "failed", "declined"),
        "action_required" => ("charge", "deferred", "action_required"),
        "charged_after_action" => ("charge", "succeeded", "after_action"),
        "declined_after_action" => ("charge", "failed", "after_action"),
        "voided" => ("refund", "compensated", "authorisation_voided"),
        "refunded" => ("refund", "compensated", "none"),
        "cancelled_before_charge" => ("refund", "compensated", "before_charge"),
        "reserved" => ("reserve_stock", "succeeded", "none"),
        "rejected" => ("reserve_stock", "failed", "rejected"),
        "committed" => ("commit_stock", "succeeded", "none"),
        "released" => ("release_stock", "compensated", "none"),
        "cancelled_before_reservation" => ("release_stock", "compensated", "before_reservation"),
        "held" => ("reserve_stock", "deferred", "action_required"),
        "hold_confirmed" => ("reserve_stock", "succeeded", "after_action"),
        "backordered" => ("reserve_stock", "deferred", "backordered"),
        "backorder_filled" => ("reserve_stock", "succeeded", "after_backorder"),
        "hold_expired" => ("release_stock", "compensated", "hold_expired"),
        "sent" => ("send_confirmation", "succeeded", "none"),
        "bounced" => ("send_confirmation", "failed", "bounced"),
        "deferred" => ("send_confirmation", "deferred", "relay_unavailable"),
        "queued_sent" => ("send_confirmation", "succeeded", "after_relay_back"),
        "queued_bounced" => ("send_confirmation", "failed", "after_relay_back"),
        "cancellation_sent" => ("send_cancellation", "compensated", "none"),
        "cancelled_before_email" => ("send_cancellation", "compensated", "before_email"),
        _ => return None,
    })
}

/// Counts an escalated compensation in `saga_steps_total` (`step` as the
/// escalation names it: `refund`, `stock commit`...).
pub fn step_escalated(service: &'static str, step: &'static str) {
    let step = match step {
        "refund" => "refund",
        "stock commit" => "commit_stock",
        "stock release" => "release_stock",
        _ => "send_cancellation",
    };
    metrics::counter!(SAGA_STEPS,
        "service" => service, "step" => step, "outcome" => "escalated", "reason" => "retries_exhausted")
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_business_outcome_recorded_maps_to_a_saga_step() {
        for outcome in [
            "charged",
            "declined",
            "action_required",
            "charged_after_action",
            "declined_after_action",
            "voided",
            "refunded",
            "cancelled_before_charge",
            "reserved",
            "rejected",
            "committed",
            "released",
            "cancelled_before_reservation",
            "held",
            "hold_confirmed",
            "backordered",
            "backorder_filled",
            "hold_expired",
            "sent",
            "bounced",
            "deferred",
            "queued_sent",
            "queued_bounced",
            "cancellation_sent",
            "cancelled_before_email",
        ] {
            assert!(saga_step(outcome).is_some(), "{outcome}");
        }
    }
}
