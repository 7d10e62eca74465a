//! Magento accounts as the daemon knows them: one per username, shared by every worker (and every
//! successor of a worker after a reload) that logs in with it.
//!
//! Magento counts failed logins per username, for the whole installation, whichever store, base
//! URL or process sent them. So the lockout budget is kept per username: what is known of its
//! 401s, the password refused last, and a turn to log in, so that one login is decided knowing
//! how the one before went. The registry is owned by whoever runs the workers (the supervisor,
//! or `once`) and handed to them; a worker restarted by a reload, even one that renamed the
//! customer or its file, finds what its predecessor learnt.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::config::{CustomerConfig, RefreshSettings};
use crate::schedule::{AuthState, AuthWait};
use crate::secret::Secret;

/// Every account of the usernames configured now.
#[derive(Default)]
pub struct Accounts {
    by_username: Mutex<HashMap<String, Arc<Account>>>,
}

impl Accounts {
    pub fn new() -> Accounts {
        Accounts::default()
    }

    /// The account of `customer`'s username (compared without case, as Magento does).
    pub fn of(&self, customer: &CustomerConfig) -> Arc<Account> {
        let mut map = self.by_username.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(customer.username.to_lowercase()).or_default().clone()
    }

    /// Forgets the accounts no worker holds any more (their customers were removed): what they
    /// knew of recent 401s is also in the ledger beside the token file.
    pub fn prune(&self) {
        let mut map = self.by_username.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, account| Arc::strong_count(account) > 1);
    }

    pub fn len(&self) -> usize {
        self.by_username.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One username's lockout budget.
#[derive(Default)]
pub struct Account {
    /// One login of this account at a time: the next one is decided knowing how the last went.
    pub(crate) turn: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    auth: AuthState,
    /// The password Magento refused last; `None` with 401s recorded means unknown (restored
    /// from a ledger while the password could not be read), taken as the same one.
    refused: Option<Secret>,
    /// A digest of the password Magento accepted last, in this process: a login with it needs
    /// no booking beforehand (see [`Account::proven`]). Memory only.
    accepted: Option<u64>,
}

impl State {
    fn same_password(&self, password: &Secret) -> bool {
        self.refused.as_ref().is_none_or(|refused| refused == password)
    }
}

impl Account {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in the 401s an earlier process recorded (the ledger beside a token file), unless
    /// this account knows of a later one. Which password failed is never recorded: the one
    /// configured now is taken as refused, so that a change from here on is tried at once.
    pub fn restore(&self, recorded: AuthState, password_now: Option<Secret>) {
        let mut state = self.state();
        if state.auth.last_failure < recorded.last_failure {
            state.auth = recorded;
            state.refused = password_now;
        }
    }

    /// The lockout policy ([`AuthState::wait`]) for sending `password` at `now`.
    pub fn wait(&self, password: &Secret, now: SystemTime, r: &RefreshSettings) -> AuthWait {
        let state = self.state();
        state.auth.wait(state.same_password(password), now, r)
    }

    /// Where the account stands at `now` for the password refused last: the wait a worker
    /// shows while nothing changes.
    pub fn standing(&self, now: SystemTime, r: &RefreshSettings) -> AuthWait {
        self.state().auth.wait(true, now, r)
    }

    /// The password refused last, when a change of password would end the wait in force at
    /// `now` sooner: the one a waiting worker compares the password source with.
    pub fn refused_password(&self, now: SystemTime, r: &RefreshSettings) -> Option<Secret> {
        let state = self.state();
        let same = state.auth.wait(true, now, r);
        let changed = state.auth.wait(false, now, r);
        if same == AuthWait::Clear || same == changed {
            return None;
        }
        state.refused.clone()
    }

    /// Forgets every recorded failure: an operator reset Magento's count and said so
    /// (`forget-failures`).
    pub fn forget(&self) {
        *self.state() = State::default();
    }

    /// A 401 for `password` at `now`; returns what is now known (for the ledger).
    pub fn record_failure(&self, password: &Secret, now: SystemTime, r: &RefreshSettings) -> AuthState {
        let mut state = self.state();
        let same = state.same_password(password);
        state.auth.record_failure(now, same, r);
        state.refused = Some(password.clone());
        state.auth.clone()
    }

    /// The password just refused will be refused whatever the timing (an unconfirmed account).
    pub fn refused_for_good(&self) {
        self.state().auth.final_refusal = true;
    }

    /// The customer's configuration changed (a reload): a refusal for good may no longer hold.
    pub fn configuration_changed(&self) {
        self.state().auth.final_refusal = false;
    }

    /// A successful login with `password`: Magento's count for the username is gone.
    pub fn record_success(&self, password: &Secret) {
        *self.state() = State { accepted: Some(digest(password)), ..State::default() };
    }

    /// Whether Magento accepted `password` for this username last (in this process), with no
    /// 401 since: a login with it is expected to succeed.
    pub fn proven(&self, password: &Secret) -> bool {
        let state = self.state();
        state.auth.last_failure.is_none() && state.accepted == Some(digest(password))
    }

    /// What would be known after a 401 for `password` at `now`, without recording it: what a
    /// login is booked as before it is sent.
    pub fn if_refused(&self, password: &Secret, now: SystemTime, r: &RefreshSettings) -> AuthState {
        let state = self.state();
        let mut auth = state.auth.clone();
        auth.record_failure(now, state.same_password(password), r);
        auth
    }

    /// What is known of the account's 401s.
    pub fn auth(&self) -> AuthState {
        self.state().auth.clone()
    }
}

/// A digest of a password, to compare with another in memory (never stored or shown).
fn digest(password: &Secret) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    password.expose().hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::from_unix_secs;
    use crate::config::{Checks, RefreshSettings};

    fn customers(yaml_customers: &str) -> Vec<CustomerConfig> {
        let text =
            format!("magento:\n  base_url: http://127.0.0.1:1\noutput:\n  dir: /tmp\ncustomers:\n{yaml_customers}");
        crate::config::parse(&text, Checks::Static).unwrap().customers
    }

    #[test]
    fn one_account_per_username_whatever_the_case_or_base_url() {
        let c = customers(
            "  - name: a\n    username: A@x.com\n    password_env: X\n  - name: b\n    username: b@x.com\n    password_env: X\n    base_url: http://127.0.0.2:1\n",
        );
        let mut renamed = c[0].clone();
        renamed.name = "a2".into();
        renamed.username = "a@X.com".into();
        renamed.base_url = std::sync::Arc::new("http://127.0.0.3:1".parse().unwrap());
        let accounts = Accounts::new();
        let a = accounts.of(&c[0]);
        assert!(Arc::ptr_eq(&a, &accounts.of(&renamed)));
        let b = accounts.of(&c[1]);
        assert!(!Arc::ptr_eq(&a, &b));
        drop(b);
        accounts.prune();
        assert_eq!(accounts.len(), 1, "b's account is held by no worker");
    }

    #[test]
    fn the_refused_password_is_the_one_fact_a_waiting_worker_watches() {
        let r = RefreshSettings::default();
        let account = Account::default();
        let (wrong, fixed) = (Secret::new("wrong".into()), Secret::new("fixed".into()));
        let t0 = from_unix_secs(1_800_000_000);
        assert_eq!(account.wait(&wrong, t0, &r), AuthWait::Clear);
        assert_eq!(account.refused_password(t0, &r), None);
        account.record_failure(&wrong, t0, &r);
        assert_eq!(account.wait(&wrong, t0, &r), AuthWait::Backoff(t0 + Duration::from_secs(60)));
        assert_eq!(account.wait(&fixed, t0, &r), AuthWait::Clear, "a new password is tried at once");
        assert_eq!(account.refused_password(t0, &r), Some(wrong.clone()));
        account.record_success(&wrong);
        assert_eq!(account.auth(), AuthState::default());
        assert_eq!(account.refused_password(t0, &r), None);
    }

    #[test]
    fn a_restored_ledger_takes_the_password_of_now_as_refused() {
        let r = RefreshSettings::default();
        let account = Account::default();
        let t0 = from_unix_secs(1_800_000_000);
        let recorded = AuthState { in_a_row: 3, chain: 3, last_failure: Some(t0), ..AuthState::default() };
        let now = Secret::new("now".into());
        account.restore(recorded.clone(), Some(now.clone()));
        // Three 401s of four allowed: the same password never again (only a success clears
        // Magento's count), another one once.
        assert_eq!(account.wait(&now, t0, &r), AuthWait::HeldBack);
        assert_eq!(account.wait(&Secret::new("other".into()), t0, &r), AuthWait::Clear);
        // An older record changes nothing; unknown password counts as the refused one.
        account.restore(AuthState { last_failure: Some(t0 - Duration::from_secs(1)), ..recorded.clone() }, None);
        assert_eq!(account.refused_password(t0, &r), Some(now));
        let unknown = Account::default();
        unknown.restore(recorded, None);
        assert_eq!(unknown.wait(&Secret::new("any".into()), t0, &r), AuthWait::HeldBack);
        assert_eq!(unknown.refused_password(t0, &r), None, "nothing to compare a change with");
    }
}
