//! Where a customer's token and its record of 401s are kept: files in `output.dir`, or one
//! Secret shared by the replicas of a Deployment (`output.kubernetes`, [`crate::cluster`]). The
//! workers, `once`, `forget-failures` and the lockout bookkeeping see only this: a customer's
//! `file` becomes a path or a Secret's key here, and nowhere else.

pub mod files;
pub mod index;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

#[cfg(feature = "kubernetes")]
use crate::cluster::tokens::{Change, Tokens};
use crate::config::{CustomerConfig, Output, OutputDir, RefreshSettings};
use crate::format::{self, Format, Times};

use crate::ledger::{self, Forget, Record, Recorded};
use crate::schedule::AuthState;
use crate::secret::Secret;
use crate::sink::{self, Durability};

#[derive(Clone)]
pub enum Store {
    /// A file per customer (`<dir>/<file>`), its ledger beside it.
    Files(Arc<OutputDir>),
    /// A key per customer (its `file`) in the Secret.
    #[cfg(feature = "kubernetes")]
    Kubernetes(Arc<Tokens>),
}

/// A token an earlier run (or the former Lease holder) left.
#[derive(Debug)]
pub struct Found {
    pub token: Secret,
    /// The expiry recorded with it (a `json` or `env` file, the Secret's times).
    pub expires_at: Option<SystemTime>,
    /// When it was written: with an opaque token and no times recorded, the best guess of when
    /// it was obtained.
    pub written_at: SystemTime,
    /// The format it was written in: a reload may have changed it.
    pub format: Format,
    /// The file's mode and owner (`None` in the Secret, which has neither).
    pub file: Option<FileMeta>,
}

/// What a token file was found with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Found {
    /// Whether only this daemon's user (or root) could have written it: a file owned by the
    /// effective user and writable by no one else (in a directory others can write to, anything
    /// else may have been put there by someone else), or the Secret, which only the Lease
    /// holder writes.
    pub fn ours(&self) -> bool {
        self.file.is_none_or(|f| f.uid == rustix::process::geteuid().as_raw() && f.mode & 0o022 == 0)
    }
}

impl Store {
    /// The files of `output.dir`.
    pub fn files(dir: OutputDir) -> Store {
        Store::Files(Arc::new(dir))
    }

    /// The store for a reloaded configuration: the directory's new settings, or the same
    /// Secret (a reload never switches between the two: [`crate::daemon::check_reload`]).
    pub fn reconfigured(&self, output: &Output) -> Store {
        match (self, output) {
            (Store::Files(_), Output::Files(dir)) => Store::files(dir.clone()),
            _ => self.clone(),
        }
    }

    /// Whether two stores write the same way (if not, every worker restarts on a reload).
    pub fn same_as(&self, other: &Store) -> bool {
        match (self, other) {
            (Store::Files(a), Store::Files(b)) => a.dir == b.dir && a.perms() == b.perms(),
            #[cfg(feature = "kubernetes")]
            (Store::Kubernetes(a), Store::Kubernetes(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "kubernetes")]
            _ => false,
        }
    }

    /// Whether several processes share this store: a login is then booked before it is sent
    /// (see [`crate::attempt`]), since the process that sent it may die before it could book
    /// the answer, and the next one must not count on a budget that is spent.
    pub fn shared(&self) -> bool {
        match self {
            Store::Files(_) => false,
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(_) => true,
        }
    }

    /// Whether this process may send a login now: always with files; with the Secret, only
    /// while it holds the Lease.
    pub fn may_log_in(&self) -> bool {
        match self {
            Store::Files(_) => true,
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => tokens.leading(),
        }
    }

    /// `customer`'s token file (`None` in the Secret).
    pub fn file(&self, customer: &CustomerConfig) -> Option<PathBuf> {
        match self {
            Store::Files(dir) => Some(dir.path(customer)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(_) => None,
        }
    }

    /// Where `customer`'s token is, for a message: its file, or its key in the Secret.
    pub fn place(&self, customer: &CustomerConfig) -> String {
        match self {
            Store::Files(dir) => dir.path(customer).display().to_string(),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => format!("the Secret {}'s key {:?}", tokens.secret_of(customer), customer.file),
        }
    }

    /// The token an earlier run (or the former Lease holder) left for `customer`.
    pub fn found(&self, customer: &CustomerConfig) -> Option<Found> {
        match self {
            Store::Files(dir) => files::read_existing(&dir.path(customer)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => {
                let (content, times) = tokens.found(tokens.secret_of(customer), &customer.file)?;
                let (token, expires_at, format) = format::parse_token_content(&content)?;
                crate::token::check_form(token.expose()).ok()?;
                Some(Found {
                    token,
                    expires_at: times.map(|t| t.expires_at).or(expires_at),
                    written_at: times.map_or(SystemTime::UNIX_EPOCH, |t| t.obtained_at),
                    format,
                    file: None,
                })
            }
        }
    }

    /// Whether `found` is as a write for `customer` would make it now: its format, and a
    /// file's mode and owner (a reload may have changed any of them).
    pub fn as_written(&self, customer: &CustomerConfig, found: &Found) -> bool {
        let file = match (self, found.file) {
            (Store::Files(dir), Some(f)) => f.mode == dir.mode && dir.owner.holds(f.uid, f.gid),
            _ => true,
        };
        file && found.format == customer.format
    }

    /// Writes `customer`'s token, in its format, with when it was obtained and expires.
    pub async fn write(
        &self,
        customer: &CustomerConfig,
        token: &Secret,
        times: Times,
        durability: Durability,
    ) -> io::Result<()> {
        let content = format::render(customer.format, &customer.name, token, times.obtained_at, times.expires_at);
        match self {
            Store::Files(dir) if durability != Durability::Now => {
                sink::write_atomic(&dir.path(customer), dir.perms(), &content, durability)
            }
            Store::Files(dir) => {
                // Off the async threads (fsync blocks). A blocking task runs to its end even if
                // this future is dropped, so a write once started is never cut short.
                let (path, perms) = (dir.path(customer), dir.perms());
                tokio::task::spawn_blocking(move || sink::write_atomic(&path, perms, &content, Durability::Now))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(format!("the write task failed: {e}"))))
            }
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => {
                let secret = tokens.secret_of(customer);
                tokens
                    .submit(secret, Change::Token { key: customer.file.clone(), content, times })
                    .await
                    .map_err(io::Error::other)?;
                // A customer a reload moved to another Secret leaves the old one now.
                tokens.moved(secret, &customer.file);
                Ok(())
            }
        }
    }

    /// The ledger stored for `customer`, as read (`None`: there is none).
    fn read_ledger(&self, customer: &CustomerConfig) -> Option<ledger::Read> {
        match self {
            Store::Files(dir) => ledger::read_ledger(&dir.path(customer)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => tokens.ledger(tokens.secret_of(customer), &customer.file),
        }
    }

    /// Where `customer`'s ledger is, for a reason shown about it.
    pub fn ledger_place(&self, customer: &CustomerConfig) -> String {
        match self {
            Store::Files(dir) => ledger::ledger_path(&dir.path(customer)).display().to_string(),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => {
                format!("the Secret {}'s ledger entry {:?}", tokens.secret_of(customer), customer.file)
            }
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
            Store::Files(dir) => ledger::write_ledger(&dir.path(customer), dir.owner, &record),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => {
                let change = Change::Ledger { key: customer.file.clone(), entry: Some(record) };
                tokens.submit(tokens.secret_of(customer), change).await.map_err(io::Error::other)
            }
        }
    }

    /// Forgets `customer`'s recorded 401s (after a success, or an operator's `forget-failures`
    /// was taken). With the Secret it is sent with the next update, not waited for.
    pub fn clear_failures(&self, customer: &CustomerConfig) {
        match self {
            Store::Files(dir) => ledger::remove_ledger(&dir.path(customer)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(tokens) => {
                let secret = tokens.secret_of(customer);
                if tokens.ledger(secret, &customer.file).is_some_and(|read| !read.as_ref().is_ok_and(Record::is_empty))
                {
                    tokens.enqueue(secret, Change::Ledger { key: customer.file.clone(), entry: None });
                }
            }
        }
    }

    /// Removes what an interrupted earlier write left (files only); returns how many.
    pub fn sweep(&self, customer: &CustomerConfig) -> usize {
        match self {
            Store::Files(dir) => sink::remove_stale_temporaries(&dir.path(customer)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(_) => 0,
        }
    }

    /// A batch of writes made durable together at its end ([`Batch::finish`]): `once`'s pass.
    pub fn batch(&self) -> Batch<'_> {
        let (dir, ledgers) = match self {
            Store::Files(out) => (sink::open_dir(&out.dir).ok(), files::ledgers_in(&out.dir)),
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(_) => (None, None),
        };
        Batch { store: self, dir, ledgers }
    }
}

/// Writes that share one sync of the file system at their end (the contract lets a batch
/// share one; on a disk, one sync instead of one per file), or the Secret's updates. Files are
/// written inline into the directory opened once: on tmpfs a hand-off to a blocking thread cost
/// more than the write (benches/RESULTS.md).
pub struct Batch<'a> {
    store: &'a Store,
    /// The output directory, opened once for every write (`None`: each write opens it, or the
    /// tokens go to the Secret).
    dir: Option<std::fs::File>,
    /// The ledgers found in it at the start (`None`: unknown, any customer may have one).
    ledgers: Option<std::collections::HashSet<std::ffi::OsString>>,
}

impl Batch<'_> {
    /// Whether `customer` may have a ledger. A batch runs under the directory's lock: no other
    /// daemon writes one meanwhile, so a customer without one needs neither a read of its
    /// ledger nor a removal after its login (two system calls that fail, of the thirty a login
    /// costs).
    pub fn may_have_ledger(&self, customer: &CustomerConfig) -> bool {
        match &self.ledgers {
            Some(found) => found.contains(std::ffi::OsStr::new(&format!(".{}.auth", customer.file))),
            None => true,
        }
    }

    /// Writes `customer`'s token: durable only once the batch is finished.
    pub async fn write(&self, customer: &CustomerConfig, token: &Secret, times: Times) -> io::Result<()> {
        match (self.store, &self.dir) {
            (Store::Files(out), Some(dir)) => {
                let content =
                    format::render(customer.format, &customer.name, token, times.obtained_at, times.expires_at);
                sink::write_atomic_at(dir, &customer.file, out.perms(), &content, Durability::Batch)
            }
            _ => self.store.write(customer, token, times, Durability::FileOnly).await,
        }
    }

    /// Ends the batch: the index of the customers `written` (with `output.index`), then one sync
    /// for everything (the Secret's writes are answered once stored). An error means some write
    /// may not be durable: no token of the batch is to be reported written.
    #[cfg_attr(not(feature = "kubernetes"), allow(clippy::infallible_destructuring_match))]
    pub fn finish<'c>(self, written: impl IntoIterator<Item = (&'c CustomerConfig, SystemTime)>) -> Result<(), String> {
        let out = match self.store {
            Store::Files(out) => out,
            #[cfg(feature = "kubernetes")]
            Store::Kubernetes(_) => return Ok(()),
        };
        if let Some(index) = &out.index {
            let entries = written.into_iter().map(|(c, expires_at)| (c.name.as_str(), out.path(c), expires_at));
            index::write_once(index, out.perms(), entries)
                .map_err(|e| format!("cannot write the index {}: {e}", index.display()))?;
        }
        match &self.dir {
            Some(dir) => sink::sync_file_system(dir),
            None => sink::sync_directory(&out.dir),
        }
        .map_err(|e| format!("cannot sync {}: {e}", out.dir.display()))
    }
}

/// `forget-failures` for `customers`: marks each one's ledger as forgotten where
/// [`ledger::forget`] says so, and says what was done for each (an error: that ledger could not
/// be written). With the Secret, one update for all, without the Lease (the holder sees it at
/// its next read of the Secret); an `Err` there means nothing was written.
pub async fn forget_failures(
    output: &Output,
    customers: &[&CustomerConfig],
) -> Result<Vec<io::Result<Forget>>, String> {
    match output {
        Output::Files(dir) => Ok(customers
            .iter()
            .map(|c| {
                let path = dir.path(c);
                let verdict = ledger::forget(ledger::read_ledger(&path), &c.username);
                if let Forget::Forget { .. } = verdict {
                    ledger::write_ledger(&path, dir.owner, &Record::forgotten(&c.username))?;
                }
                Ok(verdict)
            })
            .collect()),
        #[cfg(feature = "kubernetes")]
        Output::Kubernetes(k) => {
            let keys: Vec<(&str, &str, &str)> = customers
                .iter()
                .map(|c| (c.secret.as_deref().unwrap_or(&k.secret), c.file.as_str(), c.username.as_str()))
                .collect();
            let verdicts = crate::cluster::tokens::forget(k, &keys).await?;
            Ok(verdicts.into_iter().map(Ok).collect())
        }
        #[cfg(not(feature = "kubernetes"))]
        Output::Kubernetes(_) => Err(format!("output.kubernetes: {}", crate::config::NO_KUBERNETES)),
    }
}

/// Where `forget-failures` marks `customer`'s ledger, for a message.
pub fn ledger_place(output: &Output, customer: &CustomerConfig) -> String {
    match output {
        Output::Files(dir) => ledger::ledger_path(&dir.path(customer)).display().to_string(),
        Output::Kubernetes(k) => {
            format!("the Secret {}'s ledger entry {:?}", customer.secret.as_deref().unwrap_or(&k.secret), customer.file)
        }
    }
}
