//! Every metric the daemon exports, defined in one place, in an owned registry.
//!
//! Per-customer series exist at 0 for every label value as soon as a customer is configured,
//! so dashboards and alerts see a customer before its first login, and they are gone when a
//! reload removes the customer. Their values live in the status [`Board`] (one compact entry a
//! customer) and are turned into series only while `/metrics` is scraped.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::ops::Bound;
use std::time::SystemTime;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::magento::Outcome;
use crate::status::{Board, Check, Entry, Notified};

/// A per-customer family: every configured customer has its series, written from its
/// [`Board`] entry whenever `/metrics` is scraped.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    value: Value,
}

enum Value {
    /// One series, labelled `customer`.
    One(fn(&Entry, SystemTime) -> f64),
    /// One series per [`Outcome`], labelled `customer` and `result`.
    PerOutcome,
    /// One series per [`Check`], labelled `customer` and `result`.
    PerCheck,
    /// One series per [`Notified`], labelled `customer` and `result`.
    PerNotified,
}

/// Every per-customer family, in the order of their names (the order of the exposition).
const FAMILIES: [Family; 12] = [
    Family {
        name: "magento_token_clock_skew_seconds",
        help: "Magento's clock minus ours, from the last JWT's iat, when more than a minute apart (else 0).",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| e.clock_skew as f64),
    },
    Family {
        name: "magento_token_consecutive_failures",
        help: "Failed logins since the last success.",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| f64::from(e.consecutive_failures)),
    },
    Family {
        name: "magento_token_expiry_timestamp_seconds",
        help: "Unix time the token on disk expires (0: none).",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| timestamp(e.expires_at)),
    },
    Family {
        name: "magento_token_held_back",
        help: "1 while the lockout budget holds every login back: no time helps; fix the password, or reset Magento's count and run forget-failures.",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| f64::from(u8::from(e.held_back))),
    },
    Family {
        name: "magento_token_last_success_timestamp_seconds",
        help: "Unix time of the last successful write (0: none yet).",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| timestamp(e.last_success_at)),
    },
    Family {
        name: "magento_token_next_refresh_timestamp_seconds",
        help: "Unix time the next login is planned (0: none planned).",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| timestamp(e.next_refresh_at)),
    },
    Family {
        name: "magento_token_notify_total",
        help: "Notifications of a new token (notify) by result: success, failure (an action failed twice).",
        kind: MetricType::COUNTER,
        value: Value::PerNotified,
    },
    Family {
        name: "magento_token_password_errors_total",
        help: "Password sources that could not be read before a login.",
        kind: MetricType::COUNTER,
        value: Value::One(|e, _| e.password_errors as f64),
    },
    Family {
        name: "magento_token_paused",
        help: "1 while the customer is paused after repeated 401s (its password is probably wrong).",
        kind: MetricType::GAUGE,
        value: Value::One(|e, _| f64::from(u8::from(e.paused))),
    },
    Family {
        name: "magento_token_refresh_total",
        help: "Logins by outcome.",
        kind: MetricType::COUNTER,
        value: Value::PerOutcome,
    },
    Family {
        name: "magento_token_valid",
        help: "1 when an unexpired token is on disk.",
        kind: MetricType::GAUGE,
        value: Value::One(|e, now| f64::from(u8::from(e.valid(now)))),
    },
    Family {
        name: "magento_token_validations_total",
        help: "Checks of the token on disk (GET customers/me) by result: valid, revoked (replaced at once), error (kept).",
        kind: MetricType::COUNTER,
        value: Value::PerCheck,
    },
];

impl Family {
    fn label_names(&self) -> &'static [&'static str] {
        match self.value {
            Value::One(_) => &["customer"],
            Value::PerOutcome | Value::PerCheck | Value::PerNotified => &["customer", "result"],
        }
    }

    /// Calls `f` with the `result` label (if the family has one) and the value of each of one
    /// customer's series, in the order of the exposition.
    fn series(&self, e: &Entry, now: SystemTime, mut f: impl FnMut(Option<&'static str>, f64)) {
        match self.value {
            Value::One(value) => f(None, value(e, now)),
            Value::PerOutcome => {
                for outcome in Outcome::SORTED {
                    f(Some(outcome.as_str()), f64::from(e.refreshes[outcome.index()]));
                }
            }
            Value::PerCheck => {
                for check in Check::ALL {
                    f(Some(check.as_str()), f64::from(e.checks[check.index()]));
                }
            }
            Value::PerNotified => {
                for n in Notified::ALL {
                    f(Some(n.as_str()), f64::from(e.notifies[n.index()]));
                }
            }
        }
    }

    /// This family as Prometheus' data model (what `Registry::gather` returns).
    fn collect(&self, board: &BTreeMap<Box<str>, Entry>, now: SystemTime) -> MetricFamily {
        let mut mf = MetricFamily::default();
        mf.set_name(self.name.into());
        mf.set_help(self.help.into());
        mf.set_field_type(self.kind);
        let metrics = mf.mut_metric();
        metrics.reserve(board.len() * Outcome::ALL.len());
        for (customer, e) in board {
            self.series(e, now, |result, value| {
                let mut labels = vec![label_pair("customer", customer)];
                labels.extend(result.map(|r| label_pair("result", r)));
                let mut m = Metric::from_label(labels);
                if self.kind == MetricType::COUNTER {
                    let mut c = proto::Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
                metrics.push(m);
            });
        }
        mf
    }

    /// `# HELP` and `# TYPE`, as `TextEncoder` writes them.
    fn write_header(&self, out: &mut String) {
        let kind = if self.kind == MetricType::COUNTER { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {kind}", self.name, escape(self.help, false), self.name);
    }

    /// One customer's series in the text format, exactly as `TextEncoder` writes what
    /// [`Family::collect`] makes of them.
    fn write_customer(&self, out: &mut String, customer: &str, e: &Entry, now: SystemTime) {
        let customer = escape(customer, true);
        self.series(e, now, |result, value| {
            out.push_str(self.name);
            out.push_str("{customer=\"");
            out.push_str(&customer);
            if let Some(result) = result {
                out.push_str("\",result=\"");
                out.push_str(result);
            }
            let _ = writeln!(out, "\"}} {value}");
        });
    }
}

fn label_pair(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

/// The text format's escaping: `\` and newlines always, `"` in label values.
fn escape(s: &str, quote: bool) -> Cow<'_, str> {
    let special: &[char] = if quote { &['\\', '\n', '"'] } else { &['\\', '\n'] };
    if !s.contains(special) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The per-customer families as a [`Collector`], so the registry's `gather` holds every
/// metric. Scrapes do not go through it: [`Metrics::encode`] writes the same series as text
/// straight from the board.
struct CustomerCollector {
    board: Board,
    descs: Vec<Desc>,
}

impl CustomerCollector {
    fn new(board: Board) -> CustomerCollector {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                let labels = f.label_names().iter().map(|l| l.to_string()).collect();
                Desc::new(f.name.into(), f.help.into(), labels, HashMap::new()).expect("valid names and help")
            })
            .collect();
        CustomerCollector { board, descs }
    }
}

impl Collector for CustomerCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = SystemTime::now();
        self.board.with(|board| FAMILIES.iter().map(|f| f.collect(board, now)).collect())
    }
}

/// `output.kubernetes`: `magento_token_leader` (always, 0 without a Lease) and
/// `magento_token_kubernetes_requests_total` (a series per request outcome seen; none when the
/// daemon writes files), read from the board.
#[derive(Clone)]
struct ClusterCollector {
    board: Board,
    descs: Vec<Desc>,
}

const LEADER: (&str, &str) = (
    "magento_token_leader",
    "1 while this replica holds the Lease (output.kubernetes) and writes the Secret; 0 otherwise.",
);
const API_REQUESTS: (&str, &str) = (
    "magento_token_kubernetes_requests_total",
    "Kubernetes API requests (output.kubernetes) by object, verb and result.",
);
const SECRET_WRITES: (&str, &str) = (
    "magento_token_kubernetes_writes_total",
    "Updates of each Secret written (output.kubernetes): at most one a second per Secret, carrying every change made meanwhile.",
);

const TOKEN_API_REQUESTS: (&str, &str) = (
    "magento_token_api_requests_total",
    "Token API requests (output.kubernetes.token_api) by route (token, refresh) and result (allowed, unauthenticated, forbidden, not_found, standby, unavailable).",
);

/// The description of a family that is not per customer: its name, help and label names.
fn desc((name, help): (&str, &str), labels: &[&str]) -> Desc {
    Desc::new(name.into(), help.into(), labels.iter().map(|l| l.to_string()).collect(), HashMap::new())
        .expect("valid names and help")
}

/// A family that is not per customer, with one series for each of `series`: its labels (in the
/// order of their names, as the text format lists them) and value.
fn family((name, help): (&str, &str), kind: MetricType, series: Vec<(Vec<LabelPair>, f64)>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.into());
    mf.set_help(help.into());
    mf.set_field_type(kind);
    for (labels, value) in series {
        let mut m = Metric::from_label(labels);
        if kind == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        mf.mut_metric().push(m);
    }
    mf
}

impl ClusterCollector {
    fn new(board: Board) -> ClusterCollector {
        let descs = vec![
            desc(LEADER, &[]),
            desc(API_REQUESTS, &["resource", "verb", "result"]),
            desc(TOKEN_API_REQUESTS, &["route", "result"]),
            desc(SECRET_WRITES, &["secret"]),
        ];
        ClusterCollector { board, descs }
    }
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let leading = self.board.leadership().is_some_and(|l| l.leading);
        let leader = family(LEADER, MetricType::GAUGE, vec![(Vec::new(), f64::from(u8::from(leading)))]);
        let mut families = vec![leader];
        if let Some(counts) = self.board.token_api_requests() {
            let series = counts
                .into_iter()
                .map(|((route, result), n)| {
                    (vec![label_pair("result", result.as_str()), label_pair("route", route.as_str())], n as f64)
                })
                .collect();
            families.push(family(TOKEN_API_REQUESTS, MetricType::COUNTER, series));
        }
        let requests = self.board.api_requests();
        if requests.is_empty() {
            return families;
        }
        let series = requests
            .into_iter()
            .map(|((resource, verb, result), n)| {
                let labels = vec![
                    label_pair("resource", resource),
                    label_pair("result", result.as_str()),
                    label_pair("verb", verb),
                ];
                (labels, n as f64)
            })
            .collect();
        families.push(family(API_REQUESTS, MetricType::COUNTER, series));
        let writes = self.board.secret_writes();
        if !writes.is_empty() {
            let series =
                writes.into_iter().map(|(secret, n)| (vec![label_pair("secret", &secret)], n as f64)).collect();
            families.push(family(SECRET_WRITES, MetricType::COUNTER, series));
        }
        families
    }
}

/// `auth.method` other than `password`: the issuer's own series, labelled `method`, read from
/// the board (none without an issuer).
#[derive(Clone)]
struct IssuerCollector {
    board: Board,
    descs: Vec<Desc>,
}

const ISSUER_EXPIRY: (&str, &str) = (
    "magento_token_issuer_expiry_timestamp_seconds",
    "Unix time the issuer's credential (the admin token, or the IMS access token) expires (0: none).",
);
const ISSUER_HELD_BACK: (&str, &str) = (
    "magento_token_issuer_held_back",
    "1 while the issuer's lockout budget holds its logins back: fix the admin password, TOTP secret or IMS client secret.",
);
const ISSUER_REFRESHES: (&str, &str) = (
    "magento_token_issuer_refresh_total",
    "Logins of the issuer's credential (the admin's, or the IMS client's) by outcome.",
);

impl IssuerCollector {
    fn new(board: Board) -> IssuerCollector {
        let descs = vec![
            desc(ISSUER_EXPIRY, &["method"]),
            desc(ISSUER_HELD_BACK, &["method"]),
            desc(ISSUER_REFRESHES, &["method", "result"]),
        ];
        IssuerCollector { board, descs }
    }
}

impl Collector for IssuerCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(e) = self.board.issuer_metrics() else { return Vec::new() };
        let method = || vec![label_pair("method", e.method)];
        let held_back = f64::from(u8::from(e.state == crate::status::IssuerState::HeldBack));
        let refreshes = Outcome::SORTED
            .iter()
            .map(|o| ([method(), vec![label_pair("result", o.as_str())]].concat(), f64::from(e.refreshes[o.index()])))
            .collect();
        vec![
            family(ISSUER_EXPIRY, MetricType::GAUGE, vec![(method(), timestamp(e.expires_at))]),
            family(ISSUER_HELD_BACK, MetricType::GAUGE, vec![(method(), held_back)]),
            family(ISSUER_REFRESHES, MetricType::COUNTER, refreshes),
        ]
    }
}

/// Every metric of the process, in an owned registry, and the board the per-customer series
/// are read from.
pub struct Metrics {
    /// Every metric, the per-customer families included: [`Metrics::gather`].
    registry: Registry,
    /// The metrics that are not per customer, also in `registry`: what a scrape
    /// ([`Metrics::text`]) gathers; it writes the per-customer families from the board itself.
    fixed: Registry,
    board: Board,
    reloads: IntCounterVec,
}

impl Metrics {
    /// The metrics of the process whose workers report to `board`.
    pub fn new(board: Board) -> Metrics {
        let m = Metrics {
            registry: Registry::new(),
            fixed: Registry::new(),
            board,
            reloads: IntCounterVec::new(
                Opts::new("magento_token_config_reloads_total", "Configuration reloads (SIGHUP) by result."),
                &["result"],
            )
            .unwrap(),
        };
        let build_info =
            IntGaugeVec::new(Opts::new("magento_token_build_info", "Always 1; the version is a label."), &["version"])
                .unwrap();
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = || prometheus::process_collector::ProcessCollector::for_self();
        let cluster = ClusterCollector::new(m.board.clone());
        let issuer = IssuerCollector::new(m.board.clone());
        let fixed: [Box<dyn Collector>; 6] = [
            Box::new(cluster.clone()),
            Box::new(issuer.clone()),
            Box::new(m.board.login_times().clone()),
            Box::new(m.reloads.clone()),
            Box::new(build_info.clone()),
            Box::new(process()),
        ];
        for c in fixed {
            m.fixed.register(c).expect("metric names are unique");
        }
        let all: [Box<dyn Collector>; 7] = [
            Box::new(cluster),
            Box::new(issuer),
            Box::new(CustomerCollector::new(m.board.clone())),
            Box::new(m.board.login_times().clone()),
            Box::new(m.reloads.clone()),
            Box::new(build_info),
            Box::new(process()),
        ];
        for c in all {
            m.registry.register(c).expect("metric names are unique");
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    /// The board every per-customer series is read from: the one of this process.
    pub fn board(&self) -> &Board {
        &self.board
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "success" } else { "failure" }]).inc();
    }

    /// Every metric in Prometheus' data model, built from the board for the per-customer ones.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric: byte for byte what `TextEncoder` makes
    /// of [`Metrics::gather`].
    pub fn encode(&self) -> String {
        self.text().collect()
    }

    /// [`Metrics::encode`] in pieces of about [`TEXT_CHUNK`] bytes, each written when it is
    /// asked for: a scrape's response is sent as it is written, and costs a few pieces of
    /// memory at a time instead of the whole text (0.9 KiB a customer, which malloc would
    /// keep). A customer added or removed while a scrape is being sent may show in some of
    /// its families only, as if it had happened between two scrapes for the others.
    pub fn text(&self) -> TextChunks {
        let mut sections = VecDeque::with_capacity(FAMILIES.len() + 8);
        let mut fixed = self.fixed.gather().into_iter().peekable();
        let encoder = TextEncoder::new();
        let encode = |mf: MetricFamily| {
            let mut text = String::new();
            encoder.encode_utf8(&[mf], &mut text).expect("no empty family is gathered");
            Section::Text(text)
        };
        for family in &FAMILIES {
            while let Some(mf) = fixed.next_if(|mf| mf.name() < family.name) {
                sections.push_back(encode(mf));
            }
            sections.push_back(Section::Customers(family));
        }
        sections.extend(fixed.map(encode));
        TextChunks { board: self.board.clone(), now: SystemTime::now(), sections, after: None }
    }
}

/// The size a piece of [`Metrics::text`] grows to before it is handed out: well below
/// malloc's threshold for mapping memory of its own, so the pieces reuse the same memory.
pub const TEXT_CHUNK: usize = 32 * 1024;

/// The text exposition, piece by piece: see [`Metrics::text`].
pub struct TextChunks {
    board: Board,
    /// For `magento_token_valid`: one moment for the whole scrape.
    now: SystemTime,
    sections: VecDeque<Section>,
    /// The last customer written of the family at the front, when it is partly written.
    after: Option<Box<str>>,
}

enum Section {
    /// Families that are not per customer, already in the text format.
    Text(String),
    Customers(&'static Family),
}

impl Iterator for TextChunks {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        let mut out = String::with_capacity(TEXT_CHUNK + 4 * 1024);
        while out.len() < TEXT_CHUNK {
            match self.sections.pop_front() {
                None => break,
                Some(Section::Text(text)) => out.push_str(&text),
                Some(Section::Customers(family)) => {
                    let after = self.after.take();
                    let now = self.now;
                    self.board.with(|board| {
                        let rest = match &after {
                            // As the registry leaves out a family without series.
                            None if board.is_empty() => return,
                            None => {
                                family.write_header(&mut out);
                                board.range::<str, _>(..)
                            }
                            Some(last) => board.range::<str, _>((Bound::Excluded(&**last), Bound::Unbounded)),
                        };
                        for (customer, e) in rest {
                            family.write_customer(&mut out, customer, e, now);
                            if out.len() >= TEXT_CHUNK {
                                self.after = Some(customer.clone());
                                break;
                            }
                        }
                    });
                    if self.after.is_some() {
                        self.sections.push_front(Section::Customers(family));
                    }
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// A `_timestamp_seconds` value: Unix seconds, 0 for none (and for a time before the epoch).
fn timestamp(t: Option<SystemTime>) -> f64 {
    t.map_or(0.0, |t| crate::clock::unix_secs(t).max(0) as f64)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use prometheus::Encoder;

    use super::*;

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(str::to_owned))
    }

    #[test]
    fn every_customer_series_starts_at_zero_and_goes_with_the_customer() {
        let m = Metrics::new(Board::new());
        m.board().add("alice");
        let text = m.encode();
        for outcome in Outcome::ALL {
            let series = format!("magento_token_refresh_total{{customer=\"alice\",result=\"{}\"}}", outcome.as_str());
            assert_eq!(value(&text, &series).as_deref(), Some("0"), "{series}");
        }
        for result in ["success", "failure"] {
            let series = format!("magento_token_notify_total{{customer=\"alice\",result=\"{result}\"}}");
            assert_eq!(value(&text, &series).as_deref(), Some("0"), "{series}");
        }
        for name in [
            "magento_token_expiry_timestamp_seconds",
            "magento_token_last_success_timestamp_seconds",
            "magento_token_next_refresh_timestamp_seconds",
            "magento_token_consecutive_failures",
            "magento_token_valid",
        ] {
            assert_eq!(value(&text, &format!("{name}{{customer=\"alice\"}}")).as_deref(), Some("0"), "{name}");
        }
        assert_eq!(value(&text, "magento_token_config_reloads_total{result=\"failure\"}").as_deref(), Some("0"));
        assert_eq!(
            value(&text, &format!("magento_token_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))).as_deref(),
            Some("1")
        );
        assert!(text.contains("process_resident_memory_bytes"));
        m.board().remove("alice");
        assert!(!m.encode().contains("alice"));
    }

    #[test]
    fn a_login_counts_and_times() {
        let m = Metrics::new(Board::new());
        m.board().add("bob");
        crate::status::Reporter::new("bob", m.board().clone()).failure(
            Outcome::AuthFailure,
            "401",
            UNIX_EPOCH,
            Some(Duration::from_millis(30)),
        );
        let text = m.encode();
        assert_eq!(
            value(&text, "magento_token_refresh_total{customer=\"bob\",result=\"auth_failure\"}").as_deref(),
            Some("1")
        );
        assert_eq!(value(&text, "magento_token_refresh_duration_seconds_bucket{le=\"0.05\"}").as_deref(), Some("1"));
        assert_eq!(value(&text, "magento_token_refresh_duration_seconds_bucket{le=\"0.025\"}").as_deref(), Some("0"));
        assert_eq!(value(&text, "magento_token_consecutive_failures{customer=\"bob\"}").as_deref(), Some("1"));
    }

    #[test]
    fn outcomes_are_listed_in_label_order() {
        let mut sorted = Outcome::ALL;
        sorted.sort_by_key(|o| o.as_str());
        assert_eq!(sorted, Outcome::SORTED);
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o.index(), i);
        }
    }

    /// The samples of a text exposition, the process's own (which change between two calls)
    /// left out.
    fn without_process_samples(text: &str) -> String {
        text.lines().filter(|l| !l.starts_with("process_")).map(|l| format!("{l}\n")).collect()
    }

    fn busy_metrics() -> Metrics {
        let m = Metrics::new(Board::new());
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (i, name) in ["alice", "bob", "carol-2", "d.e_f"].into_iter().enumerate() {
            m.board().add(name);
            m.board().update(name, |e| {
                e.expires_at = (i != 1).then_some(t + Duration::from_secs(3600 * i as u64));
                e.last_success_at = (i != 1).then_some(t);
                e.next_refresh_at = (i != 3).then_some(t + Duration::from_millis(2_700_500));
                e.consecutive_failures = i as u32;
                e.paused = i == 1;
                e.clock_skew = [0, -300, 75, 0][i];
                e.password_errors = i as u64 * 2;
                for o in Outcome::ALL {
                    e.refreshes[o.index()] = (o.index() * 7 + i) as u32;
                }
                e.notifies = [i as u32, 3 * i as u32 + 1];
            });
        }
        m.board().update("alice", |e| e.refreshes[Outcome::HttpError.index()] += 1);
        m.board().login_time(Some(Duration::from_millis(70)));
        m.reload(false);
        m
    }

    /// What the `prometheus` crate's own encoder makes of everything registered.
    fn encoded_by_the_crate(m: &Metrics) -> String {
        let mut text = Vec::new();
        TextEncoder::new().encode(&m.gather(), &mut text).unwrap();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn the_text_is_what_the_text_encoder_makes_of_gather() {
        for m in [Metrics::new(Board::new()), busy_metrics()] {
            let reference = encoded_by_the_crate(&m);
            assert_eq!(without_process_samples(&m.encode()), without_process_samples(&reference));
        }
    }

    /// The series as the `prometheus` crate's labelled vectors made them before the board
    /// held the values: same names, help, types, labels and values.
    #[test]
    fn the_series_are_those_of_the_metric_vectors_they_replace() {
        use prometheus::{GaugeVec, IntGaugeVec};
        let m = busy_metrics();
        let now = SystemTime::now();
        let old = Registry::new();
        let customer = &["customer"];
        let refresh_total =
            IntCounterVec::new(Opts::new("magento_token_refresh_total", "Logins by outcome."), &["customer", "result"])
                .unwrap();
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), customer).unwrap();
        let int_gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), customer).unwrap();
        let expiry = gauge("magento_token_expiry_timestamp_seconds", "Unix time the token on disk expires (0: none).");
        let last_success = gauge(
            "magento_token_last_success_timestamp_seconds",
            "Unix time of the last successful write (0: none yet).",
        );
        let next_refresh = gauge(
            "magento_token_next_refresh_timestamp_seconds",
            "Unix time the next login is planned (0: none planned).",
        );
        let failures = int_gauge("magento_token_consecutive_failures", "Failed logins since the last success.");
        let valid = int_gauge("magento_token_valid", "1 when an unexpired token is on disk.");
        let paused = int_gauge(
            "magento_token_paused",
            "1 while the customer is paused after repeated 401s (its password is probably wrong).",
        );
        let held_back = int_gauge(
            "magento_token_held_back",
            "1 while the lockout budget holds every login back: no time helps; fix the password, or reset Magento's count and run forget-failures.",
        );
        let skew = int_gauge(
            "magento_token_clock_skew_seconds",
            "Magento's clock minus ours, from the last JWT's iat, when more than a minute apart (else 0).",
        );
        let password_errors = IntCounterVec::new(
            Opts::new("magento_token_password_errors_total", "Password sources that could not be read before a login."),
            customer,
        )
        .unwrap();
        let validations = IntCounterVec::new(
            Opts::new(
                "magento_token_validations_total",
                "Checks of the token on disk (GET customers/me) by result: valid, revoked (replaced at once), error (kept).",
            ),
            &["customer", "result"],
        )
        .unwrap();
        let notify_total = IntCounterVec::new(
            Opts::new(
                "magento_token_notify_total",
                "Notifications of a new token (notify) by result: success, failure (an action failed twice).",
            ),
            &["customer", "result"],
        )
        .unwrap();
        m.board().with(|board| {
            for (name, e) in board.iter() {
                let name: &str = name;
                for o in Outcome::ALL {
                    refresh_total.with_label_values(&[name, o.as_str()]).inc_by(u64::from(e.refreshes[o.index()]));
                }
                expiry.with_label_values(&[name]).set(timestamp(e.expires_at));
                last_success.with_label_values(&[name]).set(timestamp(e.last_success_at));
                next_refresh.with_label_values(&[name]).set(timestamp(e.next_refresh_at));
                failures.with_label_values(&[name]).set(i64::from(e.consecutive_failures));
                valid.with_label_values(&[name]).set(i64::from(e.valid(now)));
                paused.with_label_values(&[name]).set(i64::from(e.paused));
                held_back.with_label_values(&[name]).set(i64::from(e.held_back));
                skew.with_label_values(&[name]).set(e.clock_skew);
                password_errors.with_label_values(&[name]).inc_by(e.password_errors);
                for c in Check::ALL {
                    validations.with_label_values(&[name, c.as_str()]).inc_by(u64::from(e.checks[c.index()]));
                }
                for n in Notified::ALL {
                    notify_total.with_label_values(&[name, n.as_str()]).inc_by(u64::from(e.notifies[n.index()]));
                }
            }
        });
        let collectors: [Box<dyn Collector>; 12] = [
            Box::new(refresh_total),
            Box::new(expiry),
            Box::new(last_success),
            Box::new(next_refresh),
            Box::new(failures),
            Box::new(valid),
            Box::new(paused),
            Box::new(held_back),
            Box::new(skew),
            Box::new(password_errors),
            Box::new(validations),
            Box::new(notify_total),
        ];
        for c in collectors {
            old.register(c).unwrap();
        }
        let mut expected = Vec::new();
        TextEncoder::new().encode(&old.gather(), &mut expected).unwrap();
        let expected = String::from_utf8(expected).unwrap();
        let families: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        let ours: String = m
            .encode()
            .lines()
            .filter(|l| families.iter().any(|f| l.split([' ', '{']).any(|w| w == *f)))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(ours, expected);
        assert!(expected.contains("magento_token_clock_skew_seconds{customer=\"bob\"} -300\n"), "{expected}");
        assert!(
            expected.contains("magento_token_notify_total{customer=\"carol-2\",result=\"success\"} 7\n"),
            "{expected}"
        );
    }

    #[test]
    fn the_families_are_listed_by_name() {
        assert!(FAMILIES.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new(Board::new());
        m.board().add("a\"b\\c\nd");
        let reference = encoded_by_the_crate(&m);
        assert!(reference.contains(r#"magento_token_valid{customer="a\"b\\c\nd"} 0"#), "{reference}");
        assert_eq!(without_process_samples(&m.encode()), without_process_samples(&reference));
    }

    #[test]
    fn the_text_comes_in_bounded_pieces_that_add_up_to_the_whole() {
        let m = busy_metrics();
        for i in 0..3000 {
            let name = format!("customer-with-a-rather-long-name-{i:05}");
            m.board().add(&name);
            m.board().update(&name, |e| e.refreshes[Outcome::Success.index()] = i);
        }
        let pieces: Vec<String> = m.text().collect();
        assert!(pieces.len() > 20, "{}", pieces.len());
        for p in &pieces {
            // A piece ends after the customer that takes it past the size, or a fixed family.
            assert!(p.len() < TEXT_CHUNK + 2048, "{}", p.len());
            assert!(p.ends_with('\n'));
        }
        let reference = encoded_by_the_crate(&m);
        assert_eq!(without_process_samples(&pieces.concat()), without_process_samples(&reference));
    }

    #[test]
    fn customers_coming_and_going_during_a_scrape_leave_a_well_formed_text() {
        let m = Metrics::new(Board::new());
        for i in 0..3000 {
            m.board().add(&format!("c{i:05}"));
        }
        let mut text = String::new();
        for (i, piece) in m.text().enumerate() {
            text.push_str(&piece);
            m.board().remove(&format!("c{:05}", 2999 - (i * 37) % 3000));
            m.board().add(&format!("new{i:03}"));
        }
        let mut seen = std::collections::HashSet::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(seen.insert(line.split(' ').next().unwrap().to_owned()), "one series once: {line}");
        }
        assert!(text.contains("magento_token_valid{customer=\"c00000\"} 0\n"));
    }
}
