//! When to log in: the refresh time, the backoff after a failure, and the lockout budget.
//!
//! Pure functions of time and state: no clock, no randomness source and no I/O in here. Callers
//! pass `now` and a uniform random number in `[0, 1)`, which makes every decision testable.

use std::time::{Duration, SystemTime};

use crate::config::{LockoutReset, RefreshSettings};

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
/// Magento counts failed logins per username; at `lockout_threshold` the username is locked,
/// and then even the right password is refused with the same 401. Its count is cleared by a
/// successful login, and otherwise only by its cron job, some time after `lockout_window` has
/// passed since the last failure: a store whose cron does not run keeps counting for ever. So
/// with `lockout_reset: success` (the default) the daemon believes no count ever expires, and
/// with `window` that it expires `lockout_window` (and a thirtieth of it) after the last failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthState {
    /// 401s in a row with the password Magento refused last (another password starts again).
    pub in_a_row: u32,
    /// Failures Magento is believed to count (ours only; it may count others' too), as of the
    /// last one.
    pub chain: u32,
    pub last_failure: Option<SystemTime>,
    /// Magento refuses the password refused last whatever the timing, as long as the account
    /// stays as it is (unconfirmed): it is not sent again.
    pub final_refusal: bool,
    /// Why these counts are the worst case rather than what was recorded: the record of
    /// earlier 401s could not be read ([`AuthState::spent`]). Said wherever the customer is
    /// shown held back; gone with the next login's outcome.
    pub unreadable: Option<String>,
}

/// Where a customer stands after its 401s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthWait {
    /// No 401 outstanding: log in when the schedule says.
    Clear,
    /// Waiting the short delay after a 401 (about 1 minute, then 5).
    Backoff(SystemTime),
    /// `max_auth_failures` reached: wait out the pause (stores whose count expires).
    Paused(SystemTime),
    /// No time will help: Magento's count only goes after a success, and another failure
    /// would bring it too near the lock. Held back until the password changes (when a change
    /// could still be tried) or an operator clears the count.
    HeldBack,
}

impl AuthWait {
    /// When the wait ends by itself; `None` for `Clear` and `HeldBack`.
    pub fn until(self) -> Option<SystemTime> {
        match self {
            AuthWait::Clear | AuthWait::HeldBack => None,
            AuthWait::Backoff(t) | AuthWait::Paused(t) => Some(t),
        }
    }
}

/// The most Magento's count may reach through the daemon: two below its lock, so the app or a
/// person using the same account still has a try, and a failure of someone else's does not lock.
pub fn lockout_ceiling(r: &RefreshSettings) -> u32 {
    r.lockout_threshold.saturating_sub(2)
}

impl AuthState {
    /// The worst a record of 401s could have said, for one that cannot be read (`why`): the
    /// lockout budget spent by failures just now. Nothing is sent until an operator says the
    /// count is gone (`forget-failures`), or, where Magento's count expires, until it has.
    pub fn spent(now: SystemTime, r: &RefreshSettings, why: String) -> AuthState {
        AuthState {
            in_a_row: r.max_auth_failures.max(1),
            chain: lockout_ceiling(r),
            last_failure: Some(now),
            final_refusal: false,
            unreadable: Some(why),
        }
    }

    /// A 401 at `now`. `same_password`: the password sent was the one refused last (a new one
    /// starts `in_a_row` again; Magento's count does not care which password failed).
    pub fn record_failure(&mut self, now: SystemTime, same_password: bool, r: &RefreshSettings) {
        self.chain = self.counted(now, r).saturating_add(1);
        if !same_password {
            self.in_a_row = 0;
            self.final_refusal = false;
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.last_failure = Some(now);
        self.unreadable = None;
    }

    pub fn record_success(&mut self) {
        *self = AuthState::default();
    }

    /// When Magento's count is believed gone without a success: never with `lockout_reset:
    /// success`; with `window`, `lockout_window` after the last failure plus a thirtieth of it,
    /// for the cron job's minute and the time a 401 takes to reach us.
    pub fn resets_at(&self, r: &RefreshSettings) -> Option<SystemTime> {
        match r.lockout_reset {
            LockoutReset::Success => None,
            LockoutReset::Window => self.last_failure.map(|last| later(last, r.lockout_window + r.lockout_window / 30)),
        }
    }

    /// Failures Magento is believed to count at `now`.
    pub fn counted(&self, now: SystemTime, r: &RefreshSettings) -> u32 {
        match self.resets_at(r) {
            Some(at) if now >= at => 0,
            _ => self.chain,
        }
    }

    /// The lockout policy: whether (or when) a login may be sent at `now`. `same_password`: the
    /// password to send is the one Magento refused last (or which it was is unknown, as after a
    /// restart).
    ///
    /// - Magento's count never goes above [`lockout_ceiling`] through the daemon, and the same
    ///   password leaves one try of that budget to a changed password: a fixed Secret is tried
    ///   even after a long run with a wrong one.
    /// - After the n-th 401 in a row with one password: wait `auth_failure_delays[n-1]` (the
    ///   last repeats). After `max_auth_failures`: with `lockout_reset: window`, pause
    ///   `auth_failure_pause` (and until the count has expired), then try again; with `success`,
    ///   no time helps, so that password is never sent again.
    /// - A password not refused yet is tried at once, within the budget.
    pub fn wait(&self, same_password: bool, now: SystemTime, r: &RefreshSettings) -> AuthWait {
        let Some(last) = self.last_failure else { return AuthWait::Clear };
        // The budget: a failure now must leave Magento's count at or below the ceiling, with
        // one try to spare for a changed password.
        let reserve = u32::from(same_password);
        let budget_back_at = if self.counted(now, r).saturating_add(1 + reserve) > lockout_ceiling(r) {
            match self.resets_at(r) {
                Some(at) => Some(at),
                None => return AuthWait::HeldBack,
            }
        } else {
            None
        };
        // The password: short delays, then the pause, or never again where only a success
        // clears Magento's count.
        let password_wait = if !same_password || self.in_a_row == 0 {
            AuthWait::Clear
        } else if self.final_refusal {
            return AuthWait::HeldBack;
        } else if self.in_a_row < r.max_auth_failures {
            let i = (self.in_a_row as usize - 1).min(r.auth_failure_delays.len().saturating_sub(1));
            AuthWait::Backoff(later(last, r.auth_failure_delays.get(i).copied().unwrap_or(r.auth_failure_pause)))
        } else if r.lockout_reset == LockoutReset::Success {
            return AuthWait::HeldBack;
        } else {
            AuthWait::Paused(later(last, r.auth_failure_pause))
        };
        match (budget_back_at, password_wait.until()) {
            (Some(at), until) if until.is_none_or(|t| t < at) => AuthWait::Paused(at),
            _ => password_wait,
        }
    }
}

/// `t + d`, or the farthest time the system can hold: a wait computed from a stored time or a
/// server's value never overflows (a panic would end the daemon on every start).
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or_else(|| far_future(t))
}

/// A time so far ahead that no wait ends before it, that still leaves room for sums.
fn far_future(t: SystemTime) -> SystemTime {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    std::iter::successors(Some(CENTURY), |d| d.checked_div(2)).find_map(|d| t.checked_add(d)).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_unix_secs;

    fn settings() -> RefreshSettings {
        RefreshSettings::default()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn refresh_comes_before_expiry_minus_jitter() {
        let r = settings();
        let now = from_unix_secs(1_000_000);
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
        let now = from_unix_secs(1_000_000);
        let life = Duration::from_secs(1200);
        // 20-minute tokens, 15 minutes before expiry: 5 minutes after the login (less jitter).
        assert_eq!(next_refresh(now, now + life, life, &r, 0.0), now + Duration::from_secs(300));
        assert_eq!(next_refresh(now, now + life, life, &r, 1.0), now + Duration::from_secs(240));
    }

    #[test]
    fn before_expiry_beyond_the_lifetime_waits_a_tenth_of_it() {
        let r = settings();
        let now = from_unix_secs(1_000_000);
        let life = Duration::from_secs(600);
        assert_eq!(next_refresh(now, now + life, life, &r, 0.5), now + Duration::from_secs(60));
    }

    #[test]
    fn never_a_login_loop() {
        let r = settings();
        let now = from_unix_secs(1_000_000);
        let life = Duration::from_secs(2);
        assert_eq!(next_refresh(now, now + life, life, &r, 0.7), now + MIN_LOGIN_INTERVAL);
        // A token that expires now (adopted late, or a clock jump) still waits the floor.
        assert_eq!(next_refresh(now, now, HOUR, &r, 0.0), now + HOUR / 10);
    }

    #[test]
    fn due_when_at_most_before_expiry_is_left() {
        let now = from_unix_secs(1_000_000);
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

    fn window() -> RefreshSettings {
        RefreshSettings { lockout_reset: LockoutReset::Window, ..settings() }
    }

    #[test]
    fn a_wrong_password_waits_one_minute_then_five_then_is_held_back_for_good() {
        let r = settings();
        let t0 = from_unix_secs(1_000_000);
        let mut a = AuthState::default();
        assert_eq!(a.wait(true, t0, &r), AuthWait::Clear);
        a.record_failure(t0, true, &r);
        assert_eq!(a.wait(true, t0, &r), AuthWait::Backoff(t0 + Duration::from_secs(60)));
        let t1 = t0 + Duration::from_secs(60);
        a.record_failure(t1, true, &r);
        assert_eq!(a.wait(true, t1, &r), AuthWait::Backoff(t1 + Duration::from_secs(300)));
        let t2 = t1 + Duration::from_secs(300);
        a.record_failure(t2, true, &r);
        // Only a success clears Magento's count: no time helps the same password.
        let a_year_later = t2 + Duration::from_secs(366 * 24 * 3600);
        assert_eq!(a.wait(true, a_year_later, &r), AuthWait::HeldBack);
        assert_eq!(a.counted(a_year_later, &r), 3);
        // One try is kept for a changed password; after it, nothing at all.
        assert_eq!(a.wait(false, a_year_later, &r), AuthWait::Clear);
        a.record_failure(a_year_later, false, &r);
        assert_eq!(a.chain, lockout_ceiling(&r));
        assert_eq!(a.wait(false, a_year_later, &r), AuthWait::HeldBack);
        assert_eq!(a.wait(true, a_year_later, &r), AuthWait::HeldBack);
    }

    #[test]
    fn where_cron_runs_the_pause_outlasts_magentos_window() {
        let r = window();
        let mut a = AuthState::default();
        let mut now = from_unix_secs(1_000_000);
        for _ in 0..3 {
            a.record_failure(now, true, &r);
            now = a.wait(true, now, &r).until().unwrap();
        }
        assert_eq!(now, a.last_failure.unwrap() + r.auth_failure_pause);
        assert_eq!(a.counted(now, &r), 0, "the count has expired by the end of the pause");
        a.record_failure(now, true, &r);
        assert_eq!((a.chain, a.in_a_row), (1, 4));
        assert!(matches!(a.wait(true, now, &r), AuthWait::Paused(_)));
    }

    #[test]
    fn a_new_password_is_tried_at_once_but_never_into_the_lock() {
        for r in [settings(), window()] {
            let mut a = AuthState::default();
            let mut now = from_unix_secs(1_000_000);
            // Wrong passwords in a row, each replaced right after its 401.
            for expected_chain in 1..=4 {
                assert_eq!(a.wait(false, now, &r), AuthWait::Clear, "before failure {expected_chain}");
                a.record_failure(now, false, &r);
                assert_eq!(a.chain, expected_chain);
                assert_eq!(a.in_a_row, 1, "a new password starts again");
                now += Duration::from_secs(10);
            }
            // Four counted: a fifth would leave Magento one failure from its lock at six.
            match r.lockout_reset {
                LockoutReset::Success => assert_eq!(a.wait(false, now, &r), AuthWait::HeldBack),
                LockoutReset::Window => assert_eq!(a.wait(false, now, &r), AuthWait::Paused(a.resets_at(&r).unwrap())),
            }
        }
    }

    #[test]
    fn success_clears_everything() {
        let r = settings();
        let mut a = AuthState::default();
        a.record_failure(from_unix_secs(1), true, &r);
        a.record_success();
        assert_eq!(a, AuthState::default());
        assert_eq!(a.wait(true, from_unix_secs(2), &r), AuthWait::Clear);
    }

    /// The promise to Magento, over many random runs: whatever the password does and whenever
    /// the daemon is let to try, Magento's count never passes the ceiling: without cron (every
    /// failure counts until a success) under `success`, with cron under `window`.
    #[test]
    fn no_run_of_wrong_passwords_passes_the_ceiling() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for r in [settings(), window()] {
            for _ in 0..200 {
                let mut a = AuthState::default();
                let mut now = from_unix_secs(1_000_000);
                let (mut magento, mut expires) = (0u32, now);
                let mut same = true;
                for _ in 0..300 {
                    now += Duration::from_secs(rng.gen_range(0..3600));
                    if rng.gen_bool(0.2) {
                        same = false;
                    }
                    if r.lockout_reset == LockoutReset::Window && now >= expires {
                        magento = 0; // the store's cron deleted the expired row
                    }
                    let wait = a.wait(same, now, &r);
                    if wait == AuthWait::Clear || wait.until().is_some_and(|t| t <= now) {
                        magento += 1;
                        expires = now + r.lockout_window;
                        assert!(
                            magento <= lockout_ceiling(&r),
                            "{:?}: Magento's count reached {magento}",
                            r.lockout_reset
                        );
                        a.record_failure(now, same, &r);
                        same = true;
                    }
                }
            }
        }
    }

    /// Where cron runs, over a day: no 30-minute window sees more than `max_auth_failures`
    /// failures with one password, and a paused customer tries once per pause.
    #[test]
    fn a_day_of_wrong_passwords_where_cron_runs() {
        let r = window();
        let mut a = AuthState::default();
        let mut now = from_unix_secs(1_000_000);
        let end = now + Duration::from_secs(24 * 3600);
        let mut attempts = Vec::new();
        while now < end {
            attempts.push(now);
            a.record_failure(now, true, &r);
            now = a.wait(true, now, &r).until().unwrap();
        }
        for (i, t) in attempts.iter().enumerate() {
            let in_window = attempts[i..].iter().take_while(|u| **u < *t + r.lockout_window).count();
            assert!(in_window <= r.max_auth_failures as usize, "{in_window} attempts within 30 minutes");
        }
        assert_eq!(attempts.len(), 3 + (24 * 60 - 6 - 1) / 31);
        for pair in attempts[2..].windows(2) {
            assert_eq!(pair[1].duration_since(pair[0]).unwrap(), r.auth_failure_pause);
        }
    }
}
