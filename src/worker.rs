//! One customer's loop: adopt the token on disk or log in, write the file, plan the next
//! login, and back off on failure, without ever risking Magento's brute-force lock.
//!
//! ```text
//!   start ─► token on disk still good and Magento agrees? ── yes ─► wait for the refresh time
//!                 │ no                                                     │
//!                 ▼                                                        ▼
//!          ┌─► login ─► 200 + token of the accepted form ─► write file ─► plan next refresh
//!          │     ├── 401 ─────────────► wait 1 min, 5 min, then pause (or until the password changes)
//!          │     └── anything else ───► back off (doubling, jittered, Retry-After honoured)
//!          └───────────────────────────────────────────────────────────────┘
//! ```
//!
//! A stop request interrupts waits only: a login in flight and its write finish first, so a
//! token Magento has issued is not thrown away and no file is left half done.
//!
//! Magento counts failed logins per username, whichever worker sent them. So every worker that
//! logs in as one username (at one base URL) shares one `Account` for the life of the process:
//! what is known of its 401s, and a turn to log in. A worker restarted by a reload finds what
//! its predecessor learnt, even when the reload renamed the customer or its file (the ledger
//! beside the old file does not follow), and no two workers can spend one lockout budget twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{CustomerConfig, Format, RefreshSettings};
use crate::magento::{Client, LoginError};
use crate::metrics::Outcome;
use crate::schedule::{self, AuthState, AuthWait};
use crate::secret::Secret;
use crate::sink;
use crate::status::{Reporter, State};
use crate::token::{self, Expiry};

/// How often the password source is re-read while waiting after a 401: a Secret rotated by
/// Kubernetes (an atomic symlink swap) is noticed within this time.
pub const PASSWORD_POLL: Duration = Duration::from_secs(2);

/// What every worker shares with the others.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub refresh: Arc<RefreshSettings>,
    pub format: Format,
    pub mode: u32,
    /// Bounds logins in flight over all customers.
    pub logins: Arc<Semaphore>,
}

/// One Magento account (a username at a base URL) as every worker logging in with it sees it.
struct Account {
    /// One login of this account at a time: the next one is decided knowing how the last went.
    turn: tokio::sync::Mutex<()>,
    state: Mutex<AccountState>,
}

#[derive(Default)]
struct AccountState {
    auth: AuthState,
    /// The password Magento refused last: another one deserves a try at once.
    refused: Option<Secret>,
}

impl Account {
    /// The account of `customer`'s username at its base URL, shared for the life of the process
    /// (a handful of usernames: never freed, so a reload that restarts every worker keeps it).
    fn of(customer: &CustomerConfig) -> Arc<Account> {
        static ACCOUNTS: OnceLock<Mutex<HashMap<String, Arc<Account>>>> = OnceLock::new();
        let key = format!("{} {}", customer.base_url, customer.username.to_lowercase());
        let mut accounts = ACCOUNTS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        accounts
            .entry(key)
            .or_insert_with(|| Arc::new(Account { turn: tokio::sync::Mutex::new(()), state: Mutex::default() }))
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, AccountState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, r: &RefreshSettings) -> AuthWait {
        self.state().auth.wait(r)
    }
}

/// A token obtained and checked, not yet (or not successfully) written.
struct Obtained {
    token: Secret,
    obtained_at: SystemTime,
    expiry: Expiry,
}

pub struct Worker {
    customer: Arc<CustomerConfig>,
    shared: Shared,
    report: Reporter,
    stop: CancellationToken,
    /// This customer's Magento account, shared with every worker that logs in as it (this
    /// worker's predecessors before a reload included).
    account: Arc<Account>,
    /// The password this worker is held back with (refused, to this worker or an earlier one
    /// for the same username), to notice when it changes.
    failed_password: Option<Secret>,
    /// Transient failures in a row, for the backoff.
    transient: u32,
    /// A token that could not be written yet: written on the next try without a new login.
    pending: Option<Obtained>,
    warned_skew: bool,
}

/// Why a wait ended.
enum Woken {
    Due,
    PasswordChanged,
    Stopped,
}

impl Worker {
    pub fn new(customer: Arc<CustomerConfig>, shared: Shared, report: Reporter, stop: CancellationToken) -> Worker {
        Worker {
            account: Account::of(&customer),
            customer,
            shared,
            report,
            stop,
            failed_password: None,
            transient: 0,
            pending: None,
            warned_skew: false,
        }
    }

    /// Runs until the stop token is cancelled. `adopt`: the token on disk may be kept when
    /// Magento still accepts it for this username.
    ///
    /// A plain function returning the future, not an `async fn`: an `async fn` would keep a
    /// second, dead copy of the worker beside the one moved into the block, in every idle task.
    /// The rare, large steps (start, login, write) are boxed for the same reason: the task keeps
    /// only what an idle wait needs.
    pub fn run(mut self, adopt: bool) -> impl std::future::Future<Output = ()> {
        let span = tracing::info_span!("worker", customer = %self.customer.name);
        async move {
            let removed = sink::remove_stale_temporaries(&self.customer.path);
            if removed > 0 {
                info!(removed, "removed temporary files left by an earlier run");
            }
            self.restore_ledger();
            let mut next = Box::pin(self.start(adopt)).await;
            if let Some(t) = self.account.wait(&self.shared.refresh).until() {
                next = next.max(t);
            }
            loop {
                let state = match self.account.wait(&self.shared.refresh) {
                    AuthWait::Paused(_) => State::Paused,
                    AuthWait::Backoff(_) => State::AuthBackoff,
                    AuthWait::Clear if self.transient > 0 || self.pending.is_some() => State::Retrying,
                    AuthWait::Clear => State::Fresh,
                };
                self.report.planned(state, Some(next));
                match self.wait_until(next).await {
                    Woken::Stopped => break,
                    Woken::PasswordChanged => {
                        // Tried at once unless Magento's count is near its lock (see refresh).
                        self.failed_password = None;
                        info!("the password changed since its last 401");
                    }
                    Woken::Due => {}
                }
                next = match self.pending.take() {
                    Some(obtained)
                        if obtained.expiry.expires_at > SystemTime::now() + self.shared.refresh.before_expiry =>
                    {
                        Box::pin(self.write(obtained, None)).await
                    }
                    _ => match Box::pin(self.refresh()).await {
                        Some(next) => next,
                        None => break,
                    },
                };
            }
            self.report.planned(State::Fresh, None);
            debug!("stopped");
        }
        .instrument(span)
    }

    /// Takes back the 401s an earlier process (or this customer's previous worker) recorded.
    fn restore_ledger(&mut self) {
        let Some(recorded) = sink::read_ledger(&self.customer.path, &self.customer.username) else { return };
        // Which password failed is not recorded (no trace of a password is ever written): take
        // the one configured now, so that a change from here on is tried at once.
        self.failed_password = self.customer.password.read().ok();
        info!(
            failures_in_a_row = recorded.in_a_row,
            last_failure = %recorded.last_failure.map(sink::rfc3339).unwrap_or_default(),
            "remembering the 401s recorded before this start"
        );
        // The account may know more already (another entry's 401s, or this worker's
        // predecessor's, to the millisecond where the ledger keeps seconds).
        let mut account = self.account.state();
        if account.auth.last_failure < recorded.last_failure {
            account.auth = recorded;
            account.refused = self.failed_password.clone();
        }
    }

    /// Looks at the token an earlier run left; returns when to log in.
    async fn start(&mut self, adopt: bool) -> SystemTime {
        let now = SystemTime::now();
        let Some(found) = sink::read_existing(&self.customer.path) else { return now };
        let r = &self.shared.refresh;
        // Read like an answer obtained when the file was written: a JWT from a Magento whose
        // clock is off then lives by its own `exp - iat`, not by that clock (a raw file records
        // no expiry of its own), and absurd claims are refused. A json file's expiry was worked
        // out the same way when it was written.
        let Ok(read) = token::expiry(&found.token, found.modified, r.default_lifetime) else { return now };
        let expires_at = found.expires_at.unwrap_or(read.expires_at);
        if expires_at <= now {
            return now;
        }
        // What the file says is reported (ready, valid) only once Magento accepted the token, or
        // when the file is one only this daemon's user could have written: anyone who can write
        // to the directory could have put any token there. A token Magento refused never is.
        if !adopt || schedule::is_due(now, expires_at, r.before_expiry) {
            if found.ours() {
                self.report.token_on_disk(expires_at);
            }
            return now;
        }
        let Some(_permit) = self.permit().await else { return now };
        match self.shared.client.whoami(&self.customer.me_url(), &found.token).await {
            Ok(email) if email.eq_ignore_ascii_case(&self.customer.username) => {
                self.report.token_on_disk(expires_at);
                let next = schedule::next_refresh(now, expires_at, read.lifetime, r, rand::thread_rng().gen());
                if found.format != self.shared.format || found.mode != self.shared.mode {
                    // A reload changed output.format or output.mode: the same token, rewritten.
                    let content =
                        sink::render(self.shared.format, &self.customer.name, &found.token, found.modified, expires_at);
                    let (path, mode) = (self.customer.path.clone(), self.shared.mode);
                    let rewritten =
                        tokio::task::spawn_blocking(move || sink::write_atomic(&path, mode, &content, true)).await;
                    if let Ok(Err(e)) | Err(e) = rewritten.map_err(std::io::Error::other) {
                        warn!(error = %e, "cannot rewrite the token file in the new format or mode: logging in");
                        return now;
                    }
                }
                info!(
                    expires_at = %sink::rfc3339(expires_at),
                    token = %found.token.fingerprint(),
                    "adopted the token on disk: Magento still accepts it"
                );
                next
            }
            Ok(_) => {
                info!("the token on disk belongs to another customer: logging in");
                now
            }
            Err(e) => {
                // Magento could not say (down, an error page): the file still counts until its
                // expiry if it is this daemon's own.
                if e.outcome != Outcome::AuthFailure && found.ours() {
                    self.report.token_on_disk(expires_at);
                }
                info!(error = %e, "the token on disk was not accepted: logging in");
                now
            }
        }
    }

    /// Waits until `at`; while a 401 is outstanding, also watches the password source.
    async fn wait_until(&self, at: SystemTime) -> Woken {
        loop {
            // A stop asked while this worker was busy ends it here, before any new login.
            if self.stop.is_cancelled() {
                return Woken::Stopped;
            }
            if self.failed_password.is_some() && self.password_changed() {
                return Woken::PasswordChanged;
            }
            let left = at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Woken::Due;
            }
            let nap = if self.failed_password.is_some() { left.min(PASSWORD_POLL) } else { left };
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Woken::Stopped,
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    fn password_changed(&self) -> bool {
        match (&self.failed_password, self.customer.password.read()) {
            (Some(failed), Ok(now)) => *failed != now,
            _ => false,
        }
    }

    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The stop first: a free slot must not win the race against a stop already asked.
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            permit = self.shared.logins.acquire() => permit.ok(),
        }
    }

    /// One login and its write; returns when to try next, `None` when stopped while waiting
    /// for a login slot.
    async fn refresh(&mut self) -> Option<SystemTime> {
        let password = match self.customer.password.read() {
            Ok(p) => p,
            Err(e) => {
                let now = SystemTime::now();
                self.transient += 1;
                self.report.metrics().password_error(&self.customer.name);
                self.report.problem("password", &e.to_string(), now);
                let wait = schedule::backoff(self.transient, &self.shared.refresh, None, rand::thread_rng().gen());
                error!(error = %e, retry_in = %humantime::format_duration(round(wait)), "cannot read the password");
                return Some(now + wait);
            }
        };
        // The account's turn: another entry of this username may be logging in, and its
        // outcome decides whether this login may be sent at all.
        let account = self.account.clone();
        let turn = tokio::select! {
            turn = account.turn.lock() => turn,
            _ = self.stop.cancelled() => return None,
        };
        if let Some(until) = self.held_back(&password) {
            return Some(until);
        }
        let permit = self.permit().await?;
        self.report.state(State::Refreshing);
        let started = SystemTime::now();
        let clock = Instant::now();
        let answer = self.shared.client.login(&self.customer.token_url(), &self.customer.username, &password).await;
        let took = clock.elapsed();
        drop(permit);
        let result = answer.and_then(|token| {
            let expiry = token::expiry(&token, started, self.shared.refresh.default_lifetime).map_err(|e| {
                LoginError { outcome: Outcome::InvalidResponse, message: e.to_string(), retry_after: None }
            })?;
            Ok(Obtained { token, obtained_at: started, expiry })
        });
        match result {
            Ok(obtained) => {
                *self.account.state() = AccountState::default();
                drop(turn);
                // Always: another entry of this username may have cleared the account first.
                sink::remove_ledger(&self.customer.path);
                self.failed_password = None;
                Some(self.write(obtained, Some(took)).await)
            }
            Err(e) => Some(self.failed(e, password, took)),
        }
    }

    /// When the account's recent 401s (this worker's, or an earlier worker's for the same
    /// username) call for a wait before `password` may be sent. A password not refused yet is
    /// tried at once, unless Magento's count is near its lock.
    fn held_back(&mut self, password: &Secret) -> Option<SystemTime> {
        let now = SystemTime::now();
        let (until, changed) = {
            let mut account = self.account.state();
            // (Unknown, as after a restart whose password could not be read: not a change.)
            let changed = account.refused.as_ref().is_some_and(|refused| refused != password);
            if changed {
                account.auth.password_changed();
            }
            (account.auth.wait(&self.shared.refresh).until().filter(|t| *t > now)?, changed)
        };
        self.failed_password = Some(password.clone());
        let message = if changed {
            "a password not refused yet, but Magento's failure count for this username is near its lock: not sent until it expires"
        } else {
            "this password was refused for this username not long ago (before a reload or restart): not sent again until the wait after that 401 is over"
        };
        warn!(retry_at = %sink::rfc3339(until), "{message}");
        self.report.problem("held_back", message, now);
        Some(until)
    }

    /// Writes an obtained token; returns when to log in next.
    async fn write(&mut self, obtained: Obtained, took: Option<Duration>) -> SystemTime {
        let content = sink::render(
            self.shared.format,
            &self.customer.name,
            &obtained.token,
            obtained.obtained_at,
            obtained.expiry.expires_at,
        );
        let (path, mode) = (self.customer.path.clone(), self.shared.mode);
        // fsync blocks: off the async threads. A blocking task runs to its end even if this
        // future is dropped, so a write once started is never cut short.
        let written = tokio::task::spawn_blocking(move || sink::write_atomic(&path, mode, &content, true))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("the write task failed: {e}"))));
        let now = SystemTime::now();
        let r = &self.shared.refresh;
        match written {
            Ok(()) => {
                self.transient = 0;
                if let (Some(skew), false) = (obtained.expiry.skew, self.warned_skew) {
                    self.warned_skew = true;
                    warn!(
                        skew_seconds = skew,
                        "Magento's clock and ours differ by more than a minute: counting the token's life from the request instead of its exp"
                    );
                }
                self.report.success(now, obtained.expiry.expires_at, took);
                self.report.metrics().clock_skew(&self.customer.name, obtained.expiry.skew.unwrap_or(0));
                let next = schedule::next_refresh(
                    now,
                    obtained.expiry.expires_at,
                    obtained.expiry.lifetime,
                    r,
                    rand::thread_rng().gen(),
                );
                info!(
                    result = "success",
                    expires_at = %sink::rfc3339(obtained.expiry.expires_at),
                    next_refresh_at = %sink::rfc3339(next),
                    duration_ms = took.map(|d| d.as_millis() as u64),
                    token = %obtained.token.fingerprint(),
                    "token written"
                );
                next
            }
            Err(e) => {
                let message = format!("cannot write {}: {e}", self.customer.path.display());
                self.report.failure(Outcome::WriteError, &message, now, took);
                self.transient += 1;
                let wait = schedule::backoff(self.transient, r, None, rand::thread_rng().gen());
                error!(result = "write_error", error = %message, retry_in = %humantime::format_duration(round(wait)), "token not written");
                self.pending = Some(obtained);
                now + wait
            }
        }
    }

    /// Books a failed login; returns when to try next.
    fn failed(&mut self, e: LoginError, password: Secret, took: Duration) -> SystemTime {
        let now = SystemTime::now();
        let r = self.shared.refresh.clone();
        self.report.failure(e.outcome, &e.message, now, Some(took));
        let duration_ms = took.as_millis() as u64;
        if e.outcome == Outcome::AuthFailure {
            let auth = {
                let mut account = self.account.state();
                account.auth.record_failure(now, &r);
                account.refused = Some(password.clone());
                account.auth.clone()
            };
            let wait = auth.wait(&r);
            // Rare and small: written in place rather than on the blocking pool.
            if let Err(e) = sink::write_ledger(&self.customer.path, &self.customer.username, &auth) {
                warn!(error = %e, "cannot record the 401 beside the token file: a restart would forget it");
            }
            self.failed_password = Some(password);
            let next = wait.until().unwrap_or(now);
            let retry_in = humantime::format_duration(round(next.duration_since(now).unwrap_or_default()));
            if let AuthWait::Paused(_) = wait {
                error!(
                    result = "auth_failure",
                    error = %e.message,
                    failures_in_a_row = auth.in_a_row,
                    duration_ms,
                    retry_in = %retry_in,
                    "login refused again: pausing this customer so Magento does not lock the account; fix the password (a changed password is tried at once)"
                );
            } else {
                warn!(result = "auth_failure", error = %e.message, failures_in_a_row = auth.in_a_row, duration_ms, retry_in = %retry_in, "login refused");
            }
            return next;
        }
        self.transient += 1;
        let wait = schedule::backoff(self.transient, &r, e.retry_after, rand::thread_rng().gen());
        warn!(
            result = e.outcome.as_str(),
            error = %e.message,
            duration_ms,
            retry_in = %humantime::format_duration(round(wait)),
            "login failed"
        );
        now + wait
    }
}

/// Whole milliseconds, for durations shown to people.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Checks, MagentoSettings};
    use crate::metrics::Metrics;

    /// Every configured customer holds one of these tasks for the life of the daemon: with
    /// 10,000 customers each byte is 10 KB of resident memory (benches/RESULTS.md). It was
    /// 2,968 bytes before `run` stopped being an `async fn` and the rare steps were boxed.
    #[test]
    fn an_idle_customer_task_stays_small() {
        let config = crate::config::parse(
            "magento:\n  base_url: http://127.0.0.1:1\noutput:\n  dir: /tmp\ncustomers:\n  - name: a\n    username: a\n    password_env: X\n",
            Checks::Static,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _entered = rt.enter();
        let shared = Shared {
            client: Client::new(&MagentoSettings { timeout: Duration::from_secs(1), ca_file: None }).unwrap(),
            refresh: Arc::new(config.refresh.clone()),
            format: Format::Raw,
            mode: 0o600,
            logins: Arc::new(Semaphore::new(1)),
        };
        let metrics = Arc::new(Metrics::new());
        let report = Reporter::new("a", metrics.clone());
        let worker = Worker::new(Arc::new(config.customers[0].clone()), shared, report, CancellationToken::new());
        let task = worker.run(true);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "a customer's task is {size} bytes");
    }
}
