//! When to log in: the refresh time, the backoff after a failure, and the lockout budget.
//!
//! Pure functions of time and state: no clock, no randomness source and no I/O in here. Callers
//! pass `now` and a uniform random number in `[0, 1)`, which makes every decision testable.

use std::time::{Duration, SystemTime};

use crate::config::RefreshSettings;

/// Never plan two logins of one customer closer than this after a success, whatever the token's
/// lifetime: a store that hands out tokens with a few seconds of life must not turn the daemon
/// into a login loop.
pub const MIN_LOGIN_INTERVAL: Duration = Duration::from_secs(5);

/// When to log in again after obtaining a token at `now` that expires at `expires_at` and
/// lives `lifetime` in all: `expires_at - before_expiry - random(0, jitter)`.
///
/// When `before_expiry` is close to (or beyond) the token's lifetime, that would be at once,
/// every time: the plan is then never sooner than a tenth of the lifetime (and
/// [`MIN_LOGIN_INTERVAL`]) after this login, so a fresh token is used for a while first.
pub fn next_refresh(
    now: SystemTime,
    expires_at: SystemTime,
    lifetime: Duration,
    r: &RefreshSettings,
    random: f64,
) -> SystemTime {
    let jitter = r.jitter.mul_f64(random.clamp(0.0, 1.0));
    let planned = expires_at.checked_sub(r.before_expiry + jitter).unwrap_or(now);
    planned.max(now + (lifetime / 10).max(MIN_LOGIN_INTERVAL))
}

/// Whether a token that expires at `expires_at` is due for a refresh at `now`, i.e. has no more
/// than `before_expiry` of life left. Used to decide whether a token found on disk may be kept.
pub fn is_due(now: SystemTime, expires_at: SystemTime, before_expiry: Duration) -> bool {
    expires_at.duration_since(now).map_or(true, |left| left <= before_expiry)
}

/// The wait after the `failures`-th transient failure in a row (1 for the first).
///
/// Exponential from `min_backoff`, doubling up to `max_backoff`, with full jitter above the
/// floor: uniformly between `min_backoff` and the current cap, so many customers failing
/// together do not retry together. A `Retry-After` is honoured but capped at `max_backoff`.
pub fn backoff(failures: u32, r: &RefreshSettings, retry_after: Option<Duration>, random: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(32);
    let cap = r.min_backoff.saturating_mul(1u32 << doublings.min(31)).min(r.max_backoff);
    let wait = r.min_backoff + (cap.saturating_sub(r.min_backoff)).mul_f64(random.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => wait.max(asked.min(r.max_backoff)),
        None => wait,
    }
}

/// What the daemon knows of one username's failed logins: the basis of the lockout budget, and
/// with [`AuthState::wait`] the one lockout policy every login goes through.
///
/// Magento counts failed logins per username; each failure pushes the lock expiry to
/// `now + lockout_window`, and the count starts over only after a success or once that expiry
/// has passed. At `lockout_threshold` failures the username is locked, and then even the right
/// password is refused. Magento's 401 never says which, so the daemon keeps its own count and
/// stays below the threshold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthState {
    /// 401s in a row with the password Magento refused last (another password starts again).
    pub in_a_row: u32,
    /// Failures Magento is believed to count now (ours only; it may count others' too).
    pub chain: u32,
    pub last_failure: Option<SystemTime>,
}

/// Where a customer stands after its 401s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthWait {
    /// No 401 outstanding: log in when the schedule says.
    Clear,
    /// Waiting the short delay after a 401 (about 1 minute, then 5).
    Backoff(SystemTime),
    /// `max_auth_failures` reached (or Magento's count is near its lock): wait out the pause,
    /// or until the password changes.
    Paused(SystemTime),
}

impl AuthWait {
    pub fn until(self) -> Option<SystemTime> {
        match self {
            AuthWait::Clear => None,
            AuthWait::Backoff(t) | AuthWait::Paused(t) => Some(t),
        }
    }
}

impl AuthState {
    /// A 401 at `now`. `same_password`: the password sent was the one refused last (a new one
    /// starts `in_a_row` again; Magento's count does not care which password failed, so `chain`
    /// goes on).
    pub fn record_failure(&mut self, now: SystemTime, same_password: bool, r: &RefreshSettings) {
        if self.chain_expired(now, r) {
            self.chain = 0;
        }
        if !same_password {
            self.in_a_row = 0;
        }
        self.chain += 1;
        self.in_a_row += 1;
        self.last_failure = Some(now);
    }

    pub fn record_success(&mut self) {
        *self = AuthState::default();
    }

    fn chain_expired(&self, now: SystemTime, r: &RefreshSettings) -> bool {
        self.last_failure.is_none_or(|last| now >= last + r.lockout_window)
    }

    /// Whether another failure could leave no margin before Magento's lock: then no password
    /// is sent until the pause is over, and a change of password cannot shorten the wait.
    pub fn near_lock(&self, r: &RefreshSettings) -> bool {
        self.last_failure.is_some() && self.chain + 2 >= r.lockout_threshold
    }

    /// Failures Magento still counts at `now`.
    pub fn counted(&self, now: SystemTime, r: &RefreshSettings) -> u32 {
        if self.chain_expired(now, r) {
            0
        } else {
            self.chain
        }
    }

    /// The lockout policy: when a login may be sent. `same_password`: the password to send is
    /// the one Magento refused last (or which it was is unknown, as after a restart).
    ///
    /// After the n-th 401 in a row with one password: wait `auth_failure_delays[n-1]` (the last
    /// repeats), and after `max_auth_failures` wait `auth_failure_pause`, which outlasts
    /// Magento's window so its count starts over. A password not refused yet is tried at once.
    /// Whatever the password, a login that could be the last failure before Magento's lock is
    /// never sent: one failure of margin is kept for the app or a person using the same account.
    pub fn wait(&self, same_password: bool, r: &RefreshSettings) -> AuthWait {
        let Some(last) = self.last_failure else { return AuthWait::Clear };
        if self.near_lock(r) || (same_password && self.in_a_row >= r.max_auth_failures) {
            return AuthWait::Paused(last + r.auth_failure_pause);
        }
        match self.in_a_row {
            _ if !same_password => AuthWait::Clear,
            0 => AuthWait::Clear,
            n => {
                let i = (n as usize - 1).min(r.auth_failure_delays.len().saturating_sub(1));
                AuthWait::Backoff(last + r.auth_failure_delays.get(i).copied().unwrap_or(r.auth_failure_pause))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::from_unix;

    fn settings() -> RefreshSettings {
        RefreshSettings::default()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn refresh_comes_before_expiry_minus_jitter() {
        let r = settings();
        let now = from_unix(1_000_000);
        let exp = now + HOUR;
        assert_eq!(next_refresh(now, exp, HOUR, &r, 0.0), exp - Duration::from_secs(15 * 60));
        assert_eq!(next_refresh(now, exp, HOUR, &r, 0.5), exp - Duration::from_secs(15 * 60 + 30));
        assert_eq!(
            next_refresh(now, exp, HOUR, &r, 0.999_999),
            exp - Duration::from_secs(15 * 60 + 60) + Duration::from_micros(60)
        );
    }

    #[test]
    fn short_tokens_follow_before_expiry_too() {
        let r = settings();
        let now = from_unix(1_000_000);
        let life = Duration::from_secs(1200);
        // 20-minute tokens, 15 minutes before expiry: 5 minutes after the login (less jitter).
        assert_eq!(next_refresh(now, now + life, life, &r, 0.0), now + Duration::from_secs(300));
        assert_eq!(next_refresh(now, now + life, life, &r, 1.0), now + Duration::from_secs(240));
    }

    #[test]
    fn before_expiry_beyond_the_lifetime_waits_a_tenth_of_it() {
        let r = settings();
        let now = from_unix(1_000_000);
        let life = Duration::from_secs(600);
        assert_eq!(next_refresh(now, now + life, life, &r, 0.5), now + Duration::from_secs(60));
    }

    #[test]
    fn never_a_login_loop() {
        let r = settings();
        let now = from_unix(1_000_000);
        let life = Duration::from_secs(2);
        assert_eq!(next_refresh(now, now + life, life, &r, 0.7), now + MIN_LOGIN_INTERVAL);
        // A token that expires now (adopted late, or a clock jump) still waits the floor.
        assert_eq!(next_refresh(now, now, HOUR, &r, 0.0), now + HOUR / 10);
    }

    #[test]
    fn due_when_at_most_before_expiry_is_left() {
        let now = from_unix(1_000_000);
        let before = Duration::from_secs(900);
        assert!(!is_due(now, now + Duration::from_secs(901), before));
        assert!(is_due(now, now + Duration::from_secs(900), before));
        assert!(is_due(now, now - Duration::from_secs(1), before));
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_a_floor() {
        let r = settings();
        let s = Duration::from_secs;
        assert_eq!(backoff(1, &r, None, 0.0), s(1));
        assert_eq!(backoff(1, &r, None, 0.99), s(1));
        assert_eq!(backoff(2, &r, None, 1.0), s(2));
        assert_eq!(backoff(4, &r, None, 1.0), s(8));
        assert_eq!(backoff(4, &r, None, 0.0), s(1));
        assert_eq!(backoff(4, &r, None, 0.5), Duration::from_millis(4500));
        assert_eq!(backoff(9, &r, None, 1.0), s(256));
        assert_eq!(backoff(10, &r, None, 1.0), s(300));
        assert_eq!(backoff(u32::MAX, &r, None, 1.0), s(300));
    }

    #[test]
    fn retry_after_is_honoured_up_to_max_backoff() {
        let r = settings();
        let s = Duration::from_secs;
        assert_eq!(backoff(1, &r, Some(s(30)), 0.0), s(30));
        assert_eq!(backoff(1, &r, Some(s(3600)), 0.0), s(300));
        // A Retry-After shorter than the backoff does not shorten it.
        assert_eq!(backoff(4, &r, Some(s(1)), 1.0), s(8));
    }

    #[test]
    fn a_wrong_password_waits_one_minute_then_five_then_pauses() {
        let r = settings();
        let t0 = from_unix(1_000_000);
        let mut a = AuthState::default();
        assert_eq!(a.wait(true, &r), AuthWait::Clear);
        a.record_failure(t0, true, &r);
        assert_eq!(a.wait(true, &r), AuthWait::Backoff(t0 + Duration::from_secs(60)));
        let t1 = t0 + Duration::from_secs(60);
        a.record_failure(t1, true, &r);
        assert_eq!(a.wait(true, &r), AuthWait::Backoff(t1 + Duration::from_secs(300)));
        let t2 = t1 + Duration::from_secs(300);
        a.record_failure(t2, true, &r);
        assert_eq!(a.wait(true, &r), AuthWait::Paused(t2 + Duration::from_secs(31 * 60)));
    }

    #[test]
    fn after_the_pause_magentos_count_has_expired() {
        let r = settings();
        let mut a = AuthState::default();
        let mut now = from_unix(1_000_000);
        for _ in 0..3 {
            a.record_failure(now, true, &r);
            now = a.wait(true, &r).until().unwrap();
        }
        assert_eq!(a.counted(now, &r), 0);
        a.record_failure(now, true, &r);
        assert_eq!(a.chain, 1);
        assert_eq!(a.in_a_row, 4);
        assert!(matches!(a.wait(true, &r), AuthWait::Paused(_)));
    }

    #[test]
    fn a_new_password_is_tried_at_once_but_never_into_the_lock() {
        let r = settings();
        let mut a = AuthState::default();
        let mut now = from_unix(1_000_000);
        // Four wrong passwords in a row, each replaced right after its 401.
        for expected_chain in 1..=4 {
            a.record_failure(now, false, &r);
            assert_eq!(a.chain, expected_chain);
            assert_eq!(a.in_a_row, 1, "a new password starts again");
            assert!(matches!(a.wait(true, &r), AuthWait::Backoff(_) | AuthWait::Paused(_)));
            if expected_chain < 4 {
                assert_eq!(a.wait(false, &r), AuthWait::Clear, "after {expected_chain} failures");
                assert!(!a.near_lock(&r));
            }
            now += Duration::from_secs(10);
        }
        // Four failures counted: a fifth would leave no margin before Magento's lock at six.
        let last = now - Duration::from_secs(10);
        assert!(a.near_lock(&r));
        assert_eq!(a.wait(false, &r), AuthWait::Paused(last + r.auth_failure_pause));
        assert_eq!(a.wait(true, &r), AuthWait::Paused(last + r.auth_failure_pause));
    }

    #[test]
    fn success_clears_everything() {
        let r = settings();
        let mut a = AuthState::default();
        a.record_failure(from_unix(1), true, &r);
        a.record_success();
        assert_eq!(a, AuthState::default());
        assert_eq!(a.wait(true, &r), AuthWait::Clear);
    }

    /// The promise to Magento, checked over a long simulated run: whatever the password does,
    /// no 30-minute window sees more than `max_auth_failures` failures with one password, and
    /// Magento's count never reaches its lock.
    #[test]
    fn a_day_of_wrong_passwords_never_locks() {
        let r = settings();
        let mut a = AuthState::default();
        let mut now = from_unix(1_000_000);
        let end = now + Duration::from_secs(24 * 3600);
        let mut attempts = Vec::new();
        let mut magento_count = 0u32;
        let mut magento_expiry = now;
        while now < end {
            if now >= magento_expiry {
                magento_count = 0;
            }
            assert!(magento_count < r.lockout_threshold, "Magento would lock at {now:?}");
            attempts.push(now);
            magento_count += 1;
            magento_expiry = now + r.lockout_window;
            a.record_failure(now, true, &r);
            now = a.wait(true, &r).until().unwrap();
        }
        for (i, t) in attempts.iter().enumerate() {
            let in_window = attempts[i..].iter().take_while(|u| **u < *t + r.lockout_window).count();
            assert!(in_window <= r.max_auth_failures as usize, "{in_window} attempts within 30 minutes");
        }
        // Three attempts in the first 6 minutes, then one per pause: a paused customer retries
        // its password once every 31 minutes until it changes.
        assert_eq!(attempts.len(), 3 + (24 * 60 - 6 - 1) / 31);
        for pair in attempts[2..].windows(2) {
            assert_eq!(pair[1].duration_since(pair[0]).unwrap(), r.auth_failure_pause);
        }
    }
}
