//! Customer tokens as Magento 2.4.4+ mints them: compact JWS, HS256, header
//! `{"kid":"1","alg":"HS256"}` and exactly the claims `uid`, `utypid`, `iat`, `exp`.
//!
//! The layout is reproduced byte for byte (claim order included) because the daemon
//! decodes the middle part to learn `exp`, and tests compare against real tokens.
//! The key is random per server, just as a client can never know a store's key.
//!
//! Also the two shapes whose content a client cannot read, which the server keeps in a table
//! instead: opaque tokens (Magento without the JWT module) and encrypted JWTs (JWE).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// base64url of `{"kid":"1","alg":"HS256"}`, the only header Magento writes.
pub(crate) const HEADER_B64: &str = "eyJraWQiOiIxIiwiYWxnIjoiSFMyNTYifQ";

/// `utypid` of a customer token (Magento's UserContextInterface::USER_TYPE_CUSTOMER).
pub(crate) const USER_TYPE_CUSTOMER: i64 = 3;

/// `utypid` of an admin token (UserContextInterface::USER_TYPE_ADMIN).
pub(crate) const USER_TYPE_ADMIN: i64 = 2;

/// The claims the server relies on when a token comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claims {
    pub uid: u64,
    pub iat: i64,
    pub exp: i64,
}

/// Signs and verifies tokens with one random HMAC key.
pub(crate) struct Signer {
    /// Prepared once: cloning a keyed HMAC is cheaper than re-keying per request.
    mac: HmacSha256,
}

impl Signer {
    pub(crate) fn random() -> Signer {
        let key: [u8; 32] = rand::thread_rng().gen();
        Signer { mac: HmacSha256::new_from_slice(&key).expect("HMAC accepts any key length") }
    }

    /// Mints a customer's `header.claims.signature`.
    pub(crate) fn mint(&self, claims: Claims) -> String {
        self.mint_typed(claims, USER_TYPE_CUSTOMER)
    }

    /// Mints an admin user's token: the same layout, `utypid` 2.
    pub(crate) fn mint_admin(&self, claims: Claims) -> String {
        self.mint_typed(claims, USER_TYPE_ADMIN)
    }

    fn mint_typed(&self, claims: Claims, user_type: i64) -> String {
        let payload = format!(
            "{{\"uid\":{},\"utypid\":{},\"iat\":{},\"exp\":{}}}",
            claims.uid, user_type, claims.iat, claims.exp
        );
        let mut out = String::with_capacity(160);
        out.push_str(HEADER_B64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(payload.as_bytes(), &mut out);
        let mut mac = self.mac.clone();
        mac.update(out.as_bytes());
        let sig = mac.finalize().into_bytes();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        out
    }

    /// Checks the signature and the header, then reads a customer token's claims. Expiry and
    /// revocation are the caller's business (they need the server's clock and state).
    pub(crate) fn verify(&self, token: &str) -> Option<Claims> {
        self.verify_typed(token, USER_TYPE_CUSTOMER)
    }

    /// Likewise for an admin user's token.
    pub(crate) fn verify_admin(&self, token: &str) -> Option<Claims> {
        self.verify_typed(token, USER_TYPE_ADMIN)
    }

    fn verify_typed(&self, token: &str, user_type: i64) -> Option<Claims> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        if header.get("alg")?.as_str()? != "HS256" {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let mut mac = self.mac.clone();
        mac.update(&token.as_bytes()[..h.len() + 1 + p.len()]);
        mac.verify_slice(&sig).ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()?;
        if claims.get("utypid")?.as_i64()? != user_type {
            return None;
        }
        Some(Claims {
            uid: claims.get("uid")?.as_u64()?,
            iat: claims.get("iat")?.as_i64()?,
            exp: claims.get("exp")?.as_i64()?,
        })
    }
}

/// An opaque token as Magento's oauth_token table holds them: 32 characters of `[0-9a-z]`.
pub(crate) fn opaque_token() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..32).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char).collect()
}

/// base64url of `{"kid":"1","alg":"A256KW","enc":"A128GCM"}`: AES key wrap of the content
/// key, content encrypted with `webapi/jwtauth/jwe_alg`'s default A128GCM.
pub(crate) const JWE_HEADER_B64: &str = "eyJraWQiOiIxIiwiYWxnIjoiQTI1NktXIiwiZW5jIjoiQTEyOEdDTSJ9";

/// An encrypted JWT in JWE compact form: header, wrapped key (24 bytes), IV (12), ciphertext
/// (the claims' length) and tag (16), all base64url. Random bytes stand in for the
/// cryptography: only the store can decrypt, so nothing but the header means anything.
pub(crate) fn encrypted_token() -> String {
    let mut rng = rand::thread_rng();
    let mut out = String::with_capacity(200);
    out.push_str(JWE_HEADER_B64);
    for len in [24, 12, 56, 16] {
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(bytes, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constant_is_the_magento_header() {
        assert_eq!(URL_SAFE_NO_PAD.decode(HEADER_B64).unwrap(), br#"{"kid":"1","alg":"HS256"}"#);
    }

    #[test]
    fn mint_then_verify_and_tamper() {
        let s = Signer::random();
        let c = Claims { uid: 7, iat: 1_700_000_000, exp: 1_700_003_600 };
        let t = s.mint(c);
        assert_eq!(s.verify(&t), Some(c));
        let payload = t.split('.').nth(1).unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(payload).unwrap(),
            br#"{"uid":7,"utypid":3,"iat":1700000000,"exp":1700003600}"#
        );
        // Another server's key, a changed claim or a truncated token must all fail.
        assert_eq!(Signer::random().verify(&t), None);
        let forged = format!(
            "{}.{}.{}",
            HEADER_B64,
            URL_SAFE_NO_PAD.encode(br#"{"uid":8,"utypid":3,"iat":1700000000,"exp":1700003600}"#),
            t.rsplit('.').next().unwrap()
        );
        assert_eq!(s.verify(&forged), None);
        assert_eq!(s.verify(&t[..t.len() - 2]), None);
        assert_eq!(s.verify("a.b"), None);
        assert_eq!(s.verify(&format!("{t}.x")), None);
    }

    #[test]
    fn encrypted_shape() {
        assert_eq!(URL_SAFE_NO_PAD.decode(JWE_HEADER_B64).unwrap(), br#"{"kid":"1","alg":"A256KW","enc":"A128GCM"}"#);
        let t = encrypted_token();
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 5);
        let lens: Vec<usize> = parts[1..].iter().map(|p| URL_SAFE_NO_PAD.decode(p).unwrap().len()).collect();
        assert_eq!(lens, [24, 12, 56, 16]);
        assert_ne!(t, encrypted_token());
    }

    #[test]
    fn opaque_shape() {
        let t = opaque_token();
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
    }
}
