//! Admin users and the admin token service (shared/magento-other-paths.md §6): `POST
//! /rest[/<store>]/V1/integration/admin/token` and, with Magento_TwoFactorAuth, `POST
//! /rest[/<store>]/V1/tfa/provider/google/authenticate`. Also where the state of every issuer of
//! customer tokens without a customer password lives ([`Issuers`]: admin users, IMS clients, their
//! tokens, one-time codes and the counts tests read).
//!
//! One login of an admin, in Magento's order:
//! 1. the admin's own `oauth_token_request_log` row (user type admin, the same max failures and
//!    timeout as customers' rows, never shared with them): while it holds, every login is refused
//!    with the generic 401 and not counted;
//! 2. the admin user lock (`admin/security/lockout_failures` / `lockout_threshold`): while it
//!    holds, the right password is refused too (counted in the row);
//! 3. the password: a wrong one counts in the row and towards the admin lock;
//! 4. with 2FA on and a TOTP secret: the token route refuses with the provider list (400), the
//!    Google provider checks the code against the current and the previous 30 s step, a wrong code
//!    being a failure of the admin account (row and lock) answered 401 `Invalid code.`;
//! 5. success: the row is deleted, the lock's count cleared, a JWT with `utypid` 2 minted
//!    (`webapi/jwtauth/admin_expiration`).
//!
//! Nothing here logs or records an admin's password, TOTP secret or code.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde_json::{Map, Value};

use super::cloud::{ImsClient, ImsToken, Otp};
use super::handler::{decode_body, required, Reply, Req};
use super::jwt::Claims;
use super::lockout::Lockout;
use super::render::{Format, Node};
use super::throttle::Throttle;
use super::{DevServer, Shared};

pub(crate) const MSG_TWO_FACTOR: &str = "Please use the 2fa provider-specific endpoints to obtain a token.";
pub(crate) const MSG_INVALID_CODE: &str = "Invalid code.";
/// What the Google provider answers for an admin who has no Google Authenticator configured
/// (UNCONFIRMED wording).
pub(crate) const MSG_PROVIDER_NOT_ALLOWED: &str = "Provider is not allowed.";
const MSG_INPUT_EXCEPTIONS: &str = "One or more input exceptions have occurred.";

/// One `admin_user` row with its 2FA configuration and the two Login as Customer ACLs.
pub(crate) struct AdminUser {
    pub(crate) id: u64,
    password: String,
    /// The Google Authenticator secret (decoded base32), when configured.
    totp: Option<Vec<u8>>,
    lockout: Lockout,
    /// `Magento_LoginAsCustomer::login`.
    pub(crate) acl_login: bool,
    /// `Magento_LoginAsCustomer::allow_shopping_assistance`.
    pub(crate) acl_assistance: bool,
}

/// How many of each were issued: what the daemon's tests count (one admin login per admin-token
/// life, one IMS token per `expires_in`, one code and one exchange per customer refresh).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IssuerCounts {
    /// Admin tokens minted, by the token route and the Google provider together.
    pub admin_tokens: usize,
    /// Admin logins refused (wrong password, unknown admin, throttled, locked, wrong code).
    pub admin_refusals: usize,
    /// Customer tokens `generateCustomerTokenAsAdmin` issued.
    pub login_as_customer_tokens: usize,
    /// Access tokens the IMS stand-in issued.
    pub ims_tokens: usize,
    /// One-time codes the cloud route issued.
    pub otps_issued: usize,
    /// One-time codes exchanged for a customer token.
    pub otps_exchanged: usize,
}

/// Everything about the issuers, under the server's one lock.
pub(crate) struct Issuers {
    /// By lower-cased username (MySQL compares them case-insensitively).
    pub(crate) admins: HashMap<String, AdminUser>,
    next_admin_id: u64,
    /// The admins' `oauth_token_request_log` rows (user type admin), apart from customers'.
    pub(crate) throttle: Throttle,
    /// Admin passwords, TOTP secrets and IMS client secrets, in the order given.
    pub(crate) credentials: Vec<String>,
    /// Admin and IMS access tokens, in the order issued.
    pub(crate) tokens: Vec<String>,
    pub(crate) ims_clients: HashMap<String, ImsClient>,
    pub(crate) ims_tokens: HashMap<String, ImsToken>,
    pub(crate) otps: HashMap<String, Otp>,
    pub(crate) counts: IssuerCounts,
}

impl Issuers {
    pub(crate) fn new(throttle: Throttle) -> Issuers {
        Issuers {
            admins: HashMap::new(),
            next_admin_id: 1,
            throttle,
            credentials: Vec::new(),
            tokens: Vec::new(),
            ims_clients: HashMap::new(),
            ims_tokens: HashMap::new(),
            otps: HashMap::new(),
            counts: IssuerCounts::default(),
        }
    }

    pub(crate) fn admin_by_id(&self, id: u64) -> Option<&AdminUser> {
        self.admins.values().find(|a| a.id == id)
    }
}

/// A base32 secret as authenticator apps show it: any case, spaces and padding allowed.
pub(crate) fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let cleaned: String =
        secret.chars().filter(|c| !c.is_whitespace() && *c != '=').map(|c| c.to_ascii_uppercase()).collect();
    data_encoding::BASE32_NOPAD.decode(cleaned.as_bytes()).ok().filter(|b| !b.is_empty())
}

/// RFC 6238 with Google Authenticator's parameters: SHA-1, 30 s steps, 6 digits.
pub(crate) fn totp_at(secret: &[u8], unix: i64) -> String {
    totp_lite::totp_custom::<totp_lite::Sha1>(30, 6, secret, unix.max(0) as u64)
}

/// Why an admin login failed.
enum AdminRefusal {
    /// Throttled, locked, unknown admin, wrong password: the generic 401.
    SignIn,
}

/// Steps 1-3 of a login: the admin's id when the credentials hold now. Every refusal but the
/// throttle's own is counted in the admin's row.
fn check_credentials(shared: &Shared, username: &str, password: &str) -> Result<u64, AdminRefusal> {
    let key = username.to_lowercase();
    let now = shared.cfg.instant_now();
    let policy = shared.cfg.admin_lock;
    let mut st = shared.lock();
    let iss = &mut st.issuers;
    if iss.throttle.is_locked(&key, now) {
        iss.counts.admin_refusals += 1;
        return Err(AdminRefusal::SignIn);
    }
    let verdict = match iss.admins.get_mut(&key) {
        Some(a) if a.lockout.is_locked(now) => None,
        Some(a) if a.password != password => {
            a.lockout.record_failure(policy, now);
            None
        }
        Some(a) => Some(a.id),
        None => None,
    };
    match verdict {
        Some(id) => Ok(id),
        None => {
            iss.throttle.record_failure(&key, now);
            iss.counts.admin_refusals += 1;
            Err(AdminRefusal::SignIn)
        }
    }
}

/// A wrong 2FA code after the right password: a failure of the admin account.
fn code_failure(shared: &Shared, username: &str) {
    let key = username.to_lowercase();
    let now = shared.cfg.instant_now();
    let policy = shared.cfg.admin_lock;
    let mut st = shared.lock();
    let iss = &mut st.issuers;
    if let Some(a) = iss.admins.get_mut(&key) {
        a.lockout.record_failure(policy, now);
    }
    iss.throttle.record_failure(&key, now);
    iss.counts.admin_refusals += 1;
}

/// Step 5: the row deleted, the lock's count cleared, an admin JWT minted.
fn issue(shared: &Shared, username: &str, id: u64) -> String {
    let iat = shared.cfg.unix_now();
    let token = shared.signer.mint_admin(Claims { uid: id, iat, exp: iat + shared.cfg.admin_token_lifetime_secs });
    let key = username.to_lowercase();
    let mut st = shared.lock();
    let iss = &mut st.issuers;
    iss.throttle.reset(&key);
    if let Some(a) = iss.admins.get_mut(&key) {
        a.lockout.unlock();
    }
    iss.tokens.push(token.clone());
    iss.counts.admin_tokens += 1;
    token
}

/// The string fields a service method requires, in order, or Magento's 400 for the missing ones
/// (one: its own message; several: the input exceptions list).
fn required_fields<'p>(
    format: Format,
    params: &'p Map<String, Value>,
    names: &[&'static str],
) -> Result<Vec<&'p str>, Box<Reply>> {
    let mut values = Vec::with_capacity(names.len());
    let mut missing = Vec::new();
    for name in names {
        match params.get(*name).and_then(Value::as_str).filter(|s| !s.is_empty()) {
            Some(v) => values.push(v),
            None => missing.push(*name),
        }
    }
    match missing.as_slice() {
        [] => Ok(values),
        [one] => Err(Box::new(Reply::node(format, 400, &required(one)))),
        many => Err(Box::new(Reply::node(
            format,
            400,
            &Node::Map(vec![
                ("message", Node::str(MSG_INPUT_EXCEPTIONS)),
                ("errors", Node::List(many.iter().map(|n| required(n)).collect())),
            ]),
        ))),
    }
}

fn params(format: Format, req: Req<'_>) -> Result<Map<String, Value>, Box<Reply>> {
    decode_body(req.content_type, req.body, req.json).map_err(|message| Box::new(Reply::message(format, 400, &message)))
}

/// Whether the admin must go through a provider: 2FA on and a secret configured.
fn needs_two_factor(shared: &Shared, admin_id: u64) -> bool {
    shared.two_factor.load(Ordering::Relaxed)
        && shared.lock().issuers.admin_by_id(admin_id).is_some_and(|a| a.totp.is_some())
}

/// `POST .../V1/integration/admin/token` (AdminTokenService, or TwoFactorAuth's
/// AdminAccessTokenService when 2FA applies to the admin).
pub(crate) fn admin_token(shared: &Shared, format: Format, req: Req<'_>) -> Reply {
    let params = match params(format, req) {
        Ok(p) => p,
        Err(reply) => return *reply,
    };
    let (username, password) = match required_fields(format, &params, &["username", "password"]) {
        Ok(v) => (v[0], v[1]),
        Err(reply) => return *reply,
    };
    let id = match check_credentials(shared, username, password) {
        Ok(id) => id,
        Err(AdminRefusal::SignIn) => return Reply::message(format, 401, super::handler::MSG_SIGN_IN),
    };
    if needs_two_factor(shared, id) {
        return Reply::node(
            format,
            400,
            &Node::Map(vec![
                ("message", Node::str(MSG_TWO_FACTOR)),
                ("parameters", Node::Map(vec![("active_providers", Node::List(vec![Node::str("google")]))])),
            ]),
        );
    }
    Reply::node(format, 200, &Node::Str(issue(shared, username, id)))
}

/// `POST .../V1/tfa/provider/google/authenticate` `{username, password, otp}`: the password
/// first, then the code against the current and the previous step.
pub(crate) fn google_authenticate(shared: &Shared, format: Format, req: Req<'_>) -> Reply {
    let params = match params(format, req) {
        Ok(p) => p,
        Err(reply) => return *reply,
    };
    let (username, password, otp) = match required_fields(format, &params, &["username", "password", "otp"]) {
        Ok(v) => (v[0], v[1], v[2]),
        Err(reply) => return *reply,
    };
    let id = match check_credentials(shared, username, password) {
        Ok(id) => id,
        Err(AdminRefusal::SignIn) => return Reply::message(format, 401, super::handler::MSG_SIGN_IN),
    };
    let Some(secret) = shared.lock().issuers.admin_by_id(id).and_then(|a| a.totp.clone()) else {
        return Reply::message(format, 400, MSG_PROVIDER_NOT_ALLOWED);
    };
    let now = shared.cfg.unix_now();
    if otp != totp_at(&secret, now) && otp != totp_at(&secret, now - 30) {
        code_failure(shared, username);
        return Reply::message(format, 401, MSG_INVALID_CODE);
    }
    Reply::node(format, 200, &Node::Str(issue(shared, username, id)))
}

impl DevServer {
    /// An admin user allowed everything Login as Customer needs (both ACLs), with a Google
    /// Authenticator secret (base32, as authenticator apps show it) or none. Re-adding a username
    /// replaces its password and secret (same id: its tokens stay valid). Refuses a secret that
    /// is not base32.
    pub fn add_admin(&self, username: &str, password: &str, totp_secret: Option<&str>) -> std::io::Result<()> {
        let totp = match totp_secret {
            None => None,
            Some(s) => Some(decode_secret(s).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("admin {username}: TOTP secret is not base32"),
                )
            })?),
        };
        let mut st = self.shared.lock();
        let iss = &mut st.issuers;
        iss.credentials.push(password.to_owned());
        iss.credentials.extend(totp_secret.map(str::to_owned));
        let key = username.to_lowercase();
        if let Some(a) = iss.admins.get_mut(&key) {
            a.password = password.to_owned();
            a.totp = totp;
            return Ok(());
        }
        let id = iss.next_admin_id;
        iss.next_admin_id += 1;
        iss.admins.insert(
            key,
            AdminUser {
                id,
                password: password.to_owned(),
                totp,
                lockout: Lockout::default(),
                acl_login: true,
                acl_assistance: true,
            },
        );
        Ok(())
    }

    /// Grants or removes the admin's `Magento_LoginAsCustomer::login` and
    /// `::allow_shopping_assistance` ACL resources (both granted by [`DevServer::add_admin`]).
    pub fn set_admin_acl(&self, username: &str, login: bool, allow_shopping_assistance: bool) {
        if let Some(a) = self.shared.lock().issuers.admins.get_mut(&username.to_lowercase()) {
            a.acl_login = login;
            a.acl_assistance = allow_shopping_assistance;
        }
    }

    /// Turns Magento_TwoFactorAuth on or off store-wide (on by default): while on, an admin with
    /// a TOTP secret gets the 2FA refusal from the token route and a token only from the Google
    /// provider; while off, the provider routes do not exist (404).
    pub fn set_two_factor(&self, on: bool) {
        self.shared.two_factor.store(on, Ordering::Relaxed);
    }

    /// The Google Authenticator code the server accepts now for this base32 secret (its clock,
    /// offset and advances included); `None` for a secret that is not base32.
    pub fn totp_code(&self, secret: &str) -> Option<String> {
        decode_secret(secret).map(|s| totp_at(&s, self.shared.cfg.unix_now()))
    }

    /// The count Magento reads now in this admin's throttle row (apart from customers' rows).
    pub fn admin_failures(&self, username: &str) -> u32 {
        let now = self.shared.cfg.instant_now();
        self.shared.lock().issuers.throttle.failures(&username.to_lowercase(), now)
    }

    /// The highest count this admin's throttle row ever reached.
    pub fn admin_max_failure_count(&self, username: &str) -> u32 {
        self.shared.lock().issuers.throttle.peak(&username.to_lowercase())
    }

    /// Whether this admin's throttle row refuses every login now.
    pub fn admin_throttled(&self, username: &str) -> bool {
        let now = self.shared.cfg.instant_now();
        self.shared.lock().issuers.throttle.is_locked(&username.to_lowercase(), now)
    }

    /// Whether the admin user lock (`admin/security/lockout_*`) holds now.
    pub fn admin_locked(&self, username: &str) -> bool {
        let now = self.shared.cfg.instant_now();
        self.shared.lock().issuers.admins.get(&username.to_lowercase()).is_some_and(|a| a.lockout.is_locked(now))
    }

    /// What the admin tokens, Login as Customer, the IMS stand-in and the one-time codes issued.
    pub fn issuer_counts(&self) -> IssuerCounts {
        self.shared.lock().issuers.counts
    }

    /// Moves this server's clock forward: token expiry, TOTP steps, one-time codes, IMS tokens,
    /// and the admins' throttle rows and locks (customers' rows and locks keep the real clock).
    pub fn advance_clock(&self, by: std::time::Duration) {
        self.shared.cfg.advance(by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890", the last 6 of 8 digits.
        let seed = b"12345678901234567890";
        for (t, code) in
            [(59, "287082"), (1_111_111_109, "081804"), (1_234_567_890, "005924"), (2_000_000_000, "279037")]
        {
            assert_eq!(totp_at(seed, t), code, "t={t}");
        }
        assert_eq!(decode_secret("GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ").as_deref(), Some(&seed[..]));
        assert_eq!(decode_secret("gezdgnbvgy3tqojqgezdgnbvgy3tqojq====").as_deref(), Some(&seed[..]));
        assert_eq!(decode_secret("not base32!"), None);
        assert_eq!(decode_secret(""), None);
    }
}
