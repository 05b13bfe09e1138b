//! Named instants where a test can make a service process crash, to prove
//! that what is committed at that instant survives (`FAILPOINTS`, read at
//! start-up; e.g. `FAILPOINTS=outbox::after_commit=1*return` crashes at the
//! first commit). Compiled in only with the `failpoints` feature, which the
//! test builds turn on; otherwise every function here is a no-op.
//!
//! | name | the instant |
//! |---|---|
//! | `outbox::after_commit` | a transaction has committed, its events are in the outbox, nothing is published yet |
//! | `consumer::before_ack` | a batch is committed and its events confirmed by the broker, the deliveries not yet acked |
//! | `unit_of_work::before_commit` | a batch's handler is done (emails sent, say), its transaction not committed (paused while set) |
//! | `unit_of_work::commit_lost` | a transaction has committed and the answer to its COMMIT is lost (the caller sees an error) |
//! | `consumer::hang` | a batch's handler starts (it then never finishes) |
//! | `inventory::stock_commit` | a batch with `order.confirmed` starts (it then fails) |
//! | `order::before_reply_target` | an order placed earlier gets a new reply target (paused while set) |
//! | `escalation::publish` | an operator's retry publishes the escalated message (it then fails) |
//! | `notification::after_send` | a batch's confirmation emails went out, nothing of it is recorded yet (it then fails) |
//! | `notification::queue_after_send` | the queued sender handed an email to the relay, its outcome is not recorded (paused for good) |
//!
//! All but the first two are configured by in-process tests (`fail::cfg`).

/// Reads `FAILPOINTS`; keep the returned value alive while the process runs.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

/// Reads `FAILPOINTS` (nothing to read: failpoints are compiled out).
#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// True if the failpoint `name` is on (each check consumes one of its
/// `N*` counts).
#[inline]
pub fn is_set(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |_| ()).is_some()
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Aborts the process (no destructor, no flush: as a crash), saying why.
pub fn crash(name: &str) -> ! {
    eprintln!("failpoint {name}: crashing the process on purpose");
    std::process::abort()
}

/// Crashes here if the failpoint `name` is on.
#[inline]
pub fn crash_if_set(name: &str) {
    if is_set(name) {
        crash(name);
    }
}

/// Waits here for as long as the failpoint `name` is on (checked every few
/// milliseconds), to let a test act at exactly this instant.
pub async fn pause_while_set(name: &str) {
    while is_set(name) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
