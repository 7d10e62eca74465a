//! The record of a username's recent 401s that outlives the process: the heart of the lockout
//! promise across restarts, crash loops, `once` retried by the kubelet and Lease failovers.
//!
//! One [`Record`] shape serves both stores: the file `.<file>.auth` beside a token file (read and
//! written here, through [`sink`]), and one entry per key of the Secret's ledger annotation
//! ([`crate::cluster::tokens`]). It holds counts and a time, never a password.
//!
//! A record is written by this daemon, but read from places others can write to (a directory
//! others may write, an annotation anyone with `update` on the Secret may edit), so what is read
//! is judged before it is believed ([`judge`]):
//! - every number is clamped to what the policy can use: a count to the lock's threshold, a time
//!   of failure to now (a failure "in the future" counts as one that just happened);
//! - a record that cannot be read counts as the worst case for its customer alone: the lockout
//!   budget spent, just now ([`AuthState::spent`]), with the reason kept for `/status`. Never as
//!   zero: a damaged record must not hand Magento a fresh budget.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::RefreshSettings;
use crate::fs::{self, Owner, Perms, ReadError};
use crate::schedule::AuthState;
use crate::sink;

/// A username's recent 401s, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub username: String,
    pub in_a_row: u32,
    pub chain: u32,
    /// Unix seconds of the last 401.
    pub last_failure: i64,
    /// An operator reset Magento's count and told the daemon to forget its own
    /// (`forget-failures`): the counts above no longer hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forgotten: bool,
}

impl Record {
    /// What the account knows after a 401 (or a login booked as one), for `username`.
    pub fn of(username: &str, auth: &AuthState) -> Record {
        Record {
            username: username.to_owned(),
            in_a_row: auth.in_a_row,
            chain: auth.chain,
            last_failure: auth.last_failure.map_or(0, crate::clock::unix_secs),
            forgotten: false,
        }
    }

    /// An operator's `forget-failures` for `username`.
    pub fn forgotten(username: &str) -> Record {
        Record { forgotten: true, ..Record::cleared(username) }
    }

    /// No failure of `username` recorded: what a cleared entry holds where an entry must stay.
    pub fn cleared(username: &str) -> Record {
        Record { username: username.to_owned(), in_a_row: 0, chain: 0, last_failure: 0, forgotten: false }
    }

    /// Whether it counts no failure (and says nothing to forget).
    pub fn is_empty(&self) -> bool {
        self.chain == 0 && self.in_a_row == 0 && !self.forgotten
    }

    /// Whether it is `username`'s: Magento looks usernames up without regard to case, so one
    /// count covers every spelling.
    pub fn is_of(&self, username: &str) -> bool {
        self.username.to_lowercase() == username.to_lowercase()
    }
}

/// A stored record as read: one that parsed, or why it did not.
pub type Read = Result<Record, String>;

/// Reads a record from its stored bytes; an error says what is wrong, never what it holds.
pub fn parse(bytes: &[u8]) -> Read {
    serde_json::from_slice(bytes).map_err(|e| format!("not a record of 401s ({})", crate::shown::Malformed::new(&e)))
}

/// What a stored record means for one username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing to count: no record of this username (another username's is not its).
    Nothing,
    /// An operator said to forget its failures (`forget-failures`).
    Forgotten,
    /// 401s to count, clamped to what the policy can use.
    Failures(AuthState),
}

/// Judges what was read for `username` at `now`: see the module's notes. `where_` names the
/// record for the reason shown when it cannot be read (a path, or the Secret's key).
pub fn judge(read: Read, username: &str, where_: &str, now: SystemTime, r: &RefreshSettings) -> Recorded {
    let record = match read {
        Ok(record) => record,
        Err(why) => return Recorded::Failures(AuthState::spent(now, r, format!("{where_}: {why}"))),
    };
    if !record.is_of(username) {
        return Recorded::Nothing;
    }
    if record.forgotten {
        return Recorded::Forgotten;
    }
    if record.is_empty() {
        return Recorded::Nothing;
    }
    let Some(last_failure) = u64::try_from(record.last_failure).ok().filter(|s| *s > 0) else {
        let why = format!("{where_}: the time of the last 401 ({}) is not a time", record.last_failure);
        return Recorded::Failures(AuthState::spent(now, r, why));
    };
    // Far in the future, or just ahead (another replica's clock): a failure just now.
    let last_failure = UNIX_EPOCH.checked_add(Duration::from_secs(last_failure)).filter(|t| *t <= now).unwrap_or(now);
    Recorded::Failures(AuthState {
        in_a_row: record.in_a_row.min(r.max_auth_failures.max(1)),
        chain: record.chain.min(r.lockout_threshold.max(1)),
        last_failure: Some(last_failure),
        final_refusal: false,
        unreadable: None,
    })
}

/// What `forget-failures` makes of what is stored for a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forget {
    /// Its failures are recorded, or a record that cannot be read is there: replaced by a
    /// record that they are forgotten.
    Forget { unreadable: bool },
    /// Already forgotten, not yet taken by the daemon: nothing to do.
    Already,
    /// No failure of this username is recorded: nothing to forget.
    Nothing,
    /// The record is another username's (the customer's username changed, or two customers
    /// share a file name): left alone, since forgetting it would reset that username's budget.
    Another,
}

/// What `forget-failures` does with `found` (what is stored for a customer) for `username`.
pub fn forget(found: Option<Read>, username: &str) -> Forget {
    match found {
        None => Forget::Nothing,
        Some(Err(_)) => Forget::Forget { unreadable: true },
        Some(Ok(record)) if !record.is_of(username) => Forget::Another,
        Some(Ok(record)) if record.forgotten => Forget::Already,
        Some(Ok(record)) if record.is_empty() => Forget::Nothing,
        Some(Ok(_)) => Forget::Forget { unreadable: false },
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger beside a token file

/// The most read of a ledger file: a username and three numbers.
pub const MAX_LEDGER_FILE: usize = 4 * 1024;

/// `.<file>.auth` beside the token file (a name starting with `.`: never a token file).
pub fn ledger_path(token_path: &Path) -> PathBuf {
    let name = token_path.file_name().and_then(|n| n.to_str()).unwrap_or("token");
    token_path.with_file_name(format!(".{name}.auth"))
}

/// The ledger beside this token file, as read: `None` when there is none. Like the token file,
/// a ledger that is a symbolic link or not a regular file is not one of ours: ignored, with a
/// warning (the next write replaces it). One that is a regular file but cannot be read (too
/// large, not readable by this user, not a record) is returned as such, to count as the worst
/// case.
pub fn read_ledger(token_path: &Path) -> Option<Read> {
    let path = ledger_path(token_path);
    match fs::read_regular(&path, MAX_LEDGER_FILE, false) {
        Ok((bytes, _)) => Some(parse(&bytes)),
        Err(e) if e.is_not_found() => None,
        // Ours, but it cannot be read (too large, permission denied, an I/O error): it may hold
        // failures, so it counts as the worst case.
        Err(e @ (ReadError::TooLarge(_) | ReadError::Io(_))) => Some(Err(format!("it {e}"))),
        // A FIFO, a device or a symbolic link is not a ledger this daemon wrote.
        Err(e) => {
            warn!("{} {e}: ignored as a record of earlier 401s", path.display());
            None
        }
    }
}

/// Records `record` as the ledger beside this token file, a file of `owner` (the token
/// file's), mode 0600.
pub fn write_ledger(token_path: &Path, owner: Owner, record: &Record) -> io::Result<()> {
    let bytes = serde_json::to_vec(record).expect("a ledger always serializes");
    sink::write_atomic(&ledger_path(token_path), Perms::private(owner), &bytes, sink::Durability::Now)
}

pub fn remove_ledger(token_path: &Path) {
    let _ = std::fs::remove_file(ledger_path(token_path));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{lockout_ceiling, AuthWait};

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn text(json: &str) -> Recorded {
        judge(parse(json.as_bytes()), "alice@example.com", ".alice.auth", now(), &RefreshSettings::default())
    }

    fn failures(recorded: Recorded) -> AuthState {
        match recorded {
            Recorded::Failures(auth) => auth,
            other => panic!("expected failures, got {other:?}"),
        }
    }

    #[test]
    fn a_record_of_this_username_is_taken_as_written() {
        let last = NOW - 60;
        let auth = failures(text(&format!(
            r#"{{"username":"alice@example.com","in_a_row":2,"chain":2,"last_failure":{last}}}"#
        )));
        assert_eq!((auth.in_a_row, auth.chain), (2, 2));
        assert_eq!(auth.last_failure, Some(UNIX_EPOCH + Duration::from_secs(last)));
        assert_eq!(auth.unreadable, None);
    }

    #[test]
    fn another_usernames_record_is_nothing_and_case_does_not_make_another_username() {
        let other = r#"{"username":"bob@example.com","in_a_row":2,"chain":2,"last_failure":1799999000}"#;
        assert_eq!(text(other), Recorded::Nothing);
        let shouted = r#"{"username":"ALICE@Example.com","in_a_row":2,"chain":2,"last_failure":1799999000}"#;
        assert_eq!(failures(text(shouted)).chain, 2);
        let forgotten = r#"{"username":"alice@example.com","in_a_row":0,"chain":0,"last_failure":0,"forgotten":true}"#;
        assert_eq!(text(forgotten), Recorded::Forgotten);
    }

    #[test]
    fn a_failure_in_the_future_is_one_that_just_happened() {
        for last in [i64::MAX, NOW as i64 + 10 * 365 * 86_400, NOW as i64 + 5] {
            let auth = failures(text(&format!(
                r#"{{"username":"alice@example.com","in_a_row":1,"chain":1,"last_failure":{last}}}"#
            )));
            assert_eq!(auth.last_failure, Some(now()), "{last}");
            // The policy computes with it without overflowing, for either reset.
            let r = RefreshSettings::default();
            assert_eq!(auth.wait(true, now(), &r), AuthWait::Backoff(now() + r.auth_failure_delays[0]));
            let window = RefreshSettings { lockout_reset: crate::config::LockoutReset::Window, ..r };
            auth.wait(true, now(), &window);
        }
    }

    #[test]
    fn counts_past_the_lock_are_clamped_and_never_wrap() {
        let r = RefreshSettings::default();
        let auth = failures(text(&format!(
            r#"{{"username":"alice@example.com","in_a_row":{m},"chain":{m},"last_failure":{t}}}"#,
            m = u32::MAX,
            t = NOW - 60
        )));
        assert_eq!((auth.in_a_row, auth.chain), (r.max_auth_failures, r.lockout_threshold));
        assert_eq!(auth.wait(true, now(), &r), AuthWait::HeldBack);
        assert_eq!(auth.wait(false, now(), &r), AuthWait::HeldBack, "a changed password too: no budget is left");
    }

    #[test]
    fn a_record_that_cannot_be_read_is_the_budget_spent_just_now_with_the_reason() {
        let r = RefreshSettings::default();
        for bad in [
            "not json",
            r#"{"username":"alice@example.com","in_a_row":1,"chain":4294967296,"last_failure":1799999000}"#,
            r#"{"username":"alice@example.com","in_a_row":-1,"chain":1,"last_failure":1799999000}"#,
            r#"{"username":"alice@example.com","in_a_row":1,"chain":1,"last_failure":"yesterday"}"#,
            r#"{"username":"alice@example.com","in_a_row":1,"chain":1,"last_failure":-5}"#,
            r#"{"username":"alice@example.com","in_a_row":1,"chain":1,"last_failure":0}"#,
            r#"{"in_a_row":1,"chain":1,"last_failure":1799999000}"#,
            "",
        ] {
            let auth = failures(text(bad));
            assert_eq!(auth.chain, lockout_ceiling(&r), "{bad}");
            assert_eq!(auth.last_failure, Some(now()), "{bad}");
            let why = auth.unreadable.clone().unwrap_or_default();
            assert!(why.starts_with(".alice.auth: "), "{bad}: {why}");
            assert_eq!(auth.wait(true, now(), &r), AuthWait::HeldBack, "{bad}");
            assert_eq!(auth.wait(false, now(), &r), AuthWait::HeldBack, "{bad}");
        }
    }

    #[test]
    fn forget_failures_replaces_only_this_usernames_record() {
        let record = |username: &str, chain| Record {
            username: username.into(),
            in_a_row: chain,
            chain,
            last_failure: 1,
            forgotten: false,
        };
        let me = "alice@example.com";
        assert_eq!(forget(Some(Ok(record(me, 3))), me), Forget::Forget { unreadable: false });
        assert_eq!(forget(Some(Ok(record("ALICE@example.com", 3))), me), Forget::Forget { unreadable: false });
        assert_eq!(forget(Some(Ok(record("other@example.com", 3))), me), Forget::Another);
        assert_eq!(forget(Some(Err("not a record".into())), me), Forget::Forget { unreadable: true });
        assert_eq!(forget(Some(Ok(Record::forgotten(me))), me), Forget::Already);
        assert_eq!(forget(Some(Ok(record(me, 0))), me), Forget::Nothing);
        assert_eq!(forget(None, me), Forget::Nothing);
    }

    #[test]
    fn records_written_are_read_back_alike() {
        let auth = AuthState {
            in_a_row: 2,
            chain: 3,
            last_failure: Some(now() - Duration::from_secs(30)),
            final_refusal: false,
            unreadable: None,
        };
        let bytes = serde_json::to_vec(&Record::of("alice@example.com", &auth)).unwrap();
        assert_eq!(failures(text(std::str::from_utf8(&bytes).unwrap())), auth);
        let bytes = serde_json::to_vec(&Record::forgotten("alice@example.com")).unwrap();
        assert_eq!(text(std::str::from_utf8(&bytes).unwrap()), Recorded::Forgotten);
    }

    #[test]
    fn the_ledger_file_round_trips_and_one_that_cannot_be_read_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        assert_eq!(read_ledger(&path), None);
        let record =
            Record { username: "a@x".into(), in_a_row: 2, chain: 3, last_failure: 1_700_000_000, forgotten: false };
        write_ledger(&path, Owner::default(), &record).unwrap();
        assert_eq!(ledger_path(&path), dir.path().join(".alice.auth"));
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(ledger_path(&path)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_ledger(&path), Some(Ok(record)));
        // The stale-temporary sweep leaves it alone.
        assert_eq!(sink::remove_stale_temporaries(&path), 0);
        remove_ledger(&path);
        assert_eq!(read_ledger(&path), None);
        // Ours but unreadable: returned as such, to count as the worst case.
        std::fs::write(ledger_path(&path), vec![b' '; MAX_LEDGER_FILE + 1]).unwrap();
        let why = read_ledger(&path).unwrap().unwrap_err();
        assert!(why.contains("larger than 4 KiB"), "{why}");
        std::fs::write(ledger_path(&path), b"{").unwrap();
        assert!(read_ledger(&path).unwrap().unwrap_err().starts_with("not a record of 401s"));
    }
}
