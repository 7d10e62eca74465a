//! The daemon under attack or misuse: wrong passwords that must never lock the account, secrets
//! that must never leak (logs, `/status`, `/metrics`, error messages, file modes), and the
//! transport (plain http, TLS with a private CA, proxies).
//!
//! Magento's 30-minute windows are scaled down to seconds through the configuration and the dev
//! server's throttle, so a long run of wrong passwords takes seconds, not hours.

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::{DevServer, DevServerOptions, Fault, RequestRecord, TlsIdentity};

const SEC: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secrets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The harness's configuration at log level `trace`, with `refresh` lines added.
fn trace_config(w: &World, customers: &[(&str, &str)], refresh: &str, extra: &str) -> String {
    w.config_text(customers, refresh, extra).replace("level: debug", "level: trace")
}

/// Replaces a file by a rename, as tools and Kubernetes do.
fn replace_file(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Wrong passwords

/// Magento's throttle replayed over the attempts it received: the most failures it counted at
/// once for one username (each failure slides the window; it starts over once the window has
/// passed or after a success).
fn most_counted(attempts: &[&RequestRecord], window: Duration) -> u32 {
    let (mut count, mut most, mut last): (u32, u32, Option<SystemTime>) = (0, 0, None);
    for a in attempts {
        if a.status == 200 {
            count = 0;
            continue;
        }
        if last.is_some_and(|l| a.at.duration_since(l).unwrap_or_default() >= window) {
            count = 0;
        }
        count += 1;
        most = most.max(count);
        last = Some(a.at);
    }
    most
}

/// The most attempts with one password inside any `window`.
fn most_with_one_password(attempts: &[&RequestRecord], window: Duration) -> usize {
    attempts
        .iter()
        .enumerate()
        .map(|(i, first)| {
            attempts[i..]
                .iter()
                .take_while(|a| a.at.duration_since(first.at).unwrap_or_default() < window)
                .filter(|a| a.password == first.password)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// About twenty seconds of wrong passwords with the windows scaled down (Magento's 30 minutes
/// become 2 s; the daemon waits 200 ms, 500 ms, then pauses 2.5 s): one customer with a wrong
/// password, another whose Secret is replaced by another wrong password every 1.5 s, and a
/// reload that restarts every worker and renames the first customer (a new name,
/// so a new file: nothing recorded beside the old one applies to it). Magento's lock (6 failures
/// in its window) never trips; no password is tried more than `max_auth_failures` (3) times in
/// a window; no more than 4 failures are ever counted at once. A store whose cron runs
/// (`lockout_reset: window`): with the default (`success`) no time resets the count, alice's
/// password gets three tries in all and there is no long run to watch (tests/e2e/lockout.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_never_lock_the_account_over_a_long_run() {
    const WINDOW: Duration = Duration::from_secs(2);
    const RUN: Duration = Duration::from_secs(20);
    let carol = ("carol", "carol@example.com", "carol-right-Pa55");
    let w = World::new(DevServerOptions { lock_timeout: WINDOW, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.server.add_customer(carol.1, carol.2);
    w.set_password("alice", "alice-wrong-1");
    w.set_password("alice-renamed", "alice-wrong-1");
    w.set_password("carol", "carol-wrong-0");
    // A store whose cron runs (the dev server's default): the pause lets alice's password be
    // tried again once Magento's window has passed (tests/e2e/lockout.rs has the store without).
    let refresh = "  max_auth_failures: 3\n  auth_failure_delays: [200ms, 500ms]\n  lockout_window: 2s\n  auth_failure_pause: 2500ms\n  lockout_reset: window\n";
    let text = trace_config(&w, &[(ALICE.0, ALICE.1), (carol.0, carol.1)], refresh, "");
    w.write_config(&text);
    let mut d = w.start();
    let start = Instant::now();
    let (mut rotations, mut reloaded) = (0, false);
    let mut wrong: Vec<String> = vec!["alice-wrong-1".into(), "carol-wrong-0".into()];
    while start.elapsed() < RUN {
        for user in [ALICE.1, carol.1] {
            assert!(!w.server.is_locked(user), "Magento locked {user} after {:?}", start.elapsed());
        }
        let due = Duration::from_millis(1500) * (rotations + 1);
        if start.elapsed() >= due {
            rotations += 1;
            let password = format!("carol-wrong-{rotations}");
            replace_file(&w.secret_path("carol"), &format!("{password}\n"));
            wrong.push(password);
        }
        // The reload comes while Magento counts alice's first three 401s: the renamed entry
        // starting from nothing would spend three more, and reach the lock.
        if !reloaded && w.server.failures(ALICE.1) >= 3 {
            // A changed refresh setting restarts every worker: what they learnt must survive,
            // the renamed customer's too.
            w.write_config(
                &trace_config(&w, &[("alice-renamed", ALICE.1), (carol.0, carol.1)], refresh, "")
                    .replace("  min_backoff: 100ms", "  min_backoff: 150ms"),
            );
            d.signal("HUP");
            reloaded = true;
        }
        tokio::time::sleep(ms(20)).await;
    }
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 5 * SEC).await;
    let requests = token_requests(&w.server);
    let mut report = Vec::new();
    for user in [ALICE.1, carol.1] {
        let attempts: Vec<&RequestRecord> = requests.iter().filter(|r| r.username.as_deref() == Some(user)).collect();
        let counted = most_counted(&attempts, WINDOW);
        let same = most_with_one_password(&attempts, WINDOW);
        report.push(format!(
            "{user}: {} attempts, at most {counted} counted by Magento, at most {same} with one password per window",
            attempts.len()
        ));
        assert!(
            counted <= 4,
            "{user}: Magento counted {counted} failures in a row (locks at 6; the daemon keeps 2 spare)"
        );
        assert!(same <= 3, "{user}: {same} attempts with one password within Magento's window");
        assert!(attempts.len() >= 4, "{user}: the run exercised too little ({} attempts)", attempts.len());
    }
    eprintln!("wrong passwords over {RUN:?} (window {WINDOW:?}): {}", report.join("; "));
    let (_, status) = d.get("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    for c in status["customers"].as_array().unwrap() {
        // alice-renamed may never have sent a login: held back by alice's 401s.
        let class = c["last_error"]["class"].as_str().unwrap_or_default();
        assert!(["auth_failure", "held_back"].contains(&class), "{c}");
        assert!(["paused", "auth_backoff", "refreshing"].contains(&c["state"].as_str().unwrap()), "{c}");
    }
    let mut hidden = wrong.clone();
    hidden.extend(secrets(&[ALICE.2, carol.2]));
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A mounted Secret is replaced the way the kubelet does it: a new timestamped directory, then
/// the `..data` symlink swapped by a rename. The new password is tried at once (within the
/// password poll of 2 s), not after the 30-minute pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_swap_is_picked_up_at_once() {
    use std::os::unix::fs::symlink;
    let w = World::new(DevServerOptions::default()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    let secrets_dir = w.dir.path().join("secrets");
    std::fs::create_dir(secrets_dir.join("..2026_11_28_10_00_00.1")).unwrap();
    std::fs::write(secrets_dir.join("..2026_11_28_10_00_00.1/alice"), "alice-old-Pa55\n").unwrap();
    symlink("..2026_11_28_10_00_00.1", secrets_dir.join("..data")).unwrap();
    symlink("..data/alice", secrets_dir.join("alice")).unwrap();
    // The real waits: after three 401s the next try would be 31 minutes away.
    w.write_config(&trace_config(&w, &[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    d.wait_metric(&refreshes("alice", "auth_failure"), 1.0, 10 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 1);

    std::fs::create_dir(secrets_dir.join("..2026_11_28_10_05_00.2")).unwrap();
    std::fs::write(secrets_dir.join("..2026_11_28_10_05_00.2/alice"), format!("{}\n", ALICE.2)).unwrap();
    symlink("..2026_11_28_10_05_00.2", secrets_dir.join("..data_tmp")).unwrap();
    let swapped = SystemTime::now();
    std::fs::rename(secrets_dir.join("..data_tmp"), secrets_dir.join("..data")).unwrap();
    std::fs::remove_dir_all(secrets_dir.join("..2026_11_28_10_00_00.1")).unwrap();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 2, "one 401, then the new password at once");
    // Timed to the login's arrival at the dev server (not to when the test noticed the file):
    // the password poll (2 s) and 2 s for a busy machine's timers and requests, against the
    // 31 minutes the same password would wait.
    let login = token_requests(&w.server).last().unwrap().at;
    let took = login.duration_since(swapped).unwrap_or_default();
    assert!(took < 4 * SEC, "the new password was sent {took:?} after the swap, beyond the password poll");
    eprintln!("secret swap: the new password was used {took:?} after the ..data swap");
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    d.assert_secrets_hidden(&secrets(&[ALICE.2, "alice-old-Pa55", &token])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 9. Secrets

/// A proxy or a broken store that echoes the request in its error message: the password it
/// repeats never reaches a log line, `/status` or `once`'s output. The message is held back
/// whole (what is left of it could still be pieces of the password); the status is shown.
/// (Other encodings and pieces: `hardening_answers.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_that_echoes_the_password_leaks_nothing() {
    let w = World::with_customers(&[ALICE]).await;
    let echo = |status| {
        Fault::json(
            status,
            serde_json::json!({
                "message": format!("Cannot process the request body {{\"username\":\"{}\",\"password\":\"{}\"}}", ALICE.1, ALICE.2)
            }),
        )
    };
    w.server.push_fault(echo(400));
    w.server.push_fault(echo(401));
    w.write_config(&trace_config(&w, &[(ALICE.0, ALICE.1)], "  auth_failure_delays: [100ms]\n", ""));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    let logs = d.logs();
    for status in ["HTTP 400 Bad Request: ", "HTTP 401 Unauthorized: "] {
        assert!(
            logs.contains(&format!("{status}(the answer's message is not shown: it repeats part of the request;")),
            "{status} and why the message is not shown"
        );
    }
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));

    // once prints its failures on stderr. One attempt: a backoff (10 s) longer than once's
    // deadline (5 s) ends the pass at the first failure, however long the machine takes to
    // send it. (A 50 ms deadline did the same, unless the request took longer than 50 ms: then
    // once reported a timeout instead of the answer.)
    std::fs::remove_file(w.token_path("alice")).unwrap();
    w.server.push_fault(echo(400));
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HTTP 400 Bad Request: (the answer's message is not shown"), "{err}");
    assert_hidden("once's output", &format!("{out}{err}"), &secrets(&[ALICE.2]));
}

/// Under a umask of 000, token files, their temporary files and the 401 ledger are never readable
/// by anyone else, at any moment a watcher looking every millisecond can catch; and the mode is
/// exactly the configured one whatever the umask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_files_are_never_readable_by_others_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new(DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() }).await;
    let customers: Vec<(String, String)> = (0..6).map(|i| (format!("m{i}"), format!("m{i}@example.com"))).collect();
    for (name, email) in &customers {
        w.server.add_customer(email, "mode-test-Pa55");
        w.set_password(name, "mode-test-Pa55");
    }
    // One with a wrong password: its 401 ledger is a file in the same directory.
    w.server.add_customer("wrong@example.com", "right");
    w.set_password("wrong", "mode-test-wrong");
    let mut pairs: Vec<(&str, &str)> = customers.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
    pairs.push(("wrong", "wrong@example.com"));
    w.write_config(&trace_config(&w, &pairs, "  before_expiry: 60s\n  jitter: 0s\n", ""));
    let dir = w.tokens();
    let watcher = std::thread::spawn(move || {
        let (mut looks, mut files_seen, mut temporaries_seen) = (0u64, 0u64, 0u64);
        let mut exposed = Vec::new();
        let end = Instant::now() + Duration::from_secs(12);
        while Instant::now() < end {
            looks += 1;
            for entry in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
                let Ok(meta) = entry.metadata() else { continue };
                files_seen += 1;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    temporaries_seen += 1;
                }
                if meta.permissions().mode() & 0o077 != 0 {
                    exposed.push(format!("{name} {:o}", meta.permissions().mode() & 0o777));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (looks, files_seen, temporaries_seen, exposed)
    });
    let mut d = w.start_with(|c| {
        // The daemon started by a shell whose umask lets everyone read new files.
        let program = c.get_program().to_owned();
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        *c = std::process::Command::new("sh");
        c.arg("-c").arg("umask 000; exec \"$0\" \"$@\"").arg(program).args(args);
        for var in PROXY_VARIABLES.iter().chain(&["RUST_LOG", "MAGENTO_TOKEN_SIDECAR_CONFIG"]) {
            c.env_remove(var);
        }
        c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        c.stderr(std::fs::File::create(w.dir.path().join("daemon.log")).unwrap());
    });
    let (looks, files_seen, temporaries_seen, exposed) =
        tokio::task::spawn_blocking(move || watcher.join().unwrap()).await.unwrap();
    let written = d.metric(&refreshes("m0", "success")).await.unwrap();
    assert!(written >= 2.0, "m0 was written {written} times in 12 s");
    assert!(exposed.is_empty(), "readable by others at some moment: {exposed:?}");
    for (name, _) in &customers {
        assert_eq!(mode_of(&w.token_path(name)), 0o600, "{name}");
    }
    let ledger = w.tokens().join(".wrong.auth");
    assert!(ledger.exists(), "the 401 ledger was written");
    assert_eq!(mode_of(&ledger), 0o600);
    d.assert_secrets_hidden(&secrets(&["mode-test-Pa55", "mode-test-wrong"])).await;
    assert_eq!(d.stop().await.code(), Some(0));
    eprintln!("modes: {looks} looks at the directory, {files_seen} files seen ({temporaries_seen} temporary), none readable by others");

    // once, mode 0640 under a umask of 077: exactly 0640.
    let text = std::fs::read_to_string(w.config_path()).unwrap().replace("  dir:", "  mode: \"0640\"\n  dir:");
    w.write_config(&text);
    for (name, _) in &customers {
        std::fs::remove_file(w.token_path(name)).unwrap();
    }
    let config = w.config_path().display().to_string();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            // The wrong password ends at its 401; the deadline only bounds the six logins and
            // writes, which 2 s did not always on a busy machine.
            .args(["-c", "umask 077; exec \"$0\" once --config \"$1\" --timeout 10s", BIN, &config])
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(1), "the wrong password fails, the others are written");
    for (name, _) in &customers {
        assert_eq!(mode_of(&w.token_path(name)), 0o640, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Transport

async fn check(w: &World, text: &str) -> (i32, String) {
    w.write_config(text);
    let config = w.config_path().display().to_string();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run_to_end(&["check", "--config", &config])).await.unwrap();
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_a_remote_host_is_refused_unless_allowed() {
    let w = World::with_customers(&[ALICE]).await;
    let good = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    let base = w.server.base_url();
    for remote in
        ["http://shop.example.com", "http://10.1.2.3:8080", "http://[2001:db8::1]", "http://localhost.example.com"]
    {
        let (code, out) = check(&w, &good.replace(&base, remote)).await;
        assert_eq!(code, 2, "{remote}: {out}");
        assert!(
            out.contains("magento.base_url: ") && out.contains("plain http to a non-loopback host"),
            "{remote}: {out}"
        );
        let allowed =
            good.replace(&base, remote).replace("  timeout: 2s", "  timeout: 2s\n  allow_insecure_http: true");
        let (code, out) = check(&w, &allowed).await;
        assert_eq!(code, 0, "{remote} with allow_insecure_http: {out}");
    }
    // A customer's own base_url is held to the same rule.
    let (code, out) = check(&w, &format!("{good}    base_url: http://shop.example.com\n")).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("customers[0].base_url: "), "{out}");
    for local in [
        "http://127.0.0.1:8080",
        "http://127.0.0.2",
        "http://localhost:81",
        "http://[::1]:8080",
        "https://shop.example.com",
    ] {
        let (code, out) = check(&w, &good.replace(&base, local)).await;
        assert_eq!(code, 0, "{local}: {out}");
    }
}

/// A certificate chain issued by a CA made for this test: (CA PEM, server identity).
fn test_pki(names: &[&str]) -> (String, TlsIdentity) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "magento-token-sidecar test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), TlsIdentity { cert_chain_pem: leaf.pem(), key_pem: key.serialize_pem() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_needs_ca_file() {
    let (ca_pem, identity) = test_pki(&["localhost", "127.0.0.1"]);
    let w = World::new(DevServerOptions { tls: Some(identity), ..Default::default() }).await;
    assert!(w.server.base_url().starts_with("https://127.0.0.1:"));
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let ca_file = w.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let without = trace_config(&w, &[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&without);
    let mut d = w.start();
    // At least one: the daemon retries every 100 ms to 1 s, so the count is 1 only briefly,
    // and a test a busy machine holds up sees 2 or more.
    wait_for(10 * SEC, "a network_error", || async {
        d.metric(&refreshes("alice", "network_error")).await.filter(|n| *n >= 1.0)
    })
    .await;
    let status = d.status_of("alice").await;
    let message = status["last_error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("magento.ca_file"), "the message says what to do: {message}");
    assert!(w.server.requests().is_empty(), "nothing was sent before the certificate was trusted");
    assert_eq!(w.read_token("alice"), None);

    // The CA given: the same daemon, reloaded, logs in.
    w.write_config(&without.replace("  timeout: 2s", &format!("  timeout: 2s\n  ca_file: {}", ca_file.display())));
    d.signal("HUP");
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
    eprintln!("tls: without ca_file: {message}");
}

/// A forward proxy on loopback: records the first line of every connection, then tunnels
/// (CONNECT) or relays (absolute-form requests) to 127.0.0.1 at the port the request names,
/// whatever its host name.
struct Proxy {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let line = text.lines().next().unwrap_or_default().to_owned();
                    record.lock().unwrap().push(line.clone());
                    let target = line.split_whitespace().nth(1).unwrap_or_default();
                    let authority = target.strip_prefix("http://").unwrap_or(target);
                    let authority = authority.split('/').next().unwrap_or_default();
                    let Some(port) = authority.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else { return };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                    if line.starts_with("CONNECT ") {
                        if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
                            return;
                        }
                    } else if upstream.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Proxy { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A name other than `localhost` that /etc/hosts maps to a loopback address, if any: a host the
/// daemon can reach without a DNS query and without the loopback exemption from proxies.
fn hosts_file_loopback_name() -> Option<String> {
    let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
    hosts.lines().find_map(|line| {
        let mut words = line.split('#').next()?.split_whitespace();
        let ip: std::net::IpAddr = words.next()?.parse().ok()?;
        if !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_loopback()) {
            return None;
        }
        words
            .find(|n| !n.eq_ignore_ascii_case("localhost") && n.contains(|c: char| c.is_ascii_alphabetic()))
            .map(str::to_owned)
    })
}

/// HTTP_PROXY and HTTPS_PROXY are used (a relayed request, a CONNECT tunnel with TLS inside),
/// NO_PROXY bypasses them, and loopback addresses never go through a proxy (it could not reach
/// this pod's loopback, and a password for 127.0.0.1 in plain http must not leave the host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_are_honoured_and_loopback_goes_direct() {
    let direct_name = hosts_file_loopback_name();
    let mut names = vec!["localhost", "127.0.0.1", "secure.test"];
    if let Some(n) = &direct_name {
        names.push(n);
    }
    let (ca_pem, identity) = test_pki(&names);
    let w = World::new(DevServerOptions::default()).await;
    let tls = DevServer::start(DevServerOptions { tls: Some(identity), ..Default::default() }).await.unwrap();
    let carol = ("carol", "carol@example.com", "carol-Pa55word");
    let dave = ("dave", "dave@example.com", "dave-Pa55word");
    w.server.add_customer(ALICE.1, ALICE.2);
    w.server.add_customer(BOB.1, BOB.2);
    tls.add_customer(carol.1, carol.2);
    tls.add_customer(dave.1, dave.2);
    for (name, _, password) in [ALICE, BOB, carol, dave] {
        w.set_password(name, password);
    }
    let ca_file = w.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let (plain_port, tls_port) = (w.server.addr().port(), tls.addr().port());
    let mut customers = vec![(ALICE.0, ALICE.1), (BOB.0, BOB.1), (carol.0, carol.1)];
    // alice: loopback by address, plain http. bob: a remote name over plain http, through the
    // HTTP proxy. carol: a remote name over https, through a CONNECT tunnel.
    let mut text = trace_config(&w, &customers, "", "").replace(
        "  timeout: 2s",
        &format!("  timeout: 2s\n  allow_insecure_http: true\n  ca_file: {}", ca_file.display()),
    );
    text = text.replace(
        &format!("  - name: carol\n    username: {}\n", carol.1),
        &format!("  - name: carol\n    username: {}\n    base_url: https://secure.test:{tls_port}\n", carol.1),
    );
    text = text.replace(
        &format!("  - name: bob\n    username: {}\n", BOB.1),
        &format!("  - name: bob\n    username: {}\n    base_url: http://shop.test:{plain_port}\n", BOB.1),
    );
    // dave: a name NO_PROXY lists, over https, straight to the server.
    if let Some(n) = &direct_name {
        customers.push((dave.0, dave.1));
        text.push_str(&format!(
            "  - name: dave\n    username: {}\n    password_file: {}\n    base_url: https://{n}:{tls_port}\n",
            dave.1,
            w.secret_path("dave").display()
        ));
    } else {
        eprintln!("proxies: no loopback name besides localhost in /etc/hosts: the NO_PROXY case is skipped");
    }
    w.write_config(&text);
    let proxy = Proxy::start().await;
    let no_proxy = direct_name.clone().unwrap_or_else(|| "nothing.test".into());
    let mut d = w.start_with(|c| {
        c.env("HTTP_PROXY", proxy.url()).env("HTTPS_PROXY", proxy.url()).env("NO_PROXY", &no_proxy);
    });
    let mut tokens = Vec::new();
    for (name, email) in &customers {
        let token = w.wait_token(name, None, 15 * SEC).await;
        let server = if ["carol", "dave"].contains(name) { &tls } else { &w.server };
        assert_eq!(server.check_token(&token).as_deref(), Some(*email), "{name}");
        tokens.push(token);
    }
    let seen = proxy.seen();
    eprintln!("proxies: the proxy saw {seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("POST http://shop.test:{plain_port}/rest/V1/integration/customer/token "))),
        "bob's login went through HTTP_PROXY: {seen:?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with(&format!("CONNECT secure.test:{tls_port} "))),
        "carol's through HTTPS_PROXY: {seen:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("127.0.0.1")), "alice's loopback login went through the proxy: {seen:?}");
    if let Some(n) = &direct_name {
        assert!(!seen.iter().any(|l| l.contains(n.as_str())), "dave's NO_PROXY host went through the proxy: {seen:?}");
    }
    let mut hidden = secrets(&[ALICE.2, BOB.2, carol.2, dave.2]);
    hidden.extend(tokens);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// Writes `secret` into a running daemon's log past what the daemon itself will still write:
/// its stderr is not opened for appending, so the padding keeps its last lines (written at its
/// own offset) from overwriting the secret.
fn plant_in_log(d: &Daemon, secret: &str) {
    use std::io::Write as _;
    let mut log = std::fs::OpenOptions::new().append(true).open(&d.log).unwrap();
    writeln!(log, "{}{secret}", " ".repeat(1 << 16)).unwrap();
}

/// The harness itself: a secret of the world in the log of a daemon the world started fails
/// the test, at stop and at a drop without a stop, and the failure does not show the secret.
/// The two secrets are ones no test names: a token the dev server issued (in base64) and a
/// password given to the dev server alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_fails_a_test_whose_daemon_logs_a_secret() {
    use base64::Engine as _;
    let w = World::with_customers(&[ALICE]).await;
    w.server.add_customer(BOB.1, BOB.2);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let token = w.login_directly(ALICE.1, ALICE.2).await;
    let cases = [(base64::engine::general_purpose::STANDARD.encode(&token), true), (BOB.2.to_owned(), false)];
    for (secret, stop) in cases {
        let d = w.start();
        d.wait_ready(10 * SEC).await;
        plant_in_log(&d, &secret);
        let outcome = tokio::spawn(async move {
            let mut d = d;
            if stop {
                d.stop().await;
            }
        })
        .await;
        let panic = outcome.expect_err("a secret in the log went through").into_panic();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("appears in the daemon's log"), "stop: {stop}: {message}");
        assert!(!message.contains(&secret));
    }
}
