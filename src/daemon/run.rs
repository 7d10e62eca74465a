//! `run` with token files: the supervisor under the output directory's lock, reloaded on SIGHUP.

use std::path::Path;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tracing::info;

use super::{check_reload, reloaded, StartError, Supervisor};
use crate::config::{self, Checks, Config};
use crate::dirlock::DirLock;
use crate::logging::Logging;
use crate::metrics::Metrics;
use crate::signals::Signal;
use crate::store::Store;

/// The daemon: runs the workers until a shutdown signal, reloading on SIGHUP. `lock` is the
/// lock on `config.output.dir` (the directory of `store`), taken before anything touched it; a
/// reload that moves the output directory takes the new one's lock first, and lets the old one
/// go once it switched.
pub async fn run(
    config_path: &Path,
    mut config: Config,
    store: Store,
    mut lock: DirLock,
    metrics: Arc<Metrics>,
    logging: &Logging,
    mut signals: impl Stream<Item = Signal> + Unpin,
) -> Result<(), StartError> {
    info!(customers = config.customers.len(), version = env!("CARGO_PKG_VERSION"), "starting");
    let mut supervisor = Supervisor::start(config.clone(), metrics.board().clone(), store, Arc::default()).await?;
    while let Some(signal) = signals.next().await {
        match signal {
            Signal::Shutdown(name) => {
                info!(signal = name, "stopping: letting logins and writes in flight finish");
                break;
            }
            Signal::Reload => {
                let result = reload(config_path, &mut config, &mut supervisor, &mut lock).await;
                reloaded(result, logging, &metrics)
            }
        }
    }
    supervisor.stop().await;
    info!("stopped");
    Ok(())
}

async fn reload(
    path: &Path,
    config: &mut Config,
    supervisor: &mut Supervisor,
    lock: &mut DirLock,
) -> Result<String, String> {
    let new = config::load(path, Checks::Environment).map_err(|e| e.to_string())?;
    check_reload(config, &new)?;
    // A new output directory is locked before any worker touches it; one held by another
    // daemon refuses the reload.
    let new_lock = match new.output.dir() {
        Some(dir) if !lock.covers(&dir.dir) => Some(DirLock::acquire(&dir.dir).map_err(|e| e.to_string())?),
        _ => None,
    };
    supervisor.apply(new.clone()).await.map_err(|e| e.to_string())?;
    if let Some(new_lock) = new_lock {
        // The workers of the old directory are stopped: it is let go.
        *lock = new_lock;
    }
    *config = new;
    info!(customers = supervisor.workers.len(), "configuration reloaded");
    Ok(config.log.level.clone())
}
