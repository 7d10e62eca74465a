//! The GraphQL endpoint and the cloud service's paths over real HTTP on loopback: one test per
//! answer of shared/magento-other-paths.md §1-4 and §9, in both conventions where they differ.

use std::time::Duration;

use serde_json::{json, Value};

use crate::jwt::Claims;
use crate::tests::{claims, client, login, login_at, me, send, server, token, Answer, SIGN_IN};
use crate::{CloudService, DevServer, DevServerOptions, Fault, GraphQlConvention, Route, TokenFormat};

const ALICE: &str = "alice@example.com";
/// The login the daemon sends; the field starts at column 33.
const LOGIN: &str = "mutation($e:String!,$p:String!){generateCustomerToken(email:$e,password:$p){token}}";
const LOGIN_AT: (i64, i64) = (1, 33);
/// The validation the daemon sends; the field starts at column 3.
const ME: &str = "{ customer { email } }";
const ME_AT: (i64, i64) = (1, 3);
pub(crate) const NOT_AUTHORIZED: &str = "The current customer isn't authorized.";
const UNCONFIRMED: &str = "This account isn't confirmed. Verify and try again.";

async fn gql_server(convention: GraphQlConvention) -> DevServer {
    server(DevServerOptions { graphql_convention: convention, ..Default::default() }).await
}

/// A POST to the endpoint as the daemon sends it, with optional `Store` and bearer token.
/// A POST to the GraphQL endpoint with optional `Store` and bearer token.
pub(crate) async fn post(s: &DevServer, store: Option<&str>, bearer: Option<&str>, body: Value) -> Answer {
    let mut req = client().post(s.graphql_url()).header("content-type", "application/json").body(body.to_string());
    if let Some(store) = store {
        req = req.header("store", store);
    }
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    send(req).await
}

async fn gql_login(s: &DevServer, store: Option<&str>, email: &str, password: &str) -> Answer {
    post(s, store, None, json!({"query": LOGIN, "variables": {"e": email, "p": password}})).await
}

async fn gql_token(s: &DevServer, email: &str, password: &str) -> String {
    let a = gql_login(s, None, email, password).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json()["data"]["generateCustomerToken"]["token"].as_str().unwrap().to_owned()
}

async fn gql_me(s: &DevServer, store: Option<&str>, bearer: Option<&str>) -> Answer {
    post(s, store, bearer, json!({"query": ME})).await
}

/// A resolver's error as §1 shapes it: the item, then `data` with the field null.
pub(crate) fn field_error(message: &str, category: &str, field: &str, (line, column): (i64, i64)) -> Value {
    json!({
        "errors": [{
            "message": message,
            "locations": [{"line": line, "column": column}],
            "path": [field],
            "extensions": {"category": category},
        }],
        "data": {field: null},
    })
}

fn sign_in_error() -> Value {
    field_error(SIGN_IN, "graphql-authentication", "generateCustomerToken", LOGIN_AT)
}

/// An error raised before execution: no locations, path or data.
fn early_error(message: &str, category: Option<&str>) -> Value {
    match category {
        Some(c) => json!({"errors": [{"message": message, "extensions": {"category": c}}]}),
        None => json!({"errors": [{"message": message}]}),
    }
}

/// A JWT of this server for `uid` with these times (an expired one without waiting for it).
fn minted(s: &DevServer, uid: u64, iat: i64, exp: i64) -> String {
    s.shared.signer.mint(Claims { uid, iat, exp })
}

#[tokio::test]
async fn login_with_variables_answers_a_token_that_both_apis_accept() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    let a = gql_login(&s, None, ALICE, "secret-a").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, "application/json");
    let t = a.json()["data"]["generateCustomerToken"]["token"].as_str().unwrap().to_owned();
    assert_eq!(a.json(), json!({"data": {"generateCustomerToken": {"token": t}}}));
    assert_eq!(claims(&t)["utypid"], 3);
    assert_eq!(s.check_token(&t).as_deref(), Some(ALICE));
    assert_eq!(me(&s, &t).await.status, 200);
    let a = gql_me(&s, None, Some(&t)).await;
    assert_eq!((a.status, a.json()), (200, json!({"data": {"customer": {"email": ALICE}}})));
    // What was received: one GraphQL login naming alice, no REST request at all.
    let r = s.requests();
    assert_eq!(r[0].route, Route::GraphQlLogin);
    assert_eq!((r[0].username.as_deref(), r[0].password.as_deref()), (Some(ALICE), Some("secret-a")));
    assert_eq!(s.login_attempts(ALICE), 1);
    assert_eq!(s.issued_tokens(), [t]);
}

#[tokio::test]
async fn login_with_inline_arguments_aliases_and_typename() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    let q = "mutation Login {\n  t: generateCustomerToken(email: \"alice@example.com\", password: \"secret-a\") {\n    value: token\n    __typename\n  }\n}";
    let a = post(&s, Some("default"), None, json!({"query": q, "operationName": "Login"})).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["data"]["t"]["__typename"], "CustomerToken");
    assert!(s.check_token(v["data"]["t"]["value"].as_str().unwrap()).is_some());
    assert_eq!(s.requests()[0].username.as_deref(), Some(ALICE));
}

#[tokio::test]
async fn sign_in_failures_answer_401_from_2_4_8() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    for (email, password) in [(ALICE, "wrong"), ("nobody@example.com", "secret-a")] {
        let a = gql_login(&s, None, email, password).await;
        assert_eq!((a.status, a.json()), (401, sign_in_error()), "{email}");
    }
    assert_eq!((s.failures(ALICE), s.failures("nobody@example.com")), (1, 1));
}

#[tokio::test]
async fn sign_in_failures_answer_200_up_to_2_4_7() {
    let s = gql_server(GraphQlConvention::V2_4_7).await;
    for (email, password) in [(ALICE, "wrong"), ("nobody@example.com", "secret-a")] {
        let a = gql_login(&s, None, email, password).await;
        assert_eq!((a.status, a.json()), (200, sign_in_error()), "{email}");
    }
}

/// The bytes of an error answer: keys in webonyx's order, PHP's escaping.
#[tokio::test]
async fn error_answers_keep_magentos_key_order() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    let a = gql_login(&s, None, ALICE, "wrong").await;
    assert_eq!(
        String::from_utf8(a.body).unwrap(),
        format!(
            "{{\"errors\":[{{\"message\":\"{SIGN_IN}\",\"locations\":[{{\"line\":1,\"column\":33}}],\
             \"path\":[\"generateCustomerToken\"],\"extensions\":{{\"category\":\"graphql-authentication\"}}}}],\
             \"data\":{{\"generateCustomerToken\":null}}}}"
        )
    );
}

/// One `oauth_token_request_log` row per username, whichever API failed: GraphQL and REST
/// failures add up, the lock refuses both, a success through either deletes the row.
#[tokio::test]
async fn graphql_and_rest_failures_count_in_one_throttle_row() {
    // 30 s: the six failures below must fall within one window however busy the machine.
    let s = server(DevServerOptions { lock_timeout: Duration::from_secs(30), ..Default::default() }).await;
    assert_eq!(gql_login(&s, None, ALICE, "bad").await.status, 401);
    assert_eq!(login(&s, ALICE, "bad").await.status, 401);
    assert_eq!(s.failures(ALICE), 2);
    assert_eq!(gql_login(&s, None, ALICE, "secret-a").await.status, 200);
    assert_eq!(s.failures(ALICE), 0, "a GraphQL success deletes the row");
    for i in 1..=6 {
        let a = if i % 2 == 0 {
            login(&s, ALICE, "bad").await
        } else {
            gql_login(&s, None, "ALICE@example.com", "bad").await
        };
        assert_eq!(a.status, 401);
        assert_eq!(s.failures(ALICE), i);
    }
    assert!(s.is_locked(ALICE));
    // Throttled: the right password gets the generic message through both APIs, uncounted.
    let a = gql_login(&s, None, ALICE, "secret-a").await;
    assert_eq!((a.status, a.json()), (401, sign_in_error()));
    assert_eq!(login(&s, ALICE, "secret-a").await.status, 401);
    assert_eq!(s.failures(ALICE), 6);
    assert_eq!(s.login_attempts(ALICE), 11);
    s.reset_failures(ALICE);
    assert_eq!(gql_login(&s, None, ALICE, "secret-a").await.status, 200);
}

/// The customer's own lock is reached through GraphQL as through REST: while it holds, the right
/// password gets the generic message, and that failure counts in the throttle row.
#[tokio::test]
async fn customer_lock_refuses_graphql_logins() {
    let s = server(DevServerOptions {
        customer_lock_failures: 2,
        customer_lock_duration: Duration::from_secs(600),
        lock_max_failures: 100,
        ..Default::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(gql_login(&s, None, ALICE, "bad").await.status, 401);
    }
    assert!(s.customer_locked(ALICE));
    let a = gql_login(&s, None, ALICE, "secret-a").await;
    assert_eq!((a.status, a.json()), (401, sign_in_error()));
    assert_eq!(s.failures(ALICE), 3);
}

#[tokio::test]
async fn unconfirmed_account_login_by_convention() {
    for (convention, message) in [(GraphQlConvention::V2_4_8, UNCONFIRMED), (GraphQlConvention::V2_4_7, SIGN_IN)] {
        let s = gql_server(convention).await;
        s.set_confirmed(ALICE, false);
        let a = gql_login(&s, None, ALICE, "secret-a").await;
        let status = if convention == GraphQlConvention::V2_4_8 { 401 } else { 200 };
        let expected = field_error(message, "graphql-authentication", "generateCustomerToken", LOGIN_AT);
        assert_eq!((a.status, a.json()), (status, expected), "{convention:?}");
        assert_eq!(s.failures(ALICE), 1, "counted like any failure");
    }
}

/// The resolver's own checks, before the login service: `graphql-input`, 200, not counted.
#[tokio::test]
async fn empty_email_or_password_is_an_input_error() {
    for convention in [GraphQlConvention::V2_4_7, GraphQlConvention::V2_4_8] {
        let s = gql_server(convention).await;
        for (email, password, message) in [
            ("", "secret-a", "Specify the \"email\" value."),
            ("", "", "Specify the \"email\" value."),
            (ALICE, "", "Specify the \"password\" value."),
        ] {
            let a = gql_login(&s, None, email, password).await;
            let expected = field_error(message, "graphql-input", "generateCustomerToken", LOGIN_AT);
            assert_eq!((a.status, a.json()), (200, expected), "{convention:?} {email:?} {password:?}");
        }
        assert_eq!((s.failures(ALICE), s.failures("")), (0, 0));
    }
}

/// security-package's plugin before the resolver: `X-ReCaptcha` missing or not valid (this
/// server knows no valid one), 200 `graphql-input`, before the credentials: nothing counted.
#[tokio::test]
async fn recaptcha_refuses_logins_before_the_credentials() {
    for convention in [GraphQlConvention::V2_4_7, GraphQlConvention::V2_4_8] {
        let s =
            server(DevServerOptions { graphql_convention: convention, recaptcha_required: true, ..Default::default() })
                .await;
        let expected = field_error(
            "ReCaptcha validation failed, please try again",
            "graphql-input",
            "generateCustomerToken",
            LOGIN_AT,
        );
        for password in ["secret-a", "wrong"] {
            let a = gql_login(&s, None, ALICE, password).await;
            assert_eq!((a.status, a.json()), (200, expected.clone()), "{convention:?}");
        }
        let with_header = client()
            .post(s.graphql_url())
            .header("content-type", "application/json")
            .header("x-recaptcha", "03AFcWeA-not-a-real-response")
            .body(json!({"query": LOGIN, "variables": {"e": ALICE, "p": "secret-a"}}).to_string());
        assert_eq!(send(with_header).await.json(), expected);
        assert_eq!((s.failures(ALICE), s.max_failure_count(ALICE)), (0, 0));
        assert_eq!(s.login_attempts(ALICE), 3);
        // The customer query is no mutation: the plugin does not see it.
        s.set_recaptcha(false);
        let t = gql_token(&s, ALICE, "secret-a").await;
        s.set_recaptcha(true);
        assert_eq!(gql_me(&s, None, Some(&t)).await.status, 200);
    }
}

/// From 2.4.8 a bearer token sent with the login is validated before any resolver: a stale one
/// fails the whole request with 401 and the reader's or validator's message, counted nowhere.
/// Up to 2.4.7 it is ignored and the login goes through.
#[tokio::test]
async fn a_stale_bearer_token_fails_the_login_from_2_4_8() {
    for convention in [GraphQlConvention::V2_4_8, GraphQlConvention::V2_4_7] {
        let s = gql_server(convention).await;
        let now = s.shared.cfg.unix_now();
        let revoked = gql_token(&s, ALICE, "secret-a").await;
        s.revoke(ALICE);
        let cases = [
            ("garbled", "Composite reader could not read a token"),
            (minted(&s, 1, now - 7200, now - 3600).as_str(), "Consumer key has expired"),
            (revoked.as_str(), "User token has been revoked"),
        ]
        .map(|(t, m)| (t.to_owned(), m));
        for (stale, message) in cases {
            let a =
                post(&s, None, Some(&stale), json!({"query": LOGIN, "variables": {"e": ALICE, "p": "secret-a"}})).await;
            match convention {
                GraphQlConvention::V2_4_8 => {
                    assert_eq!((a.status, a.json()), (401, early_error(message, Some("graphql-authentication"))))
                }
                GraphQlConvention::V2_4_7 => assert_eq!(a.status, 200, "{message}: ignored up to 2.4.7"),
            }
        }
        assert_eq!(s.failures(ALICE), 0);
        // A valid token, or another scheme, does not stand in the way.
        crate::tests::next_second().await;
        let valid = gql_token(&s, ALICE, "secret-a").await;
        let a = post(&s, None, Some(&valid), json!({"query": LOGIN, "variables": {"e": ALICE, "p": "secret-a"}})).await;
        assert_eq!(a.status, 200, "{convention:?}");
        let basic = client()
            .post(s.graphql_url())
            .header("content-type", "application/json")
            .header("authorization", "Basic c3RhZ2U6cHc=")
            .body(json!({"query": LOGIN, "variables": {"e": ALICE, "p": "secret-a"}}).to_string());
        assert_eq!(send(basic).await.status, 200, "{convention:?}");
    }
}

#[tokio::test]
async fn customer_query_with_a_valid_token() {
    let s = DevServer::start(DevServerOptions {
        stores: vec![("default".into(), "base".into()), ("en".into(), "base".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    s.add_customer(ALICE, "secret-a");
    let t = token(&s, ALICE, "secret-a").await;
    for store in [None, Some("default"), Some("en"), Some(" en ")] {
        let a = gql_me(&s, store, Some(&t)).await;
        assert_eq!((a.status, a.json()), (200, json!({"data": {"customer": {"email": ALICE}}})), "{store:?}");
    }
    let q = "query { customer { __typename mail: email firstname lastname } }";
    let a = post(&s, None, Some(&t), json!({"query": q})).await;
    assert_eq!(
        a.json(),
        json!({"data": {"customer": {"__typename": "Customer", "mail": ALICE, "firstname": "Alice", "lastname": "Customer"}}})
    );
    assert_eq!(s.requests_to(Route::GraphQlCustomer), 5);
}

/// 2.4.8's AuthorizationRequestValidator: 401 `graphql-authentication` with the reason, no data.
#[tokio::test]
async fn customer_query_with_a_bad_token_from_2_4_8() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    s.add_customer("bob@example.com", "secret-b");
    let now = s.shared.cfg.unix_now();
    let alive = gql_token(&s, "bob@example.com", "secret-b").await;
    let revoked = gql_token(&s, ALICE, "secret-a").await;
    s.revoke(ALICE);
    // One character of the signature's first (fully significant) position flipped.
    let sig_at = alive.rfind('.').unwrap() + 1;
    let mut tampered = alive.clone();
    tampered.replace_range(sig_at..sig_at + 1, if &alive[sig_at..sig_at + 1] == "A" { "B" } else { "A" });
    for (t, message) in [
        ("garbage".to_owned(), "Composite reader could not read a token"),
        (tampered, "Composite reader could not read a token"),
        (minted(&s, 2, now - 100, now - 1), "Consumer key has expired"),
        (revoked, "User token has been revoked"),
    ] {
        let a = gql_me(&s, None, Some(&t)).await;
        assert_eq!((a.status, a.json()), (401, early_error(message, Some("graphql-authentication"))), "{message}");
    }
    // A deleted customer's token was revoked with it.
    s.remove_customer("bob@example.com");
    let a = gql_me(&s, None, Some(&alive)).await;
    assert_eq!((a.status, a.json()), (401, early_error("User token has been revoked", Some("graphql-authentication"))));
}

/// Up to 2.4.7 an unreadable, expired or revoked token is ignored: the request runs as a guest,
/// whom the resolver refuses with 200 `graphql-authorization`.
#[tokio::test]
async fn customer_query_with_a_bad_token_up_to_2_4_7() {
    let s = gql_server(GraphQlConvention::V2_4_7).await;
    let now = s.shared.cfg.unix_now();
    let revoked = gql_token(&s, ALICE, "secret-a").await;
    s.revoke(ALICE);
    let expected = field_error(NOT_AUTHORIZED, "graphql-authorization", "customer", ME_AT);
    for t in ["garbage".to_owned(), minted(&s, 1, now - 100, now - 1), revoked] {
        let a = gql_me(&s, None, Some(&t)).await;
        assert_eq!((a.status, a.json()), (200, expected.clone()));
    }
}

/// No `Authorization` header: a guest in every version, 200 up to 2.4.7, 403 from 2.4.8.
#[tokio::test]
async fn customer_query_without_a_token_by_convention() {
    for (convention, status) in [(GraphQlConvention::V2_4_7, 200), (GraphQlConvention::V2_4_8, 403)] {
        let s = gql_server(convention).await;
        let a = gql_me(&s, None, None).await;
        let expected = field_error(NOT_AUTHORIZED, "graphql-authorization", "customer", ME_AT);
        assert_eq!((a.status, a.json()), (status, expected), "{convention:?}");
    }
}

/// GetCustomer: a valid token of a locked or unconfirmed account, `graphql-authentication`.
#[tokio::test]
async fn customer_query_for_locked_and_unconfirmed_accounts() {
    for (convention, status) in [(GraphQlConvention::V2_4_7, 200), (GraphQlConvention::V2_4_8, 401)] {
        let s = server(DevServerOptions {
            graphql_convention: convention,
            customer_lock_failures: 1,
            customer_lock_duration: Duration::from_secs(600),
            ..Default::default()
        })
        .await;
        let t = gql_token(&s, ALICE, "secret-a").await;
        for _ in 0..2 {
            login(&s, ALICE, "bad").await;
        }
        assert!(s.customer_locked(ALICE));
        let a = gql_me(&s, None, Some(&t)).await;
        let locked = field_error("The account is locked.", "graphql-authentication", "customer", ME_AT);
        assert_eq!((a.status, a.json()), (status, locked), "{convention:?}");
        s.unlock_customer(ALICE);
        s.set_confirmed(ALICE, false);
        let a = gql_me(&s, None, Some(&t)).await;
        let unconfirmed = field_error(UNCONFIRMED, "graphql-authentication", "customer", ME_AT);
        assert_eq!((a.status, a.json()), (status, unconfirmed), "{convention:?}");
    }
}

/// The token of a customer of another website than the `Store` header's store is taken as not
/// logged in (UNCONFIRMED in Magento; modelled as the guest's answer).
#[tokio::test]
async fn customer_query_through_another_websites_store() {
    let s = DevServer::start(DevServerOptions {
        stores: vec![("default".into(), "base".into()), ("de".into(), "german".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    s.add_customer(ALICE, "secret-a");
    let t = gql_token(&s, ALICE, "secret-a").await;
    let a = gql_me(&s, Some("de"), Some(&t)).await;
    assert_eq!((a.status, a.json()), (403, field_error(NOT_AUTHORIZED, "graphql-authorization", "customer", ME_AT)));
}

/// StoreProcessor: trimmed, `default` in any case always accepted, an unknown code refused before
/// execution; a login looks the email up in the header's store's website only.
#[tokio::test]
async fn store_header_scopes_and_refuses_unknown_codes() {
    for (convention, status) in [(GraphQlConvention::V2_4_7, 500), (GraphQlConvention::V2_4_8, 200)] {
        let s = DevServer::start(DevServerOptions {
            graphql_convention: convention,
            stores: vec![("default".into(), "base".into()), ("de".into(), "german".into())],
            ..Default::default()
        })
        .await
        .unwrap();
        s.add_customer(ALICE, "secret-a");
        s.add_customer_in_website("hans@example.de", "geheim", "german");
        for store in ["default", "DEFAULT", "Default", "  default\t"] {
            assert_eq!(gql_login(&s, Some(store), ALICE, "secret-a").await.status, 200, "{store:?}");
        }
        assert_eq!(gql_login(&s, Some(" de "), "hans@example.de", "geheim").await.status, 200);
        let wrong_website = gql_login(&s, Some("de"), ALICE, "secret-a").await;
        assert_eq!(wrong_website.json(), sign_in_error(), "alice is no customer of website german");
        assert_eq!(gql_login(&s, None, "hans@example.de", "geheim").await.json(), sign_in_error());
        let failures = (s.failures(ALICE), s.failures("hans@example.de"));
        for store in [" xx ", "DE", "all"] {
            let a = gql_login(&s, Some(store), ALICE, "secret-a").await;
            let code = store.trim();
            let expected = early_error(&format!("Store code {code} does not exist"), Some("graphql-input"));
            assert_eq!((a.status, a.json()), (status, expected), "{convention:?} {store:?}");
        }
        assert_eq!((s.failures(ALICE), s.failures("hans@example.de")), failures, "refused before the login");
    }
}

#[tokio::test]
async fn content_type_must_be_json() {
    for (convention, status, category) in
        [(GraphQlConvention::V2_4_7, 500, Some("graphql-input")), (GraphQlConvention::V2_4_8, 415, None)]
    {
        let s = gql_server(convention).await;
        let body = json!({"query": LOGIN, "variables": {"e": ALICE, "p": "secret-a"}}).to_string();
        for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded")] {
            let mut req = client().post(s.graphql_url()).body(body.clone());
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let a = send(req).await;
            let expected = early_error("Request content type must be application/json", category);
            assert_eq!((a.status, a.json()), (status, expected), "{convention:?} {content_type:?}");
        }
        let a =
            send(client().post(s.graphql_url()).header("content-type", "application/json; charset=utf-8").body(body))
                .await;
        assert_eq!(a.status, 200);
        assert_eq!(s.failures(ALICE), 0);
    }
}

/// HttpVerbValidator: a mutation by GET is refused before execution; a query by GET is served.
#[tokio::test]
async fn get_serves_queries_and_refuses_mutations() {
    for (convention, status) in [(GraphQlConvention::V2_4_7, 500), (GraphQlConvention::V2_4_8, 200)] {
        let s = gql_server(convention).await;
        let variables = json!({"e": ALICE, "p": "secret-a"}).to_string();
        let a = send(client().get(s.graphql_url()).query(&[("query", LOGIN), ("variables", &variables)])).await;
        let expected = early_error("Mutation requests allowed only for POST requests", Some("graphql-input"));
        assert_eq!((a.status, a.json()), (status, expected), "{convention:?}");
        assert_eq!(s.failures(ALICE), 0);
        assert!(s.issued_tokens().is_empty());
        let t = gql_token(&s, ALICE, "secret-a").await;
        let a = send(client().get(s.graphql_url()).query(&[("query", ME)]).bearer_auth(&t)).await;
        assert_eq!((a.status, a.json()), (200, json!({"data": {"customer": {"email": ALICE}}})));
        // A GET whose query does not parse: the verb check's parser fails first.
        let a = send(client().get(s.graphql_url()).query(&[("query", "{ customer {")])).await;
        assert_eq!(a.status, 400);
        assert_eq!(a.json()["errors"][0]["message"], "Syntax Error: Unexpected <EOF>");
    }
}

/// What is not these operations: a syntax error is 400 with its location; a field the schema
/// does not have is webonyx's validation error (200, no path, no category, no data).
#[tokio::test]
async fn syntax_errors_and_unknown_fields() {
    for convention in [GraphQlConvention::V2_4_7, GraphQlConvention::V2_4_8] {
        let s = gql_server(convention).await;
        let a = post(&s, None, None, json!({"query": "{ customer { email }"})).await;
        assert_eq!(a.status, 400);
        assert_eq!(
            a.json(),
            json!({"errors": [{"message": "Syntax Error: Unexpected <EOF>", "locations": [{"line": 1, "column": 21}]}]})
        );
        let a = post(&s, None, None, json!({"query": "{\n  cart(cart_id: \"x\") { id }\n}"})).await;
        assert_eq!(
            (a.status, a.json()),
            (
                200,
                json!({"errors": [{"message": "Cannot query field \"cart\" on type \"Query\".", "locations": [{"line": 2, "column": 3}]}]})
            )
        );
        let a = post(&s, None, None, json!({"query": "mutation { revokeCustomerToken { result } }"})).await;
        assert_eq!(
            a.json()["errors"][0]["message"],
            "Cannot query field \"revokeCustomerToken\" on type \"Mutation\"."
        );
        // A required argument left out fails validation before the resolver: nothing counted.
        let q = "mutation { generateCustomerToken(email: \"alice@example.com\") { token } }";
        let a = post(&s, None, None, json!({"query": q})).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.json()["errors"][0]["message"],
            "Field \"generateCustomerToken\" argument \"password\" of type \"String!\" is required, but it was not provided."
        );
        assert!(a.json().get("data").is_none());
        assert_eq!(s.failures(ALICE), 0);
        assert_eq!(s.requests_to(Route::GraphQlOther), 4);
    }
}

/// A body that is not JSON: 2.4.7 decodes it outside its try block (500); later versions answer
/// a SyntaxError (400).
#[tokio::test]
async fn undecodable_bodies_by_convention() {
    let raw = |s: &DevServer, body: &'static str| {
        client().post(s.graphql_url()).header("content-type", "application/json").body(body)
    };
    let s = gql_server(GraphQlConvention::V2_4_7).await;
    for body in ["{not json", ""] {
        let a = send(raw(&s, body)).await;
        assert_eq!((a.status, a.json()), (500, early_error("Internal server error", None)), "{body:?}");
    }
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    for (body, message) in [
        ("{not json", "Syntax Error: Unable to parse the request."),
        ("", "Syntax Error: Unexpected <EOF>"),
        ("{\"variables\":{}}", "Syntax Error: Unexpected <EOF>"),
    ] {
        let a = send(raw(&s, body)).await;
        let expected = json!({"errors": [{"message": message, "locations": [{"line": 1, "column": 1}]}]});
        assert_eq!((a.status, a.json()), (400, expected), "{body:?}");
    }
    let a = send(client().get(s.graphql_url()).query(&[("query", ME), ("variables", "{x")])).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["errors"][0]["message"], "Syntax Error: Unable to parse the variables.");
}

#[tokio::test]
async fn graphql_path_is_configurable() {
    let s = server(DevServerOptions { graphql_path: "/api/graphql".into(), ..Default::default() }).await;
    assert_eq!(s.graphql_url(), format!("{}/api/graphql", s.base_url()));
    assert_eq!(gql_login(&s, None, ALICE, "secret-a").await.status, 200);
    let a =
        send(client().post(format!("{}/graphql", s.base_url())).header("content-type", "application/json").body("{}"))
            .await;
    assert_eq!(a.status, 404);
    assert!(a.content_type.starts_with("text/html"), "the storefront's 404");
    assert_eq!(s.requests().iter().map(|r| r.route).collect::<Vec<_>>(), [Route::GraphQlLogin, Route::Other]);
    assert!(DevServer::start(DevServerOptions { graphql_path: "graphql".into(), ..Default::default() }).await.is_err());
}

/// What tests count: requests by route, GraphQL logins among the login attempts, faults and the
/// login latency for GraphQL logins as for REST ones.
#[tokio::test]
async fn requests_are_counted_by_route_and_faults_answer_graphql_logins() {
    let s = gql_server(GraphQlConvention::V2_4_8).await;
    s.push_fault(Fault::status(503));
    assert_eq!(gql_login(&s, None, ALICE, "secret-a").await.status, 503, "a fault answers a GraphQL login");
    let t = gql_token(&s, ALICE, "secret-a").await;
    s.push_fault(Fault::html(502));
    assert_eq!(gql_me(&s, None, Some(&t)).await.status, 200, "a fault waits for a login");
    assert_eq!(post(&s, None, None, json!({"query": "{ storeConfig { code } }"})).await.status, 200);
    assert_eq!(login(&s, ALICE, "secret-a").await.status, 502, "the queued fault answers the next login");
    assert_eq!(me(&s, &t).await.status, 200);
    assert_eq!(send(client().get(format!("{}/customer/account", s.base_url()))).await.status, 404);
    for (route, n) in [
        (Route::GraphQlLogin, 2),
        (Route::GraphQlCustomer, 1),
        (Route::GraphQlOther, 1),
        (Route::RestToken, 1),
        (Route::RestCustomersMe, 1),
        (Route::RestRevoke, 0),
        (Route::Other, 1),
    ] {
        assert_eq!(s.requests_to(route), n, "{route:?}");
    }
    assert_eq!(s.login_attempts(ALICE), 3);
    let rest = s.requests().iter().filter(|r| r.route.is_rest()).count();
    let graphql = s.requests().iter().filter(|r| r.route.is_graphql()).count();
    assert_eq!((rest, graphql), (2, 4));
    assert_eq!(s.requests()[2].store, None);

    let latency = Duration::from_millis(300);
    let slow = server(DevServerOptions { login_latency: latency, ..Default::default() }).await;
    let started = std::time::Instant::now();
    assert_eq!(gql_login(&slow, Some("default"), ALICE, "secret-a").await.status, 200);
    assert!(started.elapsed() >= latency, "a GraphQL login took {:?}", started.elapsed());
    assert_eq!(slow.requests()[0].store.as_deref(), Some("default"));
}

#[tokio::test]
async fn opaque_tokens_through_graphql() {
    let s = server(DevServerOptions { token_format: TokenFormat::Opaque, ..Default::default() }).await;
    let t = gql_token(&s, ALICE, "secret-a").await;
    assert_eq!(t.len(), 32);
    assert_eq!(gql_me(&s, None, Some(&t)).await.status, 200);
    s.revoke(ALICE);
    // The revocation deleted its row: there is nothing left to read.
    let a = gql_me(&s, None, Some(&t)).await;
    assert_eq!(
        (a.status, a.json()),
        (401, early_error("Composite reader could not read a token", Some("graphql-authentication")))
    );
}

/// Adobe Commerce as a Cloud Service: GraphQL under `/<tenant-id>`, REST under `/<tenant-id>/V1`
/// without the customer-token routes, nothing outside.
#[tokio::test]
async fn cloud_service_serves_graphql_under_the_tenant_and_no_rest_logins() {
    let s =
        server(DevServerOptions { cloud_service: Some(CloudService::new("Ab3dEfGh1jK2")), ..Default::default() }).await;
    assert_eq!(s.magento_base_url(), format!("{}/Ab3dEfGh1jK2", s.base_url()));
    assert_eq!(s.graphql_url(), format!("{}/Ab3dEfGh1jK2/graphql", s.base_url()));
    let t = gql_token(&s, ALICE, "secret-a").await;
    let a = gql_me(&s, Some("default"), Some(&t)).await;
    assert_eq!((a.status, a.json()), (200, json!({"data": {"customer": {"email": ALICE}}})));
    // The REST login and customers/me a client might try: Magento's unknown route.
    let not_found = json!({"message": "Request does not match any route."});
    let base = s.magento_base_url();
    for path in ["/V1/integration/customer/token", "/default/V1/integration/customer/token"] {
        let a = login_at(&s, &format!("/Ab3dEfGh1jK2{path}"), ALICE, "secret-a").await;
        assert_eq!((a.status, a.json()), (404, not_found.clone()), "{path}");
    }
    let a = send(client().get(format!("{base}/V1/customers/me")).header("store", "default").bearer_auth(&t)).await;
    assert_eq!((a.status, a.json()), (404, not_found.clone()));
    let a = send(client().post(format!("{base}/V1/customer/1/otp")).header("content-type", "application/json")).await;
    assert_eq!(
        (a.status, a.json()),
        (
            401,
            json!({"message": "The consumer isn't authorized to access %resources.", "parameters": {"resources": "Magento_LoginAsCustomer::login"}})
        ),
        "the one-time code route wants an IMS token"
    );
    // Outside the tenant: nothing, neither the on-premises REST nor /graphql.
    for path in ["/rest/V1/integration/customer/token", "/graphql", "/Ab3dEfGh1jK2x/graphql"] {
        let a = send(
            client()
                .post(format!("{}{path}", s.base_url()))
                .header("content-type", "application/json")
                .body(json!({"username": ALICE, "password": "secret-a"}).to_string()),
        )
        .await;
        assert_eq!(a.status, 404, "{path}");
    }
    // A client that tried REST logins is seen failing: attempts recorded, nothing counted.
    assert_eq!(s.requests_to(Route::RestToken), 2);
    assert_eq!(s.requests_to(Route::GraphQlLogin), 1);
    assert_eq!(s.login_attempts(ALICE), 3);
    assert_eq!(s.failures(ALICE), 0);
    assert_eq!(s.issued_tokens().len(), 1);
    assert!(DevServer::start(DevServerOptions { cloud_service: Some(CloudService::new("a/b")), ..Default::default() })
        .await
        .is_err());
}

#[tokio::test]
async fn cli_flags_for_the_convention_the_path_and_the_cloud_service() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::DevServerArgs,
    }
    let defaults = Cli::try_parse_from(["devserver"]).unwrap().args;
    assert_eq!(defaults.graphql_convention, GraphQlConvention::V2_4_8);
    assert_eq!(defaults.graphql_path, "/graphql");
    assert_eq!(defaults.cloud_service, None);
    let cli = Cli::try_parse_from([
        "devserver",
        "--customer",
        "alice@example.com:secret-a",
        "--graphql-convention",
        "2.4.7",
        "--graphql-path",
        "/gql",
        "--cloud-service",
        "tenant1",
    ])
    .unwrap();
    let s = crate::cli::start_from_args(&cli.args).await.unwrap();
    assert_eq!(s.graphql_url(), format!("{}/tenant1/gql", s.base_url()));
    let a = gql_me(&s, None, None).await;
    assert_eq!(a.status, 200, "2.4.7: the guest's refusal is a 200");
    assert_eq!(gql_login(&s, None, ALICE, "secret-a").await.status, 200);
    s.shutdown().await;
    assert!(Cli::try_parse_from(["devserver", "--graphql-convention", "2.4.6"]).is_err());
}
