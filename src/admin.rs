//! The admin HTTP server on `admin.listen`.
//!
//! | route          | answer                                                                       |
//! |----------------|------------------------------------------------------------------------------|
//! | `GET /healthz` | 200 `ok` while the daemon's loop runs (kubelet's liveness probe)             |
//! | `GET /readyz`  | 200 `ready` when every customer has an unexpired token on disk; else 503 and the names that have none (startup and readiness probes) |
//! | `GET /status`  | 200 JSON for people: per customer its state, expiry, last success, next refresh, failures in a row and last error; never a token or a password |
//! | `GET /metrics` | Prometheus text format                                                       |
//! | `POST /refresh/<name>` | for an app that got a 401: the customer's worker checks the token on disk now and, if Magento refuses it, logs in (under the lockout policy) and writes a new one, then answers 200 `{"name","replaced","expires_at"}`; 404 for an unknown name; 503 with the reason when no valid token can be had now; 403 with the reason for what a web page sends (an `Origin`, a `Host` that is not this daemon's: see below). One check per customer per 10 s, shared by the asks that come meanwhile. With the token API, a caller the token API would answer gets `"token"` in the answer too |
//! | `GET /token/<name>` | the token API (`output.kubernetes.token_api`, on the Lease holder): 200 `{"name","token","expires_at"}` to a caller whose `Authorization: Bearer` is a service account token TokenReview accepts and SubjectAccessReview allows to `get` the customer's Secret ([`crate::cluster::gate`]); 401 without one, 403 when not allowed, 404 for an unknown name (or with the API off), 503 naming the holder on a standby, 503 with the reason when the reviews fail or no valid token is there |
//!
//! The port may face anyone who can reach it, so a connection costs little and never lasts:
//!
//! | limit | value | what it stops |
//! |-------|-------|---------------|
//! | [`HEADER_READ_TIMEOUT`] | 5 s | a request's head (line and headers) must arrive whole within 5 s of the wait for it starting: on a new connection and between keep-alive requests alike (hyper's header-read timer), so idle and half-sent connections are closed |
//! | [`STALL_TIMEOUT`] | 10 s | a connection on which no byte moved either way for 10 s is dropped: a client that never reads its answers, or trickles a body |
//! | [`MAX_CONNECTIONS`] | 64, at most a quarter of the open-file limit | a new connection beyond it takes the slot of the oldest connection whose request is not being handled (waiting for a request head, or sending an answer the client does not read), which is closed; only when every connection's request is being handled (a `POST /refresh` waiting for Magento) is the new one closed at once |
//! | [`MAX_BUF_SIZE`] | 16 KiB | the read buffer of one connection |
//!
//! Making room for the newest connection is what keeps `/healthz` answering. Clients that
//! hold every slot with half-sent requests, and open a new one whenever one is closed, would
//! otherwise take each slot the header timeout frees before a probe could, and every probe
//! would be refused (the kubelet restarts a pod that fails its liveness probe). A probe sends
//! its request as soon as it is connected and is answered at once: it is the newest, so
//! dozens of newer connections would have to arrive in that instant to close it. The cap
//! also leaves the process's descriptors to the logins (see [`connection_limit`]).
//!
//! Routes that act (`POST`) answer only what a program on the pod's network sends, not a web
//! page in a browser on the same machine (which can send a `POST` to `127.0.0.1` from any
//! site): a request with an `Origin` header, or whose `Host` is not a name of this daemon, is
//! refused with 403 (see [`Addressed`]). `GET` routes change nothing and answer whatever the
//! `Host`: the kubelet's probes and Prometheus name the pod's address, or whatever their
//! configuration says.
//!
//! A token is answered only by the token API, only to a caller Kubernetes vouches for, with
//! `Cache-Control: no-store`; a standby's 503 closes the connection (`Connection: close`), so the
//! caller's next try through the Service opens a new one, which may reach the holder.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::rfc3339;
use crate::config::CustomerConfig;
use crate::metrics::Metrics;
use crate::status::{Answer, Board, CustomerStatus, Granted, Mailbox, TokenRoute};

#[derive(Clone)]
pub struct Admin {
    /// The metrics and, through them, the status board (one per process).
    pub metrics: Arc<Metrics>,
    /// `output.kubernetes.token_api`: who may have a customer's token (`None`: the API is off).
    pub token_api: Option<Arc<dyn Reviews>>,
}

/// The token API's decision about a caller, for one customer: what TokenReview and
/// SubjectAccessReview said of its bearer token ([`crate::cluster::gate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The caller, this user, may `get` the customer's Secret.
    Allowed { user: String },
    /// TokenReview did not authenticate the bearer token.
    Unauthenticated,
    /// SubjectAccessReview did not allow this user to `get` the Secret (`<namespace>/<name>`).
    Forbidden { user: String, secret: String },
    /// A review could not be made: why (never a token).
    Unavailable(String),
}

/// Who may have a customer's token: the token API's gate.
pub trait Reviews: Send + Sync {
    fn review<'a>(&'a self, bearer: &'a str, customer: &'a CustomerConfig) -> futures::future::BoxFuture<'a, Verdict>;
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/refresh/{name}", post(refresh))
        .route("/token/{name}", get(token))
        .with_state(admin)
        .layer(middleware::from_fn_with_state(Arc::new(Addressed::from_env()), addressed_here))
}

/// The names a request to this daemon may carry in its `Host` (besides those every daemon
/// has: see [`Addressed::allows`]): `POD_NAME` and `POD_IP` and the host name, lower case, and
/// `POD_NAMESPACE` for a Service's `<service>.<namespace>` (the chart sets the pod's name and
/// namespace from the downward API).
pub struct Addressed {
    names: Vec<String>,
    namespace: Option<String>,
}

impl Addressed {
    pub fn from_env() -> Addressed {
        let host_name = rustix::system::uname().nodename().to_string_lossy().into_owned();
        let names = ["POD_NAME", "POD_IP"].iter().filter_map(|var| std::env::var(var).ok()).chain([host_name]);
        let namespace = std::env::var("POD_NAMESPACE").ok().map(|n| n.to_ascii_lowercase()).filter(|n| !n.is_empty());
        Addressed { names: names.map(|n| n.to_ascii_lowercase()).filter(|n| !n.is_empty()).collect(), namespace }
    }

    /// Why a request that acts must be refused, if it must: it has an `Origin` (only a
    /// browser sends one, for a page's request; this server serves no page), or a `Host`
    /// that is not a name of this daemon.
    fn refusal(&self, headers: &HeaderMap) -> Option<String> {
        if headers.contains_key(header::ORIGIN) {
            return Some("refused: the request has an Origin header, so a web page sent it; ask without one (curl, an HTTP library)".into());
        }
        let mut hosts = headers.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            // HTTP/1.0 has no Host; a browser always sends one.
            (None, _) => None,
            (Some(host), None) if host.to_str().is_ok_and(|h| self.allows(h)) => None,
            _ => Some(format!(
                "refused: the Host header {:?} is not a name of this daemon; address it as 127.0.0.1, localhost, an IP address, the pod's name or a Service's in-cluster name (<service>, <service>.<namespace>.svc)",
                headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()).unwrap_or_default()
            )),
        }
    }

    /// Whether `host` (`name[:port]`) names this daemon. A page that turns its own domain name
    /// to 127.0.0.1 (DNS rebinding) still sends that name, so what passes is a name no such
    /// page can have: an IP address (the listen address, loopback, the pod's, a Service's),
    /// `localhost` (RFC 6761: never sent to DNS), one of this daemon's [names](Addressed),
    /// a name of one label (a Service's, resolved through the pod's search list), a Service's
    /// `<service>.<namespace>` in this pod's namespace (`POD_NAMESPACE`), or a Service's name in
    /// the cluster (`.svc`, `.svc.cluster.local`: no public domain).
    fn allows(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => return v6.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok()),
            None => match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            },
        };
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        !name.is_empty()
            && (name.parse::<IpAddr>().is_ok()
                || name == "localhost"
                || name.ends_with(".localhost")
                || self.names.contains(&name)
                || !name.contains('.')
                || self.namespace.as_deref().is_some_and(|ns| {
                    name.split_once('.').is_some_and(|(service, rest)| !service.is_empty() && rest == ns)
                })
                || name.ends_with(".svc")
                || name.ends_with(".svc.cluster.local"))
    }
}

/// Requests that act (every method but `GET` and `HEAD`) must be addressed to this daemon by
/// a program (module doc); the others pass untouched.
async fn addressed_here(State(addressed): State<Arc<Addressed>>, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        if let Some(why) = addressed.refusal(request.headers()) {
            return (StatusCode::FORBIDDEN, why).into_response();
        }
    }
    next.run(request).await
}

/// The whole head of a request must arrive within this (module doc).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection on which no byte moves either way for this long is dropped.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections served at once (lowered by [`connection_limit`] under a small
/// open-file limit).
pub const MAX_CONNECTIONS: usize = 64;
/// The read buffer of one connection (hyper's least is 8 KiB): the routes take no body.
pub const MAX_BUF_SIZE: usize = 16 * 1024;
/// How long a new connection waits for the slot of the connection closed to make room for it
/// (the closed one's task must run once to let go of it).
const ROOM_WITHIN: Duration = Duration::from_secs(1);

/// The connections the admin server serves at once: [`MAX_CONNECTIONS`], but never more than
/// a quarter of the soft open-file limit, so the logins and token files keep the rest.
pub fn connection_limit() -> usize {
    limit_for(rustix::process::getrlimit(rustix::process::Resource::Nofile).current)
}

/// [`connection_limit`] for a soft open-file limit (`None`: unlimited).
fn limit_for(open_files: Option<u64>) -> usize {
    match open_files {
        Some(n) => MAX_CONNECTIONS.min(usize::try_from(n / 4).unwrap_or(usize::MAX)).max(1),
        None => MAX_CONNECTIONS,
    }
}

/// Serves until `shutdown` resolves; then accepts nothing more, lets the requests in flight
/// finish, closes idle connections, and returns when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(admin);
    let slots = Arc::new(Semaphore::new(connection_limit()));
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    // The connections served, oldest first.
    let mut served: VecDeque<Served> = VecDeque::new();
    let mut full = Full::default();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        served.retain(|c| !c.task.is_finished());
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if make_room(&mut served) => {
                full.made_room();
                tokio::time::timeout(ROOM_WITHIN, slots.clone().acquire_owned()).await.ok().and_then(Result::ok)
            }
            Err(_) => None,
        };
        match slot {
            Some(slot) => {
                let answering = Arc::new(AtomicUsize::new(0));
                let task = connections.spawn(connection(stream, router.clone(), stop.clone(), slot, answering.clone()));
                served.push_back(Served { task, answering });
            }
            None => {
                drop(stream);
                full.refused();
            }
        }
    }
    drop(listener);
    stop.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A connection being served, as the accept loop sees it.
struct Served {
    task: AbortHandle,
    /// The requests being handled on it (head read, answer not yet made): none while it waits
    /// for a request head, reads one, or sends an answer.
    answering: Arc<AtomicUsize>,
}

/// Closes the oldest connection whose request is not being handled (it waits for a request
/// head, reads one, or sends an answer the client may not read), to give its slot to a new
/// one: whether there was one.
fn make_room(served: &mut VecDeque<Served>) -> bool {
    let Some(at) = served.iter().position(|c| c.answering.load(Ordering::Acquire) == 0) else {
        return false;
    };
    if let Some(oldest) = served.remove(at) {
        oldest.task.abort();
    }
    true
}

/// One connection, until the client closes it, a limit of the module doc ends it, `stop`
/// (then a request in flight is answered first), or it is closed to make room (aborted).
/// `answering` counts the requests it is answering.
async fn connection(
    stream: TcpStream,
    router: Router,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
    answering: Arc<AtomicUsize>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched::new(stream));
    let router = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |request| {
        let held = Answering::begin(&answering);
        let answer = router.call(request);
        // Counted until the answer is made, not until it is sent: a client that does not read
        // what it asked for holds no slot that room could not be made from.
        async move {
            let answer = answer.await;
            drop(held);
            answer
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(error = %e, "admin connection ended");
    }
}

/// An accept that failed: a connection reset before it was taken is nothing; anything else
/// (out of descriptors) is logged and the loop pauses, instead of spinning.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    warn!(error = %e, "admin server: cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One request being answered on a connection, from its head until its answer's body is sent
/// whole (hyper drops the body then) or the connection ends.
struct Answering(Arc<AtomicUsize>);

impl Answering {
    fn begin(count: &Arc<AtomicUsize>) -> Answering {
        count.fetch_add(1, Ordering::AcqRel);
        Answering(count.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections closed because every slot was taken: a WARN line at most once a minute.
#[derive(Default)]
struct Full {
    /// Closed to make room for a newer one while waiting for a request head.
    made_room: u64,
    /// New ones closed at once: every connection was being answered.
    refused: u64,
    warned_at: Option<Instant>,
}

impl Full {
    fn made_room(&mut self) {
        self.made_room += 1;
        self.warn();
    }

    fn refused(&mut self) {
        self.refused += 1;
        self.warn();
    }

    fn warn(&mut self) {
        if self.warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warn!(
                made_room = self.made_room,
                refused = self.refused,
                limit = connection_limit(),
                "admin server: every slot is taken: connections still waiting for a request head are closed to make room for new ones (made_room), and new ones are closed at once while every connection is answering a request (refused)"
            );
            (self.made_room, self.refused) = (0, 0);
            self.warned_at = Some(Instant::now());
        }
    }
}

/// A connection that fails once no byte has moved either way for [`STALL_TIMEOUT`] while
/// the server waits on it.
struct Watched {
    io: TcpStream,
    deadline: Pin<Box<Sleep>>,
}

impl Watched {
    fn new(io: TcpStream) -> Watched {
        Watched { io, deadline: Box::pin(tokio::time::sleep(STALL_TIMEOUT)) }
    }

    fn moved(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + STALL_TIMEOUT);
    }

    /// The answer to a wait: still waiting, or an error once the deadline has passed.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no byte moved for {}s", STALL_TIMEOUT.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match poll {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.moved();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => self.waiting(cx),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.waiting(cx),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => this.waiting(cx),
            ready => ready,
        }
    }
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let missing = admin.metrics.board().not_ready(SystemTime::now());
    if missing.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("no valid token yet: {}", missing.join(", "))).into_response()
    }
}

#[derive(Serialize)]
struct StatusBody {
    version: &'static str,
    /// `output.kubernetes`: this replica, the Lease and its holder.
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<crate::status::Leadership>,
    /// `auth.method` other than `password`: the admin's or the IMS credential's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer: Option<crate::status::IssuerStatus>,
    customers: Vec<CustomerStatus>,
}

async fn status(State(admin): State<Admin>) -> Json<StatusBody> {
    Json(StatusBody {
        version: env!("CARGO_PKG_VERSION"),
        leader: admin.metrics.board().leadership(),
        issuer: admin.metrics.board().issuer(),
        customers: admin.metrics.board().snapshot(SystemTime::now()),
    })
}

/// How long `POST /refresh` waits for the worker's answer: under [`STALL_TIMEOUT`], so the
/// connection outlives the wait. A worker still busy by then answers the next ask (within
/// 10 s) from what it found.
const ANSWER_WITHIN: Duration = Duration::from_secs(9);

#[derive(Serialize)]
struct Refreshed {
    name: String,
    replaced: bool,
    expires_at: String,
}

/// The token API's answer: [`Refreshed`] (`replaced` only from `POST /refresh`) with the token.
#[derive(Serialize)]
struct Handed<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced: Option<bool>,
    token: &'a str,
    expires_at: String,
}

/// The longest bearer token taken (a service account token is 1 to 2 KiB).
const MAX_BEARER: usize = 8 * 1024;

/// The token of `Authorization: Bearer <token>` (RFC 6750: the scheme in any case, a b64token),
/// when the request has exactly one `Authorization` header and it is that.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim_matches(' ');
    let b64token =
        |t: &str| t.trim_end_matches('=').bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_BEARER && b64token(token))
        .then_some(token)
}

/// Why `name`'s worker does not run in this process.
enum Elsewhere {
    /// A standby (`output.kubernetes`), or a holder that cannot renew its Lease: why.
    Standby(String),
    /// No customer of that name.
    NotFound,
}

impl Elsewhere {
    /// 503 naming the holder, or 404.
    fn answer(self, name: &str) -> (Granted, Response) {
        match self {
            // The caller's next try through the Service opens a new connection, which may reach
            // the holder (one kept alive would come back here).
            Elsewhere::Standby(why) => (
                Granted::Standby,
                (StatusCode::SERVICE_UNAVAILABLE, [(header::CONNECTION, "close")], why).into_response(),
            ),
            Elsewhere::NotFound => {
                (Granted::NotFound, (StatusCode::NOT_FOUND, format!("no customer named {name:?}")).into_response())
            }
        }
    }
}

/// Where `name`'s worker runs in this process: its mailbox.
fn worker_of(board: &Board, name: &str) -> Result<Arc<Mailbox>, Elsewhere> {
    if let Some(mailbox) = board.asker(name) {
        return Ok(mailbox);
    }
    // A standby knows the customer but does not log in.
    let Some(l) = board.leadership().filter(|l| !l.leading && board.names().iter().any(|n| n == name)) else {
        return Err(Elsewhere::NotFound);
    };
    Err(Elsewhere::Standby(match l.holder.as_deref() {
        // The Lease still names this replica, which could not renew it (the API away).
        Some(holder) if holder == l.identity => format!(
            "this replica ({holder}) held the Lease {} but cannot renew it now: it neither logs in nor writes until it holds it again or another replica takes it over; ask again shortly",
            l.lease
        ),
        holder => format!(
            "this replica ({}) stands by: the holder of the Lease {}, {}, logs in and writes the Secret; ask it (through the Service)",
            l.identity,
            l.lease,
            holder.unwrap_or("no replica (yet)")
        ),
    }))
}

fn unavailable(why: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
}

/// 401, with the scheme to use (RFC 6750).
fn unauthenticated(why: &str) -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], why.to_owned()).into_response()
}

/// 200 with the token: never kept by a cache on the way.
fn handed(body: &Handed<'_>) -> Response {
    let json = zeroize::Zeroizing::new(serde_json::to_vec(body).expect("the answer serializes"));
    let headers = [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")];
    (StatusCode::OK, headers, json.to_vec()).into_response()
}

async fn refresh(State(admin): State<Admin>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let board = admin.metrics.board();
    // The token API: a caller that sends a bearer token asks for the token in the answer.
    let reviews = admin.token_api.as_deref().filter(|_| headers.contains_key(header::AUTHORIZATION));
    let count = |result| {
        if reviews.is_some() {
            board.token_api_request(TokenRoute::Refresh, result);
        }
    };
    let asker = match worker_of(board, &name) {
        Ok(asker) => asker,
        Err(elsewhere) => {
            let (result, answer) = elsewhere.answer(&name);
            count(result);
            return answer;
        }
    };
    let keeper = asker.keeper();
    let review = async {
        let reviews = reviews?;
        Some(match (bearer(&headers), &keeper) {
            (None, _) => Verdict::Unauthenticated,
            (Some(bearer), Some(keeper)) => reviews.review(bearer, keeper.customer()).await,
            (Some(_), None) => Verdict::Unavailable("this customer's worker is starting".into()),
        })
    };
    let ask = async {
        let (ask, answer) = tokio::sync::oneshot::channel();
        asker.post(ask);
        match tokio::time::timeout(ANSWER_WITHIN, answer).await {
            Ok(Ok(Answer::Token { replaced, expires_at })) => Ok((replaced, expires_at)),
            Ok(Ok(Answer::Unavailable(why))) => Err(why),
            Ok(Err(_)) => Err("the customer's worker stopped: ask again".into()),
            Err(_) => Err("still checking the token with Magento: ask again in a few seconds".into()),
        }
    };
    let (answer, verdict) = tokio::join!(ask, review);
    let (replaced, expires_at) = match answer {
        Ok(token) => token,
        Err(why) => {
            count(Granted::Unavailable);
            return unavailable(why);
        }
    };
    let result = match verdict {
        None => None,
        Some(Verdict::Allowed { .. }) => match keeper.as_ref().and_then(|k| k.token()) {
            Some(token) => {
                count(Granted::Allowed);
                let expires_at = rfc3339(expires_at);
                return handed(&Handed { name: &name, replaced: Some(replaced), token: &token, expires_at });
            }
            None => Some(Granted::Unavailable),
        },
        Some(Verdict::Unauthenticated) => Some(Granted::Unauthenticated),
        Some(Verdict::Forbidden { .. }) => Some(Granted::Forbidden),
        Some(Verdict::Unavailable(_)) => Some(Granted::Unavailable),
    };
    // A caller the token API does not answer gets what everyone gets: no token.
    if let Some(result) = result {
        count(result);
    }
    Json(Refreshed { name, replaced, expires_at: rfc3339(expires_at) }).into_response()
}

/// `GET /token/<name>`: the token API (see the module doc).
async fn token(State(admin): State<Admin>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(reviews) = admin.token_api.as_deref() else {
        let why = "GET /token/<name> is the token API, which is off: output.kubernetes.token_api: true turns it on";
        return (StatusCode::NOT_FOUND, why).into_response();
    };
    let board = admin.metrics.board();
    let (result, answer) = token_answer(board, reviews, &name, &headers).await;
    board.token_api_request(TokenRoute::Token, result);
    answer
}

async fn token_answer(board: &Board, reviews: &dyn Reviews, name: &str, headers: &HeaderMap) -> (Granted, Response) {
    let Some(bearer) = bearer(headers) else {
        let why = "no bearer token: send Authorization: Bearer <the pod's service account token, /var/run/secrets/kubernetes.io/serviceaccount/token>";
        return (Granted::Unauthenticated, unauthenticated(why));
    };
    let keeper = match worker_of(board, name) {
        Ok(asker) => asker.keeper(),
        Err(elsewhere) => return elsewhere.answer(name),
    };
    let Some(keeper) = keeper else {
        return (Granted::Unavailable, unavailable("this customer's worker is starting: ask again shortly".into()));
    };
    match reviews.review(bearer, keeper.customer()).await {
        Verdict::Allowed { .. } => {}
        Verdict::Unauthenticated => {
            let why = "the bearer token is not a service account token the Kubernetes API accepts (TokenReview)";
            return (Granted::Unauthenticated, unauthenticated(why));
        }
        Verdict::Forbidden { user, secret } => {
            let why = format!(
                "{user} may not get the Secret {secret}, which holds {name}'s token (SubjectAccessReview): grant it get on that Secret (a Role with resourceNames, bound to its service account)"
            );
            return (Granted::Forbidden, (StatusCode::FORBIDDEN, why).into_response());
        }
        Verdict::Unavailable(why) => return (Granted::Unavailable, unavailable(format!("no token answered: {why}"))),
    }
    let now = SystemTime::now();
    match (board.expiry(name).filter(|t| *t > now), keeper.token()) {
        (Some(expires_at), Some(token)) => {
            (Granted::Allowed, handed(&Handed { name, replaced: None, token: &token, expires_at: rfc3339(expires_at) }))
        }
        _ => {
            let why =
                format!("no valid token for {name} now: POST /refresh/{name} logs in and answers once there is one");
            (Granted::Unavailable, unavailable(why))
        }
    }
}

/// Written piece by piece as it is sent (see [`Metrics::text`]): with thousands of customers
/// the whole text would be megabytes held at once.
async fn metrics(State(admin): State<Admin>) -> Response {
    let pieces = admin.metrics.text().map(Ok::<_, std::convert::Infallible>);
    let body = Body::from_stream(futures::stream::iter(pieces));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_to_end(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// At shutdown a request already started is answered, an idle keep-alive connection is
    /// closed, and `serve` returns once both are gone.
    #[tokio::test]
    async fn shutdown_answers_the_request_in_flight_and_closes_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = Admin { metrics: Arc::new(Metrics::new(crate::status::Board::new())), token_api: None };
        let server = tokio::spawn(serve(listener, admin, async move {
            let _ = stopped.await;
        }));

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;

        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
        busy.write_all(b"\r\n").await.unwrap();
        let answer = read_to_end(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"), "{answer:?}");
        let rest = read_to_end(&mut idle).await;
        assert!(!rest.contains("HTTP/1.1"), "{rest:?}");
        tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve returns").unwrap().unwrap();
    }

    #[tokio::test]
    async fn room_is_made_by_closing_the_oldest_connection_answering_no_request() {
        let mut tasks = JoinSet::new();
        let mut served: VecDeque<Served> = [1, 0, 0]
            .into_iter()
            .map(|n| Served {
                task: tasks.spawn(std::future::pending::<()>()),
                answering: Arc::new(AtomicUsize::new(n)),
            })
            .collect();
        let second = served[1].task.id();
        assert!(make_room(&mut served));
        let closed = tasks.join_next_with_id().await.unwrap().unwrap_err();
        assert!(closed.is_cancelled() && closed.id() == second, "the oldest waiting for a head is closed");
        assert_eq!(served.iter().map(|c| c.answering.load(Ordering::Acquire)).collect::<Vec<_>>(), [1, 0]);
        served[1].answering.store(2, Ordering::Release);
        assert!(!make_room(&mut served), "a connection answering a request is never closed for room");
        assert_eq!(served.len(), 2);
    }

    #[test]
    fn requests_that_act_must_name_this_daemon_as_host() {
        let addressed = Addressed { names: vec!["sidecar-7f9c".into(), "web1.corp.example".into()], namespace: None };
        for host in [
            "127.0.0.1:9102",
            "127.0.0.2",
            "[::1]:9102",
            "10.244.1.17:9102",
            "localhost:9102",
            "LOCALHOST.",
            "app.localhost",
            "sidecar-7f9c",
            "web1.corp.example:9102",
            "magento-tokens:9102",
            "magento-tokens.shop.svc",
            "magento-tokens.shop.svc.cluster.local.:9102",
        ] {
            assert!(addressed.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9102",
            "127.0.0.1.nip.io",
            "localhost.evil.example",
            "sidecar-7f9c.evil.example",
            "svc.evil.example",
            "magento-tokens.shop",
            "[evil.example]:9102",
            "",
            ":9102",
        ] {
            assert!(!addressed.allows(host), "{host}");
        }
        // Knowing its namespace, a Service's `<service>.<namespace>` in it passes, no other.
        let in_shop = Addressed { namespace: Some("shop".into()), names: addressed.names.clone() };
        assert!(in_shop.allows("magento-tokens.shop:9102") && in_shop.allows("Magento-Tokens.SHOP."));
        for host in ["magento-tokens.other", ".shop", "a.b.shop", "evil.example"] {
            assert!(!in_shop.allows(host), "{host}");
        }
        let with = |pairs: &[(header::HeaderName, &str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(name.clone(), value.parse().unwrap());
            }
            addressed.refusal(&h)
        };
        assert_eq!(with(&[]), None, "HTTP/1.0: no Host");
        assert_eq!(with(&[(header::HOST, "127.0.0.1:9102")]), None);
        assert!(with(&[(header::HOST, "127.0.0.1:9102"), (header::ORIGIN, "null")]).unwrap().contains("Origin"));
        let two = with(&[(header::HOST, "127.0.0.1"), (header::HOST, "evil.example")]).unwrap();
        assert!(two.contains("Host"), "{two}");
    }

    #[test]
    fn the_connection_cap_leaves_three_quarters_of_the_descriptors() {
        for (open_files, cap) in
            [(None, 64), (Some(1_048_576), 64), (Some(1024), 64), (Some(128), 32), (Some(10), 2), (Some(0), 1)]
        {
            assert_eq!(limit_for(open_files), cap, "{open_files:?}");
        }
    }

    #[test]
    fn bearer_tokens_are_taken_as_rfc_6750_says() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AUTHORIZATION, v.parse().unwrap());
            }
            bearer(&h).map(str::to_owned)
        };
        assert_eq!(with(&["Bearer eyJhbGci.eyJpc3Mi.c2ln-_~+/=="]).as_deref(), Some("eyJhbGci.eyJpc3Mi.c2ln-_~+/=="));
        assert_eq!(with(&["bearer abc"]).as_deref(), Some("abc"), "the scheme in any case");
        assert_eq!(with(&["Bearer  abc "]).as_deref(), Some("abc"));
        for refused in [
            &["Basic YWxpY2U6cHc="][..],
            &["Bearer"],
            &["Bearer "],
            &["Bearer a b"],
            &["Bearer a\"b"],
            &["Bearer a", "Bearer b"],
            &[],
        ] {
            assert_eq!(with(refused), None, "{refused:?}");
        }
        assert_eq!(with(&[&format!("Bearer {}", "a".repeat(MAX_BEARER + 1))]), None);
    }

    /// The gate as the tests want it: a verdict per bearer token, every review counted.
    struct FakeGate {
        verdicts: std::collections::HashMap<&'static str, Verdict>,
        reviews: AtomicUsize,
    }

    impl Reviews for FakeGate {
        fn review<'a>(
            &'a self,
            bearer: &'a str,
            customer: &'a CustomerConfig,
        ) -> futures::future::BoxFuture<'a, Verdict> {
            assert_eq!(customer.name, "alice");
            self.reviews.fetch_add(1, Ordering::SeqCst);
            let verdict = self.verdicts.get(bearer).cloned().unwrap_or(Verdict::Unauthenticated);
            Box::pin(async move { verdict })
        }
    }

    struct FakeKeeper {
        customer: CustomerConfig,
        token: &'static str,
    }

    impl crate::status::Keeper for FakeKeeper {
        fn customer(&self) -> &CustomerConfig {
            &self.customer
        }

        fn token(&self) -> Option<zeroize::Zeroizing<String>> {
            Some(zeroize::Zeroizing::new(self.token.to_owned()))
        }
    }

    const KEPT: &str = "kept-token-q3w8e7r6t5y4u3i2o1p0";

    /// An admin server for `alice`, whose worker keeps [`KEPT`] (expiring in an hour) and answers
    /// every POST /refresh with `replaced: true`; its URL and board.
    async fn holder(token_api: bool) -> (String, Board, Arc<FakeGate>) {
        let board = Board::new();
        let report = crate::status::Reporter::new("alice", board.clone());
        let expires_at = SystemTime::now() + Duration::from_secs(3600);
        report.token_on_disk(expires_at);
        let mailbox = report.listen();
        let customer = crate::config::parse(crate::config::tests::MINIMAL, crate::config::Checks::Static)
            .unwrap()
            .customers
            .remove(0);
        mailbox.keep(Arc::new(FakeKeeper { customer, token: KEPT }));
        tokio::spawn(async move {
            loop {
                mailbox.rung().await;
                for ask in mailbox.take() {
                    let _ = ask.send(Answer::Token { replaced: true, expires_at });
                }
            }
        });
        let verdicts = [
            ("allowed", Verdict::Allowed { user: "system:serviceaccount:web:storefront".into() }),
            (
                "other",
                Verdict::Forbidden {
                    user: "system:serviceaccount:web:other".into(),
                    secret: "shop/magento-tokens".into(),
                },
            ),
            ("down", Verdict::Unavailable("the daemon's service account may not create tokenreviews (403)".into())),
        ];
        let gate = Arc::new(FakeGate { verdicts: verdicts.into_iter().collect(), reviews: AtomicUsize::new(0) });
        if token_api {
            board.token_api_on();
        }
        let admin = Admin {
            metrics: Arc::new(Metrics::new(board.clone())),
            token_api: token_api.then(|| gate.clone() as Arc<dyn Reviews>),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, admin, std::future::pending()));
        (url, board, gate)
    }

    async fn ask(
        method: reqwest::Method,
        url: &str,
        bearer: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut request = reqwest::Client::new().request(method, url);
        if let Some(b) = bearer {
            request = request.bearer_auth(b);
        }
        let answer = request.send().await.unwrap();
        let (status, headers) = (answer.status().as_u16(), answer.headers().clone());
        (status, headers, answer.text().await.unwrap())
    }

    #[tokio::test]
    async fn get_token_answers_only_a_caller_kubernetes_vouches_for() {
        let (url, board, gate) = holder(true).await;
        let alice = format!("{url}/token/alice");
        let token = |bearer| ask(reqwest::Method::GET, &alice, bearer);
        let (status, headers, body) = token(Some("allowed")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers[header::CACHE_CONTROL.as_str()], "no-store");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((json["name"].as_str(), json["token"].as_str()), (Some("alice"), Some(KEPT)));
        assert_eq!(json["expires_at"].as_str().map(str::len), Some(20));
        assert!(json.get("replaced").is_none(), "{json}");
        let (status, headers, body) = token(None).await;
        assert_eq!(status, 401);
        assert_eq!(headers[header::WWW_AUTHENTICATE.as_str()], "Bearer");
        assert!(body.starts_with("no bearer token") && !body.contains(KEPT), "{body}");
        let (status, _, body) = token(Some("unknown")).await;
        assert_eq!(status, 401, "{body}");
        let (status, _, body) = token(Some("other")).await;
        assert_eq!(status, 403);
        assert!(
            body.starts_with(
                "system:serviceaccount:web:other may not get the Secret shop/magento-tokens, which holds alice's token"
            ),
            "{body}"
        );
        let (status, _, body) = token(Some("down")).await;
        assert_eq!(status, 503);
        assert!(body.contains("may not create tokenreviews") && !body.contains(KEPT), "{body}");
        let (status, _, _) = ask(reqwest::Method::GET, &format!("{url}/token/nobody"), Some("allowed")).await;
        assert_eq!(status, 404);
        // An expired token is not handed out.
        crate::status::Reporter::new("alice", board.clone()).token_on_disk(SystemTime::now() - Duration::from_secs(1));
        let (status, _, body) = token(Some("allowed")).await;
        assert_eq!(status, 503);
        assert!(body.starts_with("no valid token for alice now"), "{body}");
        assert_eq!(gate.reviews.load(Ordering::SeqCst), 5, "no review without a bearer token or a customer");
        let counted: Vec<_> = board.token_api_requests().unwrap().into_iter().filter(|(_, n)| *n > 0).collect();
        let want = [
            ((TokenRoute::Token, Granted::Allowed), 1),
            ((TokenRoute::Token, Granted::Unauthenticated), 2),
            ((TokenRoute::Token, Granted::Forbidden), 1),
            ((TokenRoute::Token, Granted::NotFound), 1),
            ((TokenRoute::Token, Granted::Unavailable), 2),
        ];
        assert_eq!(counted, want);
        let (_, _, metrics) = ask(reqwest::Method::GET, &format!("{url}/metrics"), None).await;
        assert!(
            metrics.contains("magento_token_api_requests_total{result=\"allowed\",route=\"token\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("magento_token_api_requests_total{result=\"standby\",route=\"refresh\"} 0"),
            "{metrics}"
        );
        assert!(!metrics.contains(KEPT));
    }

    #[tokio::test]
    async fn post_refresh_carries_the_token_only_to_an_allowed_caller() {
        let (url, board, _) = holder(true).await;
        let alice = format!("{url}/refresh/alice");
        let refresh = |bearer| ask(reqwest::Method::POST, &alice, bearer);
        let (status, headers, body) = refresh(Some("allowed")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers[header::CACHE_CONTROL.as_str()], "no-store");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((json["token"].as_str(), json["replaced"].as_bool()), (Some(KEPT), Some(true)));
        // Anyone else gets the answer as before, without the token.
        for bearer in [None, Some("unknown"), Some("other"), Some("down")] {
            let (status, _, body) = refresh(bearer).await;
            assert_eq!(status, 200, "{bearer:?}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["replaced"], true, "{bearer:?}");
            assert!(json.get("token").is_none() && !body.contains(KEPT), "{bearer:?}: {body}");
        }
        // Counted only for callers that sent a bearer token.
        let counted: Vec<_> = board.token_api_requests().unwrap().into_iter().filter(|(_, n)| *n > 0).collect();
        let want = [
            ((TokenRoute::Refresh, Granted::Allowed), 1),
            ((TokenRoute::Refresh, Granted::Unauthenticated), 1),
            ((TokenRoute::Refresh, Granted::Forbidden), 1),
            ((TokenRoute::Refresh, Granted::Unavailable), 1),
        ];
        assert_eq!(counted, want);
        // With the token API off: no token, no count, and GET /token is not there.
        let (url, board, gate) = holder(false).await;
        let (status, _, body) = ask(reqwest::Method::POST, &format!("{url}/refresh/alice"), Some("allowed")).await;
        assert!(status == 200 && !body.contains(KEPT), "{body}");
        let (status, _, body) = ask(reqwest::Method::GET, &format!("{url}/token/alice"), Some("allowed")).await;
        assert_eq!(status, 404);
        assert!(body.contains("output.kubernetes.token_api: true"), "{body}");
        assert_eq!(gate.reviews.load(Ordering::SeqCst), 0);
        assert_eq!(board.token_api_requests(), None);
    }

    #[tokio::test]
    async fn a_standby_names_the_holder_and_closes_the_connection() {
        let (url, board, gate) = holder(true).await;
        board.close_askers();
        board.set_leadership(crate::status::Leadership {
            identity: "r1".into(),
            lease: "shop/magento-tokens".into(),
            secret: "shop/magento-tokens".into(),
            holder: Some("r2".into()),
            leading: false,
        });
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let route = if method == reqwest::Method::GET { "token" } else { "refresh" };
            let (status, headers, body) = ask(method, &format!("{url}/{route}/alice"), Some("allowed")).await;
            assert_eq!(status, 503, "{route}");
            assert!(body.contains("this replica (r1) stands by") && body.contains("r2"), "{route}: {body}");
            assert_eq!(headers[header::CONNECTION.as_str()], "close", "{route}");
        }
        // Closed indeed, though HTTP/1.1 keeps connections alive.
        let mut stream = TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
        let started = Instant::now();
        stream
            .write_all(b"GET /token/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer allowed\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_end(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5), "the connection was kept open");
        assert_eq!(gate.reviews.load(Ordering::SeqCst), 0, "a standby reviews no one");
        let standby = |route| {
            board.token_api_requests().unwrap().into_iter().find(|(k, _)| *k == (route, Granted::Standby)).unwrap().1
        };
        assert_eq!((standby(TokenRoute::Token), standby(TokenRoute::Refresh)), (2, 1));
    }
}
