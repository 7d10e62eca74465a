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

#[cfg(feature = "kubernetes")]
use magento_token_sidecar::cluster;
use magento_token_sidecar::config::{self, Checks, Config, ConfigError, ReadPasswords};
use magento_token_sidecar::ledger::{self, Forget};
use magento_token_sidecar::logging::{self, Logging};
use magento_token_sidecar::metrics::Metrics;
use magento_token_sidecar::signals;
use magento_token_sidecar::status::Board;
use magento_token_sidecar::{admin, daemon, reaper, sink, store};

const BAD_CONFIG: u8 = 2;
const FAILED: u8 = 1;

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
    Demo,
    /// Run only the built-in Magento-compatible server (tests and benchmarks).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    Devserver(magento_devserver::DevServerArgs),
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
                let to = match &config.output.kubernetes {
                    Some(k) => format!(
                        "tokens in the Secret {}{}, written by the holder of the Lease {}",
                        k.namespace.as_ref().map(|ns| format!("{ns}/")).unwrap_or_default(),
                        k.secret,
                        k.lease
                    ),
                    None => format!("tokens in {}", config.output.dir.display()),
                };
                println!(
                    "{}: ok ({} customer{}, {to})",
                    arg.config.display(),
                    config.customers.len(),
                    if config.customers.len() == 1 { "" } else { "s" },
                );
                0
            }
            Err(code) => code,
        },
        Command::Demo => runtime.block_on(dev::run_demo()),
        #[cfg(feature = "demo")]
        Command::Devserver(args) => runtime.block_on(dev::run_devserver(args)),
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
    for name in names {
        match config.customers.iter().find(|c| &c.name == name) {
            Some(customer) => customers.push(customer),
            None => {
                eprintln!("{}: no customer named {name:?}", path.display());
                code = BAD_CONFIG;
            }
        }
    }
    let (verdicts, retry_within) = match &config.output.kubernetes {
        #[cfg(not(feature = "kubernetes"))]
        Some(_) => return no_kubernetes(),
        #[cfg(feature = "kubernetes")]
        Some(k) => match cluster::tokens::forget(
            k,
            &customers.iter().map(|c| (store::key(c), c.username.as_str())).collect::<Vec<_>>(),
        )
        .await
        {
            Ok(verdicts) => {
                (verdicts.into_iter().map(Ok).collect::<Vec<std::io::Result<Forget>>>(), k.lease_duration * 2)
            }
            Err(e) => {
                eprintln!("{e}");
                return FAILED;
            }
        },
        None => {
            (customers.iter().map(|c| store::Store::forget_failures(c)).collect::<Vec<_>>(), Duration::from_secs(2))
        }
    };
    let within = humantime::format_duration(retry_within);
    let magento = "first make sure Magento's own count is gone: the username's row in oauth_token_request_log deleted, or cleared by the store's cron";
    for (customer, verdict) in customers.iter().zip(verdicts) {
        let name = &customer.name;
        let place = match &config.output.kubernetes {
            Some(k) => format!("the Secret {}'s ledger entry {:?}", k.secret, store::key(customer)),
            None => ledger::ledger_path(&customer.path).display().to_string(),
        };
        match verdict {
            Ok(Forget::Forget { unreadable }) => {
                let replaced = if unreadable { " (it replaced a record that could not be read)" } else { "" };
                let there = if config.output.kubernetes.is_some() { " in the Secret" } else { "" };
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

/// `output.kubernetes` in a build without the `kubernetes` feature: `config::load` refuses it
/// already, so this is only the last word of a command that got past it.
#[cfg(not(feature = "kubernetes"))]
fn no_kubernetes() -> u8 {
    eprintln!("output.kubernetes: {}", config::NO_KUBERNETES);
    BAD_CONFIG
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
    // Handlers first: from here on SIGTERM means a graceful stop.
    let signals = match signals::listen() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return FAILED;
        }
    };
    // The reaper of what notify commands leave behind, as PID 1 or not (see `reaper`). Not with
    // output.kubernetes, which has no notify: the kube client's credential plugins are children
    // it waits for itself, unregistered, whose exit status a reaper would take.
    if config.output.kubernetes.is_none() {
        reaper::adopt();
    }
    // Before anything touches the output directory (or the admin port): one daemon per directory.
    // (With output.kubernetes the Lease decides who writes.)
    let lock = match config.output.kubernetes {
        Some(_) => None,
        None => match lock_output_dir(&config) {
            Some(lock) => Some(lock),
            None => return FAILED,
        },
    };
    let metrics = Arc::new(Metrics::new(Board::new()));
    let listener = match (admin_listener, config.admin_listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(error = %e, address = %addr, "cannot listen on admin.listen");
                eprintln!("cannot listen on admin.listen {addr}: {e}");
                return FAILED;
            }
        },
        (None, None) => None,
    };
    let admin_stop = CancellationToken::new();
    let admin_task = listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, max_connections = admin::connection_limit(), "admin server listening");
        }
        let admin = admin::Admin { metrics: metrics.clone() };
        tokio::spawn(admin::serve(listener, admin, admin_stop.clone().cancelled_owned()))
    });
    let result = match lock {
        Some(lock) => daemon::run(config_path, config, lock, metrics, logging, signals)
            .await
            .map_err(|e| (e.to_string(), BAD_CONFIG)),
        #[cfg(not(feature = "kubernetes"))]
        None => Err((format!("output.kubernetes: {}", config::NO_KUBERNETES), BAD_CONFIG)),
        // No API to talk to is the environment's fault, not the configuration's.
        #[cfg(feature = "kubernetes")]
        None => daemon::run_central(config_path, config, metrics, logging, signals).await.map_err(|e| (e, FAILED)),
    };
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    match result {
        Ok(()) => 0,
        Err((e, code)) => {
            error!(error = %e, "cannot start");
            eprintln!("{e}");
            code
        }
    }
}

/// The lock on the output directory (see [`sink::DirLock`]), or `None` once the reason it
/// cannot be had is logged and printed.
fn lock_output_dir(config: &Config) -> Option<sink::DirLock> {
    match sink::DirLock::acquire(&config.output.dir) {
        Ok(lock) => Some(lock),
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("{e}");
            None
        }
    }
}

async fn once(config: Config, passwords: ReadPasswords, timeout: Duration) -> u8 {
    if config.notify.is_some() {
        info!("notify is not used by once: the app, started after it (an init container) or apart from it, reads the files it wrote");
    }
    let results = if config.output.kubernetes.is_some() {
        #[cfg(not(feature = "kubernetes"))]
        return no_kubernetes();
        #[cfg(feature = "kubernetes")]
        match daemon::once_central(&config, timeout, Board::new()).await {
            Ok(results) => results,
            Err(e) => {
                error!(error = %e, "once: nothing written");
                eprintln!("{e}");
                return FAILED;
            }
        }
    } else {
        // Held until the pass is over.
        let Some(_lock) = lock_output_dir(&config) else { return FAILED };
        match daemon::once(&config, passwords, timeout).await {
            Ok(results) => results,
            Err(e) => {
                eprintln!("{e}");
                return BAD_CONFIG;
            }
        }
    };
    let mut failed = 0;
    for r in &results {
        match &r.outcome {
            Ok(expires_at) => info!(
                customer = %r.customer,
                result = "success",
                file = %r.path.display(),
                expires_at = %magento_token_sidecar::sink::rfc3339(*expires_at),
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

    pub async fn run_demo() -> u8 {
        let demo = match demo::prepare().await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("demo: {e}");
                return FAILED;
            }
        };
        let config_path = demo.dir.path().join("demo.yaml");
        let text = demo::DEMO_CONFIG
            .replace("{base_url}", &demo.server.base_url())
            .replace("{dir}", &demo.dir.path().display().to_string());
        if let Err(e) = std::fs::write(&config_path, text) {
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
        let tokens = demo.config.output.dir.display().to_string();
        let base = demo.server.base_url();
        println!(
            "\nmagento-token-sidecar demo\n\
             \n  Magento-compatible server  {base}  (alice@example.com, bob@example.com; tokens live {life})\
             \n  token files                {tokens}/alice, {tokens}/bob.token (the token alone, no newline)\
             \n  status                     http://{admin}/status\
             \n  metrics                    http://{admin}/metrics\
             \n  configuration              {config}  (edit it, then: kill -HUP {pid})\
             \n\n  use a token:\n    curl -s -H \"Authorization: Bearer $(cat {tokens}/alice)\" {base}/rest/V1/customers/me\
             \n\n  Ctrl-C stops the demo and removes its directory.\n",
            life = humantime::format_duration(demo::DEMO_TOKEN_LIFETIME),
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
    pub async fn run_demo() -> u8 {
        eprintln!(
            "this build has no demo (built without the `demo` feature, as the container image is): run `cargo run --release -- demo` in the source tree"
        );
        super::FAILED
    }
}
