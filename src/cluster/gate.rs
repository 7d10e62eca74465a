//! The token API's gate (`output.kubernetes.token_api`): who may have a customer's token.
//!
//! ```text
//!   Authorization: Bearer <the app's service account token>
//!        │
//!        ▼  cached 10 s, by a salted hash of the token and the Secret (never the token itself)
//!   TokenReview ── not authenticated ──► 401
//!        │ user, uid, groups, extra
//!        ▼
//!   SubjectAccessReview: may <user> get secrets/<the customer's Secret> in <its namespace>?
//!        │ no ──► 403
//!        ▼ yes
//!   the token
//! ```
//!
//! Kubernetes decides, with the RBAC the cluster already has: an app may have a customer's token
//! exactly when its service account may `get` the Secret that token lives in (what mounting it
//! would need). This is how the API server's own delegated authentication works, and
//! kube-rbac-proxy's: the daemon needs `create` on both reviews (the ClusterRole
//! `system:auth-delegator`). The TokenReview names no audience: the token is checked for the API
//! server's own, that of the token every pod has at
//! `/var/run/secrets/kubernetes.io/serviceaccount/token`.
//!
//! A verdict is kept for [`CACHE_FOR`], so an app that asks after every 401 costs one pair of
//! reviews per 10 s, and asks made at once share one pair. A review that fails (the API away,
//! the daemon not allowed to create reviews) is never kept: the next ask tries again, and it
//! never yields a token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::api::{Objects, REVIEW_LIMIT};
use super::{ApiError, Cluster};
use crate::admin::{Reviews, Verdict};
use crate::config::kubernetes::{secret_of, KubeSettings};
use crate::config::CustomerConfig;

/// How long a caller's verdict is kept (kube-rbac-proxy and the API server's webhook
/// authenticator keep theirs for seconds to minutes): a revoked grant takes effect within it.
pub const CACHE_FOR: Duration = Duration::from_secs(10);
/// The most verdicts kept: beyond it the expired ones go, and a new one is not kept while none
/// has expired (its review still answers).
const MAX_CACHED: usize = 4096;
/// The longest one review request may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(4);
/// The longest a caller waits for its verdict (both reviews, or another ask's): under the admin
/// server's 10 s stall limit.
const VERDICT_WITHIN: Duration = Duration::from_secs(8);

/// The token API's gate: the reviews through the Cluster's client, and the verdicts kept.
pub struct Gate {
    settings: KubeSettings,
    /// Set once the replica has found the API ([`Gate::connect`]).
    api: OnceLock<Api>,
    cache: Cache,
}

struct Api {
    cluster: Cluster,
    token_reviews: Objects<TokenReview>,
    access_reviews: Objects<SubjectAccessReview>,
}

impl Gate {
    pub fn new(settings: KubeSettings) -> Gate {
        Gate { settings, api: OnceLock::new(), cache: Cache::new() }
    }

    /// From now on the reviews go through `cluster`'s client and are counted as its requests
    /// (`magento_token_kubernetes_requests_total{resource="tokenreview"|"subjectaccessreview"}`).
    pub fn connect(&self, cluster: Cluster) {
        let client = cluster.secrets.client();
        let _ = self.api.set(Api {
            token_reviews: Objects::cluster_scoped(client.clone(), REVIEW_LIMIT),
            access_reviews: Objects::cluster_scoped(client, REVIEW_LIMIT),
            cluster,
        });
    }

    /// Whether the caller presenting `bearer` may have `customer`'s token: kept, or reviewed now.
    pub async fn verdict(&self, bearer: &str, customer: &CustomerConfig) -> Verdict {
        let Some(api) = self.api.get() else {
            return Verdict::Unavailable("the daemon has not found the Kubernetes API yet: ask again shortly".into());
        };
        let (namespace, secret) = (api.cluster.namespace.as_str(), secret_of(customer, &self.settings));
        let key = self.cache.key(bearer, namespace, secret);
        let verdict = self.cache.verdict(key, || api.review(bearer, namespace, secret));
        match tokio::time::timeout(VERDICT_WITHIN, verdict).await {
            Ok(verdict) => verdict,
            Err(_) => Verdict::Unavailable(format!(
                "the API server did not answer the reviews within {}s: ask again shortly",
                VERDICT_WITHIN.as_secs()
            )),
        }
    }
}

impl Reviews for Gate {
    fn review<'a>(&'a self, bearer: &'a str, customer: &'a CustomerConfig) -> BoxFuture<'a, Verdict> {
        Box::pin(self.verdict(bearer, customer))
    }
}

impl Api {
    /// TokenReview, then (authenticated) SubjectAccessReview of `get` on the Secret.
    async fn review(&self, bearer: &str, namespace: &str, secret: &str) -> Verdict {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(bearer.to_owned()), audiences: None },
            ..TokenReview::default()
        };
        let pp = PostParams::default();
        let asked = self.token_reviews.create(&pp, &review);
        // (The answer echoes the spec, the token included: only its status is kept.)
        let status = match self.cluster.call("tokenreview", "create", REVIEW_TIMEOUT, asked).await {
            Ok(answer) => answer.status.unwrap_or_default(),
            Err(e) => return unavailable("tokenreviews", e),
        };
        let user = match status.user.filter(|_| status.authenticated == Some(true)) {
            Some(user) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => user,
            _ => {
                debug!(secret = %format!("{namespace}/{secret}"), "token API: TokenReview did not authenticate the caller's token");
                return Verdict::Unauthenticated;
            }
        };
        let username = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some("get".into()),
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("secrets".into()),
                    name: Some(secret.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let asked = self.access_reviews.create(&pp, &review);
        let status = match self.cluster.call("subjectaccessreview", "create", REVIEW_TIMEOUT, asked).await {
            Ok(answer) => answer.status.unwrap_or_default(),
            Err(e) => return unavailable("subjectaccessreviews", e),
        };
        let secret = format!("{namespace}/{secret}");
        if status.allowed {
            debug!(user = %username, secret = %secret, "token API: the caller may get the Secret");
            Verdict::Allowed { user: username }
        } else {
            info!(user = %username, secret = %secret, reason = %status.reason.or(status.evaluation_error).unwrap_or_default(), "token API: the caller may not get the customer's Secret: refused");
            Verdict::Forbidden { user: username, secret }
        }
    }
}

/// A review the API server did not answer: why, and what to do about it.
fn unavailable(resource: &str, e: ApiError) -> Verdict {
    let why = match e {
        ApiError::Forbidden { code: 401, .. } => {
            format!("the API server does not accept the daemon's own credentials (401) for {resource}")
        }
        ApiError::Forbidden { code, message } => format!(
            "the daemon's service account may not create {resource} ({code}: {message}); bind it to the ClusterRole system:auth-delegator (the chart does when output.kubernetes.token_api is on)"
        ),
        e => format!("cannot create {resource}: {e}"),
    };
    warn!(error = %why, "token API: cannot review the caller: no token is answered");
    Verdict::Unavailable(why)
}

/// The verdicts kept, by a salted hash of the bearer token and the Secret: what is kept cannot
/// be turned back into a token. A verdict being made is shared by the asks that come meanwhile.
struct Cache {
    /// Random for each process.
    salt: [u8; 32],
    slots: Mutex<HashMap<[u8; 32], Slot>>,
}

/// A verdict and when it was made, or being made.
type Slot = Arc<OnceCell<(Instant, Verdict)>>;

impl Cache {
    fn new() -> Cache {
        Cache { salt: rand::random(), slots: Mutex::default() }
    }

    fn key(&self, bearer: &str, namespace: &str, secret: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(self.salt);
        for part in [bearer, namespace, secret] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hash.finalize().into()
    }

    /// The verdict kept for `key` (made less than [`CACHE_FOR`] ago, or being made), else the
    /// one `review` makes now, kept unless it is [`Verdict::Unavailable`].
    async fn verdict<F, Fut>(&self, key: [u8; 32], review: F) -> Verdict
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Verdict>,
    {
        let fresh = |slot: &OnceCell<(Instant, Verdict)>| slot.get().is_none_or(|(at, _)| at.elapsed() < CACHE_FOR);
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(&key).filter(|slot| fresh(slot)) {
                Some(slot) => slot.clone(),
                None => {
                    if slots.len() >= MAX_CACHED {
                        slots.retain(|_, slot| fresh(slot));
                    }
                    let slot = Arc::new(OnceCell::new());
                    if slots.len() < MAX_CACHED {
                        slots.insert(key, slot.clone());
                    }
                    slot
                }
            }
        };
        let made = slot
            .get_or_try_init(|| async {
                match review().await {
                    Verdict::Unavailable(why) => Err(why),
                    verdict => Ok((Instant::now(), verdict)),
                }
            })
            .await;
        match made {
            Ok((_, verdict)) => verdict.clone(),
            Err(why) => Verdict::Unavailable(why),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counted<'a>(reviews: &'a AtomicUsize, verdict: Verdict) -> impl FnOnce() -> BoxFuture<'a, Verdict> {
        move || {
            Box::pin(async move {
                reviews.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                verdict
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_verdict_is_kept_for_ten_seconds_and_shared_by_asks_made_meanwhile() {
        let cache = Cache::new();
        let reviews = AtomicUsize::new(0);
        let allowed = Verdict::Allowed { user: "system:serviceaccount:web:storefront".into() };
        let key = cache.key("eyJhbGciOi.token", "shop", "magento-tokens");
        // Ten asks at once: one review.
        let asks = (0..10).map(|_| cache.verdict(key, counted(&reviews, allowed.clone())));
        let verdicts = futures::future::join_all(asks).await;
        assert!(verdicts.iter().all(|v| *v == allowed));
        assert_eq!(reviews.load(Ordering::SeqCst), 1);
        // Kept for CACHE_FOR: what a second review would say is not asked.
        tokio::time::sleep(CACHE_FOR - Duration::from_secs(1)).await;
        assert_eq!(cache.verdict(key, counted(&reviews, Verdict::Unauthenticated)).await, allowed);
        assert_eq!(reviews.load(Ordering::SeqCst), 1);
        // Then reviewed again.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(cache.verdict(key, counted(&reviews, Verdict::Unauthenticated)).await, Verdict::Unauthenticated);
        assert_eq!(reviews.load(Ordering::SeqCst), 2);
        // Another Secret, or another token, is another verdict.
        let other = cache.key("eyJhbGciOi.token", "shop", "shop-b-tokens");
        let forbidden = Verdict::Forbidden { user: "u".into(), secret: "shop/shop-b-tokens".into() };
        assert_eq!(cache.verdict(other, counted(&reviews, forbidden.clone())).await, forbidden);
        assert_ne!(cache.key("eyJhbGciOi.other", "shop", "magento-tokens"), key);
        assert_ne!(cache.key("eyJhbGciOi.token", "sho", "pmagento-tokens"), key, "the parts do not run together");
        assert_eq!(reviews.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_review_is_not_kept() {
        let cache = Cache::new();
        let reviews = AtomicUsize::new(0);
        let key = cache.key("t", "shop", "s");
        let down = Verdict::Unavailable("cannot reach the API server".into());
        assert_eq!(cache.verdict(key, counted(&reviews, down.clone())).await, down);
        let allowed = Verdict::Allowed { user: "u".into() };
        assert_eq!(cache.verdict(key, counted(&reviews, allowed.clone())).await, allowed);
        assert_eq!(reviews.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_keeps_at_most_its_limit_and_never_a_token() {
        let cache = Cache::new();
        let at_once = || async { Verdict::Unauthenticated };
        for i in 0..MAX_CACHED + 10 {
            let key = cache.key(&format!("token-{i}"), "shop", "s");
            assert_eq!(cache.verdict(key, at_once).await, Verdict::Unauthenticated);
        }
        assert_eq!(cache.len(), MAX_CACHED);
        // Expired ones make room.
        tokio::time::sleep(CACHE_FOR).await;
        cache.verdict(cache.key("new", "shop", "s"), at_once).await;
        assert_eq!(cache.len(), 1);
        // The key is a salted hash: another process's differs, and no key holds the token.
        let token = "eyJhbGciOiJSUzI1NiJ9.claims.signature";
        assert_ne!(Cache::new().key(token, "shop", "s"), cache.key(token, "shop", "s"));
        let key = cache.key(token, "shop", "s");
        assert!(!key.windows(8).any(|w| token.as_bytes().windows(8).any(|t| t == w)));
    }
}
