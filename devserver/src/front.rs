//! The htpasswd front of a staging store (nginx `auth_basic`): while set, every request
//! without the right `Authorization: Basic` header is answered by the web server itself
//! with an HTML 401 and a `WWW-Authenticate` challenge. Nothing reaches Magento, so
//! nothing is counted in its throttle or the customer's lock (shared/magento-api.md, "What
//! is not Magento's answer").

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// The challenge header's value.
pub(crate) const CHALLENGE: &str = "Basic realm=\"Staging\"";

/// nginx's own 401 page.
pub(crate) const PAGE: &str = "<html>\r\n<head><title>401 Authorization Required</title></head>\r\n<body>\r\n\
<center><h1>401 Authorization Required</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// `user:password`, as the front compares it.
pub(crate) fn credentials(user: &str, password: &str) -> Vec<u8> {
    format!("{user}:{password}").into_bytes()
}

/// Whether the Authorization header carries exactly these credentials (scheme in any case).
/// A Bearer token is no pass: one header cannot carry both.
pub(crate) fn admits(authorization: Option<&str>, expected: &[u8]) -> bool {
    let Some((scheme, encoded)) = authorization.and_then(|a| a.split_once(' ')) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("basic") && STANDARD.decode(encoded.trim()).is_ok_and(|d| d == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let expected = credentials("stage", "p:w");
        let header = format!("Basic {}", STANDARD.encode("stage:p:w"));
        assert!(admits(Some(&header), &expected));
        assert!(admits(Some(&header.replacen("Basic", "basic", 1)), &expected));
        assert!(!admits(Some(&format!("Basic {}", STANDARD.encode("stage:pw"))), &expected));
        assert!(!admits(Some("Bearer abc"), &expected));
        assert!(!admits(Some("Basic !!!"), &expected));
        assert!(!admits(None, &expected));
    }
}
