//! `notify:` end to end: the real binary against the dev server, telling an app of every new
//! token by a command, a webhook and a signal, judged by what the app receives (environment,
//! request body, signals), the metrics and the logs; then against commands and neighbours that
//! misbehave, judged by the processes left, the daemon's log and who got a signal.
//!
//! Tests that need root (another user's processes, a PID namespace of its own) skip, saying so,
//! when not run as root; CI runs them as root.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use magento_devserver::DevServerOptions;

const SEC: Duration = Duration::from_secs(1);

fn notified(customer: &str, result: &str) -> String {
    format!("magento_token_notify_total{{customer=\"{customer}\",result=\"{result}\"}}")
}

/// An executable shell script in the test's directory.
fn script(w: &World, name: &str, body: &str) -> PathBuf {
    let path = w.dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A directory the scripts write into (their environment is the daemon's choice, not ours, so
/// the paths are written into the scripts).
fn out_dir(w: &World) -> PathBuf {
    let out = w.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    out
}

/// A command that records its environment, one file per run named after the time it started
/// (`run.<nanoseconds since the epoch>`).
fn env_recorder(w: &World, out: &Path) -> PathBuf {
    let out = out.display();
    script(
        w,
        "record-env.sh",
        &format!("n=$(date +%s%N)\nenv > \"{out}/.run.$n\" && mv \"{out}/.run.$n\" \"{out}/run.$n\"\n"),
    )
}

/// Every run recorded so far, in order: (start time, environment).
fn runs(out: &Path) -> Vec<(SystemTime, BTreeMap<String, String>)> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("run."))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let nanos: u64 = n["run.".len()..].parse().unwrap();
            let text = std::fs::read_to_string(out.join(&n)).unwrap();
            let env = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
            (UNIX_EPOCH + Duration::from_nanos(nanos), env)
        })
        .collect()
}

async fn wait_runs(out: &Path, n: usize) -> Vec<(SystemTime, BTreeMap<String, String>)> {
    wait_for(20 * SEC, &format!("{n} run(s) of the command"), || async {
        let runs = runs(out);
        (runs.len() >= n).then_some(runs)
    })
    .await
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn notify_section(body: &str) -> String {
    format!("notify:\n{body}")
}

async fn expires_at(d: &Daemon, customer: &str) -> String {
    d.status_of(customer).await["expires_at"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------
// A webhook receiver on loopback: every request recorded, answered with a settable status.

#[derive(Clone)]
struct Hook {
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    port: u16,
}

#[derive(Clone, Debug)]
struct Received {
    at: SystemTime,
    method: String,
    path: String,
    content_type: Option<String>,
    body: String,
}

impl Hook {
    async fn start(status: u16) -> Hook {
        use axum::extract::State;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = Hook {
            received: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
            port: listener.local_addr().unwrap().port(),
        };
        async fn record(
            State(hook): State<Hook>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            hook.received.lock().unwrap().push(Received {
                at: SystemTime::now(),
                method: method.to_string(),
                path: uri.path().to_owned(),
                content_type: headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            StatusCode::from_u16(hook.status.load(Ordering::SeqCst)).unwrap()
        }
        let app = axum::Router::new().fallback(record).with_state(hook.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        hook
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/rotated", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn wait(&self, n: usize) -> Vec<Received> {
        wait_for(20 * SEC, &format!("{n} webhook request(s)"), || async {
            let r = self.received();
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------

/// The command runs after each new token with the customer, the file and the expiry in its
/// environment, and nothing of the daemon's own environment (where passwords may be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_gets_the_customer_file_and_expiry_of_each_new_token() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let recorder = env_recorder(&w, &out);
    let notify = notify_section(&format!("  exec: [\"{}\"]\n", recorder.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start_with(|c| {
        c.env("SIDECAR_ONLY_SECRET", "must-not-reach-the-command");
    });
    let token = w.wait_token("alice", None, 10 * SEC).await;
    let first = wait_runs(&out, 1).await;
    let (started, env) = &first[0];
    eprintln!(
        "latency: token written -> command started: {:?}",
        started.duration_since(modified(&w.token_path("alice"))).unwrap()
    );
    assert_eq!(env.get("MAGENTO_TOKEN_CUSTOMER").map(String::as_str), Some("alice"));
    assert_eq!(env.get("MAGENTO_TOKEN_FILE").map(String::as_str), Some(w.token_path("alice").to_str().unwrap()));
    assert_eq!(env.get("MAGENTO_TOKEN_EXPIRES_AT"), Some(&expires_at(&d, "alice").await));
    assert!(env.contains_key("PATH"), "{env:?}");
    assert!(!env.contains_key("SIDECAR_ONLY_SECRET"), "the daemon's environment leaked: {env:?}");
    let dump = std::fs::read_to_string(std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path()).unwrap();
    assert_hidden("the command's environment", &dump, std::slice::from_ref(&token));
    d.wait_metric(&notified("alice", "success"), 1.0, 10 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));

    // A new token (a reload that changes alice's store: a new login): a new run, its expiry.
    std::thread::sleep(SEC); // a JWT's expiry has whole seconds: the next one differs
    let config = w.config_text(&[(ALICE.0, ALICE.1)], "", &notify).replace(
        &format!("password_file: {}\n", w.secret_path("alice").display()),
        &format!("password_file: {}\n    store_code: default\n", w.secret_path("alice").display()),
    );
    w.write_config(&config);
    d.signal("HUP");
    w.wait_token("alice", Some(&token), 10 * SEC).await;
    let runs = wait_runs(&out, 2).await;
    assert_eq!(runs.len(), 2);
    let now = expires_at(&d, "alice").await;
    assert_ne!(runs[1].1["MAGENTO_TOKEN_EXPIRES_AT"], runs[0].1["MAGENTO_TOKEN_EXPIRES_AT"]);
    assert_eq!(runs[1].1["MAGENTO_TOKEN_EXPIRES_AT"], now);
    d.wait_metric(&notified("alice", "success"), 2.0, 10 * SEC).await;
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

/// The webhook gets `{"customer","file","expires_at"}` as JSON, and never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gets_the_customer_file_and_expiry_as_json() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    let hook = Hook::start(204).await;
    let notify = notify_section(&format!("  webhook: {}\n  timeout: 5s\n", hook.url()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", &notify));
    let mut d = w.start();
    let tokens = [w.wait_token("alice", None, 10 * SEC).await, w.wait_token("bob", None, 10 * SEC).await];
    let mut received = hook.wait(2).await;
    received.sort_by(|a, b| a.body.cmp(&b.body));
    for (r, name) in received.iter().zip(["alice", "bob"]) {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/rotated");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let expected = serde_json::json!({
            "customer": name,
            "file": w.token_path(name).to_str().unwrap(),
            "expires_at": expires_at(&d, name).await,
        });
        assert_eq!(body, expected);
        assert_hidden("the webhook's body", &r.body, &tokens);
        eprintln!(
            "latency: token written -> webhook received: {:?}",
            r.at.duration_since(modified(&w.token_path(name))).unwrap()
        );
    }
    d.wait_metric(&notified("bob", "success"), 1.0, 10 * SEC).await;
    d.wait_metric(&notified("alice", "success"), 1.0, 10 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(hook.received().len(), 2, "one request per new token");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A process killed when the test ends, whatever happened: the app, a process of its own found
/// by name (a copy of the shell that writes a line for every SIGHUP), or a decoy bearing its
/// name.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the app: a copy of the shell named `name` that appends a line to `hups` for every
/// SIGHUP and writes `ready` once its trap is set. Returns it with those two paths. Each test
/// names its app differently: two apps of one name and user are an ambiguous match, which the
/// daemon refuses to signal.
fn start_app(name: &str, dir: &Path, out: &Path) -> (Killed, PathBuf, PathBuf) {
    let app_binary = dir.join(name);
    std::fs::copy("/bin/sh", &app_binary).unwrap();
    let (hups, ready) = (out.join("hups"), out.join("ready"));
    let mut command = Command::new(&app_binary);
    command
        .arg("-c")
        .arg(format!(
            "trap 'echo hup >> {}' HUP; echo ready > {}; while :; do sleep 1 & wait $!; done",
            hups.display(),
            ready.display()
        ))
        .stdin(Stdio::null());
    // A process another test forks while the copy is open for writing holds it open until it
    // execs: the file is busy for that moment (ETXTBSY).
    let mut tries = 0;
    let app = loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            spawned => break Killed(spawned.unwrap()),
        }
    };
    (app, hups, ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_reaches_the_app_found_by_name() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let (_app, hups, ready) = start_app("app-under-test", w.dir.path(), &out);
    wait_for(10 * SEC, "the app to start", || async { ready.exists().then_some(()) }).await;
    let notify = notify_section("  signal: {process: app-under-test, signal: HUP}\n");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    wait_for(20 * SEC, "the app's SIGHUP", || async { (lines(&hups) >= 1).then_some(()) }).await;
    eprintln!(
        "latency: token written -> signal handled: {:?}",
        modified(&hups).duration_since(modified(&w.token_path("alice"))).unwrap()
    );
    d.wait_metric(&notified("alice", "success"), 1.0, 10 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(std::fs::read_to_string(&hups).unwrap(), "hup\n", "one signal, to the app alone");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A command that fails and a webhook that answers 500: each tried twice, one failure counted,
/// a warning naming the customer and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_and_webhook_are_retried_once_and_counted() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let calls = out.join("calls");
    let failing = script(&w, "fail.sh", &format!("echo call >> {}\nexit 3\n", calls.display()));
    let hook = Hook::start(500).await;
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  webhook: {}\n", failing.display(), hook.url()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "failure"), 1.0, 20 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "success")).await, Some(0.0));
    assert_eq!(lines(&calls), 2, "the command ran twice");
    assert_eq!(hook.received().len(), 2, "the webhook was called twice");
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(lines(&calls), 2, "retried once only");
    assert_eq!(hook.received().len(), 2, "retried once only");
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(1.0));
    let logs = d.logs();
    let warned = |what: &str| {
        logs.lines().filter(|l| l.contains("\"WARN\"") && l.contains("\"alice\"") && l.contains(what)).count()
    };
    assert_eq!(warned("exited with status 3"), 2, "{logs}");
    assert_eq!(warned("answered HTTP 500"), 2, "{logs}");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

/// No such process, and nothing listening on the webhook's port: failures, retried once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_process_and_a_refused_connection_are_failures() {
    let w = World::with_customers(&[ALICE]).await;
    let port = free_port();
    let notify = notify_section(&format!(
        "  webhook: http://127.0.0.1:{port}/hook\n  signal: {{process: no-such-app-n0t1fy}}\n"
    ));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "failure"), 1.0, 20 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "success")).await, Some(0.0));
    let logs = d.logs();
    let warned = |what: &str| {
        logs.lines().filter(|l| l.contains("\"WARN\"") && l.contains("\"alice\"") && l.contains(what)).count()
    };
    assert_eq!(warned("no process named \\\"no-such-app-n0t1fy\\\""), 2, "{logs}");
    assert_eq!(warned("Connection refused"), 2, "{logs}");
    assert_eq!(d.stop().await.code(), Some(0));
}

fn alive(pid: &str) -> bool {
    // A process killed but not yet reaped by its new parent is a zombie: gone for our purpose.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// A command still running at the timeout is killed, with what it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_past_its_timeout_is_killed_with_its_children() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let pids = out.join("pids");
    let done = out.join("done");
    let slow = script(
        &w,
        "slow.sh",
        &format!(
            "echo $$ >> {p}\nsleep 60 &\necho $! >> {p}\nwait\necho done >> {d}\n",
            p = pids.display(),
            d = done.display()
        ),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  timeout: 1s\n", slow.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "failure"), 1.0, 20 * SEC).await;
    let started: Vec<String> = std::fs::read_to_string(&pids).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(started.len(), 4, "two runs, each a shell and its sleep: {started:?}");
    for pid in &started {
        wait_for(10 * SEC, &format!("process {pid} to be gone"), || async { (!alive(pid)).then_some(()) }).await;
    }
    assert!(!done.exists());
    let logs = d.logs();
    let killed = logs.lines().filter(|l| l.contains("\"WARN\"") && l.contains("still running after 1s")).count();
    assert_eq!(killed, 2, "{logs}");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// Writes that come while a notification runs make one more notification, with the latest
/// token's expiry, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_close_together_notify_once() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let release = out.join("release");
    let o = out.display();
    // Records its environment, then waits (at most 20 s) until the test lets it go.
    let gated = script(
        &w,
        "gated.sh",
        &format!(
            "n=$(date +%s%N)\nenv > \"{o}/.run.$n\" && mv \"{o}/.run.$n\" \"{o}/run.$n\"\ni=0\nwhile [ ! -e {r} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done\n",
            r = release.display()
        ),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  timeout: 30s\n", gated.display()));
    let plain = w.config_text(&[(ALICE.0, ALICE.1)], "", &notify);
    let password_line = format!("password_file: {}\n", w.secret_path("alice").display());
    let with_store = plain.replace(&password_line, &format!("{password_line}    store_code: default\n"));
    w.write_config(&plain);
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    wait_runs(&out, 1).await;
    // Three new tokens while the first notification runs: reloads that change alice's store
    // code, each a new login and a new file (two within a second may hold the same JWT).
    for i in 1..=3 {
        w.write_config(if i % 2 == 1 { &with_store } else { &plain });
        d.signal("HUP");
        d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", i as f64, 10 * SEC).await;
        d.wait_metric(&refreshes("alice", "success"), i as f64 + 1.0, 10 * SEC).await;
    }
    assert_eq!(runs(&out).len(), 1, "no second run while the first one runs");
    std::fs::write(&release, "").unwrap();
    let after = wait_runs(&out, 2).await;
    assert_eq!(after[1].1["MAGENTO_TOKEN_EXPIRES_AT"], expires_at(&d, "alice").await, "the latest token's");
    d.wait_metric(&notified("alice", "success"), 2.0, 10 * SEC).await;
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(runs(&out).len(), 2, "four writes, two notifications");
    assert_eq!(d.metric(&notified("alice", "success")).await, Some(2.0));
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A command that runs for a long time holds up no refresh: tokens go on being replaced while
/// it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_command_never_delays_a_refresh() {
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let out = out_dir(&w);
    let started = out.join("started");
    let finished = out.join("finished");
    let slow = script(
        &w,
        "slow.sh",
        &format!("echo start >> {}\nsleep 40\necho end >> {}\n", started.display(), finished.display()),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  timeout: 60s\n", slow.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  before_expiry: 3s\n  jitter: 0s\n", &notify));
    let mut d = w.start();
    wait_for(20 * SEC, "the command to start", || async { (lines(&started) == 1).then_some(()) }).await;
    let before = d.metric(&refreshes("alice", "success")).await.unwrap();
    // Tokens of 6 s are replaced about every 3 s: three more while the command sleeps its 40 s.
    d.wait_metric(&refreshes("alice", "success"), before + 3.0, 30 * SEC).await;
    assert!(!finished.exists(), "the command is still running");
    assert_eq!(lines(&started), 1, "one run at a time for a customer");
    assert_eq!(d.metric(&series("magento_token_consecutive_failures", "alice")).await, Some(0.0));
    assert_eq!(d.stop().await.code(), Some(0));
}

/// `check` reports every problem of `notify` with its key path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_every_notify_problem() {
    let w = World::with_customers(&[ALICE]).await;
    let bad = notify_section(
        "  exec: []\n  webhook: http://example.com/hook?key=s3cr3t\n  signal: {process: \"\", signal: KILL}\n  timeout: 0s\n",
    );
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &bad));
    let config = w.config_path();
    let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    for expected in [
        "notify.exec: must not be empty",
        "notify.webhook: plain http to a non-loopback host",
        "notify.signal.process: must not be empty",
        "notify.signal.signal: \"KILL\" is not one of HUP, INT, QUIT, TERM, USR1, USR2, WINCH, ALRM, CONT",
        "notify.timeout: must be longer than 0s",
    ] {
        assert!(err.lines().any(|l| l.trim_start().starts_with(expected)), "missing {expected:?} in {err}");
    }
    assert!(!err.contains("s3cr3t"), "the webhook's query is not shown: {err}");

    let missing = notify_section("  exec: [/no/such/program, --flag]\n");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &missing));
    let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("notify.exec[0]: /no/such/program: no such file"), "{err}");

    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", "notify: {}\n"));
    let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("notify: give at least one of exec, webhook and signal"), "{err}");

    let good = notify_section(
        "  exec: [sh, -c, \"true\"]\n  webhook: https://hooks.example.com/x\n  signal: {process: nginx}\n",
    );
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &good));
    let (code, _, err) = run_to_end(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
}

/// `once` writes the files and notifies no one: in an init container the app has not started
/// yet (it reads the files when it does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_does_not_notify() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let recorder = env_recorder(&w, &out);
    let notify = notify_section(&format!("  exec: [\"{}\"]\n", recorder.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let config = w.config_path().to_str().unwrap().to_owned();
    let (code, _, err) = tokio::task::spawn_blocking(move || run_to_end(&["once", "--config", &config])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(w.read_token("alice").is_some());
    assert!(err.contains("notify is not used by once"), "{err}");
    tokio::time::sleep(2 * SEC).await;
    assert!(runs(&out).is_empty());
}

/// `notify` added by a reload takes effect for the next new token, without restarting anyone;
/// the series exist at 0 from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_added_by_a_reload_restarts_no_one() {
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let recorder = env_recorder(&w, &out);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    d.wait_ready(10 * SEC).await;
    assert_eq!(d.metric(&notified("alice", "success")).await, Some(0.0));
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));
    let notify = notify_section(&format!("  exec: [\"{}\"]\n", recorder.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 10 * SEC).await;
    assert_eq!(token_requests(&w.server).len(), 1, "no new login");
    assert!(!d.logs().contains("restarting it"), "{}", d.logs());
    // A revoked token, replaced on an app's request: a new token, notified.
    w.server.revoke(ALICE.1);
    let response = reqwest::Client::new().post(d.url("/refresh/alice")).timeout(20 * SEC).send().await.unwrap();
    assert_eq!(response.status(), 200);
    w.wait_token("alice", Some(&token), 10 * SEC).await;
    let runs = wait_runs(&out, 1).await;
    assert_eq!(runs[0].1["MAGENTO_TOKEN_CUSTOMER"], "alice");
    d.wait_metric(&notified("alice", "success"), 1.0, 10 * SEC).await;
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Commands and neighbours that misbehave

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

/// Not gone, and not a zombie (killed, waiting for its parent to reap it).
fn not_ended(pid: u32) -> bool {
    state_and_parent(pid).is_some_and(|(state, _)| state != 'Z')
}

// ---------------------------------------------------------------------------------------------
// `signal` reaches the app, and only the app.

/// As root (needed for `output.uid`), another user's process that bears the app's name (a
/// decoy: `exec -a decoyed-app sleep`) was signalled with the app; now only processes of the
/// daemon's own uid are candidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoy_of_another_user_is_never_signalled() {
    if skipped_unless_root("a_decoy_of_another_user_is_never_signalled") {
        return;
    }
    let w = World::with_customers(&[ALICE]).await;
    let out = out_dir(&w);
    let (_app, hups, ready) = start_app("decoyed-app", w.dir.path(), &out);
    // Another user's process named like the app: SIGHUP would end it.
    let decoy = Killed(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-c", "exec -a decoyed-app sleep 120"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let decoy_pid = decoy.0.id();
    wait_for(10 * SEC, "the app and the decoy to start", || async {
        let decoy_named =
            std::fs::read(format!("/proc/{decoy_pid}/cmdline")).is_ok_and(|c| c.starts_with(b"decoyed-app\0"));
        (ready.exists() && decoy_named).then_some(())
    })
    .await;
    let notify = notify_section("  signal: {process: decoyed-app, signal: HUP}\n");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&notified("alice", "success"), 1.0, 20 * SEC).await;
    wait_for(10 * SEC, "the app's SIGHUP", || async { (lines(&hups) >= 1).then_some(()) }).await;
    tokio::time::sleep(SEC).await;
    assert!(not_ended(decoy_pid), "the decoy of uid 65534 was signalled");
    assert_eq!(std::fs::read_to_string(&hups).unwrap(), "hup\n", "one signal, to the app");
    assert_eq!(d.metric(&notified("alice", "failure")).await, Some(0.0));
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// A command's output is a field of the daemon's line, bounded.

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
        &format!("printf '%s\\n' '{FORGED}' >&2\necho 'plain text, not JSON' >&2\necho to-stdout\ncat \"$MAGENTO_TOKEN_FILE\"\nhead -c {BIG} /dev/zero | tr '\\0' x >&2\n"),
    );
    let notify = notify_section(&format!("  exec: [\"{}\"]\n  timeout: 60s\n", chatty.display()));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", &notify));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 10 * SEC).await;
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
    // The token file the command printed is not copied into the log.
    assert_eq!(line["stdout"], "to-stdout\\n<redacted>");
    assert_eq!(line["stdout_bytes"], 10 + token.len() as u64);
    d.assert_secrets_hidden(&[token]).await;
    assert!(log_bytes < 200_000, "the log holds {log_bytes} bytes: the output was copied");
    eprintln!("log: {log_bytes} bytes; the daemon's peak RSS: {:?} KiB", d.peak_rss_kib());
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// What commands leave running, as PID 1 and not.

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
        assert!(not_ended(*pid), "{pid} runs while the daemon does");
    }
    wait_for(10 * SEC, "the ended orphan to be reaped", || async { (zombies_of(d.pid()) == 0).then_some(()) }).await;
    assert_eq!(d.stop().await.code(), Some(0));
    let survivors: Vec<u32> = left.iter().copied().filter(|pid| not_ended(*pid)).collect();
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
    let mut d = Daemon::adopt(child, &log, w.admin_port).guarded_by(&w);
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
