//! The daemon's programs: the supervisor here (one worker task per customer, reloads that touch
//! only what changed, a graceful stop), which `run` drives with token files ([`run`]) and with
//! the Secret of `output.kubernetes` (`central`), and `once`, the single pass of init containers
//! and CronJobs ([`once`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::account::Accounts;
use crate::clock::Clock;
use crate::config::{self, Config, CustomerConfig, MagentoSettings, Output, RefreshSettings};
use crate::issuer::Issuer;
use crate::logging::Logging;
use crate::magento::{Client, ClientError};
use crate::metrics::Metrics;
use crate::status::{Board, Reporter};
use crate::store::index::{self, IndexWriter};
use crate::store::Store;
use crate::worker::{Shared, Worker};

#[cfg(feature = "kubernetes")]
mod central;
mod once;
mod run;

#[cfg(feature = "kubernetes")]
pub use central::{once_central, run_central};
pub use once::{once, OnceFailure, OnceResult};
pub use run::run;

/// The exit status of a command that failed.
pub const EXIT_FAILED: u8 = 1;
/// The exit status of a command refused for its configuration.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// Why `run` or `once` could not start (or ended without doing its work).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `magento` settings no client can be built from (a `ca_file` without a certificate).
    #[error("{0}")]
    Client(#[from] ClientError),
    /// `output.kubernetes` in a build without the `kubernetes` feature.
    #[error("output.kubernetes: {}", config::NO_KUBERNETES)]
    NoKubernetes,
    /// Another daemon holds the output directory, or it cannot be locked.
    #[error("{0}")]
    Lock(#[from] crate::dirlock::LockError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot listen on admin.listen {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    /// The Kubernetes API (`output.kubernetes`): unreachable, refused, or the Lease held by
    /// another for all of `once`'s time.
    #[error("{0}")]
    Cluster(String),
}

impl StartError {
    /// 2 for what the configuration must change, 1 for what the environment must.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Client(_) | StartError::NoKubernetes => EXIT_BAD_CONFIG,
            StartError::Lock(_) | StartError::Signals(_) | StartError::Listen { .. } | StartError::Cluster(_) => {
                EXIT_FAILED
            }
        }
    }
}

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
    board: Board,
    /// One lockout budget per username, handed to the workers (kept across the terms of a
    /// Lease holder: what it learnt of 401s it could not book stays known).
    accounts: Arc<Accounts>,
    workers: BTreeMap<String, Running>,
    /// Keeps `output.index` up to date, when there is one.
    index: Option<IndexWriter>,
    /// The issuer's task (`auth.method` other than `password`); its handle is in `shared`.
    issuer: Option<(CancellationToken, JoinHandle<()>)>,
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
    /// Starts a worker for every configured customer, writing to `store`.
    pub async fn start(
        config: Config,
        board: Board,
        store: Store,
        accounts: Arc<Accounts>,
    ) -> Result<Supervisor, ClientError> {
        let shared = Arc::new(shared_for(&config, None, store, &board)?);
        let mut supervisor = Supervisor {
            magento: config.magento,
            shared,
            board,
            accounts,
            workers: BTreeMap::new(),
            index: None,
            issuer: None,
        };
        supervisor.start_issuer();
        for customer in config.customers {
            supervisor.spawn(customer, true);
        }
        supervisor.update_index(&config.output, &config.refresh).await;
        Ok(supervisor)
    }

    /// Starts, retargets or stops the index writer after the customers changed.
    async fn update_index(&mut self, output: &Output, refresh: &RefreshSettings) {
        let index = output.dir().and_then(|out| Some((out, out.index.clone()?)));
        let target = index.map(|(out, path)| index::Target {
            path,
            perms: out.perms(),
            dir: out.dir.clone(),
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

    /// Starts the task of the issuer in `shared`, if there is one and it does not run yet.
    fn start_issuer(&mut self) {
        let Some(issuer) = self.shared.issuer.clone() else { return };
        let stop = CancellationToken::new();
        let s = &self.shared;
        let task = issuer.run(s.refresh.clone(), s.logins.clone(), s.clock, s.store.clone(), stop.clone());
        self.issuer = Some((stop, tokio::spawn(task)));
    }

    /// Stops the issuer's task, if one runs: a login in flight gets [`STOP_GRACE`].
    async fn stop_issuer(&mut self) {
        if let Some((stop, mut task)) = self.issuer.take() {
            stop.cancel();
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                warn!("the issuer is still busy after the grace period: abandoning it");
                task.abort();
            }
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
        let shared = shared_for(&new, Some(self), self.shared.store.reconfigured(&new.output), &self.board)?;
        let everyone = !shared.same_as(&self.shared);
        let new_issuer = !same_issuer(&shared.issuer, &self.shared.issuer);
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
        if new_issuer {
            self.stop_issuer().await;
        }
        self.magento = new.magento;
        self.shared = shared;
        if new_issuer {
            if self.shared.issuer.is_none() {
                self.board.set_issuer(None);
            }
            self.start_issuer();
        }
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
    pub async fn stop(mut self) {
        join_all(std::mem::take(&mut self.workers).into_values().collect()).await;
        self.stop_issuer().await;
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
fn shared_for(
    config: &Config,
    running: Option<&Supervisor>,
    store: Store,
    board: &Board,
) -> Result<Shared, ClientError> {
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
        refresh: Arc::new(config.refresh.clone()),
        logins,
        clock: Clock::System,
        notify: crate::notify::Notifier::for_config(config.notify.as_ref(), running.map(|s| &s.shared.notify)),
        store,
        // The running issuer when it serves the same credential the same way: its token stays.
        issuer: match running.and_then(|s| s.shared.issuer.clone()) {
            Some(issuer) if issuer.serves(&config.auth, &client) => Some(issuer),
            _ => Issuer::new(&config.auth, client.clone(), board),
        },
        magento: client,
    })
}

/// Whether two configurations' issuers are one (or both absent).
fn same_issuer(a: &Option<Arc<Issuer>>, b: &Option<Arc<Issuer>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Whether two sets of shared settings behave the same (if not, every worker restarts).
trait SameAs {
    fn same_as(&self, other: &Self) -> bool;
}

impl SameAs for Shared {
    fn same_as(&self, other: &Shared) -> bool {
        self.magento.same_as(&other.magento)
            && self.refresh == other.refresh
            && self.store.same_as(&other.store)
            && Arc::ptr_eq(&self.logins, &other.logins)
            && same_issuer(&self.issuer, &other.issuer)
    }
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

/// Whether the running daemon can take `new`: where the tokens go (a directory or a Secret)
/// cannot switch, and a Secret's settings cannot change. Both take effect at the next start: a
/// running daemon holds a directory's lock, or runs for a Lease. The one check of both run
/// paths' reloads.
pub fn check_reload(old: &Config, new: &Config) -> Result<(), String> {
    if new.admin_listen != old.admin_listen || new.log.format != old.log.format {
        info!("admin.listen and log.format take effect at the next start");
    }
    match (&old.output, &new.output) {
        (Output::Files(_), Output::Files(_)) => Ok(()),
        (Output::Kubernetes(old), Output::Kubernetes(new)) if old == new => Ok(()),
        (Output::Kubernetes(_), Output::Kubernetes(_)) => {
            Err("output.kubernetes changed: it takes effect at the next start".to_owned())
        }
        _ => Err("output: a change between output.dir and output.kubernetes takes effect at the next start".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Checks;

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
        assert_eq!(plan.restart[0].0.file, "b.token");
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
}
