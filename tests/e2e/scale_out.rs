//! Scale-out (`output.kubernetes`): several replicas of the real binary, as separate processes,
//! against the dev server and a stand-in Kubernetes API on loopback (tests/e2e/kubeapi.rs),
//! through kube-rs as in a cluster. One holder of the Lease logs in and writes the Secret; a
//! SIGKILL, an API outage or a wrong password across failovers never makes two writers, loses a
//! token or takes Magento's count past the lockout budget.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::kubeapi::{self, KubeApi, Rule};
use magento_devserver::DevServerOptions;

const NS: &str = "shop";
const SECRET: &str = "magento-tokens";
const SEC: Duration = Duration::from_secs(1);

/// The dev server, the stand-in API with the chart's Role, and the replicas' configuration.
struct Deployment {
    w: World,
    api: KubeApi,
    kubeconfig: PathBuf,
}

impl Deployment {
    async fn new(opts: DevServerOptions, customers: &[(&str, &str, &str)]) -> Deployment {
        Deployment::with_role(opts, customers, KubeApi::role_for(SECRET)).await
    }

    /// [`Deployment::new`] whose service account has the Role `rules` instead of the chart's.
    async fn with_role(opts: DevServerOptions, customers: &[(&str, &str, &str)], rules: Vec<Rule>) -> Deployment {
        let w = World::new(opts).await;
        for (name, email, password) in customers {
            w.server.add_customer(email, password);
            w.set_password(name, password);
        }
        let api = KubeApi::start(rules).await;
        let kubeconfig = w.dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, NS);
        Deployment { w, api, kubeconfig }
    }

    /// A configuration for `customers` writing the Secret, with `refresh` lines.
    fn config(&self, customers: &[(&str, &str)], refresh: &str, admin_port: u16) -> String {
        let mut y = format!(
            "magento:\n  base_url: {}\n  timeout: 2s\nrefresh:\n  min_backoff: 100ms\n  max_backoff: 1s\n{refresh}output:\n  kubernetes:\n    secret: {SECRET}\n    lease_duration: 3s\nadmin:\n  listen: 127.0.0.1:{admin_port}\nlog:\n  format: json\n  level: debug\ncustomers:\n",
            self.w.server.base_url(),
        );
        for (name, email) in customers {
            y.push_str(&format!(
                "  - name: {name}\n    username: {email}\n    password_file: {}\n",
                self.w.secret_path(name).display()
            ));
        }
        y
    }

    /// Starts replica `name` (its POD_NAME) of `run` on its own configuration file.
    fn replica(&self, name: &str, customers: &[(&str, &str)], refresh: &str) -> Daemon {
        self.replica_with(name, |port| self.config(customers, refresh, port))
    }

    /// Starts replica `name` of `run` on the configuration `config` makes for its admin port.
    fn replica_with(&self, name: &str, config: impl FnOnce(u16) -> String) -> Daemon {
        let port = free_port();
        let path = self.w.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, config(port)).unwrap();
        let log = self.w.dir.path().join(format!("{name}.log"));
        let kubeconfig = self.kubeconfig.clone();
        let name = name.to_owned();
        Daemon::spawn_with(&["run", "--config", path.to_str().unwrap()], &log, port, move |c| {
            c.env("KUBECONFIG", kubeconfig).env("POD_NAME", name).env_remove("HOME");
        })
        .guarded_by(&self.w)
    }

    fn holder(&self) -> Option<String> {
        let lease = self.api.object("leases", NS, SECRET)?;
        lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_owned)
    }

    fn token(&self, key: &str) -> Option<String> {
        let data = self.api.secret_data(NS, SECRET)?;
        data.get(key).map(|t| String::from_utf8(t.clone()).unwrap())
    }

    async fn wait_holder(&self, not: Option<&str>, limit: Duration) -> String {
        wait_for(limit, "a holder of the Lease", || async { self.holder().filter(|h| Some(h.as_str()) != not) }).await
    }

    async fn wait_token(&self, key: &str, not: Option<&str>, limit: Duration) -> String {
        wait_for(limit, &format!("{key}'s token in the Secret"), || async {
            self.token(key).filter(|t| Some(t.as_str()) != not)
        })
        .await
    }

    /// Every verb the stand-in saw, with the object kind and name.
    fn verbs(&self) -> BTreeSet<(String, String, Option<String>)> {
        self.api.requests().into_iter().map(|r| (r.verb, r.resource, r.name)).collect()
    }
}

fn count(logs: &str, message: &str) -> usize {
    logs.matches(&format!("\"message\":\"{message}\"")).count()
}

/// Three replicas: one holds the Lease and makes every login (one per customer per refresh);
/// the other two log in never, are ready from the Secret, show the holder and send POST
/// /refresh to it; only get, create and update reach the API, on the two named objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_log_each_customer_in_once_per_refresh() {
    let opts = DevServerOptions { token_lifetime: 8 * SEC, ..Default::default() };
    let d = Deployment::new(opts, &[ALICE, BOB]).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let refresh = "  before_expiry: 4s\n  jitter: 500ms\n";
    let mut replicas: Vec<Daemon> = ["r1", "r2", "r3"].iter().map(|n| d.replica(n, &customers, refresh)).collect();
    let first = d.wait_token("alice", None, 20 * SEC).await;
    d.wait_token("bob", None, 20 * SEC).await;
    // Two refreshes of each customer (8 s tokens refreshed 4 s before their end).
    d.wait_token("alice", Some(&first), 20 * SEC).await;
    let second = d.token("alice").unwrap();
    d.wait_token("alice", Some(&second), 20 * SEC).await;
    let holder = d.holder().expect("a holder");
    for r in &replicas {
        r.wait_ready(15 * SEC).await;
    }
    // The holder wrote every token; the standbys logged in never.
    for (name, r) in ["r1", "r2", "r3"].iter().zip(&replicas) {
        let logs = r.logs();
        let leader = r.metric("magento_token_leader").await;
        if *name == holder {
            assert_eq!(leader, Some(1.0), "{name} holds the Lease");
            // The holder answers POST /refresh itself: the token in the Secret is still good.
            let asked = reqwest::Client::new().post(r.url("/refresh/alice")).send().await.unwrap();
            assert_eq!(asked.status().as_u16(), 200);
            let body: serde_json::Value = serde_json::from_str(&asked.text().await.unwrap()).unwrap();
            assert_eq!(body["replaced"], false);
        } else {
            assert_eq!(leader, Some(0.0), "{name} stands by");
            assert_eq!(count(&logs, "token written"), 0, "{name} wrote nothing:\n{logs}");
            let status: serde_json::Value = serde_json::from_str(&r.get("/status").await.unwrap().1).unwrap();
            assert_eq!(status["leader"]["holder"], holder.as_str());
            assert_eq!(status["leader"]["leading"], false);
            assert_eq!(status["customers"][0]["state"], "standby");
            let asked = reqwest::Client::new().post(r.url("/refresh/alice")).send().await.unwrap();
            assert_eq!(asked.status().as_u16(), 503);
            assert!(asked.text().await.unwrap().contains(&holder), "a standby names the holder");
        }
    }
    // Exactly the verbs of the Role, on the two named objects.
    for (verb, resource, name) in d.verbs() {
        assert!(["get", "create", "update"].contains(&verb.as_str()), "{verb} {resource}");
        assert_eq!(name.as_deref(), Some(SECRET), "{verb} {resource}");
    }
    let secret = d.api.object("secrets", NS, SECRET).unwrap();
    assert_eq!(secret["type"], "Opaque");
    // No password, token or API credential in any replica's logs, /status or /metrics.
    let mut secrets: Vec<String> = [ALICE.2, BOB.2, kubeapi::TOKEN].iter().map(|s| s.to_string()).collect();
    secrets.extend(["alice", "bob"].iter().filter_map(|k| d.token(k)));
    secrets.extend([first, second]);
    for r in &replicas {
        r.assert_secrets_hidden(&secrets).await;
    }
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
    // A clean stop gives the Lease up.
    assert_eq!(d.holder(), None);
    // One login per customer per refresh: every login the store saw was the holder's and wrote
    // a token (counted once every write in flight finished).
    let logins = d.w.server.login_attempts(ALICE.1) + d.w.server.login_attempts(BOB.1);
    let written: usize = replicas.iter().map(|r| count(&r.logs(), "token written")).sum();
    let h = ["r1", "r2", "r3"].iter().position(|n| *n == holder).unwrap();
    assert!(logins >= 6, "three tokens of each customer at least: {logins}");
    assert_eq!(logins, written, "every login the store received was written");
    assert_eq!(count(&replicas[h].logs(), "token written"), written, "all by the holder");
    println!("{logins} logins for 2 customers over 3 replicas, all {written} written by {holder}");
}

/// SIGKILL of the holder: a standby takes the Lease within lease_duration plus a renew period,
/// adopts the tokens in the Secret (no login for them) and writes the next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_holder_without_logging_in_again() {
    let opts = DevServerOptions { token_lifetime: 20 * SEC, ..Default::default() };
    let d = Deployment::new(opts, &[ALICE]).await;
    let customers = [(ALICE.0, ALICE.1)];
    let refresh = "  before_expiry: 10s\n  jitter: 1s\n";
    let mut replicas = [d.replica("r1", &customers, refresh), d.replica("r2", &customers, refresh)];
    let first = d.wait_token("alice", None, 20 * SEC).await;
    let holder = d.wait_holder(None, 10 * SEC).await;
    let logins = d.w.server.login_attempts(ALICE.1);
    let (i, j) = if holder == "r1" { (0, 1) } else { (1, 0) };
    replicas[i].signal("KILL");
    let killed = Instant::now();
    let next = d.wait_holder(Some(&holder), 20 * SEC).await;
    let took = killed.elapsed();
    println!("the Lease went from {holder} to {next} {took:?} after the SIGKILL");
    assert_eq!(next, if holder == "r1" { "r2" } else { "r1" });
    // 3 s lease + 0.6 s renew period, with room for a busy machine.
    assert!(took < 15 * SEC, "{took:?}");
    replicas[j].wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    // The token in the Secret was adopted: no login at the takeover.
    wait_for(10 * SEC, "the adoption", || async {
        replicas[j].logs().contains("adopted the token on disk").then_some(())
    })
    .await;
    println!("{next} adopted the token in the Secret {:?} after the SIGKILL", killed.elapsed());
    assert_eq!(d.w.server.login_attempts(ALICE.1), logins, "no login at the takeover");
    // The next refresh is the new holder's.
    let refreshed = d.wait_token("alice", Some(&first), 30 * SEC).await;
    assert!(d.w.server.issued(&refreshed));
    // (Logged once the update is answered: a moment after the stand-in stored it.)
    let written = wait_for(10 * SEC, "the write in the new holder's log", || async {
        Some(count(&replicas[j].logs(), "token written")).filter(|n| *n > 0)
    })
    .await;
    assert_eq!(written, 1);
    assert_eq!(replicas[j].stop().await.code(), Some(0));
}

/// The API away for longer than the lease: the Secret keeps the last tokens, the holder stops
/// writing before its Lease could be taken, no replica ever counts itself the holder beside
/// another, and when the API is back one replica holds the Lease and refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_loses_no_token_and_never_makes_two_writers() {
    let opts = DevServerOptions { token_lifetime: 30 * SEC, ..Default::default() };
    let d = Deployment::new(opts, &[ALICE]).await;
    let customers = [(ALICE.0, ALICE.1)];
    let refresh = "  before_expiry: 15s\n  jitter: 1s\n";
    let mut replicas = vec![d.replica("r1", &customers, refresh), d.replica("r2", &customers, refresh)];
    let first = d.wait_token("alice", None, 20 * SEC).await;
    d.wait_holder(None, 10 * SEC).await;
    for r in &replicas {
        r.wait_ready(15 * SEC).await;
    }
    d.api.set_unavailable(true);
    let outage = Instant::now();
    let mut both = 0;
    // 8 s of outage (the lease is 3 s): both replicas are watched all along.
    while outage.elapsed() < 8 * SEC {
        let a = replicas[0].metric("magento_token_leader").await;
        let b = replicas[1].metric("magento_token_leader").await;
        if a == Some(1.0) && b == Some(1.0) {
            both += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(both, 0, "two replicas held the Lease at once");
    for r in &replicas {
        assert_eq!(r.metric("magento_token_leader").await, Some(0.0), "no holder without the API");
    }
    assert_eq!(d.token("alice").as_deref(), Some(first.as_str()), "the Secret keeps the token");
    d.api.set_unavailable(false);
    // (The Lease still names the holder from before the outage: either replica may win it.)
    let h = wait_for(20 * SEC, "a holder after the outage", || async {
        for (i, r) in replicas.iter().enumerate() {
            if r.metric("magento_token_leader").await == Some(1.0) {
                return Some(i);
            }
        }
        None
    })
    .await;
    assert_eq!(replicas[1 - h].metric("magento_token_leader").await, Some(0.0));
    assert_eq!(d.holder().as_deref(), Some(["r1", "r2"][h]));
    let refreshed = d.wait_token("alice", Some(&first), 40 * SEC).await;
    assert!(d.w.server.issued(&refreshed));
    let metrics = replicas[h].get("/metrics").await.unwrap().1;
    assert!(
        metrics.contains(
            "magento_token_kubernetes_requests_total{resource=\"lease\",result=\"unavailable\",verb=\"get\"}"
        ),
        "{metrics}"
    );
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
}

/// A wrong password and three failovers (each holder killed after its 401): the ledger in the
/// Secret travels with the Lease, so Magento never counts more than the budget of one
/// replica (3 with lockout_reset success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_across_failovers_keeps_within_the_budget() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    d.w.set_password(ALICE.0, "wrong-password");
    let customers = [(ALICE.0, ALICE.1)];
    let refresh = "  auth_failure_delays: [1s, 2s]\n";
    let mut replicas: Vec<Option<Daemon>> =
        ["r1", "r2", "r3", "r4"].iter().map(|n| Some(d.replica(n, &customers, refresh))).collect();
    let names = ["r1", "r2", "r3", "r4"];
    let mut holder = d.wait_holder(None, 20 * SEC).await;
    for failover in 0..3 {
        // The holder's next 401 (or its being held back), then it is killed.
        let before = d.w.server.login_attempts(ALICE.1);
        let _ = tokio::time::timeout(10 * SEC, async {
            while d.w.server.login_attempts(ALICE.1) == before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let i = names.iter().position(|n| *n == holder).unwrap();
        replicas[i].as_mut().unwrap().signal("KILL");
        replicas[i] = None;
        println!("failover {failover}: killed {holder} after {} logins", d.w.server.login_attempts(ALICE.1));
        holder = d.wait_holder(Some(&holder), 20 * SEC).await;
    }
    // The last holder goes on to the end of the budget.
    tokio::time::sleep(8 * SEC).await;
    let peak = d.w.server.max_failure_count(ALICE.1);
    println!("Magento's highest count for alice: {peak}");
    assert!(peak <= 3, "Magento counted {peak} failures: over the budget");
    assert!(!d.w.server.is_locked(ALICE.1));
    let ledger = d.api.object("secrets", NS, SECRET).unwrap()["metadata"]["annotations"]
        ["magento-token-sidecar/ledger"]
        .as_str()
        .map(str::to_owned)
        .expect("the ledger is in the Secret");
    assert!(ledger.contains("\"username\":\"alice@example.com\""), "{ledger}");
    assert!(!ledger.contains("wrong-password"));
    for r in replicas.iter_mut().flatten() {
        assert_eq!(r.stop().await.code(), Some(0));
    }
}

/// `once` takes the Lease, writes every customer's token into the Secret in one update, and
/// gives the Lease up; while another replica holds it, `once` writes nothing and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_writes_the_secret_under_the_lease() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE, BOB]).await;
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let path = d.w.dir.path().join("once.yaml");
    std::fs::write(&path, d.config(&customers, "", 0)).unwrap();
    let run = |timeout: &str| {
        let out = std::process::Command::new(BIN)
            .args(["once", "--config", path.to_str().unwrap(), "--timeout", timeout])
            .env("KUBECONFIG", &d.kubeconfig)
            .env("POD_NAME", "cronjob")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, logs) = tokio::task::block_in_place(|| run("30s"));
    assert_eq!(code, Some(0), "{logs}");
    for who in [ALICE, BOB] {
        let token = d.token(who.0).expect("a token in the Secret");
        assert_eq!(d.w.server.check_token(&token).as_deref(), Some(who.1));
    }
    // Two writes, whatever the number of customers: every login booked before it is sent
    // (passwords not yet proven in this process), then every token with the bookings taken back.
    let updates = d.api.requests().iter().filter(|r| r.resource == "secrets" && r.verb != "get").count();
    assert_eq!(updates, 2, "the bookings share one write, the tokens another");
    let annotations = &d.api.object("secrets", NS, SECRET).unwrap()["metadata"]["annotations"];
    assert!(annotations.get("magento-token-sidecar/ledger").is_none(), "bookings taken back: {annotations}");
    assert_eq!(d.holder(), None, "the Lease given up");
    // A running replica holds the Lease: once waits for it until --timeout, then gives up.
    let mut r = d.replica("r1", &customers, "");
    d.wait_holder(None, 20 * SEC).await;
    let (code, logs) = tokio::task::block_in_place(|| run("2s"));
    assert_eq!(code, Some(1), "{logs}");
    assert!(logs.contains("is held by r1"), "{logs}");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// The Role without update on the Lease: no replica can hold it, each says why in its log and
/// in magento_token_kubernetes_requests_total{result="forbidden"}, and no login is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_missing_a_verb_is_reported_and_nothing_is_sent() {
    let mut rules = KubeApi::role_for(SECRET);
    rules.retain(|r| !(r.resource == "leases" && r.verbs.contains(&"create")));
    let d = Deployment::with_role(DevServerOptions::default(), &[ALICE], rules).await;
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1)], "");
    let forbidden = "magento_token_kubernetes_requests_total{resource=\"lease\",result=\"forbidden\",verb=\"create\"}";
    wait_for(15 * SEC, "a forbidden create of the Lease", || async { r.metric(forbidden).await.filter(|n| *n >= 1.0) })
        .await;
    assert!(r.logs().contains("may not do this"), "{}", r.logs());
    assert_eq!(d.w.server.login_attempts(ALICE.1), 0);
    let (status, body) = r.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// forget-failures with output.kubernetes: it marks the ledger in the Secret, and the holder,
/// held back by a wrong password, tries again within two leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_failures_reaches_the_holder_through_the_secret() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    d.w.set_password(ALICE.0, "wrong-password");
    let customers = [(ALICE.0, ALICE.1)];
    let refresh = "  auth_failure_delays: [200ms, 400ms]\n";
    let mut r = d.replica("r1", &customers, refresh);
    wait_for(20 * SEC, "the budget spent", || async { (d.w.server.login_attempts(ALICE.1) == 3).then_some(()) }).await;
    r.wait_metric(&series("magento_token_held_back", ALICE.0), 1.0, 10 * SEC).await;
    // The operator resets Magento's count, then tells the daemon.
    d.w.server.reset_failures(ALICE.1);
    let path = d.w.dir.path().join("r1.yaml");
    let out = std::process::Command::new(BIN)
        .args(["forget-failures", "--config", path.to_str().unwrap(), "alice"])
        .env("KUBECONFIG", &d.kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("forgotten in the Secret"));
    wait_for(20 * SEC, "a login after forget-failures", || async {
        (d.w.server.login_attempts(ALICE.1) > 3).then_some(())
    })
    .await;
    assert!(r.logs().contains("an operator cleared this customer's failed logins"));
    assert_eq!(r.stop().await.code(), Some(0));
}

/// The Secret deleted under a running holder (a cleanup, `kubectl delete`): the next write
/// creates it again instead of failing for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_is_created_again_at_the_next_write() {
    let opts = DevServerOptions { token_lifetime: 6 * SEC, ..Default::default() };
    let d = Deployment::new(opts, &[ALICE]).await;
    let refresh = "  before_expiry: 3s\n  jitter: 500ms\n";
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1)], refresh);
    let first = d.wait_token("alice", None, 20 * SEC).await;
    d.api.delete_object("secrets", NS, SECRET);
    let again = d.wait_token("alice", Some(&first), 20 * SEC).await;
    assert_eq!(d.w.server.check_token(&again).as_deref(), Some(ALICE.1));
    let creates =
        d.api.requests().iter().filter(|q| q.resource == "secrets" && q.verb == "create" && q.status == 201).count();
    assert_eq!(creates, 2, "created at the first write and again after the deletion");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A damaged entry in the Secret's ledger annotation, for a key no customer uses, made the
/// holder ignore the whole annotation: after a restart it sent a wrong password three times more
/// and Magento's count went from 3 to 6. Now only a damaged entry's own customer counts it, and
/// the entry is written back as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ledger_entry_in_the_secret_costs_no_other_customer_its_budget() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE, BOB]).await;
    d.w.set_password(ALICE.0, "wrong-password");
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let refresh = "  auth_failure_delays: [200ms, 400ms]\n";
    let mut r = d.replica("r1", &customers, refresh);
    r.wait_metric(&series("magento_token_held_back", ALICE.0), 1.0, 20 * SEC).await;
    let bob = d.wait_token("bob", None, 10 * SEC).await;
    assert_eq!(r.stop().await.code(), Some(0));
    assert_eq!(d.w.server.login_attempts(ALICE.1), 3);

    // Someone edits the annotation by hand.
    let mut secret = d.api.object("secrets", NS, SECRET).unwrap();
    let annotation = &mut secret["metadata"]["annotations"]["magento-token-sidecar/ledger"];
    let mut ledger: serde_json::Value = serde_json::from_str(annotation.as_str().unwrap()).unwrap();
    ledger["nobody"] = serde_json::json!({"chain": "many"});
    *annotation = serde_json::Value::String(ledger.to_string());
    d.api.put_object("secrets", NS, secret);

    let mut r = d.replica("r2", &customers, refresh);
    r.wait_metric(&series("magento_token_held_back", ALICE.0), 1.0, 20 * SEC).await;
    tokio::time::sleep(5 * SEC).await;
    let peak = d.w.server.max_failure_count(ALICE.1);
    println!("a damaged entry beside alice's: Magento's highest count {peak}");
    assert_eq!(peak, 3, "Magento's count after the restart");
    assert_eq!(d.w.server.login_attempts(ALICE.1), 3);
    assert_eq!(d.token("bob").as_deref(), Some(bob.as_str()), "bob's token is still good and kept");
    let annotations = &d.api.object("secrets", NS, SECRET).unwrap()["metadata"]["annotations"];
    let ledger = annotations["magento-token-sidecar/ledger"].as_str().unwrap_or_default();
    assert!(ledger.contains(r#""nobody":{"chain":"many"}"#), "{ledger}");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// forget-failures against a Secret that does not exist (a wrong namespace) said "forgotten in
/// the Secret" and exited 0 though nothing was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_failures_without_the_secret_says_nothing_was_forgotten() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    let path = d.w.dir.path().join("r1.yaml");
    std::fs::write(&path, d.config(&[(ALICE.0, ALICE.1)], "", free_port())).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["forget-failures", "--config", path.to_str().unwrap(), "alice"])
        .env("KUBECONFIG", &d.kubeconfig)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains(&format!("the Secret {NS}/{SECRET} does not exist")), "{stderr}");
    assert!(!stdout.contains("forgotten"), "{stdout}");
    assert!(d.api.object("secrets", NS, SECRET).is_none(), "nothing created");
}

/// The Secret `magento-tokens` as an operator or a former holder left it: `data` as given (raw
/// bytes, base64-encoded here) and the times annotation as given.
fn stored_secret(data: &[(&str, &[u8])], times: Option<&str>) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: serde_json::Map<String, serde_json::Value> =
        data.iter().map(|(k, v)| (k.to_string(), serde_json::json!(b64.encode(v)))).collect();
    let mut secret = serde_json::json!({"metadata": {"name": SECRET}, "data": data});
    if let Some(times) = times {
        secret["metadata"]["annotations"] = serde_json::json!({"magento-token-sidecar/times": times});
    }
    secret
}

/// The times annotation of one key whose token expires an hour from now.
fn an_hour_left(key: &str) -> String {
    let now = std::time::SystemTime::now();
    let at = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    format!(
        r#"{{"{key}":{{"obtained_at":"{}","expires_at":"{}"}}}}"#,
        at(now - Duration::from_secs(60)),
        at(now + Duration::from_secs(3600))
    )
}

/// Waits until the stand-in has answered `n` more gets of `resource` than `since`.
async fn wait_gets(d: &Deployment, resource: &str, since: usize, n: usize, limit: Duration) -> usize {
    let gets = || d.api.requests().iter().filter(|r| r.resource == resource && r.verb == "get").count();
    wait_for(limit, &format!("{n} more gets of {resource}"), || async { Some(gets()).filter(|g| *g >= since + n) })
        .await
}

/// A Secret answered with `data` as it is plus one field of the wrong type (holding the base64
/// of a token): kube-rs would log the whole answer, tokens included, and its error names the
/// value. The daemon takes it as an API error, logs neither the answer nor any part of it, and
/// carries on: once the answers are sound again it reads the Secret and writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_answer_with_a_field_of_the_wrong_type_is_an_api_error_and_never_logged() {
    use base64::Engine as _;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    let (kept, other) = ("q3w8e7r6t5y4u3i2o1p0asdfghjklzxcvbnm", "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe");
    d.api.put_object("secrets", NS, stored_secret(&[("alice", kept.as_bytes())], None));
    let mut answer = d.api.object("secrets", NS, SECRET).unwrap();
    answer["immutable"] = serde_json::json!(b64(other));
    d.api.answer_gets("secrets", Some(kubeapi::Hostile::Json(axum::http::StatusCode::OK, answer)));
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1)], "");
    d.wait_holder(None, 20 * SEC).await;
    wait_gets(&d, "secrets", 0, 2, 20 * SEC).await;
    let secrets: Vec<String> = [kept, other].iter().flat_map(|t| [t.to_string(), b64(t)]).collect();
    let logs = r.logs();
    assert_hidden("the log", &logs, &secrets);
    assert!(logs.contains("holding the Lease, but cannot read the Secret"), "{logs}");
    assert!(logs.contains("the API server's answer is not a secret ("), "{logs}");
    let error = "magento_token_kubernetes_requests_total{resource=\"secret\",result=\"error\",verb=\"get\"}";
    assert!(r.metric(error).await.is_some_and(|n| n >= 2.0), "{}", r.get("/metrics").await.unwrap().1);
    assert_eq!(d.w.server.login_attempts(ALICE.1), 0, "nothing sent while the Secret cannot be read");
    // Sound answers again: the holder reads the Secret and goes on.
    d.api.answer_gets("secrets", None);
    let written = d.wait_token("alice", Some(kept), 20 * SEC).await;
    assert_eq!(d.w.server.check_token(&written).as_deref(), Some(ALICE.1));
    r.assert_secrets_hidden(&secrets).await;
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A Secret answer of 200 MiB (made on the fly by the stand-in), sent chunked, then with its
/// length declared: at most 3 MiB of it is read, the rest never; it is an API error that names
/// the limit and shows none of the answer, and the replica's peak memory stays far from the
/// answer's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_secret_answer_is_cut_short_and_never_held() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    let mut r = None;
    for declared in [false, true] {
        d.api.answer_gets("secrets", Some(kubeapi::Hostile::Endless { bytes: 200 << 20, declared }));
        let gets = d.api.requests().iter().filter(|q| q.resource == "secrets" && q.verb == "get").count();
        let r = r.get_or_insert_with(|| d.replica("r1", &[(ALICE.0, ALICE.1)], ""));
        // (Bounded, but not fatal: today's main takes longer to swallow 200 MiB each time.)
        let _ = tokio::time::timeout(40 * SEC, wait_gets(&d, "secrets", gets, 3, 40 * SEC)).await;
        let (status, _) = r.get("/healthz").await.expect("/healthz answers");
        assert_eq!(status, 200);
    }
    let mut r = r.unwrap();
    let peak = r.peak_rss_kib().expect("VmHWM");
    println!("peak RSS after 200 MiB Secret answers, chunked and declared: {peak} KiB");
    let logs = r.logs();
    assert!(logs.contains("is larger than 3 MiB: not read"), "{}", logs.chars().take(4000).collect::<String>());
    assert!(
        logs.contains("is larger than 3 MiB, 199.9 MiB declared: not read"),
        "{}",
        logs.lines().rfind(|l| l.contains("larger")).unwrap_or("")
    );
    assert!(!logs.contains("AAAAAAAAAAAAAAAA"), "a piece of the answer in the log");
    assert!(logs.len() < 1 << 20, "{} bytes of log", logs.len());
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    assert_eq!(d.w.server.login_attempts(ALICE.1), 0, "nothing sent while the Secret cannot be read");
    // A Lease answer is cut at 64 KiB: the holder cannot renew it, and says why.
    d.api.answer_gets("leases", Some(kubeapi::Hostile::Endless { bytes: 16 << 20, declared: false }));
    r.wait_metric("magento_token_leader", 0.0, 20 * SEC).await;
    let logs = r.logs();
    assert!(logs.contains("the API server's answer about the lease is larger than 64 KiB: not read"), "{}", {
        logs.lines().rfind(|l| l.contains("Lease")).unwrap_or("")
    });
    assert!(r.peak_rss_kib().expect("VmHWM") < 100 * 1024);
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A Lease whose leaseTransitions is already i32::MAX, held by a replica that is gone: the
/// take-over does not wrap to a negative count (which the API server refuses with 422, so that
/// no replica would ever hold it); the count stays at its most and a replica holds the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_at_the_most_transitions_is_still_taken_over() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    let long_ago = "2020-01-01T00:00:00.000000Z";
    d.api.put_object(
        "leases",
        NS,
        serde_json::json!({"metadata": {"name": SECRET}, "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 3,
            "acquireTime": long_ago, "renewTime": long_ago, "leaseTransitions": i32::MAX}}),
    );
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1)], "");
    assert_eq!(d.wait_holder(Some("gone"), 20 * SEC).await, "r1");
    let lease = d.api.object("leases", NS, SECRET).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], i32::MAX);
    d.wait_token("alice", None, 20 * SEC).await;
    let refused = d.api.requests().iter().filter(|q| q.resource == "leases" && q.status == 422).count();
    assert_eq!(refused, 0, "a take-over refused by the API server");
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A standby is ready only when the Secret's data holds a token of a token's form for each
/// customer, with its times: not on the times annotation alone, nor on data that is not a token;
/// and it stops being ready when the token is gone from the Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_only_on_tokens_in_the_secret_not_on_its_annotation() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    // Held by a replica that renews it (as far as this one can tell) for the whole test.
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    d.api.put_object(
        "leases",
        NS,
        serde_json::json!({"metadata": {"name": SECRET}, "spec": {"holderIdentity": "other",
            "leaseDurationSeconds": 3600, "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}),
    );
    let times = an_hour_left("alice");
    /// The Secret's data, the /readyz status wanted, and the case.
    type Case<'a> = (&'a [(&'a str, &'a [u8])], u16, &'a str);
    let cases: [Case; 4] = [
        (&[], 503, "the times annotation and no data"),
        (&[("alice", b"not a token!")], 503, "data that is not a token"),
        (&[("alice", b"q3w8e7r6t5y4u3i2o1p0asdfghjklzxcvbnm")], 200, "a token with its times"),
        (&[], 503, "the token gone again"),
    ];
    let mut r = None;
    for (data, want, case) in cases {
        d.api.put_object("secrets", NS, stored_secret(data, Some(&times)));
        let gets = d.api.requests().iter().filter(|q| q.resource == "secrets" && q.verb == "get").count();
        let r = r.get_or_insert_with(|| d.replica("r1", &[(ALICE.0, ALICE.1)], ""));
        // The second read starts only once the first one's result is on the board.
        wait_gets(&d, "secrets", gets, 2, 20 * SEC).await;
        let (status, body) = r.get("/readyz").await.expect("/readyz answers");
        assert_eq!(status, want, "{case}: {body}");
        if want == 503 {
            assert!(body.contains("alice"), "{case}: {body}");
        }
    }
    let mut r = r.unwrap();
    assert_eq!(d.holder().as_deref(), Some("other"));
    assert_eq!(d.w.server.login_attempts(ALICE.1), 0);
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A replica that read the Secret as a standby, then took the Lease over and cannot log in (a
/// wrong password), is not ready when the Secret held only the times annotation, or data that is
/// not a token: nothing in it was ever a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_log_in_is_not_ready_on_the_annotation_alone() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE, BOB]).await;
    // Held by a replica that is gone: taken over after one lease of standing by.
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    d.api.put_object(
        "leases",
        NS,
        serde_json::json!({"metadata": {"name": SECRET}, "spec": {"holderIdentity": "gone",
            "leaseDurationSeconds": 3, "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}),
    );
    d.w.set_password(ALICE.0, "wrong-password");
    d.w.set_password(BOB.0, "wrong-password");
    let times = format!(
        "{{{},{}}}",
        an_hour_left("alice").trim_matches(['{', '}']),
        an_hour_left("bob").trim_matches(['{', '}'])
    );
    d.api.put_object("secrets", NS, stored_secret(&[("bob", b"forged token!")], Some(&times)));
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "");
    assert_eq!(d.wait_holder(Some("gone"), 20 * SEC).await, "r1");
    for who in [ALICE, BOB] {
        r.wait_metric(&refreshes(who.0, "auth_failure"), 1.0, 20 * SEC).await;
    }
    let (status, body) = r.get("/readyz").await.expect("/readyz answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("alice") && body.contains("bob"), "{body}");
    assert_eq!(d.holder().as_deref(), Some("r1"));
    assert_eq!(r.stop().await.code(), Some(0));
}

/// A holder that lost the API (it cannot renew the Lease, which still names it) answers POST
/// /refresh with 503 saying it cannot write now, not sending the caller to itself as the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_the_api_does_not_name_itself_as_the_holder_to_ask() {
    let d = Deployment::new(DevServerOptions::default(), &[ALICE]).await;
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1)], "");
    d.wait_token("alice", None, 20 * SEC).await;
    r.wait_metric("magento_token_leader", 1.0, 10 * SEC).await;
    d.api.set_unavailable(true);
    r.wait_metric("magento_token_leader", 0.0, 20 * SEC).await;
    // (Its workers stop once the deadline passed; the Lease still names it.)
    let asked = wait_for(20 * SEC, "a 503 to POST /refresh", || async {
        let asked = reqwest::Client::new().post(r.url("/refresh/alice")).send().await.ok()?;
        (asked.status().as_u16() == 503).then_some(())?;
        asked.text().await.ok().filter(|b| b.contains("Lease"))
    })
    .await;
    assert!(asked.contains("this replica (r1) held the Lease shop/magento-tokens but cannot renew it now"), "{asked}");
    assert!(!asked.contains("the holder of the Lease"), "{asked}");
    let status: serde_json::Value = serde_json::from_str(&r.get("/status").await.unwrap().1).unwrap();
    assert_eq!(status["leader"]["leading"], false);
    d.api.set_unavailable(false);
    assert_eq!(r.stop().await.code(), Some(0));
}

/// Central mode without customer passwords (`auth.method: login_as_customer`): only the holder
/// keeps an admin token, one admin login for every customer, and the tokens it mints reach the
/// Secret; a standby sends Magento nothing, and neither the admin's password nor its token shows
/// in any replica's logs, `/status` or `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_without_customer_passwords_make_one_admin_login() {
    let opts = DevServerOptions { login_as_customer: true, two_factor_auth: false, ..Default::default() };
    let d = Deployment::new(opts, &[ALICE, BOB]).await;
    const ADMIN_PW: &str = "Robot-Adm1n-pw";
    d.w.server.add_admin("robot", ADMIN_PW, None).unwrap();
    d.w.server.set_admin_acl("robot", true, true);
    d.w.set_password("robot", ADMIN_PW);
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1)];
    let auth = format!(
        "auth:\n  method: login_as_customer\n  admin:\n    username: robot\n    password_file: {}\n",
        d.w.secret_path("robot").display()
    );
    let replica = |name: &str| {
        d.replica_with(name, |port| {
            let config: String = d
                .config(&customers, "", port)
                .lines()
                .filter(|l| !l.contains("password_file"))
                .map(|l| format!("{l}\n"))
                .collect();
            config + &auth
        })
    };
    let mut replicas = [replica("r1"), replica("r2")];
    let alice = d.wait_token("alice", None, 20 * SEC).await;
    let bob = d.wait_token("bob", None, 20 * SEC).await;
    assert_eq!(d.w.server.check_token(&alice).as_deref(), Some(ALICE.1));
    assert_eq!(d.w.server.check_token(&bob).as_deref(), Some(BOB.1));
    let holder = d.holder().expect("a holder");
    let counts = d.w.server.issuer_counts();
    assert_eq!(counts.admin_tokens, 1, "one admin login for both customers: {counts:?}");
    assert_eq!(counts.login_as_customer_tokens, 2, "{counts:?}");
    assert_eq!(d.w.server.login_attempts(ALICE.1) + d.w.server.login_attempts(BOB.1), 0, "no customer login");
    let mut secrets: Vec<String> = vec![ADMIN_PW.into(), alice, bob, kubeapi::TOKEN.into()];
    secrets.extend(d.w.server.secrets().issuer_tokens());
    for (name, r) in ["r1", "r2"].iter().zip(&replicas) {
        let status: serde_json::Value = serde_json::from_str(&r.get("/status").await.unwrap().1).unwrap();
        if *name == holder {
            assert_eq!(status["issuer"]["method"], "login_as_customer", "{status}");
            assert_eq!(status["issuer"]["state"], "fresh", "{status}");
            assert_eq!(
                r.metric("magento_token_issuer_refresh_total{method=\"login_as_customer\",result=\"success\"}").await,
                Some(1.0)
            );
        } else {
            assert!(status.get("issuer").is_none(), "a standby keeps no admin token: {status}");
        }
        r.assert_secrets_hidden(&secrets).await;
    }
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
    println!(
        "central mode, 2 replicas, 2 customers without passwords: {} admin login, {} tokens minted",
        counts.admin_tokens, counts.login_as_customer_tokens
    );
}

/// 60 customers over 3 Secrets (`customers[].secret`), two replicas: each key lives in its own
/// Secret only, and each Secret is updated at most once a second with every change made
/// meanwhile (`WRITE_EVERY`), so the writes stay well below the refreshes; the standby is ready
/// from all three Secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_customers_over_three_secrets_are_written_in_batches_each_in_its_secret() {
    const SECRETS: [&str; 3] = ["shop-a-tokens", "shop-b-tokens", "shop-c-tokens"];
    let opts = DevServerOptions { token_lifetime: 8 * SEC, ..Default::default() };
    let mut rules = KubeApi::role_for(SECRET);
    for secret in SECRETS {
        rules.push(Rule {
            verbs: vec!["get", "update", "patch"],
            resource: "secrets",
            names: vec![secret.to_string()],
        });
    }
    let d = Deployment::with_role(opts, &[], rules).await;
    let names: Vec<String> = (0..60).map(|i| format!("c{i:02}")).collect();
    let mut customers = String::new();
    for (i, name) in names.iter().enumerate() {
        let email = format!("{name}@example.com");
        let password = format!("{name}-Pa55-word");
        d.w.server.add_customer(&email, &password);
        d.w.set_password(name, &password);
        customers.push_str(&format!(
            "  - name: {name}\n    username: {email}\n    password_file: {}\n    secret: {}\n",
            d.w.secret_path(name).display(),
            SECRETS[i % 3]
        ));
    }
    let refresh = "  before_expiry: 4s\n  jitter: 2s\n  max_concurrent_logins: 8\n";
    let replica = |name: &str| d.replica_with(name, |port| d.config(&[], refresh, port) + &customers);
    let mut replicas = [replica("r1"), replica("r2")];
    let started = Instant::now();
    let in_secret = |secret: &str| d.api.secret_data(NS, secret).unwrap_or_default();
    wait_for(30 * SEC, "every customer's token in its Secret", || async {
        let held: usize = SECRETS.iter().map(|s| in_secret(s).len()).sum();
        (held == 60).then_some(())
    })
    .await;
    for r in &replicas {
        r.wait_ready(15 * SEC).await;
    }
    // Three more refreshes of every customer (8 s tokens, renewed 2 to 4 s before their end).
    tokio::time::sleep(16 * SEC).await;
    for (i, name) in names.iter().enumerate() {
        for (j, secret) in SECRETS.iter().enumerate() {
            assert_eq!(in_secret(secret).contains_key(name), i % 3 == j, "{name} in {secret}");
        }
    }
    assert!(d.api.secret_data(NS, SECRET).is_none_or(|data| data.is_empty()), "the default Secret holds no customer");
    for r in &mut replicas {
        assert_eq!(r.stop().await.code(), Some(0));
    }
    let elapsed = started.elapsed();
    let logins: usize = names.iter().map(|n| d.w.server.login_attempts(&format!("{n}@example.com"))).sum();
    let writes: Vec<_> = d
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "secrets" && matches!(r.verb.as_str(), "update" | "create") && r.status < 300)
        .collect();
    let (mut most_in_a_second, mut closest) = (0, Duration::MAX);
    for secret in SECRETS {
        let at: Vec<Instant> = writes.iter().filter(|r| r.name.as_deref() == Some(secret)).map(|r| r.at).collect();
        for (i, t) in at.iter().enumerate() {
            let within = at[i..].iter().take_while(|u| u.duration_since(*t) < SEC).count();
            most_in_a_second = most_in_a_second.max(within);
            if let Some(next) = at.get(i + 1) {
                closest = closest.min(next.duration_since(*t));
            }
        }
    }
    // One update a second per Secret, timed from the start of the one before: its request may
    // arrive a little later than the next one's does after it, so two can share a second.
    assert!(most_in_a_second <= 2, "{most_in_a_second} updates of one Secret within a second");
    assert!(logins >= 180, "every customer refreshed at least three times: {logins}");
    assert!(writes.len() * 2 < logins, "{} writes for {logins} refreshes", writes.len());
    println!(
        "60 customers over 3 Secrets, 2 replicas, {:.0} s: {logins} refreshes written in {} Secret writes (the most any Secret took in one second: {most_in_a_second}; the closest two writes of one Secret arrived {} ms apart); every key in its own Secret only",
        elapsed.as_secs_f64(),
        writes.len(),
        closest.as_millis()
    );
}

/// A reload that moves a customer to another Secret: its token goes there (a login: the new
/// Secret holds none), and its key leaves the old Secret only once the new one holds it; the
/// other customer stays where it was, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_moved_to_another_secret_leaves_the_old_one_after_the_new_one_holds_it() {
    const OTHER: &str = "shop-b-tokens";
    let mut rules = KubeApi::role_for(SECRET);
    rules.push(Rule { verbs: vec!["get", "update", "patch"], resource: "secrets", names: vec![OTHER.to_string()] });
    let d = Deployment::with_role(DevServerOptions::default(), &[ALICE, BOB], rules).await;
    let mut r = d.replica("r1", &[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "");
    // The file `replica` wrote, to edit for the reload.
    let path = d.w.dir.path().join("r1.yaml");
    let before = std::fs::read_to_string(&path).unwrap();
    let alice = d.wait_token("alice", None, 20 * SEC).await;
    let bob = d.wait_token("bob", None, 20 * SEC).await;
    // Alice moves to the other Secret.
    let after = before.replacen(
        &format!("    password_file: {}\n", d.w.secret_path("alice").display()),
        &format!("    password_file: {}\n    secret: {OTHER}\n", d.w.secret_path("alice").display()),
        1,
    );
    assert_ne!(after, before);
    std::fs::write(&path, after).unwrap();
    r.signal("HUP");
    let moved = wait_for(20 * SEC, "alice's token in the other Secret", || async {
        d.api.secret_data(NS, OTHER)?.get("alice").map(|t| String::from_utf8(t.clone()).unwrap())
    })
    .await;
    assert_ne!(moved, alice, "a new login: the other Secret held no token of alice's");
    assert_eq!(d.w.server.check_token(&moved).as_deref(), Some(ALICE.1));
    wait_for(10 * SEC, "alice's key gone from the old Secret", || async {
        (!d.api.secret_data(NS, SECRET)?.contains_key("alice")).then_some(())
    })
    .await;
    // The key left the old Secret only after the new one held it.
    let requests = d.api.requests();
    let first_in_other = requests
        .iter()
        .position(|q| {
            q.resource == "secrets"
                && q.name.as_deref() == Some(OTHER)
                && q.status < 300
                && matches!(q.verb.as_str(), "create" | "update")
        })
        .expect("a write of the other Secret");
    let removal = requests
        .iter()
        .rposition(|q| {
            q.resource == "secrets" && q.name.as_deref() == Some(SECRET) && q.status < 300 && q.verb == "update"
        })
        .expect("an update of the old Secret");
    assert!(first_in_other < removal, "the old Secret lost the key before the new one held it");
    assert_eq!(d.token("bob").as_deref(), Some(bob.as_str()), "bob stays, untouched");
    assert!(!d.api.secret_data(NS, OTHER).unwrap().contains_key("bob"));
    assert_eq!(r.stop().await.code(), Some(0));
}
