//! The development server over real HTTP on loopback.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};

use super::*;

/// The dev server's command line as `clap` reads it, for the tests of its flags.
#[derive(clap::Parser)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) args: DevServerArgs,
}

const PATH_TOKEN: &str = "/rest/V1/integration/customer/token";
const PATH_ME: &str = "/rest/V1/customers/me";
const PATH_REVOKE: &str = "/rest/V1/integration/customer/revoke-customer-token";
pub(crate) const SIGN_IN: &str =
    "The account sign-in was incorrect or your account is disabled temporarily. Please wait and try again later.";

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

pub(crate) async fn server(opts: DevServerOptions) -> DevServer {
    let s = DevServer::start(opts).await.unwrap();
    s.add_customer("alice@example.com", "secret-a");
    s
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub(crate) async fn send(req: reqwest::RequestBuilder) -> Answer {
    let r = req.send().await.unwrap();
    Answer {
        status: r.status().as_u16(),
        content_type: r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

pub(crate) async fn login_at(s: &DevServer, path: &str, user: &str, pass: &str) -> Answer {
    send(
        client()
            .post(format!("{}{path}", s.base_url()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(json!({"username": user, "password": pass}).to_string()),
    )
    .await
}

pub(crate) async fn login(s: &DevServer, user: &str, pass: &str) -> Answer {
    login_at(s, PATH_TOKEN, user, pass).await
}

pub(crate) async fn token(s: &DevServer, user: &str, pass: &str) -> String {
    let a = login(s, user, pass).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json().as_str().unwrap().to_owned()
}

pub(crate) async fn me(s: &DevServer, token: &str) -> Answer {
    me_at(s, PATH_ME, token).await
}

pub(crate) async fn me_at(s: &DevServer, path: &str, token: &str) -> Answer {
    send(client().get(format!("{}{path}", s.base_url())).header("accept", "application/json").bearer_auth(token)).await
}

async fn revoke_at(s: &DevServer, path: &str, token: &str) -> Answer {
    send(client().post(format!("{}{path}", s.base_url())).header("accept", "application/json").bearer_auth(token)).await
}

/// Polls until `done` holds, at most `limit`: lock expiries are real time. The last look comes
/// after the limit, so a test the machine left without a CPU past it still sees what happened.
async fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let late = Instant::now() >= deadline;
        if done() {
            return;
        }
        assert!(!late, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most two seconds) for the Unix second to turn over; returns the new second.
pub(crate) async fn next_second() -> i64 {
    let start = unix_now();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // Late first: past the deadline the second has turned, whatever stalled this thread.
        let late = Instant::now() >= deadline;
        let now = unix_now();
        if now != start {
            return now;
        }
        assert!(!late, "the clock did not move");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn unauthorized_body() -> Value {
    json!({"message":"The consumer isn't authorized to access %resources.","parameters":{"resources":"self"}})
}

pub(crate) fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn jwt_shape_and_expiry() {
    let s = server(DevServerOptions::default()).await;
    let before = unix_now();
    let a = login(&s, "alice@example.com", "secret-a").await;
    let after = unix_now();
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, "application/json; charset=utf-8");
    assert!(a.body.starts_with(b"\"eyJraWQiOiIxIiwiYWxnIjoiSFMyNTYifQ."));
    let t = a.json().as_str().unwrap().to_owned();
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[0]).unwrap(), br#"{"kid":"1","alg":"HS256"}"#);
    let c = claims(&t);
    let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 4);
    assert_eq!(c["utypid"], 3);
    assert_eq!(c["uid"], 1);
    // The second the server made it: between the seconds read on either side of the request
    // (not within 2 s of a second read after it, which a stalled test can pass).
    let iat = c["iat"].as_i64().unwrap();
    assert!((before..=after).contains(&iat), "iat {iat}, request between {before} and {after}");
    assert_eq!(c["exp"].as_i64().unwrap() - iat, 3600);
    assert_eq!(s.check_token(&t).as_deref(), Some("alice@example.com"));
    // An earlier token stays valid after another login.
    let t2 = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(me(&s, &t).await.status, 200);
    assert_eq!(me(&s, &t2).await.status, 200);
}

#[tokio::test]
async fn clock_offset_and_lifetime() {
    let s = server(DevServerOptions {
        token_lifetime: Duration::from_secs(90),
        clock_offset_secs: -7200,
        ..Default::default()
    })
    .await;
    let before = unix_now();
    let t = token(&s, "alice@example.com", "secret-a").await;
    let after = unix_now();
    let c = claims(&t);
    let iat = c["iat"].as_i64().unwrap();
    assert!((before - 7200..=after - 7200).contains(&iat), "iat {iat}, request between {before} and {after}");
    assert_eq!(c["exp"].as_i64().unwrap() - iat, 90);
    assert_eq!(me(&s, &t).await.status, 200);
}

#[tokio::test]
async fn customers_me_accepts_and_refuses() {
    // Whole seconds: a token minted late in a second has a little over 3 s of life, time for
    // the first customers/me on a busy machine (a 3 s lifetime left a little over 2).
    let s = server(DevServerOptions { token_lifetime: Duration::from_secs(4), ..Default::default() }).await;
    let t = token(&s, "alice@example.com", "secret-a").await;
    let a = me(&s, &t).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["email"], "alice@example.com");
    assert_eq!(v["id"], 1);
    assert_eq!(v["website_id"], 1);
    assert_eq!(v["store_id"], 1);
    assert_eq!(v["addresses"], json!([]));
    assert_eq!(v["extension_attributes"], json!({"is_subscribed": false}));
    for key in
        ["group_id", "created_at", "updated_at", "created_in", "firstname", "lastname", "disable_auto_group_change"]
    {
        assert!(v.get(key).is_some(), "{key} missing");
    }
    // Tampered, garbled and missing tokens.
    // Flip one character of the signature's first (fully significant) position.
    let sig_at = t.rfind('.').unwrap() + 1;
    let mut tampered = t.clone();
    let flipped = if &t[sig_at..sig_at + 1] == "A" { "B" } else { "A" };
    tampered.replace_range(sig_at..sig_at + 1, flipped);
    for bad in [tampered.as_str(), "garbage", "a.b.c", ""] {
        let a = me(&s, bad).await;
        assert_eq!(a.status, 401, "{bad}");
        assert_eq!(a.json(), unauthorized_body());
    }
    let a = send(client().get(format!("{}{PATH_ME}", s.base_url()))).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json(), unauthorized_body());
    // Expiry (lifetime 4 s).
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(me(&s, &t).await.status, 401);
    assert_eq!(s.check_token(&t), None);
}

#[tokio::test]
async fn removed_customer_tokens_die() {
    let s = server(DevServerOptions::default()).await;
    let t = token(&s, "alice@example.com", "secret-a").await;
    s.remove_customer("alice@example.com");
    assert_eq!(me(&s, &t).await.status, 401);
    // Re-created under the same email: a new id, the old token stays dead.
    s.add_customer("alice@example.com", "secret-a");
    assert_eq!(me(&s, &t).await.status, 401);
    let t2 = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(claims(&t2)["uid"], 2);
    // Re-adding replaces the password and keeps the id.
    s.add_customer("alice@example.com", "other");
    assert_eq!(me(&s, &t2).await.status, 200);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 401);
    s.set_password("alice@example.com", "third");
    assert_eq!(login(&s, "alice@example.com", "third").await.status, 200);
}

#[tokio::test]
async fn revoke_endpoint_and_method() {
    let s = server(DevServerOptions::default()).await;
    s.add_customer("bob@example.com", "secret-b");
    let t1 = token(&s, "alice@example.com", "secret-a").await;
    let t2 = token(&s, "alice@example.com", "secret-a").await;
    let tb = token(&s, "bob@example.com", "secret-b").await;
    // Without a token: 401.
    let a = send(client().post(format!("{}{PATH_REVOKE}", s.base_url()))).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json(), unauthorized_body());
    let a = send(client().post(format!("{}{PATH_REVOKE}", s.base_url())).bearer_auth(&t1)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b"true");
    assert_eq!(me(&s, &t1).await.status, 401);
    assert_eq!(me(&s, &t2).await.status, 401);
    assert_eq!(me(&s, &tb).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(me(&s, &fresh).await.status, 200);
    // The API-side revoke.
    let before = unix_now();
    s.revoke("bob@example.com");
    assert_eq!(me(&s, &tb).await.status, 401);
    assert_eq!(s.check_token(&tb), None);
    // A login within the same second as the revoke is dead too (checked only when the
    // second did not roll over in between, which the clock may do at any time).
    let immediate = token(&s, "bob@example.com", "secret-b").await;
    if claims(&immediate)["iat"].as_i64().unwrap() == before {
        assert_eq!(me(&s, &immediate).await.status, 401, "login in the revoke's second must be dead");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = token(&s, "bob@example.com", "secret-b").await;
    assert_eq!(s.check_token(&later).as_deref(), Some("bob@example.com"));
}

#[tokio::test]
async fn stores_and_routes() {
    let s = DevServer::start(DevServerOptions {
        stores: vec![("default".into(), "base".into()), ("en".into(), "base".into()), ("de".into(), "german".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    s.add_customer("alice@example.com", "secret-a");
    s.add_customer_in_website("hans@example.de", "geheim", "german");
    for path in [
        "/rest/V1/integration/customer/token",
        "/rest/default/V1/integration/customer/token",
        "/rest/en/V1/integration/customer/token",
        "/rest/all/V1/integration/customer/token",
        "/rest/V1/integration/customer/token/",
    ] {
        assert_eq!(login_at(&s, path, "alice@example.com", "secret-a").await.status, 200, "{path}");
        assert_eq!(login_at(&s, path, "hans@example.de", "geheim").await.status, 401, "{path}");
    }
    // Email lookup is case-insensitive, within the store's website.
    assert_eq!(login(&s, "ALICE@example.com", "secret-a").await.status, 200);
    let a = login_at(&s, "/rest/de/V1/integration/customer/token", "hans@example.de", "geheim").await;
    assert_eq!(a.status, 200);
    let t = a.json().as_str().unwrap().to_owned();
    let v = me_at(&s, "/rest/de/V1/customers/me", &t).await.json();
    assert_eq!(v["website_id"], 2);
    assert_eq!(v["store_id"], 3);
    assert_eq!(
        login_at(&s, "/rest/de/V1/integration/customer/token", "alice@example.com", "secret-a").await.status,
        401
    );
    let not_found = json!({"message": "Request does not match any route."});
    let attempts_before = s.login_attempts("alice@example.com");
    let failures_before = s.failures("alice@example.com");
    for path in [
        "/rest/xx/V1/integration/customer/token",
        "/rest/V1/integration/customer/tokens",
        "/rest/V2/integration/customer/token",
        "/rest/de/de/V1/integration/customer/token",
        "/rest/admin/V1/integration/customer/token",
    ] {
        let a = login_at(&s, path, "alice@example.com", "secret-a").await;
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(a.json(), not_found);
    }
    // Aimed at the token endpoint through an unknown store: still a login attempt.
    assert_eq!(s.login_attempts("alice@example.com"), attempts_before + 2);
    assert_eq!(s.failures("alice@example.com"), failures_before, "a 404 is no failed login");
    // Wrong methods.
    let a = send(client().get(format!("{}{PATH_TOKEN}", s.base_url()))).await;
    assert_eq!((a.status, a.json()), (404, not_found.clone()));
    let a = send(client().post(format!("{}{PATH_ME}", s.base_url()))).await;
    assert_eq!((a.status, a.json()), (404, not_found.clone()));
    let a = send(client().delete(format!("{}{PATH_TOKEN}", s.base_url()))).await;
    assert_eq!((a.status, a.json()), (404, not_found));
    let a = send(client().patch(format!("{}{PATH_TOKEN}", s.base_url()))).await;
    assert_eq!((a.status, a.json()), (400, json!({"message": "Request method is invalid."})));
    // Outside /rest: the storefront's HTML 404.
    let a = send(client().get(format!("{}/customer/account", s.base_url()))).await;
    assert_eq!(a.status, 404);
    assert!(a.content_type.starts_with("text/html"));
}

async fn post_raw(s: &DevServer, content_type: Option<&str>, body: &str) -> Answer {
    let mut req = client()
        .post(format!("{}{PATH_TOKEN}", s.base_url()))
        .header("accept", "application/json")
        .body(body.to_owned());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    send(req).await
}

fn required(field: &str) -> Value {
    json!({"message": "\"%fieldName\" is required. Enter and try again.", "parameters": {"fieldName": field}})
}

#[tokio::test]
async fn token_endpoint_400_bodies() {
    let s = server(DevServerOptions::default()).await;
    let both = json!({
        "message": "One or more input exceptions have occurred.",
        "errors": [required("username"), required("password")],
    });
    let ct = Some("application/json");
    let cases: Vec<(Option<&str>, &str, Value)> = vec![
        (ct, r#"{"username":"alice@example.com"}"#, required("password")),
        (ct, r#"{"username":"alice@example.com","password":null}"#, required("password")),
        (ct, r#"{"username":"alice@example.com","password":""}"#, required("password")),
        (ct, r#"{"username":"alice@example.com","password":123}"#, required("password")),
        (ct, r#"{"username":"alice@example.com","password":["x"]}"#, required("password")),
        (ct, r#"{"password":"secret-a"}"#, required("username")),
        (ct, r#"{"username":"","password":"secret-a"}"#, required("username")),
        (ct, r#"{}"#, both.clone()),
        (ct, r#"{"user":"a","pass":"b"}"#, both.clone()),
        (ct, r#"[1,2]"#, both.clone()),
        (ct, r#""just a string""#, both.clone()),
        (ct, "", both.clone()),
        (None, "", both.clone()),
        (None, r#"{"username":"a","password":"b"}"#, json!({"message": "Content-Type header is empty."})),
        (ct, "{not json", json!({"message": "Decoding error."})),
        (ct, "   ", json!({"message": "Decoding error."})),
        (
            Some("text/plain"),
            r#"{"username":"a","password":"b"}"#,
            json!({"message": "Server cannot understand Content-Type HTTP header media type text/plain"}),
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "username=a&password=b",
            json!({"message": "Server cannot understand Content-Type HTTP header media type application/x-www-form-urlencoded"}),
        ),
        (
            Some("application/json; charset=iso-8859-1"),
            r#"{"username":"a","password":"b"}"#,
            json!({"message": "UTF-8 is the only supported charset."}),
        ),
    ];
    for (ct, body, expected) in cases {
        let a = post_raw(&s, ct, body).await;
        assert_eq!(a.status, 400, "{ct:?} {body}");
        assert_eq!(a.content_type, "application/json; charset=utf-8");
        assert_eq!(a.json(), expected, "{ct:?} {body}");
    }
    // Field order as Magento writes it.
    let a = post_raw(&s, ct, "{}").await;
    assert!(a.body.starts_with(b"{\"message\":\"One or more input exceptions have occurred.\",\"errors\":["));
    // PHP escapes slashes.
    let a = post_raw(&s, Some("text/plain"), "x").await;
    assert!(String::from_utf8_lossy(&a.body).contains("text\\/plain"));
    // None of these touched the throttle.
    assert_eq!(s.failures("alice@example.com"), 0);
    assert_eq!(s.failures("a"), 0);
    // Unknown keys are ignored; charset=utf-8 is fine.
    let a = post_raw(
        &s,
        Some("application/json; charset=UTF-8"),
        r#"{"username":"alice@example.com","password":"secret-a","extra":{"x":1}}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    // Wrong password: the 401 body.
    let a = login(&s, "alice@example.com", "wrong").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    let a = login(&s, "nobody@example.com", "wrong").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
}

#[tokio::test]
async fn xml_accept_and_xml_body() {
    let s = server(DevServerOptions::default()).await;
    let a = send(
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .header("content-type", "application/json")
            .header("accept", "application/xml")
            .body(json!({"username": "alice@example.com", "password": "secret-a"}).to_string()),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, "application/xml; charset=utf-8");
    let text = String::from_utf8(a.body).unwrap();
    let t =
        text.strip_prefix("<?xml version=\"1.0\"?>\n<response>").and_then(|r| r.strip_suffix("</response>\n")).unwrap();
    assert_eq!(s.check_token(t).as_deref(), Some("alice@example.com"));
    let a = send(
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .header("content-type", "text/xml")
            .header("accept", "text/xml")
            .body("<?xml version=\"1.0\"?><request><username>alice@example.com</username><password>wrong</password></request>"),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(String::from_utf8(a.body).unwrap().contains("<message>The account sign-in was incorrect"));
    let a = send(
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .header("content-type", "application/xml")
            .header("accept", "application/json")
            .body("<request><username>alice@example.com</username><password>secret-a</password></request>"),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = send(
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .header("content-type", "application/xml")
            .body("{\"username\":\"alice@example.com\"}"),
    )
    .await;
    assert_eq!((a.status, a.json()), (400, json!({"message": "Decoding error."})));
    let a = send(client().get(format!("{}{PATH_ME}", s.base_url())).header("accept", "text/html")).await;
    assert_eq!(a.status, 406);
}

#[tokio::test]
async fn recaptcha_required() {
    let s = server(DevServerOptions { recaptcha_required: true, ..Default::default() }).await;
    let a = login(&s, "alice@example.com", "secret-a").await;
    assert_eq!((a.status, a.json()), (400, json!({"message": "ReCaptcha validation failed, please try again"})));
    assert_eq!(s.login_attempts("alice@example.com"), 1);
    assert_eq!(s.failures("alice@example.com"), 0);
    s.set_recaptcha(false);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
}

/// Magento_ReCaptchaWebapiRest follows the store's "Enable for Customer Login" setting, which
/// an admin may flip at any time: 400 before the credentials are read, counted nowhere.
#[tokio::test]
async fn recaptcha_switches_at_run_time() {
    let s = server(DevServerOptions::default()).await;
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
    s.set_recaptcha(true);
    let recaptcha = json!({"message": "ReCaptcha validation failed, please try again"});
    for password in ["secret-a", "wrong"] {
        let a = login(&s, "alice@example.com", password).await;
        assert_eq!((a.status, a.json()), (400, recaptcha.clone()));
    }
    // Before the body is even decoded.
    let a = post_raw(&s, Some("application/json"), "{not json").await;
    assert_eq!((a.status, a.json()), (400, recaptcha));
    assert_eq!(s.failures("alice@example.com"), 0);
    assert_eq!(s.max_failure_count("alice@example.com"), 0);
    s.set_recaptcha(false);
    assert_eq!(login(&s, "alice@example.com", "wrong").await.status, 401);
    assert_eq!(s.failures("alice@example.com"), 1);
}

#[tokio::test]
async fn opaque_tokens() {
    let s =
        // Four seconds: Magento counts in whole seconds, so a token minted near the end of one
        // second lives a second less than its lifetime, and a busy machine may take a second
        // or more to get to the customers/me below.
        server(DevServerOptions { opaque_tokens: true, token_lifetime: Duration::from_secs(4), ..Default::default() })
            .await;
    let t = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(t.len(), 32);
    assert!(t.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
    let t2 = token(&s, "alice@example.com", "secret-a").await;
    assert_ne!(t, t2);
    assert_eq!(me(&s, &t).await.status, 200);
    assert_eq!(me(&s, &"0".repeat(32)).await.status, 401);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(me(&s, &t).await.status, 401);
}

#[tokio::test]
async fn throttle_locks_at_six_and_unlocks() {
    // Each failure keeps the count for lock_timeout more: 3 s, so that no request here comes
    // after the count of the one before has expired, however busy the machine (1 s left one).
    let s = server(DevServerOptions { lock_timeout: Duration::from_secs(3), ..Default::default() }).await;
    // A success resets the count.
    assert_eq!(login(&s, "alice@example.com", "bad").await.status, 401);
    assert_eq!(s.failures("alice@example.com"), 1);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
    assert_eq!(s.failures("alice@example.com"), 0);
    for i in 1..=5 {
        assert_eq!(login(&s, "alice@example.com", "bad").await.status, 401);
        assert_eq!(s.failures("alice@example.com"), i);
        assert!(!s.is_locked("alice@example.com"));
    }
    // The sixth failure in a row locks (the username's case does not matter).
    assert_eq!(login(&s, "ALICE@example.com", "bad").await.status, 401);
    assert_eq!(s.failures("alice@example.com"), 6);
    assert!(s.is_locked("alice@example.com"));
    let a = login(&s, "alice@example.com", "secret-a").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    assert_eq!(s.failures("alice@example.com"), 6, "refusals while locked are not counted");
    // Another username is not affected.
    s.add_customer("bob@example.com", "secret-b");
    assert_eq!(login(&s, "bob@example.com", "secret-b").await.status, 200);
    assert_eq!(s.login_attempts("alice@example.com"), 9);
    wait_until(Duration::from_secs(10), "the lock to expire", || !s.is_locked("alice@example.com")).await;
    assert_eq!(s.failures("alice@example.com"), 0);
    assert_eq!(s.failure_count("alice@example.com"), 0, "with cron the expired row is gone");
    assert_eq!(s.max_failure_count("alice@example.com"), 6);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
    // After expiry the count restarts at 1.
    assert_eq!(login(&s, "alice@example.com", "bad").await.status, 401);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(login(&s, "alice@example.com", "bad").await.status, 401);
    assert_eq!(s.failures("alice@example.com"), 1);
}

#[tokio::test]
async fn unknown_user_is_throttled_too() {
    let s = server(DevServerOptions::default()).await;
    for _ in 0..6 {
        assert_eq!(login(&s, "ghost@example.com", "x").await.status, 401);
    }
    assert!(s.is_locked("ghost@example.com"));
    s.add_customer("ghost@example.com", "x");
    assert_eq!(login(&s, "ghost@example.com", "x").await.status, 401);
}

#[test]
fn defaults_are_magentos() {
    let o = DevServerOptions::default();
    assert_eq!((o.lock_max_failures, o.lock_timeout), (6, Duration::from_secs(1800)));
    assert!(o.cron);
    assert_eq!((o.customer_lock_failures, o.customer_lock_duration), (10, Duration::from_secs(600)));
    assert_eq!(o.token_format, TokenFormat::Jwt);
    assert!(!o.opaque_tokens && !o.recaptcha_required);
}

/// A store whose cron never runs `outdated_authentication_failures_cleanup`: the expired row
/// keeps its count, the next failure adds to it (and locks again at once once the count is
/// at the maximum); only a successful token login deletes the row.
#[tokio::test]
async fn no_cron_keeps_the_count_after_expiry() {
    // 3 s: the lock must still hold at the request after the one that set it on a busy machine.
    let s = server(DevServerOptions { cron: false, lock_timeout: Duration::from_secs(3), ..Default::default() }).await;
    let alice = "alice@example.com";
    for _ in 0..2 {
        assert_eq!(login(&s, alice, "bad").await.status, 401);
    }
    wait_until(Duration::from_secs(10), "the row to expire", || s.failures(alice) == 0).await;
    assert_eq!(s.failure_count(alice), 2, "the expired row keeps its count");
    assert!(!s.is_locked(alice));
    assert_eq!(login(&s, alice, "bad").await.status, 401);
    assert_eq!((s.failures(alice), s.failure_count(alice)), (3, 3), "added to the old count");
    for _ in 0..3 {
        assert_eq!(login(&s, alice, "bad").await.status, 401);
    }
    assert!(s.is_locked(alice));
    let a = login(&s, alice, "secret-a").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    assert_eq!(s.failure_count(alice), 6, "refusals while locked are not counted");
    wait_until(Duration::from_secs(10), "the lock to expire", || !s.is_locked(alice)).await;
    assert_eq!((s.failures(alice), s.failure_count(alice)), (0, 6));
    // One more failure: 7 >= 6 with a fresh expiry, locked at once.
    assert_eq!(login(&s, alice, "bad").await.status, 401);
    assert!(s.is_locked(alice));
    assert_eq!(login(&s, alice, "secret-a").await.status, 401);
    assert_eq!(s.max_failure_count(alice), 7);
    wait_until(Duration::from_secs(10), "the lock to expire", || !s.is_locked(alice)).await;
    // Only a successful login deletes the row.
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    assert_eq!(s.failure_count(alice), 0);
    assert_eq!(login(&s, alice, "bad").await.status, 401);
    assert_eq!(s.failure_count(alice), 1);
    assert_eq!(s.max_failure_count(alice), 7, "the peak stays");
}

/// Magento_Customer's own lock (`lockout_failures` wrong passwords lock for `lockout_threshold`):
/// while it holds even the right password gets the generic 401, which the token endpoint's
/// throttle counts too. A token login does not reset its count, a storefront login does.
#[tokio::test]
async fn customer_lock_refuses_the_right_password_and_counts() {
    let s = DevServer::start(DevServerOptions {
        customer_lock_failures: 3,
        // 3 s: the lock must still hold at the request after the one that set it on a busy
        // machine.
        customer_lock_duration: Duration::from_secs(3),
        lock_max_failures: 100,
        stores: vec![("default".into(), "base".into()), ("de".into(), "german".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let alice = "alice@example.com";
    s.add_customer(alice, "secret-a");
    // Unknown emails, and alice looked up in another website, are no customer of this one.
    for _ in 0..4 {
        assert_eq!(login(&s, "ghost@example.com", "x").await.status, 401);
        assert_eq!(login_at(&s, "/rest/de/V1/integration/customer/token", alice, "bad").await.status, 401);
    }
    assert!(!s.customer_locked(alice));
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    for _ in 0..3 {
        assert_eq!(login(&s, alice, "bad").await.status, 401);
    }
    assert!(s.customer_locked(alice));
    let a = login(&s, alice, "secret-a").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    assert_eq!(s.failures(alice), 4, "the locked customer's login counts in the brute-force row");
    wait_until(Duration::from_secs(10), "the customer lock to expire", || !s.customer_locked(alice)).await;
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    // The first failure after an expired lock starts the count over...
    for _ in 0..2 {
        assert_eq!(login(&s, alice, "bad").await.status, 401);
    }
    assert!(!s.customer_locked(alice));
    // ...and a token login does not reset it: one more failure is the third.
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    assert_eq!(login(&s, alice, "bad").await.status, 401);
    assert!(s.customer_locked(alice), "a token login must not reset the customer's count");
    assert_eq!(login(&s, alice, "secret-a").await.status, 401);
    // A storefront login unlocks and clears the count.
    s.unlock_customer("ALICE@example.com");
    assert!(!s.customer_locked(alice));
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    for _ in 0..2 {
        assert_eq!(login(&s, alice, "bad").await.status, 401);
    }
    assert!(!s.customer_locked(alice));
}

/// `EmailNotConfirmedException`: the right password of an unconfirmed account gets its own
/// 401, which CustomerTokenService counts in the throttle like any failure (the customer's
/// own lock is not touched: the password was right).
#[tokio::test]
async fn unconfirmed_account_gets_its_own_401_and_counts() {
    // 3 s: six failures a request apart must fall within one sliding window on a busy machine.
    let s = server(DevServerOptions { lock_timeout: Duration::from_secs(3), ..Default::default() }).await;
    let alice = "alice@example.com";
    s.set_confirmed("ALICE@example.com", false);
    let unconfirmed = json!({"message": "This account isn't confirmed. Verify and try again."});
    for i in 1..=5 {
        let a = login(&s, alice, "secret-a").await;
        assert_eq!((a.status, a.json()), (401, unconfirmed.clone()));
        assert_eq!(s.failures(alice), i);
    }
    // A wrong password gets the generic 401, and the sixth failure locks.
    let a = login(&s, alice, "wrong").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    assert!(s.is_locked(alice));
    assert!(!s.customer_locked(alice));
    // Throttled: refused before the account is looked at.
    let a = login(&s, alice, "secret-a").await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    s.set_confirmed(alice, true);
    wait_until(Duration::from_secs(10), "the lock to expire", || !s.is_locked(alice)).await;
    assert_eq!(login(&s, alice, "secret-a").await.status, 200);
    assert_eq!(s.failures(alice), 0);
}

/// An htpasswd front (staging): the web server's HTML 401 with a Basic challenge for every
/// request without its credentials, before Magento: nothing counted, no fault used up.
#[tokio::test]
async fn basic_auth_front_answers_before_magento() {
    let s = server(DevServerOptions::default()).await;
    let alice = "alice@example.com";
    let t = token(&s, alice, "secret-a").await;
    s.set_basic_auth(Some(("stage", "p:w")));
    s.push_fault(Fault::status(503));
    let is_front = |a: &Answer| {
        assert_eq!(a.status, 401);
        assert_eq!(a.headers.get("www-authenticate").unwrap(), "Basic realm=\"Staging\"");
        assert!(a.content_type.starts_with("text/html"), "{}", a.content_type);
        assert!(String::from_utf8_lossy(&a.body).contains("401 Authorization Required"));
    };
    is_front(&login(&s, alice, "secret-a").await);
    is_front(&login(&s, alice, "wrong").await);
    // customers/me carries its Bearer token in the one Authorization header.
    is_front(&me(&s, &t).await);
    is_front(&send(client().get(format!("{}/customer/account", s.base_url()))).await);
    let through = |user: &str, pass: &str, password: &str| {
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .basic_auth(user, Some(pass))
            .header("content-type", "application/json")
            .body(json!({"username": alice, "password": password}).to_string())
    };
    is_front(&send(through("stage", "pw", "secret-a")).await);
    assert_eq!((s.failures(alice), s.max_failure_count(alice)), (0, 0));
    // Through the front: Magento answers, and the queued fault was kept for it.
    assert_eq!(send(through("stage", "p:w", "secret-a")).await.status, 503);
    let a = send(through("stage", "p:w", "secret-a")).await;
    assert_eq!(a.status, 200);
    assert!(s.check_token(a.json().as_str().unwrap()).is_some());
    let a = send(through("stage", "p:w", "wrong")).await;
    assert_eq!((a.status, a.json()), (401, json!({"message": SIGN_IN})));
    assert!(a.headers.get("www-authenticate").is_none());
    assert_eq!(s.failures(alice), 1);
    let statuses: Vec<u16> = s.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 401, 401, 401, 401, 401, 503, 200, 401]);
    s.set_basic_auth(None);
    assert_eq!(me(&s, &t).await.status, 200);
}

/// The JWT module's revocation stores `time()` as its cut-off: every token with `iat` at or
/// before that second dies, one minted in the same second after the revocation too; one
/// minted in a later second lives. Through the endpoint and through `revoke` alike.
#[tokio::test]
async fn revocation_cuts_off_by_the_second() {
    let s = server(DevServerOptions::default()).await;
    let alice = "alice@example.com";
    let mut endpoint_revocations = 0;
    let mut same_second_seen = false;
    // Right after the second turns over, a revocation and a login fit in one second; the
    // clock may still turn in between on a loaded machine, hence up to ten tries (about two
    // seconds each; the first nearly always does).
    for _ in 0..10 {
        next_second().await;
        let t = token(&s, alice, "secret-a").await;
        let second = next_second().await;
        assert_eq!(revoke_at(&s, PATH_REVOKE, &t).await.status, 200);
        endpoint_revocations += 1;
        let same = token(&s, alice, "secret-a").await;
        assert_eq!(me(&s, &t).await.status, 401);
        if claims(&same)["iat"].as_i64() == Some(second) {
            assert_eq!(me(&s, &same).await.status, 401, "minted in the revocation's second: dead");
            assert_eq!(s.check_token(&same), None);
            same_second_seen = true;
            break;
        }
    }
    assert!(same_second_seen, "never revoked and logged in within one second");
    assert_eq!(s.revocations(alice), endpoint_revocations);
    let after = next_second().await;
    let later = token(&s, alice, "secret-a").await;
    assert!(claims(&later)["iat"].as_i64().unwrap() >= after);
    assert_eq!(me(&s, &later).await.status, 200, "minted in a later second: alive");
    // The admin side: same cut-off.
    let second = next_second().await;
    s.revoke(alice);
    let same = token(&s, alice, "secret-a").await;
    assert_eq!(me(&s, &later).await.status, 401);
    if claims(&same)["iat"].as_i64() == Some(second) {
        assert_eq!(s.check_token(&same), None);
    }
    next_second().await;
    let fresh = token(&s, alice, "secret-a").await;
    assert_eq!(s.check_token(&fresh).as_deref(), Some(alice));
    assert_eq!(s.revocations(alice), endpoint_revocations + 1);
    // A dead token cannot revoke anything.
    assert_eq!(revoke_at(&s, PATH_REVOKE, &later).await.status, 401);
    assert_eq!(s.revocations(alice), endpoint_revocations + 1);
}

/// Without the JWT module, revocation deletes the customer's `oauth_token` rows: the tokens
/// minted before it die, a login right after it (even in the same second) lives.
#[tokio::test]
async fn opaque_revocation_deletes_existing_tokens() {
    let s = server(DevServerOptions { token_format: TokenFormat::Opaque, ..Default::default() }).await;
    s.add_customer("bob@example.com", "secret-b");
    let t1 = token(&s, "alice@example.com", "secret-a").await;
    let t2 = token(&s, "alice@example.com", "secret-a").await;
    let tb = token(&s, "bob@example.com", "secret-b").await;
    assert_eq!(revoke_at(&s, PATH_REVOKE, &t1).await.status, 200);
    assert_eq!(me(&s, &t1).await.status, 401);
    assert_eq!(me(&s, &t2).await.status, 401);
    assert_eq!(me(&s, &tb).await.status, 200);
    let fresh = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(me(&s, &fresh).await.status, 200, "no cut-off second for opaque tokens");
    assert!(s.issued(&t1), "revoked, but minted here");
    s.revoke("alice@example.com");
    assert_eq!(me(&s, &fresh).await.status, 401);
    assert_eq!(s.revocations("alice@example.com"), 2);
}

/// Magento_Customer's CustomerAuthorization on the `self` resource: a valid token gets the
/// not-authorized 401 through `/rest/all/` and through a store of another website than the
/// customer's, on customers/me and revoke-customer-token alike (which then revokes nothing).
#[tokio::test]
async fn customers_me_refuses_all_and_other_websites() {
    let s = DevServer::start(DevServerOptions {
        stores: vec![("default".into(), "base".into()), ("en".into(), "base".into()), ("de".into(), "german".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    s.add_customer("alice@example.com", "secret-a");
    s.add_customer_in_website("hans@example.de", "geheim", "german");
    let alice = token(&s, "alice@example.com", "secret-a").await;
    let a = login_at(&s, "/rest/de/V1/integration/customer/token", "hans@example.de", "geheim").await;
    let hans = a.json().as_str().unwrap().to_owned();
    for path in ["/rest/V1/customers/me", "/rest/default/V1/customers/me", "/rest/en/V1/customers/me"] {
        assert_eq!(me_at(&s, path, &alice).await.status, 200, "{path}");
        assert_eq!(me_at(&s, path, &hans).await.json(), unauthorized_body(), "{path}");
    }
    for path in ["/rest/all/V1/customers/me", "/rest/de/V1/customers/me"] {
        let a = me_at(&s, path, &alice).await;
        assert_eq!((a.status, a.json()), (401, unauthorized_body()), "{path}");
    }
    assert_eq!(me_at(&s, "/rest/de/V1/customers/me", &hans).await.status, 200);
    assert_eq!(me_at(&s, "/rest/all/V1/customers/me", &hans).await.status, 401);
    for path in [
        "/rest/all/V1/integration/customer/revoke-customer-token",
        "/rest/de/V1/integration/customer/revoke-customer-token",
    ] {
        let a = revoke_at(&s, path, &alice).await;
        assert_eq!((a.status, a.json()), (401, unauthorized_body()), "{path}");
    }
    assert_eq!(s.revocations("alice@example.com"), 0);
    assert_eq!(me(&s, &alice).await.status, 200);
    assert_eq!(revoke_at(&s, "/rest/en/V1/integration/customer/revoke-customer-token", &alice).await.status, 200);
    assert_eq!(me(&s, &alice).await.status, 401);
}

/// Encrypted JWTs (JWE compact, five parts): a client reads the header but not the claims;
/// the store accepts the token until its lifetime ends and revokes it by the second.
#[tokio::test]
async fn encrypted_tokens_hide_their_claims_and_live_their_lifetime() {
    let s = server(DevServerOptions {
        token_format: TokenFormat::Encrypted,
        // A little over 3 s of life from a late point in a second: time for the requests below
        // on a busy machine.
        token_lifetime: Duration::from_secs(4),
        ..Default::default()
    })
    .await;
    let t = token(&s, "alice@example.com", "secret-a").await;
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 5);
    assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert!(header["alg"].is_string() && header["enc"].is_string() && header["kid"].is_string(), "{header}");
    for part in &parts[1..] {
        let bytes = URL_SAFE_NO_PAD.decode(part).unwrap();
        assert!(serde_json::from_slice::<Value>(&bytes).is_err(), "claims must not be readable");
    }
    assert_ne!(t, token(&s, "alice@example.com", "secret-a").await);
    assert_eq!(me(&s, &t).await.json()["email"], "alice@example.com");
    assert!(s.issued(&t));
    assert!(!s.issued(&t[..t.len() - 1]));
    s.revoke("alice@example.com");
    assert_eq!(me(&s, &t).await.status, 401);
    next_second().await;
    let fresh = token(&s, "alice@example.com", "secret-a").await;
    assert_eq!(me(&s, &fresh).await.status, 200);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(me(&s, &fresh).await.status, 401, "dead at the end of its lifetime");
    assert!(s.issued(&fresh));
}

#[tokio::test]
async fn respond_faults_fifo_then_sticky() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::status(503));
    s.push_fault(Fault::html(502));
    s.push_fault(Fault::retry_after(429, "7"));
    s.push_fault(Fault::json(200, json!(42)));
    s.push_fault(Fault::garbage());
    s.push_fault(Fault::oversize(100_000));
    s.set_fault(Some(Fault::json(500, json!({"message": "sticky"}))));

    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!(a.status, 503);
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("Internal Error. Details are available in Magento log file. Report ID: webapi-"));
    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!(a.status, 502);
    assert!(a.content_type.starts_with("text/html"));
    assert!(String::from_utf8_lossy(&a.body).contains("<html>"));
    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers.get("retry-after").unwrap(), "7");
    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!((a.status, a.json()), (200, json!(42)));
    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!(a.status, 200);
    assert!(std::str::from_utf8(&a.body).is_err());
    let a = login(&s, "alice@example.com", "bad").await;
    assert_eq!(a.body.len(), 100_000);
    assert!(a.json().is_string());
    for _ in 0..3 {
        let a = login(&s, "alice@example.com", "bad").await;
        assert_eq!((a.status, a.json()), (500, json!({"message": "sticky"})));
    }
    // Faults touch neither the throttle nor other routes, but are counted and recorded.
    assert_eq!(s.failures("alice@example.com"), 0);
    assert_eq!(s.login_attempts("alice@example.com"), 9);
    let t = send(client().get(format!("{}{PATH_ME}", s.base_url())).bearer_auth("x")).await;
    assert_eq!(t.status, 401);
    s.set_fault(None);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
    let records = s.requests();
    assert_eq!(records.len(), 11);
    let statuses: Vec<u16> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 502, 429, 200, 200, 200, 500, 500, 500, 401, 200]);
}

#[tokio::test]
async fn redirect_is_not_followed() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Redirect {
        status: 301,
        location: "https://shop.example.com/rest/V1/integration/customer/token".into(),
    });
    let a = login(&s, "alice@example.com", "secret-a").await;
    assert_eq!(a.status, 301);
    assert_eq!(a.headers.get("location").unwrap(), "https://shop.example.com/rest/V1/integration/customer/token");
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn stream_faults_are_chunked_and_end() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::oversize_chunked(200 * 1024));
    let r = client()
        .post(format!("{}{PATH_TOKEN}", s.base_url()))
        .header("content-type", "application/json")
        .body(json!({"username": "alice@example.com", "password": "secret-a"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-length").is_none(), "no length: chunked");
    assert_eq!(r.headers().get("transfer-encoding").unwrap(), "chunked");
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 4 * 64 * 1024, "rounded up to whole 64 KiB chunks");
    assert!(body.starts_with(b"\"aaa"));
    assert_eq!(s.requests()[0].status, 200);
    // A trickle: the headers at once, the body a byte at a time.
    s.push_fault(Fault::trickle(Duration::from_millis(50), 3));
    let started = Instant::now();
    let a = login(&s, "alice@example.com", "secret-a").await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(a.body, b"\"\"\"");
}

#[tokio::test]
async fn issued_tells_whole_tokens_whatever_their_age() {
    let s = server(DevServerOptions { token_lifetime: Duration::from_secs(2), ..Default::default() }).await;
    let t = token(&s, "alice@example.com", "secret-a").await;
    assert!(s.issued(&t));
    assert!(!s.issued(&t[..t.len() - 1]));
    assert!(!s.issued(&format!("{t}x")));
    s.revoke("alice@example.com");
    assert!(s.check_token(&t).is_none());
    assert!(s.issued(&t), "revoked, but minted here");
    let o = server(DevServerOptions { opaque_tokens: true, ..Default::default() }).await;
    let ot = token(&o, "alice@example.com", "secret-a").await;
    assert!(o.issued(&ot));
    assert!(!o.issued(&"0".repeat(32)));
}

#[tokio::test]
async fn tls_serves_https_with_the_given_certificate() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let tls = TlsIdentity { cert_chain_pem: leaf.pem(), key_pem: key.serialize_pem() };
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"), "the key stays out of Debug");
    let s = server(DevServerOptions { tls: Some(tls), ..Default::default() }).await;
    assert!(s.base_url().starts_with("https://127.0.0.1:"));
    let trusting = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let body = json!({"username": "alice@example.com", "password": "secret-a"}).to_string();
    let post = |c: &reqwest::Client| {
        c.post(format!("{}{PATH_TOKEN}", s.base_url())).header("content-type", "application/json").body(body.clone())
    };
    let a = send(post(&trusting)).await;
    assert_eq!(a.status, 200);
    assert!(s.check_token(a.json().as_str().unwrap()).is_some());
    // A client that does not trust the CA gets nowhere, and the server records nothing.
    let err = post(&client()).send().await.unwrap_err();
    assert!(format!("{err:?}").to_lowercase().contains("certificate"), "{err:?}");
    assert_eq!(s.requests().len(), 1);
    assert!(DevServer::start(DevServerOptions {
        tls: Some(TlsIdentity { cert_chain_pem: "nope".into(), key_pem: "nope".into() }),
        ..Default::default()
    })
    .await
    .is_err());
}

#[tokio::test]
async fn delay_fault_answers_late_and_counts() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Delay(Duration::from_millis(400)));
    let started = Instant::now();
    let a = login(&s, "alice@example.com", "bad").await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(a.status, 401);
    assert_eq!(s.failures("alice@example.com"), 1, "a delayed login is a normal login");
    let iat_floor = unix_now();
    s.push_fault(Fault::Delay(Duration::from_millis(300)));
    let t = token(&s, "alice@example.com", "secret-a").await;
    assert!(claims(&t)["iat"].as_i64().unwrap() >= iat_floor);
}

#[tokio::test]
async fn hang_fault_times_out_the_client() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Hang);
    let quick = reqwest::Client::builder().no_proxy().timeout(Duration::from_millis(300)).build().unwrap();
    let err = quick
        .post(format!("{}{PATH_TOKEN}", s.base_url()))
        .header("content-type", "application/json")
        .body(json!({"username": "alice@example.com", "password": "secret-a"}).to_string())
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let r = s.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 0);
    assert_eq!(r[0].username.as_deref(), Some("alice@example.com"));
    assert_eq!(s.login_attempts("alice@example.com"), 1);
    // The next request is served normally; shutting down does not wait for the hung one.
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
    let stopped = Instant::now();
    s.shutdown().await;
    assert!(stopped.elapsed() < Duration::from_secs(3));
}

/// alice's login as raw HTTP/1.1, for tests that watch the socket itself.
fn raw_login_request() -> String {
    let body = r#"{"username":"alice@example.com","password":"secret-a"}"#;
    format!(
        "POST {PATH_TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn hang_fault_connection_stays_open_until_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Hang);
    let mut conn = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    conn.write_all(raw_login_request().as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
    assert!(r.is_err(), "nothing must arrive while hanging");
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await;
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("connection should close when the server stops: {other:?}"),
    }
}

#[tokio::test]
async fn reset_fault_is_a_connection_error() {
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Reset);
    let err = client()
        .post(format!("{}{PATH_TOKEN}", s.base_url()))
        .header("content-type", "application/json")
        .body(json!({"username": "alice@example.com", "password": "secret-a"}).to_string())
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    assert_eq!(s.requests()[0].status, 0);
    assert_eq!(s.failures("alice@example.com"), 0);
    assert_eq!(login(&s, "alice@example.com", "secret-a").await.status, 200);
}

#[tokio::test]
async fn reset_fault_sends_rst() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(DevServerOptions::default()).await;
    s.push_fault(Fault::Reset);
    let mut conn = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    conn.write_all(raw_login_request().as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf))
        .await
        .expect("the server must close the connection");
    let e = r.expect_err("a reset, not a clean close");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn records_capture_the_request() {
    let s = server(DevServerOptions::default()).await;
    let _ = send(
        client()
            .post(format!("{}/rest/default/V1/integration/customer/token", s.base_url()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("user-agent", "sidecar-test/1")
            .body(json!({"username": "alice@example.com", "password": "secret-a"}).to_string()),
    )
    .await;
    let _ = send(client().get(format!("{}{PATH_ME}?x=1", s.base_url())).bearer_auth("nope")).await;
    let r = s.requests();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].method, "POST");
    assert_eq!(r[0].path, "/rest/default/V1/integration/customer/token");
    assert_eq!(r[0].username.as_deref(), Some("alice@example.com"));
    assert_eq!(r[0].password.as_deref(), Some("secret-a"));
    assert_eq!(r[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(r[0].accept.as_deref(), Some("application/json"));
    assert_eq!(r[0].user_agent.as_deref(), Some("sidecar-test/1"));
    assert!(!r[0].authorization);
    assert_eq!(r[0].status, 200);
    assert_eq!(r[1].method, "GET");
    assert_eq!(r[1].path, PATH_ME);
    assert!(r[1].authorization);
    assert_eq!(r[1].username, None);
    assert_eq!(r[1].status, 401);
    assert!(r[0].at <= r[1].at);
}

#[tokio::test]
async fn many_logins_on_keep_alive() {
    let s = server(DevServerOptions::default()).await;
    let c = client();
    let started = Instant::now();
    for _ in 0..500 {
        let r = c
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .header("content-type", "application/json")
            .body(r#"{"username":"alice@example.com","password":"secret-a"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    assert_eq!(s.login_attempts("alice@example.com"), 500);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn cli_args_and_customers_file() {
    use clap::Parser;
    let dir = std::env::temp_dir().join(format!("devserver-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("customers.txt");
    std::fs::write(&file, "c1@example.com:p:with:colons\r\n\nc2@example.com:p2\n").unwrap();
    let cli = Cli::try_parse_from([
        "devserver",
        "--customer",
        "a@example.com:pa:ss",
        "--customers-file",
        file.to_str().unwrap(),
        "--token-lifetime",
        "90s",
        "--lock-max-failures",
        "3",
        // Long enough that the three failures below count together however slow the machine.
        "--lock-timeout",
        "10s",
        "--store",
        "de:german",
        "--store",
        "en",
        "--clock-offset",
        "-5",
    ])
    .unwrap();
    assert_eq!(cli.args.token_lifetime, Duration::from_secs(90));
    let s = cli::start_from_args(&cli.args).await.unwrap();
    let t = token(&s, "a@example.com", "pa:ss").await;
    let c = claims(&t);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 90);
    assert_eq!(login(&s, "c1@example.com", "p:with:colons").await.status, 200);
    assert_eq!(login(&s, "c2@example.com", "p2").await.status, 200);
    assert_eq!(login_at(&s, "/rest/en/V1/integration/customer/token", "c2@example.com", "p2").await.status, 200);
    assert_eq!(login_at(&s, "/rest/de/V1/integration/customer/token", "c2@example.com", "p2").await.status, 401);
    for _ in 0..2 {
        login(&s, "c2@example.com", "bad").await;
    }
    assert!(s.is_locked("c2@example.com"));
    s.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();

    let bad = Cli::try_parse_from(["devserver", "--customer", "no-colon"]).unwrap();
    assert!(cli::start_from_args(&bad.args).await.is_err());
}

#[tokio::test]
async fn cli_flags_of_store_variants() {
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "devserver",
        "--customer",
        "a@example.com:pa",
        "--no-cron",
        "--lock-timeout",
        "1ms",
        "--customer-lock-failures",
        "2",
        "--customer-lock-duration",
        "1h",
        "--basic-auth",
        "stage:p:w",
        "--token-format",
        "encrypted",
    ])
    .unwrap();
    let s = cli::start_from_args(&cli.args).await.unwrap();
    assert_eq!(login(&s, "a@example.com", "pa").await.status, 401, "the front");
    let through = |password: &str| {
        client()
            .post(format!("{}{PATH_TOKEN}", s.base_url()))
            .basic_auth("stage", Some("p:w"))
            .header("content-type", "application/json")
            .body(json!({"username": "a@example.com", "password": password}).to_string())
    };
    let a = send(through("pa")).await;
    assert_eq!(a.json().as_str().unwrap().split('.').count(), 5, "encrypted");
    assert_eq!(send(through("bad")).await.status, 401);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!((s.failures("a@example.com"), s.failure_count("a@example.com")), (0, 1), "no cron");
    assert_eq!(send(through("bad")).await.status, 401);
    assert_eq!(s.failure_count("a@example.com"), 2);
    assert!(s.customer_locked("a@example.com"));
    s.shutdown().await;

    let opaque = Cli::try_parse_from(["devserver", "--customer", "a@example.com:pa", "--opaque"]).unwrap();
    let s = cli::start_from_args(&opaque.args).await.unwrap();
    assert_eq!(token(&s, "a@example.com", "pa").await.len(), 32);
    assert!(Cli::try_parse_from(["devserver", "--opaque", "--token-format", "jwt"]).is_err());
    assert!(Cli::try_parse_from(["devserver", "--token-format", "jwe"]).is_err());
    let bad = Cli::try_parse_from(["devserver", "--basic-auth", "no-colon"]).unwrap();
    assert!(cli::start_from_args(&bad.args).await.is_err());
}

#[tokio::test]
async fn run_cli_stops_on_signal() {
    use clap::Parser;
    let cli = Cli::try_parse_from(["devserver"]).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_cli(cli.args, async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
}

#[test]
fn datetime_format() {
    assert_eq!(format_datetime(0), "1970-01-01 00:00:00");
    assert_eq!(format_datetime(1_700_000_000), "2023-11-14 22:13:20");
    assert_eq!(format_datetime(951_782_400), "2000-02-29 00:00:00");
    assert_eq!(format_datetime(-1), "1969-12-31 23:59:59");
}

/// Throughput check for the benchmarks' scale: `cargo test --release --lib
/// devserver::tests::bench_10k_logins -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark, run on demand"]
async fn bench_10k_logins() {
    let s = server(DevServerOptions::default()).await;
    let url = format!("{}{PATH_TOKEN}", s.base_url());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (client(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..1250 {
                let r = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("accept", "application/json")
                    .body(r#"{"username":"alice@example.com","password":"secret-a"}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!("10000 logins in {elapsed:?} ({:.0}/s)", 10_000.0 / elapsed.as_secs_f64());
    assert_eq!(s.login_attempts("alice@example.com"), 10_000);
}

#[tokio::test]
async fn login_latency_delays_every_token_answer() {
    let latency = Duration::from_millis(300);
    let s = server(DevServerOptions { login_latency: latency, ..Default::default() }).await;
    let started = Instant::now();
    let t = token(&s, "alice@example.com", "secret-a").await;
    assert!(started.elapsed() >= latency, "a successful login took {:?}", started.elapsed());
    let started = Instant::now();
    let a = login(&s, "alice@example.com", "wrong").await;
    assert_eq!(a.status, 401);
    assert!(started.elapsed() >= latency, "a refused login took {:?}", started.elapsed());
    // Not a token request: no latency (bounded generously, the machine is busy).
    let a = tokio::time::timeout(Duration::from_secs(10), me(&s, &t)).await.expect("customers/me answered");
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn login_latency_does_not_serialize_connections() {
    const N: u32 = 8;
    let latency = Duration::from_millis(400);
    let s = server(DevServerOptions { login_latency: latency, ..Default::default() }).await;
    let started = Instant::now();
    // Each login on its own client, so on its own connection.
    let logins = (0..N).map(|_| login(&s, "alice@example.com", "secret-a"));
    let answers = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(logins))
        .await
        .expect("logins answered");
    let elapsed = started.elapsed();
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(elapsed >= latency, "{N} logins took {elapsed:?}");
    // Serialized they would take N x 400 ms = 3.2 s; concurrent, about 400 ms.
    assert!(elapsed < latency * N / 2, "{N} concurrent logins took {elapsed:?}");
}

#[test]
fn login_latency_flag_parses() {
    use clap::Parser as _;
    assert_eq!(Cli::parse_from(["devserver"]).args.login_latency, Duration::ZERO);
    assert_eq!(Cli::parse_from(["devserver", "--login-latency", "20ms"]).args.login_latency, Duration::from_millis(20));
}

#[tokio::test]
async fn lists_every_token_and_password_it_handed_out() {
    for opts in [DevServerOptions::default(), DevServerOptions { opaque_tokens: true, ..Default::default() }] {
        let s = server(opts).await;
        let t1 = token(&s, "alice@example.com", "secret-a").await;
        let t2 = token(&s, "alice@example.com", "secret-a").await;
        let _ = login(&s, "alice@example.com", "wrong").await;
        s.set_password("alice@example.com", "secret-a2");
        assert_eq!(s.issued_tokens(), [t1.clone(), t2.clone()], "a refused login mints nothing");
        assert!(s.secrets().customer_passwords().contains(&"secret-a".to_owned()));
        assert_eq!(s.secrets().customer_passwords().last().unwrap(), "secret-a2");
    }
}
