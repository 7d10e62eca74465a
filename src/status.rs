//! What every customer's worker reports: one compact entry per customer, behind `/status`,
//! `/readyz` and every per-customer series of `/metrics`.
//!
//! The board is the root the rest reports to: workers write through a [`Reporter`], and the
//! metrics ([`crate::metrics`]) and the admin server only read it. It is the only place a
//! customer's numbers live: the per-customer series are written from it at scrape time, so
//! `/status` and `/metrics` never disagree and a customer costs one [`Entry`], not a dozen
//! Prometheus children. It depends on no other module of the daemon but the class of a login
//! ([`Outcome`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{oneshot, Notify};

use prometheus::{Histogram, HistogramOpts};

use crate::clock::rfc3339;
use crate::magento::Outcome;

/// Where a customer's worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Reading the token on disk, or before the first login.
    Starting,
    /// A login is in flight.
    Refreshing,
    /// The token on disk is good; the next login is planned.
    Fresh,
    /// Backing off after a transient failure (network, HTTP status, bad answer, disk).
    Retrying,
    /// Waiting after a 401 before trying the same password again.
    AuthBackoff,
    /// `max_auth_failures` 401s in a row: paused until `auth_failure_pause` has passed or the
    /// password changes.
    Paused,
    /// The lockout budget allows no login until the password changes or an operator clears the
    /// count (`forget-failures`): no time will help.
    HeldBack,
    /// `output.kubernetes`: another replica holds the Lease and keeps this token fresh; what is
    /// shown is what the Secret holds.
    Standby,
}

/// The outcome of one check of the token on disk (`GET customers/me`), the `result` label of
/// `magento_token_validations_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Magento accepted the token for this customer.
    Valid,
    /// Magento refused it (revoked, or the customer deactivated): replaced at once.
    Revoked,
    /// No answer either way (network, HTTP status): the token is kept.
    Error,
}

impl Check {
    /// In the order of their label values, as a scrape lists them.
    pub const ALL: [Check; 3] = [Check::Error, Check::Revoked, Check::Valid];

    pub const fn index(self) -> usize {
        match self {
            Check::Error => 0,
            Check::Revoked => 1,
            Check::Valid => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Valid => "valid",
            Check::Revoked => "revoked",
            Check::Error => "error",
        }
    }
}

/// The outcome of one notification of a new token (`notify`), the `result` label of
/// `magento_token_notify_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notified {
    /// Every action succeeded, at the first try or the second.
    Success,
    /// An action failed twice.
    Failure,
}

impl Notified {
    /// In the order of their label values, as a scrape lists them.
    pub const ALL: [Notified; 2] = [Notified::Failure, Notified::Success];

    pub const fn index(self) -> usize {
        match self {
            Notified::Failure => 0,
            Notified::Success => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Notified::Success => "success",
            Notified::Failure => "failure",
        }
    }
}

/// Everything known of one customer: what `/status` shows and every per-customer metric.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// `magento_token_expiry_timestamp_seconds`; `magento_token_valid` is computed from it.
    pub(crate) expires_at: Option<SystemTime>,
    /// `magento_token_last_success_timestamp_seconds`.
    pub(crate) last_success_at: Option<SystemTime>,
    /// `magento_token_next_refresh_timestamp_seconds`.
    pub(crate) next_refresh_at: Option<SystemTime>,
    /// `magento_token_refresh_total`, indexed by [`Outcome::index`] (u32: a login a minute for
    /// eight thousand years).
    pub(crate) refreshes: [u32; Outcome::ALL.len()],
    /// `magento_token_validations_total`, indexed by [`Check::index`].
    pub(crate) checks: [u32; Check::ALL.len()],
    /// `magento_token_notify_total`, indexed by [`Notified::index`].
    pub(crate) notifies: [u32; Notified::ALL.len()],
    /// `magento_token_password_errors_total`.
    pub(crate) password_errors: u64,
    /// `magento_token_clock_skew_seconds`.
    pub(crate) clock_skew: i64,
    /// `magento_token_consecutive_failures`.
    pub(crate) consecutive_failures: u32,
    pub(crate) state: State,
    /// `magento_token_paused`: set with the plan, so it stays up while a paused customer's
    /// state moves on to `refreshing`.
    pub(crate) paused: bool,
    /// `magento_token_held_back`, likewise.
    pub(crate) held_back: bool,
    /// Boxed: most customers never have one.
    last_error: Option<Box<ErrorNote>>,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            expires_at: None,
            last_success_at: None,
            next_refresh_at: None,
            refreshes: [0; Outcome::ALL.len()],
            checks: [0; Check::ALL.len()],
            notifies: [0; Notified::ALL.len()],
            password_errors: 0,
            clock_skew: 0,
            consecutive_failures: 0,
            state: State::Starting,
            paused: false,
            held_back: false,
            last_error: None,
        }
    }

    /// Whether an unexpired token is on disk at `now`.
    pub(crate) fn valid(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t > now)
    }
}

#[derive(Debug, Clone)]
struct ErrorNote {
    class: &'static str,
    message: Box<str>,
    at: SystemTime,
}

impl ErrorNote {
    fn boxed(class: &'static str, message: &str, at: SystemTime) -> Box<ErrorNote> {
        Box::new(ErrorNote { class, message: message.into(), at })
    }

    fn shown(&self) -> LastError {
        LastError { class: self.class, message: self.message.to_string(), at: rfc3339(self.at) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// The `result` label value of the failure.
    pub class: &'static str,
    pub message: String,
    pub at: String,
}

/// One customer, as `/status` shows it. Never holds a token or a password.
#[derive(Debug, Clone, Serialize)]
pub struct CustomerStatus {
    pub name: String,
    pub state: State,
    pub expires_at: Option<String>,
    pub last_success_at: Option<String>,
    pub next_refresh_at: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
    /// Whether an unexpired token is on disk now.
    pub valid: bool,
}

/// Every configured customer's status, shared by the workers, the metrics and the admin
/// server: one per process (clones share it).
#[derive(Clone)]
pub struct Board {
    entries: Arc<Mutex<BTreeMap<Box<str>, Entry>>>,
    /// `magento_token_refresh_duration_seconds`: the one record that is not per customer.
    login_times: Histogram,
    /// Where `POST /refresh/<name>` reaches each running worker.
    askers: Arc<Mutex<HashMap<Box<str>, Arc<Mailbox>>>>,
    /// Rung whenever a customer's token on disk may have changed (written, adopted, the
    /// customer removed): what the index file ([`crate::index`]) waits on.
    tokens_changed: Arc<Notify>,
    /// `output.kubernetes`: the Lease and the API requests.
    cluster: Arc<Mutex<ClusterStatus>>,
    /// `auth.method` other than `password`: the admin's or the IMS credential's token.
    issuer: Arc<Mutex<Option<IssuerEntry>>>,
}

/// Where the issuer's own credential stands (`/status`'s `issuer.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerState {
    /// Before its first token.
    Starting,
    /// Its token is good; the next login is planned.
    Fresh,
    /// Its last login failed; it tries again (customers go on with its token while it lasts).
    Failing,
    /// Its lockout budget holds every login back (paused, or spent): fix the secret.
    HeldBack,
}

/// Everything known of the issuer: `/status`'s `issuer` and the `magento_token_issuer_*` series.
#[derive(Debug, Clone)]
pub(crate) struct IssuerEntry {
    /// `auth.method`, the `method` label.
    pub(crate) method: &'static str,
    pub(crate) state: IssuerState,
    pub(crate) expires_at: Option<SystemTime>,
    pub(crate) next_refresh_at: Option<SystemTime>,
    /// `magento_token_issuer_refresh_total`, indexed by [`Outcome::index`].
    pub(crate) refreshes: [u32; Outcome::ALL.len()],
    last_error: Option<Box<ErrorNote>>,
}

/// The issuer, as `/status` shows it. Never holds a token or a secret.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerStatus {
    pub method: &'static str,
    pub state: IssuerState,
    pub expires_at: Option<String>,
    pub next_refresh_at: Option<String>,
    pub last_error: Option<LastError>,
}

/// What the issuer reports to the board (one per process, the issuer's task holds it).
#[derive(Clone)]
pub struct IssuerReporter {
    board: Board,
}

impl IssuerReporter {
    fn update(&self, f: impl FnOnce(&mut IssuerEntry)) {
        if let Some(e) = self.board.issuer_entry().as_mut() {
            f(e);
        }
    }

    /// A new token, valid until `expires_at`, renewed at `next`.
    pub fn success(&self, expires_at: SystemTime, next: SystemTime) {
        self.update(|e| {
            e.refreshes[Outcome::Success.index()] += 1;
            e.state = IssuerState::Fresh;
            e.expires_at = Some(expires_at);
            e.next_refresh_at = Some(next);
        });
    }

    /// A login sent and failed (`outcome`), or a problem before any was sent (`None`: an
    /// unreadable secret, the lockout budget); tried again at `next`.
    pub fn failure(
        &self,
        outcome: Option<Outcome>,
        message: &str,
        at: SystemTime,
        state: IssuerState,
        next: Option<SystemTime>,
    ) {
        self.update(|e| {
            if let Some(outcome) = outcome {
                e.refreshes[outcome.index()] += 1;
            }
            e.state = state;
            e.next_refresh_at = next;
            e.last_error = Some(ErrorNote::boxed(outcome.map_or("issuer", Outcome::as_str), message, at));
        });
    }

    /// Its token was refused before its expiry (revoked): renewed now.
    pub fn token_refused(&self) {
        self.update(|e| e.expires_at = None);
    }
}

/// `output.kubernetes`: who holds the Lease, as this replica last saw it (`/status`,
/// `magento_token_leader`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leadership {
    /// This replica's identity in the Lease.
    pub identity: String,
    /// `<namespace>/<name>` of the Lease and of the Secret.
    pub lease: String,
    pub secret: String,
    /// The holder last seen; `None` before the Lease was read, or when no one holds it.
    pub holder: Option<String>,
    /// Whether this replica holds it now (and may write).
    pub leading: bool,
}

/// The outcome of one Kubernetes API request, the `result` label of
/// `magento_token_kubernetes_requests_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiResult {
    Success,
    /// 409: the object changed since it was read (its resourceVersion).
    Conflict,
    NotFound,
    AlreadyExists,
    /// 401 or 403: the service account may not do this (RBAC).
    Forbidden,
    /// 429, 503, 504, or no answer: the API server is busy or away.
    Unavailable,
    Error,
}

impl ApiResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiResult::Success => "success",
            ApiResult::Conflict => "conflict",
            ApiResult::NotFound => "not_found",
            ApiResult::AlreadyExists => "already_exists",
            ApiResult::Forbidden => "forbidden",
            ApiResult::Unavailable => "unavailable",
            ApiResult::Error => "error",
        }
    }
}

/// One API request's labels: the object kind (`secret`, `lease`), the verb and the outcome.
pub type ApiRequest = (&'static str, &'static str, ApiResult);

/// The route of a token API request (`output.kubernetes.token_api`), the `route` label of
/// `magento_token_api_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TokenRoute {
    /// `GET /token/<name>`.
    Token,
    /// `POST /refresh/<name>` with an `Authorization` header.
    Refresh,
}

impl TokenRoute {
    pub const ALL: [TokenRoute; 2] = [TokenRoute::Refresh, TokenRoute::Token];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenRoute::Token => "token",
            TokenRoute::Refresh => "refresh",
        }
    }
}

/// How a token API request was answered, the `result` label of
/// `magento_token_api_requests_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Granted {
    /// 200 with the token.
    Allowed,
    /// No bearer token, or one TokenReview did not authenticate: 401 (`GET /token`), or the
    /// answer without the token (`POST /refresh`).
    Unauthenticated,
    /// SubjectAccessReview did not allow `get` on the customer's Secret: 403, or the answer
    /// without the token.
    Forbidden,
    /// No such customer: 404.
    NotFound,
    /// This replica does not hold the Lease: 503 naming the holder.
    Standby,
    /// The reviews failed (the API away, the daemon not bound to `system:auth-delegator`), or
    /// no valid token can be had now: 503 with the reason, never a token.
    Unavailable,
}

impl Granted {
    pub const ALL: [Granted; 6] = [
        Granted::Allowed,
        Granted::Forbidden,
        Granted::NotFound,
        Granted::Standby,
        Granted::Unauthenticated,
        Granted::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Granted::Allowed => "allowed",
            Granted::Unauthenticated => "unauthenticated",
            Granted::Forbidden => "forbidden",
            Granted::NotFound => "not_found",
            Granted::Standby => "standby",
            Granted::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Default)]
struct ClusterStatus {
    leadership: Option<Leadership>,
    requests: BTreeMap<ApiRequest, u64>,
    /// `magento_token_api_requests_total`: `None` while the token API is off.
    token_api: Option<BTreeMap<(TokenRoute, Granted), u64>>,
    /// `magento_token_kubernetes_writes_total`, by Secret.
    writes: BTreeMap<String, u64>,
}

/// An app's request (`POST /refresh/<name>`) to check the token on disk now and replace it if
/// Magento refuses it; the worker answers when done.
pub type Ask = oneshot::Sender<Answer>;

/// Where a worker's asks wait for it: a list and a bell, about a hundred bytes a customer
/// (a channel would cost a kilobyte and more, for every customer of an idle daemon).
#[derive(Default)]
pub struct Mailbox {
    asks: Mutex<Vec<Ask>>,
    bell: Notify,
    /// `output.kubernetes`: where the token API reads the worker's token.
    keeper: Mutex<Option<Arc<dyn Keeper>>>,
}

/// What the token API (`output.kubernetes.token_api`) reads of a customer whose worker runs in
/// this process: its settings (its Secret is worked out from them) and the token it keeps now.
pub trait Keeper: Send + Sync {
    fn customer(&self) -> &crate::config::CustomerConfig;
    /// The token kept now (the one in the Secret), if there is one.
    fn token(&self) -> Option<zeroize::Zeroizing<String>>;
}

impl Mailbox {
    /// Tells the token API where this customer's token is (the worker, as it starts).
    pub fn keep(&self, keeper: Arc<dyn Keeper>) {
        *self.keeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(keeper);
    }

    /// Where this customer's token is read, if its worker said.
    pub fn keeper(&self) -> Option<Arc<dyn Keeper>> {
        self.keeper.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Leaves an ask for the worker and wakes it.
    pub fn post(&self, ask: Ask) {
        self.asks.lock().unwrap_or_else(|e| e.into_inner()).push(ask);
        self.bell.notify_one();
    }

    /// Waits until an ask is left (returns at once if one is waiting).
    pub async fn rung(&self) {
        self.bell.notified().await;
    }

    /// Every ask left so far.
    pub fn take(&self) -> Vec<Ask> {
        std::mem::take(&mut *self.asks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What a worker answers a [`Ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A token Magento accepts is on disk; `replaced`: a new one was written for this request.
    Token { replaced: bool, expires_at: SystemTime },
    /// No valid token can be had now, and why (the lockout budget, Magento down).
    Unavailable(String),
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    pub fn new() -> Board {
        let login_times = Histogram::with_opts(
            HistogramOpts::new("magento_token_refresh_duration_seconds", "Time of one login request.")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("a valid histogram");
        Board {
            entries: Arc::new(Mutex::new(BTreeMap::new())),
            login_times,
            askers: Arc::default(),
            tokens_changed: Arc::default(),
            cluster: Arc::default(),
            issuer: Arc::default(),
        }
    }

    fn issuer_entry(&self) -> std::sync::MutexGuard<'_, Option<IssuerEntry>> {
        self.issuer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the issuer of `method` on the board (every count at 0), or takes it off (`None`);
    /// the same method again keeps what is known. Returns its reporter.
    pub fn set_issuer(&self, method: Option<&'static str>) -> IssuerReporter {
        let mut entry = self.issuer_entry();
        match method {
            Some(m) if entry.as_ref().is_some_and(|e| e.method == m) => {}
            Some(method) => {
                *entry = Some(IssuerEntry {
                    method,
                    state: IssuerState::Starting,
                    expires_at: None,
                    next_refresh_at: None,
                    refreshes: [0; Outcome::ALL.len()],
                    last_error: None,
                })
            }
            None => *entry = None,
        }
        IssuerReporter { board: self.clone() }
    }

    /// The issuer as `/status` shows it, if there is one.
    pub fn issuer(&self) -> Option<IssuerStatus> {
        self.issuer_entry().as_ref().map(|e| IssuerStatus {
            method: e.method,
            state: e.state,
            expires_at: e.expires_at.map(rfc3339),
            next_refresh_at: e.next_refresh_at.map(rfc3339),
            last_error: e.last_error.as_ref().map(|n| n.shown()),
        })
    }

    /// The issuer's entry for the metrics.
    pub(crate) fn issuer_metrics(&self) -> Option<IssuerEntry> {
        self.issuer_entry().clone()
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, ClusterStatus> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `output.kubernetes`: who holds the Lease now.
    pub fn set_leadership(&self, leadership: Leadership) {
        self.cluster().leadership = Some(leadership);
    }

    pub fn leadership(&self) -> Option<Leadership> {
        self.cluster().leadership.clone()
    }

    /// Counts one Kubernetes API request.
    pub fn api_request(&self, request: ApiRequest) {
        *self.cluster().requests.entry(request).or_default() += 1;
    }

    /// Counts one update (or creation) of the Secret `name` that was written.
    pub fn secret_written(&self, name: &str) {
        *self.cluster().writes.entry(name.into()).or_default() += 1;
    }

    /// Every Secret's updates written, by name.
    pub fn secret_writes(&self) -> Vec<(String, u64)> {
        self.cluster().writes.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Every Kubernetes API request counted, by labels.
    pub fn api_requests(&self) -> Vec<(ApiRequest, u64)> {
        self.cluster().requests.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// The token API is on: every series of `magento_token_api_requests_total` exists from now
    /// on, at 0 until counted.
    pub fn token_api_on(&self) {
        let mut cluster = self.cluster();
        let counts = cluster.token_api.get_or_insert_with(BTreeMap::new);
        for route in TokenRoute::ALL {
            for result in Granted::ALL {
                counts.entry((route, result)).or_default();
            }
        }
    }

    /// Counts one token API request (once the API is on).
    pub fn token_api_request(&self, route: TokenRoute, result: Granted) {
        if let Some(counts) = self.cluster().token_api.as_mut() {
            *counts.entry((route, result)).or_default() += 1;
        }
    }

    /// Every token API request counted, by labels; `None` while the API is off.
    pub fn token_api_requests(&self) -> Option<Vec<((TokenRoute, Granted), u64)>> {
        self.cluster().token_api.as_ref().map(|counts| counts.iter().map(|(k, v)| (*k, *v)).collect())
    }

    /// The histogram of login request times, for the metrics registry.
    pub(crate) fn login_times(&self) -> &Histogram {
        &self.login_times
    }

    /// The time of one login request, if one was sent.
    pub(crate) fn login_time(&self, request_time: Option<std::time::Duration>) {
        if let Some(t) = request_time {
            self.login_times.observe(t.as_secs_f64());
        }
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<Box<str>, Entry>) -> R) -> R {
        f(&mut self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Runs `f` on `name`'s entry, if it is on the board.
    pub(crate) fn update<R>(&self, name: &str, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.with(|m| m.get_mut(name).map(f))
    }

    /// Puts `name` on the board with every value at 0; a customer already there (restarted
    /// by a reload) keeps what is known of it (its token on disk is still there).
    pub(crate) fn add(&self, name: &str) {
        self.with(|m| match m.get_mut(name) {
            Some(e) => e.state = State::Starting,
            None => {
                m.insert(name.into(), Entry::new());
            }
        });
    }

    /// Takes `name` off the board: gone from `/status`, `/readyz` and every metric.
    pub fn remove(&self, name: &str) {
        self.with(|m| m.remove(name));
        self.askers.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.tokens_changed.notify_one();
    }

    /// Returns once a customer's token on disk may have changed since the last call returned
    /// (at once if one did meanwhile): a token written or adopted, a customer removed. Changes
    /// while no one waits are kept as one.
    pub fn tokens_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.tokens_changed.notified()
    }

    /// Every customer on the board: the expiry of its token on disk, if one is known, and
    /// whether it is still starting (its token on disk not looked at yet).
    pub fn expiries(&self) -> Vec<(String, Option<SystemTime>, bool)> {
        self.with(|m| m.iter().map(|(n, e)| (n.to_string(), e.expires_at, e.state == State::Starting)).collect())
    }

    /// When `name`'s token on disk (in the Secret) expires, if one is known.
    pub fn expiry(&self, name: &str) -> Option<SystemTime> {
        self.with(|m| m.get(name).and_then(|e| e.expires_at))
    }

    /// Where to leave an [`Ask`] for `name`; `None` for an unknown customer.
    pub fn asker(&self, name: &str) -> Option<Arc<Mailbox>> {
        self.askers.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Forgets every worker's mailbox: none runs here any more (a standby of
    /// `output.kubernetes`).
    pub fn close_askers(&self) {
        self.askers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn names(&self) -> Vec<String> {
        self.with(|m| m.keys().map(|k| k.to_string()).collect())
    }

    pub fn snapshot(&self, now: SystemTime) -> Vec<CustomerStatus> {
        self.with(|m| {
            m.iter()
                .map(|(name, e)| CustomerStatus {
                    name: name.to_string(),
                    state: e.state,
                    expires_at: e.expires_at.map(rfc3339),
                    last_success_at: e.last_success_at.map(rfc3339),
                    next_refresh_at: e.next_refresh_at.map(rfc3339),
                    consecutive_failures: e.consecutive_failures,
                    last_error: e.last_error.as_ref().map(|n| n.shown()),
                    valid: e.valid(now),
                })
                .collect()
        })
    }

    /// The customers without an unexpired token on disk at `now`; empty means ready.
    pub fn not_ready(&self, now: SystemTime) -> Vec<String> {
        self.with(|m| m.iter().filter(|(_, e)| !e.valid(now)).map(|(n, _)| n.to_string()).collect())
    }
}

/// A worker's handle on the board.
#[derive(Clone)]
pub struct Reporter {
    name: String,
    board: Board,
}

impl Reporter {
    /// Registers `name` on the board, which creates its metric series at 0. A customer
    /// restarted by a reload keeps what is known of it (its token on disk is still there).
    pub fn new(name: &str, board: Board) -> Reporter {
        board.add(name);
        Reporter { name: name.to_owned(), board }
    }

    fn update<R>(&self, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        self.board.update(&self.name, f)
    }

    /// The customer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A notification of a new token is over (`notify`).
    pub fn notified(&self, success: bool) {
        let result = if success { Notified::Success } else { Notified::Failure };
        self.update(|e| e.notifies[result.index()] += 1);
    }

    /// The password source could not be read before a login (no login sent).
    pub fn password_error(&self) {
        self.update(|e| e.password_errors += 1);
    }

    /// Magento's clock minus ours, from the last JWT (0 when within tolerance).
    pub fn clock_skew(&self, seconds: i64) {
        self.update(|e| e.clock_skew = seconds);
    }

    /// The mailbox of `POST /refresh/<name>` for this customer (a worker restarted by a reload
    /// takes over its predecessor's).
    pub fn listen(&self) -> Arc<Mailbox> {
        let mut askers = self.board.askers.lock().unwrap_or_else(|e| e.into_inner());
        askers.entry(self.name.as_str().into()).or_default().clone()
    }

    /// The expiry of the token on disk, and the last error's message, as the board has them.
    pub fn known(&self) -> (Option<SystemTime>, Option<String>) {
        self.update(|e| (e.expires_at, e.last_error.as_ref().map(|n| n.message.to_string()))).unwrap_or_default()
    }

    pub fn state(&self, state: State) {
        self.update(|e| e.state = state);
    }

    /// A token is on disk (adopted from an earlier run, or just written). Whether it is still
    /// valid is worked out whenever someone asks, from its expiry.
    pub fn token_on_disk(&self, expires_at: SystemTime) {
        self.update(|e| e.expires_at = Some(expires_at));
        self.board.tokens_changed.notify_one();
    }

    /// No token is there any more (`output.kubernetes`: the Secret a standby read holds none).
    pub fn no_token_on_disk(&self) {
        if self.update(|e| e.expires_at.take()).flatten().is_some() {
            self.board.tokens_changed.notify_one();
        }
    }

    pub fn planned(&self, state: State, at: Option<SystemTime>) {
        self.update(|e| {
            e.state = state;
            e.next_refresh_at = at;
            e.paused = state == State::Paused;
            e.held_back = state == State::HeldBack;
        });
    }

    /// A new token was written.
    pub fn success(&self, at: SystemTime, expires_at: SystemTime, request_time: Option<std::time::Duration>) {
        self.board.login_time(request_time);
        self.update(|e| {
            e.refreshes[Outcome::Success.index()] += 1;
            e.expires_at = Some(expires_at);
            e.last_success_at = Some(at);
            e.consecutive_failures = 0;
        });
        self.board.tokens_changed.notify_one();
    }

    /// A failed attempt; returns the failures in a row since the last success.
    pub fn failure(
        &self,
        outcome: Outcome,
        message: &str,
        at: SystemTime,
        request_time: Option<std::time::Duration>,
    ) -> u32 {
        self.board.login_time(request_time);
        self.update(|e| {
            e.refreshes[outcome.index()] += 1;
            e.consecutive_failures += 1;
            e.last_error = Some(ErrorNote::boxed(outcome.as_str(), message, at));
            e.consecutive_failures
        })
        .unwrap_or(1)
    }

    /// A check of the token on disk.
    pub fn checked(&self, check: Check) {
        self.update(|e| e.checks[check.index()] += 1);
    }

    /// A problem that is not a login (an unreadable password source): shown in `/status`.
    pub fn problem(&self, class: &'static str, message: &str, at: SystemTime) {
        self.update(|e| e.last_error = Some(ErrorNote::boxed(class, message, at)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_entry_stays_small() {
        // The board holds one of these per customer, for the life of the daemon.
        assert!(std::mem::size_of::<Entry>() <= 128, "{}", std::mem::size_of::<Entry>());
    }

    #[test]
    fn a_token_written_adopted_or_removed_rings_the_index_once() {
        use futures::FutureExt;
        let board = Board::new();
        let rung = |b: &Board| b.tokens_changed().now_or_never().is_some();
        let r = Reporter::new("alice", board.clone());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(!rung(&board));
        // Nothing about the token on disk: no ring.
        r.failure(Outcome::HttpError, "503", t0, None);
        r.planned(State::Retrying, Some(t0));
        r.state(State::Refreshing);
        r.checked(Check::Valid);
        assert!(!rung(&board));
        // Changes while no one waits are kept as one.
        r.success(t0, t0 + Duration::from_secs(3600), None);
        r.success(t0, t0 + Duration::from_secs(3601), None);
        assert!(rung(&board));
        assert!(!rung(&board));
        r.token_on_disk(t0 + Duration::from_secs(60));
        assert!(rung(&board));
        assert_eq!(board.expiries(), [("alice".to_string(), Some(t0 + Duration::from_secs(60)), false)]);
        Reporter::new("bob", board.clone());
        assert_eq!(board.expiries()[1], ("bob".to_string(), None, true));
        board.remove("alice");
        assert!(rung(&board));
    }

    #[test]
    fn the_board_shows_what_the_reporter_says() {
        let board = Board::new();
        let r = Reporter::new("alice", board.clone());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(board.not_ready(t0), ["alice"]);
        assert_eq!(r.failure(Outcome::NetworkError, "reset", t0, None), 1);
        assert_eq!(r.failure(Outcome::HttpError, "503", t0, None), 2);
        r.success(t0, t0 + Duration::from_secs(3600), Some(Duration::from_millis(5)));
        r.planned(State::Fresh, Some(t0 + Duration::from_secs(2700)));
        let s = &board.snapshot(t0)[0];
        assert_eq!((s.name.as_str(), s.state, s.consecutive_failures, s.valid), ("alice", State::Fresh, 0, true));
        assert_eq!(s.expires_at.as_deref(), Some("2027-01-15T09:00:00Z"));
        assert_eq!(s.last_error.as_ref().map(|e| (e.class, e.message.as_str())), Some(("http_error", "503")));
        assert!(board.not_ready(t0).is_empty());
        assert_eq!(board.not_ready(t0 + Duration::from_secs(3600)), ["alice"]);
        // A restart keeps what is known; a removal forgets it.
        Reporter::new("alice", board.clone());
        assert_eq!(board.snapshot(t0)[0].state, State::Starting);
        assert!(board.snapshot(t0)[0].valid);
        board.remove("alice");
        assert!(board.names().is_empty());
        // A reporter whose customer is gone changes nothing.
        assert_eq!(r.failure(Outcome::HttpError, "503", t0, None), 1);
        assert!(board.names().is_empty());
    }
}
