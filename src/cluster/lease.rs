//! The election: client-go's algorithm (`tools/leaderelection`) on one `coordination.k8s.io/v1`
//! Lease, with the daemon's own deadlines.
//!
//! Every [`KubeSettings::retry_period`] each replica reads the Lease. The holder renews it (an
//! update conditional on its resourceVersion); a standby takes it over only once it has seen the
//! same record for a whole `leaseDurationSeconds` of its own clock (no two clocks are compared).
//! The holder counts itself the holder only until [`KubeSettings::renew_deadline`] after the start
//! of its last successful renewal: shorter than the lease, so it has stopped writing before any
//! standby can take over, even if its last renewal lands late.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ApiError, Cluster};

/// This replica's standing, as the elector last knew it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Term {
    /// Holding the Lease until then (the renew deadline of the last renewal); `None`: not
    /// holding it.
    pub leading_until: Option<Instant>,
    /// Who holds it, as last seen.
    pub holder: Option<String>,
}

impl Term {
    /// Whether this replica holds the Lease now.
    pub fn leading(&self) -> bool {
        self.leading_until.is_some_and(|until| Instant::now() < until)
    }
}

/// What to do with the Lease as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// There is none: create it, held by this replica.
    Create,
    /// This replica holds it: renew it.
    Renew,
    /// No one holds it, or its holder has not renewed it for a whole lease: take it over.
    Take,
    /// Another replica holds it.
    Wait { holder: String },
}

/// The election's one decision. `unchanged_since`: when this replica first saw the record as it
/// is now (its resourceVersion), by its own clock; `duration`: the lease's length when the
/// record does not say.
pub fn decide(me: &str, spec: Option<&LeaseSpec>, unchanged_since: Instant, now: Instant, duration: Duration) -> Move {
    let Some(spec) = spec else { return Move::Create };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Move::Renew,
        None | Some("") => Move::Take,
        Some(holder) => {
            let lease = match spec.lease_duration_seconds {
                Some(s) if s > 0 => Duration::from_secs(s as u64),
                _ => duration,
            };
            if now.saturating_duration_since(unchanged_since) >= lease {
                Move::Take
            } else {
                Move::Wait { holder: holder.to_owned() }
            }
        }
    }
}

/// `leaseTransitions` after a take-over of a Lease that recorded `read`: one more, saturated at
/// `i32::MAX`, from 0 when it recorded none or a negative number. The API server refuses a
/// negative count (422): a count that wrapped would keep every replica from ever taking over.
pub fn transitions_after_take(read: Option<i32>) -> i32 {
    read.unwrap_or(0).max(0).saturating_add(1)
}

/// Runs the election until `stop`; the returned receiver always has this replica's [`Term`].
/// On `stop` a holder gives the Lease up (an empty holder), so a standby takes over at once
/// instead of a lease later.
pub fn spawn(cluster: Cluster, stop: CancellationToken) -> (watch::Receiver<Term>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Term::default());
    let elector = Elector { cluster, tx, observed: None };
    (rx, tokio::spawn(elector.run(stop)))
}

struct Elector {
    cluster: Cluster,
    tx: watch::Sender<Term>,
    /// The Lease's resourceVersion last seen, and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    async fn run(mut self, stop: CancellationToken) {
        let k = self.cluster.settings.clone();
        loop {
            let started = Instant::now();
            let term = self.tx.borrow().clone();
            // A holder's attempt must end before its deadline. A standby's may take longer than a
            // period on a busy API server (a take-over that lands late is still conditional on
            // the resourceVersion read): giving up sooner could keep every standby from ever
            // taking over.
            let within = match term.leading_until {
                Some(until) if until > started => until - started,
                _ => k.lease_duration,
            };
            match self.attempt(started, within).await {
                Ok(None) => self.publish(Term {
                    leading_until: Some(started + k.renew_deadline()),
                    holder: Some(self.cluster.identity.clone()),
                }),
                Ok(Some(holder)) => self.publish(Term { leading_until: None, holder }),
                Err(e) => {
                    if term.leading_until.is_some() && !term.leading() {
                        self.publish(Term { leading_until: None, holder: term.holder.clone() });
                    }
                    warn!(error = %e, lease = %k.lease, "cannot read or renew the Lease: trying again");
                }
            }
            let mut next = started + k.retry_period();
            if let Some(until) = self.tx.borrow().leading_until {
                next = next.min(until);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
            // A holder whose deadline passed before the next attempt stops at once.
            let term = self.tx.borrow().clone();
            if term.leading_until.is_some() && !term.leading() {
                self.publish(Term { leading_until: None, holder: term.holder });
            }
        }
        if self.tx.borrow().leading() {
            self.release().await;
        }
        self.publish(Term::default());
    }

    /// Tells everyone who holds the Lease now, logging changes.
    fn publish(&self, term: Term) {
        let before = self.tx.borrow().clone();
        let (was, is) = (before.leading_until.is_some(), term.leading_until.is_some());
        match (was, is) {
            (false, true) => {
                info!(lease = %self.cluster.settings.lease, identity = %self.cluster.identity, "this replica holds the Lease: it logs in and writes the Secret")
            }
            (true, false) => {
                warn!(lease = %self.cluster.settings.lease, "this replica no longer holds the Lease: it stops logging in and writing")
            }
            (false, false) if before.holder != term.holder => {
                if let Some(holder) = &term.holder {
                    info!(lease = %self.cluster.settings.lease, holder = %holder, "another replica holds the Lease: standing by");
                }
            }
            _ => {}
        }
        self.cluster.seen_holder(term.holder.clone(), is);
        self.tx.send_replace(term);
    }

    /// One round: read the Lease, then create, renew or take it over as [`decide`] says.
    /// `Ok(None)`: this replica holds it; `Ok(Some(holder))`: it does not.
    async fn attempt(&mut self, started: Instant, within: Duration) -> Result<Option<Option<String>>, ApiError> {
        let deadline = started + within;
        let left = || deadline.saturating_duration_since(Instant::now());
        let k = &self.cluster.settings;
        let leases = &self.cluster.leases;
        let found = match self.cluster.call("lease", "get", left(), leases.get(&k.lease)).await {
            Ok(lease) => Some(lease),
            Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        let version = found.as_ref().and_then(|l| l.metadata.resource_version.clone()).unwrap_or_default();
        let unchanged_since = match &self.observed {
            Some((seen, since)) if *seen == version => *since,
            _ => {
                self.observed = Some((version, now));
                now
            }
        };
        let me = &self.cluster.identity;
        let spec = found.as_ref().and_then(|l| l.spec.as_ref());
        let time = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds = Some(k.lease_duration.as_secs().max(1) as i32);
        let (lease, create) = match decide(me, spec, unchanged_since, now, k.lease_duration) {
            Move::Wait { holder } => return Ok(Some(Some(holder))),
            Move::Create => {
                let spec = LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: seconds,
                    acquire_time: Some(time.clone()),
                    renew_time: Some(time),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                };
                let meta = ObjectMeta { name: Some(k.lease.clone()), ..ObjectMeta::default() };
                (Lease { metadata: meta, spec: Some(spec) }, true)
            }
            Move::Renew => {
                let mut lease = found.expect("a lease to renew");
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(time);
                spec.lease_duration_seconds = seconds;
                // Sent back as read, but never negative: the API server would refuse the renewal.
                spec.lease_transitions = spec.lease_transitions.map(|t| t.max(0));
                (lease, false)
            }
            Move::Take => {
                let mut lease = found.expect("a lease to take over");
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = Some(me.clone());
                spec.acquire_time = Some(time.clone());
                spec.renew_time = Some(time);
                spec.lease_duration_seconds = seconds;
                spec.lease_transitions = Some(transitions_after_take(spec.lease_transitions));
                (lease, false)
            }
        };
        let written = match create {
            true => self.cluster.call("lease", "create", left(), leases.create(&PostParams::default(), &lease)).await,
            // Conditional: the resourceVersion read above travels in the body.
            false => {
                self.cluster
                    .call("lease", "update", left(), leases.replace(&k.lease, &PostParams::default(), &lease))
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = lease.metadata.resource_version.map(|v| (v, Instant::now()));
                Ok(None)
            }
            // Another replica was quicker: it holds the Lease; the next round reads who.
            Err(ApiError::Conflict(_) | ApiError::AlreadyExists(_)) => Ok(Some(None)),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up: an empty holder, which a standby takes at its next look.
    async fn release(&self) {
        let k = &self.cluster.settings;
        let leases = &self.cluster.leases;
        let Ok(mut lease) = self.cluster.call("lease", "get", Duration::from_secs(2), leases.get(&k.lease)).await
        else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cluster.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        let done = self
            .cluster
            .call("lease", "update", Duration::from_secs(2), leases.replace(&k.lease, &PostParams::default(), &lease))
            .await;
        match done {
            Ok(_) => info!(lease = %k.lease, "gave the Lease up: a standby takes over at its next look"),
            Err(e) => warn!(error = %e, "cannot give the Lease up: a standby takes over when it expires"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, seconds: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: seconds,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_after_a_whole_lease_unchanged() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide("a", None, t0, t0, d), Move::Create);
        assert_eq!(decide("a", Some(&held_by(Some("a"), Some(15))), t0, t0, d), Move::Renew);
        assert_eq!(decide("a", Some(&held_by(None, Some(15))), t0, t0, d), Move::Take);
        assert_eq!(decide("a", Some(&held_by(Some(""), Some(15))), t0, t0, d), Move::Take);
        let b = held_by(Some("b"), Some(15));
        assert_eq!(decide("a", Some(&b), t0, t0 + Duration::from_millis(14_999), d), Move::Wait { holder: "b".into() });
        assert_eq!(decide("a", Some(&b), t0, t0 + d, d), Move::Take);
        // The record's own duration counts, not this replica's setting.
        let long = held_by(Some("b"), Some(60));
        assert_eq!(decide("a", Some(&long), t0, t0 + d, d), Move::Wait { holder: "b".into() });
        assert_eq!(decide("a", Some(&held_by(Some("b"), None)), t0, t0 + d, d), Move::Take);
    }

    #[test]
    fn a_take_over_counts_one_more_transition_but_never_wraps_or_goes_negative() {
        assert_eq!(transitions_after_take(None), 1);
        assert_eq!(transitions_after_take(Some(0)), 1);
        assert_eq!(transitions_after_take(Some(41)), 42);
        assert_eq!(transitions_after_take(Some(i32::MAX - 1)), i32::MAX);
        assert_eq!(transitions_after_take(Some(i32::MAX)), i32::MAX);
        assert_eq!(transitions_after_take(Some(-5)), 1);
        assert_eq!(transitions_after_take(Some(i32::MIN)), 1);
    }

    #[test]
    fn a_term_ends_at_its_deadline() {
        let term = Term { leading_until: Some(Instant::now() + Duration::from_secs(60)), holder: Some("a".into()) };
        assert!(term.leading());
        let over = Term { leading_until: Some(Instant::now() - Duration::from_millis(1)), holder: Some("a".into()) };
        assert!(!over.leading());
        assert!(!Term::default().leading());
    }
}
