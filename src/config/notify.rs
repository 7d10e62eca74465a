//! `notify:` in the configuration file: the types, their defaults and their validation (the
//! notifying itself is [`crate::notify`]'s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use rustix::process::Signal;
use serde::Deserialize;

use super::{is_loopback, Checks, Problem};

/// `PATH` for the command when the daemon has none (where `notify.exec` is looked up, too).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `notify.timeout`'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The signals `notify.signal.signal` may name: those an app may handle (KILL and STOP cannot
/// be, and the others mean a crash).
pub const SIGNALS: [(&str, Signal); 9] = [
    ("HUP", Signal::HUP),
    ("INT", Signal::INT),
    ("QUIT", Signal::QUIT),
    ("TERM", Signal::TERM),
    ("USR1", Signal::USR1),
    ("USR2", Signal::USR2),
    ("WINCH", Signal::WINCH),
    ("ALRM", Signal::ALARM),
    ("CONT", Signal::CONT),
];

/// `notify`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNotify {
    #[serde(default)]
    exec: Option<Vec<String>>,
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    signal: Option<RawSignal>,
    #[serde(default = "default_timeout", deserialize_with = "crate::config::duration")]
    timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignal {
    process: String,
    #[serde(default = "default_signal")]
    signal: String,
    #[serde(default)]
    uid: Option<u32>,
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_signal() -> String {
    "HUP".into()
}

/// `notify`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifySettings {
    /// The program and its arguments; no shell.
    pub exec: Option<Vec<String>>,
    /// POSTed `{"customer","file","expires_at"}`: https, or http to loopback.
    pub webhook: Option<Url>,
    pub signal: Option<SignalTarget>,
    /// For each action (and each of its two tries).
    pub timeout: Duration,
}

/// `notify.signal`: which processes, and what to send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalTarget {
    /// Matched against `/proc/<pid>/comm` and the base name of each process's `argv[0]`.
    pub process: String,
    /// One of [`SIGNALS`], without `SIG`.
    pub signal: &'static str,
    /// Whose processes may be signalled (their real uid); `None`: the daemon's own. A process
    /// of another user that happens to bear the name (a decoy started with `exec -a`) is
    /// never the app.
    pub uid: Option<u32>,
}

/// The signal a name means (`HUP`, `SIGHUP`, `hup`), if it is one of [`SIGNALS`].
pub fn signal_named(name: &str) -> Option<(&'static str, Signal)> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(n, _)| *n == bare).copied()
}

/// Checks `notify` and reports every problem into `problems`, each with its key path; the
/// settings when there was none.
pub(crate) fn check(raw: &RawNotify, checks: Checks, problems: &mut Vec<Problem>) -> Option<NotifySettings> {
    let before = problems.len();
    let mut problem = |path: &str, message: String| problems.push(Problem { path: path.into(), message });
    if raw.exec.is_none() && raw.webhook.is_none() && raw.signal.is_none() {
        problem("notify", "give at least one of exec, webhook and signal".into());
    }
    if let Some(argv) = &raw.exec {
        match argv.first() {
            None => problem(
                "notify.exec",
                "must not be empty: the program and its arguments, like [\"/usr/local/bin/reload-app\", \"--quiet\"] (no shell unless you name one)".into(),
            ),
            Some(program) if program.is_empty() => problem("notify.exec[0]", "must not be empty".into()),
            Some(program) => {
                if checks == Checks::Environment {
                    if let Err(why) = find_program(program) {
                        problem("notify.exec[0]", why);
                    }
                }
            }
        }
        for (i, arg) in argv.iter().enumerate() {
            if arg.contains('\0') {
                problem(&format!("notify.exec[{i}]"), "must not contain a NUL character".into());
            }
        }
    }
    let webhook = raw.webhook.as_deref().and_then(|text| match webhook_url(text) {
        Ok(url) => Some(url),
        Err(why) => {
            problem("notify.webhook", why);
            None
        }
    });
    let signal = raw.signal.as_ref().and_then(|s| {
        let process = s.process.trim();
        if process.is_empty() {
            problem("notify.signal.process", "must not be empty".into());
        } else if process.contains('/') || process.contains('\0') {
            problem(
                "notify.signal.process",
                format!("{process:?} must be a process name without '/' (its /proc/<pid>/comm, or the base name of its argv[0])"),
            );
        }
        if let Some(uid) = s.uid {
            let own = rustix::process::geteuid();
            if checks == Checks::Environment && !own.is_root() && own.as_raw() != uid {
                problem(
                    "notify.signal.uid",
                    format!(
                        "{uid}: this process (uid {}) may not signal another user's processes; run as the app's user (and drop notify.signal.uid) or as root",
                        own.as_raw()
                    ),
                );
            }
        }
        let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
        match signal_named(&s.signal) {
            Some((name, _)) => Some(SignalTarget { process: process.to_owned(), signal: name, uid: s.uid }),
            None => {
                problem("notify.signal.signal", format!("{:?} is not one of {}", s.signal, names.join(", ")));
                None
            }
        }
    });
    if raw.timeout.is_zero() {
        problem("notify.timeout", "must be longer than 0s".into());
    }
    (problems.len() == before).then(|| NotifySettings { exec: raw.exec.clone(), webhook, signal, timeout: raw.timeout })
}

/// The webhook's URL: https, or plain http to loopback. Messages never repeat the URL: its
/// query may hold the receiver's secret.
fn webhook_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim())
        .map_err(|e| format!("not a URL ({e}); write e.g. \"http://127.0.0.1:8080/rotated\""))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(
                "plain http to a non-loopback host: use https (plain http only goes to localhost, 127.0.0.0/8 or ::1)"
                    .into(),
            )
        }
        other => return Err(format!("scheme {other:?} is not supported: use https (or http to loopback)")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(url)
}

/// Where `program` is: a path (with a '/'), or found in `PATH` as the command will look it up;
/// it must be an executable file.
fn find_program(program: &str) -> Result<PathBuf, String> {
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file())
            && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
    };
    if program.contains('/') {
        let path = Path::new(program);
        return match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("{program}: no such file")),
            Err(e) => Err(format!("{program}: {e}")),
            Ok(m) if !m.is_file() => Err(format!("{program} is not a file")),
            Ok(_) if !executable(path) => Err(format!("{program} is not executable by this user")),
            Ok(_) => Ok(path.to_path_buf()),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| format!("{program:?} is not found in PATH ({})", path.to_string_lossy()))
}
