//! A worker driven in-process through whole days on tokio's paused clock, against a scripted
//! Magento that mints JWTs on the same clock: the two promises checked minute by minute (a
//! token Magento accepts is always on disk; a wrong password never nears Magento's lock).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::account::Accounts;
use crate::clock::Clock;
use crate::config::{self, Checks, Config, Endpoint, MagentoSettings};
use crate::magento::{Client, LoginError, Magento, Outcome};
use crate::secret::Secret;
use crate::status::{Board, Reporter};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Magento as the worker sees it: a password, JWTs of one hour on the test's clock, and every
/// login it received.
#[derive(Clone)]
struct Scripted(Arc<Mutex<Store>>);

struct Store {
    clock: Clock,
    password: String,
    lifetime: Duration,
    /// (when, accepted) of every login.
    logins: Vec<(SystemTime, bool)>,
    /// Tokens minted at or before this second are revoked.
    revoked_up_to: Option<i64>,
    /// customers/me refuses every token (asked through `/rest/all/`).
    refuse_checks: bool,
    checks: usize,
}

impl Scripted {
    fn new(clock: Clock, password: &str) -> Scripted {
        Scripted(Arc::new(Mutex::new(Store {
            clock,
            password: password.into(),
            lifetime: HOUR,
            logins: Vec::new(),
            revoked_up_to: None,
            refuse_checks: false,
            checks: 0,
        })))
    }

    fn logins(&self) -> Vec<(SystemTime, bool)> {
        self.0.lock().unwrap().logins.clone()
    }

    /// Whether Magento accepts `token` now: its `exp` is ahead and it was not revoked.
    fn accepts(&self, token: &str) -> bool {
        self.0.lock().unwrap().accepts(token)
    }

    /// Every token of the customer minted up to this second dies (a logout elsewhere).
    fn revoke(&self) {
        let mut store = self.0.lock().unwrap();
        store.revoked_up_to = Some(crate::clock::unix_secs(store.clock.now()));
    }
}

impl Store {
    fn accepts(&self, token: &str) -> bool {
        let now = crate::clock::unix_secs(self.clock.now());
        crate::token::jwt_times(token)
            .is_some_and(|t| t.exp > now && self.revoked_up_to.is_none_or(|cut| t.iat.is_some_and(|iat| iat > cut)))
    }
}

fn jwt(iat: i64, exp: i64) -> String {
    let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJlLW9mLXRoZS1zdG9yZQ",
        b64(r#"{"kid":"1","alg":"HS256"}"#.into()),
        b64(format!(r#"{{"uid":3,"utypid":3,"iat":{iat},"exp":{exp}}}"#))
    )
}

impl Magento for Scripted {
    fn login(
        &self,
        _endpoint: &Endpoint,
        _username: &str,
        password: &Secret,
    ) -> impl std::future::Future<Output = Result<Secret, LoginError>> + Send {
        let mut store = self.0.lock().unwrap();
        let now = store.clock.now();
        let accepted = password.expose() == store.password;
        store.logins.push((now, accepted));
        let iat = crate::clock::unix_secs(now);
        let answer = if accepted {
            Ok(Secret::new(jwt(iat, iat + store.lifetime.as_secs() as i64)))
        } else {
            Err(LoginError::new(Outcome::AuthFailure, "HTTP 401 Unauthorized: The account sign-in was incorrect"))
        };
        std::future::ready(answer)
    }

    fn whoami(
        &self,
        _endpoint: &Endpoint,
        token: &Secret,
    ) -> impl std::future::Future<Output = Result<String, LoginError>> + Send {
        let mut store = self.0.lock().unwrap();
        store.checks += 1;
        let answer = if !store.refuse_checks && store.accepts(token.expose()) {
            Ok("alice@example.com".to_owned())
        } else {
            Err(LoginError::new(Outcome::AuthFailure, "HTTP 401 Unauthorized: The consumer isn't authorized"))
        };
        std::future::ready(answer)
    }
}

/// One customer, `alice`, with her password in a file and her token in `dir/tokens`.
fn config(dir: &std::path::Path, extra_refresh: &str) -> Config {
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let text = format!(
        "magento:\n  base_url: http://127.0.0.1:1\nrefresh:\n{extra_refresh}  max_backoff: 5m\noutput:\n  dir: {}\ncustomers:\n  - name: alice\n    username: alice@example.com\n    password_file: {}\n",
        dir.join("tokens").display(),
        dir.join("password").display()
    );
    config::parse(&text, Checks::Static).unwrap()
}

struct Run {
    magento: Scripted,
    board: Board,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    clock: Clock,
    path: std::path::PathBuf,
}

fn start(config: &Config, magento: Scripted, clock: Clock) -> Run {
    let customer = Arc::new(config.customers[0].clone());
    let shared = Shared {
        magento: magento.clone(),
        refresh: Arc::new(config.refresh.clone()),
        logins: Arc::new(Semaphore::new(1)),
        clock,
        notify: Arc::default(),
        store: crate::store::Store::files(config.output.dir().unwrap().clone()),
        issuer: None,
    };
    let board = Board::new();
    let stop = CancellationToken::new();
    let accounts = Accounts::new();
    let worker = Worker::new(
        customer.clone(),
        accounts.of(&customer),
        Arc::new(shared),
        Reporter::new("alice", board.clone()),
        stop.clone(),
    );
    let task = tokio::spawn(worker.run(true));
    Run { magento, board, stop, task, clock, path: config.output.dir().unwrap().path(&customer) }
}

/// Alice's worker on paused time, her password file holding `password`, against a store whose
/// password is "right", set up further by `store`. The directory lives as long as it is held.
fn alice(password: &str, extra_refresh: &str, store: impl FnOnce(&mut Store)) -> (Run, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("password"), format!("{password}\n")).unwrap();
    let config = config(dir.path(), extra_refresh);
    let clock = Clock::tokio(SystemTime::now());
    let magento = Scripted::new(clock, "right");
    store(&mut magento.0.lock().unwrap());
    (start(&config, magento, clock), dir)
}

impl Run {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    fn token(&self) -> Option<String> {
        std::fs::read_to_string(&self.path).ok()
    }
}

#[tokio::test(start_paused = true)]
async fn a_day_of_refreshes_always_leaves_a_token_magento_accepts() {
    let (run, _dir) = alice("right", "", |_| {});

    // Checked every 10 s of the day, from the first second on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..(24 * 360) {
        let token = run.token().expect("a token file");
        assert!(run.magento.accepts(&token), "Magento refuses the token on disk at {:?}", run.clock.now());
        seen.insert(token);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let logins = run.magento.logins();
    assert!(logins.iter().all(|(_, ok)| *ok));
    // Every 44 to 45 minutes (before_expiry 15m, jitter 1m, one-hour tokens): 33 in a day.
    for pair in logins.windows(2) {
        let gap = pair[1].0.duration_since(pair[0].0).unwrap();
        assert!(gap >= 44 * MINUTE - Duration::from_secs(1) && gap <= 45 * MINUTE, "{gap:?} between logins");
    }
    assert_eq!(logins.len(), 33, "{} logins in a day", logins.len());
    assert_eq!(seen.len(), logins.len(), "each login's token was written");
    let status = &run.board.snapshot(run.clock.now())[0];
    assert_eq!(status.state, crate::status::State::Fresh);
    assert_eq!(status.consecutive_failures, 0);
    run.stop().await;
}

/// A day with a wrong password, then the Secret fixed, under both lockout rules.
/// Returns the logins of the day, the state at its end, and the worker with its directory.
async fn a_wrong_password_for_a_day(
    lockout_reset: &str,
) -> (Vec<(SystemTime, bool)>, crate::status::State, Run, tempfile::TempDir) {
    let (run, dir) = alice("wrong", &format!("  lockout_reset: {lockout_reset}\n"), |_| {});
    let password = dir.path().join("password");
    tokio::time::sleep(24 * HOUR).await;
    let logins = run.magento.logins();
    let state = run.board.snapshot(run.clock.now())[0].state;
    assert!(logins.iter().all(|(_, ok)| !*ok));
    assert!(crate::ledger::read_ledger(&run.path).is_some(), "the 401s are in the ledger");

    // The Secret is fixed: tried within the password poll, whatever the wait.
    std::fs::write(&password, "right\n").unwrap();
    let fixed_at = run.clock.now();
    tokio::time::sleep(PASSWORD_POLL + Duration::from_secs(1)).await;
    let (at, ok) = *run.magento.logins().last().unwrap();
    assert!(ok, "the fixed password was not tried");
    assert!(at.duration_since(fixed_at).unwrap() <= PASSWORD_POLL);
    assert!(run.magento.accepts(&run.token().unwrap()));
    assert!(crate::ledger::read_ledger(&run.path).is_none(), "a success clears the ledger");
    (logins, state, run, dir)
}

#[tokio::test(start_paused = true)]
async fn without_cron_a_wrong_password_is_sent_three_times_in_a_day_and_a_fix_at_once() {
    let (logins, state, run, _dir) = a_wrong_password_for_a_day("success").await;
    // At 0, 1 and 6 minutes; then no time helps: held back until the password changes. A store
    // without cron counts all three for ever, two below its lock.
    let gaps: Vec<u64> = logins.windows(2).map(|w| w[1].0.duration_since(w[0].0).unwrap().as_secs()).collect();
    assert_eq!(gaps, [60, 300], "{} logins in a day", logins.len());
    assert_eq!(state, crate::status::State::HeldBack);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn where_cron_runs_a_wrong_password_is_tried_once_per_pause_and_a_fix_at_once() {
    let (logins, state, run, _dir) = a_wrong_password_for_a_day("window").await;
    let r = crate::config::RefreshSettings::default();
    // Magento's count (cleared 30 minutes after the last failure by its cron) never comes
    // within two of its lock at six.
    let (mut count, mut expires) = (0, logins[0].0);
    for (at, _) in &logins {
        if *at >= expires {
            count = 0;
        }
        count += 1;
        expires = *at + r.lockout_window;
        assert!(count <= r.lockout_threshold - 2, "Magento's count reached {count} at {at:?}");
    }
    // At 0, 1 and 6 minutes, then once per 31-minute pause.
    assert_eq!(logins.len(), 3 + (24 * 60 - 6) / 31, "{} logins in a day", logins.len());
    assert_eq!(state, crate::status::State::Paused);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_revoked_token_is_replaced_within_validate_every() {
    let (run, _dir) = alice("right", "", |_| {});
    tokio::time::sleep(5 * HOUR).await;
    // A logout elsewhere (a PWA storefront's revokeCustomerToken): every token dies at once.
    run.magento.revoke();
    let revoked_at = run.clock.now();
    assert!(!run.magento.accepts(&run.token().unwrap()));
    let mut replaced = None;
    for _ in 0..(11 * 60) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if run.magento.accepts(&run.token().unwrap()) {
            replaced = Some(run.clock.now().duration_since(revoked_at).unwrap());
            break;
        }
    }
    let replaced = replaced.expect("the revoked token was not replaced");
    // Seen at the next check (every 10 minutes), replaced 1.1 s later.
    assert!(replaced <= 10 * MINUTE + Duration::from_secs(3), "replaced after {replaced:?}");
    assert_eq!(run.board.snapshot(run.clock.now())[0].state, crate::status::State::Fresh);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_store_code_that_never_validates_costs_a_few_logins_then_no_more_checks() {
    let (run, _dir) = alice("right", "", |store| store.refuse_checks = true);
    tokio::time::sleep(24 * HOUR).await;
    let logins = run.magento.logins().len();
    // A day of planned refreshes (33) and the refused checks' few logins: never a loop.
    assert!(logins <= 33 + MAX_FRESH_REFUSALS as usize + 1, "{logins} logins in a day");
    let checks = run.magento.0.lock().unwrap().checks;
    assert_eq!(checks, 1 + MAX_FRESH_REFUSALS as usize, "the checks stop");
    run.stop().await;
}

/// Every configured customer holds one of these tasks for the life of the daemon: with
/// 10,000 customers each byte is 10 KB of resident memory (benches/RESULTS.md). It was
/// 2,968 bytes before `run` stopped being an `async fn` and the rare steps were boxed; 904
/// before a token waiting to be written again (`pending`, rare) was boxed and the client
/// became one handle (issue 12: 752); 776 with the store of `output.kubernetes`, 704 since the
/// workers share one `Arc<Shared>` instead of a clone each; 728 with the wait on the issuer's
/// credential (`auth.method` without passwords: a boxed future, 8 bytes while absent).
#[test]
fn an_idle_customer_task_stays_small() {
    let config = config::parse(
        "magento:\n  base_url: http://127.0.0.1:1\noutput:\n  dir: /tmp\ncustomers:\n  - name: a\n    username: a\n    password_env: X\n",
        Checks::Static,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _entered = rt.enter();
    let shared = Shared {
        magento: Client::new(&MagentoSettings { timeout: Duration::from_secs(1), ca_file: None }).unwrap(),
        refresh: Arc::new(config.refresh.clone()),
        logins: Arc::new(Semaphore::new(1)),
        clock: Clock::System,
        notify: Arc::default(),
        store: crate::store::Store::files(config.output.dir().unwrap().clone()),
        issuer: None,
    };
    let customer = Arc::new(config.customers[0].clone());
    let account = Accounts::new().of(&customer);
    let worker =
        Worker::new(customer, account, Arc::new(shared), Reporter::new("a", Board::new()), CancellationToken::new());
    let task = worker.run(true);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 728, "a customer's task is {size} bytes");
}

#[test]
fn a_hold_back_message_names_its_cause_and_never_guesses_one() {
    use crate::schedule::{AuthState, AuthWait};
    let r = RefreshSettings::default();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut auth = AuthState::default();
    auth.record_failure(t, true, &r);
    // A 401 moments ago, in this very process: no reload or restart to speak of.
    let wait = auth.wait(true, t, &r);
    let said = super::held_back_message(wait, true, &auth, "alice");
    assert!(!said.contains("reload or restart"), "{said}");
    assert!(said.contains("at 2027-01-15T08:00:00Z") && said.contains("before 2027-01-15T08:01:00Z"), "{said}");
    // An unconfirmed account keeps its reason once held back.
    auth.final_refusal = true;
    let said = super::held_back_message(AuthWait::HeldBack, true, &auth, "alice");
    assert!(said.contains("not confirmed") && !said.contains("fix the password"), "{said}");
    // A ledger that could not be read says so, and what to do.
    let spent = AuthState::spent(t, &r, "/tokens/.alice.auth: not a record of 401s".into());
    let said = super::held_back_message(spent.wait(true, t, &r), false, &spent, "alice");
    assert!(said.contains("/tokens/.alice.auth: not a record of 401s") && said.contains("forget-failures"), "{said}");
}
