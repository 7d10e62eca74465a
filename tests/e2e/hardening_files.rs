//! The local files the daemon reads and writes, as an attacker or a careless operator leaves
//! them (issue 14, items 3, 4, 6, 7 and 9): FIFOs and devices where a password, a token or a
//! ledger is expected, files of a gigabyte, symbolic links planted at the token path, a token
//! file someone else put there, and two daemons on one directory; and the configuration file
//! itself as a FIFO, a device or a huge file, at start and at a reload (issue 19, item 7).
//!
//! Every child runs under an address-space limit (`ulimit -v`) and every wait is bounded, with
//! the child killed on expiry: a regression that reads a device whole or blocks on a FIFO fails
//! the test instead of taking the machine's memory or hanging it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::common::*;
use magento_devserver::DevServerOptions;

const SEC: Duration = Duration::from_secs(1);
/// The address space a child may take, in KiB: a debug build of the daemon needs a fraction of
/// it; reading a 1 GiB file or a device whole does not fit.
const ADDRESS_SPACE_KIB: u64 = 1024 * 1024;
/// The most resident memory a daemon may reach in these tests: it idles at a few MiB.
const PEAK_RSS_KIB: u64 = 64 * 1024;
/// The name of the lock file in the output directory.
const LOCK_FILE: &str = ".magento-token-sidecar.lock";

fn secrets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The binary under the address-space limit, its environment as the harness sets it.
fn limited(args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\"")).arg(BIN).args(args);
    for var in PROXY_VARIABLES {
        c.env_remove(var);
    }
    c.env_remove("RUST_LOG").env_remove("MAGENTO_TOKEN_SIDECAR_CONFIG").stdin(Stdio::null());
    c
}

/// Runs the binary to its end, for at most `limit` (then it is killed): (exit code, stdout,
/// stderr); the code is `None` when it had to be killed or died of a signal.
async fn run_bounded(dir: &Path, args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let tag: u64 = rand::random();
    let (out_path, err_path) = (dir.join(format!("out-{tag:x}")), dir.join(format!("err-{tag:x}")));
    let mut child = limited(args)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let code = exit_within(&mut child, limit).await;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (code, read(&out_path), read(&err_path))
}

/// `run` on `config` under the address-space limit, its stderr in `log`, checked against the
/// secrets of `w` when it stops.
fn start_limited(w: &World, config: &Path, log: &Path, admin_port: u16) -> Daemon {
    let child = limited(&["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Daemon::adopt(child, log, admin_port).guarded_by(w)
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Puts `make`'s result at `path` with a rename, as Kubernetes swaps a Secret's files.
fn swap_in(path: &Path, make: impl FnOnce(&Path)) {
    let new = path.with_extension("swap");
    let _ = std::fs::remove_file(&new);
    make(&new);
    std::fs::rename(&new, path).unwrap();
}

/// Waits until `path` is a regular file with some content; returns the content.
async fn wait_regular(path: &Path, limit: Duration) -> String {
    wait_for(limit, &format!("a regular file at {}", path.display()), || async {
        let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
        regular.then(|| std::fs::read_to_string(path).ok().filter(|t| !t.is_empty())).flatten()
    })
    .await
}

/// A well-formed JWT the dev server never issued, with these claims.
fn foreign_jwt(iat: SystemTime, exp: SystemTime) -> String {
    use base64::engine::{general_purpose::URL_SAFE_NO_PAD, Engine};
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD
        .encode(serde_json::json!({"uid": 1, "utypid": 3, "iat": unix(iat), "exp": unix(exp)}).to_string());
    let signature = URL_SAFE_NO_PAD.encode([0x5a; 32]);
    format!("{header}.{claims}.{signature}")
}

async fn healthz_ok(d: &Daemon) {
    assert_eq!(d.get("/healthz").await, Some((200, "ok".to_string())), "/healthz answers");
}

async fn metric_at_least(d: &Daemon, series: &str, at_least: f64, limit: Duration) -> f64 {
    wait_for(limit, &format!("{series} >= {at_least}"), || async { d.metric(series).await.filter(|v| *v >= at_least) })
        .await
}

fn password_errors(customer: &str) -> String {
    series("magento_token_password_errors_total", customer)
}

// ---------------------------------------------------------------------------------------------
// 3. FIFOs

/// `check` with a FIFO as password file ends at once, exit 2, naming the key: nothing opens
/// the FIFO waiting for a writer that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_fifo_password_file_at_once() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    let fifo = w.secret_path("bob");
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let config = w.config_path().display().to_string();
    for command in ["check", "run", "once"] {
        let (code, _, err) = run_bounded(w.dir.path(), &[command, "--config", &config], 20 * SEC).await;
        assert_eq!(code, Some(2), "{command} (None: it hung and was killed): {err}");
        let expect = format!("customers[1].password_file: {} is a FIFO, not a regular file", fifo.display());
        assert!(err.contains(&expect), "{command}: {err}");
    }
    assert!(w.server.requests().is_empty(), "no request");
}

/// A FIFO at a token path (`<dir>/<name>`) and at a 401 ledger (`<dir>/.<name>.auth`): the
/// daemon logs both customers in and replaces the FIFOs by their files, `/healthz` answers,
/// and SIGTERM stops it with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_at_the_token_and_ledger_paths_freeze_nothing() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    mkfifo(&w.token_path("alice"));
    mkfifo(&w.token_path(".bob.auth"));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    // Never opened by the test while it is a FIFO: that would block the test itself.
    let alice = wait_regular(&w.token_path("alice"), 15 * SEC).await;
    let bob = wait_regular(&w.token_path("bob"), 15 * SEC).await;
    d.wait_ready(10 * SEC).await;
    healthz_ok(&d).await;
    assert_eq!(w.server.check_token(&alice).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.check_token(&bob).as_deref(), Some(BOB.1));
    assert!(std::fs::metadata(w.token_path("alice")).unwrap().is_file(), "the FIFO was replaced by the token file");
    let logs = d.logs();
    assert!(logs.contains(&format!("{} is a FIFO", w.token_path("alice").display())), "{logs}");
    assert!(logs.contains(&format!("{} is a FIFO", w.token_path(".bob.auth").display())), "{logs}");
    d.assert_secrets_hidden(&secrets(&[ALICE.2, BOB.2, &alice, &bob])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A FIFO swapped in for a password file while the daemon runs is a password error for that
/// customer (no login sent), and the other customer keeps refreshing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_swapped_in_for_a_password_file_is_a_password_error() {
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    for (name, email, password) in [ALICE, BOB] {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "  before_expiry: 5s\n  jitter: 0s\n", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    d.wait_ready(15 * SEC).await;
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;

    swap_in(&w.secret_path("alice"), mkfifo);
    // alice's next login comes about 5 s after the last.
    metric_at_least(&d, &password_errors("alice"), 1.0, 20 * SEC).await;
    let attempts = w.server.login_attempts(ALICE.1);
    let bob_successes = d.metric(&refreshes("bob", "success")).await.unwrap();
    metric_at_least(&d, &refreshes("bob", "success"), bob_successes + 1.0, 20 * SEC).await;
    healthz_ok(&d).await;
    assert_eq!(w.server.login_attempts(ALICE.1), attempts, "no login for alice without a password");
    let status = d.status_of("alice").await;
    assert_eq!(status["last_error"]["class"], "password", "{status}");
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("is a FIFO, not a regular file"), "{message}");

    // A regular file again: alice is back at her next try.
    let successes = d.metric(&refreshes("alice", "success")).await.unwrap();
    swap_in(&w.secret_path("alice"), |p| std::fs::write(p, ALICE.2).unwrap());
    metric_at_least(&d, &refreshes("alice", "success"), successes + 1.0, 20 * SEC).await;
    d.assert_secrets_hidden(&secrets(&[ALICE.2, BOB.2])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 4. Reads of unbounded size

/// A 1 GiB (sparse) password file and a symbolic link to /dev/zero are refused by `check`,
/// exit 2, naming the key and what is wrong: nothing is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_huge_and_device_password_files() {
    let w = World::with_customers(&[ALICE]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let config = w.config_path().display().to_string();
    let secret = w.secret_path("alice");

    swap_in(&secret, |p| std::fs::File::create(p).unwrap().set_len(1 << 30).unwrap());
    let (code, _, err) = run_bounded(w.dir.path(), &["check", "--config", &config], 20 * SEC).await;
    assert_eq!(code, Some(2), "(None: it was killed, or died of the memory limit): {err}");
    let expect = format!("customers[0].password_file: {} is larger than 4 KiB", secret.display());
    assert!(err.contains(&expect), "{err}");

    swap_in(&secret, |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    let (code, _, err) = run_bounded(w.dir.path(), &["check", "--config", &config], 20 * SEC).await;
    assert_eq!(code, Some(2), "(None: it was killed, or died of the memory limit): {err}");
    let expect = format!("customers[0].password_file: {} is a character device, not a regular file", secret.display());
    assert!(err.contains(&expect), "{err}");
}

/// The same files swapped in while the daemon runs: password errors, no login sent, and the
/// daemon's memory stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_device_password_files_at_run_time_keep_memory_small() {
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  before_expiry: 5s\n  jitter: 0s\n", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    d.wait_metric(&refreshes("alice", "success"), 1.0, 15 * SEC).await;
    let before = d.peak_rss_kib().unwrap();
    let attempts = w.server.login_attempts(ALICE.1);
    let secret = w.secret_path("alice");

    swap_in(&secret, |p| std::fs::File::create(p).unwrap().set_len(1 << 30).unwrap());
    metric_at_least(&d, &password_errors("alice"), 1.0, 20 * SEC).await;
    let message = d.status_of("alice").await["last_error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("is larger than 4 KiB"), "{message}");

    let errors = d.metric(&password_errors("alice")).await.unwrap();
    swap_in(&secret, |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    wait_for(20 * SEC, "a password error naming /dev/zero's kind", || async {
        let status = d.status_of("alice").await;
        let message = status["last_error"]["message"].as_str().unwrap_or_default().to_owned();
        let errors_now = d.metric(&password_errors("alice")).await?;
        (errors_now > errors && message.contains("is a character device, not a regular file")).then_some(())
    })
    .await;
    healthz_ok(&d).await;
    assert_eq!(w.server.login_attempts(ALICE.1), attempts, "no login sent with such a password");
    let peak = d.peak_rss_kib().unwrap();
    eprintln!("peak RSS: {before} KiB before the swaps, {peak} KiB after a 1 GiB file and /dev/zero");
    assert!(peak < PEAK_RSS_KIB, "the daemon's peak memory reached {peak} KiB");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A 401 ledger that is a symbolic link to /dev/zero is ignored (a warning names it), by `run`
/// and by `once`, with memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_linked_to_dev_zero_is_ignored() {
    let w = World::with_customers(&[ALICE]).await;
    let ledger = w.token_path(".alice.auth");
    std::os::unix::fs::symlink("/dev/zero", &ledger).unwrap();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    w.wait_token("alice", None, 15 * SEC).await;
    d.wait_ready(5 * SEC).await;
    let peak = d.peak_rss_kib().unwrap();
    eprintln!("peak RSS with the ledger linked to /dev/zero: {peak} KiB");
    assert!(peak < PEAK_RSS_KIB, "the daemon's peak memory reached {peak} KiB");
    let logs = d.logs();
    assert!(logs.contains(&format!("{} is a symbolic link", ledger.display())), "{logs}");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));

    // once reads the ledger too.
    let _ = std::fs::remove_file(&ledger);
    std::os::unix::fs::symlink("/dev/zero", &ledger).unwrap();
    let config = w.config_path().display().to_string();
    let (code, _, err) = run_bounded(w.dir.path(), &["once", "--config", &config], 20 * SEC).await;
    assert_eq!(code, Some(0), "(None: it was killed, or died of the memory limit): {err}");
    assert!(err.contains("is a symbolic link"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 6. Symbolic links at the token path

/// A symbolic link planted at the token path, to a file holding a valid token: not followed.
/// The daemon never shows that token to Magento (no `customers/me`), logs in, and replaces the
/// link by its own file; the link's target is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_at_the_token_path_is_not_followed() {
    let w = World::with_customers(&[ALICE]).await;
    let planted = w.login_directly(ALICE.1, ALICE.2).await;
    let target = w.dir.path().join("elsewhere");
    std::fs::write(&target, &planted).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = w.token_path("alice");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    d.wait_ready(15 * SEC).await;
    let written = wait_regular(&link, 10 * SEC).await;
    assert_eq!(w.server.check_token(&written).as_deref(), Some(ALICE.1));
    let me: Vec<_> = w.server.requests().into_iter().filter(|r| r.path.ends_with("/customers/me")).collect();
    assert!(me.is_empty(), "the planted token was sent to customers/me: {me:?}");
    assert_eq!(w.server.login_attempts(ALICE.1), 2, "the direct login and the daemon's");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), planted, "the link's target is unchanged");
    assert_eq!(mode_of(&link), 0o600);
    let logs = d.logs();
    assert!(logs.contains(&format!("{} is a symbolic link", link.display())), "{logs}");
    d.assert_secrets_hidden(&secrets(&[ALICE.2, &planted, &written])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 7. Readiness

/// Clears the immutable flag it set, whatever happens in the test.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    /// `chattr +i` on each path; `None` where the filesystem or the user cannot.
    fn set(paths: &[PathBuf]) -> Option<Immutable> {
        let mut set = Immutable(Vec::new());
        for p in paths {
            let ok = Command::new("chattr").arg("+i").arg(p).stderr(Stdio::null()).status().ok()?.success();
            if !ok {
                return None;
            }
            set.0.push(p.clone());
        }
        Some(set)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
    }
}

/// Token files the daemon neither wrote nor saw Magento accept, where every write fails (the
/// files immutable, as another user's file in a sticky directory is to a daemon that is not
/// root): `/readyz` stays 503 and `magento_token_valid` 0. alice's file holds a well-formed
/// token with a future `exp` that Magento refuses; bob's, another user's, holds one due for a
/// refresh (never shown to Magento).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_counts_only_tokens_validated_or_written() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    let now = SystemTime::now();
    let alice = foreign_jwt(now, now + Duration::from_secs(3600));
    let bob = foreign_jwt(now, now + Duration::from_secs(600));
    w.seed_token("alice", &alice);
    w.seed_token("bob", &bob);
    let (alice_path, bob_path) = (w.token_path("alice"), w.token_path("bob"));
    // Another user's file (where the tests may chown: as root).
    let chowned = Command::new("chown").arg("65534:65534").arg(&bob_path).status().is_ok_and(|s| s.success());
    let Some(_immutable) = Immutable::set(&[alice_path.clone(), bob_path.clone()]) else {
        eprintln!(
            "readiness: cannot make a file immutable here (chattr +i needs root and ext4, xfs or btrfs): skipped"
        );
        return;
    };
    // before_expiry 15m (the default): alice's token (1 h left) is checked with customers/me,
    // bob's (10 min left) is due at once.
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    for name in ["alice", "bob"] {
        metric_at_least(&d, &refreshes(name, "write_error"), 1.0, 15 * SEC).await;
    }
    assert!(d.logs().contains("Operation not permitted"), "{}", d.logs());
    let mut names = vec!["alice"];
    if chowned {
        assert_eq!(std::fs::metadata(&bob_path).unwrap().uid(), 65534);
        names.push("bob");
    } else {
        eprintln!("readiness: cannot chown here: only alice's case is checked");
    }
    let (status, body) = d.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "ready with tokens nobody validated and every write failing: {body}");
    for name in &names {
        assert!(body.contains(name), "{body}");
        assert_eq!(d.metric(&series("magento_token_valid", name)).await, Some(0.0), "{name}");
    }
    assert_eq!(std::fs::read_to_string(&alice_path).unwrap(), alice);
    d.assert_secrets_hidden(&secrets(&[ALICE.2, BOB.2, &alice, &bob])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 9. One daemon per directory

fn lock_holder_message(w: &World, pid: u32) -> String {
    format!("{} is in use by magento-token-sidecar pid {pid} on host", w.tokens().display())
}

/// A second daemon (and a `once`) on a directory in use exits 1 before touching anything,
/// naming the first one's pid; the first keeps its token fresh; once it stops, a new one
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_one_directory_exits_naming_the_first() {
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "  before_expiry: 5s\n  jitter: 0s\n", "");
    w.write_config(&text);
    let mut first = start_limited(&w, &w.config_path(), &w.dir.path().join("first.log"), w.admin_port);
    first.wait_ready(15 * SEC).await;

    // The second one in another pod: its own admin port, the same directory. A file shaped
    // like the first one's temporary file, in the middle of a write, must survive its start.
    let in_flight = w.token_path(".alice.Zq7Xw2.tmp");
    std::fs::write(&in_flight, "").unwrap();
    let second_port = free_port();
    let second_config = w.dir.path().join("second.yaml");
    std::fs::write(&second_config, text.replace(&format!(":{}\n", w.admin_port), &format!(":{second_port}\n")))
        .unwrap();
    let mut second = start_limited(&w, &second_config, &w.dir.path().join("second.log"), second_port);
    let code = second.wait_exit(15 * SEC).await.code();
    assert_eq!(code, Some(1), "{}", second.logs());
    let expect = lock_holder_message(&w, first.pid());
    assert!(second.logs().contains(&expect), "{}", second.logs());
    assert!(second.logs().contains("two daemons must not share an output directory"), "{}", second.logs());
    assert!(in_flight.exists(), "the second daemon swept the first one's temporary file");
    std::fs::remove_file(&in_flight).unwrap();
    let lock = std::fs::read_to_string(w.token_path(LOCK_FILE)).unwrap();
    assert!(lock.starts_with(&format!("pid {}\nhost ", first.pid())), "{lock}");

    let (code, _, err) =
        run_bounded(w.dir.path(), &["once", "--config", second_config.to_str().unwrap()], 20 * SEC).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&expect), "{err}");

    // The first goes on refreshing.
    let token = w.read_token("alice").unwrap();
    let successes = first.metric(&refreshes("alice", "success")).await.unwrap();
    metric_at_least(&first, &refreshes("alice", "success"), successes + 1.0, 20 * SEC).await;
    let fresh = w.wait_token("alice", Some(&token), 5 * SEC).await;
    assert_eq!(w.server.check_token(&fresh).as_deref(), Some(ALICE.1));
    assert_eq!(first.stop().await.code(), Some(0));
    assert!(!w.token_path(LOCK_FILE).exists(), "a clean stop removes the lock file");

    // Free again.
    let mut third = start_limited(&w, &second_config, &w.dir.path().join("third.log"), second_port);
    third.wait_ready(15 * SEC).await;
    assert_eq!(third.stop().await.code(), Some(0));
    let logs = format!("{}{}{}", first.logs(), second.logs(), third.logs());
    assert_hidden("the logs", &logs, &secrets(&[ALICE.2, &token, &fresh]));
}

/// A reload that moves output.dir to a directory another daemon holds is refused (the old
/// configuration keeps running); one to a free directory takes it, and lets the old one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_into_a_directory_in_use_is_refused() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&text);
    let mut d = start_limited(&w, &w.config_path(), &w.dir.path().join("daemon.log"), w.admin_port);
    d.wait_ready(15 * SEC).await;

    // Another daemon holds `taken`.
    let taken = w.dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    let other_port = free_port();
    let other_config = w.dir.path().join("other.yaml");
    let in_dir = |dir: &Path, text: &str| {
        text.replace(&format!("dir: {}\n", w.tokens().display()), &format!("dir: {}\n", dir.display()))
    };
    std::fs::write(
        &other_config,
        in_dir(&taken, &w.config_text(&[(BOB.0, BOB.1)], "", ""))
            .replace(&format!(":{}\n", w.admin_port), &format!(":{other_port}\n")),
    )
    .unwrap();
    let mut other = start_limited(&w, &other_config, &w.dir.path().join("other.log"), other_port);
    other.wait_ready(15 * SEC).await;

    w.write_config(&in_dir(&taken, &text));
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"failure\"}", 1.0, 10 * SEC).await;
    let expect = format!("{} is in use by magento-token-sidecar pid {} on host", taken.display(), other.pid());
    assert!(d.logs().contains(&expect), "{}", d.logs());
    assert!(!taken.join("alice").exists(), "alice is not written where the other daemon works");
    assert!(std::fs::read_to_string(w.token_path(LOCK_FILE)).unwrap().contains(&d.pid().to_string()));
    healthz_ok(&d).await;

    let free = w.dir.path().join("free");
    std::fs::create_dir(&free).unwrap();
    w.write_config(&in_dir(&free, &text));
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 10 * SEC).await;
    let token = wait_for(10 * SEC, "alice's token in the new directory", || async {
        std::fs::read_to_string(free.join("alice")).ok().filter(|t| !t.is_empty())
    })
    .await;
    assert!(std::fs::read_to_string(free.join(LOCK_FILE)).unwrap().contains(&d.pid().to_string()));
    assert!(!w.token_path(LOCK_FILE).exists(), "the old directory is let go");
    assert_eq!(d.stop().await.code(), Some(0));
    assert_eq!(other.stop().await.code(), Some(0));
    assert_hidden("the logs", &d.logs(), &secrets(&[ALICE.2, &token]));
}

// ---------------------------------------------------------------------------------------------
// Issue 19, item 7. The configuration file itself

/// `check`, `run` and `once` on a configuration file that is a FIFO, /dev/zero or a file of
/// 5 MiB end at once, exit 2, naming the file and what is wrong; a configuration mounted as
/// a ConfigMap mounts it (a link to `..data/<key>`, `..data` a link to a directory) is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_that_is_no_regular_file_is_refused_at_once() {
    let w = World::with_customers(&[ALICE]).await;
    let good = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    let fifo = w.dir.path().join("fifo.yaml");
    mkfifo(&fifo);
    let huge = w.dir.path().join("huge.yaml");
    std::fs::File::create(&huge).unwrap().set_len(5 << 20).unwrap();
    let cases = [
        (fifo.clone(), "is a FIFO, not a regular file", &["check", "run", "once"][..]),
        (PathBuf::from("/dev/zero"), "is a character device, not a regular file", &["check", "run"][..]),
        (huge.clone(), "is larger than 4 MiB, the most it may hold", &["check"][..]),
    ];
    for (file, why, commands) in cases {
        let config = file.display().to_string();
        for command in commands {
            let (code, _, err) = run_bounded(w.dir.path(), &[command, "--config", &config], 20 * SEC).await;
            assert_eq!(code, Some(2), "{command} {config} (None: it hung, or died of the memory limit): {err}");
            let expect = format!("{config}: 1 problem\n  the configuration file {why}");
            assert!(err.contains(&expect), "{command} {config}: {err}");
        }
    }

    let mount = w.dir.path().join("configmap");
    std::fs::create_dir_all(mount.join("..2026_01_01_00_00_00.1")).unwrap();
    std::fs::write(mount.join("..2026_01_01_00_00_00.1/config.yaml"), good).unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.yaml", mount.join("config.yaml")).unwrap();
    let config = mount.join("config.yaml").display().to_string();
    let (code, out, err) = run_bounded(w.dir.path(), &["check", "--config", &config], 20 * SEC).await;
    assert_eq!(code, Some(0), "a ConfigMap's link chain is followed: {err}");
    assert!(out.contains(": ok"), "{out}");
    assert!(w.server.requests().is_empty(), "no request");
}

/// The configuration file swapped for a FIFO, then for a link to /dev/zero, before a SIGHUP:
/// each reload is refused and counted, the error names what is wrong, `/healthz` answers, the
/// memory stays small; a good file is then reloaded, and SIGTERM stops the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_swapped_for_a_fifo_or_a_device_is_a_refused_reload() {
    let w = World::with_customers(&[ALICE]).await;
    let good = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&good);
    let config = w.config_path();
    let mut d = start_limited(&w, &config, &w.dir.path().join("daemon.log"), w.admin_port);
    d.wait_ready(15 * SEC).await;
    let before = d.peak_rss_kib().unwrap();
    let failures = "magento_token_config_reloads_total{result=\"failure\"}";

    for (n, (make, why)) in [
        (Box::new(|p: &Path| mkfifo(p)) as Box<dyn FnOnce(&Path)>, "is a FIFO, not a regular file"),
        (
            Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
            "is a character device, not a regular file",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        swap_in(&config, make);
        d.signal("HUP");
        d.wait_metric(failures, (n + 1) as f64, 10 * SEC).await;
        healthz_ok(&d).await;
        let logs = d.logs();
        let line = logs.lines().find(|l| l.contains("configuration reload failed") && l.contains(why));
        assert!(line.is_some(), "no error line saying the file {why}:\n{logs}");
    }
    let peak = d.peak_rss_kib().unwrap();
    eprintln!("peak RSS: {before} KiB before, {peak} KiB after reloads from a FIFO and /dev/zero");
    assert!(peak < PEAK_RSS_KIB, "the daemon's peak memory reached {peak} KiB");

    swap_in(&config, |p| std::fs::write(p, &good).unwrap());
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 10 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
}
