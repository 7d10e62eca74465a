//! One HTTP request: the basic-auth front and the injected faults, then routing as
//! Magento's REST router does it, the token, customers/me and revoke endpoints, and the login
//! service (`CustomerTokenService`) that the GraphQL endpoint shares. The GraphQL endpoint
//! itself is `graphql`; the cloud service's REST routes are [`cloud_rest`]; the admin token
//! routes are `admin`'s, the IMS stand-in and the one-time code route `cloud`'s.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    HeaderMap, HeaderName, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response};
use serde_json::{Map, Value};
use tokio::net::TcpStream;

use super::faults::{self, Fault};
use super::front;
use super::graphql;
use super::jwt::{self, Claims};
use super::render::{body_kind, negotiate, parse_xml_body, BodyKind, Format, Node};
use super::{admin, cloud};
use super::{
    format_datetime, Config, Customer, Refusal, RequestRecord, Route, Shared, StoreInfo, StoredToken, TokenFormat,
};

pub(crate) const MSG_SIGN_IN: &str =
    "The account sign-in was incorrect or your account is disabled temporarily. Please wait and try again later.";
pub(crate) const MSG_NO_ROUTE: &str = "Request does not match any route.";
const MSG_NOT_AUTHORIZED: &str = "The consumer isn't authorized to access %resources.";
const MSG_REQUIRED: &str = "\"%fieldName\" is required. Enter and try again.";
const MSG_INPUT_EXCEPTIONS: &str = "One or more input exceptions have occurred.";
const MSG_RECAPTCHA: &str = "ReCaptcha validation failed, please try again";
const STORE: HeaderName = HeaderName::from_static("store");
const MSG_UNCONFIRMED: &str = "This account isn't confirmed. Verify and try again.";
const MSG_DECODING: &str = "Decoding error.";
const MSG_METHOD: &str = "Request method is invalid.";

/// Request bodies larger than this are refused before they are read to the end.
const MAX_BODY: usize = 1 << 20;

/// The on-premises routes this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Token,
    Me,
    Revoke,
    AdminToken,
    TfaGoogle,
}

/// The body of every answer: whole, or streamed for [`Fault::Stream`].
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// What to answer.
pub(crate) struct Reply {
    status: u16,
    content_type: Cow<'static, str>,
    body: Bytes,
    retry_after: Option<String>,
    location: Option<String>,
    www_authenticate: Option<&'static str>,
}

impl Reply {
    pub(crate) fn new(status: u16, content_type: impl Into<Cow<'static, str>>, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            content_type: content_type.into(),
            body: body.into(),
            retry_after: None,
            location: None,
            www_authenticate: None,
        }
    }

    /// The htpasswd front's challenge: the web server answers, not Magento.
    fn front_refusal() -> Reply {
        Reply { www_authenticate: Some(front::CHALLENGE), ..Reply::new(401, "text/html", front::PAGE) }
    }

    pub(crate) fn node(format: Format, status: u16, node: &Node) -> Reply {
        Reply::new(status, format.content_type(), format.render(node))
    }

    pub(crate) fn message(format: Format, status: u16, message: &str) -> Reply {
        Reply::node(format, status, &Node::Map(vec![("message", Node::str(message))]))
    }

    fn into_response(self) -> Response<Body> {
        let mut builder = Response::builder().status(self.status).header(CONTENT_TYPE, self.content_type.as_ref());
        if let Some(value) = &self.retry_after {
            builder = builder.header(RETRY_AFTER, value);
        }
        if let Some(value) = &self.location {
            builder = builder.header(LOCATION, value);
        }
        if let Some(value) = self.www_authenticate {
            builder = builder.header(WWW_AUTHENTICATE, value);
        }
        builder.body(full(self.body)).unwrap_or_else(|_| {
            // An impossible status or header value in a test's fault: say so loudly.
            let mut r = Response::new(full(Bytes::from_static(b"invalid fault")));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

fn header(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Magento's REST routing on premises: after `/rest`, a first segment that is a known store
/// code (or `all`) selects the store; anything else stays in the path and simply matches no
/// route. Surrounding slashes are ignored, everything else must match exactly.
fn route<'c>(cfg: &'c Config, path: &str) -> Option<(Endpoint, &'c StoreInfo)> {
    let rest = path.strip_prefix("/rest")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let trimmed = rest.trim_matches('/');
    let (first, after) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let (store, service_path) = if first == "all" {
        (&cfg.all_store, after)
    } else if let Some(store) = cfg.stores.get(first) {
        (store, after)
    } else {
        (&cfg.default_store, trimmed)
    };
    let endpoint = match service_path {
        "V1/integration/customer/token" => Endpoint::Token,
        "V1/customers/me" => Endpoint::Me,
        "V1/integration/customer/revoke-customer-token" => Endpoint::Revoke,
        "V1/integration/admin/token" => Endpoint::AdminToken,
        "V1/tfa/provider/google/authenticate" => Endpoint::TfaGoogle,
        _ => return None,
    };
    Some((endpoint, store))
}

/// What a REST path is aimed at, whatever the store segment says (a known code, an unknown one
/// or none): a POST aimed at the token endpoint counts as a login attempt and is what faults
/// (things in front of Magento, which know nothing of store codes) answer. The API's base is
/// `/rest` on premises, `/<tenant-id>` for the cloud service; outside it, [`Route::Other`].
fn rest_route(cfg: &Config, path: &str) -> Route {
    if cfg.cloud_base.is_some() && path.trim_end_matches('/') == IMS_TOKEN_PATH {
        return Route::ImsToken;
    }
    let base = cfg.cloud_base.as_deref().unwrap_or("/rest");
    let Some(rest) = path.strip_prefix(base).filter(|r| r.is_empty() || r.starts_with('/')) else {
        return Route::Other;
    };
    let rest = rest.trim_matches('/');
    let aimed_at = |service: &str| match rest.strip_suffix(service) {
        Some("") => true,
        Some(store) => store.ends_with('/') && !store[..store.len() - 1].contains('/'),
        None => false,
    };
    if aimed_at("V1/integration/customer/token") {
        Route::RestToken
    } else if aimed_at("V1/customers/me") {
        Route::RestCustomersMe
    } else if aimed_at("V1/integration/customer/revoke-customer-token") {
        Route::RestRevoke
    } else if aimed_at("V1/integration/admin/token") {
        Route::AdminToken
    } else if aimed_at("V1/tfa/provider/google/authenticate") {
        Route::TfaGoogle
    } else if cfg.cloud_base.is_some() && cloud::otp_path(rest).is_some() {
        Route::CloudOtp
    } else {
        Route::RestOther
    }
}

/// Where the IMS stand-in answers (with the cloud service only).
const IMS_TOKEN_PATH: &str = "/ims/token/v3";

/// The request as the handler needs it after the body was read.
pub(crate) struct Req<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) accept: Option<&'a str>,
    pub(crate) authorization: Option<&'a str>,
    pub(crate) store: Option<&'a str>,
    pub(crate) body: &'a [u8],
    /// The body parsed as JSON, when this is a (customer or admin) token request and it parsed.
    pub(crate) json: Option<Value>,
    /// What a request to the GraphQL endpoint holds.
    pub(crate) graphql: Option<graphql::Incoming>,
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    stream: Arc<TcpStream>,
    req: Request<Incoming>,
) -> io::Result<Response<Body>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Reply::new(
            413,
            "text/html; charset=utf-8",
            "<html><body><h1>413 Request Entity Too Large</h1></body></html>\n",
        )),
        // The client went away mid-body: nothing to answer.
        Err(e) => return Err(io::Error::other(e)),
    };
    let content_type = header(&parts.headers, CONTENT_TYPE);
    let accept = header(&parts.headers, ACCEPT);
    let authorization = header(&parts.headers, AUTHORIZATION);
    let store = header(&parts.headers, STORE);
    let path = parts.uri.path();
    // A cheap (reference-counted) handle on the body that outlives the match below.
    let raw_bytes: Bytes = body.as_ref().map(Bytes::clone).unwrap_or_default();
    let raw: &[u8] = &raw_bytes;
    // Read before anything is answered: the operation decides how the request is counted.
    let graphql =
        shared.cfg.is_graphql_path(path).then(|| graphql::Incoming::read(&parts.method, parts.uri.query(), raw));
    let route = graphql.as_ref().map_or_else(|| rest_route(&shared.cfg, path), graphql::Incoming::route);
    // A login: what counts as an attempt, waits `login_latency` and is answered by faults.
    let is_login = match route {
        Route::RestToken => parts.method == Method::POST,
        Route::GraphQlLogin => true,
        _ => false,
    };
    let admin_login = matches!(route, Route::AdminToken | Route::TfaGoogle) && parts.method == Method::POST;
    let json = if (is_login || admin_login) && route != Route::GraphQlLogin && !raw.is_empty() {
        serde_json::from_slice::<Value>(raw).ok()
    } else {
        None
    };
    let (username, password) = match &graphql {
        Some(g) => g.recorded(),
        None => {
            let credential =
                |name: &str| json.as_ref().and_then(|v| v.get(name)).and_then(Value::as_str).map(str::to_owned);
            // An admin's password and code are never kept, not even in the records.
            (credential("username"), if admin_login { None } else { credential("password") })
        }
    };

    let (index, fault, front_refused) = {
        let mut st = shared.lock();
        let index = st.records.len();
        if is_login {
            if let Some(u) = &username {
                *st.attempts.entry(u.to_lowercase()).or_insert(0) += 1;
            }
        }
        st.records.push(RequestRecord {
            method: parts.method.as_str().to_owned(),
            path: path.to_owned(),
            route,
            username,
            password,
            store: store.clone(),
            content_type: content_type.clone(),
            accept: accept.clone(),
            user_agent: header(&parts.headers, USER_AGENT),
            authorization: authorization.is_some(),
            status: 0,
            at: SystemTime::now(),
        });
        // The front answers before anything behind it: a queued fault waits for a request
        // that gets through.
        let front_refused = st.front.as_deref().is_some_and(|pass| !front::admits(authorization.as_deref(), pass));
        let fault = if is_login && !front_refused { st.faults.pop_front().or_else(|| st.sticky.clone()) } else { None };
        (index, fault, front_refused)
    };

    // The store's own time per login, before anything is answered; each request sleeps on
    // its own task, so other connections are served meanwhile.
    let latency = shared.cfg.login_latency;
    if is_login && !latency.is_zero() {
        let mut stopping = shared.shutdown.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(latency) => {}
            _ = super::stopped(&mut stopping) => return Err(io::Error::other("server stopping")),
        }
    }

    let request = |json| Req {
        method: &parts.method,
        path,
        headers: &parts.headers,
        content_type: content_type.as_deref(),
        accept: accept.as_deref(),
        authorization: authorization.as_deref(),
        store: store.as_deref(),
        body: raw,
        json,
        graphql,
    };
    let reply = match (body, fault) {
        (Err(too_large), _) => too_large,
        (Ok(_), _) if front_refused => Reply::front_refusal(),
        (Ok(_), None) => process(&shared, request(json)),
        (Ok(_), Some(Fault::Delay(delay))) => {
            let mut stopping = shared.shutdown.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = super::stopped(&mut stopping) => return Err(io::Error::other("server stopping")),
            }
            process(&shared, request(json))
        }
        (Ok(_), Some(Fault::Hang)) => {
            tracing::debug!(path, "devserver: hanging a login request");
            let mut stopping = shared.shutdown.subscribe();
            super::stopped(&mut stopping).await;
            return Err(io::Error::other("hang fault: server stopping"));
        }
        (Ok(_), Some(Fault::Reset)) => {
            tracing::debug!(path, "devserver: resetting a login request's connection");
            stream.set_zero_linger()?;
            // The error makes hyper drop the connection; with linger 0 the close is an RST.
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset fault"));
        }
        (Ok(_), Some(Fault::Respond { status, content_type, body, retry_after })) => {
            Reply { retry_after, ..Reply::new(status, content_type, body) }
        }
        (Ok(_), Some(Fault::RetryAt { status, ahead })) => {
            match faults::Fault::retry_at(status, ahead, SystemTime::now()) {
                Fault::Respond { status, content_type, body, retry_after } => {
                    Reply { retry_after, ..Reply::new(status, content_type, body) }
                }
                _ => unreachable!("retry_at answers with Respond"),
            }
        }
        (Ok(_), Some(Fault::Redirect { status, location })) => Reply {
            location: Some(location.clone()),
            ..Reply::new(status, "text/html; charset=utf-8", faults::redirect_page(status, &location))
        },
        (Ok(_), Some(Fault::Stream { status, content_type, chunk, count, interval })) => {
            shared.lock().records[index].status = status;
            tracing::debug!(path, status, count, "devserver: streaming a token answer");
            return Ok(streamed(&shared, status, &content_type, chunk.into(), count, interval));
        }
    };
    shared.lock().records[index].status = reply.status;
    tracing::debug!(method = %parts.method, path, status = reply.status, "devserver request");
    Ok(reply.into_response())
}

/// `count` chunks, `interval` apart, chunked; stops early when the server stops or the client
/// hangs up (hyper then drops the body).
fn streamed(
    shared: &Shared,
    status: u16,
    content_type: &str,
    chunk: Bytes,
    count: usize,
    interval: std::time::Duration,
) -> Response<Body> {
    let stopping = shared.shutdown.subscribe();
    let chunks = futures::stream::unfold((0usize, stopping), move |(sent, mut stopping)| {
        let chunk = chunk.clone();
        async move {
            if sent >= count || *stopping.borrow() {
                return None;
            }
            if !interval.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = super::stopped(&mut stopping) => return None,
                }
            }
            Some((Ok::<_, io::Error>(Frame::data(chunk)), (sent + 1, stopping)))
        }
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// The storefront's 404 page: not the web API at all.
fn storefront_404() -> Reply {
    Reply::new(
        404,
        "text/html; charset=utf-8",
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Whoops, our bad...</h1></body></html>\n",
    )
}

/// Everything Magento itself would do with the request.
fn process(shared: &Shared, mut req: Req<'_>) -> Reply {
    if let Some(incoming) = req.graphql.take() {
        let headers = graphql::Headers {
            method: req.method,
            content_type: req.content_type,
            store: req.store,
            authorization: req.authorization,
        };
        let answer = graphql::answer(shared, &headers, incoming);
        let body = answer.body.map(|node| node.to_json()).unwrap_or_default();
        return Reply::new(answer.status, "application/json", body);
    }
    match rest_route(&shared.cfg, req.path) {
        Route::ImsToken => cloud::ims_token(shared, &req),
        Route::Other => storefront_404(),
        _ if shared.cfg.cloud_base.is_some() => cloud_rest(shared, &req),
        _ => on_premises_rest(shared, req),
    }
}

/// The web API's answer before routing: the 406 for an `Accept` no renderer serves, the 400
/// for a method the router does not know.
fn rest_preamble(req: &Req<'_>) -> Result<Format, Box<Reply>> {
    let format = match negotiate(req.accept) {
        Ok(f) => f,
        Err(first) => {
            return Err(Box::new(Reply::message(
                Format::Json,
                406,
                &format!(
                    "Server cannot match any of the given Accept HTTP header media type(s) from the request: \"{first}\" with media types from the config of response renderer."
                ),
            )))
        }
    };
    if !matches!(*req.method, Method::GET | Method::POST | Method::PUT | Method::DELETE) {
        return Err(Box::new(Reply::message(format, 400, MSG_METHOD)));
    }
    Ok(format)
}

/// The REST routes of the cloud service, under `/<tenant-id>` with no `/rest` and no store
/// code: none of the customer-token (or admin-token) routes exist there, so those paths get the
/// unknown route's 404. The one route served is the one-time code of "Login as Customer" (`POST
/// /V1/customer/{customerId}/otp`, §9 of shared/magento-other-paths.md).
fn cloud_rest(shared: &Shared, req: &Req<'_>) -> Reply {
    let format = match rest_preamble(req) {
        Ok(format) => format,
        Err(reply) => return *reply,
    };
    let base = shared.cfg.cloud_base.as_deref().unwrap_or("");
    let rest = req.path.strip_prefix(base).unwrap_or("").trim_matches('/');
    match cloud::otp_path(rest) {
        Some(id) if *req.method == Method::POST => cloud::issue_otp(shared, format, req, id),
        _ => Reply::message(format, 404, MSG_NO_ROUTE),
    }
}

fn on_premises_rest(shared: &Shared, req: Req<'_>) -> Reply {
    let format = match rest_preamble(&req) {
        Ok(format) => format,
        Err(reply) => return *reply,
    };
    let cfg = &shared.cfg;
    match route(cfg, req.path) {
        Some((Endpoint::Token, store)) if req.method == Method::POST => token(shared, store, format, req),
        Some((Endpoint::Me, store)) if req.method == Method::GET => me(shared, store, format, req.authorization),
        Some((Endpoint::Revoke, store)) if req.method == Method::POST => revoke(shared, store, format, &req),
        Some((Endpoint::AdminToken, _)) if req.method == Method::POST => admin::admin_token(shared, format, req),
        // Magento_TwoFactorAuth's routes exist only while the module is on.
        Some((Endpoint::TfaGoogle, _)) if req.method == Method::POST && shared.two_factor.load(Ordering::Relaxed) => {
            admin::google_authenticate(shared, format, req)
        }
        _ => Reply::message(format, 404, MSG_NO_ROUTE),
    }
}

/// Magento's body reading: nothing to decode when the body is empty; otherwise the
/// Content-Type picks the deserializer. Non-object JSON yields no parameters at all.
pub(crate) fn decode_body(
    content_type: Option<&str>,
    body: &[u8],
    json: Option<Value>,
) -> Result<Map<String, Value>, String> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    match body_kind(content_type)? {
        BodyKind::Json => match json.or_else(|| serde_json::from_slice(body).ok()) {
            Some(Value::Object(m)) => Ok(m),
            Some(_) => Ok(Map::new()),
            None => Err(MSG_DECODING.to_owned()),
        },
        BodyKind::Xml => parse_xml_body(body).ok_or_else(|| MSG_DECODING.to_owned()),
    }
}

pub(crate) fn required(field: &'static str) -> Node {
    Node::Map(vec![
        ("message", Node::str(MSG_REQUIRED)),
        ("parameters", Node::Map(vec![("fieldName", Node::str(field))])),
    ])
}

fn unauthorized(format: Format) -> Reply {
    Reply::node(
        format,
        401,
        &Node::Map(vec![
            ("message", Node::str(MSG_NOT_AUTHORIZED)),
            ("parameters", Node::Map(vec![("resources", Node::str("self"))])),
        ]),
    )
}

fn token(shared: &Shared, store: &StoreInfo, format: Format, req: Req<'_>) -> Reply {
    // Magento_ReCaptchaWebapiRest validates before the service sees the credentials.
    if shared.recaptcha.load(Ordering::Relaxed) {
        return Reply::message(format, 400, MSG_RECAPTCHA);
    }
    let params = match decode_body(req.content_type, req.body, req.json) {
        Ok(p) => p,
        Err(message) => return Reply::message(format, 400, &message),
    };
    let field = |name: &str| params.get(name).and_then(Value::as_str).filter(|s| !s.is_empty());
    let (username, password) = match (field("username"), field("password")) {
        (Some(u), Some(p)) => (u, p),
        (None, None) => {
            return Reply::node(
                format,
                400,
                &Node::Map(vec![
                    ("message", Node::str(MSG_INPUT_EXCEPTIONS)),
                    ("errors", Node::List(vec![required("username"), required("password")])),
                ]),
            )
        }
        (None, Some(_)) => return Reply::node(format, 400, &required("username")),
        (Some(_), None) => return Reply::node(format, 400, &required("password")),
    };
    match login(shared, store, username, password) {
        Ok(token) => Reply::node(format, 200, &Node::Str(token)),
        Err(Refusal::SignIn) => Reply::message(format, 401, MSG_SIGN_IN),
        Err(Refusal::Unconfirmed) => Reply::message(format, 401, MSG_UNCONFIRMED),
    }
}

/// CustomerTokenService::createCustomerAccessToken, behind REST's token route and GraphQL's
/// `generateCustomerToken` alike: the throttle check (refusals not counted), the customer's own
/// checks (an unknown email, a lock, a wrong password and a pending confirmation all count as a
/// throttle failure, in the one row per username both APIs share), then the reset and the
/// minting.
pub(crate) fn login(shared: &Shared, store: &StoreInfo, username: &str, password: &str) -> Result<String, Refusal> {
    let cfg = &shared.cfg;
    let key = username.to_lowercase();
    let now = Instant::now();
    let mut st = shared.lock();
    if st.throttle.is_locked(&key, now) {
        return Err(Refusal::SignIn);
    }
    let verdict = match st.lookup_mut(&store.website, &key) {
        Some(customer) => customer.authenticate(password, cfg.customer_lock, now),
        None => Err(Refusal::SignIn),
    };
    let uid = match verdict {
        Ok(uid) => uid,
        Err(refusal) => {
            st.throttle.record_failure(&key, now);
            return Err(refusal);
        }
    };
    st.throttle.reset(&key);
    drop(st);
    Ok(mint_customer_token(shared, uid))
}

/// A customer token as the configured issuer mints it (a login, a one-time code's exchange).
pub(crate) fn mint_customer_token(shared: &Shared, uid: u64) -> String {
    let cfg = &shared.cfg;
    let iat = cfg.unix_now();
    let (token, exp) = match cfg.token_format {
        TokenFormat::Jwt => {
            // Signing needs no state: done outside the lock.
            let token = shared.signer.mint(Claims { uid, iat, exp: iat + cfg.token_lifetime_secs });
            shared.lock().issued.push(token.clone());
            return token;
        }
        TokenFormat::Opaque => (jwt::opaque_token(), iat + cfg.opaque_lifetime_secs),
        TokenFormat::Encrypted => (jwt::encrypted_token(), iat + cfg.token_lifetime_secs),
    };
    let mut st = shared.lock();
    st.issued.push(token.clone());
    st.stored.insert(token.clone(), StoredToken { uid, iat, exp, revoked: false });
    token
}

/// An opaque token from `Integration\Model\Oauth\TokenFactory::createCustomerToken` whatever the
/// store's format (what `generateCustomerTokenAsAdmin` issues): kept in the table, living
/// `oauth/access_token_lifetime/customer`.
pub(crate) fn mint_opaque_customer_token(shared: &Shared, uid: u64) -> String {
    let iat = shared.cfg.unix_now();
    let token = jwt::opaque_token();
    let mut st = shared.lock();
    st.issued.push(token.clone());
    st.stored
        .insert(token.clone(), StoredToken { uid, iat, exp: iat + shared.cfg.opaque_lifetime_secs, revoked: false });
    token
}

/// Magento's TokenUserContext: `Bearer` (any case), one space, the token.
pub(crate) fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (kind, token) = authorization?.split_once(' ')?;
    (kind.eq_ignore_ascii_case("bearer") && !token.contains(' ')).then_some(token)
}

/// The customer id a token authenticates right now, if any, whatever the URL's store.
pub(crate) fn authenticate(shared: &Shared, token: &str) -> Option<u64> {
    token_state(shared, token).ok()
}

/// Why a token authenticates nobody: what Magento's token reader and validators tell apart
/// (REST never says; GraphQL does from 2.4.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    /// Not a token this store minted or still holds: a bad signature, garbage, an opaque token
    /// whose row is gone (revoked or its customer deleted).
    Unreadable,
    /// Past its expiry.
    Expired,
    /// Minted at or before its customer's revocation cut-off, or its customer was deleted.
    Revoked,
}

/// Who a bearer token authenticates: what GraphQL's user context holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    Customer(u64),
    /// An admin user's id (user type 2).
    Admin(u64),
}

/// Who a token authenticates right now, or why nobody: an admin JWT (read, expiry, the admin
/// still exists), else a customer token as [`token_state`] reads it.
pub(crate) fn caller_state(shared: &Shared, token: &str) -> Result<Caller, TokenProblem> {
    if let Some(claims) = shared.signer.verify_admin(token) {
        if shared.cfg.unix_now() >= claims.exp {
            return Err(TokenProblem::Expired);
        }
        return match shared.lock().issuers.admin_by_id(claims.uid) {
            Some(_) => Ok(Caller::Admin(claims.uid)),
            None => Err(TokenProblem::Revoked),
        };
    }
    token_state(shared, token).map(Caller::Customer)
}

/// The customer id a token authenticates right now, or why it does not: read, then expiry,
/// then revocation. With JWTs, the opaque tokens of Login as Customer are read from the table.
pub(crate) fn token_state(shared: &Shared, token: &str) -> Result<u64, TokenProblem> {
    // Verified before taking the lock: HMAC is the costly part.
    let claims = match shared.cfg.token_format {
        TokenFormat::Jwt => shared.signer.verify(token),
        TokenFormat::Opaque | TokenFormat::Encrypted => None,
    };
    let now = shared.cfg.unix_now();
    let st = shared.lock();
    let (uid, iat, exp) = match claims {
        Some(c) => (c.uid, c.iat, c.exp),
        None => {
            let t = st.stored.get(token).filter(|t| !t.revoked).ok_or(TokenProblem::Unreadable)?;
            (t.uid, t.iat, t.exp)
        }
    };
    if now >= exp {
        return Err(TokenProblem::Expired);
    }
    let Some(customer) = st.customers.get(&uid) else {
        // Deleting a customer revokes its JWTs; its oauth_token rows go with it.
        return Err(match (shared.cfg.token_format, claims) {
            (TokenFormat::Opaque, _) | (TokenFormat::Jwt, None) => TokenProblem::Unreadable,
            _ => TokenProblem::Revoked,
        });
    };
    if customer.revoked_at.is_some_and(|r| iat <= r) {
        return Err(TokenProblem::Revoked);
    }
    Ok(uid)
}

/// Magento_Customer's CustomerAuthorization plugin on the `self` resource (website-scoped
/// accounts): the token's customer must belong to the website of the URL's store. `all` is
/// the admin store, of no customer's website, so `/rest/all/` always fails.
fn self_allowed(store: &StoreInfo, customer: &Customer) -> bool {
    !store.all && store.website == customer.website
}

fn me(shared: &Shared, store: &StoreInfo, format: Format, authorization: Option<&str>) -> Reply {
    let Some(uid) = bearer(authorization).and_then(|t| authenticate(shared, t)) else {
        return unauthorized(format);
    };
    let node = {
        let st = shared.lock();
        match st.customers.get(&uid) {
            Some(c) if self_allowed(store, c) => customer_node(c),
            _ => return unauthorized(format),
        }
    };
    Reply::node(format, 200, &node)
}

fn revoke(shared: &Shared, store: &StoreInfo, format: Format, req: &Req<'_>) -> Reply {
    let Some(uid) = bearer(req.authorization).and_then(|t| authenticate(shared, t)) else {
        return unauthorized(format);
    };
    if !shared.lock().customers.get(&uid).is_some_and(|c| self_allowed(store, c)) {
        return unauthorized(format);
    }
    if let Err(message) = decode_body(req.content_type, req.body, None) {
        return Reply::message(format, 400, &message);
    }
    let now = shared.cfg.unix_now();
    shared.lock().revoke_customer(uid, now, shared.cfg.token_format);
    Reply::node(format, 200, &Node::Bool(true))
}

/// The customer object of `GET /V1/customers/me`, fields in Magento's order.
fn customer_node(c: &Customer) -> Node {
    let created = format_datetime(c.created_at);
    Node::Map(vec![
        ("id", Node::Int(c.id as i64)),
        ("group_id", Node::Int(1)),
        ("created_at", Node::Str(created.clone())),
        ("updated_at", Node::Str(created)),
        ("created_in", Node::str(c.created_in.as_str())),
        ("email", Node::str(c.email.as_str())),
        ("firstname", Node::str(c.firstname.as_str())),
        ("lastname", Node::str("Customer")),
        ("store_id", Node::Int(i64::from(c.store_id))),
        ("website_id", Node::Int(i64::from(c.website_id))),
        ("addresses", Node::List(Vec::new())),
        ("disable_auto_group_change", Node::Int(0)),
        ("extension_attributes", Node::Map(vec![("is_subscribed", Node::Bool(false))])),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_paths() {
        let cfg = crate::build_config(&crate::DevServerOptions::default());
        for p in [
            "/rest/V1/integration/customer/token",
            "/rest/V1/integration/customer/token/",
            "/rest/de/V1/integration/customer/token",
            "/rest/unknown/V1/integration/customer/token",
        ] {
            assert_eq!(rest_route(&cfg, p), Route::RestToken, "{p}");
        }
        for p in [
            "/rest/a/b/V1/integration/customer/token",
            "/rest/V1/integration/customer/tokens",
            "/rest/xV1/integration/customer/token",
            "/rest",
        ] {
            assert_eq!(rest_route(&cfg, p), Route::RestOther, "{p}");
        }
        assert_eq!(rest_route(&cfg, "/rest/V1/customers/me"), Route::RestCustomersMe);
        assert_eq!(rest_route(&cfg, "/rest/all/V1/integration/customer/revoke-customer-token"), Route::RestRevoke);
        assert_eq!(rest_route(&cfg, "/rest/V1/integration/admin/token"), Route::AdminToken);
        assert_eq!(rest_route(&cfg, "/rest/default/V1/tfa/provider/google/authenticate"), Route::TfaGoogle);
        assert_eq!(rest_route(&cfg, "/rest/V1/customer/7/otp"), Route::RestOther);
        assert_eq!(rest_route(&cfg, "/ims/token/v3"), Route::Other);
        for p in ["/V1/integration/customer/token", "/restV1/integration/customer/token", "/graphql", "/"] {
            assert_eq!(rest_route(&cfg, p), Route::Other, "{p}");
        }
    }

    #[test]
    fn cloud_service_paths() {
        let cfg = crate::build_config(&crate::DevServerOptions {
            cloud_service: Some(crate::CloudService::new("t3nant")),
            ..Default::default()
        });
        assert_eq!(rest_route(&cfg, "/t3nant/V1/integration/customer/token"), Route::RestToken);
        assert_eq!(rest_route(&cfg, "/t3nant/default/V1/integration/customer/token"), Route::RestToken);
        assert_eq!(rest_route(&cfg, "/t3nant/V1/customers/me"), Route::RestCustomersMe);
        assert_eq!(rest_route(&cfg, "/t3nant/V1/customer/7/otp"), Route::CloudOtp);
        assert_eq!(rest_route(&cfg, "/t3nant/V1/customer/7/otp/"), Route::CloudOtp);
        assert_eq!(rest_route(&cfg, "/t3nant/V1/customer//otp"), Route::RestOther);
        assert_eq!(rest_route(&cfg, "/ims/token/v3"), Route::ImsToken);
        assert_eq!(rest_route(&cfg, "/t3nant/V1/integration/admin/token"), Route::AdminToken);
        assert_eq!(rest_route(&cfg, "/t3nant"), Route::RestOther);
        assert_eq!(rest_route(&cfg, "/rest/V1/integration/customer/token"), Route::Other);
        assert_eq!(rest_route(&cfg, "/t3nantx/V1/customers/me"), Route::Other);
        assert!(cfg.is_graphql_path("/t3nant/graphql"));
        assert!(cfg.is_graphql_path("/t3nant/graphql/"));
        assert!(!cfg.is_graphql_path("/graphql"));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("Bearer  abc")), None);
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
