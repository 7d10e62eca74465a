//! Property tests: whatever arrives (a login answer, an error page, a token's claims, a token
//! file, a configuration file), the daemon's parsers never panic and every refusal names the
//! problem. A panic in a worker would silently stop one customer's refreshes; a vague error
//! would leave its operator guessing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use proptest::prelude::*;

use magento_token_sidecar::config::{self, Checks, RefreshSettings};
use magento_token_sidecar::magento::Outcome;
use magento_token_sidecar::magento::{magento_message, parse_token};
use magento_token_sidecar::schedule;
use magento_token_sidecar::secret::Secret;
use magento_token_sidecar::token::{self, TokenError, MAX_LIFETIME};
use magento_token_sidecar::{clock, store};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT shaped like Magento's around these claims.
fn jwt(claims: &str) -> String {
    format!("{}.{}.c2ln", b64(br#"{"kid":"1","alg":"HS256"}"#), b64(claims.as_bytes()))
}

/// A claim value as JSON: an integer of any size, a float, or something that is not a number.
fn claim() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (1_600_000_000i64..1_900_000_000).prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(|f| format!("{f:e}")),
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("null".to_owned()),
        "[a-z]{0,5}".prop_map(|s| format!("{s:?}")),
        Just("123456789012345678901234567890".to_owned()),
    ]
}

fn settings() -> RefreshSettings {
    RefreshSettings::default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any bytes as the answer to a login: a token of the accepted form, or an invalid_response
    /// that says what was wrong.
    #[test]
    fn login_answers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        match parse_token(&body) {
            Ok(token) => prop_assert!(token::check_form(token.expose()).is_ok()),
            Err(e) => {
                prop_assert_eq!(e.outcome, Outcome::InvalidResponse);
                prop_assert!(e.message.starts_with("the answer to the login is ") || e.message.starts_with("the token "), "{}", e.message);
            }
        }
    }

    /// Any string in a JSON string: accepted exactly when it has the RFC 6750 form; refused with
    /// the reason (empty, too long, the offending byte).
    #[test]
    fn token_strings_are_checked_for_form(text in prop_oneof![".{0,40}", "[A-Za-z0-9._~+/-]{1,40}=*", "[ -~]{0,40}"]) {
        let body = serde_json::to_vec(&text).unwrap();
        match (parse_token(&body), token::check_form(&text)) {
            (Ok(token), Ok(())) => prop_assert_eq!(token.expose(), text.as_str()),
            (Err(e), Err(why)) => prop_assert!(e.message.contains(&why.to_string()), "{} / {}", e.message, why),
            (got, want) => prop_assert!(false, "parse_token {:?} but check_form {:?}", got.map(|_| ()), want),
        }
    }

    /// Error pages: Magento's message with its placeholders filled, or nothing; never a panic.
    #[test]
    fn error_messages_never_panic(
        message in ".{0,60}",
        names in proptest::collection::vec("[a-z%0-9]{0,6}", 0..4),
        raw in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let _ = magento_message(&raw);
        let parameters: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.clone(), serde_json::Value::String(format!("<{n}>")))).collect();
        let body = serde_json::json!({ "message": message, "parameters": parameters });
        let shown = magento_message(&serde_json::to_vec(&body).unwrap()).unwrap();
        prop_assert!(shown.chars().count() <= 500);
        let list = serde_json::json!({ "message": message, "parameters": names });
        prop_assert!(magento_message(&serde_json::to_vec(&list).unwrap()).is_some());
    }

    /// Any claims, any clock: the expiry is a time that can be written, planned and shown, no
    /// more than MAX_LIFETIME ahead; or a refusal that says why.
    #[test]
    fn jwt_claims_never_panic(
        exp in claim(),
        iat in prop_oneof![claim().prop_map(Some), Just(None)],
        started in 0u64..4_000_000_000,
        default_minutes in 1u64..100_000,
    ) {
        let claims = match &iat {
            Some(iat) => format!(r#"{{"uid":1,"utypid":3,"iat":{iat},"exp":{exp}}}"#),
            None => format!(r#"{{"uid":1,"utypid":3,"exp":{exp}}}"#),
        };
        let text = jwt(&claims);
        let _ = token::jwt_times(&text);
        let started = UNIX_EPOCH + Duration::from_secs(started);
        match token::expiry(&Secret::new(text), started, Duration::from_secs(default_minutes * 60)) {
            Ok(e) => {
                prop_assert!(e.expires_at > started);
                prop_assert!(e.lifetime <= MAX_LIFETIME.max(Duration::from_secs(default_minutes * 60)));
                let _ = clock::rfc3339(e.expires_at);
                let next = schedule::next_refresh(started, e.expires_at, e.lifetime, &settings(), 0.5);
                let _ = clock::rfc3339(next);
            }
            Err(TokenError::AlreadyExpired(_)) | Err(TokenError::Implausible(_)) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    /// Tokens of any shape (not only JWTs) never panic the claims reader.
    #[test]
    fn arbitrary_tokens_never_panic(text in "[A-Za-z0-9._~+/=-]{0,200}", parts in proptest::collection::vec(any::<Vec<u8>>(), 0..5)) {
        let _ = token::jwt_times(&text);
        let joined = parts.iter().map(|p| b64(p)).collect::<Vec<_>>().join(".");
        let _ = token::jwt_times(&joined);
        let _ = token::expiry(&Secret::new(joined), SystemTime::now(), Duration::from_secs(60));
    }

    /// A token file with any content, as a crash or another program may leave it: read back as a
    /// token of the accepted form, or as none.
    #[test]
    fn token_files_never_panic(content in proptest::collection::vec(any::<u8>(), 0..300), json_token in ".{0,20}", expires in ".{0,30}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        for bytes in [content.clone(), serde_json::to_vec(&serde_json::json!({"token": json_token, "expires_at": expires})).unwrap()] {
            std::fs::write(&path, &bytes).unwrap();
            if let Some(found) = store::files::read_existing(&path) {
                prop_assert!(token::check_form(found.token.expose()).is_ok());
                if let Some(at) = found.expires_at {
                    let _ = clock::rfc3339(at);
                }
            }
        }
    }

    /// Any text as a configuration file: loaded, or refused with at least one problem, each with
    /// something to say.
    #[test]
    fn any_configuration_text_never_panics(text in prop_oneof![".{0,200}", "[a-z_:\\- \\n\\[\\]{}\"'0-9.]{0,300}"]) {
        if let Err(problems) = config::parse(&text, Checks::Static) {
            prop_assert!(!problems.is_empty());
            for p in problems {
                prop_assert!(!p.message.trim().is_empty(), "{p:?}");
            }
        }
    }

    /// A valid configuration with one value replaced by anything: loaded, or refused naming that
    /// key.
    #[test]
    fn a_bad_value_is_named_by_its_key(key in 0usize..KEYS.len(), value in prop_oneof!["\\PC{0,30}", "[0-9]{1,25}[a-z]{0,3}", "[a-z:/.0-9-]{0,30}"]) {
        let (path, line) = KEYS[key];
        // A JSON string is a YAML string: the value arrives exactly as generated.
        let quoted = serde_json::to_string(&value).unwrap();
        let text = VALID.replace(&format!("{line}PLACEHOLDER"), &format!("{line}{quoted}"));
        let text = KEYS.iter().fold(text, |t, (_, l)| t.replace(&format!("{l}PLACEHOLDER"), &format!("{l}{}", default_of(l))));
        match config::parse(&text, Checks::Static) {
            Ok(_) => {}
            Err(problems) => {
                // The key path is the problem's path, leads its message (a parse error), or is
                // named in it (a rule between two keys, reported at the other).
                prop_assert!(
                    problems.iter().any(|p| p.path == path || p.to_string().contains(path)),
                    "{path} = {quoted}: {problems:?}"
                );
            }
        }
    }
}

/// The configuration the last property starts from; each `PLACEHOLDER` takes a good value, or
/// the generated one for the key under test.
const VALID: &str = "
magento:
  base_url: PLACEHOLDER
  timeout: PLACEHOLDER
refresh:
  before_expiry: PLACEHOLDER
  jitter: PLACEHOLDER
  min_backoff: PLACEHOLDER
output:
  dir: /tmp
  mode: PLACEHOLDER
admin:
  listen: PLACEHOLDER
customers:
  - name: PLACEHOLDER
    username: alice@example.com
    password_env: ALICE_PASSWORD
    store_code: PLACEHOLDER
";

/// (key path, its line in VALID up to the value).
const KEYS: [(&str, &str); 9] = [
    ("magento.base_url", "  base_url: "),
    ("magento.timeout", "  timeout: "),
    ("refresh.before_expiry", "  before_expiry: "),
    ("refresh.jitter", "  jitter: "),
    ("refresh.min_backoff", "  min_backoff: "),
    ("output.mode", "  mode: "),
    ("admin.listen", "  listen: "),
    ("customers[0].name", "  - name: "),
    ("customers[0].store_code", "    store_code: "),
];

fn default_of(line: &str) -> &'static str {
    match line.trim() {
        "base_url:" => "https://shop.example.com",
        "timeout:" => "10s",
        "before_expiry:" => "15m",
        "jitter:" => "1m",
        "min_backoff:" => "1s",
        "mode:" => "\"0600\"",
        "listen:" => "127.0.0.1:9102",
        "- name:" => "alice",
        "store_code:" => "default",
        other => panic!("no default for {other}"),
    }
}

#[test]
fn the_valid_configuration_is_valid() {
    let text = KEYS
        .iter()
        .fold(VALID.to_owned(), |t, (_, l)| t.replace(&format!("{l}PLACEHOLDER"), &format!("{l}{}", default_of(l))));
    assert!(!text.contains("PLACEHOLDER"));
    config::parse(&text, Checks::Static).unwrap();
}
