//! `magento-token-sidecar devserver ...` and `magento-devserver ...`: the development server as a
//! process, for the Python tests, the benchmarks and manual use.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{CloudService, DevServer, DevServerOptions, GraphQlConvention, TokenFormat};

/// Flags of the `devserver` command.
#[derive(clap::Args, Debug, Clone)]
pub struct DevServerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// A customer of website `base`, as EMAIL:PASSWORD (split at the first ':'); repeatable.
    #[arg(long = "customer", value_name = "EMAIL:PASSWORD")]
    pub customers: Vec<String>,

    /// A file of customers, one `email:password` per line (blank lines are skipped).
    #[arg(long, value_name = "FILE")]
    pub customers_file: Option<PathBuf>,

    /// JWT lifetime (exp - iat), e.g. 1h, 90s.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,

    /// What the token endpoint issues: JWS (readable claims), opaque 32-character tokens, or
    /// encrypted JWTs (JWE, unreadable claims).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = TokenFormat::Jwt)]
    pub token_format: TokenFormat,

    /// Issue opaque 32-character tokens instead of JWTs (same as `--token-format opaque`).
    #[arg(long, conflicts_with = "token_format")]
    pub opaque: bool,

    /// Failed logins per username before the brute-force lock.
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub lock_max_failures: u32,

    /// How long the brute-force lock lasts after the last failure.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,

    /// A store whose cron does not run: an expired brute-force row keeps its count, so the
    /// next failure adds to it; only a successful login clears it.
    #[arg(long)]
    pub no_cron: bool,

    /// Wrong passwords of a customer before the customer's own lock (0 disables it).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub customer_lock_failures: u32,

    /// How long the customer's own lock lasts.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub customer_lock_duration: Duration,

    /// An htpasswd front before the whole store, as USER:PASS (split at the first ':'):
    /// requests without these Basic credentials get the web server's HTML 401.
    #[arg(long, value_name = "USER:PASS")]
    pub basic_auth: Option<String>,

    /// A store view, as CODE or CODE:WEBSITE (website defaults to `base`); repeatable.
    /// The store `default` (website `base`) always exists unless given explicitly.
    #[arg(long = "store", value_name = "CODE[:WEBSITE]")]
    pub stores: Vec<String>,

    /// Answer every login with the reCAPTCHA error, like a store that requires it.
    #[arg(long)]
    pub recaptcha_required: bool,

    /// Seconds added to the server's clock (iat, exp and expiry checks).
    #[arg(long, value_name = "SECONDS", default_value_t = 0, allow_hyphen_values = true)]
    pub clock_offset: i64,

    /// How long every login (REST token request or GraphQL generateCustomerToken) waits before
    /// it is answered, e.g. 20ms (a store whose PHP takes its time); other connections are
    /// served meanwhile.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub login_latency: Duration,

    /// Whose GraphQL answers to give: 2.4.7 (resolver errors always 200, errors before execution
    /// 500, bad tokens ignored) or 2.4.8 (401/403 by category, bearer tokens checked first).
    #[arg(long, value_enum, value_name = "RELEASE", default_value_t = GraphQlConvention::V2_4_8)]
    pub graphql_convention: GraphQlConvention,

    /// Path of the GraphQL endpoint (under /TENANT_ID with --cloud-service).
    #[arg(long, value_name = "PATH", default_value = "/graphql")]
    pub graphql_path: String,

    /// Answer as Adobe Commerce as a Cloud Service: the API under /TENANT_ID (GraphQL at
    /// /TENANT_ID/graphql, REST at /TENANT_ID/V1/... with no customer-token routes).
    #[arg(long, value_name = "TENANT_ID")]
    pub cloud_service: Option<String>,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

fn split_customer(entry: &str) -> std::io::Result<(&str, &str)> {
    match entry.split_once(':') {
        Some((email, password)) if !email.is_empty() => Ok((email, password)),
        _ => Err(invalid(format!(
            "customer entry without EMAIL:PASSWORD form (starting {:?})",
            entry.split(':').next().unwrap_or("")
        ))),
    }
}

/// Builds the options and starts the server with its customers.
pub(crate) async fn start_from_args(args: &DevServerArgs) -> std::io::Result<DevServer> {
    let mut stores: Vec<(String, String)> = args
        .stores
        .iter()
        .map(|s| match s.split_once(':') {
            Some((code, website)) => (code.to_owned(), website.to_owned()),
            None => (s.clone(), "base".to_owned()),
        })
        .collect();
    if let Some((code, _)) = stores.iter().find(|(c, w)| c.is_empty() || w.is_empty()) {
        return Err(invalid(format!("--store {code:?}: empty store or website code")));
    }
    if !stores.iter().any(|(code, _)| code == "default") {
        stores.insert(0, ("default".to_owned(), "base".to_owned()));
    }
    let mut lines: Vec<String> = args.customers.clone();
    if let Some(path) = &args.customers_file {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        lines.extend(
            text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l)).filter(|l| !l.trim().is_empty()).map(str::to_owned),
        );
    }
    let customers = lines.iter().map(|l| split_customer(l)).collect::<std::io::Result<Vec<_>>>()?;
    let basic_auth = args
        .basic_auth
        .as_deref()
        .map(|b| b.split_once(':').ok_or_else(|| invalid("--basic-auth without USER:PASS form".to_owned())))
        .transpose()?;
    let server = DevServer::start(DevServerOptions {
        listen: args.listen,
        token_lifetime: args.token_lifetime,
        token_format: if args.opaque { TokenFormat::Opaque } else { args.token_format },
        opaque_tokens: false,
        lock_max_failures: args.lock_max_failures,
        lock_timeout: args.lock_timeout,
        cron: !args.no_cron,
        customer_lock_failures: args.customer_lock_failures,
        customer_lock_duration: args.customer_lock_duration,
        stores,
        recaptcha_required: args.recaptcha_required,
        clock_offset_secs: args.clock_offset,
        tls: None,
        login_latency: args.login_latency,
        graphql_convention: args.graphql_convention,
        graphql_path: args.graphql_path.clone(),
        cloud_service: args.cloud_service.clone().map(CloudService::new),
    })
    .await?;
    for (email, password) in customers {
        server.add_customer(email, password);
    }
    server.set_basic_auth(basic_auth);
    Ok(server)
}

/// Runs the server until `shutdown` resolves. Prints exactly one line to stdout,
/// `listening on http://ADDR`, once it accepts connections.
pub async fn run_cli(args: DevServerArgs, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let server = start_from_args(&args).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.base_url())?;
        out.flush()?;
    }
    shutdown.await;
    server.shutdown().await;
    Ok(())
}
