//! `output.kubernetes`: one token writer for a whole Deployment, coordinated by Kubernetes
//! itself.
//!
//! ```text
//!   every replica ─► lease::Elector ── holds the Lease? ── yes ─► workers (as with files) ─► tokens::Tokens
//!                        │ no                                                                 │ one update for
//!                        ▼                                                                    ▼ writes close together
//!                  standby: reads the Secret for /readyz and /status          Secret (tokens, expiries, 401 ledger)
//! ```
//!
//! Only the holder of a `coordination.k8s.io/v1` Lease logs in and writes; it stops writing
//! before its Lease can be taken ([`crate::config::kubernetes::KubeSettings::renew_deadline`]),
//! and every write is conditional on the Secret's resourceVersion, so there are never two
//! writers. The ledger of 401s lives in the Secret beside the tokens, so the lockout budget
//! survives failovers. The API calls are exactly get, create, update and patch on one Secret
//! and one Lease, each answer read only up to a limit and never logged ([`api`]); with the token
//! API on, also the create of TokenReviews and SubjectAccessReviews ([`gate`]).

pub mod api;
pub mod gate;
pub mod lease;
pub mod tokens;

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;

use self::api::{Objects, Refusal, LEASE_LIMIT, SECRET_LIMIT};
use crate::config::kubernetes::KubeSettings;
use crate::status::{ApiResult, Board, Leadership};

/// The longest one API request may take: a request that hangs is given up, and the next
/// renewal or write tries again.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The API, as this replica reaches it: the Secret's and the Lease's endpoints in one
/// namespace, and where every request is counted.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) secrets: Objects<Secret>,
    pub(crate) leases: Objects<Lease>,
    pub settings: KubeSettings,
    pub namespace: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    board: Board,
}

/// Why an API request failed, as far as the daemon acts on it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the {0} changed since it was read (409 Conflict)")]
    Conflict(&'static str),
    #[error("the {0} already exists (409 AlreadyExists)")]
    AlreadyExists(&'static str),
    #[error("the {0} does not exist (404)")]
    NotFound(&'static str),
    #[error("the service account may not do this ({code}): {message}; the Role needs get, create, update and patch on the Secret and the Lease")]
    Forbidden { code: u16, message: String },
    #[error("the API server did not answer in time ({0:?})")]
    TimedOut(Duration),
    #[error("{0}")]
    Other(String),
}

impl Cluster {
    /// Finds the API as every Kubernetes client does (`KUBECONFIG`, `~/.kube/config`, the
    /// in-cluster service account). Sends nothing.
    /// `role`: `None` for `run` (the identity is the replica's), else a word that tells a
    /// one-off process (`once`) from the replica of the same pod it may be run in.
    pub async fn connect(settings: &KubeSettings, board: Board, role: Option<&str>) -> Result<Cluster, String> {
        let mut config = kube::Config::infer().await.map_err(|e| {
            format!("cannot find the Kubernetes API (KUBECONFIG, ~/.kube/config, the in-cluster service account): {e}")
        })?;
        // No retries below this client: a renewal or a write that would land seconds late is
        // given up instead (the deadlines are the daemon's own).
        config.default_retry = false;
        config.read_timeout = Some(REQUEST_TIMEOUT);
        let namespace = settings.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| format!("cannot set up the Kubernetes client: {e}"))?;
        let cluster = Cluster {
            secrets: Objects::namespaced(client.clone(), &namespace, SECRET_LIMIT),
            leases: Objects::namespaced(client, &namespace, LEASE_LIMIT),
            settings: settings.clone(),
            namespace,
            identity: match role {
                None => identity(),
                Some(role) => format!("{}_{role}_{}", identity(), std::process::id()),
            },
            board,
        };
        cluster.board.set_leadership(Leadership {
            identity: cluster.identity.clone(),
            lease: format!("{}/{}", cluster.namespace, settings.lease),
            secret: format!("{}/{}", cluster.namespace, settings.secret),
            holder: None,
            leading: false,
        });
        Ok(cluster)
    }

    /// One request, bounded by `within` and counted by outcome.
    pub(crate) async fn call<T>(
        &self,
        object: &'static str,
        verb: &'static str,
        within: Duration,
        request: impl Future<Output = Result<T, Refusal>>,
    ) -> Result<T, ApiError> {
        let within = within.min(REQUEST_TIMEOUT);
        let (result, error) = match tokio::time::timeout(within, request).await {
            Ok(Ok(value)) => (ApiResult::Success, Ok(value)),
            Ok(Err(e)) => classify(object, e),
            Err(_) => (ApiResult::Unavailable, Err(ApiError::TimedOut(within))),
        };
        self.board.api_request((object, verb, result));
        error
    }

    /// Records who holds the Lease, for `/status` and `magento_token_leader`.
    pub(crate) fn seen_holder(&self, holder: Option<String>, leading: bool) {
        if let Some(mut l) = self.board.leadership() {
            l.holder = holder;
            l.leading = leading;
            self.board.set_leadership(l);
        }
    }
}

fn classify<T>(object: &'static str, refusal: Refusal) -> (ApiResult, Result<T, ApiError>) {
    let other = |result, text: String| (result, Err(ApiError::Other(text)));
    let busy = |code: u16| matches!(code, 429 | 500 | 502 | 503 | 504);
    match refusal {
        Refusal::Status { code, reason, message } => match (code, reason.as_str()) {
            (409, "AlreadyExists") => (ApiResult::AlreadyExists, Err(ApiError::AlreadyExists(object))),
            (409, _) => (ApiResult::Conflict, Err(ApiError::Conflict(object))),
            (404, _) => (ApiResult::NotFound, Err(ApiError::NotFound(object))),
            (code @ (401 | 403), _) => (ApiResult::Forbidden, Err(ApiError::Forbidden { code, message })),
            (code, _) if busy(code) => {
                other(ApiResult::Unavailable, format!("the API server answered {code}: {message}"))
            }
            (code, _) => other(ApiResult::Error, format!("the API server answered {code}: {message}")),
        },
        Refusal::NoStatus { code, bytes } => other(
            if busy(code) { ApiResult::Unavailable } else { ApiResult::Error },
            format!("the API server answered {code} with {bytes} bytes that are not a Status (not shown)"),
        ),
        Refusal::TooLarge { limit, declared } => other(
            ApiResult::Error,
            format!(
                "the API server's answer about the {object} is larger than {}{}: not read (a {object} is far smaller)",
                api::size(limit as u64),
                declared.map(|d| format!(", {} declared", api::size(d))).unwrap_or_default()
            ),
        ),
        Refusal::Malformed(m) => {
            other(ApiResult::Error, format!("the API server's answer is not a {object} ({m}; not shown)"))
        }
        Refusal::Unreachable(e) => other(ApiResult::Unavailable, format!("cannot reach the API server: {e}")),
    }
}

/// This replica's identity in the Lease: `POD_NAME` (the downward API), else the host name and
/// the process id, so that two processes on one host are two replicas.
pub fn identity() -> String {
    match std::env::var("POD_NAME") {
        Ok(name) if !name.trim().is_empty() => name.trim().to_owned(),
        _ => {
            let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
            format!("{host}_{}", std::process::id())
        }
    }
}
