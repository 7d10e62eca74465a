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

    /// Lifetime of opaque customer tokens (`--token-format opaque` logins and the tokens of
    /// generateCustomerTokenAsAdmin); defaults to --token-lifetime.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub opaque_token_lifetime: Option<Duration>,

    /// An admin user allowed Login as Customer (both ACLs), as NAME:PASSWORD or
    /// NAME:PASSWORD:TOTP_SECRET (base32; split at the first and the last ':', so a password
    /// holding ':' needs the third part, empty for none); repeatable.
    #[arg(long = "admin", value_name = "NAME:PASSWORD[:TOTP_SECRET]")]
    pub admins: Vec<String>,

    /// Lifetime of admin tokens (webapi/jwtauth/admin_expiration).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub admin_token_lifetime: Duration,

    /// Wrong passwords or 2FA codes of an admin before the admin user's lock (0 disables it).
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub admin_lock_failures: u32,

    /// How long the admin user's lock lasts.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    pub admin_lock_duration: Duration,

    /// Magento_TwoFactorAuth off: admins with a TOTP secret get tokens from the token route too.
    #[arg(long = "no-2fa")]
    pub no_two_factor: bool,

    /// Turn Login as Customer on (login_as_customer/general/enabled; off by default).
    #[arg(long)]
    pub login_as_customer: bool,

    /// generateCustomerTokenAsAdmin also requires the customer's remote shopping assistance
    /// opt-in (as the docs say; the source read does not check it).
    #[arg(long)]
    pub check_assistance_allowed: bool,

    /// An IMS server-to-server credential (with --cloud-service), as CLIENT_ID:SECRET:ORG_ID
    /// (split at the first and the last ':'); repeatable. Its token URL is <base>/ims/token/v3.
    #[arg(long = "ims-client", value_name = "CLIENT_ID:SECRET:ORG_ID")]
    pub ims_clients: Vec<String>,

    /// `expires_in` of IMS access tokens.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ims_token_lifetime: Duration,

    /// How long a cloud one-time code can be exchanged.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub otp_lifetime: Duration,
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

/// `A:B` or `A:B:C` split at the first and the last ':' (the middle may hold ':' only with C).
fn split_three<'e>(entry: &'e str, flag: &str, form: &str) -> std::io::Result<(&'e str, &'e str, Option<&'e str>)> {
    let Some((first, rest)) = entry.split_once(':').filter(|(first, _)| !first.is_empty()) else {
        return Err(invalid(format!(
            "--{flag} entry without {form} form (starting {:?})",
            entry.split(':').next().unwrap_or("")
        )));
    };
    Ok(match rest.rsplit_once(':') {
        Some((middle, last)) => (first, middle, Some(last).filter(|l| !l.is_empty())),
        None => (first, rest, None),
    })
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
        opaque_token_lifetime: args.opaque_token_lifetime,
        admin_token_lifetime: args.admin_token_lifetime,
        admin_lock_failures: args.admin_lock_failures,
        admin_lock_duration: args.admin_lock_duration,
        two_factor_auth: !args.no_two_factor,
        login_as_customer: args.login_as_customer,
        check_assistance_allowed: args.check_assistance_allowed,
        ims_token_lifetime: args.ims_token_lifetime,
        otp_lifetime: args.otp_lifetime,
    })
    .await?;
    for (email, password) in customers {
        server.add_customer(email, password);
    }
    for entry in &args.admins {
        let (name, password, secret) = split_three(entry, "admin", "NAME:PASSWORD[:TOTP_SECRET]")?;
        server.add_admin(name, password, secret)?;
    }
    for entry in &args.ims_clients {
        match split_three(entry, "ims-client", "CLIENT_ID:SECRET:ORG_ID")? {
            (id, secret, Some(org)) => server.add_ims_client(id, secret, org),
            (id, ..) => return Err(invalid(format!("--ims-client {id:?} without :ORG_ID"))),
        }
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
