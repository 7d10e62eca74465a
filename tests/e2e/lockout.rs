//! Magento's brute-force lock on real stores: a store whose cron does not run keeps counting an
//! expired failure row, so only a success clears it (`refresh.lockout_reset: success`, the
//! default), and replicas of one Deployment share that one count. Windows are scaled down to a
//! second; each test runs for ten of them and reads the dev server's count.

use std::time::Duration;

use crate::common::*;
use magento_devserver::DevServerOptions;

const SEC: Duration = Duration::from_secs(1);

/// Magento's window and the daemon's delays, scaled from 30 minutes (and 1, 5, 31 minutes).
const SCALED: &str = "  max_auth_failures: 3\n  auth_failure_delays: [100ms, 200ms]\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";

fn no_cron() -> DevServerOptions {
    DevServerOptions { cron: false, lock_timeout: SEC, ..Default::default() }
}

/// The worst count Magento held while `daemons` ran for `span`, checking the lock on the way.
async fn watch_count(w: &World, span: Duration) -> u32 {
    let start = std::time::Instant::now();
    while start.elapsed() < span {
        assert!(!w.server.is_locked(ALICE.1), "Magento locked the account");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.server.max_failure_count(ALICE.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cron_a_wrong_password_stops_short_of_the_lock_and_a_fix_is_tried_at_once() {
    let w = World::new(no_cron()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", "not-the-password");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], SCALED, ""));
    let mut d = w.start();

    // Ten windows: the count never expires on this store, and the daemon never counts on it.
    let highest = watch_count(&w, 10 * SEC).await;
    assert_eq!(highest, 3, "Magento's count without cron");
    assert_eq!(w.server.failure_count(ALICE.1), 3, "still counted after ten windows");
    assert_eq!(w.server.login_attempts(ALICE.1), 3);
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 5 * SEC).await;
    let status = d.status_of("alice").await;
    assert_eq!(status["state"], "held_back", "{status}");
    assert_eq!(status["next_refresh_at"], serde_json::Value::Null, "{status}");
    let said = status["last_error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains("fix the password") && said.contains("forget-failures"), "{status}");
    assert!(d.logs().contains("only a successful login clears"), "the log says what to do");

    // The Secret is fixed: tried within the password poll (2 s), with the try kept in reserve.
    std::fs::write(w.secret_path("alice"), format!("{}\n", ALICE.2)).unwrap();
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert_eq!(w.server.failure_count(ALICE.1), 0, "a success clears Magento's row");
    d.wait_metric(&series("magento_token_held_back", "alice"), 0.0, 5 * SEC).await;
    d.assert_secrets_hidden(&[ALICE.2.to_string(), "not-the-password".into(), token]).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A daemon on a store without cron that has spent the lockout budget: three 401s with one
/// wrong password, then the try kept in reserve spent on a second wrong one.
async fn spend_the_budget() -> (World, Daemon) {
    let w = World::new(no_cron()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", "first-typo");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], SCALED, ""));
    let d = w.start();
    wait_for(10 * SEC, "three 401s", || async { (w.server.login_attempts(ALICE.1) == 3).then_some(()) }).await;
    std::fs::write(w.secret_path("alice"), "second-typo\n").unwrap();
    wait_for(10 * SEC, "the reserved try", || async { (w.server.login_attempts(ALICE.1) == 4).then_some(()) }).await;
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 5 * SEC).await;
    (w, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_wrong_passwords_in_a_row_spend_the_budget_and_nothing_more() {
    let (w, mut d) = spend_the_budget().await;
    // Then nothing is sent at all, whatever the password.
    std::fs::write(w.secret_path("alice"), "third-typo\n").unwrap();
    let highest = watch_count(&w, 6 * SEC).await;
    assert_eq!(highest, 4, "two below Magento's lock at six");
    assert_eq!(w.server.login_attempts(ALICE.1), 4);
    let status = d.status_of("alice").await;
    assert_eq!(status["state"], "held_back", "{status}");
    assert!(status["last_error"]["message"].as_str().unwrap_or_default().contains("budget is spent"), "{status}");
    assert_eq!(d.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_a_wrong_password_stay_clear_of_the_lock() {
    let w = World::new(no_cron()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", "not-the-password");
    // Three pods, each with its own sidecar, token directory (emptyDir) and ledger.
    let refresh =
        "  max_auth_failures: 1\n  auth_failure_delays: [100ms]\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";
    let mut replicas = Vec::new();
    for i in 0..3 {
        let dir = w.dir.path().join(format!("pod{i}"));
        std::fs::create_dir(&dir).unwrap();
        let port = free_port();
        let text = w
            .config_text(&[(ALICE.0, ALICE.1)], refresh, "")
            .replace(&w.tokens().display().to_string(), &dir.display().to_string())
            .replace(&format!("127.0.0.1:{}", w.admin_port), &format!("127.0.0.1:{port}"));
        let config = dir.join("config.yaml");
        std::fs::write(&config, text).unwrap();
        let d =
            Daemon::spawn(&["run", "--config", config.to_str().unwrap()], &dir.join("daemon.log"), port).guarded_by(&w);
        replicas.push((dir, d));
    }
    let highest = watch_count(&w, 10 * SEC).await;
    assert!(highest <= 4, "three replicas took Magento's count to {highest}");
    assert_eq!(w.server.login_attempts(ALICE.1), 3, "one 401 each");

    std::fs::write(w.secret_path("alice"), format!("{}\n", ALICE.2)).unwrap();
    for (dir, _) in &replicas {
        let token = wait_for(10 * SEC, "every replica's token", || async {
            std::fs::read_to_string(dir.join("alice")).ok().filter(|t| !t.is_empty())
        })
        .await;
        assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    }
    assert!(w.server.max_failure_count(ALICE.1) <= 4);
    for (_, d) in &mut replicas {
        assert_eq!(d.stop().await.code(), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_failures_lets_a_held_back_customer_try_again_without_a_restart() {
    let (w, mut d) = spend_the_budget().await;
    // The operator resets Magento's count (here: the dev server's row) and fixes the password,
    // then tells the daemon.
    w.server.reset_failures(ALICE.1);
    std::fs::write(w.secret_path("alice"), format!("{}\n", ALICE.2)).unwrap();
    tokio::time::sleep(3 * SEC).await;
    assert_eq!(w.server.login_attempts(ALICE.1), 4, "held back until told");
    let config = w.config_path();
    let (code, out, err) = run_to_end(&["forget-failures", "--config", config.to_str().unwrap(), "alice"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alice: the daemon's count of failed logins is forgotten"), "{out}");
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    assert!(d.logs().contains("forget-failures"));
    let (code, _, err) = run_to_end(&["forget-failures", "--config", config.to_str().unwrap(), "nobody"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no customer named \"nobody\""), "{err}");
    assert_eq!(d.stop().await.code(), Some(0));
}
