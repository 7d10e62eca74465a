//! `auth`: how customer tokens are obtained. With a customer's password (the default), or
//! without one: through an admin allowed to "Login as Customer" (`login_as_customer`), or on
//! Adobe Commerce as a Cloud Service through an IMS credential and one-time codes
//! (`cloud_service_otp`). The admin's and the IMS credential's secrets are read afresh before
//! each use, like passwords.

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::Url;
use serde::Deserialize;

use super::{secret_source, Checks, PasswordSource, Validator};

/// `auth.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    #[default]
    Password,
    LoginAsCustomer,
    CloudServiceOtp,
}

impl Method {
    /// The value as written in the configuration, and the `method` label of the issuer's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Password => "password",
            Method::LoginAsCustomer => "login_as_customer",
            Method::CloudServiceOtp => "cloud_service_otp",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub(super) method: Method,
    #[serde(default)]
    admin: Option<RawAdminLogin>,
    #[serde(default)]
    ims: Option<RawIms>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminLogin {
    username: String,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    totp_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIms {
    #[serde(default)]
    token_url: Option<String>,
    client_id: String,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    client_secret_env: Option<String>,
    org_id: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

/// Adobe's IMS token endpoint for server-to-server credentials.
pub const DEFAULT_IMS_TOKEN_URL: &str = "https://ims-na1.adobelogin.com/ims/token/v3";

/// The scopes Adobe documents for a Commerce server-to-server credential.
pub const DEFAULT_IMS_SCOPES: [&str; 7] = [
    "openid",
    "AdobeID",
    "email",
    "profile",
    "additional_info.roles",
    "additional_info.projectedProductContext",
    "commerce.accs",
];

/// How customer tokens are obtained, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// Each customer's own password (`customers[].password_file` or `password_env`).
    Password,
    /// An admin token, and `generateCustomerTokenAsAdmin` for each customer.
    LoginAsCustomer(AdminLogin),
    /// An IMS access token, and a one-time code exchanged for each customer's token.
    CloudServiceOtp(ImsCredential),
}

impl Auth {
    pub fn method(&self) -> Method {
        match self {
            Auth::Password => Method::Password,
            Auth::LoginAsCustomer(_) => Method::LoginAsCustomer,
            Auth::CloudServiceOtp(_) => Method::CloudServiceOtp,
        }
    }
}

/// `auth.admin`: the admin user whose token asks for customer tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminLogin {
    pub username: String,
    pub password: PasswordSource,
    /// The base32 secret of the admin's Google Authenticator: logins then go through the 2FA
    /// provider's route with a code computed from it.
    pub totp_secret: Option<PathBuf>,
    /// `magento.base_url`: where the admin token route is.
    pub base_url: Arc<Url>,
}

impl AdminLogin {
    /// Where the admin token is asked for: the token route, or with a TOTP secret the Google
    /// Authenticator provider's.
    pub fn route(&self) -> Url {
        let route = match self.totp_secret {
            Some(_) => "rest/V1/tfa/provider/google/authenticate",
            None => "rest/V1/integration/admin/token",
        };
        super::api::joined(&self.base_url, route)
    }
}

/// `auth.ims`: an Adobe IMS server-to-server (client credentials) credential.
#[derive(Debug, Clone, PartialEq)]
pub struct ImsCredential {
    pub token_url: Url,
    /// Also sent as `x-api-key`.
    pub client_id: String,
    pub client_secret: PasswordSource,
    /// Sent as `x-gw-ims-org-id`.
    pub org_id: String,
    pub scopes: Vec<String>,
}

/// Checks `auth` against `magento.cloud_service` (`cloud`); `base_url` is `magento.base_url`
/// when it is good. Every problem is reported, each naming its key.
pub(super) fn check(
    v: &mut Validator,
    raw: &RawAuth,
    cloud: bool,
    allow_http: bool,
    base_url: Option<&Url>,
    checks: Checks,
) -> Option<Auth> {
    let method = raw.method.as_str();
    if raw.admin.is_some() && raw.method != Method::LoginAsCustomer {
        v.problem("auth.admin", format!("is used only with auth.method login_as_customer, not {method}: remove it"));
    }
    if raw.ims.is_some() && raw.method != Method::CloudServiceOtp {
        v.problem("auth.ims", format!("is used only with auth.method cloud_service_otp, not {method}: remove it"));
    }
    match raw.method {
        Method::Password => Some(Auth::Password),
        Method::LoginAsCustomer => {
            if cloud {
                v.problem(
                    "auth.method",
                    "login_as_customer needs an admin token, which Adobe Commerce as a Cloud Service (magento.cloud_service: true) does not issue: use cloud_service_otp there".into(),
                );
            }
            let Some(admin) = &raw.admin else {
                v.problem("auth.admin", "is required with auth.method login_as_customer: the admin user's username and password_file (or password_env)".into());
                return None;
            };
            if admin.username.trim().is_empty() {
                v.problem("auth.admin.username", "must not be empty".into());
            }
            let keys = ("auth.admin.password_file", "auth.admin.password_env");
            let (password, _) =
                secret_source(v, &str::to_owned, keys, (&admin.password_file, &admin.password_env), checks);
            if let (Some(path), Checks::Environment) = (&admin.totp_secret_file, checks) {
                if let Err(e) = crate::totp::read_secret(path) {
                    v.problem("auth.admin.totp_secret_file", e.to_string());
                }
            }
            Some(Auth::LoginAsCustomer(AdminLogin {
                username: admin.username.clone(),
                password: password?,
                totp_secret: admin.totp_secret_file.clone(),
                base_url: Arc::new(base_url?.clone()),
            }))
        }
        Method::CloudServiceOtp => {
            if !cloud {
                v.problem(
                    "auth.method",
                    "cloud_service_otp is Adobe Commerce as a Cloud Service's way: set magento.cloud_service: true (and base_url to https://<region>.api.commerce.adobe.com/<tenant-id>), or use login_as_customer on other stores".into(),
                );
            }
            let Some(ims) = &raw.ims else {
                v.problem("auth.ims", "is required with auth.method cloud_service_otp: client_id, client_secret_file (or client_secret_env) and org_id of an IMS server-to-server credential".into());
                return None;
            };
            let token_url =
                v.url("auth.ims.token_url", ims.token_url.as_deref().unwrap_or(DEFAULT_IMS_TOKEN_URL), allow_http);
            for (key, value) in [("auth.ims.client_id", &ims.client_id), ("auth.ims.org_id", &ims.org_id)] {
                if value.trim().is_empty() {
                    v.problem(key, "must not be empty".into());
                } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
                    // Sent as a header's value.
                    v.problem(key, "must be printable ASCII without spaces".into());
                }
            }
            let scopes = match &ims.scopes {
                None => DEFAULT_IMS_SCOPES.iter().map(|s| s.to_string()).collect(),
                Some(scopes) => {
                    if scopes.is_empty() || scopes.iter().any(|s| s.trim().is_empty() || s.contains([',', ' '])) {
                        v.problem("auth.ims.scopes", "must list scopes, each a word without ',' or spaces".into());
                    }
                    scopes.clone()
                }
            };
            let keys = ("auth.ims.client_secret_file", "auth.ims.client_secret_env");
            let (secret, _) =
                secret_source(v, &str::to_owned, keys, (&ims.client_secret_file, &ims.client_secret_env), checks);
            Some(Auth::CloudServiceOtp(ImsCredential {
                token_url: token_url?,
                client_id: ims.client_id.clone(),
                client_secret: secret?,
                org_id: ims.org_id.clone(),
                scopes,
            }))
        }
    }
}
