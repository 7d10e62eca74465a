//! Customer tokens without customer passwords (`auth.method` `login_as_customer` or
//! `cloud_service_otp`): one credential of the daemon's own (an admin's token, or an IMS access
//! token) kept fresh by one task, and each customer's token minted with it.
//!
//! ```text
//!   issuer task: admin/IMS login ──► token (JWT exp, or expires_in) ──► published to the workers
//!        ▲   under its own lockout budget        │ renewed before expiry, or at once when refused
//!        └───────────────────────────────────────┘
//!   worker: credential? ── no ──► held back with the issuer's reason, until it changes
//!              │ yes
//!              ▼
//!   login_as_customer: generateCustomerTokenAsAdmin(customer_email) ──► opaque token
//!   cloud_service_otp: POST V1/customer/<id>/otp ──► exchangeOtpForCustomerToken(email, otp)
//! ```
//!
//! The credential's logins go through [`attempt::guarded`], the path of every customer login:
//! Magento throttles admin logins by the customers' rule and locks the admin user, so the one
//! admin account gets one lockout budget, shared by every customer, with its ledger in the
//! store beside the customers' (key [`LEDGER_KEY`]). Its secrets are read afresh before every
//! login, and a changed password or TOTP secret is tried at once. Minting a customer's token
//! sends no password: nothing of it counts towards any lock.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::account::Account;
use crate::attempt::{self, Attempt, NoToken, Obtained};
use crate::clock::{rfc3339, unix_secs, Clock};
use crate::config::{AdminLogin, Api, Auth, CustomerConfig, ImsCredential, RefreshSettings};
use crate::magento::{Client, LoginError, Outcome};
use crate::schedule::{self, AuthWait};
use crate::secret::Secret;
use crate::status::{Board, IssuerReporter, IssuerState};
use crate::store::Store;
use crate::token;
use crate::totp;

/// The key of the issuer's ledger of 401s in the store: a name no customer's file can have
/// (it starts with '.'), so `.<key>.auth` beside the token files.
pub const LEDGER_KEY: &str = ".issuer";

/// How often the secret sources are re-read while a refusal holds the issuer back.
const SECRET_POLL: Duration = Duration::from_secs(2);

/// A token refused within this long of being issued is a fresh refusal: renewals after such
/// refusals back off, so a store that refuses every new token cannot turn this into a loop.
const FRESH: Duration = Duration::from_secs(60);

/// Magento revokes every token issued up to the second of a revocation: a new one is asked for
/// after it.
const AFTER_REVOCATION: Duration = Duration::from_millis(1100);

/// A customer's token is asked for with a credential that lives at least this much longer.
const CREDENTIAL_MARGIN: Duration = Duration::from_secs(5);

/// What the issuer offers the workers now.
#[derive(Clone)]
pub struct Credential {
    token: Option<Arc<Secret>>,
    expires_at: Option<SystemTime>,
    /// When the token was obtained (kept after a refusal: a refusal soon after is a fresh one).
    obtained_at: Option<SystemTime>,
    /// Grows with every change: a worker waiting for a credential waits for another generation.
    pub generation: NonZeroU32,
    /// Why there is no token to use, when there is none.
    problem: Option<String>,
}

impl Default for Credential {
    fn default() -> Credential {
        Credential { token: None, expires_at: None, obtained_at: None, generation: NonZeroU32::MIN, problem: None }
    }
}

impl Credential {
    /// The token, if it is good for a request started at `now`: with [`CREDENTIAL_MARGIN`] to
    /// spare, or half of `before_expiry` where that is less (the issuer renews it then).
    fn usable(&self, now: SystemTime, r: &RefreshSettings) -> Option<&Arc<Secret>> {
        let margin = CREDENTIAL_MARGIN.min(r.before_expiry / 2);
        self.token.as_ref().filter(|_| self.expires_at.is_some_and(|t| t > now + margin))
    }
}

/// Why a customer's token could not be minted.
#[derive(Debug)]
pub enum MintError {
    /// The issuer has no credential to offer: the customer waits for another `generation`.
    /// `why` is `None` before the issuer's first login was answered.
    NoCredential { why: Option<String>, generation: NonZeroU32 },
    /// The credential was refused (revoked early): the issuer renews it; the customer waits for
    /// another `generation`.
    Refused { error: LoginError, generation: NonZeroU32 },
    /// The request failed (an outcome other than `auth_failure`): retried as a login would be.
    Failed { error: LoginError, took: Duration },
    /// A stop came first.
    Stopped,
}

/// The issuer of one configuration: its credential, its lockout budget, and the customers'
/// way to their tokens.
pub struct Issuer {
    how: How,
    client: Client,
    /// The credential's stand-in as a "customer" of the lockout bookkeeping: its username and
    /// secret source, and its ledger's key ([`LEDGER_KEY`]).
    entry: CustomerConfig,
    account: Account,
    state: watch::Sender<Credential>,
    /// Rung when a worker's request found the credential refused.
    refused: Notify,
    report: IssuerReporter,
}

enum How {
    Admin(AdminLogin),
    Ims(ImsCredential),
}

/// The secrets of one login, read afresh.
struct Secrets {
    /// The admin password or the IMS client secret.
    secret: Secret,
    totp: Option<totp::TotpSecret>,
    /// What the lockout budget knows the credential by: the secret and, with a TOTP secret, a
    /// digest of it, so that a fixed TOTP secret counts as a changed credential (tried at once).
    identity: Secret,
}

/// The issuer's stand-in in the lockout bookkeeping: `None` with `auth.method: password`.
pub fn ledger_entry(auth: &Auth) -> Option<CustomerConfig> {
    let (name, username, password, base_url) = match auth {
        Auth::Password => return None,
        Auth::LoginAsCustomer(admin) => {
            ("auth.admin", admin.username.clone(), admin.password.clone(), admin.base_url.clone())
        }
        Auth::CloudServiceOtp(ims) => {
            ("auth.ims", ims.client_id.clone(), ims.client_secret.clone(), Arc::new(ims.token_url.clone()))
        }
    };
    Some(CustomerConfig {
        name: name.into(),
        username,
        password: Some(password),
        customer_id: None,
        // With output.kubernetes: the default Secret.
        secret: None,
        base_url,
        store_code: None,
        file: LEDGER_KEY.into(),
        format: Default::default(),
        api: Api::Rest,
    })
}

impl Issuer {
    /// The issuer of `auth` (`None` for passwords), reporting to `board`.
    pub fn new(auth: &Auth, client: Client, board: &Board) -> Option<Arc<Issuer>> {
        let entry = ledger_entry(auth)?;
        let how = match auth {
            Auth::Password => return None,
            Auth::LoginAsCustomer(admin) => How::Admin(admin.clone()),
            Auth::CloudServiceOtp(ims) => How::Ims(ims.clone()),
        };
        let report = board.set_issuer(Some(auth.method().as_str()));
        Some(Arc::new(Issuer {
            how,
            client,
            entry,
            account: Account::default(),
            state: watch::Sender::new(Credential::default()),
            refused: Notify::new(),
            report,
        }))
    }

    /// Whether this issuer works as `auth` says (a reload that keeps it keeps its token).
    pub fn serves(&self, auth: &Auth, client: &Client) -> bool {
        let same = match (&self.how, auth) {
            (How::Admin(a), Auth::LoginAsCustomer(b)) => a == b,
            (How::Ims(a), Auth::CloudServiceOtp(b)) => a == b,
            _ => false,
        };
        same && self.client.same_as(client)
    }

    /// What the credential is called in messages.
    fn what(&self) -> String {
        match &self.how {
            How::Admin(admin) => format!("the admin token (auth.admin {:?})", admin.username),
            How::Ims(ims) => format!("the IMS access token (auth.ims client {:?})", ims.client_id),
        }
    }

    /// The credential now.
    pub fn current(&self) -> Credential {
        self.state.borrow().clone()
    }

    /// Returns once the credential's generation is not `seen` (at once if it is not already).
    pub async fn changed_since(&self, seen: NonZeroU32) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|c| c.generation != seen).await;
    }

    fn publish(&self, f: impl FnOnce(&mut Credential)) {
        self.state.send_modify(|c| {
            f(c);
            c.generation = c.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        });
    }

    /// Takes the credential's recorded 401s into its account, the secrets read now taken for the
    /// ones refused (a change from here on is tried at once).
    fn restore_ledger(
        &self,
        store: &Store,
        now: SystemTime,
        r: &RefreshSettings,
    ) -> Option<crate::schedule::AuthState> {
        attempt::restore_ledger_as(store, &self.entry, &self.account, now, r, || {
            self.secrets().ok().map(|s| s.identity)
        })
    }

    /// Reads the secrets of a login.
    fn secrets(&self) -> Result<Secrets, String> {
        match &self.how {
            How::Admin(admin) => {
                let secret = admin
                    .password
                    .read()
                    .map_err(|e| e.keyed("auth.admin.password_file", "auth.admin.password_env"))?;
                let totp = match &admin.totp_secret {
                    Some(path) => {
                        Some(totp::read_secret(path).map_err(|e| format!("auth.admin.totp_secret_file {e}"))?)
                    }
                    None => None,
                };
                let identity = match &totp {
                    None => secret.clone(),
                    Some(totp) => Secret::new(format!("{}\n{}", secret.expose(), totp.digest())),
                };
                Ok(Secrets { secret, totp, identity })
            }
            How::Ims(ims) => {
                let secret = ims
                    .client_secret
                    .read()
                    .map_err(|e| e.keyed("auth.ims.client_secret_file", "auth.ims.client_secret_env"))?;
                Ok(Secrets { identity: secret.clone(), secret, totp: None })
            }
        }
    }

    /// Keeps the credential fresh until `stop`: the issuer's task.
    pub fn run(
        self: Arc<Self>,
        refresh: Arc<RefreshSettings>,
        logins: Arc<Semaphore>,
        clock: Clock,
        store: Store,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let span = tracing::info_span!("issuer", method = self.method());
        async move {
            let now = clock.now();
            if let Some(recorded) = self.restore_ledger(&store, now, &refresh) {
                info!(
                    failures_in_a_row = recorded.in_a_row,
                    "remembering the credential's 401s recorded before this start"
                );
            }
            let mut transient = 0;
            let mut fresh_refusals = 0;
            loop {
                let next = match self.secrets() {
                    Err(why) => self.unreadable(&why, &mut transient, &refresh, clock),
                    Ok(secrets) => match self.login(secrets, &refresh, &logins, clock, &store, &stop).await {
                        Err(NoToken::Stopped) => break,
                        Ok(obtained) => {
                            transient = 0;
                            self.obtained(obtained, &refresh, clock)
                        }
                        Err(no_token) => self.failed(no_token, &mut transient, &refresh, clock),
                    },
                };
                match self.wait(next, &refresh, clock, &store, &stop).await {
                    Woken::Stopped => break,
                    Woken::Due | Woken::Changed => {}
                    Woken::Refused { fresh } => {
                        // Renewed after the second of the revocation; a token refused as soon as
                        // it was issued makes the next renewal wait longer, and so on.
                        fresh_refusals = if fresh { fresh_refusals + 1 } else { 0 };
                        let wait = renewal_wait(fresh_refusals, &refresh, rand::thread_rng().gen());
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        .instrument(span)
    }

    fn method(&self) -> &'static str {
        match self.how {
            How::Admin(_) => "login_as_customer",
            How::Ims(_) => "cloud_service_otp",
        }
    }

    /// One login of the credential with `secrets`, under its lockout budget.
    async fn login(
        &self,
        secrets: Secrets,
        refresh: &RefreshSettings,
        logins: &Semaphore,
        clock: Clock,
        store: &Store,
        stop: &CancellationToken,
    ) -> Result<Obtained, NoToken> {
        let a = Attempt {
            magento: &self.client,
            customer: &self.entry,
            account: &self.account,
            refresh,
            logins,
            clock,
            store,
            ledger_on_disk: true,
            password: Some(secrets.identity.clone()),
        };
        let client = &self.client;
        let send = |_identity: Secret| async move {
            match &self.how {
                How::Admin(admin) => {
                    let code = secrets.totp.as_ref().map(|t| {
                        let unix = u64::try_from(unix_secs(clock.now())).unwrap_or(0);
                        Secret::new(totp::code(t, unix).to_string())
                    });
                    let token =
                        client.admin_token(&admin.route(), &admin.username, &secrets.secret, code.as_ref()).await?;
                    Ok((token, None))
                }
                How::Ims(ims) => {
                    let t = client.ims_token(ims, &secrets.secret).await?;
                    Ok((t.token, Some(t.expires_in)))
                }
            }
        };
        attempt::guarded(a, None, stop, send).await
    }

    /// Publishes a new token; returns when to renew it.
    fn obtained(&self, obtained: Obtained, refresh: &RefreshSettings, clock: Clock) -> Option<SystemTime> {
        let now = clock.now();
        let expiry = obtained.expiry;
        let next = schedule::next_refresh(now, expiry.expires_at, expiry.lifetime, refresh, rand::thread_rng().gen());
        self.publish(|c| {
            c.token = Some(Arc::new(obtained.token));
            c.expires_at = Some(expiry.expires_at);
            c.obtained_at = Some(obtained.obtained_at);
            c.problem = None;
        });
        self.report.success(expiry.expires_at, next);
        info!(
            result = "success",
            expires_at = %rfc3339(expiry.expires_at),
            next_refresh_at = %rfc3339(next),
            duration_ms = obtained.took.as_millis() as u64,
            "{} obtained", self.what()
        );
        Some(next)
    }

    /// A secret that could not be read: nothing was sent; tried again after a backoff.
    fn unreadable(&self, why: &str, transient: &mut u32, r: &RefreshSettings, clock: Clock) -> Option<SystemTime> {
        *transient += 1;
        let now = clock.now();
        let next = now + schedule::backoff(*transient, r, None, rand::thread_rng().gen());
        let message = format!("{} cannot be asked for: {why}", self.what());
        error!(error = %why, retry_at = %rfc3339(next), "cannot read the credential's secret");
        self.set_problem(&message, now, r);
        self.report.failure(None, &message, now, IssuerState::Failing, Some(next));
        Some(next)
    }

    /// Records why there is no token to use, when the one held is no longer good.
    fn set_problem(&self, message: &str, now: SystemTime, r: &RefreshSettings) {
        let usable = self.state.borrow().usable(now, r).is_some();
        if !usable {
            self.publish(|c| c.problem = Some(message.to_owned()));
        }
    }

    /// A login that gave no token; returns when to try again (`None`: when a secret changes).
    fn failed(&self, no_token: NoToken, transient: &mut u32, r: &RefreshSettings, clock: Clock) -> Option<SystemTime> {
        let now = clock.now();
        let (outcome, message, standing) = match no_token {
            NoToken::HeldBack { wait, .. } => (None, self.held_back_message(wait), wait),
            NoToken::Login { error, .. } if error.outcome == Outcome::AuthFailure => {
                let standing = self.account.standing(now, r);
                let message =
                    format!("{} was refused: {}; {}", self.what(), error.message, self.held_back_message(standing));
                (Some(error.outcome), message, standing)
            }
            NoToken::Login { error, .. } => {
                *transient += 1;
                let wait = error.retry_in(*transient, r, rand::thread_rng().gen());
                let message = format!("{} could not be obtained: {}", self.what(), error.message);
                warn!(result = error.outcome.as_str(), error = %error.message, retry_in = %humantime::format_duration(wait), "credential login failed");
                self.set_problem(&message, now, r);
                self.report.failure(Some(error.outcome), &message, now, IssuerState::Failing, Some(now + wait));
                return Some(now + wait);
            }
            NoToken::Password(e) => (None, format!("{} cannot be asked for: {e}", self.what()), AuthWait::Clear),
            NoToken::Stopped => return None,
        };
        let (state, next) = standing_state(standing, now, r);
        error!(result = outcome.map_or("held_back", Outcome::as_str), error = %message, "credential refused");
        self.set_problem(&message, now, r);
        self.report.failure(outcome, &message, now, state, next);
        next
    }

    /// What the lockout policy says of the credential, and what to do.
    fn held_back_message(&self, wait: AuthWait) -> String {
        let (fix, unlock) = match &self.how {
            How::Admin(_) => (
                "fix auth.admin's password (or totp_secret_file): a changed one is tried at once",
                "unlock the admin user in Magento (System > Permissions > Locked Users) and run `magento-token-sidecar forget-failures --config FILE auth.admin`",
            ),
            How::Ims(_) => (
                "fix auth.ims's client secret: a changed one is tried at once",
                "then run `magento-token-sidecar forget-failures --config FILE auth.ims`",
            ),
        };
        match wait {
            AuthWait::HeldBack => format!("no login is sent until the secret changes, since every refusal counts towards Magento's lock of this account: {fix}, or {unlock}"),
            AuthWait::Paused(t) | AuthWait::Backoff(t) => {
                format!("no login is sent before {}, to keep clear of Magento's lock: {fix}", rfc3339(t))
            }
            AuthWait::Clear => format!("tried again shortly; {fix}"),
        }
    }

    /// Waits until `next` (`None`: until a secret changes), a worker's report of a refused
    /// credential, an operator's `forget-failures`, or `stop`.
    async fn wait(
        &self,
        next: Option<SystemTime>,
        r: &RefreshSettings,
        clock: Clock,
        store: &Store,
        stop: &CancellationToken,
    ) -> Woken {
        loop {
            let now = clock.now();
            if next.is_some_and(|t| t <= now) {
                return Woken::Due;
            }
            let standing = self.account.standing(now, r);
            if standing != AuthWait::Clear {
                if store.forgotten(&self.entry) {
                    self.account.forget();
                    store.clear_failures(&self.entry);
                    warn!("an operator cleared the credential's failed logins (forget-failures): trying again");
                    return Woken::Changed;
                }
                let refused = self.account.refused_password(now, r);
                if let (Some(refused), Ok(secrets)) = (refused, self.secrets()) {
                    if refused != secrets.identity {
                        info!("the credential's secret changed since its last refusal: trying it");
                        return Woken::Changed;
                    }
                }
            }
            let left = next.map(|t| clock.until(t));
            let nap = match (left, standing != AuthWait::Clear) {
                (Some(left), true) => Some(left.min(SECRET_POLL)),
                (Some(left), false) => Some(left),
                (None, _) => Some(SECRET_POLL),
            };
            let refused = self.refused.notified();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Woken::Stopped,
                _ = refused => {
                    let c = self.current();
                    let fresh = c.obtained_at.is_some_and(|t| t + FRESH > clock.now());
                    return Woken::Refused { fresh };
                }
                _ = tokio::time::sleep(nap.unwrap_or(SECRET_POLL)) => {}
            }
        }
    }

    /// `once`: the credential obtained once, before `deadline`. A refusal is not tried again
    /// (as a customer's 401 is not, in one pass); a transient failure is, within the deadline.
    /// The error says why no customer can get a token.
    pub async fn obtain_before(
        &self,
        refresh: &RefreshSettings,
        logins: &Semaphore,
        store: &Store,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let clock = Clock::System;
        self.restore_ledger(store, clock.now(), refresh);
        // `once` is never stopped early: its bound is the deadline.
        let never = CancellationToken::new();
        let mut transient = 0;
        loop {
            let secrets = self.secrets().map_err(|why| format!("{} cannot be asked for: {why}", self.what()))?;
            let login = self.login(secrets, refresh, logins, clock, store, &never);
            let no_token = match tokio::time::timeout_at(deadline, login).await {
                Err(_) => return Err(format!("{} could not be obtained before the end of --timeout", self.what())),
                Ok(Ok(obtained)) => {
                    self.obtained(obtained, refresh, clock);
                    return Ok(());
                }
                Ok(Err(no_token)) => no_token,
            };
            let again = matches!(&no_token, NoToken::Login { error, .. } if !matches!(error.outcome, Outcome::AuthFailure | Outcome::Blocked));
            let next = self.failed(no_token, &mut transient, refresh, clock);
            let why = self.current().problem.unwrap_or_else(|| format!("{} could not be obtained", self.what()));
            match next.map(|t| tokio::time::Instant::now() + clock.until(t)) {
                Some(at) if again && at < deadline => tokio::time::sleep_until(at).await,
                _ => return Err(why),
            }
        }
    }

    /// A worker's request found `token` refused: unless a newer one replaced it, it is dropped
    /// and the issuer renews it.
    fn refused(&self, token: &Arc<Secret>, error: &LoginError) {
        let mut dropped = false;
        self.state.send_if_modified(|c| {
            if c.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, token)) {
                c.token = None;
                c.expires_at = None;
                c.problem = Some(format!(
                    "{} was refused before its expiry ({}): a new one is being asked for",
                    self.what(),
                    error.message
                ));
                c.generation = c.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
                dropped = true;
            }
            dropped
        });
        if dropped {
            warn!(error = %error.message, "{} was refused before its expiry (revoked?): renewing it", self.what());
            self.report.token_refused();
            self.refused.notify_one();
        }
    }

    /// `customer`'s token, minted with the credential, in a login slot (`held`, or one taken
    /// from `logins`). No password is sent: nothing here counts towards a lock.
    pub async fn mint(
        &self,
        customer: &CustomerConfig,
        refresh: &RefreshSettings,
        logins: &Semaphore,
        held: Option<OwnedSemaphorePermit>,
        clock: Clock,
        stop: &CancellationToken,
    ) -> Result<Obtained, MintError> {
        let credential = self.current();
        let Some(token) = credential.usable(clock.now(), refresh).cloned() else {
            return Err(MintError::NoCredential { why: credential.problem.clone(), generation: credential.generation });
        };
        // Every request to Magento is sent in a login slot.
        let mut taken = None;
        if held.is_none() {
            taken = Some(attempt::slot(logins.acquire(), stop).await.ok_or(MintError::Stopped)?);
        }
        let _slot = (held, taken);
        let started = clock.now();
        let timer = tokio::time::Instant::now();
        let graphql = customer.graphql_url();
        let store = customer.store_code.as_deref();
        let answer = match &self.how {
            How::Admin(_) => self.client.token_as_admin(&graphql, store, &token, &customer.username).await,
            How::Ims(ims) => {
                let id = customer.customer_id.unwrap_or_default();
                let route = customer.rest_url(&format!("V1/customer/{id}/otp"));
                match self.client.one_time_code(&route, ims, &token).await {
                    // At once: a code lives 30 to 60 seconds, and is used once.
                    Ok(code) => self.client.exchange_code(&graphql, store, &customer.username, &code).await,
                    Err(e) => Err(e),
                }
            }
        };
        let took = timer.elapsed();
        let obtained = answer.and_then(|t| {
            let expiry = token::expiry(&t, started, refresh.default_lifetime)
                .map_err(|e| LoginError::new(Outcome::InvalidResponse, e.to_string()))?;
            Ok(Obtained { token: t, obtained_at: started, expiry, took })
        });
        match obtained {
            Ok(obtained) => Ok(obtained),
            Err(error) if error.outcome == Outcome::AuthFailure => {
                self.refused(&token, &error);
                // The generation the request was sent with: a newer credential (another worker's
                // report renewed it meanwhile) is tried at once.
                Err(MintError::Refused { error, generation: credential.generation })
            }
            Err(error) => Err(MintError::Failed { error, took }),
        }
    }
}

/// How long after a report of its refused token the issuer asks for a new one: after the
/// second of the revocation, then, while each new token is refused as soon as it is issued
/// (`fresh_refusals` in a row), after a growing backoff, so that a store that refuses every new
/// token gets no loop of logins. `random` in [0, 1) is the jitter.
fn renewal_wait(fresh_refusals: u32, r: &RefreshSettings, random: f64) -> Duration {
    match fresh_refusals {
        0 | 1 => AFTER_REVOCATION,
        n => schedule::backoff(n - 1, r, None, random),
    }
}

/// What the lockout policy's word on the credential makes of the issuer: its state, and when it
/// tries again (`None`: when a secret changes, or an operator clears the count).
fn standing_state(wait: AuthWait, now: SystemTime, r: &RefreshSettings) -> (IssuerState, Option<SystemTime>) {
    match wait {
        AuthWait::HeldBack => (IssuerState::HeldBack, None),
        AuthWait::Paused(t) => (IssuerState::HeldBack, Some(t)),
        AuthWait::Backoff(t) => (IssuerState::Failing, Some(t)),
        AuthWait::Clear => (IssuerState::Failing, Some(now + r.min_backoff)),
    }
}

/// Why the issuer's wait ended.
enum Woken {
    Due,
    /// A secret changed, or an operator cleared the failures: try at once.
    Changed,
    /// A worker found the credential refused; `fresh`: soon after it was issued.
    Refused {
        fresh: bool,
    },
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresh() -> RefreshSettings {
        crate::config::parse(crate::config::tests::MINIMAL, crate::config::Checks::Static).unwrap().refresh
    }

    #[test]
    fn a_token_refused_at_once_again_and_again_is_renewed_ever_later() {
        let r = refresh();
        assert_eq!(renewal_wait(0, &r, 0.5), AFTER_REVOCATION);
        assert_eq!(renewal_wait(1, &r, 0.5), AFTER_REVOCATION);
        let waits: Vec<Duration> = (2..12).map(|n| renewal_wait(n, &r, 0.0)).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits[0] >= r.min_backoff / 2 && *waits.last().unwrap() <= r.max_backoff, "{waits:?}");
    }

    #[test]
    fn the_lockout_policy_decides_the_issuers_state() {
        let r = refresh();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let later = now + Duration::from_secs(60);
        assert_eq!(standing_state(AuthWait::HeldBack, now, &r), (IssuerState::HeldBack, None));
        assert_eq!(standing_state(AuthWait::Paused(later), now, &r), (IssuerState::HeldBack, Some(later)));
        assert_eq!(standing_state(AuthWait::Backoff(later), now, &r), (IssuerState::Failing, Some(later)));
        assert_eq!(standing_state(AuthWait::Clear, now, &r), (IssuerState::Failing, Some(now + r.min_backoff)));
    }

    #[test]
    fn a_credential_is_used_only_with_time_to_spare() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = Some(Arc::new(Secret::new("t0ken".into())));
        let at = |secs: u64| Credential {
            token: token.clone(),
            expires_at: Some(now + Duration::from_secs(secs)),
            ..Credential::default()
        };
        let r = refresh();
        assert!(at(60).usable(now, &r).is_some());
        assert!(at(CREDENTIAL_MARGIN.as_secs()).usable(now, &r).is_none(), "too close to its end");
        assert!(Credential { token: None, ..at(3600) }.usable(now, &r).is_none());
        assert!(Credential::default().usable(now, &r).is_none());
        // A before_expiry under twice the margin: the issuer renews its token then, and until
        // then it is used.
        let short = RefreshSettings { before_expiry: Duration::from_secs(4), jitter: Duration::ZERO, ..r };
        assert!(at(3).usable(now, &short).is_some());
        assert!(at(2).usable(now, &short).is_none());
    }

    #[test]
    fn the_ledger_entry_stands_for_the_credential_and_no_customer() {
        let text = format!(
            "{}auth:\n  method: login_as_customer\n  admin:\n    username: robot\n    password_env: ADMIN\n",
            crate::config::tests::MINIMAL.replace("    password_env: ALICE_PASSWORD\n", "")
        );
        let config = crate::config::parse(&text, crate::config::Checks::Static).unwrap();
        let entry = ledger_entry(&config.auth).unwrap();
        assert_eq!(
            (entry.name.as_str(), entry.username.as_str(), entry.file.as_str()),
            ("auth.admin", "robot", LEDGER_KEY)
        );
        assert!(entry.file.starts_with('.'), "no customer's file can have its name");
        assert!(ledger_entry(&Auth::Password).is_none());
    }
}
