//! Token file formats (`raw`, `json`, `header`, `env`, per customer) and the index file
//! (`output.index`), end to end: the real binary against the dev server, judged by the bytes of
//! the files, the logins Magento received and the daemon's log.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;
use magento_devserver::DevServerOptions;
use magento_token_sidecar::clock::{from_unix_secs, rfc3339};
use magento_token_sidecar::token::jwt_times;

const SEC: Duration = Duration::from_secs(1);

const CAROL: (&str, &str, &str) = ("carol", "carol@example.com", "carol-Pa55!");
const DAVE: (&str, &str, &str) = ("dave", "dave@example.com", "dave-Pa55!");
const ERIN: (&str, &str, &str) = ("erin", "erin@example.com", "erin-Pa55!");

/// A customer of a test: who, the file it writes and its format there.
#[derive(Clone, Copy)]
struct Who {
    c: (&'static str, &'static str, &'static str),
    file: &'static str,
    format: &'static str,
}

/// alice in output.format (env), bob header, carol json, dave raw in `dave.token`.
const MIXED: [Who; 4] = [
    Who { c: ALICE, file: "alice", format: "env" },
    Who { c: BOB, file: "bob", format: "header" },
    Who { c: CAROL, file: "carol", format: "json" },
    Who { c: DAVE, file: "dave.token", format: "raw" },
];

/// The YAML of one customer, `more` lines (`    format: json\n`) added.
fn entry(w: &World, c: (&str, &str, &str), more: &str) -> String {
    format!("  - name: {}\n    username: {}\n    password_file: {}\n{more}", c.0, c.1, w.secret_path(c.0).display())
}

/// The configuration: `output` lines before `dir:`, `refresh` lines, the customers given.
fn config(w: &World, output: &str, refresh: &str, customers: &[String]) -> String {
    w.config_text(&[], refresh, &customers.concat()).replace("  dir:", &format!("{output}  dir:"))
}

/// MIXED with output.format env: alice inherits it, the others have their own.
fn mixed_config(w: &World, output: &str, refresh: &str) -> String {
    let customers = [
        entry(w, ALICE, ""),
        entry(w, BOB, "    format: header\n"),
        entry(w, CAROL, "    format: json\n"),
        entry(w, DAVE, "    format: raw\n    file: dave.token\n"),
    ];
    config(w, &format!("  format: env\n{output}"), refresh, &customers)
}

async fn world(customers: &[(&str, &str, &str)], opts: DevServerOptions) -> World {
    let w = World::new(opts).await;
    for (name, email, password) in customers {
        w.server.add_customer(email, password);
        w.set_password(name, password);
    }
    w
}

/// The expiry of a dev server token, as the contract writes it: the JWT's `exp`.
fn expiry_of(token: &str) -> String {
    rfc3339(from_unix_secs(jwt_times(token).expect("the dev server issues JWTs").exp))
}

/// Checks that `who`'s file is exactly what the contract says for its format, with a token
/// Magento issued for that customer; returns the token.
fn assert_file(w: &World, who: &Who) -> String {
    let text = w.read_token(who.file).unwrap_or_else(|| panic!("no file {}", who.file));
    let token = match who.format {
        "raw" => text.clone(),
        "header" => text.strip_prefix("Authorization: Bearer ").unwrap_or_else(|| panic!("{text:?}")).to_owned(),
        "env" => text.strip_prefix("MAGENTO_TOKEN=").and_then(|t| t.split('\n').next()).unwrap().to_owned(),
        "json" => serde_json::from_str::<serde_json::Value>(&text).unwrap()["token"].as_str().unwrap().to_owned(),
        other => panic!("{other}"),
    };
    assert_eq!(w.server.check_token(&token).as_deref(), Some(who.c.1), "{}: a token Magento accepts", who.file);
    let expires_at = expiry_of(&token);
    let expected = match who.format {
        "raw" => token.clone(),
        "header" => format!("Authorization: Bearer {token}"),
        "env" => format!("MAGENTO_TOKEN={token}\nMAGENTO_TOKEN_EXPIRES_AT={expires_at}\n"),
        _ => {
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let obtained_at = json["obtained_at"].as_str().unwrap();
            let obtained = humantime::parse_rfc3339(obtained_at).unwrap();
            let now = SystemTime::now();
            assert!(obtained <= now && now.duration_since(obtained).unwrap() < 600 * SEC, "{obtained_at}");
            format!(
                r#"{{"customer":"{}","token":"{token}","obtained_at":"{obtained_at}","expires_at":"{expires_at}"}}"#,
                who.c.0
            )
        }
    };
    assert_eq!(text, expected, "{} in format {}", who.file, who.format);
    assert_eq!(mode_of(&w.token_path(who.file)), 0o600, "{}", who.file);
    token
}

/// The index file: name -> (token, expires_at), and that it is nothing else.
fn read_index(w: &World, file: &str) -> Option<BTreeMap<String, (String, String)>> {
    let text = std::fs::read_to_string(w.token_path(file)).ok()?;
    Some(parse_index(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

fn parse_index(text: &str) -> Result<BTreeMap<String, (String, String)>, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let object = json.as_object().ok_or("not an object")?;
    let mut index = BTreeMap::new();
    for (name, entry) in object {
        let fields = entry.as_object().ok_or("an entry is no object")?;
        let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        keys.sort();
        if keys != ["expires_at", "token"] {
            return Err(format!("{name}: keys {keys:?}"));
        }
        let field = |k: &str| fields[k].as_str().map(str::to_owned).ok_or(format!("{name}.{k} is no string"));
        index.insert(name.clone(), (field("token")?, field("expires_at")?));
    }
    Ok(index)
}

/// The index as it should be for `customers`: each one's token (as in its file, checked
/// against the contract) and the token's expiry.
fn expected_index(w: &World, customers: &[Who]) -> BTreeMap<String, (String, String)> {
    customers
        .iter()
        .map(|who| {
            let token = assert_file(w, who);
            let expires_at = expiry_of(&token);
            (who.c.0.to_owned(), (token, expires_at))
        })
        .collect()
}

/// Waits until the index lists exactly `customers` with the tokens of their files.
async fn wait_index_matches(w: &World, file: &str, customers: &[Who], limit: Duration) {
    let start = Instant::now();
    loop {
        let index = read_index(w, file);
        let expected = expected_index(w, customers);
        if index.as_ref() == Some(&expected) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "the index does not match the token files after {limit:?}: names {:?}, expected {:?}",
            index.map(|i| i.into_keys().collect::<Vec<_>>()),
            expected.into_keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(logs: &str, message: &str) -> usize {
    logs.matches(&format!("\"message\":\"{message}\"")).count()
}

async fn once_async(config: &std::path::Path) -> (i32, String, String) {
    let config = config.to_str().unwrap().to_owned();
    tokio::task::spawn_blocking(move || run_to_end(&["once", "--config", &config])).await.unwrap()
}

/// `run` writes each format exactly as the contract says, a customer's own `format` over
/// `output.format`; an env file sets both variables when sourced; a restart adopts the token in
/// every format without a login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_each_format_exactly_and_a_restart_adopts_every_format() {
    let w = world(&[ALICE, BOB, CAROL, DAVE], DevServerOptions::default()).await;
    w.write_config(&mixed_config(&w, "", ""));
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let tokens: Vec<String> = MIXED.iter().map(|who| assert_file(&w, who)).collect();

    // What /status says of the expiry is what the env file says.
    let status = d.status_of("alice").await;
    assert_eq!(status["expires_at"].as_str().unwrap(), expiry_of(&tokens[0]));

    // `source` sets both variables (sh, as in an entrypoint script).
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#". "$1" && printf '%s|%s' "$MAGENTO_TOKEN" "$MAGENTO_TOKEN_EXPIRES_AT""#)
        .arg("sh")
        .arg(w.token_path("alice"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{}|{}", tokens[0], expiry_of(&tokens[0])));
    assert_eq!(d.stop().await.code(), Some(0));

    // A restart reads every format back and adopts every token: no login, the same bytes.
    let before: Vec<Vec<u8>> = MIXED.iter().map(|who| std::fs::read(w.token_path(who.file)).unwrap()).collect();
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    wait_for(10 * SEC, "four adoptions", || async {
        (count(&d.logs(), "adopted the token on disk: Magento still accepts it") == 4).then_some(())
    })
    .await;
    for (who, before) in MIXED.iter().zip(&before) {
        assert_eq!(w.server.login_attempts(who.c.1), 1, "{}: no new login", who.c.0);
        assert_eq!(&std::fs::read(w.token_path(who.file)).unwrap(), before, "{}: unchanged", who.file);
    }
    assert_eq!(d.stop().await.code(), Some(0));
    assert!(w.stray_files(&["alice", "bob", "carol", "dave.token"]).is_empty());
}

/// `once` writes the same bytes as `run` in each format, and the index of every customer
/// written; a customer that failed is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_writes_each_format_exactly_and_the_index_of_the_customers_written() {
    let w = world(&[ALICE, BOB, CAROL, DAVE, ERIN], DevServerOptions::default()).await;
    w.set_password("erin", "not-erins-password");
    let mut text = mixed_config(&w, "  index: tokens.json\n", "");
    text.push_str(&entry(&w, ERIN, ""));
    w.write_config(&text);
    // A stale index of an earlier pass, with a customer since removed: replaced whole.
    std::fs::write(w.token_path("tokens.json"), r#"{"zed":{"token":"old","expires_at":"2030-01-01T00:00:00Z"}}"#)
        .unwrap();

    let (code, _, err) = once_async(&w.config_path()).await;
    assert_eq!(code, 1, "erin's password is wrong: {err}");
    let index = read_index(&w, "tokens.json").unwrap();
    assert_eq!(index, expected_index(&w, &MIXED), "every customer written, and only them");
    assert_eq!(mode_of(&w.token_path("tokens.json")), 0o600);
    assert!(w.read_token("erin").is_none());
    assert!(w.temporaries().is_empty(), "{:?}", w.temporaries());

    // With every customer written: exit 0, the index lists all five.
    w.set_password("erin", ERIN.2);
    // (erin's recorded 401 would hold her back: an operator fixed the password.)
    std::fs::remove_file(w.token_path(".erin.auth")).unwrap();
    let (code, _, err) = once_async(&w.config_path()).await;
    assert_eq!(code, 0, "{err}");
    let mut all = MIXED.to_vec();
    all.push(Who { c: ERIN, file: "erin", format: "env" });
    assert_eq!(read_index(&w, "tokens.json").unwrap(), expected_index(&w, &all));
    assert!(w.stray_files(&["alice", "bob", "carol", "dave.token", "erin", "tokens.json"]).is_empty());
}

/// A reload that changes a customer's format (its own, or output.format it inherits) rewrites
/// the same token in the new format without a login; a customer whose format did not change is
/// not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_format_rewrites_the_same_token_without_a_login() {
    let w = world(&[ALICE, BOB, CAROL, DAVE], DevServerOptions::default()).await;
    w.write_config(&mixed_config(&w, "", ""));
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let tokens: Vec<String> = MIXED.iter().map(|who| assert_file(&w, who)).collect();
    let carol_before = std::fs::metadata(w.token_path("carol")).unwrap();

    // output.format env -> json: alice (inheriting it) goes to json; bob's own header -> env;
    // carol keeps json; dave's own raw -> header.
    let customers = [
        entry(&w, ALICE, ""),
        entry(&w, BOB, "    format: env\n"),
        entry(&w, CAROL, "    format: json\n"),
        entry(&w, DAVE, "    format: header\n    file: dave.token\n"),
    ];
    w.write_config(&config(&w, "  format: json\n", "", &customers));
    d.signal("HUP");
    let now = [
        Who { c: ALICE, file: "alice", format: "json" },
        Who { c: BOB, file: "bob", format: "env" },
        Who { c: CAROL, file: "carol", format: "json" },
        Who { c: DAVE, file: "dave.token", format: "header" },
    ];
    wait_for(10 * SEC, "the files rewritten in their new formats", || async {
        let alice = w.read_token("alice")?;
        let bob = w.read_token("bob")?;
        let dave = w.read_token("dave.token")?;
        (alice.starts_with('{') && bob.starts_with("MAGENTO_TOKEN=") && dave.starts_with("Authorization:"))
            .then_some(())
    })
    .await;
    for (who, token) in now.iter().zip(&tokens) {
        assert_eq!(&assert_file(&w, who), token, "{}: the same token", who.c.0);
        assert_eq!(w.server.login_attempts(who.c.1), 1, "{}: no new login", who.c.0);
    }
    let carol_after = std::fs::metadata(w.token_path("carol")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((carol_after.ino(), carol_after.mtime_nsec()), (carol_before.ino(), carol_before.mtime_nsec()));
    assert_eq!(d.stop().await.code(), Some(0));
}

/// The index matches every token file after start and after refreshes, is rewritten no more
/// than once per token written, loses a customer removed by a reload (whose file stays), and
/// at start no longer lists a customer a previous run had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_every_token_file_through_refreshes_and_reloads() {
    let opts = DevServerOptions { token_lifetime: 8 * SEC, ..Default::default() };
    let w = world(&[ALICE, BOB, CAROL, DAVE], opts).await;
    let refresh = "  before_expiry: 4s\n  jitter: 1s\n";
    w.write_config(&mixed_config(&w, "  index: tokens.json\n", refresh));
    std::fs::write(w.token_path("tokens.json"), r#"{"zed":{"token":"old","expires_at":"2030-01-01T00:00:00Z"}}"#)
        .unwrap();
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    wait_index_matches(&w, "tokens.json", &MIXED, 10 * SEC).await;
    assert_eq!(mode_of(&w.token_path("tokens.json")), 0o600);
    let first = read_index(&w, "tokens.json").unwrap();

    // Refreshes (8 s tokens, about every 4 s): every customer's token changes, and the index
    // follows.
    // (A login counted by the server is written a moment later: what is waited for is its
    // token in the files and the index.)
    wait_for(20 * SEC, "a new token of every customer in the index", || async {
        let index = read_index(&w, "tokens.json")?;
        MIXED.iter().all(|who| index.get(who.c.0).is_some_and(|t| t.0 != first[who.c.0].0)).then_some(())
    })
    .await;
    wait_index_matches(&w, "tokens.json", &MIXED, 10 * SEC).await;
    let refreshed = read_index(&w, "tokens.json").unwrap();
    for who in &MIXED {
        assert_ne!(first[who.c.0].0, refreshed[who.c.0].0, "{}: a new token in the index", who.c.0);
    }

    // A reload removing carol: she leaves the index; her file stays.
    let customers = [
        entry(&w, ALICE, ""),
        entry(&w, BOB, "    format: header\n"),
        entry(&w, DAVE, "    format: raw\n    file: dave.token\n"),
    ];
    w.write_config(&config(&w, "  format: env\n  index: tokens.json\n", refresh, &customers));
    d.signal("HUP");
    let left = [MIXED[0], MIXED[1], MIXED[3]];
    wait_index_matches(&w, "tokens.json", &left, 10 * SEC).await;
    assert!(w.read_token("carol").is_some(), "a removed customer's file stays");
    assert_eq!(d.stop().await.code(), Some(0));

    // Never more than one rewrite per token written (plus the one at start and the reload's).
    let logs = d.logs();
    let (writes, rewrites) = (count(&logs, "token written"), count(&logs, "index written"));
    assert!(writes >= 8, "{writes} tokens written");
    assert!(rewrites <= writes + 2, "{rewrites} index rewrites for {writes} tokens written");
    assert!(w.stray_files(&["alice", "bob", "carol", "dave.token", "tokens.json"]).is_empty());
}

/// A reader that reads and parses the index in a tight loop while tokens rotate (five
/// customers, 10 s) never sees a partial or unparsable file, never misses a customer, and every
/// token it reads is one Magento issued. The tokens live 9 s and are replaced every 5 s, the
/// daemon's floor between two logins of one customer (`schedule::MIN_LOGIN_INTERVAL`): with a
/// shorter life a token expires before its successor, and the index rightly drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_partial_index_while_tokens_rotate() {
    let opts = DevServerOptions { token_lifetime: 9 * SEC, ..Default::default() };
    let customers = [ALICE, BOB, CAROL, DAVE, ERIN];
    let w = world(&customers, opts).await;
    let entries: Vec<String> = customers.iter().map(|c| entry(&w, *c, "")).collect();
    w.write_config(&config(&w, "  index: tokens.json\n", "  before_expiry: 4s\n  jitter: 1s\n", &entries));
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let index = w.token_path("tokens.json");
    wait_for(10 * SEC, "an index of every customer", || async {
        read_index(&w, "tokens.json").filter(|i| i.len() == customers.len())
    })
    .await;

    let names: Vec<&str> = customers.iter().map(|c| c.0).collect();
    let reader = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let (mut reads, mut tokens, mut bad) = (0u64, HashSet::new(), Vec::new());
        while start.elapsed() < 10 * SEC && reads < 5_000_000 {
            reads += 1;
            let text = match std::fs::read_to_string(&index) {
                Ok(text) => text,
                Err(e) => {
                    bad.push(format!("read {reads}: {e}"));
                    continue;
                }
            };
            match parse_index(&text) {
                Ok(i) if i.keys().map(String::as_str).eq(names.iter().copied()) => {
                    tokens.extend(i.into_values().map(|(token, _)| token))
                }
                Ok(i) => bad.push(format!("read {reads}: names {:?}", i.keys().collect::<Vec<_>>())),
                Err(e) => bad.push(format!("read {reads}: {e} ({} bytes)", text.len())),
            }
            if bad.len() > 10 {
                break;
            }
        }
        (reads, tokens, bad)
    });
    let (reads, tokens, bad) = reader.await.unwrap();
    eprintln!("reader: {reads} reads, {} distinct tokens, {} bad", tokens.len(), bad.len());
    assert!(bad.is_empty(), "{bad:#?}");
    for token in &tokens {
        assert!(w.server.issued(token), "a token the dev server never issued ({} bytes)", token.len());
    }
    // Rotation went on meanwhile, and the reader saw it: at least two tokens per customer.
    assert!(tokens.len() >= 2 * customers.len(), "{} tokens seen in {reads} reads", tokens.len());
    for c in &customers {
        assert!(w.server.login_attempts(c.1) >= 2, "{}: {} logins", c.0, w.server.login_attempts(c.1));
    }
    // A stop writes the last change: the index matches the files after it.
    assert_eq!(d.stop().await.code(), Some(0));
    let all: Vec<Who> = customers.iter().map(|c| Who { c: *c, file: c.0, format: "raw" }).collect();
    let expected: BTreeMap<String, (String, String)> = all
        .iter()
        .map(|who| {
            let token = w.read_token(who.file).unwrap();
            (who.c.0.to_owned(), (token.clone(), expiry_of(&token)))
        })
        .collect();
    assert_eq!(read_index(&w, "tokens.json").unwrap(), expected);
    let logs = d.logs();
    let (writes, rewrites) = (count(&logs, "token written"), count(&logs, "index written"));
    eprintln!("{writes} token files written, {rewrites} index rewrites");
    assert!(rewrites <= writes + 1, "{rewrites} index rewrites for {writes} tokens written");
    assert!(w.temporaries().is_empty(), "{:?}", w.temporaries());
}

/// An index that cannot be written (a directory in its place) is logged with its path and
/// retried; the token files are not held up; once it can be, it is written. `once` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_cannot_be_written_is_logged_and_retried() {
    let w = world(&[ALICE, BOB], DevServerOptions::default()).await;
    let entries = [entry(&w, ALICE, ""), entry(&w, BOB, "")];
    w.write_config(&config(&w, "  index: tokens.json\n", "", &entries));
    let blocked = w.token_path("tokens.json");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("x"), "").unwrap();
    // `once`: the token files are written, the pass fails (exit 1) naming the index.
    let (code, _, err) = once_async(&w.config_path()).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot write the index {}", blocked.display())), "{err}");
    assert!(w.read_token("alice").is_some() && w.read_token("bob").is_some());

    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    wait_for(10 * SEC, "the index's error", || async {
        d.logs().contains(&format!("cannot write the index {}", blocked.display())).then_some(())
    })
    .await;
    assert!(d.logs().lines().any(|l| l.contains("cannot write the index") && l.contains("\"level\":\"ERROR\"")));
    std::fs::remove_dir_all(&blocked).unwrap();
    let both = [Who { c: ALICE, file: "alice", format: "raw" }, Who { c: BOB, file: "bob", format: "raw" }];
    wait_index_matches(&w, "tokens.json", &both, 15 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// `check` names a bad index with its key path, and every other problem with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_rejects_a_bad_index_name_with_its_key_path() {
    let w = world(&[ALICE, BOB], DevServerOptions::default()).await;
    let entries = [entry(&w, ALICE, ""), entry(&w, BOB, "    file: bob.token\n    format: yaml\n")];
    let path = w.config_path().to_str().unwrap().to_owned();
    for (index, problem) in [
        ("../tokens.json", r#"output.index: "../tokens.json" must be a plain file name inside output.dir"#),
        (".tokens.json", r#"output.index: ".tokens.json" must not start with '.'"#),
        ("bob.token", r#"output.index: "bob.token" is customers[1]'s token file too"#),
    ] {
        w.write_config(&config(&w, &format!("  index: {index:?}\n"), "", &entries).replace("    format: yaml\n", ""));
        let (code, _, err) = run_to_end(&["check", "--config", &path]);
        assert_eq!(code, 2, "{index}: {err}");
        assert!(err.contains(problem), "{index}: {err}");
    }
    // A good name: ok; an unknown format: its key path.
    w.write_config(&config(&w, "  index: tokens.json\n", "", &entries).replace("    format: yaml\n", ""));
    let (code, out, err) = run_to_end(&["check", "--config", &path]);
    assert_eq!(code, 0, "{out}{err}");
    w.write_config(&config(&w, "  index: tokens.json\n", "", &entries));
    let (code, _, err) = run_to_end(&["check", "--config", &path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("customers[1].format: unknown variant `yaml`, expected one of"), "{err}");
}

/// At a restart, a customer whose token file only this daemon's user could have written stays
/// in the index while Magento is asked about its token (and after, when Magento cannot say):
/// an app reading the index across a restart never finds it empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_token_in_the_index_while_magento_does_not_answer() {
    let w = world(&[ALICE, BOB], DevServerOptions::default()).await;
    let entries = [entry(&w, ALICE, ""), entry(&w, BOB, "    format: json\n")];
    let text = config(&w, "  index: tokens.json\n", "", &entries);
    w.write_config(&text);
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let both = [Who { c: ALICE, file: "alice", format: "raw" }, Who { c: BOB, file: "bob", format: "json" }];
    wait_index_matches(&w, "tokens.json", &both, 10 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
    let before = read_index(&w, "tokens.json").unwrap();

    // A Magento that accepts connections and never answers: each check of a token on disk
    // takes magento.timeout (2 s).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    w.write_config(&text.replace(&w.server.base_url(), &url));
    let mut d = w.start();
    let first = wait_for(10 * SEC, "the first index write", || async {
        d.logs().lines().find(|l| l.contains("\"message\":\"index written\"")).map(str::to_owned)
    })
    .await;
    assert!(first.contains("\"customers\":2"), "{first}");
    assert!(!d.logs().contains("the token on disk was not accepted"), "written before Magento answered");
    assert_eq!(read_index(&w, "tokens.json").unwrap(), before);
    // Magento never says: the files are this daemon's own and unexpired, so they still count.
    wait_for(10 * SEC, "both checks to time out", || async {
        (count(&d.logs(), "the token on disk was not accepted: logging in") == 2).then_some(())
    })
    .await;
    d.wait_ready(5 * SEC).await;
    assert_eq!(read_index(&w, "tokens.json").unwrap(), before);
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A token that expires with no successor (Magento refuses logins past `before_expiry`) leaves
/// the index at its expiry, as `/readyz` stops counting it; the next token brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_without_a_successor_leaves_the_index() {
    let opts = DevServerOptions { token_lifetime: 8 * SEC, ..Default::default() };
    let w = world(&[ALICE, BOB], opts).await;
    let entries = [entry(&w, ALICE, ""), entry(&w, BOB, "")];
    let text = config(&w, "  index: tokens.json\n", "  before_expiry: 4s\n  jitter: 1s\n", &entries);
    w.write_config(&text);
    let mut d = w.start();
    d.wait_ready(15 * SEC).await;
    let both = [Who { c: ALICE, file: "alice", format: "raw" }, Who { c: BOB, file: "bob", format: "raw" }];
    wait_index_matches(&w, "tokens.json", &both, 10 * SEC).await;
    // Every login from now on gets a 503.
    w.server.set_fault(Some(magento_devserver::Fault::status(503)));
    let alice = w.read_token("alice").unwrap();
    let expires = from_unix_secs(jwt_times(&alice).unwrap().exp);
    wait_for(20 * SEC, "alice to leave the index", || async {
        read_index(&w, "tokens.json").filter(|i| !i.contains_key("alice"))
    })
    .await;
    assert!(SystemTime::now() >= expires, "alice left the index before her token expired");
    wait_for(20 * SEC, "an empty index", || async { read_index(&w, "tokens.json").filter(|i| i.is_empty()) }).await;
    assert_eq!(w.read_token("alice").as_deref(), Some(alice.as_str()), "her file stays as it was");
    let (status, body) = d.get("/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    // Magento is back: a new token, and alice is back in the index.
    w.server.set_fault(None);
    wait_for(15 * SEC, "new tokens", || async {
        both.iter().all(|who| w.read_token(who.file).is_some_and(|t| w.server.check_token(&t).is_some())).then_some(())
    })
    .await;
    wait_index_matches(&w, "tokens.json", &both, 10 * SEC).await;
    assert_eq!(d.stop().await.code(), Some(0));
}
