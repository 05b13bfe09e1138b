//! `FAULT_DELAY_MS`: an artificial delay before each batch of messages is
//! handled, to reproduce a slow dependency and the deadline path in tests
//! and benchmarks.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A fixed delay (`"200"`) or a uniform range (`"50-300"`), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultDelay {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl FaultDelay {
    pub fn sample(&self) -> Duration {
        let ms = if self.max_ms > self.min_ms {
            rand::random_range(self.min_ms..=self.max_ms)
        } else {
            self.min_ms
        };
        Duration::from_millis(ms)
    }
}

impl FromStr for FaultDelay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("FAULT_DELAY_MS must be N or MIN-MAX milliseconds, got {s:?}");
        let (min, max) = match s.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let min_ms: u64 = min.parse().map_err(|_| bad())?;
        let max_ms: u64 = max.parse().map_err(|_| bad())?;
        if max_ms < min_ms {
            return Err(bad());
        }
        Ok(Self { min_ms, max_ms })
    }
}

impl fmt::Display for FaultDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min_ms == self.max_ms {
            write!(f, "{}", self.min_ms)
        } else {
            write!(f, "{}-{}", self.min_ms, self.max_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_delays_and_ranges() {
        assert_eq!(
            "200".parse::<FaultDelay>().unwrap(),
            FaultDelay {
                min_ms: 200,
                max_ms: 200
            }
        );
        let r: FaultDelay = "50-300".parse().unwrap();
        assert_eq!(
            r,
            FaultDelay {
                min_ms: 50,
                max_ms: 300
            }
        );
        for _ in 0..100 {
            let d = r.sample();
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(300));
        }
        assert!("300-50".parse::<FaultDelay>().is_err());
        assert!("fast".parse::<FaultDelay>().is_err());
    }
}
