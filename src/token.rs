//! Tokens: the accepted form, and when one expires.
//!
//! Magento 2.4.4+ hands out JWTs whose `exp` claim is the only statement of their lifetime;
//! stores without the JWT module hand out opaque tokens, whose lifetime we must assume. The
//! signature is made with the store's secret and cannot be checked here: only `exp` and `iat`
//! are read.

use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::Deserialize;

use crate::clock::{from_unix_secs, unix_secs};
use crate::secret::Secret;

/// Longest token accepted (RFC 6750 sets no limit; Magento's are about 200 characters).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// How far a JWT's `iat` may be from the local clock before the local clock is trusted
/// instead: the token's life (`exp - iat`) is then counted from the request's start.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The longest life a token may claim. Magento's lifetimes are minutes or hours; a claim beyond
/// this is garbage (a proxy's, a broken store's), and taken as it is it would put the next
/// refresh centuries away and times beyond what can be written down.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("the token is {0} bytes long, more than the 8 KiB accepted")]
    TooLong(usize),
    #[error("the token has a character outside the RFC 6750 token set at byte {0}")]
    BadCharacter(usize),
    #[error("the token expired before it arrived (exp is {0} s before the request)")]
    AlreadyExpired(u64),
    #[error("the token claims to live {0} s, an implausible lifetime (more than 10 years)")]
    Implausible(u128),
}

/// Checks that `token` has the form of an RFC 6750 `b64token`: `[A-Za-z0-9._~+/-]+=*`.
/// Nothing else may reach a file: no whitespace, quotes or control characters.
pub fn check_form(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(token.len()));
    }
    let body_end = token.trim_end_matches('=').len();
    if body_end == 0 {
        return Err(TokenError::BadCharacter(0));
    }
    match token[..body_end].bytes().position(|b| !(b.is_ascii_alphanumeric() || b"._~+/-".contains(&b))) {
        Some(at) => Err(TokenError::BadCharacter(at)),
        None => Ok(()),
    }
}

/// The two claims read from a JWT, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtTimes {
    pub iat: Option<i64>,
    pub exp: i64,
}

/// Reads `exp` (and `iat` if present) from a compact JWS; `None` when the token is not a JWT
/// with a numeric `exp` (an opaque token).
pub fn jwt_times(token: &str) -> Option<JwtTimes> {
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<serde_json::Number>,
        iat: Option<serde_json::Number>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    let secs = |n: serde_json::Number| n.as_i64().or_else(|| n.as_f64().map(|f| f as i64));
    Some(JwtTimes { exp: secs(claims.exp?)?, iat: claims.iat.and_then(secs) })
}

/// When a freshly obtained token expires, in local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub expires_at: SystemTime,
    /// How long the token lives from the request's start.
    pub lifetime: Duration,
    /// `Some(seconds)` (Magento's clock minus ours) when the JWT's `iat` showed clock skew.
    pub skew: Option<i64>,
    pub is_jwt: bool,
    /// An encrypted JWT (JWE: five parts), whose claims cannot be read: its expiry is assumed.
    pub encrypted: bool,
}

/// The expiry of a token obtained by a request that started at `started`: the JWT's `exp`, or,
/// for an opaque token, `started + default_lifetime`. When `iat` is more than
/// [`MAX_CLOCK_SKEW`] away from `started`, one of the clocks is wrong and `exp` cannot be
/// compared with ours: the token's own life (`exp - iat`) is counted from `started` instead.
/// Claims of any size are taken without overflow; a life beyond [`MAX_LIFETIME`] is refused.
pub fn expiry(token: &Secret, started: SystemTime, default_lifetime: Duration) -> Result<Expiry, TokenError> {
    let Some(times) = jwt_times(token.expose()) else {
        return Ok(Expiry {
            expires_at: started
                .checked_add(default_lifetime)
                .ok_or(TokenError::Implausible(default_lifetime.as_secs().into()))?,
            lifetime: default_lifetime,
            skew: None,
            is_jwt: false,
            encrypted: token.expose().split('.').count() == 5,
        });
    };
    // In i128, where no pair of i64 claims can overflow.
    let start = i128::from(unix_secs(started));
    let exp = i128::from(times.exp);
    let (exp_local, skew) = match times.iat.map(i128::from) {
        Some(iat) if (iat - start).unsigned_abs() > u128::from(MAX_CLOCK_SKEW.as_secs()) => {
            (start + (exp - iat), Some(iat - start))
        }
        _ => (exp, None),
    };
    if exp_local <= start {
        return Err(TokenError::AlreadyExpired(u64::try_from(start - exp_local).unwrap_or(u64::MAX)));
    }
    let life = (exp_local - start).unsigned_abs();
    if life > u128::from(MAX_LIFETIME.as_secs()) {
        return Err(TokenError::Implausible(life));
    }
    // Everything now fits: the life is at most MAX_LIFETIME, so exp_local is near start.
    let lifetime = Duration::from_secs(life as u64);
    let skew = skew.map(|s| s.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
    Ok(Expiry { expires_at: from_unix_secs(exp_local as i64), lifetime, skew, is_jwt: true, encrypted: false })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A JWT shaped like Magento's, unsigned (the daemon never checks signatures).
    pub fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2lnbmF0dXJl", b64(r#"{"kid":"1","alg":"HS256"}"#), b64(claims))
    }

    #[test]
    fn form_is_rfc6750_b64token() {
        for ok in ["abc", "a.b.c", "AZaz09-._~+/", "abc==", "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6"] {
            assert_eq!(check_form(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_form(""), Err(TokenError::Empty));
        assert_eq!(check_form("=="), Err(TokenError::BadCharacter(0)));
        assert_eq!(check_form("ab cd"), Err(TokenError::BadCharacter(2)));
        assert_eq!(check_form("ab\r\nX-Evil: 1"), Err(TokenError::BadCharacter(2)));
        assert_eq!(check_form("ab\"c"), Err(TokenError::BadCharacter(2)));
        assert_eq!(check_form("a=b"), Err(TokenError::BadCharacter(1)));
        assert_eq!(check_form("é"), Err(TokenError::BadCharacter(0)));
        assert_eq!(check_form(&"a".repeat(MAX_TOKEN_LEN)), Ok(()));
        assert_eq!(check_form(&"a".repeat(MAX_TOKEN_LEN + 1)), Err(TokenError::TooLong(MAX_TOKEN_LEN + 1)));
    }

    #[test]
    fn reads_magento_claims() {
        let t = jwt(r#"{"uid":3,"utypid":3,"iat":1700000000,"exp":1700003600}"#);
        assert_eq!(jwt_times(&t), Some(JwtTimes { iat: Some(1700000000), exp: 1700003600 }));
        assert_eq!(jwt_times("q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6"), None);
        assert_eq!(jwt_times(&jwt(r#"{"uid":3}"#)), None);
        assert_eq!(jwt_times("a.!!!.c"), None);
        assert_eq!(jwt_times(&format!("{}.extra", jwt(r#"{"exp":1}"#))), None);
    }

    #[test]
    fn expiry_is_exp_or_the_default_lifetime() {
        let start = from_unix_secs(1_700_000_000);
        let t = Secret::new(jwt(r#"{"uid":3,"utypid":3,"iat":1700000000,"exp":1700003600}"#));
        let e = expiry(&t, start, Duration::from_secs(60)).unwrap();
        assert_eq!(e.expires_at, from_unix_secs(1_700_003_600));
        assert_eq!(e.lifetime, Duration::from_secs(3600));
        assert_eq!(e.skew, None);
        assert!(e.is_jwt);

        let opaque = Secret::new("q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6".into());
        let e = expiry(&opaque, start, Duration::from_secs(7200)).unwrap();
        assert_eq!(e.expires_at, from_unix_secs(1_700_007_200));
        assert!(!e.is_jwt && !e.encrypted);

        // A JWE's claims are encrypted: its life is the configured one.
        let jwe = Secret::new("eyJhbGciOiJBMjU2S1cifQ.a2V5.aXY.Y2lwaGVy.dGFn".into());
        let e = expiry(&jwe, start, Duration::from_secs(3600)).unwrap();
        assert_eq!(e.expires_at, from_unix_secs(1_700_003_600));
        assert!(!e.is_jwt && e.encrypted);
    }

    #[test]
    fn clock_skew_counts_the_life_from_the_request() {
        let start = from_unix_secs(1_700_000_000);
        // Magento's clock is an hour ahead: exp would look two hours away.
        let ahead = Secret::new(jwt(r#"{"iat":1700003600,"exp":1700007200}"#));
        let e = expiry(&ahead, start, Duration::from_secs(1)).unwrap();
        assert_eq!(e.expires_at, from_unix_secs(1_700_003_600));
        assert_eq!(e.skew, Some(3600));
        // An hour behind: exp would look already past.
        let behind = Secret::new(jwt(r#"{"iat":1699996400,"exp":1700000000}"#));
        let e = expiry(&behind, start, Duration::from_secs(1)).unwrap();
        assert_eq!(e.expires_at, from_unix_secs(1_700_003_600));
        assert_eq!(e.skew, Some(-3600));
        // Within the tolerance the token's exp is used as is.
        let near = Secret::new(jwt(r#"{"iat":1700000030,"exp":1700003630}"#));
        assert_eq!(expiry(&near, start, Duration::from_secs(1)).unwrap().expires_at, from_unix_secs(1_700_003_630));
    }

    #[test]
    fn a_dead_token_is_refused() {
        let start = from_unix_secs(1_700_000_000);
        let dead = Secret::new(jwt(r#"{"iat":1700000000,"exp":1699999990}"#));
        assert_eq!(expiry(&dead, start, Duration::from_secs(1)), Err(TokenError::AlreadyExpired(10)));
        let no_iat = Secret::new(jwt(r#"{"exp":1699990000}"#));
        assert!(expiry(&no_iat, start, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn absurd_claims_are_refused_without_overflow() {
        let start = from_unix_secs(1_700_000_000);
        let far = Secret::new(jwt(r#"{"iat":1700000000,"exp":1000000000000}"#));
        assert_eq!(expiry(&far, start, Duration::from_secs(1)), Err(TokenError::Implausible(998_300_000_000)));
        let wide = Secret::new(jwt(r#"{"iat":-9223372036854775808,"exp":9223372036854775807}"#));
        assert!(matches!(expiry(&wide, start, Duration::from_secs(1)), Err(TokenError::Implausible(_))));
        let ancient = Secret::new(jwt(r#"{"exp":-9223372036854775808}"#));
        assert!(matches!(expiry(&ancient, start, Duration::from_secs(1)), Err(TokenError::AlreadyExpired(_))));
        // Ten years is still a lifetime.
        let decade = Secret::new(jwt(r#"{"iat":1700000000,"exp":2015000000}"#));
        assert_eq!(expiry(&decade, start, Duration::from_secs(1)).unwrap().expires_at, from_unix_secs(2_015_000_000));
    }
}
