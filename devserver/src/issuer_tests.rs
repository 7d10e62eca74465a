//! Customer tokens without customer passwords over real HTTP on loopback: the admin token with and
//! without 2FA, the admin's throttle row and lock, `generateCustomerTokenAsAdmin`, the IMS
//! stand-in, one-time codes and their exchange (shared/magento-other-paths.md §5, §6, §9). Time
//! moves with [`DevServer::advance_clock`], never by sleeping.

use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::{decode_secret, totp_at};
use crate::graphql::tests::{field_error, post, NOT_AUTHORIZED};
use crate::tests::{claims, client, me, send, server, token, Answer, Cli, SIGN_IN};
use crate::{CloudService, DevServer, DevServerOptions, GraphQlConvention, Route};

const ALICE: &str = "alice@example.com";
const ROBOT: &str = "token-robot";
const ROBOT_PASSWORD: &str = "r0bot-pass";
/// RFC 6238's SHA-1 seed in base32.
const SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
const PATH_ADMIN: &str = "/rest/V1/integration/admin/token";
const PATH_GOOGLE: &str = "/rest/V1/tfa/provider/google/authenticate";
const TWO_FACTOR: &str = "Please use the 2fa provider-specific endpoints to obtain a token.";
const AS_ADMIN: &str = "mutation($e:String!){generateCustomerTokenAsAdmin(input:{customer_email:$e}){customer_token}}";
const AS_ADMIN_AT: (i64, i64) = (1, 22);
const EXCHANGE: &str = "mutation($e:String!,$o:String!){exchangeOtpForCustomerToken(email:$e,otp:$o){token}}";
const EXCHANGE_AT: (i64, i64) = (1, 33);
const TENANT: &str = "Ab3dEfGh1jK2";
const ORG: &str = "ABCDEF0123@AdobeOrg";

async fn post_json(s: &DevServer, path: &str, body: Value) -> Answer {
    send(
        client()
            .post(format!("{}{path}", s.base_url()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_string()),
    )
    .await
}

async fn admin_login(s: &DevServer, user: &str, password: &str) -> Answer {
    post_json(s, PATH_ADMIN, json!({"username": user, "password": password})).await
}

async fn google(s: &DevServer, user: &str, password: &str, otp: &str) -> Answer {
    post_json(s, PATH_GOOGLE, json!({"username": user, "password": password, "otp": otp})).await
}

async fn admin_token(s: &DevServer) -> String {
    let a = admin_login(s, ROBOT, ROBOT_PASSWORD).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json().as_str().unwrap().to_owned()
}

/// A server with alice and an admin without 2FA.
async fn admin_server(opts: DevServerOptions) -> DevServer {
    let s = server(opts).await;
    s.add_admin(ROBOT, ROBOT_PASSWORD, None).unwrap();
    s
}

fn message(m: &str) -> Value {
    json!({"message": m})
}

#[tokio::test]
async fn admin_token_is_a_jwt_of_user_type_2_living_the_admin_lifetime() {
    let s =
        admin_server(DevServerOptions { admin_token_lifetime: Duration::from_secs(900), ..Default::default() }).await;
    for path in [PATH_ADMIN, "/rest/default/V1/integration/admin/token", "/rest/all/V1/integration/admin/token"] {
        let a = post_json(&s, path, json!({"username": "Token-Robot", "password": ROBOT_PASSWORD})).await;
        assert_eq!(a.status, 200, "{path}");
        let t = a.json().as_str().unwrap().to_owned();
        let c = claims(&t);
        assert_eq!(c["utypid"], 2, "{path}");
        assert_eq!(c["uid"], 1);
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900);
        // Not a customer's token: customers/me refuses it.
        assert_eq!(me(&s, &t).await.status, 401);
    }
    assert_eq!(s.issuer_counts().admin_tokens, 3);
    assert_eq!(s.requests_to(Route::AdminToken), 3);
    let r = s.requests().into_iter().find(|r| r.route == Route::AdminToken).unwrap();
    assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("Token-Robot"), None), "no admin password kept");
    assert!(s.secrets().issuer_credentials().contains(&ROBOT_PASSWORD.to_owned()));
    assert_eq!(s.secrets().issuer_tokens().len(), 3);
}

#[tokio::test]
async fn admin_token_refusals_are_the_generic_401_and_its_400s() {
    let s = admin_server(DevServerOptions::default()).await;
    for (user, password) in [(ROBOT, "wrong"), ("nobody", ROBOT_PASSWORD), (ALICE, "secret-a")] {
        let a = admin_login(&s, user, password).await;
        assert_eq!((a.status, a.json()), (401, message(SIGN_IN)), "{user}");
    }
    let a = post_json(&s, PATH_ADMIN, json!({})).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["message"], "One or more input exceptions have occurred.");
    let a = post_json(&s, PATH_ADMIN, json!({"username": ROBOT})).await;
    assert_eq!(
        (a.status, a.json()),
        (
            400,
            json!({"message": "\"%fieldName\" is required. Enter and try again.", "parameters": {"fieldName": "password"}})
        )
    );
    let a = send(client().get(format!("{}{PATH_ADMIN}", s.base_url())).header("accept", "application/json")).await;
    assert_eq!((a.status, a.json()), (404, message("Request does not match any route.")));
    assert_eq!(s.issuer_counts().admin_refusals, 3);
}

#[tokio::test]
async fn admin_rows_are_kept_apart_from_customer_rows() {
    let s = admin_server(DevServerOptions::default()).await;
    s.add_customer(ROBOT, "customer-pass");
    assert_eq!(admin_login(&s, ROBOT, "wrong").await.status, 401);
    assert_eq!((s.admin_failures(ROBOT), s.failures(ROBOT)), (1, 0));
    assert_eq!(crate::tests::login(&s, ROBOT, "wrong").await.status, 401);
    assert_eq!((s.admin_failures(ROBOT), s.failures(ROBOT)), (1, 1));
    // A success resets only its own row.
    admin_token(&s).await;
    assert_eq!((s.admin_failures(ROBOT), s.failures(ROBOT)), (0, 1));
    assert_eq!(s.admin_max_failure_count(ROBOT), 1);
}

#[tokio::test]
async fn admin_throttle_locks_at_six_and_lifts_after_the_window() {
    // The admin user lock off, to see the throttle row alone.
    let s = admin_server(DevServerOptions { admin_lock_failures: 0, ..Default::default() }).await;
    for i in 1..=6 {
        assert_eq!(admin_login(&s, ROBOT, "wrong").await.status, 401);
        assert_eq!(s.admin_failures(ROBOT), i);
    }
    assert!(s.admin_throttled(ROBOT));
    let a = admin_login(&s, ROBOT, ROBOT_PASSWORD).await;
    assert_eq!((a.status, a.json()), (401, message(SIGN_IN)), "the right password is refused while throttled");
    assert_eq!(s.admin_failures(ROBOT), 6, "refusals while throttled are not counted");
    s.advance_clock(Duration::from_secs(1800));
    assert!(!s.admin_throttled(ROBOT));
    admin_token(&s).await;
    assert_eq!((s.admin_failures(ROBOT), s.admin_max_failure_count(ROBOT)), (0, 6));
}

#[tokio::test]
async fn admin_user_lock_refuses_the_right_password_until_it_expires() {
    let s = admin_server(DevServerOptions {
        admin_lock_failures: 3,
        admin_lock_duration: Duration::from_secs(60),
        lock_max_failures: 100,
        ..Default::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(admin_login(&s, ROBOT, "wrong").await.status, 401);
    }
    assert!(s.admin_locked(ROBOT));
    assert!(!s.admin_throttled(ROBOT));
    assert_eq!(admin_login(&s, ROBOT, ROBOT_PASSWORD).await.status, 401);
    assert_eq!(s.admin_failures(ROBOT), 4, "a refusal by the lock counts in the throttle row");
    s.advance_clock(Duration::from_secs(61));
    assert!(!s.admin_locked(ROBOT));
    admin_token(&s).await;
}

async fn two_factor_server(opts: DevServerOptions) -> DevServer {
    let s = server(opts).await;
    s.add_admin(ROBOT, ROBOT_PASSWORD, Some(SECRET)).unwrap();
    s
}

#[tokio::test]
async fn two_factor_refuses_the_token_route_after_the_credentials() {
    let s = two_factor_server(DevServerOptions::default()).await;
    let a = admin_login(&s, ROBOT, ROBOT_PASSWORD).await;
    assert_eq!(
        (a.status, a.json()),
        (400, json!({"message": TWO_FACTOR, "parameters": {"active_providers": ["google"]}}))
    );
    let a = admin_login(&s, ROBOT, "wrong").await;
    assert_eq!((a.status, a.json()), (401, message(SIGN_IN)), "a wrong password is still the 401");
    assert_eq!(s.admin_failures(ROBOT), 1);
    // 2FA off store-wide: the token route issues, the provider routes are gone.
    s.set_two_factor(false);
    assert_eq!(claims(&admin_token(&s).await)["utypid"], 2);
    let code = s.totp_code(SECRET).unwrap();
    assert_eq!(google(&s, ROBOT, ROBOT_PASSWORD, &code).await.status, 404);
    // An admin without a secret never needs 2FA.
    s.set_two_factor(true);
    s.add_admin("plain", "plain-pass", None).unwrap();
    assert_eq!(admin_login(&s, "plain", "plain-pass").await.status, 200);
    let a = google(&s, "plain", "plain-pass", "123456").await;
    assert_eq!((a.status, a.json()), (400, message("Provider is not allowed.")));
}

#[tokio::test]
async fn google_provider_checks_the_password_then_the_current_and_previous_step() {
    let s = two_factor_server(DevServerOptions::default()).await;
    let seed = decode_secret(SECRET).unwrap();
    let now = s.shared.cfg.unix_now();
    let code = totp_at(&seed, now);
    assert!(s.totp_code(SECRET).is_some_and(|c| c.len() == 6 && c.bytes().all(|b| b.is_ascii_digit())));
    assert_eq!(s.totp_code("not base32!"), None);
    // The password first: a wrong one is the generic 401 whatever the code.
    let a = google(&s, ROBOT, "wrong", &code).await;
    assert_eq!((a.status, a.json()), (401, message(SIGN_IN)));
    assert_eq!(s.admin_failures(ROBOT), 1);
    let a = google(&s, ROBOT, ROBOT_PASSWORD, &code).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let t = a.json().as_str().unwrap().to_owned();
    assert_eq!(claims(&t)["utypid"], 2);
    assert_eq!(s.admin_failures(ROBOT), 0, "a success deletes the row");
    // One step later the code is the previous step's: still good.
    s.advance_clock(Duration::from_secs(30));
    assert_eq!(google(&s, ROBOT, ROBOT_PASSWORD, &code).await.status, 200);
    // Two steps later it is not: a failure of the admin account.
    s.advance_clock(Duration::from_secs(30));
    let a = google(&s, ROBOT, ROBOT_PASSWORD, &code).await;
    assert_eq!((a.status, a.json()), (401, message("Invalid code.")));
    assert_eq!(s.admin_failures(ROBOT), 1);
    let a = post_json(&s, PATH_GOOGLE, json!({"username": ROBOT, "password": ROBOT_PASSWORD})).await;
    assert_eq!(a.json()["parameters"]["fieldName"], "otp");
    assert_eq!(s.requests_to(Route::TfaGoogle), 5);
    assert_eq!(s.issuer_counts().admin_tokens, 2);
    assert!(s.requests().iter().all(|r| r.password.is_none() || r.route != Route::TfaGoogle));
}

#[tokio::test]
async fn wrong_codes_lock_the_admin() {
    let s = two_factor_server(DevServerOptions {
        admin_lock_failures: 2,
        admin_lock_duration: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let seed = decode_secret(SECRET).unwrap();
    // A code of a step long past: never the current or previous one.
    let stale = totp_at(&seed, s.shared.cfg.unix_now() - 3600);
    for _ in 0..2 {
        assert_eq!(google(&s, ROBOT, ROBOT_PASSWORD, &stale).await.json(), message("Invalid code."));
    }
    assert!(s.admin_locked(ROBOT));
    let fresh = s.totp_code(SECRET).unwrap();
    assert_eq!(google(&s, ROBOT, ROBOT_PASSWORD, &fresh).await.json(), message(SIGN_IN));
}

async fn as_admin(s: &DevServer, bearer: Option<&str>, email: &str) -> Answer {
    post(s, None, bearer, json!({"query": AS_ADMIN, "variables": {"e": email}})).await
}

fn as_admin_error(message: &str, category: &str) -> Value {
    field_error(message, category, "generateCustomerTokenAsAdmin", AS_ADMIN_AT)
}

#[tokio::test]
async fn login_as_customer_checks_in_order_in_both_conventions() {
    for conv in [GraphQlConvention::V2_4_7, GraphQlConvention::V2_4_8] {
        let authz = if conv == GraphQlConvention::V2_4_8 { 403 } else { 200 };
        let s = admin_server(DevServerOptions { graphql_convention: conv, ..Default::default() }).await;
        let admin = admin_token(&s).await;
        let customer = token(&s, ALICE, "secret-a").await;
        let input = "graphql-input";
        let authorization = "graphql-authorization";
        let cases: Vec<(Option<&str>, &str, u16, Value)> = vec![
            (Some(&admin), "  ", 200, as_admin_error("Specify the \"customer email\" value.", input)),
            (None, ALICE, authz, as_admin_error(NOT_AUTHORIZED, authorization)),
            (Some(&customer), ALICE, authz, as_admin_error(NOT_AUTHORIZED, authorization)),
            // Login as Customer is off by default, as in Magento.
            (Some(&admin), ALICE, authz, as_admin_error("Login as Customer is disabled.", authorization)),
        ];
        for (bearer, email, status, body) in cases {
            let a = as_admin(&s, bearer, email).await;
            assert_eq!((a.status, a.json()), (status, body), "{conv:?} {email:?}");
        }
        s.set_login_as_customer(true);
        s.set_admin_acl(ROBOT, false, true);
        let a = as_admin(&s, Some(&admin), ALICE).await;
        assert_eq!((a.status, a.json()), (authz, as_admin_error("Login as Customer is disabled.", authorization)));
        s.set_admin_acl(ROBOT, true, false);
        let a = as_admin(&s, Some(&admin), ALICE).await;
        assert_eq!(
            (a.status, a.json()),
            (authz, as_admin_error("Allow remote shopping assistance is disabled.", authorization))
        );
        s.set_admin_acl(ROBOT, true, true);
        let a = as_admin(&s, Some(&admin), "nobody@example.com").await;
        assert_eq!((a.status, a.json()), (200, as_admin_error("Customer email provided does not exist", input)));
        let a = as_admin(&s, Some(&admin), "ALICE@example.com").await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let t = a.json()["data"]["generateCustomerTokenAsAdmin"]["customer_token"].as_str().unwrap().to_owned();
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()), "opaque, not a JWT: {t}");
        assert_eq!(me(&s, &t).await.json()["email"], ALICE);
        let a = post(&s, Some("default"), Some(&t), json!({"query": "{ customer { email } }"})).await;
        assert_eq!((a.status, a.json()), (200, json!({"data": {"customer": {"email": ALICE}}})));
        assert!(s.issued(&t));
        assert_eq!(s.issuer_counts().login_as_customer_tokens, 1);
        assert_eq!(s.requests_to(Route::GraphQlLoginAsAdmin), 8);
        let r = s.requests().into_iter().rev().find(|r| r.route == Route::GraphQlLoginAsAdmin).unwrap();
        assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("ALICE@example.com"), None));
    }
}

#[tokio::test]
async fn login_as_customer_looks_in_the_store_headers_website_and_takes_the_input_variable() {
    let s = admin_server(DevServerOptions {
        stores: vec![("default".into(), "base".into()), ("de".into(), "german".into())],
        login_as_customer: true,
        ..Default::default()
    })
    .await;
    let admin = admin_token(&s).await;
    let query = "mutation($i: GenerateCustomerTokenAsAdminInput!) { generateCustomerTokenAsAdmin(input: $i) { customer_token } }";
    let a = post(&s, Some("de"), Some(&admin), json!({"query": query, "variables": {"i": {"customer_email": ALICE}}}))
        .await;
    assert_eq!(a.json()["errors"][0]["message"], "Customer email provided does not exist");
    let a = post(&s, None, Some(&admin), json!({"query": query, "variables": {"i": {"customer_email": ALICE}}})).await;
    assert_eq!(a.json()["data"]["generateCustomerTokenAsAdmin"]["customer_token"].as_str().unwrap().len(), 32);
    // A literal input; a wrong input field is webonyx's.
    let literal = format!(
        "mutation {{ generateCustomerTokenAsAdmin(input: {{customer_email: \"{ALICE}\"}}) {{ customer_token }} }}"
    );
    assert_eq!(post(&s, None, Some(&admin), json!({"query": literal})).await.status, 200);
    let bad = "mutation { generateCustomerTokenAsAdmin(input: {email: \"a\"}) { customer_token } }";
    assert_eq!(
        post(&s, None, Some(&admin), json!({"query": bad})).await.json()["errors"][0]["message"],
        "Field \"email\" is not defined by type \"GenerateCustomerTokenAsAdminInput\"."
    );
}

#[tokio::test]
async fn login_as_customer_tokens_expire_after_the_opaque_lifetime_and_are_revocable() {
    let s = admin_server(DevServerOptions {
        login_as_customer: true,
        opaque_token_lifetime: Some(Duration::from_secs(600)),
        admin_token_lifetime: Duration::from_secs(7200),
        ..Default::default()
    })
    .await;
    let admin = admin_token(&s).await;
    let issue = || async {
        let a = as_admin(&s, Some(&admin), ALICE).await;
        a.json()["data"]["generateCustomerTokenAsAdmin"]["customer_token"].as_str().unwrap().to_owned()
    };
    let t = issue().await;
    s.advance_clock(Duration::from_secs(599));
    assert_eq!(me(&s, &t).await.status, 200);
    s.advance_clock(Duration::from_secs(1));
    assert_eq!(me(&s, &t).await.status, 401);
    let a = post(&s, None, Some(&t), json!({"query": "{ customer { email } }"})).await;
    assert_eq!((a.status, a.json()["errors"][0]["message"].clone()), (401, json!("Consumer key has expired")));
    let t = issue().await;
    assert_eq!(me(&s, &t).await.status, 200);
    s.revoke(ALICE);
    assert_eq!(me(&s, &t).await.status, 401);
    // An admin token dies at its own exp.
    s.advance_clock(Duration::from_secs(7200));
    let a = as_admin(&s, Some(&admin), ALICE).await;
    assert_eq!((a.status, a.json()["errors"][0]["message"].clone()), (401, json!("Consumer key has expired")));
}

#[tokio::test]
async fn the_customers_own_opt_in_is_checked_only_when_told() {
    let s = admin_server(DevServerOptions { login_as_customer: true, ..Default::default() }).await;
    let admin = admin_token(&s).await;
    s.set_assistance_allowed(ALICE, false);
    assert_eq!(as_admin(&s, Some(&admin), ALICE).await.status, 200, "the source read does not check it");
    s.set_check_assistance_allowed(true);
    let a = as_admin(&s, Some(&admin), ALICE).await;
    assert_eq!(
        (a.status, a.json()),
        (403, as_admin_error("The customer has not allowed remote shopping assistance.", "graphql-authorization"))
    );
    s.set_assistance_allowed(ALICE, true);
    assert_eq!(as_admin(&s, Some(&admin), ALICE).await.status, 200);
}

async fn cloud_server(opts: DevServerOptions) -> DevServer {
    let s = server(DevServerOptions { cloud_service: Some(CloudService::new(TENANT)), ..opts }).await;
    s.add_ims_client("client-1", "ims-secret-1", ORG);
    s
}

async fn ims(s: &DevServer, form: &[(&str, &str)]) -> Answer {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    send(client().post(s.ims_token_url()).header("content-type", "application/x-www-form-urlencoded").body(body)).await
}

const SCOPE: &str =
    "openid,AdobeID,email,profile,additional_info.roles,additional_info.projectedProductContext,commerce.accs";

async fn ims_token(s: &DevServer) -> String {
    let a = ims(
        s,
        &[
            ("client_id", "client-1"),
            ("client_secret", "ims-secret-1"),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json()["access_token"].as_str().unwrap().to_owned()
}

async fn otp_request(s: &DevServer, id: &str, bearer: Option<&str>, key: &str, org: &str) -> Answer {
    let mut req = client()
        .post(format!("{}/V1/customer/{id}/otp", s.magento_base_url()))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("x-api-key", key)
        .header("x-gw-ims-org-id", org)
        .body(json!({"reason": "token sidecar"}).to_string());
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    send(req).await
}

async fn otp(s: &DevServer, bearer: &str) -> String {
    let id = s.customer_id(ALICE).unwrap().to_string();
    let a = otp_request(s, &id, Some(bearer), "client-1", ORG).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json()["otp"].as_str().unwrap().to_owned()
}

async fn exchange(s: &DevServer, email: &str, code: &str) -> Answer {
    post(s, None, None, json!({"query": EXCHANGE, "variables": {"e": email, "o": code}})).await
}

#[tokio::test]
async fn ims_issues_tokens_for_client_credentials_only() {
    let s =
        cloud_server(DevServerOptions { ims_token_lifetime: Duration::from_secs(86_399), ..Default::default() }).await;
    let a = ims(
        &s,
        &[
            ("client_id", "client-1"),
            ("client_secret", "ims-secret-1"),
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let body = a.json();
    assert_eq!((body["token_type"].clone(), body["expires_in"].clone()), (json!("bearer"), json!(86_399)));
    assert!(body["access_token"].as_str().unwrap().len() >= 64);
    type Case<'a> = (&'a [(&'a str, &'a str)], u16, &'a str);
    let cases: [Case; 4] = [
        (&[("client_secret", "ims-secret-1"), ("grant_type", "client_credentials")], 400, "invalid_request"),
        (
            &[("client_id", "nobody"), ("client_secret", "x"), ("grant_type", "client_credentials")],
            400,
            "invalid_client",
        ),
        (
            &[("client_id", "client-1"), ("client_secret", "wrong"), ("grant_type", "client_credentials")],
            401,
            "invalid_client",
        ),
        (
            &[("client_id", "client-1"), ("client_secret", "ims-secret-1"), ("grant_type", "password")],
            400,
            "unsupported_grant_type",
        ),
    ];
    for (form, status, error) in cases {
        let a = ims(&s, form).await;
        assert_eq!((a.status, a.json()["error"].clone()), (status, json!(error)), "{form:?}");
        assert!(!String::from_utf8_lossy(&a.body).contains("ims-secret-1"));
    }
    assert_eq!(s.issuer_counts().ims_tokens, 1);
    assert_eq!(s.requests_to(Route::ImsToken), 5);
    assert!(s.requests().iter().all(|r| r.password.is_none()), "no client secret kept");
    // On premises there is no IMS.
    let p = server(DevServerOptions::default()).await;
    let a = send(client().post(format!("{}/ims/token/v3", p.base_url()))).await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn otp_route_checks_token_key_org_acl_and_customer() {
    let s =
        cloud_server(DevServerOptions { ims_token_lifetime: Duration::from_secs(3600), ..Default::default() }).await;
    let t = ims_token(&s).await;
    let id = s.customer_id(ALICE).unwrap().to_string();
    let acl = json!({"message": "The consumer isn't authorized to access %resources.", "parameters": {"resources": "Magento_LoginAsCustomer::login"}});
    let a = otp_request(&s, &id, None, "client-1", ORG).await;
    assert_eq!((a.status, a.json()), (401, acl.clone()));
    let a = otp_request(&s, &id, Some("not-a-token"), "client-1", ORG).await;
    assert_eq!((a.status, a.json()), (401, acl.clone()));
    let a = otp_request(&s, &id, Some(&t), "client-2", ORG).await;
    assert_eq!((a.status, a.json()), (403, json!({"error_code": "403003", "message": "Api Key is invalid"})));
    let a = otp_request(&s, &id, Some(&t), "client-1", "OTHER@AdobeOrg").await;
    assert_eq!((a.status, a.json()), (403, acl.clone()));
    s.set_ims_client_acl("client-1", false);
    let a = otp_request(&s, &id, Some(&t), "client-1", ORG).await;
    assert_eq!((a.status, a.json()), (403, acl.clone()));
    s.set_ims_client_acl("client-1", true);
    let a = otp_request(&s, "999", Some(&t), "client-1", ORG).await;
    assert_eq!(
        (a.status, a.json()),
        (
            404,
            json!({"message": "No such entity with %fieldName = %fieldValue", "parameters": {"fieldName": "customerId", "fieldValue": "999"}})
        )
    );
    let a = otp_request(&s, "abc", Some(&t), "client-1", ORG).await;
    assert_eq!((a.status, a.json()["parameters"].clone()), (400, json!({"value": "abc", "type": "int"})));
    s.set_assistance_allowed(ALICE, false);
    let a = otp_request(&s, &id, Some(&t), "client-1", ORG).await;
    assert_eq!(a.status, 500, "assistance not allowed surfaces as a 500");
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("Internal Error. Details are available in Magento log file."));
    s.set_assistance_allowed(ALICE, true);
    let code = otp(&s, &t).await;
    assert_eq!(code.len(), 32);
    assert!(code.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(s.issuer_counts().otps_issued, 1);
    assert_eq!(s.requests_to(Route::CloudOtp), 9);
    assert_eq!(s.secrets().otps(), vec![code]);
    // The IMS token dies at its expires_in.
    s.advance_clock(Duration::from_secs(3600));
    assert_eq!(otp_request(&s, &id, Some(&t), "client-1", ORG).await.status, 401);
}

#[tokio::test]
async fn otp_exchange_is_single_use_bound_to_its_customer_and_expires() {
    for conv in [GraphQlConvention::V2_4_7, GraphQlConvention::V2_4_8] {
        let authn = if conv == GraphQlConvention::V2_4_8 { 401 } else { 200 };
        let s = cloud_server(DevServerOptions { graphql_convention: conv, ..Default::default() }).await;
        s.add_customer("bob@example.com", "secret-b");
        let t = ims_token(&s).await;
        let code = otp(&s, &t).await;
        let err = |m: &str| field_error(m, "graphql-authentication", "exchangeOtpForCustomerToken", EXCHANGE_AT);
        let a = exchange(&s, "bob@example.com", &code).await;
        assert_eq!((a.status, a.json()), (authn, err("The one-time password was not issued for this customer.")));
        let a = exchange(&s, ALICE, &code).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let token = a.json()["data"]["exchangeOtpForCustomerToken"]["token"].as_str().unwrap().to_owned();
        assert_eq!(claims(&token)["utypid"], 3, "a customer JWT");
        let a = post(&s, Some("default"), Some(&token), json!({"query": "{ customer { email } }"})).await;
        assert_eq!(a.json(), json!({"data": {"customer": {"email": ALICE}}}));
        let a = exchange(&s, ALICE, &code).await;
        assert_eq!((a.status, a.json()), (authn, err("The one-time password is invalid or has already been used.")));
        // Expiry: 30 s by default.
        let code = otp(&s, &t).await;
        s.advance_clock(Duration::from_secs(30));
        let a = exchange(&s, ALICE, &code).await;
        assert_eq!((a.status, a.json()), (authn, err("The one-time password has expired.")));
        // reCAPTCHA for customer login applies, before the code is looked at.
        let code = otp(&s, &t).await;
        s.set_recaptcha(true);
        let a = exchange(&s, ALICE, &code).await;
        assert_eq!(
            (a.status, a.json()),
            (
                200,
                field_error(
                    "ReCaptcha validation failed, please try again",
                    "graphql-input",
                    "exchangeOtpForCustomerToken",
                    EXCHANGE_AT
                )
            )
        );
        s.set_recaptcha(false);
        assert_eq!(exchange(&s, ALICE, &code).await.status, 200, "the refused attempt did not use the code up");
        assert_eq!((s.issuer_counts().otps_issued, s.issuer_counts().otps_exchanged), (3, 2));
        assert_eq!(s.requests_to(Route::GraphQlOtpExchange), 6);
        assert!(s.requests().iter().filter(|r| r.route == Route::GraphQlOtpExchange).all(|r| r.password.is_none()));
    }
}

#[tokio::test]
async fn otp_exchange_exists_only_on_the_cloud_service() {
    let s = server(DevServerOptions::default()).await;
    let a = exchange(&s, ALICE, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(
        (a.status, a.json()),
        (
            200,
            json!({"errors": [{"message": "Cannot query field \"exchangeOtpForCustomerToken\" on type \"Mutation\".", "locations": [{"line": 1, "column": 33}]}]})
        )
    );
    // And the cloud service has no admin token route.
    let c = cloud_server(DevServerOptions::default()).await;
    c.add_admin(ROBOT, ROBOT_PASSWORD, None).unwrap();
    let a = post_json(
        &c,
        &format!("/{TENANT}/V1/integration/admin/token"),
        json!({"username": ROBOT, "password": ROBOT_PASSWORD}),
    )
    .await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn cli_flags_of_the_issuers() {
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "devserver",
        "--customer",
        "alice@example.com:secret-a",
        "--admin",
        &format!("{ROBOT}:{ROBOT_PASSWORD}:{SECRET}"),
        "--admin",
        "plain:pa:ss:",
        "--admin-token-lifetime",
        "15m",
        "--admin-lock-failures",
        "2",
        "--login-as-customer",
        "--opaque-token-lifetime",
        "2h",
    ])
    .unwrap();
    let s = crate::cli::start_from_args(&cli.args).await.unwrap();
    assert_eq!(admin_login(&s, ROBOT, ROBOT_PASSWORD).await.json()["message"], TWO_FACTOR);
    let code = s.totp_code(SECRET).unwrap();
    let t = google(&s, ROBOT, ROBOT_PASSWORD, &code).await.json().as_str().unwrap().to_owned();
    let c = claims(&t);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 900);
    assert_eq!(admin_login(&s, "plain", "pa:ss").await.status, 200, "a password with ':' and an empty secret");
    assert_eq!(as_admin(&s, Some(&t), ALICE).await.status, 200, "Login as Customer is on");

    let cli = Cli::try_parse_from([
        "devserver",
        "--cloud-service",
        TENANT,
        "--customer",
        "alice@example.com:secret-a",
        "--ims-client",
        &format!("client-1:ims-secret-1:{ORG}"),
        "--otp-lifetime",
        "60s",
        "--no-2fa",
    ])
    .unwrap();
    let s = crate::cli::start_from_args(&cli.args).await.unwrap();
    let t = ims_token(&s).await;
    let code = otp(&s, &t).await;
    s.advance_clock(Duration::from_secs(45));
    assert_eq!(exchange(&s, ALICE, &code).await.status, 200, "a 60 s code lives past 30 s");
    let bad = Cli::try_parse_from(["devserver", "--ims-client", "id:secret"]).unwrap();
    assert!(crate::cli::start_from_args(&bad.args).await.is_err());
    let bad = Cli::try_parse_from(["devserver", "--admin", "x:y:not base32!"]).unwrap();
    assert!(crate::cli::start_from_args(&bad.args).await.is_err());
}
