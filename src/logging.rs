//! Log set-up: JSON or text lines on stderr, with a level that a reload can change.

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
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (as in tests that run several daemons in one process) keeps the first.
    let _ = tracing_subscriber::registry().with(filter_layer).with(fmt_layer).try_init();
    Logging { handle, from_env: env.is_some() }
}

impl Logging {
    pub fn set_level(&self, level: &str) {
        if !self.from_env {
            let _ = self.handle.reload(filter(level));
        }
    }
}
