//! Log set-up: JSON or text lines on stderr, with a level that a reload can change.
//!
//! No log line can be forged or a terminal driven through what a log line shows: text lines have
//! every control character of every field escaped ([`escape_controls`]), JSON lines have them
//! escaped by JSON itself, and text from outside (a server's answer) is escaped where it enters
//! an error message, so `/status` and `once`'s stderr are safe too.
//!
//! No answer of the Kubernetes API reaches a log: the daemon reads them itself
//! ([`crate::cluster::api`]), and the one module of kube-rs that logs bodies is never shown
//! ([`without_bodies`]), whatever the level or `RUST_LOG`.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Changes the log level at run time; `RUST_LOG`, when set, wins over the configuration.
pub struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

fn filter(level: &str) -> EnvFilter {
    EnvFilter::builder().parse(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Call once per process.
pub fn init(format: LogFormat, level: &str) -> Logging {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let (filter_layer, handle) = reload::Layer::new(filter(env.as_deref().unwrap_or(level)));
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colours only for a person at a terminal, not in a container's log file.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .fmt_fields(EscapedFields::default())
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(without_bodies());
    // A second init (as in tests that run several daemons in one process) keeps the first.
    let _ = tracing_subscriber::registry().with(filter_layer).with(fmt_layer).try_init();
    Logging { handle, from_env: env.is_some() }
}

/// kube-rs's client module (`kube_client::client`) logs an answer it cannot parse whole, at WARN,
/// and every error answer at DEBUG: a Secret's answer holds its customers' tokens (and a broken
/// server's, hundreds of megabytes). Its other modules (the request span, TLS) log no body.
const BODY_LOGGERS: &[&str] = &["kube_client::client"];

/// Keeps every event of [`BODY_LOGGERS`] out, at any level.
fn without_bodies() -> FilterFn {
    FilterFn::new(|meta| !BODY_LOGGERS.contains(&meta.target()))
}

impl Logging {
    pub fn set_level(&self, level: &str) {
        if !self.from_env {
            let _ = self.handle.reload(filter(level));
        }
    }
}

/// Whether `c` could break a log line, hide text or drive a terminal: the C0 controls (line
/// breaks, ESC, NUL...), DEL, the C1 controls, the Unicode line and paragraph separators and the
/// bidirectional marks, embeddings, overrides and isolates.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `text` with every character of `needs_escape` written as an escape: `\n`, `\r`, `\t`, `\0`,
/// else `\u{1b}` (Rust's notation). Everything else, backslashes included, is left as it is.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The text format's fields (the event's and its spans'), formatted as usual, then with their
/// control characters escaped: a value holding a newline cannot start a line of its own.
#[derive(Default)]
struct EscapedFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut plain = String::new();
        self.0.format_fields(Writer::new(&mut plain), fields)?;
        writer.write_str(&escape_controls(&plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert!(matches!(escape_controls("HTTP 500: a \\ \"b\" é ✓"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\nb\r\tc\0d"), "a\\nb\\r\\tc\\0d");
        assert_eq!(escape_controls("\x1b[31mred\x7f\u{85}\u{9b}"), "\\u{1b}[31mred\\u{7f}\\u{85}\\u{9b}");
        assert_eq!(escape_controls("\u{202e}abc\u{2066}\u{2069}\u{2028}"), "\\u{202e}abc\\u{2066}\\u{2069}\\u{2028}");
        // Escaping twice changes nothing more: an escaped message can be escaped again safely.
        let once = escape_controls("x\ny\x1b").into_owned();
        assert_eq!(escape_controls(&once), once);
    }

    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn kube_clients_lines_with_bodies_are_never_shown() {
        let buffer = Buffer::default();
        let layer = tracing_subscriber::fmt::layer().json().with_writer(buffer.clone()).with_filter(without_bodies());
        let subscriber = tracing_subscriber::registry().with(EnvFilter::new("trace")).with(layer);
        tracing::subscriber::with_default(subscriber, || {
            // kube_client::client's own words when a Secret does not parse.
            tracing::warn!(target: "kube_client::client", "{}, {:?}", r#"{"data":{"alice":"dG9rZW4="}}"#, "Error");
            tracing::debug!(target: "kube_client::client", "Unsuccessful data error parse: <html>");
            tracing::warn!(target: "kube_client::client::tls", "failed to reload CA bundle; keeping stale roots");
            tracing::warn!("cannot read the Secret");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("dG9rZW4=") && !text.contains("<html>"), "{text}");
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn text_fields_never_break_the_line() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields::default())
            .with_ansi(false)
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("worker", customer = "a\nb");
            let _entered = span.enter();
            tracing::warn!(error = %"x\n2026-01-01 ERROR forged\x1b[2J\0", "login\nfailed");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(!text.contains(['\x1b', '\0', '\r']), "{text:?}");
        assert!(text.contains("login\\nfailed") && text.contains("error=x\\n2026-01-01 ERROR forged"), "{text}");
        assert!(text.contains("customer=\"a\\nb\""), "{text}");
    }
}
