//! The admin's two-factor code for Magento's Google Authenticator provider (`auth.admin.
//! totp_secret_file`): RFC 6238 with HMAC-SHA-1, 30-second steps and 6 digits, from the base32
//! secret an authenticator app is given. The arithmetic is `totp-lite`'s.

use std::path::Path;

use zeroize::Zeroizing;

use crate::fs::{self, ReadError};

/// The most a secret file may hold: a base32 secret is a few dozen characters.
const MAX_SECRET_FILE: usize = 4 * 1024;

/// A decoded TOTP secret, wiped when dropped.
pub struct TotpSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpSecret(***)")
    }
}

impl TotpSecret {
    /// A digest of the secret (hex SHA-256): tells two secrets apart without holding either.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(&*self.0).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a secret file gives no secret. The messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TotpError {
    #[error("{0}: no such file")]
    Missing(String),
    #[error("{0}: {1}")]
    Unreadable(String, String),
    #[error("{0} is empty")]
    Empty(String),
    #[error("{0} is not a base32 secret (the letters A-Z and digits 2-7 an authenticator app is given; spaces and '=' padding are allowed)")]
    NotBase32(String),
}

/// Reads and decodes the base32 secret in `path`, afresh: a rotated Secret is used at once.
/// Case, spaces and `=` padding are ignored, as authenticator apps do.
pub fn read_secret(path: &Path) -> Result<TotpSecret, TotpError> {
    let shown = path.display().to_string();
    let (bytes, _) = fs::read_regular(path, MAX_SECRET_FILE, true).map_err(|e| match e {
        e if e.is_not_found() => TotpError::Missing(shown.clone()),
        ReadError::Io(e) => TotpError::Unreadable(shown.clone(), format!("cannot read it: {e}")),
        why => TotpError::Unreadable(shown.clone(), why.to_string()),
    })?;
    let bytes = Zeroizing::new(bytes);
    decode(&bytes).ok_or_else(|| {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            TotpError::Empty(shown.clone())
        } else {
            TotpError::NotBase32(shown.clone())
        }
    })
}

/// The secret in `text`, or `None` when it is empty or not base32.
fn decode(text: &[u8]) -> Option<TotpSecret> {
    let cleaned: Zeroizing<Vec<u8>> = Zeroizing::new(
        text.iter().filter(|b| !b.is_ascii_whitespace() && **b != b'=').map(u8::to_ascii_uppercase).collect(),
    );
    if cleaned.is_empty() {
        return None;
    }
    let decoded = data_encoding::BASE32_NOPAD.decode(&cleaned).ok()?;
    Some(TotpSecret(Zeroizing::new(decoded)))
}

/// The 6-digit code for the 30-second step holding `unix` (seconds since the epoch).
pub fn code(secret: &TotpSecret, unix: u64) -> Zeroizing<String> {
    Zeroizing::new(totp_lite::totp_custom::<totp_lite::Sha1>(30, 6, &secret.0, unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_rfc_6238s_test_vectors() {
        // RFC 6238 appendix B, SHA-1: the secret "12345678901234567890", 8 digits there; the
        // last 6 of each are what a 6-digit code is.
        let secret = decode(data_encoding::BASE32.encode(b"12345678901234567890").as_bytes()).unwrap();
        for (t, eight) in
            [(59, "94287082"), (1111111109, "07081804"), (1234567890, "89005924"), (2000000000, "69279037")]
        {
            assert_eq!(*code(&secret, t), eight[2..], "t = {t}");
        }
    }

    #[test]
    fn a_secret_is_read_as_authenticator_apps_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("totp");
        let want = decode(b"JBSWY3DPEHPK3PXP").unwrap();
        for text in ["JBSWY3DPEHPK3PXP\n", "jbsw y3dp ehpk 3pxp", "JBSWY3DPEHPK3PXP===="] {
            std::fs::write(&file, text).unwrap();
            let read = read_secret(&file).unwrap();
            assert_eq!(*read.0, *want.0, "{text:?}");
        }
        std::fs::write(&file, "not base32!").unwrap();
        let e = read_secret(&file).unwrap_err().to_string();
        assert!(e.contains("is not a base32 secret") && !e.contains("not base32!"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret(&file).unwrap_err().to_string().ends_with("is empty"));
        assert!(matches!(read_secret(&dir.path().join("none")), Err(TotpError::Missing(_))));
        assert_eq!(format!("{want:?}"), "TotpSecret(***)");
    }
}
