//! `output.index`: one JSON file with every customer's token and expiry, for an app with many
//! customers that would rather read one file than one per customer:
//!
//! ```json
//! {"alice":{"token":"eyJ...","expires_at":"2026-11-28T11:00:00Z"},"bob":{"token":"...","expires_at":"..."}}
//! ```
//!
//! It lists every customer with a valid token on disk (what `/readyz` counts as ready), by
//! name, in name order, and is replaced atomically ([`sink::write_atomic`], `output.mode`)
//! whenever any of them changes: a token written, a token adopted at start, a customer removed
//! by a reload, a token that expired without a successor.
//!
//! Memory: the index holds every token, so nothing of it is kept between writes. Each write
//! rebuilds it from the token files, the only copy of the tokens the daemon keeps anyway, with
//! the expiries from the [`Board`]; the tokens read and the JSON are [`Secret`]s and
//! [`Zeroizing`] buffers, wiped as soon as the file is written. Between writes the index costs
//! a task and a list of the customers (a pointer each).
//!
//! Rewrites: a change wakes the writer, which waits [`SETTLE`] so that changes close together
//! (a reload, the adoptions at start, refreshes that fall together) share one rewrite; changes
//! during a rewrite make one more. So there is never more than one rewrite per change, and the
//! index follows a token file within [`SETTLE`] plus the time of a rebuild.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};
use zeroize::Zeroizing;

use super::files::read_existing;
use crate::config::CustomerConfig;
use crate::secret::Secret;
use crate::sink;
use crate::status::Board;

/// How long the writer waits after a change before rebuilding, so that changes close together
/// share one rewrite.
pub const SETTLE: Duration = Duration::from_millis(200);

/// After a failed write, the next try comes at the next change or after this long.
pub const RETRY: Duration = Duration::from_secs(5);

/// A customer as the index lists it: its name, token and expiry.
pub struct Listed<'a> {
    pub name: &'a str,
    pub token: Secret,
    pub expires_at: SystemTime,
}

/// The index's bytes: `{"<name>":{"token":"...","expires_at":"...Z"},...}`, compact, no newline,
/// in the order given (callers give name order). The buffer is allocated at its final size:
/// names and tokens need no escaping (their characters are restricted), so it never grows and
/// leaves no copy of a token in freed memory.
pub fn render(entries: &[Listed<'_>]) -> Zeroizing<Vec<u8>> {
    #[derive(Serialize)]
    struct Item<'a> {
        token: &'a str,
        expires_at: &'a str,
    }
    let times: Vec<String> = entries.iter().map(|e| crate::clock::rfc3339(e.expires_at)).collect();
    // `"":{"token":"","expires_at":""},` is 32 bytes around what varies, `{}` two more.
    let size: usize =
        entries.iter().zip(&times).map(|(e, t)| 32 + e.name.len() + e.token.expose().len() + t.len()).sum();
    let mut bytes = Zeroizing::new(Vec::with_capacity(2 + size));
    let mut json = serde_json::Serializer::new(&mut *bytes);
    let mut map = json.serialize_map(Some(entries.len())).expect("a map always serializes");
    for (e, t) in entries.iter().zip(&times) {
        map.serialize_entry(e.name, &Item { token: e.token.expose(), expires_at: t })
            .expect("strings always serialize");
    }
    map.end().expect("a map always serializes");
    bytes
}

/// Where the index goes and whose tokens it lists.
#[derive(Clone)]
pub struct Target {
    /// `<output.dir>/<output.index>`.
    pub path: PathBuf,
    /// `output.mode` and the owner, as the token files.
    pub perms: crate::fs::Perms,
    /// `output.dir`, where the token files are read.
    pub dir: PathBuf,
    /// `refresh.default_lifetime`: the expiry of an opaque token in a file not yet looked at.
    pub default_lifetime: Duration,
    /// The running customers.
    pub customers: Vec<Arc<CustomerConfig>>,
}

/// The index's target as last set, shared by the writer task and its handle, and the bell the
/// handle rings when it sets another.
struct LiveTarget {
    target: Mutex<Target>,
    /// Rung when the target changed (a reload).
    retarget: Notify,
}

/// The task that keeps the index file up to date in `run`.
pub struct IndexWriter {
    live: Arc<LiveTarget>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl IndexWriter {
    /// Starts the writer: it writes the index once at once (after [`SETTLE`]), then at every
    /// change the board reports.
    pub fn start(target: Target, board: Board) -> IndexWriter {
        let removed = sink::remove_stale_temporaries(&target.path);
        if removed > 0 {
            info!(removed, "removed temporary files of the index left by an earlier run");
        }
        let live = Arc::new(LiveTarget { target: Mutex::new(target), retarget: Notify::new() });
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(live.clone(), board, stop.clone()));
        IndexWriter { live, stop, task }
    }

    /// A reload: the customers, the path or the mode changed (or may have).
    pub fn retarget(&self, target: Target) {
        *self.live.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
        self.live.retarget.notify_one();
    }

    /// Writes what changed since the last write, if anything, then ends the task.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(live: Arc<LiveTarget>, board: Board, stop: CancellationToken) {
    // The first write lists whoever has a token then: a previous run's index may list
    // customers since removed.
    let mut changed = true;
    // When the next entry expires (it leaves the index then), or a failed write is retried.
    let mut wake_at: Option<SystemTime> = None;
    loop {
        if !changed {
            let timer = async {
                match wake_at {
                    Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = board.tokens_changed() => {}
                _ = live.retarget.notified() => {}
                _ = timer => {}
            }
        }
        // Changes close together share one rewrite; a stop cuts the wait short, not the write.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(SETTLE) => {}
        }
        changed = false;
        wake_at = rebuild(&live, &board).await;
        if stop.is_cancelled() {
            break;
        }
    }
    // A change not written yet (a worker's last write before the stop) is written now.
    if board.tokens_changed().now_or_never().is_some() || live.retarget.notified().now_or_never().is_some() {
        rebuild(&live, &board).await;
    }
    debug!("index writer stopped");
}

/// Rebuilds and writes the index off the async threads (file reads and an fsync). Returns when
/// to rebuild next without a change: when the first entry expires, or to retry a failed write.
async fn rebuild(live: &Arc<LiveTarget>, board: &Board) -> Option<SystemTime> {
    let target = live.target.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let board = board.clone();
    let path = target.path.clone();
    let written = tokio::task::spawn_blocking(move || write(&target, &board)).await;
    match written.unwrap_or_else(|e| Err(std::io::Error::other(format!("the write task failed: {e}")))) {
        Ok((listed, first_expiry)) => {
            debug!(customers = listed, "index written");
            first_expiry
        }
        Err(e) => {
            error!(error = %e, retry_in = ?RETRY, "cannot write the index {}", path.display());
            Some(SystemTime::now() + RETRY)
        }
    }
}

/// Reads every listed customer's token and writes the index. Returns how many customers it
/// lists and the first expiry among them.
fn write(target: &Target, board: &Board) -> std::io::Result<(usize, Option<SystemTime>)> {
    let now = SystemTime::now();
    // The expiries first, the files after: a token written meanwhile is read with the expiry of
    // the one before (the earlier, never a later one), and its own report brings a rewrite.
    let known: std::collections::HashMap<String, (Option<SystemTime>, bool)> =
        board.expiries().into_iter().map(|(name, expires_at, starting)| (name, (expires_at, starting))).collect();
    let mut customers: Vec<&CustomerConfig> = target.customers.iter().map(|c| &**c).collect();
    customers.sort_by(|a, b| a.name.cmp(&b.name));
    let mut entries = Vec::with_capacity(customers.len());
    for customer in customers {
        let Some(&(expires_at, starting)) = known.get(&customer.name) else { continue };
        if expires_at.is_some_and(|t| t <= now) {
            continue;
        }
        let Some(found) = read_existing(&target.dir.join(&customer.file)) else { continue };
        let expires_at = match expires_at {
            Some(t) => t,
            // A customer starting up whose file was not looked at yet: listed, as the index
            // of the run before listed it, when only this daemon's user could have written
            // the file and it is unexpired by its own account (as `/readyz` takes it when
            // Magento cannot be asked).
            None if starting && found.ours() => {
                let read = crate::token::expiry(&found.token, found.written_at, target.default_lifetime);
                match found.expires_at.or(read.ok().map(|e| e.expires_at)) {
                    Some(t) if t > now => t,
                    _ => continue,
                }
            }
            None => continue,
        };
        entries.push(Listed { name: &customer.name, token: found.token, expires_at });
    }
    let first_expiry = entries.iter().map(|e| e.expires_at).min();
    sink::write_atomic(&target.path, target.perms, &render(&entries), sink::Durability::Now)?;
    Ok((entries.len(), first_expiry))
}

/// `once`: the index of the customers written in the pass (their tokens read back from the
/// files just written), written without a directory sync (the pass syncs once for all).
pub fn write_once<'a>(
    path: &std::path::Path,
    perms: crate::fs::Perms,
    written: impl IntoIterator<Item = (&'a str, PathBuf, SystemTime)>,
) -> std::io::Result<()> {
    let mut entries = Vec::new();
    for (name, file, expires_at) in written {
        let found = read_existing(&file)
            .ok_or_else(|| std::io::Error::other(format!("{} no longer holds the token written", file.display())))?;
        entries.push(Listed { name, token: found.token, expires_at });
    }
    entries.sort_by(|a, b| a.name.cmp(b.name));
    sink::remove_stale_temporaries(path);
    sink::write_atomic(path, perms, &render(&entries), sink::Durability::FileOnly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_unix_secs as at;

    #[test]
    fn the_index_is_every_entry_by_name_with_its_token_and_expiry() {
        let entries = [
            Listed { name: "alice", token: Secret::new("eyJ.a-_.s~+/==".into()), expires_at: at(1_795_863_600) },
            Listed { name: "bob.x", token: Secret::new("0123abcd".into()), expires_at: at(1_795_860_000) },
        ];
        let bytes = render(&entries);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"alice":{"token":"eyJ.a-_.s~+/==","expires_at":"2026-11-28T11:00:00Z"},"bob.x":{"token":"0123abcd","expires_at":"2026-11-28T10:00:00Z"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed["bob.x"]["token"], "0123abcd");
        assert_eq!(&render(&[])[..], b"{}");
    }

    #[test]
    fn the_buffer_is_allocated_at_its_final_size() {
        let names: Vec<String> = (0..500).map(|i| format!("{i:0>64}")).collect();
        let entries: Vec<Listed> = names
            .iter()
            .map(|name| Listed {
                name,
                token: Secret::new("t".repeat(crate::token::MAX_TOKEN_LEN)),
                expires_at: at(253_402_300_799),
            })
            .collect();
        let bytes = render(&entries);
        assert!(bytes.capacity() <= bytes.len() + 1, "{} for {}", bytes.capacity(), bytes.len());
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&bytes).unwrap().as_object().unwrap().len(), 500);
    }
}
