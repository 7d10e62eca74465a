//! What every customer's worker reports: the board behind `/status` and `/readyz`, kept in
//! step with the metrics.
//!
//! Workers write through a [`Reporter`], which updates the board and the metrics together, so
//! the two never disagree.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::metrics::{Metrics, Outcome};
use crate::sink::rfc3339;

/// Where a customer's worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Reading the token on disk, or before the first login.
    Starting,
    /// A login is in flight.
    Refreshing,
    /// The token on disk is good; the next login is planned.
    Fresh,
    /// Backing off after a transient failure (network, HTTP status, bad answer, disk).
    Retrying,
    /// Waiting after a 401 before trying the same password again.
    AuthBackoff,
    /// `max_auth_failures` 401s in a row: paused until `auth_failure_pause` has passed or the
    /// password changes.
    Paused,
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    expires_at: Option<SystemTime>,
    last_success_at: Option<SystemTime>,
    next_refresh_at: Option<SystemTime>,
    consecutive_failures: u32,
    last_error: Option<LastError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// The `result` label value of the failure.
    pub class: &'static str,
    pub message: String,
    pub at: String,
}

/// One customer, as `/status` shows it. Never holds a token or a password.
#[derive(Debug, Clone, Serialize)]
pub struct CustomerStatus {
    pub name: String,
    pub state: State,
    pub expires_at: Option<String>,
    pub last_success_at: Option<String>,
    pub next_refresh_at: Option<String>,
    pub consecutive_failures: u32,
    pub last_error: Option<LastError>,
    /// Whether an unexpired token is on disk now.
    pub valid: bool,
}

/// Every configured customer's status, shared by the workers and the admin server.
#[derive(Clone, Default)]
pub struct Board {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
}

impl Board {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>) -> R) -> R {
        f(&mut self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    pub fn remove(&self, name: &str) {
        self.with(|m| m.remove(name));
    }

    pub fn names(&self) -> Vec<String> {
        self.with(|m| m.keys().cloned().collect())
    }

    pub fn snapshot(&self, now: SystemTime) -> Vec<CustomerStatus> {
        self.with(|m| {
            m.iter()
                .map(|(name, e)| CustomerStatus {
                    name: name.clone(),
                    state: e.state,
                    expires_at: e.expires_at.map(rfc3339),
                    last_success_at: e.last_success_at.map(rfc3339),
                    next_refresh_at: e.next_refresh_at.map(rfc3339),
                    consecutive_failures: e.consecutive_failures,
                    last_error: e.last_error.clone(),
                    valid: e.expires_at.is_some_and(|t| t > now),
                })
                .collect()
        })
    }

    /// The customers without an unexpired token on disk at `now`; empty means ready.
    pub fn not_ready(&self, now: SystemTime) -> Vec<String> {
        self.with(|m| m.iter().filter(|(_, e)| e.expires_at.is_none_or(|t| t <= now)).map(|(n, _)| n.clone()).collect())
    }

    /// Brings `magento_token_valid` up to date: a token expires without anyone writing.
    pub fn refresh_validity(&self, metrics: &Metrics, now: SystemTime) {
        self.with(|m| {
            for (name, e) in m.iter() {
                metrics.valid(name, e.expires_at.is_some_and(|t| t > now));
            }
        });
    }
}

/// A worker's handle on the board and the metrics.
#[derive(Clone)]
pub struct Reporter {
    name: String,
    board: Board,
    metrics: Arc<Metrics>,
}

impl Reporter {
    /// Registers `name` on the board and creates its metric series at 0. A customer restarted
    /// by a reload keeps what is known of it (its token on disk is still there).
    pub fn new(name: &str, board: Board, metrics: Arc<Metrics>) -> Reporter {
        metrics.add_customer(name);
        board.with(|m| {
            m.entry(name.to_owned()).and_modify(|e| e.state = State::Starting).or_insert(Entry {
                state: State::Starting,
                expires_at: None,
                last_success_at: None,
                next_refresh_at: None,
                consecutive_failures: 0,
                last_error: None,
            });
        });
        Reporter { name: name.to_owned(), board, metrics }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn update(&self, f: impl FnOnce(&mut Entry)) {
        self.board.with(|m| {
            if let Some(e) = m.get_mut(&self.name) {
                f(e)
            }
        });
    }

    pub fn state(&self, state: State) {
        self.update(|e| e.state = state);
    }

    /// A token is on disk (adopted from an earlier run, or just written).
    pub fn token_on_disk(&self, expires_at: SystemTime, now: SystemTime) {
        self.metrics.token_on_disk(&self.name, expires_at);
        self.metrics.valid(&self.name, expires_at > now);
        self.update(|e| e.expires_at = Some(expires_at));
    }

    pub fn planned(&self, state: State, at: Option<SystemTime>) {
        self.metrics.next_refresh(&self.name, at);
        self.metrics.paused(&self.name, state == State::Paused);
        self.update(|e| {
            e.state = state;
            e.next_refresh_at = at;
        });
    }

    /// A new token was written.
    pub fn success(&self, at: SystemTime, expires_at: SystemTime, request_time: Option<std::time::Duration>) {
        self.metrics.login(&self.name, Outcome::Success, request_time);
        self.metrics.written(&self.name, at);
        self.metrics.consecutive_failures(&self.name, 0);
        self.token_on_disk(expires_at, at);
        self.update(|e| {
            e.last_success_at = Some(at);
            e.consecutive_failures = 0;
        });
    }

    /// A failed attempt; returns the failures in a row since the last success.
    pub fn failure(
        &self,
        outcome: Outcome,
        message: &str,
        at: SystemTime,
        request_time: Option<std::time::Duration>,
    ) -> u32 {
        self.metrics.login(&self.name, outcome, request_time);
        let n = self.board.with(|m| {
            let e = m.get_mut(&self.name)?;
            e.consecutive_failures += 1;
            e.last_error = Some(LastError { class: outcome.as_str(), message: message.to_owned(), at: rfc3339(at) });
            Some(e.consecutive_failures)
        });
        let n = n.unwrap_or(1);
        self.metrics.consecutive_failures(&self.name, n);
        n
    }

    /// A problem that is not a login (an unreadable password source): shown in `/status`.
    pub fn problem(&self, class: &'static str, message: &str, at: SystemTime) {
        self.update(|e| e.last_error = Some(LastError { class, message: message.to_owned(), at: rfc3339(at) }));
    }
}
