//! The requests of the ways to a customer token without the customer's password
//! (shared/magento-other-paths.md §5, §6, §9): the admin token (with or without the Google
//! Authenticator code), `generateCustomerTokenAsAdmin`, an IMS access token, the Cloud Service's
//! one-time code and its exchange. Each answer is read and sorted as a login's is, into the same
//! [`Outcome`]s, with what an operator must change in Magento or in `auth` when nothing else will
//! help.
//!
//! The admin password, the TOTP code, the IMS client secret and a one-time code go out in one
//! zeroizing buffer each, and never come back in a message: an answer repeating a piece of them
//! is not shown.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde::Serialize;
use zeroize::Zeroizing;

use super::graphql::{self, Op};
use super::{
    error_answer_as, json_buffer, network_error, not_magentos_json, read_body, shown_detail, Class, Client, Dialect,
    Head, LoginError, Outcome,
};
use crate::config::ImsCredential;
use crate::secret::Secret;
use crate::shown::{fill_text, Pieces};
use crate::token;

/// `generateCustomerTokenAsAdmin`, the email as a variable.
const AS_ADMIN: &str = "mutation($e:String!){generateCustomerTokenAsAdmin(input:{customer_email:$e}){customer_token}}";

/// `exchangeOtpForCustomerToken`, email and code as variables.
const EXCHANGE: &str = "mutation($e:String!,$o:String!){exchangeOtpForCustomerToken(email:$e,otp:$o){token}}";

/// An IMS access token and how long IMS says it lives.
#[derive(Debug)]
pub struct ImsToken {
    pub token: Secret,
    pub expires_in: Duration,
}

impl Client {
    /// An admin token: `POST .../V1/integration/admin/token {username, password}`, or with a code
    /// (`otp`) `POST .../V1/tfa/provider/google/authenticate {username, password, otp}`.
    pub async fn admin_token(
        &self,
        url: &Url,
        username: &str,
        password: &Secret,
        otp: Option<&Secret>,
    ) -> Result<Secret, LoginError> {
        #[derive(Serialize)]
        struct Body<'a> {
            username: &'a str,
            password: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            otp: Option<&'a str>,
        }
        let code = otp.map(Secret::expose);
        let body = json_buffer(
            &Body { username, password: password.expose(), otp: code },
            &[username, password.expose(), code.unwrap_or("")],
        );
        let answer = async {
            let request = self.post(url, "application/json")?.body(hyper::body::Bytes::from_owner(body));
            let response = request.send().await.map_err(network_error)?;
            if response.status() != StatusCode::OK {
                return Err(error_answer_as(response, password, classify_admin).await);
            }
            super::parse_token(&read_body(response, true).await?)
        }
        .await;
        let answer = answer.map_err(|e| e.masking(password));
        match otp {
            Some(code) => answer.map_err(|e| e.masking(code)),
            None => answer,
        }
    }

    /// `generateCustomerTokenAsAdmin(input: {customer_email})` at `url` with the admin's token,
    /// the store view in the `Store` header: the customer's (opaque) token.
    pub async fn token_as_admin(
        &self,
        url: &Url,
        store: Option<&str>,
        admin_token: &Secret,
        email: &str,
    ) -> Result<Secret, LoginError> {
        #[derive(Serialize)]
        struct Variables<'a> {
            e: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            query: &'static str,
            variables: Variables<'a>,
        }
        let body = serde_json::to_vec(&Body { query: AS_ADMIN, variables: Variables { e: email } })
            .expect("strings always serialize");
        let data = self.graphql(url, store, Some(admin_token), body.into(), admin_token, Op::AsAdmin).await;
        data.and_then(|data| graphql::token_in(data, "generateCustomerTokenAsAdmin", "customer_token"))
            .map_err(|e| e.masking(admin_token))
    }

    /// An IMS access token for server-to-server credentials (client credentials grant).
    pub async fn ims_token(&self, ims: &ImsCredential, secret: &Secret) -> Result<ImsToken, LoginError> {
        let scope = ims.scopes.join(",");
        let fields = [
            ("grant_type", "client_credentials"),
            ("client_id", ims.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("scope", scope.as_str()),
        ];
        // Percent-encoding at most triples a byte: the buffer never grows.
        let room = fields.iter().map(|(k, v)| k.len() + 3 * v.len() + 2).sum();
        let mut body = Zeroizing::new(Vec::with_capacity(room));
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                body.push(b'&');
            }
            body.extend_from_slice(key.as_bytes());
            body.push(b'=');
            for piece in url::form_urlencoded::byte_serialize(value.as_bytes()) {
                body.extend_from_slice(piece.as_bytes());
            }
        }
        let url = &ims.token_url;
        let answer = async {
            let request =
                self.post(url, "application/x-www-form-urlencoded")?.body(hyper::body::Bytes::from_owner(body));
            let response = request.send().await.map_err(network_error)?;
            let head = Head::of(&response);
            let ok = head.status == StatusCode::OK;
            let body = read_body(response, ok).await?;
            if !ok {
                return Err(ims_error(&head, &body, secret));
            }
            read_ims_token(&body)
        }
        .await;
        answer.map_err(|e| e.masking(secret))
    }

    /// `POST <base>/V1/customer/<id>/otp` with the IMS token, the client id as `x-api-key` and
    /// the org as `x-gw-ims-org-id`: a one-time code for the customer.
    pub async fn one_time_code(
        &self,
        url: &Url,
        ims: &ImsCredential,
        ims_token: &Secret,
    ) -> Result<Secret, LoginError> {
        let answer = async {
            let response = self
                .post(url, "application/json")?
                .header("x-api-key", &ims.client_id)
                .header("x-gw-ims-org-id", &ims.org_id)
                .bearer_auth(ims_token.expose())
                // The audit log's reason for the session.
                .body(r#"{"reason":"magento-token-sidecar: token refresh"}"#)
                .send()
                .await
                .map_err(network_error)?;
            if response.status() != StatusCode::OK {
                return Err(error_answer_as(response, ims_token, classify_otp).await);
            }
            let body = read_body(response, true).await?;
            let invalid = |m: &str| {
                LoginError::new(Outcome::InvalidResponse, format!("the answer to the one-time code route {m}"))
            };
            let mut value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| invalid("is not JSON"))?;
            match value.get_mut("otp").map(serde_json::Value::take) {
                Some(serde_json::Value::String(code)) => {
                    let code = Secret::new(code);
                    token::check_form(code.expose()).map_err(|_| invalid("holds no code of the expected form"))?;
                    Ok(code)
                }
                _ => Err(invalid("holds no otp")),
            }
        }
        .await;
        answer.map_err(|e| e.masking(ims_token))
    }

    /// `exchangeOtpForCustomerToken(email, otp)` at `url`, the store view in the `Store` header:
    /// the customer's token.
    pub async fn exchange_code(
        &self,
        url: &Url,
        store: Option<&str>,
        email: &str,
        code: &Secret,
    ) -> Result<Secret, LoginError> {
        #[derive(Serialize)]
        struct Variables<'a> {
            e: &'a str,
            o: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            query: &'static str,
            variables: Variables<'a>,
        }
        let value = Body { query: EXCHANGE, variables: Variables { e: email, o: code.expose() } };
        let body = json_buffer(&value, &[EXCHANGE, email, code.expose()]);
        let body = hyper::body::Bytes::from_owner(body);
        let data = self.graphql(url, store, None, body, code, Op::Exchange).await;
        data.and_then(|data| graphql::token_in(data, "exchangeOtpForCustomerToken", "token"))
            .map_err(|e| e.masking(code))
    }
}

/// Sorts an error answer of the admin token routes.
fn classify_admin(status: StatusCode, challenged: bool, magento: Option<&str>) -> Class {
    let says = |text: &str| magento.is_some_and(|m| m.contains(text));
    match status.as_u16() {
        400 if says("2fa provider-specific endpoints") || says("configure 2FA") || says("Two-Factor Authorization") => {
            Class::TwoFactorRequired
        }
        401 if !challenged && says("Invalid code") => Class::WrongCode,
        _ => super::classify(status, challenged, magento),
    }
}

/// Sorts an error answer of the one-time code route.
fn classify_otp(status: StatusCode, challenged: bool, magento: Option<&str>) -> Class {
    match status.as_u16() {
        401 if challenged || magento.is_none() => Class::NotMagentos,
        401 => Class::IssuerTokenRefused,
        403 => Class::OtpForbidden,
        404 if magento.is_some() => Class::UnknownCustomerId,
        500 => Class::OtpServerError,
        _ => Class::Other,
    }
}

/// An IMS error answer (`{"error","error_description"}`), its text shown as a server's is.
fn ims_error(head: &Head, body: &[u8], secret: &Secret) -> LoginError {
    let pieces = Pieces::of(secret.expose());
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| value.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(str::to_owned);
    let (error, description) = (field("error"), field("error_description"));
    let text = match (&error, &description) {
        (Some(e), Some(d)) => Some(format!("{e}: {d}")),
        (Some(t), None) | (None, Some(t)) => Some(t.clone()),
        (None, None) => None,
    };
    let class = match (head.status.as_u16(), error.as_deref()) {
        (_, Some("invalid_client" | "unauthorized_client")) => Class::ImsRefused,
        (401, Some(_)) => Class::ImsRefused,
        (401, None) => Class::NotMagentos,
        _ => Class::Other,
    };
    let filled = text.map(|t| fill_text(&t, None));
    let detail = shown_detail(filled, body.len(), &pieces, || not_magentos_json(head, &pieces));
    head.error(class, detail, Dialect::Rest)
}

/// `{"access_token": "...", "expires_in": <seconds>}`.
fn read_ims_token(body: &[u8]) -> Result<ImsToken, LoginError> {
    let invalid = |m: String| LoginError::new(Outcome::InvalidResponse, format!("the IMS answer {m}"));
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("is not JSON: {e}")))?;
    let expires_in = value
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
        .filter(|s| *s > 0)
        .ok_or_else(|| invalid("holds no expires_in of 1 second or more".into()))?;
    let token = match value.get_mut("access_token").map(serde_json::Value::take) {
        Some(serde_json::Value::String(t)) => Secret::new(t),
        _ => return Err(invalid("holds no access_token".into())),
    };
    token::check_form(token.expose()).map_err(|e| invalid(format!("holds an access_token that {e}")))?;
    Ok(ImsToken { token, expires_in: Duration::from_secs(expires_in) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_answers_are_sorted() {
        let c = |status: u16, m: &str| classify_admin(StatusCode::from_u16(status).unwrap(), false, Some(m));
        assert_eq!(
            c(400, "Please use the 2fa provider-specific endpoints to obtain a token."),
            Class::TwoFactorRequired
        );
        assert_eq!(
            c(400, "Please ask an administrator with sufficient access to configure 2FA first"),
            Class::TwoFactorRequired
        );
        assert_eq!(c(401, "Invalid code."), Class::WrongCode);
        assert_eq!(
            c(401, "The account sign-in was incorrect or your account is disabled temporarily."),
            Class::WrongPassword
        );
        assert_eq!(Class::TwoFactorRequired.outcome(), Outcome::Blocked);
        assert_eq!(Class::WrongCode.outcome(), Outcome::AuthFailure);
    }

    #[test]
    fn one_time_code_answers_are_sorted() {
        let c = |status: u16, m: Option<&str>| classify_otp(StatusCode::from_u16(status).unwrap(), false, m);
        assert_eq!(c(401, Some("The consumer isn't authorized to access %resources.")), Class::IssuerTokenRefused);
        assert_eq!(c(401, None), Class::NotMagentos);
        assert_eq!(c(403, Some("Api Key is invalid")), Class::OtpForbidden);
        assert_eq!(c(404, Some("No such entity with %fieldName = %fieldValue")), Class::UnknownCustomerId);
        assert_eq!(c(500, Some("Internal Error.")), Class::OtpServerError);
        assert_eq!(c(503, None), Class::Other);
    }

    #[test]
    fn an_ims_answer_gives_the_token_and_its_life_or_why_not() {
        let t = read_ims_token(br#"{"access_token":"eyJ.abc","token_type":"bearer","expires_in":86399}"#).unwrap();
        assert_eq!((t.token.expose(), t.expires_in), ("eyJ.abc", Duration::from_secs(86399)));
        for (body, says) in [
            (&br#"{"access_token":"x"}"#[..], "expires_in"),
            (br#"{"expires_in":10}"#, "access_token"),
            (br#"{"access_token":"a b","expires_in":10}"#, "access_token that"),
            (b"<html>", "not JSON"),
        ] {
            let e = read_ims_token(body).unwrap_err();
            assert_eq!(e.outcome, Outcome::InvalidResponse);
            assert!(e.message.contains(says), "{}", e.message);
        }
    }

    #[test]
    fn an_ims_refusal_is_shown_without_the_secret() {
        let answer = |status: u16, body: &str| {
            let response = reqwest::Response::from(
                hyper::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(body.to_owned())
                    .unwrap(),
            );
            ims_error(&Head::of(&response), body.as_bytes(), &Secret::new("Zq9-Wx7Kp2Vb-s3cr3t".into()))
        };
        let e = answer(401, r#"{"error":"invalid_client","error_description":"invalid client_secret parameter"}"#);
        assert_eq!(e.outcome, Outcome::AuthFailure);
        assert!(e.message.contains("invalid_client: invalid client_secret parameter"), "{}", e.message);
        let e = answer(400, r#"{"error":"invalid_request","error_description":"bad Zq9-Wx7Kp2Vb-s3cr3t"}"#);
        assert_eq!(e.outcome, Outcome::HttpError);
        assert!(!e.message.contains("s3cr3t") && e.message.contains("not shown"), "{}", e.message);
        let e = answer(429, r#"{"error":"too_many_requests"}"#);
        assert_eq!(e.outcome, Outcome::HttpError);
    }
}
