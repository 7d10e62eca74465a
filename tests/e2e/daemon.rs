//! The daemon end to end: the real binary against the dev server on loopback, judged by what a
//! user sees (token files, what Magento received, metrics, exit codes, logs).

use std::time::Duration;

use crate::common::*;
use magento_devserver::{DevServerOptions, Fault};

const SEC: Duration = Duration::from_secs(1);

async fn run_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || run_to_end(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_tokens_are_written_whole_private_and_accepted() {
    let carol = ("carol", "carol@example.com", "carol-pw");
    let w = World::with_customers(&[ALICE, BOB, carol]).await;
    let extra = format!(
        "  - name: carol\n    username: {}\n    password_file: {}\n    file: carol.token\n",
        carol.1,
        w.secret_path("carol").display()
    );
    w.write_config(
        &w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", &extra).replace("  dir:", "  format: raw\n  dir:"),
    );
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;

    let alice = w.read_token("alice").unwrap();
    assert!(!alice.ends_with('\n') && !alice.is_empty());
    assert_eq!(w.server.check_token(&alice).as_deref(), Some(ALICE.1), "Magento accepts alice's token");
    assert_eq!(w.server.check_token(&w.read_token("bob").unwrap()).as_deref(), Some(BOB.1));
    for file in ["alice", "bob", "carol.token"] {
        assert_eq!(mode_of(&w.token_path(file)), 0o600, "{file}");
    }
    // `file:` overrides the file name.
    assert_eq!(w.server.check_token(&w.read_token("carol.token").unwrap()).as_deref(), Some(carol.1));

    // What Magento received: one login each, JSON both ways, our User-Agent.
    let logins: Vec<_> = w.server.requests().into_iter().filter(|r| r.path.ends_with("/customer/token")).collect();
    assert_eq!(logins.len(), 3, "{logins:?}");
    for r in &logins {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/rest/V1/integration/customer/token");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.accept.as_deref(), Some("application/json"));
        assert!(r.user_agent.as_deref().unwrap_or("").starts_with("magento-token-sidecar/"), "{:?}", r.user_agent);
    }
    assert_eq!(
        logins.iter().filter(|r| r.password.as_deref() == Some(ALICE.2)).count(),
        1,
        "password sent without its newline"
    );

    assert_eq!(d.get("/healthz").await, Some((200, "ok".to_string())));
    assert_eq!(d.metric(&refreshes("alice", "success")).await, Some(1.0));
    assert_eq!(d.metric(&series("magento_token_valid", "alice")).await, Some(1.0));
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(0.0));
    let expiry = d.metric(&series("magento_token_expiry_timestamp_seconds", "alice")).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((expiry - now - 3600.0).abs() < 10.0, "expiry {expiry} now {now}");

    let (status, body) = d.get("/status").await.unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let customers = json["customers"].as_array().unwrap();
    assert_eq!(customers.len(), 3);
    assert_eq!(customers[0]["name"], "alice");
    assert_eq!(customers[0]["state"], "fresh");
    assert!(customers[0]["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(!body.contains(&alice) && !body.contains(ALICE.2), "no secret in /status");

    assert_eq!(d.stop().await.code(), Some(0));
    assert!(w.stray_files(&["alice", "bob", "carol.token"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_carries_times() {
    let w = World::with_customers(&[ALICE]).await;
    w.write_config(
        &w.config_text(&[(ALICE.0, ALICE.1)], "", "").replace("  dir:", "  format: json\n  mode: \"0640\"\n  dir:"),
    );
    let mut d = w.start();
    let text = w.wait_token("alice", None, 10 * SEC).await;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["customer"], "alice");
    assert_eq!(w.server.check_token(json["token"].as_str().unwrap()).as_deref(), Some(ALICE.1));
    let obtained = humantime::parse_rfc3339(json["obtained_at"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    // The token's exp (its iat, the second Magento made it, plus an hour) against the second
    // the request started: an hour, and a second more when the request crossed into the next
    // second, which a busy machine makes likely (up to two: a request that took over a second).
    let life = expires.duration_since(obtained).unwrap().as_secs();
    assert!((3600..=3602).contains(&life), "expires_at {life} s after obtained_at");
    assert_eq!(mode_of(&w.token_path("alice")), 0o640);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire() {
    // Tokens of 12 s refreshed 4 s (plus up to 1 s of jitter) before their exp: 4 s at least
    // for a busy machine to log in and write before a token on disk dies. (8 s tokens with
    // before_expiry 3 s were refreshed by MIN_LOGIN_INTERVAL, 5 s after each login: 2 s.)
    let w = World::new(DevServerOptions { token_lifetime: 12 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  before_expiry: 4s\n  jitter: 1s\n", ""));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    let mut seen = vec![first];
    // Watch two refreshes: every token read must be accepted by Magento when read.
    let start = std::time::Instant::now();
    while seen.len() < 3 {
        assert!(start.elapsed() < 30 * SEC, "no refresh within 30 s: {} tokens", seen.len());
        let now = w.read_token("alice").expect("the file never disappears");
        assert!(w.server.check_token(&now).is_some(), "a token on disk was dead");
        if now != *seen.last().unwrap() {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not too early either: each login more than 12 - 4 - 1 (jitter) - 1 (exp is cut to the
    // second) = 6 s after the one before, as the dev server saw them arrive (0.1 s for the
    // daemon's sleep against the server's wall clock). A late machine only makes them later.
    let logins = token_requests(&w.server);
    assert_eq!(logins.len(), 3, "{logins:?}");
    for gap in gaps(&logins) {
        assert!(gap >= Duration::from_millis(5900), "refreshed too often: logins {gap:?} apart");
    }
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_recovered() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.push_fault(Fault::html(503));
    w.server.push_fault(Fault::Reset);
    w.server.push_fault(Fault::status(500));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 15 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 4, "three failures, then one success");
    d.wait_metric(&refreshes("alice", "success"), 1.0, 5 * SEC).await;
    assert_eq!(d.metric(&refreshes("alice", "http_error")).await, Some(2.0));
    assert_eq!(d.metric(&refreshes("alice", "network_error")).await, Some(1.0));
    assert_eq!(d.metric(&series("magento_token_consecutive_failures", "alice")).await, Some(0.0));
    let logs = d.logs();
    assert!(logs.contains("a text/html answer, not Magento's JSON"), "{logs}");
    assert!(logs.contains("Internal Error. Details are available in Magento log file."), "{logs}");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A wrong password: 401s come slowly (1 s, then 2 s here, scaled down from 1 and 5 minutes),
/// the customer pauses after 3, and Magento's lock (6 in its window) is never reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_bounded_and_never_lock_the_account() {
    let w = World::new(DevServerOptions { lock_timeout: 3 * SEC, ..Default::default() }).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", "not-the-password");
    // A store whose cron runs: the daemon may count on Magento's window.
    let refresh = "  max_auth_failures: 3\n  auth_failure_delays: [1s, 2s]\n  lockout_window: 3s\n  auth_failure_pause: 4s\n  lockout_reset: window\n";
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, ""));
    let mut d = w.start();
    let start = std::time::Instant::now();
    let mut max_failures = 0;
    let mut seen_paused = false;
    while start.elapsed() < 12 * SEC {
        if !seen_paused && w.server.login_attempts(ALICE.1) == 3 {
            // After the third 401 in a row the customer pauses, and the metric says so.
            d.wait_metric(&series("magento_token_paused", "alice"), 1.0, 2 * SEC).await;
            seen_paused = true;
        }
        assert!(!w.server.is_locked(ALICE.1), "Magento locked the account");
        max_failures = max_failures.max(w.server.failures(ALICE.1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Attempts at 0, 1 s, 3 s, then one per 4 s pause: 7 s, 11 s.
    let attempts = w.server.login_attempts(ALICE.1);
    assert!((4..=5).contains(&attempts), "{attempts} attempts in 12 s");
    assert!(max_failures <= 3, "Magento counted {max_failures} failures in a row");
    assert!(seen_paused);
    // The fifth attempt comes about 11 s after the first: it may have reached Magento and not
    // yet the daemon's count when the 12 s end; the sixth is 4 s later. Every 401 is counted.
    wait_for(5 * SEC, "every 401 counted", || async {
        let counted = d.metric(&refreshes("alice", "auth_failure")).await?;
        (counted == w.server.login_attempts(ALICE.1) as f64).then_some(())
    })
    .await;
    let (_, status) = d.get("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["customers"][0]["last_error"]["class"], "auth_failure");
    assert!(w.read_token("alice").is_none());
    assert_eq!(d.get("/readyz").await, Some((503, "no valid token yet: alice".to_string())));
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_password_file_is_tried_at_once() {
    let w = World::with_customers(&[ALICE]).await;
    w.set_password("alice", "typo");
    // Default waits: the next try with the same password would be a minute away.
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    wait_for(10 * SEC, "the first 401", || async { (w.server.login_attempts(ALICE.1) == 1).then_some(()) }).await;
    d.wait_metric(&refreshes("alice", "auth_failure"), 1.0, 5 * SEC).await;
    // Kubernetes swaps a Secret's files through a symlink: replace the file by a rename.
    let fixed = w.dir.path().join("secrets/.alice.new");
    std::fs::write(&fixed, format!("{}\n", ALICE.2)).unwrap();
    std::fs::rename(&fixed, w.secret_path("alice")).unwrap();
    // Within the password poll (2 s) and a login; the limit leaves a busy machine time and is
    // still far below the minute the same password would wait.
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 2);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_on_disk_is_adopted_on_restart() {
    let w = World::with_customers(&[ALICE]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
    let mut d = w.start();
    // Ready at once: the file on disk is unexpired before anyone asks Magento.
    d.wait_ready(10 * SEC).await;
    wait_for(10 * SEC, "the adoption", || async { d.logs().contains("adopted the token on disk").then_some(()) }).await;
    d.wait_metric(&series("magento_token_valid", "alice"), 1.0, 5 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "no second login");
    assert_eq!(w.read_token("alice").unwrap(), token);
    let me = w.server.requests().into_iter().filter(|r| r.path.ends_with("/customers/me")).count();
    assert_eq!(me, 1, "the token was checked with customers/me");
    // A revoked token is not adopted: the next start logs in.
    assert_eq!(d.stop().await.code(), Some(0));
    w.server.revoke(ALICE.1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut d = w.start();
    let fresh = w.wait_token("alice", Some(&token), 10 * SEC).await;
    assert_eq!(w.server.check_token(&fresh).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 2);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_leaves_no_temporary_file() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    // A temporary file a killed predecessor left behind is cleaned up at start.
    std::fs::write(w.token_path(".alice.AbC123.tmp"), "partial").unwrap();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;
    let status = d.stop().await;
    assert_eq!(status.code(), Some(0));
    assert!(w.stray_files(&["alice", "bob"]).is_empty(), "{:?}", w.stray_files(&["alice", "bob"]));
    assert!(d.logs().contains("SIGTERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_removes_and_keeps_customers() {
    let carol = ("carol", "carol@example.com", "carol-pw");
    let w = World::with_customers(&[ALICE, BOB, carol]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;
    let alice = w.read_token("alice").unwrap();

    // Bob goes, carol comes, alice stays untouched.
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (carol.0, carol.1)], "", ""));
    d.signal("HUP");
    w.wait_token("carol", None, 10 * SEC).await;
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 5 * SEC).await;
    let (_, metrics) = d.get("/metrics").await.unwrap();
    assert!(!metrics.contains("customer=\"bob\""), "bob's series are gone");
    assert!(w.read_token("bob").is_some(), "bob's file stays");
    assert_eq!(w.read_token("alice").unwrap(), alice);
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "alice was not disturbed");

    // A broken file is refused, counted, and changes nothing.
    w.write_config("magento: {base_url: nope}\n");
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"failure\"}", 1.0, 5 * SEC).await;
    assert_eq!(d.metric(&series("magento_token_valid", "carol")).await, Some(1.0));
    assert!(d.logs().contains("configuration reload failed"));
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_and_check_exit_codes() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    let config = w.config_path().to_str().unwrap().to_owned();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));

    let (code, out, err) = run_async(vec!["check".into(), "--config".into(), config.clone()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (2 customers"), "{out}");
    assert!(w.server.requests().is_empty(), "check makes no request");

    let (code, _, err) = run_async(vec!["once".into(), "--config".into(), config.clone()]).await;
    assert_eq!(code, 0, "{err}");
    for (name, email, _) in [ALICE, BOB] {
        assert_eq!(w.server.check_token(&w.read_token(name).unwrap()).as_deref(), Some(email));
    }

    // One wrong password: exit 1, tried once only, the other customer's file written.
    w.set_password("bob", "wrong");
    std::fs::remove_file(w.token_path("alice")).unwrap();
    let (code, _, err) =
        run_async(vec!["once".into(), "--config".into(), config.clone(), "--timeout".into(), "5s".into()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("auth_failure"), "{err}");
    assert!(w.read_token("alice").is_some());
    assert_eq!(w.server.login_attempts(BOB.1), 2, "one try in the first run, one in this");

    // Run again at once, as the kubelet restarts a failed init container: the recorded 401 holds
    // bob back (no request at all), alice is logged in again.
    let (code, _, err) = run_async(vec!["once".into(), "--config".into(), config.clone()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("held_back") && err.contains("refused this customer 1 time(s)"), "{err}");
    assert_eq!(w.server.login_attempts(BOB.1), 2, "no login while held back");
    assert_eq!(w.server.login_attempts(ALICE.1), 3);

    // A password file gone: check and once both exit 2 naming the key.
    std::fs::remove_file(w.secret_path("bob")).unwrap();
    for command in ["check", "once", "run"] {
        let (code, _, err) = run_async(vec![command.into(), "--config".into(), config.clone()]).await;
        assert_eq!(code, 2, "{command}: {err}");
        assert!(err.contains("customers[1].password_file: no such file"), "{command}: {err}");
    }

    // The config may come from the environment.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN).arg("check").env("MAGENTO_TOKEN_SIDECAR_CONFIG", &config).output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_exit_2_naming_the_key() {
    let w = World::with_customers(&[ALICE]).await;
    let good = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    let cases: Vec<(String, &str)> = vec![
        (good.replace("  timeout: 2s", "  timeout: 2s\n  colour: blue"), "magento: unknown field `colour`"),
        (good.replace("  dir:", "  mode: 0600\n  dir:"), "output.mode: "),
        (good.replace("  dir:", "  mode: \"999\"\n  dir:"), "output.mode: "),
        (
            good.replace("  min_backoff: 100ms", "  min_backoff: 10s"),
            "refresh.max_backoff: must be at least refresh.min_backoff",
        ),
        (
            good.replace("refresh:\n", "refresh:\n  jitter: 20m\n"),
            "refresh.jitter: must be less than refresh.before_expiry",
        ),
        (good.replace(&w.server.base_url(), "http://shop.example.com"), "magento.base_url: "),
        (good.replace(&w.server.base_url(), "not a url"), "magento.base_url: "),
        (good.replace("  timeout: 2s", "  timeout: 2s\n  store_code: \"de/../x\""), "magento.store_code: "),
        (good.replace("  - name: alice", "  - name: \"al ice\""), "customers[0].name: "),
        (format!("{good}    file: ../escape\n"), "customers[0].file: "),
        (format!("{good}    password_env: ALSO\n"), "customers[0].password_file: give exactly one"),
        (
            good.replace(&w.tokens().display().to_string(), "/nonexistent/tokens"),
            "output.dir: /nonexistent/tokens: no such directory",
        ),
        (good.replace("  listen: 127.0.0.1", "  listen: x127.0.0.1"), "admin.listen: "),
        (good.replace("level: debug", "level: \"[[\""), "log.level: "),
        (good.replace("  format: json", "  format: xml"), "log.format: unknown variant `xml`"),
        (
            good.replace("refresh:\n", "refresh:\n  max_auth_failures: 6\n"),
            "refresh.max_auth_failures: must be between 1 and 5",
        ),
        ("magento:\n  base_url: [unclosed\n".into(), "line 2 column"),
        (
            good.split("customers:").next().unwrap().to_owned() + "customers: []\n",
            "customers: at least one customer is required",
        ),
        (good.replace("  base_url:", "  base_urls:"), "unknown field `base_urls`"),
    ];
    for (text, expected) in cases {
        w.write_config(&text);
        let (code, _, err) =
            run_async(vec!["check".into(), "--config".into(), w.config_path().display().to_string()]).await;
        assert_eq!(code, 2, "expected exit 2 for {expected:?}\n{err}");
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    }
    // Several problems at once are all listed.
    w.write_config(
        &good.replace("  min_backoff: 100ms", "  min_backoff: 10s").replace("- name: alice", "- name: \"a/b\""),
    );
    let (code, _, err) = run_async(vec!["run".into(), "--config".into(), w.config_path().display().to_string()]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("2 problems") && err.contains("refresh.max_backoff") && err.contains("customers[0].name"),
        "{err}"
    );
    let (code, _, err) = run_async(vec!["run".into(), "--config".into(), "/nonexistent.yaml".into()]).await;
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.yaml") && err.contains("cannot read"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_token_in_any_log_line() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    w.set_password("bob", "bob-wrong-Pa55");
    w.server.push_fault(Fault::html(502));
    w.write_config(
        &w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", "").replace("level: debug", "level: trace"),
    );
    let mut d = w.start();
    let alice = w.wait_token("alice", None, 10 * SEC).await;
    d.wait_metric(&refreshes("bob", "auth_failure"), 1.0, 10 * SEC).await;
    let (_, status) = d.get("/status").await.unwrap();
    let (_, metrics) = d.get("/metrics").await.unwrap();
    assert_eq!(d.stop().await.code(), Some(0));
    let logs = d.logs();
    assert!(logs.lines().count() > 5, "trace logging produced lines:\n{logs}");
    for secret in [ALICE.2, "bob-wrong-Pa55", alice.as_str()] {
        for (place, text) in [("logs", &logs), ("/status", &status), ("/metrics", &metrics)] {
            assert!(!text.contains(secret), "a secret reached {place}");
        }
    }
    // JSON logs, one object per line, one line per login with customer, result and duration.
    let success = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .find(|l| l["result"] == "success")
        .unwrap();
    assert_eq!(success["span"]["customer"], "alice");
    assert!(success["expires_at"].is_string() && success["duration_ms"].is_number(), "{success}");
}

/// A restarted process remembers the 401s of the one before (a crash loop must not walk into
/// Magento's lock), and still tries a corrected password at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_401s_survive_a_restart() {
    let w = World::with_customers(&[ALICE]).await;
    w.set_password("alice", "typo");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  auth_failure_delays: [30s]\n", ""));
    let mut d = w.start();
    wait_for(10 * SEC, "the first 401", || async { (w.server.login_attempts(ALICE.1) == 1).then_some(()) }).await;
    wait_for(5 * SEC, "the ledger", || async { w.token_path(".alice.auth").exists().then_some(()) }).await;
    d.signal("KILL");
    d.wait_exit(5 * SEC).await;

    let d = w.start();
    wait_for(10 * SEC, "the restart", || async { d.logs().contains("remembering the 401s").then_some(()) }).await;
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "no immediate retry of the same password");
    let (_, status) = d.get("/status").await.unwrap();
    assert!(status.contains("auth_backoff"), "{status}");

    w.set_password("alice", ALICE.2);
    // The password poll (2 s), not the 30 s of auth_failure_delays: 10 s leave a busy machine
    // time and still tell them apart.
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 2);
    wait_for(5 * SEC, "the ledger to go", || async { (!w.token_path(".alice.auth").exists()).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_exits_1() {
    let w = World::with_customers(&[ALICE]).await;
    let busy = std::net::TcpListener::bind(("127.0.0.1", w.admin_port)).unwrap();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let status = d.wait_exit(10 * SEC).await;
    assert_eq!(status.code(), Some(1));
    assert!(d.logs().contains("cannot listen on admin.listen"), "{}", d.logs());
    drop(busy);
}

/// A reload that changes only `output.format` and `output.mode` rewrites the same token in the
/// new shape, at once, without a new login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_format_and_mode_rewrites_the_same_token() {
    let w = World::with_customers(&[ALICE]).await;
    let raw = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&raw);
    let mut d = w.start();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(mode_of(&w.token_path("alice")), 0o600);

    w.write_config(&raw.replace("  dir:", "  format: json\n  mode: \"0640\"\n  dir:"));
    d.signal("HUP");
    let json = w.wait_token("alice", Some(&token), 10 * SEC).await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["token"].as_str(), Some(token.as_str()));
    assert_eq!(mode_of(&w.token_path("alice")), 0o640);
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "no new login");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A reload that moves the tokens from `output.dir` to `output.kubernetes` took a lock file in
/// the daemon's working directory (the Secret's empty directory); it is refused naming `output`,
/// and the old configuration runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_switches_the_output_is_refused_and_leaves_no_file() {
    let w = World::with_customers(&[ALICE]).await;
    let text = w.config_text(&[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&text);
    let cwd = w.dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let in_cwd = cwd.clone();
    let mut d = w.start_with(move |c| {
        c.current_dir(in_cwd);
    });
    d.wait_ready(10 * SEC).await;
    let dir_line = format!("  dir: {}\n", w.tokens().display());
    assert!(text.contains(&dir_line), "{text}");
    w.write_config(&text.replace(&dir_line, "  kubernetes:\n    secret: magento-tokens\n"));
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"failure\"}", 1.0, 5 * SEC).await;
    assert!(d
        .logs()
        .contains("output: a change between output.dir and output.kubernetes takes effect at the next start"));
    let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "files left in the working directory: {left:?}");
    assert_eq!(d.metric(&series("magento_token_valid", "alice")).await, Some(1.0));
    assert_eq!(d.stop().await.code(), Some(0));
}
