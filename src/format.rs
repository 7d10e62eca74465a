//! What a token file holds: the four formats (`output.format`, a customer's `format`), written
//! ([`render`]) and read back whatever the format ([`parse_token_content`]), and the times a
//! write records ([`Times`]).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::rfc3339;
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
        s.serialize_str(&crate::clock::rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
