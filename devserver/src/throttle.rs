//! Magento's brute-force throttle for token requests (Integration module's
//! RequestThrottler with the `oauth_token_request_log` table), per username.
//!
//! Reproduced exactly because the daemon's whole retry policy exists to stay clear of it:
//! - every failed login adds one and moves the lock expiry to now + timeout (sliding);
//! - an entry whose expiry has passed is as good as gone (Magento's cron deletes such
//!   rows), so the next failure starts again at 1;
//! - while count >= max and the expiry is in the future, every login is refused with
//!   the same 401 as a wrong password and is NOT counted;
//! - a successful login deletes the entry.
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
    entries: HashMap<String, Entry>,
}

impl Throttle {
    pub(crate) fn new(max_failures: u32, timeout: Duration) -> Throttle {
        Throttle { max_failures, timeout, entries: HashMap::new() }
    }

    fn live(&self, key: &str, now: Instant) -> Option<Entry> {
        self.entries.get(key).copied().filter(|e| e.expires > now)
    }

    /// The current failure count (0 once the entry has expired or was reset).
    pub(crate) fn failures(&self, key: &str, now: Instant) -> u32 {
        self.live(key, now).map_or(0, |e| e.count)
    }

    /// Whether a login of this username is refused right now whatever its password.
    /// A maximum of 0 disables the lock (Magento would otherwise lock everyone out).
    pub(crate) fn is_locked(&self, key: &str, now: Instant) -> bool {
        self.max_failures > 0 && self.live(key, now).is_some_and(|e| e.count >= self.max_failures)
    }

    /// A wrong password or unknown username.
    pub(crate) fn record_failure(&mut self, key: &str, now: Instant) {
        let expires = now + self.timeout;
        match self.entries.get_mut(key) {
            Some(e) if e.expires > now => {
                e.count = e.count.saturating_add(1);
                e.expires = expires;
            }
            Some(e) => *e = Entry { count: 1, expires },
            None => {
                self.entries.insert(key.to_owned(), Entry { count: 1, expires });
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
        let mut t = Throttle::new(6, Duration::from_secs(10));
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
        // After expiry, counting restarts at 1.
        t.record_failure("a", t0 + Duration::from_secs(16));
        assert_eq!(t.failures("a", t0 + Duration::from_secs(16)), 1);
        t.reset("a");
        assert_eq!(t.failures("a", t0 + Duration::from_secs(16)), 0);
        assert_eq!(t.failures("b", t0), 0);
    }

    #[test]
    fn zero_max_never_locks() {
        let mut t = Throttle::new(0, Duration::from_secs(10));
        let now = Instant::now();
        t.record_failure("a", now);
        assert!(!t.is_locked("a", now));
    }
}
