//! The token API (`output.kubernetes.token_api`): replicas of the real binary against the dev
//! server and the stand-in Kubernetes API (tests/e2e/kubeapi.rs), whose TokenReview and
//! SubjectAccessReview decide who gets a customer's token. The apps are this test, holding
//! service account tokens the stand-in issued, with the Roles an app team would bind.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::kubeapi::{self, KubeApi, Rule, Subject, DAEMON};
use magento_devserver::DevServerOptions;

const NS: &str = "shop";
const SECRET: &str = "magento-tokens";
/// bob's own Secret, in [`the_holder_answers_the_token_to_an_allowed_caller_only`].
const BOB_SECRET: &str = "shop-b-tokens";
const SEC: Duration = Duration::from_secs(1);

/// The dev server, the stand-in API with the chart's Role (and, `delegating`, the chart's
/// ClusterRoleBinding to system:auth-delegator), and the replicas' configuration.
struct Central {
    w: World,
    api: KubeApi,
    kubeconfig: std::path::PathBuf,
    /// (customer, Secret): the customers whose token lives in a Secret of its own
    /// (`customers[].secret`).
    own: Vec<(&'static str, &'static str)>,
}

impl Central {
    async fn new(customers: &[(&str, &str, &str)], delegating: bool) -> Central {
        Central::with_secrets(customers, delegating, &[]).await
    }

    /// [`Central::new`] with the customers of `own` in Secrets of their own (the chart's Role
    /// then names each).
    async fn with_secrets(
        customers: &[(&str, &str, &str)],
        delegating: bool,
        own: &[(&'static str, &'static str)],
    ) -> Central {
        let w = World::new(DevServerOptions::default()).await;
        for (name, email, password) in customers {
            w.server.add_customer(email, password);
            w.set_password(name, password);
        }
        let mut rules = KubeApi::role_for(SECRET);
        let names = own.iter().map(|(_, secret)| secret.to_string()).collect();
        rules.push(Rule { verbs: vec!["get", "update", "patch"], resource: "secrets", names });
        let api = KubeApi::start(rules).await;
        if delegating {
            api.bind_cluster_role(Subject::service_account(DAEMON.0, DAEMON.1), KubeApi::auth_delegator());
        }
        w.hide(kubeapi::TOKEN);
        let kubeconfig = w.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, NS);
        Central { w, api, kubeconfig, own: own.to_vec() }
    }

    /// The Secret `customer`'s token lives in.
    fn secret_of(&self, customer: &str) -> &'static str {
        self.own.iter().find(|(c, _)| *c == customer).map_or(SECRET, |(_, secret)| secret)
    }

    /// A service account of the app's namespace `web` allowed to `get` the Secrets `secrets` in
    /// the daemon's namespace (a Role with resourceNames and its RoleBinding): its token, which
    /// every daemon of this world is checked never to show.
    fn app(&self, name: &str, secrets: &[&str]) -> String {
        let token = self.api.service_account("web", name);
        if !secrets.is_empty() {
            let rule = Rule {
                verbs: vec!["get"],
                resource: "secrets",
                names: secrets.iter().map(|s| s.to_string()).collect(),
            };
            self.api.bind_role(NS, Subject::service_account("web", name), vec![rule]);
        }
        self.w.hide(&token);
        token
    }

    /// Starts replica `name` of `run` with the token API on.
    fn replica(&self, name: &str, customers: &[(&str, &str)]) -> Daemon {
        let port = free_port();
        let mut y = format!(
            "magento:\n  base_url: {}\n  timeout: 2s\nrefresh:\n  min_backoff: 100ms\n  max_backoff: 1s\noutput:\n  kubernetes:\n    secret: {SECRET}\n    lease_duration: 3s\n    token_api: true\nadmin:\n  listen: 127.0.0.1:{port}\nlog:\n  format: json\n  level: debug\ncustomers:\n",
            self.w.server.base_url(),
        );
        for (customer, email) in customers {
            y.push_str(&format!(
                "  - name: {customer}\n    username: {email}\n    password_file: {}\n",
                self.w.secret_path(customer).display()
            ));
            if let Some((_, secret)) = self.own.iter().find(|(c, _)| c == customer) {
                y.push_str(&format!("    secret: {secret}\n"));
            }
        }
        let path = self.w.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, y).unwrap();
        let log = self.w.dir.path().join(format!("{name}.log"));
        let (kubeconfig, pod) = (self.kubeconfig.clone(), name.to_owned());
        Daemon::spawn_with(&["run", "--config", path.to_str().unwrap()], &log, port, move |c| {
            c.env("KUBECONFIG", kubeconfig).env("POD_NAME", pod).env_remove("HOME");
        })
        .guarded_by(&self.w)
    }

    fn token(&self, key: &str) -> Option<String> {
        let data = self.api.secret_data(NS, self.secret_of(key))?;
        data.get(key).map(|t| String::from_utf8(t.clone()).unwrap())
    }

    async fn wait_token(&self, key: &str, limit: Duration) -> String {
        wait_for(limit, &format!("{key}'s token in the Secret"), || async { self.token(key) }).await
    }

    fn holder(&self) -> Option<String> {
        let lease = self.api.object("leases", NS, SECRET)?;
        lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_owned)
    }

    /// The reviews the stand-in received: (TokenReviews, SubjectAccessReviews).
    fn reviews(&self) -> (usize, usize) {
        let seen = self.api.requests();
        let count = |resource: &str| seen.iter().filter(|r| r.resource == resource).count();
        (count("tokenreviews"), count("subjectaccessreviews"))
    }
}

/// An app's request to a replica: `GET /token/<name>` or `POST /refresh/<name>`, with the
/// service account token as bearer when there is one. (status, body).
async fn ask(r: &Daemon, method: reqwest::Method, route: &str, bearer: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().request(method, r.url(route)).timeout(15 * SEC);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap())
}

async fn get_token(r: &Daemon, customer: &str, bearer: Option<&str>) -> (u16, String) {
    ask(r, reqwest::Method::GET, &format!("/token/{customer}"), bearer).await
}

/// The answer as the closing note shows it: the token replaced by its length.
fn shown(status: u16, body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(mut json) if json.get("token").is_some() => {
            let n = json["token"].as_str().map_or(0, str::len);
            json["token"] = serde_json::json!(format!("<{n} characters>"));
            format!("{status} {json}")
        }
        _ => format!("{status} {body}"),
    }
}

/// Two replicas with the token API, alice's token in the default Secret and bob's in a Secret of
/// its own: the holder answers an allowed caller the token in the customer's Secret (which the
/// dev server accepts as the customer's), and nobody else: an app allowed only bob's Secret gets
/// bob's token and a 403 for alice's; the standby answers 503 naming the holder; no caller's
/// token, customer token or API credential shows in any log, `/status` or `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_answers_the_token_to_an_allowed_caller_only() {
    let c = Central::with_secrets(&[ALICE, BOB], true, &[("bob", BOB_SECRET)]).await;
    let storefront = c.app("storefront", &[SECRET]);
    let other = c.app("other", &[BOB_SECRET]);
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let mut replicas = [c.replica("r1", &customers), c.replica("r2", &customers)];
    let secret_token = c.wait_token("alice", 20 * SEC).await;
    c.wait_token("bob", 20 * SEC).await;
    let holder = wait_for(10 * SEC, "a holder", || async { c.holder() }).await;
    let (h, s) = if holder == "r1" { (0, 1) } else { (1, 0) };
    replicas[h].wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    replicas[s].wait_ready(15 * SEC).await;
    let (holder_r, standby) = (&replicas[h], &replicas[s]);

    let allowed = get_token(holder_r, "alice", Some(&storefront)).await;
    assert_eq!(allowed.0, 200, "{}", allowed.1);
    let json: serde_json::Value = serde_json::from_str(&allowed.1).unwrap();
    assert_eq!(json["name"], "alice");
    assert_eq!(json["token"].as_str(), Some(secret_token.as_str()), "the token in the Secret");
    assert_eq!(c.w.server.check_token(&secret_token).as_deref(), Some(ALICE.1), "which Magento accepts as alice's");
    let status = holder_r.status_of("alice").await;
    assert_eq!(json["expires_at"], status["expires_at"]);
    // bob's token lives in its own Secret: the caller allowed that one gets it, not the other.
    let bob = get_token(holder_r, "bob", Some(&other)).await;
    assert_eq!(bob.0, 200, "{}", bob.1);
    assert!(bob.1.contains(&c.token("bob").unwrap()));
    let (code, body) = get_token(holder_r, "bob", Some(&storefront)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(&format!("may not get the Secret shop/{BOB_SECRET}")), "{body}");

    let only_another = get_token(holder_r, "alice", Some(&other)).await;
    assert_eq!(only_another.0, 403, "{}", only_another.1);
    assert!(only_another.1.contains("system:serviceaccount:web:other may not get the Secret shop/magento-tokens"));
    let no_token = get_token(holder_r, "alice", None).await;
    assert_eq!(no_token.0, 401, "{}", no_token.1);
    let forged = get_token(holder_r, "alice", Some(&format!("{storefront}x"))).await;
    assert_eq!(forged.0, 401, "{}", forged.1);
    let unknown = get_token(holder_r, "carol", Some(&storefront)).await;
    assert_eq!(unknown.0, 404, "{}", unknown.1);
    let from_standby = get_token(standby, "alice", Some(&storefront)).await;
    assert_eq!(from_standby.0, 503, "{}", from_standby.1);
    assert!(
        from_standby.1.contains(&format!("the holder of the Lease shop/magento-tokens, {holder}")),
        "{}",
        from_standby.1
    );
    for body in [&only_another.1, &no_token.1, &forged.1, &unknown.1, &from_standby.1] {
        assert!(!body.contains(&secret_token), "a token in a refusal: {body}");
    }

    // POST /refresh: the token for the allowed caller, the answer as before for anyone else.
    let (code, body) = ask(holder_r, reqwest::Method::POST, "/refresh/alice", Some(&storefront)).await;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((json["replaced"].as_bool(), json["token"].as_str()), (Some(false), Some(secret_token.as_str())));
    for bearer in [None, Some(other.as_str())] {
        let (code, body) = ask(holder_r, reqwest::Method::POST, "/refresh/alice", bearer).await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("token") && !body.contains(&secret_token), "{body}");
    }

    let series = |route: &str, result: &str| {
        format!("magento_token_api_requests_total{{result=\"{result}\",route=\"{route}\"}}")
    };
    for (route, result, n) in [
        ("token", "allowed", 2.0),
        ("token", "forbidden", 2.0),
        ("token", "unauthenticated", 2.0),
        ("token", "not_found", 1.0),
        ("refresh", "allowed", 1.0),
        ("refresh", "forbidden", 1.0),
        ("refresh", "unavailable", 0.0),
    ] {
        assert_eq!(holder_r.metric(&series(route, result)).await, Some(n), "{route} {result}");
    }
    assert_eq!(standby.metric(&series("token", "standby")).await, Some(1.0));
    let reviews =
        "magento_token_kubernetes_requests_total{resource=\"tokenreview\",result=\"success\",verb=\"create\"}";
    assert!(holder_r.metric(reviews).await.is_some_and(|n| n >= 1.0));

    println!("the token API's answers (token shown as its length):");
    println!("  an allowed caller:                  {}", shown(allowed.0, &allowed.1));
    println!("  a caller allowed only another Secret: {}", shown(only_another.0, &only_another.1));
    println!("  a caller with no token:             {}", shown(no_token.0, &no_token.1));
    println!("  a standby:                          {}", shown(from_standby.0, &from_standby.1));
    for r in &replicas {
        r.assert_secrets_hidden(&[storefront.clone(), other.clone(), kubeapi::TOKEN.into(), secret_token.clone()])
            .await;
    }
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
}

/// The daemon's service account without the binding to system:auth-delegator: TokenReview is
/// forbidden, so no caller gets a token; the 503 says why and what to bind, the request is
/// counted as the API's 403, and the next ask tries again (a failure is not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_auth_delegator_binding_no_token_is_answered() {
    let c = Central::new(&[ALICE], false).await;
    let storefront = c.app("storefront", &[SECRET]);
    let mut r = c.replica("r1", &[(ALICE.0, ALICE.1)]);
    let secret_token = c.wait_token("alice", 20 * SEC).await;
    r.wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    for _ in 0..2 {
        let (code, body) = get_token(&r, "alice", Some(&storefront)).await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("may not create tokenreviews (403: tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:test:magento-token-sidecar\" cannot create resource \"tokenreviews\""), "{body}");
        assert!(body.contains("bind it to the ClusterRole system:auth-delegator"), "{body}");
        assert!(!body.contains(&secret_token));
        println!("without system:auth-delegator: {code} {body}");
    }
    let (code, body) = ask(&r, reqwest::Method::POST, "/refresh/alice", Some(&storefront)).await;
    assert!(code == 200 && !body.contains(&secret_token), "{body}");
    assert_eq!(c.reviews(), (3, 0), "each ask tried again; no SubjectAccessReview without a user");
    let forbidden =
        "magento_token_kubernetes_requests_total{resource=\"tokenreview\",result=\"forbidden\",verb=\"create\"}";
    assert_eq!(r.metric(forbidden).await, Some(3.0));
    let unavailable = "magento_token_api_requests_total{result=\"unavailable\",route=\"token\"}";
    assert_eq!(r.metric(unavailable).await, Some(2.0));
    assert!(r.logs().contains("token API: cannot review the caller"), "the failure is logged");
    // Bound now (as `helm upgrade` would): the next ask gets the token.
    c.api.bind_cluster_role(Subject::service_account(DAEMON.0, DAEMON.1), KubeApi::auth_delegator());
    let (code, body) = get_token(&r, "alice", Some(&storefront)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// An app asking after every 401 costs no review storm: asks within the cache time, one after
/// the other and many at once, cost one TokenReview and one SubjectAccessReview per caller;
/// another caller is reviewed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_within_the_cache_time_cost_one_review() {
    let c = Central::new(&[ALICE], true).await;
    let storefront = c.app("storefront", &[SECRET]);
    let mut r = c.replica("r1", &[(ALICE.0, ALICE.1)]);
    c.wait_token("alice", 20 * SEC).await;
    r.wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get_token(&r, "alice", Some(&storefront)).await.0, 200);
    }
    let at_once = (0..20).map(|_| get_token(&r, "alice", Some(&storefront)));
    assert!(futures::future::join_all(at_once).await.iter().all(|(code, _)| *code == 200));
    let took = started.elapsed();
    // A caller with no grant asks at once, many times: one review too.
    let stranger = c.app("stranger", &[]);
    let at_once = (0..10).map(|_| get_token(&r, "alice", Some(&stranger)));
    assert!(futures::future::join_all(at_once).await.iter().all(|(code, _)| *code == 403));
    assert!(started.elapsed() < 10 * SEC, "within the cache time: {:?}", started.elapsed());
    assert_eq!(c.reviews(), (2, 2), "one TokenReview and one SubjectAccessReview per caller");
    println!("40 asks of one caller in {took:?} (20 one after the other, 20 at once) and 10 of another: {:?} reviews (TokenReview, SubjectAccessReview)", c.reviews());
    assert_eq!(r.stop().await.code(), Some(0));
}

/// Early revocation (the customer's own logout, a password change, Force Sign-In): the app's
/// next request gets a 401, it asks `POST /refresh` with its service account token and holds a
/// token Magento accepts about a second later; the mounted Secret's file would follow only at
/// the kubelet's next sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_revocation_the_app_holds_a_working_token_through_post_refresh() {
    let c = Central::new(&[ALICE], true).await;
    let storefront = c.app("storefront", &[SECRET]);
    let mut replicas = [c.replica("r1", &[(ALICE.0, ALICE.1)]), c.replica("r2", &[(ALICE.0, ALICE.1)])];
    c.wait_token("alice", 20 * SEC).await;
    let holder = wait_for(10 * SEC, "a holder", || async { c.holder() }).await;
    let r = &replicas[if holder == "r1" { 0 } else { 1 }];
    r.wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    let (code, body) = get_token(r, "alice", Some(&storefront)).await;
    assert_eq!(code, 200, "{body}");
    let held: serde_json::Value = serde_json::from_str(&body).unwrap();
    let held = held["token"].as_str().unwrap().to_owned();
    assert_eq!(c.w.server.check_token(&held).as_deref(), Some(ALICE.1));

    c.w.server.revoke(ALICE.1);
    let revoked = Instant::now();
    // The app's next call to Magento: 401.
    assert_eq!(c.w.server.check_token(&held), None, "revoked");
    let (code, body) = ask(r, reqwest::Method::POST, "/refresh/alice", Some(&storefront)).await;
    let took = revoked.elapsed();
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["replaced"], true);
    let new = json["token"].as_str().expect("the new token in the answer").to_owned();
    assert_ne!(new, held);
    assert_eq!(c.w.server.check_token(&new).as_deref(), Some(ALICE.1), "a working token");
    assert_eq!(c.token("alice").as_deref(), Some(new.as_str()), "the one now in the Secret");
    println!(
        "revocation to the app holding a working token through POST /refresh with the token API: {took:?} \
         (of which 1.1 s is the wait for the second after the revocation, whose new tokens Magento would revoke too); \
         through the mounted Secret the file changes only at the kubelet's next sync of the pod: up to its sync period \
         (1 minute by default) plus its cache's delay"
    );
    assert!(took < 10 * SEC, "{took:?}");
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
}
