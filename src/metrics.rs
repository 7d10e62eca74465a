//! Every metric the daemon exports, defined in one place, in an owned registry.
//!
//! Per-customer series are created at 0 for every label value as soon as a customer is
//! configured, so dashboards and alerts see a customer before its first login, and they are
//! deleted when a reload removes the customer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The outcome of one login, the `result` label of `magento_token_refresh_total`: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    /// 401: wrong password, unknown username or locked account.
    AuthFailure,
    /// Any other HTTP status, redirects included.
    HttpError,
    /// Connect, reset, timeout.
    NetworkError,
    /// An answer that is not a JSON string holding a token of the accepted form.
    InvalidResponse,
    /// The token could not be written to its file.
    WriteError,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::AuthFailure,
        Outcome::HttpError,
        Outcome::NetworkError,
        Outcome::InvalidResponse,
        Outcome::WriteError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::AuthFailure => "auth_failure",
            Outcome::HttpError => "http_error",
            Outcome::NetworkError => "network_error",
            Outcome::InvalidResponse => "invalid_response",
            Outcome::WriteError => "write_error",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    refresh_total: IntCounterVec,
    refresh_duration: Histogram,
    expiry: GaugeVec,
    last_success: GaugeVec,
    next_refresh: GaugeVec,
    consecutive_failures: IntGaugeVec,
    valid: IntGaugeVec,
    paused: IntGaugeVec,
    clock_skew: IntGaugeVec,
    reloads: IntCounterVec,
    password_errors: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let customer = &["customer"];
        let m = Metrics {
            refresh_total: IntCounterVec::new(
                Opts::new("magento_token_refresh_total", "Logins by outcome."),
                &["customer", "result"],
            )
            .unwrap(),
            refresh_duration: Histogram::with_opts(
                HistogramOpts::new("magento_token_refresh_duration_seconds", "Time of one login request.")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )
            .unwrap(),
            expiry: GaugeVec::new(
                Opts::new("magento_token_expiry_timestamp_seconds", "Unix time the token on disk expires (0: none)."),
                customer,
            )
            .unwrap(),
            last_success: GaugeVec::new(
                Opts::new(
                    "magento_token_last_success_timestamp_seconds",
                    "Unix time of the last successful write (0: none yet).",
                ),
                customer,
            )
            .unwrap(),
            next_refresh: GaugeVec::new(
                Opts::new(
                    "magento_token_next_refresh_timestamp_seconds",
                    "Unix time the next login is planned (0: none planned).",
                ),
                customer,
            )
            .unwrap(),
            consecutive_failures: IntGaugeVec::new(
                Opts::new("magento_token_consecutive_failures", "Failed logins since the last success."),
                customer,
            )
            .unwrap(),
            valid: IntGaugeVec::new(
                Opts::new("magento_token_valid", "1 when an unexpired token is on disk."),
                customer,
            )
            .unwrap(),
            paused: IntGaugeVec::new(
                Opts::new(
                    "magento_token_paused",
                    "1 while the customer is paused after repeated 401s (its password is probably wrong).",
                ),
                customer,
            )
            .unwrap(),
            clock_skew: IntGaugeVec::new(
                Opts::new(
                    "magento_token_clock_skew_seconds",
                    "Magento's clock minus ours, from the last JWT's iat, when more than a minute apart (else 0).",
                ),
                customer,
            )
            .unwrap(),
            reloads: IntCounterVec::new(
                Opts::new("magento_token_config_reloads_total", "Configuration reloads (SIGHUP) by result."),
                &["result"],
            )
            .unwrap(),
            password_errors: IntCounterVec::new(
                Opts::new(
                    "magento_token_password_errors_total",
                    "Password sources that could not be read before a login.",
                ),
                customer,
            )
            .unwrap(),
            registry,
        };
        let build_info =
            IntGaugeVec::new(Opts::new("magento_token_build_info", "Always 1; the version is a label."), &["version"])
                .unwrap();
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let collectors: [Box<dyn prometheus::core::Collector>; 13] = [
            Box::new(m.refresh_total.clone()),
            Box::new(m.refresh_duration.clone()),
            Box::new(m.expiry.clone()),
            Box::new(m.last_success.clone()),
            Box::new(m.next_refresh.clone()),
            Box::new(m.consecutive_failures.clone()),
            Box::new(m.valid.clone()),
            Box::new(m.paused.clone()),
            Box::new(m.clock_skew.clone()),
            Box::new(m.reloads.clone()),
            Box::new(m.password_errors.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    /// Creates every series of `customer` at 0; series that exist (a customer restarted by a
    /// reload) keep their values.
    pub fn add_customer(&self, customer: &str) {
        for outcome in Outcome::ALL {
            self.refresh_total.with_label_values(&[customer, outcome.as_str()]);
        }
        for g in [&self.expiry, &self.last_success, &self.next_refresh] {
            g.with_label_values(&[customer]);
        }
        self.consecutive_failures.with_label_values(&[customer]);
        self.valid.with_label_values(&[customer]);
        self.paused.with_label_values(&[customer]);
        self.clock_skew.with_label_values(&[customer]);
        self.password_errors.with_label_values(&[customer]);
    }

    /// Deletes every series of `customer`.
    pub fn remove_customer(&self, customer: &str) {
        for outcome in Outcome::ALL {
            let _ = self.refresh_total.remove_label_values(&[customer, outcome.as_str()]);
        }
        for g in [&self.expiry, &self.last_success, &self.next_refresh] {
            let _ = g.remove_label_values(&[customer]);
        }
        let _ = self.consecutive_failures.remove_label_values(&[customer]);
        let _ = self.valid.remove_label_values(&[customer]);
        let _ = self.paused.remove_label_values(&[customer]);
        let _ = self.clock_skew.remove_label_values(&[customer]);
        let _ = self.password_errors.remove_label_values(&[customer]);
    }

    pub fn login(&self, customer: &str, outcome: Outcome, request_time: Option<Duration>) {
        self.refresh_total.with_label_values(&[customer, outcome.as_str()]).inc();
        if let Some(t) = request_time {
            self.refresh_duration.observe(t.as_secs_f64());
        }
    }

    pub fn consecutive_failures(&self, customer: &str, n: u32) {
        self.consecutive_failures.with_label_values(&[customer]).set(i64::from(n));
    }

    pub fn token_on_disk(&self, customer: &str, expires_at: SystemTime) {
        self.expiry.with_label_values(&[customer]).set(unix(expires_at));
    }

    pub fn written(&self, customer: &str, at: SystemTime) {
        self.last_success.with_label_values(&[customer]).set(unix(at));
    }

    pub fn next_refresh(&self, customer: &str, at: Option<SystemTime>) {
        self.next_refresh.with_label_values(&[customer]).set(at.map_or(0.0, unix));
    }

    pub fn valid(&self, customer: &str, valid: bool) {
        self.valid.with_label_values(&[customer]).set(i64::from(valid));
    }

    pub fn paused(&self, customer: &str, paused: bool) {
        self.paused.with_label_values(&[customer]).set(i64::from(paused));
    }

    pub fn clock_skew(&self, customer: &str, seconds: i64) {
        self.clock_skew.with_label_values(&[customer]).set(seconds);
    }

    pub fn password_error(&self, customer: &str) {
        self.password_errors.with_label_values(&[customer]).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "success" } else { "failure" }]).inc();
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into memory cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).map(str::to_owned))
    }

    #[test]
    fn every_customer_series_starts_at_zero_and_goes_with_the_customer() {
        let m = Metrics::new();
        m.add_customer("alice");
        let text = m.encode();
        for outcome in Outcome::ALL {
            let series = format!("magento_token_refresh_total{{customer=\"alice\",result=\"{}\"}}", outcome.as_str());
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
        m.remove_customer("alice");
        assert!(!m.encode().contains("alice"));
    }

    #[test]
    fn a_login_counts_and_times() {
        let m = Metrics::new();
        m.add_customer("bob");
        m.login("bob", Outcome::AuthFailure, Some(Duration::from_millis(30)));
        m.consecutive_failures("bob", 1);
        let text = m.encode();
        assert_eq!(
            value(&text, "magento_token_refresh_total{customer=\"bob\",result=\"auth_failure\"}").as_deref(),
            Some("1")
        );
        assert_eq!(value(&text, "magento_token_refresh_duration_seconds_bucket{le=\"0.05\"}").as_deref(), Some("1"));
        assert_eq!(value(&text, "magento_token_refresh_duration_seconds_bucket{le=\"0.025\"}").as_deref(), Some("0"));
        assert_eq!(value(&text, "magento_token_consecutive_failures{customer=\"bob\"}").as_deref(), Some("1"));
    }
}
