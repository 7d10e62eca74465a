//! Token files: atomic replacement, and reading back what a previous run left.
//!
//! A file is replaced by writing a temporary file in the same directory (its owner and mode set
//! before any content, and before it has a name: no other user can read it at any moment, and
//! no one sees it with another owner), syncing it, renaming it over the old one and syncing the
//! directory. A reader sees the old token or the new one, never a mix or an empty file, and a
//! token is durable before it is reported written.
//!
//! Every local file is read without blocking and up to a limit ([`read_regular`]): a FIFO, a
//! device or a file of a gigabyte where a password, a token or a ledger is expected is refused,
//! not waited on or read whole. The token file and the ledger are never read through a symbolic
//! link (anyone who can write to the directory could plant one); writes replace a link by a
//! rename, never write through it. [`DirLock`] keeps a second daemon out of the directory.

use std::fs::{File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid, CWD};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use tracing::warn;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The shape of a token file (`output.format`, a customer's `format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The token alone, no newline.
    #[default]
    Raw,
    /// `{"customer":..,"token":..,"obtained_at":..,"expires_at":..}`
    Json,
    /// `Authorization: Bearer <token>`, no newline: a ready-made HTTP header line.
    Header,
    /// `MAGENTO_TOKEN=<token>` and `MAGENTO_TOKEN_EXPIRES_AT=<RFC 3339>`, each line ending in a
    /// newline: for `source` (sh) and `docker --env-file`.
    Env,
}
/// Temporary files are named `.<file>.<random>.tmp`; names starting with `.` are refused for
/// token files, so these never collide with one.
const TMP_SUFFIX: &str = ".tmp";
/// Random alphanumeric characters between the two.
const TMP_RANDOM: usize = 6;

fn tmp_prefix(file_name: &str) -> String {
    format!(".{file_name}.")
}

/// What a `header` file holds before the token.
pub const HEADER_PREFIX: &str = "Authorization: Bearer ";
/// The names of the two lines of an `env` file.
pub const ENV_TOKEN: &str = "MAGENTO_TOKEN";
pub const ENV_EXPIRES_AT: &str = "MAGENTO_TOKEN_EXPIRES_AT";

/// The bytes of a token file in the configured format:
///
/// - `raw`: the token alone, no newline;
/// - `json`: `{"customer":..,"token":..,"obtained_at":..,"expires_at":..}`, no newline;
/// - `header`: `Authorization: Bearer <token>`, no newline (an HTTP header line, for `curl -H
///   @file` or a proxy's header file);
/// - `env`: `MAGENTO_TOKEN=<token>` and `MAGENTO_TOKEN_EXPIRES_AT=<RFC 3339>`, each line ending in
///   a newline, as a text file does (`source` in sh, `docker --env-file`, systemd's
///   `EnvironmentFile` all read it). No quotes: docker and systemd would keep them as part of the
///   value, and a token's characters (RFC 6750 `b64token`) and the time need none in sh.
///
/// Every buffer is allocated at its final size, so no copy of the token is left in memory freed
/// by growing it.
pub fn render(
    format: Format,
    customer: &str,
    token: &Secret,
    obtained_at: SystemTime,
    expires_at: SystemTime,
) -> Zeroizing<Vec<u8>> {
    let token = token.expose();
    let concat = |parts: &[&str]| {
        let mut bytes = Zeroizing::new(Vec::with_capacity(parts.iter().map(|p| p.len()).sum()));
        for part in parts {
            bytes.extend_from_slice(part.as_bytes());
        }
        bytes
    };
    match format {
        Format::Raw => concat(&[token]),
        Format::Header => concat(&[HEADER_PREFIX, token]),
        Format::Env => {
            let expires_at = rfc3339(expires_at);
            concat(&[ENV_TOKEN, "=", token, "\n", ENV_EXPIRES_AT, "=", &expires_at, "\n"])
        }
        Format::Json => {
            #[derive(Serialize)]
            struct JsonFile<'a> {
                customer: &'a str,
                token: &'a str,
                obtained_at: String,
                expires_at: String,
            }
            let file = JsonFile { customer, token, obtained_at: rfc3339(obtained_at), expires_at: rfc3339(expires_at) };
            // Room for the keys and quotes around what varies: a customer's name and a token
            // need no escaping (their characters are restricted), so this is never outgrown.
            let mut bytes = Zeroizing::new(Vec::with_capacity(
                96 + customer.len() + token.len() + file.obtained_at.len() + file.expires_at.len(),
            ));
            serde_json::to_writer(&mut *bytes, &file).expect("strings always serialize");
            bytes
        }
    }
}

/// `2026-11-28T10:00:00Z`. Times outside the years 1970 to 9999 (which humantime cannot
/// write, and panics on) are shown at the nearer edge: a log line must never bring a worker down.
pub fn rfc3339(t: SystemTime) -> String {
    let last = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(std::time::UNIX_EPOCH, last)).to_string()
}

/// When a token was obtained and when it expires: what a write records, in either store (the
/// Secret keeps it in an annotation, in RFC 3339).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Times {
    #[serde(with = "rfc3339")]
    pub obtained_at: SystemTime,
    #[serde(with = "rfc3339")]
    pub expires_at: SystemTime,
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// The most read of a token file: a token is at most 8 KiB, the json format adds little.
pub const MAX_TOKEN_FILE: usize = 64 * 1024;

/// Why a local file was not read. Shown after the file's path: `/x/y is a FIFO, not a regular file`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot be read: {0}")]
    Io(#[from] io::Error),
    #[error("is a symbolic link, not followed")]
    Symlink,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is larger than {}, the most it may hold", size(*.0))]
    TooLarge(usize),
}

impl ReadError {
    /// There is no file at the path (not worth a warning where a file is optional).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// `4 KiB`, `64 KiB`, `4 MiB`, or bytes.
fn size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// What a file is, when it is not a regular file.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "a special file"
    }
}

/// Reads the regular file at `path`, at most `limit` bytes, without ever blocking: it is opened
/// with `O_NONBLOCK` (a FIFO would otherwise wait for a writer forever, and with it the whole
/// runtime) and refused unless the opened file is a regular one; a file larger than `limit` (or
/// one that grows past it while read) is refused. With `follow_links` false, a symbolic link at
/// `path` is refused (`O_NOFOLLOW`). Returns the content and the opened file's metadata.
///
/// The buffer is allocated once, never grown (no copy of a secret is left in freed memory), and
/// wiped on release.
pub fn read_regular(
    path: &Path,
    limit: usize,
    follow_links: bool,
) -> Result<(Zeroizing<Vec<u8>>, std::fs::Metadata), ReadError> {
    let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    if !follow_links {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP if !follow_links => ReadError::Symlink,
        e => ReadError::Io(e.into()),
    })?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > limit as u64 {
        return Err(ReadError::TooLarge(limit));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(limit + 1));
    // A first read of as much as the file held when opened; a regular file that answers with
    // exactly its size is read whole (no second read just to see its end: a password is read
    // twice per login in `once`, and these are a tenth of its system calls). Anything else
    // (shorter, or a file that grew) is read on to its end, up to the limit.
    let size = meta.len() as usize;
    bytes.resize(size + 1, 0);
    let first = (&file).read(&mut bytes[..size + 1])?;
    bytes.truncate(first);
    if first != size || size == 0 {
        (&file).take(limit as u64 + 1 - first as u64).read_to_end(&mut bytes)?;
    }
    if bytes.len() > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok((bytes, meta))
}

/// The owner and group of every file written (`output.uid`, `output.gid`); `None` leaves the
/// one a new file gets (the daemon's user; its group, or the directory's if set-group-ID).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Owner {
    pub fn is_set(&self) -> bool {
        self.uid.is_some() || self.gid.is_some()
    }

    /// Whether a file owned by `uid`:`gid` has this owner (what is not configured matches).
    pub fn holds(&self, uid: u32, gid: u32) -> bool {
        self.uid.is_none_or(|u| u == uid) && self.gid.is_none_or(|g| g == gid)
    }
}

/// `uid 1000 and gid 2000`, `uid 1000`, `gid 2000`, `its creator`.
impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.gid) {
            (Some(u), Some(g)) => write!(f, "uid {u} and gid {g}"),
            (Some(u), None) => write!(f, "uid {u}"),
            (None, Some(g)) => write!(f, "gid {g}"),
            (None, None) => f.write_str("its creator"),
        }
    }
}

/// What a file gets before any content is written: its mode (whatever the umask) and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub mode: u32,
    pub owner: Owner,
}

impl Perms {
    /// The daemon's own file (the 401 ledger): mode 0600, with the configured owner.
    pub fn private(owner: Owner) -> Perms {
        Perms { mode: 0o600, owner }
    }
}

/// Replaces `path` with `content` atomically, with `perms` set before any content is written.
/// With `sync_dir` false the caller syncs the directory itself (one sync for a batch).
///
/// The temporary file is made without a name (`O_TMPFILE`): it gets its owner, its mode and
/// its content, is synced, and only then is linked into the directory as `.<file>.<random>.tmp`
/// and renamed over `path`. Whoever lists or watches the directory never sees a file with
/// another owner, another mode or part of its content, even for an instant. The owner comes
/// before the mode: while the file is still the daemon's, mode 0600 lets no one else open it.
///
/// Where the file system has no `O_TMPFILE` (or `/proc` is not mounted to link the file
/// through), the temporary file is created by name with `O_CREAT | O_EXCL` and mode 0600, and
/// given its owner and mode at once: for the instant between, it is an empty file only the
/// daemon's user can open. Either way nothing planted under the temporary name is opened, and
/// the rename replaces whatever is at `path` (a symbolic link or a FIFO included) without
/// writing through it.
pub fn write_atomic(path: &Path, perms: Perms, content: &[u8], durability: Durability) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the token path has no file name"))?;
    let dir = open_directory(parent(path))?;
    write_atomic_at(&dir, name, perms, content, durability)
}

/// What a write makes durable before it returns: the one vocabulary of durability, for files
/// and (where it applies) the store above them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The file and the directory: durable when it returns (a worker's write).
    Now,
    /// The file only: the caller syncs the directory once for a batch.
    FileOnly,
    /// Nothing: the caller makes a whole batch durable at once with [`sync_file_system`]
    /// before it reports any of it written (`once`: on a disk, one sync instead of one per
    /// file; the contract lets a batch share one).
    Batch,
}

/// [`write_atomic`] of the file `name` in the opened directory `dir` (a caller writing many
/// files in one directory opens it once).
pub fn write_atomic_at(dir: &File, name: &str, perms: Perms, content: &[u8], durability: Durability) -> io::Result<()> {
    let tmp = temporary(dir, name, perms, content, durability != Durability::Batch)?;
    if let Err(e) = rustix::fs::renameat(dir, &tmp, dir, name) {
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
        return Err(e.into());
    }
    if durability == Durability::Now {
        dir.sync_all()?;
    }
    Ok(())
}

/// The output directory, opened for [`write_atomic_at`].
pub fn open_dir(dir: &Path) -> io::Result<File> {
    open_directory(dir)
}

/// Makes everything written to the file system holding `dir` durable (syncfs(2)): the end of a
/// batch written with [`Durability::Batch`]. An error means some write may not be.
pub fn sync_file_system(dir: &File) -> io::Result<()> {
    Ok(rustix::fs::syncfs(dir)?)
}

/// A temporary file for `name` in `dir`, with its owner, mode and content (synced with
/// `sync_file`): its name.
fn temporary(dir: &File, name: &str, perms: Perms, content: &[u8], sync_file: bool) -> io::Result<String> {
    let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
    match rustix::fs::openat(dir, ".", flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => {
            let mut file = File::from(fd);
            fill(&mut file, perms, content, sync_file)?;
            for _ in 0..8 {
                let tmp = tmp_name(name);
                match link_tmpfile(&file, dir, &tmp) {
                    Ok(()) => return Ok(tmp),
                    Err(Errno::EXIST) => continue,
                    // No /proc (or the directory is gone: then the named way fails alike).
                    Err(Errno::NOENT) => return named_temporary(dir, name, perms, content, sync_file),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(io::Error::other("no free name for a temporary file"))
        }
        // No O_TMPFILE on this file system (or kernel).
        Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => named_temporary(dir, name, perms, content, sync_file),
        Err(e) => Err(e.into()),
    }
}

/// Set once `linkat(AT_EMPTY_PATH)` was refused: the kernel (before 6.10) wants
/// CAP_DAC_READ_SEARCH for it, so every later link goes through /proc at once.
static NO_EMPTY_PATH_LINK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Names an `O_TMPFILE` file `tmp` in `dir`. `linkat(fd, "", AT_EMPTY_PATH)` where the kernel
/// allows it to the file's opener (Linux 6.10 and later), else `linkat` of its /proc path,
/// which costs a walk through /proc (a tenth of a write's CPU, measured in benches/RESULTS.md).
fn link_tmpfile(file: &File, dir: &File, tmp: &str) -> rustix::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    if !NO_EMPTY_PATH_LINK.load(Relaxed) {
        match rustix::fs::linkat(file, "", dir, tmp, AtFlags::EMPTY_PATH) {
            Err(Errno::PERM | Errno::NOENT | Errno::INVAL | Errno::ACCESS) => NO_EMPTY_PATH_LINK.store(true, Relaxed),
            done => return done,
        }
    }
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(CWD, proc_path.as_str(), dir, tmp, AtFlags::SYMLINK_FOLLOW)
}

/// A temporary file made by name: see [`write_atomic`]. Removed again on failure.
fn named_temporary(dir: &File, name: &str, perms: Perms, content: &[u8], sync_file: bool) -> io::Result<String> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..8 {
        let tmp = tmp_name(name);
        let fd = match rustix::fs::openat(dir, tmp.as_str(), flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        };
        return match fill(&mut File::from(fd), perms, content, sync_file) {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
                Err(e)
            }
        };
    }
    Err(io::Error::other("no free name for a temporary file"))
}

/// Gives a new file its owner, then its mode (fchmod, not the mode argument of open(2): the
/// umask cannot narrow or widen it), then its content, and syncs it (with `sync`).
fn fill(file: &mut File, perms: Perms, content: &[u8], sync: bool) -> io::Result<()> {
    if perms.owner.is_set() {
        rustix::fs::fchown(&*file, perms.owner.uid.map(Uid::from_raw), perms.owner.gid.map(Gid::from_raw))?;
    }
    file.set_permissions(Permissions::from_mode(perms.mode))?;
    file.write_all(content)?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// `.<name>.<random>.tmp`
fn tmp_name(name: &str) -> String {
    use rand::Rng;
    let random: String =
        rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(TMP_RANDOM).map(char::from).collect();
    format!("{}{random}{TMP_SUFFIX}", tmp_prefix(name))
}

fn open_directory(dir: &Path) -> io::Result<File> {
    // O_DIRECTORY: whatever else may be found at the path (a FIFO) is refused, never waited on.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::open(dir, flags, Mode::empty())?))
}

pub fn sync_directory(dir: &Path) -> io::Result<()> {
    open_directory(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Deletes temporary files a killed process may have left for `path`. Returns how many.
pub fn remove_stale_temporaries(path: &Path) -> usize {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return 0 };
    let prefix = tmp_prefix(name);
    let Ok(entries) = std::fs::read_dir(parent(path)) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            // Exactly the shape write_atomic makes: the temporaries of file `a.x` (`.a.x.…`)
            // are not those of file `a`.
            n.strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(TMP_SUFFIX))
                .is_some_and(|random| random.len() == TMP_RANDOM && random.bytes().all(|b| b.is_ascii_alphanumeric()))
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// A token found in a file written earlier.
#[derive(Debug)]
pub struct OnDisk {
    pub token: Secret,
    /// The expiry recorded in a `json` or `env` file.
    pub expires_at: Option<SystemTime>,
    /// When the file was written: with an opaque token in a `raw` file, the best guess of when it
    /// was obtained.
    pub modified: SystemTime,
    /// The format it was written in, and its mode: a reload may have changed either.
    pub format: Format,
    pub mode: u32,
    /// The file's owner and group.
    pub uid: u32,
    pub gid: u32,
}

impl OnDisk {
    /// Whether only this process's user (or root) could have written the file: owned by the
    /// effective user, writable by no one else. In a directory others can write to, anything
    /// else may have been put there by someone else.
    pub fn ours(&self) -> bool {
        self.uid == rustix::process::geteuid().as_raw() && self.mode & 0o022 == 0
    }
}

/// Reads the token in `path`, in any format (the format may have changed since it was
/// written). `None` when there is no file or it holds no token of the accepted form. A symbolic
/// link, a FIFO, a device or a file over [`MAX_TOKEN_FILE`] at `path` is no token either, with
/// a warning: it is not what this daemon writes.
pub fn read_existing(path: &Path) -> Option<OnDisk> {
    let (bytes, meta) = match read_regular(path, MAX_TOKEN_FILE, false) {
        Ok(read) => read,
        Err(e) if e.is_not_found() => return None,
        Err(e) => {
            warn!("{} {e}: taken as no token (a login writes a new file in its place)", path.display());
            return None;
        }
    };
    let (token, expires_at, format) = parse_token_content(&bytes)?;
    crate::token::check_form(token.expose()).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    Some(OnDisk { token, expires_at, modified: meta.modified().ok()?, format, mode, uid: meta.uid(), gid: meta.gid() })
}

/// The token in a file's bytes, the expiry it records (`json`, `env`) and its format, told by
/// its shape: a JSON object, the header's prefix, the two lines of `env`, else the token alone.
/// The token's form is not checked here.
pub fn parse_token_content(bytes: &[u8]) -> Option<(Secret, Option<SystemTime>, Format)> {
    #[derive(Deserialize)]
    struct JsonFile {
        token: String,
        expires_at: Option<String>,
    }
    let time = |t: &str| humantime::parse_rfc3339(t).ok();
    if let Ok(json) = serde_json::from_slice::<JsonFile>(bytes) {
        let expires_at = json.expires_at.as_deref().and_then(time);
        return Some((Secret::new(json.token), expires_at, Format::Json));
    }
    let text = std::str::from_utf8(bytes).ok()?;
    if let Some(token) = text.strip_prefix(HEADER_PREFIX) {
        return Some((Secret::new(token.to_owned()), None, Format::Header));
    }
    let env = || {
        let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
        let token = lines.next()?.strip_prefix(ENV_TOKEN)?.strip_prefix('=')?;
        let expires_at = lines.next()?.strip_prefix(ENV_EXPIRES_AT)?.strip_prefix('=')?;
        lines.next().is_none().then(|| (Secret::new(token.to_owned()), time(expires_at), Format::Env))
    };
    // (A lone token may start like an env file: `MAGENTO_TOKEN=` is a b64token too.)
    Some(env().unwrap_or_else(|| (Secret::new(text.to_owned()), None, Format::Raw)))
}

/// The lock file in the output directory (a name starting with `.`: never a token file).
pub const LOCK_FILE: &str = ".magento-token-sidecar.lock";

/// An exclusive lock on an output directory, held for the life of `run` (across reloads that
/// keep the directory) and of `once`: a second daemon on the same directory would sweep the
/// first one's temporary files mid-write and race it for every file. It is an `flock` on
/// [`LOCK_FILE`], which records the holder's pid and host name; the kernel releases it when the
/// process ends, however it ends. A clean release also removes the file.
#[derive(Debug)]
pub struct DirLock {
    /// The lock lives as long as this descriptor.
    _file: File,
    path: PathBuf,
    /// The lock file's and the directory's (device, inode).
    file_id: (u64, u64),
    dir_id: (u64, u64),
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is in use by magento-token-sidecar {holder}; two daemons must not share an output directory", dir.display())]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock the output directory with {}: {source}", path.display())]
    Failed { path: PathBuf, source: io::Error },
}

fn id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl DirLock {
    /// Takes the lock on `dir`, or says who holds it. Never waits.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let failed = |source: io::Error| LockError::Failed { path: path.clone(), source };
        // A holder that stops removes the file while still holding it: a lock taken on a file
        // already removed is taken again on the one now at the path.
        for _ in 0..8 {
            // Held through a read-only descriptor (flock needs no more): a descriptor open for
            // writing would keep the filesystem from being remounted read-only. Mode 0600, as
            // every file here: nothing in the directory is readable by others.
            let flags = OFlags::RDONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
            let fd = rustix::fs::open(&path, flags | OFlags::NOCTTY, Mode::from_raw_mode(0o600))
                .map_err(|e| failed(e.into()))?;
            let file = File::from(fd);
            let meta = file.metadata().map_err(failed)?;
            if !meta.is_file() {
                return Err(failed(io::Error::other(format!("it is {}, not a regular file", kind(meta.file_type())))));
            }
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Held { dir: dir.to_path_buf(), holder: holder(&file) })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
            }
            if !std::fs::symlink_metadata(&path).is_ok_and(|now| id(&now) == id(&meta)) {
                continue;
            }
            // Only to name the holder to a daemon turned away: the lock holds without it (on a
            // full disk, say).
            if let Err(e) = record_holder(&path, id(&meta)) {
                warn!(error = %e, "cannot record this process in {}: a second daemon will not be told which one holds the directory", path.display());
            }
            let dir_id = std::fs::metadata(dir).map(|m| id(&m)).map_err(failed)?;
            return Ok(DirLock { _file: file, path, file_id: id(&meta), dir_id });
        }
        Err(failed(io::Error::other("the lock file keeps being replaced")))
    }

    /// Whether this lock is on `dir` (the same directory, whatever path names it).
    pub fn covers(&self, dir: &Path) -> bool {
        std::fs::metadata(dir).is_ok_and(|m| id(&m) == self.dir_id)
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still locked (the descriptor closes after this), and only if it is still
        // this lock's file.
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| id(&m) == self.file_id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes this process's pid and host name into the lock file `path` (the file `file_id`, just
/// locked), through a descriptor closed at once.
fn record_holder(path: &Path, file_id: (u64, u64)) -> io::Result<()> {
    let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let file = File::from(rustix::fs::open(path, flags, Mode::empty())?);
    if id(&file.metadata()?) != file_id {
        return Err(io::Error::other("the lock file was replaced"));
    }
    file.set_len(0)?;
    file.write_all_at(format!("pid {}\nhost {}\n", std::process::id(), host_name()).as_bytes(), 0)
}

/// `pid 1234 on host x`, from the holder's lock file (read through the descriptor the failed
/// attempt opened); its text is shown printable and short, whoever wrote it.
fn holder(file: &File) -> String {
    let mut buf = [0u8; 256];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().chars().filter(|c| c.is_ascii_graphic()).take(64).collect::<String>())
    };
    match (field("pid "), field("host ")) {
        (Some(pid), Some(host)) if !pid.is_empty() => format!("pid {pid} on host {host}"),
        _ => "(its lock file does not say which process yet)".into(),
    }
}

fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_beyond_what_rfc3339_can_write_do_not_panic() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(rfc3339(epoch - Duration::from_secs(1)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(epoch + Duration::from_secs(1 << 40)), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(epoch + Duration::from_secs(1_795_860_000)), "2026-11-28T10:00:00Z");
    }

    #[test]
    fn raw_is_the_token_alone() {
        let t = Secret::new("abc.def".into());
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(&render(Format::Raw, "alice", &t, now, now)[..], b"abc.def");
    }

    #[test]
    fn json_has_customer_token_and_times() {
        let t = Secret::new("abc.def".into());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_860_000);
        let bytes = render(Format::Json, "alice", &t, at, at + Duration::from_secs(3600));
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"customer":"alice","token":"abc.def","obtained_at":"2026-11-28T10:00:00Z","expires_at":"2026-11-28T11:00:00Z"}"#
        );
    }

    #[test]
    fn writes_with_the_exact_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        for mode in [0o600, 0o640, 0o444] {
            write_atomic(&path, only_mode(mode), b"token-1", Durability::Now).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode);
            assert_eq!(std::fs::read(&path).unwrap(), b"token-1");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The contract's rename over the old file, for the first write too: an app waiting for
    /// `IN_MOVED_TO` (`inotifywait -e moved_to`) sees every token arrive, and never a file
    /// created at the token's name.
    #[test]
    fn every_token_arrives_by_a_rename_the_first_too() {
        use rustix::fs::inotify;
        let dir = tempfile::tempdir().unwrap();
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        inotify::add_watch(&watch, dir.path(), inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::CREATE).unwrap();
        let path = dir.path().join("alice");
        write_atomic(&path, only_mode(0o600), b"token-1", Durability::Now).unwrap();
        write_atomic(&path, only_mode(0o600), b"token-2", Durability::Now).unwrap();
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut events = inotify::Reader::new(&watch, &mut buf);
        let mut at_name = Vec::new();
        while let Ok(event) = events.next() {
            if event.file_name().is_some_and(|n| n.to_bytes() == b"alice") {
                at_name.push(event.events());
            }
        }
        assert_eq!(at_name, [inotify::ReadFlags::MOVED_TO, inotify::ReadFlags::MOVED_TO]);
    }

    fn only_mode(mode: u32) -> Perms {
        Perms { mode, owner: Owner::default() }
    }

    fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777)
    }

    /// An owner this process may give files to: a stranger as root, else its own ids.
    fn given_owner() -> (u32, u32) {
        match rustix::process::geteuid().is_root() {
            true => (4321, 8765),
            false => (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()),
        }
    }

    #[test]
    fn writes_with_the_configured_owner_by_either_way_of_making_the_temporary() {
        let (uid, gid) = given_owner();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        let perms = Perms { mode: 0o640, owner: Owner { uid: Some(uid), gid: Some(gid) } };
        write_atomic(&path, perms, b"token-1", Durability::Now).unwrap();
        assert_eq!(owner_and_mode(&path), (uid, gid, 0o640));
        assert_eq!(std::fs::read(&path).unwrap(), b"token-1");
        // The group alone: the owner stays the creator.
        let group_only = Perms { mode: 0o600, owner: Owner { uid: None, gid: Some(gid) } };
        write_atomic(&path, group_only, b"token-2", Durability::Now).unwrap();
        assert_eq!(owner_and_mode(&path), (rustix::process::geteuid().as_raw(), gid, 0o600));
        // The way taken where the file system has no O_TMPFILE.
        let open = open_directory(dir.path()).unwrap();
        let tmp = named_temporary(&open, "bob", perms, b"token-3", true).unwrap();
        assert!(tmp.starts_with(".bob.") && tmp.ends_with(".tmp"), "{tmp}");
        assert_eq!(owner_and_mode(&dir.path().join(&tmp)), (uid, gid, 0o640));
        assert_eq!(std::fs::read(dir.path().join(&tmp)).unwrap(), b"token-3");
        std::fs::remove_file(dir.path().join(tmp)).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
    }

    /// A chown the kernel refuses at run time (no CAP_CHOWN: dropped here for this thread
    /// alone) fails the write: the old file stays, no temporary is left, by either way.
    #[test]
    fn a_refused_chown_fails_the_write_and_keeps_the_old_file() {
        std::thread::spawn(|| {
            use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
            let mut caps = capabilities(None).unwrap();
            caps.effective.remove(CapabilitySet::CHOWN);
            set_capabilities(None, caps).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("alice");
            write_atomic(&path, only_mode(0o600), b"old", Durability::Now).unwrap();
            let stranger = rustix::process::geteuid().as_raw().wrapping_add(4321);
            let perms = Perms { mode: 0o600, owner: Owner { uid: Some(stranger), gid: None } };
            let e = write_atomic(&path, perms, b"new", Durability::Now).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(Errno::PERM.raw_os_error()), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), b"old");
            let open = open_directory(dir.path()).unwrap();
            assert_eq!(
                named_temporary(&open, "alice", perms, b"new", true).unwrap_err().raw_os_error(),
                e.raw_os_error()
            );
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["alice"], "no temporary left");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_ledger_gets_the_configured_owner() {
        let (uid, gid) = given_owner();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        let record =
            crate::ledger::Record { username: "a@x".into(), in_a_row: 1, chain: 1, last_failure: 1, forgotten: false };
        let owner = Owner { uid: Some(uid), gid: Some(gid) };
        crate::ledger::write_ledger(&path, owner, &record).unwrap();
        assert_eq!(owner_and_mode(&crate::ledger::ledger_path(&path)), (uid, gid, 0o600));
        crate::ledger::write_ledger(&path, owner, &crate::ledger::Record::forgotten("a@x")).unwrap();
        assert_eq!(owner_and_mode(&crate::ledger::ledger_path(&path)), (uid, gid, 0o600));
    }

    #[test]
    fn an_owner_holds_what_it_names() {
        let none = Owner::default();
        assert!(!none.is_set() && none.holds(1, 2));
        let both = Owner { uid: Some(1), gid: Some(2) };
        assert!(both.holds(1, 2) && !both.holds(1, 3) && !both.holds(0, 2));
        let group = Owner { uid: None, gid: Some(2) };
        assert!(group.is_set() && group.holds(7, 2) && !group.holds(7, 3));
        assert_eq!(both.to_string(), "uid 1 and gid 2");
        assert_eq!(group.to_string(), "gid 2");
        assert_eq!(Owner { uid: Some(1), gid: None }.to_string(), "uid 1");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        write_atomic(&path, only_mode(0o600), b"old", Durability::Now).unwrap();
        // The target replaced by a directory: rename fails.
        let blocked = dir.path().join("bob");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, only_mode(0o600), b"new", Durability::Now).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        let names = [".alice.x1Yz9Q.tmp", ".alice.AAAAAA.tmp", "alice", ".bob.x1Yz9Q.tmp", ".alice..tmp", "alice.tmp"];
        // File `alice.x`'s temporary (another customer's, in flight) starts like alice's.
        for name in names.iter().chain(&[".alice.x.k2Lm3N.tmp"]) {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(remove_stale_temporaries(&path), 2);
        let mut left: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [".alice..tmp", ".alice.x.k2Lm3N.tmp", ".bob.x1Yz9Q.tmp", "alice", "alice.tmp"]);
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_file_is_read_whole_whether_or_not_its_size_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        for content in [&b"x"[..], b"pw-00001-Secret!", &[b'a'; 4096]] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(&read_regular(&path, 4096, false).unwrap().0[..], content);
        }
        // A file whose size says 0 and that holds something (as /proc's do): read to its end.
        let (status, _) = read_regular(Path::new("/proc/self/status"), 64 * 1024, true).unwrap();
        assert!(status.starts_with(b"Name:"), "{}", String::from_utf8_lossy(&status));
        assert!(status.ends_with(b"\n"));
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"1234").unwrap();
        assert_eq!(&read_regular(&file, 4, false).unwrap().0[..], b"1234");
        let e = read_regular(&file, 3, false).unwrap_err();
        assert_eq!(e.to_string(), "is larger than 3 bytes, the most it may hold");
        // A FIFO: refused at once, never waited on.
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(read_regular(&fifo, 4, true).unwrap_err().to_string(), "is a FIFO, not a regular file");
        // A device: refused, never read whole.
        let e = read_regular(Path::new("/dev/zero"), 4096, true).unwrap_err();
        assert_eq!(e.to_string(), "is a character device, not a regular file");
        assert_eq!(read_regular(dir.path(), 4, true).unwrap_err().to_string(), "is a directory, not a regular file");
        // A symbolic link: followed only when asked.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(&read_regular(&link, 4, true).unwrap().0[..], b"1234");
        assert!(matches!(read_regular(&link, 4, false), Err(ReadError::Symlink)));
        assert!(read_regular(&dir.path().join("none"), 4, false).unwrap_err().is_not_found());
        // A file that grows past its limit: the bytes read stop there.
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
        assert_eq!(
            read_regular(&big, 4096, true).unwrap_err().to_string(),
            "is larger than 4 KiB, the most it may hold"
        );
    }

    #[test]
    fn a_symlink_at_the_token_path_is_no_token_and_a_write_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"abc.def").unwrap();
        let path = dir.path().join("alice");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(read_existing(&path).is_none());
        write_atomic(&path, only_mode(0o600), b"new.token", Durability::Now).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"new.token");
        assert_eq!(std::fs::read(&target).unwrap(), b"abc.def", "the link's target is unchanged");
        // A link to nothing is replaced too, not written through (nothing appears where it points).
        let dangling = dir.path().join("bob");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        write_atomic(&dangling, only_mode(0o600), b"new.token", Durability::Now).unwrap();
        assert!(std::fs::symlink_metadata(&dangling).unwrap().is_file());
        assert!(!dir.path().join("nowhere").exists());
        // The same for a ledger.
        std::os::unix::fs::symlink("/dev/zero", crate::ledger::ledger_path(&path)).unwrap();
        assert_eq!(crate::ledger::read_ledger(&path), None);
    }

    #[test]
    fn one_lock_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        let content = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(content, format!("pid {}\nhost {}\n", std::process::id(), host_name()));
        assert_eq!(mode_of(&dir.path().join(LOCK_FILE)), 0o600);
        assert!(lock.covers(dir.path()) && lock.covers(&dir.path().join(".")));
        // flock conflicts between two descriptors, even in one process.
        let e = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is in use by magento-token-sidecar pid {} on host {}; two daemons must not share an output directory",
                dir.path().display(),
                std::process::id(),
                host_name()
            )
        );
        drop(lock);
        assert!(!dir.path().join(LOCK_FILE).exists(), "a clean release removes the file");
        let again = DirLock::acquire(dir.path()).unwrap();
        assert!(!again.covers(Path::new("/")));
        // A lock file left by a killed holder is taken over; a symbolic link there is not.
        drop(again);
        std::fs::write(dir.path().join(LOCK_FILE), "pid 1\nhost gone\n").unwrap();
        drop(DirLock::acquire(dir.path()).unwrap());
        std::os::unix::fs::symlink("/dev/null", dir.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(DirLock::acquire(dir.path()), Err(LockError::Failed { .. })));
    }

    #[test]
    fn header_is_the_header_line_without_a_newline() {
        let t = Secret::new("abc.def".into());
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(&render(Format::Header, "alice", &t, now, now)[..], b"Authorization: Bearer abc.def");
    }

    #[test]
    fn env_is_two_lines_each_ending_in_a_newline() {
        let t = Secret::new("abc.def~+/-_=".into());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_860_000);
        let bytes = render(Format::Env, "alice", &t, at, at + Duration::from_secs(3600));
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "MAGENTO_TOKEN=abc.def~+/-_=\nMAGENTO_TOKEN_EXPIRES_AT=2026-11-28T11:00:00Z\n"
        );
    }

    #[test]
    fn every_buffer_is_allocated_at_its_final_size() {
        // A buffer that grew would have left a copy of the token in freed memory.
        let t = Secret::new("x".repeat(crate::token::MAX_TOKEN_LEN));
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        let name = "n".repeat(64);
        for format in [Format::Raw, Format::Json, Format::Header, Format::Env] {
            let bytes = render(format, &name, &t, at, at);
            assert!(bytes.capacity() < bytes.len() + 64, "{format:?}: {} for {}", bytes.capacity(), bytes.len());
        }
    }

    #[test]
    fn reads_back_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        assert!(read_existing(&path).is_none());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_860_000);
        let expires = at + Duration::from_secs(60);
        let token = Secret::new("eyJ0.eyJl-_.c2ln+/~==".into());
        for (format, recorded) in
            [(Format::Raw, None), (Format::Json, Some(expires)), (Format::Header, None), (Format::Env, Some(expires))]
        {
            std::fs::write(&path, &*render(format, "alice", &token, at, expires)).unwrap();
            let found = read_existing(&path).unwrap();
            assert_eq!(found.token.expose(), token.expose(), "{format:?}");
            assert_eq!(found.expires_at, recorded, "{format:?}");
            assert_eq!(found.format, format);
        }
        // An env file whose last newline was lost (edited by hand) is still one.
        std::fs::write(&path, "MAGENTO_TOKEN=t0k\nMAGENTO_TOKEN_EXPIRES_AT=2026-11-28T10:01:00Z").unwrap();
        let found = read_existing(&path).unwrap();
        assert_eq!((found.token.expose(), found.expires_at, found.format), ("t0k", Some(expires), Format::Env));
        // A lone token that happens to start like an env line is a raw token.
        std::fs::write(&path, "MAGENTO_TOKEN=").unwrap();
        assert_eq!(read_existing(&path).unwrap().format, Format::Raw);
        // Anything else is no token.
        for bad in [
            "not a token\n",
            "abc.def\n",
            "Authorization: Bearer abc def",
            "Authorization: Bearer ",
            "Authorization: Bearer abc\n",
            "MAGENTO_TOKEN=abc\nMAGENTO_TOKEN_EXPIRES_AT=2026-11-28T10:01:00Z\nMORE=1\n",
            "MAGENTO_TOKEN=\nMAGENTO_TOKEN_EXPIRES_AT=2026-11-28T10:01:00Z\n",
            "MAGENTO_TOKEN=a b\nMAGENTO_TOKEN_EXPIRES_AT=2026-11-28T10:01:00Z\n",
            r#"{"token":"a b"}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(read_existing(&path).is_none(), "{bad:?}");
        }
    }
}
