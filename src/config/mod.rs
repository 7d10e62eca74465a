//! The configuration file: serde types, defaults, loading and validation.
//!
//! Loading happens in two passes. Parsing (serde_yaml) stops at the first syntax error, wrong
//! type or unknown key and reports it with its key path, line and column. Validation then looks at the whole parsed file and reports *every* problem at once,
//! each with its key path, so an operator fixes a file in one round trip.
//!
//! [`Config`] is the validated result the rest of the crate works with: every customer's
//! effective URL, store code and file path are resolved here, once.

mod api;
pub mod auth;
pub mod kubernetes;
pub mod notify;
mod output;
mod password;
mod raw;

pub use api::{Api, Endpoint};
pub use auth::{AdminLogin, Auth, ImsCredential, Method};
pub use output::NO_KUBERNETES;
use output::{check_output, check_secret_size, check_token_api};
pub use password::{PasswordError, PasswordSource, MAX_PASSWORD_FILE};
use raw::{Dur, RawApi, RawConfig, RawCustomer, RawMagento};

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::de::Deserializer;
use serde::Deserialize;

use crate::fs::{self, Owner, Perms, ReadError};
use crate::secret::Secret;

/// Magento locks a username after this many failed logins (`oauth/authentication_lock/max_failures_count`).
pub const MAGENTO_LOCK_FAILURES: u32 = 6;

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
    /// How customer tokens are obtained (`auth`): with their passwords, or without.
    pub auth: Auth,
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
                "tokens in the Secret {}{}, written by the holder of the Lease {}{}",
                k.namespace.as_ref().map(|ns| format!("{ns}/")).unwrap_or_default(),
                k.secret,
                k.lease,
                if k.token_api { ", and answered by its token API (GET /token/<name>)" } else { "" }
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
    /// `None` exactly when `auth.method` obtains tokens without customer passwords.
    pub password: Option<PasswordSource>,
    /// Magento's id of the customer (`cloud_service_otp` asks for its one-time code by it).
    pub customer_id: Option<u64>,
    /// `output.kubernetes`: the Secret of its own (`customers[].secret`); `None`: the default,
    /// `output.kubernetes.secret`.
    pub secret: Option<String>,
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
    /// How its token is asked for and checked (`magento.api`, `magento.cloud_service`): the
    /// same for every customer of a configuration.
    pub api: Api,
}

impl CustomerConfig {
    /// Where this customer's token is asked for and checked, in its store's dialect: REST's
    /// `{base}/rest[/<store>]/V1/integration/customer/token` and `.../V1/customers/me`, or the
    /// GraphQL endpoint `{base}<graphql_path>` with the store code for the `Store` header.
    pub fn endpoint(&self) -> Endpoint {
        match self.api.graphql_path() {
            None => Endpoint::Rest {
                token: self.rest_url("V1/integration/customer/token"),
                me: self.rest_url("V1/customers/me"),
            },
            Some(path) => Endpoint::GraphQl { url: api::joined(&self.base_url, path), store: self.store_code.clone() },
        }
    }

    /// The URL of a REST route (`V1/...`) for this customer: `{base}/rest[/<store>]/<route>`, or
    /// on Adobe Commerce as a Cloud Service `{base}/<route>`, where the base carries the tenant and
    /// the store view goes in the `Store` header instead ([`CustomerConfig::store_code`]).
    pub fn rest_url(&self, route: &str) -> Url {
        match (&self.api, &self.store_code) {
            (Api::CloudService { .. }, _) => api::joined(&self.base_url, route),
            (_, Some(store)) => api::joined(&self.base_url, &format!("rest/{store}/{route}")),
            (_, None) => api::joined(&self.base_url, &format!("rest/{route}")),
        }
    }

    /// Reads the customer's password afresh; an error when the customer has none (its tokens
    /// come from an issuer, [`Auth`]).
    pub fn read_password(&self) -> Result<Secret, PasswordError> {
        match &self.password {
            Some(source) => source.read(),
            None => Err(PasswordError::NoPassword),
        }
    }

    /// The GraphQL endpoint of this customer's store, whatever `magento.api` says: the admin's
    /// and the one-time code's ways to a customer token are GraphQL mutations.
    pub fn graphql_url(&self) -> Url {
        api::joined(&self.base_url, self.api.graphql_path().unwrap_or("/graphql"))
    }

    /// The settings whose change means the token on disk may belong to someone else.
    pub fn same_login(&self, other: &CustomerConfig) -> bool {
        self.username == other.username
            && self.base_url == other.base_url
            && self.store_code == other.store_code
            && self.password == other.password
            && self.customer_id == other.customer_id
    }
}

/// The most read of `magento.ca_file`: a bundle of every public root is about 200 KiB.
const MAX_CA_FILE: usize = 4 * 1024 * 1024;

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
        if let (Output::Kubernetes(k), Some(listen)) = (&self.output, self.admin_listen) {
            if k.token_api && listen.ip().is_loopback() {
                warnings.push(Problem {
                    path: "admin.listen".into(),
                    message: format!("{listen} is a loopback address: output.kubernetes.token_api is served there, where no other pod reaches it; listen on the pod's address (the chart's admin.bindAddress, 0.0.0.0)"),
                });
            }
        }
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
    let (base_url, api) = check_magento(&mut v, &raw.magento, checks);
    check_refresh(&mut v, &raw.refresh);
    let output = check_output(&mut v, &raw.output, checks);
    let admin_listen = check_admin(&mut v, &raw.admin.listen);
    check_token_api(&mut v, &raw.output, admin_listen);
    check_log(&mut v, &raw.log.level);
    let auth = auth::check(
        &mut v,
        &raw.auth,
        raw.magento.cloud_service,
        raw.magento.allow_insecure_http,
        base_url.as_ref(),
        checks,
    );
    let customers = check_customers(&mut v, &raw, base_url, &api, checks);
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
    let (output, auth) = match (output, auth) {
        (Some(output), Some(auth)) if v.problems.is_empty() => (output, auth),
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
        auth,
    };
    Ok((config, v.kept.unwrap_or_default()))
}

/// `magento`: returns the base URL when it is good, and the dialect of logins.
fn check_magento(v: &mut Validator, m: &RawMagento, checks: Checks) -> (Option<Url>, Api) {
    let api = check_api(v, m);
    let base_url = v.url("magento.base_url", &m.base_url, m.allow_insecure_http);
    if let (Some(url), Api::CloudService { .. }) = (&base_url, &api) {
        if let Some(problem) = api::cloud_base_problem(url) {
            v.problem("magento.base_url", problem);
        }
    }
    if let Some(code) = &m.store_code {
        v.store_code("magento.store_code", code, &api);
    }
    v.positive("magento.timeout", m.timeout.0);
    if let (Some(ca), Checks::Environment) = (&m.ca_file, checks) {
        v.ca_file("magento.ca_file", ca);
    }
    (base_url, api)
}

/// `magento.api`, `magento.graphql_path` and `magento.cloud_service`: the dialect they choose.
/// `api: rest` with the cloud service is reported, and the cloud service's other checks still
/// run, so that every problem comes at once.
fn check_api(v: &mut Validator, m: &RawMagento) -> Api {
    let path = m.graphql_path.as_deref().unwrap_or("/graphql");
    if let Some(problem) = api::graphql_path_problem(path) {
        v.problem("magento.graphql_path", problem);
    }
    let path: std::sync::Arc<str> = path.into();
    match (m.api, m.cloud_service) {
        (None | Some(RawApi::Rest), false) => Api::Rest,
        (Some(RawApi::Graphql), false) => Api::GraphQl { path },
        (None | Some(RawApi::Graphql), true) => Api::CloudService { graphql_path: path },
        (Some(RawApi::Rest), true) => {
            v.problem(
                "magento.api",
                "rest cannot log customers in on Adobe Commerce as a Cloud Service (magento.cloud_service: true): its REST API has no customer-token route; remove magento.api (GraphQL is implied) or set it to graphql".into(),
            );
            Api::CloudService { graphql_path: path }
        }
    }
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
fn check_customers(
    v: &mut Validator,
    raw: &RawConfig,
    base_url: Option<Url>,
    api: &Api,
    checks: Checks,
) -> Vec<CustomerConfig> {
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
        let password = match raw.auth.method {
            Method::Password => password_source(v, &at, c, checks).map(Some),
            method => {
                no_password(v, &at, c, method);
                Some(None)
            }
        };
        match (c.customer_id, raw.auth.method) {
            (None, Method::CloudServiceOtp) => v.problem(
                &at("customer_id"),
                "is required with auth.method cloud_service_otp: Magento's numeric id of this customer (the ID column of Customers > All Customers), which the one-time code route takes".into(),
            ),
            (Some(0), _) => v.problem(&at("customer_id"), "must be a customer id, 1 or more".into()),
            _ => {}
        }
        let url = match &c.base_url {
            Some(text) => {
                let url = v.url(&at("base_url"), text, raw.magento.allow_insecure_http);
                if let (Some(url), Api::CloudService { .. }) = (&url, api) {
                    if let Some(problem) = api::cloud_base_problem(url) {
                        v.problem(&at("base_url"), problem);
                    }
                }
                url.map(std::sync::Arc::new)
            }
            None => base_url.clone(),
        };
        if let Some(code) = &c.store_code {
            v.store_code(&at("store_code"), code, api);
        }
        if let Some(secret) = &c.secret {
            let checked = match raw.output.kubernetes {
                Some(_) => kubernetes::dns_subdomain(secret),
                None => Err("applies only to output.kubernetes: with output.dir every token is a file".into()),
            };
            if let Err(why) = checked {
                v.problem(&at("secret"), why);
            }
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
                customer_id: c.customer_id,
                secret: c.secret.clone(),
                base_url,
                store_code: c.store_code.clone().or_else(|| raw.magento.store_code.clone()),
                file,
                format: c.format.unwrap_or(raw.output.format),
                api: api.clone(),
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
    let keys = ("password_file", "password_env");
    let (password, read) = secret_source(v, at, keys, (&c.password_file, &c.password_env), checks);
    if let Some(kept) = &mut v.kept {
        kept.push(read);
    }
    password
}

/// A secret's source: exactly one of a file and an environment variable (`keys`, as a message
/// names them; `at` makes a key the problem's path), and with `Checks::Environment` the secret
/// read from it. A customer's password, and the issuer's admin password and IMS client secret.
fn secret_source(
    v: &mut Validator,
    at: &dyn Fn(&str) -> String,
    (file_key, env_key): (&str, &str),
    (file, env): (&Option<PathBuf>, &Option<String>),
    checks: Checks,
) -> (Option<PasswordSource>, Option<Secret>) {
    let source = match (file, env) {
        (Some(path), None) => PasswordSource::File(path.clone()),
        (None, Some(var)) if !var.is_empty() => PasswordSource::Env(var.clone()),
        (None, Some(_)) => {
            v.problem(&at(env_key), "must name an environment variable".into());
            return (None, None);
        }
        (Some(_), Some(_)) => {
            v.problem(&at(file_key), format!("give exactly one of {file_key} and {env_key}, not both"));
            return (None, None);
        }
        (None, None) => {
            v.problem(&at(file_key), format!("one of {file_key} and {env_key} is required"));
            return (None, None);
        }
    };
    let mut read = None;
    if checks == Checks::Environment {
        match source.read() {
            Ok(secret) => read = Some(secret),
            Err(e) => {
                let key = if matches!(source, PasswordSource::File(_)) { file_key } else { env_key };
                v.problem(&at(key), password_problem(&e));
            }
        }
    }
    (Some(source), read)
}

/// A customer of a method that obtains tokens without passwords: a password given is refused (it
/// would never be used, and a secret held for nothing is one too many). `once` keeps no password
/// read for it.
fn no_password(v: &mut Validator, at: &dyn Fn(&str) -> String, c: &RawCustomer, method: Method) {
    for (key, given) in [("password_file", c.password_file.is_some()), ("password_env", c.password_env.is_some())] {
        if given {
            v.problem(
                &at(key),
                format!(
                    "auth.method {} obtains this customer's tokens without its password: remove {key}",
                    method.as_str()
                ),
            );
        }
    }
    if let Some(kept) = &mut v.kept {
        kept.push(None);
    }
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
        PasswordError::NoPassword => e.to_string(),
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

    fn store_code(&mut self, path: &str, code: &str, api: &Api) {
        let ok = code.len() <= 32
            && code.starts_with(|c: char| c.is_ascii_alphabetic())
            && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            self.problem(path, format!("{code:?} is not a Magento store code (a letter, then letters, digits or '_')"));
        } else if code.eq_ignore_ascii_case("all") && api.graphql_path().is_some() {
            // REST takes `all` (and refuses every check through it); GraphQL's Store header
            // refuses it outright, logins included.
            self.problem(
                path,
                "\"all\" is no store view: GraphQL's Store header takes a store view's code (Magento answers \"Store code all does not exist\")".into(),
            );
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
pub(crate) mod tests;
