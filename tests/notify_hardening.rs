//! `notify:` against commands and neighbours that misbehave (issue 19): the real binary, judged
//! by what an operator sees: the processes left, the daemon's log, who got a signal.
//!
//! Tests that need root (another user's processes, a PID namespace of its own) skip, saying so,
//! when not run as root; CI runs them as root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const SEC: Duration = Duration::from_secs(1);

fn notified(customer: &str, result: &str) -> String {
    format!("magento_token_notify_total{{customer=\"{customer}\",result=\"{result}\"}}")
}

fn notify_section(body: &str) -> String {
    format!("notify:\n{body}")
}

/// An executable shell script in the test's directory.
fn script(w: &World, name: &str, body: &str) -> PathBuf {
    let path = w.dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn out_dir(w: &World) -> PathBuf {
    let out = w.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    out
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a test that needs root is skipped here (saying so): CI runs it as root.
fn skipped_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!(
            "{test}: skipped, this test runs as uid {} (CI runs it as root)",
            rustix::process::geteuid().as_raw()
        );
    }
    !is_root()
}

/// A process's state letter and parent, from its `stat`; `None` once it is gone.
fn state_and_parent(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Alive: not gone, and not a zombie (killed, waiting for its parent to reap it).
fn alive(pid: u32) -> bool {
    state_and_parent(pid).is_some_and(|(state, _)| state != 'Z')
}

/// A process killed when the test ends, whatever happened.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Item 6: `signal` reaches the app, and only the app.

/// As root (needed for `output.uid`), another user's process that bears the app's name (a
/// decoy: `exec -a app-under-test sleep`) was signalled with the app; now only processes of the
/// daemon's own uid are candidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoy_of_another_user_is_never_signalled() {
    if skipped_unless_root("a_decoy_of_another_user_is_never_signalled") {
        return;
    }
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let app_binary = w.dir.path().join("app-under-test");
    std::fs::copy("/bin/sh", &app_binary).unwrap();
    let hups = out.join("hups");
    let ready = out.join("ready");
    let _app = Killed(
        Command::new(&app_binary)
            .arg("-c")
            .arg(format!(
                "trap 'echo hup >> {}' HUP; echo ready > {}; while :; do sleep 1 & wait $!; done",
                hups.display(),
                ready.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Another user's process named like the app: SIGHUP would end it.
    let decoy = Killed(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "bash",
                "-c",
                "exec -a app-under-test sleep 120",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let decoy_pid = decoy.0.id();
    wait_for(10 * SEC, "the app and the decoy to start", || async {
        let decoy_named =
            std::fs::read(format!("/proc/{decoy_pid}/cmdline")).is_ok_and(|c| c.starts_with(b"app-under-test\0"));
        (ready.exists() && decoy_named).then_some(())
    })
    .await;
    let notify = notify_section("  signal: {process: app-under-test, signal: HUP}\n");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "success"), 1.0, 20 * SEC).await;
    wait_for(10 * SEC, "the app's SIGHUP", || async { (lines(&hups) >= 1).then_some(()) }).await;
    tokio::time::sleep(SEC).await;
    assert!(alive(decoy_pid), "the decoy of uid 65534 was signalled");
    assert_eq!(std::fs::read_to_string(&hups).unwrap(), "hup\n", "one signal, to the app");
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Item 5: a command's output is a field of the daemon's line, bounded.

/// A command that prints a forged JSON log line, a plain text line and 20 MB: every line of
/// the daemon's log is still its own JSON, the output shows as escaped fields of one line,
/// bounded, with its size counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_output_never_forges_a_log_line() {
    const FORGED: &str = r#"{"level":"ERROR","message":"forged","target":"magento_token_sidecar::worker"}"#;
    const BIG: u64 = 20_000_000;
    let w = World::with_customers(&[ALICE]).await;
    let chatty = script(
        &w,
        "chatty.sh",
        &format!("printf '%s\\n' '{FORGED}' >&2\necho 'plain text, not JSON' >&2\necho to-stdout\nhead -c {BIG} /dev/zero | tr '\\0' x >&2\n"),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  timeout: 60s\n", chatty.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "success"), 1.0, 60 * SEC).await;
    let log_bytes = std::fs::metadata(&d.log).unwrap().len();
    let logs = d.logs();
    let parsed: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line of the daemon's: {:.200}", l)))
        .collect();
    assert!(!parsed.iter().any(|l| l["message"] == "forged"), "a forged line: {logs:.2000}");
    let output: Vec<&serde_json::Value> =
        parsed.iter().filter(|l| l["message"] == "output of the notify command").collect();
    assert_eq!(output.len(), 1, "{logs:.2000}");
    let line = output[0];
    assert_eq!(line["customer"], "alice");
    assert_eq!(line["level"], "INFO");
    let stderr = line["stderr"].as_str().unwrap();
    assert!(stderr.starts_with(&format!("{FORGED}\\nplain text, not JSON\\nxxx")), "{stderr:.300}");
    assert!(stderr.ends_with('…') && stderr.len() < 4096, "{} bytes shown", stderr.len());
    assert_eq!(line["stderr_bytes"], BIG + FORGED.len() as u64 + 1 + 21);
    assert_eq!(line["stdout"], "to-stdout\\n");
    assert_eq!(line["stdout_bytes"], 10);
    assert!(log_bytes < 200_000, "the log holds {log_bytes} bytes: the output was copied");
    eprintln!("log: {log_bytes} bytes; the daemon's peak RSS: {:?} KiB", d.peak_rss_kib());
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Item 4: what commands leave running, as PID 1 and not.

/// The daemon's children that ended and were not waited for.
fn zombies_of(pid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| state_and_parent(*p) == Some(('Z', pid)))
        .count()
}

/// A command that leaves an orphan that ends at once, a child that called `setsid`, one in
/// the background and one orphaned that run on: the ended one is reaped, the notification is a
/// success (what it left holds its output pipes: not waited for), and at stop none is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_command_left_running_outlives_the_daemon() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let pids = out.join("pids");
    let p = pids.display();
    let leaver = script(
        &w,
        "leaver.sh",
        &format!("(sleep 0.2 &)\nsetsid sleep 300 &\necho $! >> {p}\nsleep 300 &\necho $! >> {p}\n(sleep 300 & echo $! >> {p})\n"),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n", leaver.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "success"), 1.0, 20 * SEC).await;
    let left: Vec<u32> = wait_for(10 * SEC, "the pids of what the command left", || async {
        let pids: Vec<u32> = std::fs::read_to_string(&pids).ok()?.lines().filter_map(|l| l.parse().ok()).collect();
        (pids.len() == 3).then_some(pids)
    })
    .await;
    for pid in &left {
        assert!(alive(*pid), "{pid} runs while the daemon does");
    }
    wait_for(10 * SEC, "the ended orphan to be reaped", || async { (zombies_of(d.pid()) == 0).then_some(()) }).await;
    assert_eq!(d.stop().await.code(), Some(0));
    let survivors: Vec<u32> = left.iter().copied().filter(|pid| alive(*pid)).collect();
    for pid in &survivors {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    assert!(survivors.is_empty(), "{survivors:?} outlived the daemon");
    assert!(d.logs().contains("killed what notify commands had left running"), "{}", d.logs());
}

/// The storm of the container's entrypoint: the daemon as PID 1 of a PID namespace, 30
/// customers whose tokens are replaced every 2 s, and a command that leaves an orphan
/// (`(sleep 0.3 &)`) each time. Every orphan is reaped, and no command's exit status is lost to
/// the reaper (a stolen one would count a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_pid_1_a_storm_of_orphans_leaves_no_zombie() {
    if skipped_unless_root("as_pid_1_a_storm_of_orphans_leaves_no_zombie") {
        return;
    }
    const CUSTOMERS: usize = 30;
    const STORM: Duration = Duration::from_secs(40);
    let w = World::new(magento_devserver::DevServerOptions { token_lifetime: 4 * SEC, ..Default::default() }).await;
    let names: Vec<(String, String)> =
        (0..CUSTOMERS).map(|i| (format!("c{i:02}"), format!("c{i:02}@example.com"))).collect();
    for (name, email) in &names {
        w.server.add_customer(email, "storm-Pa55word!");
        w.set_password(name, "storm-Pa55word!");
    }
    let customers: Vec<(&str, &str)> = names.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
    let notify = notify_section("  exec: [\"/bin/sh\", \"-c\", \"(sleep 0.3 &)\"]\n");
    w.write_config(&w.config_text(&customers, "  before_expiry: 2s\n  jitter: 0s\n", &notify));
    let log = w.dir.path().join("daemon.log");
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", BIN, "run", "--config"])
        .arg(w.config_path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let unshare = child.id();
    let mut d = Daemon { child, log, admin_port: w.admin_port };
    // The daemon: unshare's child, PID 1 inside.
    let daemon = wait_for(10 * SEC, "the daemon in its PID namespace", || async {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|p| state_and_parent(*p).is_some_and(|(_, parent)| parent == unshare))
    })
    .await;
    d.wait_ready(30 * SEC).await;
    tokio::time::sleep(STORM).await;
    let mut samples = Vec::new();
    for _ in 0..10 {
        samples.push(zombies_of(daemon));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut notified_total = 0.0;
    let mut failures = 0.0;
    for (name, _) in &names {
        notified_total += d.metric(&notified(name, "success")).await.unwrap();
        failures += d.metric(&notified(name, "failure")).await.unwrap();
    }
    eprintln!(
        "after {STORM:?} of the storm as PID 1: zombies {samples:?}; {notified_total} notifications succeeded, {failures} failed"
    );
    assert!(d.logs().contains("running as PID 1"), "the daemon knows it is PID 1");
    assert!(notified_total >= 100.0, "a storm: {notified_total} notifications");
    assert_eq!(failures, 0.0, "a command's status was lost: {}", d.logs());
    assert!(samples.iter().min().unwrap() <= &2, "zombies left: {samples:?}");
    assert!(samples.iter().max().unwrap() < &50, "zombies left: {samples:?}");
    let ok = Command::new("kill").args(["-TERM", &daemon.to_string()]).status().unwrap().success();
    assert!(ok);
    assert_eq!(d.wait_exit(30 * SEC).await.code(), Some(0), "{}", d.logs());
}
