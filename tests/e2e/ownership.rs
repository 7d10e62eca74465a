//! Ownership of the files the daemon writes (issue 13, part 2): `output.uid` and `output.gid`.
//!
//! As root (CI runs as root): every file written (token files, the 401 ledger, temporaries) has
//! the configured owner and group from the moment it can be seen, by `run` and by `once`; a
//! watcher thread stats the directory in a tight loop while tokens rotate to prove it.
//! As a user who may not chown (the binary run through `setpriv` as nobody, or as root with only
//! some capabilities): `check`, `run` and `once` refuse the configuration with exit status 2,
//! naming the key, before anything is written.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use magento_devserver::DevServerOptions;

const SEC: Duration = Duration::from_secs(1);
/// Owner and group no process of the test machine runs as.
const UID: u32 = 4321;
const GID: u32 = 8765;
/// The user `setpriv` runs the binary as.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a test that needs root is skipped here (saying so): CI runs it as root.
fn skipped_unless_root() -> bool {
    if !is_root() {
        eprintln!(
            "ownership as root: skipped, this test runs as uid {} (CI runs it as root)",
            rustix::process::geteuid().as_raw()
        );
    }
    !is_root()
}

fn have_setpriv() -> bool {
    Command::new("setpriv").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// `config_text` with `output` lines added after `dir:`.
fn with_output(w: &World, text: &str, lines: &str) -> String {
    let dir = format!("  dir: {}\n", w.tokens().display());
    assert!(text.contains(&dir));
    text.replace(&dir, &format!("{dir}{lines}"))
}

/// What one stat of a file found (shown through `Debug` when a test fails).
#[allow(dead_code)]
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// A thread that lists `dir` and stats every file in it (the lock file aside) in a tight loop,
/// until stopped or `limit` has passed, keeping every file whose owner is not `uid:gid`.
struct Watcher {
    stop: Arc<AtomicBool>,
    /// The names seen so far.
    names: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<(Vec<Seen>, u64)>,
}

impl Watcher {
    fn start(dir: PathBuf, uid: u32, gid: u32, limit: Duration) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let names = Arc::new(Mutex::new(Vec::new()));
        let seen = names.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut wrong = Vec::new();
            let mut stats = 0u64;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < limit {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name == magento_token_sidecar::dirlock::LOCK_FILE {
                        continue;
                    }
                    // Gone since the listing (a temporary renamed): nothing to see.
                    let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
                    stats += 1;
                    let mut names = seen.lock().unwrap();
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                    drop(names);
                    if (meta.uid(), meta.gid()) != (uid, gid) && wrong.len() < 20 {
                        wrong.push(Seen { name, uid: meta.uid(), gid: meta.gid(), mode: meta.mode() & 0o7777 });
                    }
                }
            }
            (wrong, stats)
        });
        Watcher { stop, names, thread }
    }

    /// Waits until it has seen `name` (a thread starved on a busy machine lags behind).
    async fn wait_seen(&self, name: &str) {
        let what = format!("the watcher to see {name}");
        wait_for(10 * SEC, &what, || async { self.names.lock().unwrap().iter().any(|n| n == name).then_some(()) }).await
    }

    /// Stops it: (files with another owner, stats made, names seen).
    fn finish(self) -> (Vec<Seen>, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (wrong, stats) = self.thread.join().unwrap();
        let names = self.names.lock().unwrap().clone();
        (wrong, stats, names)
    }
}

fn owner_of(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o777)
}

/// `run` as root: token files and the ledger are created with the configured owner and group,
/// and no file in the directory (temporaries included) is ever seen with another, while tokens
/// rotate for several customers and one of them gets a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_root_creates_every_file_with_the_configured_owner() {
    if skipped_unless_root() {
        return;
    }
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    let customers: Vec<(String, String, String)> =
        (0..6).map(|i| (format!("c{i}"), format!("c{i}@example.com"), format!("c{i}-Pa55word!"))).collect();
    for (name, email, password) in &customers {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    let pairs: Vec<(&str, &str)> = customers.iter().map(|(n, e, _)| (n.as_str(), e.as_str())).collect();
    let text = w.config_text(&pairs, "  before_expiry: 3s\n  jitter: 0s\n", "");
    w.write_config(&with_output(&w, &text, &format!("  mode: \"0640\"\n  uid: {UID}\n  gid: {GID}\n")));

    // Watching from before the start: nothing the daemon ever puts there has another owner.
    let watcher = Watcher::start(w.tokens(), UID, GID, 60 * SEC);
    let mut d = w.start();
    // Every customer's token rotates twice (6 s tokens, refreshed 3 s before expiry).
    let mut seen: Vec<Vec<String>> = vec![Vec::new(); customers.len()];
    let start = Instant::now();
    while seen.iter().any(|tokens| tokens.len() < 3) {
        assert!(
            start.elapsed() < 40 * SEC,
            "tokens did not rotate twice within 40 s: {:?}",
            seen.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, (name, _, _)) in customers.iter().enumerate() {
            if let Some(token) = w.read_token(name) {
                if seen[i].last() != Some(&token) {
                    seen[i].push(token);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 401 for c0 at its next refresh: its ledger is written beside the token file.
    let (c0, c0_email, _) = &customers[0];
    w.server.set_password(c0_email, "changed-in-magento");
    let ledger = w.tokens().join(format!(".{c0}.auth"));
    wait_for(20 * SEC, "c0's ledger after a 401", || async { ledger.exists().then_some(()) }).await;
    for (name, _, _) in &customers {
        watcher.wait_seen(name).await;
    }
    watcher.wait_seen(&format!(".{c0}.auth")).await;
    let (wrong, stats, names) = watcher.finish();
    eprintln!("watcher: {stats} stats of {} names: {names:?}", names.len());

    assert!(wrong.is_empty(), "files seen with another owner than {UID}:{GID}: {wrong:?}");
    assert_eq!(owner_of(&ledger), (UID, GID, 0o600), "the ledger");
    for (name, _, _) in &customers {
        assert_eq!(owner_of(&w.token_path(name)), (UID, GID, 0o640), "{name}'s token file");
    }
    assert!(stats > 1000, "the watcher made only {stats} stats");
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(w.temporaries().is_empty());
}

/// `once` as root: the token of the customer that logged in and the ledger of the one refused
/// get the configured owner; `check` accepts the keys and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_and_check_as_root_give_files_the_configured_owner() {
    if skipped_unless_root() {
        return;
    }
    let w = World::with_customers(&[ALICE]).await;
    w.server.add_customer(BOB.1, BOB.2);
    w.set_password(BOB.0, "not-bobs-password");
    let text = w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", "");
    w.write_config(&with_output(&w, &text, &format!("  mode: \"0640\"\n  uid: {UID}\n  gid: {GID}\n")));
    let config = w.config_path();
    let config = config.to_str().unwrap();

    let (code, out, err) = run_to_end(&["check", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_dir(w.tokens()).unwrap().count(), 0, "check leaves nothing in the directory");

    let watcher = Watcher::start(w.tokens(), UID, GID, 60 * SEC);
    let (code, out, err) = run_to_end(&["once", "--config", config, "--timeout", "20s"]);
    let (wrong, _, _) = watcher.finish();
    assert_eq!(code, 1, "bob's password is wrong: {out}{err}");
    assert!(wrong.is_empty(), "files seen with another owner than {UID}:{GID}: {wrong:?}");
    assert_eq!(owner_of(&w.token_path(ALICE.0)), (UID, GID, 0o640), "alice's token file");
    assert_eq!(owner_of(&w.tokens().join(".bob.auth")), (UID, GID, 0o600), "bob's ledger");
    assert!(w.stray_files(&["alice", ".bob.auth"]).is_empty(), "{:?}", w.stray_files(&["alice", ".bob.auth"]));
}

/// Runs the binary with `prefix` (a `setpriv` command line, or nothing) in front, for at most
/// 20 s: (exit code, stdout + stderr).
async fn run_as(prefix: &[String], args: &[&str]) -> (Option<i32>, String) {
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    for var in PROXY_VARIABLES {
        command.env_remove(var);
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("MAGENTO_TOKEN_SIDECAR_CONFIG")
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .unwrap();
    let code = exit_within(&mut child, 20 * SEC).await;
    (code, std::fs::read_to_string(out.path()).unwrap())
}

/// A world a non-root user can use: its directories traversable, its files readable, the token
/// directory its own.
async fn world_for(uid: u32, gid: u32) -> World {
    let w = World::with_customers(&[ALICE]).await;
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(w.dir.path().join("secrets"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(w.secret_path(ALICE.0), std::fs::Permissions::from_mode(0o644)).unwrap();
    if is_root() {
        std::os::unix::fs::chown(w.tokens(), Some(uid), Some(gid)).unwrap();
    }
    w
}

/// A daemon that may not chown: `check` exits 2 naming `output.uid` / `output.gid`; `run` and
/// `once` refuse to start likewise, before any login or write. A group the process is a member
/// of is allowed without privilege.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_not_allowed_to_chown_says_so_naming_the_key() {
    // As root: the binary runs as nobody through setpriv; as another user: as that user.
    let (prefix, uid, gid) = if is_root() {
        if !have_setpriv() {
            eprintln!("chown refused as non-root: skipped, setpriv (util-linux) is not installed");
            return;
        }
        let prefix = ["setpriv", &format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"];
        (prefix.map(String::from).to_vec(), NOBODY, NOBODY)
    } else {
        (Vec::new(), rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw())
    };
    let other_uid = if uid == 1000 { 1001 } else { 1000 };
    let groups: Vec<u32> = rustix::process::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
    let other_gid = (4242..).find(|g| *g != gid && (is_root() || !groups.contains(g))).unwrap();
    let w = world_for(uid, gid).await;
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    let config = w.config_path();
    let config = config.to_str().unwrap();
    let refused_uid =
        format!("output.uid: {other_uid}: this process (uid {uid}) may not give files away; run as root or with CAP_CHOWN and CAP_FOWNER, or drop output.uid");
    let refused_gid = format!("output.gid: {other_gid}: this process (uid {uid}) is not a member of group {other_gid}");

    w.write_config(&with_output(&w, &text, &format!("  uid: {other_uid}\n")));
    let (code, out) = run_as(&prefix, &["check", "--config", config]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&refused_uid), "{out}");
    assert!(!out.contains("output.gid"), "{out}");

    w.write_config(&with_output(&w, &text, &format!("  gid: {other_gid}\n")));
    let (code, out) = run_as(&prefix, &["check", "--config", config]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&refused_gid), "{out}");
    assert!(out.contains("or drop output.gid"), "{out}");

    // Both at once: both named.
    w.write_config(&with_output(&w, &text, &format!("  uid: {other_uid}\n  gid: {other_gid}\n")));
    let (code, out) = run_as(&prefix, &["check", "--config", config]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&refused_uid) && out.contains(&refused_gid), "{out}");

    // `run` and `once` refuse to start: no login, no file.
    for args in [vec!["run", "--config", config], vec!["once", "--config", config, "--timeout", "5s"]] {
        let (code, out) = run_as(&prefix, &args).await;
        assert_eq!(code, Some(2), "{}: {out}", args[0]);
        assert!(out.contains(&refused_uid) && out.contains(&refused_gid), "{}: {out}", args[0]);
    }
    assert_eq!(w.server.login_attempts(ALICE.1), 0, "no login was sent");
    assert_eq!(std::fs::read_dir(w.tokens()).unwrap().count(), 0, "nothing was written");

    // Its own group needs no privilege, and gets it on the file.
    w.write_config(&with_output(&w, &text, &format!("  gid: {gid}\n")));
    let (code, out) = run_as(&prefix, &["check", "--config", config]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(std::fs::read_dir(w.tokens()).unwrap().count(), 0, "check leaves nothing in the directory");
    let (code, out) = run_as(&prefix, &["once", "--config", config, "--timeout", "20s"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(owner_of(&w.token_path(ALICE.0)), (uid, gid, 0o600));
}

/// Root with CAP_CHOWN alone (a container with every capability dropped but CHOWN) may give a
/// file away but not set the mode of a file it no longer owns: `check` says CAP_FOWNER is
/// needed too. With both (and nothing else: no CAP_DAC_OVERRIDE), `once` writes the file with
/// the configured owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_files_away_needs_cap_chown_and_cap_fowner() {
    if !is_root() || !have_setpriv() {
        eprintln!("capabilities: skipped, this needs root and setpriv (util-linux)");
        return;
    }
    let w = World::with_customers(&[ALICE]).await;
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&with_output(&w, &text, &format!("  mode: \"0640\"\n  uid: {UID}\n  gid: {GID}\n")));
    let config = w.config_path();
    let config = config.to_str().unwrap();
    let only = |caps: &str| ["setpriv".to_string(), format!("--bounding-set=-all,{caps}"), "--inh-caps=-all".into()];

    let (code, out) = run_as(&only("+chown"), &["check", "--config", config]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!("output.uid: {UID}: this process (uid 0) has CAP_CHOWN but not CAP_FOWNER")),
        "{out}"
    );
    assert!(!out.contains("output.gid"), "CAP_CHOWN is enough for the group: {out}");

    let (code, out) = run_as(&only("+chown,+fowner"), &["once", "--config", config, "--timeout", "20s"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(owner_of(&w.token_path(ALICE.0)), (UID, GID, 0o640));
    assert!(w.stray_files(&["alice"]).is_empty(), "{:?}", w.stray_files(&["alice"]));
}

/// A reload that changes only the owner gives the same token to the new owner at once, without
/// a new login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_the_owner_rewrites_the_same_token() {
    if skipped_unless_root() {
        return;
    }
    let w = World::with_customers(&[ALICE]).await;
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&with_output(&w, &text, &format!("  uid: {UID}\n  gid: {GID}\n")));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(owner_of(&w.token_path("alice")), (UID, GID, 0o600));

    w.write_config(&with_output(&w, &text, &format!("  gid: {}\n", GID + 1)));
    d.signal("HUP");
    wait_for(10 * SEC, "the token file given to the new group", || async {
        let meta = std::fs::metadata(w.token_path("alice")).ok()?;
        (meta.gid() == GID + 1).then_some(())
    })
    .await;
    // No uid configured any more: a new file is the daemon's (root's).
    assert_eq!(owner_of(&w.token_path("alice")), (0, GID + 1, 0o600));
    assert_eq!(w.read_token("alice").as_deref(), Some(token.as_str()), "the same token");
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "no new login");
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 5 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
}
