//! The daemon on its worst day: Magento down, slow or answering nonsense, redirects, clocks that
//! disagree, a disk that refuses, a process killed mid-write, and readers hammering the file.
//! Each test is judged by what a user sees: the token file (content, mode, age), what the dev
//! server received, the metrics, the exit code and the logs (written at `trace`, and searched
//! for secrets after every scenario).
//!
//! Time is scaled down through the configuration (backoffs of 100 ms to a few seconds, tokens
//! that live seconds), never by asserting how fast something ran: bounds are on counts and on
//! the least time the daemon must wait, with generous slack wherever an upper bound is needed.
//! Times between attempts are read from the dev server's records (when each request arrived),
//! not from the test's own clock, which a busy machine can leave behind by a second or more.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::{DevServer, DevServerOptions, Fault};

const SEC: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Settings a test changes from the harness's defaults (timeout 2s, backoff 100ms to 1s).
struct Knobs<'a> {
    timeout: &'a str,
    min_backoff: &'a str,
    max_backoff: &'a str,
    /// More lines under `refresh:`.
    refresh: &'a str,
    /// Lines under `output:` before `dir:`.
    output: &'a str,
    /// Appended at the end (customer keys).
    extra: &'a str,
}

impl Default for Knobs<'_> {
    fn default() -> Self {
        Knobs { timeout: "2s", min_backoff: "100ms", max_backoff: "1s", refresh: "", output: "", extra: "" }
    }
}

/// A configuration at log level `trace`, so that every scenario also proves no secret is logged.
fn config(w: &World, customers: &[(&str, &str)], k: Knobs) -> String {
    let text = w
        .config_text(customers, k.refresh, k.extra)
        .replace("  timeout: 2s\n", &format!("  timeout: {}\n", k.timeout))
        .replace(
            "  min_backoff: 100ms\n  max_backoff: 1s\n",
            &format!("  min_backoff: {}\n  max_backoff: {}\n", k.min_backoff, k.max_backoff),
        )
        .replace("level: debug", "level: trace")
        .replace("  dir:", &format!("{}  dir:", k.output));
    assert!(text.contains("level: trace") && text.contains(&format!("timeout: {}", k.timeout)));
    text
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn secrets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Restarts a stopped dev server on the same address, retrying while the port is released.
/// Binds `addr` without listening on it: connecting is refused, and the port stays ours.
fn hold_port(addr: std::net::SocketAddr) -> tokio::net::TcpSocket {
    let start = Instant::now();
    loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket.bind(addr) {
            Ok(()) => return socket,
            Err(e) => {
                assert!(start.elapsed() < 5 * SEC, "cannot hold {addr}: {e}");
                std::thread::sleep(ms(20));
            }
        }
    }
}

async fn restart_server(addr: std::net::SocketAddr, opts: DevServerOptions) -> DevServer {
    let start = Instant::now();
    loop {
        match DevServer::start(DevServerOptions { listen: addr, ..opts.clone() }).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < 5 * SEC, "cannot listen on {addr} again: {e}");
                tokio::time::sleep(ms(50)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Magento outages

/// How Magento (or what stands in front of it) is down.
#[derive(Clone)]
enum Outage {
    /// Every token request gets this answer.
    Fault(Fault),
    /// Nothing listens: connection refused.
    Stopped,
}

struct Case {
    name: &'static str,
    outage: Outage,
    /// The `result` label the failed attempts are counted under.
    result: &'static str,
    timeout: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    /// The least time between two attempts, as the dev server sees them, that the backoff (or
    /// the fault) calls for.
    min_gap: Duration,
    /// The least time between the first two attempts (a Retry-After date).
    first_gap: Option<Duration>,
}

impl Case {
    fn new(name: &'static str, outage: Outage, result: &'static str) -> Case {
        Case {
            name,
            outage,
            result,
            timeout: 2 * SEC,
            min_backoff: ms(100),
            max_backoff: SEC,
            min_gap: ms(95),
            first_gap: None,
        }
    }

    /// How long one failed attempt itself may take: the whole timeout for a server that never
    /// answers in time.
    fn attempt_time(&self) -> Duration {
        match &self.outage {
            Outage::Fault(Fault::Hang | Fault::Stream { .. }) => self.timeout,
            _ => Duration::ZERO,
        }
    }
}

/// What one outage showed, for the closing numbers.
struct OutageReport {
    name: &'static str,
    failures: usize,
    shortest_gap: Option<Duration>,
    longest_gap: Option<Duration>,
    recovery: Duration,
}

/// How long each outage lasts at least, from the first failed attempt.
const OUTAGE: Duration = Duration::from_secs(4);
/// Allowance for a busy machine on the few upper bounds (recovery, longest gap), measured
/// between requests the dev server received: the daemon's timer firing late and its next
/// request waiting for a CPU, which on a loaded 2-core runner can add up to a second or more.
/// A Retry-After that is not capped (3600 s below) still fails by far.
const SLACK: Duration = Duration::from_secs(2);

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// One outage: a token that is due for a refresh sits on disk, Magento goes down, the daemon
/// retries with its backoff while the file stays exactly as it was, then Magento comes back and
/// a new token follows within `max_backoff`.
async fn outage(case: Case) -> OutageReport {
    let name = case.name;
    let opts = DevServerOptions { token_lifetime: 300 * SEC, ..Default::default() };
    let mut w = World::new(opts.clone()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let seed = w.login_directly(ALICE.1, ALICE.2).await;
    w.seed_token("alice", &seed);
    let seeded_at = modified(&w.token_path("alice"));
    let timeout = format!("{}ms", case.timeout.as_millis());
    let (min_backoff, max_backoff) =
        (format!("{}ms", case.min_backoff.as_millis()), format!("{}ms", case.max_backoff.as_millis()));
    // before_expiry above the lifetime: the seeded token is due, so the daemon logs in at once
    // (and, once it has a new one, not again for a tenth of the lifetime).
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1)],
        Knobs {
            timeout: &timeout,
            min_backoff: &min_backoff,
            max_backoff: &max_backoff,
            refresh: "  before_expiry: 600s\n  jitter: 0s\n",
            ..Knobs::default()
        },
    ));
    let addr = w.server.addr();
    match &case.outage {
        Outage::Fault(f) => w.server.set_fault(Some(f.clone())),
        Outage::Stopped => {
            let placeholder = DevServer::start(DevServerOptions::default()).await.unwrap();
            std::mem::replace(&mut w.server, placeholder).shutdown().await;
        }
    }
    // Hold the stopped server's port, bound but not listening: connections are refused, and no
    // other server or admin port of a test running beside this one can be given it meanwhile
    // (a daemon would then reach that one and see an HTTP error, not a refused connection).
    let held_port = match &case.outage {
        Outage::Stopped => Some(hold_port(addr)),
        Outage::Fault(_) => None,
    };
    let daemon_started = SystemTime::now();
    let mut d = w.start();
    // The token on disk is unexpired: ready without a login, outage or not (no login can
    // succeed now). The limit only bounds the start of a dozen daemons at once.
    d.wait_ready(15 * SEC).await;
    // The outage is held for OUTAGE from the first failed attempt.
    wait_for(10 * SEC, &format!("{name}: the first attempt"), || async {
        match &case.outage {
            Outage::Fault(_) => (token_requests(&w.server).len() > 1).then_some(()),
            Outage::Stopped => d.metric(&refreshes("alice", case.result)).await.filter(|n| *n >= 1.0).map(|_| ()),
        }
    })
    .await;
    let started = Instant::now();
    while started.elapsed() < OUTAGE {
        assert_eq!(w.read_token("alice").as_deref(), Some(seed.as_str()), "{name}: the token file changed");
        assert_eq!(modified(&w.token_path("alice")), seeded_at, "{name}: the token file was rewritten");
        tokio::time::sleep(ms(25)).await;
    }
    // A retry, not only a first failure, before Magento comes back: the slowest cases retry
    // about 3 s after the first attempt (Retry-After dates, timeouts), which a busy machine can
    // push past the end of OUTAGE; the outage then lasts until the daemon has retried.
    let status = wait_for(15 * SEC, &format!("{name}: two failures in a row"), || async {
        let status = d.status_of("alice").await;
        (status["consecutive_failures"].as_u64().unwrap() >= 2).then_some(status)
    })
    .await;
    assert_eq!(status["last_error"]["class"], case.result, "{name}: {status}");
    assert_eq!(w.read_token("alice").as_deref(), Some(seed.as_str()), "{name}: the token file changed");
    let (ready, _) = d.get("/readyz").await.unwrap();
    assert_eq!(ready, 200, "{name}: not ready during the outage, with a valid token on disk");

    // Magento is back.
    let ended = match &case.outage {
        Outage::Fault(_) => {
            w.server.set_fault(None);
            SystemTime::now()
        }
        Outage::Stopped => {
            drop(held_port);
            let back = restart_server(addr, opts).await;
            back.add_customer(ALICE.1, ALICE.2);
            drop(std::mem::replace(&mut w.server, back));
            SystemTime::now()
        }
    };
    let fresh = w.wait_token("alice", Some(&seed), 15 * SEC).await;
    assert_eq!(w.server.check_token(&fresh).as_deref(), Some(ALICE.1), "{name}: the new token works");
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    let counted = d.metric(&refreshes("alice", case.result)).await.unwrap() as usize;
    assert_eq!(d.metric(&series("magento_token_consecutive_failures", "alice")).await, Some(0.0));

    // What the dev server saw: the failed attempts, then the one that succeeded. The recovery
    // runs to that login's arrival (the time the test takes to notice the file is not the
    // daemon's); the attempts are counted over the span they took.
    let (failures, gaps, recovered_at, span) = match &case.outage {
        Outage::Stopped => {
            let logins = token_requests(&w.server);
            assert_eq!(logins.len(), 1, "{name}: one login once back");
            // Every refused attempt came between the daemon's start and the server's return.
            (counted, Vec::new(), logins[0].at, ended.duration_since(daemon_started).unwrap_or_default())
        }
        Outage::Fault(_) => {
            // The first is the test's own login that made the seeded token.
            let seen = token_requests(&w.server).split_off(1);
            assert_eq!(seen.last().unwrap().status, 200, "{name}");
            assert_eq!(counted, seen.len() - 1, "{name}: every failed attempt is counted as {}", case.result);
            let failed = &seen[..seen.len() - 1];
            let span = failed.last().unwrap().at.duration_since(failed[0].at).unwrap_or_default();
            (failed.len(), gaps(&seen), seen.last().unwrap().at, span)
        }
    };
    let recovery = recovered_at.duration_since(ended).unwrap_or_default();
    assert!(failures >= 2, "{name}: only {failures} attempt(s) during the outage: no retry");
    // Attempts at least min_gap apart: at most one per min_gap over the span, plus the first.
    let most = (span.as_secs_f64() / case.min_gap.as_secs_f64()) as usize + 1;
    assert!(failures <= most, "{name}: {failures} attempts in {span:?}, more than the backoff allows ({most})");
    for (i, gap) in gaps.iter().enumerate() {
        assert!(*gap >= case.min_gap, "{name}: attempt {} came {gap:?} after the one before", i + 2);
        let longest = case.max_backoff + case.attempt_time() + SLACK;
        assert!(*gap <= longest, "{name}: {gap:?} between attempts {} and {}: max_backoff not honoured", i + 1, i + 2);
    }
    if let (Some(first), Some(gap)) = (case.first_gap, gaps.first()) {
        assert!(*gap >= first, "{name}: Retry-After not honoured: the second attempt came after {gap:?}");
    }
    let bound = case.max_backoff + case.attempt_time() + SLACK;
    assert!(recovery <= bound, "{name}: recovered {recovery:?} after the outage, beyond max_backoff ({bound:?})");

    d.assert_secrets_hidden(&secrets(&[ALICE.2, &seed, &fresh])).await;
    assert_eq!(d.stop().await.code(), Some(0), "{name}");
    assert!(w.stray_files(&["alice"]).is_empty(), "{name}: {:?}", w.stray_files(&["alice"]));
    OutageReport {
        name,
        failures,
        shortest_gap: gaps.iter().min().copied(),
        longest_gap: gaps.iter().max().copied(),
        recovery,
    }
}

/// A slow answer within the timeout is no failure: one request, the token written. The
/// timeout leaves 3.5 s beyond the 1.5 s the server waits, for a busy machine's delays on both
/// sides; an answer that came after it would be retried and fail the single-request check.
async fn slow_answer() -> OutageReport {
    let w = World::new(DevServerOptions { token_lifetime: 300 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.server.set_fault(Some(Fault::Delay(ms(1500))));
    w.write_config(&config(&w, &[(ALICE.0, ALICE.1)], Knobs { timeout: "5s", ..Knobs::default() }));
    let mut d = w.start();
    let started = Instant::now();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "a slow answer is waited for, not retried");
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    for result in ["http_error", "network_error", "invalid_response"] {
        assert_eq!(d.metric(&refreshes("alice", result)).await, Some(0.0), "{result}");
    }
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
    OutageReport {
        name: "slow answer (1.5 s, timeout 5 s)",
        failures: 0,
        shortest_gap: None,
        longest_gap: None,
        recovery: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_keep_the_last_token_and_recover_within_max_backoff() {
    let html = |status| Outage::Fault(Fault::html(status));
    let cases = vec![
        Case::new("500, Magento's JSON", Outage::Fault(Fault::status(500)), "http_error"),
        Case::new("502, HTML", html(502), "http_error"),
        Case::new("503, HTML", html(503), "http_error"),
        Case::new("504, HTML", html(504), "http_error"),
        Case {
            max_backoff: 3 * SEC,
            min_gap: ms(1990),
            ..Case::new("429, Retry-After: 2", Outage::Fault(Fault::retry_after(429, "2")), "http_error")
        },
        Case {
            max_backoff: 5 * SEC,
            first_gap: Some(ms(1500)),
            ..Case::new(
                "503, Retry-After: an HTTP date 3 s ahead",
                Outage::Fault(Fault::RetryAt { status: 503, ahead: 3 * SEC }),
                "http_error",
            )
        },
        Case {
            min_gap: ms(990),
            ..Case::new(
                "503, Retry-After: 3600, capped at max_backoff 1 s",
                Outage::Fault(Fault::retry_after(503, "3600")),
                "http_error",
            )
        },
        Case::new("connection refused (server stopped)", Outage::Stopped, "network_error"),
        Case::new("connection reset", Outage::Fault(Fault::Reset), "network_error"),
        // The daemon sends again the timeout (1 s) plus at least min_backoff (100 ms) after it
        // sent; the dev server records a request once it has read it, and a look at one request
        // that a busy machine delays shortens the gap to the next by as much. 600 ms allows half
        // a second of that and still fails a daemon that retries without waiting out its timeout
        // (the backoff alone starts at 100 ms).
        Case {
            timeout: SEC,
            min_gap: ms(600),
            ..Case::new("accepted, never answered (timeout 1 s)", Outage::Fault(Fault::Hang), "network_error")
        },
        Case {
            timeout: SEC,
            min_gap: ms(600),
            ..Case::new(
                "headers, then a body that trickles (timeout 1 s)",
                Outage::Fault(Fault::trickle(ms(200), 100)),
                "network_error",
            )
        },
    ];
    let mut runs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = OutageReport> + Send>>> =
        cases.into_iter().map(|c| Box::pin(outage(c)) as _).collect();
    runs.push(Box::pin(slow_answer()));
    let reports = futures::future::join_all(runs).await;
    eprintln!("outage | failed attempts | shortest gap | longest gap | new token after the fault ended");
    for r in reports {
        let show = |d: Option<Duration>| d.map_or("-".to_owned(), secs);
        eprintln!(
            "{} | {} | {} | {} | {}",
            r.name,
            r.failures,
            show(r.shortest_gap),
            show(r.longest_gap),
            secs(r.recovery)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Bad answers

/// A JWT shaped like Magento's with these claims (the signature is never checked by the daemon).
fn jwt(claims: &str) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk", b64(r#"{"kid":"1","alg":"HS256"}"#), b64(claims))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_invalid_responses_and_write_nothing() {
    use serde_json::json;
    let now = unix_now();
    let html_200 = Fault::Respond {
        status: 200,
        content_type: "text/html".into(),
        body: b"<!DOCTYPE html><html><body>Maintenance</body></html>".to_vec(),
        retry_after: None,
    };
    // (answer, what the log must say about it)
    let answers: Vec<(Fault, &str)> = vec![
        (html_200, "looks like HTML"),
        (Fault::garbage(), "not JSON"),
        (Fault::oversize(16 << 20), "larger than 64 KiB"),
        (Fault::oversize_chunked(64 << 20), "larger than 64 KiB"),
        (Fault::json(200, json!({"token": "abc"})), "a JSON object, not a string"),
        (Fault::json(200, json!(42)), "a JSON number, not a string"),
        (Fault::json(200, json!(null)), "a JSON null, not a string"),
        (Fault::json(200, json!(["abc"])), "a JSON array, not a string"),
        (Fault::json(200, json!("abc\r\nX-Injected: 1")), "character outside the RFC 6750 token set at byte 3"),
        (Fault::json(200, json!("abc\"def")), "character outside the RFC 6750 token set at byte 3"),
        (Fault::json(200, json!("")), "the token is empty"),
        (Fault::json(200, json!("a".repeat(8193))), "more than the 8 KiB accepted"),
        (
            Fault::json(200, json!(jwt(&format!(r#"{{"uid":1,"iat":{},"exp":{}}}"#, now - 30, now - 10)))),
            "the token expired before it arrived",
        ),
        (Fault::json(200, json!(jwt(&format!(r#"{{"uid":1,"iat":{now},"exp":1000000000000}}"#)))), "implausible"),
        (
            Fault::json(200, json!(jwt(r#"{"uid":1,"iat":-9223372036854775808,"exp":9223372036854775807}"#))),
            "implausible",
        ),
    ];
    let w = World::new(DevServerOptions { token_lifetime: 300 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let seed = w.login_directly(ALICE.1, ALICE.2).await;
    w.seed_token("alice", &seed);
    let seeded_at = modified(&w.token_path("alice"));
    for (fault, _) in &answers {
        w.server.push_fault(fault.clone());
    }
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1)],
        Knobs {
            min_backoff: "50ms",
            max_backoff: "200ms",
            refresh: "  before_expiry: 600s\n  jitter: 0s\n",
            ..Knobs::default()
        },
    ));
    let mut d = w.start();
    let start = Instant::now();
    loop {
        let now = w.read_token("alice").unwrap();
        if now != seed {
            break;
        }
        assert_eq!(modified(&w.token_path("alice")), seeded_at, "the file was rewritten with the same token");
        assert!(start.elapsed() < 30 * SEC, "no good token after the bad answers");
        tokio::time::sleep(ms(10)).await;
    }
    let fresh = w.read_token("alice").unwrap();
    assert_eq!(w.server.check_token(&fresh).as_deref(), Some(ALICE.1), "the token written is the good one");
    // One attempt per bad answer (plus the test's own login for the seed), then the good one.
    assert_eq!(w.server.login_attempts(ALICE.1), answers.len() + 2);
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    assert_eq!(d.metric(&refreshes("alice", "invalid_response")).await, Some(answers.len() as f64));
    let peak = d.peak_rss_kib();
    let logs = d.logs();
    for (_, says) in &answers {
        assert!(logs.contains(says), "the logs do not say {says:?}");
    }
    // Megabytes were offered, 64 KiB at most read: the daemon's memory stays small.
    if let Some(peak) = peak {
        eprintln!("peak memory of the daemon after {} MiB of oversize answers: {peak} KiB", 16 + 64);
        assert!(peak < 40 * 1024, "the daemon's peak memory reached {peak} KiB");
    }
    d.assert_secrets_hidden(&secrets(&[ALICE.2, &seed, &fresh])).await;
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(w.stray_files(&["alice"]).is_empty(), "{:?}", w.stray_files(&["alice"]));
}

// ---------------------------------------------------------------------------------------------
// 3. Redirects

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_never_take_the_password_to_another_host() {
    let w = World::with_customers(&[ALICE]).await;
    // Another host that would happily take the login.
    let elsewhere = DevServer::start(DevServerOptions::default()).await.unwrap();
    elsewhere.add_customer(ALICE.1, ALICE.2);
    let target = format!("{}/rest/V1/integration/customer/token", elsewhere.base_url());
    for status in [301, 302, 307, 308] {
        w.server.push_fault(Fault::Redirect { status, location: target.clone() });
    }
    w.write_config(&config(&w, &[(ALICE.0, ALICE.1)], Knobs { max_backoff: "200ms", ..Knobs::default() }));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 15 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert!(elsewhere.requests().is_empty(), "the other host received {:?}", elsewhere.requests());
    assert_eq!(w.server.login_attempts(ALICE.1), 5, "four redirects, then the login");
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    assert_eq!(d.metric(&refreshes("alice", "http_error")).await, Some(4.0));
    let logs = d.logs();
    for status in ["301", "302", "307", "308"] {
        assert!(logs.contains(&format!("HTTP {status}")), "no HTTP {status} in the logs");
    }
    assert!(logs.contains(&format!("redirected to {target}; not followed")), "the log names the target");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 5. Opaque tokens and clocks

/// Seconds since the epoch as a float, to compare with the timestamp metrics.
fn now_f64() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_live_by_default_lifetime() {
    // Magento keeps opaque tokens for a minute; the daemon is told they live 10 s, and refreshes
    // them 5 s before that: the 5 s leave a busy machine's login and write time to spare before
    // the assumed expiry (with 8 s and 3 s they left 2).
    let w = World::new(DevServerOptions { opaque_tokens: true, token_lifetime: 60 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1)],
        Knobs {
            refresh: "  default_lifetime: 10s\n  before_expiry: 5s\n  jitter: 0s\n",
            output: "  format: json\n",
            ..Knobs::default()
        },
    ));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    let json: serde_json::Value = serde_json::from_str(&first).unwrap();
    let token = json["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 32, "an opaque token");
    let obtained = humantime::parse_rfc3339(json["obtained_at"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.duration_since(obtained).unwrap(), 10 * SEC, "obtained + default_lifetime");
    // The next login is planned before that assumed expiry: 10 s - 5 s after obtaining (and
    // MIN_LOGIN_INTERVAL, 5 s, after the file was written). obtained_at is the request's start
    // cut to the second, so the plan comes up to 1 s after obtained + 5 s for the second's
    // fraction, and later by the login and write, which 2 s allow for on a busy machine; never
    // sooner.
    let obtained_unix = obtained.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    let planned = d.metric(&series("magento_token_next_refresh_timestamp_seconds", "alice")).await.unwrap();
    let after = planned - (obtained_unix + 5.0);
    assert!((0.0..3.0).contains(&after), "next refresh {planned}, obtained {obtained_unix}");
    let second = w.wait_token("alice", Some(&first), 15 * SEC).await;
    let json2: serde_json::Value = serde_json::from_str(&second).unwrap();
    let token2 = json2["token"].as_str().unwrap().to_owned();
    assert_ne!(token, token2);
    assert!(SystemTime::now() < expires, "refreshed before the assumed expiry");
    assert_eq!(w.server.check_token(&token2).as_deref(), Some(ALICE.1));
    d.assert_secrets_hidden(&secrets(&[ALICE.2, &token, &token2])).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// Two Magentos whose clocks are an hour ahead and an hour behind: every token the daemon
/// writes is alive when read, refreshes come on time, and a restart reading a raw file does not
/// take the token's `exp` at the store's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_of_an_hour_either_way_is_survived() {
    let lifetime = 10 * SEC;
    let ahead =
        World::new(DevServerOptions { token_lifetime: lifetime, clock_offset_secs: 3600, ..Default::default() }).await;
    let behind =
        DevServer::start(DevServerOptions { token_lifetime: lifetime, clock_offset_secs: -3600, ..Default::default() })
            .await
            .unwrap();
    let w = ahead;
    w.server.add_customer(ALICE.1, ALICE.2);
    behind.add_customer(BOB.1, BOB.2);
    w.set_password("alice", ALICE.2);
    w.set_password("bob", BOB.2);
    let extra = format!("    base_url: {}\n", behind.base_url());
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)],
        Knobs { refresh: "  before_expiry: 5s\n  jitter: 0s\n", extra: &extra, ..Knobs::default() },
    ));
    let server_of = |name: &str| if name == "alice" { &w.server } else { &behind };
    let mut d = w.start();
    let mut seen: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let mut reads = 0;
    // Watch for 13 s at least: more than a lifetime, so every token must have been replaced in
    // time; and on until both have shown three tokens (two refreshes each, 5 s apart at least):
    // a busy machine that delays the start or a refresh makes the watch longer, not the test
    // fail. 30 s is three lifetimes.
    let start = Instant::now();
    while start.elapsed() < 13 * SEC || seen.iter().any(|s| s.len() < 3) {
        assert!(start.elapsed() < 30 * SEC, "tokens seen in 30 s: alice {}, bob {}", seen[0].len(), seen[1].len());
        for (i, name) in ["alice", "bob"].into_iter().enumerate() {
            let Some(token) = w.read_token(name) else {
                assert!(start.elapsed() < 10 * SEC, "{name} has no token");
                continue;
            };
            reads += 1;
            assert!(
                server_of(name).check_token(&token).is_some(),
                "{name}: a dead token on disk after {:?}",
                start.elapsed()
            );
            if seen[i].last() != Some(&token) {
                seen[i].push(token);
            }
        }
        tokio::time::sleep(ms(50)).await;
    }
    for (i, name) in ["alice", "bob"].into_iter().enumerate() {
        assert!(seen[i].len() >= 3, "{name}: {} tokens of 10 s", seen[i].len());
        // The expiry the daemon reports is ours, not the store's clock.
        let expiry = d.metric(&series("magento_token_expiry_timestamp_seconds", name)).await.unwrap();
        let left = expiry - now_f64();
        assert!((0.0..=11.0).contains(&left), "{name}: the token is said to expire in {left} s");
    }
    assert!(d.logs().contains("Magento's clock and ours differ"), "the skew is reported");
    let all: Vec<&str> = [ALICE.2, BOB.2].into_iter().chain(seen.iter().flatten().map(String::as_str)).collect();
    d.assert_secrets_hidden(&secrets(&all)).await;
    assert_eq!(d.stop().await.code(), Some(0));

    // A restart finds alice's raw file, whose exp says "an hour from now" by the store's clock.
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;
    wait_for(10 * SEC, "alice's expiry", || async {
        d.metric(&series("magento_token_expiry_timestamp_seconds", "alice")).await.filter(|v| *v > 0.0)
    })
    .await;
    let expiry = d.metric(&series("magento_token_expiry_timestamp_seconds", "alice")).await.unwrap();
    let next = d.metric(&series("magento_token_next_refresh_timestamp_seconds", "alice")).await.unwrap();
    let now = now_f64();
    assert!(expiry - now <= 11.0, "after a restart alice's token is believed to live {} s more", expiry - now);
    assert!(next - now <= 11.0, "after a restart alice's next refresh is {} s away", next - now);
    assert_eq!(d.stop().await.code(), Some(0));
    eprintln!(
        "clock skew: {reads} reads, every one accepted; tokens seen: alice {}, bob {}",
        seen[0].len(),
        seen[1].len()
    );
}

/// `before_expiry` near the lifetime (tokens of 3 s, refresh 2.9 s before expiry): logins stay
/// at least `MIN_LOGIN_INTERVAL` (5 s) apart instead of looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_login_loop_when_before_expiry_is_near_the_lifetime() {
    let w = World::new(DevServerOptions { token_lifetime: 3 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1)],
        Knobs { refresh: "  before_expiry: 2900ms\n  jitter: 0s\n", ..Knobs::default() },
    ));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    tokio::time::sleep(11 * SEC).await;
    let logins = token_requests(&w.server);
    let spacing = gaps(&logins);
    eprintln!("short tokens: {} logins in about 11 s, {:?} apart", logins.len(), spacing);
    assert!((2..=4).contains(&logins.len()), "{} logins in about 11 s", logins.len());
    for gap in spacing {
        assert!(gap >= ms(4900), "two logins {gap:?} apart");
    }
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 6. Disk

/// Waits until `series` exceeds `above`; returns its value.
async fn metric_above(d: &Daemon, series: &str, above: f64, limit: Duration) -> f64 {
    wait_for(limit, &format!("{series} > {above}"), || async { d.metric(series).await.filter(|v| *v > above) }).await
}

/// Temporary files left behind: a name seen in two listings 100 ms apart (a write in progress
/// leaves its temporary file for microseconds, under a random name).
async fn lasting_temporaries(dir: &Path) -> Vec<String> {
    let first = temporaries_in(dir);
    tokio::time::sleep(ms(100)).await;
    let second = temporaries_in(dir);
    first.into_iter().filter(|n| second.contains(n)).collect()
}

/// A disk that refuses writes, in every way the test can make one: full (a small tmpfs), read
/// only (the tmpfs remounted), the token path a directory, the output directory gone. Each is a
/// `write_error`, leaves no temporary file, spares the old token and the other customer where it
/// can, and heals without a new login once the disk is fixed (the token obtained is kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_faults_are_write_errors_that_heal() {
    let w = World::new(DevServerOptions { token_lifetime: 10 * SEC, ..Default::default() }).await;
    for (name, email, password) in [ALICE, BOB] {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    // The token directory on a tmpfs of 64 KiB where mounting is allowed (root, as in CI).
    let mount_point = w.dir.path().join("fs");
    let tmpfs = Tmpfs::mount(&mount_point, "64k");
    if tmpfs.is_none() {
        eprintln!("disk faults: cannot mount a tmpfs here: the full and read-only disk cases are skipped");
        std::fs::create_dir_all(&mount_point).unwrap();
    }
    let tokens = mount_point.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let text = config(
        &w,
        &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)],
        Knobs { max_backoff: "500ms", refresh: "  before_expiry: 5s\n  jitter: 0s\n", ..Knobs::default() },
    )
    .replace(&format!("dir: {}", w.tokens().display()), &format!("dir: {}", tokens.display()));
    w.write_config(&text);
    let file = |name: &str| std::fs::read_to_string(tokens.join(name)).ok();
    let write_errors = |name: &str| refreshes(name, "write_error");
    let mut all_tokens = Vec::new();
    let mut recoveries = Vec::new();

    // Full: a filler takes every block before the start (an empty file still fits: the start-up
    // check that the directory is writable passes, as it would on a real full disk).
    let mut d;
    if tmpfs.is_some() {
        let filler = mount_point.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 4096];
            while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
        }
        d = w.start();
        for name in ["alice", "bob"] {
            metric_above(&d, &write_errors(name), 1.0, 10 * SEC).await;
            assert_eq!(file(name), None, "{name}: nothing written on a full disk");
        }
        assert!(lasting_temporaries(&tokens).await.is_empty(), "a temporary file stays on the full disk");
        assert!(d.logs().contains("No space left on device"), "the log says why");
        assert_eq!(d.status_of("alice").await["last_error"]["class"], "write_error");
        let (ready, _) = d.get("/readyz").await.unwrap();
        assert_eq!(ready, 503, "not ready without a token on disk");
        let freed = Instant::now();
        std::fs::remove_file(&filler).unwrap();
        for (name, email, _) in [ALICE, BOB] {
            let token = wait_for(5 * SEC, "a token once space is freed", || async { file(name) }).await;
            assert_eq!(w.server.check_token(&token).as_deref(), Some(email));
            assert_eq!(w.server.login_attempts(email), 1, "{name}: the token obtained was kept, not fetched again");
            all_tokens.push(token);
        }
        recoveries.push(("disk full", freed.elapsed()));
        d.wait_ready(5 * SEC).await;
    } else {
        d = w.start();
        d.wait_ready(10 * SEC).await;
    }

    // Read only: the next refresh (every 5 s) cannot write; the old tokens stay.
    if let Some(fs) = &tmpfs {
        let before = (file("alice").unwrap(), file("bob").unwrap());
        let errors = d.metric(&write_errors("alice")).await.unwrap();
        fs.remount("ro");
        metric_above(&d, &write_errors("alice"), errors, 10 * SEC).await;
        assert_eq!((file("alice").unwrap(), file("bob").unwrap()), before, "the old tokens stay");
        assert!(d.logs().contains("Read-only file system"), "the log says why");
        let logins = w.server.login_attempts(ALICE.1);
        let fixed = Instant::now();
        fs.remount("rw");
        let token =
            wait_for(5 * SEC, "alice's token once writable", || async { file("alice").filter(|t| *t != before.0) })
                .await;
        recoveries.push(("read-only", fixed.elapsed()));
        assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
        assert_eq!(w.server.login_attempts(ALICE.1), logins, "the token obtained was kept, not fetched again");
        all_tokens.push(token);
        assert!(lasting_temporaries(&tokens).await.is_empty());
    }

    // alice's token path is a directory: only alice fails; bob goes on.
    let alice_errors = d.metric(&write_errors("alice")).await.unwrap();
    let bob_successes = d.metric(&refreshes("bob", "success")).await.unwrap();
    let bob_errors = d.metric(&write_errors("bob")).await.unwrap();
    std::fs::remove_file(tokens.join("alice")).unwrap();
    std::fs::create_dir(tokens.join("alice")).unwrap();
    metric_above(&d, &write_errors("alice"), alice_errors, 10 * SEC).await;
    metric_above(&d, &refreshes("bob", "success"), bob_successes, 10 * SEC).await;
    assert_eq!(d.metric(&write_errors("bob")).await, Some(bob_errors), "bob is not affected");
    let fixed = Instant::now();
    std::fs::remove_dir(tokens.join("alice")).unwrap();
    let token = wait_for(5 * SEC, "alice's file again", || async { file("alice") }).await;
    recoveries.push(("token path a directory", fixed.elapsed()));
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    all_tokens.push(token);

    // The directory gone (moved away), then back.
    let moved = mount_point.join("tokens.gone");
    let errors = d.metric(&write_errors("bob")).await.unwrap();
    std::fs::rename(&tokens, &moved).unwrap();
    metric_above(&d, &write_errors("bob"), errors, 10 * SEC).await;
    let fixed = Instant::now();
    std::fs::rename(&moved, &tokens).unwrap();
    let before = std::fs::read_to_string(tokens.join("bob")).unwrap();
    let token =
        wait_for(5 * SEC, "bob's token in the directory again", || async { file("bob").filter(|t| *t != before) })
            .await;
    recoveries.push(("output directory gone", fixed.elapsed()));
    assert_eq!(w.server.check_token(&token).as_deref(), Some(BOB.1));
    all_tokens.push(token);

    let all: Vec<&str> = [ALICE.2, BOB.2].into_iter().chain(all_tokens.iter().map(String::as_str)).collect();
    d.assert_secrets_hidden(&secrets(&all)).await;
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(temporaries_in(&tokens).is_empty(), "{:?}", temporaries_in(&tokens));
    eprintln!("disk faults: new token written after the fix: {recoveries:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Process faults

/// Killed at random moments (30 times) while eight customers log in and write: every file is
/// absent or a whole token Magento accepts, never a partial one; the next clean start sweeps
/// away whatever temporary file a kill left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_leaves_a_partial_token() {
    use rand::Rng;
    let w = World::new(DevServerOptions { token_lifetime: 60 * SEC, ..Default::default() }).await;
    let customers: Vec<(String, String)> = (0..8).map(|i| (format!("c{i}"), format!("c{i}@example.com"))).collect();
    for (name, email) in &customers {
        w.server.add_customer(email, "kill-test-Pa55");
        w.set_password(name, "kill-test-Pa55");
    }
    let pairs: Vec<(&str, &str)> = customers.iter().map(|(n, e)| (n.as_str(), e.as_str())).collect();
    // before_expiry above the lifetime: every start logs every customer in and writes its file.
    w.write_config(&config(&w, &pairs, Knobs { refresh: "  before_expiry: 90s\n  jitter: 0s\n", ..Knobs::default() }));
    let read_all = || customers.iter().map(|(name, _)| w.read_token(name)).collect::<Vec<_>>();
    // How long a start takes to write all eight files: the kills aim around that moment.
    let mut d = w.start();
    let started = Instant::now();
    wait_for(15 * SEC, "the first files", || async { read_all().iter().all(Option::is_some).then_some(()) }).await;
    let mut window = started.elapsed().as_millis() as u64;
    d.signal("KILL");
    d.wait_exit(10 * SEC).await;
    let mut rng = rand::thread_rng();
    let (mut whole, mut absent, mut leftovers, mut mid_batch) = (0, 0, 0, 0);
    let first_window = window;
    let mut tokens = Vec::new();
    for round in 0..30 {
        if round % 3 == 0 {
            // Now and then from nothing, so a kill may also come before a first write.
            for (name, _) in &customers {
                let _ = std::fs::remove_file(w.token_path(name));
            }
        }
        let before = read_all();
        let mut d = w.start();
        tokio::time::sleep(ms(rng.gen_range(window / 3..window * 3 / 2 + 5))).await;
        d.signal("KILL");
        d.wait_exit(10 * SEC).await;
        let after = read_all();
        let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        if changed > 0 && changed < customers.len() {
            mid_batch += 1;
        }
        // Keep aiming at the writes when the machine's pace changes: a start measured while it
        // was idle is outrun by every start once a build runs beside the tests (and the other
        // way round), and kills that all come before the first write prove nothing. A kill
        // before any write widens the window, one after all of them narrows it.
        if changed == 0 {
            window = (window * 3 / 2).min(10_000);
        } else if changed == customers.len() {
            window = (window * 4 / 5).max(10);
        }
        for (name, email) in &customers {
            match std::fs::read_to_string(w.token_path(name)) {
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{name}");
                    absent += 1;
                }
                Ok(token) => {
                    assert!(w.server.issued(&token), "round {round}: {name}'s file holds a token cut short or spliced");
                    assert_eq!(w.server.check_token(&token).as_deref(), Some(email.as_str()), "round {round}: {name}");
                    assert_eq!(mode_of(&w.token_path(name)), 0o600);
                    whole += 1;
                    tokens.push(token);
                }
            }
        }
        leftovers += w.temporaries().len();
    }
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let names: Vec<&str> = customers.iter().map(|(n, _)| n.as_str()).collect();
    // A worker whose killed predecessor left a token it does not adopt may be writing a new one
    // right now: only what kills left must be gone, so wait for writes in flight to land.
    wait_for(10 * SEC, "a clean start to remove what kills left", || async {
        w.stray_files(&names).is_empty().then_some(())
    })
    .await;
    tokens.sort();
    tokens.dedup();
    tokens.truncate(40);
    let mut hidden = secrets(&["kill-test-Pa55"]);
    hidden.extend(tokens);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
    eprintln!(
        "sigkill: 30 kills x 8 files (a start writes them within {first_window} ms, {window} ms at the end): {whole} whole tokens, {absent} absent, 0 partial; {mid_batch} kills landed between two customers' writes; {leftovers} temporary files left by kills, all swept at the next start"
    );
    assert!(whole > 0, "no kill came after a write: the test proved nothing");
}

/// SIGTERM while a login is in flight: the login finishes, its token is written, exit 0. With a
/// login that never ends, the stop still comes after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_login_finishes_it_and_exits_zero() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.push_fault(Fault::Delay(ms(1500)));
    w.write_config(&config(&w, &[(ALICE.0, ALICE.1)], Knobs::default()));
    let mut d = w.start();
    wait_for(10 * SEC, "the login to arrive", || async { (w.server.login_attempts(ALICE.1) == 1).then_some(()) }).await;
    d.signal("TERM");
    assert_eq!(d.wait_exit(15 * SEC).await.code(), Some(0));
    let token = w.read_token("alice").expect("the login in flight was finished and written");
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 1);
    assert!(w.stray_files(&["alice"]).is_empty());
    assert_hidden("the logs", &d.logs(), &secrets(&[ALICE.2, &token]));

    // A login that hangs: the stop waits for the timeout (2 s), not forever.
    std::fs::remove_file(w.token_path("alice")).unwrap();
    w.server.push_fault(Fault::Hang);
    let mut d = w.start();
    wait_for(10 * SEC, "the hanging login", || async { (w.server.login_attempts(ALICE.1) == 2).then_some(()) }).await;
    d.signal("TERM");
    assert_eq!(d.wait_exit(15 * SEC).await.code(), Some(0));
    assert_eq!(w.read_token("alice"), None);
    assert!(w.stray_files(&[]).is_empty());
}

/// SIGHUP while a login is in flight: with the same configuration nothing is disturbed; with a
/// changed one the login still finishes and the restarted worker adopts its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_a_login_loses_nothing() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.push_fault(Fault::Delay(ms(1500)));
    let same = config(&w, &[(ALICE.0, ALICE.1)], Knobs::default());
    w.write_config(&same);
    let mut d = w.start();
    wait_for(10 * SEC, "the login to arrive", || async { (w.server.login_attempts(ALICE.1) == 1).then_some(()) }).await;
    d.signal("HUP");
    let first = w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 5 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 1);

    // A changed refresh setting restarts every worker: here while alice's second login is in
    // flight (a new start with a token due, as below).
    assert_eq!(d.stop().await.code(), Some(0));
    w.server.push_fault(Fault::Delay(ms(1500)));
    let due =
        config(&w, &[(ALICE.0, ALICE.1)], Knobs { refresh: "  before_expiry: 2h\n  jitter: 0s\n", ..Knobs::default() });
    w.write_config(&due);
    let mut d = w.start();
    wait_for(10 * SEC, "the second login", || async { (w.server.login_attempts(ALICE.1) == 2).then_some(()) }).await;
    w.write_config(&due.replace("  jitter: 0s\n", "  jitter: 1s\n"));
    d.signal("HUP");
    let second = w.wait_token("alice", Some(&first), 10 * SEC).await;
    assert_eq!(w.server.check_token(&second).as_deref(), Some(ALICE.1));
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 10 * SEC).await;
    // The restarted worker found a fresh token (due, so it logs in: before_expiry is 2 h) but
    // never two at once, and never a file half written.
    wait_for(10 * SEC, "the worker to settle", || async {
        let s = d.status_of("alice").await;
        (s["state"] == "fresh").then_some(())
    })
    .await;
    let logins = w.server.login_attempts(ALICE.1);
    assert!((2..=3).contains(&logins), "{logins} logins");
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(w.stray_files(&["alice"]).is_empty());
    assert_hidden("the logs", &d.logs(), &secrets(&[ALICE.2, &first, &second]));
}

// ---------------------------------------------------------------------------------------------
// 8. Readers

/// Not a test of its own: the body of the reader process that
/// `readers_never_see_a_bad_token` starts (this test binary again, running this test alone, with
/// `MTS_READER_FILE` set). Without that variable it returns at once.
#[test]
fn reader_process() {
    let Ok(path) = std::env::var("MTS_READER_FILE") else { return };
    let secs: u64 = std::env::var("MTS_READER_SECS").unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut reads, mut missing, mut empty, mut malformed, mut expired) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut distinct: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing += 1;
                continue;
            }
            Err(e) => panic!("reading the token file: {e}"),
        };
        reads += 1;
        if bytes.is_empty() {
            empty += 1;
            continue;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            malformed += 1;
            continue;
        };
        let Some(times) = magento_token_sidecar::token::jwt_times(&text)
            .filter(|_| magento_token_sidecar::token::check_form(&text).is_ok())
        else {
            malformed += 1;
            continue;
        };
        if times.exp <= unix_now() {
            expired += 1;
        }
        if distinct.last() != Some(&text) && !distinct.contains(&text) {
            distinct.push(text);
        }
        // Tight, but leaving the cores to the daemon and the tests running beside this one.
        std::thread::sleep(Duration::from_micros(50));
    }
    // On a line of its own: libtest has written "test faults::reader_process ... " before.
    println!();
    println!("READER reads={reads} missing={missing} empty={empty} malformed={malformed} expired={expired}");
    for t in distinct {
        println!("READER-TOKEN {t}");
    }
}

/// A reader process reads the file in a tight loop while tokens rotate every 5 s, and an app-like
/// reader calls customers/me with what it read: not one empty, partial or expired read, not one
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_bad_token() {
    const RUN: u64 = 14;
    // Tokens of 10 s, replaced 5 s after each login (MIN_LOGIN_INTERVAL; before_expiry 5 s):
    // a token on disk has at least 4 s left (its exp is cut to the second) when its successor
    // is due, for the login and the write on a busy machine. 8 s tokens left 2.
    let w = World::new(DevServerOptions { token_lifetime: 10 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.write_config(&config(
        &w,
        &[(ALICE.0, ALICE.1)],
        Knobs { refresh: "  before_expiry: 5s\n  jitter: 0s\n", ..Knobs::default() },
    ));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    // libtest names a test by its path within the test binary: `faults::reader_process`.
    let reader_test = format!("{}::reader_process", module_path!().split_once("::").unwrap().1);
    let reader = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &reader_test, "--nocapture", "--test-threads", "1"])
        .env("MTS_READER_FILE", w.token_path("alice"))
        .env("MTS_READER_SECS", RUN.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The app: read the file, call customers/me with it, again and again.
    let app = reqwest::Client::builder().no_proxy().build().unwrap();
    let me = format!("{}/rest/V1/customers/me", w.server.base_url());
    let (mut calls, mut refused) = (0u64, 0u64);
    let mut app_tokens: Vec<String> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(RUN) {
        let token = w.read_token("alice").expect("the file is always there");
        let status = app.get(&me).bearer_auth(&token).send().await.unwrap().status();
        calls += 1;
        if status != 200 {
            refused += 1;
        }
        if app_tokens.last() != Some(&token) {
            app_tokens.push(token);
        }
        tokio::time::sleep(ms(1)).await;
    }
    let out = tokio::task::spawn_blocking(move || reader.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "the reader process failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary = stdout.lines().find(|l| l.starts_with("READER ")).expect("the reader's summary");
    let count = |key: &str| -> u64 {
        summary.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok()).unwrap()
    };
    let read_tokens: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("READER-TOKEN ")).collect();
    eprintln!(
        "readers: {summary}; {} distinct tokens; app: {calls} customers/me calls, {refused} refused, {} tokens",
        read_tokens.len(),
        app_tokens.len()
    );
    assert!(count("reads") >= 1000, "{summary}");
    for key in ["missing", "empty", "malformed", "expired"] {
        assert_eq!(count(key), 0, "{key} reads: {summary}");
    }
    for t in &read_tokens {
        assert!(w.server.issued(t), "the reader saw a token Magento never issued");
    }
    assert!(
        read_tokens.len() >= 3 && app_tokens.len() >= 3,
        "tokens rotated: {} / {}",
        read_tokens.len(),
        app_tokens.len()
    );
    assert!(calls >= 1000, "{calls} calls");
    assert_eq!(refused, 0, "{refused} of {calls} calls were refused");
    let mut hidden = secrets(&[ALICE.2]);
    hidden.extend(app_tokens);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
}
