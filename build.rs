//! Links the shipped binary with the functions a sidecar runs placed first, side by side.
//!
//! The kernel maps an executable's pages into a process 64 KiB at a time around each one it
//! touches, so the few hundred kilobytes of code a sidecar runs, scattered over a 5 MiB text,
//! kept most of the text resident. `link/hot-functions.txt` lists those functions (made by
//! `scripts/hot-functions`), and the linker puts them at the start of the text, where they share
//! pages (benches/RESULTS.md, "Hot functions first"). A name the build does not have is skipped:
//! a stale list costs memory, never correctness.
//!
//! Only where rustc links with its own lld (x86_64 Linux from Rust 1.90), for release builds,
//! and unless the build names a linker of its own: another linker may not know the option.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const BIN: &str = "magento-token-sidecar";

fn main() {
    let list = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("link/hot-functions.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=SIDECAR_LINK_MAP");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    if !links_with_rust_lld() || env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    if list.exists() {
        println!("cargo:rustc-link-arg-bin={BIN}=-Wl,--symbol-ordering-file={}", list.display());
        println!("cargo:rustc-link-arg-bin={BIN}=-Wl,--no-warn-symbol-ordering");
    }
    // scripts/hot-functions asks for the linker's map, to find the functions a run executed in
    // the very binary it profiled.
    if let Some(map) = env::var_os("SIDECAR_LINK_MAP") {
        println!("cargo:rustc-link-arg-bin={BIN}=-Wl,-Map={}", PathBuf::from(map).display());
    }
}

/// Whether the final link is rustc's default for x86_64 Linux: `cc` with rustc's own lld.
fn links_with_rust_lld() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return false;
    }
    if env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if ["linker", "link-self-contained", "fuse-ld"].iter().any(|f| flags.contains(f)) {
        return false;
    }
    rustc_minor().is_some_and(|minor| minor >= 90)
}

/// The `N` of `rustc 1.N.x`.
fn rustc_minor() -> Option<u32> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let version = String::from_utf8(out.stdout).ok()?;
    version.split_whitespace().nth(1)?.split('.').nth(1)?.parse().ok()
}
