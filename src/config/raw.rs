//! The configuration file as written: what serde reads, before any check.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{auth, kubernetes, notify, Format, LogFormat, RefreshSettings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) magento: RawMagento,
    #[serde(default)]
    pub(super) refresh: RefreshSettings,
    pub(super) output: RawOutput,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) customers: Vec<RawCustomer>,
    #[serde(default)]
    pub(super) notify: Option<notify::RawNotify>,
    #[serde(default)]
    pub(super) auth: auth::RawAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMagento {
    pub(super) base_url: String,
    #[serde(default)]
    pub(super) store_code: Option<String>,
    #[serde(default = "default_timeout")]
    pub(super) timeout: Dur,
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
    /// Absent: REST, or GraphQL with `cloud_service` (an explicit `rest` with it is refused).
    #[serde(default)]
    pub(super) api: Option<RawApi>,
    /// Absent: `/graphql`.
    #[serde(default)]
    pub(super) graphql_path: Option<String>,
    #[serde(default)]
    pub(super) cloud_service: bool,
}

/// `magento.api`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawApi {
    Rest,
    Graphql,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    /// Exactly one of `dir` and `kubernetes`.
    #[serde(default)]
    pub(super) dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) kubernetes: Option<kubernetes::RawKubernetes>,
    #[serde(default = "default_mode")]
    pub(super) mode: Mode,
    #[serde(default)]
    pub(super) format: Format,
    /// A file name in `dir`: every customer's token and expiry in one JSON file.
    #[serde(default)]
    pub(super) index: Option<String>,
    /// Owner and group of every file written; absent: the daemon's own.
    #[serde(default)]
    pub(super) uid: Option<u32>,
    #[serde(default)]
    pub(super) gid: Option<u32>,
    /// Not a key of `output`: read only to say where it belongs (`output.kubernetes.token_api`).
    #[serde(default)]
    pub(super) token_api: Option<serde_yaml::Value>,
}

fn default_mode() -> Mode {
    Mode(0o600)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_listen")]
    pub(super) listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: default_listen() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9102".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub(super) format: LogFormat,
    #[serde(default = "default_level")]
    pub(super) level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { format: LogFormat::default(), level: default_level() }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCustomer {
    pub(super) name: String,
    pub(super) username: String,
    #[serde(default)]
    pub(super) password_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) password_env: Option<String>,
    #[serde(default)]
    pub(super) store_code: Option<String>,
    #[serde(default)]
    pub(super) base_url: Option<String>,
    #[serde(default)]
    pub(super) file: Option<String>,
    /// Overrides `output.format` for this customer's file.
    #[serde(default)]
    pub(super) format: Option<Format>,
    /// Magento's id of the customer: the one-time code route of `cloud_service_otp` takes it.
    #[serde(default)]
    pub(super) customer_id: Option<u64>,
    /// `output.kubernetes`: the Secret this customer's token lives in, instead of the default.
    #[serde(default)]
    pub(super) secret: Option<String>,
}

const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration written as a string (`90s`, `15m`, `1h`); a bare number is refused because its
/// unit would be a guess.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"90s\", \"15m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format_args!("invalid duration {v:?} ({e}); write e.g. \"90s\", \"15m\" or \"1h\""))
                })?;
                // Far beyond any sensible setting, and where time arithmetic would overflow.
                if d > MAX_DURATION {
                    return Err(E::custom(format_args!("duration {v:?} is longer than 10 years")));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file mode written as a quoted octal string of exactly four digits, `"0000"` to `"0777"`.
/// A bare number is refused: YAML reads `0600` as the decimal 600 or the octal 384 depending on
/// the parser's YAML version. So is any other spelling (`"+0600"`, `"600"`, `"0o600"`,
/// `"00600"`): Rust's number parser takes a sign, and a reader of the file should see the mode
/// exactly as `ls -l` and `chmod` show it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mode(pub(super) u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quoted octal string like \"0600\" (a bare number is misread by YAML)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let four_digits = v.len() == 4 && v.starts_with('0') && v.bytes().all(|b| matches!(b, b'0'..=b'7'));
                match u32::from_str_radix(v, 8) {
                    Ok(m) if four_digits => Ok(Mode(m)),
                    _ => Err(E::custom(format_args!(
                        "invalid mode {v:?}: write exactly four octal digits between \"0000\" and \"0777\", like \"0600\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}
