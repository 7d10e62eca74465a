//! Answers that are not a wrong password, as real stores give them: reCAPTCHA on customer login,
//! an htpasswd front or WAF answering 401, an unconfirmed account, encrypted tokens. Each is
//! named, and none is taken for a wrong password or retried faster than it can change.

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::{DevServerOptions, TokenFormat};

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recaptcha_is_blocked_retried_once_per_max_backoff_and_never_counted() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.set_recaptcha(true);
    // max_backoff is the scaled minute here (config_text sets min 100ms, max 1s).
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let start = Instant::now();
    wait_for(10 * SEC, "the first blocked login", || async { (w.server.login_attempts(ALICE.1) >= 1).then_some(()) })
        .await;
    tokio::time::sleep(6 * SEC).await;
    let attempts = w.server.login_attempts(ALICE.1);
    let elapsed = start.elapsed().as_secs_f64();
    // Never more often than max_backoff (1 s): at most one per second of the run, plus the first.
    assert!(attempts as f64 <= elapsed + 1.0, "{attempts} tries in {elapsed:.1} s");
    assert!(attempts >= 3, "{attempts} tries in {elapsed:.1} s: still retried");
    assert_eq!(w.server.failures(ALICE.1), 0, "reCAPTCHA refusals are not counted");
    let blocked = d.metric(&refreshes("alice", "blocked")).await.unwrap();
    assert!(blocked >= 3.0, "{blocked}");
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(0.0));
    let status = d.status_of("alice").await;
    assert_eq!(status["last_error"]["class"], "blocked", "{status}");
    let message = status["last_error"]["message"].as_str().unwrap();
    for remedy in ["Customer Login", "Magento_ReCaptchaWebapiRest", "integration"] {
        assert!(message.contains(remedy), "the message names {remedy}: {message}");
    }
    eprintln!("reCAPTCHA: {attempts} tries in {elapsed:.1} s with max_backoff 1 s (one per scaled minute)");

    w.server.set_recaptcha(false);
    let token = w.wait_token("alice", None, 5 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_an_htpasswd_front_is_no_wrong_password() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.set_basic_auth(Some(("staging", "letmein")));
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    wait_for(10 * SEC, "three refused logins", || async { (w.server.login_attempts(ALICE.1) >= 3).then_some(()) })
        .await;
    d.wait_metric(&refreshes("alice", "auth_failure"), 0.0, SEC).await;
    let status = d.status_of("alice").await;
    assert_eq!(status["last_error"]["class"], "http_error", "{status}");
    assert!(status["last_error"]["message"].as_str().unwrap().contains("htpasswd front or a WAF"), "{status}");
    assert_ne!(status["state"], "held_back");
    assert_eq!(w.server.failures(ALICE.1), 0);

    w.server.set_basic_auth(None);
    let token = w.wait_token("alice", None, 5 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_account_gets_one_try_until_its_configuration_changes() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.set_confirmed(ALICE.1, false);
    // Short waits: only the refusal for good keeps the same password from being sent again.
    let refresh =
        "  auth_failure_delays: [100ms]\n  lockout_reset: window\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, ""));
    let mut d = w.start();
    wait_for(10 * SEC, "the first try", || async { (w.server.login_attempts(ALICE.1) >= 1).then_some(()) }).await;
    tokio::time::sleep(4 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 1, "one try for an unconfirmed account");
    let status = d.status_of("alice").await;
    assert_eq!(status["state"], "held_back", "{status}");
    assert_eq!(status["last_error"]["class"], "held_back", "{status}");
    // Held back, the reason stays: not a wrong password.
    let said = status["last_error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("not confirmed") && !said.contains("fix the password"), "{status}");
    assert!(d.logs().contains("is not confirmed: confirm it"), "the log says to confirm the account");
    eprintln!("unconfirmed account: 1 try in 4 s of held-back time");

    // Confirmed in Magento; the operator changes the configuration (here: the store code).
    w.server.set_confirmed(ALICE.1, true);
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, "    store_code: default\n"));
    d.signal("HUP");
    let token = w.wait_token("alice", None, 5 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.login_attempts(ALICE.1), 2);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_tokens_live_the_configured_lifetime() {
    // Tokens of 10 s, refreshed about 6 s after each login (10 s - before_expiry 4 s): the
    // store's tokens were 4 s, shorter than MIN_LOGIN_INTERVAL (5 s), so the one on disk was
    // dead for a second before each refresh, and the test's 6 s wait for the second left a busy
    // machine 1 s.
    let w = World::new(DevServerOptions {
        token_format: TokenFormat::Encrypted,
        token_lifetime: 10 * SEC,
        ..Default::default()
    })
    .await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", ALICE.2);
    let refresh = "  default_lifetime: 10s\n  before_expiry: 4s\n  jitter: 100ms\n";
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, "").replace("  dir:", "  format: json\n  dir:"));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    let json: serde_json::Value = serde_json::from_str(&first).unwrap();
    let token = json["token"].as_str().unwrap().to_owned();
    assert_eq!(token.split('.').count(), 5, "a JWE");
    let obtained = humantime::parse_rfc3339(json["obtained_at"].as_str().unwrap()).unwrap();
    let expires = humantime::parse_rfc3339(json["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(expires.duration_since(obtained).unwrap(), 10 * SEC, "default_lifetime from the request");
    // Refreshed before the store's lifetime ends: every token on disk stays accepted.
    let second = w.wait_token("alice", Some(&first), 15 * SEC).await;
    let token2: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(w.server.check_token(token2["token"].as_str().unwrap()).as_deref(), Some(ALICE.1));
    let logs = d.logs();
    assert_eq!(logs.matches("an encrypted token (JWE").count(), 1, "warned once");
    assert_eq!(d.stop().await.code(), Some(0));
}

fn me_requests(w: &World) -> usize {
    w.server.requests().iter().filter(|r| r.path.ends_with("/V1/customers/me")).count()
}

async fn post(d: &Daemon, route: &str) -> (u16, String) {
    let response = reqwest::Client::new().post(d.url(route)).timeout(20 * SEC).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_by_the_next_check() {
    let w = World::with_customers(&[ALICE]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  validate_every: 2s\n", ""));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    // Any client's logout kills every token of the customer at once.
    w.server.revoke(ALICE.1);
    let revoked = SystemTime::now();
    assert_eq!(w.server.check_token(&first), None);
    let second = w.wait_token("alice", Some(&first), 10 * SEC).await;
    assert_eq!(w.server.check_token(&second).as_deref(), Some(ALICE.1), "the new token works");
    // The next check (2 s) sees it; the login waits 1.1 s past the refusal. Timed to the new
    // login's arrival at the dev server, not to when the test noticed the file: 6 s leave a busy
    // machine about 3 s for the daemon's timers and requests (against an hour without checks).
    let login = token_requests(&w.server).last().unwrap().at;
    let took = login.duration_since(revoked).unwrap_or_default();
    assert!(took <= 6 * SEC, "logged in again {took:?} after the revocation");
    assert!(d.metric("magento_token_validations_total{customer=\"alice\",result=\"revoked\"}").await >= Some(1.0));
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(0.0), "a check is no failed login");
    eprintln!("revocation to the next login, through validation every 2 s: {took:?}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_refresh_replaces_a_revoked_token_before_answering() {
    let w = World::with_customers(&[ALICE]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], "  validate_every: 0s\n", ""));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(me_requests(&w), 0, "validate_every: 0s checks nothing");

    // A token Magento accepts: not replaced.
    let (status, body) = post(&d, "/refresh/alice").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((json["name"].as_str(), json["replaced"].as_bool()), (Some("alice"), Some(false)), "{body}");
    assert!(json["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(w.read_token("alice").as_deref(), Some(first.as_str()));

    // The app got a 401: the token was revoked. The answer comes once the new one is written.
    tokio::time::sleep(10 * SEC).await; // past the 10 s the last check's answer is shared for
    w.server.revoke(ALICE.1);
    let asked = Instant::now();
    let (status, body) = post(&d, "/refresh/alice").await;
    let took = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""replaced":true"#), "{body}");
    let second = w.read_token("alice").unwrap();
    assert_ne!(second, first);
    assert_eq!(w.server.check_token(&second).as_deref(), Some(ALICE.1));
    eprintln!("revocation to a working token on disk, through POST /refresh: {took:?}");

    // An app asking in a loop costs one check per 10 s.
    let checks = me_requests(&w);
    for _ in 0..20 {
        let (status, _) = post(&d, "/refresh/alice").await;
        assert_eq!(status, 200);
    }
    assert_eq!(me_requests(&w), checks, "answered from the last check");
    assert_eq!(post(&d, "/refresh/nobody").await.0, 404);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_refresh_never_bypasses_the_lockout_budget() {
    let w = World::with_customers(&[ALICE]).await;
    w.set_password("alice", "not-the-password");
    let refresh = "  validate_every: 0s\n  auth_failure_delays: [100ms]\n";
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, ""));
    let mut d = w.start();
    wait_for(10 * SEC, "three 401s", || async { (w.server.login_attempts(ALICE.1) == 3).then_some(()) }).await;
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 5 * SEC).await;
    let (status, body) = post(&d, "/refresh/alice").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fix the password"), "{body}");
    assert_eq!(w.server.login_attempts(ALICE.1), 3, "no login sent for the ask");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_code_that_cannot_validate_is_said_once_and_never_loops() {
    let w = World::with_customers(&[ALICE]).await;
    let refresh = "  validate_every: 1s\n";
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], refresh, "    store_code: all\n"));
    let mut d = w.start();
    w.wait_token("alice", None, 10 * SEC).await;
    tokio::time::sleep(12 * SEC).await;
    let logins = w.server.login_attempts(ALICE.1);
    assert!(logins <= 5, "{logins} logins: a loop");
    let logs = d.logs();
    assert_eq!(logs.matches("checks of the token stop for this customer").count(), 1, "said once");
    let token = w.read_token("alice").unwrap();
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1), "the token itself is good");
    assert_eq!(d.stop().await.code(), Some(0));
}
