//! Where a customer's token and its record of 401s are kept: files in `output.dir` ([`sink`]),
//! or one Secret shared by the replicas of a Deployment (`output.kubernetes`, [`cluster`]).
//! The workers, `once` and the lockout bookkeeping see only this.

use std::io;
use std::time::SystemTime;

use zeroize::Zeroizing;

#[cfg(feature = "kubernetes")]
use crate::cluster::tokens::{Change, Tokens};
use crate::config::{CustomerConfig, RefreshSettings};
use crate::ledger::{self, Record, Recorded};
use crate::schedule::AuthState;
use crate::sink::{self, Durability, OnDisk, Perms, Times};

#[derive(Clone)]
pub enum Store {
    /// A file per customer (`customer.path`), its ledger beside it.
    Files,
    /// A key per customer (`customer.path` is the key) in the Secret.
    #[cfg(feature = "kubernetes")]
    Secret(std::sync::Arc<Tokens>),
}

impl Store {
    /// Whether several processes share this store: a login is then booked before it is sent
    /// (see [`crate::attempt`]), since the process that sent it may die before it could book
    /// the answer, and the next one must not count on a budget that is spent.
    pub fn shared(&self) -> bool {
        match self {
            Store::Files => false,
            #[cfg(feature = "kubernetes")]
            Store::Secret(_) => true,
        }
    }

    /// Whether this process may send a login now: always with files; with the Secret, only
    /// while it holds the Lease.
    pub fn may_log_in(&self) -> bool {
        match self {
            Store::Files => true,
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => tokens.leading(),
        }
    }

    /// The token an earlier run (or the former Lease holder) left for `customer`.
    #[cfg_attr(not(feature = "kubernetes"), allow(unused_variables))]
    pub fn found(&self, customer: &CustomerConfig, mode: u32) -> Option<OnDisk> {
        match self {
            Store::Files => sink::read_existing(&customer.path),
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => {
                let (content, times) = tokens.found(key(customer))?;
                let (token, expires_at, format) = sink::parse_token_content(&content)?;
                crate::token::check_form(token.expose()).ok()?;
                Some(OnDisk {
                    token,
                    expires_at: times.map(|t| t.expires_at).or(expires_at),
                    modified: times.map_or(SystemTime::UNIX_EPOCH, |t| t.obtained_at),
                    format,
                    // Only the Lease holder writes the Secret: it is this daemon's own, with the
                    // mode of the configuration (the app's volume sets the files' own).
                    mode,
                    uid: rustix::process::geteuid().as_raw(),
                    gid: rustix::process::getegid().as_raw(),
                })
            }
        }
    }

    /// Writes `customer`'s token: `content` is what its file holds (rendered in its format).
    #[cfg_attr(not(feature = "kubernetes"), allow(unused_variables))]
    pub async fn write(
        &self,
        customer: &CustomerConfig,
        perms: Perms,
        content: Zeroizing<Vec<u8>>,
        times: Times,
        durability: Durability,
    ) -> io::Result<()> {
        match self {
            Store::Files if durability != Durability::Now => {
                sink::write_atomic(&customer.path, perms, &content, durability)
            }
            Store::Files => {
                // Off the async threads (fsync blocks). A blocking task runs to its end even if
                // this future is dropped, so a write once started is never cut short.
                let path = customer.path.clone();
                tokio::task::spawn_blocking(move || sink::write_atomic(&path, perms, &content, Durability::Now))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(format!("the write task failed: {e}"))))
            }
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => tokens
                .submit(Change::Token { key: key(customer).to_owned(), content, times })
                .await
                .map_err(io::Error::other),
        }
    }

    /// The ledger stored for `customer`, as read (`None`: there is none).
    fn read_ledger(&self, customer: &CustomerConfig) -> Option<ledger::Read> {
        match self {
            Store::Files => ledger::read_ledger(&customer.path),
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => tokens.ledger(key(customer)),
        }
    }

    /// Where `customer`'s ledger is, for a reason shown about it.
    fn ledger_place(&self, customer: &CustomerConfig) -> String {
        match self {
            Store::Files => ledger::ledger_path(&customer.path).display().to_string(),
            #[cfg(feature = "kubernetes")]
            Store::Secret(_) => format!("the Secret's ledger entry {:?}", key(customer)),
        }
    }

    /// What is recorded of `customer`'s username's recent 401s, judged at `now`
    /// ([`ledger::judge`]: clamped, and the worst case where it cannot be read).
    pub fn ledger(&self, customer: &CustomerConfig, now: SystemTime, r: &RefreshSettings) -> Recorded {
        match self.read_ledger(customer) {
            None => Recorded::Nothing,
            Some(read) => ledger::judge(read, &customer.username, &self.ledger_place(customer), now, r),
        }
    }

    /// Whether an operator told the daemon to forget `customer`'s failures (`forget-failures`).
    pub fn forgotten(&self, customer: &CustomerConfig) -> bool {
        matches!(self.read_ledger(customer), Some(Ok(record)) if record.forgotten && record.is_of(&customer.username))
    }

    /// Records `auth` as `customer`'s recent 401s.
    pub async fn record_failures(&self, customer: &CustomerConfig, auth: &AuthState) -> io::Result<()> {
        let record = Record::of(&customer.username, auth);
        match self {
            // Rare and small: written in place rather than on the blocking pool.
            Store::Files => ledger::write_ledger(&customer.path, customer.owner, &record),
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => {
                let change = Change::Ledger { key: key(customer).to_owned(), entry: Some(record) };
                tokens.submit(change).await.map_err(io::Error::other)
            }
        }
    }

    /// `forget-failures` for `customer` in a directory of token files: marks its ledger as
    /// forgotten where [`ledger::forget`] says so. (The Secret's is [`crate::cluster::tokens::forget`].)
    pub fn forget_failures(customer: &CustomerConfig) -> io::Result<ledger::Forget> {
        let verdict = ledger::forget(ledger::read_ledger(&customer.path), &customer.username);
        if let ledger::Forget::Forget { .. } = verdict {
            ledger::write_ledger(&customer.path, customer.owner, &Record::forgotten(&customer.username))?;
        }
        Ok(verdict)
    }

    /// Forgets `customer`'s recorded 401s (after a success, or an operator's `forget-failures`
    /// was taken). With the Secret it is sent with the next update, not waited for.
    pub fn clear_failures(&self, customer: &CustomerConfig) {
        match self {
            Store::Files => ledger::remove_ledger(&customer.path),
            #[cfg(feature = "kubernetes")]
            Store::Secret(tokens) => {
                if tokens.ledger(key(customer)).is_some_and(|read| !read.as_ref().is_ok_and(Record::is_empty)) {
                    tokens.enqueue(Change::Ledger { key: key(customer).to_owned(), entry: None });
                }
            }
        }
    }

    /// Removes what an interrupted earlier write left (files only); returns how many.
    pub fn sweep(&self, customer: &CustomerConfig) -> usize {
        match self {
            Store::Files => sink::remove_stale_temporaries(&customer.path),
            #[cfg(feature = "kubernetes")]
            Store::Secret(_) => 0,
        }
    }
}

/// A customer's key in the Secret: its `file`, else its name (kept in `path`).
pub fn key(customer: &CustomerConfig) -> &str {
    customer.path.to_str().unwrap_or(&customer.name)
}
