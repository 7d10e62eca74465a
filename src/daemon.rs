//! The supervisor: one worker task per customer, reloads that touch only what changed, and a
//! graceful stop. Also `once`, the single pass used by init containers and CronJobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Checks, Config, CustomerConfig, PasswordError};
use crate::logging::Logging;
use crate::magento::{Client, ClientError, LoginError};
use crate::metrics::{Metrics, Outcome};
use crate::schedule::{self, AuthState};
use crate::secret::Secret;
use crate::signals::Signal;
use crate::sink;
use crate::status::Reporter;
use crate::token;
use crate::worker::{Shared, Worker};

/// How long a stop waits for logins and writes in flight.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

struct Running {
    /// Shared with the worker: one copy of each customer's settings.
    customer: Arc<CustomerConfig>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The running set of workers and what they share.
pub struct Supervisor {
    /// The configuration in effect, its `customers` moved out to the workers (see `start`).
    config: Config,
    shared: Shared,
    metrics: Arc<Metrics>,
    workers: BTreeMap<String, Running>,
}

impl Supervisor {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Result<Supervisor, ClientError> {
        let shared = shared_for(&config, None)?;
        Ok(Supervisor { config, shared, metrics, workers: BTreeMap::new() })
    }

    /// Starts a worker for every configured customer. From here on each customer's settings
    /// are kept by its worker and its [`Running`] entry only, not in `config` too.
    pub fn start(&mut self) {
        for customer in std::mem::take(&mut self.config.customers) {
            self.spawn(customer, true);
        }
    }

    fn spawn(&mut self, customer: CustomerConfig, adopt: bool) {
        let customer = Arc::new(customer);
        let stop = CancellationToken::new();
        let report = Reporter::new(&customer.name, self.metrics.clone());
        let worker = Worker::new(customer.clone(), self.shared.clone(), report, stop.clone());
        let task = tokio::spawn(worker.run(adopt));
        self.workers.insert(customer.name.clone(), Running { customer, stop, task });
    }

    /// Applies a new configuration: customers added start at once, removed ones stop (their
    /// files stay), changed ones restart, the others go on undisturbed.
    pub async fn apply(&mut self, mut new: Config) -> Result<(), ClientError> {
        let shared = shared_for(&new, Some((&self.config, &self.shared)))?;
        let everyone = !shared.same_as(&self.shared);
        let wanted: BTreeMap<String, CustomerConfig> =
            std::mem::take(&mut new.customers).into_iter().map(|c| (c.name.clone(), c)).collect();

        // Stop the removed and the changed first, all together, so no two workers ever write
        // one file.
        let mut stopping = Vec::new();
        let mut restart = Vec::new();
        for (name, running) in &self.workers {
            match wanted.get(name) {
                None => stopping.push(name.clone()),
                Some(c) if everyone || *c != *running.customer => {
                    stopping.push(name.clone());
                    restart.push((c.clone(), c.same_login(&running.customer)));
                }
                Some(_) => {}
            }
        }
        let stopped: Vec<Running> = stopping.iter().filter_map(|n| self.workers.remove(n)).collect();
        join_all(stopped).await;
        for name in &stopping {
            if !wanted.contains_key(name) {
                self.metrics.remove_customer(name);
                info!(customer = %name, "customer removed; its token file stays");
            }
        }
        self.shared = shared;
        self.config = new;
        for (customer, same_login) in restart {
            info!(customer = %customer.name, "customer changed: restarting it");
            self.spawn(customer, same_login);
        }
        for (name, customer) in wanted {
            if !self.workers.contains_key(&name) {
                info!(customer = %name, "customer added");
                self.spawn(customer, true);
            }
        }
        Ok(())
    }

    /// Stops every worker: waits end at once, logins and writes in flight get [`STOP_GRACE`].
    pub async fn stop(self) {
        join_all(self.workers.into_values().collect()).await;
    }
}

async fn join_all(workers: Vec<Running>) {
    for w in &workers {
        w.stop.cancel();
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for mut w in workers {
        if tokio::time::timeout_at(deadline, &mut w.task).await.is_err() {
            warn!(customer = %w.customer.name, "still busy after the grace period: abandoning it");
            w.task.abort();
        }
    }
}

/// What the workers share, reusing the old client and login slots when their settings did
/// not change (the connection pool survives a reload).
fn shared_for(config: &Config, old: Option<(&Config, &Shared)>) -> Result<Shared, ClientError> {
    let client = match old {
        Some((c, s)) if c.magento == config.magento => s.client.clone(),
        _ => Client::new(&config.magento)?,
    };
    let logins = match old {
        Some((c, s)) if c.refresh.max_concurrent_logins == config.refresh.max_concurrent_logins => s.logins.clone(),
        _ => Arc::new(Semaphore::new(config.refresh.max_concurrent_logins)),
    };
    Ok(Shared {
        client,
        refresh: Arc::new(config.refresh.clone()),
        format: config.output.format,
        mode: config.output.mode,
        logins,
    })
}

impl Shared {
    fn same_as(&self, other: &Shared) -> bool {
        self.client.same_as(&other.client)
            && self.refresh == other.refresh
            && self.format == other.format
            && self.mode == other.mode
            && Arc::ptr_eq(&self.logins, &other.logins)
    }
}

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
    let mut supervisor = Supervisor::new(config, metrics.clone())?;
    supervisor.start();
    while let Some(signal) = signals.next().await {
        match signal {
            Signal::Shutdown(name) => {
                info!(signal = name, "stopping: letting logins and writes in flight finish");
                break;
            }
            Signal::Reload => match reload(config_path, &mut supervisor, &mut lock).await {
                Ok(level) => {
                    logging.set_level(&level);
                    metrics.reload(true);
                }
                Err(e) => {
                    metrics.reload(false);
                    error!(error = %e, "configuration reload failed: the running configuration stays");
                }
            },
        }
    }
    supervisor.stop().await;
    info!("stopped");
    Ok(())
}

async fn reload(path: &Path, supervisor: &mut Supervisor, lock: &mut sink::DirLock) -> Result<String, String> {
    let new = config::load(path, Checks::Environment).map_err(|e| e.to_string())?;
    if new.admin_listen != supervisor.config.admin_listen || new.log.format != supervisor.config.log.format {
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

/// Why `once` wrote no token for a customer.
#[derive(Debug, thiserror::Error)]
pub enum OnceFailure {
    #[error("{0}")]
    Password(#[from] PasswordError),
    #[error("{0}")]
    Login(#[from] LoginError),
    /// Earlier 401s are recorded for this customer: trying again now could lock the account.
    #[error("not trying: Magento refused this customer {in_a_row} time(s) in a row, last at {last}; to keep clear of its lock the next try waits until {next}")]
    HeldBack { in_a_row: u32, last: String, next: String },
}

impl OnceFailure {
    /// A word for the log line: the login's `result` class, or what kept it from being sent.
    pub fn class(&self) -> &'static str {
        match self {
            OnceFailure::Password(_) => "password_error",
            OnceFailure::Login(e) => e.outcome.as_str(),
            OnceFailure::HeldBack { .. } => "held_back",
        }
    }
}

/// The outcome of `once` for one customer.
pub struct OnceResult {
    pub customer: String,
    pub path: PathBuf,
    /// When the written token expires.
    pub outcome: Result<SystemTime, OnceFailure>,
}

/// Logs every customer in once and writes the files, retrying transient failures until
/// `timeout` has passed. A 401 is never retried, and a customer whose recorded 401s (see
/// [`sink::read_ledger`]) call for a wait is not tried at all: an init container restarted by
/// the kubelet must not walk into Magento's lock. Returns one result per customer, in the
/// configured order.
///
/// Everything runs on the calling task: at most [`once_in_flight`] customers are under way at
/// once (their logins limited further by `max_concurrent_logins`), the next one starting as
/// soon as any finishes, so a customer that keeps failing holds up no one. Files are written
/// inline, each `fsync`ed: on tmpfs a hand-off to a blocking thread cost more than the write
/// (benches/RESULTS.md); on a slow disk a sync holds up the pass's other logins while it lasts.
pub async fn once(config: &Config, timeout: Duration) -> Result<Vec<OnceResult>, ClientError> {
    let client = Client::new(&config.magento)?;
    let logins = Semaphore::new(config.refresh.max_concurrent_logins);
    let deadline = Instant::now() + timeout;
    let (refresh, format, mode) = (&config.refresh, config.output.format, config.output.mode);
    let mut results: Vec<Option<OnceResult>> = (0..config.customers.len()).map(|_| None).collect();
    let mut done = futures::stream::iter(config.customers.iter().enumerate())
        .map(|(i, customer)| {
            let (client, logins) = (&client, &logins);
            async move {
                let outcome = once_customer(client, logins, customer, refresh, format, mode, deadline).await;
                (i, OnceResult { customer: customer.name.clone(), path: customer.path.clone(), outcome })
            }
        })
        .buffer_unordered(once_in_flight(config.refresh.max_concurrent_logins));
    while let Some((i, result)) = done.next().await {
        results[i] = Some(result);
    }
    // One directory sync for the whole batch.
    if let Err(e) = sink::sync_directory(&config.output.dir) {
        for r in results.iter_mut().flatten() {
            if r.outcome.is_ok() {
                let message = format!("cannot sync {}: {e}", config.output.dir.display());
                r.outcome = Err(LoginError { outcome: Outcome::WriteError, message, retry_after: None }.into());
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// Customers `once` has under way at a time: twice the login slots, so a slot freed is taken
/// at once while the customer that had it writes its file.
fn once_in_flight(max_concurrent_logins: usize) -> usize {
    2 * max_concurrent_logins.max(1)
}

async fn once_customer(
    client: &Client,
    logins: &Semaphore,
    customer: &CustomerConfig,
    refresh: &config::RefreshSettings,
    format: config::Format,
    mode: u32,
    deadline: Instant,
) -> Result<SystemTime, OnceFailure> {
    let mut auth = sink::read_ledger(&customer.path, &customer.username).unwrap_or_default();
    if let Some(next) = auth.wait(refresh).until().filter(|at| *at > SystemTime::now()) {
        return Err(OnceFailure::HeldBack {
            in_a_row: auth.in_a_row,
            last: auth.last_failure.map(sink::rfc3339).unwrap_or_default(),
            next: sink::rfc3339(next),
        });
    }
    let password = customer.password.read()?;
    let mut failures = 0;
    loop {
        // The deadline bounds the wait for a login slot and the request too, not only the
        // pauses between attempts. A write, once started, is left to finish.
        let attempt = tokio::time::timeout_at(
            deadline.into(),
            once_attempt(client, logins, customer, &password, refresh, format, mode),
        )
        .await
        .unwrap_or_else(|_| {
            Err(LoginError {
                outcome: Outcome::NetworkError,
                message: "no answer before the end of --timeout".into(),
                retry_after: None,
            })
        });
        match attempt {
            Ok(expires_at) => {
                if auth != AuthState::default() {
                    sink::remove_ledger(&customer.path);
                }
                return Ok(expires_at);
            }
            Err(e) if e.outcome == Outcome::AuthFailure => {
                let now = SystemTime::now();
                auth.record_failure(now, refresh);
                if let Err(write) = sink::write_ledger(&customer.path, &customer.username, &auth) {
                    warn!(customer = %customer.name, error = %write, "cannot record the 401 beside the token file");
                }
                return Err(e.into());
            }
            // A broken output directory will not mend within one pass, and another login would
            // only make Magento mint another token.
            Err(e) if e.outcome == Outcome::WriteError => return Err(e.into()),
            Err(e) => {
                failures += 1;
                let wait = schedule::backoff(failures, refresh, e.retry_after, rand::thread_rng().gen());
                if Instant::now() + wait >= deadline {
                    return Err(e.into());
                }
                warn!(customer = %customer.name, result = e.outcome.as_str(), error = %e.message, "login failed: retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn once_attempt(
    client: &Client,
    logins: &Semaphore,
    customer: &CustomerConfig,
    password: &Secret,
    refresh: &config::RefreshSettings,
    format: config::Format,
    mode: u32,
) -> Result<SystemTime, LoginError> {
    let fail = |outcome, message: String| LoginError { outcome, message, retry_after: None };
    let permit = logins.acquire().await.expect("the semaphore is never closed");
    let started = SystemTime::now();
    let token = client.login(&customer.token_url(), &customer.username, password).await?;
    drop(permit);
    let expiry = token::expiry(&token, started, refresh.default_lifetime)
        .map_err(|e| fail(Outcome::InvalidResponse, e.to_string()))?;
    let content = sink::render(format, &customer.name, &token, started, expiry.expires_at);
    // Inline: the directory is synced once at the end of the pass.
    sink::write_atomic(&customer.path, mode, &content, false)
        .map_err(|e| fail(Outcome::WriteError, format!("cannot write {}: {e}", customer.path.display())))?;
    Ok(expiry.expires_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devserver::{DevServer, DevServerOptions, Fault};

    #[tokio::test]
    async fn once_answers_in_order_and_a_stuck_login_holds_up_no_one_else() {
        let server = DevServer::start(DevServerOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let mut customers = String::new();
        for i in 0..40 {
            let name = format!("c{i:02}");
            server.add_customer(&format!("{name}@example.com"), "pw");
            let secret = dir.path().join(&name);
            std::fs::write(&secret, "pw").unwrap();
            customers += &format!(
                "  - name: {name}\n    username: {name}@example.com\n    password_file: {}\n",
                secret.display()
            );
        }
        let text = format!(
            "magento:\n  base_url: {}\nrefresh:\n  max_concurrent_logins: 2\noutput:\n  dir: {}\ncustomers:\n{customers}",
            server.base_url(),
            tokens.display()
        );
        let config = config::parse(&text, Checks::Environment).unwrap();
        // The first login never gets an answer: it holds one of the two login slots until the
        // end of the pass, and the customers after it go on through the other.
        server.push_fault(Fault::Hang);
        let results = once(&config, Duration::from_secs(2)).await.unwrap();
        let names: Vec<&str> = results.iter().map(|r| r.customer.as_str()).collect();
        let configured: Vec<&str> = config.customers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, configured);
        let failed: Vec<&OnceResult> = results.iter().filter(|r| r.outcome.is_err()).collect();
        assert_eq!(failed.len(), 1, "only the stuck login fails");
        let Err(e) = &failed[0].outcome else { unreachable!() };
        assert_eq!(e.class(), "network_error", "{e}");
        for r in results.iter().filter(|r| r.outcome.is_ok()) {
            assert!(std::fs::read(&r.path).is_ok_and(|t| !t.is_empty()), "{}", r.path.display());
        }
        assert_eq!(std::fs::read_dir(&tokens).unwrap().count(), 39, "no temporary file left");
    }
}
