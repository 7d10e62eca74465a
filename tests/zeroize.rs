//! Passwords are wiped from memory after use: this test binary's allocator searches every block
//! it frees for a password, while the daemon's own code (the password source, the HTTP client)
//! logs in with it, through REST and through GraphQL, against a dev server running in another
//! process. A copy freed without being
//! wiped first is a copy a core dump, a swap file or a later read of reused memory could expose.
//!
//! Its own binary, because a global allocator applies to everything in a test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use magento_token_sidecar::config::{Endpoint, MagentoSettings, PasswordSource};
use magento_token_sidecar::magento::Client;

/// The password: long and unlikely, so no other data matches it by chance.
const CANARY: &[u8] = b"Zq9-canary-Pa55word-7Xw-4b1c";
const CANARY_LINE: &[u8] = b"Zq9-canary-Pa55word-7Xw-4b1c\n";

static ARMED: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);
static SCANNED: AtomicUsize = AtomicUsize::new(0);

struct Searching;

// SAFETY: every call is passed on to the system allocator unchanged; `dealloc` only reads the
// block it is handed (its owner is done with it) before passing it on.
unsafe impl GlobalAlloc for Searching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) && layout.size() >= CANARY.len() {
            SCANNED.fetch_add(layout.size(), Ordering::Relaxed);
            // Volatile byte reads: parts of the block may never have been written.
            let byte = |i: usize| unsafe { std::ptr::read_volatile(ptr.add(i)) };
            let found =
                (0..=layout.size() - CANARY.len()).any(|at| CANARY.iter().enumerate().all(|(j, c)| byte(at + j) == *c));
            if found {
                FOUND.fetch_add(1, Ordering::Relaxed);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
    // `realloc` keeps the default: allocate, copy, and `dealloc` the old block, searched above.
}

#[global_allocator]
static ALLOCATOR: Searching = Searching;

#[test]
fn passwords_are_wiped_after_use() {
    // The dev server in its own process: its copies of the password are not this test's concern.
    let bin = env!("CARGO_BIN_EXE_magento-token-sidecar");
    let mut server = {
        let mut command = Command::new(bin);
        command
            .args(["devserver", "--listen", "127.0.0.1:0", "--customer"])
            .arg(format!("alice@example.com:{}", std::str::from_utf8(CANARY).unwrap()))
            .arg("--customer")
            .arg("bob@example.com:another-password")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        command.spawn().unwrap()
    };
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let url = |path: &str| reqwest::Url::parse(&format!("{base}{path}")).unwrap();
    let endpoints = [
        Endpoint::Rest { token: url("/rest/V1/integration/customer/token"), me: url("/rest/V1/customers/me") },
        Endpoint::GraphQl { url: url("/graphql"), store: Some("default".into()) },
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, CANARY_LINE).unwrap();
    let source = PasswordSource::File(file);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    ARMED.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        let client = Client::new(&MagentoSettings { timeout: Duration::from_secs(5), ca_file: None }).unwrap();
        for endpoint in &endpoints {
            for _ in 0..3 {
                let password = source.read().unwrap();
                let token = client.login(endpoint, "alice@example.com", &password).await.unwrap();
                assert!(!token.expose().is_empty());
                // Refused: the error path handles the password too.
                let refused = client.login(endpoint, "bob@example.com", &password).await.unwrap_err();
                assert_eq!(refused.outcome.as_str(), "auth_failure");
            }
        }
        drop(client);
    });
    drop(runtime);
    ARMED.store(false, Ordering::SeqCst);

    let _ = server.kill();
    let _ = server.wait();
    let scanned = SCANNED.load(Ordering::SeqCst);
    assert!(scanned > 0, "nothing was freed while armed");
    let found = FOUND.load(Ordering::SeqCst);
    eprintln!(
        "zeroize: {scanned} bytes freed during 12 logins (REST and GraphQL) searched, {found} blocks still held the password"
    );
    assert_eq!(found, 0, "{found} freed blocks still held the password");
}
