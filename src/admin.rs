//! The admin HTTP server on `admin.listen`.
//!
//! | route          | answer                                                                       |
//! |----------------|------------------------------------------------------------------------------|
//! | `GET /healthz` | 200 `ok` while the daemon's loop runs (kubelet's liveness probe)             |
//! | `GET /readyz`  | 200 `ready` when every customer has an unexpired token on disk; else 503 and the names that have none (startup and readiness probes) |
//! | `GET /status`  | 200 JSON for people: per customer its state, expiry, last success, next refresh, failures in a row and last error; never a token or a password |
//! | `GET /metrics` | Prometheus text format                                                       |

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::status::CustomerStatus;

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
        .with_state(admin)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin)).with_graceful_shutdown(shutdown).await
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
    customers: Vec<CustomerStatus>,
}

async fn status(State(admin): State<Admin>) -> Json<StatusBody> {
    Json(StatusBody {
        version: env!("CARGO_PKG_VERSION"),
        customers: admin.metrics.board().snapshot(SystemTime::now()),
    })
}

/// Written piece by piece as it is sent (see [`Metrics::text`]): with thousands of customers
/// the whole text would be megabytes held at once.
async fn metrics(State(admin): State<Admin>) -> Response {
    let pieces = admin.metrics.text().map(Ok::<_, std::convert::Infallible>);
    let body = Body::from_stream(futures::stream::iter(pieces));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
