//! The requests of central mode (get, create, replace of one named object, and the create of a
//! review for the token API) sent through kube-rs's client, their answers read here: bounded,
//! and never shown.
//!
//! kube-rs's own `Api` reads every answer whole and logs an answer it cannot parse, body and
//! all (a Secret's `data` is its customers' tokens), and its errors carry the body or the values
//! in it. Here an answer is read only up to its kind's limit ([`SECRET_LIMIT`], [`LEASE_LIMIT`]),
//! an answer that does not parse is described by where it stopped parsing, and an error answer
//! by its `Status` (its message cut short), never by its body.

use std::marker::PhantomData;

use crate::shown::Malformed;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::PostParams;
use kube::core::Status;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most read of an answer about the Secret: its data is at most 1 MiB (the API server's own
/// limit), which base64 and the annotations make at most about 1.4 MiB of JSON.
pub const SECRET_LIMIT: usize = 3 << 20;
/// The most read of an answer about the Lease: a few hundred bytes of spec and metadata.
pub const LEASE_LIMIT: usize = 64 << 10;
/// The most read of a TokenReview's or a SubjectAccessReview's answer: the spec sent (a service
/// account token is 1 to 2 KiB), a user's name, uid, groups and extra, a reason.
pub const REVIEW_LIMIT: usize = 64 << 10;
/// The most of a `Status` message shown in an error (a message, but the API server's words).
const MESSAGE_LIMIT: usize = 300;

/// One kind of object in one namespace, as [`kube::Api`] would reach it.
pub struct Objects<K> {
    client: kube::Client,
    request: kube::core::Request,
    /// What an answer may hold at most.
    limit: usize,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Objects<K> {
    fn clone(&self) -> Self {
        Objects {
            client: self.client.clone(),
            request: kube::core::Request::new(self.request.url_path.clone()),
            limit: self.limit,
            kind: PhantomData,
        }
    }
}

/// Why a request got no object back.
#[derive(Debug)]
pub enum Refusal {
    /// The API server refused it with a `Status` (404, 409, 403, 503...).
    Status { code: u16, reason: String, message: String },
    /// An error answer that is not a `Status` (a proxy's page): only its size is told.
    NoStatus { code: u16, bytes: usize },
    /// The answer is larger than the limit: not read further.
    TooLarge { limit: usize, declared: Option<u64> },
    /// A success whose body is not the object (a field of the wrong type, cut short...).
    Malformed(Malformed),
    /// No answer, or one cut off: the connection, TLS, the credentials' plug-ins.
    Unreachable(String),
}

/// `bytes` in the unit a person reads best.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

impl<K> Objects<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    pub fn namespaced(client: kube::Client, namespace: &str, limit: usize) -> Objects<K> {
        let request = kube::core::Request::new(K::url_path(&(), Some(namespace)));
        Objects { client, request, limit, kind: PhantomData }
    }
}

impl<K> Objects<K>
where
    K: Resource<Scope = ClusterResourceScope, DynamicType = ()>,
{
    /// A kind of object that lives in no namespace (a TokenReview, a SubjectAccessReview).
    pub fn cluster_scoped(client: kube::Client, limit: usize) -> Objects<K> {
        let request = kube::core::Request::new(K::url_path(&(), None));
        Objects { client, request, limit, kind: PhantomData }
    }
}

impl<K> Objects<K> {
    /// The client these objects are reached through (for another kind, through the same
    /// connections).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }
}

impl<K> Objects<K>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
{
    pub async fn get(&self, name: &str) -> Result<K, Refusal> {
        let request = self.request.get(name, &Default::default());
        self.send(request).await
    }

    pub async fn create(&self, pp: &PostParams, object: &K) -> Result<K, Refusal> {
        let body = serde_json::to_vec(object).map_err(|e| Refusal::Unreachable(format!("cannot encode it: {e}")))?;
        self.send(self.request.create(pp, body)).await
    }

    /// An update, conditional on the resourceVersion in `object`.
    pub async fn replace(&self, name: &str, pp: &PostParams, object: &K) -> Result<K, Refusal> {
        let body = serde_json::to_vec(object).map_err(|e| Refusal::Unreachable(format!("cannot encode it: {e}")))?;
        self.send(self.request.replace(name, pp, body)).await
    }

    async fn send(&self, request: Result<http::Request<Vec<u8>>, kube::core::request::Error>) -> Result<K, Refusal> {
        let request = request.map_err(|e| Refusal::Unreachable(format!("cannot build the request: {e}")))?;
        let answer = self.client.send(request.map(kube::client::Body::from)).await.map_err(unreachable)?;
        let code = answer.status().as_u16();
        let declared = answer
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|d| d > self.limit as u64) {
            return Err(Refusal::TooLarge { limit: self.limit, declared });
        }
        let body = match Limited::new(answer.into_body(), self.limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return Err(Refusal::TooLarge { limit: self.limit, declared }),
            Err(e) => return Err(Refusal::Unreachable(format!("the answer was cut off: {e}"))),
        };
        if code >= 400 {
            return Err(match serde_json::from_slice::<Status>(&body) {
                Ok(status) => Refusal::Status {
                    code: if status.code == 0 { code } else { status.code },
                    reason: shorten(&status.reason, 64),
                    message: shorten(&status.message, MESSAGE_LIMIT),
                },
                Err(_) => Refusal::NoStatus { code, bytes: body.len() },
            });
        }
        serde_json::from_slice(&body).map_err(|e| Refusal::Malformed(Malformed::new(&e)))
    }
}

/// A transport error as kube-rs gives it: none of these carries an answer's body (only
/// [`kube::Error::Api`] and [`kube::Error::SerdeError`] could, and `send` makes neither).
fn unreachable(e: kube::Error) -> Refusal {
    Refusal::Unreachable(e.to_string())
}

/// `text` cut to `limit` characters (marked), its control characters escaped.
fn shorten(text: &str, limit: usize) -> String {
    let cut: String = text.chars().take(limit).collect();
    let more = if cut.len() < text.len() { "..." } else { "" };
    format!("{}{more}", crate::logging::escape_controls(&cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_answer_is_told_by_where_it_stopped_not_by_what_it_holds() {
        let e = serde_json::from_str::<k8s_openapi::api::core::v1::Secret>(
            r#"{"apiVersion":"v1","kind":"Secret","data":{"a":"dG9rZW4="},"immutable":"c2VjcmV0LXRva2Vu"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("c2VjcmV0LXRva2Vu"), "serde's own text names the value");
        let told = Malformed::new(&e).to_string();
        assert_eq!(told, format!("a value of the wrong type or form at line 1, column {}", e.column()));
    }

    #[test]
    fn sizes_read_as_a_person_writes_them() {
        assert_eq!(size(SECRET_LIMIT as u64), "3 MiB");
        assert_eq!(size(LEASE_LIMIT as u64), "64 KiB");
        assert_eq!(size(200 << 20), "200 MiB");
        assert_eq!(size(1_500_000), "1.4 MiB");
        assert_eq!(size(1000), "1000 bytes");
    }

    #[test]
    fn a_status_message_is_cut_short_and_escaped() {
        assert_eq!(shorten("a\nb", 10), "a\\nb");
        assert_eq!(shorten(&"x".repeat(400), 300), format!("{}...", "x".repeat(300)));
    }
}
