//! Issue 12 (performance), end to end: what `once` does to save system calls (the ledgers it
//! lists once instead of looking for each, the directory opened once, one sync for the batch)
//! must leave what a user sees as it was: every file, no ledger after a success, none made up.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;

async fn once(w: &World) -> (i32, String, String) {
    let config = w.config_path().to_str().unwrap().to_owned();
    tokio::task::spawn_blocking(move || run_to_end(&["once", "--config", &config, "--timeout", "20s"])).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_removes_the_ledgers_it_finds_after_a_success_and_makes_none_up() {
    let w = World::with_customers(&[ALICE, BOB]).await;
    w.write_config(&w.config_text(&[(ALICE.0, ALICE.1), (BOB.0, BOB.1)], "", ""));
    // A 401 recorded two hours ago by an earlier pass: long enough ago to try again.
    let two_hours_ago = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 7200;
    let ledger = format!(r#"{{"username":"{}","in_a_row":1,"chain":1,"last_failure":{two_hours_ago}}}"#, ALICE.1);
    std::fs::write(w.token_path(".alice.auth"), ledger).unwrap();

    let (code, _, err) = once(&w).await;
    assert_eq!(code, 0, "{err}");
    for (name, email, _) in [ALICE, BOB] {
        assert_eq!(w.server.check_token(&w.read_token(name).unwrap()).as_deref(), Some(email), "{name}");
        assert_eq!(mode_of(&w.token_path(name)), 0o600, "{name}");
    }
    assert!(!w.token_path(".alice.auth").exists(), "a success removes the ledger found at the start");
    assert_eq!(w.stray_files(&["alice", "bob"]), Vec::<String>::new(), "no ledger, no temporary file");
    assert_eq!(w.server.login_attempts(ALICE.1), 1);
    assert_eq!(w.server.login_attempts(BOB.1), 1);

    // A 401 recorded ten seconds ago is found and honoured: not tried, exit 1.
    let just_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 10;
    let ledger = format!(r#"{{"username":"{}","in_a_row":1,"chain":1,"last_failure":{just_now}}}"#, BOB.1);
    std::fs::write(w.token_path(".bob.auth"), ledger).unwrap();
    let (code, _, err) = once(&w).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("held_back"), "{err}");
    assert_eq!(w.server.login_attempts(BOB.1), 1, "no login while held back");
    assert!(w.token_path(".bob.auth").exists(), "the ledger stays");
    assert_eq!(w.server.login_attempts(ALICE.1), 2);
}
