//! The supervisor: one worker task per customer, reloads that touch only what changed, and a
//! graceful stop. Also `once`, the single pass used by init containers and CronJobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::account::Accounts;
use crate::attempt::{self, Attempt, NoToken, Obtained};
use crate::clock::Clock;
#[cfg(feature = "kubernetes")]
use crate::cluster::{lease, secret::Tokens, Cluster};
use crate::config::{
    self, Checks, Config, CustomerConfig, LogFormat, MagentoSettings, OutputSettings, PasswordError, ReadPasswords,
    RefreshSettings,
};
use crate::index::{self, IndexWriter};
use crate::logging::Logging;
use crate::magento::{Client, ClientError, LoginError, Outcome};
use crate::metrics::Metrics;
use crate::schedule::{self, AuthState};
use crate::secret::Secret;
use crate::signals::Signal;
use crate::sink;
use crate::sink::Times;
use crate::status::{Board, Reporter};
use crate::store::{Durable, Store};
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
    /// What the shared client was built from: a reload that keeps them keeps the client and
    /// its connection pool.
    magento: MagentoSettings,
    shared: Arc<Shared>,
    /// Settings read only at start, to say so when a reload changes them.
    admin_listen: Option<std::net::SocketAddr>,
    log_format: LogFormat,
    board: Board,
    /// One lockout budget per username, handed to the workers (kept across the terms of a
    /// Lease holder: what it learnt of 401s it could not book stays known).
    accounts: Arc<Accounts>,
    workers: BTreeMap<String, Running>,
    /// Keeps `output.index` up to date, when there is one.
    index: Option<IndexWriter>,
}

/// What a reload does to the customers: worked out from the running and the wanted settings
/// alone, before anything stops.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Running customers no longer configured: stopped for good (their files stay).
    pub remove: Vec<String>,
    /// Running customers whose settings changed: stopped, then started with the new ones.
    /// `adopt`: their login did not change, so the token on disk may be kept.
    pub restart: Vec<(CustomerConfig, bool)>,
    /// Customers not running yet.
    pub add: Vec<CustomerConfig>,
}

/// The reload plan. `everyone`: what all workers share changed (client, refresh settings,
/// mode), so every running customer that stays restarts. A format is a customer's own setting
/// (its `format`, else `output.format`): a change restarts only the customers it changes.
pub fn plan<'a>(
    running: impl IntoIterator<Item = &'a CustomerConfig>,
    wanted: Vec<CustomerConfig>,
    everyone: bool,
) -> Plan {
    let mut wanted: BTreeMap<String, CustomerConfig> = wanted.into_iter().map(|c| (c.name.clone(), c)).collect();
    let mut plan = Plan::default();
    for old in running {
        match wanted.remove(&old.name) {
            None => plan.remove.push(old.name.clone()),
            Some(new) if everyone || new != *old => {
                let adopt = new.same_login(old);
                plan.restart.push((new, adopt));
            }
            Some(_) => {}
        }
    }
    plan.add = wanted.into_values().collect();
    plan
}

impl Supervisor {
    /// Starts a worker for every configured customer, writing files.
    pub async fn start(config: Config, board: Board) -> Result<Supervisor, ClientError> {
        Supervisor::start_in(config, board, Store::Files, Arc::default()).await
    }

    /// Starts a worker for every configured customer, writing to `store`.
    pub async fn start_in(
        config: Config,
        board: Board,
        store: Store,
        accounts: Arc<Accounts>,
    ) -> Result<Supervisor, ClientError> {
        let shared = Arc::new(shared_for(&config, None, store)?);
        let mut supervisor = Supervisor {
            magento: config.magento,
            shared,
            admin_listen: config.admin_listen,
            log_format: config.log.format,
            board,
            accounts,
            workers: BTreeMap::new(),
            index: None,
        };
        for customer in config.customers {
            supervisor.spawn(customer, true);
        }
        supervisor.update_index(&config.output, &config.refresh).await;
        Ok(supervisor)
    }

    /// Starts, retargets or stops the index writer after the customers changed.
    async fn update_index(&mut self, output: &OutputSettings, refresh: &RefreshSettings) {
        let target = output.index.clone().map(|path| index::Target {
            path,
            perms: output.perms(),
            default_lifetime: refresh.default_lifetime,
            customers: self.workers.values().map(|r| r.customer.clone()).collect(),
        });
        match (&self.index, target) {
            (Some(writer), Some(target)) => writer.retarget(target),
            (None, Some(target)) => self.index = Some(IndexWriter::start(target, self.board.clone())),
            (Some(_), None) => {
                if let Some(writer) = self.index.take() {
                    writer.stop().await;
                }
                info!("output.index removed: the index file is no longer written (it stays)");
            }
            (None, None) => {}
        }
    }

    fn spawn(&mut self, customer: CustomerConfig, adopt: bool) {
        let customer = Arc::new(customer);
        let stop = CancellationToken::new();
        let report = Reporter::new(&customer.name, self.board.clone());
        let account = self.accounts.of(&customer);
        let worker = Worker::new(customer.clone(), account, self.shared.clone(), report, stop.clone());
        let task = tokio::spawn(worker.run(adopt));
        self.workers.insert(customer.name.clone(), Running { customer, stop, task });
    }

    /// Applies a new configuration: customers added start at once, removed ones stop (their
    /// files stay), changed ones restart, the others go on undisturbed.
    pub async fn apply(&mut self, new: Config) -> Result<(), ClientError> {
        let shared = shared_for(&new, Some(self), self.shared.store.clone())?;
        let everyone = !shared.same_as(&self.shared);
        let shared = Arc::new(shared);
        let plan = plan(self.workers.values().map(|r| &*r.customer), new.customers, everyone);
        // Stop the removed and the changed first, all together, so no two workers ever write
        // one file.
        let stopping = plan.remove.iter().chain(plan.restart.iter().map(|(c, _)| &c.name));
        let stopped: Vec<Running> = stopping.filter_map(|n| self.workers.remove(n)).collect();
        join_all(stopped).await;
        for name in &plan.remove {
            self.board.remove(name);
            info!(customer = %name, "customer removed; its token file stays");
        }
        self.magento = new.magento;
        self.shared = shared;
        self.admin_listen = new.admin_listen;
        self.log_format = new.log.format;
        for (customer, adopt) in plan.restart {
            info!(customer = %customer.name, "customer changed: restarting it");
            self.accounts.of(&customer).configuration_changed();
            self.spawn(customer, adopt);
        }
        for customer in plan.add {
            info!(customer = %customer.name, "customer added");
            self.spawn(customer, true);
        }
        self.accounts.prune();
        self.update_index(&new.output, &new.refresh).await;
        Ok(())
    }

    /// Stops every worker: waits end at once, logins and writes in flight get [`STOP_GRACE`].
    /// The index then gets what they wrote last.
    pub async fn stop(self) {
        join_all(self.workers.into_values().collect()).await;
        if let Some(writer) = self.index {
            writer.stop().await;
        }
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

/// What the workers share, reusing the running client and login slots when their settings
/// did not change (the connection pool survives a reload).
fn shared_for(config: &Config, running: Option<&Supervisor>, store: Store) -> Result<Shared, ClientError> {
    let client = match running {
        Some(s) if s.magento == config.magento => s.shared.magento.clone(),
        _ => Client::new(&config.magento)?,
    };
    let logins = match running {
        Some(s) if s.shared.refresh.max_concurrent_logins == config.refresh.max_concurrent_logins => {
            s.shared.logins.clone()
        }
        _ => Arc::new(Semaphore::new(config.refresh.max_concurrent_logins)),
    };
    Ok(Shared {
        magento: client,
        refresh: Arc::new(config.refresh.clone()),
        mode: config.output.mode,
        logins,
        clock: Clock::System,
        notify: crate::notify::Notifier::for_config(config.notify.as_ref(), running.map(|s| &s.shared.notify)),
        store,
    })
}

/// Whether two sets of shared settings behave the same (if not, every worker restarts).
trait SameAs {
    fn same_as(&self, other: &Self) -> bool;
}

impl SameAs for Shared {
    fn same_as(&self, other: &Shared) -> bool {
        self.magento.same_as(&other.magento)
            && self.refresh == other.refresh
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

/// What a reload's outcome changes, with files and with the Secret alike: the log level at
/// once, the reload counter, and an error line when the old configuration stays.
fn reloaded(result: Result<String, String>, logging: &Logging, metrics: &Metrics) {
    match result {
        Ok(level) => {
            logging.set_level(&level);
            metrics.reload(true);
        }
        Err(e) => {
            metrics.reload(false);
            error!(error = %e, "configuration reload failed: the running configuration stays");
        }
    }
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

#[cfg(feature = "kubernetes")]
/// `run` with `output.kubernetes`: one replica of a Deployment. It stands by, reading the
/// Secret for `/readyz` and `/status`, until it holds the Lease; then it runs the workers as
/// with files, writing the Secret, until it stops or no longer holds the Lease.
pub async fn run_central(
    config_path: &Path,
    mut config: Config,
    metrics: Arc<Metrics>,
    logging: &Logging,
    mut signals: impl Stream<Item = Signal> + Unpin,
) -> Result<(), String> {
    let k = config.output.kubernetes.clone().ok_or("output.kubernetes is not set")?;
    let board = metrics.board().clone();
    let cluster = Cluster::connect(&k, board.clone(), None).await?;
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
                    let store = Store::Secret(tokens.clone());
                    match Supervisor::start_in(config.clone(), board.clone(), store, accounts.clone()).await {
                        Ok(started) => supervisor = Some(started),
                        Err(e) => {
                            // Given up at once, not a lease later.
                            stop.cancel();
                            let _ = elector.await;
                            return Err(e.to_string());
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
                    let result = reload_central(config_path, &mut config, supervisor.as_mut()).await;
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

/// What no reload may change, in either mode: where the tokens go (files or a Secret) and,
/// with a Secret, its settings. Both take effect at the next start: a running daemon holds a
/// directory's lock, or runs for a Lease.
fn same_output(
    old: Option<&config::kubernetes::KubeSettings>,
    new: Option<&config::kubernetes::KubeSettings>,
) -> Result<(), String> {
    match (old, new) {
        (None, None) => Ok(()),
        (Some(old), Some(new)) if old == new => Ok(()),
        (Some(_), Some(_)) => Err("output.kubernetes changed: it takes effect at the next start".to_owned()),
        _ => Err("output: a change between output.dir and output.kubernetes takes effect at the next start".to_owned()),
    }
}

#[cfg(feature = "kubernetes")]
/// A reload with `output.kubernetes`: the holder's workers take the new configuration as with
/// files; a standby keeps it for when it holds the Lease. `output.kubernetes` itself takes effect
/// at the next start.
async fn reload_central(
    path: &Path,
    config: &mut Config,
    supervisor: Option<&mut Supervisor>,
) -> Result<String, String> {
    let new = config::load(path, Checks::Environment).map_err(|e| e.to_string())?;
    same_output(config.output.kubernetes.as_ref(), new.output.kubernetes.as_ref())?;
    if let Some(running) = supervisor {
        running.apply(new.clone()).await.map_err(|e| e.to_string())?;
    }
    *config = new;
    info!(customers = config.customers.len(), "configuration reloaded");
    Ok(config.log.level.clone())
}

#[cfg(feature = "kubernetes")]
/// A standby's board: every configured customer with the expiry of its token in the Secret, so
/// `/readyz` is 200 on every replica when the Secret holds an unexpired token for each. Only a
/// token in the Secret's data counts, not the times annotation alone; one gone is gone here too.
fn stand_by(config: &Config, board: &Board, tokens: &Tokens) {
    // No worker here answers POST /refresh: the admin server says who does.
    board.close_askers();
    let expiries = tokens.expiries(config.refresh.default_lifetime);
    let wanted: std::collections::HashSet<&str> = config.customers.iter().map(|c| c.name.as_str()).collect();
    for name in board.names() {
        if !wanted.contains(name.as_str()) {
            board.remove(&name);
        }
    }
    for customer in &config.customers {
        let report = Reporter::new(&customer.name, board.clone());
        match expiries.get(crate::store::key(customer)) {
            Some(expires_at) => report.token_on_disk(*expires_at),
            None => report.no_token_on_disk(),
        }
        report.planned(crate::status::State::Standby, None);
    }
}

#[cfg(feature = "kubernetes")]
/// `once` with `output.kubernetes`: takes the Lease (waiting for it until `timeout`), writes
/// the Secret once under it, and gives it up.
pub async fn once_central(config: &Config, timeout: Duration, board: Board) -> Result<Vec<OnceResult>, String> {
    let k = config.output.kubernetes.clone().ok_or("output.kubernetes is not set")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let cluster = Cluster::connect(&k, board, Some("once")).await?;
    let stop = CancellationToken::new();
    let (mut term, elector) = lease::spawn(cluster.clone(), stop.clone());
    let tokens = Tokens::start(cluster.clone(), term.clone(), stop.clone());
    let finish = |stop: CancellationToken, elector: JoinHandle<()>| async move {
        stop.cancel();
        let _ = elector.await;
    };
    while !term.borrow().leading() {
        if !matches!(tokio::time::timeout_at(deadline, term.changed()).await, Ok(Ok(()))) {
            let holder = term.borrow().holder.clone();
            finish(stop, elector).await;
            return Err(match holder {
                Some(holder) => format!(
                    "the Lease {}/{} is held by {holder}: it writes the Secret; not logging in",
                    cluster.namespace, k.lease
                ),
                None => {
                    format!("could not take the Lease {}/{} before the end of --timeout", cluster.namespace, k.lease)
                }
            });
        }
    }
    if let Err(e) = tokens.load().await {
        finish(stop, elector).await;
        return Err(format!("cannot read the Secret {}/{}: {e}", cluster.namespace, k.secret));
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // Every login reads its password: the wait for the Lease may have outlasted the check's.
    let results = once_in(config, Vec::new(), left, &Store::Secret(tokens)).await.map_err(|e| e.to_string());
    finish(stop, elector).await;
    results
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
    /// The record of earlier 401s cannot be read: taken as the lockout budget spent.
    #[error("not trying: the record of this customer's earlier 401s cannot be read ({0}): counted as the lockout budget spent; check Magento's failure count for this username (reset it if needed), then run forget-failures for this customer")]
    UnreadableLedger(String),
}

impl OnceFailure {
    /// A word for the log line: the login's `result` class, or what kept it from being sent.
    pub fn class(&self) -> &'static str {
        match self {
            OnceFailure::Password(_) => "password_error",
            OnceFailure::Login(e) => e.outcome.as_str(),
            OnceFailure::HeldBack { .. } | OnceFailure::UnreadableLedger(_) => "held_back",
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
/// [`ledger::read_ledger`]) call for a wait is not tried at all: an init container restarted by
/// the kubelet must not walk into Magento's lock. Returns one result per customer, in the
/// configured order.
///
/// Everything runs on the calling task: at most [`once_in_flight`] customers are under way at
/// once (their logins limited further by `max_concurrent_logins`), the next one starting as
/// soon as any finishes, so a customer that keeps failing holds up no one. Files are written
/// inline (on tmpfs a hand-off to a blocking thread cost more than the write, benches/RESULTS.md)
/// into the output directory opened once, and none is synced on its own: one sync of the file
/// system at the end makes the whole batch durable before any of it is reported written (the
/// contract lets a batch share one sync; on a disk that is one sync instead of one per file).
///
/// `passwords` are those the configuration's check read ([`config::load_with_passwords`]): each
/// customer's first login sends the one read then (empty: every login reads its own).
pub async fn once(
    config: &Config,
    passwords: ReadPasswords,
    timeout: Duration,
) -> Result<Vec<OnceResult>, ClientError> {
    once_in(config, passwords, timeout, &Store::Files).await
}

/// [`once`], writing to `store`.
pub async fn once_in(
    config: &Config,
    passwords: ReadPasswords,
    timeout: Duration,
    store: &Store,
) -> Result<Vec<OnceResult>, ClientError> {
    let client = Client::new(&config.magento)?;
    let logins = Semaphore::new(config.refresh.max_concurrent_logins);
    let accounts = Accounts::new();
    let deadline = Instant::now() + timeout;
    let (dir, ledgers) = match store {
        Store::Files => (sink::open_dir(&config.output.dir).ok(), ledgers_in(&config.output.dir)),
        #[cfg(feature = "kubernetes")]
        Store::Secret(_) => (None, None),
    };
    let pass = Pass {
        client: &client,
        logins: &logins,
        accounts: &accounts,
        config,
        deadline,
        store,
        dir: dir.as_ref(),
        ledgers,
    };
    let mut outcomes: Vec<Option<Result<SystemTime, OnceFailure>>> =
        (0..config.customers.len()).map(|_| None).collect();
    // `buffer_unordered` by hand: a closure mapping customers to futures would keep the pass
    // from being `Send` (a limit of the compiler's proof), and the pass runs as a task.
    let in_flight = once_in_flight(config.refresh.max_concurrent_logins);
    let mut waiting = config.customers.iter().enumerate();
    let mut passwords = passwords.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < in_flight {
            let Some((i, customer)) = waiting.next() else { break };
            running.push(pass.one(i, customer, passwords.next().flatten()));
        }
        let Some((i, outcome)) = running.next().await else { break };
        outcomes[i] = Some(outcome);
    }
    drop(running);
    // The client and its connections (their buffers) go before the results are made, which
    // then reuse that memory: `once`'s peak is at the end of the pass (benches/RESULTS.md).
    drop(pass);
    drop(client);
    let mut results: Vec<Option<OnceResult>> = outcomes
        .into_iter()
        .zip(&config.customers)
        .map(|(outcome, c)| Some(OnceResult { customer: c.name.clone(), path: c.path.clone(), outcome: outcome? }))
        .collect();
    if let Some(path) = &config.output.index {
        let written = results
            .iter()
            .flatten()
            .filter_map(|r| Some((r.customer.as_str(), r.path.as_path(), *r.outcome.as_ref().ok()?)));
        if let Err(e) = index::write_once(path, config.output.perms(), written) {
            // The tokens are in their files; the app that reads the index has none of them.
            error!(error = %e, "cannot write the index {}", path.display());
            for r in results.iter_mut().flatten() {
                if r.outcome.is_ok() {
                    let message = format!("cannot write the index {}: {e}", path.display());
                    r.outcome = Err(LoginError::new(Outcome::WriteError, message).into());
                }
            }
        }
    }
    // One sync for the whole batch: every file and the directory (the Secret's writes are
    // answered once stored).
    let synced = match (store, &dir) {
        #[cfg(feature = "kubernetes")]
        (Store::Secret(_), _) => Ok(()),
        (Store::Files, Some(dir)) => sink::sync_file_system(dir),
        (Store::Files, None) => sink::sync_directory(&config.output.dir),
    };
    if let Err(e) = synced {
        for r in results.iter_mut().flatten() {
            if r.outcome.is_ok() {
                let message = format!("cannot sync {}: {e}", config.output.dir.display());
                r.outcome = Err(LoginError::new(Outcome::WriteError, message).into());
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

/// The names of the ledgers (`.<file>.auth`) in the output directory, `None` if it cannot be
/// listed. `once` holds the directory's lock: no other daemon writes one while it runs, so a
/// customer without one needs neither a read of its ledger nor a removal after its login (two
/// system calls that fail, of the thirty a login costs).
fn ledgers_in(dir: &Path) -> Option<std::collections::HashSet<std::ffi::OsString>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names = std::collections::HashSet::new();
    for entry in entries {
        let name = entry.ok()?.file_name();
        if name.as_encoded_bytes().ends_with(b".auth") {
            names.insert(name);
        }
    }
    Some(names)
}

/// What every customer of one `once` pass shares.
struct Pass<'a> {
    client: &'a Client,
    logins: &'a Semaphore,
    accounts: &'a Accounts,
    config: &'a Config,
    deadline: Instant,
    store: &'a Store,
    /// The output directory, opened once for every write (`None`: each write opens it, or
    /// the tokens go to the Secret).
    dir: Option<&'a std::fs::File>,
    /// The ledgers found in it at the start (`None`: unknown, any customer may have one).
    ledgers: Option<std::collections::HashSet<std::ffi::OsString>>,
}

impl<'a> Pass<'a> {
    /// One customer, with its place in the configuration (a method, not a closure: the pass
    /// must be `Send` to run as a task, and a closure's future trips up the compiler's proof).
    async fn one(
        &self,
        i: usize,
        customer: &'a CustomerConfig,
        password: Option<Secret>,
    ) -> (usize, Result<SystemTime, OnceFailure>) {
        (i, self.customer(customer, password).await)
    }

    /// One customer: attempts (the same path as `run`'s workers) until a token is written, a
    /// 401, a held-back login or the deadline. The first sends `password` if given (read by the
    /// check a moment ago); every other reads the password afresh.
    async fn customer(
        &self,
        customer: &CustomerConfig,
        mut password: Option<Secret>,
    ) -> Result<SystemTime, OnceFailure> {
        let refresh = &self.config.refresh;
        let account = self.accounts.of(customer);
        let ledger = crate::ledger::ledger_path(&customer.path);
        let ledger_on_disk = match (&self.ledgers, ledger.file_name()) {
            (Some(found), Some(name)) => found.contains(name),
            _ => true,
        };
        if ledger_on_disk {
            attempt::restore_ledger(self.store, customer, &account, SystemTime::now(), refresh);
        }
        // `once` is never stopped early: its bound is the deadline.
        let never = CancellationToken::new();
        let mut failures = 0;
        loop {
            let attempt = Attempt {
                magento: self.client,
                customer,
                account: &account,
                refresh,
                logins: self.logins,
                clock: Clock::System,
                store: self.store,
                ledger_on_disk,
                password: password.take(),
            };
            // The deadline bounds the wait for the account's turn, a login slot and the request
            // too, not only the pauses between attempts. A write, once started, is left to finish.
            let result = tokio::time::timeout_at(self.deadline.into(), attempt::attempt(attempt, &never))
                .await
                .unwrap_or_else(|_| Err(NoToken::Login { error: timed_out_error(), took: Duration::ZERO }));
            let error =
                match result {
                    Ok(obtained) => return self.write(customer, obtained).await,
                    Err(NoToken::Password(e)) => return Err(e.into()),
                    Err(NoToken::HeldBack { auth: AuthState { unreadable: Some(why), .. }, .. }) => {
                        return Err(OnceFailure::UnreadableLedger(why))
                    }
                    Err(NoToken::HeldBack { wait, auth, .. }) => return Err(OnceFailure::HeldBack {
                        in_a_row: auth.in_a_row,
                        last: auth.last_failure.map(sink::rfc3339).unwrap_or_default(),
                        next: wait.until().map_or_else(
                            || {
                                "the password changes, or an operator resets Magento's count and runs forget-failures"
                                    .to_owned()
                            },
                            sink::rfc3339,
                        ),
                    }),
                    Err(NoToken::Stopped) => timed_out_error(),
                    Err(NoToken::Login { error, .. }) => error,
                };
            // Neither a 401 nor a reCAPTCHA requirement changes within one pass.
            if matches!(error.outcome, Outcome::AuthFailure | Outcome::Blocked) {
                return Err(error.into());
            }
            failures += 1;
            let wait = schedule::backoff(failures, refresh, error.retry_after, rand::thread_rng().gen());
            if Instant::now() + wait >= self.deadline {
                return Err(error.into());
            }
            warn!(customer = %customer.name, result = error.outcome.as_str(), error = %error.message, "login failed: retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Writes a file inline (the file system is synced once at the end of the pass), or joins
    /// the Secret's next update.
    async fn write(&self, customer: &CustomerConfig, obtained: Obtained) -> Result<SystemTime, OnceFailure> {
        let output = &self.config.output;
        let expires_at = obtained.expiry.expires_at;
        let content = sink::render(customer.format, &customer.name, &obtained.token, obtained.obtained_at, expires_at);
        let perms = sink::Perms { mode: output.mode, owner: customer.owner };
        let name = customer.path.file_name().and_then(|n| n.to_str());
        let written = match (self.store, self.dir, name) {
            (Store::Files, Some(dir), Some(name)) => {
                sink::write_atomic_at(dir, name, perms, &content, sink::Sync::Batch)
            }
            _ => {
                let times = Times { obtained_at: obtained.obtained_at, expires_at };
                self.store.write(customer, perms, content, times, Durable::WithBatch).await
            }
        };
        written.map_err(|e| {
            LoginError::new(Outcome::WriteError, format!("cannot write {}: {e}", customer.path.display()))
        })?;
        Ok(expires_at)
    }
}

fn timed_out_error() -> LoginError {
    LoginError::new(Outcome::NetworkError, "no answer before the end of --timeout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customers(extra: &str) -> Vec<CustomerConfig> {
        let text = format!("magento:\n  base_url: http://127.0.0.1:1\noutput:\n  dir: /tmp\ncustomers:\n{extra}");
        config::parse(&text, Checks::Static).unwrap().customers
    }

    fn customer(name: &str, more: &str) -> String {
        format!("  - name: {name}\n    username: {name}@x.com\n    password_env: PW\n{more}")
    }

    fn names(plan: &Plan) -> (Vec<&str>, Vec<(&str, bool)>, Vec<&str>) {
        (
            plan.remove.iter().map(String::as_str).collect(),
            plan.restart.iter().map(|(c, adopt)| (c.name.as_str(), *adopt)).collect(),
            plan.add.iter().map(|c| c.name.as_str()).collect(),
        )
    }

    #[test]
    fn a_reload_plan_touches_only_what_changed() {
        let running = customers(&[customer("a", ""), customer("b", ""), customer("c", ""), customer("d", "")].concat());
        let wanted = customers(
            &[
                customer("a", ""),
                // Another file: the same login, so its token on disk may be adopted.
                customer("b", "    file: b.token\n"),
                // Another store: the token on disk may belong to another website.
                customer("c", "    store_code: de\n"),
                // Another format: the same login, its token rewritten in the new format.
                customer("d", "    format: env\n"),
                customer("e", ""),
            ]
            .concat(),
        );
        let plan = plan(&running, wanted.clone(), false);
        assert_eq!(names(&plan), (vec![], vec![("b", true), ("c", false), ("d", true)], vec!["e"]));
        assert_eq!(plan.restart[0].0.path, std::path::Path::new("/tmp/b.token"));
        // Shared settings changed: every customer that stays restarts, adopting its token
        // where its own login did not change.
        let plan = super::plan(&running, wanted, true);
        assert_eq!(names(&plan), (vec![], vec![("a", true), ("b", true), ("c", false), ("d", true)], vec!["e"]));
        // output.format changes the customers without a format of their own, and only them.
        let two = [customer("a", ""), customer("b", "    format: raw\n")].concat();
        let json = format!(
            "magento:\n  base_url: http://127.0.0.1:1\noutput:\n  dir: /tmp\n  format: json\ncustomers:\n{two}"
        );
        let json = config::parse(&json, Checks::Static).unwrap().customers;
        assert_eq!(names(&super::plan(&customers(&two), json, false)), (vec![], vec![("a", true)], vec![]));
        // Nothing changed: nothing to do.
        assert_eq!(super::plan(&running, running.clone(), false), Plan::default());
    }
    use magento_devserver::{DevServer, DevServerOptions, Fault};

    #[tokio::test]
    async fn once_sends_the_password_its_check_read_and_reads_it_again_for_a_retry() {
        let server = DevServer::start(DevServerOptions::default()).await.unwrap();
        server.add_customer("a@example.com", "checked");
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("a.password");
        std::fs::write(&secret, "checked\n").unwrap();
        let file = dir.path().join("config.yaml");
        let text = format!(
            "magento:\n  base_url: {}\nrefresh:\n  min_backoff: 100ms\noutput:\n  dir: {}\ncustomers:\n  - name: a\n    username: a@example.com\n    password_file: {}\n",
            server.base_url(),
            dir.path().display(),
            secret.display()
        );
        std::fs::write(&file, text).unwrap();
        let (config, passwords) = config::load_with_passwords(&file).unwrap();
        let kept: Vec<Option<&str>> = passwords.iter().map(|p| p.as_ref().map(|p| p.expose())).collect();
        assert_eq!(kept, [Some("checked")]);
        // Rotated after the check: the first login still sends what the check read; a 503 makes
        // a second, which reads the file again.
        std::fs::write(&secret, "rotated").unwrap();
        server.set_password("a@example.com", "rotated");
        server.push_fault(Fault::Respond {
            status: 503,
            content_type: "text/html".into(),
            body: b"busy".to_vec(),
            retry_after: None,
        });
        let results = once(&config, passwords, Duration::from_secs(8)).await.unwrap();
        assert!(results[0].outcome.is_ok(), "{:?}", results[0].outcome);
        let sent: Vec<(u16, Option<String>)> = server.requests().into_iter().map(|r| (r.status, r.password)).collect();
        assert_eq!(sent, [(503, Some("checked".into())), (200, Some("rotated".into()))]);
    }

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
        // end of the pass, and the customers after it go on through the other. The pass lasts
        // its whole deadline (the stuck login ends there): 8 s, not 2, for 39 logins and 39
        // fsyncs one after the other when the machine and its disk are busy. Were the others
        // held up behind the stuck one, they would miss any deadline.
        server.push_fault(Fault::Hang);
        let results = once(&config, Vec::new(), Duration::from_secs(8)).await.unwrap();
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
