//! `once`: every customer logged in once, the files written (one sync for the batch) or the
//! Secret updated, then exit; the single pass of init containers and CronJobs.

use std::time::{Duration, Instant, SystemTime};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::account::Accounts;
use crate::attempt::{self, Attempt, NoToken, Obtained};
use crate::clock::rfc3339;
use crate::clock::Clock;
use crate::config::{Config, CustomerConfig, PasswordError, ReadPasswords};
use crate::format::Times;
use crate::issuer::{Issuer, MintError};
use crate::magento::{Client, ClientError, LoginError, Outcome};
use crate::schedule::{self, AuthState};
use crate::secret::Secret;
use crate::status::Board;
use crate::store::{Batch, Store};

/// Why `once` wrote no token for a customer.
#[derive(Debug, thiserror::Error)]
pub enum OnceFailure {
    #[error("{0}")]
    Password(#[from] PasswordError),
    #[error("{0}")]
    Login(#[from] LoginError),
    /// Earlier 401s are recorded for this customer: trying again now could lock the account.
    #[error("not trying: Magento refused this customer {in_a_row} time(s) in a row, last at {last}; to keep clear of its lock the next try waits until {next}")]
    HeldBack { in_a_row: u32, last: String, next: String },
    /// The issuer (`auth.method` other than `password`) has no credential to mint tokens with.
    #[error("not trying: {0}")]
    Issuer(String),
    /// The record of earlier 401s cannot be read: taken as the lockout budget spent.
    #[error("not trying: the record of this customer's earlier 401s cannot be read ({0}): counted as the lockout budget spent; check Magento's failure count for this username (reset it if needed), then run forget-failures for this customer")]
    UnreadableLedger(String),
}

impl OnceFailure {
    /// A word for the log line: the login's `result` class, or what kept it from being sent.
    pub fn class(&self) -> &'static str {
        match self {
            OnceFailure::Password(_) => "password_error",
            OnceFailure::Login(e) => e.outcome.as_str(),
            OnceFailure::HeldBack { .. } | OnceFailure::UnreadableLedger(_) => "held_back",
            OnceFailure::Issuer(_) => "issuer",
        }
    }
}

/// The outcome of `once` for one customer.
pub struct OnceResult {
    pub customer: String,
    /// Where its token went: its file, or its key in the Secret.
    pub place: String,
    /// When the written token expires.
    pub outcome: Result<SystemTime, OnceFailure>,
}

/// Logs every customer in once and writes the files, retrying transient failures until
/// `timeout` has passed. A 401 is never retried, and a customer whose recorded 401s (see
/// [`ledger::read_ledger`]) call for a wait is not tried at all: an init container restarted by
/// the kubelet must not walk into Magento's lock. Returns one result per customer, in the
/// configured order.
///
/// Everything runs on the calling task: at most [`once_in_flight`] customers are under way at
/// once (their logins limited further by `max_concurrent_logins`), the next one starting as
/// soon as any finishes, so a customer that keeps failing holds up no one. The tokens are
/// written as one [`Batch`] of the store: made durable together at the end, before any of them
/// is reported written.
///
/// `passwords` are those the configuration's check read ([`config::load_with_passwords`]): each
/// customer's first login sends the one read then (empty: every login reads its own).
pub async fn once(
    config: &Config,
    passwords: ReadPasswords,
    timeout: Duration,
    store: &Store,
) -> Result<Vec<OnceResult>, ClientError> {
    let client = Client::new(&config.magento)?;
    let logins = Semaphore::new(config.refresh.max_concurrent_logins);
    let accounts = Accounts::new();
    let deadline = Instant::now() + timeout;
    let batch = store.batch();
    // Without customer passwords: the issuer's credential first, once for every customer.
    let issuer = Issuer::new(&config.auth, client.clone(), &Board::new());
    let mut issuer_failure = None;
    if let Some(issuer) = &issuer {
        let obtained = issuer.obtain_before(&config.refresh, &logins, store, deadline.into()).await;
        issuer_failure = obtained.err();
    }
    let pass = Pass {
        client: &client,
        logins: &logins,
        accounts: &accounts,
        config,
        deadline,
        store,
        batch: &batch,
        issuer: issuer.as_deref(),
        issuer_failure: issuer_failure.as_deref(),
    };
    let mut outcomes: Vec<Option<Result<SystemTime, OnceFailure>>> =
        (0..config.customers.len()).map(|_| None).collect();
    // `buffer_unordered` by hand: a closure mapping customers to futures would keep the pass
    // from being `Send` (a limit of the compiler's proof), and the pass runs as a task.
    let in_flight = once_in_flight(config.refresh.max_concurrent_logins);
    let mut waiting = config.customers.iter().enumerate();
    let mut passwords = passwords.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < in_flight {
            let Some((i, customer)) = waiting.next() else { break };
            running.push(pass.one(i, customer, passwords.next().flatten()));
        }
        let Some((i, outcome)) = running.next().await else { break };
        outcomes[i] = Some(outcome);
    }
    drop(running);
    drop(issuer);
    // The client and its connections (their buffers) go before the results are made, which
    // then reuse that memory: `once`'s peak is at the end of the pass (benches/RESULTS.md).
    drop(client);
    let written = outcomes.iter().zip(&config.customers).filter_map(|(o, c)| Some((c, *o.as_ref()?.as_ref().ok()?)));
    let finished = batch.finish(written);
    let mut results: Vec<OnceResult> = outcomes
        .into_iter()
        .zip(&config.customers)
        .filter_map(|(outcome, c)| {
            Some(OnceResult { customer: c.name.clone(), place: store.place(c), outcome: outcome? })
        })
        .collect();
    if let Err(message) = finished {
        // Nothing of the batch is known durable: no token is reported written.
        error!(error = %message, "once: the tokens written may not be durable");
        for r in &mut results {
            if r.outcome.is_ok() {
                r.outcome = Err(LoginError::new(Outcome::WriteError, message.clone()).into());
            }
        }
    }
    Ok(results)
}

/// Customers `once` has under way at a time: twice the login slots, so a slot freed is taken
/// at once while the customer that had it writes its file.
fn once_in_flight(max_concurrent_logins: usize) -> usize {
    2 * max_concurrent_logins.max(1)
}

/// What every customer of one `once` pass shares.
struct Pass<'a> {
    client: &'a Client,
    logins: &'a Semaphore,
    accounts: &'a Accounts,
    config: &'a Config,
    deadline: Instant,
    store: &'a Store,
    /// Every token of the pass is written in it.
    batch: &'a Batch<'a>,
    /// `auth.method` other than `password`: tokens are minted with its credential...
    issuer: Option<&'a Issuer>,
    /// ...unless it could not be had, for this reason.
    issuer_failure: Option<&'a str>,
}

impl<'a> Pass<'a> {
    /// One customer, with its place in the configuration (a method, not a closure: the pass
    /// must be `Send` to run as a task, and a closure's future trips up the compiler's proof).
    async fn one(
        &self,
        i: usize,
        customer: &'a CustomerConfig,
        password: Option<Secret>,
    ) -> (usize, Result<SystemTime, OnceFailure>) {
        (i, self.customer(customer, password).await)
    }

    /// One customer: attempts (the same path as `run`'s workers) until a token is written, a
    /// 401, a held-back login or the deadline. The first sends `password` if given (read by the
    /// check a moment ago); every other reads the password afresh.
    async fn customer(
        &self,
        customer: &CustomerConfig,
        mut password: Option<Secret>,
    ) -> Result<SystemTime, OnceFailure> {
        if let Some(issuer) = self.issuer {
            return self.minted(issuer, customer).await;
        }
        let refresh = &self.config.refresh;
        let account = self.accounts.of(customer);
        let ledger_on_disk = self.batch.may_have_ledger(customer);
        if ledger_on_disk {
            attempt::restore_ledger(self.store, customer, &account, SystemTime::now(), refresh);
        }
        // `once` is never stopped early: its bound is the deadline.
        let never = CancellationToken::new();
        let mut failures = 0;
        loop {
            let attempt = Attempt {
                magento: self.client,
                customer,
                account: &account,
                refresh,
                logins: self.logins,
                clock: Clock::System,
                store: self.store,
                ledger_on_disk,
                password: password.take(),
            };
            // The deadline bounds the wait for the account's turn, a login slot and the request
            // too, not only the pauses between attempts. A write, once started, is left to finish.
            let result = tokio::time::timeout_at(self.deadline.into(), attempt::attempt(attempt, &never))
                .await
                .unwrap_or_else(|_| Err(NoToken::Login { error: timed_out_error(), took: Duration::ZERO }));
            let error =
                match result {
                    Ok(obtained) => return self.write(customer, obtained).await,
                    Err(NoToken::Password(e)) => return Err(e.into()),
                    Err(NoToken::HeldBack { auth: AuthState { unreadable: Some(why), .. }, .. }) => {
                        return Err(OnceFailure::UnreadableLedger(why))
                    }
                    Err(NoToken::HeldBack { wait, auth, .. }) => return Err(OnceFailure::HeldBack {
                        in_a_row: auth.in_a_row,
                        last: auth.last_failure.map(rfc3339).unwrap_or_default(),
                        next: wait.until().map_or_else(
                            || {
                                "the password changes, or an operator resets Magento's count and runs forget-failures"
                                    .to_owned()
                            },
                            rfc3339,
                        ),
                    }),
                    Err(NoToken::Stopped) => timed_out_error(),
                    Err(NoToken::Login { error, .. }) => error,
                };
            self.before_retry(customer, error, &mut failures).await?;
        }
    }

    /// After a failed login: the error when it is final (a 401 or a reCAPTCHA requirement does
    /// not change within one pass, and no retry may pass the deadline), else a backoff's wait.
    async fn before_retry(
        &self,
        customer: &CustomerConfig,
        error: LoginError,
        failures: &mut u32,
    ) -> Result<(), OnceFailure> {
        if matches!(error.outcome, Outcome::AuthFailure | Outcome::Blocked) {
            return Err(error.into());
        }
        *failures += 1;
        let wait = schedule::backoff(*failures, &self.config.refresh, error.retry_after, rand::thread_rng().gen());
        if Instant::now() + wait >= self.deadline {
            return Err(error.into());
        }
        warn!(customer = %customer.name, result = error.outcome.as_str(), error = %error.message, "login failed: retrying");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// One customer's token minted with the issuer's credential, retried as a login is.
    async fn minted(&self, issuer: &Issuer, customer: &CustomerConfig) -> Result<SystemTime, OnceFailure> {
        if let Some(why) = self.issuer_failure {
            return Err(OnceFailure::Issuer(why.to_owned()));
        }
        let never = CancellationToken::new();
        let mut failures = 0;
        loop {
            let mint = issuer.mint(customer, &self.config.refresh, self.logins, None, Clock::System, &never);
            let error = match tokio::time::timeout_at(self.deadline.into(), mint).await {
                Err(_) => timed_out_error(),
                Ok(Ok(obtained)) => return self.write(customer, obtained).await,
                Ok(Err(MintError::Failed { error, .. })) => error,
                Ok(Err(MintError::Stopped)) => timed_out_error(),
                Ok(Err(MintError::NoCredential { why, .. })) => {
                    return Err(OnceFailure::Issuer(why.unwrap_or_else(|| "the issuer has no credential".into())))
                }
                Ok(Err(MintError::Refused { error, .. })) => return Err(OnceFailure::Issuer(error.message)),
            };
            self.before_retry(customer, error, &mut failures).await?;
        }
    }

    /// Writes the token into the pass's batch.
    async fn write(&self, customer: &CustomerConfig, obtained: Obtained) -> Result<SystemTime, OnceFailure> {
        let times = Times { obtained_at: obtained.obtained_at, expires_at: obtained.expiry.expires_at };
        self.batch.write(customer, &obtained.token, times).await.map_err(|e| {
            LoginError::new(Outcome::WriteError, format!("cannot write {}: {e}", self.store.place(customer)))
        })?;
        Ok(times.expires_at)
    }
}

fn timed_out_error() -> LoginError {
    LoginError::new(Outcome::NetworkError, "no answer before the end of --timeout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Checks};
    use magento_devserver::{DevServer, DevServerOptions, Fault};

    fn files(config: &Config) -> Store {
        Store::files(config.output.dir().expect("output.dir").clone())
    }

    #[tokio::test]
    async fn once_sends_the_password_its_check_read_and_reads_it_again_for_a_retry() {
        let server = DevServer::start(DevServerOptions::default()).await.unwrap();
        server.add_customer("a@example.com", "checked");
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("a.password");
        std::fs::write(&secret, "checked\n").unwrap();
        let file = dir.path().join("config.yaml");
        let text = format!(
            "magento:\n  base_url: {}\nrefresh:\n  min_backoff: 100ms\noutput:\n  dir: {}\ncustomers:\n  - name: a\n    username: a@example.com\n    password_file: {}\n",
            server.base_url(),
            dir.path().display(),
            secret.display()
        );
        std::fs::write(&file, text).unwrap();
        let (config, passwords) = config::load_with_passwords(&file).unwrap();
        let kept: Vec<Option<&str>> = passwords.iter().map(|p| p.as_ref().map(|p| p.expose())).collect();
        assert_eq!(kept, [Some("checked")]);
        // Rotated after the check: the first login still sends what the check read; a 503 makes
        // a second, which reads the file again.
        std::fs::write(&secret, "rotated").unwrap();
        server.set_password("a@example.com", "rotated");
        server.push_fault(Fault::Respond {
            status: 503,
            content_type: "text/html".into(),
            body: b"busy".to_vec(),
            retry_after: None,
        });
        let results = once(&config, passwords, Duration::from_secs(8), &files(&config)).await.unwrap();
        assert!(results[0].outcome.is_ok(), "{:?}", results[0].outcome);
        let sent: Vec<(u16, Option<String>)> = server.requests().into_iter().map(|r| (r.status, r.password)).collect();
        assert_eq!(sent, [(503, Some("checked".into())), (200, Some("rotated".into()))]);
    }

    #[tokio::test]
    async fn once_answers_in_order_and_a_stuck_login_holds_up_no_one_else() {
        let server = DevServer::start(DevServerOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let mut customers = String::new();
        for i in 0..40 {
            let name = format!("c{i:02}");
            server.add_customer(&format!("{name}@example.com"), "pw");
            let secret = dir.path().join(&name);
            std::fs::write(&secret, "pw").unwrap();
            customers += &format!(
                "  - name: {name}\n    username: {name}@example.com\n    password_file: {}\n",
                secret.display()
            );
        }
        let text = format!(
            "magento:\n  base_url: {}\nrefresh:\n  max_concurrent_logins: 2\noutput:\n  dir: {}\ncustomers:\n{customers}",
            server.base_url(),
            tokens.display()
        );
        let config = config::parse(&text, Checks::Environment).unwrap();
        // The first login never gets an answer: it holds one of the two login slots until the
        // end of the pass, and the customers after it go on through the other. The pass lasts
        // its whole deadline (the stuck login ends there): 8 s, not 2, for 39 logins and 39
        // fsyncs one after the other when the machine and its disk are busy. Were the others
        // held up behind the stuck one, they would miss any deadline.
        server.push_fault(Fault::Hang);
        let results = once(&config, Vec::new(), Duration::from_secs(8), &files(&config)).await.unwrap();
        let names: Vec<&str> = results.iter().map(|r| r.customer.as_str()).collect();
        let configured: Vec<&str> = config.customers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, configured);
        let failed: Vec<&OnceResult> = results.iter().filter(|r| r.outcome.is_err()).collect();
        assert_eq!(failed.len(), 1, "only the stuck login fails");
        let Err(e) = &failed[0].outcome else { unreachable!() };
        assert_eq!(e.class(), "network_error", "{e}");
        for r in results.iter().filter(|r| r.outcome.is_ok()) {
            assert!(std::fs::read(&r.place).is_ok_and(|t| !t.is_empty()), "{}", r.place);
        }
        assert_eq!(std::fs::read_dir(&tokens).unwrap().count(), 39, "no temporary file left");
    }
}
