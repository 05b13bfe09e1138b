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
