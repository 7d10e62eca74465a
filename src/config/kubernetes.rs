//! `output.kubernetes` in the configuration file: one Secret for every replica's tokens, one Lease
//! to elect the replica that writes it. The types, their defaults and their validation (the
//! talking to the API is [`crate::cluster`]'s).

use std::time::Duration;

use serde::Deserialize;

use super::Problem;

/// The largest Secret the API server stores: its `data`, decoded, at most 1 MiB.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// What `check` assumes a token takes at most when it works out whether every customer's fits
/// in one Secret. Magento's JWTs take 200 to 400 characters and its opaque tokens 32; the
/// longest a token may be (8 KiB) would cap a Secret at about 120 customers for tokens no store
/// issues. A write that would not fit after all is refused by the API and reported as a
/// `write_error` naming the Secret's size.
pub const ASSUMED_TOKEN_BYTES: usize = 2048;

/// `output.kubernetes`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKubernetes {
    secret: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    lease: Option<String>,
    #[serde(default = "default_lease_duration", deserialize_with = "crate::config::duration")]
    lease_duration: Duration,
    #[serde(default)]
    token_api: bool,
}

impl RawKubernetes {
    pub(crate) fn token_api(&self) -> bool {
        self.token_api
    }
}

fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}

/// `output.kubernetes`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    pub secret: String,
    /// `None`: the service account's namespace, else the kubeconfig context's.
    pub namespace: Option<String>,
    pub lease: String,
    /// A standby takes the Lease over at most this long after its holder last renewed it.
    pub lease_duration: Duration,
    /// `GET /token/<name>` (and the token in `POST /refresh/<name>`'s answer) for a caller whose
    /// service account token TokenReview accepts and SubjectAccessReview allows to `get` the
    /// customer's Secret ([`crate::cluster::gate`]).
    pub token_api: bool,
}

impl KubeSettings {
    /// How long the holder keeps writing after its last successful renewal: two thirds of the
    /// lease, as client-go's defaults (15 s lease, 10 s deadline). A renewal that lands later
    /// than this cannot make two writers: the holder has stopped, and every write is conditional
    /// on the object's resourceVersion.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// How often the holder renews and a standby looks at the Lease: a fifth of the lease
    /// (3 s of 15 s), so the holder has three tries before its deadline.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 5
    }
}

/// The shortest `lease_duration`: below it the renewals of a busy API server would be late.
const MIN_LEASE: Duration = Duration::from_secs(3);
const MAX_LEASE: Duration = Duration::from_secs(600);

/// Checks `output.kubernetes`; problems go to `problems`.
pub(crate) fn check(raw: &RawKubernetes, problems: &mut Vec<Problem>) -> Option<KubeSettings> {
    let before = problems.len();
    let mut problem = |path: &str, message: String| problems.push(Problem { path: path.into(), message });
    if let Err(why) = dns_subdomain(&raw.secret) {
        problem("output.kubernetes.secret", why);
    }
    if let Some(lease) = &raw.lease {
        if let Err(why) = dns_subdomain(lease) {
            problem("output.kubernetes.lease", why);
        }
    }
    if let Some(ns) = &raw.namespace {
        if let Err(why) = dns_label(ns) {
            problem("output.kubernetes.namespace", why);
        }
    }
    if !(MIN_LEASE..=MAX_LEASE).contains(&raw.lease_duration) {
        problem(
            "output.kubernetes.lease_duration",
            format!(
                "must be between {} and {}",
                humantime::format_duration(MIN_LEASE),
                humantime::format_duration(MAX_LEASE)
            ),
        );
    }
    (problems.len() == before).then(|| KubeSettings {
        secret: raw.secret.clone(),
        namespace: raw.namespace.clone(),
        lease: raw.lease.clone().unwrap_or_else(|| raw.secret.clone()),
        lease_duration: raw.lease_duration,
        token_api: raw.token_api,
    })
}

/// The Secret that holds `customer`'s token: its own (`customers[].secret`), else
/// `output.kubernetes.secret`. The one the token API asks SubjectAccessReview whether a caller
/// may `get`.
pub fn secret_of<'a>(customer: &'a super::CustomerConfig, k: &'a KubeSettings) -> &'a str {
    customer.secret.as_deref().unwrap_or(&k.secret)
}

/// A Secret's key: what the API accepts (`[-._a-zA-Z0-9]+`, at most 253 characters), for a
/// customer's name or `file`.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 253 {
        return Err("must be 1 to 253 characters to be a key of the Secret".into());
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return Err(format!("{key:?} cannot be a key of the Secret: only letters, digits, '-', '_' and '.'"));
    }
    if key == "." || key == ".." {
        return Err(format!("{key:?} cannot be a key of the Secret"));
    }
    Ok(())
}

/// Whether every customer's token fits in one Secret: `rendered` is the size of each customer's
/// content with a token of [`ASSUMED_TOKEN_BYTES`].
pub fn check_size(rendered: &[usize], secret: &str) -> Result<(), String> {
    let total: usize = rendered.iter().sum();
    if total <= MAX_SECRET_BYTES {
        return Ok(());
    }
    Err(format!(
        "{} customers' tokens would not fit in the Secret {secret:?}: with tokens of up to {ASSUMED_TOKEN_BYTES} bytes they take {} KiB, and Kubernetes stores at most 1024 KiB in one Secret; give some of them a Secret of their own (customers[].secret), or use format raw",
        rendered.len(),
        total.div_ceil(1024)
    ))
}

/// A DNS subdomain name (RFC 1123), as Kubernetes wants for a Secret's or a Lease's name.
pub(crate) fn dns_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{name:?} is not a Kubernetes object name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        )),
    }
}

/// A DNS label (RFC 1123), as Kubernetes wants for a namespace.
fn dns_label(name: &str) -> Result<(), String> {
    match name.len() <= 63 && dns_subdomain(name).is_ok() && !name.contains('.') {
        true => Ok(()),
        false => Err(format!(
            "{name:?} is not a namespace name: lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawKubernetes {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_lease_defaults_to_the_secrets_name_and_15_seconds() {
        let mut problems = Vec::new();
        let k = check(&raw("secret: magento-tokens"), &mut problems).unwrap();
        assert_eq!(k.lease, "magento-tokens");
        assert_eq!(k.lease_duration, Duration::from_secs(15));
        assert_eq!((k.renew_deadline(), k.retry_period()), (Duration::from_secs(10), Duration::from_secs(3)));
        assert_eq!(k.namespace, None);
        assert!(!k.token_api, "the token API is off unless asked for");
        assert!(problems.is_empty());
    }

    #[test]
    fn names_are_checked_as_kubernetes_checks_them() {
        let mut problems = Vec::new();
        let k = check(&raw("secret: Magento_Tokens\nnamespace: shop.eu\nlease: -x\nlease_duration: 1s"), &mut problems);
        assert!(k.is_none());
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "output.kubernetes.secret",
                "output.kubernetes.lease",
                "output.kubernetes.namespace",
                "output.kubernetes.lease_duration"
            ]
        );
        assert!(problems[0].message.contains("not a Kubernetes object name"), "{problems:?}");
    }

    #[test]
    fn keys_are_what_a_secret_accepts() {
        assert!(check_key("alice.token").is_ok());
        assert!(check_key("a b").is_err());
        assert!(check_key("..").is_err());
        assert!(check_key(&"a".repeat(254)).is_err());
    }

    #[test]
    fn tokens_that_would_not_fit_one_secret_are_refused() {
        let fits = vec![2048 + 100; 400];
        assert!(check_size(&fits, "t").is_ok());
        let too_many = vec![2048 + 100; 600];
        let e = check_size(&too_many, "t").unwrap_err();
        assert!(e.starts_with("600 customers' tokens would not fit in the Secret \"t\""), "{e}");
        assert!(e.contains("1259 KiB"), "{e}");
    }
}
