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
//! | [`magento`]  | the HTTP client: logins and checks over REST or GraphQL, each outcome's class    |
//! | [`shown`]    | what of a server's answer may be shown: bounded, escaped, never the password     |
//! | [`token`]    | the accepted token form, and its expiry (JWT `exp`, clock skew, opaque tokens)   |
//! | [`attempt`]  | one login under the lockout policy: the only path a password is sent by          |
//! | [`issuer`]   | tokens without customer passwords: the admin's or IMS token, kept fresh; minting |
//! | [`totp`]     | the admin's two-factor code (RFC 6238) from its base32 secret                     |
//! | [`ledger`]   | the record of recent 401s that outlives the process, judged before it is believed|
//! | [`format`]   | what a token file holds: the four formats, written and read back                 |
//! | [`sink`]     | atomic, durable token files                                                      |
//! | [`fs`]       | local files read without blocking and within a limit; a file's mode and owner    |
//! | [`dirlock`]  | one daemon per output directory                                                  |
//! | [`cluster`]  | `output.kubernetes`: the Lease election and the Secret (feature `kubernetes`)   |
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
#[cfg(feature = "kubernetes")]
pub mod cluster;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dirlock;
pub mod format;
pub mod fs;
pub mod issuer;
pub mod ledger;
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
pub mod totp;
pub mod worker;

/// The modules above form a graph without cycles: each one's `crate::` imports (outside its
/// tests) never lead back to it, at any length, so any module can be read, tested and moved
/// with what it imports alone.
#[cfg(test)]
mod module_graph {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Every top-level module and the modules it imports, from the source text.
    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(&src).unwrap();
                let top = rel.iter().next().unwrap().to_str().unwrap().trim_end_matches(".rs").to_owned();
                if path.extension().is_none_or(|e| e != "rs") || ["main", "lib"].contains(&top.as_str()) {
                    continue;
                }
                if path.file_name().is_some_and(|n| n == "tests.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let deps = graph.entry(top.clone()).or_default();
                for line in code.lines().map(|l| l.split("//").next().unwrap_or_default()) {
                    for (i, _) in line.match_indices("crate::") {
                        let rest = &line[i + "crate::".len()..];
                        let names: Vec<&str> = match rest.strip_prefix('{') {
                            Some(group) => group.split('}').next().unwrap_or_default().split(',').collect(),
                            None => vec![rest],
                        };
                        for name in names {
                            let name: String =
                                name.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                            if !name.is_empty() && name != top {
                                deps.insert(name);
                            }
                        }
                    }
                }
            }
        }
        graph
    }

    #[test]
    fn no_module_imports_one_that_imports_it_back() {
        let graph = graph();
        assert!(graph.len() > 20, "the modules were found: {:?}", graph.keys());
        // Depth-first from each module: a path back to it is a cycle.
        for start in graph.keys() {
            let mut seen = BTreeSet::new();
            let mut paths = vec![vec![start.clone()]];
            while let Some(path) = paths.pop() {
                for next in graph.get(path.last().unwrap()).into_iter().flatten() {
                    assert!(next != start, "import cycle: {} -> {start}", path.join(" -> "));
                    if graph.contains_key(next) && seen.insert(next.clone()) {
                        paths.push([path.clone(), vec![next.clone()]].concat());
                    }
                }
            }
        }
    }
}
