//! `cargo bench --bench central`: what central mode's Secret writes cost the Kubernetes API at
//! fleet size, with the writes batched per Secret (`customers[].secret`, at most one update a
//! second each) against one write per refresh.
//!
//! The real binary (`run`, `output.kubernetes`; the release build with the `kubernetes` feature,
//! the central image's) holds `CUSTOMERS` customers spread over `SECRETS` Secrets, against the
//! dev server (its own release binary) and the stand-in API server of the end-to-end tests
//! (`tests/e2e/kubeapi.rs`, in this process), all on loopback. Tokens live `LIFETIME` here instead of an hour, so
//! that a window of minutes holds many refreshes of every customer: the refresh rate is then far
//! above a real store's, where batching matters most. The report gives what was measured (every
//! refresh, every request the API received) and, from the same schedule, what an hour costs with
//! one-hour tokens. Nothing here passes or fails: it reports.

#[path = "../../tests/e2e/kubeapi.rs"]
#[allow(dead_code)]
mod kubeapi;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubeapi::{KubeApi, Rule};

/// The fleet's size; `CENTRAL_BENCH_CUSTOMERS` sets another.
const CUSTOMERS: usize = 10_000;
const SECRETS: usize = 20;
const NS: &str = "shop";
const DEFAULT_SECRET: &str = "magento-tokens";
/// The compressed token life, and the refresh settings scaled with it.
const LIFETIME: Duration = Duration::from_secs(60);
const BEFORE_EXPIRY: &str = "20s";
const JITTER: &str = "10s";
/// How long the steady state is watched once every token is in its Secret.
const WINDOW: Duration = Duration::from_secs(90);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("the central benchmark runs with `cargo bench --bench central`: skipped");
        return;
    }
    let customers: usize =
        std::env::var("CENTRAL_BENCH_CUSTOMERS").ok().and_then(|n| n.parse().ok()).unwrap_or(CUSTOMERS);
    let secrets: Vec<String> = (0..SECRETS).map(|i| format!("tokens-{i:02}")).collect();
    let daemon_bin =
        release_build(&["--features", "kubernetes", "--bin", "magento-token-sidecar"], "magento-token-sidecar");
    let devserver_bin = release_build(&["-p", "magento-devserver", "--bin", "magento-devserver"], "magento-devserver");
    let dir = tempfile::tempdir().unwrap();
    let emails: Vec<String> = (0..customers).map(|i| format!("c{i:05}@example.com")).collect();
    let customers_file = dir.path().join("customers");
    std::fs::write(&customers_file, emails.iter().map(|e| format!("{e}:Bench-Pa55word\n")).collect::<String>())
        .unwrap();
    let (mut server, base_url) = devserver(&devserver_bin, &customers_file);
    let mut rules = KubeApi::role_for(DEFAULT_SECRET);
    for s in &secrets {
        rules.push(Rule { verbs: vec!["get", "update", "patch"], resource: "secrets", names: vec![s.clone()] });
    }
    let api = KubeApi::start(rules).await;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, NS);
    let password = dir.path().join("password");
    std::fs::write(&password, "Bench-Pa55word").unwrap();
    let mut config = format!(
        "magento:\n  base_url: {}\nrefresh:\n  before_expiry: {BEFORE_EXPIRY}\n  jitter: {JITTER}\n  max_concurrent_logins: 16\n  validate_every: 0s\noutput:\n  kubernetes:\n    secret: {DEFAULT_SECRET}\nadmin:\n  listen: \"\"\nlog:\n  level: {level}\ncustomers:\n",
        base_url,
        level = std::env::var("CENTRAL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
    );
    for (i, email) in emails.iter().enumerate() {
        config.push_str(&format!(
            "  - name: c{i:05}\n    username: {email}\n    password_file: {}\n    secret: {}\n",
            password.display(),
            secrets[i % SECRETS]
        ));
    }
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let started = Instant::now();
    let mut daemon = Command::new(&daemon_bin)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "bench")
        .env_remove("HOME")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let held = || secrets.iter().map(|s| api.secret_data(NS, s).map_or(0, |d| d.len())).sum::<usize>();
    let mut shown = Instant::now();
    while held() < customers {
        if started.elapsed() > Duration::from_secs(300) {
            stop(&mut daemon);
            panic!("the tokens did not reach their Secrets in 5 minutes: {} of {customers}", held());
        }
        if shown.elapsed() > Duration::from_secs(10) {
            eprintln!("{:.0} s: {} of {customers} tokens in their Secrets", started.elapsed().as_secs_f64(), held());
            shown = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let filled = started.elapsed();
    let writes = |since: Option<Instant>| {
        api.requests()
            .into_iter()
            .filter(|r| r.resource == "secrets" && matches!(r.verb.as_str(), "update" | "create") && r.status < 300)
            .filter(|r| since.is_none_or(|t| r.at >= t))
            .count()
    };
    // A refresh is a token that changed in its Secret (looked at every second: with tokens of a
    // minute, no customer refreshes twice in one).
    let tokens_now = || -> std::collections::BTreeMap<String, Vec<u8>> {
        secrets.iter().flat_map(|s| api.secret_data(NS, s).unwrap_or_default()).collect()
    };
    let start_writes = writes(None);
    let start_tokens = customers;
    let from = Instant::now();
    let mut last = tokens_now();
    let mut window_refreshes = 0;
    while from.elapsed() < WINDOW {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = tokens_now();
        window_refreshes += now.iter().filter(|(k, v)| last.get(*k) != Some(*v)).count();
        last = now;
    }
    let window_writes = writes(Some(from));
    let all_requests = api.requests().into_iter().filter(|r| r.at >= from).count();
    stop(&mut daemon);
    stop(&mut server);

    let secs = WINDOW.as_secs_f64();
    let refresh_rate = window_refreshes as f64 / secs;
    // One-hour tokens with the default before_expiry (15 m) and jitter (1 m): a customer
    // refreshes every 44.5 minutes on average.
    let cycles_an_hour = 60.0 / 44.5;
    let real_rate = customers as f64 * cycles_an_hour / 3600.0;
    let per_secret = real_rate / SECRETS as f64;
    // Spread out: a Secret is written in every second that has at least one change for it (its
    // changes a Poisson stream of rate `per_secret`).
    let spread_hour = SECRETS as f64 * 3600.0 * (1.0 - (-per_secret).exp());
    // A fleet started together (as here): every customer's refresh falls in the same minute of
    // jitter each cycle, so each Secret is written at most once a second of that minute.
    let clustered_hour = (SECRETS as f64 * 60.0 * cycles_an_hour).min(spread_hour);
    println!("central mode: {customers} customers in {SECRETS} Secrets, one replica, tokens of {LIFETIME:?}\n");
    println!("| | measured | writes a refresh would cost |");
    println!("|---|---:|---:|");
    println!("| start: every token into its Secret ({:.1} s) | {start_writes} Secret writes for {start_tokens} logins | {start_tokens} |", filled.as_secs_f64());
    println!(
        "| steady state, {secs:.0} s window | {window_writes} Secret writes ({:.1}/s; at most {SECRETS}/s) for {window_refreshes} refreshes ({refresh_rate:.1}/s); {all_requests} API requests in all (Lease renewals included) | {window_refreshes} |",
        window_writes as f64 / secs
    );
    println!(
        "| per hour, one-hour tokens, a fleet started together (every refresh in one minute of jitter a cycle) | at most {clustered_hour:.0} Secret writes | {:.0} |",
        real_rate * 3600.0
    );
    println!(
        "| per hour, one-hour tokens, refreshes spread out ({real_rate:.2}/s, {per_secret:.3}/s a Secret) | {spread_hour:.0} Secret writes | {:.0} |",
        real_rate * 3600.0
    );
    println!(
        "| per hour at this benchmark's refresh rate ({refresh_rate:.0}/s) | {:.0} Secret writes | {:.0} |",
        window_writes as f64 / secs * 3600.0,
        refresh_rate * 3600.0
    );
}

/// The dev server's process on a free loopback port, and its base URL.
fn devserver(bin: &Path, customers: &Path) -> (Child, String) {
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--token-lifetime"])
        .arg(format!("{}s", LIFETIME.as_secs()))
        .arg("--customers-file")
        .arg(customers)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base_url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("the dev server said {line:?}"));
    (child, base_url.to_owned())
}

/// `cargo build --release <args>`, and the binary `bin` it made.
fn release_build(args: &[&str], bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building {bin} (cargo build --release {}) ...", args.join(" "));
    let status =
        Command::new(cargo).args(["build", "--release"]).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).status();
    assert!(status.is_ok_and(|s| s.success()), "cargo build --release {} failed", args.join(" "));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release").join(bin)
}

/// Stops a process (SIGTERM through `kill`, as a pod's stop would).
fn stop(child: &mut Child) {
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}
