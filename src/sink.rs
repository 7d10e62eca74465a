//! Token files: atomic replacement, and reading back what a previous run left.
//!
//! A file is replaced by writing a temporary file in the same directory (its mode set before
//! any content, so no other user can read it at any moment), syncing it, renaming it over the
//! old one and syncing the directory. A reader sees the old token or the new one, never a mix
//! or an empty file, and a token is durable before it is reported written.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::Format;
use crate::schedule::AuthState;
use crate::secret::Secret;

/// Temporary files are named `.<file>.<random>.tmp`; names starting with `.` are refused for
/// token files, so these never collide with one.
const TMP_SUFFIX: &str = ".tmp";
/// Random alphanumeric characters between the two.
const TMP_RANDOM: usize = 6;

fn tmp_prefix(file_name: &str) -> String {
    format!(".{file_name}.")
}

/// The bytes of a token file in the configured format.
pub fn render(
    format: Format,
    customer: &str,
    token: &Secret,
    obtained_at: SystemTime,
    expires_at: SystemTime,
) -> Zeroizing<Vec<u8>> {
    match format {
        Format::Raw => Zeroizing::new(token.expose().as_bytes().to_vec()),
        Format::Json => {
            #[derive(Serialize)]
            struct JsonFile<'a> {
                customer: &'a str,
                token: &'a str,
                obtained_at: String,
                expires_at: String,
            }
            let file = JsonFile {
                customer,
                token: token.expose(),
                obtained_at: rfc3339(obtained_at),
                expires_at: rfc3339(expires_at),
            };
            Zeroizing::new(serde_json::to_vec(&file).expect("strings always serialize"))
        }
    }
}

/// `2026-11-28T10:00:00Z`. Times outside the years 1970 to 9999 (which humantime cannot
/// write, and panics on) are shown at the nearer edge: a log line must never bring a worker down.
pub fn rfc3339(t: SystemTime) -> String {
    let last = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(std::time::UNIX_EPOCH, last)).to_string()
}

/// Replaces `path` with `content` atomically, with file mode `mode` whatever the umask.
/// With `sync_dir` false the caller syncs the directory itself (one sync for a batch).
pub fn write_atomic(path: &Path, mode: u32, content: &[u8], sync_dir: bool) -> io::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the token path has no file name"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&tmp_prefix(name))
        .rand_bytes(TMP_RANDOM)
        .suffix(TMP_SUFFIX)
        .tempfile_in(dir)?;
    // fchmod, not the mode argument of open(2): the umask cannot narrow or widen it.
    tmp.as_file().set_permissions(Permissions::from_mode(mode))?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    // On failure the temporary file is dropped, which deletes it.
    tmp.persist(path).map_err(|e| e.error)?;
    if sync_dir {
        sync_directory(dir)?;
    }
    Ok(())
}

pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
    /// The expiry recorded in a `json` file.
    pub expires_at: Option<SystemTime>,
    /// When the file was written: with an opaque token in a `raw` file, the best guess of when it
    /// was obtained.
    pub modified: SystemTime,
    /// The format it was written in, and its mode: a reload may have changed either.
    pub format: Format,
    pub mode: u32,
}

/// Reads the token in `path`, in either format (the format may have changed since it was
/// written). `None` when there is no file or it holds no token of the accepted form.
pub fn read_existing(path: &Path) -> Option<OnDisk> {
    #[derive(Deserialize)]
    struct JsonFile {
        token: String,
        expires_at: Option<String>,
    }
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return None;
    }
    let bytes = Zeroizing::new(std::fs::read(path).ok()?);
    let (token, expires_at, format) = match serde_json::from_slice::<JsonFile>(&bytes) {
        Ok(json) => {
            (Secret::new(json.token), json.expires_at.and_then(|t| humantime::parse_rfc3339(&t).ok()), Format::Json)
        }
        Err(_) => (Secret::new(std::str::from_utf8(&bytes).ok()?.to_owned()), None, Format::Raw),
    };
    crate::token::check_form(token.expose()).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    Some(OnDisk { token, expires_at, modified: meta.modified().ok()?, format, mode })
}

/// The record of a customer's recent 401s, kept beside its token file as `.<file>.auth`, so a
/// restarted process (a crash loop, an init container's `once` retried by the kubelet, a worker
/// restarted by a reload) does not forget them and walk into Magento's lock. Removed after a
/// success. It holds counts and a time, never a password.
#[derive(Serialize, Deserialize)]
struct AuthLedger {
    username: String,
    in_a_row: u32,
    chain: u32,
    /// Unix seconds of the last 401.
    last_failure: i64,
}

pub fn ledger_path(token_path: &Path) -> std::path::PathBuf {
    let name = token_path.file_name().and_then(|n| n.to_str()).unwrap_or("token");
    parent(token_path).join(format!(".{name}.auth"))
}

/// What the ledger beside this token file records of `username`'s 401s, if anything (another
/// username's ledger is ignored).
pub fn read_ledger(token_path: &Path, username: &str) -> Option<AuthState> {
    let bytes = std::fs::read(ledger_path(token_path)).ok()?;
    let ledger: AuthLedger = serde_json::from_slice(&bytes).ok()?;
    (ledger.username == username).then(|| AuthState {
        in_a_row: ledger.in_a_row,
        chain: ledger.chain,
        last_failure: Some(crate::token::from_unix(ledger.last_failure)),
        final_refusal: false,
    })
}

/// Records `auth` (after a 401: its last failure is set) as `username`'s ledger.
pub fn write_ledger(token_path: &Path, username: &str, auth: &AuthState) -> io::Result<()> {
    let ledger = AuthLedger {
        username: username.to_owned(),
        in_a_row: auth.in_a_row,
        chain: auth.chain,
        last_failure: auth.last_failure.map_or(0, crate::token::unix),
    };
    let bytes = serde_json::to_vec(&ledger).expect("a ledger always serializes");
    write_atomic(&ledger_path(token_path), 0o600, &bytes, true)
}

pub fn remove_ledger(token_path: &Path) {
    let _ = std::fs::remove_file(ledger_path(token_path));
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
            write_atomic(&path, mode, b"token-1", true).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode);
            assert_eq!(std::fs::read(&path).unwrap(), b"token-1");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        write_atomic(&path, 0o600, b"old", true).unwrap();
        // The target replaced by a directory: rename fails.
        let blocked = dir.path().join("bob");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, 0o600, b"new", true).is_err());
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

    #[test]
    fn the_auth_ledger_round_trips_per_username() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        assert_eq!(read_ledger(&path, "a@x"), None);
        let auth = AuthState {
            in_a_row: 2,
            chain: 3,
            last_failure: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            final_refusal: false,
        };
        write_ledger(&path, "a@x", &auth).unwrap();
        assert_eq!(ledger_path(&path), dir.path().join(".alice.auth"));
        assert_eq!(mode_of(&ledger_path(&path)), 0o600);
        assert_eq!(read_ledger(&path, "a@x"), Some(auth));
        assert_eq!(read_ledger(&path, "b@x"), None);
        // The stale-temporary sweep leaves it alone.
        assert_eq!(remove_stale_temporaries(&path), 0);
        remove_ledger(&path);
        assert_eq!(read_ledger(&path, "a@x"), None);
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn reads_back_either_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        assert!(read_existing(&path).is_none());
        std::fs::write(&path, b"abc.def").unwrap();
        let found = read_existing(&path).unwrap();
        assert_eq!(found.token.expose(), "abc.def");
        assert_eq!(found.expires_at, None);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_860_000);
        std::fs::write(
            &path,
            &*render(Format::Json, "alice", &Secret::new("t0k".into()), at, at + Duration::from_secs(60)),
        )
        .unwrap();
        let found = read_existing(&path).unwrap();
        assert_eq!(found.token.expose(), "t0k");
        assert_eq!(found.expires_at, Some(at + Duration::from_secs(60)));
        std::fs::write(&path, b"not a token\n").unwrap();
        assert!(read_existing(&path).is_none());
    }
}
