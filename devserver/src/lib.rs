//! A development server that answers the Magento 2.4 customer-token API the way a real
//! Magento does (see shared/magento-api.md): the token, customers/me and revoke
//! endpoints, store codes, every error body, the brute-force throttle (with or without
//! its cleanup cron), the customer's own lock, unconfirmed accounts, reCAPTCHA, JWT,
//! opaque or encrypted tokens and their revocation, plus what sits in front of a real
//! store: an htpasswd front and injectable faults.
//!
//! It also speaks GraphQL (shared/magento-other-paths.md §1-4): `generateCustomerToken` through
//! the same login service, `{ customer { email } }` to validate a token, in the conventions of
//! 2.4.7 or 2.4.8 ([`GraphQlConvention`]), and can stand in for Adobe Commerce as a Cloud Service
//! (§9, [`CloudService`]): everything under `/<tenant-id>`, no REST customer-token routes.
//!
//! Customer tokens without customer passwords (§5, §6, §9): admin users ([`DevServer::add_admin`])
//! get admin tokens from `POST /rest/V1/integration/admin/token`, or, with two-factor
//! authentication on and a TOTP secret, from `POST /rest/V1/tfa/provider/google/authenticate`
//! (their own throttle row and the admin user lock); GraphQL `generateCustomerTokenAsAdmin` turns
//! an admin token into a customer's opaque token (Login as Customer switch, ACLs, per-customer
//! opt-in); the cloud service adds an IMS stand-in (`POST /ims/token/v3`), one-time codes
//! (`POST /<tenant-id>/V1/customer/{id}/otp`) and `exchangeOtpForCustomerToken`. Time for all of
//! these can be moved forward ([`DevServer::advance_clock`]) so tests never sleep.
//!
//! Modules: `admin` (admin users, the admin token service, 2FA), `cloud` (IMS and one-time codes),
//! `handler` (one request: front, faults, routing, the REST endpoints and the login
//! service both APIs share), `graphql` (the GraphQL endpoint; `graphql::plan` reads documents),
//! `render` (Magento's JSON/XML and body decoding), `throttle` and `lockout` (the two locks),
//! `jwt` (tokens), `faults` and `front` (what stands before a store), `io` (the shared socket),
//! `cli` (the command line).
//!
//! It backs the `demo` command, the end-to-end tests, the Python tests and the
//! benchmarks, so it is built for speed as well: one task per connection, keep-alive,
//! short critical sections on one mutex, no logging above debug per request.

mod admin;
mod cli;
mod cloud;
mod faults;
mod front;
mod graphql;
mod handler;
mod io;
#[cfg(test)]
mod issuer_tests;
mod jwt;
mod lockout;
mod render;
#[cfg(test)]
mod tests;
mod throttle;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub use admin::IssuerCounts;
pub use cli::{run_cli, DevServerArgs};
pub use faults::Fault;
pub use graphql::GraphQlConvention;

use jwt::Signer;
use lockout::{Lockout, LockoutPolicy};
use throttle::Throttle;

/// What the token endpoint issues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenFormat {
    /// Magento 2.4.4+'s default: a compact JWS (HS256) whose claims a client can read.
    #[default]
    Jwt,
    /// The JWT module disabled: 32 characters of `[0-9a-z]`.
    Opaque,
    /// An encrypted JWT (JWE compact, five dot-separated base64url parts): `webapi/jwtauth/jwt_alg`
    /// set to a JWE algorithm. The claims cannot be read, so the expiry is not known to a client;
    /// revoked by the second like a JWS.
    Encrypted,
}

/// How the server behaves; the defaults are Magento's defaults.
#[derive(Clone, Debug)]
pub struct DevServerOptions {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// JWT `exp - iat` (Magento's `webapi/jwtauth/customer_expiration`), also the
    /// lifetime of opaque and encrypted tokens.
    pub token_lifetime: Duration,
    /// What the token endpoint issues.
    pub token_format: TokenFormat,
    /// Kept for existing callers: `true` issues opaque tokens when `token_format` is left at
    /// [`TokenFormat::Jwt`] (prefer `token_format: TokenFormat::Opaque`).
    pub opaque_tokens: bool,
    /// `oauth/authentication_lock/max_failures_count`.
    pub lock_max_failures: u32,
    /// `oauth/authentication_lock/timeout`.
    pub lock_timeout: Duration,
    /// Whether the store's cron runs `outdated_authentication_failures_cleanup`: with it (the
    /// default) an expired throttle row is as good as gone; without it (common on staging)
    /// the row keeps its count, the next failure adds to it and locks again at once, and
    /// only a successful token login deletes it.
    pub cron: bool,
    /// `customer/password/lockout_failures`: wrong passwords of an existing customer before
    /// the customer's own lock (0 disables it).
    pub customer_lock_failures: u32,
    /// `customer/password/lockout_threshold`: how long that lock lasts (0 disables it).
    pub customer_lock_duration: Duration,
    /// (store code, website code). `all` is always accepted and means the default
    /// website; the default store (for `/rest/V1/...`) is `default` if listed, else the
    /// first entry.
    pub stores: Vec<(String, String)>,
    /// Logins are refused with the reCAPTCHA error (REST's 400, GraphQL's `graphql-input`), as a
    /// store with reCAPTCHA for customer login enabled does (switchable later with
    /// [`DevServer::set_recaptcha`]).
    pub recaptcha_required: bool,
    /// Added to `iat`/`exp` and to the clock tokens are checked against: a Magento whose
    /// clock is off.
    pub clock_offset_secs: i64,
    /// Serve https with this certificate instead of plain http (tests of the daemon's TLS
    /// handling: a test CA, `magento.ca_file`, proxies with CONNECT).
    pub tls: Option<TlsIdentity>,
    /// How long every login request (REST token request or GraphQL `generateCustomerToken`,
    /// successful or not) waits before it is answered: a store whose PHP takes its time. Each
    /// request sleeps on its own; other connections go on.
    pub login_latency: Duration,
    /// Which release's GraphQL answers the endpoint gives (statuses, the bearer check before the
    /// resolvers, the unconfirmed account's message); the current one by default.
    pub graphql_convention: GraphQlConvention,
    /// Where the GraphQL endpoint is (Magento's `/graphql`); under the tenant's base path when
    /// [`DevServerOptions::cloud_service`] is set.
    pub graphql_path: String,
    /// Answer as Adobe Commerce as a Cloud Service instead of an on-premises store.
    pub cloud_service: Option<CloudService>,
    /// Lifetime of opaque customer tokens (`oauth/access_token_lifetime/customer`): those of
    /// [`TokenFormat::Opaque`] logins and those `generateCustomerTokenAsAdmin` issues whatever
    /// the format. `None`: [`DevServerOptions::token_lifetime`].
    pub opaque_token_lifetime: Option<Duration>,
    /// `webapi/jwtauth/admin_expiration`: `exp - iat` of admin tokens (default 60 minutes).
    pub admin_token_lifetime: Duration,
    /// `admin/security/lockout_failures`: wrong passwords (or 2FA codes) before the admin user's
    /// own lock (0 disables it). The admin's throttle row uses `lock_max_failures` and
    /// `lock_timeout` like customers' rows, kept apart from them.
    pub admin_lock_failures: u32,
    /// `admin/security/lockout_threshold`: how long that lock lasts.
    pub admin_lock_duration: Duration,
    /// Magento_TwoFactorAuth (on by default in 2.4): an admin with a TOTP secret gets a token
    /// only from the Google provider's endpoint (switchable with [`DevServer::set_two_factor`]).
    pub two_factor_auth: bool,
    /// `login_as_customer/general/enabled` (off by default, as in Magento; switchable with
    /// [`DevServer::set_login_as_customer`]).
    pub login_as_customer: bool,
    /// Whether `generateCustomerTokenAsAdmin` also requires the customer's own "Allow remote
    /// shopping assistance" opt-in, as the docs say (the source read does not check it: off).
    pub check_assistance_allowed: bool,
    /// `expires_in` of the IMS stand-in's access tokens (IMS's default 24 hours).
    pub ims_token_lifetime: Duration,
    /// How long a cloud one-time code (`/V1/customer/{id}/otp`) can be exchanged (30 s per
    /// one Adobe doc, 60 s per another: UNCONFIRMED).
    pub otp_lifetime: Duration,
}

/// Adobe Commerce as a Cloud Service (shared/magento-other-paths.md §9): the API lives under
/// `/<tenant-id>`; GraphQL at `/<tenant-id>/graphql`; REST at `/<tenant-id>/V1/...` with no
/// `/rest` and no store code (the `Store` header scopes a request). There are no REST customer
/// token routes there (no `/V1/integration/customer/token`, no `/V1/customers/me`): a client that
/// tries them gets Magento's 404 for an unknown route. Everything outside `/<tenant-id>` is a 404.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudService {
    /// The first path segment of every API URL, e.g. `Ab3dEfGh1jK2`.
    pub tenant_id: String,
}

impl CloudService {
    pub fn new(tenant_id: impl Into<String>) -> CloudService {
        CloudService { tenant_id: tenant_id.into() }
    }
}

/// A certificate chain (leaf first) and its private key, both PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("key_pem", &"***").finish_non_exhaustive()
    }
}

impl Default for DevServerOptions {
    fn default() -> Self {
        DevServerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_lifetime: Duration::from_secs(3600),
            token_format: TokenFormat::Jwt,
            opaque_tokens: false,
            lock_max_failures: 6,
            lock_timeout: Duration::from_secs(1800),
            cron: true,
            customer_lock_failures: 10,
            customer_lock_duration: Duration::from_secs(600),
            stores: vec![("default".to_owned(), "base".to_owned())],
            recaptcha_required: false,
            clock_offset_secs: 0,
            tls: None,
            login_latency: Duration::ZERO,
            graphql_convention: GraphQlConvention::default(),
            graphql_path: "/graphql".to_owned(),
            cloud_service: None,
            opaque_token_lifetime: None,
            admin_token_lifetime: Duration::from_secs(3600),
            admin_lock_failures: 6,
            admin_lock_duration: Duration::from_secs(1800),
            two_factor_auth: true,
            login_as_customer: false,
            check_assistance_allowed: false,
            ims_token_lifetime: Duration::from_secs(86_400),
            otp_lifetime: Duration::from_secs(30),
        }
    }
}

/// What a request was aimed at, judged from its path (and, at the GraphQL endpoint, from its
/// operation), whether or not it was served: what tests count ("no REST login was tried", "two
/// GraphQL logins", "one validation").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `.../V1/integration/customer/token`, by any method, through any store segment (a known
    /// store code, an unknown one, none), on premises or under the cloud service's tenant.
    RestToken,
    /// `.../V1/customers/me`, likewise.
    RestCustomersMe,
    /// `.../V1/integration/customer/revoke-customer-token`, likewise.
    RestRevoke,
    /// Any other path of the REST API: `/rest` and below, or the cloud service's `/<tenant-id>`
    /// and below (its GraphQL endpoint excepted).
    RestOther,
    /// The GraphQL endpoint with a mutation that runs `generateCustomerToken`.
    GraphQlLogin,
    /// The GraphQL endpoint with a query of `customer` (how a token is validated).
    GraphQlCustomer,
    /// The GraphQL endpoint with a mutation that runs `generateCustomerTokenAsAdmin` (and no
    /// `generateCustomerToken`).
    GraphQlLoginAsAdmin,
    /// The GraphQL endpoint with a mutation that runs `exchangeOtpForCustomerToken` (and neither
    /// of the above).
    GraphQlOtpExchange,
    /// The GraphQL endpoint with anything else: other fields, what does not parse or decode.
    GraphQlOther,
    /// `.../V1/integration/admin/token` (REST, any store segment, by any method).
    AdminToken,
    /// `.../V1/tfa/provider/google/authenticate` (REST, likewise).
    TfaGoogle,
    /// `/ims/token/v3`, the IMS stand-in of the cloud service (outside the tenant's path).
    ImsToken,
    /// `/<tenant-id>/V1/customer/{customerId}/otp` of the cloud service, by any method.
    CloudOtp,
    /// Neither API (the storefront's 404).
    Other,
}

impl Route {
    pub fn is_rest(self) -> bool {
        matches!(
            self,
            Route::RestToken
                | Route::RestCustomersMe
                | Route::RestRevoke
                | Route::RestOther
                | Route::AdminToken
                | Route::TfaGoogle
                | Route::CloudOtp
        )
    }

    pub fn is_graphql(self) -> bool {
        matches!(
            self,
            Route::GraphQlLogin
                | Route::GraphQlCustomer
                | Route::GraphQlLoginAsAdmin
                | Route::GraphQlOtpExchange
                | Route::GraphQlOther
        )
    }
}

/// One request as received (credentials included: tests assert on what was sent).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// The path as received, without the query, e.g. `/rest/de/V1/integration/customer/token`.
    pub path: String,
    /// What it was aimed at.
    pub route: Route,
    /// From a REST token request's JSON body, when present and a string; from a GraphQL login's
    /// `email` argument (literal or variable) once the document checked out; the admin's name of
    /// an admin token or 2FA request; the `customer_email` of `generateCustomerTokenAsAdmin`
    /// and the `email` of `exchangeOtpForCustomerToken`.
    pub username: Option<String>,
    /// A customer login's `password`, likewise. Never kept for admin logins, 2FA codes,
    /// one-time codes or IMS client secrets.
    pub password: Option<String>,
    /// The `Store` header as received (GraphQL and the cloud service's REST read it).
    pub store: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    /// Whether an Authorization header was present (its value is never kept).
    pub authorization: bool,
    /// What was answered; 0 for Hang and Reset (nothing was).
    pub status: u16,
    pub at: SystemTime,
}

/// A store as the router needs it.
#[derive(Clone, Debug)]
pub(crate) struct StoreInfo {
    pub(crate) website: String,
    /// `/rest/all/`: the admin store, which belongs to no customer's website.
    pub(crate) all: bool,
}

/// The GraphQL endpoint, fixed at start.
pub(crate) struct GraphQlConfig {
    pub(crate) convention: GraphQlConvention,
    /// The whole path: the tenant's base path, if any, then `graphql_path`.
    pub(crate) endpoint: String,
}

/// Fixed at start.
pub(crate) struct Config {
    pub(crate) token_lifetime_secs: i64,
    pub(crate) token_format: TokenFormat,
    pub(crate) customer_lock: LockoutPolicy,
    pub(crate) clock_offset_secs: i64,
    pub(crate) login_latency: Duration,
    pub(crate) stores: HashMap<String, StoreInfo>,
    pub(crate) default_store: StoreInfo,
    pub(crate) all_store: StoreInfo,
    /// Website code -> (website_id, store_id of its first store, that store's code).
    websites: HashMap<String, (u32, u32, String)>,
    pub(crate) graphql: GraphQlConfig,
    /// The cloud service's base path, `/<tenant-id>`, when the server stands in for it.
    pub(crate) cloud_base: Option<String>,
    pub(crate) opaque_lifetime_secs: i64,
    pub(crate) admin_token_lifetime_secs: i64,
    pub(crate) admin_lock: LockoutPolicy,
    pub(crate) ims_token_lifetime_secs: i64,
    pub(crate) otp_lifetime_secs: i64,
    /// How far [`DevServer::advance_clock`] moved this server's time, in milliseconds.
    advanced_ms: AtomicU64,
}

impl Config {
    /// Whether this path is the GraphQL endpoint (a trailing slash allowed).
    pub(crate) fn is_graphql_path(&self, path: &str) -> bool {
        let endpoint = self.graphql.endpoint.as_str();
        path == endpoint || path.strip_suffix('/') == Some(endpoint)
    }
}

impl Config {
    /// Magento's notion of now, in Unix seconds (the clock offset and advances included).
    pub(crate) fn unix_now(&self) -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + self.advanced();
        now.as_secs() as i64 + self.clock_offset_secs
    }

    /// The monotonic clock of the admin's throttle row and lock, moved by the advances.
    pub(crate) fn instant_now(&self) -> Instant {
        Instant::now() + self.advanced()
    }

    pub(crate) fn advance(&self, by: Duration) {
        self.advanced_ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }

    fn advanced(&self) -> Duration {
        Duration::from_millis(self.advanced_ms.load(Ordering::Relaxed))
    }
}

pub(crate) struct Customer {
    pub(crate) id: u64,
    pub(crate) email: String,
    pub(crate) password: String,
    pub(crate) website: String,
    pub(crate) firstname: String,
    pub(crate) created_in: String,
    pub(crate) store_id: u32,
    pub(crate) website_id: u32,
    pub(crate) created_at: i64,
    /// JWS and JWE tokens with `iat <=` this are dead (the JWT module's revocation table).
    pub(crate) revoked_at: Option<i64>,
    /// How often its tokens were revoked, by the endpoint or [`DevServer::revoke`].
    pub(crate) revocations: usize,
    /// Cleared by [`DevServer::set_confirmed`]: the email confirmation is still pending.
    pub(crate) confirmed: bool,
    /// `allow_remote_shopping_assistance` (set by default here; [`DevServer::set_assistance_allowed`]).
    pub(crate) assistance_allowed: bool,
    pub(crate) lockout: Lockout,
}

/// Why `AccountManagement::authenticate` refused a known customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Locked or wrong password: the generic sign-in message.
    SignIn,
    /// Right password, email not confirmed: its own message.
    Unconfirmed,
}

impl Customer {
    /// `AccountManagement::authenticate`: the customer's lock, then the password (a wrong one
    /// counts towards the lock), then the confirmation.
    pub(crate) fn authenticate(&mut self, password: &str, policy: LockoutPolicy, now: Instant) -> Result<u64, Refusal> {
        if self.lockout.is_locked(now) {
            return Err(Refusal::SignIn);
        }
        if self.password != password {
            self.lockout.record_failure(policy, now);
            return Err(Refusal::SignIn);
        }
        if !self.confirmed {
            return Err(Refusal::Unconfirmed);
        }
        Ok(self.id)
    }
}

/// An opaque or encrypted token: nothing in it can be read back, so the server keeps it.
pub(crate) struct StoredToken {
    pub(crate) uid: u64,
    pub(crate) iat: i64,
    pub(crate) exp: i64,
    /// Its `oauth_token` row was deleted by a revocation (opaque tokens only).
    pub(crate) revoked: bool,
}

pub(crate) struct State {
    next_id: u64,
    pub(crate) customers: HashMap<u64, Customer>,
    /// website code -> lower-cased email -> customer id (MySQL compares emails
    /// case-insensitively).
    index: HashMap<String, HashMap<String, u64>>,
    pub(crate) throttle: Throttle,
    /// Lower-cased username -> login requests (REST or GraphQL) naming it.
    pub(crate) attempts: HashMap<String, usize>,
    pub(crate) records: Vec<RequestRecord>,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) sticky: Option<Fault>,
    pub(crate) stored: HashMap<String, StoredToken>,
    /// `user:password` the basic-auth front asks for, while set.
    pub(crate) front: Option<Vec<u8>>,
    /// Every token a login minted, in order (JWTs included, which are otherwise not kept).
    pub(crate) issued: Vec<String>,
    /// Every password a customer was given, in order: what a test may check never leaks.
    pub(crate) passwords: Vec<String>,
    /// Admin users, IMS clients, their tokens and the one-time codes.
    pub(crate) issuers: admin::Issuers,
}

impl State {
    /// A customer of `website` by lower-cased email.
    pub(crate) fn lookup_mut(&mut self, website: &str, email_lower: &str) -> Option<&mut Customer> {
        let id = self.index.get(website)?.get(email_lower)?;
        self.customers.get_mut(id)
    }

    /// `revokeFor` a customer: the JWT module stores a cut-off second (`time()`), the
    /// opaque-token module deletes the customer's `oauth_token` rows (a later login in the
    /// same second lives).
    pub(crate) fn revoke_customer(&mut self, uid: u64, now: i64, format: TokenFormat) {
        let Some(c) = self.customers.get_mut(&uid) else {
            return;
        };
        c.revocations += 1;
        match format {
            TokenFormat::Opaque => self.stored.values_mut().filter(|t| t.uid == uid).for_each(|t| t.revoked = true),
            TokenFormat::Jwt | TokenFormat::Encrypted => c.revoked_at = Some(now),
        }
    }

    /// Every customer with this email, in any website.
    fn customers_by_email(&mut self, email: &str) -> impl Iterator<Item = &mut Customer> {
        let ids = self.ids_by_email(email);
        self.customers.values_mut().filter(move |c| ids.contains(&c.id))
    }

    /// Ids of every customer with this email, in any website.
    fn ids_by_email(&self, email: &str) -> Vec<u64> {
        let key = email.to_lowercase();
        self.index.values().filter_map(|m| m.get(&key).copied()).collect()
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: Config,
    pub(crate) signer: Signer,
    /// Switchable at run time, read without the lock.
    pub(crate) recaptcha: AtomicBool,
    /// Magento_TwoFactorAuth on, for admins with a TOTP secret.
    pub(crate) two_factor: AtomicBool,
    /// `login_as_customer/general/enabled`.
    pub(crate) login_as_customer: AtomicBool,
    /// `generateCustomerTokenAsAdmin` checks the customer's own opt-in.
    pub(crate) check_assistance: AtomicBool,
    state: Mutex<State>,
    /// Turns true once the server stops: hung and delayed requests give up, connections close.
    pub(crate) shutdown: watch::Sender<bool>,
}

impl Shared {
    /// The state, even if a panicking test thread poisoned the mutex.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running development server. Dropping it stops it at once; [`DevServer::shutdown`]
/// stops it gracefully.
pub struct DevServer {
    addr: SocketAddr,
    https: bool,
    shared: Arc<Shared>,
    accept_task: Option<JoinHandle<()>>,
}

/// What a [`DevServer`] handed out that must never be shown: see [`DevServer::secrets`].
#[derive(Clone)]
pub struct Secrets(Arc<Shared>);

impl Secrets {
    pub fn issued_tokens(&self) -> Vec<String> {
        self.0.lock().issued.clone()
    }

    pub fn customer_passwords(&self) -> Vec<String> {
        self.0.lock().passwords.clone()
    }

    /// Admin passwords, admin TOTP secrets (base32, as configured) and IMS client secrets.
    pub fn issuer_credentials(&self) -> Vec<String> {
        self.0.lock().issuers.credentials.clone()
    }

    /// Admin tokens and IMS access tokens issued so far.
    pub fn issuer_tokens(&self) -> Vec<String> {
        self.0.lock().issuers.tokens.clone()
    }

    /// Every one-time code the cloud route issued so far.
    pub fn otps(&self) -> Vec<String> {
        self.0.lock().issuers.otps.keys().cloned().collect()
    }
}

/// How long a graceful shutdown waits for connections to finish their current request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl DevServer {
    /// Binds and starts serving in the background (needs a tokio runtime). Refuses a GraphQL
    /// path that does not start with `/` and a tenant id that is empty or holds a `/`.
    pub async fn start(opts: DevServerOptions) -> std::io::Result<DevServer> {
        check_paths(&opts)?;
        let tls = opts.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg: build_config(&opts),
            signer: Signer::random(),
            recaptcha: AtomicBool::new(opts.recaptcha_required),
            two_factor: AtomicBool::new(opts.two_factor_auth),
            login_as_customer: AtomicBool::new(opts.login_as_customer),
            check_assistance: AtomicBool::new(opts.check_assistance_allowed),
            state: Mutex::new(State {
                next_id: 1,
                customers: HashMap::new(),
                index: HashMap::new(),
                throttle: Throttle::new(opts.lock_max_failures, opts.lock_timeout, opts.cron),
                attempts: HashMap::new(),
                records: Vec::new(),
                faults: VecDeque::new(),
                sticky: None,
                stored: HashMap::new(),
                front: None,
                issued: Vec::new(),
                passwords: Vec::new(),
                issuers: admin::Issuers::new(Throttle::new(opts.lock_max_failures, opts.lock_timeout, opts.cron)),
            }),
            shutdown,
        });
        let https = tls.is_some();
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), tls));
        tracing::debug!(%addr, https, "devserver listening");
        Ok(DevServer { addr, https, shared, accept_task: Some(accept_task) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS), no trailing slash.
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.addr)
    }

    /// What a client configures as the store's base URL: [`DevServer::base_url`], and for the
    /// cloud service with the tenant's base path, `http://127.0.0.1:PORT/<tenant-id>`.
    pub fn magento_base_url(&self) -> String {
        format!("{}{}", self.base_url(), self.shared.cfg.cloud_base.as_deref().unwrap_or(""))
    }

    /// The GraphQL endpoint's whole URL, e.g. `http://127.0.0.1:PORT/graphql`.
    pub fn graphql_url(&self) -> String {
        format!("{}{}", self.base_url(), self.shared.cfg.graphql.endpoint)
    }

    /// A customer of website `base`. Re-adding an email replaces its password (same id,
    /// so its tokens stay valid).
    pub fn add_customer(&self, email: &str, password: &str) {
        self.add_customer_in_website(email, password, "base");
    }

    pub fn add_customer_in_website(&self, email: &str, password: &str, website: &str) {
        let key = email.to_lowercase();
        let cfg = &self.shared.cfg;
        let mut st = self.shared.lock();
        st.passwords.push(password.to_owned());
        if let Some(&id) = st.index.get(website).and_then(|m| m.get(&key)) {
            if let Some(c) = st.customers.get_mut(&id) {
                c.password = password.to_owned();
                return;
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        let (website_id, store_id, store_code) = cfg.websites.get(website).cloned().unwrap_or((0, 0, String::new()));
        let local = email.split('@').next().unwrap_or(email);
        let mut firstname: String = local.chars().take(1).flat_map(char::to_uppercase).collect();
        firstname.extend(local.chars().skip(1));
        st.customers.insert(
            id,
            Customer {
                id,
                email: email.to_owned(),
                password: password.to_owned(),
                website: website.to_owned(),
                firstname,
                created_in: store_view_name(&store_code),
                store_id,
                website_id,
                created_at: cfg.unix_now(),
                revoked_at: None,
                revocations: 0,
                confirmed: true,
                assistance_allowed: true,
                lockout: Lockout::default(),
            },
        );
        st.index.entry(website.to_owned()).or_default().insert(key, id);
    }

    /// Changes the password of every customer with this email (any website).
    pub fn set_password(&self, email: &str, password: &str) {
        let mut st = self.shared.lock();
        st.passwords.push(password.to_owned());
        st.customers_by_email(email).for_each(|c| c.password = password.to_owned());
    }

    /// Marks every customer with this email confirmed or not. An unconfirmed customer's login
    /// with the right password gets 401 `This account isn't confirmed. Verify and try again.`
    /// (`EmailNotConfirmedException`), and the token endpoint counts it as a failure in its
    /// throttle like any other; a wrong password still gets the generic 401.
    pub fn set_confirmed(&self, email: &str, confirmed: bool) {
        self.shared.lock().customers_by_email(email).for_each(|c| c.confirmed = confirmed);
    }

    /// Whether the customer's own lock (`customer/password/lockout_failures` wrong passwords,
    /// Magento_Customer's Authentication) holds now for a customer with this email.
    pub fn customer_locked(&self, email: &str) -> bool {
        let now = Instant::now();
        self.shared.lock().customers_by_email(email).any(|c| c.lockout.is_locked(now))
    }

    /// What a storefront login does to the customer's own lock (the only thing that resets
    /// it: token logins do not): unlocks and clears the failure count.
    pub fn unlock_customer(&self, email: &str) {
        self.shared.lock().customers_by_email(email).for_each(|c| c.lockout.unlock());
    }

    /// Turns the reCAPTCHA requirement for customer login on or off, as the store's "Enable
    /// for Customer Login" setting does: while on, every REST token request gets 400 `ReCaptcha
    /// validation failed, please try again` before its credentials are read, and every GraphQL
    /// `generateCustomerToken` that message as a `graphql-input` error (no `X-ReCaptcha` value
    /// passes), counted nowhere.
    pub fn set_recaptcha(&self, required: bool) {
        self.shared.recaptcha.store(required, Ordering::Relaxed);
    }

    /// Puts an htpasswd front (nginx `auth_basic`) before the whole store, or removes it.
    /// While set, every request on any path without `Authorization: Basic` with these
    /// credentials gets the web server's HTML 401 with `WWW-Authenticate: Basic
    /// realm="Staging"`: Magento never sees it, its throttle and locks count nothing, and no
    /// queued fault is used up. customers/me, whose `Authorization` carries the Bearer token,
    /// gets that 401 too, as behind a real front.
    pub fn set_basic_auth(&self, credentials: Option<(&str, &str)>) {
        self.shared.lock().front = credentials.map(|(user, password)| front::credentials(user, password));
    }

    /// Deletes every customer with this email; their tokens die with them.
    pub fn remove_customer(&self, email: &str) {
        let key = email.to_lowercase();
        let mut st = self.shared.lock();
        for id in st.ids_by_email(email) {
            if let Some(c) = st.customers.remove(&id) {
                if let Some(m) = st.index.get_mut(&c.website) {
                    m.remove(&key);
                }
            }
        }
    }

    /// Like revoke-customer-token (or an admin's "Force Sign-In") for every customer with this
    /// email. JWS and JWE tokens: the JWT module's cut-off is `time()` in Magento's clock, so
    /// every token with `iat` at or before this second dies, one minted later in the same
    /// second too, one minted in a later second lives. Opaque tokens: the existing rows are
    /// deleted, so only the tokens minted before this call die.
    pub fn revoke(&self, email: &str) {
        let (now, format) = (self.shared.cfg.unix_now(), self.shared.cfg.token_format);
        let mut st = self.shared.lock();
        for id in st.ids_by_email(email) {
            st.revoke_customer(id, now, format);
        }
    }

    /// How often the tokens of the customers with this email were revoked (endpoint and
    /// [`DevServer::revoke`]).
    pub fn revocations(&self, email: &str) -> usize {
        self.shared.lock().customers_by_email(email).map(|c| c.revocations).sum()
    }

    /// Queues a fault that answers exactly one following login request (FIFO): a REST token
    /// request or a GraphQL `generateCustomerToken` mutation.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// A fault that answers every login request once the queue is empty, until cleared.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().sticky = fault;
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().records.clone()
    }

    /// How many requests received were aimed at this route (answered or not, faulted or refused
    /// by the front included).
    pub fn requests_to(&self, route: Route) -> usize {
        self.shared.lock().records.iter().filter(|r| r.route == route).count()
    }

    /// Login requests (REST token requests and GraphQL `generateCustomerToken` mutations) that
    /// named this username (faulted ones and ones the basic-auth front refused included: this
    /// counts what was sent, not what Magento counted).
    pub fn login_attempts(&self, username: &str) -> usize {
        let st = self.shared.lock();
        st.attempts.get(&username.to_lowercase()).copied().unwrap_or(0)
    }

    /// Whether the brute-force lock is in force for this username now.
    pub fn is_locked(&self, username: &str) -> bool {
        let st = self.shared.lock();
        st.throttle.is_locked(&username.to_lowercase(), Instant::now())
    }

    /// The brute-force count Magento would read now: 0 once the row has expired (with or
    /// without cron) or after a successful login.
    pub fn failures(&self, username: &str) -> u32 {
        let st = self.shared.lock();
        st.throttle.failures(&username.to_lowercase(), Instant::now())
    }

    /// The count stored in the username's `oauth_token_request_log` row whatever its expiry:
    /// what a store without cron keeps and adds the next failure to. With cron an expired
    /// row is deleted, so this is 0 then; a successful login deletes it either way.
    pub fn failure_count(&self, username: &str) -> u32 {
        let st = self.shared.lock();
        st.throttle.stored(&username.to_lowercase(), Instant::now())
    }

    /// Deletes the username's `oauth_token_request_log` row, as an operator does by hand (or
    /// the cron job) to lift the lock: the count starts again at 0.
    pub fn reset_failures(&self, username: &str) {
        self.shared.lock().throttle.reset(&username.to_lowercase());
    }

    /// The highest count this username's brute-force row ever reached since the server
    /// started (resets and expiries do not lower it).
    pub fn max_failure_count(&self, username: &str) -> u32 {
        self.shared.lock().throttle.peak(&username.to_lowercase())
    }

    /// The email this token authenticates now; `None` where customers/me would answer 401.
    pub fn check_token(&self, token: &str) -> Option<String> {
        let uid = handler::authenticate(&self.shared, token)?;
        let st = self.shared.lock();
        st.customers.get(&uid).map(|c| c.email.clone())
    }

    /// Whether this server minted the token, whole and unaltered, whether or not it has
    /// expired or was revoked since: tells a token cut short or spliced from a real one.
    pub fn issued(&self, token: &str) -> bool {
        match self.shared.cfg.token_format {
            TokenFormat::Jwt if self.shared.signer.verify(token).is_some() => true,
            _ => self.shared.lock().stored.contains_key(token),
        }
    }

    /// Every token this server minted so far, in order, whatever its format and whether or not
    /// it has expired or was revoked since.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().issued.clone()
    }

    /// Every password a customer was given ([`DevServer::add_customer`],
    /// [`DevServer::set_password`]) so far, in order.
    pub fn customer_passwords(&self) -> Vec<String> {
        self.shared.lock().passwords.clone()
    }

    /// A handle that reads [`DevServer::issued_tokens`] and [`DevServer::customer_passwords`]
    /// later, without borrowing the server (a test harness keeps one per process it starts).
    pub fn secrets(&self) -> Secrets {
        Secrets(self.shared.clone())
    }

    /// Stops accepting, lets requests in flight finish (hung and delayed ones give up at
    /// once), closes idle keep-alive connections, waits at most a few seconds.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.accept_task.take() {
            // Aborting the accept loop drops its JoinSet, which aborts every connection.
            task.abort();
        }
    }
}

fn store_view_name(code: &str) -> String {
    match code {
        "default" | "" => "Default Store View".to_owned(),
        other => format!("{other} Store View"),
    }
}

fn check_paths(opts: &DevServerOptions) -> std::io::Result<()> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    if !opts.graphql_path.starts_with('/') {
        return Err(invalid(format!("GraphQL path {:?} does not start with '/'", opts.graphql_path)));
    }
    if let Some(cloud) = &opts.cloud_service {
        if cloud.tenant_id.is_empty() || cloud.tenant_id.contains('/') {
            return Err(invalid(format!("tenant id {:?} is empty or holds a '/'", cloud.tenant_id)));
        }
    }
    Ok(())
}

fn build_config(opts: &DevServerOptions) -> Config {
    let stores_list: Vec<(String, String)> =
        if opts.stores.is_empty() { DevServerOptions::default().stores } else { opts.stores.clone() };
    let mut stores = HashMap::new();
    let mut websites: HashMap<String, (u32, u32, String)> = HashMap::new();
    for (i, (code, website)) in stores_list.iter().enumerate() {
        let next_website_id = websites.len() as u32 + 1;
        websites.entry(website.clone()).or_insert_with(|| (next_website_id, i as u32 + 1, code.clone()));
        stores.insert(code.clone(), StoreInfo { website: website.clone(), all: false });
    }
    let default_store =
        stores.get("default").cloned().unwrap_or_else(|| StoreInfo { website: stores_list[0].1.clone(), all: false });
    let token_format = match opts.token_format {
        TokenFormat::Jwt if opts.opaque_tokens => TokenFormat::Opaque,
        other => other,
    };
    let cloud_base = opts.cloud_service.as_ref().map(|c| format!("/{}", c.tenant_id));
    Config {
        token_lifetime_secs: opts.token_lifetime.as_secs() as i64,
        token_format,
        customer_lock: LockoutPolicy {
            max_failures: opts.customer_lock_failures,
            duration: opts.customer_lock_duration,
        },
        clock_offset_secs: opts.clock_offset_secs,
        login_latency: opts.login_latency,
        all_store: StoreInfo { all: true, ..default_store.clone() },
        default_store,
        stores,
        websites,
        graphql: GraphQlConfig {
            convention: opts.graphql_convention,
            endpoint: format!("{}{}", cloud_base.as_deref().unwrap_or(""), opts.graphql_path),
        },
        cloud_base,
        opaque_lifetime_secs: opts.opaque_token_lifetime.unwrap_or(opts.token_lifetime).as_secs() as i64,
        admin_token_lifetime_secs: opts.admin_token_lifetime.as_secs() as i64,
        admin_lock: LockoutPolicy { max_failures: opts.admin_lock_failures, duration: opts.admin_lock_duration },
        ims_token_lifetime_secs: opts.ims_token_lifetime.as_secs() as i64,
        otp_lifetime_secs: opts.otp_lifetime.as_secs() as i64,
        advanced_ms: AtomicU64::new(0),
    }
}

/// Resolves once the server is stopping (or can no longer be told to stop).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The server side of TLS from a PEM certificate chain and key.
fn tls_acceptor(identity: &TlsIdentity) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("devserver TLS {what}: {e}"))
    };
    let certs = CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate", &e))?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|e| invalid("key", &e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("identity", &e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let mut stopping = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, shared.clone(), tls.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "devserver accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            // Reap finished connections so the set does not grow with every client.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut stopping) => break,
        }
    }
    drop(listener);
    // Every connection saw the same signal and is finishing; give them a bounded time.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
}

/// How long a client may take over the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let _ = stream.set_nodelay(true);
    let stream = Arc::new(stream);
    let plain = io::SharedStream(stream.clone());
    match tls {
        None => serve_http(TokioIo::new(plain), stream, shared).await,
        Some(acceptor) => {
            let mut stopping = shared.shutdown.subscribe();
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(plain));
            let done = tokio::select! {
                done = handshake => done,
                _ = stopped(&mut stopping) => return,
            };
            // A client that does not trust the certificate hangs up here: nothing to serve.
            if let Ok(Ok(tls_stream)) = done {
                serve_http(TokioIo::new(tls_stream), stream, shared).await;
            }
        }
    }
}

async fn serve_http<I>(io: TokioIo<I>, stream: Arc<TcpStream>, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut stopping = shared.shutdown.subscribe();
    let service = service_fn(move |req| handler::handle(shared.clone(), stream.clone(), req));
    let conn = http1::Builder::new()
        .keep_alive(true)
        // Idle keep-alive connections stay open as long as the client likes.
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(&mut stopping) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Magento's `Y-m-d H:i:s` (UTC) from Unix seconds.
pub(crate) fn format_datetime(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 in the proleptic Gregorian calendar,
    // computed over 400-year eras shifted to start on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", secs / 3600, secs % 3600 / 60, secs % 60)
}
