//! GraphQL logins end to end (`magento.api: graphql`, and `magento.cloud_service: true` for
//! Adobe Commerce as a Cloud Service): the real binary against the dev server in each GraphQL
//! status convention (2.4.7: errors answer 200; 2.4.8: 401/403 by category) and under a cloud
//! tenant, judged by what a user sees: the tokens, what Magento received and counted, the
//! metrics. Every test of one behaviour runs against the three stores.

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::{CloudService, DevServerOptions, GraphQlConvention, RequestRecord, Route};

const SEC: Duration = Duration::from_secs(1);

/// The stores a daemon speaking GraphQL meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// Up to 2.4.7: every resolver's error answers 200, a dead token is a guest.
    V2_4_7,
    /// 2.4.8 and later: 401 for authentication, 403 for authorization; dead tokens named.
    V2_4_8,
    /// Adobe Commerce as a Cloud Service: GraphQL under `/<tenant-id>`, no REST customer-token
    /// route (the dev server answers as 2.4.8 there).
    Cloud,
}

impl Store {
    fn options(self) -> DevServerOptions {
        match self {
            Store::V2_4_7 => DevServerOptions { graphql_convention: GraphQlConvention::V2_4_7, ..Default::default() },
            Store::V2_4_8 => DevServerOptions { graphql_convention: GraphQlConvention::V2_4_8, ..Default::default() },
            Store::Cloud => {
                DevServerOptions { cloud_service: Some(CloudService::new("Ab3dEfGh1jK2")), ..Default::default() }
            }
        }
    }

    /// The keys under `magento:` that choose the dialect.
    fn keys(self) -> &'static str {
        match self {
            Store::V2_4_7 | Store::V2_4_8 => "  api: graphql\n",
            Store::Cloud => "  cloud_service: true\n",
        }
    }
}

/// A world for `store`, with `customers` in Magento and their password files written;
/// `adjust` changes the server's options first (no cron, a short lock window).
async fn world(store: Store, customers: &[(&str, &str, &str)], adjust: impl FnOnce(&mut DevServerOptions)) -> World {
    let mut options = store.options();
    adjust(&mut options);
    let w = World::new(options).await;
    for (name, email, password) in customers {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    w
}

/// The harness's configuration for `store`: its base URL (the tenant's, for the cloud service)
/// and the keys that choose GraphQL.
fn config(w: &World, store: Store, customers: &[(&str, &str)], refresh: &str, extra: &str) -> String {
    let text = w.config_text(customers, refresh, extra);
    let base = format!("  base_url: {}\n", w.server.base_url());
    assert!(text.contains(&base));
    text.replace(&base, &format!("  base_url: {}\n{}", w.server.magento_base_url(), store.keys()))
}

/// The GraphQL endpoint's path on this world's server (under the tenant, for the cloud service).
fn endpoint_path(w: &World) -> String {
    w.server.graphql_url().strip_prefix(&w.server.base_url()).unwrap().to_owned()
}

fn rest_requests(w: &World) -> usize {
    w.server.requests().iter().filter(|r| r.route.is_rest()).count()
}

fn graphql_logins(w: &World) -> Vec<RequestRecord> {
    w.server.requests().into_iter().filter(|r| r.route == Route::GraphQlLogin).collect()
}

// ---------------------------------------------------------------------------------------------
// Tokens through GraphQL only, and adopted through a GraphQL check at restart

async fn tokens_come_through_graphql_only(store: Store) {
    let w = world(store, &[ALICE, BOB], |_| {}).await;
    // Bob's store view travels in the Store header; alice has none (the default store view).
    w.write_config(&config(&w, store, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", "    store_code: default\n"));
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;
    for (name, email, _) in [ALICE, BOB] {
        let token = w.read_token(name).unwrap();
        assert_eq!(w.server.check_token(&token).as_deref(), Some(email), "{store:?}: Magento accepts {name}'s token");
        assert_eq!(d.metric(&refreshes(name, "success")).await, Some(1.0), "{store:?}");
    }
    let logins = graphql_logins(&w);
    assert_eq!(logins.len(), 2, "{store:?}: {logins:?}");
    for r in &logins {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, endpoint_path(&w), "{store:?}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert!(!r.authorization, "{store:?}: a login never carries an Authorization header");
        let expected = if r.username.as_deref() == Some(BOB.1) { Some("default") } else { None };
        assert_eq!(r.store.as_deref(), expected, "{store:?}: the Store header");
    }
    assert_eq!(rest_requests(&w), 0, "{store:?}: no REST request");
    assert_eq!(d.stop().await.code(), Some(0));

    // A restart adopts both tokens after a GraphQL check each: no login.
    let mut d = w.start();
    d.wait_ready(10 * SEC).await;
    wait_for(10 * SEC, "both adoptions", || async {
        (d.logs().matches("adopted the token on disk").count() == 2).then_some(())
    })
    .await;
    let checks = w.server.requests_to(Route::GraphQlCustomer);
    assert_eq!((graphql_logins(&w).len(), checks), (2, 2), "{store:?}: checked, not logged in again");
    assert_eq!(rest_requests(&w), 0, "{store:?}: no REST request");
    eprintln!(
        "{store:?}: 2 customers' tokens through {} GraphQL logins, {checks} GraphQL checks at restart, {} REST requests",
        graphql_logins(&w).len(),
        rest_requests(&w)
    );
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_through_graphql_only_on_2_4_7() {
    tokens_come_through_graphql_only(Store::V2_4_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_through_graphql_only_on_2_4_8() {
    tokens_come_through_graphql_only(Store::V2_4_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_through_graphql_only_on_the_cloud_service() {
    tokens_come_through_graphql_only(Store::Cloud).await;
}

// ---------------------------------------------------------------------------------------------
// A revoked token, seen by a GraphQL check and replaced

async fn a_revoked_token_is_replaced_through_graphql_checks(store: Store) {
    let w = world(store, &[ALICE], |_| {}).await;
    w.write_config(&config(&w, store, &[(ALICE.0, ALICE.1)], "  validate_every: 2s\n", ""));
    let mut d = w.start();
    let first = w.wait_token("alice", None, 10 * SEC).await;
    // Any client's logout kills every token of the customer at once.
    w.server.revoke(ALICE.1);
    let revoked = SystemTime::now();
    assert_eq!(w.server.check_token(&first), None);
    let second = w.wait_token("alice", Some(&first), 15 * SEC).await;
    assert_eq!(w.server.check_token(&second).as_deref(), Some(ALICE.1), "{store:?}: the new token works");
    // The next check (2 s) sees it; the login waits 1.1 s past the refusal. Timed to the new
    // login's arrival at the dev server: 8 s leave a busy machine about 5 s for the daemon's
    // timers and requests (against an hour without checks).
    let login = graphql_logins(&w).last().unwrap().at;
    let took = login.duration_since(revoked).unwrap_or_default();
    assert!(took <= 8 * SEC, "{store:?}: logged in again {took:?} after the revocation");
    let revocations = d.metric("magento_token_validations_total{customer=\"alice\",result=\"revoked\"}").await;
    assert!(revocations >= Some(1.0), "{store:?}: {revocations:?}");
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(0.0), "a check is no failed login");
    assert!(w.server.requests_to(Route::GraphQlCustomer) >= 1);
    assert_eq!(rest_requests(&w), 0, "{store:?}: no REST request");
    eprintln!("{store:?}: revocation to the next GraphQL login, through GraphQL checks every 2 s: {took:?}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_through_graphql_checks_on_2_4_7() {
    a_revoked_token_is_replaced_through_graphql_checks(Store::V2_4_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_through_graphql_checks_on_2_4_8() {
    a_revoked_token_is_replaced_through_graphql_checks(Store::V2_4_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_through_graphql_checks_on_the_cloud_service() {
    a_revoked_token_is_replaced_through_graphql_checks(Store::Cloud).await;
}

// ---------------------------------------------------------------------------------------------
// A wrong password over ten scaled lock windows on a store without cron (tests/lockout.rs for
// REST): GraphQL failures land in the same throttle row, under the same budget.

/// Magento's window and the daemon's delays, scaled from 30 minutes (and 1, 5, 31 minutes).
const SCALED: &str = "  max_auth_failures: 3\n  auth_failure_delays: [100ms, 200ms]\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";

async fn a_wrong_password_stops_short_of_the_lock(store: Store) {
    let w = world(store, &[ALICE], |o| {
        o.cron = false;
        o.lock_timeout = SEC;
    })
    .await;
    w.set_password("alice", "not-the-password");
    w.write_config(&config(&w, store, &[(ALICE.0, ALICE.1)], SCALED, ""));
    let mut d = w.start();

    // Ten windows: the count never expires on this store, and the daemon never counts on it.
    let start = Instant::now();
    while start.elapsed() < 10 * SEC {
        assert!(!w.server.is_locked(ALICE.1), "{store:?}: Magento locked the account");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let highest = w.server.max_failure_count(ALICE.1);
    assert!(highest <= 4, "{store:?}: Magento's count reached {highest} (lockout_threshold 6)");
    assert_eq!(highest, 3, "{store:?}: three 401s, the fourth try kept for a changed password");
    assert_eq!(w.server.login_attempts(ALICE.1), 3, "{store:?}");
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 5 * SEC).await;
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(3.0), "{store:?}");
    let status = d.status_of("alice").await;
    assert_eq!(status["state"], "held_back", "{store:?}: {status}");

    // The Secret is fixed: tried within the password poll (2 s), with the try kept in reserve.
    std::fs::write(w.secret_path("alice"), format!("{}\n", ALICE.2)).unwrap();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.failure_count(ALICE.1), 0, "{store:?}: a GraphQL success clears Magento's row");
    assert_eq!(rest_requests(&w), 0, "{store:?}: no REST request");
    eprintln!(
        "{store:?}: a wrong password over 10 scaled lock windows without cron: Magento's highest count {highest}"
    );
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_short_of_the_lock_on_2_4_7() {
    a_wrong_password_stops_short_of_the_lock(Store::V2_4_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_short_of_the_lock_on_2_4_8() {
    a_wrong_password_stops_short_of_the_lock(Store::V2_4_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_short_of_the_lock_on_the_cloud_service() {
    a_wrong_password_stops_short_of_the_lock(Store::Cloud).await;
}

// ---------------------------------------------------------------------------------------------
// reCAPTCHA: blocked, never counted by Magento

async fn recaptcha_is_blocked_and_never_counted(store: Store) {
    let w = world(store, &[ALICE], |o| o.recaptcha_required = true).await;
    // max_backoff is the scaled minute here (config_text sets min 100ms, max 1s).
    w.write_config(&config(&w, store, &[(ALICE.0, ALICE.1)], "", ""));
    let mut d = w.start();
    let start = Instant::now();
    wait_for(10 * SEC, "the first blocked login", || async { (w.server.login_attempts(ALICE.1) >= 1).then_some(()) })
        .await;
    tokio::time::sleep(5 * SEC).await;
    let attempts = w.server.login_attempts(ALICE.1);
    let elapsed = start.elapsed().as_secs_f64();
    // Never more often than max_backoff (1 s): at most one per second of the run, plus the first.
    assert!(attempts as f64 <= elapsed + 1.0, "{store:?}: {attempts} tries in {elapsed:.1} s");
    assert!(attempts >= 3, "{store:?}: {attempts} tries in {elapsed:.1} s: still retried");
    assert_eq!(w.server.max_failure_count(ALICE.1), 0, "{store:?}: reCAPTCHA refusals are never counted");
    let blocked = d.metric(&refreshes("alice", "blocked")).await.unwrap();
    assert!(blocked >= 3.0, "{store:?}: {blocked}");
    assert_eq!(d.metric(&refreshes("alice", "auth_failure")).await, Some(0.0));
    let status = d.status_of("alice").await;
    assert_eq!(status["last_error"]["class"], "blocked", "{store:?}: {status}");
    let message = status["last_error"]["message"].as_str().unwrap();
    for said in ["ReCaptcha validation failed", "Customer Login", "Magento_ReCaptchaWebapiGraphQl", "integration"] {
        assert!(message.contains(said), "{store:?}: the message says {said}: {message}");
    }
    eprintln!("{store:?}: reCAPTCHA: {blocked} blocked in {elapsed:.1} s, Magento's count 0");

    w.server.set_recaptcha(false);
    let token = w.wait_token("alice", None, 5 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(rest_requests(&w), 0, "{store:?}: no REST request");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recaptcha_is_blocked_and_never_counted_on_2_4_7() {
    recaptcha_is_blocked_and_never_counted(Store::V2_4_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recaptcha_is_blocked_and_never_counted_on_2_4_8() {
    recaptcha_is_blocked_and_never_counted(Store::V2_4_8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recaptcha_is_blocked_and_never_counted_on_the_cloud_service() {
    recaptcha_is_blocked_and_never_counted(Store::Cloud).await;
}

// ---------------------------------------------------------------------------------------------
// A store code Magento does not know

async fn an_unknown_store_code_is_named_and_retried_at_backoff_pace(store: Store) {
    let w = world(store, &[ALICE], |_| {}).await;
    w.write_config(&config(&w, store, &[(ALICE.0, ALICE.1)], "", "    store_code: nowhere\n"));
    let mut d = w.start();
    wait_for(10 * SEC, "a refused login", || async { (!graphql_logins(&w).is_empty()).then_some(()) }).await;
    let start = Instant::now();
    tokio::time::sleep(4 * SEC).await;
    let tries = graphql_logins(&w).len();
    // Backoff from 100 ms, doubling to 1 s: about 7 in 4 s; a loop would be hundreds.
    assert!(tries <= 12, "{store:?}: {tries} logins in {:?}", start.elapsed());
    assert!(graphql_logins(&w).iter().all(|r| r.store.as_deref() == Some("nowhere")));
    assert_eq!(w.server.max_failure_count(ALICE.1), 0, "{store:?}: never counted");
    let status = d.status_of("alice").await;
    assert_eq!(status["last_error"]["class"], "http_error", "{store:?}: {status}");
    let message = status["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("Store code nowhere does not exist") && message.contains("store_code"), "{message}");
    assert_ne!(status["state"], "held_back", "{store:?}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_store_code_is_named_and_retried_at_backoff_pace_on_2_4_7() {
    an_unknown_store_code_is_named_and_retried_at_backoff_pace(Store::V2_4_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_store_code_is_named_and_retried_at_backoff_pace_on_2_4_8() {
    an_unknown_store_code_is_named_and_retried_at_backoff_pace(Store::V2_4_8).await;
}

// ---------------------------------------------------------------------------------------------
// `once` and `check`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_logs_every_customer_in_through_graphql() {
    let w = world(Store::V2_4_7, &[ALICE, BOB], |_| {}).await;
    w.write_config(&config(&w, Store::V2_4_7, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 0, "{out}{err}");
    for (name, email, _) in [ALICE, BOB] {
        assert_eq!(w.server.check_token(&w.read_token(name).unwrap()).as_deref(), Some(email));
    }
    assert_eq!((graphql_logins(&w).len(), rest_requests(&w)), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_rest_logins_on_the_cloud_service_naming_the_key() {
    let w = world(Store::Cloud, &[ALICE], |_| {}).await;
    let text = config(&w, Store::Cloud, &[(ALICE.0, ALICE.1)], "", "");
    w.write_config(&text.replace("  cloud_service: true\n", "  cloud_service: true\n  api: rest\n"));
    let config = w.config_path().display().to_string();
    let (code, _, err) = run_to_end(&["check", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("magento.api: rest cannot log customers in on Adobe Commerce as a Cloud Service"), "{err}");
    w.write_config(&text);
    let (code, out, err) = run_to_end(&["check", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 customer"), "{out}");
}
