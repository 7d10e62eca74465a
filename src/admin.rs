//! The admin HTTP server on `admin.listen`.
//!
//! | route          | answer                                                                       |
//! |----------------|------------------------------------------------------------------------------|
//! | `GET /healthz` | 200 `ok` while the daemon's loop runs (kubelet's liveness probe)             |
//! | `GET /readyz`  | 200 `ready` when every customer has an unexpired token on disk; else 503 and the names that have none (startup and readiness probes) |
//! | `GET /status`  | 200 JSON for people: per customer its state, expiry, last success, next refresh, failures in a row and last error; never a token or a password |
//! | `GET /metrics` | Prometheus text format                                                       |
//! | `POST /refresh/<name>` | for an app that got a 401: the customer's worker checks the token on disk now and, if Magento refuses it, logs in (under the lockout policy) and writes a new one, then answers 200 `{"name","replaced","expires_at"}`; 404 for an unknown name; 503 with the reason when no valid token can be had now; 403 with the reason for what a web page sends (an `Origin`, a `Host` that is not this daemon's: see below). One check per customer per 10 s, shared by the asks that come meanwhile |
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
use crate::metrics::Metrics;
use crate::status::{Answer, CustomerStatus};

#[derive(Clone)]
pub struct Admin {
    /// The metrics and, through them, the status board (one per process).
    pub metrics: Arc<Metrics>,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/refresh/{name}", post(refresh))
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

async fn refresh(State(admin): State<Admin>, Path(name): Path<String>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    let board = admin.metrics.board();
    let Some(asker) = board.asker(&name) else {
        // A standby (output.kubernetes) knows the customer but does not log in.
        if let Some(l) = board.leadership().filter(|l| !l.leading && board.names().contains(&name)) {
            let why = match l.holder.as_deref() {
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
            };
            return unavailable(why);
        }
        return (StatusCode::NOT_FOUND, format!("no customer named {name:?}")).into_response();
    };
    let (ask, answer) = tokio::sync::oneshot::channel();
    asker.post(ask);
    match tokio::time::timeout(ANSWER_WITHIN, answer).await {
        Ok(Ok(Answer::Token { replaced, expires_at })) => {
            Json(Refreshed { name, replaced, expires_at: rfc3339(expires_at) }).into_response()
        }
        Ok(Ok(Answer::Unavailable(why))) => unavailable(why),
        Ok(Err(_)) => unavailable("the customer's worker stopped: ask again".into()),
        Err(_) => unavailable("still checking the token with Magento: ask again in a few seconds".into()),
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
        let admin = Admin { metrics: Arc::new(Metrics::new(crate::status::Board::new())) };
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
}
