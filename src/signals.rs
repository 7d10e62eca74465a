//! SIGTERM, SIGINT and SIGHUP as one typed stream.

use futures::{Stream, StreamExt};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop planning logins, let writes in flight finish, exit 0.
    Shutdown(&'static str),
    /// SIGHUP: reload the configuration file.
    Reload,
}

/// Installs the handlers; from then on these signals no longer kill the process.
pub fn listen() -> std::io::Result<impl Stream<Item = Signal> + Unpin> {
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    Ok(signals.map(|s| match s {
        SIGHUP => Signal::Reload,
        SIGINT => Signal::Shutdown("SIGINT"),
        _ => Signal::Shutdown("SIGTERM"),
    }))
}
