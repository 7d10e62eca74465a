//! Magento's brute-force throttle for token requests (Integration module's
//! RequestThrottler with the `oauth_token_request_log` table), per username.
//!
//! Reproduced exactly because the daemon's whole retry policy exists to stay clear of it:
//! - every failed login adds one and moves the lock expiry to now + timeout (sliding);
//! - the count is read only while the expiry is ahead (`lock_expires_at > now`);
//! - with a healthy cron (`outdated_authentication_failures_cleanup`, every minute) an
//!   expired row is deleted, so the next failure starts again at 1; without one the row
//!   keeps its count and the next failure adds to it (the lock is back at once);
//! - while count >= max and the expiry is in the future, every login is refused with
//!   the same 401 as a wrong password and is NOT counted;
//! - a successful login deletes the row.
//!
//! Keys are compared case-insensitively, as MySQL's default collation does for `user_name`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u32,
    expires: Instant,
}

#[derive(Debug)]
pub(crate) struct Throttle {
    max_failures: u32,
    timeout: Duration,
    /// Whether the cleanup cron runs (modelled as deleting a row the moment it expires).
    cron: bool,
    entries: HashMap<String, Entry>,
    /// The highest count each row ever reached: what tests assert the daemon stayed under.
    peaks: HashMap<String, u32>,
}

impl Throttle {
    pub(crate) fn new(max_failures: u32, timeout: Duration, cron: bool) -> Throttle {
        Throttle { max_failures, timeout, cron, entries: HashMap::new(), peaks: HashMap::new() }
    }

    fn live(&self, key: &str, now: Instant) -> Option<Entry> {
        self.entries.get(key).copied().filter(|e| e.expires > now)
    }

    /// The count Magento reads now (0 once the row has expired or was deleted).
    pub(crate) fn failures(&self, key: &str, now: Instant) -> u32 {
        self.live(key, now).map_or(0, |e| e.count)
    }

    /// The count stored in the row, whatever its expiry; with cron an expired row is gone.
    pub(crate) fn stored(&self, key: &str, now: Instant) -> u32 {
        self.entries.get(key).filter(|e| !self.cron || e.expires > now).map_or(0, |e| e.count)
    }

    /// The highest count this username's row ever reached.
    pub(crate) fn peak(&self, key: &str) -> u32 {
        self.peaks.get(key).copied().unwrap_or(0)
    }

    /// Whether a login of this username is refused right now whatever its password.
    /// A maximum of 0 disables the lock (Magento would otherwise lock everyone out).
    pub(crate) fn is_locked(&self, key: &str, now: Instant) -> bool {
        self.max_failures > 0 && self.live(key, now).is_some_and(|e| e.count >= self.max_failures)
    }

    /// A failed login: `INSERT ... ON DUPLICATE KEY UPDATE failures_count = failures_count + 1`.
    pub(crate) fn record_failure(&mut self, key: &str, now: Instant) {
        let expires = now + self.timeout;
        let count = match self.entries.get_mut(key) {
            Some(e) => {
                // With cron an expired row was deleted before this failure: it starts over.
                e.count = if e.expires > now || !self.cron { e.count.saturating_add(1) } else { 1 };
                e.expires = expires;
                e.count
            }
            None => {
                self.entries.insert(key.to_owned(), Entry { count: 1, expires });
                1
            }
        };
        match self.peaks.get_mut(key) {
            Some(peak) => *peak = (*peak).max(count),
            None => {
                self.peaks.insert(key.to_owned(), count);
            }
        }
    }

    /// A successful login.
    pub(crate) fn reset(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_at_max_slides_and_expires() {
        let mut t = Throttle::new(6, Duration::from_secs(10), true);
        let t0 = Instant::now();
        for i in 1..=5 {
            t.record_failure("a", t0);
            assert_eq!(t.failures("a", t0), i);
            assert!(!t.is_locked("a", t0));
        }
        t.record_failure("a", t0 + Duration::from_secs(5));
        assert!(t.is_locked("a", t0 + Duration::from_secs(5)));
        // The sixth failure moved the expiry to t0+15 s.
        assert!(t.is_locked("a", t0 + Duration::from_secs(14)));
        assert!(!t.is_locked("a", t0 + Duration::from_secs(15)));
        assert_eq!(t.failures("a", t0 + Duration::from_secs(15)), 0);
        assert_eq!(t.stored("a", t0 + Duration::from_secs(15)), 0, "the cron deleted the row");
        // After expiry, counting restarts at 1.
        t.record_failure("a", t0 + Duration::from_secs(16));
        assert_eq!(t.failures("a", t0 + Duration::from_secs(16)), 1);
        assert_eq!(t.peak("a"), 6);
        t.reset("a");
        assert_eq!(t.failures("a", t0 + Duration::from_secs(16)), 0);
        assert_eq!(t.failures("b", t0), 0);
        assert_eq!(t.peak("a"), 6, "the peak survives the reset");
    }

    #[test]
    fn without_cron_an_expired_row_keeps_its_count() {
        let mut t = Throttle::new(6, Duration::from_secs(10), false);
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        for _ in 0..5 {
            t.record_failure("a", t0);
        }
        assert_eq!((t.failures("a", later(10)), t.stored("a", later(10))), (0, 5));
        assert!(!t.is_locked("a", later(10)));
        // The sixth failure, long after the expiry, adds to the old count and locks.
        t.record_failure("a", later(100));
        assert_eq!(t.failures("a", later(100)), 6);
        assert!(t.is_locked("a", later(109)));
        assert!(!t.is_locked("a", later(110)));
        // Each later failure locks again at once.
        t.record_failure("a", later(200));
        assert!(t.is_locked("a", later(200)));
        assert_eq!(t.peak("a"), 7);
        t.reset("a");
        assert_eq!(t.stored("a", later(200)), 0);
    }

    #[test]
    fn zero_max_never_locks() {
        let mut t = Throttle::new(0, Duration::from_secs(10), true);
        let now = Instant::now();
        t.record_failure("a", now);
        assert!(!t.is_locked("a", now));
    }
}
