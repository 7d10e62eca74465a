//! What an answer from Magento (or a proxy, CDN or load balancer in front of it) can do to the
//! daemon through its error messages: blow up its memory (placeholders filled without bound),
//! reflect the password in some encoding or in part, or forge log lines and drive terminals with
//! control characters. Each test runs the real binary against the dev server and judges what an
//! operator sees: peak memory, the logs, `/status`, `/metrics` and `once`'s stderr.

use std::time::Duration;

use crate::common::*;
use magento_devserver::{DevServerOptions, Fault};
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

/// A password with the characters that JSON, URLs and HTML each escape differently.
const SEKRET: (&str, &str, &str) = ("sekret", "sekret-user@example.com", r#"Sekr3t"Q\uote-PW9"#);

/// The harness's configuration at log level `trace`, with `refresh` lines added.
fn trace_config(w: &World, customers: &[(&str, &str)], refresh: &str) -> String {
    w.config_text(customers, refresh, "").replace("level: debug", "level: trace")
}

fn json_escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap();
    quoted[1..quoted.len() - 1].to_owned()
}

fn percent_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every piece of the password an operator must never see: each run of 4 characters of the
/// password as it is, JSON-escaped (once, as in `/status` or a JSON log line, and twice, as a
/// reflected JSON body inside a JSON log line) and percent-encoded; pieces with no letter or
/// digit (`\\\"`) are left out, as they occur in innocent text.
fn pieces(password: &str) -> Vec<String> {
    let once = json_escaped(password);
    let mut all = Vec::new();
    for form in [password.to_owned(), once.clone(), json_escaped(&once), percent_encoded(password)] {
        let chars: Vec<char> = form.chars().collect();
        for w in chars.windows(4) {
            let piece: String = w.iter().collect();
            if piece.chars().any(|c| c.is_ascii_alphanumeric()) && !all.contains(&piece) {
                all.push(piece);
            }
        }
    }
    all
}

/// The `error` field of every JSON log line that has one.
fn logged_errors(d: &Daemon) -> Vec<String> {
    d.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["error"].as_str().map(str::to_owned))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Placeholders filled without bound

/// Error answers whose placeholders would expand to hundreds of megabytes: one `%a` repeated
/// 16,000 times with a 30,000-byte value (62 KB on the wire, 480 MB filled), the same with `%1`
/// and a list, and chained placeholders (a value holding another `%b`: 200 MB filled). The
/// daemon stays small (it reached 475 MiB before), keeps retrying, shows the first 500
/// characters, and logs in once the store recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholder_bombs_keep_the_daemon_small_and_retrying() {
    let w = World::with_customers(&[ALICE]).await;
    let wide = json!({ "message": "%a".repeat(16_000), "parameters": { "a": "x".repeat(30_000) } });
    let chained =
        json!({ "message": "%a".repeat(1_000), "parameters": { "a": "%b".repeat(100), "b": "y".repeat(2_000) } });
    let listed = json!({ "message": "%1".repeat(16_000), "parameters": ["z".repeat(30_000)] });
    for body in [&wide, &chained, &listed] {
        assert!(serde_json::to_vec(body).unwrap().len() < 64 * 1024, "the answer fits the body cap");
    }
    const ROUNDS: usize = 3;
    for _ in 0..ROUNDS {
        for body in [&wide, &chained, &listed] {
            w.server.push_fault(Fault::json(500, body.clone()));
        }
    }
    w.write_config(&trace_config(&w, &[(ALICE.0, ALICE.1)], ""));
    let mut d = w.start();
    let errors = 3.0 * ROUNDS as f64;
    d.wait_metric(&refreshes("alice", "http_error"), errors, 20 * SEC).await;
    w.wait_token("alice", None, 20 * SEC).await;
    d.wait_metric(&refreshes("alice", "success"), 1.0, 10 * SEC).await;
    let peak = d.peak_rss_kib().expect("the daemon's VmHWM");
    eprintln!("placeholder bombs: peak RSS {peak} KiB ({:.1} MiB)", peak as f64 / 1024.0);
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon is still running");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB, above 64 MiB");
    let errors = logged_errors(&d);
    let shown: Vec<&String> = errors.iter().filter(|e| e.starts_with("HTTP 500")).collect();
    assert_eq!(shown.len(), 3 * ROUNDS, "{errors:?}");
    for e in &shown {
        assert!(e.len() < 2_000, "a message of {} bytes", e.len());
    }
    // Each shows its start; the chained one its value as it came, never filled again.
    for start in [
        "HTTP 500 Internal Server Error: xxxxxxxx",
        "HTTP 500 Internal Server Error: %b%b%b%b",
        "HTTP 500 Internal Server Error: zzzzzzzz",
    ] {
        assert_eq!(shown.iter().filter(|e| e.starts_with(start)).count(), ROUNDS, "{start:?} in {shown:?}");
    }
    assert!(!shown.iter().any(|e| e.contains('y')), "a chained placeholder was filled");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 2. The password reflected in another encoding, or in part

/// A store or proxy that repeats the request in its message, in the ways servers do: the JSON
/// body as text (so the password JSON-escaped), with `\u` escapes, through a `%1` placeholder,
/// as HTML entities, percent-encoded, and base64. None of it is shown anywhere; the operator
/// still sees the status code and that the message was held back, and the login succeeds once
/// the store stops failing. The same through `once`'s stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflected_password_is_never_shown_in_any_encoding() {
    use base64::Engine as _;
    let w = World::new(DevServerOptions::default()).await;
    w.server.add_customer(SEKRET.1, SEKRET.2);
    w.set_password(SEKRET.0, SEKRET.2);
    let body = serde_json::to_string(&json!({ "username": SEKRET.1, "password": SEKRET.2 })).unwrap();
    let unicode: String = SEKRET
        .2
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\u{:04x}", c as u32) })
        .collect();
    let html = SEKRET.2.replace('"', "&quot;").replace('\\', "&#92;");
    let base64 = base64::engine::general_purpose::STANDARD.encode(body.as_bytes());
    let hex: String = SEKRET.2.bytes().map(|b| format!("{b:02X}")).collect();
    let reversed: String = SEKRET.2.chars().rev().collect();
    let faults = [
        Fault::json(400, json!({ "message": format!("Cannot process the request body {body}") })),
        Fault::json(500, json!({ "message": format!("Decoding failed near \"password\":\"{unicode}\"") })),
        Fault::json(400, json!({ "message": "Invalid login request: %1", "parameters": [body] })),
        Fault::json(503, json!({ "message": format!("<p>Rejected form field password={html}</p>") })),
        Fault::json(
            502,
            json!({ "message": format!("upstream refused /login?password={}", percent_encoded(SEKRET.2)) }),
        ),
        Fault::json(500, json!({ "message": format!("request body (base64): {base64}") })),
        Fault::json(400, json!({ "message": format!("bad password bytes: {hex}") })),
        Fault::json(400, json!({ "message": format!("password reversed: {reversed}") })),
    ];
    let statuses = ["HTTP 400 Bad Request", "HTTP 500 Internal Server Error", "HTTP 503", "HTTP 502"];
    for fault in &faults {
        w.server.push_fault(fault.clone());
    }
    w.write_config(&trace_config(&w, &[(SEKRET.0, SEKRET.1)], ""));
    let mut d = w.start();
    d.wait_metric(&refreshes("sekret", "http_error"), faults.len() as f64, 20 * SEC).await;
    let token = w.wait_token("sekret", None, 20 * SEC).await;
    d.wait_metric(&refreshes("sekret", "success"), 1.0, 10 * SEC).await;
    let errors = logged_errors(&d);
    for status in statuses {
        assert!(errors.iter().any(|e| e.starts_with(status)), "no {status:?} in {errors:?}");
    }
    let held_back = errors.iter().filter(|e| e.contains("is not shown: it repeats part of the request")).count();
    assert_eq!(held_back, faults.len(), "every reflecting message is held back: {errors:?}");
    let mut hidden = pieces(SEKRET.2);
    hidden.push(base64);
    hidden.push(token);
    hidden.extend([hex.clone(), hex.to_lowercase(), reversed.clone()]);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));

    // once prints its failures on stderr. One attempt: a backoff (10 s) longer than once's
    // deadline (5 s) ends the pass at the first failure, however long the machine takes to
    // send it (a 50 ms deadline reported a timeout instead when the request took longer).
    std::fs::remove_file(w.token_path("sekret")).unwrap();
    w.server.push_fault(faults[0].clone());
    let (code, out, err) = w.once_with_one_try().await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HTTP 400 Bad Request") && err.contains("is not shown"), "{err}");
    assert_hidden("once's output", &format!("{out}{err}"), &pieces(SEKRET.2));
}

/// A message long enough to be cut at 500 characters, the cut falling inside the reflected
/// password: after 492 characters of padding (8 characters of the password would remain, so the
/// message is held back) and after 497 (3 would remain: they are cut off, the rest is shown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cut_inside_the_password_shows_none_of_it() {
    let w = World::new(DevServerOptions::default()).await;
    w.server.add_customer(SEKRET.1, SEKRET.2);
    w.set_password(SEKRET.0, SEKRET.2);
    for padding in [492, 497] {
        let message = format!("{}{} was refused", "x".repeat(padding), SEKRET.2);
        w.server.push_fault(Fault::json(500, json!({ "message": message })));
    }
    w.write_config(&trace_config(&w, &[(SEKRET.0, SEKRET.1)], ""));
    let mut d = w.start();
    d.wait_metric(&refreshes("sekret", "http_error"), 2.0, 20 * SEC).await;
    let token = w.wait_token("sekret", None, 20 * SEC).await;
    d.wait_metric(&refreshes("sekret", "success"), 1.0, 10 * SEC).await;
    let errors: Vec<String> = logged_errors(&d).into_iter().filter(|e| e.starts_with("HTTP 500")).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("is not shown: it repeats part of the request"), "{}", errors[0]);
    assert!(!errors[0].contains("xxxx"), "{}", errors[0]);
    let padding = "x".repeat(497);
    assert!(errors[1].contains(&padding), "the padding is shown: {}", errors[1]);
    let after = &errors[1][errors[1].find(&padding).unwrap() + padding.len()..];
    assert!(!after.contains('S'), "a piece of the password follows the padding: {after:?}");
    let mut hidden = pieces(SEKRET.2);
    hidden.push(format!("x{}", &SEKRET.2[..1]));
    hidden.push(token);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

/// A redirect whose Location carries the password percent-encoded (a single sign-on page that
/// wants it back): the log names where it points (scheme, host and port), never what it carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_carrying_the_password_shows_only_where_it_points() {
    let w = World::new(DevServerOptions::default()).await;
    w.server.add_customer(SEKRET.1, SEKRET.2);
    w.set_password(SEKRET.0, SEKRET.2);
    let encoded = percent_encoded(SEKRET.2);
    let in_query = format!("https://sso.example.net:8443/login?user=sekret&password={encoded}");
    let in_path = format!("https://sso.example.net/login/{encoded}/continue");
    w.server.push_fault(Fault::Redirect { status: 302, location: in_query });
    w.server.push_fault(Fault::Redirect { status: 307, location: in_path });
    w.write_config(&trace_config(&w, &[(SEKRET.0, SEKRET.1)], ""));
    let mut d = w.start();
    d.wait_metric(&refreshes("sekret", "http_error"), 2.0, 20 * SEC).await;
    let token = w.wait_token("sekret", None, 20 * SEC).await;
    d.wait_metric(&refreshes("sekret", "success"), 1.0, 10 * SEC).await;
    let errors = logged_errors(&d);
    for (status, origin) in
        [("302 Found", "https://sso.example.net:8443"), ("307 Temporary Redirect", "https://sso.example.net")]
    {
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("HTTP {status}: redirected to {origin}"))
                && e.contains("set base_url to the address that answers")),
            "no redirect to {origin} in {errors:?}"
        );
    }
    let mut hidden = pieces(SEKRET.2);
    hidden.push(encoded);
    hidden.push(token);
    d.assert_secrets_hidden(&hidden).await;
    assert_eq!(d.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// 10. Control characters

/// A message that would forge a log line (a newline, then a JSON log line), colour the
/// terminal (ESC), and carry a NUL and a right-to-left override.
fn forging_message() -> String {
    "Service down\n{\"level\":\"ERROR\",\"fields\":{\"message\":\"forged\"}}\x1b[31m red\0 nul \u{202e}desrever\r\ttab"
        .to_owned()
}

fn has_forbidden(text: &str) -> bool {
    text.chars().any(|c| {
        (c.is_control() && c != '\n')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    })
}

/// Text logs: no raw control character, no line that starts with the forged text, and the
/// operator still sees the status and the message (escaped). `/status` shows it escaped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_forge_text_log_lines() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.push_fault(Fault::json(500, json!({ "message": forging_message() })));
    w.server
        .push_fault(Fault::json(503, json!({ "message": "%1 and %2", "parameters": ["a\nb", "\u{1b}]0;title\u{7}"] })));
    let text = trace_config(&w, &[(ALICE.0, ALICE.1)], "").replace("format: json", "format: text");
    assert!(text.contains("format: text"));
    w.write_config(&text);
    let mut d = w.start();
    d.wait_metric(&refreshes("alice", "http_error"), 2.0, 20 * SEC).await;
    w.wait_token("alice", None, 20 * SEC).await;
    d.wait_metric(&refreshes("alice", "success"), 1.0, 10 * SEC).await;
    let logs = d.logs();
    assert!(!has_forbidden(&logs), "a raw control character in the text log:\n{logs:?}");
    for line in logs.lines() {
        assert!(!line.trim_start().starts_with("{\"level\""), "a forged line: {line:?}");
    }
    assert!(logs.contains("HTTP 500 Internal Server Error: Service down\\n{"), "{logs}");
    assert!(logs.contains("HTTP 503 Service Unavailable: a\\nb and"), "{logs}");
    let status = d.status_of("alice").await;
    assert!(!has_forbidden(&status.to_string()), "{status}");
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}

/// JSON logs: every line is one JSON object, and the message inside (what `jq -r` prints) holds
/// no control character; `/status` neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_escaped_in_json_logs_and_status() {
    let w = World::with_customers(&[ALICE]).await;
    w.server.push_fault(Fault::json(500, json!({ "message": forging_message() })));
    w.write_config(&trace_config(&w, &[(ALICE.0, ALICE.1)], ""));
    let mut d = w.start();
    d.wait_metric(&refreshes("alice", "http_error"), 1.0, 20 * SEC).await;
    let status = d.status_of("alice").await;
    let shown = status["last_error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(shown.starts_with("HTTP 500 Internal Server Error: Service down\\n{"), "{shown:?}");
    assert!(!has_forbidden(&shown) && !shown.contains('\n'), "{shown:?}");
    w.wait_token("alice", None, 20 * SEC).await;
    let logs = d.logs();
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    }
    for e in logged_errors(&d) {
        assert!(!has_forbidden(&e) && !e.contains('\n'), "{e:?}");
    }
    // The stop checks that no password and no token shows (the harness: common::Guard).
    assert_eq!(d.stop().await.code(), Some(0));
}
