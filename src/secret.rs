//! Passwords and tokens: values that must never reach a log line, an error or a panic message.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A secret string. `Debug` and `Display` print `***`; the memory is wiped on drop.
///
/// The only way to the characters is [`Secret::expose`], so every place that handles the
/// plain value is easy to find with a search.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A short, stable fingerprint (8 hex digits of SHA-256) that lets logs tell two tokens
    /// apart without revealing either.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn fingerprint_is_short_and_distinguishes() {
        let a = Secret::new("a".into()).fingerprint();
        let b = Secret::new("b".into()).fingerprint();
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
        assert_eq!(a, Secret::new("a".into()).fingerprint());
    }
}
