//! `link/hot-functions.txt` (made by `scripts/hot-functions`) names the functions the linker
//! places first: names that carry hashes of the compiler and of the dependencies' versions. Made
//! for others, it matches nothing and the shipped binary silently keeps most of its text
//! resident again (benches/RESULTS.md, "Hot functions first"). These tests say when to run the
//! script again.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The value of the header line `# <key>: <value>`.
fn header(key: &str) -> String {
    let list = std::fs::read_to_string(Path::new(ROOT).join("link/hot-functions.txt")).unwrap();
    let prefix = format!("# {key}: ");
    list.lines()
        .take_while(|l| l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("link/hot-functions.txt has no `{prefix}` line"))
        .to_owned()
}

#[test]
fn the_hot_functions_were_listed_for_these_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "--offline", "-e", "normal,build", "--no-default-features"])
        .args(["-p", "magento-token-sidecar", "--prefix", "none"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    // The same digest as the script's: each crate and version once, without paths or marks.
    let mut crates: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().split(" (").next().unwrap().to_owned())
        .collect();
    crates.sort();
    crates.dedup();
    let digest: String = Sha256::digest(crates.join("\n")).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        header("dependencies"),
        format!("sha256:{digest}"),
        "the shipped build's crates changed since link/hot-functions.txt was made: run scripts/hot-functions"
    );
}

#[test]
fn the_hot_functions_were_listed_with_the_image_toolchain() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let image = dockerfile.lines().find_map(|l| l.strip_prefix("ARG RUST_VERSION=")).expect("the Dockerfile pins it");
    let listed = header("toolchain");
    assert!(
        listed.starts_with(&format!("rustc {image} ")),
        "link/hot-functions.txt was made with {listed}, the image builds with {image}: run scripts/hot-functions with that toolchain (or change the Dockerfile)"
    );
}
