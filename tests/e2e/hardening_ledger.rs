//! The 401 ledger beside the token files (`.<file>.auth`) as others may leave it: values past any
//! clock, counts that would wrap, records that do not parse, and `forget-failures` pointed at a
//! record that is not the customer's. None of them crashes the daemon or hands Magento a fresh
//! budget: Magento's count (the dev server's, on a store without cron) is read at the end.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;
use magento_devserver::DevServerOptions;

const SEC: Duration = Duration::from_secs(1);
const CAROL: (&str, &str, &str) = ("carol", "carol@example.com", "carol-0ther-Secret");

/// Short waits after a 401, on a store whose count only a success clears.
const SCALED: &str =
    "  max_auth_failures: 3\n  auth_failure_delays: [1s]\n  lockout_window: 1s\n  auth_failure_pause: 1100ms\n";

fn no_cron() -> DevServerOptions {
    DevServerOptions { cron: false, lock_timeout: SEC, ..Default::default() }
}

fn record(username: &str, in_a_row: u64, chain: u64, last_failure: i64) -> String {
    format!(r#"{{"username":"{username}","in_a_row":{in_a_row},"chain":{chain},"last_failure":{last_failure}}}"#)
}

fn ledger_of(w: &World, file: &str) -> std::path::PathBuf {
    w.tokens().join(format!(".{file}.auth"))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `"last_failure": i64::MAX` panicked at every start (`overflow when adding duration to
/// instant`); ten years ahead held the customer back for ten years. Either is a failure just
/// now: the right password is tried after the first short delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_recorded_past_any_clock_is_one_just_now_and_crashes_nothing() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    std::fs::write(ledger_of(&w, "alice"), record(ALICE.1, 1, 1, i64::MAX)).unwrap();
    let decade = unix_now() + 10 * 365 * 86_400;
    std::fs::write(ledger_of(&w, "bob"), record(BOB.1, 1, 1, decade)).unwrap();
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], SCALED, ""));
    let mut d = w.start();
    for (name, email, _) in [ALICE, BOB] {
        let token = w.wait_token(name, None, 15 * SEC).await;
        assert_eq!(w.server.check_token(&token).as_deref(), Some(email));
    }
    assert_eq!(d.get("/healthz").await.map(|(code, _)| code), Some(200));
    assert!(d.logs().contains("remembering the 401s recorded before this start"), "{}", d.logs());
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A ledger that does not parse, and one whose count would wrap a u32 (`4294967295 + 1` is 0):
/// each is the budget spent for its own customer, who sends nothing (Magento's count stays at
/// the 3 an earlier run caused), with a reason that names the ledger; the customer beside them
/// logs in as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_ledger_is_the_budget_spent_for_its_customer_alone() {
    let w = World::new(no_cron()).await;
    for (name, email, password) in [ALICE, BOB, CAROL] {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    // An earlier run sent a wrong password three times for alice and carol, then its ledgers
    // were damaged; their passwords are still wrong.
    for (name, email, _) in [ALICE, CAROL] {
        w.set_password(name, "still-wrong");
        for _ in 0..3 {
            assert_eq!(w.login_answer(email, "still-wrong").await.0, 401);
        }
    }
    assert_eq!(w.server.failure_count(ALICE.1), 3);
    std::fs::write(ledger_of(&w, "alice"), b"{\"username\":\"alice@exa").unwrap();
    std::fs::write(ledger_of(&w, "carol"), record(CAROL.1, 3, u32::MAX as u64, unix_now() - 60)).unwrap();
    let customers = [(ALICE.0, ALICE.1), (BOB.0, BOB.1), (CAROL.0, CAROL.1)];
    w.write_config(&w.config_text(&customers, SCALED, ""));
    let mut d = w.start();

    let token = w.wait_token("bob", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(BOB.1), "the customer beside them is unaffected");
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 10 * SEC).await;
    d.wait_metric(&series("magento_token_held_back", "carol"), 1.0, 10 * SEC).await;
    // Several of the daemon's short delays: nothing is sent for either.
    tokio::time::sleep(5 * SEC).await;
    for email in [ALICE.1, CAROL.1] {
        assert_eq!(w.server.login_attempts(email), 3, "{email}: only the earlier run's logins");
        assert_eq!(w.server.max_failure_count(email), 3, "{email}: Magento's count");
    }
    let alice = d.status_of("alice").await;
    assert_eq!(alice["state"], "held_back", "{alice}");
    let said = alice["last_error"]["message"].as_str().unwrap_or_default();
    assert!(said.contains(".alice.auth") && said.contains("cannot be read"), "{alice}");
    assert!(said.contains("forget-failures --config FILE alice"), "{alice}");
    assert!(d.logs().contains("counted as the lockout budget spent"), "the log says it at start");
    assert_eq!(d.status_of("carol").await["state"], "held_back");
    // The damaged ledger is left as it was, for the operator to look at.
    assert_eq!(std::fs::read(ledger_of(&w, "alice")).unwrap(), b"{\"username\":\"alice@exa");

    // The operator checks Magento's count, resets it, fixes the password and says so: the
    // damaged record is replaced and the customer logs in.
    w.server.reset_failures(ALICE.1);
    w.set_password("alice", ALICE.2);
    let (code, out, err) = run_to_end(&["forget-failures", "--config", w.config_path().to_str().unwrap(), "alice"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("it replaced a record that could not be read"), "{out}");
    let token = w.wait_token("alice", None, 10 * SEC).await;
    assert_eq!(w.server.check_token(&token).as_deref(), Some(ALICE.1));
    eprintln!("damaged ledgers: Magento's highest count {}", w.server.max_failure_count(CAROL.1));
    assert_eq!(d.stop().await.code(), Some(0));
}

/// `forget-failures` run with a configuration that gives alice another username replaced the
/// ledger of the username that failed: after a restart the daemon sent the wrong password again
/// and Magento's count went from 3 to 6. It now leaves that ledger alone and exits 1, as it does
/// when nothing is recorded at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_failures_never_replaces_another_usernames_ledger() {
    let w = World::new(no_cron()).await;
    w.server.add_customer(ALICE.1, ALICE.2);
    w.set_password("alice", "not-the-password");
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1)], SCALED, ""));
    let mut d = w.start();
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 20 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
    assert_eq!(w.server.failure_count(ALICE.1), 3);
    let recorded = std::fs::read(ledger_of(&w, "alice")).unwrap();

    // Another configuration, where alice logs in as someone else.
    let other = w.dir.path().join("other.yaml");
    std::fs::write(&other, w.config_text(&[(ALICE.0, "alice.new@example.com")], SCALED, "")).unwrap();
    let (code, out, err) = run_to_end(&["forget-failures", "--config", other.to_str().unwrap(), "alice"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("records another username's failed logins"), "{err}");
    assert!(!out.contains("forgotten"), "{out}");
    assert_eq!(std::fs::read(ledger_of(&w, "alice")).unwrap(), recorded, "the ledger is untouched");
    assert!(!err.contains(ALICE.1) && !err.contains("not-the-password"), "{err}");

    // The daemon started again with the real configuration still holds alice back.
    let mut d = w.start();
    d.wait_metric(&series("magento_token_held_back", "alice"), 1.0, 10 * SEC).await;
    tokio::time::sleep(4 * SEC).await;
    let highest = w.server.max_failure_count(ALICE.1);
    eprintln!("forget-failures with another username: Magento's highest count {highest}");
    assert_eq!(highest, 3, "Magento's count after the restart");
    assert_eq!(w.server.login_attempts(ALICE.1), 3);
    assert_eq!(d.stop().await.code(), Some(0));

    // Nothing recorded for a customer: nothing forgotten, exit 1.
    std::fs::remove_file(ledger_of(&w, "alice")).unwrap();
    let (code, out, err) = run_to_end(&["forget-failures", "--config", w.config_path().to_str().unwrap(), "alice"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("nothing to forget"), "{err}");
    assert!(!ledger_of(&w, "alice").exists(), "nothing written");
}
