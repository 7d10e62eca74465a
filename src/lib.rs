//! magento-token-sidecar keeps Magento 2 / Adobe Commerce customer tokens fresh on disk, for
//! the applications beside it.
//!
//! One refresh flows through the modules in this order:
//!
//! | module       | role                                                                            |
//! |--------------|---------------------------------------------------------------------------------|
//! | [`config`]   | the YAML file: serde types, defaults, validation reporting every problem        |
//! | [`clock`]    | the wall clock as a handle (the system's, or tokio's paused one in tests)       |
//! | [`schedule`] | pure decisions: when to refresh, how long to back off, the lockout policy       |
//! | [`account`]  | one lockout budget per username, shared by every worker that logs in with it    |
//! | [`magento`]  | the HTTP client: the login request and the class of every outcome                |
//! | [`shown`]    | what of a server's answer may be shown: bounded, escaped, never the password     |
//! | [`token`]    | the accepted token form, and its expiry (JWT `exp`, clock skew, opaque tokens)   |
//! | [`attempt`]  | one login under the lockout policy: the only path a password is sent by          |
//! | [`sink`]     | atomic, durable token files; reading back what an earlier run left               |
//! | [`cluster`]  | `output.kubernetes`: the Lease election and the Secret every replica reads       |
//! | [`store`]    | where tokens and 401 ledgers go: files ([`sink`]) or the Secret ([`cluster`])    |
//! | [`index`]    | `output.index`: every customer's token in one file, rebuilt when any changes    |
//! | [`worker`]   | one customer's loop, tying the above together                                    |
//! | [`status`]   | what the workers report: the board behind `/status` and `/readyz`               |
//! | [`notify`]   | telling the app of a new token: a command, a webhook, a signal (`notify:`)       |
//! | [`reaper`]   | the daemon's children: notify's commands, orphans reaped, all killed at stop     |
//! | [`metrics`]  | every Prometheus metric, in an owned registry                                    |
//! | [`daemon`]   | the supervisor (a task per customer, reloads, graceful stop) and `once`          |
//! | [`admin`]    | `/healthz`, `/readyz`, `/status`, `/metrics`, `POST /refresh/<name>`             |
//! | [`signals`]  | SIGTERM/SIGINT/SIGHUP as one typed stream                                        |
//! | [`logging`]  | JSON or text logs, level changeable on reload                                    |
//! | [`secret`]   | the type that keeps passwords and tokens out of logs                             |
//! | [`demo`]     | the `demo` command's set-up (feature `demo`: the dev server crate beside it)    |
#![forbid(unsafe_code)]

pub mod account;
pub mod admin;
pub mod attempt;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod index;
pub mod logging;
pub mod magento;
pub mod metrics;
pub mod notify;
pub mod reaper;
pub mod schedule;
pub mod secret;
pub mod shown;
pub mod signals;
pub mod sink;
pub mod status;
pub mod store;
pub mod token;
pub mod worker;
