//! The customer's own lock (Magento_Customer's `Model/Authentication.php` with the
//! `customer_entity` columns `failures_num`, `first_failure`, `lock_expires`), per customer.
//!
//! Separate from the brute-force throttle and reproduced line for line:
//! - every wrong password of an existing customer adds one (`processAuthenticationFailure`);
//!   the failure that reaches `customer/password/lockout_failures` locks the customer for
//!   `lockout_threshold`; there is no time window, the count only starts over at the first
//!   failure after a lock expired;
//! - while locked, every login fails before the password is even checked, and such
//!   refusals are not counted here (the token endpoint still counts them in its throttle);
//! - only a storefront login (`customer_login` in the frontend area) unlocks and clears the
//!   count: a token login does not, so the count survives successful REST logins;
//! - a limit or duration of 0 disables the whole mechanism.

use std::time::{Duration, Instant};

/// `customer/password/lockout_failures` and `lockout_threshold`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LockoutPolicy {
    pub(crate) max_failures: u32,
    pub(crate) duration: Duration,
}

/// One customer's lock columns.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Lockout {
    failures: u32,
    /// `first_failure` is set (its date matters to nothing but this test).
    first_failure: bool,
    lock_expires: Option<Instant>,
}

impl Lockout {
    /// `Customer::isCustomerLocked`: the lock expiry is ahead.
    pub(crate) fn is_locked(&self, now: Instant) -> bool {
        self.lock_expires.is_some_and(|t| t > now)
    }

    /// `Authentication::processAuthenticationFailure`.
    pub(crate) fn record_failure(&mut self, policy: LockoutPolicy, now: Instant) {
        if policy.max_failures == 0 || policy.duration.is_zero() {
            return;
        }
        let failures = self.failures.saturating_add(1);
        let lock_expired = self.lock_expires.is_some_and(|t| now > t);
        if failures == 1 || !self.first_failure || lock_expired {
            // A first failure, or the first after a lock: counting starts over, unlocked.
            *self = Lockout { failures: 1, first_failure: true, lock_expires: None };
        } else {
            if failures >= policy.max_failures {
                self.lock_expires = Some(now + policy.duration);
            }
            self.failures = failures;
        }
    }

    /// `Authentication::unlock`, what a storefront login does.
    pub(crate) fn unlock(&mut self) {
        *self = Lockout::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: LockoutPolicy = LockoutPolicy { max_failures: 3, duration: Duration::from_secs(10) };

    #[test]
    fn locks_at_the_limit_and_starts_over_after_expiry() {
        let mut l = Lockout::default();
        let t0 = Instant::now();
        l.record_failure(POLICY, t0);
        l.record_failure(POLICY, t0);
        assert!(!l.is_locked(t0));
        l.record_failure(POLICY, t0 + Duration::from_secs(1));
        assert!(l.is_locked(t0 + Duration::from_secs(10)));
        assert!(!l.is_locked(t0 + Duration::from_secs(11)));
        // The first failure after the lock expired counts as the first one.
        l.record_failure(POLICY, t0 + Duration::from_secs(12));
        assert_eq!(l.failures, 1);
        assert!(!l.is_locked(t0 + Duration::from_secs(12)));
        l.unlock();
        assert_eq!(l.failures, 0);
    }

    #[test]
    fn a_limit_of_one_locks_at_the_second_failure_as_magento_does() {
        let mut l = Lockout::default();
        let policy = LockoutPolicy { max_failures: 1, ..POLICY };
        let now = Instant::now();
        l.record_failure(policy, now);
        assert!(!l.is_locked(now));
        l.record_failure(policy, now);
        assert!(l.is_locked(now));
    }

    #[test]
    fn zero_disables() {
        let mut l = Lockout::default();
        let now = Instant::now();
        for policy in
            [LockoutPolicy { max_failures: 0, ..POLICY }, LockoutPolicy { duration: Duration::ZERO, ..POLICY }]
        {
            for _ in 0..5 {
                l.record_failure(policy, now);
            }
            assert!(!l.is_locked(now));
            assert_eq!(l.failures, 0);
        }
    }
}
