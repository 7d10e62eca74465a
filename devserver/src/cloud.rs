//! The cloud service's way to a customer token without a password (shared/magento-other-paths.md
//! §9): an IMS stand-in for server-to-server credentials, the one-time code route and the
//! exchange of a code for a customer token.
//!
//! - `POST /ims/token/v3` (form `client_id`, `client_secret`, `grant_type=client_credentials`,
//!   `scope`): 200 `{"access_token","token_type":"bearer","expires_in"}`; IMS-like
//!   `{"error","error_description"}` with 400 (no or unknown client id, another grant type) or
//!   401 (wrong secret). Served on the same listener, outside the tenant's path.
//! - `POST /<tenant-id>/V1/customer/{customerId}/otp` with `Authorization: Bearer <IMS token>`,
//!   `x-api-key: <client id>`, `x-gw-ims-org-id: <org>` and an optional `{"reason"}`: 200
//!   `{"otp":"<32 hex>"}`. 401 for a missing, unknown or expired IMS token; 403 for another
//!   client's API key, another org, or a client without `Magento_LoginAsCustomer::login`; 400 for
//!   an id that is not an integer, 404 for an unknown one; 500 (Magento's production-mode body)
//!   when the customer has not allowed remote shopping assistance: the docs say it "might
//!   surface as 500", so this server does exactly that.
//! - GraphQL `exchangeOtpForCustomerToken(email, otp) { token }` (in `graphql`, resolved by
//!   [`exchange`]): single use, valid `otp_lifetime`, bound to its customer; a customer token as
//!   the login mints it.
//!
//! Neither a client secret nor a code is logged or kept in request records.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use rand::Rng;

use super::handler::{self, bearer, decode_body, Reply, Req};
use super::render::{Format, Node};
use super::{DevServer, Shared, StoreInfo};

/// A server-to-server credential of the IMS stand-in.
pub(crate) struct ImsClient {
    secret: String,
    org: String,
    /// Its integration holds `Magento_LoginAsCustomer::login`.
    acl_login: bool,
}

pub(crate) struct ImsToken {
    client_id: String,
    exp: i64,
}

pub(crate) struct Otp {
    customer: u64,
    exp: i64,
    used: bool,
}

pub(crate) const MSG_OTP_INVALID: &str = "The one-time password is invalid or has already been used.";
pub(crate) const MSG_OTP_EXPIRED: &str = "The one-time password has expired.";
pub(crate) const MSG_OTP_OTHER_CUSTOMER: &str = "The one-time password was not issued for this customer.";
const ACL_LOGIN: &str = "Magento_LoginAsCustomer::login";

fn ims_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::node(
        Format::Json,
        status,
        &Node::Map(vec![("error", Node::str(error)), ("error_description", Node::str(description))]),
    )
}

/// `POST /ims/token/v3`.
pub(crate) fn ims_token(shared: &Shared, req: &Req<'_>) -> Reply {
    if *req.method != hyper::Method::POST {
        return ims_error(405, "method_not_allowed", "use POST");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(req.body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let Some(client_id) = field("client_id") else {
        return ims_error(400, "invalid_request", "missing client_id parameter");
    };
    let iat = shared.cfg.unix_now();
    let lifetime = shared.cfg.ims_token_lifetime_secs;
    let mut st = shared.lock();
    let iss = &mut st.issuers;
    let Some(client) = iss.ims_clients.get(client_id) else {
        return ims_error(400, "invalid_client", "invalid client_id parameter");
    };
    if field("client_secret") != Some(client.secret.as_str()) {
        return ims_error(401, "invalid_client", "invalid client_secret parameter");
    }
    if field("grant_type") != Some("client_credentials") {
        return ims_error(400, "unsupported_grant_type", "the grant_type must be client_credentials");
    }
    let token = random_token(96);
    iss.ims_tokens.insert(token.clone(), ImsToken { client_id: client_id.to_owned(), exp: iat + lifetime });
    iss.tokens.push(token.clone());
    iss.counts.ims_tokens += 1;
    Reply::node(
        Format::Json,
        200,
        &Node::Map(vec![
            ("access_token", Node::Str(token)),
            ("token_type", Node::str("bearer")),
            ("expires_in", Node::Int(lifetime)),
        ]),
    )
}

/// Letters and digits: not a JWT, so nothing in it can be read; `expires_in` is the truth.
fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

fn not_authorized(format: Format, status: u16) -> Reply {
    Reply::node(
        format,
        status,
        &Node::Map(vec![
            ("message", Node::str("The consumer isn't authorized to access %resources.")),
            ("parameters", Node::Map(vec![("resources", Node::str(ACL_LOGIN))])),
        ]),
    )
}

/// `POST /<tenant-id>/V1/customer/{customerId}/otp`: the IMS token, the API key, the org, the
/// ACL, the body, the customer, the customer's opt-in; then a fresh code.
pub(crate) fn issue_otp(shared: &Shared, format: Format, req: &Req<'_>, customer_id: &str) -> Reply {
    let now = shared.cfg.unix_now();
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    {
        let st = shared.lock();
        let iss = &st.issuers;
        let Some(token) = bearer(req.authorization).and_then(|t| iss.ims_tokens.get(t)).filter(|t| now < t.exp) else {
            return not_authorized(format, 401);
        };
        if header("x-api-key") != Some(token.client_id.as_str()) {
            return Reply::node(
                format,
                403,
                &Node::Map(vec![("error_code", Node::str("403003")), ("message", Node::str("Api Key is invalid"))]),
            );
        }
        let Some(client) = iss.ims_clients.get(&token.client_id) else {
            return not_authorized(format, 401);
        };
        if header("x-gw-ims-org-id") != Some(client.org.as_str()) || !client.acl_login {
            return not_authorized(format, 403);
        }
    }
    // The optional `{"reason": "..."}`: only its decoding can fail.
    if let Err(message) = decode_body(req.content_type, req.body, None) {
        return Reply::message(format, 400, &message);
    }
    let Ok(id) = customer_id.parse::<u64>() else {
        return Reply::node(
            format,
            400,
            &Node::Map(vec![
                (
                    "message",
                    Node::str("The \"%value\" value's type is invalid. The \"%type\" type was expected. Verify and try again."),
                ),
                ("parameters", Node::Map(vec![("value", Node::str(customer_id)), ("type", Node::str("int"))])),
            ]),
        );
    };
    let mut st = shared.lock();
    let allowed = match st.customers.get(&id) {
        None => {
            return Reply::node(
                format,
                404,
                &Node::Map(vec![
                    ("message", Node::str("No such entity with %fieldName = %fieldValue")),
                    (
                        "parameters",
                        Node::Map(vec![("fieldName", Node::str("customerId")), ("fieldValue", Node::str(customer_id))]),
                    ),
                ]),
            )
        }
        Some(c) => c.assistance_allowed,
    };
    if !allowed {
        let report: u32 = rand::thread_rng().gen();
        return Reply::message(
            format,
            500,
            &format!("Internal Error. Details are available in Magento log file. Report ID: webapi-{report:08x}"),
        );
    }
    let code: String = {
        let mut rng = rand::thread_rng();
        (0..16).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
    };
    let iss = &mut st.issuers;
    iss.otps.insert(code.clone(), Otp { customer: id, exp: now + shared.cfg.otp_lifetime_secs, used: false });
    iss.counts.otps_issued += 1;
    Reply::node(format, 200, &Node::Map(vec![("otp", Node::Str(code))]))
}

/// Why an exchange failed: its message (category `graphql-authentication`).
pub(crate) fn exchange(shared: &Shared, store: &StoreInfo, email: &str, otp: &str) -> Result<String, &'static str> {
    let now = shared.cfg.unix_now();
    let uid = {
        let mut st = shared.lock();
        let customer = st.lookup_mut(&store.website, &email.to_lowercase()).map(|c| c.id);
        let iss = &mut st.issuers;
        let code = iss.otps.get_mut(otp).filter(|c| !c.used).ok_or(MSG_OTP_INVALID)?;
        if now >= code.exp {
            return Err(MSG_OTP_EXPIRED);
        }
        if customer != Some(code.customer) {
            return Err(MSG_OTP_OTHER_CUSTOMER);
        }
        code.used = true;
        let uid = code.customer;
        iss.counts.otps_exchanged += 1;
        uid
    };
    Ok(handler::mint_customer_token(shared, uid))
}

/// Whether a request is the one-time code route, and for which raw customer id: `rest` is the
/// path after the tenant's base, slashes trimmed.
pub(crate) fn otp_path(rest: &str) -> Option<&str> {
    rest.strip_prefix("V1/customer/")?.strip_suffix("/otp").filter(|id| !id.is_empty() && !id.contains('/'))
}

impl DevServer {
    /// A server-to-server credential of the IMS stand-in, belonging to this IMS org, whose
    /// integration holds `Magento_LoginAsCustomer::login`. Re-adding a client id replaces it.
    pub fn add_ims_client(&self, client_id: &str, client_secret: &str, org_id: &str) {
        let mut st = self.shared.lock();
        st.issuers.credentials.push(client_secret.to_owned());
        st.issuers.ims_clients.insert(
            client_id.to_owned(),
            ImsClient { secret: client_secret.to_owned(), org: org_id.to_owned(), acl_login: true },
        );
    }

    /// Grants or removes the IMS client's `Magento_LoginAsCustomer::login`.
    pub fn set_ims_client_acl(&self, client_id: &str, login: bool) {
        if let Some(c) = self.shared.lock().issuers.ims_clients.get_mut(client_id) {
            c.acl_login = login;
        }
    }

    /// The IMS stand-in's token URL (`<base_url>/ims/token/v3`), served with the cloud service.
    pub fn ims_token_url(&self) -> String {
        format!("{}/ims/token/v3", self.base_url())
    }

    /// Sets the customer's "Allow remote shopping assistance" (`allow_remote_shopping_assistance`;
    /// set for every customer here): the one-time code route requires it, and
    /// `generateCustomerTokenAsAdmin` when told to check it.
    pub fn set_assistance_allowed(&self, email: &str, allowed: bool) {
        let key = email.to_lowercase();
        self.shared.lock().customers.values_mut().filter(|c| c.email.to_lowercase() == key).for_each(|c| {
            c.assistance_allowed = allowed;
        });
    }

    /// Turns `login_as_customer/general/enabled` on or off (off by default, as in Magento).
    pub fn set_login_as_customer(&self, enabled: bool) {
        self.shared.login_as_customer.store(enabled, Ordering::Relaxed);
    }

    /// Makes `generateCustomerTokenAsAdmin` require the customer's own opt-in (as the docs
    /// say), or not (as the source read does, the default).
    pub fn set_check_assistance_allowed(&self, check: bool) {
        self.shared.check_assistance.store(check, Ordering::Relaxed);
    }

    /// The id of the customer with this email in website `base` (else in any website): what
    /// `customers[].customer_id` must say for the one-time code route.
    pub fn customer_id(&self, email: &str) -> Option<u64> {
        let key = email.to_lowercase();
        let st = self.shared.lock();
        let mut matching: Vec<(bool, u64)> = st
            .customers
            .values()
            .filter(|c| c.email.to_lowercase() == key)
            .map(|c| (c.website != "base", c.id))
            .collect();
        matching.sort_unstable();
        matching.first().map(|(_, id)| *id)
    }
}
