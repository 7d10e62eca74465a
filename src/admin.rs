//! The admin HTTP server on `admin.listen`.
//!
//! | route          | answer                                                                       |
//! |----------------|------------------------------------------------------------------------------|
//! | `GET /healthz` | 200 `ok` while the daemon's loop runs (kubelet's liveness probe)             |
//! | `GET /readyz`  | 200 `ready` when every customer has an unexpired token on disk; else 503 and the names that have none (startup and readiness probes) |
//! | `GET /status`  | 200 JSON for people: per customer its state, expiry, last success, next refresh, failures in a row and last error; never a token or a password |
//! | `GET /metrics` | Prometheus text format                                                       |
//! | `POST /refresh/<name>` | for an app that got a 401: the customer's worker checks the token on disk now and, if Magento refuses it, logs in (under the lockout policy) and writes a new one, then answers 200 `{"name","replaced","expires_at"}`; 404 for an unknown name; 503 with the reason when no valid token can be had now. One check per customer per 10 s, shared by the asks that come meanwhile |
//!
//! The port may face anyone who can reach it, so a connection costs little and never lasts:
//!
//! | limit | value | what it stops |
//! |-------|-------|---------------|
//! | [`HEADER_READ_TIMEOUT`] | 5 s | a request's head (line and headers) must arrive whole within 5 s of the wait for it starting: on a new connection and between keep-alive requests alike (hyper's header-read timer), so idle and half-sent connections are closed |
//! | [`STALL_TIMEOUT`] | 10 s | a connection on which no byte moved either way for 10 s is dropped: a client that never reads its answers, or trickles a body |
//! | [`MAX_CONNECTIONS`] | 64, at most a quarter of the open-file limit | connections beyond it are accepted and closed at once |
//! | [`MAX_BUF_SIZE`] | 16 KiB | the read buffer of one connection |
//!
//! Closing surplus connections at once, rather than leaving them queued in the kernel until a
//! slot frees, is what keeps `/healthz` answering: queued idle connections would each be taken
//! in turn and hold a slot for the header timeout, so a probe behind hundreds of them would
//! wait many timeouts; closed at once, a probe waits at most one. The cap also leaves the
//! process's descriptors to the logins (see [`connection_limit`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::Path;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::sink::rfc3339;
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
    let mut refused = Refused::default();
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
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                connections.spawn(connection(stream, router.clone(), stop.clone(), slot));
            }
            Err(_) => {
                drop(stream);
                refused.count();
            }
        }
    }
    drop(listener);
    stop.cancel();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection, until the client closes it, a limit of the module doc ends it, or `stop`
/// (then a request in flight is answered first).
async fn connection(stream: TcpStream, router: Router, stop: CancellationToken, _slot: OwnedSemaphorePermit) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched::new(stream));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(io, TowerToHyperService::new(router));
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

/// Connections closed because every slot was taken: a WARN line at most once a minute.
#[derive(Default)]
struct Refused {
    since_warned: u64,
    warned_at: Option<Instant>,
}

impl Refused {
    fn count(&mut self) {
        self.since_warned += 1;
        if self.warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warn!(
                refused = self.since_warned,
                limit = connection_limit(),
                "admin server: connections closed at once, every slot is taken (idle ones are closed after {}s)",
                HEADER_READ_TIMEOUT.as_secs()
            );
            self.since_warned = 0;
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
    customers: Vec<CustomerStatus>,
}

async fn status(State(admin): State<Admin>) -> Json<StatusBody> {
    Json(StatusBody {
        version: env!("CARGO_PKG_VERSION"),
        leader: admin.metrics.board().leadership(),
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

    #[test]
    fn the_connection_cap_leaves_three_quarters_of_the_descriptors() {
        for (open_files, cap) in
            [(None, 64), (Some(1_048_576), 64), (Some(1024), 64), (Some(128), 32), (Some(10), 2), (Some(0), 1)]
        {
            assert_eq!(limit_for(open_files), cap, "{open_files:?}");
        }
    }
}
