//! The configuration file: serde types, defaults, loading and validation.
//!
//! Loading happens in two passes. Parsing (serde_yaml) stops at the first syntax error, wrong
//! type or unknown key and reports it with its key path, line and column. Validation then looks at the whole parsed file and reports *every* problem at once,
//! each with its key path, so an operator fixes a file in one round trip.
//!
//! [`Config`] is the validated result the rest of the crate works with: every customer's
//! effective URL, store code and file path are resolved here, once.

pub mod kubernetes;
pub mod notify;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::fs::{self, Owner, Perms, ReadError};
use crate::secret::Secret;
use crate::sink;

/// Magento locks a username after this many failed logins (`oauth/authentication_lock/max_failures_count`).
pub const MAGENTO_LOCK_FAILURES: u32 = 6;

// ---------------------------------------------------------------------------------------------
// The file as written

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    magento: RawMagento,
    #[serde(default)]
    refresh: RefreshSettings,
    output: RawOutput,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    customers: Vec<RawCustomer>,
    #[serde(default)]
    notify: Option<notify::RawNotify>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMagento {
    base_url: String,
    #[serde(default)]
    store_code: Option<String>,
    #[serde(default = "default_timeout")]
    timeout: Dur,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    /// Exactly one of `dir` and `kubernetes`.
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    kubernetes: Option<kubernetes::RawKubernetes>,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default)]
    format: Format,
    /// A file name in `dir`: every customer's token and expiry in one JSON file.
    #[serde(default)]
    index: Option<String>,
    /// Owner and group of every file written; absent: the daemon's own.
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

fn default_mode() -> Mode {
    Mode(0o600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: default_listen() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9102".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
    #[serde(default = "default_level")]
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { format: LogFormat::default(), level: default_level() }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCustomer {
    name: String,
    username: String,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    store_code: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    file: Option<String>,
    /// Overrides `output.format` for this customer's file.
    #[serde(default)]
    format: Option<Format>,
}

const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration written as a string (`90s`, `15m`, `1h`); a bare number is refused because its
/// unit would be a guess.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"90s\", \"15m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format_args!("invalid duration {v:?} ({e}); write e.g. \"90s\", \"15m\" or \"1h\""))
                })?;
                // Far beyond any sensible setting, and where time arithmetic would overflow.
                if d > MAX_DURATION {
                    return Err(E::custom(format_args!("duration {v:?} is longer than 10 years")));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file mode written as a quoted octal string of exactly four digits, `"0000"` to `"0777"`.
/// A bare number is refused: YAML reads `0600` as the decimal 600 or the octal 384 depending on
/// the parser's YAML version. So is any other spelling (`"+0600"`, `"600"`, `"0o600"`,
/// `"00600"`): Rust's number parser takes a sign, and a reader of the file should see the mode
/// exactly as `ls -l` and `chmod` show it.
#[derive(Debug, Clone, Copy)]
struct Mode(u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quoted octal string like \"0600\" (a bare number is misread by YAML)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let four_digits = v.len() == 4 && v.starts_with('0') && v.bytes().all(|b| matches!(b, b'0'..=b'7'));
                match u32::from_str_radix(v, 8) {
                    Ok(m) if four_digits => Ok(Mode(m)),
                    _ => Err(E::custom(format_args!(
                        "invalid mode {v:?}: write exactly four octal digits between \"0000\" and \"0777\", like \"0600\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// The validated configuration

/// `output.format` and `customers[].format`: the token file's shape, which [`crate::format`] owns.
pub use crate::format::Format;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub magento: MagentoSettings,
    pub refresh: RefreshSettings,
    pub output: Output,
    /// `None` when `admin.listen` is `""`.
    pub admin_listen: Option<SocketAddr>,
    pub log: LogSettings,
    pub customers: Vec<CustomerConfig>,
    /// `None` without a `notify` section.
    pub notify: Option<notify::NotifySettings>,
}

/// What the shared HTTP client is built from: a change here means a new client.
#[derive(Debug, Clone, PartialEq)]
pub struct MagentoSettings {
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

/// `refresh`, read straight from the file: every key is optional, and the defaults below are
/// the contract's, written once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshSettings {
    #[serde(deserialize_with = "duration")]
    pub before_expiry: Duration,
    #[serde(deserialize_with = "duration")]
    pub jitter: Duration,
    #[serde(deserialize_with = "duration")]
    pub default_lifetime: Duration,
    #[serde(deserialize_with = "duration")]
    pub min_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
    pub max_auth_failures: u32,
    #[serde(deserialize_with = "duration")]
    pub auth_failure_pause: Duration,
    pub max_concurrent_logins: usize,
    /// Waits after the first, second, ... 401 in a row (the last one repeats), before the pause.
    #[serde(deserialize_with = "durations")]
    pub auth_failure_delays: Vec<Duration>,
    /// The store's `oauth/authentication_lock/max_failures_count`.
    pub lockout_threshold: u32,
    /// The store's `oauth/authentication_lock/timeout`.
    #[serde(deserialize_with = "duration")]
    pub lockout_window: Duration,
    /// What clears Magento's failure count for a username.
    pub lockout_reset: LockoutReset,
    /// How often the token on disk is checked with `GET customers/me` (a revoked token is
    /// replaced at once); zero turns checks off.
    #[serde(deserialize_with = "duration")]
    pub validate_every: Duration,
}

/// What clears Magento's failure count for a username (`refresh.lockout_reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockoutReset {
    /// Only a successful login: safe on a store whose cron does not run, where an expired
    /// count keeps counting.
    #[default]
    Success,
    /// Also Magento's cron, `lockout_window` after the last failure: for stores whose cron runs.
    Window,
}

impl Default for RefreshSettings {
    /// The contract's defaults.
    fn default() -> Self {
        let m = |mins: u64| Duration::from_secs(mins * 60);
        RefreshSettings {
            before_expiry: m(15),
            jitter: m(1),
            default_lifetime: m(60),
            min_backoff: Duration::from_secs(1),
            max_backoff: m(5),
            max_auth_failures: 3,
            auth_failure_pause: m(31),
            max_concurrent_logins: 8,
            auth_failure_delays: vec![m(1), m(5)],
            lockout_threshold: MAGENTO_LOCK_FAILURES,
            lockout_window: m(30),
            lockout_reset: LockoutReset::Success,
            validate_every: m(10),
        }
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Dur::deserialize(d).map(|d| d.0)
}

fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<Dur>::deserialize(d).map(|v| v.into_iter().map(|d| d.0).collect())
}

/// `output`: where the tokens go. (`output.format` is resolved into each customer's `format`.)
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// `output.dir`: a file per customer, named by its `file`, with its ledger beside it.
    Files(OutputDir),
    /// `output.kubernetes`: a key per customer (its `file`) in one Secret, written by the
    /// holder of a Lease alone.
    Kubernetes(kubernetes::KubeSettings),
}

impl Output {
    /// The directory's settings, unless the tokens go to a Secret.
    pub fn dir(&self) -> Option<&OutputDir> {
        match self {
            Output::Files(dir) => Some(dir),
            Output::Kubernetes(_) => None,
        }
    }

    /// `tokens in /var/run/tokens`, `tokens in the Secret shop/magento-tokens, written by the
    /// holder of the Lease magento-token-sidecar`: what `check` says of it.
    pub fn describe(&self) -> String {
        match self {
            Output::Files(dir) => format!("tokens in {}", dir.dir.display()),
            Output::Kubernetes(k) => format!(
                "tokens in the Secret {}{}, written by the holder of the Lease {}",
                k.namespace.as_ref().map(|ns| format!("{ns}/")).unwrap_or_default(),
                k.secret,
                k.lease
            ),
        }
    }
}

/// `output.dir` and what its files get.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputDir {
    pub dir: PathBuf,
    /// `output.mode`.
    pub mode: u32,
    /// `output.uid` and `output.gid`: given to every token file, the ledgers and the index.
    pub owner: Owner,
    /// `<dir>/<output.index>`: every customer's token and expiry in one JSON file.
    pub index: Option<PathBuf>,
}

impl OutputDir {
    /// What every file written in `dir` gets before any content: `mode`, and the owner.
    pub fn perms(&self) -> Perms {
        Perms { mode: self.mode, owner: self.owner }
    }

    /// `<dir>/<file>`: the customer's token file.
    pub fn path(&self, customer: &CustomerConfig) -> PathBuf {
        self.dir.join(&customer.file)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CustomerConfig {
    pub name: String,
    pub username: String,
    pub password: PasswordSource,
    /// The base URL in effect for this customer (its own or `magento.base_url`): one copy shared
    /// by every customer that has no URL of its own (a `Url` is about 120 bytes).
    pub base_url: std::sync::Arc<Url>,
    /// The store code in effect for this customer (its own or `magento.store_code`).
    pub store_code: Option<String>,
    /// Its `file`, else its name: the file's name in `output.dir`, or its key in the Secret
    /// (the store makes it a place: [`crate::store::Store`]).
    pub file: String,
    /// The format of its file: its own `format`, else `output.format`.
    pub format: Format,
}

impl CustomerConfig {
    /// `POST {base}/rest[/<store>]/V1/integration/customer/token`
    pub fn token_url(&self) -> Url {
        self.rest_url("V1/integration/customer/token")
    }

    /// `GET {base}/rest[/<store>]/V1/customers/me`
    pub fn me_url(&self) -> Url {
        self.rest_url("V1/customers/me")
    }

    /// The base URL with the route appended to its path: only the path is parsed again, not
    /// the whole URL (parsing URLs, the host's IDNA processing included, was 18 % of `once`'s
    /// instructions: benches/RESULTS.md).
    fn rest_url(&self, route: &str) -> Url {
        let mut url = Url::clone(&self.base_url);
        let base = url.path().trim_end_matches('/');
        let path = match &self.store_code {
            Some(store) => format!("{base}/rest/{store}/{route}"),
            None => format!("{base}/rest/{route}"),
        };
        url.set_path(&path);
        url
    }

    /// The settings whose change means the token on disk may belong to someone else.
    pub fn same_login(&self, other: &CustomerConfig) -> bool {
        self.username == other.username
            && self.base_url == other.base_url
            && self.store_code == other.store_code
            && self.password == other.password
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

/// The most a password file may hold: a password and a newline, with room to spare.
pub const MAX_PASSWORD_FILE: usize = 4 * 1024;
/// The most read of `magento.ca_file`: a bundle of every public root is about 200 KiB.
const MAX_CA_FILE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password_file {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    /// Not a regular file, or too large: `is a FIFO, not a regular file`.
    #[error("password_file {path} {why}")]
    Refused { path: PathBuf, why: ReadError },
    #[error("password_file {0}: the file is empty")]
    EmptyFile(PathBuf),
    #[error("password_file {0}: not UTF-8 text")]
    NotText(PathBuf),
    #[error("password_env {0}: not set")]
    EnvMissing(String),
    #[error("password_env {0}: empty")]
    EnvEmpty(String),
}

impl PasswordSource {
    /// Reads the password afresh: a mounted Secret may have been rotated since the last login.
    /// One trailing newline is stripped, nothing else.
    ///
    /// A password file is opened without blocking and must be a regular file of at most
    /// [`MAX_PASSWORD_FILE`] bytes: a FIFO would stop the daemon waiting for a writer, and a
    /// device or a huge file would be read whole into memory (and sent). Symbolic links are
    /// followed: Kubernetes mounts a Secret's keys as links through `..data`.
    pub fn read(&self) -> Result<Secret, PasswordError> {
        match self {
            PasswordSource::File(path) => {
                let (bytes, _) = fs::read_regular(path, MAX_PASSWORD_FILE, true).map_err(|e| match e {
                    ReadError::Io(source) => PasswordError::File { path: path.clone(), source },
                    why => PasswordError::Refused { path: path.clone(), why },
                })?;
                let text = std::str::from_utf8(&bytes).map_err(|_| PasswordError::NotText(path.clone()))?;
                let text = text.strip_suffix('\n').unwrap_or(text);
                if text.is_empty() {
                    return Err(PasswordError::EmptyFile(path.clone()));
                }
                Ok(Secret::new(text.to_owned()))
            }
            PasswordSource::Env(var) => match std::env::var(var) {
                Ok(v) if v.is_empty() => Err(PasswordError::EnvEmpty(var.clone())),
                Ok(v) => Ok(Secret::new(v)),
                Err(_) => Err(PasswordError::EnvMissing(var.clone())),
            },
        }
    }

    fn key(&self) -> &'static str {
        match self {
            PasswordSource::File(_) => "password_file",
            PasswordSource::Env(_) => "password_env",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One problem in a configuration file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{}: {n} problem{}", self.file.display(), if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// What validation looks at beyond the file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// Only the file's content: used in unit tests.
    Static,
    /// Also the world the daemon will run in: password sources readable, output directory a
    /// writable directory, the CA file a PEM bundle. Used by `check`, at start and on reload.
    Environment,
}

// ---------------------------------------------------------------------------------------------
// Loading

/// The most read of a configuration file: a customer takes three lines (some 150 bytes), so
/// this is room for over 25,000.
pub const MAX_CONFIG_FILE: usize = 4 * 1024 * 1024;

/// Reads, parses and validates a configuration file.
///
/// The file is read as a password file is ([`fs::read_regular`]): without blocking, a regular
/// file of at most [`MAX_CONFIG_FILE`] bytes. A FIFO swapped in before a SIGHUP would otherwise
/// stop the whole daemon (`/healthz` and SIGTERM included) waiting for a writer, and a device
/// would be read until memory runs out. Symbolic links are followed: a ConfigMap's keys are
/// mounted as links through `..data`.
pub fn load(file: &Path, checks: Checks) -> Result<Config, ConfigError> {
    load_keeping(file, checks, false).map(|(config, _)| config)
}

/// The passwords [`Checks::Environment`] read, one per customer in order: `once` logs every
/// customer in right after its check, with the password just read instead of reading it again
/// (a third of the system calls of a login; a retry reads it afresh).
pub type ReadPasswords = Vec<Option<Secret>>;

/// [`load`] with [`Checks::Environment`], keeping the passwords it read.
pub fn load_with_passwords(file: &Path) -> Result<(Config, ReadPasswords), ConfigError> {
    load_keeping(file, Checks::Environment, true)
}

fn load_keeping(file: &Path, checks: Checks, keep: bool) -> Result<(Config, ReadPasswords), ConfigError> {
    let fail = |message: String| ConfigError {
        file: file.to_path_buf(),
        problems: vec![Problem { path: String::new(), message }],
    };
    let (bytes, _) = fs::read_regular(file, MAX_CONFIG_FILE, true).map_err(|e| match e {
        ReadError::Io(e) => fail(format!("cannot read the configuration file: {e}")),
        refused => fail(format!("the configuration file {refused}")),
    })?;
    let text =
        std::str::from_utf8(&bytes).map_err(|e| fail(format!("the configuration file is not UTF-8 text ({e})")))?;
    parse_keeping(text, checks, keep).map_err(|problems| ConfigError { file: file.to_path_buf(), problems })
}

/// Parses and validates a configuration from YAML text.
pub fn parse(text: &str, checks: Checks) -> Result<Config, Vec<Problem>> {
    parse_keeping(text, checks, false).map(|(config, _)| config)
}

fn parse_keeping(text: &str, checks: Checks, keep: bool) -> Result<(Config, ReadPasswords), Vec<Problem>> {
    if let Some(line) = bare_number_mode(text) {
        return Err(vec![Problem {
            path: "output.mode".into(),
            message: format!(
                "write the mode as a quoted octal string like \"0600\" (a bare number is misread by YAML) at line {line}"
            ),
        }]);
    }
    // serde_yaml's message already starts with the key path and ends with line and column.
    let raw: RawConfig =
        serde_yaml::from_str(text).map_err(|e| vec![Problem { path: String::new(), message: e.to_string() }])?;
    validate(raw, checks, keep)
}

impl Config {
    /// What is allowed but risky in the world the daemon runs in: printed by `check`, logged
    /// at the start of `run` and `once`.
    pub fn warnings(&self) -> Vec<Problem> {
        use std::os::unix::fs::PermissionsExt;
        let mut warnings = Vec::new();
        let Output::Files(output) = &self.output else { return warnings };
        if output.mode & 0o004 != 0 {
            warnings.push(Problem {
                path: "output.mode".into(),
                message: format!(
                    "\"{:04o}\" makes every token file readable by other users: anyone with a shell on this machine (or in this container) can read the tokens and act as the customers; use \"0600\" (or \"0640\" for readers in the file's group)",
                    output.mode
                ),
            });
        }
        if let Ok(meta) = std::fs::metadata(&output.dir) {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 {
                warnings.push(Problem {
                    path: "output.dir".into(),
                    message: format!(
                        "{} is writable by other users (mode {mode:04o}): another user can plant files or symbolic links there, at a token's path before the daemon writes it or beside it; use a directory only the daemon's user (and its group) can write to",
                        output.dir.display()
                    ),
                });
            }
        }
        warnings
    }
}

/// The line of an unquoted numeric `mode:` value. serde_yaml hands `0600` over as the string
/// "0600" while other YAML readers (Helm's, Python's) see the number 384: the contract refuses
/// the ambiguity, and only the text shows whether the value was quoted. `mode` is a key of
/// `output` alone (anywhere else it is an unknown key, refused anyway); it may stand at the start
/// of a line or inside a flow mapping (`output: {dir: /x, mode: 0600}`).
fn bare_number_mode(text: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.split(" #").next().unwrap_or(line);
            line.match_indices("mode:").any(|(at, _)| {
                let before = line[..at].trim_end().chars().last();
                let key_starts = matches!(before, None | Some('{' | ',' | '-'));
                let value = line[at + "mode:".len()..].trim_start();
                key_starts && value.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-')
            })
        })
        .map(|i| i + 1)
}

/// Whether `level` is a log level, or a filter made of `target=level` directives. A bare word
/// that is not a level would be read as a target name and silence every log line.
fn valid_log_level(level: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    !level.trim().is_empty()
        && tracing_subscriber::EnvFilter::builder().parse(level).is_ok()
        && level.split(',').all(|d| {
            let d = d.trim();
            d.contains('=') || LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d))
        })
}

fn validate(raw: RawConfig, checks: Checks, keep: bool) -> Result<(Config, ReadPasswords), Vec<Problem>> {
    let mut v = Validator { kept: keep.then(Vec::new), ..Validator::default() };
    let base_url = check_magento(&mut v, &raw.magento, checks);
    check_refresh(&mut v, &raw.refresh);
    let output = check_output(&mut v, &raw.output, checks);
    let admin_listen = check_admin(&mut v, &raw.admin.listen);
    check_log(&mut v, &raw.log.level);
    let customers = check_customers(&mut v, &raw, base_url, checks);
    check_index(&mut v, &raw);
    if let Some(Output::Kubernetes(k)) = &output {
        check_secret_size(&mut v, k, &customers);
        if raw.notify.is_some() {
            // The holder's own pod is the only one that would be told; the apps read the
            // mounted Secret, which the kubelet updates.
            v.problem("notify", "does not apply to output.kubernetes: only the Lease holder's pod would be told, while the apps read the mounted Secret, which the kubelet updates; an app that got a 401 asks POST /refresh/<name>".into());
        }
    }
    let notify = raw.notify.as_ref().and_then(|n| notify::check(n, checks, &mut v.problems));
    let output = match output {
        Some(output) if v.problems.is_empty() => output,
        _ => return Err(v.problems),
    };
    let config = Config {
        magento: MagentoSettings { timeout: raw.magento.timeout.0, ca_file: raw.magento.ca_file },
        refresh: raw.refresh,
        output,
        admin_listen,
        log: LogSettings { format: raw.log.format, level: raw.log.level },
        customers,
        notify,
    };
    Ok((config, v.kept.unwrap_or_default()))
}

/// `magento`: returns the base URL when it is good.
fn check_magento(v: &mut Validator, m: &RawMagento, checks: Checks) -> Option<Url> {
    let base_url = v.url("magento.base_url", &m.base_url, m.allow_insecure_http);
    if let Some(code) = &m.store_code {
        v.store_code("magento.store_code", code);
    }
    v.positive("magento.timeout", m.timeout.0);
    if let (Some(ca), Checks::Environment) = (&m.ca_file, checks) {
        v.ca_file("magento.ca_file", ca);
    }
    base_url
}

/// `refresh`: every duration and count, and how they must relate to Magento's lock.
fn check_refresh(v: &mut Validator, r: &RefreshSettings) {
    v.positive("refresh.before_expiry", r.before_expiry);
    v.positive("refresh.default_lifetime", r.default_lifetime);
    v.positive("refresh.min_backoff", r.min_backoff);
    if r.jitter >= r.before_expiry {
        v.problem("refresh.jitter", format!("must be less than refresh.before_expiry ({})", show(r.before_expiry)));
    }
    if r.min_backoff > r.max_backoff {
        v.problem("refresh.max_backoff", format!("must be at least refresh.min_backoff ({})", show(r.min_backoff)));
    }
    if r.lockout_threshold < 2 {
        v.problem("refresh.lockout_threshold", "must be at least 2 (Magento's default is 6)".into());
    } else if r.max_auth_failures == 0 || r.max_auth_failures >= r.lockout_threshold {
        v.problem(
            "refresh.max_auth_failures",
            format!(
                "must be between 1 and {}: Magento locks a username at {} failed logins",
                r.lockout_threshold - 1,
                r.lockout_threshold
            ),
        );
    }
    if r.lockout_reset == LockoutReset::Window && r.auth_failure_pause <= r.lockout_window {
        v.problem(
            "refresh.auth_failure_pause",
            format!(
                "must be longer than refresh.lockout_window ({}), or Magento's failure count carries over and locks the customer",
                show(r.lockout_window)
            ),
        );
    }
    if r.auth_failure_delays.is_empty() {
        v.problem("refresh.auth_failure_delays", "must list at least one duration".into());
    }
    for (i, d) in r.auth_failure_delays.iter().enumerate() {
        v.positive(&format!("refresh.auth_failure_delays[{i}]"), *d);
    }
    if r.max_concurrent_logins == 0 {
        v.problem("refresh.max_concurrent_logins", "must be at least 1".into());
    }
}

/// `output`: the directory (writable, with `Checks::Environment`), a mode no one else can write,
/// and an owner this process may give files to; or the Secret. `None` once a problem is said.
fn check_output(v: &mut Validator, o: &RawOutput, checks: Checks) -> Option<Output> {
    let dir = match (&o.dir, &o.kubernetes) {
        (Some(dir), None) => dir,
        (None, Some(k)) => return check_kubernetes_output(v, o, k).map(Output::Kubernetes),
        (Some(_), Some(_)) => {
            v.problem("output.kubernetes", "give exactly one of output.dir and output.kubernetes, not both".into());
            return None;
        }
        (None, None) => {
            v.problem("output.dir", "one of output.dir and output.kubernetes is required".into());
            return None;
        }
    };
    let before = v.problems.len();
    if dir.as_os_str().is_empty() {
        v.problem("output.dir", "must not be empty".into());
    } else if checks == Checks::Environment {
        v.writable_dir("output.dir", dir);
    }
    let dir_ok = v.problems.len() == before;

    let mode = o.mode.0;
    if mode & 0o444 == 0 {
        v.problem(
            "output.mode",
            format!(
                "\"{mode:04o}\" lets no one read the token files, the app included; use \"0600\" (or \"0640\" for readers in the file's group)"
            ),
        );
    }
    if mode & 0o022 != 0 {
        v.problem(
            "output.mode",
            format!(
                "\"{mode:04o}\" makes every token file writable by its group or by others, who could replace the token the app sends; use \"0600\" (or \"0640\" for readers in the file's group)"
            ),
        );
    }

    for (key, id) in [("output.uid", o.uid), ("output.gid", o.gid)] {
        if id == Some(u32::MAX) {
            v.problem(key, format!("{}: not an id (chown reads it as \"leave unchanged\")", u32::MAX));
        }
    }
    let owner = owner_of(o);
    if checks == Checks::Environment && owner.is_set() && v.problems.len() == before {
        let refused = ownership_problems(owner, &Credentials::current());
        let none = refused.is_empty();
        v.problems.extend(refused);
        // The credentials allow it: a file given that owner for real, as every write does it
        // (a user namespace or a file system may still refuse).
        if none && dir_ok {
            if let Err(e) = probe_owner(dir, Perms { mode, owner }) {
                let (key, id) = match owner.uid {
                    Some(uid) => ("output.uid", uid),
                    None => ("output.gid", owner.gid.unwrap_or_default()),
                };
                v.problem(key, format!("{id}: a test file in {} could not be given to {owner}: {e}", dir.display()));
            }
        }
    }
    let index = o.index.as_ref().map(|name| dir.join(name));
    Some(Output::Files(OutputDir { dir: dir.clone(), mode, owner, index }))
}

/// `output.kubernetes`: a Secret has no owner, no file mode and no room for an index file:
/// the app's volume decides the files' mode and owner.
fn check_kubernetes_output(
    v: &mut Validator,
    o: &RawOutput,
    k: &kubernetes::RawKubernetes,
) -> Option<kubernetes::KubeSettings> {
    for (key, set) in [("output.uid", o.uid.is_some()), ("output.gid", o.gid.is_some())] {
        if set {
            v.problem(key, "does not apply to output.kubernetes: the app's secret volume sets the files' owner (fsGroup) and mode (defaultMode)".into());
        }
    }
    if o.index.is_some() {
        v.problem("output.index", "is not written with output.kubernetes: each customer's token is a key of the Secret, and the mounted Secret is the directory".into());
    }
    if !cfg!(feature = "kubernetes") {
        v.problem("output.kubernetes", NO_KUBERNETES.into());
    }
    kubernetes::check(k, &mut v.problems)
}

/// Why a build without the `kubernetes` feature refuses `output.kubernetes`, which it still
/// parses and checks like any other key: every command reports it as a bad configuration.
pub const NO_KUBERNETES: &str =
    "this build has no Kubernetes support (the sidecar image); use the central image, or build with --features kubernetes";

/// Every customer's content, with a token of the size `check` assumes, in one Secret.
fn check_secret_size(v: &mut Validator, k: &kubernetes::KubeSettings, customers: &[CustomerConfig]) {
    let token = crate::secret::Secret::new("x".repeat(kubernetes::ASSUMED_TOKEN_BYTES));
    let when = std::time::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let sizes: Vec<usize> =
        customers.iter().map(|c| crate::format::render(c.format, &c.name, &token, when, when).len()).collect();
    if let Err(why) = kubernetes::check_size(&sizes, &k.secret) {
        v.problem("customers", why);
    }
}

fn owner_of(o: &RawOutput) -> Owner {
    Owner { uid: o.uid, gid: o.gid }
}

/// What this process may do about the owner of the files it creates.
#[derive(Debug, Clone)]
struct Credentials {
    /// Effective user and group, and the supplementary groups.
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    /// Effective capabilities CAP_CHOWN and CAP_FOWNER.
    chown: bool,
    fowner: bool,
}

impl Credentials {
    fn current() -> Credentials {
        use rustix::thread::CapabilitySet;
        let uid = rustix::process::geteuid().as_raw();
        // Unknown capabilities (no capget): root is taken to have them, and the probe decides.
        let caps = rustix::thread::capabilities(None).map(|c| c.effective).ok();
        let has = |cap: CapabilitySet| caps.map_or(uid == 0, |c| c.contains(cap));
        Credentials {
            uid,
            gid: rustix::process::getegid().as_raw(),
            groups: rustix::process::getgroups().unwrap_or_default().iter().map(|g| g.as_raw()).collect(),
            chown: has(CapabilitySet::CHOWN),
            fowner: has(CapabilitySet::FOWNER),
        }
    }
}

/// Whether a process with `c` may create files owned by `owner`, by the kernel's rules: a file
/// goes to another user only with CAP_CHOWN (root has it; being root without it is not
/// enough), and its mode is then set (after the owner, so no one else can open it in between)
/// only with CAP_FOWNER; its own file goes to a group without privilege only if the process is
/// a member of that group (its group, or a supplementary one: in Kubernetes the pod's
/// `fsGroup` and `supplementalGroups`), else with CAP_CHOWN.
fn ownership_problems(owner: Owner, c: &Credentials) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut refuse = |path: &str, message: String| problems.push(Problem { path: path.into(), message });
    if let Some(uid) = owner.uid.filter(|uid| *uid != c.uid) {
        if !c.chown {
            refuse(
                "output.uid",
                format!(
                    "{uid}: this process (uid {}) may not give files away; run as root or with CAP_CHOWN and CAP_FOWNER, or drop output.uid",
                    c.uid
                ),
            );
        } else if !c.fowner {
            refuse(
                "output.uid",
                format!(
                    "{uid}: this process (uid {}) has CAP_CHOWN but not CAP_FOWNER, which it needs to set the mode of a file it gave away; add CAP_FOWNER, or drop output.uid",
                    c.uid
                ),
            );
        }
    }
    if let Some(gid) = owner.gid.filter(|gid| *gid != c.gid && !c.groups.contains(gid)) {
        if !c.chown {
            refuse(
                "output.gid",
                format!(
                    "{gid}: this process (uid {}) is not a member of group {gid} and may not give files to it; run it in that group (in Kubernetes: the pod's fsGroup or supplementalGroups), as root or with CAP_CHOWN, or drop output.gid",
                    c.uid
                ),
            );
        }
    }
    problems
}

/// Writes a test file in `dir` with `perms`, as every token file is written, and removes it.
fn probe_owner(dir: &Path, perms: Perms) -> std::io::Result<()> {
    let path = dir.join(format!(".magento-token-sidecar.check-{:08x}", rand::random::<u32>()));
    sink::write_atomic(&path, perms, b"", sink::Durability::FileOnly)?;
    // (It was given the owner: that was the question. A directory that lets a file be made but
    // not removed is no reason to refuse the owner.)
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// `admin.listen`: an address, or `""` for none.
fn check_admin(v: &mut Validator, listen: &str) -> Option<SocketAddr> {
    match listen.trim() {
        "" => None,
        text => match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                v.problem(
                    "admin.listen",
                    format!("{text:?} is not an address like \"127.0.0.1:9102\" (\"\" disables the admin server)"),
                );
                None
            }
        },
    }
}

/// `log.level`.
fn check_log(v: &mut Validator, level: &str) {
    if !valid_log_level(level) {
        v.problem(
            "log.level",
            format!(
                "{:?} is not a log level (off, error, warn, info, debug, trace) or a filter like \"info,reqwest=debug\"",
                level
            ),
        );
    }
}

/// `customers`: each entry, and what no two of them may share (name, username, file).
fn check_customers(v: &mut Validator, raw: &RawConfig, base_url: Option<Url>, checks: Checks) -> Vec<CustomerConfig> {
    let base_url = base_url.map(std::sync::Arc::new);
    if raw.customers.is_empty() {
        v.problem("customers", "at least one customer is required".into());
    }
    // Borrowed, and the list sized at once: a large configuration's validation allocates
    // little beside what it keeps (`once`'s peak memory, benches/RESULTS.md).
    let mut names = HashSet::new();
    let mut usernames = std::collections::HashMap::new();
    let mut files = HashSet::new();
    let mut customers = Vec::with_capacity(raw.customers.len());
    for (i, c) in raw.customers.iter().enumerate() {
        let at = |key: &str| format!("customers[{i}].{key}");
        if !valid_name(&c.name) {
            v.problem(&at("name"), format!("{:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -", c.name));
        } else if c.name.starts_with('.') {
            v.problem(
                &at("name"),
                format!(
                    "{:?} must not start with '.' (it names the token file; such names are kept for temporary files)",
                    c.name
                ),
            );
        } else if !names.insert(c.name.as_str()) {
            v.problem(&at("name"), format!("{:?} is used by another customer", c.name));
        }
        if c.username.trim().is_empty() {
            v.problem(&at("username"), "must not be empty".into());
        } else if let Some(first) = usernames.insert(c.username.to_lowercase(), i) {
            // Magento counts failed logins per username, whatever the store view, ignoring case:
            // two entries would spend one lockout budget twice.
            v.problem(
                &at("username"),
                format!(
                    "{:?} is customers[{first}]'s username too: Magento counts failed logins per username, so two entries could lock it out together; keep one entry per username",
                    c.username
                ),
            );
        }
        let password = password_source(v, &at, c, checks);
        let url = match &c.base_url {
            Some(text) => v.url(&at("base_url"), text, raw.magento.allow_insecure_http).map(std::sync::Arc::new),
            None => base_url.clone(),
        };
        if let Some(code) = &c.store_code {
            v.store_code(&at("store_code"), code);
        }
        let file = c.file.clone().unwrap_or_else(|| c.name.clone());
        if c.file.is_some() {
            let checked = match raw.output.kubernetes {
                Some(_) => kubernetes::check_key(&file),
                None => check_file_name(&file),
            };
            if let Err(why) = checked {
                v.problem(&at("file"), why);
            }
        }
        // (A duplicate name already says it; its default file name would only repeat it.)
        let repeated = files.contains(&file);
        if repeated && (c.file.is_some() || names.len() == i + 1) {
            v.problem(&at("file"), format!("{file:?} is written by another customer too"));
        }
        if !repeated {
            files.insert(file.clone());
        }
        if let (Some(password), Some(base_url)) = (password, url) {
            customers.push(CustomerConfig {
                name: c.name.clone(),
                username: c.username.clone(),
                password,
                base_url,
                store_code: c.store_code.clone().or_else(|| raw.magento.store_code.clone()),
                file,
                format: c.format.unwrap_or(raw.output.format),
            });
        }
    }
    customers
}

/// `output.index`: a plain file name in `output.dir`, like a customer's `file`, and none of
/// theirs.
fn check_index(v: &mut Validator, raw: &RawConfig) {
    let Some(index) = &raw.output.index else { return };
    if let Err(why) = check_file_name(index) {
        v.problem("output.index", why);
        return;
    }
    let taken = raw.customers.iter().position(|c| c.file.as_deref().unwrap_or(&c.name) == index);
    if let Some(i) = taken {
        v.problem(
            "output.index",
            format!("{index:?} is customers[{i}]'s token file too: give the index a name no customer's file has"),
        );
    }
}

/// A customer's password source: exactly one of `password_file` and `password_env`, readable
/// with `Checks::Environment`.
fn password_source(
    v: &mut Validator,
    at: &dyn Fn(&str) -> String,
    c: &RawCustomer,
    checks: Checks,
) -> Option<PasswordSource> {
    let password = match (&c.password_file, &c.password_env) {
        (Some(path), None) => Some(PasswordSource::File(path.clone())),
        (None, Some(var)) if var.is_empty() => {
            v.problem(&at("password_env"), "must name an environment variable".into());
            None
        }
        (None, Some(var)) => Some(PasswordSource::Env(var.clone())),
        (Some(_), Some(_)) => {
            v.problem(&at("password_file"), "give exactly one of password_file and password_env, not both".into());
            None
        }
        (None, None) => {
            v.problem(&at("password_file"), "one of password_file and password_env is required".into());
            None
        }
    };
    let mut read = None;
    if let (Some(source), Checks::Environment) = (&password, checks) {
        match source.read() {
            Ok(secret) => read = Some(secret),
            Err(e) => v.problem(&at(source.key()), password_problem(&e)),
        }
    }
    if let Some(kept) = &mut v.kept {
        kept.push(read);
    }
    password
}

/// The problem text for an unreadable password source, without the path repeated (the key
/// path already says which customer).
fn password_problem(e: &PasswordError) -> String {
    match e {
        PasswordError::File { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "no such file".into(),
        PasswordError::File { path, source } => format!("cannot read {}: {source}", path.display()),
        PasswordError::Refused { path, why } => format!("{} {why}", path.display()),
        PasswordError::EmptyFile(path) => format!("{} is empty", path.display()),
        PasswordError::NotText(path) => format!("{} is not UTF-8 text", path.display()),
        PasswordError::EnvMissing(var) => format!("environment variable {var} is not set"),
        PasswordError::EnvEmpty(var) => format!("environment variable {var} is empty"),
    }
}

fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn check_file_name(file: &str) -> Result<(), String> {
    if file.is_empty() {
        return Err("must not be empty".into());
    }
    if file.contains('/') || file.contains('\\') || file.contains('\0') {
        return Err(format!("{file:?} must be a plain file name inside output.dir, without '/'"));
    }
    if file.starts_with('.') {
        return Err(format!("{file:?} must not start with '.' (such names are kept for temporary files)"));
    }
    if file.len() > 200 {
        return Err("must be at most 200 characters".into());
    }
    Ok(())
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    /// The passwords read, when asked to keep them ([`load_with_passwords`]).
    kept: Option<ReadPasswords>,
}

impl Validator {
    fn problem(&mut self, path: &str, message: String) {
        self.problems.push(Problem { path: path.into(), message });
    }

    fn positive(&mut self, path: &str, d: Duration) {
        if d.is_zero() {
            self.problem(path, "must be longer than 0s".into());
        }
    }

    fn url(&mut self, path: &str, text: &str, allow_http: bool) -> Option<Url> {
        let url = match Url::parse(text) {
            Ok(url) => url,
            Err(e) => {
                self.problem(path, format!("{text:?} is not a URL ({e}); write e.g. \"https://shop.example.com\""));
                return None;
            }
        };
        let before = self.problems.len();
        match url.scheme() {
            "https" => {}
            "http" if allow_http || is_loopback(&url) => {}
            "http" => self.problem(
                path,
                format!("{text:?} uses plain http to a non-loopback host: passwords would cross the network unencrypted; use https or set magento.allow_insecure_http: true"),
            ),
            other => self.problem(path, format!("{text:?} has scheme {other:?}; only https (or http) is supported")),
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.problem(path, format!("{text:?} has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(path, format!("{text:?} must not carry a query or fragment"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(path, "must not carry credentials".into());
        }
        (self.problems.len() == before).then_some(url)
    }

    fn store_code(&mut self, path: &str, code: &str) {
        let ok = code.len() <= 32
            && code.starts_with(|c: char| c.is_ascii_alphabetic())
            && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            self.problem(path, format!("{code:?} is not a Magento store code (a letter, then letters, digits or '_')"));
        }
    }

    fn ca_file(&mut self, path: &str, file: &Path) {
        match fs::read_regular(file, MAX_CA_FILE, true) {
            Err(e) if e.is_not_found() => self.problem(path, "no such file".into()),
            Err(ReadError::Io(e)) => self.problem(path, format!("cannot read {}: {e}", file.display())),
            Err(why) => self.problem(path, format!("{} {why}", file.display())),
            Ok((pem, _)) => {
                if reqwest::Certificate::from_pem_bundle(&pem).map(|c| c.is_empty()).unwrap_or(true) {
                    self.problem(path, format!("{} holds no PEM certificate", file.display()));
                }
            }
        }
    }

    fn writable_dir(&mut self, path: &str, dir: &Path) {
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.problem(path, format!("{}: no such directory", dir.display()))
            }
            Err(e) => self.problem(path, format!("{}: {e}", dir.display())),
            Ok(m) if !m.is_dir() => self.problem(path, format!("{} is not a directory", dir.display())),
            Ok(_) => {
                // A file without a name where the file system allows it (O_TMPFILE): no app
                // watching the directory sees it, nor a file of another owner.
                if let Err(e) = tempfile::tempfile_in(dir) {
                    self.problem(path, format!("{} is not writable: {e}", dir.display()));
                }
            }
        }
    }
}

/// Whether `url` points at this host's loopback (`localhost`, 127.0.0.0/8, ::1): plain http
/// may go there, and never through a proxy.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid configuration, for the tests of other modules too.
    pub(crate) const MINIMAL: &str = "
magento:
  base_url: https://shop.example.com
output:
  dir: /tmp
customers:
  - name: alice
    username: alice@example.com
    password_env: ALICE_PASSWORD
";

    fn problems(yaml: &str) -> Vec<String> {
        parse(yaml, Checks::Static).unwrap_err().iter().map(|p| p.to_string()).collect()
    }

    /// The sidecar image's build: `output.kubernetes` is parsed and checked as always, then
    /// refused by name, with what to do instead (scripts/test runs this without the feature).
    #[cfg(not(feature = "kubernetes"))]
    #[test]
    fn without_the_kubernetes_feature_output_kubernetes_is_refused_by_name() {
        let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n");
        assert_eq!(problems(&kube), ["output.kubernetes: this build has no Kubernetes support (the sidecar image); use the central image, or build with --features kubernetes"]);
        // Its own checks still run: a bad key is reported beside it.
        let bad = kube.replace("secret: magento-tokens", "secret: Not_A_Name");
        let p = problems(&bad);
        assert!(p.len() == 2 && p.iter().any(|p| p.starts_with("output.kubernetes.secret")), "{p:?}");
    }

    #[test]
    fn output_kubernetes_replaces_output_dir() {
        let kube = MINIMAL.replace("  dir: /tmp\n", "  kubernetes:\n    secret: magento-tokens\n    namespace: shop\n");
        let c = parse(&kube, Checks::Static).unwrap();
        let Output::Kubernetes(k) = &c.output else { panic!("{:?}", c.output) };
        assert_eq!(
            (k.secret.as_str(), k.lease.as_str(), k.namespace.as_deref()),
            ("magento-tokens", "magento-tokens", Some("shop"))
        );
        assert_eq!(c.customers[0].file, "alice", "the Secret's key");
        let both = MINIMAL.replace("  dir: /tmp\n", "  dir: /tmp\n  kubernetes:\n    secret: t\n");
        assert_eq!(
            problems(&both),
            ["output.kubernetes: give exactly one of output.dir and output.kubernetes, not both"]
        );
        let neither = MINIMAL.replace("  dir: /tmp\n", "  mode: \"0600\"\n");
        assert_eq!(problems(&neither), ["output.dir: one of output.dir and output.kubernetes is required"]);
        let file_only = kube.replace("    namespace: shop\n", "  index: tokens.json\n  uid: 1000\n");
        let p = problems(&file_only);
        assert!(p[0].starts_with("output.uid: does not apply to output.kubernetes"), "{p:?}");
        assert!(p[1].starts_with("output.index: is not written with output.kubernetes"), "{p:?}");
        let told = kube.clone() + "notify:\n  webhook: http://127.0.0.1:8080/rotated\n";
        let p = problems(&told);
        assert!(p.len() == 1 && p[0].starts_with("notify: does not apply to output.kubernetes"), "{p:?}");
        let bad_key = format!("{kube}    file: alice token\n");
        assert!(problems(&bad_key)[0].starts_with("customers[0].file: \"alice token\" cannot be a key of the Secret"));
        // 600 customers with json tokens of up to 2 KiB: more than 1 MiB.
        let mut many = kube.clone();
        for i in 0..600 {
            many += &format!("  - name: c{i}\n    username: c{i}@x.com\n    password_env: PW\n    format: json\n");
        }
        let p = problems(&many);
        assert!(
            p[0].starts_with("customers: 601 customers' tokens would not fit in the Secret \"magento-tokens\""),
            "{p:?}"
        );
    }

    #[test]
    fn defaults_are_the_contracts() {
        let c = parse(MINIMAL, Checks::Static).unwrap();
        assert_eq!(c.magento.timeout, Duration::from_secs(10));
        assert_eq!(c.refresh.before_expiry, Duration::from_secs(15 * 60));
        assert_eq!(c.refresh.jitter, Duration::from_secs(60));
        assert_eq!(c.refresh.default_lifetime, Duration::from_secs(3600));
        assert_eq!(c.refresh.min_backoff, Duration::from_secs(1));
        assert_eq!(c.refresh.max_backoff, Duration::from_secs(300));
        assert_eq!(c.refresh.max_auth_failures, 3);
        assert_eq!(c.refresh.auth_failure_pause, Duration::from_secs(31 * 60));
        assert_eq!(c.refresh.max_concurrent_logins, 8);
        assert_eq!(dir(&c).mode, 0o600);
        assert_eq!(c.customers[0].format, Format::Raw);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9102".parse().unwrap()));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info");
        let alice = &c.customers[0];
        assert_eq!(dir(&c).path(alice), PathBuf::from("/tmp/alice"));
        assert_eq!(alice.token_url().as_str(), "https://shop.example.com/rest/V1/integration/customer/token");
    }

    #[test]
    fn store_codes_and_path_prefixes_build_the_url() {
        let yaml = MINIMAL.replace("https://shop.example.com", "https://example.com/shop/").replace(
            "    password_env: ALICE_PASSWORD",
            "    password_env: ALICE_PASSWORD\n    store_code: de\n  - name: bob\n    username: b\n    password_env: B\n    base_url: https://shop.fr\n    file: bob.json",
        );
        let c = parse(&yaml, Checks::Static).unwrap();
        assert_eq!(
            c.customers[0].token_url().as_str(),
            "https://example.com/shop/rest/de/V1/integration/customer/token"
        );
        assert_eq!(c.customers[1].me_url().as_str(), "https://shop.fr/rest/V1/customers/me");
        assert_eq!(dir(&c).path(&c.customers[1]), PathBuf::from("/tmp/bob.json"));
    }

    #[test]
    fn unknown_keys_are_reported_with_path_and_line() {
        let p = problems(&MINIMAL.replace("  base_url:", "  base_ur: x\n  base_url:"));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("unknown field `base_ur`"), "{p:?}");
        assert!(p[0].contains("line 3 column"), "{p:?}");
        assert!(p[0].starts_with("magento"), "{p:?}");
    }

    #[test]
    fn a_bare_number_mode_is_refused() {
        for bare in ["0600", "600", "384", "0o600"] {
            let p = problems(&MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: {bare}")));
            assert!(p[0].starts_with("output.mode: "), "{p:?}");
            assert!(p[0].contains("quoted octal string"), "{p:?}");
        }
        let flow = MINIMAL.replace("output:\n  dir: /tmp", "output: {dir: /tmp, mode: 0600}");
        assert!(problems(&flow)[0].starts_with("output.mode: "));
        let quoted = MINIMAL.replace("output:\n  dir: /tmp", "output: {dir: /tmp, mode: \"0600\"}");
        assert_eq!(dir(&parse(&quoted, Checks::Static).unwrap()).mode, 0o600);
        for odd in ["1777", "+0600", "600", "0o600", "00600", " 0600", "0600\n", "-600", "０６００"] {
            let p = problems(&MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: {odd:?}")));
            assert!(p[0].starts_with("output.mode: "), "{odd:?}: {p:?}");
            assert!(p[0].contains("exactly four octal digits between \"0000\" and \"0777\""), "{odd:?}: {p:?}");
        }
        let c = parse(&MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  mode: \"0640\""), Checks::Static).unwrap();
        assert_eq!(dir(&c).mode, 0o640);
    }

    #[test]
    fn modes_that_let_others_write_token_files_are_refused() {
        let with_mode = |mode: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: \"{mode}\""));
        for bad in ["0666", "0620", "0602", "0660", "0622", "0777"] {
            let p = problems(&with_mode(bad));
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert!(p[0].starts_with("output.mode: \"0"), "{bad}: {p:?}");
            assert!(p[0].contains("writable by its group or by others"), "{bad}: {p:?}");
        }
        for good in ["0600", "0640", "0440", "0400", "0644"] {
            assert!(parse(&with_mode(good), Checks::Static).is_ok(), "{good}");
        }
    }

    #[test]
    fn modes_no_one_can_read_are_refused_and_others_reading_is_a_warning() {
        let with_mode = |mode: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  mode: \"{mode}\""));
        for none in ["0000", "0200", "0100", "0300"] {
            let p = problems(&with_mode(none));
            assert_eq!(p, [format!("output.mode: \"{none}\" lets no one read the token files, the app included; use \"0600\" (or \"0640\" for readers in the file's group)")]);
        }
        for (mode, warned) in
            [("0600", false), ("0640", false), ("0400", false), ("0644", true), ("0604", true), ("0444", true)]
        {
            let warnings: Vec<String> =
                parse(&with_mode(mode), Checks::Static).unwrap().warnings().iter().map(|w| w.to_string()).collect();
            let about_mode: Vec<&String> = warnings.iter().filter(|w| w.starts_with("output.mode: ")).collect();
            assert_eq!(about_mode.len(), usize::from(warned), "{mode}: {warnings:?}");
            if warned {
                assert!(about_mode[0].contains(&format!("\"{mode}\" makes every token file readable by other users")));
            }
        }
    }

    #[test]
    fn an_output_directory_others_can_write_is_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let yaml = MINIMAL.replace("  dir: /tmp", &format!("  dir: {}", dir.path().display()));
        let config = parse(&yaml, Checks::Static).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(config.warnings().is_empty());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let w: Vec<String> = config.warnings().iter().map(|p| p.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("output.dir: ") && w[0].contains("(mode 1777)"), "{w:?}");
        assert!(w[0].contains("another user can plant files or symbolic links there"), "{w:?}");
    }

    /// The output directory's settings of a configuration that has one.
    fn dir(c: &Config) -> &OutputDir {
        c.output.dir().expect("output.dir")
    }

    fn with_output(lines: &str) -> String {
        MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n{lines}"))
    }

    #[test]
    fn the_owner_reaches_every_file_written() {
        let c = parse(MINIMAL, Checks::Static).unwrap();
        assert_eq!(dir(&c).owner, Owner::default());
        let c = parse(&with_output("  mode: \"0640\"\n  uid: 1000\n  gid: 2000"), Checks::Static).unwrap();
        let owner = Owner { uid: Some(1000), gid: Some(2000) };
        assert_eq!(dir(&c).owner, owner);
        assert_eq!(dir(&c).perms(), Perms { mode: 0o640, owner });
        let c = parse(&with_output("  gid: 0"), Checks::Static).unwrap();
        assert_eq!(dir(&c).owner, Owner { uid: None, gid: Some(0) });
    }

    #[test]
    fn an_owner_is_a_number_that_names_an_id() {
        for (lines, key) in [
            ("  uid: -1", "output.uid: "),
            ("  uid: \"1000\"", "output.uid: "),
            ("  gid: 1.5", "output.gid: "),
            ("  gid: 4294967296", "output.gid: "),
        ] {
            let p = problems(&with_output(lines));
            assert_eq!(p.len(), 1, "{lines}: {p:?}");
            assert!(p[0].starts_with(key), "{lines}: {p:?}");
        }
        let p = problems(&with_output("  uid: 4294967295\n  gid: 4294967295"));
        assert_eq!(
            p,
            [
                "output.uid: 4294967295: not an id (chown reads it as \"leave unchanged\")",
                "output.gid: 4294967295: not an id (chown reads it as \"leave unchanged\")"
            ]
        );
    }

    #[test]
    fn giving_files_away_follows_the_kernels_rules() {
        let nobody = Credentials { uid: 65534, gid: 65534, groups: vec![2000], chown: false, fowner: false };
        let owner = |uid: Option<u32>, gid: Option<u32>| Owner { uid, gid };
        let refused = |owner: Owner, c: &Credentials| -> Vec<String> {
            ownership_problems(owner, c).iter().map(|p| p.to_string()).collect()
        };
        // Its own ids, and a supplementary group: no privilege needed.
        assert!(refused(owner(Some(65534), Some(65534)), &nobody).is_empty());
        assert!(refused(owner(None, Some(2000)), &nobody).is_empty());
        assert_eq!(
            refused(owner(Some(1000), Some(3000)), &nobody),
            [
                "output.uid: 1000: this process (uid 65534) may not give files away; run as root or with CAP_CHOWN and CAP_FOWNER, or drop output.uid",
                "output.gid: 3000: this process (uid 65534) is not a member of group 3000 and may not give files to it; run it in that group (in Kubernetes: the pod's fsGroup or supplementalGroups), as root or with CAP_CHOWN, or drop output.gid",
            ]
        );
        // Root with every capability dropped but CHOWN: any group, but no other user.
        let chown_only = Credentials { uid: 0, gid: 0, groups: vec![], chown: true, fowner: false };
        assert!(refused(owner(None, Some(3000)), &chown_only).is_empty());
        assert_eq!(
            refused(owner(Some(1000), None), &chown_only),
            ["output.uid: 1000: this process (uid 0) has CAP_CHOWN but not CAP_FOWNER, which it needs to set the mode of a file it gave away; add CAP_FOWNER, or drop output.uid"]
        );
        // Root without CAP_CHOWN is refused like anyone; with both, anything goes.
        let root_without = Credentials { chown: false, fowner: true, ..chown_only.clone() };
        assert_eq!(refused(owner(Some(1000), Some(3000)), &root_without).len(), 2);
        assert!(refused(owner(Some(0), Some(0)), &root_without).is_empty(), "root's own ids");
        let root = Credentials { chown: true, fowner: true, ..chown_only };
        assert!(refused(owner(Some(1000), Some(3000)), &root).is_empty());
    }

    #[test]
    fn check_gives_a_test_file_the_owner_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = match rustix::process::geteuid().is_root() {
            true => (4321, 8765),
            false => (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()),
        };
        let yaml = format!(
            "magento:\n  base_url: https://x\noutput:\n  dir: {}\n  uid: {uid}\n  gid: {gid}\ncustomers:\n  - name: a\n    username: a\n    password_env: PATH\n",
            dir.path().display()
        );
        parse(&yaml, Checks::Environment).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left in the directory");
    }

    #[test]
    fn durations_must_be_strings_with_units() {
        let p = problems(&format!("{MINIMAL}refresh:\n  jitter: 60\n"));
        assert!(p[0].starts_with("refresh.jitter: "), "{p:?}");
        let p = problems(&format!("{MINIMAL}refresh:\n  jitter: 5 parsecs\n"));
        assert!(p[0].contains("invalid duration"), "{p:?}");
        let p = problems(&format!("{MINIMAL}refresh:\n  auth_failure_delays: [1m, 500000000000y]\n"));
        assert!(p[0].starts_with("refresh.auth_failure_delays[1]: ") && p[0].contains("longer than 10 years"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let yaml = "
magento:
  base_url: http://shop.example.com
  store_code: ../admin
output:
  dir: /tmp
refresh:
  before_expiry: 1m
  jitter: 2m
  min_backoff: 10s
  max_backoff: 5s
  max_auth_failures: 6
  auth_failure_pause: 10m
  lockout_reset: window
admin:
  listen: nowhere
log:
  level: \"[\"
customers:
  - name: alice
    username: alice@example.com
    password_env: A
  - name: alice
    username: ''
    password_file: /x
    password_env: Y
  - name: bad/name
    username: c
    file: ../escape
";
        let p = problems(yaml);
        let expect = [
            "magento.base_url: ",
            "magento.store_code: ",
            "refresh.jitter: must be less than",
            "refresh.max_backoff: must be at least",
            "refresh.max_auth_failures: must be between 1 and 5",
            "refresh.auth_failure_pause: must be longer",
            "admin.listen: ",
            "log.level: ",
            "customers[1].name: \"alice\" is used by another customer",
            "customers[1].username: must not be empty",
            "customers[1].password_file: give exactly one",
            "customers[2].name: ",
            "customers[2].password_file: one of password_file and password_env is required",
            "customers[2].file: ",
        ];
        for e in expect {
            assert!(p.iter().any(|line| line.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn one_entry_per_username_and_no_hidden_names() {
        let yaml = format!(
            "{MINIMAL}  - name: alice-de\n    username: Alice@Example.com\n    password_env: A\n    store_code: de\n  - name: .hidden\n    username: h\n    password_env: H\n"
        );
        let p = problems(&yaml);
        assert!(
            p[0].starts_with("customers[1].username: \"Alice@Example.com\" is customers[0]'s username too"),
            "{p:?}"
        );
        assert!(p[1].starts_with("customers[2].name: \".hidden\" must not start with '.'"), "{p:?}");
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn log_levels_are_levels_or_filters() {
        for ok in ["info", "DEBUG", "warn,reqwest=debug", "magento_token_sidecar=trace", "off"] {
            assert!(valid_log_level(ok), "{ok}");
        }
        for bad in ["", "inf", "verbose", "warning", "[", "info,chatty"] {
            assert!(!valid_log_level(bad), "{bad}");
        }
    }

    #[test]
    fn plain_http_is_for_loopback_unless_allowed() {
        for ok in ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:80"] {
            assert!(parse(&MINIMAL.replace("https://shop.example.com", ok), Checks::Static).is_ok(), "{ok}");
        }
        let insecure = MINIMAL.replace("https://shop.example.com", "http://shop.example.com");
        assert!(parse(&insecure, Checks::Static).is_err());
        let allowed = insecure.replace("  base_url:", "  allow_insecure_http: true\n  base_url:");
        assert!(parse(&allowed, Checks::Static).is_ok());
        assert!(problems(&MINIMAL.replace("https://shop.example.com", "ftp://x"))[0].contains("scheme"));
    }

    #[test]
    fn environment_checks_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "magento:\n  base_url: https://x\n  ca_file: {d}/ca.pem\noutput:\n  dir: {d}/missing\ncustomers:\n  - name: a\n    username: a\n    password_file: {d}/nope\n",
            d = dir.path().display()
        );
        let p: Vec<String> = parse(&yaml, Checks::Environment).unwrap_err().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            p,
            vec![
                "magento.ca_file: no such file".to_string(),
                format!("output.dir: {}/missing: no such directory", dir.path().display()),
                "customers[0].password_file: no such file".to_string(),
            ]
        );
    }

    #[test]
    fn a_customers_own_format_overrides_the_global_one() {
        let yaml = MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  format: env").replace(
            "    password_env: ALICE_PASSWORD",
            "    password_env: ALICE_PASSWORD\n  - name: bob\n    username: b\n    password_env: B\n    format: header\n  - name: carol\n    username: c\n    password_env: C\n    format: json",
        );
        let c = parse(&yaml, Checks::Static).unwrap();
        let formats: Vec<Format> = c.customers.iter().map(|c| c.format).collect();
        assert_eq!(formats, [Format::Env, Format::Header, Format::Json]);
        // Without either: raw.
        assert_eq!(parse(MINIMAL, Checks::Static).unwrap().customers[0].format, Format::Raw);
        // An unknown format names the key and the formats there are.
        let p = problems(&MINIMAL.replace("    password_env: ALICE_PASSWORD", "    password_env: A\n    format: yaml"));
        assert!(p[0].starts_with("customers[0].format: unknown variant `yaml`"), "{p:?}");
        assert!(p[0].contains("`raw`, `json`, `header`, `env`"), "{p:?}");
        let p = problems(&MINIMAL.replace("  dir: /tmp", "  dir: /tmp\n  format: Header"));
        assert!(p[0].starts_with("output.format: unknown variant `Header`"), "{p:?}");
    }

    #[test]
    fn the_index_is_a_plain_file_name_no_customer_writes() {
        let with_index = |name: &str| MINIMAL.replace("  dir: /tmp", &format!("  dir: /tmp\n  index: {name:?}"));
        assert_eq!(dir(&parse(MINIMAL, Checks::Static).unwrap()).index, None);
        let c = parse(&with_index("tokens.json"), Checks::Static).unwrap();
        assert_eq!(dir(&c).index, Some(PathBuf::from("/tmp/tokens.json")));
        for (bad, why) in [
            ("", "output.index: must not be empty"),
            ("../tokens.json", "output.index: \"../tokens.json\" must be a plain file name inside output.dir"),
            ("/etc/tokens.json", "output.index: \"/etc/tokens.json\" must be a plain file name"),
            (".tokens.json", "output.index: \".tokens.json\" must not start with '.'"),
            ("alice", "output.index: \"alice\" is customers[0]'s token file too"),
        ] {
            let p = problems(&with_index(bad));
            assert_eq!(p.len(), 1, "{bad:?}: {p:?}");
            assert!(p[0].starts_with(why), "{bad:?}: {p:?}");
        }
        // A customer's own `file` is what it writes; its name then is free.
        let yaml = with_index("alice.token").replace("ALICE_PASSWORD", "ALICE_PASSWORD\n    file: alice.token");
        assert!(problems(&yaml)[0].starts_with("output.index: \"alice.token\" is customers[0]'s token file too"));
        let yaml = with_index("alice").replace("ALICE_PASSWORD", "ALICE_PASSWORD\n    file: alice.token");
        assert_eq!(dir(&parse(&yaml, Checks::Static).unwrap()).index, Some(PathBuf::from("/tmp/alice")));
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        let example = parse(include_str!("../config/example.yaml"), Checks::Static).unwrap();
        assert_eq!(example.customers.len(), 2);
        assert_eq!(example.customers[0].token_url().as_str(), "https://shop.de/rest/de/V1/integration/customer/token");
        assert_eq!(dir(&example).path(&example.customers[0]), PathBuf::from("/var/run/magento-tokens/alice.token"));
        assert_eq!((example.customers[0].format, example.customers[1].format), (Format::Env, Format::Raw));
        assert_eq!(dir(&example).index, Some(PathBuf::from("/var/run/magento-tokens/tokens.json")));
        assert_eq!(example.customers[1].password, PasswordSource::Env("ERP_PASSWORD".into()));
        let demo =
            include_str!("../config/demo.yaml").replace("{base_url}", "http://127.0.0.1:1").replace("{dir}", "/tmp");
        assert_eq!(parse(&demo, Checks::Static).unwrap().customers.len(), 2);
    }

    #[test]
    fn password_files_lose_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        for (content, expect) in [
            ("s3cret\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("s3cret\n\n", "s3cret\n"),
            (" sp ace \n", " sp ace "),
            ("crlf\r\n", "crlf\r"),
        ] {
            std::fs::write(&file, content).unwrap();
            assert_eq!(PasswordSource::File(file.clone()).read().unwrap().expose(), expect);
        }
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(PasswordSource::File(file.clone()).read(), Err(PasswordError::EmptyFile(_))));
        // Up to 4 KiB, through symbolic links (Kubernetes' `..data`).
        std::fs::write(&file, "x".repeat(MAX_PASSWORD_FILE)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(PasswordSource::File(link).read().unwrap().expose().len(), MAX_PASSWORD_FILE);
        std::fs::write(&file, "x".repeat(MAX_PASSWORD_FILE + 1)).unwrap();
        let e = PasswordSource::File(file.clone()).read().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("password_file {} is larger than 4 KiB, the most it may hold", file.display())
        );
    }
}
