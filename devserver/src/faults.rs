//! Failures to inject into login requests (REST token requests and GraphQL
//! `generateCustomerToken` mutations): what a Magento in trouble, or the CDN, load balancer or
//! maintenance page in front of it, answers instead of a token.

use std::time::Duration;

use rand::Rng;

use super::render::Node;

/// One injected answer to a `POST .../V1/integration/customer/token` request or to a GraphQL
/// request whose mutation runs `generateCustomerToken` (the same bodies either way: what stands
/// in front of Magento does not speak GraphQL).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, content type and body, plus optional Retry-After header
    /// value (seconds or HTTP date, verbatim).
    Respond { status: u16, content_type: String, body: Vec<u8>, retry_after: Option<String> },
    /// An HTML page with `Retry-After` as an HTTP date this far ahead of the moment it is sent
    /// (a date fixed in advance would drift while a busy machine gets to the request).
    RetryAt { status: u16, ahead: Duration },
    /// Answer normally, but only after this delay.
    Delay(Duration),
    /// Read the request and never answer (keep the connection open until the server stops).
    Hang,
    /// Close the connection with a TCP reset (SO_LINGER 0), no answer.
    Reset,
    /// A redirect: status (301/302/307/308) with this Location.
    Redirect { status: u16, location: String },
    /// A body streamed in `count` chunks of `chunk`, `interval` apart, with chunked transfer
    /// encoding (no Content-Length): an endless answer in megabytes, or one that trickles.
    Stream { status: u16, content_type: String, chunk: Vec<u8>, count: usize, interval: Duration },
}

const JSON: &str = "application/json; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// Magento's production-mode report id: `webapi-` and PHP's `uniqid()` (13 hex digits).
fn report_id() -> String {
    let n: u64 = rand::thread_rng().gen();
    format!("webapi-{:013x}", n & 0x000f_ffff_ffff_ffff)
}

pub(crate) fn reason(status: u16) -> &'static str {
    hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error")
}

impl Fault {
    /// A Magento-style JSON error: for 5xx the production-mode "Internal Error" with a
    /// report id; 401 and 404 with Magento's own messages; other codes their reason phrase.
    pub fn status(status: u16) -> Fault {
        let message = match status {
            500..=599 => {
                format!("Internal Error. Details are available in Magento log file. Report ID: {}", report_id())
            }
            401 => super::handler::MSG_SIGN_IN.to_owned(),
            404 => super::handler::MSG_NO_ROUTE.to_owned(),
            _ => reason(status).to_owned(),
        };
        Fault::Respond {
            status,
            content_type: JSON.to_owned(),
            body: Node::Map(vec![("message", Node::Str(message))]).to_json().into_bytes(),
            retry_after: None,
        }
    }

    /// An HTML page, as a CDN, load balancer or maintenance page sends.
    pub fn html(status: u16) -> Fault {
        Fault::Respond {
            status,
            content_type: HTML.to_owned(),
            body: html_page(status).into_bytes(),
            retry_after: None,
        }
    }

    /// An HTML page with a `Retry-After` header (seconds or HTTP date, sent verbatim).
    pub fn retry_after(status: u16, value: &str) -> Fault {
        Fault::Respond {
            status,
            content_type: HTML.to_owned(),
            body: html_page(status).into_bytes(),
            retry_after: Some(value.to_owned()),
        }
    }

    /// The answer of [`Fault::RetryAt`] sent at `now`.
    pub(crate) fn retry_at(status: u16, ahead: Duration, now: std::time::SystemTime) -> Fault {
        Fault::retry_after(status, &httpdate::fmt_http_date(now + ahead))
    }

    /// Any JSON body: an object, a number, a crafted token string...
    pub fn json(status: u16, value: serde_json::Value) -> Fault {
        Fault::Respond {
            status,
            content_type: JSON.to_owned(),
            body: serde_json::to_vec(&value).unwrap_or_default(),
            retry_after: None,
        }
    }

    /// 200 with random bytes that are not UTF-8, labelled as JSON.
    pub fn garbage() -> Fault {
        let mut rng = rand::thread_rng();
        let mut body: Vec<u8> = (0..64).map(|_| rng.gen()).collect();
        // 0xFF never occurs in UTF-8, so the body is invalid whatever the dice said.
        body[0] = 0xff;
        body[31] = 0xfe;
        Fault::Respond { status: 200, content_type: JSON.to_owned(), body, retry_after: None }
    }

    /// 200, JSON: a string literal of exactly `bytes` bytes, quotes included (at least 2).
    pub fn oversize(bytes: usize) -> Fault {
        let inner = bytes.saturating_sub(2);
        let mut body = Vec::with_capacity(inner + 2);
        body.push(b'"');
        body.resize(inner + 1, b'a');
        body.push(b'"');
        Fault::Respond { status: 200, content_type: JSON.to_owned(), body, retry_after: None }
    }
}

impl Fault {
    /// 200, JSON: a string literal that never ends, streamed as fast as it is read, `bytes` in
    /// all (rounded up to 64 KiB), without a Content-Length.
    pub fn oversize_chunked(bytes: usize) -> Fault {
        const CHUNK: usize = 64 * 1024;
        let mut chunk = vec![b'a'; CHUNK];
        chunk[0] = b'"';
        Fault::Stream {
            status: 200,
            content_type: JSON.to_owned(),
            chunk,
            count: bytes.div_ceil(CHUNK),
            interval: Duration::ZERO,
        }
    }

    /// 200, JSON, whose body trickles in one byte every `interval`, `count` bytes in all: the
    /// headers come at once, the body never completes in time.
    pub fn trickle(interval: Duration, count: usize) -> Fault {
        Fault::Stream { status: 200, content_type: JSON.to_owned(), chunk: b"\"".to_vec(), count, interval }
    }
}

fn html_page(status: u16) -> String {
    let title = format!("{status} {}", reason(status));
    format!(
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1>\
         <p>The service is temporarily unavailable. Please try again later.</p></body></html>\n"
    )
}

/// The small page a web server sends with a redirect.
pub(crate) fn redirect_page(status: u16, location: &str) -> String {
    let title = format!("{status} {}", reason(status));
    let href = location.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
    format!(
        "<html><head><title>{title}</title></head><body><h1>{title}</h1>\
         <p>The document has moved <a href=\"{href}\">here</a>.</p></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors() {
        match Fault::status(503) {
            Fault::Respond { status, body, content_type, retry_after } => {
                assert_eq!(status, 503);
                assert!(content_type.starts_with("application/json"));
                assert!(retry_after.is_none());
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let msg = v["message"].as_str().unwrap();
                let prefix = "Internal Error. Details are available in Magento log file. Report ID: webapi-";
                assert!(msg.starts_with(prefix), "{msg}");
                assert_eq!(msg.len(), prefix.len() + 13);
            }
            other => panic!("{other:?}"),
        }
        match Fault::oversize(10) {
            Fault::Respond { body, .. } => assert_eq!(body, b"\"aaaaaaaa\""),
            other => panic!("{other:?}"),
        }
        match Fault::garbage() {
            Fault::Respond { body, status, .. } => {
                assert_eq!(status, 200);
                assert!(std::str::from_utf8(&body).is_err());
            }
            other => panic!("{other:?}"),
        }
        match Fault::retry_after(503, "120") {
            Fault::Respond { retry_after, content_type, .. } => {
                assert_eq!(retry_after.as_deref(), Some("120"));
                assert!(content_type.starts_with("text/html"));
            }
            other => panic!("{other:?}"),
        }
    }
}
