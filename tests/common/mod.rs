//! The harness of the end-to-end tests: the dev server in the test process, the real binary
//! in a child process, and bounded waits for what a user would see.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use magento_token_sidecar::devserver::{DevServer, DevServerOptions};

pub const BIN: &str = env!("CARGO_BIN_EXE_magento-token-sidecar");

/// Customers every test may use: (name, email, password).
pub const ALICE: (&str, &str, &str) = ("alice", "alice@example.com", "alice-Pa55word!");
pub const BOB: (&str, &str, &str) = ("bob", "bob@example.com", "bob-S3cret-phrase");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 50 ms until it gives `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A test's world: a temporary directory with `tokens/` and `secrets/`, the dev server, and the
/// configuration file the daemon reads.
pub struct World {
    pub dir: tempfile::TempDir,
    pub server: DevServer,
    pub admin_port: u16,
}

impl World {
    pub async fn new(opts: DevServerOptions) -> World {
        let server = DevServer::start(opts).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        World { dir, server, admin_port: free_port() }
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
        std::fs::write(self.secret_path(name), format!("{password}\n")).unwrap();
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
        Daemon::spawn(
            &["run", "--config", self.config_path().to_str().unwrap()],
            &self.dir.path().join("daemon.log"),
            self.admin_port,
        )
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

    /// Names in the token directory other than the given token files.
    pub fn stray_files(&self, expected: &[&str]) -> Vec<String> {
        std::fs::read_dir(self.tokens())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !expected.contains(&n.as_str()))
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
}

impl Daemon {
    pub fn spawn(args: &[&str], log: &Path, admin_port: u16) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("MAGENTO_TOKEN_SIDECAR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child, log: log.to_path_buf(), admin_port }
    }

    pub fn signal(&self, name: &str) {
        let ok =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < limit, "the daemon did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(15)).await
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, route: &str) -> String {
        format!("http://127.0.0.1:{}{route}", self.admin_port)
    }

    /// GET on the admin server: (status, body), or `None` when it does not answer (yet).
    pub async fn get(&self, route: &str) -> Option<(u16, String)> {
        let response = reqwest::Client::new().get(self.url(route)).timeout(Duration::from_secs(2)).send().await.ok()?;
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
