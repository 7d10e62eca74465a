//! `magento.api`, `magento.graphql_path` and `magento.cloud_service`: the dialect a store speaks
//! for customer tokens ([`Api`], one per configuration), and where one customer's requests go in
//! it ([`Endpoint`]).
//!
//! Both live in the configuration, not in the HTTP client: a customer's addresses are worked out
//! from its settings alone, and the client ([`crate::magento`]) only follows them.

use std::fmt;
use std::sync::Arc;

use reqwest::Url;

/// How every customer of a configuration gets and checks its token: chosen once, from
/// `magento.api` and `magento.cloud_service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// `magento.api: rest` (the default): `POST <base>/rest[/<store>]/V1/integration/customer/token`
    /// to log in, `GET .../V1/customers/me` to check a token.
    Rest,
    /// `magento.api: graphql`: `generateCustomerToken` to log in and `{ customer { email } }` to
    /// check a token, both `POST <base><path>`, the store view in the `Store` header.
    GraphQl { path: Arc<str> },
    /// `magento.cloud_service: true`, Adobe Commerce as a Cloud Service: logins and checks as
    /// [`Api::GraphQl`] (its REST API has no customer-token route at all). The base URL carries
    /// the tenant (`https://<region>.api.commerce.adobe.com/<tenant-id>`), and its REST routes
    /// are `<base>/V1/...`, without `/rest` or a store code.
    CloudService { graphql_path: Arc<str> },
}

impl Api {
    /// The GraphQL endpoint's path, for the dialects that log in through GraphQL.
    pub fn graphql_path(&self) -> Option<&str> {
        match self {
            Api::Rest => None,
            Api::GraphQl { path } | Api::CloudService { graphql_path: path } => Some(path),
        }
    }
}

/// Where one customer's token is asked for and checked, and in which dialect: what the client
/// needs of the configuration for a login or a check, and nothing else. Built from the customer's
/// settings by [`super::CustomerConfig::endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The REST routes, the store code in their path.
    Rest {
        /// `POST`: the login.
        token: Url,
        /// `GET` with the token: whose it is.
        me: Url,
    },
    /// The GraphQL endpoint, the store code in a header (Magento's GraphQL takes the store view
    /// from nowhere else).
    GraphQl {
        url: Url,
        /// The `Store` header's value; absent: the default store view.
        store: Option<String>,
    },
}

impl fmt::Display for Endpoint {
    /// Where a token is checked, as logs name it: the URL, and the `Store` header when one is
    /// sent (with GraphQL the store code is not in the URL).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Rest { me, .. } => write!(f, "{me}"),
            Endpoint::GraphQl { url, store: None } => write!(f, "{url}"),
            Endpoint::GraphQl { url, store: Some(store) } => write!(f, "{url} (Store: {store})"),
        }
    }
}

/// `base` with `path` appended to its path (a base URL's path is a prefix: `/shop`, or the cloud
/// tenant). Only the path is parsed again, not the whole URL: parsing URLs, the host's IDNA
/// processing included, was 18 % of `once`'s instructions (benches/RESULTS.md).
pub(super) fn joined(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let prefix = url.path().trim_end_matches('/');
    let path = format!("{prefix}/{}", path.trim_start_matches('/'));
    url.set_path(&path);
    url
}

/// `magento.graphql_path`'s problem, if it has one: a path of its own, starting with `/`, and
/// nothing a URL would read as more than a path.
pub(super) fn graphql_path_problem(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return Some(format!("{path:?} must start with '/', like \"/graphql\""));
    }
    if path.chars().any(|c| c == '?' || c == '#' || c.is_whitespace() || c.is_control()) {
        return Some(format!("{path:?} must be a path alone, like \"/graphql\": no query, fragment or spaces"));
    }
    None
}

/// With `magento.cloud_service`, a base URL's problem, if it has one: the tenant id is its path.
pub(super) fn cloud_base_problem(url: &Url) -> Option<String> {
    url.path().trim_matches('/').is_empty().then(|| {
        format!(
            "{:?} has no tenant id: with magento.cloud_service: true it is https://<region>.api.commerce.adobe.com/<tenant-id>",
            url.as_str()
        )
    })
}
