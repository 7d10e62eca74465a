//! The wall clock the workers plan by, as a handle, so that tests can drive it.
//!
//! Token expiries are wall-clock times (a JWT's `exp`), so plans are made in `SystemTime`; the
//! waits themselves are tokio sleeps. In production the clock is the system's. In tests it is
//! tokio's clock seen as wall time: with tokio's paused time, a day of refreshes passes in
//! milliseconds, and the plans move exactly as far as the sleeps. Times are written for people
//! (logs, files, `/status`) by [`rfc3339`].
//!
//! Here too the one conversion between wall-clock times and Unix seconds, the unit of JWT
//! claims, the ledger of 401s and the metrics' timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(UNIX_EPOCH, last)).to_string()
}

/// `t` in whole seconds since the Unix epoch, negative before it (a part of a second does not
/// count, on either side); saturating at the ends of `i64`.
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The time `secs` seconds after the Unix epoch (before it when negative).
pub fn from_unix_secs(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(after) => UNIX_EPOCH + Duration::from_secs(after),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
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

    #[test]
    fn unix_seconds_go_both_ways_on_either_side_of_the_epoch() {
        for secs in [0, 1, 1_800_000_000, -1, -86_400] {
            assert_eq!(unix_secs(from_unix_secs(secs)), secs);
        }
        assert_eq!(from_unix_secs(1_800_000_000), UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        assert_eq!(from_unix_secs(-60), UNIX_EPOCH - Duration::from_secs(60));
        // Parts of a second count for nothing, before the epoch as after it.
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_millis(1_999)), 1);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_millis(1_999)), -1);
        assert_eq!(unix_secs(from_unix_secs(i64::MAX)), i64::MAX);
        assert_eq!(unix_secs(from_unix_secs(i64::MIN)), i64::MIN, "saturated, not overflowed");
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
