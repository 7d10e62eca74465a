//! The benchmark's world: customers, their password files, the sidecar's configurations and
//! the baselines' customer lists, and fresh token directories.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Where token files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFs {
    /// `/dev/shm`: what the Helm chart mounts (an `emptyDir` with `medium: Memory`).
    Memory,
    /// The temporary directory's file system (a node's disk).
    Disk,
}

pub struct Fixture {
    /// Password files, configurations, customer lists, logs.
    pub root: TempDir,
    /// Token directories, one per run.
    tokens: TempDir,
    runs: std::cell::Cell<usize>,
}

pub fn name(i: usize) -> String {
    format!("c{i:05}")
}

pub fn email(i: usize) -> String {
    format!("c{i:05}@example.com")
}

fn password(i: usize) -> String {
    format!("pw-{i:05}-Secret!")
}

impl Fixture {
    pub fn new(max_n: usize, token_fs: TokenFs) -> io::Result<Fixture> {
        let root = tempfile::Builder::new().prefix("sidecar-bench.").tempdir()?;
        let tokens = match token_fs {
            TokenFs::Memory => tempfile::Builder::new().prefix("sidecar-bench-tokens.").tempdir_in("/dev/shm")?,
            TokenFs::Disk => tempfile::Builder::new().prefix("tokens.").tempdir_in(root.path())?,
        };
        std::fs::create_dir(root.path().join("secrets"))?;
        let mut server_list = String::new();
        for i in 0..max_n {
            std::fs::write(root.path().join("secrets").join(name(i)), password(i))?;
            writeln!(server_list, "{}:{}", email(i), password(i)).expect("a String takes any write");
        }
        std::fs::write(root.path().join("server-customers.txt"), server_list)?;
        Ok(Fixture { root, tokens, runs: std::cell::Cell::new(0) })
    }

    /// The dev server's `--customers-file`.
    pub fn server_customers(&self) -> PathBuf {
        self.root.path().join("server-customers.txt")
    }

    fn password_file(&self, i: usize) -> PathBuf {
        self.root.path().join("secrets").join(name(i))
    }

    /// The baselines' input: `name<TAB>username<TAB>password_file`, first `n` customers.
    pub fn customer_list(&self, n: usize) -> io::Result<PathBuf> {
        let path = self.root.path().join(format!("customers-{n}.tsv"));
        if !path.exists() {
            let mut text = String::new();
            for i in 0..n {
                writeln!(text, "{}\t{}\t{}", name(i), email(i), self.password_file(i).display())
                    .expect("a String takes any write");
            }
            std::fs::write(&path, text)?;
        }
        Ok(path)
    }

    /// A sidecar configuration for the first `n` customers writing into `out`.
    pub fn config(&self, n: usize, base_url: &str, out: &Path, admin: Option<SocketAddr>) -> io::Result<PathBuf> {
        self.config_with(n, base_url, out, admin, "")
    }

    /// [`Fixture::config`] with more `refresh` settings (`refresh`: whole lines, indented by two).
    pub fn config_with(
        &self,
        n: usize,
        base_url: &str,
        out: &Path,
        admin: Option<SocketAddr>,
        refresh: &str,
    ) -> io::Result<PathBuf> {
        let path = self.root.path().join(format!("sidecar-{}.yaml", self.next_run()));
        let admin = admin.map_or(String::new(), |a| a.to_string());
        let mut text = format!(
            "magento:\n  base_url: \"{base_url}\"\n  timeout: 10s\n\
             refresh:\n  max_concurrent_logins: 8\n{refresh}\
             output:\n  dir: \"{}\"\n  mode: \"0600\"\n  format: raw\n\
             admin:\n  listen: \"{admin}\"\n\
             log:\n  format: json\n  level: info\n\
             customers:\n",
            out.display()
        );
        for i in 0..n {
            writeln!(
                text,
                "  - name: {}\n    username: {}\n    password_file: \"{}\"",
                name(i),
                email(i),
                self.password_file(i).display()
            )
            .expect("a String takes any write");
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A new, empty token directory.
    pub fn out_dir(&self, label: &str) -> io::Result<PathBuf> {
        let dir = self.tokens.path().join(format!("{label}-{}", self.next_run()));
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// A log file for one process (stdout and stderr), on disk.
    pub fn log_file(&self, label: &str) -> io::Result<(PathBuf, std::fs::File)> {
        let path = self.root.path().join(format!("{label}-{}.log", self.next_run()));
        let file = std::fs::File::create(&path)?;
        Ok((path, file))
    }

    fn next_run(&self) -> usize {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        n
    }
}

/// The last lines of a log, for an error message.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
