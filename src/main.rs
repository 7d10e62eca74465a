//! The command line: parses arguments, sets up logging, runs a command, maps the outcome to an
//! exit status (0 done, 1 failed, 2 bad configuration).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use magento_token_sidecar::clock::rfc3339;
use magento_token_sidecar::config::{self, Checks, Config, ConfigError, Output, ReadPasswords};
use magento_token_sidecar::daemon::{StartError, EXIT_BAD_CONFIG as BAD_CONFIG, EXIT_FAILED as FAILED};
use magento_token_sidecar::dirlock::DirLock;
use magento_token_sidecar::ledger::Forget;
use magento_token_sidecar::logging::{self, Logging};
use magento_token_sidecar::metrics::Metrics;
use magento_token_sidecar::signals;
use magento_token_sidecar::status::Board;
use magento_token_sidecar::store::{self, Store};
use magento_token_sidecar::{admin, daemon, reaper};

#[derive(Parser)]
#[command(
    name = "magento-token-sidecar",
    version,
    about = "Keeps Magento customer tokens fresh on disk for the apps beside it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Keep every customer's token file fresh until SIGTERM/SIGINT (SIGHUP reloads the config).
    Run(ConfigArg),
    /// Log every customer in once, write the files and exit (init containers, CronJobs).
    Once {
        #[command(flatten)]
        config: ConfigArg,
        /// Give up on customers still failing after this long (transient failures are retried).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Validate the config, that every password source is readable and the output directory
    /// writable; no network.
    Check(ConfigArg),
    /// After resetting a customer's failed logins in Magento: make the daemon forget its own
    /// count, so a customer held back by the lockout budget is tried again (within 2 s, no
    /// restart).
    ForgetFailures {
        #[command(flatten)]
        config: ConfigArg,
        /// The customers (their `name` in the configuration).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Start a built-in Magento-compatible server on loopback and the daemon against it.
    Demo {
        /// Log in and check tokens through GraphQL (`magento.api: graphql`) instead of REST.
        #[arg(long)]
        graphql: bool,
        /// No customer password: tokens through an admin with two-factor authentication
        /// (`auth.method: login_as_customer`).
        #[arg(long)]
        login_as_customer: bool,
    },
    /// Run only the built-in Magento-compatible server (tests and benchmarks).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    // Boxed: its many options would make every command as large as it.
    Devserver(Box<magento_devserver::DevServerArgs>),
}

#[derive(Args)]
struct ConfigArg {
    /// The YAML configuration file.
    #[arg(long, env = "MAGENTO_TOKEN_SIDECAR_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    // Before anything is read: no configuration, no password yet.
    forbid_core_dumps();
    raise_open_file_limit();
    let cli = Cli::parse();
    let runtime = match &cli.command {
        // The server answers many clients at once in benchmarks: every core.
        #[cfg(feature = "demo")]
        Command::Devserver(_) => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        // The daemon mostly sleeps: one thread is plenty, and the cheapest (benches/RESULTS.md).
        // The blocking pool only writes token files and resolves host names; more threads than
        // two just contend for the token directory's lock: 1,000 logins in `once` cost 60 µs of
        // CPU each with tokio's default of 512, 48 µs with 2.
        _ => tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let code = match cli.command {
        Command::Run(arg) => match load(&arg.config) {
            Ok(config) => {
                let logging = logging::init(config.log.format, &config.log.level);
                log_warnings(&config);
                runtime.block_on(serve(&arg.config, config, None, &logging))
            }
            Err(code) => code,
        },
        Command::Once { config: arg, timeout } => match loaded(config::load_with_passwords(&arg.config)) {
            Ok((config, passwords)) => {
                logging::init(config.log.format, &config.log.level);
                log_warnings(&config);
                // The pass runs as a task, not as `block_on`'s own future: waking `block_on`'s
                // future always writes to the runtime's eventfd (it cannot tell the waker is on
                // its own thread), while a task woken on the runtime's thread is only queued.
                // Every login wakes the pass several times (benches/RESULTS.md).
                runtime.block_on(async move { tokio::spawn(once(config, passwords, timeout)).await.unwrap_or(FAILED) })
            }
            Err(code) => code,
        },
        Command::ForgetFailures { config: arg, names } => runtime.block_on(forget_failures(&arg.config, &names)),
        Command::Check(arg) => match load(&arg.config) {
            Ok(config) => {
                for warning in config.warnings() {
                    eprintln!("warning: {warning}");
                }
                println!(
                    "{}: ok ({} customer{}, {})",
                    arg.config.display(),
                    config.customers.len(),
                    if config.customers.len() == 1 { "" } else { "s" },
                    config.output.describe(),
                );
                0
            }
            Err(code) => code,
        },
        Command::Demo { graphql, login_as_customer } => runtime.block_on(dev::run_demo(graphql, login_as_customer)),
        #[cfg(feature = "demo")]
        Command::Devserver(args) => runtime.block_on(dev::run_devserver(*args)),
    };
    // Every task goes with the runtime (a notify command still running is killed with its
    // process group); then whatever the commands left running (`run` only).
    drop(runtime);
    reaper::finish();
    ExitCode::from(code)
}

/// An abort must not leave a core holding a password or a token: the core size limit goes to 0,
/// soft and hard (a child or a later `ulimit -c` cannot raise it), and the process is marked
/// not dumpable, which also covers a `core_pattern` pipe (it ignores the size limit) and keeps
/// other processes of the same user from attaching to it or reading its memory through
/// `/proc`. Run first in `main`, before any configuration or password is read.
fn forbid_core_dumps() {
    use rustix::process::{setrlimit, Resource, Rlimit};
    if let Err(e) = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }) {
        eprintln!("warning: cannot set the core file size limit to 0: {e}");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        eprintln!("warning: cannot mark the process not dumpable (prctl PR_SET_DUMPABLE): {e}");
    }
}

/// The soft open-file limit up to the hard one (often 1,024 soft against 500,000 or more
/// hard): the descriptors the logins, token files and admin connections share. The admin
/// server takes at most a quarter of them (`admin::connection_limit`).
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum {
        if limit.current.is_some_and(|soft| soft < hard) {
            if let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
                eprintln!("warning: cannot raise the open-file limit to {hard}: {e}");
            }
        }
    }
}

/// `forget-failures`: marks each named customer's ledger as forgotten; the running daemon takes
/// it within its password poll.
async fn forget_failures(path: &Path, names: &[String]) -> u8 {
    // The file alone: an unreadable password (the usual reason for this command) is no reason
    // to refuse.
    let config = match config::load(path, Checks::Static) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return BAD_CONFIG;
        }
    };
    let mut code = 0;
    let mut customers = Vec::new();
    // The issuer's credential (`auth.admin`, `auth.ims`) has a ledger of its own.
    let issuer = magento_token_sidecar::issuer::ledger_entry(&config.auth);
    for name in names {
        match config.customers.iter().chain(&issuer).find(|c| &c.name == name) {
            Some(customer) => customers.push(customer),
            None => {
                eprintln!("{}: no customer named {name:?}", path.display());
                code = BAD_CONFIG;
            }
        }
    }
    let verdicts = match store::forget_failures(&config.output, &customers).await {
        Ok(verdicts) => verdicts,
        Err(e) => {
            eprintln!("{e}");
            return FAILED;
        }
    };
    // When a running daemon reads the ledger again: its password poll, or the holder's read of
    // the Secret.
    let (retry_within, there) = match &config.output {
        Output::Files(_) => (Duration::from_secs(2), ""),
        Output::Kubernetes(k) => (k.lease_duration * 2, " in the Secret"),
    };
    let within = humantime::format_duration(retry_within);
    let magento = "first make sure Magento's own count is gone: the username's row in oauth_token_request_log deleted, or cleared by the store's cron";
    for (customer, verdict) in customers.iter().zip(verdicts) {
        let name = &customer.name;
        let place = store::ledger_place(&config.output, customer);
        match verdict {
            Ok(Forget::Forget { unreadable }) => {
                let replaced = if unreadable { " (it replaced a record that could not be read)" } else { "" };
                println!("{name}: the daemon's count of failed logins is forgotten{there}{replaced}; a running daemon tries again within {within} ({magento})");
            }
            Ok(Forget::Already) => {
                println!("{name}: already forgotten; a running daemon tries again within {within}")
            }
            Ok(Forget::Nothing) => {
                eprintln!(
                    "{name}: no failed login of this customer's username is recorded in {place}: nothing to forget"
                );
                code = FAILED;
            }
            Ok(Forget::Another) => {
                eprintln!("{name}: {place} records another username's failed logins, not this customer's (its username changed, or another customer writes the same file): left alone, since forgetting it would reset that username's lockout budget");
                code = FAILED;
            }
            Err(e) => {
                eprintln!("{name}: cannot write {place}: {e}");
                code = FAILED;
            }
        }
    }
    code
}

/// Loads and fully checks the configuration; on failure prints every problem.
fn load(path: &Path) -> Result<Config, u8> {
    loaded(config::load(path, Checks::Environment))
}

/// A configuration loaded, or every problem printed.
fn loaded<T>(result: Result<T, ConfigError>) -> Result<T, u8> {
    result.map_err(|e| {
        eprintln!("{e}");
        BAD_CONFIG
    })
}

/// Settings that are allowed but risky (`Config::warnings`), as WARN lines.
fn log_warnings(config: &Config) {
    for warning in config.warnings() {
        warn!("{warning}");
    }
}

/// `run` (and `demo`): the admin server and the daemon until a shutdown signal.
async fn serve(config_path: &Path, config: Config, admin_listener: Option<TcpListener>, logging: &Logging) -> u8 {
    match start(config_path, config, admin_listener, logging).await {
        Ok(()) => 0,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("{e}");
            e.exit_code()
        }
    }
}

async fn start(
    config_path: &Path,
    config: Config,
    admin_listener: Option<TcpListener>,
    logging: &Logging,
) -> Result<(), StartError> {
    // Handlers first: from here on SIGTERM means a graceful stop.
    let signals = signals::listen().map_err(StartError::Signals)?;
    let metrics = Arc::new(Metrics::new(Board::new()));
    match &config.output {
        Output::Files(dir) => {
            // Before anything touches the output directory (or the admin port): one daemon
            // per directory.
            let lock = DirLock::acquire(&dir.dir)?;
            // The reaper of what notify commands leave behind, as PID 1 or not (see `reaper`).
            // Not with output.kubernetes, which has no notify: the kube client's credential
            // plugins are children it waits for itself, unregistered, whose exit status a
            // reaper would take.
            reaper::adopt();
            let store = Store::files(dir.clone());
            let admin = AdminServer::start(admin_listener, &config, &metrics, None).await?;
            let result = daemon::run(config_path, config, store, lock, metrics, logging, signals).await;
            admin.stop().await;
            result
        }
        #[cfg(feature = "kubernetes")]
        Output::Kubernetes(k) => {
            // output.kubernetes.token_api: the admin server asks the gate, which reaches the API
            // once run_central has found it.
            let gate = k.token_api.then(|| Arc::new(magento_token_sidecar::cluster::gate::Gate::new(k.clone())));
            if gate.is_some() {
                metrics.board().token_api_on();
            }
            let reviews = gate.clone().map(|g| g as Arc<dyn admin::Reviews>);
            let admin = AdminServer::start(admin_listener, &config, &metrics, reviews).await?;
            let result = daemon::run_central(config_path, config, metrics, logging, signals, gate).await;
            admin.stop().await;
            result
        }
        #[cfg(not(feature = "kubernetes"))]
        Output::Kubernetes(_) => Err(StartError::NoKubernetes),
    }
}

/// The admin server's task, while the daemon runs.
struct AdminServer {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl AdminServer {
    /// Serves on `listener`, else on `admin.listen` (none when it is `""`).
    async fn start(
        listener: Option<TcpListener>,
        config: &Config,
        metrics: &Arc<Metrics>,
        token_api: Option<Arc<dyn admin::Reviews>>,
    ) -> Result<AdminServer, StartError> {
        let listener = match (listener, config.admin_listen) {
            (Some(l), _) => Some(l),
            (None, Some(addr)) => {
                Some(TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?)
            }
            (None, None) => None,
        };
        let stop = CancellationToken::new();
        let task = listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                info!(address = %addr, max_connections = admin::connection_limit(), "admin server listening");
            }
            let admin = admin::Admin { metrics: metrics.clone(), token_api };
            tokio::spawn(admin::serve(listener, admin, stop.clone().cancelled_owned()))
        });
        Ok(AdminServer { stop, task })
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

async fn once(config: Config, passwords: ReadPasswords, timeout: Duration) -> u8 {
    if config.notify.is_some() {
        info!("notify is not used by once: the app, started after it (an init container) or apart from it, reads the files it wrote");
    }
    let results = match &config.output {
        Output::Files(dir) => match DirLock::acquire(&dir.dir) {
            // Held until the pass is over.
            Ok(_lock) => {
                daemon::once(&config, passwords, timeout, &Store::files(dir.clone())).await.map_err(StartError::from)
            }
            Err(e) => Err(e.into()),
        },
        #[cfg(feature = "kubernetes")]
        Output::Kubernetes(_) => daemon::once_central(&config, timeout, Board::new()).await,
        #[cfg(not(feature = "kubernetes"))]
        Output::Kubernetes(_) => Err(StartError::NoKubernetes),
    };
    let results = match results {
        Ok(results) => results,
        Err(e) => {
            error!(error = %e, "once: nothing written");
            eprintln!("{e}");
            return e.exit_code();
        }
    };
    let mut failed = 0;
    for r in &results {
        match &r.outcome {
            Ok(expires_at) => info!(
                customer = %r.customer,
                result = "success",
                file = %r.place,
                expires_at = %rfc3339(*expires_at),
                "token written"
            ),
            Err(e) => {
                failed += 1;
                error!(customer = %r.customer, result = e.class(), error = %e, "no token written");
            }
        }
    }
    info!(written = results.len() - failed, failed, "once: done");
    if failed == 0 {
        0
    } else {
        FAILED
    }
}

/// The commands that need the dev server crate: `demo` and the hidden `devserver`.
#[cfg(feature = "demo")]
mod dev {
    use futures::StreamExt;
    use tokio::net::TcpListener;

    use magento_token_sidecar::demo;
    use magento_token_sidecar::logging;
    use magento_token_sidecar::signals::{self, Signal};

    use super::{serve, FAILED};

    pub async fn run_demo(graphql: bool, login_as_customer: bool) -> u8 {
        let demo = match demo::prepare(graphql, login_as_customer).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("demo: {e}");
                return FAILED;
            }
        };
        let config_path = demo.dir.path().join("demo.yaml");
        if let Err(e) = std::fs::write(&config_path, &demo.text) {
            eprintln!("demo: {e}");
            return FAILED;
        }
        let logging = logging::init(demo.config.log.format, &demo.config.log.level);
        // The usual admin port when it is free, else any.
        let listener = match TcpListener::bind("127.0.0.1:9102").await {
            Ok(l) => l,
            Err(_) => match TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("demo: cannot listen on loopback: {e}");
                    return FAILED;
                }
            },
        };
        let admin = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let tokens = demo.config.output.dir().map(|d| d.dir.display().to_string()).unwrap_or_default();
        let base = demo.server.base_url();
        let (dialect, use_token) = if graphql {
            (
                "GraphQL (magento.api: graphql)",
                format!(
                    "curl -s -H \"Authorization: Bearer $(cat {tokens}/alice)\" -H 'Content-Type: application/json' -d '{{\"query\":\"{{ customer {{ email }} }}\"}}' {}",
                    demo.server.graphql_url()
                ),
            )
        } else {
            (
                "REST (run `demo --graphql` for GraphQL)",
                format!("curl -s -H \"Authorization: Bearer $(cat {tokens}/alice)\" {base}/rest/V1/customers/me"),
            )
        };
        println!(
            "\nmagento-token-sidecar demo\n\
             \n  Magento-compatible server  {base}  (alice@example.com, bob@example.com; tokens live {life})\
             \n  logins and checks          {dialect}\
             \n  customer tokens            {how}\
             \n  token files                {tokens}/alice, {tokens}/bob.token (the token alone, no newline)\
             \n  status                     http://{admin}/status\
             \n  metrics                    http://{admin}/metrics\
             \n  configuration              {config}  (edit it, then: kill -HUP {pid})\
             \n\n  use a token:\n    {use_token}\
             \n\n  Ctrl-C stops the demo and removes its directory.\n",
            life = humantime::format_duration(demo::DEMO_TOKEN_LIFETIME),
            how = if login_as_customer {
                "Login as Customer: no customer password; the admin \"token-robot\" with Google Authenticator 2FA (run `demo` for passwords)"
            } else {
                "each customer's password (run `demo --login-as-customer` for none)"
            },
            config = config_path.display(),
            pid = std::process::id(),
        );
        let code = serve(&config_path, demo.config, Some(listener), &logging).await;
        demo.server.shutdown().await;
        code
    }

    pub async fn run_devserver(args: magento_devserver::DevServerArgs) -> u8 {
        let stop = match signals::listen() {
            Ok(mut s) => {
                async move {
                    while let Some(sig) = s.next().await {
                        if matches!(sig, Signal::Shutdown(_)) {
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("cannot install signal handlers: {e}");
                return FAILED;
            }
        };
        match magento_devserver::run_cli(args, stop).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("devserver: {e}");
                FAILED
            }
        }
    }
}

/// A build without the dev server (the container image) has no demo: say how to get one.
#[cfg(not(feature = "demo"))]
mod dev {
    pub async fn run_demo(_graphql: bool, _login_as_customer: bool) -> u8 {
        eprintln!(
            "this build has no demo (built without the `demo` feature, as the container image is): run `cargo run --release -- demo` in the source tree"
        );
        super::FAILED
    }
}
