//! Broker-level retries: the delay tiers a failing message waits in, and how
//! long a message can take to come back through them (which the retention
//! window must outlast).

use std::time::Duration;

/// The delay tiers of the retry queues; attempt `n` (1-based) waits in tier
/// `min(n - 1, last)`, plus up to 50 % jitter.
pub const RETRY_TIERS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

/// The tier a message waits in after failing its `attempt`-th attempt.
pub fn tier_for(attempt: u32) -> usize {
    (attempt.max(1) as usize - 1).min(RETRY_TIERS.len() - 1)
}

/// The delay before the next attempt, with jitter.
pub fn delay_for(attempt: u32) -> Duration {
    RETRY_TIERS[tier_for(attempt)].mul_f64(rand::random_range(1.0..1.5))
}

/// The longest a message can take to come back through the retry tiers:
/// every delay before the last attempt, with its maximum jitter (+50 %).
pub fn retry_horizon(max_attempts: u32) -> Duration {
    (1..max_attempts.max(1))
        .map(|attempt| {
            let tier = tier_for(attempt);
            RETRY_TIERS[tier].mul_f64(1.5)
        })
        .sum()
}

/// Why a retention window is too short.
#[derive(Debug, thiserror::Error)]
#[error(
    "RETENTION_SECS ({retention_s}s) must exceed the retry horizon ({horizon_s}s for \
     RETRY_MAX_ATTEMPTS={max_attempts}) plus one hour: otherwise a retried message could \
     outlive its inbox entry and be applied twice"
)]
pub struct WindowTooShort {
    pub retention_s: u64,
    pub horizon_s: u64,
    pub max_attempts: u32,
}

/// Checks the window against the retry horizon (with an hour to spare).
pub fn check_window(retention: Duration, max_attempts: u32) -> Result<(), WindowTooShort> {
    let horizon = retry_horizon(max_attempts);
    if retention < horizon + Duration::from_secs(3600) {
        return Err(WindowTooShort {
            retention_s: retention.as_secs(),
            horizon_s: horizon.as_secs(),
            max_attempts,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_horizon_sums_the_tiers_with_jitter() {
        assert_eq!(retry_horizon(1), Duration::ZERO);
        assert_eq!(retry_horizon(2), Duration::from_millis(300));
        // 8 attempts: 0.2 + 1 + 5 + 30 + 120 + 120 + 120 = 396.2 s, × 1.5.
        assert_eq!(retry_horizon(8), Duration::from_millis(594_300));
    }

    #[test]
    fn a_window_shorter_than_the_horizon_is_refused() {
        assert!(check_window(Duration::from_secs(7 * 24 * 3600), 8).is_ok());
        let err = check_window(Duration::from_secs(600), 8).unwrap_err();
        assert!(err.to_string().contains("RETENTION_SECS (600s)"));
    }

    #[test]
    fn delays_grow_by_tier_and_stay_within_the_jitter() {
        for attempt in 1..12 {
            let base = RETRY_TIERS[tier_for(attempt)];
            let d = delay_for(attempt);
            assert!(d >= base && d <= base.mul_f64(1.5), "{attempt}: {d:?}");
        }
        assert_eq!(tier_for(1), 0);
        assert_eq!(tier_for(99), RETRY_TIERS.len() - 1);
    }
}
