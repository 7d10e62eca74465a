//! `demo`: the built-in Magento-compatible server and the daemon against it, on loopback.

use std::time::Duration;

use crate::config::{self, Checks, Config};
use magento_devserver::{DevServer, DevServerOptions};

/// The demo's configuration, with placeholders for the server's URL and a temporary directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// How long the demo server's tokens live: short, so a refresh shows within minutes.
pub const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(120);

/// The admin of `demo --login-as-customer`, its password and its Google Authenticator secret.
pub const DEMO_ADMIN: (&str, &str, &str) = ("token-robot", "admin-demo-password", "JBSWY3DPEHPK3PXP");

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
/// instead of REST. With `login_as_customer`, the configuration holds no customer password: an
/// admin with two-factor authentication gets every customer's token (`auth.method:
/// login_as_customer`), from a server with Login as Customer enabled.
pub async fn prepare(graphql: bool, login_as_customer: bool) -> Result<Demo, String> {
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
    let mut text = DEMO_CONFIG
        .replace("{base_url}", &server.base_url())
        .replace("{dir}", &dir.path().display().to_string())
        .replace("{api}", api);
    if login_as_customer {
        let (admin, password, totp) = DEMO_ADMIN;
        server.add_admin(admin, password, Some(totp)).map_err(|e| e.to_string())?;
        server.set_admin_acl(admin, true, true);
        server.set_two_factor(true);
        server.set_login_as_customer(true);
        let secrets = dir.path().join("secrets");
        std::fs::write(secrets.join("admin"), format!("{password}\n")).map_err(|e| e.to_string())?;
        std::fs::write(secrets.join("admin-totp"), format!("{totp}\n")).map_err(|e| e.to_string())?;
        // The customers' passwords go; the admin's credential comes in.
        // Its customer tokens are opaque: they live the server's customer token lifetime.
        text = text
            .lines()
            .filter(|l| !l.contains("password_file:"))
            .map(|l| match l {
                "refresh:" => format!("{l}\n  default_lifetime: {}\n", humantime::format_duration(DEMO_TOKEN_LIFETIME)),
                _ => format!("{l}\n"),
            })
            .collect();
        text.push_str(&format!(
            "auth:\n  method: login_as_customer\n  admin:\n    username: {admin}\n    password_file: \"{s}/admin\"\n    totp_secret_file: \"{s}/admin-totp\"\n",
            s = secrets.display()
        ));
    }
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
            let demo = prepare(graphql, false).await.unwrap();
            let client = Client::new(&demo.config.magento).unwrap();
            for customer in &demo.config.customers {
                let endpoint = customer.endpoint();
                assert_eq!(matches!(endpoint, Endpoint::GraphQl { .. }), graphql, "{endpoint}");
                let password = customer.read_password().unwrap();
                let token = client.login(&endpoint, &customer.username, &password).await.unwrap();
                assert_eq!(client.whoami(&endpoint, &token).await.unwrap(), customer.username);
            }
            let rest = demo.server.requests().iter().filter(|r| r.route.is_rest()).count();
            assert_eq!(rest == 0, graphql, "{rest} REST requests");
            assert!(demo.text.contains(if graphql { "api: graphql" } else { "api: rest" }));
            demo.server.shutdown().await;
        }
    }

    #[tokio::test]
    async fn the_login_as_customer_demo_holds_no_customer_password() {
        let demo = prepare(false, true).await.unwrap();
        assert!(demo.config.customers.iter().all(|c| c.password.is_none()));
        let crate::config::Auth::LoginAsCustomer(admin) = &demo.config.auth else { panic!("{:?}", demo.config.auth) };
        assert_eq!(admin.username, DEMO_ADMIN.0);
        assert!(admin.totp_secret.is_some());
        assert!(!demo.text.contains("password_file: \"") || demo.text.matches("password_file").count() == 1);
        demo.server.shutdown().await;
    }
}
