//! `run` and `once` with `output.kubernetes`: a replica stands by until it holds the Lease, then
//! runs the supervisor writing the Secret; `once` takes the Lease for one pass.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::once::{once, OnceResult};
use super::{check_reload, reloaded, StartError, Supervisor};
use crate::account::Accounts;
use crate::cluster::{gate::Gate, lease, tokens::Tokens, Cluster};
use crate::config::kubernetes::KubeSettings;
use crate::config::{self, Checks, Config, Output};
use crate::logging::Logging;
use crate::metrics::Metrics;
use crate::signals::Signal;
use crate::status::{Board, Reporter};
use crate::store::Store;

/// `run` with `output.kubernetes`: one replica of a Deployment. It stands by, reading the
/// Secret for `/readyz` and `/status`, until it holds the Lease; then it runs the workers as
/// with files, writing the Secret, until it stops or no longer holds the Lease. `token_api`: the
/// gate of the admin server's token API, given the API once it is found.
pub async fn run_central(
    config_path: &Path,
    mut config: Config,
    metrics: Arc<Metrics>,
    logging: &Logging,
    mut signals: impl Stream<Item = Signal> + Unpin,
    token_api: Option<Arc<Gate>>,
) -> Result<(), StartError> {
    let k = kube_settings(&config)?;
    let board = metrics.board().clone();
    let cluster = Cluster::connect(&k, board.clone(), None).await.map_err(StartError::Cluster)?;
    if let Some(gate) = &token_api {
        gate.connect(cluster.clone());
    }
    info!(
        customers = config.customers.len(),
        version = env!("CARGO_PKG_VERSION"),
        identity = %cluster.identity,
        secret = %format!("{}/{}", cluster.namespace, k.secret),
        lease = %format!("{}/{}", cluster.namespace, k.lease),
        "starting: the replica that holds the Lease writes the Secret"
    );
    let stop = CancellationToken::new();
    let (mut term, elector) = lease::spawn(cluster.clone(), stop.clone());
    let tokens = Tokens::start(cluster.clone(), term.clone(), stop.clone());
    // Every Secret the customers name is read, by a standby too (its readiness).
    tokens.know(&config.customers);
    let mut supervisor: Option<Supervisor> = None;
    let accounts = Arc::new(Accounts::new());
    // When the Secret is next read: by a standby for readiness, by the holder to see an
    // operator's forget-failures while a ledger is recorded.
    let mut next_read = tokio::time::Instant::now();
    stand_by(&config, &board, &tokens);
    loop {
        let leading = term.borrow().leading();
        if leading && supervisor.is_none() {
            // What the former holder wrote is read first: its tokens are adopted, its ledger
            // of 401s kept.
            match tokens.load().await {
                Ok(()) => {
                    let store = Store::Kubernetes(tokens.clone());
                    match Supervisor::start(config.clone(), board.clone(), store, accounts.clone()).await {
                        Ok(started) => supervisor = Some(started),
                        Err(e) => {
                            // Given up at once, not a lease later.
                            stop.cancel();
                            let _ = elector.await;
                            return Err(e.into());
                        }
                    }
                    next_read = tokio::time::Instant::now() + k.lease_duration * 2;
                }
                Err(e) => warn!(error = %e, "holding the Lease, but cannot read the Secret: trying again"),
            }
        } else if !leading {
            if let Some(running) = supervisor.take() {
                running.stop().await;
                stand_by(&config, &board, &tokens);
            }
        }
        let mut wake = next_read;
        if let Some(until) = term.borrow().leading_until {
            wake = wake.min(until);
        }
        if leading && supervisor.is_none() {
            wake = wake.min(tokio::time::Instant::now() + k.retry_period());
        }
        tokio::select! {
            signal = signals.next() => match signal {
                None | Some(Signal::Shutdown(_)) => {
                    info!("stopping: letting logins and writes in flight finish");
                    break;
                }
                Some(Signal::Reload) => {
                    let result = reload_central(config_path, &mut config, supervisor.as_mut(), &tokens).await;
                    if result.is_ok() && supervisor.is_none() {
                        stand_by(&config, &board, &tokens);
                    }
                    reloaded(result, logging, &metrics);
                }
            },
            changed = term.changed() => {
                if changed.is_err() {
                    error!("the election stopped: stopping, so the pod restarts and another replica takes over");
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= next_read {
                    match supervisor {
                        None => {
                            next_read = tokio::time::Instant::now() + k.lease_duration;
                            match tokens.load().await {
                                Ok(()) => stand_by(&config, &board, &tokens),
                                Err(e) => warn!(error = %e, "cannot read the Secret: /readyz and /status show what was read last"),
                            }
                        }
                        Some(_) => {
                            next_read = tokio::time::Instant::now() + k.lease_duration * 2;
                            if tokens.has_ledgers() {
                                if let Err(e) = tokens.load().await {
                                    warn!(error = %e, "cannot read the Secret");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(running) = supervisor.take() {
        running.stop().await;
    }
    stop.cancel();
    let _ = elector.await;
    info!("stopped");
    Ok(())
}

/// A reload with `output.kubernetes`: the holder's workers take the new configuration as with
/// files; a standby keeps it for when it holds the Lease. `output.kubernetes` itself takes effect
/// at the next start.
async fn reload_central(
    path: &Path,
    config: &mut Config,
    supervisor: Option<&mut Supervisor>,
    tokens: &Arc<Tokens>,
) -> Result<String, String> {
    let new = config::load(path, Checks::Environment).map_err(|e| e.to_string())?;
    check_reload(config, &new)?;
    // A Secret new to the configuration is read before its customers' workers start (their
    // tokens there are adopted; the holder writes it from then on).
    tokens.know(&new.customers);
    if supervisor.is_some() {
        tokens.load().await.map_err(|e| format!("cannot read the Secrets: {e}"))?;
    }
    if let Some(running) = supervisor {
        running.apply(new.clone()).await.map_err(|e| e.to_string())?;
    }
    *config = new;
    info!(customers = config.customers.len(), "configuration reloaded");
    Ok(config.log.level.clone())
}

/// A standby's board: every configured customer with the expiry of its token in the Secret, so
/// `/readyz` is 200 on every replica when the Secret holds an unexpired token for each. Only a
/// token in the Secret's data counts, not the times annotation alone; one gone is gone here too.
fn stand_by(config: &Config, board: &Board, tokens: &Arc<Tokens>) {
    // No worker here answers POST /refresh: the admin server says who does.
    board.close_askers();
    tokens.know(&config.customers);
    let expiries = tokens.expiries(config.refresh.default_lifetime);
    let wanted: std::collections::HashSet<&str> = config.customers.iter().map(|c| c.name.as_str()).collect();
    for name in board.names() {
        if !wanted.contains(name.as_str()) {
            board.remove(&name);
        }
    }
    for customer in &config.customers {
        let report = Reporter::new(&customer.name, board.clone());
        match expiries.get(&(tokens.secret_of(customer).to_owned(), customer.file.clone())) {
            Some(expires_at) => report.token_on_disk(*expires_at),
            None => report.no_token_on_disk(),
        }
        report.planned(crate::status::State::Standby, None);
    }
}

/// `once` with `output.kubernetes`: takes the Lease (waiting for it until `timeout`), writes
/// the Secret once under it, and gives it up.
pub async fn once_central(config: &Config, timeout: Duration, board: Board) -> Result<Vec<OnceResult>, StartError> {
    let k = kube_settings(config)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let cluster = Cluster::connect(&k, board, Some("once")).await.map_err(StartError::Cluster)?;
    let stop = CancellationToken::new();
    let (mut term, elector) = lease::spawn(cluster.clone(), stop.clone());
    let tokens = Tokens::start(cluster.clone(), term.clone(), stop.clone());
    tokens.know(&config.customers);
    let finish = |stop: CancellationToken, elector: JoinHandle<()>| async move {
        stop.cancel();
        let _ = elector.await;
    };
    while !term.borrow().leading() {
        if !matches!(tokio::time::timeout_at(deadline, term.changed()).await, Ok(Ok(()))) {
            let holder = term.borrow().holder.clone();
            finish(stop, elector).await;
            return Err(StartError::Cluster(match holder {
                Some(holder) => format!(
                    "the Lease {}/{} is held by {holder}: it writes the Secret; not logging in",
                    cluster.namespace, k.lease
                ),
                None => {
                    format!("could not take the Lease {}/{} before the end of --timeout", cluster.namespace, k.lease)
                }
            }));
        }
    }
    if let Err(e) = tokens.load().await {
        finish(stop, elector).await;
        return Err(StartError::Cluster(format!("cannot read the Secret {}/{}: {e}", cluster.namespace, k.secret)));
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // Every login reads its password: the wait for the Lease may have outlasted the check's.
    let results = once(config, Vec::new(), left, &Store::Kubernetes(tokens)).await.map_err(StartError::from);
    finish(stop, elector).await;
    results
}

/// `output.kubernetes` of a configuration the caller found to have it.
fn kube_settings(config: &Config) -> Result<KubeSettings, StartError> {
    match &config.output {
        Output::Kubernetes(k) => Ok(k.clone()),
        Output::Files(_) => Err(StartError::Cluster("output.kubernetes is not set".into())),
    }
}
