//! Token files written atomically and durably.
//!
//! A file is replaced by writing a temporary file in the same directory (its owner and mode set
//! before any content, and before it has a name: no other user can read it at any moment, and
//! no one sees it with another owner), syncing it, renaming it over the old one and syncing the
//! directory. A reader sees the old token or the new one, never a mix or an empty file, and a
//! token is durable before it is reported written. Writes replace a symbolic link by a rename,
//! never write through it.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Uid, CWD};
use rustix::io::Errno;

use crate::fs::Perms;

/// Temporary files are named `.<file>.<random>.tmp`; names starting with `.` are refused for
/// token files, so these never collide with one.
const TMP_SUFFIX: &str = ".tmp";
/// Random alphanumeric characters between the two.
const TMP_RANDOM: usize = 6;

fn tmp_prefix(file_name: &str) -> String {
    format!(".{file_name}.")
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Owner;
    use crate::store::files::read_existing;
    use std::os::unix::fs::MetadataExt;

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
}
