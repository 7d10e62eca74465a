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

/// What the demo set up: the server, the temporary directory and the daemon's configuration
/// (as text, for the file a reload reads, and parsed).
pub struct Demo {
    pub server: DevServer,
    pub dir: tempfile::TempDir,
    pub text: String,
    pub config: Config,
}

/// Starts the demo server with its customers and writes their password files; with `graphql`,
/// the daemon's configuration logs in and checks tokens through GraphQL (`magento.api: graphql`)
/// instead of REST.
pub async fn prepare(graphql: bool) -> Result<Demo, String> {
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
    let api = if graphql { "graphql" } else { "rest" };
    let text = DEMO_CONFIG
        .replace("{base_url}", &server.base_url())
        .replace("{dir}", &dir.path().display().to_string())
        .replace("{api}", api);
    let config = config::parse(&text, Checks::Environment)
        .map_err(|problems| problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))?;
    Ok(Demo { server, dir, text, config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;
    use crate::magento::Client;

    #[tokio::test]
    async fn the_graphql_demo_logs_its_customers_in_through_graphql() {
        for graphql in [false, true] {
            let demo = prepare(graphql).await.unwrap();
            let client = Client::new(&demo.config.magento).unwrap();
            for customer in &demo.config.customers {
                let endpoint = customer.endpoint();
                assert_eq!(matches!(endpoint, Endpoint::GraphQl { .. }), graphql, "{endpoint}");
                let password = customer.password.read().unwrap();
                let token = client.login(&endpoint, &customer.username, &password).await.unwrap();
                assert_eq!(client.whoami(&endpoint, &token).await.unwrap(), customer.username);
            }
            let rest = demo.server.requests().iter().filter(|r| r.route.is_rest()).count();
            assert_eq!(rest == 0, graphql, "{rest} REST requests");
            assert!(demo.text.contains(if graphql { "api: graphql" } else { "api: rest" }));
            demo.server.shutdown().await;
        }
    }
}
