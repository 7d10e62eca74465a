//! The stand-in Kubernetes API (tests/e2e/kubeapi.rs) proved with kube-rs itself, the client the
//! daemon uses: a client made from the kubeconfig the stand-in writes, over plain http on loopback.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::kubeapi::{self, KubeApi, Rule, Subject, API_AUDIENCE, DAEMON, USER};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;

const NS: &str = "shop";
const NAME: &str = "magento-tokens";

/// A client as the daemon makes one: the kubeconfig file, then `Client::try_from(config)`.
/// `retry: false` turns off kube's own retries of 429/503/504 (`Config::default_retry`).
async fn client(api: &KubeApi, retry: bool) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, NS);
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    config.default_retry = retry;
    Client::try_from(config).unwrap()
}

async fn secrets(api: &KubeApi) -> Api<Secret> {
    // The namespace comes from the kubeconfig's context, as it will for the daemon.
    Api::default_namespaced(client(api, false).await)
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect());
    s
}

/// The Status of a `kube::Error::Api`, or a panic naming what came instead.
fn api_error<T: std::fmt::Debug>(r: kube::Result<T>) -> (u16, String, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected kube::Error::Api, got {other:?}"),
    }
}

#[tokio::test]
async fn create_then_a_second_create_is_already_exists() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let made = secrets.create(&PostParams::default(), &secret(NAME, &[("alice", b"t1")])).await.unwrap();
    let meta = &made.metadata;
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    assert!(meta.uid.as_deref().is_some_and(|u| !u.is_empty()));
    assert!(meta.resource_version.as_deref().is_some_and(|r| !r.is_empty()));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(made.type_.as_deref(), Some("Opaque"));
    let again = secrets.create(&PostParams::default(), &secret(NAME, &[("alice", b"t2")])).await;
    assert_eq!(api_error(again), (409, "AlreadyExists".into(), format!("secrets \"{NAME}\" already exists")));
    let data = api.secret_data(NS, NAME).unwrap();
    assert_eq!(data, BTreeMap::from([("alice".to_string(), b"t1".to_vec())]));
}

#[tokio::test]
async fn get_of_an_absent_secret_is_not_found() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let got = secrets.get(NAME).await;
    assert_eq!(api_error(got), (404, "NotFound".into(), format!("secrets \"{NAME}\" not found")));
    assert_eq!(secrets.get_opt(NAME).await.unwrap(), None);
    let leases: Api<Lease> = Api::namespaced(client(&api, false).await, NS);
    let got = leases.get(NAME).await;
    let want = format!("leases.coordination.k8s.io \"{NAME}\" not found");
    assert_eq!(api_error(got), (404, "NotFound".into(), want));
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_a_conflict() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let first = secrets.create(&PostParams::default(), &secret(NAME, &[("alice", b"t1")])).await.unwrap();
    let mut next = first.clone();
    next.data = Some(BTreeMap::from([("alice".into(), ByteString(b"t2".to_vec()))]));
    let second = secrets.replace(NAME, &PostParams::default(), &next).await.unwrap();
    assert_ne!(second.metadata.resource_version, first.metadata.resource_version);

    // `next` still carries the first resourceVersion: a second writer that read before the update.
    next.data = Some(BTreeMap::from([("alice".into(), ByteString(b"stale".to_vec()))]));
    let stale = secrets.replace(NAME, &PostParams::default(), &next).await;
    let (code, reason, message) = api_error(stale);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        message,
        format!(
            "Operation cannot be fulfilled on secrets \"{NAME}\": the object has been modified; \
             please apply your changes to the latest version and try again"
        )
    );
    assert_eq!(api.secret_data(NS, NAME).unwrap()["alice"], b"t2");

    // Without a resourceVersion the update is unconditional; an absent object is not created.
    next.metadata.resource_version = None;
    secrets.replace(NAME, &PostParams::default(), &next).await.unwrap();
    assert_eq!(api.secret_data(NS, NAME).unwrap()["alice"], b"stale");
    let (code, reason, _) = api_error(secrets.replace("other", &PostParams::default(), &secret("other", &[])).await);
    assert_eq!((code, reason.as_str()), (403, "Forbidden")); // role_for grants update on NAME only
    let api = KubeApi::start(vec![Rule { verbs: vec!["update"], resource: "secrets", names: vec![] }]).await;
    let secrets = secrets_of(&api).await;
    let absent = secrets.replace(NAME, &PostParams::default(), &secret(NAME, &[])).await;
    assert_eq!(api_error(absent), (404, "NotFound".into(), format!("secrets \"{NAME}\" not found")));
    assert_eq!(api.object("secrets", NS, NAME), None);
}

#[tokio::test]
async fn merge_patch_with_a_stale_resource_version_is_a_conflict() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let first = secrets.create(&PostParams::default(), &secret(NAME, &[("alice", b"t1")])).await.unwrap();
    let rv1 = first.metadata.resource_version.clone().unwrap();
    let pp = PatchParams::default();
    // A patch with the current resourceVersion lands and bumps it; keys it does not name stay.
    let p = json!({"metadata": {"resourceVersion": rv1}, "stringData": {"bob": "b1"}});
    let patched = secrets.patch(NAME, &pp, &Patch::Merge(&p)).await.unwrap();
    assert_ne!(patched.metadata.resource_version.as_deref(), Some(rv1.as_str()));
    // The same precondition again is stale now.
    let p = json!({"metadata": {"resourceVersion": rv1}, "stringData": {"alice": "late"}});
    let (code, reason, _) = api_error(secrets.patch(NAME, &pp, &Patch::Merge(&p)).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let data = api.secret_data(NS, NAME).unwrap();
    let want = BTreeMap::from([("alice".to_string(), b"t1".to_vec()), ("bob".to_string(), b"b1".to_vec())]);
    assert_eq!(data, want);

    // A Lease: strategic merge patch, same rules; the spec is stored as given.
    let leases: Api<Lease> = Api::default_namespaced(client(&api, false).await);
    let mut lease = Lease::default();
    lease.metadata.name = Some(NAME.into());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some("pod-a".into()),
        lease_duration_seconds: Some(15),
        ..LeaseSpec::default()
    });
    let made = leases.create(&PostParams::default(), &lease).await.unwrap();
    let rv = made.metadata.resource_version.unwrap();
    let p = json!({"metadata": {"resourceVersion": rv}, "spec": {"holderIdentity": "pod-b", "leaseTransitions": 1}});
    leases.patch(NAME, &pp, &Patch::Strategic(&p)).await.unwrap();
    let p = json!({"metadata": {"resourceVersion": rv}, "spec": {"holderIdentity": "pod-c"}});
    let (code, reason, message) = api_error(leases.patch(NAME, &pp, &Patch::Strategic(&p)).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(message.starts_with(&format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{NAME}\"")));
    let stored = api.object("leases", NS, NAME).unwrap();
    assert_eq!(stored["spec"], json!({"holderIdentity": "pod-b", "leaseDurationSeconds": 15, "leaseTransitions": 1}));
    // As the API server's validation: leaseTransitions >= 0 (a count that wrapped is refused).
    let mut wrapped = leases.get(NAME).await.unwrap();
    wrapped.spec.as_mut().unwrap().lease_transitions = Some(i32::MIN);
    let (code, reason, message) = api_error(leases.replace(NAME, &PostParams::default(), &wrapped).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(message.ends_with("spec.leaseTransitions: Invalid value: must be greater than or equal to 0"), "{message}");

    // Server-side apply is not served.
    let p = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": NAME}});
    let (code, reason, _) = api_error(secrets.patch(NAME, &PatchParams::apply("t"), &Patch::Apply(&p)).await);
    assert_eq!((code, reason.as_str()), (415, "UnsupportedMediaType"));
}

#[tokio::test]
async fn list_watch_and_another_name_are_forbidden() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    api.put_object("secrets", NS, json!({"metadata": {"name": "db-password"}, "stringData": {"p": "x"}}));
    let secrets = secrets(&api).await;
    let forbidden = |verb: &str, subject: &str| {
        let msg = format!(
            "{subject} is forbidden: User \"{USER}\" cannot {verb} resource \"secrets\" in API group \"\" in the namespace \"{NS}\""
        );
        (403, "Forbidden".to_string(), msg)
    };
    assert_eq!(api_error(secrets.list(&ListParams::default()).await), forbidden("list", "secrets"));
    let watch = secrets.watch(&WatchParams::default(), "0").await.map(|_| ());
    assert_eq!(api_error(watch), forbidden("watch", "secrets"));
    let other = secrets.get("db-password").await;
    assert_eq!(api_error(other), forbidden("get", "secrets \"db-password\""));
    let p = json!({"stringData": {"p": "y"}});
    let other = secrets.patch("db-password", &PatchParams::default(), &Patch::Merge(&p)).await;
    assert_eq!(api_error(other), forbidden("patch", "secrets \"db-password\""));
    assert_eq!(api.secret_data(NS, "db-password").unwrap()["p"], b"x");
    // Leases: the group is named.
    let leases: Api<Lease> = Api::default_namespaced(client(&api, false).await);
    let (code, _, message) = api_error(leases.list(&ListParams::default()).await);
    assert_eq!(code, 403);
    assert_eq!(
        message,
        format!("leases.coordination.k8s.io is forbidden: User \"{USER}\" cannot list resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"{NS}\"")
    );
    let verbs: Vec<(String, u16)> = api.requests().iter().map(|s| (s.verb.clone(), s.status)).collect();
    let want = [("list", 403), ("watch", 403), ("get", 403), ("patch", 403), ("list", 403)];
    assert_eq!(verbs, want.map(|(v, c)| (v.to_string(), c)));
}

#[tokio::test]
async fn create_is_allowed_without_a_name_rule_and_denied_by_one() {
    // role_for's create grant has no resourceNames: any name may be created (RBAC cannot limit it).
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    secrets.create(&PostParams::default(), &secret("any-name", &[])).await.unwrap();
    assert!(api.object("secrets", NS, "any-name").is_some());
    // A create rule with resourceNames grants nothing: the authorizer sees no name on a create.
    let rules = vec![Rule { verbs: vec!["create", "get"], resource: "secrets", names: vec![NAME.into()] }];
    let api = KubeApi::start(rules).await;
    let secrets = secrets_of(&api).await;
    let (code, reason, message) = api_error(secrets.create(&PostParams::default(), &secret(NAME, &[])).await);
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert!(message.starts_with("secrets is forbidden:"), "{message}");
    assert!(message.contains("cannot create resource \"secrets\""), "{message}");
    assert_eq!(api.object("secrets", NS, NAME), None);
}

async fn secrets_of(api: &KubeApi) -> Api<Secret> {
    secrets(api).await
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, NS);
    let text = std::fs::read_to_string(&path).unwrap().replace(kubeapi::TOKEN, "not-the-token");
    let config = Config::from_custom_kubeconfig(Kubeconfig::from_yaml(&text).unwrap(), &KubeConfigOptions::default())
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(Client::try_from(config).unwrap());
    assert_eq!(api_error(secrets.get(NAME).await), (401, "Unauthorized".into(), "Unauthorized".into()));
}

#[tokio::test]
async fn unavailable_answers_503_and_nothing_changes_until_it_is_back() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    api.put_object("secrets", NS, json!({"metadata": {"name": NAME}, "stringData": {"alice": "t1"}}));
    let before = api.object("secrets", NS, NAME).unwrap();
    let secrets = secrets(&api).await; // kube's own retries off: one request, one answer
    api.set_unavailable(true);
    let (code, reason, _) = api_error(secrets.get(NAME).await);
    assert_eq!((code, reason.as_str()), (503, "ServiceUnavailable"));
    let p = json!({"stringData": {"alice": "t2"}});
    let (code, _, _) = api_error(secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await);
    assert_eq!(code, 503);
    assert_eq!(api.object("secrets", NS, NAME).unwrap(), before);
    api.set_unavailable(false);
    secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(api.secret_data(NS, NAME).unwrap()["alice"], b"t2");
    let statuses: Vec<u16> = api.requests().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}

/// The fact the daemon's author needs: kube-rs 5's default client (`Client::try_from(config)`,
/// `default_retry: true`) retries a 503 by itself, writes included, with exponential backoff from
/// 5 ms (15 retries, doubling, each wait jittered up to 3x its base: a call can hang for minutes in
/// an outage), and the caller sees only the final answer: a write sent before an outage can land
/// after it.
#[tokio::test]
async fn the_default_client_retries_503_by_itself_writes_included() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    api.put_object("secrets", NS, json!({"metadata": {"name": NAME}, "stringData": {"alice": "t1"}}));
    let secrets: Api<Secret> = Api::default_namespaced(client(&api, true).await);
    api.set_unavailable(true);
    let call = tokio::spawn(async move {
        let p = json!({"stringData": {"alice": "t2"}});
        secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await
    });
    // Backoffs of at least 5, 10, 20, 40 ms: a fifth try comes well within 20 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.requests().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "only {} tries in 20 s", api.requests().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!call.is_finished(), "the caller saw an answer during the outage");
    assert_eq!(api.secret_data(NS, NAME).unwrap()["alice"], b"t1");
    api.set_unavailable(false);
    tokio::time::timeout(Duration::from_secs(600), call).await.unwrap().unwrap().unwrap();
    assert_eq!(api.secret_data(NS, NAME).unwrap()["alice"], b"t2");
    let seen = api.requests();
    assert!(seen.len() >= 6, "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|s| s.status == 503 && s.verb == "patch"));
    assert_eq!(seen.last().unwrap().status, 200);
}

#[tokio::test]
async fn a_secret_over_one_mib_is_invalid() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let half = vec![b'x'; 512 * 1024];
    let at_limit = secret(NAME, &[("a", &half), ("b", &half)]);
    secrets.create(&PostParams::default(), &at_limit).await.unwrap();
    let p = json!({"stringData": {"c": "y"}});
    let (code, reason, message) = api_error(secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(message, format!("Secret \"{NAME}\" is invalid: data: Too long: must have at most 1048576 bytes"));
    assert_eq!(api.secret_data(NS, NAME).unwrap().len(), 2);
    let too_big = secret("big", &[("a", &vec![0u8; 1024 * 1024 + 1])]);
    let (code, reason, _) = api_error(secrets.create(&PostParams::default(), &too_big).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(api.object("secrets", NS, "big"), None);
    // A key outside [-._a-zA-Z0-9]+ and annotations over 256 KiB are invalid too.
    let (code, _, message) = api_error(secrets.create(&PostParams::default(), &secret("k", &[("a/b", b"1")])).await);
    assert_eq!(code, 422);
    assert!(message.starts_with("Secret \"k\" is invalid: data[a/b]: Invalid value"), "{message}");
    let p = json!({"metadata": {"annotations": {"ledger": "z".repeat(256 * 1024)}}});
    let (code, _, message) = api_error(secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await);
    assert_eq!(code, 422);
    assert!(message.contains("metadata.annotations: Too long"), "{message}");
}

#[tokio::test]
async fn string_data_is_merged_into_data_and_not_stored() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let mut s = secret(NAME, &[("alice", b"old"), ("bob", b"b1")]);
    s.string_data = Some(BTreeMap::from([("alice".into(), "new".into()), ("carol".into(), "c1".into())]));
    let made = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(made.string_data, None);
    let stored = api.object("secrets", NS, NAME).unwrap();
    assert!(stored.get("stringData").is_none(), "{stored}");
    assert_eq!(stored["data"]["alice"], json!("bmV3"));
    let data = api.secret_data(NS, NAME).unwrap();
    let want: BTreeMap<String, Vec<u8>> =
        [("alice", "new"), ("bob", "b1"), ("carol", "c1")].map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).into();
    assert_eq!(data, want);
    // Through a patch as well.
    let p = json!({"stringData": {"bob": "b2"}});
    secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    assert_eq!(api.secret_data(NS, NAME).unwrap()["bob"], b"b2");
}

#[tokio::test]
async fn requests_records_every_call_and_kube_makes_no_other() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let secrets = secrets(&api).await;
    let leases: Api<Lease> = Api::default_namespaced(client(&api, false).await);
    assert!(secrets.get_opt(NAME).await.unwrap().is_none());
    secrets.create(&PostParams::default(), &secret(NAME, &[("alice", b"1")])).await.unwrap();
    let mut s = secrets.get(NAME).await.unwrap();
    s.data.as_mut().unwrap().insert("bob".into(), ByteString(b"2".to_vec()));
    secrets.replace(NAME, &PostParams::default(), &s).await.unwrap();
    let p = json!({"data": {"alice": null}});
    secrets.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    let mut lease = Lease::default();
    lease.metadata.name = Some(NAME.into());
    lease.spec = Some(LeaseSpec { holder_identity: Some("pod-a".into()), ..LeaseSpec::default() });
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let p = json!({"spec": {"holderIdentity": "pod-b"}});
    leases.patch(NAME, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();

    let seen: Vec<(String, String, String, Option<String>, u16, String)> =
        api.requests().into_iter().map(|s| (s.verb, s.resource, s.namespace, s.name, s.status, s.detail)).collect();
    let row = |verb: &str, resource: &str, status: u16, detail: &str| {
        (verb.to_string(), resource.to_string(), NS.to_string(), Some(NAME.to_string()), status, detail.to_string())
    };
    let want = vec![
        row("get", "secrets", 404, ""),
        row("create", "secrets", 201, "alice"),
        row("get", "secrets", 200, "alice"),
        row("update", "secrets", 200, "alice,bob"),
        row("patch", "secrets", 200, "bob"),
        row("create", "leases", 201, "pod-a"),
        row("patch", "leases", 200, "pod-b"),
    ];
    assert_eq!(seen, want);
    let at: Vec<_> = api.requests().iter().map(|s| s.at).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]));
}

// ---------------------------------------------------------------------------------------------
// The reviews of the token API (`output.kubernetes.token_api`): TokenReview and
// SubjectAccessReview, created by a client whose service account may (system:auth-delegator).

/// The daemon's rules of the chart (its Role) and the binding to `system:auth-delegator`.
async fn delegating_api() -> KubeApi {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    api.bind_cluster_role(Subject::service_account(DAEMON.0, DAEMON.1), KubeApi::auth_delegator());
    api
}

fn token_review(token: &str, audiences: Option<Vec<String>>) -> TokenReview {
    TokenReview { spec: TokenReviewSpec { token: Some(token.into()), audiences }, ..TokenReview::default() }
}

/// The SubjectAccessReview the daemon sends: may `user` (in `groups`) get the Secret `name` in
/// `namespace`?
fn may_get_secret(user: &str, groups: &[String], namespace: &str, name: &str) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                verb: Some("get".into()),
                group: Some(String::new()),
                version: Some("v1".into()),
                resource: Some("secrets".into()),
                name: Some(name.into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// A service account's token is authenticated as `system:serviceaccount:<ns>:<name>` in its three
/// groups, 201 Created, the spec echoed; an unknown token, a revoked one and one for another
/// audience are not authenticated (201 too, `status.error` says why); a token for an audience
/// asked for by name is.
#[tokio::test]
async fn a_token_review_authenticates_a_service_account_token_and_no_other() {
    let api = delegating_api().await;
    let reviews: Api<TokenReview> = Api::all(client(&api, false).await);
    let token = api.service_account("web", "storefront");
    let made = reviews.create(&PostParams::default(), &token_review(&token, None)).await.unwrap();
    let status = made.status.expect("a status");
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.expect("the user");
    assert_eq!(user.username.as_deref(), Some("system:serviceaccount:web:storefront"));
    assert!(user.uid.as_deref().is_some_and(|u| !u.is_empty()));
    let groups = ["system:serviceaccounts", "system:serviceaccounts:web", "system:authenticated"];
    assert_eq!(user.groups, Some(groups.map(String::from).to_vec()));
    assert_eq!(status.audiences, Some(vec![API_AUDIENCE.to_string()]));
    assert_eq!(made.spec.token.as_deref(), Some(token.as_str()), "the API server echoes the spec");
    // The same account's next token is the same user.
    let again = api.service_account("web", "storefront");
    let made = reviews.create(&PostParams::default(), &token_review(&again, None)).await.unwrap();
    assert_eq!(made.status.unwrap().user.unwrap().uid, Some(user.uid.clone().unwrap()));

    for (case, t, audiences) in [
        ("unknown", "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl".to_string(), None),
        ("for another audience", api.service_account_token("web", "storefront", &["vault"]), None),
        ("asked for another audience", token.clone(), Some(vec!["vault".to_string()])),
    ] {
        let made = reviews.create(&PostParams::default(), &token_review(&t, audiences)).await.unwrap();
        let status = made.status.unwrap();
        assert_eq!(status.authenticated, Some(false), "{case}");
        assert_eq!(status.user, None, "{case}");
        assert!(status.error.is_some_and(|e| e.contains("invalid bearer token")), "{case}");
    }
    let vault = api.service_account_token("web", "storefront", &["vault"]);
    let made = reviews.create(&PostParams::default(), &token_review(&vault, Some(vec!["vault".into()]))).await;
    assert_eq!(made.unwrap().status.unwrap().audiences, Some(vec!["vault".to_string()]));
    api.revoke_token(&token);
    let made = reviews.create(&PostParams::default(), &token_review(&token, None)).await.unwrap();
    assert_eq!(made.status.unwrap().authenticated, Some(false), "revoked");
    // An empty token is refused.
    let (code, reason, _) = api_error(reviews.create(&PostParams::default(), &token_review("", None)).await);
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    // 201 Created, and what the stand-in records never holds the token.
    let seen = api.requests();
    assert!(seen.iter().all(|s| s.resource == "tokenreviews" && s.verb == "create" && s.name.is_none()));
    assert_eq!(seen[0].status, 201);
    assert_eq!(seen[0].detail, "authenticated system:serviceaccount:web:storefront");
    assert_eq!(seen[2].detail, "not authenticated");
    assert!(seen.iter().all(|s| !s.detail.contains(&token)));
}

/// A SubjectAccessReview is decided by RBAC for the user and groups it names: a Role with
/// resourceNames allows `get` on that Secret in that namespace only (not another name, not
/// another namespace, not another verb); a binding to a group counts for a user in it; a
/// ClusterRoleBinding counts everywhere. 201 either way, with RBAC's reason when allowed.
#[tokio::test]
async fn a_subject_access_review_is_decided_by_rbac_for_the_user_and_groups_named() {
    let api = delegating_api().await;
    let reviews: Api<SubjectAccessReview> = Api::all(client(&api, false).await);
    let web = |ns: &str| {
        vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}"), "system:authenticated".into()]
    };
    let storefront = "system:serviceaccount:web:storefront";
    let get_tokens = || vec![Rule { verbs: vec!["get"], resource: "secrets", names: vec!["shop-a-tokens".into()] }];
    api.bind_role("shop", Subject::service_account("web", "storefront"), get_tokens());
    let ask = |user: &str, groups: Vec<String>, ns: &str, name: &str| {
        let review = may_get_secret(user, &groups, ns, name);
        let reviews = reviews.clone();
        async move { reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap() }
    };
    let allowed = ask(storefront, web("web"), "shop", "shop-a-tokens").await;
    assert!(allowed.allowed, "{allowed:?}");
    let reason = allowed.reason.unwrap();
    assert!(
        reason.starts_with("RBAC: allowed by RoleBinding") && reason.ends_with("to ServiceAccount \"storefront/web\""),
        "{reason}"
    );
    for (case, user, ns, name) in [
        ("another Secret", storefront, "shop", "shop-b-tokens"),
        ("another namespace", storefront, "web", "shop-a-tokens"),
        ("another service account", "system:serviceaccount:web:admin", "shop", "shop-a-tokens"),
    ] {
        let denied = ask(user, web("web"), ns, name).await;
        assert!(!denied.allowed, "{case}: {denied:?}");
        assert_eq!(denied.reason, None, "{case}: RBAC has no opinion, and says nothing");
    }
    // Another verb on the same Secret.
    let mut review = may_get_secret(storefront, &web("web"), "shop", "shop-a-tokens");
    review.spec.resource_attributes.as_mut().unwrap().verb = Some("update".into());
    assert!(!reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap().allowed);
    // The resource in another group is another resource.
    let mut review = may_get_secret(storefront, &web("web"), "shop", "shop-a-tokens");
    review.spec.resource_attributes.as_mut().unwrap().group = Some("apps".into());
    assert!(!reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap().allowed);
    // A Role bound to a group: every service account of the namespace `batch`.
    api.bind_role("shop", Subject::Group("system:serviceaccounts:batch".into()), get_tokens());
    assert!(ask("system:serviceaccount:batch:nightly", web("batch"), "shop", "shop-a-tokens").await.allowed);
    assert!(
        !ask("system:serviceaccount:batch:nightly", vec![], "shop", "shop-a-tokens").await.allowed,
        "groups as named"
    );
    // A ClusterRole bound cluster-wide: every Secret in every namespace.
    let all_secrets = vec![Rule { verbs: vec!["get"], resource: "secrets", names: vec![] }];
    api.bind_cluster_role(Subject::User("ops".into()), all_secrets);
    assert!(ask("ops", vec![], "anywhere", "shop-b-tokens").await.allowed);
    // Without a user or a group, or without attributes: 422 Invalid.
    let (code, reason, message) =
        api_error(reviews.create(&PostParams::default(), &may_get_secret("", &[], "shop", "x")).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(
        message.ends_with("spec.user: Invalid value: \"\": at least one of user or group must be specified"),
        "{message}"
    );
    let mut review = may_get_secret(storefront, &[], "shop", "x");
    review.spec.resource_attributes = None;
    let (code, _, message) = api_error(reviews.create(&PostParams::default(), &review).await);
    assert_eq!(code, 422);
    assert!(message.contains("exactly one of nonResourceAttributes or resourceAttributes"), "{message}");
    let seen = api.requests();
    assert_eq!(seen[0].detail, format!("{storefront} get secrets shop/shop-a-tokens: allowed"));
    assert_eq!(seen[1].detail, format!("{storefront} get secrets shop/shop-b-tokens: denied"));
}

/// Creating either review needs `create` on it (what system:auth-delegator grants): without it,
/// 403 Forbidden at the cluster scope, as the API server words it; a service account token is a
/// client of the API like any other, with its own grants.
#[tokio::test]
async fn creating_a_review_needs_create_on_it() {
    let api = KubeApi::start(KubeApi::role_for(NAME)).await;
    let client = client(&api, false).await;
    let tokens: Api<TokenReview> = Api::all(client.clone());
    let access: Api<SubjectAccessReview> = Api::all(client);
    let token = api.service_account("web", "storefront");
    let forbidden = |resource: &str, group: &str| {
        let msg = format!("{resource}.{group} is forbidden: User \"{USER}\" cannot create resource \"{resource}\" in API group \"{group}\" at the cluster scope");
        (403, "Forbidden".to_string(), msg)
    };
    let made = tokens.create(&PostParams::default(), &token_review(&token, None)).await;
    assert_eq!(api_error(made), forbidden("tokenreviews", "authentication.k8s.io"));
    let made = access.create(&PostParams::default(), &may_get_secret("u", &[], "shop", NAME)).await;
    assert_eq!(api_error(made), forbidden("subjectaccessreviews", "authorization.k8s.io"));
    // A Role (namespaced) never grants a cluster-scoped resource; the ClusterRoleBinding does.
    api.bind_role(NS, Subject::service_account(DAEMON.0, DAEMON.1), KubeApi::auth_delegator());
    assert_eq!(api_error(tokens.create(&PostParams::default(), &token_review(&token, None)).await).0, 403);
    api.bind_cluster_role(Subject::service_account(DAEMON.0, DAEMON.1), KubeApi::auth_delegator());
    assert_eq!(
        tokens.create(&PostParams::default(), &token_review(&token, None)).await.unwrap().status.unwrap().authenticated,
        Some(true)
    );
    access.create(&PostParams::default(), &may_get_secret("u", &[], "shop", NAME)).await.unwrap();

    // The app's own token, sent to the API: its user, its grants (none here), its words.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path, NS);
    let text = std::fs::read_to_string(&path).unwrap().replace(kubeapi::TOKEN, &token);
    let config = Config::from_custom_kubeconfig(Kubeconfig::from_yaml(&text).unwrap(), &KubeConfigOptions::default())
        .await
        .unwrap();
    let app = Client::try_from(config).unwrap();
    let (code, _, message) = api_error(Api::<Secret>::namespaced(app.clone(), NS).get(NAME).await);
    assert_eq!(code, 403);
    assert!(
        message.contains("User \"system:serviceaccount:web:storefront\" cannot get resource \"secrets\""),
        "{message}"
    );
    let (code, _, _) =
        api_error(Api::<TokenReview>::all(app).create(&PostParams::default(), &token_review(&token, None)).await);
    assert_eq!(code, 403);
    // A token for another audience does not authenticate to the API at all.
    let vault = api.service_account_token("web", "storefront", &["vault"]);
    let text = std::fs::read_to_string(&path).unwrap().replace(kubeapi::TOKEN, &vault);
    let config = Config::from_custom_kubeconfig(Kubeconfig::from_yaml(&text).unwrap(), &KubeConfigOptions::default())
        .await
        .unwrap();
    let (code, reason, _) = api_error(Api::<Secret>::namespaced(Client::try_from(config).unwrap(), NS).get(NAME).await);
    assert_eq!((code, reason.as_str()), (401, "Unauthorized"));
}
