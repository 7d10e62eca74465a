//! `demo`: the built-in Magento-compatible server and the daemon against it, on loopback.

use std::time::Duration;

use crate::config::{self, Checks, Config};
use magento_devserver::{DevServer, DevServerOptions};

/// The demo's configuration, with placeholders for the server's URL and a temporary directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// How long the demo server's tokens live: short, so a refresh shows within minutes.
pub const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(120);

pub const DEMO_CUSTOMERS: [(&str, &str, &str); 2] =
    [("alice", "alice@example.com", "alice-demo-password"), ("bob", "bob@example.com", "bob-demo-password")];

/// What the demo set up: the server, the temporary directory and the daemon's configuration.
pub struct Demo {
    pub server: DevServer,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

pub async fn prepare() -> Result<Demo, String> {
    let server = DevServer::start(DevServerOptions { token_lifetime: DEMO_TOKEN_LIFETIME, ..Default::default() })
        .await
        .map_err(|e| format!("cannot start the demo server: {e}"))?;
    let dir = tempfile::Builder::new().prefix("magento-token-sidecar-demo.").tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir(dir.path().join("tokens")).map_err(|e| e.to_string())?;
    std::fs::create_dir(dir.path().join("secrets")).map_err(|e| e.to_string())?;
    for (name, email, password) in DEMO_CUSTOMERS {
        server.add_customer(email, password);
        std::fs::write(dir.path().join("secrets").join(name), format!("{password}\n")).map_err(|e| e.to_string())?;
    }
    let text =
        DEMO_CONFIG.replace("{base_url}", &server.base_url()).replace("{dir}", &dir.path().display().to_string());
    let config = config::parse(&text, Checks::Environment)
        .map_err(|problems| problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))?;
    Ok(Demo { server, dir, config })
}
