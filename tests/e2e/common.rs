//! The harness of the end-to-end tests: the dev server in the test process, the real binary
//! in a child process, and bounded waits for what a user would see.

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magento_devserver::{DevServer, DevServerOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_magento-token-sidecar");

/// Customers every test may use: (name, email, password).
pub const ALICE: (&str, &str, &str) = ("alice", "alice@example.com", "alice-Pa55word!");
pub const BOB: (&str, &str, &str) = ("bob", "bob@example.com", "bob-S3cret-phrase");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 50 ms until it gives `Some`, for at most `limit`.
///
/// The last check starts after the limit has passed: a test process the machine left without
/// a CPU for a while (a busy CI runner) gets one more look before it fails, instead of failing
/// on a check that was made before the stall.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        let late = start.elapsed() >= limit;
        if let Some(v) = check().await {
            return v;
        }
        assert!(!late, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A test's world: a temporary directory with `tokens/` and `secrets/`, the dev server, and the
/// configuration file the daemon reads.
pub struct World {
    pub dir: tempfile::TempDir,
    pub server: DevServer,
    pub admin_port: u16,
    /// Every password [`World::set_password`] wrote, shared with the daemons this world
    /// started: see [`Guard`].
    passwords: Arc<Mutex<Vec<String>>>,
}

impl World {
    pub async fn new(opts: DevServerOptions) -> World {
        let server = DevServer::start(opts).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        World { dir, server, admin_port: free_port(), passwords: Arc::default() }
    }

    pub async fn with_customers(customers: &[(&str, &str, &str)]) -> World {
        let w = World::new(DevServerOptions::default()).await;
        for (name, email, password) in customers {
            w.server.add_customer(email, password);
            w.set_password(name, password);
        }
        w
    }

    pub fn tokens(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    pub fn token_path(&self, file: &str) -> PathBuf {
        self.tokens().join(file)
    }

    pub fn secret_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("secrets").join(name)
    }

    /// Writes a password file the way a person would: with a trailing newline.
    pub fn set_password(&self, name: &str, password: &str) {
        self.passwords.lock().unwrap_or_else(|e| e.into_inner()).push(password.to_owned());
        std::fs::write(self.secret_path(name), format!("{password}\n")).unwrap();
    }

    /// Adds a secret that is neither a password nor the dev server's (a caller's service account
    /// token, an API credential) to what the daemons of this world are checked for: see [`Guard`].
    /// (The token API's tests use it, which exist with the `kubernetes` feature only.)
    #[cfg(feature = "kubernetes")]
    pub fn hide(&self, secret: &str) {
        self.passwords.lock().unwrap_or_else(|e| e.into_inner()).push(secret.to_owned());
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// The YAML of a configuration for `customers` (name, email) with `refresh` lines added
    /// under `refresh:` and `extra` appended at the end.
    pub fn config_text(&self, customers: &[(&str, &str)], refresh: &str, extra: &str) -> String {
        let mut y = format!(
            "magento:\n  base_url: {}\n  timeout: 2s\nrefresh:\n  min_backoff: 100ms\n  max_backoff: 1s\n{refresh}output:\n  dir: {}\nadmin:\n  listen: 127.0.0.1:{}\nlog:\n  format: json\n  level: debug\ncustomers:\n",
            self.server.base_url(),
            self.tokens().display(),
            self.admin_port
        );
        for (name, email) in customers {
            y.push_str(&format!(
                "  - name: {name}\n    username: {email}\n    password_file: {}\n",
                self.secret_path(name).display()
            ));
        }
        y.push_str(extra);
        y
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts `magento-token-sidecar run` on the configuration file; its stderr goes to a file.
    pub fn start(&self) -> Daemon {
        self.start_with(|_| {})
    }

    pub fn read_token(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.token_path(file)).ok()
    }

    /// Waits until the token file exists and holds something other than `not`.
    pub async fn wait_token(&self, file: &str, not: Option<&str>, limit: Duration) -> String {
        wait_for(limit, &format!("token file {file}"), || async {
            self.read_token(file).filter(|t| Some(t.as_str()) != not && !t.is_empty())
        })
        .await
    }

    /// Names in the token directory other than the given token files (and the lock file of a
    /// daemon running there).
    pub fn stray_files(&self, expected: &[&str]) -> Vec<String> {
        std::fs::read_dir(self.tokens())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !expected.contains(&n.as_str()) && n != magento_token_sidecar::dirlock::LOCK_FILE)
            .collect()
    }
}

pub fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The binary running as a child process.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub admin_port: u16,
    /// Set for a daemon a [`World`] started: its secrets are checked when it stops or is dropped.
    guard: Option<Guard>,
}

/// The secrets of the [`World`] that started a daemon, read when it stops (not when it
/// starts: tokens are issued and passwords set while it runs).
///
/// [`Daemon::stop`] asserts that none of them appears in the daemon's whole log, in `/status`
/// or in `/metrics` (while the admin server answers); a daemon dropped without a stop (one
/// that exited by itself, or a test that ended early) gets its log checked, unless the thread
/// is already panicking (a second panic would abort and hide the first failure).
#[derive(Clone)]
pub struct Guard {
    passwords: Arc<Mutex<Vec<String>>>,
    server: magento_devserver::Secrets,
    checked: bool,
}

impl Guard {
    /// Every secret, in each form in which it could leak: as it is, JSON-escaped (a log
    /// line is JSON), and a token in base64 too. With the issuers' (an admin's password and
    /// TOTP secret, an IMS client secret, their tokens, one-time codes): see
    /// [`magento_devserver::Secrets`]. [`assert_hidden`] adds a JWT's signature.
    pub fn secrets(&self) -> Vec<String> {
        let passwords = self.passwords.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut all: Vec<String> = Vec::new();
        let mut add = |s: String| {
            if !s.is_empty() && !all.contains(&s) {
                all.push(s);
            }
        };
        for p in passwords.into_iter().chain(self.server.customer_passwords()) {
            let json = serde_json::to_string(&p).unwrap();
            add(json[1..json.len() - 1].to_owned());
            add(p);
        }
        // The credentials of customer tokens without customer passwords (admin passwords, TOTP
        // secrets, IMS client secrets) are passwords too; admin and IMS tokens and one-time
        // codes are tokens.
        for c in self.server.issuer_credentials() {
            let json = serde_json::to_string(&c).unwrap();
            add(json[1..json.len() - 1].to_owned());
            add(c);
        }
        for t in self.server.issued_tokens().into_iter().chain(self.server.issuer_tokens()).chain(self.server.otps()) {
            use base64::Engine as _;
            add(base64::engine::general_purpose::STANDARD.encode(&t));
            add(t);
        }
        all
    }
}

impl Daemon {
    pub fn spawn(args: &[&str], log: &Path, admin_port: u16) -> Daemon {
        Daemon::spawn_with(args, log, admin_port, |_| {})
    }

    pub fn signal(&self, name: &str) {
        let ok =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `limit` (with a last look after it, as
    /// [`wait_for`]).
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            let late = start.elapsed() >= limit;
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(!late, "the daemon did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit; for a daemon a [`World`] started, first asserts that
    /// no secret of the world is in `/status` or `/metrics` (when they answer) and then that
    /// none is in the whole log (see [`Guard`]).
    pub async fn stop(&mut self) -> ExitStatus {
        if let Some(secrets) = self.guard.as_ref().map(Guard::secrets) {
            for route in ["/status", "/metrics"] {
                if let Some((_, body)) = self.get(route).await {
                    assert_hidden(route, &body, &secrets);
                }
            }
        }
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(15)).await;
        self.check_log();
        status
    }

    /// Asserts that no secret of the world that started this daemon is in its whole log (a
    /// no-op for a daemon started otherwise).
    fn check_log(&mut self) {
        let Some(guard) = self.guard.as_mut() else { return };
        guard.checked = true;
        let secrets = guard.secrets();
        assert_hidden("the daemon's log", &self.logs(), &secrets);
    }

    /// Has [`Daemon::stop`] and drop check this daemon's secrets against the secrets of `world`
    /// (for daemons not started by [`World::start`], e.g. with their own configuration).
    pub fn guarded_by(mut self, world: &World) -> Daemon {
        self.guard = Some(world.guard());
        self
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://127.0.0.1:{}{route}", self.admin_port)
    }

    /// GET on the admin server: (status, body), or `None` when it does not answer (yet).
    ///
    /// The timeout only keeps a test from hanging: an answer that comes late is still an
    /// answer. 10 s, not 2: on a loaded machine the daemon (a debug build, among a dozen others
    /// started by the tests running beside this one) can take more than a second to be given a
    /// CPU, and callers take `None` for "not listening" or unwrap it.
    pub async fn get(&self, route: &str) -> Option<(u16, String)> {
        let response =
            reqwest::Client::new().get(self.url(route)).timeout(Duration::from_secs(10)).send().await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// The value of one series of `/metrics` (`name{labels}` exactly as exported).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics").await?;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub async fn wait_ready(&self, limit: Duration) {
        wait_for(limit, "/readyz to answer 200", || async { self.get("/readyz").await.filter(|(s, _)| *s == 200) })
            .await;
    }

    pub async fn wait_metric(&self, series: &str, value: f64, limit: Duration) {
        wait_for(limit, &format!("{series} == {value}"), || async {
            self.metric(series).await.filter(|v| *v == value)
        })
        .await;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() && self.guard.as_ref().is_some_and(|g| !g.checked) {
            self.check_log();
        }
    }
}

/// Waits for `child` to end, for at most `limit` (then kills it): its exit code, `None` when it
/// had to be killed or died of a signal.
pub async fn exit_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the binary to completion: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("MAGENTO_TOKEN_SIDECAR_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn series(name: &str, customer: &str) -> String {
    format!("{name}{{customer=\"{customer}\"}}")
}

pub fn refreshes(customer: &str, result: &str) -> String {
    format!("magento_token_refresh_total{{customer=\"{customer}\",result=\"{result}\"}}")
}

// ---------------------------------------------------------------------------------------------
// Helpers of the fault and security suites (faults.rs, security.rs).

impl Daemon {
    /// Like [`Daemon::spawn`], with `adjust` given the command before it starts (environment,
    /// or a shell around the binary). Proxy variables of the environment running the tests are
    /// removed, so only the ones a test sets apply.
    pub fn spawn_with(args: &[&str], log: &Path, admin_port: u16, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let mut command = Command::new(BIN);
        command.args(args);
        for var in PROXY_VARIABLES {
            command.env_remove(var);
        }
        command
            .env_remove("RUST_LOG")
            .env_remove("MAGENTO_TOKEN_SIDECAR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        adjust(&mut command);
        let child = command.spawn().unwrap();
        Daemon::adopt(child, log, admin_port)
    }

    /// A daemon started by hand, its stderr in `log`.
    pub fn adopt(child: Child, log: &Path, admin_port: u16) -> Daemon {
        Daemon { child, log: log.to_path_buf(), admin_port, guard: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The most memory the process has held so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Asserts that no secret appears in the logs so far, `/status` or `/metrics`.
    pub async fn assert_secrets_hidden(&self, secrets: &[String]) {
        let (_, status) = self.get("/status").await.expect("/status answers");
        let (_, metrics) = self.get("/metrics").await.expect("/metrics answers");
        assert_hidden("/status", &status, secrets);
        assert_hidden("/metrics", &metrics, secrets);
        assert_hidden("the logs", &self.logs(), secrets);
    }

    /// The parsed `/status` entry of one customer.
    pub async fn status_of(&self, customer: &str) -> serde_json::Value {
        let (_, body) = self.get("/status").await.expect("/status answers");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["customers"].as_array().unwrap().iter().find(|c| c["name"] == customer).cloned().unwrap()
    }
}

/// The variables reqwest reads for proxies.
pub const PROXY_VARIABLES: [&str; 8] =
    ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"];

/// Fails naming the place when any secret (or the signature part of a token) appears in `text`.
/// The secrets are never printed.
pub fn assert_hidden(place: &str, text: &str, secrets: &[String]) {
    for (i, secret) in secrets.iter().enumerate() {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret.as_str()), "secret #{i} ({} bytes) appears in {place}", secret.len());
        // A JWT's signature alone would let no one in, but it is the token's one secret part.
        if let Some(signature) = secret.rsplit('.').next().filter(|s| s.len() >= 16 && *s != secret) {
            assert!(!text.contains(signature), "the signature of secret #{i} appears in {place}");
        }
    }
}

impl World {
    /// Starts `run` with `adjust` applied to the command (see [`Daemon::spawn_with`]).
    pub fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> Daemon {
        Daemon::spawn_with(
            &["run", "--config", self.config_path().to_str().unwrap()],
            &self.dir.path().join("daemon.log"),
            self.admin_port,
            adjust,
        )
        .guarded_by(self)
    }

    /// What the daemons this world starts check at stop: see [`Guard`].
    pub fn guard(&self) -> Guard {
        Guard { passwords: self.passwords.clone(), server: self.server.secrets(), checked: false }
    }

    /// Asserts that no secret of this world (see [`Guard`]) appears in `text`.
    pub fn assert_no_secret(&self, place: &str, text: &str) {
        assert_hidden(place, text, &self.guard().secrets());
    }

    /// Logs in straight to the dev server, as an earlier run of the daemon would have.
    pub async fn login_directly(&self, email: &str, password: &str) -> String {
        let (status, body) = self.login_answer(email, password).await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    /// Sends a login straight to the dev server; its status and body.
    pub async fn login_answer(&self, email: &str, password: &str) -> (u16, Vec<u8>) {
        let url = format!("{}/rest/V1/integration/customer/token", self.server.base_url());
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::json!({ "username": email, "password": password }).to_string())
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.bytes().await.unwrap().to_vec())
    }

    /// Puts a token file in place as the daemon writes it (mode 0600, the token alone).
    pub fn seed_token(&self, file: &str, token: &str) {
        let path = self.token_path(file);
        std::fs::write(&path, token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Temporary files (`.<file>.<random>.tmp`) in the token directory.
    pub fn temporaries(&self) -> Vec<String> {
        temporaries_in(&self.tokens())
    }
}

pub fn temporaries_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Token requests the dev server received, in order.
pub fn token_requests(server: &DevServer) -> Vec<magento_devserver::RequestRecord> {
    server.requests().into_iter().filter(|r| r.path.ends_with("/integration/customer/token")).collect()
}

/// The time between consecutive requests.
pub fn gaps(requests: &[magento_devserver::RequestRecord]) -> Vec<Duration> {
    requests.windows(2).map(|w| w[1].at.duration_since(w[0].at).unwrap_or_default()).collect()
}

/// A tmpfs mounted for one test (needs root; `None` where mounting is not allowed), unmounted
/// when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs { path: path.to_path_buf() })
    }

    /// `mount -o remount,ro` or `rw`.
    pub fn remount(&self, option: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount,{option} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

impl World {
    /// Runs `once` on this world's configuration so that it stops at the first failure whatever
    /// the machine's pace: backoffs of 10 s (past `--timeout 5s`), not a tight deadline that a
    /// slow request would turn into a timeout. Returns (exit code, stdout, stderr).
    pub async fn once_with_one_try(&self) -> (i32, String, String) {
        let one_try = std::fs::read_to_string(self.config_path())
            .unwrap()
            .replace("  min_backoff: 100ms\n  max_backoff: 1s\n", "  min_backoff: 10s\n  max_backoff: 10s\n");
        assert!(one_try.contains("min_backoff: 10s"));
        self.write_config(&one_try);
        let config = self.config_path().display().to_string();
        let (code, out, err) =
            tokio::task::spawn_blocking(move || run_to_end(&["once", "--config", &config, "--timeout", "5s"]))
                .await
                .unwrap();
        self.assert_no_secret("once's output", &format!("{out}{err}"));
        (code, out, err)
    }
}
