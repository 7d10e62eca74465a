//! GraphQL, the other dialect of customer tokens (shared/magento-other-paths.md §1-4): the
//! documents the daemon sends, and how every answer is sorted into the classes REST's are.
//!
//! `generateCustomerToken` goes through the same Magento service as the REST login (the same
//! throttle row, lock, reCAPTCHA setting and JWT); what differs is around it. Errors come as
//! `{"errors":[{"message","extensions":{"category"}}],"data":...}`, with HTTP 200 up to 2.4.7 and
//! 401/403 by category from 2.4.8; errors raised before execution (the `Store` header) answer 500
//! up to 2.4.7. So an answer is sorted by its first error's message and category, whatever its
//! status, and a status alone decides only for what is no GraphQL answer at all (a front's 401,
//! a CDN's HTML). A check (`{ customer { email } }`) with a dead token answers "User token has been
//! revoked" and the like from 2.4.8, and up to 2.4.7 runs as a guest, who "isn't authorized": both
//! are a refused token.
//!
//! Every error's message is server text, shown as REST's are ([`crate::shown`]): bounded,
//! escaped, never when it repeats a piece of the password or token sent.

use serde::Serialize;
use serde_json::Value;
use zeroize::Zeroizing;

use super::{json_kind, not_magentos_json, shown_detail, Class, Dialect, Head, LoginError, Outcome};
use crate::secret::Secret;
use crate::shown::{fill_message, fill_text, Pieces};
use crate::token;

/// The header Magento's GraphQL reads the store view from (`StoreProcessor`).
pub(super) const STORE: &str = "Store";

/// The login: email and password as variables, never in the document itself, where an error's
/// message (a syntax error's "near ...") could quote them.
pub(super) const LOGIN: &str = "mutation($e:String!,$p:String!){generateCustomerToken(email:$e,password:$p){token}}";

/// The check of a token, whole. Sent by POST: a GET could be answered from a cache (Varnish,
/// Fastly), for someone else's token.
pub(super) const CHECK_BODY: &str = r#"{"query":"{ customer { email } }"}"#;

/// What a request was: its errors mean different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// A login: a refusal is a wrong password (counted by Magento) unless it says otherwise.
    Login,
    /// A check of a token: a refusal is the token's.
    Check,
    /// `generateCustomerTokenAsAdmin` with the admin's token.
    AsAdmin,
    /// `exchangeOtpForCustomerToken`: a refusal is the one-time code's.
    Exchange,
}

impl Op {
    fn what(self) -> &'static str {
        match self {
            Op::Login => "the GraphQL login",
            Op::Check => "the GraphQL check of the token",
            Op::AsAdmin => "generateCustomerTokenAsAdmin",
            Op::Exchange => "exchangeOtpForCustomerToken",
        }
    }
}

/// The login's body, `{"query":LOGIN,"variables":{"e":<username>,"p":<password>}}`, in one
/// zeroizing buffer.
pub(super) fn login_body(username: &str, password: &Secret) -> Zeroizing<Vec<u8>> {
    #[derive(Serialize)]
    struct Variables<'a> {
        e: &'a str,
        p: &'a str,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        query: &'static str,
        variables: Variables<'a>,
    }
    let mut body = Zeroizing::new(Vec::with_capacity(login_room(username, password)));
    let value = Body { query: LOGIN, variables: Variables { e: username, p: password.expose() } };
    serde_json::to_writer(&mut *body, &value).expect("strings always serialize");
    body
}

/// Room for the login's JSON at its longest (every character of the two strings escaped as
/// `\uXXXX`), so that the buffer never grows: growing would leave a copy of the password behind,
/// unwiped. 48 is the JSON around the values and the query (40 bytes).
fn login_room(username: &str, password: &Secret) -> usize {
    LOGIN.len() + 48 + 6 * (username.len() + password.expose().len())
}

/// Reads an answer to `op`, whose head is `head` and whose body (bounded already) is `body`: its
/// `data` when it is a 200 without errors, else why not. `secret` is what the request carried.
pub(super) fn read(head: &Head, body: &[u8], secret: &Secret, op: Op) -> Result<Value, LoginError> {
    if head.redirect.is_some() {
        let pieces = Pieces::of(secret.expose());
        return Err(head.redirected(&pieces).expect("a redirect's head"));
    }
    let answer: Result<Value, _> = serde_json::from_slice(body);
    let errors = match &answer {
        Ok(Value::Object(map)) => map.get("errors").and_then(Value::as_array).filter(|e| !e.is_empty()),
        _ => None,
    };
    if let Some(errors) = errors {
        return Err(error(head, errors, body.len(), secret, op));
    }
    if head.status != reqwest::StatusCode::OK {
        // No GraphQL answer at all: a front, a CDN, a wrong path. A 401 then is not Magento's.
        let pieces = Pieces::of(secret.expose());
        let class = if head.status == reqwest::StatusCode::UNAUTHORIZED { Class::NotMagentos } else { Class::Other };
        let detail = shown_detail(fill_message(body), body.len(), &pieces, || not_magentos_json(head, &pieces));
        return Err(head.error(class, detail, Dialect::GraphQl));
    }
    let invalid = |message: String| LoginError::new(Outcome::InvalidResponse, message);
    match answer {
        Ok(Value::Object(mut map)) => Ok(map.remove("data").unwrap_or(Value::Null)),
        Ok(other) => {
            Err(invalid(format!("the answer to {} is a JSON {}, not an object", op.what(), json_kind(&other))))
        }
        Err(e) => {
            let looks = if body.trim_ascii_start().starts_with(b"<") { " (it looks like HTML or XML)" } else { "" };
            Err(invalid(format!("the answer to {} is not JSON{looks}: {e}", op.what())))
        }
    }
}

/// The token at `data.<field>.<leaf>` (`generateCustomerToken.token`), checked for form.
pub(super) fn token_in(mut data: Value, field: &str, leaf: &str) -> Result<Secret, LoginError> {
    let invalid = |message: String| LoginError::new(Outcome::InvalidResponse, message);
    match data.get_mut(field).and_then(|f| f.get_mut(leaf)).map(Value::take) {
        Some(Value::String(text)) => {
            let secret = Secret::new(text);
            token::check_form(secret.expose()).map_err(|e| invalid(e.to_string()))?;
            Ok(secret)
        }
        None | Some(Value::Null) => {
            Err(invalid(format!("the answer to {field} holds no {leaf} (data.{field}.{leaf} is missing or null)")))
        }
        Some(other) => Err(invalid(format!(
            "the answer to {field} holds a JSON {} as its {leaf}, not a string",
            json_kind(&other)
        ))),
    }
}

/// The email at `data.customer.email`.
pub(super) fn email(data: &Value) -> Result<String, LoginError> {
    data.pointer("/customer/email")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| LoginError::new(Outcome::InvalidResponse, "the answer to { customer { email } } holds no email"))
}

/// The messages of Magento's token readers and validators (2.4.8's AuthorizationRequestValidator
/// passes them on): the token sent is dead or unreadable.
const TOKEN_PROBLEMS: [&str; 3] =
    ["Composite reader could not read a token", "Consumer key has expired", "User token has been revoked"];

/// One error of an answer, as far as it is read.
struct Item<'a> {
    message: Option<&'a str>,
    category: Option<&'a str>,
    /// `extensions` as a whole: Adobe's cloud service adds typed codes there
    /// (`CUSTOMER_SIGN_IN_INCORRECT_OR_LOCKED`), under a key not documented.
    extensions: Option<&'a serde_json::Map<String, Value>>,
}

impl<'a> Item<'a> {
    fn of(error: &'a Value) -> Item<'a> {
        let extensions = error.get("extensions").and_then(Value::as_object);
        Item {
            message: error.get("message").and_then(Value::as_str),
            category: extensions.and_then(|e| e.get("category")).and_then(Value::as_str),
            extensions,
        }
    }

    /// Whether `extensions` holds `code` as one of its values.
    fn says(&self, code: &str) -> bool {
        self.extensions.is_some_and(|e| e.values().any(|v| v.as_str() == Some(code)))
    }

    fn message_has(&self, text: &str) -> bool {
        self.message.is_some_and(|m| m.contains(text))
    }

    /// `Store code <code> does not exist` (StoreProcessor), or the newest releases' words for an
    /// unknown or inactive store view, `Requested store is not found` (StoreValidator).
    fn unknown_store(&self) -> bool {
        self.message.is_some_and(|m| {
            (m.starts_with("Store code ") && m.ends_with(" does not exist")) || m == "Requested store is not found"
        })
    }

    fn token_problem(&self) -> bool {
        self.message.is_some_and(|m| TOKEN_PROBLEMS.iter().any(|p| m.starts_with(p)))
    }

    /// What this error means for a login.
    fn login_class(&self) -> Class {
        if self.message.is_some_and(super::is_recaptcha) {
            Class::ReCaptcha
        } else if self.unknown_store() {
            Class::UnknownStore
        } else if self.token_problem() {
            Class::BearerOnLogin
        } else if self.message_has("isn't confirmed") || self.says("CUSTOMER_ACCOUNT_NOT_CONFIRMED") {
            Class::Unconfirmed
        } else if self.category == Some("graphql-authentication")
            || self.message_has("sign-in was incorrect")
            || self.says("CUSTOMER_SIGN_IN_INCORRECT_OR_LOCKED")
        {
            // Whatever else refuses a login as an authentication is taken for a wrong password:
            // counted, as Magento may have counted it.
            Class::WrongPassword
        } else {
            Class::Other
        }
    }

    /// What this error means for a check of the token.
    fn check_class(&self) -> Class {
        if self.unknown_store() {
            Class::UnknownStore
        } else if self.message_has("account is locked") || self.message_has("isn't confirmed") {
            Class::AccountRefused
        } else if self.token_problem()
            || self.message_has("isn't authorized")
            || matches!(self.category, Some("graphql-authentication" | "graphql-authorization"))
        {
            Class::TokenRefused
        } else {
            Class::Other
        }
    }
}

impl Item<'_> {
    /// What an error of `generateCustomerTokenAsAdmin` means (Magento's checks, in their order).
    fn as_admin_class(&self) -> Class {
        if self.unknown_store() {
            Class::UnknownStore
        } else if self.message_has("Login as Customer is disabled") {
            Class::LoginAsCustomerDisabled
        } else if self.message_has("remote shopping assistance is disabled") {
            Class::AssistanceDisabled
        } else if self.message_has("Customer email provided does not exist") {
            Class::UnknownCustomer
        } else if self.token_problem()
            || self.message_has("isn't authorized")
            || matches!(self.category, Some("graphql-authentication" | "graphql-authorization"))
        {
            // Not an admin's token any more: revoked, expired, or the request ran as a guest.
            Class::IssuerTokenRefused
        } else {
            Class::Other
        }
    }

    /// What an error of `exchangeOtpForCustomerToken` means.
    fn exchange_class(&self) -> Class {
        if self.message.is_some_and(super::is_recaptcha) {
            Class::ReCaptcha
        } else if self.unknown_store() {
            Class::UnknownStore
        } else if self.message_has("one-time password")
            || self.message_has("sign-in was incorrect")
            || self.category == Some("graphql-authentication")
        {
            Class::CodeRefused
        } else {
            Class::Other
        }
    }
}

/// The error of an answer with GraphQL errors: sorted by the first (2.4.8's status is that of the
/// first categorised one; a daemon's request has one field, so one error), its message shown.
fn error(head: &Head, errors: &[Value], body_len: usize, secret: &Secret, op: Op) -> LoginError {
    let first = Item::of(&errors[0]);
    let class = if head.status == reqwest::StatusCode::UNAUTHORIZED && head.challenged {
        // A challenge is a front's, whatever the body says.
        Class::NotMagentos
    } else {
        match op {
            Op::Login => first.login_class(),
            Op::Check => first.check_class(),
            Op::AsAdmin => first.as_admin_class(),
            Op::Exchange => first.exchange_class(),
        }
    };
    let pieces = Pieces::of(secret.expose());
    let filled = first.message.map(|m| fill_text(m, None));
    let mut detail = shown_detail(filled, body_len, &pieces, || "a GraphQL error without a message".to_owned());
    if errors.len() > 1 {
        detail.push_str(&format!(" (and {} more errors)", errors.len() - 1));
    }
    head.error(class, detail, Dialect::GraphQl)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::shown::tests::PW;

    /// An answer as the client would read it: its head, then its body through [`read`].
    fn read_answer(
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
        secret: &str,
        op: Op,
    ) -> Result<Value, LoginError> {
        let mut builder = hyper::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = reqwest::Response::from(builder.body(body.to_owned()).unwrap());
        read(&Head::of(&response), body.as_bytes(), &Secret::new(secret.to_owned()), op)
    }

    const JSON: [(&str, &str); 1] = [("content-type", "application/json")];

    fn login_error(status: u16, body: Value) -> LoginError {
        read_answer(status, &JSON, &body.to_string(), PW, Op::Login).unwrap_err()
    }

    fn check_error(status: u16, body: Value) -> LoginError {
        read_answer(status, &JSON, &body.to_string(), "eyJhbGciOiJIUzI1NiJ9.eyJ1aWQiOjF9.c2lnbmF0dXJl", Op::Check)
            .unwrap_err()
    }

    /// A resolver's error as Magento shapes it.
    fn field_error(message: &str, category: &str, field: &str) -> Value {
        json!({
            "errors": [{"message": message, "locations": [{"line": 1, "column": 33}], "path": [field], "extensions": {"category": category}}],
            "data": {field: null},
        })
    }

    /// An error raised before execution: no path, no data.
    fn early_error(message: &str, category: &str) -> Value {
        json!({"errors": [{"message": message, "extensions": {"category": category}}]})
    }

    const SIGN_IN: &str =
        "The account sign-in was incorrect or your account is disabled temporarily. Please wait and try again later.";

    #[test]
    fn the_login_body_is_the_documented_mutation_with_variables_and_never_grows() {
        let password = Secret::new(PW.to_owned());
        let body = login_body("alice@example.com", &password);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value, json!({"query": LOGIN, "variables": {"e": "alice@example.com", "p": PW}}));
        // The longest JSON two strings make: every byte escaped as \u00XX.
        let controls: String = (1u8..32).map(char::from).collect();
        for (username, password) in [("", ""), (controls.as_str(), controls.as_str()), ("é✓", "\"\\\"\\")] {
            let password = Secret::new(password.to_owned());
            let room = login_room(username, &password);
            let body = login_body(username, &password);
            assert_eq!(body.capacity(), room, "the buffer grew for {username:?}");
            assert!(body.len() <= room);
        }
        let check: Value = serde_json::from_str(CHECK_BODY).unwrap();
        assert_eq!(check, json!({"query": "{ customer { email } }"}));
    }

    #[test]
    fn a_token_is_read_from_its_field_and_checked_for_form() {
        let data = |v: Value| read_answer(200, &JSON, &v.to_string(), PW, Op::Login).unwrap();
        let token = token_in(
            data(json!({"data": {"generateCustomerToken": {"token": "abc.def.ghi"}}})),
            "generateCustomerToken",
            "token",
        );
        assert_eq!(token.unwrap().expose(), "abc.def.ghi");
        for (answer, says) in [
            (json!({"data": {"generateCustomerToken": null}}), "holds no token"),
            (json!({"data": null}), "holds no token"),
            (json!({}), "holds no token"),
            (json!({"data": {"generateCustomerToken": {"token": 42}}}), "a JSON number as its token"),
            (json!({"data": {"generateCustomerToken": {"token": ""}}}), "empty"),
            (json!({"data": {"generateCustomerToken": {"token": "a b"}}}), "character outside"),
        ] {
            let e = token_in(data(answer.clone()), "generateCustomerToken", "token").unwrap_err();
            assert_eq!(e.outcome, Outcome::InvalidResponse, "{answer}");
            assert!(e.message.contains(says), "{answer}: {}", e.message);
        }
        for (body, says) in [
            ("<html>down</html>", "is not JSON (it looks like HTML or XML)"),
            ("[1]", "is a JSON array, not an object"),
            ("", "is not JSON"),
        ] {
            let e = read_answer(200, &[], body, PW, Op::Login).unwrap_err();
            assert_eq!(e.outcome, Outcome::InvalidResponse);
            assert!(
                e.message.starts_with(&format!("the answer to the GraphQL login {says}")),
                "{body:?}: {}",
                e.message
            );
        }
        let email_of = |v: Value| email(&data(v));
        assert_eq!(email_of(json!({"data": {"customer": {"email": "a@b.c"}}})).unwrap(), "a@b.c");
        assert_eq!(email_of(json!({"data": {"customer": null}})).unwrap_err().outcome, Outcome::InvalidResponse);
    }

    /// §2's refusals of a login in both conventions: the same class whatever the status.
    #[test]
    fn login_refusals_are_sorted_as_rests_in_both_conventions() {
        for status in [200, 401] {
            let e = login_error(status, field_error(SIGN_IN, "graphql-authentication", "generateCustomerToken"));
            assert_eq!((e.outcome, e.final_for_password), (Outcome::AuthFailure, false), "{status}");
            assert!(e.message.contains(SIGN_IN) && e.message.contains("(a wrong password"), "{}", e.message);
        }
        let e = login_error(
            401,
            field_error(
                "This account isn't confirmed. Verify and try again.",
                "graphql-authentication",
                "generateCustomerToken",
            ),
        );
        assert_eq!((e.outcome, e.final_for_password), (Outcome::AuthFailure, true));
        assert!(e.message.contains("is not confirmed: confirm it"), "{}", e.message);
        let e = login_error(
            200,
            field_error("ReCaptcha validation failed, please try again", "graphql-input", "generateCustomerToken"),
        );
        assert_eq!(e.outcome, Outcome::Blocked);
        assert!(e.message.contains("Magento_ReCaptchaWebapiGraphQl"), "{}", e.message);
        // The Store header: 500 before execution up to 2.4.7, 200 from 2.4.8.
        for (status, said) in [
            (500, "Store code xx does not exist"),
            (200, "Store code xx does not exist"),
            (200, "Requested store is not found"),
        ] {
            let e = login_error(status, early_error(said, "graphql-input"));
            assert_eq!(e.outcome, Outcome::HttpError);
            assert!(e.message.contains(said), "{}", e.message);
            assert!(e.message.contains("store_code") && e.message.contains("magento.store_code"), "{}", e.message);
        }
        // A token read on a login: not the password's fault, nothing counted.
        let e = login_error(401, early_error("User token has been revoked", "graphql-authentication"));
        assert_eq!(e.outcome, Outcome::HttpError);
        assert!(e.message.contains("Authorization header"), "{}", e.message);
        // Adobe's typed codes, wherever in extensions they stand.
        let typed = json!({"errors": [{"message": "Sign-in failed", "extensions": {"error_code": "CUSTOMER_SIGN_IN_INCORRECT_OR_LOCKED"}}]});
        assert_eq!(login_error(200, typed).outcome, Outcome::AuthFailure);
        let typed = json!({"errors": [{"message": "No", "extensions": {"code": "CUSTOMER_ACCOUNT_NOT_CONFIRMED"}}]});
        assert!(login_error(200, typed).final_for_password);
        // What else Magento refuses is an http_error, its message shown.
        for (status, body) in [
            (415, json!({"errors": [{"message": "Request content type must be application/json"}]})),
            (200, field_error("Specify the \"email\" value.", "graphql-input", "generateCustomerToken")),
            (
                200,
                json!({"errors": [{"message": "Cannot query field \"generateCustomerToken\" on type \"Mutation\"."}]}),
            ),
            (500, json!({"errors": [{"message": "Internal server error"}]})),
        ] {
            let e = login_error(status, body.clone());
            assert_eq!(e.outcome, Outcome::HttpError, "{body}");
            let message = body["errors"][0]["message"].as_str().unwrap();
            assert!(e.message.starts_with(&format!("HTTP {status}")) && e.message.contains(message), "{}", e.message);
        }
    }

    /// §4's answers to a check: a dead token is refused in either convention; a good token of a
    /// locked account is kept (a login would be refused and counted).
    #[test]
    fn check_answers_refuse_dead_tokens_in_both_conventions() {
        for (status, body) in [
            (200, field_error("The current customer isn't authorized.", "graphql-authorization", "customer")),
            (403, field_error("The current customer isn't authorized.", "graphql-authorization", "customer")),
            (401, early_error("User token has been revoked", "graphql-authentication")),
            (401, early_error("Consumer key has expired", "graphql-authentication")),
            (401, early_error("Composite reader could not read a token", "graphql-authentication")),
        ] {
            let e = check_error(status, body.clone());
            assert_eq!(e.outcome, Outcome::AuthFailure, "{body}");
            assert!(e.message.contains("no longer accepts this token"), "{}", e.message);
        }
        for status in [200, 401] {
            let e = check_error(status, field_error("The account is locked.", "graphql-authentication", "customer"));
            assert_eq!(e.outcome, Outcome::HttpError);
            assert!(e.message.contains("the token is kept"), "{}", e.message);
        }
        let e = check_error(200, early_error("Store code xx does not exist", "graphql-input"));
        assert_eq!(e.outcome, Outcome::HttpError);
        assert!(e.message.contains("magento.store_code"), "{}", e.message);
    }

    /// What is not a GraphQL answer is sorted by its status alone, as REST's: a 401 is a front's.
    #[test]
    fn answers_that_are_not_graphql_are_sorted_by_status() {
        for op in [Op::Login, Op::Check] {
            let e = read_answer(401, &[("content-type", "text/html")], "<html>401</html>", PW, op).unwrap_err();
            assert_eq!(e.outcome, Outcome::HttpError);
            assert!(e.message.contains("a text/html answer, not Magento's JSON"), "{}", e.message);
            assert!(e.message.contains("htpasswd front or a WAF"), "{}", e.message);
            // A challenge is a front's even with a GraphQL-looking body.
            let body = field_error(SIGN_IN, "graphql-authentication", "generateCustomerToken").to_string();
            let e = read_answer(401, &[("www-authenticate", "Basic realm=\"x\"")], &body, PW, op).unwrap_err();
            assert_eq!(e.outcome, Outcome::HttpError);
            assert!(e.message.contains("htpasswd front or a WAF"), "{}", e.message);
            let e = read_answer(403, &[("content-type", "text/html")], "<html>denied</html>", PW, op).unwrap_err();
            assert_eq!(e.outcome, Outcome::HttpError, "a WAF's 403 is no refused token");
            let e = read_answer(503, &[("retry-after", "7")], "", PW, op).unwrap_err();
            assert_eq!((e.outcome, e.retry_after), (Outcome::HttpError, Some(std::time::Duration::from_secs(7))));
        }
        let e =
            read_answer(404, &JSON, r#"{"message":"Request does not match any route."}"#, PW, Op::Login).unwrap_err();
        assert_eq!(
            e.message,
            "HTTP 404 Not Found: Request does not match any route. (check base_url and magento.graphql_path: the GraphQL endpoint is not there)"
        );
        let e = read_answer(302, &[("location", "https://sso.example.net/login?p=x")], "", PW, Op::Login).unwrap_err();
        assert!(
            e.message.starts_with("HTTP 302 Found: redirected to https://sso.example.net/login?…; not followed"),
            "{}",
            e.message
        );
    }

    /// The client against the dev server's GraphQL, over loopback: every answer of §2 and §4 a
    /// store gives in each convention, and the cloud service's endpoint under its tenant.
    #[tokio::test]
    async fn the_client_logs_in_and_checks_through_graphql_in_each_convention() {
        use magento_devserver::{CloudService, DevServer, DevServerOptions, GraphQlConvention, Route};
        use std::time::Duration;

        let client = super::super::Client::new(&crate::config::MagentoSettings {
            timeout: Duration::from_secs(10),
            ca_file: None,
        })
        .unwrap();
        let cases = [
            (GraphQlConvention::V2_4_7, None),
            (GraphQlConvention::V2_4_8, None),
            (GraphQlConvention::V2_4_8, Some(CloudService::new("tenant"))),
        ];
        for (convention, cloud) in cases {
            let what = format!("{convention:?} cloud={}", cloud.is_some());
            let s = DevServer::start(DevServerOptions {
                graphql_convention: convention,
                cloud_service: cloud,
                ..Default::default()
            })
            .await
            .unwrap();
            s.add_customer("a@example.com", "pw-of-a");
            let at = |store: &str| crate::config::Endpoint::GraphQl {
                url: reqwest::Url::parse(&s.graphql_url()).unwrap(),
                store: Some(store.to_owned()),
            };
            let endpoint = at("default");
            let password = Secret::new("pw-of-a".to_owned());
            let token = client.login(&endpoint, "a@example.com", &password).await.unwrap();
            assert_eq!(s.check_token(token.expose()).as_deref(), Some("a@example.com"), "{what}");
            assert_eq!(client.whoami(&endpoint, &token).await.unwrap(), "a@example.com", "{what}");
            let login = &s.requests()[0];
            assert_eq!(
                (login.route, login.store.as_deref(), login.authorization),
                (Route::GraphQlLogin, Some("default"), false)
            );

            let wrong = client.login(&endpoint, "a@example.com", &Secret::new("wrong".into())).await.unwrap_err();
            assert_eq!(wrong.outcome, Outcome::AuthFailure, "{what}: {wrong}");
            assert_eq!(s.failures("a@example.com"), 1, "{what}");
            s.set_confirmed("a@example.com", false);
            let unconfirmed = client.login(&endpoint, "a@example.com", &password).await.unwrap_err();
            assert_eq!(unconfirmed.outcome, Outcome::AuthFailure, "{what}");
            let says = convention == GraphQlConvention::V2_4_8;
            assert_eq!(unconfirmed.final_for_password, says, "{what}: only 2.4.8 says so: {unconfirmed}");
            s.set_confirmed("a@example.com", true);
            s.reset_failures("a@example.com");

            s.set_recaptcha(true);
            let blocked = client.login(&endpoint, "a@example.com", &password).await.unwrap_err();
            assert_eq!(blocked.outcome, Outcome::Blocked, "{what}: {blocked}");
            s.set_recaptcha(false);
            let unknown = client.login(&at("xx"), "a@example.com", &password).await.unwrap_err();
            assert_eq!(unknown.outcome, Outcome::HttpError, "{what}");
            assert!(unknown.message.contains("Store code xx does not exist"), "{what}: {unknown}");
            assert_eq!(s.failures("a@example.com"), 0, "{what}: neither is counted");

            for dead in [Secret::new("garbled".into()), token] {
                if dead.expose() != "garbled" {
                    s.revoke("a@example.com");
                }
                let refused = client.whoami(&endpoint, &dead).await.unwrap_err();
                assert_eq!(refused.outcome, Outcome::AuthFailure, "{what}: {refused}");
            }
            s.set_basic_auth(Some(("stage", "pw")));
            let front = client.login(&endpoint, "a@example.com", &password).await.unwrap_err();
            assert_eq!(front.outcome, Outcome::HttpError, "{what}");
            assert!(front.message.contains("htpasswd front or a WAF"), "{what}: {front}");
            assert!(s.requests().iter().all(|r| !r.route.is_rest()), "{what}: no REST request");
            s.shutdown().await;
        }
    }

    /// errors[].message is server text: shown as REST's message is, never with the password.
    #[test]
    fn error_messages_are_shown_as_rests_and_never_with_the_password() {
        let echo = json!({"errors": [{"message": format!("Variable \"$p\" got invalid value \"{PW}\""), "extensions": {"category": "graphql-input"}}]});
        let e = login_error(200, echo.clone());
        assert!(
            e.message.starts_with(
                "HTTP 200 OK: (the answer's message is not shown: it repeats part of the request; the answer was"
            ),
            "{}",
            e.message
        );
        assert!(!e.message.contains("Sekr3t"));
        let long = json!({"errors": [{"message": "x\n".repeat(2_000)}, {"message": "second"}]});
        let e = login_error(500, long);
        assert!(e.message.contains("x\\nx\\n") && e.message.contains("… (and 1 more errors)"), "{}", e.message);
        assert!(e.message.len() < 1_200, "{} bytes", e.message.len());
        let e = login_error(500, json!({"errors": [{"extensions": {"category": "graphql-input"}}]}));
        assert_eq!(e.message, "HTTP 500 Internal Server Error: a GraphQL error without a message");
    }

    /// The answers of `generateCustomerTokenAsAdmin` and `exchangeOtpForCustomerToken` (§5, §9):
    /// what the admin or the store must change is `blocked`, a dead admin token is the issuer's
    /// `auth_failure` (renewed), a refused one-time code a transient error (a new code next try);
    /// with 2.4.7's 200 and 2.4.8's 401/403 alike.
    #[test]
    fn issuer_answers_are_sorted_whatever_the_status() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJ1aWQiOjF9.c2lnbmF0dXJl";
        let error =
            |op: Op, status: u16, body: Value| read_answer(status, &JSON, &body.to_string(), token, op).unwrap_err();
        let as_admin = "generateCustomerTokenAsAdmin";
        for (message, category, outcome, says) in [
            (
                "Login as Customer is disabled.",
                "graphql-authorization",
                Outcome::Blocked,
                "Enable Login as Customer = Yes",
            ),
            (
                "Allow remote shopping assistance is disabled.",
                "graphql-authorization",
                Outcome::Blocked,
                "allow_shopping_assistance",
            ),
            (
                "Customer email provided does not exist",
                "graphql-input",
                Outcome::Blocked,
                "correct the customer's username or store_code",
            ),
            (
                "The current customer isn't authorized.",
                "graphql-authorization",
                Outcome::AuthFailure,
                "a new one is asked for at once",
            ),
            (
                "User token has been revoked",
                "graphql-authentication",
                Outcome::AuthFailure,
                "a new one is asked for at once",
            ),
            (
                "Unable to generate tokens. Please wait and try again later.",
                "graphql",
                Outcome::HttpError,
                "Unable to generate tokens",
            ),
        ] {
            for status in [200, 401, 403] {
                let e = error(Op::AsAdmin, status, field_error(message, category, as_admin));
                assert_eq!(e.outcome, outcome, "{message} ({status})");
                assert!(e.message.contains(message) && e.message.contains(says), "{}", e.message);
            }
        }
        let exchange = "exchangeOtpForCustomerToken";
        for message in
            ["The one-time password is invalid or has already been used.", "The one-time password has expired."]
        {
            let e = error(Op::Exchange, 200, field_error(message, "graphql-authentication", exchange));
            assert_eq!(e.outcome, Outcome::HttpError, "{message}");
            assert!(e.message.contains("the next try asks for a new one"), "{}", e.message);
        }
        let e = error(
            Op::Exchange,
            200,
            field_error("ReCaptcha validation failed, please try again", "graphql-input", exchange),
        );
        assert_eq!(e.outcome, Outcome::Blocked);
        let e = error(Op::AsAdmin, 500, early_error("Store code xx does not exist", "graphql"));
        assert_eq!(e.outcome, Outcome::HttpError);
        assert!(e.message.contains("Store header"), "{}", e.message);
    }
}
