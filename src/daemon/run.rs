//! `run` with token files: the supervisor under the output directory's lock, reloaded on SIGHUP.

use std::path::Path;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tracing::info;

use super::{reloaded, same_output, Supervisor};
use crate::config::{self, Checks, Config};
use crate::logging::Logging;
use crate::magento::ClientError;
use crate::metrics::Metrics;
use crate::signals::Signal;
use crate::sink;

/// The daemon: runs the workers until a shutdown signal, reloading on SIGHUP. `lock` is the
/// lock on `config.output.dir`, taken before anything touched it; a reload that moves the
/// output directory takes the new one's lock first, and lets the old one go once it switched.
pub async fn run(
    config_path: &Path,
    config: Config,
    mut lock: sink::DirLock,
    metrics: Arc<Metrics>,
    logging: &Logging,
    mut signals: impl Stream<Item = Signal> + Unpin,
) -> Result<(), ClientError> {
    info!(customers = config.customers.len(), version = env!("CARGO_PKG_VERSION"), "starting");
    let mut supervisor = Supervisor::start(config, metrics.board().clone()).await?;
    while let Some(signal) = signals.next().await {
        match signal {
            Signal::Shutdown(name) => {
                info!(signal = name, "stopping: letting logins and writes in flight finish");
                break;
            }
            Signal::Reload => reloaded(reload(config_path, &mut supervisor, &mut lock).await, logging, &metrics),
        }
    }
    supervisor.stop().await;
    info!("stopped");
    Ok(())
}

async fn reload(path: &Path, supervisor: &mut Supervisor, lock: &mut sink::DirLock) -> Result<String, String> {
    let new = config::load(path, Checks::Environment).map_err(|e| e.to_string())?;
    same_output(None, new.output.kubernetes.as_ref())?;
    if new.admin_listen != supervisor.admin_listen || new.log.format != supervisor.log_format {
        info!("admin.listen and log.format take effect at the next start");
    }
    // A new output directory is locked before any worker touches it; one held by another
    // daemon refuses the reload.
    let new_lock = match lock.covers(&new.output.dir) {
        true => None,
        false => Some(sink::DirLock::acquire(&new.output.dir).map_err(|e| e.to_string())?),
    };
    let level = new.log.level.clone();
    supervisor.apply(new).await.map_err(|e| e.to_string())?;
    if let Some(new_lock) = new_lock {
        // The workers of the old directory are stopped: it is let go.
        *lock = new_lock;
    }
    info!(customers = supervisor.workers.len(), "configuration reloaded");
    Ok(level)
}
