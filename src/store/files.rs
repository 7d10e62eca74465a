//! The token files of `output.dir`, read back: what an earlier run (or a reload's former
//! settings) left. Written by [`crate::sink`]; their ledgers are [`crate::ledger`]'s.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

use super::{FileMeta, Found};
use crate::format::parse_token_content;
use crate::fs::read_regular;

/// The most read of a token file: a token is at most 8 KiB, the json format adds little.
pub const MAX_TOKEN_FILE: usize = 64 * 1024;

/// Reads the token in `path`, in any format (the format may have changed since it was
/// written). `None` when there is no file or it holds no token of the accepted form. A symbolic
/// link, a FIFO, a device or a file over [`MAX_TOKEN_FILE`] at `path` is no token either, with
/// a warning: it is not what this daemon writes.
pub fn read_existing(path: &Path) -> Option<Found> {
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
    let file = FileMeta { mode: meta.permissions().mode() & 0o777, uid: meta.uid(), gid: meta.gid() };
    Some(Found { token, expires_at, written_at: meta.modified().ok()?, format, file: Some(file) })
}

/// The names of the ledgers (`.<file>.auth`) in `dir`, `None` if it cannot be listed.
pub fn ledgers_in(dir: &Path) -> Option<HashSet<OsString>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names = HashSet::new();
    for entry in entries {
        let name = entry.ok()?.file_name();
        if name.as_encoded_bytes().ends_with(b".auth") {
            names.insert(name);
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{render, Format};
    use crate::secret::Secret;
    use std::time::{Duration, SystemTime};

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
