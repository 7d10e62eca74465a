//! The HTTP client: the login request, reading Magento's answer, and sorting every outcome
//! into one of the classes the metrics count.
//!
//! A login and a check go where the customer's [`Endpoint`] says, in its dialect: REST here, and
//! GraphQL through `graphql` (its documents, and how its answers are read), both sorted into the
//! same [`Outcome`]s by the same `Class`es, so everything above this module (the lockout
//! policy, the worker) is the same whatever the store speaks.
//!
//! One `reqwest::Client` serves every customer, so its connection pool is shared. Redirects
//! are not followed: the login body carries a password, and a 3xx must never send it to
//! another host. Bodies are read up to a cap, so a misbehaving proxy cannot make the daemon
//! buffer megabytes.
//!
//! The proxy variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) are honoured,
//! except for loopback addresses and `localhost`, which always go direct: a proxy could not reach
//! this pod's loopback, and plain http to loopback (allowed without `allow_insecure_http`) must
//! not carry a password across the network to a proxy.
//!
//! The password is wiped from memory after use: the request body is one zeroizing buffer, handed
//! to the HTTP stack without a copy.
//!
//! Whatever an answer carries (Magento's message, a content type, a `Location`) is server text,
//! shown only as [`crate::shown`] allows: never a piece of the password, never unbounded.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use serde::Serialize;
use zeroize::Zeroizing;

mod graphql;
mod issuer;

use crate::config::{Endpoint, MagentoSettings};
use crate::logging::escape_controls;
use crate::secret::Secret;
use crate::shown::{fill_message, redirect_target, showable, Filled, Pieces, MAX_SHOWN_SHORT};
pub use crate::shown::{magento_message, MAX_SHOWN};
use crate::token;

/// The most of a response body ever read.
pub const MAX_BODY: usize = 64 * 1024;

pub const USER_AGENT: &str = concat!("magento-token-sidecar/", env!("CARGO_PKG_VERSION"));

/// The outcome of one login, the `result` label of `magento_token_refresh_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    /// 401: wrong password, unknown username or locked account.
    AuthFailure,
    /// Any other HTTP status, redirects included, and a 401 that is not Magento's (an htpasswd
    /// front or a WAF: the login never reached Magento).
    HttpError,
    /// Connect, reset, timeout.
    NetworkError,
    /// An answer that is not a JSON string holding a token of the accepted form.
    InvalidResponse,
    /// The token could not be written to its file.
    WriteError,
    /// Refused before the credentials were checked (reCAPTCHA): nothing counted, nothing a
    /// retry can change until the store's settings do.
    Blocked,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Success,
        Outcome::AuthFailure,
        Outcome::HttpError,
        Outcome::NetworkError,
        Outcome::InvalidResponse,
        Outcome::WriteError,
        Outcome::Blocked,
    ];

    /// [`Outcome::ALL`] in the order of their `result` label values, as a scrape lists them.
    pub const SORTED: [Outcome; 7] = [
        Outcome::AuthFailure,
        Outcome::Blocked,
        Outcome::HttpError,
        Outcome::InvalidResponse,
        Outcome::NetworkError,
        Outcome::Success,
        Outcome::WriteError,
    ];

    /// This outcome's place in [`Outcome::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::AuthFailure => "auth_failure",
            Outcome::HttpError => "http_error",
            Outcome::NetworkError => "network_error",
            Outcome::InvalidResponse => "invalid_response",
            Outcome::WriteError => "write_error",
            Outcome::Blocked => "blocked",
        }
    }
}

/// Why a request did not give a token (or, for [`Client::whoami`], an identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginError {
    pub outcome: Outcome,
    pub message: String,
    /// What a `Retry-After` header asked for.
    pub retry_after: Option<Duration>,
    /// A 401 Magento gives whatever the timing, as long as the account stays as it is (an
    /// unconfirmed account): the same password is not sent again.
    pub final_for_password: bool,
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.outcome.as_str(), self.message)
    }
}

impl std::error::Error for LoginError {}

impl LoginError {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> LoginError {
        LoginError { outcome, message: message.into(), retry_after: None, final_for_password: false }
    }

    /// How long to wait before trying again after this failure (not a 401, which the lockout
    /// policy decides), the `failures`-th in a row: `max_backoff` for what a retry cannot change
    /// until the store's settings (or ours) do, else the jittered backoff, `Retry-After`
    /// honoured. `random` in [0, 1) is the jitter.
    pub fn retry_in(&self, failures: u32, r: &crate::config::RefreshSettings, random: f64) -> Duration {
        match self.outcome {
            Outcome::Blocked => r.max_backoff,
            _ => crate::schedule::backoff(failures, r, self.retry_after, random),
        }
    }

    /// The last safety net before logs and `/status`: an exact copy of `secret` masked, control
    /// characters escaped. Server text was already checked piece by piece (`Pieces`) where it
    /// entered the message; this catches what came another way (an error's cause).
    fn masking(mut self, secret: &Secret) -> LoginError {
        let value = secret.expose();
        if !value.is_empty() && self.message.contains(value) {
            self.message = self.message.replace(value, "***");
        }
        if let std::borrow::Cow::Owned(escaped) = escape_controls(&self.message) {
            self.message = escaped;
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("magento.ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// What logging in needs of Magento: [`Client`] in the daemon, a scripted stand-in in the
/// in-process tests of the worker (which run on tokio's paused clock, where real sockets and
/// timeouts would not keep time).
///
/// Each method takes the customer's [`Endpoint`], which says where and in which dialect: the
/// callers (the one lockout path in [`crate::attempt`], the worker's checks) never tell REST from
/// GraphQL. Another way to obtain a customer's token (an admin's "login as customer", a cloud
/// one-time code) is another method here, over the same endpoints and into the same outcomes.
pub trait Magento: Send + Sync + 'static {
    /// A password login: the token, checked for form, or why not.
    fn login(
        &self,
        endpoint: &Endpoint,
        username: &str,
        password: &Secret,
    ) -> impl std::future::Future<Output = Result<Secret, LoginError>> + Send;

    /// Whose the token is: the email of the customer it belongs to. A token Magento no longer
    /// accepts is an [`Outcome::AuthFailure`].
    fn whoami(
        &self,
        endpoint: &Endpoint,
        token: &Secret,
    ) -> impl std::future::Future<Output = Result<String, LoginError>> + Send;
}

impl Magento for Client {
    fn login(
        &self,
        endpoint: &Endpoint,
        username: &str,
        password: &Secret,
    ) -> impl std::future::Future<Output = Result<Secret, LoginError>> + Send {
        Client::login(self, endpoint, username, password)
    }

    fn whoami(
        &self,
        endpoint: &Endpoint,
        token: &Secret,
    ) -> impl std::future::Future<Output = Result<String, LoginError>> + Send {
        Client::whoami(self, endpoint, token)
    }
}

/// Built once per configuration, shared by every worker (a clone is a handle).
#[derive(Clone, Debug)]
pub struct Client {
    inner: std::sync::Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One HTTP client per kind of URL, built the first time a URL of that kind is asked for:
    /// through the environment's proxies or direct (loopback), and for `https` (with the CA
    /// roots) or plain `http` (without: loading and parsing the system's roots is most of a
    /// client's cost in CPU and memory, and a sidecar talking plain http to the store beside it
    /// never needs them). See [`Kind`].
    clients: [std::sync::OnceLock<reqwest::Client>; 4],
    /// `magento.ca_file`'s certificates, read and checked when the client is made.
    ca: Vec<reqwest::Certificate>,
    settings: MagentoSettings,
}

/// Which of the lazily built clients a URL goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kind {
    /// Loopback: never through a proxy.
    direct: bool,
    /// `https`: the CA roots are loaded.
    tls: bool,
}

impl Kind {
    fn of(url: &Url) -> Kind {
        Kind { direct: crate::config::is_loopback(url), tls: url.scheme() != "http" }
    }

    fn index(self) -> usize {
        usize::from(self.direct) * 2 + usize::from(self.tls)
    }
}

impl Client {
    /// Reads and checks `magento.ca_file`; the HTTP clients themselves are built on first use.
    pub fn new(settings: &MagentoSettings) -> Result<Client, ClientError> {
        let mut ca = Vec::new();
        if let Some(path) = &settings.ca_file {
            let ca_error = |message: String| ClientError::CaFile { path: path.display().to_string(), message };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            ca = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(e.to_string()))?;
            if ca.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
        }
        let client = Client {
            inner: std::sync::Arc::new(Inner { clients: Default::default(), ca, settings: settings.clone() }),
        };
        // A CA file's certificates are checked by building a client with them: that is known
        // now, not at the first login (the client is kept for the first https URL). Without
        // one, building cannot fail.
        if !client.inner.ca.is_empty() {
            let kind = Kind { direct: false, tls: true };
            let built = client.build(kind)?;
            let _ = client.inner.clients[kind.index()].set(built);
        }
        Ok(client)
    }

    fn build(&self, kind: Kind) -> Result<reqwest::Client, ClientError> {
        let settings = &self.inner.settings;
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(16);
        if kind.direct {
            builder = builder.no_proxy();
        }
        if kind.tls {
            for cert in &self.inner.ca {
                builder = builder.add_root_certificate(cert.clone());
            }
        } else {
            builder = builder.tls_built_in_root_certs(false);
        }
        Ok(builder.build()?)
    }

    /// The client for `url`: direct for loopback, else through the environment's proxies;
    /// with the CA roots for `https` only.
    fn for_url(&self, url: &Url) -> Result<&reqwest::Client, LoginError> {
        let kind = Kind::of(url);
        let slot = &self.inner.clients[kind.index()];
        if let Some(client) = slot.get() {
            return Ok(client);
        }
        let client = self.build(kind).map_err(|e| LoginError::new(Outcome::NetworkError, e.to_string()))?;
        Ok(slot.get_or_init(|| client))
    }

    /// A `POST` of a `content_type` body to `url`, asking for JSON.
    fn post(&self, url: &Url, content_type: &'static str) -> Result<reqwest::RequestBuilder, LoginError> {
        // A `Url`, not its text: reqwest would parse the text again.
        Ok(self.for_url(url)?.post(url.clone()).header(ACCEPT, "application/json").header(CONTENT_TYPE, content_type))
    }

    /// Whether `other` was built from the same settings (and so behaves the same).
    pub fn same_as(&self, other: &Client) -> bool {
        self.inner.settings == other.inner.settings
    }

    /// A password login at `endpoint`: the token, checked for form, or why not.
    pub async fn login(&self, endpoint: &Endpoint, username: &str, password: &Secret) -> Result<Secret, LoginError> {
        let answer = match endpoint {
            Endpoint::Rest { token, .. } => self.rest_login(token, username, password).await,
            Endpoint::GraphQl { url, store } => {
                // Never with an `Authorization` header: from 2.4.8 a stale one fails the login.
                // The buffer itself, not a copy: wiped when the HTTP stack lets go of it.
                let body = hyper::body::Bytes::from_owner(graphql::login_body(username, password));
                let data = self.graphql(url, store.as_deref(), None, body, password, graphql::Op::Login).await;
                data.and_then(|data| graphql::token_in(data, "generateCustomerToken", "token"))
            }
        };
        answer.map_err(|e| e.masking(password))
    }

    /// Whose `token` is, asked at `endpoint`: the customer's email, or why not.
    pub async fn whoami(&self, endpoint: &Endpoint, token: &Secret) -> Result<String, LoginError> {
        let answer = match endpoint {
            Endpoint::Rest { me, .. } => self.rest_whoami(me, token).await,
            Endpoint::GraphQl { url, store } => {
                let body = hyper::body::Bytes::from_static(graphql::CHECK_BODY.as_bytes());
                let data = self.graphql(url, store.as_deref(), Some(token), body, token, graphql::Op::Check).await;
                data.and_then(|data| graphql::email(&data))
            }
        };
        answer.map_err(|e| e.masking(token))
    }

    /// `POST .../V1/integration/customer/token`: the token, checked for form, or why not.
    async fn rest_login(&self, url: &Url, username: &str, password: &Secret) -> Result<Secret, LoginError> {
        #[derive(Serialize)]
        struct Body<'a> {
            username: &'a str,
            password: &'a str,
        }
        let body = json_buffer(&Body { username, password: password.expose() }, &[username, password.expose()]);
        let request = self
            .post(url, "application/json")?
            // The buffer itself, not a copy: wiped when the HTTP stack lets go of it.
            .body(hyper::body::Bytes::from_owner(body));
        let response = request.send().await.map_err(network_error)?;
        if response.status() != StatusCode::OK {
            return Err(error_answer(response, password).await);
        }
        let body = read_body(response, true).await?;
        parse_token(&body)
    }

    /// `GET .../V1/customers/me` with the token: the email of the customer it belongs to.
    async fn rest_whoami(&self, url: &Url, token: &Secret) -> Result<String, LoginError> {
        let response = self
            .for_url(url)?
            .get(url.clone())
            .header(ACCEPT, "application/json")
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(network_error)?;
        if response.status() != StatusCode::OK {
            return Err(error_answer(response, token).await);
        }
        let body = read_body(response, true).await?;
        let customer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| LoginError::new(Outcome::InvalidResponse, format!("customers/me: not JSON ({e})")))?;
        customer
            .get("email")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .ok_or_else(|| LoginError::new(Outcome::InvalidResponse, "customers/me: no email in the answer"))
    }

    /// `POST`s a GraphQL request (`body`) to `url`, with
    /// the `Store` header when there is a store code and the token when there is one: the answer's
    /// `data` when it holds no error, else the error, sorted as `op`'s answers are. `secret` is
    /// what the request carried (the password, or the token): no answer repeating a piece of it
    /// is shown.
    async fn graphql(
        &self,
        url: &Url,
        store: Option<&str>,
        bearer: Option<&Secret>,
        body: hyper::body::Bytes,
        secret: &Secret,
        op: graphql::Op,
    ) -> Result<serde_json::Value, LoginError> {
        let mut request = self.post(url, "application/json")?;
        if let Some(store) = store {
            request = request.header(graphql::STORE, store);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token.expose());
        }
        let response = request.body(body).send().await.map_err(network_error)?;
        let head = Head::of(&response);
        // A 200's body is the answer (too long is not one); an error's is read for its message.
        let body = if head.status.is_redirection() {
            Vec::new()
        } else {
            read_body(response, head.status == StatusCode::OK).await?
        };
        graphql::read(&head, &body, secret, op)
    }
}

/// `value` as JSON in a zeroizing buffer with room for it at its longest (every character of
/// `strings`, the strings it holds, escaped as `\uXXXX`), so that the buffer never grows: growing
/// would leave a copy of a password or secret behind, unwiped.
fn json_buffer(value: &impl Serialize, strings: &[&str]) -> Zeroizing<Vec<u8>> {
    let room = 64 + strings.iter().map(|s| 6 * s.len() + 8).sum::<usize>();
    let mut body = Zeroizing::new(Vec::with_capacity(room));
    serde_json::to_writer(&mut *body, value).expect("strings always serialize");
    body
}

/// Parses a successful login's body: a JSON string holding a token of the accepted form.
pub fn parse_token(body: &[u8]) -> Result<Secret, LoginError> {
    let invalid = |message: String| LoginError::new(Outcome::InvalidResponse, message);
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        let looks = if body.trim_ascii_start().starts_with(b"<") { " (it looks like HTML or XML)" } else { "" };
        invalid(format!("the answer to the login is not JSON{looks}: {e}"))
    })?;
    let serde_json::Value::String(text) = value else {
        return Err(invalid(format!("the answer to the login is a JSON {}, not a string", json_kind(&value))));
    };
    let secret = Secret::new(text);
    token::check_form(secret.expose()).map_err(|e| invalid(e.to_string()))?;
    Ok(secret)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn network_error(e: reqwest::Error) -> LoginError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    let mut message = with_causes(what, &e);
    if message.contains("certificate") {
        message.push_str(
            " (the server's TLS certificate was not accepted: check the host name in base_url; a certificate from a private CA needs that CA's PEM in magento.ca_file)",
        );
    }
    LoginError::new(Outcome::NetworkError, message)
}

/// `what: error: cause: cause…`, bounded and escaped. reqwest's own message is terse; the causes
/// below it say what really happened. A cause may quote the peer (names in its certificate), so
/// it is treated like any server text.
pub(crate) fn with_causes(what: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if let Some((cut, _)) = message.char_indices().nth(2 * MAX_SHOWN) {
        message.truncate(cut);
        message.push('…');
    }
    escape_controls(&message).into_owned()
}

/// Reads the body up to [`MAX_BODY`]. With `strict`, a longer body is an `invalid_response`;
/// without, it is cut (an error page is read only for its message).
async fn read_body(mut response: Response, strict: bool) -> Result<Vec<u8>, LoginError> {
    let too_large =
        || LoginError::new(Outcome::InvalidResponse, format!("the answer is larger than {} KiB", MAX_BODY / 1024));
    if strict && response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_BODY {
            if strict {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk[..MAX_BODY - body.len()]);
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What an answer's head says, kept when its body is read.
struct Head {
    status: StatusCode,
    /// What a `Retry-After` header asked for.
    retry_after: Option<Duration>,
    /// A `WWW-Authenticate` challenge came with it: a front asking for credentials.
    challenged: bool,
    content_type: Option<HeaderValue>,
    /// A redirect's `Location`, and the URL asked for (a relative `Location` is read against it).
    redirect: Option<(Option<HeaderValue>, Url)>,
}

impl Head {
    fn of(response: &Response) -> Head {
        let status = response.status();
        let headers = response.headers();
        Head {
            status,
            retry_after: retry_after(headers, SystemTime::now()),
            challenged: headers.contains_key(WWW_AUTHENTICATE),
            content_type: headers.get(CONTENT_TYPE).cloned(),
            redirect: status.is_redirection().then(|| (headers.get(LOCATION).cloned(), response.url().clone())),
        }
    }

    /// A redirect's error: where it points, as far as that may be shown.
    fn redirected(&self, pieces: &Pieces) -> Option<LoginError> {
        let (location, asked) = self.redirect.as_ref()?;
        let target = redirect_target(location.as_ref(), asked, pieces);
        let status = self.status;
        let mut e = LoginError::new(
            Outcome::HttpError,
            format!(
                "HTTP {status}: redirected to {target}; not followed, so the password never goes to another host: set base_url to the address that answers"
            ),
        );
        e.retry_after = self.retry_after;
        Some(e)
    }

    /// The content type as it may be shown (server text too).
    fn kind(&self, pieces: &Pieces) -> String {
        self.content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map_or_else(
                || "untyped".to_owned(),
                |v| showable(v, false, MAX_SHOWN_SHORT, pieces).unwrap_or_else(|| "(type not shown)".to_owned()),
            )
    }

    /// The error of an answer of `class`, whose message says `detail`.
    fn error(&self, class: Class, detail: String, dialect: Dialect) -> LoginError {
        LoginError {
            outcome: class.outcome(),
            message: format!("HTTP {}: {detail}{}", self.status, class.hint(self.status, dialect)),
            retry_after: self.retry_after,
            final_for_password: class == Class::Unconfirmed,
        }
    }
}

/// What an answer's message shows: Magento's message if it repeats nothing of the request, else
/// that it is not shown; `otherwise` when there is no message to show.
fn shown_detail(
    filled: Option<Filled>,
    body_len: usize,
    pieces: &Pieces,
    otherwise: impl FnOnce() -> String,
) -> String {
    match filled {
        Some(filled) => showable(&filled.text, filled.cut, MAX_SHOWN, pieces).unwrap_or_else(|| {
            format!(
                "(the answer's message is not shown: it repeats part of the request; the answer was {body_len} bytes)"
            )
        }),
        None => otherwise(),
    }
}

/// Turns a non-200 REST answer into the error an operator can act on. `secret` is what the
/// request carried (the password, or the token): no server text that repeats a piece of it is
/// shown.
async fn error_answer(response: Response, secret: &Secret) -> LoginError {
    error_answer_as(response, secret, classify).await
}

/// [`error_answer`] with another route's sorting of Magento's answers.
async fn error_answer_as(
    response: Response,
    secret: &Secret,
    classify: fn(StatusCode, bool, Option<&str>) -> Class,
) -> LoginError {
    let head = Head::of(&response);
    let pieces = Pieces::of(secret.expose());
    if let Some(redirect) = head.redirected(&pieces) {
        return redirect;
    }
    let body = read_body(response, false).await.unwrap_or_default();
    let filled = fill_message(&body);
    let class = classify(head.status, head.challenged, filled.as_ref().map(|f| f.template_head.as_str()));
    let detail = shown_detail(filled, body.len(), &pieces, || not_magentos_json(&head, &pieces));
    head.error(class, detail, Dialect::Rest)
}

/// The detail of an answer with no message of Magento's.
fn not_magentos_json(head: &Head, pieces: &Pieces) -> String {
    format!("a {} answer, not Magento's JSON (a proxy, CDN or maintenance page?)", head.kind(pieces))
}

/// Which API an answer came from: a hint names that API's settings and modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Rest,
    GraphQl,
}

/// What an error answer means for the login, or for the check of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Magento's refusal of a login: a wrong password, an unknown username or a lock (it never
    /// says which).
    WrongPassword,
    /// Magento's own refusal for an account whose email is not confirmed.
    Unconfirmed,
    /// A 401 with an HTML body or a `WWW-Authenticate` challenge: a front, not Magento.
    NotMagentos,
    /// Magento's refusal of a login without a reCAPTCHA answer: before the credentials.
    ReCaptcha,
    /// GraphQL: the `Store` header names no store view of this Magento.
    UnknownStore,
    /// GraphQL, a check: Magento no longer accepts the token (revoked, expired, unreadable; up to
    /// 2.4.7 such a token makes the request a guest's, which "isn't authorized").
    TokenRefused,
    /// GraphQL, a check: the token is good, the account is locked or not confirmed. A login now
    /// would be refused as well, and counted towards the lock.
    AccountRefused,
    /// GraphQL, a login refused for a bearer token it carried, which the daemon never sends with
    /// a login: something in between added one. Refused before the login ran: nothing counted.
    BearerOnLogin,
    /// The admin token route's refusal when two-factor authentication is on: the password was
    /// right, and a code is wanted (`auth.admin.totp_secret_file`).
    TwoFactorRequired,
    /// The 2FA provider refused the code (`Invalid code.`): a failure of the admin account.
    WrongCode,
    /// `generateCustomerTokenAsAdmin`: the setting or the admin's `::login` ACL is off.
    LoginAsCustomerDisabled,
    /// `generateCustomerTokenAsAdmin`: the admin lacks `::allow_shopping_assistance`.
    AssistanceDisabled,
    /// `generateCustomerTokenAsAdmin`: no customer of this email in the store view's website.
    UnknownCustomer,
    /// The issuer's token (the admin's, or the IMS access token) was refused: a new one is asked for.
    IssuerTokenRefused,
    /// IMS refused the client credentials.
    ImsRefused,
    /// The one-time code route refused the IMS credential (its ACL, API key or org).
    OtpForbidden,
    /// The one-time code route knows no customer of this id.
    UnknownCustomerId,
    /// The one-time code route failed with a 500: Adobe documents that a customer who has not
    /// allowed remote shopping assistance may surface so.
    OtpServerError,
    /// The exchange refused the one-time code (expired, used, another customer's).
    CodeRefused,
    Other,
}

impl Class {
    fn outcome(self) -> Outcome {
        match self {
            Class::WrongPassword
            | Class::Unconfirmed
            | Class::TokenRefused
            | Class::WrongCode
            | Class::IssuerTokenRefused
            | Class::ImsRefused => Outcome::AuthFailure,
            Class::ReCaptcha
            | Class::TwoFactorRequired
            | Class::LoginAsCustomerDisabled
            | Class::AssistanceDisabled
            | Class::UnknownCustomer
            | Class::OtpForbidden
            | Class::UnknownCustomerId => Outcome::Blocked,
            Class::NotMagentos
            | Class::UnknownStore
            | Class::AccountRefused
            | Class::BearerOnLogin
            | Class::OtpServerError
            | Class::CodeRefused
            | Class::Other => Outcome::HttpError,
        }
    }

    /// What an operator reads after the answer's message: what it means, and what to do.
    fn hint(self, status: StatusCode, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (Class::NotMagentos, _) => " (a 401 that is not Magento's: an htpasswd front or a WAF answered, so the login never reached Magento and nothing was counted; let the daemon through it, e.g. by allowing its address)",
            (Class::Unconfirmed, _) => " (the account's email address is not confirmed: confirm it, in the email Magento sent or in the admin; the same password is not sent again until the password or the configuration changes, since every try counts towards Magento's lock)",
            (Class::WrongPassword, _) => " (a wrong password, an unknown username or a locked account: Magento does not say which)",
            (Class::ReCaptcha, Dialect::Rest) => " (the store requires reCAPTCHA for customer logins, which a daemon cannot solve; nothing was counted. Remedies: turn off reCAPTCHA for Customer Login on the website the daemon logs into, disable the module Magento_ReCaptchaWebapiRest, or authenticate as an integration, which is exempt)",
            (Class::ReCaptcha, Dialect::GraphQl) => " (the store requires reCAPTCHA for customer logins, which a daemon cannot solve; nothing was counted. Remedies: turn off reCAPTCHA for Customer Login on the website the daemon logs into, disable the module Magento_ReCaptchaWebapiGraphQl, or authenticate as an integration, which is exempt)",
            (Class::UnknownStore, _) => " (the Store header carries this customer's store code, its own store_code or else magento.store_code, and Magento has no store view of that code: correct it; nothing was counted)",
            (Class::TokenRefused, _) => " (Magento no longer accepts this token: revoked, expired or unreadable)",
            (Class::AccountRefused, _) => " (the token is good but Magento refuses the account; a login now would be refused too, and counted towards its lock: the token is kept)",
            (Class::BearerOnLogin, _) => " (Magento read an Authorization header on the login, which the daemon never sends: a proxy in between adds one; the login never ran and nothing was counted)",
            (Class::TwoFactorRequired, _) => " (two-factor authentication is on for admins, and the password was accepted: set auth.admin.totp_secret_file to the base32 secret of this admin's Google Authenticator, so the daemon logs in through the provider's route with a code; nothing was counted towards the admin's lock)",
            (Class::WrongCode, _) => " (the password was accepted and the two-factor code refused: auth.admin.totp_secret_file does not hold this admin's Google Authenticator secret, or this machine's clock is off by more than 30 s; counted as a failure of the admin account)",
            (Class::LoginAsCustomerDisabled, _) => " (in the Magento admin: Stores > Configuration > Customers > Login as Customer > Enable Login as Customer = Yes, and give the admin user's role the resource Magento_LoginAsCustomer::login; nothing was counted)",
            (Class::AssistanceDisabled, _) => " (give the admin user's role the resource Magento_LoginAsCustomer::allow_shopping_assistance, Customers > All Customers > Actions > Remote shopping assistance opt-in; nothing was counted)",
            (Class::UnknownCustomer, _) => " (no customer has this email in the website of the customer's store view (the Store header, its store_code): correct the customer's username or store_code; nothing was counted)",
            (Class::IssuerTokenRefused, _) => " (the issuer's token was refused, revoked or expired early: a new one is asked for at once)",
            (Class::ImsRefused, _) => " (IMS refused the credential: check auth.ims.client_id and the client secret of the server-to-server credential in the Adobe Developer Console)",
            (Class::OtpForbidden, _) => " (the IMS credential may not ask for one-time codes: its integration's role needs Magento_LoginAsCustomer::login, and auth.ims.client_id and org_id must be that credential's; nothing was counted)",
            (Class::UnknownCustomerId, _) => " (no customer has this id: correct customers[].customer_id, Magento's id of the customer)",
            (Class::OtpServerError, _) => " (Adobe documents that a customer who has not allowed remote shopping assistance surfaces so: the customer must allow it (allow_remote_shopping_assistance) in its account; else see the store's logs)",
            (Class::CodeRefused, _) => " (the one-time code was refused, expired or already used: the next try asks for a new one)",
            (Class::Other, Dialect::Rest) if status == StatusCode::NOT_FOUND => " (check base_url and store_code: an unknown store code also answers this)",
            (Class::Other, Dialect::GraphQl) if status == StatusCode::NOT_FOUND => " (check base_url and magento.graphql_path: the GraphQL endpoint is not there)",
            (Class::Other, _) => "",
        }
    }
}

/// Sorts a REST error answer by its status, what its headers say (a `WWW-Authenticate`
/// challenge) and Magento's message, if the body held one (as Magento's JSON, before
/// placeholders).
fn classify(status: StatusCode, challenged: bool, magento: Option<&str>) -> Class {
    match (status.as_u16(), magento) {
        (401, Some(m)) if !challenged && m.contains("isn't confirmed") => Class::Unconfirmed,
        (401, Some(_)) if !challenged => Class::WrongPassword,
        (401, _) => Class::NotMagentos,
        (400, Some(m)) if is_recaptcha(m) => Class::ReCaptcha,
        _ => Class::Other,
    }
}

/// Whether Magento's message is security-package's reCAPTCHA refusal.
fn is_recaptcha(message: &str) -> bool {
    message.contains("ReCaptcha") || message.contains("reCAPTCHA")
}

/// A `Retry-After` header as a wait from `now`: delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MagentoSettings;
    use reqwest::header::HeaderValue;

    #[test]
    fn a_token_is_a_json_string_of_the_right_form() {
        assert_eq!(parse_token(br#""abc.def.ghi""#).unwrap().expose(), "abc.def.ghi");
        let err = |body: &[u8]| parse_token(body).unwrap_err();
        for (body, says) in [
            (&b"<html>down</html>"[..], "looks like HTML"),
            (b"\xff\xfe", "not JSON"),
            (br#"{"token":"x"}"#, "JSON object, not a string"),
            (b"42", "JSON number"),
            (br#""""#, "empty"),
            (br#""abc\r\nX: y""#, "character outside"),
            (br#""a\"b""#, "character outside"),
        ] {
            let e = err(body);
            assert_eq!(e.outcome, Outcome::InvalidResponse);
            assert!(e.message.contains(says), "{:?}: {}", String::from_utf8_lossy(body), e.message);
        }
    }

    use crate::shown::tests::PW;

    fn answer(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response {
        let mut builder = hyper::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        Response::from(builder.body(body).unwrap())
    }

    #[tokio::test]
    async fn error_answers_show_what_repeats_nothing() {
        let password = Secret::new(PW.to_owned());
        let json = [("content-type", "application/json")];
        // Magento's own messages are shown, with the hint.
        let e =
            error_answer(answer(401, &json, r#"{"message":"The account sign-in was incorrect."}"#), &password).await;
        assert_eq!(e.outcome, Outcome::AuthFailure);
        assert!(
            e.message.starts_with("HTTP 401 Unauthorized: The account sign-in was incorrect. (a wrong password"),
            "{}",
            e.message
        );
        // A reflection is not, but its status and size are.
        let e = error_answer(
            answer(
                400,
                &json,
                r#"{"message":"bad body %1","parameters":["{\"password\":\"Sekr3t\\\"Q\\\\uote-PW9\"}"]}"#,
            ),
            &password,
        )
        .await;
        assert_eq!(
            e.message,
            "HTTP 400 Bad Request: (the answer's message is not shown: it repeats part of the request; the answer was 85 bytes)"
        );
        // A content type is server text too.
        let e = error_answer(answer(502, &[("content-type", "text/html; charset=utf-8")], "<html>"), &password).await;
        assert!(e.message.starts_with("HTTP 502 Bad Gateway: a text/html answer, not Magento's JSON"), "{}", e.message);
        let e = error_answer(answer(502, &[("content-type", "x/Sekr3t")], "<html>"), &password).await;
        assert!(e.message.starts_with("HTTP 502 Bad Gateway: a (type not shown) answer"), "{}", e.message);
        // whoami: the secret is the token.
        let token = Secret::new("eyJhbGciOiJIUzI1NiJ9.eyJ1aWQiOjF9.c2lnbmF0dXJl".to_owned());
        let e = error_answer(answer(401, &json, r#"{"message":"token c2lnbmF0 rejected"}"#), &token).await;
        assert!(e.message.contains("is not shown"), "{}", e.message);
    }

    /// Which of the four clients has been built, as `[proxied plain, proxied https, direct plain,
    /// direct https]`.
    fn built(client: &Client) -> [bool; 4] {
        std::array::from_fn(|i| client.inner.clients[i].get().is_some())
    }

    #[tokio::test]
    async fn a_client_is_built_for_the_urls_used_and_plain_http_loads_no_roots() {
        let kind = |url: &str| Kind::of(&Url::parse(url).unwrap());
        assert_eq!(kind("http://127.0.0.1:8080/rest/V1/x"), Kind { direct: true, tls: false });
        assert_eq!(kind("https://localhost/rest/V1/x"), Kind { direct: true, tls: true });
        assert_eq!(kind("http://magento.shop.svc/rest/V1/x"), Kind { direct: false, tls: false });
        assert_eq!(kind("https://shop.example.com/rest/V1/x"), Kind { direct: false, tls: true });
        let settings = MagentoSettings { timeout: Duration::from_secs(5), ca_file: None };
        let client = Client::new(&settings).unwrap();
        assert_eq!(built(&client), [false; 4], "nothing is built before a URL asks for it");
        let server = magento_devserver::DevServer::start(Default::default()).await.unwrap();
        server.add_customer("a@example.com", "pw");
        let url = Url::parse(&format!("{}/rest/V1/integration/customer/token", server.base_url())).unwrap();
        let token = client.rest_login(&url, "a@example.com", &Secret::new("pw".into())).await.unwrap();
        assert!(!token.expose().is_empty());
        assert_eq!(built(&client), [false, false, true, false], "loopback over plain http: direct, no roots");
        // The clone every worker holds shares the built clients.
        let clone = client.clone();
        clone.rest_login(&url, "a@example.com", &Secret::new("pw".into())).await.unwrap();
        assert_eq!(built(&client), [false, false, true, false]);
    }

    #[test]
    fn a_ca_file_is_checked_when_the_client_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let settings = MagentoSettings { timeout: Duration::from_secs(5), ca_file: Some(pem) };
        let e = Client::new(&settings).unwrap_err();
        assert!(matches!(e, ClientError::Build(_) | ClientError::CaFile { .. }), "{e}");
    }

    #[test]
    fn a_json_buffer_never_grows_whatever_its_strings_hold() {
        #[derive(Serialize)]
        struct Body<'a> {
            username: &'a str,
            password: &'a str,
        }
        let controls: String = (1u8..32).map(char::from).collect();
        for (username, password) in [("", ""), (controls.as_str(), controls.as_str()), ("é✓", "\"\\\"\\")] {
            let body = json_buffer(&Body { username, password }, &[username, password]);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["password"], password);
            let room = 64 + 6 * username.len() + 6 * password.len() + 16;
            assert_eq!(body.capacity(), room, "the buffer grew for {username:?}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }
}
