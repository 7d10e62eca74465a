//! Local files read safely: without blocking and up to a limit ([`read_regular`]), so that a
//! FIFO, a device or a file of a gigabyte where a password, a token or a ledger is expected is
//! refused, not waited on or read whole; and what a file written gets before any content
//! ([`Perms`]: its mode and [`Owner`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use zeroize::Zeroizing;

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
pub(crate) fn kind(t: std::fs::FileType) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
