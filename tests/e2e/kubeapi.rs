//! A stand-in Kubernetes API server on loopback, for exactly the calls the daemon's
//! `output.kubernetes` makes with kube-rs: get, create, update (PUT) and patch (merge or strategic
//! merge) of Secrets and `coordination.k8s.io/v1` Leases in a namespace, and the reviews of its
//! token API (`output.kubernetes.token_api`): `TokenReview` and `SubjectAccessReview`, answered
//! from the service accounts and the RBAC grants set up here. list and watch are only
//! authorized (a 403 when the rules do not grant them; 405 when they do: not served), and kube-rs
//! makes no discovery request for these calls (`/api`, `/apis`, `/version`: 404). Each behaviour's doc comment names the Kubernetes documentation it follows:
//!
//! - API concepts (resource versions, "Conflicts", concurrency control, the `Status` kind):
//!   <https://kubernetes.io/docs/reference/using-api/api-concepts/>
//! - RBAC (resourceNames cannot restrict create, list or watch):
//!   <https://kubernetes.io/docs/reference/access-authn-authz/rbac/>
//! - Secrets (1 MiB limit, `stringData`, key names): <https://kubernetes.io/docs/concepts/configuration/secret/>
//! - Leases: <https://kubernetes.io/docs/concepts/architecture/leases/>
//! - Authentication (service account tokens, their user name and groups, TokenReview):
//!   <https://kubernetes.io/docs/reference/access-authn-authz/authentication/>,
//!   <https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/>
//! - Authorization (SubjectAccessReview, the default ClusterRole `system:auth-delegator`):
//!   <https://kubernetes.io/docs/reference/access-authn-authz/authorization/#checking-api-access>,
//!   <https://kubernetes.io/docs/reference/kubernetes-api/authorization-resources/subject-access-review-v1/>,
//!   <https://kubernetes.io/docs/reference/access-authn-authz/rbac/#other-component-roles>

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Method, Request, Response, StatusCode};
use base64::Engine as _;
use serde_json::{json, Map, Value};

/// The bearer token of the daemon's service account (written into the kubeconfig).
pub const TOKEN: &str = "stand-in-token-7f3a";
/// The user that token authenticates as, as it appears in Forbidden messages.
pub const USER: &str = "system:serviceaccount:test:magento-token-sidecar";
/// The daemon's service account (namespace, name): the one [`KubeApi::start`]'s rules are bound to.
pub const DAEMON: (&str, &str) = ("test", "magento-token-sidecar");
/// The audience of the API server itself (`--api-audiences`, by default its issuer): a TokenReview
/// without `spec.audiences` checks a token against it, and so does every request's authentication.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One RBAC rule: `verbs` on `resource` (in its API group: see [`group_of`]), limited to `names`
/// when not empty. `"*"` stands for every verb or every resource.
#[derive(Clone, Debug)]
pub struct Rule {
    pub verbs: Vec<&'static str>,
    pub resource: &'static str,
    pub names: Vec<String>,
}

/// The API group of a resource the stand-in knows of (`""`, the core group, for any other).
pub fn group_of(resource: &str) -> &'static str {
    match resource {
        "leases" => "coordination.k8s.io",
        "tokenreviews" => "authentication.k8s.io",
        "subjectaccessreviews" | "localsubjectaccessreviews" | "selfsubjectaccessreviews" => "authorization.k8s.io",
        _ => "",
    }
}

/// Whom a binding grants its rules to (RBAC's `subjects`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `kind: ServiceAccount` (namespace, name): the user `system:serviceaccount:<ns>:<name>`.
    ServiceAccount(String, String),
    User(String),
    Group(String),
}

impl Subject {
    pub fn service_account(namespace: &str, name: &str) -> Subject {
        Subject::ServiceAccount(namespace.into(), name.into())
    }

    fn matches(&self, user: &UserInfo) -> bool {
        match self {
            Subject::ServiceAccount(ns, name) => user.username == format!("system:serviceaccount:{ns}:{name}"),
            Subject::User(name) => user.username == *name,
            Subject::Group(group) => user.groups.contains(group),
        }
    }

    /// As RBAC's reasons name it: `ServiceAccount "name/namespace"`, `User "x"`, `Group "y"`.
    fn shown(&self) -> String {
        match self {
            Subject::ServiceAccount(ns, name) => format!("ServiceAccount \"{name}/{ns}\""),
            Subject::User(name) => format!("User \"{name}\""),
            Subject::Group(name) => format!("Group \"{name}\""),
        }
    }
}

/// A binding of rules to a subject: a RoleBinding in `namespace` (its rules hold there only,
/// never for cluster-scoped resources), or a ClusterRoleBinding (`None`: everywhere).
#[derive(Clone, Debug)]
struct Grant {
    name: String,
    subject: Subject,
    namespace: Option<String>,
    rules: Vec<Rule>,
}

/// A user as authentication makes it and as a SubjectAccessReview names it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UserInfo {
    username: String,
    uid: String,
    groups: Vec<String>,
}

/// A service account token the stand-in issued: whose, and for which audiences.
#[derive(Clone, Debug)]
struct Account {
    namespace: String,
    name: String,
    uid: String,
    audiences: Vec<String>,
}

impl Account {
    /// What authentication makes of a service account's token: the user
    /// `system:serviceaccount:<ns>:<name>` in the groups `system:serviceaccounts`,
    /// `system:serviceaccounts:<ns>` and `system:authenticated`.
    fn user(&self) -> UserInfo {
        UserInfo {
            username: format!("system:serviceaccount:{}:{}", self.namespace, self.name),
            uid: self.uid.clone(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", self.namespace),
                "system:authenticated".into(),
            ],
        }
    }
}

/// One request the stand-in received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// get list watch create update patch delete deletecollection (or the HTTP method, lower case,
    /// for paths outside the resources served).
    pub verb: String,
    /// "secrets", "leases", "tokenreviews", "subjectaccessreviews", or the path for anything else
    /// (404 NotFound).
    pub resource: String,
    pub namespace: String,
    /// The name in the path; for a create, the name in the body.
    pub name: Option<String>,
    pub status: u16,
    pub at: Instant,
    /// The object as it is after the request, when it exists: for secrets the keys of `data`
    /// joined by ",", for leases `spec.holderIdentity`; for a TokenReview `authenticated <user>`
    /// or `not authenticated` (never the token), for a SubjectAccessReview `<user> <verb>
    /// <resource> <namespace>/<name>: allowed` (or `denied`). Empty otherwise.
    pub detail: String,
}

struct Kind {
    resource: &'static str,
    group: &'static str,
    api_version: &'static str,
    kind: &'static str,
    /// How messages name the resource: `secrets`, `leases.coordination.k8s.io`.
    qualified: &'static str,
}

const SECRETS: Kind = Kind { resource: "secrets", group: "", api_version: "v1", kind: "Secret", qualified: "secrets" };
const LEASES: Kind = Kind {
    resource: "leases",
    group: "coordination.k8s.io",
    api_version: "coordination.k8s.io/v1",
    kind: "Lease",
    qualified: "leases.coordination.k8s.io",
};

fn kind_of(resource: &str) -> &'static Kind {
    match resource {
        "secrets" => &SECRETS,
        "leases" => &LEASES,
        other => panic!("the stand-in serves secrets and leases, not {other}"),
    }
}

#[derive(Default)]
struct State {
    /// Every RoleBinding and ClusterRoleBinding.
    grants: Vec<Grant>,
    /// Bearer token -> the service account it belongs to.
    accounts: BTreeMap<String, Account>,
    /// (resource, namespace, name) -> the object as a GET returns it.
    objects: BTreeMap<(String, String, String), Value>,
    /// One counter for every write, as etcd's revision.
    revision: u64,
    unavailable: bool,
    /// resource -> what every get of it is answered with instead (see [`Hostile`]).
    hostile: BTreeMap<String, Hostile>,
    seen: Vec<Seen>,
}

/// An answer to a get that no real API server gives, but a broken one (or something between the
/// daemon and it) may: what the daemon must survive without logging it or holding it whole.
#[derive(Clone, Debug)]
pub enum Hostile {
    /// This JSON with this status, whatever is stored: an object with a field of the wrong type.
    Json(StatusCode, Value),
    /// 200 and a Secret whose one value runs on for `bytes` bytes in all, made on the fly as it
    /// is sent (never held), valid JSON and valid base64 to its end; its length declared in
    /// Content-Length when `declared`, else sent chunked.
    Endless { bytes: usize, declared: bool },
}

/// One piece of [`Hostile::Endless`]'s value.
static RUN: [u8; 64 * 1024] = [b'A'; 64 * 1024];

fn endless(bytes: usize, declared: bool) -> Response<Body> {
    let head: &'static [u8] =
        br#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"endless","namespace":"shop"},"data":{"alice":""#;
    let tail: &'static [u8] = br#""}}"#;
    let runs = bytes.saturating_sub(head.len() + tail.len()) / RUN.len();
    let pieces = std::iter::once(head)
        .chain(std::iter::repeat_n(&RUN[..], runs))
        .chain(std::iter::once(tail))
        .map(|p| Ok::<_, Infallible>(axum::body::Bytes::from_static(p)));
    let length = head.len() + runs * RUN.len() + tail.len();
    let mut answer = Response::builder().status(StatusCode::OK).header(header::CONTENT_TYPE, "application/json");
    if declared {
        answer = answer.header(header::CONTENT_LENGTH, length);
    }
    answer.body(Body::from_stream(futures::stream::iter(pieces))).unwrap()
}

/// The server; dropping it stops it (its accept loop and every open connection).
pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeApi {
    /// Starts on 127.0.0.1:0 with `rules` as the only RBAC grants of the daemon's service account
    /// ([`DAEMON`], whose token is [`TOKEN`]), in every namespace (a Role in each, all alike).
    pub async fn start(rules: Vec<Rule>) -> KubeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let daemon = Account {
            namespace: DAEMON.0.into(),
            name: DAEMON.1.into(),
            uid: "5eed0000-0000-4000-8000-da3a0a000000".into(),
            audiences: vec![API_AUDIENCE.into()],
        };
        let grant = Grant {
            name: DAEMON.1.into(),
            subject: Subject::service_account(DAEMON.0, DAEMON.1),
            namespace: None,
            rules,
        };
        let state = Arc::new(Mutex::new(State {
            grants: vec![grant],
            accounts: BTreeMap::from([(TOKEN.to_string(), daemon)]),
            ..State::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            // The connections live in this set: aborting the accept loop drops (aborts) them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(handle(&st, req.map(Body::new)).await) }
                });
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        KubeApi { addr, state, task }
    }

    /// The grants the chart's Role gives for a Secret and a Lease both named `name`: get, update,
    /// patch with resourceNames [name]; create with no resourceNames (RBAC: "you cannot restrict
    /// create or deletecollection requests by their resource name") — for secrets and for leases.
    pub fn role_for(name: &str) -> Vec<Rule> {
        let mut rules = Vec::new();
        for resource in ["secrets", "leases"] {
            rules.push(Rule { verbs: vec!["get", "update", "patch"], resource, names: vec![name.to_string()] });
            rules.push(Rule { verbs: vec!["create"], resource, names: vec![] });
        }
        rules
    }

    /// The rules of the default ClusterRole `system:auth-delegator`: `create` on `tokenreviews`
    /// and `subjectaccessreviews`, what a server that delegates authentication and authorization
    /// to the API server needs.
    pub fn auth_delegator() -> Vec<Rule> {
        ["tokenreviews", "subjectaccessreviews"]
            .map(|resource| Rule { verbs: vec!["create"], resource, names: vec![] })
            .into()
    }

    /// A service account `namespace/name` (created if new) and a new token of it for the API
    /// server's audience, as the kubelet projects into its pods
    /// (`/var/run/secrets/kubernetes.io/serviceaccount/token`).
    pub fn service_account(&self, namespace: &str, name: &str) -> String {
        self.service_account_token(namespace, name, &[API_AUDIENCE])
    }

    /// [`KubeApi::service_account`] with a token for `audiences` (a projected token's
    /// `audience`): it authenticates only where one of them is expected. A JWT in form
    /// (header, claims, a random signature), though the stand-in only looks it up.
    pub fn service_account_token(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
        let mut st = self.state.lock().unwrap();
        let uid = st
            .accounts
            .values()
            .find(|a| a.namespace == namespace && a.name == name)
            .map(|a| a.uid.clone())
            .unwrap_or_else(|| format!("5eed0000-0000-4000-8000-{:012x}", rand::random::<u64>() >> 16));
        let header = B64URL.encode(r#"{"alg":"RS256","kid":"stand-in"}"#);
        let claims = json!({"aud": audiences, "iss": API_AUDIENCE, "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}});
        let signature = B64URL.encode(rand::random::<[u8; 32]>());
        let token = format!("{header}.{}.{signature}", B64URL.encode(claims.to_string()));
        let account = Account {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        };
        st.accounts.insert(token.clone(), account);
        token
    }

    /// Revokes a token (its service account or its pod deleted): it authenticates no more.
    pub fn revoke_token(&self, token: &str) {
        self.state.lock().unwrap().accounts.remove(token);
    }

    /// A Role in `namespace` with `rules`, and a RoleBinding of it to `subject` there.
    pub fn bind_role(&self, namespace: &str, subject: Subject, rules: Vec<Rule>) {
        self.bind(Some(namespace), subject, rules);
    }

    /// A ClusterRole with `rules` and a ClusterRoleBinding of it to `subject` (the chart's binding
    /// of the daemon to `system:auth-delegator`, with [`KubeApi::auth_delegator`]).
    pub fn bind_cluster_role(&self, subject: Subject, rules: Vec<Rule>) {
        self.bind(None, subject, rules);
    }

    fn bind(&self, namespace: Option<&str>, subject: Subject, rules: Vec<Rule>) {
        let mut st = self.state.lock().unwrap();
        let name = format!("binding-{}", st.grants.len());
        st.grants.push(Grant { name, subject, namespace: namespace.map(str::to_string), rules });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig (server = url(), the bearer token, a context whose namespace is
    /// `namespace`) to `path`, for KUBECONFIG.
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {url}\n\
             users:\n- name: standin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: standin\n  context:\n\
             \x20   cluster: standin\n    user: standin\n    namespace: {namespace}\ncurrent-context: standin\n",
            url = self.url()
        );
        std::fs::write(path, text).unwrap();
    }

    /// While on, every request gets 503 (a Status with reason ServiceUnavailable, no Retry-After)
    /// and nothing changes.
    pub fn set_unavailable(&self, on: bool) {
        self.state.lock().unwrap().unavailable = on;
    }

    /// From now on every get of `resource` ("secrets", "leases") is answered with `answer`
    /// (`None`: served again).
    pub fn answer_gets(&self, resource: &str, answer: Option<Hostile>) {
        let mut st = self.state.lock().unwrap();
        match answer {
            Some(a) => st.hostile.insert(resource.to_string(), a),
            None => st.hostile.remove(resource),
        };
    }

    /// The stored object as JSON (as a GET would return it), or None.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.to_string(), namespace.to_string(), name.to_string());
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// A Secret's data, base64-decoded, by key.
    pub fn secret_data(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let obj = self.object("secrets", namespace, name)?;
        let data = obj.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
        let decoded = data.iter().map(|(k, v)| (k.clone(), B64.decode(v.as_str().unwrap()).unwrap()));
        Some(decoded.collect())
    }

    /// Puts an object in place as a client with every right would (for test set-up): created or
    /// replaced unconditionally, validated, with a new resourceVersion. Panics if it is invalid.
    pub fn put_object(&self, resource: &str, namespace: &str, mut obj: Value) {
        let kind = kind_of(resource);
        let mut st = self.state.lock().unwrap();
        let name = obj["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let key = (resource.to_string(), namespace.to_string(), name.clone());
        let old = st.objects.get(&key).cloned();
        obj["metadata"]["namespace"] = json!(namespace);
        if let Err(e) = normalize(kind, &name, &mut obj) {
            panic!("put_object: invalid {}: {}", kind.kind, e.1);
        }
        store(&mut st, kind, key, obj, old.as_ref());
    }

    /// Deletes an object as `kubectl delete` would (for tests of what follows a deletion).
    pub fn delete_object(&self, resource: &str, namespace: &str, name: &str) {
        let key = (resource.to_string(), namespace.to_string(), name.to_string());
        self.state.lock().unwrap().objects.remove(&key);
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

/// An error answer: the `Status` kind every API error is (API concepts, "Status" /
/// <https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/>), with the
/// HTTP code in `code`; kube-rs turns it into `kube::Error::Api`.
struct Failure(StatusCode, String, &'static str, Value);

fn fail(code: StatusCode, reason: &'static str, message: String) -> Failure {
    Failure(code, message, reason, Value::Null)
}

fn status_response(f: Failure) -> Response<Body> {
    let Failure(code, message, reason, details) = f;
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    if !details.is_null() {
        body["details"] = details;
    }
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn not_found(kind: &Kind, name: &str) -> Failure {
    let d = json!({"name": name, "group": kind.group, "kind": kind.resource});
    Failure(StatusCode::NOT_FOUND, format!("{} \"{name}\" not found", kind.qualified), "NotFound", d)
}

/// 422 Invalid, worded as the apiserver's field validation: `Secret "x" is invalid: field: detail`.
fn invalid(kind: &Kind, name: &str, field: &str, why: &'static str, detail: String) -> Failure {
    let d = json!({"name": name, "group": kind.group, "kind": kind.kind,
        "causes": [{"reason": why, "message": detail, "field": field}]});
    let msg = format!("{} \"{name}\" is invalid: {field}: {detail}", kind.kind);
    Failure(StatusCode::UNPROCESSABLE_ENTITY, msg, "Invalid", d)
}

/// 409 Conflict on a stale resourceVersion (API concepts, "Conflicts" / optimistic concurrency:
/// a write whose metadata.resourceVersion is not the stored one is refused).
fn conflict(kind: &Kind, name: &str) -> Failure {
    let d = json!({"name": name, "group": kind.group, "kind": kind.resource});
    let msg = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply \
         your changes to the latest version and try again",
        kind.qualified
    );
    Failure(StatusCode::CONFLICT, msg, "Conflict", d)
}

async fn handle(state: &Mutex<State>, req: Request<Body>) -> Response<Body> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    // Bodies up to 8 MiB: larger than any Secret, so the 1 MiB rule is the one that answers.
    let body = axum::body::to_bytes(body, 8 << 20).await.unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("");
    let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (resource, ns, name) = match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "secrets", rest @ ..] if rest.len() <= 1 => ("secrets", *ns, rest.first()),
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..] if rest.len() <= 1 => {
            ("leases", *ns, rest.first())
        }
        // Cluster-scoped, and only ever created (POST): nothing is stored.
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => ("tokenreviews", "", None),
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => ("subjectaccessreviews", "", None),
        _ => ("", "", None),
    };
    let verb = match (&parts.method, name.is_some()) {
        _ if resource.is_empty() => parts.method.as_str().to_ascii_lowercase(),
        (&Method::GET, _) if watch => "watch".into(),
        (&Method::GET, true) => "get".into(),
        (&Method::GET, false) => "list".into(),
        (&Method::POST, false) => "create".into(),
        (&Method::PUT, true) => "update".into(),
        (&Method::PATCH, true) => "patch".into(),
        (&Method::DELETE, true) => "delete".into(),
        (&Method::DELETE, false) => "deletecollection".into(),
        (m, _) => m.as_str().to_ascii_lowercase(),
    };
    let mut st = state.lock().unwrap();
    let mut seen = Seen {
        verb: verb.clone(),
        resource: if resource.is_empty() { path.clone() } else { resource.into() },
        namespace: ns.into(),
        name: name.map(|n| n.to_string()),
        status: 0,
        at,
        detail: String::new(),
    };
    if verb == "create" {
        seen.name = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string));
    }
    let ctype = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ctype = ctype.split(';').next().unwrap_or("").trim().to_string();
    let auth = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let hostile = st.hostile.get(resource).filter(|_| verb == "get").cloned();
    let response = match hostile {
        Some(Hostile::Json(code, v)) => respond(code, &v),
        Some(Hostile::Endless { bytes, declared }) => endless(bytes, declared),
        None => match serve(&mut st, auth, &verb, resource, ns, seen.name.as_deref(), &path, &ctype, &body) {
            Ok((code, v)) => {
                if is_review(resource) {
                    seen.detail = review_detail(resource, &v);
                }
                respond(code, &v)
            }
            Err(f) => status_response(f),
        },
    };
    seen.status = response.status().as_u16();
    if let Some(n) = &seen.name {
        let key = (resource.to_string(), ns.to_string(), n.clone());
        if let Some(obj) = st.objects.get(&key) {
            seen.detail = match resource {
                "secrets" => obj["data"].as_object().map(|d| d.keys().cloned().collect::<Vec<_>>().join(",")),
                _ => obj["spec"]["holderIdentity"].as_str().map(str::to_string),
            }
            .unwrap_or_default();
        }
    }
    st.seen.push(seen);
    response
}

#[allow(clippy::too_many_arguments)]
fn serve(
    st: &mut State,
    auth: Option<&str>,
    verb: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
    path: &str,
    ctype: &str,
    body: &[u8],
) -> Result<(StatusCode, Value), Failure> {
    if st.unavailable {
        let msg = "the server is currently unable to handle the request".to_string();
        return Err(fail(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", msg));
    }
    // Authentication (<https://kubernetes.io/docs/reference/access-authn-authz/authentication/>):
    // a request without a bearer token known here, for the API server's audience, is 401
    // Unauthorized, before any other check.
    let user = auth
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|token| authenticate(st, token, &[API_AUDIENCE.to_string()]))
        .ok_or_else(|| fail(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized".into()))?;
    if resource.is_empty() {
        let msg = format!("the server could not find the requested resource ({path})");
        return Err(fail(StatusCode::NOT_FOUND, "NotFound", msg));
    }
    if is_review(resource) {
        if verb != "create" {
            let msg = format!("the server does not allow this method on the requested resource ({verb} {resource})");
            return Err(fail(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", msg));
        }
        authorize(st, &user, "create", resource, "", None)?;
        let review = parse_body(ctype, body)?;
        return match resource {
            "tokenreviews" => token_review(st, review),
            _ => subject_access_review(st, review),
        };
    }
    let kind = kind_of(resource);
    // create, list and watch carry no name to the authorizer (RBAC: resourceNames cannot restrict them).
    let authz_name = if matches!(verb, "create" | "list" | "watch" | "deletecollection") { None } else { name };
    authorize(st, &user, verb, kind.resource, ns, authz_name)?;
    let key = |n: &str| (resource.to_string(), ns.to_string(), n.to_string());
    match verb {
        // Get: 200 with the object, or 404 NotFound (the Status kind's reasons:
        // <https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/>).
        "get" => {
            let n = name.unwrap();
            st.objects.get(&key(n)).cloned().map(|o| (StatusCode::OK, o)).ok_or_else(|| not_found(kind, n))
        }
        "create" => {
            let mut obj = parse_body(ctype, body)?;
            let Some(n) = name else {
                let msg = "name or generateName is required".to_string();
                return Err(invalid(kind, "", "metadata.name", "FieldValueRequired", format!("Required value: {msg}")));
            };
            check_identity(&mut obj, kind, ns, n)?;
            // The etcd store refuses a create that carries a resourceVersion (it is the server's to set).
            if obj["metadata"]["resourceVersion"].as_str().is_some_and(|rv| !rv.is_empty()) {
                let msg = "Internal error occurred: resourceVersion should not be set on objects to be created";
                return Err(fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", msg.into()));
            }
            // Create: 201 Created; 409 AlreadyExists when the name is taken (API concepts).
            if st.objects.contains_key(&key(n)) {
                let d = json!({"name": n, "group": kind.group, "kind": kind.resource});
                let msg = format!("{} \"{n}\" already exists", kind.qualified);
                return Err(Failure(StatusCode::CONFLICT, msg, "AlreadyExists", d));
            }
            normalize(kind, n, &mut obj)?;
            Ok((StatusCode::CREATED, store(st, kind, key(n), obj, None)))
        }
        "update" => {
            let n = name.unwrap();
            let obj = parse_body(ctype, body)?;
            write_over(st, kind, key(n), obj)
        }
        // Patch (API concepts, "Patch" / <https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/>):
        // JSON merge patch (RFC 7386) and strategic merge patch, which for the fields of a Secret
        // and a Lease (maps and scalars, no lists with merge keys) is the same merge. The patch is
        // applied to the stored object; a metadata.resourceVersion in it is a precondition.
        // JSON patch is not served (the real apiserver does accept it) and server-side apply
        // (application/apply-patch+yaml) is not used by the daemon: both answer 415.
        "patch" => {
            let n = name.unwrap();
            if ctype != "application/merge-patch+json" && ctype != "application/strategic-merge-patch+json" {
                let msg = format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (the stand-in serves no {ctype})");
                return Err(fail(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", msg));
            }
            let patch: Value = serde_json::from_slice(body).map_err(|e| bad_request(e.to_string()))?;
            let mut obj = st.objects.get(&key(n)).cloned().ok_or_else(|| not_found(kind, n))?;
            merge_patch(&mut obj, &patch);
            write_over(st, kind, key(n), obj)
        }
        _ => Err(fail(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("the stand-in serves no {verb}"))),
    }
}

/// The user a bearer token authenticates as, when it is a service account token the stand-in
/// issued for one of `audiences` (the projected token's `aud` claim; a token for another audience
/// is not accepted: <https://kubernetes.io/docs/reference/access-authn-authz/authentication/#service-account-tokens>).
fn authenticate(st: &State, token: &str, audiences: &[String]) -> Option<UserInfo> {
    let account = st.accounts.get(token)?;
    account.audiences.iter().any(|a| audiences.contains(a)).then(|| account.user())
}

/// RBAC (<https://kubernetes.io/docs/reference/access-authn-authz/rbac/>): `verb` on `resource`
/// (in its group), named `name` when the request carries a name, in namespace `ns` (`""`: a
/// cluster-scoped resource) is allowed only when a binding to `user` (its name, or one of its
/// groups) has a rule that grants the verb on the resource and, if the rule lists resourceNames,
/// that name. A RoleBinding grants only in its namespace; a ClusterRoleBinding everywhere. The
/// reason of an allowed request as the RBAC authorizer gives it; `None` when denied (RBAC has no
/// opinion then, and says nothing).
fn allowed_by(
    st: &State,
    user: &UserInfo,
    verb: &str,
    group: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
) -> Option<String> {
    st.grants.iter().find_map(|g| {
        let in_scope = g.namespace.as_deref().is_none_or(|n| !ns.is_empty() && n == ns);
        let granted = g.rules.iter().any(|r| {
            (r.resource == "*" || (r.resource == resource && group_of(r.resource) == group))
                && r.verbs.iter().any(|v| *v == verb || *v == "*")
                && (r.names.is_empty() || name.is_some_and(|n| r.names.iter().any(|x| x == n)))
        });
        (in_scope && granted && g.subject.matches(user)).then(|| match &g.namespace {
            Some(n) => format!(
                "RBAC: allowed by RoleBinding \"{}/{n}\" of Role \"{}\" to {}",
                g.name,
                g.name,
                g.subject.shown()
            ),
            None => format!(
                "RBAC: allowed by ClusterRoleBinding \"{}\" of ClusterRole \"{}\" to {}",
                g.name,
                g.name,
                g.subject.shown()
            ),
        })
    })
}

/// A request `user` makes: allowed as [`allowed_by`] says, else 403 Forbidden, worded as the
/// apiserver words it (`... in the namespace "x"`, or `... at the cluster scope`).
fn authorize(
    st: &State,
    user: &UserInfo,
    verb: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
) -> Result<(), Failure> {
    let group = group_of(resource);
    if allowed_by(st, user, verb, group, resource, ns, name).is_some() {
        return Ok(());
    }
    let qualified = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    let subject = match name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let scope = if ns.is_empty() { "at the cluster scope".to_string() } else { format!("in the namespace \"{ns}\"") };
    let msg = format!(
        "{subject} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}",
        user.username
    );
    let d = json!({"name": name.unwrap_or(""), "group": group, "kind": resource});
    Err(Failure(StatusCode::FORBIDDEN, msg, "Forbidden", d))
}

fn is_review(resource: &str) -> bool {
    matches!(resource, "tokenreviews" | "subjectaccessreviews")
}

/// The review as created: the object sent, with `status` set, 201 Created (the API server stores
/// nothing and echoes the spec: a TokenReview's answer holds the token it was asked about).
fn reviewed(mut review: Value, kind: &str, group: &str, status: Value) -> Result<(StatusCode, Value), Failure> {
    review["apiVersion"] = json!(format!("{group}/v1"));
    review["kind"] = json!(kind);
    if !review["metadata"].is_object() {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
    review["status"] = status;
    Ok((StatusCode::CREATED, review))
}

/// TokenReview (authentication.k8s.io/v1): is `spec.token` a token the API server accepts, for
/// `spec.audiences` (none: the API server's own)? 201 either way: `status.authenticated`, and
/// when it is, `status.user` (the service account's user name, uid and groups) and
/// `status.audiences` (those of the request the token is for). A token for none of the audiences,
/// or unknown, is not authenticated, with `status.error` saying so. An empty `spec.token` is
/// refused (400).
fn token_review(st: &State, review: Value) -> Result<(StatusCode, Value), Failure> {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    if token.is_empty() {
        return Err(bad_request("token is required for TokenReview in authentication".into()));
    }
    let asked: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(list) if !list.is_empty() => list.iter().filter_map(|a| a.as_str().map(str::to_string)).collect(),
        _ => vec![API_AUDIENCE.to_string()],
    };
    let status = match authenticate(st, token, &asked) {
        Some(user) => {
            let account = &st.accounts[token];
            let audiences: Vec<&String> = account.audiences.iter().filter(|a| asked.contains(a)).collect();
            json!({"authenticated": true, "audiences": audiences,
                "user": {"username": user.username, "uid": user.uid, "groups": user.groups}})
        }
        None if st.accounts.contains_key(token) => json!({"authenticated": false,
            "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {asked:?}]", st.accounts[token].audiences)}),
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    reviewed(review, "TokenReview", "authentication.k8s.io", status)
}

/// SubjectAccessReview (authorization.k8s.io/v1): may `spec.user` with `spec.groups` do what
/// `spec.resourceAttributes` say (namespace, verb, group, resource, name)? Evaluated with the
/// stand-in's RBAC exactly as a request of that user (resourceNames against `name`). 201 with
/// `status.allowed` and, when allowed, RBAC's `reason`. Exactly one of resourceAttributes and
/// nonResourceAttributes, and a user or a group, else 422 Invalid, as the API server validates
/// it. (Non-resource URLs are granted by no rule here.)
fn subject_access_review(st: &State, review: Value) -> Result<(StatusCode, Value), Failure> {
    let spec = &review["spec"];
    let invalid = |field: &str, detail: String| {
        let msg = format!("SubjectAccessReview.authorization.k8s.io \"\" is invalid: {field}: {detail}");
        let d = json!({"group": "authorization.k8s.io", "kind": "SubjectAccessReview",
            "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}]});
        Failure(StatusCode::UNPROCESSABLE_ENTITY, msg, "Invalid", d)
    };
    let (attrs, non_resource) = (&spec["resourceAttributes"], &spec["nonResourceAttributes"]);
    match (attrs.is_object(), non_resource.is_object()) {
        (false, false) => {
            let detail = "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified";
            return Err(invalid("spec.resourceAttributes", detail.into()));
        }
        (true, true) => {
            let detail =
                format!("Invalid value: {non_resource}: cannot be specified in combination with resourceAttributes");
            return Err(invalid("spec.nonResourceAttributes", detail));
        }
        _ => {}
    }
    let user = UserInfo {
        username: spec["user"].as_str().unwrap_or("").to_string(),
        uid: spec["uid"].as_str().unwrap_or("").to_string(),
        groups: spec["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
    };
    if user.username.is_empty() && user.groups.is_empty() {
        return Err(invalid(
            "spec.user",
            "Invalid value: \"\": at least one of user or group must be specified".into(),
        ));
    }
    let reason = attrs.is_object().then(|| {
        let field = |k: &str| attrs[k].as_str().unwrap_or("");
        let name = Some(field("name")).filter(|n| !n.is_empty());
        allowed_by(st, &user, field("verb"), field("group"), field("resource"), field("namespace"), name)
    });
    let status = match reason.flatten() {
        Some(reason) => json!({"allowed": true, "reason": reason}),
        None => json!({"allowed": false}),
    };
    reviewed(review, "SubjectAccessReview", "authorization.k8s.io", status)
}

/// What [`Seen::detail`] says of a review: who was authenticated, or what was asked and decided;
/// never the token asked about.
fn review_detail(resource: &str, answer: &Value) -> String {
    let status = &answer["status"];
    match resource {
        "tokenreviews" => match status["user"]["username"].as_str() {
            Some(user) if status["authenticated"] == true => format!("authenticated {user}"),
            _ => "not authenticated".into(),
        },
        _ => {
            let (spec, attrs) = (&answer["spec"], &answer["spec"]["resourceAttributes"]);
            let field = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
            format!(
                "{} {} {} {}/{}: {}",
                field(spec, "user"),
                field(attrs, "verb"),
                field(attrs, "resource"),
                field(attrs, "namespace"),
                field(attrs, "name"),
                if status["allowed"] == true { "allowed" } else { "denied" }
            )
        }
    }
}

fn bad_request(msg: String) -> Failure {
    fail(StatusCode::BAD_REQUEST, "BadRequest", msg)
}

fn parse_body(ctype: &str, body: &[u8]) -> Result<Value, Failure> {
    if ctype != "application/json" {
        let msg = format!("the body of the request was in an unknown format - accepted media types include: application/json (got {ctype:?})");
        return Err(fail(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType", msg));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| bad_request(e.to_string()))?;
    if !v.is_object() {
        return Err(bad_request("the body is not a JSON object".into()));
    }
    Ok(v)
}

/// The body's kind, name and namespace must be those of the URL (400 BadRequest otherwise, with
/// the apiserver's wording); an empty namespace is filled from the URL.
fn check_identity(obj: &mut Value, kind: &Kind, ns: &str, name: &str) -> Result<(), Failure> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str) {
        if k != kind.kind {
            return Err(bad_request(format!("the kind of the object ({k}) does not match the URL ({})", kind.kind)));
        }
    }
    let meta = &mut obj["metadata"];
    match meta["namespace"].as_str() {
        Some(n) if !n.is_empty() && n != ns => {
            let msg = "the namespace of the provided object does not match the namespace sent on the request";
            return Err(bad_request(msg.into()));
        }
        _ => meta["namespace"] = json!(ns),
    }
    match meta["name"].as_str() {
        Some(n) if n == name => Ok(()),
        other => Err(bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            other.unwrap_or("")
        ))),
    }
}

/// Update (PUT) and the write of a patch: 404 if absent (no create on update); a non-empty
/// metadata.resourceVersion must equal the stored one, else 409 Conflict; an empty one makes the
/// update unconditional, which Secrets and Leases allow (API concepts, "Resource versions" and
/// "Conflicts").
fn write_over(
    st: &mut State,
    kind: &Kind,
    key: (String, String, String),
    mut obj: Value,
) -> Result<(StatusCode, Value), Failure> {
    let name = key.2.clone();
    check_identity(&mut obj, kind, &key.1, &name)?;
    let old = st.objects.get(&key).cloned().ok_or_else(|| not_found(kind, &name))?;
    let rv = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if !rv.is_empty() && rv != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
        return Err(conflict(kind, &name));
    }
    normalize(kind, &name, &mut obj)?;
    Ok((StatusCode::OK, store(st, kind, key, obj, Some(&old))))
}

/// Stores `obj` with a new resourceVersion from the one global counter (etcd's revision, as a
/// string: clients must treat it as opaque), keeping uid and creationTimestamp of `old`.
fn store(st: &mut State, kind: &Kind, key: (String, String, String), mut obj: Value, old: Option<&Value>) -> Value {
    st.revision += 1;
    let rv = st.revision;
    obj["kind"] = json!(kind.kind);
    obj["apiVersion"] = json!(kind.api_version);
    let meta = obj["metadata"].as_object_mut().unwrap();
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    let (uid, created) = match old {
        Some(o) => (o["metadata"]["uid"].clone(), o["metadata"]["creationTimestamp"].clone()),
        None => {
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let ts = k8s_openapi::jiff::Timestamp::from_second(now).unwrap().to_string();
            (json!(format!("5eed0000-0000-4000-8000-{rv:012x}")), json!(ts))
        }
    };
    meta.insert("uid".into(), uid);
    meta.insert("creationTimestamp".into(), created);
    st.objects.insert(key, obj.clone());
    obj
}

/// JSON merge patch, RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// What the apiserver does to a Secret or a Lease before storing it, and its validation.
///
/// ObjectMeta: annotations total at most 256 KiB (keys plus values), else 422
/// (<https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations/>).
///
/// Secret (<https://kubernetes.io/docs/concepts/configuration/secret/>): `stringData` is merged
/// into `data` (it wins over the same key) and never stored; `type` defaults to `Opaque`; `data`
/// values are base64 (a value that is not: 400 BadRequest, as the apiserver's decoder answers
/// "cannot be handled as a Secret: illegal base64 data"); keys must match `[-._a-zA-Z0-9]+`
/// (at most 253 characters), else 422; the data, decoded, may total at most 1 MiB
/// (1,048,576 bytes), else 422 Invalid.
///
/// Lease (<https://kubernetes.io/docs/concepts/architecture/leases/>): the spec is stored as given;
/// the apiserver does not arbitrate leases, clients do. Only leaseDurationSeconds must be > 0
/// and leaseTransitions >= 0 when set.
fn normalize(kind: &Kind, name: &str, obj: &mut Value) -> Result<(), Failure> {
    obj.as_object_mut().unwrap().remove("status");
    let annotations = obj["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len)).sum();
    if size > 256 * 1024 {
        let detail = "Too long: must have at most 262144 bytes".to_string();
        return Err(invalid(kind, name, "metadata.annotations", "FieldValueTooLong", detail));
    }
    if kind.resource == "leases" {
        let spec = &obj["spec"];
        if spec["leaseDurationSeconds"].as_i64().is_some_and(|d| d <= 0) {
            let detail = "Invalid value: must be greater than 0".to_string();
            return Err(invalid(kind, name, "spec.leaseDurationSeconds", "FieldValueInvalid", detail));
        }
        if spec["leaseTransitions"].as_i64().is_some_and(|d| d < 0) {
            let detail = "Invalid value: must be greater than or equal to 0".to_string();
            return Err(invalid(kind, name, "spec.leaseTransitions", "FieldValueInvalid", detail));
        }
        return Ok(());
    }
    let o = obj.as_object_mut().unwrap();
    let mut data = match o.remove("data") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(_) => {
            return Err(bad_request(
                "Secret in version \"v1\" cannot be handled as a Secret: data is not an object".into(),
            ))
        }
    };
    if let Some(sd) = o.remove("stringData") {
        for (k, v) in sd.as_object().cloned().unwrap_or_default() {
            data.insert(k, json!(B64.encode(v.as_str().unwrap_or(""))));
        }
    }
    let mut total = 0usize;
    for (k, v) in &data {
        let decoded = v.as_str().and_then(|s| B64.decode(s).ok()).ok_or_else(|| {
            bad_request(
                "Secret in version \"v1\" cannot be handled as a Secret: illegal base64 data at input byte 0".into(),
            )
        })?;
        total += decoded.len();
        let key_ok =
            !k.is_empty() && k.len() <= 253 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !key_ok {
            let detail = format!(
                "Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' \
                 (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
            );
            return Err(invalid(kind, name, &format!("data[{k}]"), "FieldValueInvalid", detail));
        }
    }
    if total > 1024 * 1024 {
        let detail = "Too long: must have at most 1048576 bytes".to_string();
        return Err(invalid(kind, name, "data", "FieldValueTooLong", detail));
    }
    o.insert("data".into(), Value::Object(data));
    o.entry("type").or_insert(json!("Opaque"));
    Ok(())
}
