//! The lock that keeps a second daemon out of an output directory ([`DirLock`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use tracing::warn;

use crate::fs::kind;

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
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
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
}
