//! Customer tokens without customer passwords (issue 22), end to end: the real binary against the
//! dev server with `auth.method: login_as_customer` (an admin token, with Google Authenticator
//! 2FA, then `generateCustomerTokenAsAdmin`) and `cloud_service_otp` (an IMS access token, then a
//! one-time code per customer, exchanged at once). Judged by what a user sees: the token files
//! and whether Magento accepts them, what the dev server received and counted (admin logins, its
//! throttle row and lock, codes issued and exchanged), `/status`, `/metrics`, exit codes, stderr.
//!
//! Lifetimes are scaled down to seconds. The issuer asks for a customer's token only with a
//! credential that lives 5 s more (`CREDENTIAL_MARGIN` in src/issuer.rs), and renews its
//! credential `refresh.before_expiry` before its expiry: the tests keep `before_expiry` at 6 s so
//! the credential never goes unusable before its renewal. A customer's token is renewed at most
//! every 5 s (`schedule::MIN_LOGIN_INTERVAL`).
//!
//! Every daemon a [`World`] starts is checked at its stop for every secret of the world, the
//! issuers' included (admin passwords, TOTP secrets, IMS client secrets, admin and IMS tokens,
//! one-time codes: `common::Guard`).
//!
//! A test whose doc comment starts with "Was a daemon bug" failed before its fix (the fix's
//! commit says which).

use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::{CloudService, DevServerOptions, GraphQlConvention, Route};

const SEC: Duration = Duration::from_secs(1);

const CAROL: (&str, &str, &str) = ("carol", "carol@example.com", "carol-Pa55-phrase");

/// The admin user allowed to "Login as Customer".
const ADMIN: &str = "token-robot";
const ADMIN_PASSWORD: &str = "R0bot-Adm1n-Pa55!";
const WRONG_ADMIN_PASSWORD: &str = "not-the-admin-Pa55";
/// Its Google Authenticator secret (base32).
const TOTP_SECRET: &str = "JBSWY3DPEHPK3PXPKRSXG5DTMVRXEZLU";

/// The IMS server-to-server credential.
const IMS_CLIENT: &str = "sidecar-client-1";
const IMS_SECRET: &str = "p8e-IMS-client-S3cret-value";
const IMS_ORG: &str = "A1B2C3D4E5F6A7B8@AdobeOrg";
const TENANT: &str = "Ab3dEfGh1jK2";

const LAC: &str = "login_as_customer";
const OTP: &str = "cloud_service_otp";

/// Magento's lock window and the daemon's delays, scaled from 30 minutes (and 1, 5, 31 minutes),
/// as tests/e2e/lockout.rs does for customers.
const SCALED: &str = "  max_auth_failures: 3\n  auth_failure_delays: [100ms, 200ms]\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";

/// Customer tokens that live `secs` seconds and are renewed 6 s before their end (jitter off).
fn lifetimes(secs: u64) -> String {
    format!("  before_expiry: 6s\n  jitter: 0s\n  default_lifetime: {secs}s\n")
}

// ---------------------------------------------------------------------------------------------
// Worlds and configurations

/// A store with Login as Customer enabled (unless `adjust` says otherwise), `customers` in it,
/// the admin (with a Google Authenticator secret when `totp`), and the admin's password file
/// (`secrets/admin`) and TOTP secret file (`secrets/totp`) written.
async fn lac_world(customers: &[(&str, &str, &str)], totp: bool, adjust: impl FnOnce(&mut DevServerOptions)) -> World {
    let mut options = DevServerOptions { login_as_customer: true, ..Default::default() };
    adjust(&mut options);
    let w = World::new(options).await;
    for (_, email, password) in customers {
        w.server.add_customer(email, password);
    }
    w.server.add_admin(ADMIN, ADMIN_PASSWORD, totp.then_some(TOTP_SECRET)).unwrap();
    w.set_password("admin", ADMIN_PASSWORD);
    std::fs::write(w.secret_path("totp"), format!("{TOTP_SECRET}\n")).unwrap();
    w
}

/// The customers' entries, without passwords; with `customer_id` from the server when `ids`.
fn customer_lines(w: &World, customers: &[(&str, &str)], ids: bool) -> String {
    let mut y = String::new();
    for (name, email) in customers {
        y.push_str(&format!("  - name: {name}\n    username: {email}\n"));
        if ids {
            let id = w.server.customer_id(email).expect("the customer is on the server");
            y.push_str(&format!("    customer_id: {id}\n"));
        }
    }
    y
}

/// The harness's configuration (see [`World::config_text`]) with `customers` without passwords
/// and `auth.method: login_as_customer` for the admin (with its TOTP secret file when `totp`).
fn lac_config(w: &World, customers: &[(&str, &str)], refresh: &str, totp: bool) -> String {
    let mut y = w.config_text(&[], refresh, "");
    assert!(y.ends_with("customers:\n"), "{y}");
    y.push_str(&customer_lines(w, customers, false));
    y.push_str(&format!(
        "auth:\n  method: login_as_customer\n  admin:\n    username: {ADMIN}\n    password_file: {}\n",
        w.secret_path("admin").display()
    ));
    if totp {
        y.push_str(&format!("    totp_secret_file: {}\n", w.secret_path("totp").display()));
    }
    y
}

/// Adobe Commerce as a Cloud Service, with `customers`, the IMS client and its secret file
/// (`secrets/ims`).
async fn cloud_world(customers: &[(&str, &str, &str)], adjust: impl FnOnce(&mut DevServerOptions)) -> World {
    let mut options = DevServerOptions { cloud_service: Some(CloudService::new(TENANT)), ..Default::default() };
    adjust(&mut options);
    let w = World::new(options).await;
    for (_, email, password) in customers {
        w.server.add_customer(email, password);
    }
    w.server.add_ims_client(IMS_CLIENT, IMS_SECRET, IMS_ORG);
    w.set_password("ims", IMS_SECRET);
    w
}

/// The harness's configuration for the cloud tenant (`cloud_service: true`, the tenant's base
/// URL) with `auth.method: cloud_service_otp` and `customers` with their ids.
fn otp_config(w: &World, customers: &[(&str, &str)], refresh: &str) -> String {
    let mut y = w.config_text(&[], refresh, "");
    let base = format!("  base_url: {}\n", w.server.base_url());
    assert!(y.contains(&base) && y.ends_with("customers:\n"), "{y}");
    y = y.replace(&base, &format!("  base_url: {}\n  cloud_service: true\n", w.server.magento_base_url()));
    y.push_str(&customer_lines(w, customers, true));
    y.push_str(&format!(
        "auth:\n  method: cloud_service_otp\n  ims:\n    token_url: {}\n    client_id: {IMS_CLIENT}\n    client_secret_file: {}\n    org_id: {IMS_ORG}\n",
        w.server.ims_token_url(),
        w.secret_path("ims").display()
    ));
    y
}

// ---------------------------------------------------------------------------------------------
// What a user sees

/// Whether the customer's token file holds a token Magento accepts for `email` now.
fn accepted(w: &World, file: &str, email: &str) -> bool {
    w.read_token(file).is_some_and(|t| w.server.check_token(&t).as_deref() == Some(email))
}

/// Waits until every customer's token file holds a token Magento accepts (and, with `not`,
/// other than the one given for it).
async fn wait_accepted(w: &World, customers: &[(&str, &str, &str)], not: &[String], limit: Duration) {
    wait_for(limit, "every customer's token, accepted by Magento", || async {
        customers
            .iter()
            .enumerate()
            .all(|(i, (name, email, _))| {
                accepted(w, name, email) && not.get(i).is_none_or(|old| w.read_token(name).as_ref() != Some(old))
            })
            .then_some(())
    })
    .await
}

/// The whole `/status` document.
async fn status(d: &Daemon) -> serde_json::Value {
    let (_, body) = d.get("/status").await.expect("/status answers");
    serde_json::from_str(&body).unwrap()
}

async fn issuer_status(d: &Daemon) -> serde_json::Value {
    status(d).await["issuer"].clone()
}

/// `/status`, or `None` while the daemon does not answer yet.
async fn try_status(d: &Daemon) -> Option<serde_json::Value> {
    let (_, body) = d.get("/status").await?;
    serde_json::from_str(&body).ok()
}

fn issuer_refreshes(method: &str, result: &str) -> String {
    format!("magento_token_issuer_refresh_total{{method=\"{method}\",result=\"{result}\"}}")
}

fn issuer_series(name: &str, method: &str) -> String {
    format!("{name}{{method=\"{method}\"}}")
}

fn message(v: &serde_json::Value) -> String {
    v["last_error"]["message"].as_str().unwrap_or_default().to_owned()
}

/// Waits until the customer's `/status` entry satisfies `ok`; returns it.
async fn wait_status(
    d: &Daemon,
    customer: &str,
    what: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(limit, &format!("{customer}: {what}"), || async {
        let status = try_status(d).await?;
        let s = status["customers"].as_array()?.iter().find(|c| c["name"] == customer)?.clone();
        ok(&s).then_some(s)
    })
    .await
}

/// Waits until the issuer's `/status` entry satisfies `ok`; returns it.
async fn wait_issuer(
    d: &Daemon,
    what: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(limit, &format!("the issuer: {what}"), || async {
        let s = try_status(d).await?["issuer"].clone();
        ok(&s).then_some(s)
    })
    .await
}

/// Seconds from `since` to `at`, negative when `at` came first.
fn signed_secs(at: SystemTime, since: SystemTime) -> f64 {
    match at.duration_since(since) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Requests the server received on `route`, in order.
fn requests_on(w: &World, route: Route) -> Vec<magento_devserver::RequestRecord> {
    w.server.requests().into_iter().filter(|r| r.route == route).collect()
}

/// Requests that carried a customer's password: none may, with either method.
fn customer_logins(w: &World) -> usize {
    w.server.requests_to(Route::RestToken) + w.server.requests_to(Route::GraphQlLogin)
}

// ---------------------------------------------------------------------------------------------
// 1. login_as_customer with 2FA: one admin login per admin-token life, not per customer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_as_customer_with_2fa_gives_three_customers_tokens_with_one_admin_login_per_token_life() {
    // Admin tokens live 12 s and are renewed 6 s before their end (before_expiry): one admin
    // token serves 6 s. Customer tokens (opaque) live 10 s and are renewed every 5 s.
    const ADMIN_LIFE: Duration = Duration::from_secs(12);
    const RENEWAL: Duration = Duration::from_secs(6);
    let w = lac_world(&[ALICE, BOB, CAROL], true, |o| {
        o.admin_token_lifetime = ADMIN_LIFE;
        o.opaque_token_lifetime = Some(10 * SEC);
    })
    .await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1), (CAROL.0, CAROL.1)];
    w.write_config(&lac_config(&w, &customers, &lifetimes(10), true));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB, CAROL], &[], 15 * SEC).await;
    let first = requests_on(&w, Route::TfaGoogle).first().expect("the admin logged in through 2FA").at;

    // Three renewal periods from the first admin login; every token Magento accepts all along.
    let run = 3 * RENEWAL;
    let mut samples = 0;
    while SystemTime::now().duration_since(first).unwrap_or_default() < run {
        for (name, email, _) in [ALICE, BOB, CAROL] {
            assert!(accepted(&w, name, email), "{name}'s token is not accepted {:?} into the run", first.elapsed());
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = w.server.issuer_counts();
    let logins = requests_on(&w, Route::TfaGoogle);
    let at: Vec<String> = logins
        .iter()
        .map(|r| format!("{:.1}s", r.at.duration_since(first).unwrap_or_default().as_secs_f64()))
        .collect();
    let mut successes = Vec::new();
    for (name, _, _) in [ALICE, BOB, CAROL] {
        successes.push(d.metric(&refreshes(name, "success")).await.unwrap_or(0.0) as usize);
    }
    println!(
        "login_as_customer with 2FA, 3 customers without passwords, admin tokens living {ADMIN_LIFE:?} renewed \
         {RENEWAL:?} before expiry (one token serves {RENEWAL:?}): admin logins over 3 admin-token lives ({run:?} from the \
         first): {}; customer tokens minted: {} ({successes:?} per customer); admin logins refused: {}; admin logins at [{}] \
         (each opens a life); {samples} samples, every token accepted",
        counts.admin_tokens,
        counts.login_as_customer_tokens,
        counts.admin_refusals,
        at.join(", ")
    );
    assert!((3..=4).contains(&counts.admin_tokens), "one admin login per admin-token life: {counts:?}");
    assert_eq!(logins.len(), counts.admin_tokens, "every admin login succeeded: {counts:?}");
    // (A JWT's iat is whole seconds: the first renewal may come up to a second sooner.)
    assert!(gaps(&logins).iter().all(|g| *g >= RENEWAL - 2 * SEC), "admin logins closer than a token's life: {at:?}");
    // Customer tokens renewed every 5 s: 4 rounds in 18 s; at least 3 tokens (one per customer)
    // in each of 3 rounds, and the admin logged in far fewer times than customers got tokens.
    assert!(successes.iter().all(|s| *s >= 3), "every customer renewed at least 3 times: {successes:?}");
    assert!(counts.login_as_customer_tokens >= 9, "{counts:?}");
    assert_eq!(counts.login_as_customer_tokens, successes.iter().sum::<usize>(), "one mint per customer refresh");
    assert!(counts.admin_tokens < counts.login_as_customer_tokens / 2, "not one admin login per customer");
    assert_eq!(counts.admin_refusals, 0);
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 0);
    // No customer password was sent anywhere; 2FA's route only (the plain token route would
    // have been refused with the 2FA message).
    assert_eq!(customer_logins(&w), 0, "no customer login");
    assert_eq!(w.server.requests_to(Route::AdminToken), 0, "the admin token came from the 2FA provider's route");
    let lac = requests_on(&w, Route::GraphQlLoginAsAdmin);
    assert!(lac.iter().all(|r| r.authorization), "generateCustomerTokenAsAdmin carries the admin's token");

    let issuer = issuer_status(&d).await;
    assert_eq!(issuer["method"], LAC, "{issuer}");
    assert_eq!(issuer["state"], "fresh", "{issuer}");
    assert!(issuer["expires_at"].is_string() && issuer["last_error"].is_null(), "{issuer}");
    let expiry = d.metric(&issuer_series("magento_token_issuer_expiry_timestamp_seconds", LAC)).await.unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now && expiry <= now + ADMIN_LIFE.as_secs_f64() + 2.0, "admin token expiry {expiry} (now {now})");
    let admin_successes = d.metric(&issuer_refreshes(LAC, "success")).await.unwrap() as usize;
    assert!(admin_successes >= counts.admin_tokens.min(3), "{admin_successes} vs {counts:?}");
    assert_eq!(d.metric(&issuer_refreshes(LAC, "auth_failure")).await, Some(0.0));
    assert_eq!(d.metric(&issuer_series("magento_token_issuer_held_back", LAC)).await, Some(0.0));
    for (name, _, _) in [ALICE, BOB, CAROL] {
        assert_eq!(d.status_of(name).await["state"], "fresh");
    }
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 2. A wrong admin password on a store without cron, over ten scaled lock windows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_admin_password_without_cron_stays_short_of_the_lock_and_a_fix_is_picked_up() {
    let w = lac_world(&[ALICE, BOB, CAROL], false, |o| {
        o.cron = false;
        o.lock_timeout = SEC;
    })
    .await;
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1), (CAROL.0, CAROL.1)];
    w.write_config(&lac_config(&w, &customers, SCALED, false));
    let mut d = w.start();

    // Ten windows: the admin's row never expires on this store, and the daemon never counts
    // on it.
    let start = Instant::now();
    while start.elapsed() < 10 * SEC {
        assert!(!w.server.admin_locked(ADMIN), "Magento locked the admin user after {:?}", start.elapsed());
        assert!(!w.server.admin_throttled(ADMIN), "Magento's throttle refuses the admin after {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let highest = w.server.admin_max_failure_count(ADMIN);
    let counts = w.server.issuer_counts();
    assert!(highest <= 4, "the admin's count reached {highest} (the throttle locks at 6)");
    assert_eq!(highest, 3, "three 401s, the fourth try kept for a changed password");
    // (The dev server reads an admin's row as Magento does: expired after the window, so
    // `admin_failures` says 0 here; without cron the row keeps its count for the next failure.)
    assert_eq!((counts.admin_refusals, counts.admin_tokens), (3, 0), "{counts:?}");
    assert_eq!(requests_on(&w, Route::AdminToken).len(), 3, "three admin logins sent in all");
    d.wait_metric(&issuer_refreshes(LAC, "auth_failure"), 3.0, 5 * SEC).await;
    let issuer = issuer_status(&d).await;
    assert!(["held_back", "failing"].contains(&issuer["state"].as_str().unwrap_or_default()), "{issuer}");
    let said = message(&issuer);
    assert!(said.contains("was refused") && said.contains("auth.admin"), "{issuer}");
    assert!(said.contains("forget-failures") || said.contains("fix auth.admin"), "says what to do: {issuer}");
    if issuer["state"] == "held_back" {
        assert_eq!(d.metric(&issuer_series("magento_token_issuer_held_back", LAC)).await, Some(1.0));
    }
    for (name, _, _) in [ALICE, BOB, CAROL] {
        let s = d.status_of(name).await;
        assert_eq!(s["state"], "held_back", "{s}");
        assert_eq!(s["last_error"]["class"], "issuer", "{s}");
        assert!(message(&s).contains("auth.admin"), "{s}");
        assert!(w.read_token(name).is_none(), "{name} has no token");
        assert_eq!(d.metric(&refreshes(name, "auth_failure")).await, Some(0.0), "{name}: the admin's 401s are not its");
    }
    assert_eq!(w.server.issuer_counts().login_as_customer_tokens, 0);

    // The Secret is fixed: picked up within the secret poll (2 s) without a restart.
    w.set_password("admin", ADMIN_PASSWORD);
    let fixed = SystemTime::now();
    let timer = Instant::now();
    wait_accepted(&w, &[ALICE, BOB, CAROL], &[], 15 * SEC).await;
    let all_tokens = timer.elapsed();
    let login = requests_on(&w, Route::AdminToken).last().unwrap().clone();
    assert_eq!(login.status, 200);
    let admin_token = login.at.duration_since(fixed).unwrap_or_default();
    println!(
        "wrong admin password over 10 scaled lock windows (1 s) without cron: the admin's highest failure count {highest} \
         (Magento throttles at 6), {} admin logins sent, locked: no; after the password file was fixed: admin token after \
         {:.2}s, all 3 customers' tokens after {:.2}s",
        counts.admin_refusals,
        admin_token.as_secs_f64(),
        all_tokens.as_secs_f64()
    );
    // The poll is 2 s: twice that, and 4 s for a busy machine.
    assert!(all_tokens < 8 * SEC, "customers got tokens {all_tokens:?} after the fix");
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 3, "the fixed password was the one try kept in reserve");
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    d.wait_metric(&issuer_series("magento_token_issuer_held_back", LAC), 0.0, 5 * SEC).await;
    let issuer = wait_issuer(&d, "fresh", 5 * SEC, |i| i["state"] == "fresh").await;
    assert!(issuer["expires_at"].is_string(), "{issuer}");
    assert_eq!(customer_logins(&w), 0);
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 3. 2FA required, and no TOTP secret configured

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_factor_required_without_a_totp_secret_names_the_key_and_counts_nothing() {
    let w = lac_world(&[ALICE, BOB], true, |_| {}).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    w.write_config(&lac_config(&w, &customers, "", false));
    let mut d = w.start();
    let issuer = wait_issuer(&d, "the 2FA refusal", 10 * SEC, |i| !i["last_error"].is_null()).await;
    let said = message(&issuer);
    assert!(said.contains("totp_secret_file"), "names the key to set: {issuer}");
    assert!(said.contains("2fa provider-specific endpoints"), "shows Magento's answer: {issuer}");
    assert_eq!(issuer["state"], "failing", "{issuer}");
    for (name, _, _) in [ALICE, BOB] {
        let s =
            wait_status(&d, name, "held back by the issuer", 10 * SEC, |s| s["last_error"]["class"] == "issuer").await;
        assert_eq!(s["state"], "held_back", "{s}");
        assert!(message(&s).contains("totp_secret_file"), "{s}");
        assert!(w.read_token(name).is_none());
    }
    // A refusal that is no failed login, retried at max_backoff's pace (1 s), never counted.
    let before = requests_on(&w, Route::AdminToken).len();
    tokio::time::sleep(3 * SEC).await;
    let tries = requests_on(&w, Route::AdminToken).len() - before;
    assert!((1..=5).contains(&tries), "{tries} admin logins in 3 s");
    assert_eq!(w.server.admin_failures(ADMIN), 0, "nothing counted in the admin's row");
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 0);
    assert!(!w.server.admin_locked(ADMIN));
    let blocked = d.metric(&issuer_refreshes(LAC, "blocked")).await.unwrap_or(0.0);
    assert!(blocked >= 1.0, "{blocked}");
    assert_eq!(d.metric(&issuer_refreshes(LAC, "auth_failure")).await, Some(0.0));

    // The secret file is configured (a reload): tokens come through the 2FA route.
    w.write_config(&lac_config(&w, &customers, "", true));
    d.signal("HUP");
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    assert_eq!(requests_on(&w, Route::TfaGoogle).len(), 1);
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 0);
    // The replaced issuer stopped: no more logins on the plain route.
    let plain = w.server.requests_to(Route::AdminToken);
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(w.server.requests_to(Route::AdminToken), plain, "the issuer of the old configuration still runs");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A TOTP secret file with another secret: the code is refused after the right password, which
/// counts against the admin account; the fixed file is tried at once, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_totp_secret_counts_as_a_failure_and_a_fixed_file_is_picked_up() {
    let w = lac_world(&[ALICE], true, |o| {
        o.cron = false;
        o.lock_timeout = SEC;
    })
    .await;
    std::fs::write(w.secret_path("totp"), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\n").unwrap();
    w.write_config(&lac_config(&w, &[(ALICE.0, ALICE.1)], SCALED, true));
    let mut d = w.start();
    let issuer = wait_issuer(&d, "three refused codes", 10 * SEC, |i| {
        ["held_back", "failing"].contains(&i["state"].as_str().unwrap_or_default())
            && message(i).contains("Invalid code")
    })
    .await;
    assert!(message(&issuer).contains("totp_secret_file"), "{issuer}");
    d.wait_metric(&issuer_refreshes(LAC, "auth_failure"), 3.0, 10 * SEC).await;
    tokio::time::sleep(2 * SEC).await;
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 3, "three codes refused, then held back");
    assert!(!w.server.admin_locked(ADMIN));

    std::fs::write(w.secret_path("totp"), format!("{TOTP_SECRET}\n")).unwrap();
    let timer = Instant::now();
    wait_accepted(&w, &[ALICE], &[], 10 * SEC).await;
    println!(
        "wrong TOTP secret: {} codes refused; the fixed file was used, alice's token after {:.2}s",
        w.server.issuer_counts().admin_refusals,
        timer.elapsed().as_secs_f64()
    );
    assert_eq!(w.server.admin_failures(ADMIN), 0);
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 4. Login as Customer disabled; the admin without allow_shopping_assistance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_as_customer_disabled_says_what_to_enable_and_counts_nothing() {
    let w = lac_world(&[ALICE, BOB], false, |o| o.login_as_customer = false).await;
    w.server.set_admin_acl(ADMIN, true, false);
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    // max_backoff (1 s) is the pace of retries of what only a change in Magento fixes.
    w.write_config(&lac_config(&w, &customers, "", false));
    let mut d = w.start();
    for (name, _, _) in [ALICE, BOB] {
        let s = wait_status(&d, name, "Login as Customer is disabled", 10 * SEC, |s| {
            message(s).contains("Login as Customer is disabled")
        })
        .await;
        assert_eq!(s["last_error"]["class"], "blocked", "{s}");
        let said = message(&s);
        assert!(said.contains("Enable Login as Customer"), "says what to enable: {said}");
        assert!(said.contains("Magento_LoginAsCustomer::login"), "{said}");
        let blocked = d.metric(&refreshes(name, "blocked")).await.unwrap_or(0.0);
        assert!(blocked >= 1.0, "{name}: {blocked}");
        assert_eq!(d.metric(&refreshes(name, "auth_failure")).await, Some(0.0));
    }

    w.server.set_login_as_customer(true);
    for (name, _, _) in [ALICE, BOB] {
        let s = wait_status(&d, name, "remote shopping assistance is disabled", 10 * SEC, |s| {
            message(s).contains("Allow remote shopping assistance is disabled")
        })
        .await;
        assert_eq!(s["last_error"]["class"], "blocked", "{s}");
        assert!(message(&s).contains("allow_shopping_assistance"), "says which resource: {s}");
    }
    // Pace: retried about once per max_backoff (1 s), not in a loop.
    let before = requests_on(&w, Route::GraphQlLoginAsAdmin).len();
    tokio::time::sleep(3 * SEC).await;
    let tries = requests_on(&w, Route::GraphQlLoginAsAdmin).len() - before;
    assert!(tries <= 2 * 5, "{tries} generateCustomerTokenAsAdmin requests for 2 customers in 3 s");

    w.server.set_admin_acl(ADMIN, true, true);
    let timer = Instant::now();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    let took = timer.elapsed();
    let counts = w.server.issuer_counts();
    println!(
        "Login as Customer off, then allow_shopping_assistance missing: {} generateCustomerTokenAsAdmin refusals, no admin \
         failure ({} admin logins refused, {} admin token); tokens {:.2}s after the ACL was granted (max_backoff 1s)",
        requests_on(&w, Route::GraphQlLoginAsAdmin).len() - counts.login_as_customer_tokens,
        counts.admin_refusals,
        counts.admin_tokens,
        took.as_secs_f64()
    );
    assert!(took < 5 * SEC, "tokens {took:?} after the change (max_backoff 1 s)");
    assert_eq!(w.server.admin_failures(ADMIN), 0, "no admin login failure counted");
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 0);
    assert_eq!((counts.admin_tokens, counts.admin_refusals), (1, 0), "the admin's token was never dropped: {counts:?}");
    assert_eq!(issuer_status(&d).await["state"], "fresh");
    assert_eq!(d.metric(&issuer_refreshes(LAC, "auth_failure")).await, Some(0.0));
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 5. A configured customer Magento does not know

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_customer_email_is_named_and_the_others_get_tokens() {
    let w = lac_world(&[ALICE, BOB], false, |_| {}).await;
    let customers = [(ALICE.0, ALICE.1), (CAROL.0, CAROL.1), (BOB.0, BOB.1)];
    w.write_config(&lac_config(&w, &customers, "", false));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    let s = wait_status(&d, CAROL.0, "the unknown email", 10 * SEC, |s| !s["last_error"].is_null()).await;
    let said = message(&s);
    assert!(said.contains("Customer email provided does not exist"), "{s}");
    assert!(said.contains("username"), "says what to correct: {s}");
    assert_eq!(s["last_error"]["class"], "blocked", "{s}");
    assert!(w.read_token(CAROL.0).is_none());
    let for_carol = || {
        requests_on(&w, Route::GraphQlLoginAsAdmin).iter().filter(|r| r.username.as_deref() == Some(CAROL.1)).count()
    };
    let before = for_carol();
    tokio::time::sleep(3 * SEC).await;
    let carol = for_carol() - before;
    assert!((1..=5).contains(&carol), "{carol} requests for carol in 3 s: retried at max_backoff's pace (1 s)");
    let counts = w.server.issuer_counts();
    assert_eq!(
        (counts.admin_tokens, counts.admin_refusals),
        (1, 0),
        "one customer's error is not the admin's: {counts:?}"
    );
    assert_eq!(issuer_status(&d).await["state"], "fresh");
    for (name, email, _) in [ALICE, BOB] {
        assert!(accepted(&w, name, email));
        assert_eq!(d.status_of(name).await["state"], "fresh");
    }
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 6. The admin token refused before its expiry

/// The dev server cannot revoke an admin token, but its clock can move: an hour forward, the
/// admin token the daemon holds (an hour's life by the daemon's clock) is expired for Magento,
/// which refuses it as a revoked one. Customer tokens live 2 hours there, so only the admin's dies.
async fn an_admin_token_refused_early_is_replaced_and_customers_recover(convention: GraphQlConvention) {
    let w = lac_world(&[ALICE, BOB], false, |o| {
        o.opaque_token_lifetime = Some(Duration::from_secs(7200));
        o.graphql_convention = convention;
    })
    .await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    // Customer tokens renewed every 5 s (default_lifetime 10 s): a mint soon after the change.
    w.write_config(&lac_config(&w, &customers, &lifetimes(10), false));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    let old: Vec<String> = [ALICE, BOB].iter().map(|c| w.read_token(c.0).unwrap()).collect();

    w.server.advance_clock(Duration::from_secs(3601));
    let moved = SystemTime::now();
    let timer = Instant::now();
    wait_for(15 * SEC, "a second admin token", || async { (w.server.issuer_counts().admin_tokens == 2).then_some(()) })
        .await;
    let renewed = requests_on(&w, Route::AdminToken).last().unwrap().at.duration_since(moved).unwrap_or_default();
    wait_accepted(&w, &[ALICE, BOB], &old, 15 * SEC).await;
    let recovered = timer.elapsed();
    println!(
        "{convention:?}: admin token refused early (Magento's clock moved 1 h): new admin token {:.2}s later, both customers' new tokens after {:.2}s",
        renewed.as_secs_f64(),
        recovered.as_secs_f64()
    );
    // The first mint after the change (within 5 s), the issuer's wait after a refusal (1.1 s),
    // and 8 s for a busy machine.
    assert!(recovered < 15 * SEC, "{recovered:?}");
    let counts = w.server.issuer_counts();
    assert_eq!((counts.admin_tokens, counts.admin_refusals), (2, 0), "{counts:?}");
    assert_eq!(w.server.admin_max_failure_count(ADMIN), 0, "a refused token is no failed login");
    assert_eq!(d.metric(&issuer_refreshes(LAC, "auth_failure")).await, Some(0.0));
    assert_eq!(d.metric(&issuer_refreshes(LAC, "success")).await, Some(2.0));
    assert!(d.logs().contains("refused before its expiry"), "the log says why a new admin token was asked for");
    let issuer = wait_issuer(&d, "fresh again", 5 * SEC, |i| i["state"] == "fresh").await;
    assert!(issuer["expires_at"].is_string(), "{issuer}");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// 2.4.8 and later: GraphQL answers a dead bearer token with 401 by its category.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_refused_early_is_replaced_and_customers_recover_on_2_4_8() {
    an_admin_token_refused_early_is_replaced_and_customers_recover(GraphQlConvention::V2_4_8).await;
}

/// Up to 2.4.7: every resolver error answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_refused_early_is_replaced_and_customers_recover_on_2_4_7() {
    an_admin_token_refused_early_is_replaced_and_customers_recover(GraphQlConvention::V2_4_7).await;
}

// ---------------------------------------------------------------------------------------------
// 7. cloud_service_otp: one IMS token, one code and one exchange per customer refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_service_otp_gives_two_customers_tokens_over_three_refreshes() {
    // Customer tokens (JWTs here) live 10 s, renewed every 5 s; the IMS token lives 24 h.
    let w = cloud_world(&[ALICE, BOB], |o| o.token_lifetime = 10 * SEC).await;
    w.write_config(&otp_config(&w, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], &lifetimes(10)));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    for name in [ALICE.0, BOB.0] {
        d.wait_metric(&refreshes(name, "success"), 3.0, 20 * SEC).await;
    }
    let counts = w.server.issuer_counts();
    let ims_requests = w.server.requests_to(Route::ImsToken);
    println!(
        "cloud_service_otp, 2 customers over 3 refreshes each: IMS token requests {ims_requests} ({} issued); \
         one-time codes issued {}, exchanged {}",
        counts.ims_tokens, counts.otps_issued, counts.otps_exchanged
    );
    assert_eq!((ims_requests, counts.ims_tokens), (1, 1), "one IMS token for its whole life: {counts:?}");
    assert!((6..=8).contains(&counts.otps_issued), "one code per customer refresh: {counts:?}");
    assert!((6..=8).contains(&counts.otps_exchanged), "each exchanged at once: {counts:?}");
    assert!(counts.otps_exchanged <= counts.otps_issued && counts.otps_issued <= counts.otps_exchanged + 2);
    for (name, email, _) in [ALICE, BOB] {
        assert!(accepted(&w, name, email), "{name}");
    }
    // What the code route received: the IMS token, and the customer ids under the tenant.
    let otps = requests_on(&w, Route::CloudOtp);
    assert_eq!(otps.len(), counts.otps_issued);
    for r in &otps {
        assert_eq!(r.method, "POST");
        assert!(r.authorization, "the IMS token as bearer");
        assert!(r.path.starts_with(&format!("/{TENANT}/V1/customer/")) && r.path.ends_with("/otp"), "{}", r.path);
    }
    assert!(w.server.requests_to(Route::GraphQlOtpExchange) >= counts.otps_exchanged);
    assert_eq!(customer_logins(&w), 0, "no customer password was sent");
    assert_eq!(w.server.requests_to(Route::AdminToken) + w.server.requests_to(Route::GraphQlLoginAsAdmin), 0);
    let issuer = issuer_status(&d).await;
    assert_eq!((issuer["method"].as_str(), issuer["state"].as_str()), (Some(OTP), Some("fresh")), "{issuer}");
    assert_eq!(d.metric(&issuer_refreshes(OTP, "success")).await, Some(1.0));
    let expiry = d.metric(&issuer_series("magento_token_issuer_expiry_timestamp_seconds", OTP)).await.unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now + 86_000.0, "the IMS token's expires_in (24 h): {expiry} (now {now})");
    assert_eq!(d.stop().await.code(), Some(0));
}

/// An IMS token that lives 12 s (renewed 6 s before its end, from its `expires_in`): renewed
/// before it dies, and the customers' tokens keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_service_otp_renews_a_short_lived_ims_token_by_its_expires_in() {
    let w = cloud_world(&[ALICE], |o| {
        o.token_lifetime = 10 * SEC;
        o.ims_token_lifetime = 12 * SEC;
    })
    .await;
    w.write_config(&otp_config(&w, &[(ALICE.0, ALICE.1)], &lifetimes(10)));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE], &[], 10 * SEC).await;
    let start = Instant::now();
    while start.elapsed() < 13 * SEC {
        assert!(accepted(&w, ALICE.0, ALICE.1), "alice's token is not accepted after {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = w.server.issuer_counts();
    let refused = requests_on(&w, Route::CloudOtp).iter().filter(|r| r.status != 200).count();
    println!(
        "cloud_service_otp with IMS tokens of 12 s: {} IMS tokens in about 14 s, {} codes ({} refused)",
        counts.ims_tokens, counts.otps_issued, refused
    );
    assert!((2..=4).contains(&counts.ims_tokens), "renewed by expires_in: {counts:?}");
    assert_eq!(refused, 0, "no code was asked for with a dead IMS token");
    assert_eq!(d.metric(&issuer_refreshes(OTP, "success")).await, Some(counts.ims_tokens as f64));
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 8. `once`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_mints_every_customer_with_one_admin_login_and_names_the_issuers_refusal() {
    let w = lac_world(&[ALICE, BOB, CAROL], true, |_| {}).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1), (CAROL.0, CAROL.1)];
    w.write_config(&lac_config(&w, &customers, "", true));
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 0, "{out}{err}");
    for (name, email, _) in [ALICE, BOB, CAROL] {
        assert!(accepted(&w, name, email), "{name}: {out}{err}");
    }
    let counts = w.server.issuer_counts();
    assert_eq!((counts.admin_tokens, counts.login_as_customer_tokens), (1, 3), "{counts:?}");
    assert_eq!(customer_logins(&w), 0);

    // A wrong admin password: no customer can get a token, each says why; one 401 counted.
    for (name, _, _) in [ALICE, BOB, CAROL] {
        std::fs::remove_file(w.token_path(name)).unwrap();
    }
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 1, "{out}{err}");
    let text = format!("{out}{err}");
    for (name, _, _) in [ALICE, BOB, CAROL] {
        let line = text.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("no line for {name}: {text}"));
        assert!(
            line.contains("auth.admin") && line.contains("refused"),
            "{name}'s line says the issuer's reason: {line}"
        );
        assert!(w.read_token(name).is_none());
    }
    assert_eq!(w.server.admin_failures(ADMIN), 1, "one admin login, refused: {text}");
    assert_eq!(w.server.issuer_counts().admin_refusals, 1);
    let said: Vec<&str> = text.lines().filter(|l| l.contains("no token written")).collect();
    println!(
        "once, login_as_customer: 3 tokens with 1 admin login (exit 0); wrong admin password: exit {code}, admin failures 1:\n{}",
        said.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_works_with_cloud_service_otp() {
    let w = cloud_world(&[ALICE, BOB], |_| {}).await;
    w.write_config(&otp_config(&w, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], ""));
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 0, "{out}{err}");
    for (name, email, _) in [ALICE, BOB] {
        assert!(accepted(&w, name, email), "{name}: {out}{err}");
    }
    let counts = w.server.issuer_counts();
    assert_eq!((counts.ims_tokens, counts.otps_issued, counts.otps_exchanged), (1, 2, 2), "{counts:?}");
}

// ---------------------------------------------------------------------------------------------
// 9. No secret of the issuers in any log line (trace), /status or metric

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_issuer_secret_appears_in_trace_logs_status_or_metrics() {
    // login_as_customer with 2FA: a wrong admin password first, then the right one.
    let w = lac_world(&[ALICE, BOB], true, |_| {}).await;
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let refresh = format!("{}  auth_failure_delays: [100ms]\n", lifetimes(10));
    w.write_config(&lac_config(&w, &customers, &refresh, true).replace("level: debug", "level: trace"));
    let mut d = w.start();
    d.wait_metric(&issuer_refreshes(LAC, "auth_failure"), 1.0, 10 * SEC).await;
    w.set_password("admin", ADMIN_PASSWORD);
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    let first: Vec<String> = [ALICE, BOB].iter().map(|c| w.read_token(c.0).unwrap()).collect();
    wait_accepted(&w, &[ALICE, BOB], &first, 15 * SEC).await; // one renewal each
    let secrets = w.guard().secrets();
    let s = w.server.secrets();
    for must in [ADMIN_PASSWORD, WRONG_ADMIN_PASSWORD, TOTP_SECRET] {
        assert!(secrets.iter().any(|x| x == must), "the scan covers each issuer credential");
    }
    assert!(s.issuer_tokens().len() == 1 && s.issued_tokens().len() >= 4, "the admin token and the customers'");
    d.assert_secrets_hidden(&secrets).await;
    let trace_lines = d.logs().lines().filter(|l| l.contains("\"level\":\"TRACE\"")).count();
    let lines = d.logs().lines().count();
    assert!(trace_lines > 0, "the log is at level trace");
    assert_eq!(d.stop().await.code(), Some(0));
    // once, with a wrong password and then the right one (its output is checked by the harness).
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    assert_eq!(w.once_with_one_try().await.0, 1);
    w.set_password("admin", ADMIN_PASSWORD);
    assert_eq!(w.once_with_one_try().await.0, 0);
    let lac_count = w.guard().secrets().len();

    // cloud_service_otp: a wrong client secret first, then the right one.
    let c = cloud_world(&[ALICE, BOB], |o| o.token_lifetime = 10 * SEC).await;
    c.set_password("ims", "not-the-IMS-secret");
    c.write_config(
        &otp_config(&c, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], &refresh).replace("level: debug", "level: trace"),
    );
    let mut d = c.start();
    d.wait_metric(&issuer_refreshes(OTP, "auth_failure"), 1.0, 10 * SEC).await;
    c.set_password("ims", IMS_SECRET);
    wait_accepted(&c, &[ALICE, BOB], &[], 10 * SEC).await;
    let first: Vec<String> = [ALICE, BOB].iter().map(|x| c.read_token(x.0).unwrap()).collect();
    wait_accepted(&c, &[ALICE, BOB], &first, 15 * SEC).await;
    let secrets = c.guard().secrets();
    let s = c.server.secrets();
    assert!(secrets.iter().any(|x| x == IMS_SECRET));
    assert!(s.otps().len() >= 4 && s.issuer_tokens().len() == 1, "the codes and the IMS token are scanned for");
    d.assert_secrets_hidden(&secrets).await;
    let otp_trace = d.logs().lines().filter(|l| l.contains("\"level\":\"TRACE\"")).count();
    let otp_lines = d.logs().lines().count();
    assert_eq!(d.stop().await.code(), Some(0));
    println!(
        "secrets: login_as_customer (2FA, a wrong then the right admin password, once): {lac_count} secret forms, none in \
         {lines} log lines ({trace_lines} trace), /status, /metrics or once's output; cloud_service_otp (a wrong then the \
         right IMS secret): {} secret forms ({} one-time codes), none in {otp_lines} log lines ({otp_trace} trace), /status \
         or /metrics",
        secrets.len(),
        s.otps().len()
    );
}

// ---------------------------------------------------------------------------------------------
// 10. `check` refuses what cannot work, naming the key

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_combinations_that_cannot_work_naming_the_key() {
    let w = lac_world(&[ALICE], true, |_| {}).await;
    let config = w.config_path().display().to_string();
    let check = |text: String| {
        w.write_config(&text);
        run_to_end(&["check", "--config", &config])
    };
    let good = lac_config(&w, &[(ALICE.0, ALICE.1)], "", true);
    let (code, out, err) = check(good.clone());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok (1 customer"), "{out}");

    w.set_password("alice", ALICE.2);
    let with_password = good.replace(
        &format!("    username: {}\n", ALICE.1),
        &format!("    username: {}\n    password_file: {}\n", ALICE.1, w.secret_path("alice").display()),
    );
    let no_admin = good.split("auth:\n").next().unwrap().to_owned() + "auth:\n  method: login_as_customer\n";
    let cloud = good.replace("  timeout: 2s\n", "  timeout: 2s\n  cloud_service: true\n");
    let c = cloud_world(&[ALICE], |_| {}).await;
    let no_id = otp_config(&c, &[(ALICE.0, ALICE.1)], "");
    let id_line = format!("    customer_id: {}\n", c.server.customer_id(ALICE.1).unwrap());
    assert!(no_id.contains(&id_line));
    let no_id = no_id.replace(&id_line, "");
    for (what, text, key) in [
        ("a customer password with login_as_customer", with_password, "customers[0].password_file"),
        ("no customer_id with cloud_service_otp", no_id, "customers[0].customer_id"),
        ("login_as_customer on the cloud service", cloud, "auth.method"),
        ("login_as_customer without auth.admin", no_admin, "auth.admin"),
    ] {
        let (code, out, err) = check(text);
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert!(err.contains(key), "{what}: names {key}: {err}");
        println!("check, {what}: exit {code}: {}", err.lines().find(|l| l.contains(key)).unwrap_or_default().trim());
    }
}

// ---------------------------------------------------------------------------------------------
// forget-failures auth.admin

/// The admin's budget spent by a wrong password; the operator sets that password in Magento
/// instead of fixing the file (the daemon's secret did not change, so it stays held back), then
/// runs `forget-failures auth.admin`: the daemon tries again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_failures_auth_admin_lets_the_held_back_issuer_try_again() {
    let w = lac_world(&[ALICE], false, |o| {
        o.cron = false;
        o.lock_timeout = SEC;
    })
    .await;
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    w.write_config(&lac_config(&w, &[(ALICE.0, ALICE.1)], SCALED, false));
    let mut d = w.start();
    d.wait_metric(&issuer_series("magento_token_issuer_held_back", LAC), 1.0, 10 * SEC).await;
    assert_eq!(w.server.admin_failures(ADMIN), 3);
    w.server.add_admin(ADMIN, WRONG_ADMIN_PASSWORD, None).unwrap();
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(w.server.issuer_counts().admin_refusals, 3, "held back until told");
    let config = w.config_path().display().to_string();
    let (code, out, err) = run_to_end(&["forget-failures", "--config", &config, "auth.admin"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("auth.admin: the daemon's count of failed logins is forgotten"), "{out}");
    wait_accepted(&w, &[ALICE], &[], 10 * SEC).await;
    assert!(d.logs().contains("forget-failures"), "the log says why it tried again");
    assert_eq!(w.server.admin_failures(ADMIN), 0);
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// The admin's 401s across a restart, and a reload that keeps the admin token

/// A pod restarted with the same wrong admin password (a crash loop, a rollout) must not spend
/// the admin's budget again: the 401s are recorded beside the token files (`.issuer`), and the
/// new process starts held back. With `totp`, the admin has 2FA and the TOTP secret file is set.
async fn a_restart_remembers_the_admins_401s(totp: bool) {
    let w = lac_world(&[ALICE], totp, |o| {
        o.cron = false;
        o.lock_timeout = SEC;
    })
    .await;
    w.set_password("admin", WRONG_ADMIN_PASSWORD);
    w.write_config(&lac_config(&w, &[(ALICE.0, ALICE.1)], SCALED, totp));
    let mut d = w.start();
    d.wait_metric(&issuer_series("magento_token_issuer_held_back", LAC), 1.0, 10 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
    assert_eq!(w.server.issuer_counts().admin_refusals, 3);
    // What is recorded beside the token files holds no secret.
    for entry in std::fs::read_dir(w.tokens()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with('.') {
            let text = String::from_utf8_lossy(&std::fs::read(entry.path()).unwrap()).into_owned();
            w.assert_no_secret(&entry.file_name().to_string_lossy(), &text);
        }
    }

    let mut d = w.start();
    let issuer = wait_issuer(&d, "held back by the recorded 401s", 10 * SEC, |i| !i["last_error"].is_null()).await;
    tokio::time::sleep(3 * SEC).await;
    let counts = w.server.issuer_counts();
    let highest = w.server.admin_max_failure_count(ADMIN);
    println!(
        "a restart with the same wrong admin password (2FA: {totp}): {} admin logins in all, highest count {highest}; \
         issuer after the restart: {}: {}",
        counts.admin_refusals,
        issuer["state"],
        message(&issuer)
    );
    assert_eq!(counts.admin_refusals, 3, "the restarted daemon sent an admin login with the refused password");
    assert!(highest <= 4, "{highest}");
    assert_eq!(issuer["state"], "held_back", "{issuer}");
    assert_eq!(d.status_of(ALICE.0).await["last_error"]["class"], "issuer");

    // The fixed file still goes through at once.
    w.set_password("admin", ADMIN_PASSWORD);
    wait_accepted(&w, &[ALICE], &[], 10 * SEC).await;
    assert_eq!(w.server.issuer_counts().admin_tokens, 1);
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_remembers_the_admins_401s_without_2fa() {
    a_restart_remembers_the_admins_401s(false).await;
}

/// Was a daemon bug: with `totp_secret_file` set, the restarted daemon sent one more admin login
/// with the refused password at once, and a fixed password file was then no longer picked up
/// (the budget spent). The issuer's lockout identity is the password plus a digest of the TOTP
/// secret, and the ledger was restored with the bare password: the two never matched. It is now
/// restored with the identity (`Issuer::restore_ledger`, for `run` and `once` alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_remembers_the_admins_401s_with_2fa() {
    a_restart_remembers_the_admins_401s(true).await;
}

/// A reload that restarts every worker (a changed refresh setting) keeps the issuer and its
/// token: no second admin login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_admin_token() {
    let w = lac_world(&[ALICE, BOB], true, |_| {}).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let text = lac_config(&w, &customers, "", true);
    w.write_config(&text);
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    w.write_config(&text.replace("  min_backoff: 100ms", "  min_backoff: 150ms"));
    d.signal("HUP");
    d.wait_metric("magento_token_config_reloads_total{result=\"success\"}", 1.0, 10 * SEC).await;
    tokio::time::sleep(2 * SEC).await;
    for (name, email, _) in [ALICE, BOB] {
        assert!(accepted(&w, name, email));
    }
    assert_eq!(w.server.issuer_counts().admin_tokens, 1, "the reload kept the admin token");
    assert_eq!(issuer_status(&d).await["state"], "fresh");
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// The cloud service's per-customer refusals

/// A customer id Magento does not know, and a customer who has not allowed remote shopping
/// assistance (the code route's 500): each named on its own customer; the IMS token stays, and
/// the third customer gets tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_service_otp_names_a_wrong_customer_id_and_a_customer_without_the_opt_in() {
    let w = cloud_world(&[ALICE, BOB], |_| {}).await;
    w.server.set_assistance_allowed(BOB.1, false);
    let text = otp_config(&w, &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "");
    assert_eq!(text.matches("auth:\n").count(), 1);
    let carol = format!("  - name: {}\n    username: {}\n    customer_id: 999\nauth:\n", CAROL.0, CAROL.1);
    w.write_config(&text.replace("auth:\n", &carol));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE], &[], 10 * SEC).await;
    let bob = wait_status(&d, BOB.0, "the code route's 500", 10 * SEC, |s| !s["last_error"].is_null()).await;
    assert!(message(&bob).contains("allow_remote_shopping_assistance"), "says what the customer must allow: {bob}");
    let carol = wait_status(&d, CAROL.0, "the unknown id", 10 * SEC, |s| !s["last_error"].is_null()).await;
    assert!(message(&carol).contains("customer_id"), "says what to correct: {carol}");
    assert_eq!(carol["last_error"]["class"], "blocked", "{carol}");
    tokio::time::sleep(2 * SEC).await;
    assert!(w.read_token(BOB.0).is_none() && w.read_token(CAROL.0).is_none());
    let counts = w.server.issuer_counts();
    assert_eq!(counts.ims_tokens, 1, "a customer's refusal is not the IMS token's: {counts:?}");
    assert_eq!(issuer_status(&d).await["state"], "fresh");
    assert_eq!(d.metric(&issuer_refreshes(OTP, "auth_failure")).await, Some(0.0));
    println!("cloud_service_otp refusals: bob (no opt-in): {}; carol (id 999): {}", message(&bob), message(&carol));

    w.server.set_assistance_allowed(BOB.1, true);
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    assert_eq!(w.server.issuer_counts().ims_tokens, 1);
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// A customer's minted token revoked

/// A customer's token revoked in Magento (a logout, an admin's "Force Sign-In"): the check of the
/// token on disk sees it, and a new one is minted with the admin token (no admin login, no
/// password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_customer_token_is_replaced_by_a_new_mint() {
    let w = lac_world(&[ALICE, BOB], false, |_| {}).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    w.write_config(&lac_config(&w, &customers, "  validate_every: 2s\n", false));
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    let first = w.read_token(ALICE.0).unwrap();
    let bob = w.read_token(BOB.0).unwrap();
    w.server.revoke(ALICE.1);
    assert!(!accepted(&w, ALICE.0, ALICE.1));
    let timer = Instant::now();
    wait_accepted(&w, &[ALICE], &[first], 10 * SEC).await;
    let took = timer.elapsed();
    println!("a revoked customer token (validate_every 2s) replaced by a new mint after {:.2}s", took.as_secs_f64());
    // The next check (2 s), the wait after a revocation (1.1 s), and 4 s for a busy machine.
    assert!(took < 8 * SEC, "{took:?}");
    assert_eq!(w.read_token(BOB.0), Some(bob), "bob's token was left alone");
    let counts = w.server.issuer_counts();
    assert_eq!((counts.admin_tokens, counts.login_as_customer_tokens), (1, 3), "{counts:?}");
    assert_eq!(customer_logins(&w), 0);
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// A slow answer that comes back after the admin token was already replaced

/// A reverse proxy before the dev server that relays every request, holding back those whose
/// body names one of `delays`' emails for its delay while `slow` is set: a store whose PHP takes
/// its time for some requests (the dev server's `login_latency` applies to customer logins only).
struct SlowFront {
    addr: std::net::SocketAddr,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowFront {
    async fn start(upstream: String, delays: Vec<(&'static str, Duration)>) -> SlowFront {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = slow.clone();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (flag, client, upstream, delays) = (flag.clone(), client.clone(), upstream.clone(), delays.clone());
                tokio::spawn(async move {
                    // One request after another on the connection (keep-alive).
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if head.len() > 64 * 1024 || conn.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        let text = String::from_utf8_lossy(&head).into_owned();
                        let mut lines = text.split("\r\n");
                        let first: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
                        let [method, target, ..] = first[..] else { return };
                        let mut headers = Vec::new();
                        let mut length = 0;
                        for line in lines.filter(|l| !l.is_empty()) {
                            let Some((name, value)) = line.split_once(':') else { continue };
                            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
                            match name.as_str() {
                                "content-length" => length = value.parse().unwrap_or(0),
                                "host" | "connection" | "transfer-encoding" => {}
                                _ => headers.push((name, value)),
                            }
                        }
                        let mut body = vec![0u8; length];
                        if conn.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let named = String::from_utf8_lossy(&body).into_owned();
                        let delay = delays.iter().find(|(email, _)| named.contains(email)).map(|(_, d)| *d);
                        if let (true, Some(delay)) = (flag.load(Ordering::SeqCst), delay) {
                            tokio::time::sleep(delay).await;
                        }
                        let mut request = client.request(method.parse().unwrap(), format!("{upstream}{target}"));
                        for (name, value) in headers {
                            request = request.header(name, value);
                        }
                        let Ok(response) = request.body(body).send().await else { return };
                        let status = response.status();
                        let kind =
                            response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        let answer = response.bytes().await.unwrap_or_default();
                        let mut out = format!(
                            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\n",
                            status.as_u16(),
                            status.canonical_reason().unwrap_or("Status"),
                            answer.len()
                        );
                        if let Some(kind) = kind {
                            out.push_str(&format!("content-type: {kind}\r\n"));
                        }
                        out.push_str("\r\n");
                        if conn.write_all(out.as_bytes()).await.is_err() || conn.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowFront { addr, slow, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_slow(&self, on: bool) {
        self.slow.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SlowFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Was a daemon bug: two customers mint with the same admin token when Magento stops accepting
/// it, both answered slowly. Alice's refusal comes back after 1 s: the issuer drops the token and
/// gets a new one 1.1 s later. Bob's (3 s) comes back after the new admin token is out, and bob
/// was held back "until the issuer has a credential" for `max_backoff` (here 60 s), since the
/// refusal named the credential's generation as it was when the answer came back. It now names
/// the generation the request was sent with, so a credential replaced meanwhile is tried at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refusal_after_the_admin_token_was_replaced_does_not_hold_the_customer_back() {
    let w = lac_world(&[ALICE, BOB], false, |o| o.opaque_token_lifetime = Some(Duration::from_secs(7200))).await;
    let front = SlowFront::start(w.server.base_url(), vec![(ALICE.1, SEC), (BOB.1, 3 * SEC)]).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let text = lac_config(&w, &customers, &lifetimes(10), false)
        .replace(&format!("  base_url: {}\n", w.server.base_url()), &format!("  base_url: {}\n", front.url()))
        .replace("  max_backoff: 1s\n", "  max_backoff: 60s\n")
        .replace("  timeout: 2s\n", "  timeout: 10s\n");
    assert!(text.contains(&front.url()) && text.contains("max_backoff: 60s") && text.contains("timeout: 10s"));
    w.write_config(&text);
    let mut d = w.start();
    wait_accepted(&w, &[ALICE, BOB], &[], 10 * SEC).await;
    let old: Vec<String> = [ALICE, BOB].iter().map(|c| w.read_token(c.0).unwrap()).collect();

    // Magento stops accepting the admin token (its clock moves an hour); both customers' next
    // requests are slow, and sent within milliseconds of each other (their tokens were minted
    // together): bob's is on its way with the old admin token when alice's refusal comes back.
    front.set_slow(true);
    w.server.advance_clock(Duration::from_secs(3601));
    let changed = SystemTime::now();
    let timer = Instant::now();
    wait_for(15 * SEC, "a second admin token", || async { (w.server.issuer_counts().admin_tokens == 2).then_some(()) })
        .await;
    wait_accepted(&w, &[ALICE], &old[..1], 10 * SEC).await;
    let alice = timer.elapsed();
    // Bob: his next refresh (5 s), his slow refusal (3 s), one more slow request with the new
    // admin token (3 s), and 9 s for a busy machine: well under max_backoff (60 s).
    let renewed = || accepted(&w, BOB.0, BOB.1) && w.read_token(BOB.0).as_ref() != Some(&old[1]);
    while !renewed() && timer.elapsed() < 20 * SEC {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bob = timer.elapsed();
    let sent: Vec<String> = requests_on(&w, Route::GraphQlLoginAsAdmin)
        .iter()
        .filter(|r| r.username.as_deref() == Some(BOB.1))
        .map(|r| format!("{:+.1}s: {}", signed_secs(r.at, changed), r.status))
        .collect();
    assert!(
        renewed(),
        "bob has no new token {bob:?} after the change, with the issuer {} and bob {}; bob's requests (from the change): {sent:?}",
        issuer_status(&d).await,
        d.status_of(BOB.0).await
    );
    println!(
        "a slow refusal after the admin token was replaced: alice's new token after {:.2}s, bob's after {:.2}s",
        alice.as_secs_f64(),
        bob.as_secs_f64()
    );
    front.set_slow(false);
    assert_eq!(w.server.issuer_counts().admin_tokens, 2);
    assert_eq!(d.stop().await.code(), Some(0));
}
