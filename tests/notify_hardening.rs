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
