//! One login attempt under the lockout policy: the only path by which a password is sent.
//!
//! `run`'s workers and `once` both call [`attempt`]: read the password afresh, take the
//! account's turn, ask the policy ([`crate::schedule::AuthState::wait`]) whether this password
//! may be sent now, log in, work out the token's expiry, and book the outcome in the account and
//! in the ledger of the [`Store`] (beside the token file, or in the Secret). Writing the token,
//! reporting and planning the next try are the caller's.
//!
//! With a store several processes share (the Secret of `output.kubernetes`), a login with a
//! password not proven in this process is booked as a 401 *before* it is sent, and unbooked
//! after: the process that sends it may be killed before the answer is booked, and the next
//! Lease holder must count that login all the same. A login that cannot be booked is not sent.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::account::Account;
use crate::clock::Clock;
use crate::config::{CustomerConfig, PasswordError, RefreshSettings};
use crate::ledger::Recorded;
use crate::magento::{LoginError, Magento, Outcome};
use crate::schedule::{AuthState, AuthWait};
use crate::secret::Secret;
use crate::store::Store;
use crate::token::{self, Expiry};

/// A token obtained and checked, not yet written.
pub struct Obtained {
    pub token: Secret,
    /// When the request that got it started (the base of an opaque token's lifetime).
    pub obtained_at: SystemTime,
    pub expiry: Expiry,
    /// How long the login request took.
    pub took: Duration,
}

/// Why an attempt gave no token.
#[derive(Debug)]
pub enum NoToken {
    /// The password source could not be read: nothing was sent.
    Password(PasswordError),
    /// The lockout policy holds this login back: nothing was sent.
    HeldBack {
        /// What the policy says: until when, or held back until something changes.
        wait: AuthWait,
        /// Another password could be tried now (this one was refused).
        password_bound: bool,
        auth: AuthState,
    },
    /// The login was sent and failed (a 401 is already booked in the account and the ledger).
    Login { error: LoginError, took: Duration },
    /// A stop was asked for before anything was sent.
    Stopped,
}

/// Everything one attempt needs, borrowed from its caller.
pub struct Attempt<'a, M> {
    pub magento: &'a M,
    pub customer: &'a CustomerConfig,
    pub account: &'a Account,
    pub refresh: &'a RefreshSettings,
    /// Bounds logins in flight over all customers.
    pub logins: &'a Semaphore,
    pub clock: Clock,
    /// Where the ledger of 401s is kept.
    pub store: &'a Store,
    /// Whether a ledger may be recorded (to remove after a success): `false` only when the
    /// caller knows there is none (`once` lists the directory it alone writes to).
    pub ledger_on_disk: bool,
    /// The password, read by the caller a moment ago (`once`'s first attempt: by the
    /// configuration's check); `None`: read it now.
    pub password: Option<Secret>,
}

/// Takes `customer`'s recorded 401s (the ledger an earlier process left beside its token file,
/// or in the Secret), judged at `now`, into its account. Returns what was taken: a ledger that
/// cannot be read is taken as the lockout budget spent (its `unreadable` says why).
pub fn restore_ledger(
    store: &Store,
    customer: &CustomerConfig,
    account: &Account,
    now: SystemTime,
    r: &RefreshSettings,
) -> Option<AuthState> {
    restore_ledger_as(store, customer, account, now, r, || customer.read_password().ok())
}

/// [`restore_ledger`] for an account whose logins send more than the password the ledger's
/// entry names (the issuer's: its lockout identity carries the TOTP secret too). `identity`,
/// read only when there is a ledger, is what the account takes for the refused credential.
pub fn restore_ledger_as(
    store: &Store,
    customer: &CustomerConfig,
    account: &Account,
    now: SystemTime,
    r: &RefreshSettings,
    identity: impl FnOnce() -> Option<Secret>,
) -> Option<AuthState> {
    let Recorded::Failures(recorded) = store.ledger(customer, now, r) else { return None };
    account.restore(recorded.clone(), identity());
    Some(recorded)
}

/// One attempt. Waits for the account's turn and a login slot, each given up for `stop`.
pub async fn attempt<M: Magento>(a: Attempt<'_, M>, stop: &CancellationToken) -> Result<Obtained, NoToken> {
    attempt_in_slot(a, None, stop).await
}

/// A login slot, from `acquire` (`logins.acquire()`, or `acquire_owned()` for one that moves
/// into a task), unless `stop` comes first (`None`): every request to Magento is sent in one,
/// a login or a check of a token.
pub async fn slot<P>(acquire: impl Future<Output = Result<P, AcquireError>>, stop: &CancellationToken) -> Option<P> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        permit = acquire => Some(permit.expect("the login semaphore is never closed")),
    }
}

/// A login slot (of [`Attempt::logins`]) held by the caller or taken by the attempt itself:
/// kept for its `Drop`, which frees the slot.
#[allow(dead_code)]
enum Slot<'a> {
    Held(OwnedSemaphorePermit),
    Taken(SemaphorePermit<'a>),
}

/// [`attempt`], in a login slot the caller may already hold (`held`). A worker of `run` waits
/// for its slot before it builds the attempt: with thousands of customers due at once (the
/// start), the ones waiting hold a small wait each, not a whole login (benches/RESULTS.md).
/// The slot is always taken before the account's turn by such callers, so two entries of one
/// username cannot each hold what the other waits for.
pub async fn attempt_in_slot<M: Magento>(
    a: Attempt<'_, M>,
    held: Option<OwnedSemaphorePermit>,
    stop: &CancellationToken,
) -> Result<Obtained, NoToken> {
    let (magento, customer) = (a.magento, a.customer);
    let endpoint = customer.endpoint();
    let send = |password: Secret| async move {
        magento.login(&endpoint, &customer.username, &password).await.map(|token| (token, None))
    };
    guarded(a, held, stop, send).await
}

/// What a login sent under the lockout policy gives: the token, and how long it lives when the
/// answer says so (an IMS token's `expires_in`); `None`: read from the token itself.
pub type Sent = Result<(Secret, Option<Duration>), LoginError>;

/// A login of `a.customer`'s account under the lockout policy, whatever is sent: `send` gets the
/// password (read now, or `a.password`) once the policy allows it and a slot is held. The
/// customers' logins ([`attempt_in_slot`]) and the issuer's logins (an admin's, an IMS
/// credential's: [`crate::issuer`]) both go through here, so every credential that Magento may
/// lock out is spent by the same rules.
pub async fn guarded<M, F, Fut>(
    mut a: Attempt<'_, M>,
    held: Option<OwnedSemaphorePermit>,
    stop: &CancellationToken,
    send: F,
) -> Result<Obtained, NoToken>
where
    F: FnOnce(Secret) -> Fut,
    Fut: Future<Output = Sent>,
{
    let password = match a.password.take() {
        Some(password) => password,
        None => a.customer.read_password().map_err(NoToken::Password)?,
    };
    // The account's turn: another entry of this username may be logging in, and its outcome
    // decides whether this login may be sent at all.
    let _turn = tokio::select! {
        biased;
        _ = stop.cancelled() => return Err(NoToken::Stopped),
        turn = a.account.turn.lock() => turn,
    };
    let now = a.clock.now();
    let wait = a.account.wait(&password, now, a.refresh);
    if wait == AuthWait::HeldBack || wait.until().is_some_and(|t| t > now) {
        let password_bound = a.account.refused_password(now, a.refresh).is_some();
        return Err(NoToken::HeldBack { wait, password_bound, auth: a.account.auth() });
    }
    let booked = a.store.shared() && !a.account.proven(&password);
    // A booking waits for the next update of the Secret (at most one a second): the slot held
    // goes to another customer meanwhile, and one is taken again after. So thousands of first
    // logins (a start, a failover) are booked together, a few updates in all, instead of each
    // slot waiting a second per login. (No two entries share a username: no one waits for
    // this account's turn while holding a slot this one waits for.)
    let held = match held {
        Some(permit) if booked => {
            drop(permit);
            None
        }
        held => held,
    };
    if booked {
        let pessimistic = a.account.if_refused(&password, now, a.refresh);
        if let Err(e) = a.store.record_failures(a.customer, &pessimistic).await {
            let message = format!("not sent: the login could not be booked in the ledger first ({e})");
            return Err(NoToken::Login { error: LoginError::new(Outcome::WriteError, message), took: Duration::ZERO });
        }
    }
    let permit = match held {
        Some(held) => Slot::Held(held),
        None => match slot(a.logins.acquire(), stop).await {
            Some(taken) => Slot::Taken(taken),
            None => {
                if booked {
                    unbook(&a).await;
                }
                return Err(NoToken::Stopped);
            }
        },
    };
    if !a.store.may_log_in() {
        // The Lease went while this login waited: the new holder logs in.
        if booked {
            unbook(&a).await;
        }
        return Err(NoToken::Stopped);
    }
    let started = a.clock.now();
    let timer = tokio::time::Instant::now();
    let answer = send(password.clone()).await;
    let took = timer.elapsed();
    drop(permit);
    let obtained = answer.and_then(|(token, lifetime)| {
        let expiry = token::expiry(&token, started, lifetime.unwrap_or(a.refresh.default_lifetime))
            .map_err(|e| LoginError::new(Outcome::InvalidResponse, e.to_string()))?;
        Ok(Obtained { token, obtained_at: started, expiry, took })
    });
    match obtained {
        Ok(obtained) => {
            a.account.record_success(&password);
            // Whatever the account says: another entry of this username may have cleared it
            // first, leaving this customer's ledger behind.
            if a.ledger_on_disk {
                a.store.clear_failures(a.customer);
            }
            Ok(obtained)
        }
        Err(error) => {
            if error.outcome == Outcome::AuthFailure {
                let auth = a.account.record_failure(&password, a.clock.now(), a.refresh);
                if error.final_for_password {
                    a.account.refused_for_good();
                }
                if let Err(e) = a.store.record_failures(a.customer, &auth).await {
                    warn!(customer = %a.customer.name, error = %e, "cannot record the 401 in the ledger: a restart would forget it");
                }
            } else if booked {
                // Not a 401: the booking made before it was sent goes.
                unbook(&a).await;
            }
            Err(NoToken::Login { error, took })
        }
    }
}

/// Takes back the booking of a login that got no 401: the ledger goes back to what the account
/// knows.
async fn unbook<M>(a: &Attempt<'_, M>) {
    let auth = a.account.auth();
    if auth.last_failure.is_none() {
        a.store.clear_failures(a.customer);
    } else if let Err(e) = a.store.record_failures(a.customer, &auth).await {
        warn!(customer = %a.customer.name, error = %e, "cannot take back the booking of a login in the ledger: it counts as a 401 until the next success");
    }
}
