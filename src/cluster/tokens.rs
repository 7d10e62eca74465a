//! The Secret every replica reads and only the Lease holder writes: one key per customer
//! holding exactly what its file would, plus two annotations: when each token was obtained and
//! expires, and the ledger of recent 401s per customer (so the lockout budget survives a
//! failover).
//!
//! Writes are queued and sent together: the changes that arrive within [`SETTLE`] of the
//! first share one update. Every update is conditional on the resourceVersion last read; on a
//! conflict the Secret is read again and the changes are applied to what it holds now, where a
//! token only ever replaces an older one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::lease::Term;
use super::{ApiError, Cluster};
use crate::format::Times;
use crate::ledger::{self, Record};

/// The annotation with each key's times: `{"<key>": {"obtained_at": "...", "expires_at": "..."}}`.
pub const TIMES: &str = "magento-token-sidecar/times";
/// The annotation with each key's record of recent 401s (never a password).
pub const LEDGER: &str = "magento-token-sidecar/ledger";
/// A ledger annotation found that was not a JSON object at all, kept as it was: while it is
/// there, every key without an entry of its own counts as unreadable (its record may have been
/// in it). An operator removes it once the customers' counts are known to be gone.
pub const LEDGER_UNREADABLE: &str = "magento-token-sidecar/ledger-unreadable";

/// How long the first change waits for others to share its update.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Conflicts in a row before a batch of changes is given up (the callers retry).
const MAX_CONFLICTS: u32 = 5;

/// A key's entry in the ledger annotation as found: a record, or a value that is not one. A
/// damaged entry is kept as it is (written back unchanged) and counts as the worst case for its
/// key's customer alone ([`crate::ledger`]); every other entry is read as usual.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerEntry {
    Record(Record),
    Damaged(serde_json::Value),
}

impl LedgerEntry {
    fn read(value: serde_json::Value) -> LedgerEntry {
        match serde_json::from_value(value.clone()) {
            Ok(record) => LedgerEntry::Record(record),
            Err(_) => LedgerEntry::Damaged(value),
        }
    }

    fn to_value(&self) -> serde_json::Value {
        match self {
            LedgerEntry::Record(record) => serde_json::to_value(record).expect("a record serializes"),
            LedgerEntry::Damaged(value) => value.clone(),
        }
    }

    /// The record, or why the entry is not one.
    pub fn record(&self) -> ledger::Read {
        match self {
            LedgerEntry::Record(record) => Ok(record.clone()),
            LedgerEntry::Damaged(value) => ledger::parse(value.to_string().as_bytes()),
        }
    }
}

/// One change to the Secret.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new token for `key`: kept only if it expires after the one there.
    Token { key: String, content: zeroize::Zeroizing<Vec<u8>>, times: Times },
    /// `key`'s ledger: set, or removed (`None`).
    Ledger { key: String, entry: Option<Record> },
    /// `key` leaves this Secret (token, times and ledger): its customer's token now lives in
    /// another one, which already holds it.
    Remove { key: String },
}

/// What the Secret holds, as last read or written.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// Whether it exists (else the first write creates it).
    pub exists: bool,
    /// Its metadata as read (resourceVersion, labels, other annotations), kept on writes.
    meta: ObjectMeta,
    pub data: BTreeMap<String, ByteString>,
    pub times: BTreeMap<String, Times>,
    pub ledgers: BTreeMap<String, LedgerEntry>,
    /// A ledger annotation that did not parse at all ([`LEDGER_UNREADABLE`]).
    pub unreadable_ledgers: Option<String>,
}

impl Contents {
    /// Reads a Secret, ignoring annotations it cannot parse (with a warning: someone edited
    /// them by hand).
    pub fn from_secret(secret: Secret) -> Contents {
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        let parse = |name: &str| -> Option<&String> { annotations.get(name) };
        let times = parse(TIMES)
            // (serde's own text of the error would show the value it refused.)
            .and_then(|text| serde_json::from_str(text).map_err(|e| warn!(annotation = TIMES, error = %crate::shown::Malformed::new(&e), "ignoring an annotation of the Secret that does not parse")).ok())
            .unwrap_or_default();
        // Entry by entry: one damaged entry costs its own customer's budget, no one else's.
        let mut unreadable_ledgers = parse(LEDGER_UNREADABLE).cloned();
        let ledgers = match parse(LEDGER).map(|text| serde_json::from_str::<BTreeMap<String, serde_json::Value>>(text))
        {
            None => BTreeMap::new(),
            Some(Ok(entries)) => entries.into_iter().map(|(key, value)| (key, LedgerEntry::read(value))).collect(),
            Some(Err(e)) => {
                warn!(annotation = LEDGER, error = %crate::shown::Malformed::new(&e), "the Secret's ledger annotation does not parse: every customer without an entry counts as having spent its lockout budget");
                unreadable_ledgers = parse(LEDGER).cloned();
                BTreeMap::new()
            }
        };
        let (meta, data) = (secret.metadata, secret.data.unwrap_or_default());
        Contents { exists: true, meta, data, times, ledgers, unreadable_ledgers }
    }

    /// `key`'s ledger entry as read, if there is one (or may have been).
    pub fn ledger(&self, key: &str) -> Option<ledger::Read> {
        match (self.ledgers.get(key), &self.unreadable_ledgers) {
            (Some(entry), _) => Some(entry.record()),
            (None, Some(_)) => {
                Some(Err(format!("the annotation {LEDGER} did not parse (kept as {LEDGER_UNREADABLE})")))
            }
            (None, None) => None,
        }
    }

    /// When `key`'s token expires: only if `data` holds a token of a token's form with its times
    /// (the annotation alone is anyone's word, and says nothing of what is there), and whose
    /// claims a worker would accept (see [`crate::token::expiry`]), as in file mode.
    pub fn expiry(&self, key: &str, default_lifetime: Duration) -> Option<SystemTime> {
        let times = self.times.get(key)?;
        let (token, _, _) = crate::format::parse_token_content(&self.data.get(key)?.0)?;
        crate::token::check_form(token.expose()).ok()?;
        let own = crate::token::expiry(&token, times.obtained_at, default_lifetime).ok()?;
        // Never later than the token itself says: the annotation may be edited by anyone.
        Some(times.expires_at.min(own.expires_at))
    }

    /// Applies one change; a token obtained before the one there is dropped (a former
    /// holder's write that landed late).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Token { key, content, times } => {
                if self.times.get(key).is_some_and(|there| there.obtained_at > times.obtained_at) {
                    debug!(key = %key, "the Secret holds a token obtained later: kept");
                    return;
                }
                self.data.insert(key.clone(), ByteString(content.to_vec()));
                self.times.insert(key.clone(), *times);
            }
            Change::Ledger { key, entry: Some(entry) } => {
                self.ledgers.insert(key.clone(), LedgerEntry::Record(entry.clone()));
            }
            // While an annotation that did not parse is kept, a key without an entry counts as
            // unreadable: a cleared key keeps an entry with nothing in it.
            Change::Ledger { key, entry: None } if self.unreadable_ledgers.is_some() => {
                self.ledgers.insert(key.clone(), LedgerEntry::Record(Record::cleared("")));
            }
            Change::Ledger { key, entry: None } => {
                self.ledgers.remove(key);
            }
            Change::Remove { key } => {
                self.data.remove(key);
                self.times.remove(key);
                self.ledgers.remove(key);
            }
        }
    }

    /// The Secret to send: the resourceVersion read travels with it (a conditional update).
    pub fn to_secret(&self, name: &str) -> Secret {
        let mut meta = self.meta.clone();
        meta.name = Some(name.to_owned());
        meta.managed_fields = None;
        let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(TIMES.into(), serde_json::to_string(&self.times).expect("times serialize"));
        if self.ledgers.is_empty() {
            annotations.remove(LEDGER);
        } else {
            let entries: BTreeMap<&String, serde_json::Value> =
                self.ledgers.iter().map(|(key, entry)| (key, entry.to_value())).collect();
            annotations.insert(LEDGER.into(), serde_json::to_string(&entries).expect("ledgers serialize"));
        }
        match &self.unreadable_ledgers {
            Some(text) => annotations.insert(LEDGER_UNREADABLE.into(), text.clone()),
            None => annotations.remove(LEDGER_UNREADABLE),
        };
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.entry("app.kubernetes.io/managed-by".into()).or_insert_with(|| "magento-token-sidecar".into());
        Secret { metadata: meta, data: Some(self.data.clone()), type_: Some("Opaque".into()), ..Secret::default() }
    }
}

/// A change and who waits for it (`None`: no one; it is queued again until an update carries
/// it).
type Queued = (Change, Option<oneshot::Sender<Result<(), String>>>);

/// One Secret as this replica knows it, and the queue of changes to it.
struct Book {
    name: String,
    contents: Mutex<Contents>,
    queue: Mutex<Vec<Queued>>,
    bell: Notify,
}

impl Book {
    fn contents(&self) -> MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, Vec<Queued>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every Secret the configuration writes (the default one, `output.kubernetes.secret`, and
/// those of `customers[].secret`), each with its own contents, queue and writer: a customer's key
/// lives in its Secret alone, and a Secret is written with its customers' changes only, at most
/// once per [`WRITE_EVERY`].
pub struct Tokens {
    cluster: Cluster,
    term: watch::Receiver<Term>,
    stop: CancellationToken,
    /// By the Secret's name.
    books: Mutex<BTreeMap<String, Arc<Book>>>,
}

/// The least time between two updates of one Secret: the changes of every customer refreshed
/// meanwhile go together (thousands of customers due at once cost one update a second per
/// Secret, not one each: benches/RESULTS.md).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

impl Tokens {
    /// The Secrets' keeper (the default Secret's book from the start); their writers run until
    /// `stop`.
    pub fn start(cluster: Cluster, term: watch::Receiver<Term>, stop: CancellationToken) -> Arc<Tokens> {
        let tokens = Arc::new(Tokens { cluster, term, stop, books: Mutex::default() });
        tokens.book(&tokens.cluster.settings.secret.clone());
        tokens
    }

    /// The book of the Secret `name`, started at its first use.
    fn book(self: &Arc<Self>, name: &str) -> Arc<Book> {
        let mut books = self.books.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(book) = books.get(name) {
            return book.clone();
        }
        let book = Arc::new(Book {
            name: name.to_owned(),
            contents: Mutex::default(),
            queue: Mutex::default(),
            bell: Notify::new(),
        });
        books.insert(name.to_owned(), book.clone());
        tokio::spawn(self.clone().write_loop(book.clone(), self.stop.clone()));
        book
    }

    fn books(&self) -> Vec<Arc<Book>> {
        self.books.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The Secret `customer`'s token lives in.
    pub fn secret_of<'a>(&'a self, customer: &'a crate::config::CustomerConfig) -> &'a str {
        customer.secret.as_deref().unwrap_or(&self.cluster.settings.secret)
    }

    /// Makes sure every Secret of `customers` is known (read by the next [`Tokens::load`]).
    pub fn know<'c>(self: &Arc<Self>, customers: impl IntoIterator<Item = &'c crate::config::CustomerConfig>) {
        for c in customers {
            self.book(self.secret_of(c));
        }
    }

    /// Reads every Secret known (absent: empty, created by its first write).
    pub async fn load(&self) -> Result<(), ApiError> {
        for book in self.books() {
            self.load_book(&book).await?;
        }
        Ok(())
    }

    async fn load_book(&self, book: &Book) -> Result<(), ApiError> {
        let read =
            self.cluster.call("secret", "get", super::REQUEST_TIMEOUT, self.cluster.secrets.get(&book.name)).await;
        let contents = match read {
            Ok(secret) => Contents::from_secret(secret),
            Err(ApiError::NotFound(_)) => Contents::default(),
            Err(e) => return Err(e),
        };
        *book.contents() = contents;
        Ok(())
    }

    fn known(&self, secret: &str) -> Option<Arc<Book>> {
        self.books.lock().unwrap_or_else(|e| e.into_inner()).get(secret).cloned()
    }

    /// `key`'s content and times in `secret`, if it holds a token for it.
    pub fn found(&self, secret: &str, key: &str) -> Option<(zeroize::Zeroizing<Vec<u8>>, Option<Times>)> {
        let book = self.known(secret)?;
        let contents = book.contents();
        let data = contents.data.get(key)?;
        Some((zeroize::Zeroizing::new(data.0.clone()), contents.times.get(key).copied()))
    }

    /// `key`'s ledger entry in `secret` as read, if there is one (or may have been: see
    /// [`LEDGER_UNREADABLE`]).
    pub fn ledger(&self, secret: &str, key: &str) -> Option<ledger::Read> {
        self.known(secret)?.contents().ledger(key)
    }

    /// Whether this replica holds the Lease now: the only one that may log in and write.
    pub fn leading(&self) -> bool {
        self.term.borrow().leading()
    }

    /// Whether any ledger is recorded: the holder then reads the Secrets now and then, to see
    /// an operator's `forget-failures`.
    pub fn has_ledgers(&self) -> bool {
        self.books().iter().any(|book| {
            let contents = book.contents();
            !contents.ledgers.is_empty() || contents.unreadable_ledgers.is_some()
        })
    }

    /// The expiry of every key's token in every Secret, by Secret and key, as a worker would
    /// read the token it finds there (see [`Contents::expiry`]).
    pub fn expiries(&self, default_lifetime: Duration) -> BTreeMap<(String, String), SystemTime> {
        let mut all = BTreeMap::new();
        for book in self.books() {
            let contents = book.contents();
            for key in contents.data.keys() {
                if let Some(at) = contents.expiry(key, default_lifetime) {
                    all.insert((book.name.clone(), key.clone()), at);
                }
            }
        }
        all
    }

    /// Queues a change to `secret` and waits until an update carried it (or failed).
    pub async fn submit(self: &Arc<Self>, secret: &str, change: Change) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let book = self.book(secret);
        book.queue().push((change, Some(tx)));
        book.bell.notify_one();
        rx.await.unwrap_or_else(|_| Err("the Secret's writer stopped".into()))
    }

    /// Queues a change to `secret` no one waits for: it goes with the next update, and again
    /// with the one after if that fails.
    pub fn enqueue(self: &Arc<Self>, secret: &str, change: Change) {
        let book = self.book(secret);
        book.queue().push((change, None));
        book.bell.notify_one();
    }

    /// After `key`'s token was written to `secret`: the key leaves every other Secret that
    /// still holds it (its customer was moved there by a reload; keys are unique over the
    /// configuration, so a copy elsewhere is stale).
    pub fn moved(self: &Arc<Self>, secret: &str, key: &str) {
        for book in self.books() {
            if book.name != secret && book.contents().data.contains_key(key) {
                debug!(key, from = %book.name, to = secret, "the key moved to another Secret: removing it");
                self.enqueue(&book.name.clone(), Change::Remove { key: key.to_owned() });
            }
        }
    }

    async fn write_loop(self: Arc<Self>, book: Arc<Book>, stop: CancellationToken) {
        // The earliest the next update may go.
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = book.bell.notified() => {}
            }
            let at = next.max(tokio::time::Instant::now() + SETTLE);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
            let batch = std::mem::take(&mut *book.queue());
            if batch.is_empty() {
                continue;
            }
            next = tokio::time::Instant::now() + WRITE_EVERY;
            let changes: Vec<Change> = batch.iter().map(|(c, _)| c.clone()).collect();
            let result = self.write(&book, &changes).await;
            match &result {
                Ok(()) => self.cluster.board.secret_written(&book.name),
                Err(e) => warn!(error = %e, secret = %book.name, changes = changes.len(), "cannot update the Secret"),
            }
            for (change, tx) in batch {
                match tx {
                    Some(tx) => {
                        let _ = tx.send(result.clone());
                    }
                    // Sent with the next update.
                    None if result.is_err() => book.queue().push((change, None)),
                    None => {}
                }
            }
        }
        for (_, tx) in std::mem::take(&mut *book.queue()) {
            if let Some(tx) = tx {
                let _ = tx.send(Err("stopping".into()));
            }
        }
    }

    /// One update of `book`'s Secret carrying `changes`, on what it holds now; only while this
    /// replica holds the Lease, and never after its deadline.
    async fn write(&self, book: &Book, changes: &[Change]) -> Result<(), String> {
        let name = &book.name;
        let written = update(
            &self.cluster,
            name,
            move || async move {
                let term = self.term.borrow().clone();
                let Some(until) = term.leading_until.filter(|_| term.leading()) else {
                    return Err("this replica does not hold the Lease: another one writes the Secret".into());
                };
                let within = until.saturating_duration_since(tokio::time::Instant::now());
                let mut next = book.contents().clone();
                for change in changes {
                    next.apply(change);
                }
                Ok(Update::Send { secret: Box::new(next.to_secret(name)), exists: next.exists, within, then: () })
            },
            // Someone else wrote it (an operator's forget-failures, a former holder's late
            // write), or deleted it: the changes go on what it holds now (or create it).
            move |e| {
                let conflict = matches!(e, ApiError::Conflict(_) | ApiError::AlreadyExists(_) | ApiError::NotFound(_));
                conflict.then_some(async move {
                    self.load_book(book).await.map_err(|e| format!("cannot read the Secret {name}: {e}"))
                })
            },
        )
        .await?;
        if let ((), Some(written)) = written {
            *book.contents() = Contents::from_secret(written);
        }
        Ok(())
    }
}

/// What one try of an update does, made from what the Secret holds.
enum Update<T> {
    /// Nothing to send: `T` is the answer.
    Done(T),
    /// Send `secret` (created where it does not `exist` yet), taking no longer than `within`;
    /// `then` is the answer once it is written. (Boxed: a `Secret` is some 500 bytes.)
    Send { secret: Box<Secret>, exists: bool, within: Duration, then: T },
}

/// Conditional updates of the Secret (`shown` in errors), tried again on a conflict, at most
/// [`MAX_CONFLICTS`] times: each try is made by `next`. `conflicted` hears every failed write:
/// `None` where it failed, else what to do before the next try (read the Secret again, where
/// `next` takes what was last read). Returns the answer, and the Secret as written, if anything
/// was.
async fn update<T, Next, Reread>(
    cluster: &Cluster,
    name: &str,
    mut next: impl FnMut() -> Next,
    mut conflicted: impl FnMut(&ApiError) -> Option<Reread>,
) -> Result<(T, Option<Secret>), String>
where
    Next: Future<Output = Result<Update<T>, String>>,
    Reread: Future<Output = Result<(), String>>,
{
    let (secrets, shown) = (&cluster.secrets, format!("{}/{name}", cluster.namespace));
    for _ in 0..MAX_CONFLICTS {
        let (secret, exists, within, then) = match next().await? {
            Update::Done(answer) => return Ok((answer, None)),
            Update::Send { secret, exists, within, then } => (secret, exists, within, then),
        };
        let written = match exists {
            true => {
                cluster.call("secret", "update", within, secrets.replace(name, &PostParams::default(), &secret)).await
            }
            false => cluster.call("secret", "create", within, secrets.create(&PostParams::default(), &secret)).await,
        };
        match written {
            Ok(secret) => return Ok((then, Some(secret))),
            Err(e) => match conflicted(&e) {
                Some(reread) => reread.await?,
                None => return Err(format!("cannot write the Secret {shown}: {e}")),
            },
        }
    }
    Err(format!("the Secret {shown} changed {MAX_CONFLICTS} times while being written"))
}

/// `forget-failures` with `output.kubernetes`: marks the ledger of each customer (its Secret,
/// its key there, and its username) as forgotten where [`ledger::forget`] says so (one update
/// of each Secret concerned, conditional on its resourceVersion, read again on a conflict), and
/// says for each what was done, in the order given. The Lease holder sees it at its next read of
/// the Secrets. A Secret that does not exist is an error: nothing can be forgotten there.
pub async fn forget(
    k: &crate::config::kubernetes::KubeSettings,
    customers: &[(&str, &str, &str)],
) -> Result<Vec<ledger::Forget>, String> {
    let cluster = Cluster::connect(k, crate::status::Board::new(), Some("forget-failures")).await?;
    let mut verdicts: Vec<Option<ledger::Forget>> = customers.iter().map(|_| None).collect();
    let secrets: std::collections::BTreeSet<&str> = customers.iter().map(|(secret, ..)| *secret).collect();
    for secret in secrets {
        let mine: Vec<usize> = (0..customers.len()).filter(|i| customers[*i].0 == secret).collect();
        let (found, _) = forget_in(&cluster, secret, &mine.iter().map(|i| customers[*i]).collect::<Vec<_>>()).await?;
        for (i, verdict) in mine.into_iter().zip(found) {
            verdicts[i] = Some(verdict);
        }
    }
    Ok(verdicts.into_iter().map(|v| v.expect("every customer's Secret was asked")).collect())
}

/// [`forget`] in the Secret `secret`, for its `customers`.
async fn forget_in(
    cluster: &Cluster,
    secret: &str,
    customers: &[(&str, &str, &str)],
) -> Result<(Vec<ledger::Forget>, Option<Secret>), String> {
    let name = format!("{}/{secret}", cluster.namespace);
    update(
        cluster,
        secret,
        || async {
            let read = cluster.call("secret", "get", super::REQUEST_TIMEOUT, cluster.secrets.get(secret)).await;
            let mut contents = match read {
                Ok(secret) => Contents::from_secret(secret),
                Err(ApiError::NotFound(_)) => {
                    return Err(format!(
                        "the Secret {name} does not exist: nothing is recorded there, nothing was forgotten (check output.kubernetes.namespace, the Secret's name, and the kubeconfig's context)"
                    ))
                }
                Err(e) => return Err(format!("cannot read the Secret {name}: {e}")),
            };
            let verdicts: Vec<ledger::Forget> =
                customers.iter().map(|(_, key, username)| ledger::forget(contents.ledger(key), username)).collect();
            for ((_, key, username), verdict) in customers.iter().zip(&verdicts) {
                if let ledger::Forget::Forget { .. } = verdict {
                    let entry = Some(Record::forgotten(username));
                    contents.apply(&Change::Ledger { key: (*key).to_owned(), entry });
                }
            }
            if !verdicts.iter().any(|v| matches!(v, ledger::Forget::Forget { .. })) {
                return Ok(Update::Done(verdicts));
            }
            let written = Box::new(contents.to_secret(secret));
            Ok(Update::Send { secret: written, exists: contents.exists, within: super::REQUEST_TIMEOUT, then: verdicts })
        },
        // Read again by the next try.
        |e| matches!(e, ApiError::Conflict(_)).then_some(std::future::ready(Ok(()))),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::from_unix_secs;

    fn token(key: &str, text: &str, expires: i64) -> Change {
        Change::Token {
            key: key.into(),
            content: zeroize::Zeroizing::new(text.as_bytes().to_vec()),
            times: Times { obtained_at: from_unix_secs(expires - 3600), expires_at: from_unix_secs(expires) },
        }
    }

    #[test]
    fn a_token_only_ever_replaces_an_older_one() {
        let mut c = Contents::default();
        c.apply(&token("alice", "new", 2_000_000_000));
        c.apply(&token("alice", "older", 1_999_999_000));
        assert_eq!(c.data["alice"].0, b"new", "a late write of a token obtained earlier");
        c.apply(&token("alice", "newer", 2_000_000_100));
        assert_eq!(c.data["alice"].0, b"newer");
        assert_eq!(c.times["alice"].expires_at, from_unix_secs(2_000_000_100));
    }

    #[test]
    fn only_a_token_in_the_data_has_an_expiry_whatever_the_annotation_says() {
        let times = Times { obtained_at: from_unix_secs(1_999_996_400), expires_at: from_unix_secs(2_000_000_000) };
        let hour = Duration::from_secs(3600);
        let mut c = Contents::default();
        c.times.insert("alice".into(), times);
        assert_eq!(c.expiry("alice", hour), None, "times, no data");
        for (content, why) in [(&b"not a token!"[..], "not a token's form"), (b"", "empty"), (b"\xff\xfe", "not text")]
        {
            c.data.insert("alice".into(), ByteString(content.to_vec()));
            assert_eq!(c.expiry("alice", hour), None, "{why}");
        }
        c.data.insert("alice".into(), ByteString(b"q3w8e7r6t5y4u3i2o1p0".to_vec()));
        assert_eq!(c.expiry("alice", hour), Some(times.expires_at), "a token with its times");
        c.apply(&token("bob", "Authorization: Bearer b0b", 2_000_000_000));
        assert_eq!(c.expiry("bob", hour), Some(from_unix_secs(2_000_000_000)), "in another format");
        c.data.insert("carol".into(), ByteString(b"c4r0l".to_vec()));
        assert_eq!(c.expiry("carol", hour), None, "a token without its times");
        // An annotation that says 2099 over an opaque token obtained an hour ago: the token's
        // own lifetime counts, not the annotation.
        let edited = Times { obtained_at: times.obtained_at, expires_at: from_unix_secs(4_070_908_800) };
        c.times.insert("alice".into(), edited);
        assert_eq!(c.expiry("alice", hour), Some(times.obtained_at + hour), "never later than the token says");
    }

    #[test]
    fn the_secret_round_trips_tokens_times_and_ledgers_and_keeps_foreign_metadata() {
        let mut c = Contents::default();
        c.meta.labels = Some([("team".to_string(), "shop".to_string())].into());
        c.meta.resource_version = Some("42".into());
        c.apply(&token("alice", "t1", 2_000_000_000));
        let entry =
            Record { username: "bob@x".into(), in_a_row: 2, chain: 2, last_failure: 1_999_000_000, forgotten: false };
        c.apply(&Change::Ledger { key: "bob".into(), entry: Some(entry.clone()) });
        let secret = c.to_secret("magento-tokens");
        assert_eq!(secret.metadata.name.as_deref(), Some("magento-tokens"));
        assert_eq!(secret.metadata.resource_version.as_deref(), Some("42"), "a conditional update");
        let annotations = secret.metadata.annotations.clone().unwrap();
        assert_eq!(
            annotations[TIMES],
            r#"{"alice":{"obtained_at":"2033-05-18T02:33:20Z","expires_at":"2033-05-18T03:33:20Z"}}"#
        );
        assert!(!annotations[LEDGER].contains("password"));
        let back = Contents::from_secret(secret);
        assert_eq!(back.data["alice"].0, b"t1");
        assert_eq!(back.ledger("bob"), Some(Ok(entry)));
        assert_eq!(back.meta.labels.as_ref().unwrap()["team"], "shop");
        let mut cleared = back.clone();
        cleared.apply(&Change::Ledger { key: "bob".into(), entry: None });
        assert!(!cleared.to_secret("s").metadata.annotations.unwrap().contains_key(LEDGER));
    }

    /// An API server whose update of the Secret answers 409 Conflict `conflicts` times, then
    /// succeeds; and the cluster that reaches it.
    async fn conflicting(conflicts: usize) -> (Cluster, Arc<Mutex<usize>>) {
        use axum::http::StatusCode;
        let updates = Arc::new(Mutex::new(0));
        let seen = updates.clone();
        let answer = move |body: axum::body::Bytes| async move {
            let mut updates = seen.lock().unwrap();
            *updates += 1;
            match *updates <= conflicts {
                true => (
                    StatusCode::CONFLICT,
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409}"#.into(),
                ),
                false => (StatusCode::OK, body.to_vec()),
            }
        };
        let router = axum::Router::new().route("/api/v1/namespaces/ns/secrets/s", axum::routing::put(answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let settings = crate::config::kubernetes::KubeSettings {
            secret: "s".into(),
            namespace: Some("ns".into()),
            lease: "l".into(),
            lease_duration: Duration::from_secs(15),
            token_api: false,
        };
        let cluster = Cluster {
            secrets: crate::cluster::api::Objects::namespaced(client.clone(), "ns", crate::cluster::api::SECRET_LIMIT),
            leases: crate::cluster::api::Objects::namespaced(client, "ns", crate::cluster::api::LEASE_LIMIT),
            settings,
            namespace: "ns".into(),
            identity: "test".into(),
            board: crate::status::Board::new(),
        };
        (cluster, updates)
    }

    /// What `update` makes of `conflicts` 409s in a row: its answer, and how many updates were
    /// sent and how many times the Secret was read again.
    async fn update_through(conflicts: usize) -> (Result<&'static str, String>, usize, usize) {
        let (cluster, updates) = conflicting(conflicts).await;
        let rereads = Mutex::new(0);
        let send = || async {
            let secret = Box::new(Contents { exists: true, ..Contents::default() }.to_secret("s"));
            Ok(Update::Send { secret, exists: true, within: crate::cluster::REQUEST_TIMEOUT, then: "written" })
        };
        let reread = |e: &ApiError| {
            *rereads.lock().unwrap() += 1;
            matches!(e, ApiError::Conflict(_)).then_some(std::future::ready(Ok(())))
        };
        let answer = update(&cluster, "s", send, reread).await.map(|(answer, _)| answer);
        let updates = *updates.lock().unwrap();
        (answer, updates, rereads.into_inner().unwrap())
    }

    #[tokio::test]
    async fn an_update_is_tried_again_on_each_conflict_up_to_a_bound() {
        let within = MAX_CONFLICTS as usize - 1;
        assert_eq!(update_through(within).await, (Ok("written"), within + 1, within));
        let endless = update_through(usize::MAX).await;
        let expected = format!("the Secret ns/s changed {MAX_CONFLICTS} times while being written");
        assert_eq!(endless, (Err(expected), MAX_CONFLICTS as usize, MAX_CONFLICTS as usize));
    }

    fn with_ledger(annotation: &str) -> Contents {
        let meta = ObjectMeta {
            annotations: Some([(LEDGER.to_string(), annotation.to_string())].into()),
            ..ObjectMeta::default()
        };
        Contents::from_secret(Secret { metadata: meta, ..Secret::default() })
    }

    #[test]
    fn a_damaged_ledger_entry_is_its_keys_alone_and_is_kept_as_it_was() {
        let good = r#"{"username":"alice@x","in_a_row":3,"chain":3,"last_failure":1999000000}"#;
        let c = with_ledger(&format!(r#"{{"alice":{good},"nobody":{{"chain":"many"}},"bob":[1]}}"#));
        assert!(matches!(c.ledger("alice"), Some(Ok(r)) if r.chain == 3), "the good entry is read");
        assert!(c.ledger("bob").unwrap().is_err(), "bob's entry is damaged");
        assert_eq!(c.ledger("carol"), None, "no entry, no record");
        // Written back: the damaged entries as they were, the good one, and a change.
        let mut c = c;
        c.apply(&Change::Ledger { key: "carol".into(), entry: Some(Record::forgotten("carol@x")) });
        let back = Contents::from_secret(c.to_secret("s"));
        assert_eq!(back.ledgers["nobody"], LedgerEntry::Damaged(serde_json::json!({"chain": "many"})));
        assert!(back.ledger("bob").unwrap().is_err());
        assert!(matches!(back.ledger("alice"), Some(Ok(r)) if r.chain == 3));
    }

    #[test]
    fn a_ledger_annotation_that_does_not_parse_is_kept_and_counts_for_every_key_without_an_entry() {
        let c = with_ledger("{not json");
        assert!(c.ledger("alice").unwrap().is_err());
        let mut c = c;
        c.apply(&Change::Ledger { key: "bob".into(), entry: Some(Record::forgotten("bob@x")) });
        let secret = c.to_secret("s");
        let annotations = secret.metadata.annotations.clone().unwrap();
        assert_eq!(annotations[LEDGER_UNREADABLE], "{not json");
        let mut back = Contents::from_secret(secret);
        assert!(back.ledger("alice").unwrap().is_err(), "still unknown after a write");
        assert!(matches!(back.ledger("bob"), Some(Ok(r)) if r.forgotten), "an entry of its own is read");
        // Bob's forgotten count taken, then cleared: he keeps an empty entry of his own, read as
        // nothing recorded, not as unreadable again.
        back.apply(&Change::Ledger { key: "bob".into(), entry: None });
        let again = Contents::from_secret(back.to_secret("s"));
        let judged = again
            .ledger("bob")
            .map(|read| crate::ledger::judge(read, "bob@x", "bob", std::time::SystemTime::now(), &Default::default()));
        assert_eq!(judged, Some(crate::ledger::Recorded::Nothing));
    }
}
