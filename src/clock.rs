//! The wall clock the workers plan by, as a handle, so that tests can drive it.
//!
//! Token expiries are wall-clock times (a JWT's `exp`), so plans are made in `SystemTime`; the
//! waits themselves are tokio sleeps. In production the clock is the system's. In tests it is
//! tokio's clock seen as wall time: with tokio's paused time, a day of refreshes passes in
//! milliseconds, and the plans move exactly as far as the sleeps. Times are written for people
//! (logs, files, `/status`) by [`rfc3339`].

use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// `SystemTime::now()`.
    #[default]
    System,
    /// `origin` plus the time tokio's clock has moved since `since`.
    Tokio { origin: SystemTime, since: tokio::time::Instant },
}

impl Clock {
    /// A clock that reads `origin` now and then follows tokio's clock (paused or not).
    pub fn tokio(origin: SystemTime) -> Clock {
        Clock::Tokio { origin, since: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> SystemTime {
        match self {
            Clock::System => SystemTime::now(),
            Clock::Tokio { origin, since } => *origin + since.elapsed(),
        }
    }

    /// How long from now until `at` (zero when it has passed).
    pub fn until(&self, at: SystemTime) -> Duration {
        at.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }
}

/// `2026-11-28T10:00:00Z`. Times outside the years 1970 to 9999 (which humantime cannot
/// write, and panics on) are shown at the nearer edge: a log line must never bring a worker down.
pub fn rfc3339(t: SystemTime) -> String {
    let last = std::time::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(std::time::UNIX_EPOCH, last)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_beyond_what_rfc3339_can_write_do_not_panic() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch - Duration::from_secs(1)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(epoch + Duration::from_secs(1 << 40)), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(epoch + Duration::from_secs(1_795_860_000)), "2026-11-28T10:00:00Z");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time() {
        let origin = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let clock = Clock::tokio(origin);
        assert_eq!(clock.now(), origin);
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert_eq!(clock.now(), origin + Duration::from_secs(86_400));
        assert_eq!(clock.until(origin + Duration::from_secs(86_401)), Duration::from_secs(1));
        assert_eq!(clock.until(origin), Duration::ZERO);
    }
}
