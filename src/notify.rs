//! Telling the app that a new token is on disk (`notify:`): a command, a webhook, a signal.
//!
//! A worker that wrote a new token calls [`Notifier::written`], which only notes it and
//! returns: the notification runs in a task of its own, so nothing it does (a slow command, a
//! webhook that does not answer) ever delays a refresh.
//!
//! - **Coalescing**: a customer has at most one notification under way. It starts
//!   [`SETTLE`] after the first write and tells of the latest token then; writes that come
//!   while it waits are folded into it, and writes that come while it runs make exactly one
//!   more (after its own settle delay), again with the latest token. A customer with nothing to
//!   tell costs nothing: the pending set holds only customers with a notification under way.
//! - **Bounded**: at most [`MAX_RUNNING`] notifications run at once over all customers.
//! - **Failures**: each action (command, webhook, signal) is bounded by `notify.timeout`; one
//!   that fails (non-zero exit, timeout, an answer other than 2xx, no connection, no such
//!   process) is logged with the customer and why, and tried once more after [`RETRY_DELAY`].
//!   The notification then counts once in `magento_token_notify_total`: `success` when every
//!   action succeeded (at the first or the second try), else `failure`.
//! - **Never the token**: the command gets the customer, the file and the expiry in its
//!   environment, which holds nothing else but `PATH` (the daemon's own environment may hold
//!   passwords, `password_env`); the webhook gets them as JSON.
//! - **The command's processes**: it runs in a process group of its own, its pid registered
//!   with the [`reaper`], which reaps what it leaves behind and kills it all at stop; its
//!   output is read as it comes, and only the start of each stream reaches the log, escaped,
//!   as fields of the daemon's own line ([`Printed`]).
//! - **The signal** goes to one process: the main process of the name that runs as the
//!   daemon's user (or `notify.signal.uid`); none when two could be the app ([`find_app`]).
//!
//! `once` notifies no one: it runs before the app (an init container) or apart from it (a
//! CronJob), and the app reads the files when it starts.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::Url;
use rustix::process::{Pid, Signal};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::clock::rfc3339;
use crate::config::is_loopback;
use crate::config::notify::{signal_named, NotifySettings, SignalTarget, DEFAULT_PATH};
use crate::reaper;
use crate::status::Reporter;

/// How long after a new token its notification starts: writes within this time (a reload's
/// new login right after a refresh) make one notification, of the latest token.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How long after a failed action it is tried again (once).
pub const RETRY_DELAY: Duration = Duration::from_secs(2);
/// Notifications running at once, over all customers.
pub const MAX_RUNNING: usize = 4;

// ---------------------------------------------------------------------------------------------
// The notifier

/// What a notification tells: which file, and when its token expires.
#[derive(Debug, Clone, PartialEq)]
struct Note {
    file: PathBuf,
    expires_at: SystemTime,
}

/// The customers with a notification under way, and the latest token each has to tell of.
#[derive(Debug, Default)]
struct Pending(HashMap<Box<str>, Slot>);

#[derive(Debug)]
struct Slot {
    note: Note,
    /// A token was written since the notification under way took its note.
    again: bool,
}

impl Pending {
    /// A new token for `name`: true when a notification must be started (none under way).
    fn wrote(&mut self, name: &str, note: Note) -> bool {
        match self.0.get_mut(name) {
            Some(slot) => {
                slot.note = note;
                slot.again = true;
                false
            }
            None => {
                self.0.insert(name.into(), Slot { note, again: false });
                true
            }
        }
    }

    /// The latest token, as the notification starts: later writes call for another one.
    fn take(&mut self, name: &str) -> Option<Note> {
        let slot = self.0.get_mut(name)?;
        slot.again = false;
        Some(slot.note.clone())
    }

    /// A notification is over: true when tokens were written meanwhile (notify again), else
    /// the customer leaves the set.
    fn done(&mut self, name: &str) -> bool {
        match self.0.get(name) {
            Some(slot) if slot.again => true,
            _ => {
                self.0.remove(name);
                false
            }
        }
    }
}

/// The settings in effect and what is built from them (the webhook's client).
struct Prepared {
    settings: NotifySettings,
    /// `None` without a webhook; the error when the client could not be built.
    client: Option<Result<reqwest::Client, String>>,
}

impl Prepared {
    fn new(settings: NotifySettings) -> Prepared {
        let client = settings.webhook.as_ref().map(|url| {
            let mut builder = reqwest::Client::builder()
                .user_agent(crate::magento::USER_AGENT)
                .connect_timeout(settings.timeout)
                // A redirect could lead plain http off loopback.
                .redirect(reqwest::redirect::Policy::none());
            if is_loopback(url) {
                builder = builder.no_proxy();
            }
            builder.build().map_err(|e| format!("cannot build the HTTP client: {e}"))
        });
        Prepared { settings, client }
    }

    /// The configured actions.
    fn actions(&self) -> Vec<Action<'_>> {
        let s = &self.settings;
        let mut actions = Vec::with_capacity(3);
        actions.extend(s.exec.as_deref().map(Action::Exec));
        actions.extend(s.webhook.as_ref().map(Action::Webhook));
        actions.extend(s.signal.as_ref().map(Action::Signal));
        actions
    }

    /// One try of one action.
    async fn run(&self, action: Action<'_>, customer: &str, note: &Note) -> Result<(), String> {
        let timeout = self.settings.timeout;
        match action {
            Action::Exec(argv) => run_command(argv, customer, note, timeout).await,
            Action::Webhook(url) => {
                let client = match &self.client {
                    Some(Ok(client)) => client,
                    Some(Err(e)) => return Err(e.clone()),
                    None => return Err("no client".into()),
                };
                post(client, url, customer, note, timeout).await
            }
            Action::Signal(target) => {
                let target = target.clone();
                tokio::task::spawn_blocking(move || signal_processes(Path::new("/proc"), &target))
                    .await
                    .unwrap_or_else(|e| Err(format!("the signal task failed: {e}")))
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Action<'a> {
    Exec(&'a [String]),
    Webhook(&'a Url),
    Signal(&'a SignalTarget),
}

impl Action<'_> {
    fn kind(self) -> &'static str {
        match self {
            Action::Exec(_) => "exec",
            Action::Webhook(_) => "webhook",
            Action::Signal(_) => "signal",
        }
    }
}

/// Tells the app of new tokens: one per process, kept across reloads (a reload swaps its
/// settings without restarting any worker).
pub struct Notifier {
    state: Mutex<State>,
    running: Semaphore,
}

#[derive(Default)]
struct State {
    /// `None`: no `notify` section.
    current: Option<Arc<Prepared>>,
    pending: Pending,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier { state: Mutex::default(), running: Semaphore::new(MAX_RUNNING) }
    }
}

impl Notifier {
    /// The notifier of a configuration: the running one (`running`) with the new settings, or
    /// a new one. Notifications under way finish with the settings they started with.
    pub fn for_config(settings: Option<&NotifySettings>, running: Option<&Arc<Notifier>>) -> Arc<Notifier> {
        let notifier = running.cloned().unwrap_or_default();
        let mut state = notifier.lock();
        if state.current.as_ref().map(|p| &p.settings) != settings {
            state.current = settings.map(|s| Arc::new(Prepared::new(s.clone())));
        }
        drop(state);
        notifier
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new token for `report`'s customer is in `file`: the app will be told, in a task of
    /// its own. Returns at once.
    pub fn written(self: &Arc<Self>, report: &Reporter, file: &Path, expires_at: SystemTime) {
        let start = {
            let mut state = self.lock();
            if state.current.is_none() {
                return;
            }
            state.pending.wrote(report.name(), Note { file: file.to_path_buf(), expires_at })
        };
        if start {
            tokio::spawn(self.clone().notify(report.clone()));
        }
    }

    /// One customer's notifications, until no new token is left to tell of.
    async fn notify(self: Arc<Self>, report: Reporter) {
        let customer = report.name();
        loop {
            tokio::time::sleep(SETTLE).await;
            let (note, current) = {
                let mut state = self.lock();
                (state.pending.take(customer), state.current.clone())
            };
            // Settings removed by a reload meanwhile: no one to tell.
            if let (Some(note), Some(prepared)) = (note, current) {
                let ok = self.deliver(&prepared, customer, &note).await;
                report.notified(ok);
            }
            if !self.lock().pending.done(customer) {
                break;
            }
        }
    }

    /// Every action, each tried again once if it failed; whether all succeeded.
    async fn deliver(&self, prepared: &Prepared, customer: &str, note: &Note) -> bool {
        let started = Instant::now();
        let mut actions = prepared.actions();
        for attempt in 1..=2 {
            let failed: Vec<(Action<'_>, String)> = {
                let _slot = self.running.acquire().await.expect("the semaphore is never closed");
                let tries = actions.iter().map(|a| prepared.run(*a, customer, note));
                let results = futures::future::join_all(tries).await;
                actions.iter().zip(results).filter_map(|(a, r)| r.err().map(|e| (*a, e))).collect()
            };
            if failed.is_empty() {
                info!(
                    customer,
                    file = %note.file.display(),
                    expires_at = %rfc3339(note.expires_at),
                    took_ms = started.elapsed().as_millis() as u64,
                    "notified the app of the new token"
                );
                return true;
            }
            for (action, why) in &failed {
                if attempt == 1 {
                    warn!(customer, notify = action.kind(), error = %why, retry_in = %humantime::format_duration(RETRY_DELAY), "notification failed: trying again");
                } else {
                    warn!(customer, notify = action.kind(), error = %why, "notification failed again: the app was not told of the new token");
                }
            }
            actions = failed.into_iter().map(|(a, _)| a).collect();
            if attempt == 1 {
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The actions

/// Runs the command with the customer, file and expiry in an environment of its own (and
/// `PATH`), in a process group of its own, started through [`reaper::spawn`] (the daemon reaps
/// what it leaves behind). A timeout kills the group and every other descendant the command
/// still has (a child that called `setsid` left the group, not the family). Its output is read
/// as it comes (it never blocks on a full pipe) and logged as fields of the daemon's own line
/// (see [`Printed`]).
async fn run_command(argv: &[String], customer: &str, note: &Note, timeout: Duration) -> Result<(), String> {
    let program = &argv[0];
    let mut command = tokio::process::Command::new(program);
    command
        .args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()))
        .env("MAGENTO_TOKEN_CUSTOMER", customer)
        .env("MAGENTO_TOKEN_FILE", &note.file)
        .env("MAGENTO_TOKEN_EXPIRES_AT", rfc3339(note.expires_at))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let (mut child, registered) = reaper::spawn(&mut command).map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = child.id();
    // Armed until the command has ended: a timeout, or the daemon stopping, kills the group.
    let mut group = Group(pid.and_then(|id| Pid::from_raw(id as i32)));
    let (mut stdout, mut stderr) = (Printed::default(), Printed::default());
    let (out_pipe, err_pipe) = (child.stdout.take(), child.stderr.take());
    let waited = {
        let mut drained = std::pin::pin!(futures::future::join(stdout.drain(out_pipe), stderr.drain(err_pipe)));
        tokio::time::timeout(timeout, async {
            let mut done = false;
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = &mut drained, if !done => done = true,
                }
            };
            // What the command wrote before it ended is in the pipes; what it left running may
            // hold them open for ever: their end is not awaited past OUTPUT_GRACE.
            if !done {
                let _ = tokio::time::timeout(OUTPUT_GRACE, &mut drained).await;
            }
            status
        })
        .await
    };
    let result = match waited {
        Ok(Ok(status)) => {
            group.0 = None;
            if status.success() {
                Ok(())
            } else {
                Err(exit_message(program, status))
            }
        }
        Ok(Err(e)) => Err(format!("cannot wait for {program}: {e}")),
        Err(_) => {
            // The group is frozen first: a shell whose child is killed before it must not run
            // on (and do what it would do after its child) in the moment before its own kill.
            if let Some(group) = group.0 {
                let _ = rustix::process::kill_process_group(group, Signal::STOP);
            }
            if let Some(pid) = pid {
                reaper::kill_descendants(pid);
            }
            drop(group);
            let _ = child.kill().await;
            Err(format!("{program} still running after {}: killed", humantime::format_duration(timeout)))
        }
    };
    drop(registered);
    if stdout.total > 0 || stderr.total > 0 {
        info!(
            customer,
            program = %program,
            stdout = %stdout.shown(),
            stdout_bytes = stdout.total,
            stderr = %stderr.shown(),
            stderr_bytes = stderr.total,
            "output of the notify command"
        );
    }
    result
}

/// The most of each of a command's streams kept to be logged; the rest is read and counted.
pub const OUTPUT_KEPT: usize = 2048;
/// How long after a command ended its output is still read: enough for what it wrote itself,
/// not waiting on what it left running (which then finds the pipe closed).
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// What a command wrote on one stream: the first [`OUTPUT_KEPT`] bytes and how many there
/// were. Never a line of the daemon's log by itself: a command printing
/// `{"level":"ERROR",...}` would forge one, and 20 MB of output would be copied into it.
#[derive(Default)]
struct Printed {
    start: Vec<u8>,
    total: u64,
}

impl Printed {
    /// Reads `pipe` to its end (or until dropped), keeping its start, in a fixed buffer.
    async fn drain(&mut self, pipe: Option<impl tokio::io::AsyncRead + Unpin>) {
        use tokio::io::AsyncReadExt;
        let Some(mut pipe) = pipe else { return };
        let mut buffer = [0u8; 8192];
        loop {
            match pipe.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let room = OUTPUT_KEPT - self.start.len();
                    self.start.extend_from_slice(&buffer[..n.min(room)]);
                    self.total += n as u64;
                }
            }
        }
    }

    /// The kept start as a log field: invalid UTF-8 replaced, anything that could be a token
    /// redacted (a command may print the token file), control characters escaped (no line of
    /// its own, no terminal sequence), a cut marked `…`.
    fn shown(&self) -> String {
        let text = String::from_utf8_lossy(&self.start);
        let mut shown = crate::logging::escape_controls(&crate::shown::without_tokens(&text)).into_owned();
        if self.total > self.start.len() as u64 {
            shown.push('…');
        }
        shown
    }
}

/// A command's process group, killed when dropped while armed.
struct Group(Option<Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}

fn exit_message(program: &str, status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("{program} exited with status {code}"),
        (None, Some(signal)) => format!("{program} was killed by signal {signal}"),
        _ => format!("{program} ended: {status}"),
    }
}

/// POSTs `{"customer","file","expires_at"}`; any 2xx answer is a success.
async fn post(
    client: &reqwest::Client,
    url: &Url,
    customer: &str,
    note: &Note,
    timeout: Duration,
) -> Result<(), String> {
    let body = serde_json::json!({
        "customer": customer,
        "file": note.file.to_string_lossy(),
        "expires_at": rfc3339(note.expires_at),
    });
    let response = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| request_error(e, timeout))?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("the webhook answered HTTP {}", status.as_u16())),
    }
}

/// What went wrong with a request, its causes included, without the URL (its query may hold
/// the receiver's secret).
fn request_error(e: reqwest::Error, timeout: Duration) -> String {
    let e = e.without_url();
    let what = if e.is_timeout() {
        format!("no answer within {}", humantime::format_duration(timeout))
    } else if e.is_connect() {
        "cannot connect to the webhook".to_owned()
    } else {
        "the webhook request failed".to_owned()
    };
    crate::magento::with_causes(&what, &e)
}

/// Sends the signal to the app's process (see [`find_app`]).
fn signal_processes(proc: &Path, target: &SignalTarget) -> Result<(), String> {
    let name = &target.process;
    let signal = signal_named(target.signal).map(|(_, s)| s).expect("validated");
    let uid = target.uid.unwrap_or_else(|| rustix::process::geteuid().as_raw());
    let pid = find_app(proc, name, uid, std::process::id())?;
    let p = Pid::from_raw(pid).ok_or_else(|| format!("process {pid} named {name:?}: not a pid"))?;
    match rustix::process::kill_process(p, signal) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Err(format!("process {pid} named {name:?} ended before it was signalled")),
        Err(rustix::io::Errno::PERM) => Err(format!(
            "not permitted to send SIG{} to process {pid} named {name:?}: it runs as another user (run the sidecar as the app's user)",
            target.signal
        )),
        Err(e) => Err(format!("cannot send SIG{} to process {pid} named {name:?}: {e}", target.signal)),
    }
}

/// The app's one process: of the main processes named `name` (see [`find_processes`]), the one
/// whose real uid is `uid`. Another user's process of that name is never signalled (anyone can
/// start one: `exec -a nginx sleep 1000`), and when two of `uid`'s could each be the app,
/// neither is: a signal to the wrong one is a failure nobody would see.
fn find_app(proc: &Path, name: &str, uid: u32, own: u32) -> Result<i32, String> {
    let found = find_processes(proc, name, own);
    let mine: Vec<i32> = found.iter().filter(|(_, u)| *u == Some(uid)).map(|(pid, _)| *pid).collect();
    match mine[..] {
        [pid] => Ok(pid),
        [] if found.is_empty() => Err(format!(
            "no process named {name:?} (the app's container must share the pod's process namespace: shareProcessNamespace: true)"
        )),
        [] => {
            let others: Vec<String> = found
                .iter()
                .map(|(pid, u)| format!("{pid} (uid {})", u.map_or("unknown".into(), |u| u.to_string())))
                .collect();
            Err(format!(
                "no process named {name:?} runs as uid {uid}, only {}: none signalled (set notify.signal.uid to the app's user)",
                others.join(", ")
            ))
        }
        _ => {
            let pids: Vec<String> = mine.iter().map(i32::to_string).collect();
            Err(format!(
                "{} processes named {name:?} of uid {uid} could each be the app ({}): none signalled (give notify.signal.process a name only the app has)",
                mine.len(),
                pids.join(", ")
            ))
        }
    }
}

/// The processes under `proc` (`/proc`) named `name`, by `comm` or by the base name of
/// `argv[0]`, other than `own`, and of them only those whose parent is not named so too: an
/// app's main process, not the workers it forked (nginx, gunicorn, php-fpm reload through
/// their master). Each with its real uid (`None` when it cannot be read), by pid.
fn find_processes(proc: &Path, name: &str, own: u32) -> Vec<(i32, Option<u32>)> {
    let Ok(entries) = std::fs::read_dir(proc) else { return Vec::new() };
    let mut named: HashMap<i32, (i32, Option<u32>)> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid as u32 == own {
            continue;
        }
        let dir = entry.path();
        if is_named(&dir, name) {
            named.insert(pid, (parent_of(&dir).unwrap_or(0), real_uid(&dir)));
        }
    }
    let mut found: Vec<(i32, Option<u32>)> =
        named.iter().filter(|(_, (ppid, _))| !named.contains_key(ppid)).map(|(pid, (_, uid))| (*pid, *uid)).collect();
    found.sort_unstable();
    found
}

/// A process's real uid, from the `Uid:` line of its `status`.
fn real_uid(dir: &Path) -> Option<u32> {
    let status = read_start(&dir.join("status"));
    let line = status.split(|b| *b == b'\n').find_map(|l| l.strip_prefix(b"Uid:"))?;
    std::str::from_utf8(line).ok()?.split_whitespace().next()?.parse().ok()
}

/// The start of a small `/proc` file (its first 4 KiB).
fn read_start(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(4096).read_to_end(&mut bytes);
    }
    bytes
}

fn is_named(dir: &Path, name: &str) -> bool {
    let comm = read_start(&dir.join("comm"));
    if comm.strip_suffix(b"\n").unwrap_or(&comm) == name.as_bytes() {
        return true;
    }
    let cmdline = read_start(&dir.join("cmdline"));
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    !base.is_empty() && base == name.as_bytes()
}

/// The parent's pid, from `stat` (after the command name, which may hold anything).
fn parent_of(dir: &Path) -> Option<i32> {
    let stat = String::from_utf8(read_start(&dir.join("stat"))).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::notify::DEFAULT_TIMEOUT;
    use crate::config::tests::MINIMAL;
    use crate::config::{self, Checks};

    fn problems(notify: &str, checks: Checks) -> Vec<String> {
        match config::parse(&format!("{MINIMAL}notify:\n{notify}"), checks) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn settings(notify: &str) -> NotifySettings {
        config::parse(&format!("{MINIMAL}notify:\n{notify}"), Checks::Static).unwrap().notify.unwrap()
    }

    #[test]
    fn no_section_no_notifications() {
        assert_eq!(config::parse(MINIMAL, Checks::Static).unwrap().notify, None);
    }

    #[test]
    fn the_contracts_example_is_valid_with_its_defaults() {
        let s = settings(
            "  exec: [\"/bin/sh\", \"-c\", \"kill -HUP 1\"]\n  webhook: http://127.0.0.1:8080/rotated\n  signal: {process: nginx, signal: HUP}\n",
        );
        assert_eq!(s.exec.as_deref(), Some(&["/bin/sh".to_owned(), "-c".into(), "kill -HUP 1".into()][..]));
        assert_eq!(s.webhook.as_ref().map(Url::as_str), Some("http://127.0.0.1:8080/rotated"));
        assert_eq!(s.signal, Some(SignalTarget { process: "nginx".into(), signal: "HUP", uid: None }));
        assert_eq!(s.timeout, Duration::from_secs(10));
        // The signal defaults to HUP; its name may carry SIG and any case.
        assert_eq!(settings("  signal: {process: php-fpm}\n").signal.unwrap().signal, "HUP");
        assert_eq!(settings("  signal: {process: app, signal: sigusr1}\n").signal.unwrap().signal, "USR1");
        assert_eq!(
            settings("  webhook: https://hooks.example.com/x?key=1\n  timeout: 2s\n").timeout,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn every_problem_has_its_key_path() {
        let p = problems(
            "  exec: []\n  webhook: http://example.com/hook?key=s3cr3t\n  signal: {process: \"a/b\", signal: KILL}\n  timeout: 0s\n",
            Checks::Static,
        );
        let expected = [
            "notify.exec: must not be empty",
            "notify.webhook: plain http to a non-loopback host",
            "notify.signal.process: \"a/b\" must be a process name without '/'",
            "notify.signal.signal: \"KILL\" is not one of HUP, INT, QUIT, TERM, USR1, USR2, WINCH, ALRM, CONT",
            "notify.timeout: must be longer than 0s",
        ];
        for e in expected {
            assert!(p.iter().any(|l| l.starts_with(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expected.len(), "{p:#?}");
        assert!(!p.concat().contains("s3cr3t"), "{p:?}");
        assert_eq!(problems("  {}\n", Checks::Static), ["notify: give at least one of exec, webhook and signal"]);
        assert_eq!(problems("  exec: [\"\"]\n", Checks::Static), ["notify.exec[0]: must not be empty"]);
        let p = problems("  webhook: ftp://127.0.0.1/x\n", Checks::Static);
        assert_eq!(p, ["notify.webhook: scheme \"ftp\" is not supported: use https (or http to loopback)"]);
        assert_eq!(
            problems("  webhook: https://u:p@example.com/\n", Checks::Static),
            ["notify.webhook: must not carry credentials"]
        );
        assert!(problems("  webhook: not a url\n", Checks::Static)[0].starts_with("notify.webhook: not a URL"));
        let p = problems("  signal: {signal: HUP}\n", Checks::Static);
        assert!(p[0].contains("missing field `process`"), "{p:?}");
        let p = problems("  exec: [a]\n  shell: true\n", Checks::Static);
        assert!(p[0].contains("unknown field `shell`"), "{p:?}");
        for ok in ["http://localhost:1/x", "http://[::1]/x", "http://127.0.0.2/x", "https://example.com/x"] {
            assert!(problems(&format!("  webhook: {ok}\n"), Checks::Static).is_empty(), "{ok}");
        }
    }

    #[test]
    fn the_program_is_checked_where_the_daemon_runs() {
        let dir = tempfile::tempdir().unwrap();
        let not_executable = dir.path().join("plain");
        std::fs::write(&not_executable, "").unwrap();
        let env = |program: &str| {
            let mut p = problems(&format!("  exec: [\"{program}\"]\n"), Checks::Environment);
            p.retain(|p| p.starts_with("notify"));
            p
        };
        assert_eq!(env("/no/such/program"), ["notify.exec[0]: /no/such/program: no such file"]);
        assert_eq!(
            env(&dir.path().display().to_string()),
            [format!("notify.exec[0]: {} is not a file", dir.path().display())]
        );
        assert_eq!(
            env(&not_executable.display().to_string()),
            [format!("notify.exec[0]: {} is not executable by this user", not_executable.display())]
        );
        assert!(env("no-such-program-n0t1fy")[0]
            .starts_with("notify.exec[0]: \"no-such-program-n0t1fy\" is not found in PATH"));
        assert!(env("sh").is_empty());
        assert!(env("/bin/sh").is_empty());
        // Static checks (unit tests, forget-failures) do not look.
        assert!(problems("  exec: [\"/no/such/program\"]\n", Checks::Static).is_empty());
    }

    #[test]
    fn the_example_section_is_valid_once_uncommented() {
        let example = include_str!("../config/example.yaml");
        let start = example.find("\n# notify:\n").expect("a notify section") + 1;
        let section: String = example[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let text = format!("{MINIMAL}{section}");
        let s = config::parse(&text, Checks::Static).unwrap().notify.unwrap();
        assert_eq!(s.exec.unwrap(), ["/usr/local/bin/reload-app", "--quiet"]);
        assert_eq!(s.webhook.unwrap().as_str(), "http://127.0.0.1:8080/rotated");
        assert_eq!(s.signal.unwrap(), SignalTarget { process: "nginx".into(), signal: "HUP", uid: None });
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
    }

    fn note(secs: u64) -> Note {
        Note { file: "/t/alice".into(), expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs) }
    }

    #[test]
    fn writes_close_together_make_one_notification_and_one_more_while_it_runs() {
        let mut p = Pending::default();
        // The first write starts a notification; the next ones before it takes its note fold in.
        assert!(p.wrote("alice", note(1)));
        assert!(!p.wrote("alice", note(2)));
        assert!(p.wrote("bob", note(7)));
        assert_eq!(p.take("alice"), Some(note(2)));
        // Nothing written while it ran: done, and alice leaves the set.
        assert!(!p.done("alice"));
        assert!(!p.0.contains_key("alice"));
        // Two writes while the next one runs: one more, with the latest.
        assert!(p.wrote("alice", note(3)));
        assert_eq!(p.take("alice"), Some(note(3)));
        assert!(!p.wrote("alice", note(4)));
        assert!(!p.wrote("alice", note(5)));
        assert!(p.done("alice"));
        assert_eq!(p.take("alice"), Some(note(5)));
        assert!(!p.done("alice"));
        assert_eq!(p.take("alice"), None);
        assert_eq!(p.0.len(), 1, "only bob, whose notification is under way");
    }

    /// The uid of the processes of [`fake_proc`].
    const APP_UID: u32 = 1000;

    /// A fake `/proc`: (pid, comm, argv, ppid), each of [`APP_UID`].
    fn fake_proc(processes: &[(i32, &str, &[&str], i32)]) -> tempfile::TempDir {
        let with_uid: Vec<_> = processes.iter().map(|(p, c, a, pp)| (*p, *c, *a, *pp, APP_UID)).collect();
        fake_proc_of(&with_uid)
    }

    /// A fake `/proc`: (pid, comm, argv, ppid, real uid).
    fn fake_proc_of(processes: &[(i32, &str, &[&str], i32, u32)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, comm, argv, ppid, uid) in processes {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
            let cmdline: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
            std::fs::write(p.join("cmdline"), cmdline).unwrap();
            std::fs::write(p.join("stat"), format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1")).unwrap();
            let status = format!("Name:\t{comm}\nState:\tS (sleeping)\nPid:\t{pid}\nPPid:\t{ppid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n");
            std::fs::write(p.join("status"), status).unwrap();
        }
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("uptime"), "1 1").unwrap();
        dir
    }

    fn pids(found: Vec<(i32, Option<u32>)>) -> Vec<i32> {
        found.into_iter().map(|(pid, _)| pid).collect()
    }

    #[test]
    fn processes_are_found_by_name_and_only_their_main_process() {
        let proc = fake_proc(&[
            (1, "pause", &["/pause"], 0),
            (10, "nginx", &["nginx: master process /usr/sbin/nginx"], 1),
            (11, "nginx", &["nginx: worker process"], 10),
            (12, "nginx", &["nginx: worker process"], 10),
            // Named by argv[0] only: comm is cut at 15 bytes.
            (20, "my-long-applica", &["/srv/bin/my-long-application", "--port", "80"], 1),
            // A name with a ')' and spaces in comm does not confuse the parent's pid.
            (30, "odd) name", &["x"], 20),
            (40, "sidecar", &["/magento-token-sidecar", "run"], 1),
            // Not named so: a word of its arguments, or a prefix.
            (50, "python3", &["python3", "nginx"], 1),
            (51, "nginx-exporter", &["nginx-exporter"], 1),
        ]);
        assert_eq!(find_processes(proc.path(), "nginx", 40), [(10, Some(APP_UID))]);
        assert_eq!(pids(find_processes(proc.path(), "my-long-application", 40)), [20]);
        assert_eq!(pids(find_processes(proc.path(), "odd) name", 40)), [30]);
        assert_eq!(parent_of(&proc.path().join("30")), Some(20));
        // Never the daemon itself.
        assert_eq!(pids(find_processes(proc.path(), "magento-token-sidecar", 40)), Vec::<i32>::new());
        assert_eq!(pids(find_processes(proc.path(), "absent", 40)), Vec::<i32>::new());
        assert_eq!(pids(find_processes(Path::new("/no/such/proc"), "nginx", 1)), Vec::<i32>::new());
    }

    #[test]
    fn a_missing_process_says_what_the_pod_needs() {
        let proc = fake_proc(&[(10, "nginx", &["nginx"], 1)]);
        let target = SignalTarget { process: "app".into(), signal: "HUP", uid: Some(APP_UID) };
        let e = signal_processes(proc.path(), &target).unwrap_err();
        assert_eq!(e, "no process named \"app\" (the app's container must share the pod's process namespace: shareProcessNamespace: true)");
    }

    /// As uid 65534, another user's process of the name with a lower pid (which the daemon may
    /// not signal) once ended the search before the app; as root, every user's process of the
    /// name was signalled, decoys (`exec -a app sleep 1000`) included.
    #[test]
    fn only_the_apps_own_user_is_signalled() {
        let proc = fake_proc_of(&[
            (5, "app", &["app"], 1, 0),
            (7, "sleep", &["app", "1000"], 1, 4321),
            (10, "app", &["/srv/app"], 1, 65534),
            (11, "app", &["/srv/app"], 10, 65534),
        ]);
        assert_eq!(find_app(proc.path(), "app", 65534, 99), Ok(10));
        assert_eq!(find_app(proc.path(), "app", 0, 99), Ok(5));
        let e = find_app(proc.path(), "app", 1000, 99).unwrap_err();
        assert_eq!(
            e,
            "no process named \"app\" runs as uid 1000, only 5 (uid 0), 7 (uid 4321), 10 (uid 65534): none signalled (set notify.signal.uid to the app's user)"
        );
        // The real uid decides: a process whose status cannot be read is nobody's.
        std::fs::remove_file(proc.path().join("10/status")).unwrap();
        assert!(find_app(proc.path(), "app", 65534, 99).unwrap_err().contains("10 (uid unknown)"));
    }

    /// Two main processes of the name and the user: neither is signalled, the failure names both.
    #[test]
    fn an_ambiguous_match_is_a_failure_naming_the_pids() {
        let proc = fake_proc(&[
            (10, "app", &["app"], 1),
            (11, "app", &["app"], 10),
            (20, "app", &["/opt/other/app", "--serve"], 1),
        ]);
        let target = SignalTarget { process: "app".into(), signal: "HUP", uid: Some(APP_UID) };
        assert_eq!(
            signal_processes(proc.path(), &target).unwrap_err(),
            "2 processes named \"app\" of uid 1000 could each be the app (10, 20): none signalled (give notify.signal.process a name only the app has)"
        );
    }

    #[test]
    fn a_uid_to_signal_is_checked_where_the_daemon_runs() {
        let own = rustix::process::geteuid().as_raw();
        assert_eq!(settings("  signal: {process: app, uid: 33}\n").signal.unwrap().uid, Some(33));
        assert_eq!(settings("  signal: {process: app}\n").signal.unwrap().uid, None);
        let p = problems("  signal: {process: app, uid: -1}\n", Checks::Static);
        assert!(p[0].starts_with("notify.signal"), "{p:?}");
        let other = own.wrapping_add(4321);
        let p = problems(&format!("  signal: {{process: app, uid: {other}}}\n"), Checks::Environment);
        let p: Vec<&String> = p.iter().filter(|p| p.starts_with("notify")).collect();
        if rustix::process::geteuid().is_root() {
            assert!(p.is_empty(), "root may signal any user's process: {p:?}");
        } else {
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(
                p[0].starts_with(&format!("notify.signal.uid: {other}: this process (uid {own}) may not signal")),
                "{p:?}"
            );
        }
        assert!(problems(&format!("  signal: {{process: app, uid: {own}}}\n"), Checks::Environment)
            .iter()
            .all(|p| !p.starts_with("notify")));
    }

    #[test]
    fn signal_names_are_the_catchable_ones() {
        assert_eq!(signal_named("HUP").map(|s| s.1), Some(Signal::HUP));
        assert_eq!(signal_named(" SigTerm ").map(|s| s.0), Some("TERM"));
        for bad in ["KILL", "STOP", "SEGV", "", "SIG", "1"] {
            assert!(signal_named(bad).is_none(), "{bad}");
        }
    }
}
