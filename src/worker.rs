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
//! Every login goes through [`crate::attempt`], under the lockout policy of the customer's
//! [`Account`] (one per username, handed in by the supervisor). Time is read from the
//! [`Clock`] in [`Shared`], so the tests below drive a worker through a day on tokio's paused
//! clock against a scripted Magento.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::account::Account;
use crate::attempt::{self, Attempt, NoToken, Obtained};
use crate::clock::{rfc3339, Clock};
use crate::config::{CustomerConfig, RefreshSettings};
use crate::format::Times;
use crate::issuer::{Issuer, MintError};
use crate::magento::{Client, LoginError, Magento, Outcome};
use crate::schedule::{self, AuthState, AuthWait};
use crate::secret::Secret;
use crate::sink::Durability;
use crate::status::{Answer, Ask, Check, Keeper, Mailbox, Reporter, State};
use crate::store::Store;
use crate::token;

/// How often the password source is re-read while waiting after a 401: a Secret rotated by
/// Kubernetes (an atomic symlink swap) is noticed within this time.
pub const PASSWORD_POLL: Duration = Duration::from_secs(2);

/// What every worker shares with the others.
pub struct Shared<M = Client> {
    pub magento: M,
    pub refresh: Arc<RefreshSettings>,
    /// Bounds logins in flight over all customers.
    pub logins: Arc<Semaphore>,
    pub clock: Clock,
    /// Tells the app of every new token written (`notify`).
    pub notify: Arc<crate::notify::Notifier>,
    /// Where the tokens and the records of 401s go: files, or the Secret.
    pub store: Store,
    /// `auth.method` other than `password`: customers' tokens are minted with its credential.
    pub issuer: Option<Arc<Issuer>>,
}

impl<M: Clone> Clone for Shared<M> {
    fn clone(&self) -> Self {
        Shared {
            magento: self.magento.clone(),
            refresh: self.refresh.clone(),
            logins: self.logins.clone(),
            clock: self.clock,
            notify: self.notify.clone(),
            store: self.store.clone(),
            issuer: self.issuer.clone(),
        }
    }
}

pub struct Worker<M = Client> {
    customer: Arc<CustomerConfig>,
    /// One copy for every worker (not a clone each: a few dozen bytes in every idle task).
    shared: Arc<Shared<M>>,
    report: Reporter,
    stop: CancellationToken,
    /// This customer's Magento account, shared with every worker that logs in as its username
    /// (this worker's predecessors before a reload included).
    account: Arc<Account>,
    /// Transient failures in a row, for the backoff.
    transient: u32,
    /// A token that could not be written yet: written on the next try without a new login.
    /// Boxed: rare, and 112 bytes every idle task would carry.
    pending: Option<Box<Obtained>>,
    /// A warning about the token's expiry (clock skew, an encrypted token) was logged: once.
    warned_expiry: bool,
    /// When the token on disk was last known good (written, adopted or checked); `None` while
    /// there is none to check.
    checked_at: Option<SystemTime>,
    validation: Validation,
    /// `POST /refresh/<name>` for this customer.
    asks: Arc<Mailbox>,
    /// The last answer to an ask, and when it was made: shared by asks within [`ASK_EVERY`].
    answered: Option<Box<(tokio::time::Instant, Answer)>>,
    /// Held back by the issuer, which had no credential to offer: the generation it had then
    /// (the worker tries again when it changes).
    issuer_seen: Option<std::num::NonZeroU32>,
}

/// What the token API (`output.kubernetes.token_api`) reads of a worker's customer: the token in
/// the Secret, as this replica last read or wrote it.
struct Keeping {
    customer: Arc<CustomerConfig>,
    store: Store,
}

impl Keeper for Keeping {
    fn customer(&self) -> &CustomerConfig {
        &self.customer
    }

    fn token(&self) -> Option<zeroize::Zeroizing<String>> {
        let found = self.store.found(&self.customer)?;
        Some(zeroize::Zeroizing::new(found.token.expose().to_owned()))
    }
}

/// At most one check of the token on disk per customer per this long for `POST /refresh`:
/// an app calling it in a loop costs one `GET customers/me` per period.
pub const ASK_EVERY: Duration = Duration::from_secs(10);

/// What a check of the token on disk found.
enum Checked {
    Valid,
    /// Magento refused it: replace it, after the second of the revocation.
    Refused,
    /// No answer either way (network, an HTTP status): kept.
    NoAnswer(String),
    /// No token on disk to check.
    Nothing,
}

/// What Magento says of a token on disk ([`Worker::validate`]).
enum Verdict {
    /// It is this customer's token.
    Accepted,
    /// It is another customer's.
    Foreign,
    /// Magento refused it (401): revoked, or never valid.
    Refused(LoginError),
    /// No answer either way (network, an HTTP status).
    NoAnswer(LoginError),
    /// A stop came first: nothing was asked.
    Stopped,
}

/// Where the periodic validation of the token on disk (`refresh.validate_every`) stands.
#[derive(Default)]
struct Validation {
    /// Stopped: the customer's store code can never validate a token.
    off: bool,
    /// The token on disk was minted right after a revocation: check it again soon.
    recheck: bool,
    /// Brand-new tokens Magento refused in a row.
    fresh_refusals: u8,
}

/// Brand-new tokens refused in a row before the store code is taken for one that can never
/// validate (`/rest/all/`, another website's store): the checks stop rather than turn into a
/// login loop.
const MAX_FRESH_REFUSALS: u8 = 3;

/// How long after a refused check the next login waits: Magento revokes every token minted up
/// to the second of the revocation, so one minted within that second would die too.
const AFTER_REVOCATION: Duration = Duration::from_millis(1100);

/// Why a wait ended.
enum Woken {
    Due,
    PasswordChanged,
    Stopped,
    /// An app asked for a check now (`POST /refresh/<name>`).
    Asked(Vec<Ask>),
    /// An operator reset Magento's count and ran `forget-failures`.
    Forgotten,
    /// The issuer's credential changed while it held this customer back.
    IssuerChanged,
}

impl<M: Magento> Worker<M> {
    pub fn new(
        customer: Arc<CustomerConfig>,
        account: Arc<Account>,
        shared: Arc<Shared<M>>,
        report: Reporter,
        stop: CancellationToken,
    ) -> Worker<M> {
        let asks = report.listen();
        if shared.store.shared() {
            // output.kubernetes: the token API (on the Lease holder) reads the token here.
            asks.keep(Arc::new(Keeping { customer: customer.clone(), store: shared.store.clone() }));
        }
        Worker {
            customer,
            shared,
            report,
            stop,
            account,
            transient: 0,
            pending: None,
            warned_expiry: false,
            checked_at: None,
            validation: Validation::default(),
            asks,
            answered: None,
            issuer_seen: None,
        }
    }

    fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// Runs until the stop token is cancelled. `adopt`: the token on disk may be kept when
    /// Magento still accepts it for this username.
    ///
    /// A plain function returning the future, not an `async fn`: an `async fn` would keep a
    /// second, dead copy of the worker beside the one moved into the block, in every idle task.
    /// The rare, large steps (start, login, write) are boxed for the same reason: the task keeps
    /// only what an idle wait needs. The same goes for the `worker` span that gives every log
    /// line its customer: it is made for each step that may log, not held by the idle task
    /// (a span costs about 370 bytes of the subscriber's memory while it lives).
    // Not an `async fn`, as said above, even though the whole body is now the async block.
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, adopt: bool) -> impl std::future::Future<Output = ()> {
        async move {
            let span = self.span();
            span.in_scope(|| {
                let removed = self.shared.store.sweep(&self.customer);
                if removed > 0 {
                    info!(removed, "removed temporary files left by an earlier run");
                }
                let (store, refresh) = (&self.shared.store, &self.shared.refresh);
                match attempt::restore_ledger(store, &self.customer, &self.account, self.now(), refresh) {
                    Some(auth @ AuthState { unreadable: Some(_), .. }) => {
                        let now = self.now();
                        let wait = self.account.standing(now, refresh);
                        let message = held_back_message(wait, false, &auth, &self.customer.name);
                        error!("{message}");
                        self.report.problem("held_back", &message, now);
                    }
                    Some(recorded) => info!(
                        failures_in_a_row = recorded.in_a_row,
                        last_failure = %recorded.last_failure.map(rfc3339).unwrap_or_default(),
                        "remembering the 401s recorded before this start"
                    ),
                    None => {}
                }
            });
            let mut next = Box::pin(self.start(adopt).instrument(span)).await;
            loop {
                // The plan, held to what the lockout policy allows for the password refused
                // last (a changed password wakes the wait: the policy may allow it sooner).
                let (state, planned) = match self.account.standing(self.now(), &self.shared.refresh) {
                    AuthWait::HeldBack => (State::HeldBack, None),
                    AuthWait::Paused(t) => (State::Paused, Some(next.max(t))),
                    AuthWait::Backoff(t) => (State::AuthBackoff, Some(next.max(t))),
                    AuthWait::Clear if self.issuer_seen.is_some() => (State::HeldBack, Some(next)),
                    AuthWait::Clear if self.transient > 0 || self.pending.is_some() => (State::Retrying, Some(next)),
                    AuthWait::Clear => (State::Fresh, Some(next)),
                };
                self.report.planned(state, planned);
                let check_at = if state == State::Fresh { self.check_at() } else { None };
                let wake = match (planned, check_at) {
                    (Some(p), Some(c)) if c < p => Some(c),
                    _ => planned,
                };
                match self.wait_until(wake).await {
                    Woken::Stopped => break,
                    // Tried at once if the policy allows it.
                    Woken::PasswordChanged => self.span().in_scope(|| info!("the password changed since its last 401")),
                    Woken::IssuerChanged => {
                        next = self.now();
                        continue;
                    }
                    Woken::Forgotten => {
                        self.span().in_scope(|| {
                            warn!("an operator cleared this customer's failed logins (forget-failures): trying again")
                        });
                        next = self.now();
                        continue;
                    }
                    Woken::Asked(asks) => {
                        let span = self.span();
                        if let Some(plan) = Box::pin(self.answer(asks).instrument(span)).await {
                            next = plan;
                        }
                        continue;
                    }
                    Woken::Due => {}
                }
                if wake != planned && planned.is_some_and(|p| self.now() < p) {
                    let span = self.span();
                    if let Checked::Refused = Box::pin(self.check().instrument(span)).await {
                        next = self.now() + AFTER_REVOCATION;
                    }
                    continue;
                }
                next = match self.pending.take() {
                    Some(obtained) if obtained.expiry.expires_at > self.now() + self.shared.refresh.before_expiry => {
                        let span = self.span();
                        Box::pin(self.write(*obtained, false).instrument(span)).await
                    }
                    _ => {
                        // The login slot first, in a small wait of its own: thousands of
                        // customers due at once (the start) each hold this, not a whole login.
                        let logins = self.shared.logins.clone();
                        let Some(slot) = Box::pin(attempt::slot(logins.acquire_owned(), &self.stop)).await else {
                            break;
                        };
                        let span = self.span();
                        match Box::pin(self.refresh(Some(slot)).instrument(span)).await {
                            Some(next) => next,
                            None => break,
                        }
                    }
                };
            }
            self.report.planned(State::Fresh, None);
            self.span().in_scope(|| debug!("stopped"));
        }
    }

    /// The span of this customer's log lines (`"span":{"customer":..,"name":"worker"}`).
    fn span(&self) -> tracing::Span {
        tracing::info_span!("worker", customer = %self.customer.name)
    }

    /// Looks at the token an earlier run left; returns when to log in.
    async fn start(&mut self, adopt: bool) -> SystemTime {
        let now = self.now();
        let Some(found) = self.shared.store.found(&self.customer) else { return now };
        let r = &self.shared.refresh;
        // Read like an answer obtained when the file was written: a JWT from a Magento whose
        // clock is off then lives by its own `exp - iat`, not by that clock (a raw file records
        // no expiry of its own), and absurd claims are refused. A json file's expiry was worked
        // out the same way when it was written.
        let Ok(read) = token::expiry(&found.token, found.written_at, r.default_lifetime) else { return now };
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
        match self.validate(&found.token).await {
            Verdict::Stopped => now,
            Verdict::Accepted => {
                self.report.token_on_disk(expires_at);
                let next = schedule::next_refresh(now, expires_at, read.lifetime, r, rand::thread_rng().gen());
                if !self.shared.store.as_written(&self.customer, &found) {
                    // A reload changed the customer's format (its own or output.format),
                    // output.mode or the owner: the same token, rewritten.
                    let times = Times { obtained_at: found.written_at, expires_at };
                    if let Err(e) = self.shared.store.write(&self.customer, &found.token, times, Durability::Now).await
                    {
                        warn!(error = %e, "cannot rewrite the token file in the new format, mode or owner: logging in");
                        return now;
                    }
                }
                info!(
                    expires_at = %rfc3339(expires_at),
                    token = %found.token.fingerprint(),
                    "adopted the token on disk: Magento still accepts it"
                );
                self.checked_at = Some(now);
                next
            }
            Verdict::Foreign => {
                info!("the token on disk belongs to another customer: logging in");
                now
            }
            Verdict::Refused(e) => {
                info!(error = %e, "the token on disk was not accepted: logging in");
                now
            }
            Verdict::NoAnswer(e) => {
                // Magento could not say (down, an error page): the file still counts until its
                // expiry if it is this daemon's own.
                if found.ours() {
                    self.report.token_on_disk(expires_at);
                }
                info!(error = %e, "the token on disk was not accepted: logging in");
                now
            }
        }
    }

    /// Asks Magento whose `token` is (`GET customers/me`, in a login slot): the one way a token
    /// on disk is validated, at start and by the checks. Never a login, so never a failure
    /// counted towards Magento's lock.
    async fn validate(&self, token: &Secret) -> Verdict {
        let Some(_slot) = attempt::slot(self.shared.logins.acquire(), &self.stop).await else {
            return Verdict::Stopped;
        };
        match self.shared.magento.whoami(&self.customer.endpoint(), token).await {
            Ok(email) if email.eq_ignore_ascii_case(&self.customer.username) => Verdict::Accepted,
            Ok(_) => Verdict::Foreign,
            Err(e) if e.outcome == Outcome::AuthFailure => Verdict::Refused(e),
            Err(e) => Verdict::NoAnswer(e),
        }
    }

    /// When the token on disk is next checked, if it is.
    fn check_at(&self) -> Option<SystemTime> {
        let every = self.shared.refresh.validate_every;
        if every.is_zero() || self.validation.off {
            return None;
        }
        let after = if self.validation.recheck { AFTER_REVOCATION } else { every };
        self.checked_at.map(|at| at + after)
    }

    /// Checks the token on disk with `GET customers/me`. A check never counts as a failed
    /// login, and one that gets no answer keeps the token.
    async fn check(&mut self) -> Checked {
        let Some(found) = self.shared.store.found(&self.customer) else {
            self.checked_at = None;
            return Checked::Nothing;
        };
        let verdict = self.validate(&found.token).await;
        let now = self.now();
        match verdict {
            Verdict::Stopped => Checked::NoAnswer("stopping".into()),
            Verdict::Accepted => {
                self.report.checked(Check::Valid);
                self.checked_at = Some(now);
                self.validation.recheck = false;
                self.validation.fresh_refusals = 0;
                debug!(token = %found.token.fingerprint(), "Magento still accepts the token on disk");
                Checked::Valid
            }
            Verdict::NoAnswer(e) => {
                self.report.checked(Check::Error);
                self.checked_at = Some(now);
                info!(error = %e, "the token on disk could not be checked: kept");
                Checked::NoAnswer(e.to_string())
            }
            refused @ (Verdict::Foreign | Verdict::Refused(_)) => {
                self.report.checked(Check::Revoked);
                if self.validation.recheck {
                    self.validation.fresh_refusals += 1;
                    if self.validation.fresh_refusals >= MAX_FRESH_REFUSALS {
                        self.validation = Validation { off: true, ..Validation::default() };
                        warn!(
                            url = %self.customer.endpoint(),
                            "Magento refuses every token as soon as it is minted when asked through this store code (a store of another website, or `all`): checks of the token stop for this customer; set its store_code to one of its own website's stores"
                        );
                        return Checked::NoAnswer(
                            "Magento refuses every token through this customer's store code: it cannot be checked"
                                .into(),
                        );
                    }
                }
                let why = match refused {
                    Verdict::Refused(e) => e.message,
                    _ => "it belongs to another customer".to_owned(),
                };
                warn!(
                    token = %found.token.fingerprint(),
                    error = %why,
                    "Magento no longer accepts the token on disk (revoked: a logout, Force Sign-In, a deactivated customer): logging in again"
                );
                self.validation.recheck = true;
                self.checked_at = None;
                Checked::Refused
            }
        }
    }

    /// Answers an app's ask (`POST /refresh/<name>`): checks the token on disk now and, when
    /// Magento refuses it, logs in (under the lockout policy, as every login) and writes the new
    /// one before answering. Asks within [`ASK_EVERY`] of the last check share its answer, and
    /// so do those that came in meanwhile. Returns a new plan when it logged in.
    async fn answer(&mut self, asks: Vec<Ask>) -> Option<SystemTime> {
        let mut plan = None;
        let answer = match self.answered.as_deref() {
            Some((at, answer)) if at.elapsed() < ASK_EVERY => answer.clone(),
            _ => {
                let answer = match self.check().await {
                    Checked::Valid => self.token_answer(false),
                    Checked::NoAnswer(why) => {
                        Answer::Unavailable(format!("the token on disk could not be checked: {why}"))
                    }
                    Checked::Refused | Checked::Nothing => {
                        // After the second of the revocation, or a token minted in it dies too.
                        tokio::time::sleep(AFTER_REVOCATION).await;
                        plan = self.refresh(None).await;
                        if self.checked_at.is_some() {
                            self.token_answer(true)
                        } else {
                            let why = self.report.known().1.unwrap_or_else(|| "no token could be had".into());
                            Answer::Unavailable(why)
                        }
                    }
                };
                self.answered = Some(Box::new((tokio::time::Instant::now(), answer.clone())));
                answer
            }
        };
        for ask in asks.into_iter().chain(self.asks.take()) {
            let _ = ask.send(answer.clone());
        }
        plan
    }

    fn token_answer(&self, replaced: bool) -> Answer {
        match self.report.known().0 {
            Some(expires_at) => Answer::Token { replaced, expires_at },
            None => Answer::Unavailable("no valid token on disk".into()),
        }
    }

    /// Waits until `at` (`None`: until something changes); while a 401 of the password in use
    /// is what holds the customer back, also watches the password source.
    async fn wait_until(&mut self, at: Option<SystemTime>) -> Woken {
        loop {
            // A stop asked while this worker was busy ends it here, before any new login.
            if self.stop.is_cancelled() {
                return Woken::Stopped;
            }
            let standing = self.account.standing(self.now(), &self.shared.refresh);
            // Reading the ledger may warn (a FIFO in its place): in this customer's span.
            let forgotten = || self.span().in_scope(|| self.shared.store.forgotten(&self.customer));
            if standing != AuthWait::Clear && forgotten() {
                self.account.forget();
                self.shared.store.clear_failures(&self.customer);
                return Woken::Forgotten;
            }
            let refused = self.account.refused_password(self.now(), &self.shared.refresh);
            if let (Some(refused), Ok(now)) = (&refused, self.customer.read_password()) {
                if *refused != now {
                    return Woken::PasswordChanged;
                }
            }
            let left = at.map(|at| self.shared.clock.until(at));
            if left.is_some_and(|left| left.is_zero()) {
                return Woken::Due;
            }
            // While a 401 holds the customer back, the password source and the ledger are
            // watched: a fixed Secret, or an operator's forget-failures.
            let watch = refused.is_some() || standing != AuthWait::Clear;
            let nap = match (left, watch) {
                (Some(left), true) => Some(left.min(PASSWORD_POLL)),
                (Some(left), false) => Some(left),
                (None, true) => Some(PASSWORD_POLL),
                (None, false) => None,
            };
            let sleep = async {
                match nap {
                    Some(nap) => tokio::time::sleep(nap).await,
                    None => std::future::pending().await,
                }
            };
            // Boxed: only a customer the issuer holds back waits on it, and the idle task of
            // every other stays small.
            let issuer: futures::future::OptionFuture<_> = match (&self.shared.issuer, self.issuer_seen) {
                (Some(issuer), Some(seen)) => Some(Box::pin(issuer.changed_since(seen))),
                _ => None,
            }
            .into();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Woken::Stopped,
                _ = self.asks.rung() => {
                    let asks = self.asks.take();
                    if !asks.is_empty() {
                        return Woken::Asked(asks);
                    }
                }
                Some(()) = issuer => return Woken::IssuerChanged,
                _ = sleep => {}
            }
        }
    }

    /// One attempt (in `slot`, a login slot already held, if any) and, with a token, its write;
    /// returns when to try next, `None` when stopped before anything was sent.
    async fn refresh(&mut self, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Option<SystemTime> {
        self.report.state(State::Refreshing);
        if let Some(issuer) = self.shared.issuer.clone() {
            return self.mint(&issuer, slot).await;
        }
        let attempt = Attempt {
            magento: &self.shared.magento,
            customer: &self.customer,
            account: &self.account,
            refresh: &self.shared.refresh,
            logins: &self.shared.logins,
            clock: self.shared.clock,
            store: &self.shared.store,
            ledger_on_disk: true,
            password: None,
        };
        match attempt::attempt_in_slot(attempt, slot, &self.stop).await {
            Ok(obtained) => Some(self.write(obtained, true).await),
            Err(NoToken::Stopped) => None,
            Err(NoToken::Password(e)) => {
                let now = self.now();
                self.transient += 1;
                self.report.password_error();
                self.report.problem("password", &e.to_string(), now);
                let wait = schedule::backoff(self.transient, &self.shared.refresh, None, rand::thread_rng().gen());
                error!(error = %e, retry_in = %humantime::format_duration(round(wait)), "cannot read the password");
                Some(now + wait)
            }
            Err(NoToken::HeldBack { wait, password_bound, auth }) => {
                let message = held_back_message(wait, password_bound, &auth, &self.customer.name);
                match wait.until() {
                    Some(until) => warn!(retry_at = %rfc3339(until), failures = auth.chain, "{message}"),
                    None => error!(failures = auth.chain, "{message}"),
                }
                self.report.problem("held_back", &message, self.now());
                Some(self.now())
            }
            Err(NoToken::Login { error, took }) => Some(self.failed(error, took)),
        }
    }

    /// A token minted by the issuer (no password: nothing counts towards a lock), and its write;
    /// returns when to try next, `None` when stopped before anything was sent.
    async fn mint(&mut self, issuer: &Issuer, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Option<SystemTime> {
        let shared = &self.shared;
        let minted = issuer.mint(&self.customer, &shared.refresh, &shared.logins, slot, shared.clock, &self.stop).await;
        let now = self.now();
        let (why, generation) = match minted {
            Ok(obtained) => {
                self.issuer_seen = None;
                return Some(self.write(obtained, true).await);
            }
            Err(MintError::Stopped) => return None,
            Err(MintError::Failed { error, took }) => {
                self.issuer_seen = None;
                return Some(self.failed(error, took));
            }
            Err(MintError::NoCredential { why: None, generation }) => {
                // The issuer's first login is under way: waited for without a word.
                self.issuer_seen = Some(generation);
                return Some(now + self.shared.refresh.max_backoff);
            }
            Err(MintError::NoCredential { why: Some(why), generation }) => (why, generation),
            Err(MintError::Refused { error, generation }) => (error.message, generation),
        };
        let message = format!("held back until the issuer has a credential: {why}");
        if self.issuer_seen.is_none() {
            warn!(error = %why, "held back until the issuer has a credential");
        }
        self.issuer_seen = Some(generation);
        self.report.problem("issuer", &message, now);
        // Woken as soon as the credential changes; this is only the latest.
        Some(now + self.shared.refresh.max_backoff)
    }

    /// Writes an obtained token; returns when to log in next. `fresh`: it was just obtained
    /// (a retried write of a token obtained earlier sends no request to time).
    async fn write(&mut self, obtained: Obtained, fresh: bool) -> SystemTime {
        let took = fresh.then_some(obtained.took);
        let times = Times { obtained_at: obtained.obtained_at, expires_at: obtained.expiry.expires_at };
        let written = self.shared.store.write(&self.customer, &obtained.token, times, Durability::Now).await;
        let now = self.now();
        let r = &self.shared.refresh;
        match written {
            Ok(()) => {
                self.transient = 0;
                self.checked_at = Some(now);
                if obtained.expiry.encrypted && !self.warned_expiry {
                    self.warned_expiry = true;
                    warn!(
                        default_lifetime = %humantime::format_duration(self.shared.refresh.default_lifetime),
                        "an encrypted token (JWE, five parts): its expiry cannot be read, so refresh.default_lifetime is assumed; it must not exceed the store's token lifetime (webapi/jwtauth/customer_expiration)"
                    );
                }
                if let (Some(skew), false) = (obtained.expiry.skew, self.warned_expiry) {
                    self.warned_expiry = true;
                    warn!(
                        skew_seconds = skew,
                        "Magento's clock and ours differ by more than a minute: counting the token's life from the request instead of its exp"
                    );
                }
                self.report.success(now, obtained.expiry.expires_at, took);
                if let Some(file) = self.shared.store.file(&self.customer) {
                    self.shared.notify.written(&self.report, &file, obtained.expiry.expires_at);
                }
                self.report.clock_skew(obtained.expiry.skew.unwrap_or(0));
                let next = schedule::next_refresh(
                    now,
                    obtained.expiry.expires_at,
                    obtained.expiry.lifetime,
                    r,
                    rand::thread_rng().gen(),
                );
                info!(
                    result = "success",
                    expires_at = %rfc3339(obtained.expiry.expires_at),
                    next_refresh_at = %rfc3339(next),
                    duration_ms = took.map(|d| d.as_millis() as u64),
                    token = %obtained.token.fingerprint(),
                    "token written"
                );
                next
            }
            Err(e) => {
                let message = format!("cannot write {}: {e}", self.shared.store.place(&self.customer));
                self.report.failure(Outcome::WriteError, &message, now, took);
                self.transient += 1;
                let wait = schedule::backoff(self.transient, r, None, rand::thread_rng().gen());
                error!(result = "write_error", error = %message, retry_in = %humantime::format_duration(round(wait)), "token not written");
                self.pending = Some(Box::new(obtained));
                now + wait
            }
        }
    }

    /// Reports a failed login (a 401 is already booked in the account); returns when to try next.
    fn failed(&mut self, e: LoginError, took: Duration) -> SystemTime {
        let now = self.now();
        let r = self.shared.refresh.clone();
        self.report.failure(e.outcome, &e.message, now, Some(took));
        let duration_ms = took.as_millis() as u64;
        if e.outcome == Outcome::AuthFailure {
            let auth = self.account.auth();
            let wait = self.account.standing(now, &r);
            if wait == AuthWait::HeldBack {
                let password_bound = self.account.refused_password(now, &r).is_some();
                let message = held_back_message(wait, password_bound, &auth, &self.customer.name);
                error!(result = "auth_failure", error = %e.message, failures = auth.chain, duration_ms, "login refused: {message}");
                self.report.problem("held_back", &message, now);
                return now;
            }
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
        let wait = e.retry_in(self.transient, &r, rand::thread_rng().gen());
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

/// What `/status` and the log say of a login the lockout policy holds back, why, and what to
/// do: the cause (a ledger that cannot be read, an unconfirmed account) stays in the message
/// whatever the wait.
fn held_back_message(wait: AuthWait, password_bound: bool, auth: &AuthState, customer: &str) -> String {
    let forget = format!("run `magento-token-sidecar forget-failures --config FILE {customer}`");
    let until = match wait.until() {
        Some(t) => format!("before {}", rfc3339(t)),
        None => "until an operator clears the count".to_owned(),
    };
    if let Some(why) = &auth.unreadable {
        return format!(
            "the record of this customer's earlier 401s cannot be read ({why}): counted as the lockout budget spent, so no login is sent {until}; check Magento's failure count for this username (reset it if needed), then {forget}"
        );
    }
    match wait {
        AuthWait::HeldBack if auth.final_refusal && password_bound => "Magento refuses this password because the account's email address is not confirmed: it is not sent again until the password or the configuration changes, since every try counts towards Magento's lock; confirm the account (in the email Magento sent, or in the admin), then change the configuration or reload".to_owned(),
        AuthWait::HeldBack if password_bound => format!(
            "Magento refused this password and only a successful login clears its failure count: it is not sent again; fix the password (a changed password is tried at once) or, after resetting the customer's failures in Magento, {forget}"
        ),
        AuthWait::HeldBack => format!(
            "the lockout budget is spent: Magento counts as many failed logins for this username as the daemon may cause, and only a successful login clears them; reset the customer's failures in Magento (and fix the password), then {forget}"
        ),
        _ if password_bound => format!(
            "Magento refused this password for this username{last}: not sent again {until}, to keep clear of its lock (a changed password is tried at once)",
            last = auth.last_failure.map(|t| format!(" at {}", rfc3339(t))).unwrap_or_default(),
        ),
        _ => format!(
            "Magento counts as many recent failed logins for this username as the daemon may cause: no login is sent {until}, when its count is believed to have expired"
        ),
    }
}

/// Whole milliseconds, for durations shown to people.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
