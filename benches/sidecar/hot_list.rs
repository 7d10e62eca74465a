//! Whether `link/hot-functions.txt` (made by `scripts/hot-functions`) still fits this build. The
//! list names the functions the linker places first; names carry hashes of the compiler and of
//! the dependencies' versions, so a list made for others matches nothing and the shipped binary
//! silently keeps most of its text resident again (benches/RESULTS.md, "Hot functions first").
//! A stale list costs memory, not correctness: it is reported here, beside the memory it costs,
//! never as a failing test (a routine `cargo update` must not turn the suite red).

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What is stale about the list, as notes for the report (none: it fits).
pub fn staleness() -> Vec<String> {
    let list = match std::fs::read_to_string(Path::new(ROOT).join("link/hot-functions.txt")) {
        Ok(list) => list,
        Err(e) => {
            return vec![format!(
                "link/hot-functions.txt cannot be read ({e}): the release build links in the default order"
            )]
        }
    };
    let header = |key: &str| {
        let prefix = format!("# {key}: ");
        list.lines().take_while(|l| l.starts_with('#')).find_map(|l| l.strip_prefix(&prefix)).map(str::to_owned)
    };
    let mut notes = Vec::new();
    match (header("dependencies"), dependencies_digest()) {
        (Some(listed), Ok(now)) if listed == now => {}
        (_, Err(e)) => notes.push(format!("cannot tell whether link/hot-functions.txt fits the dependencies: {e}")),
        _ => notes.push(
            "link/hot-functions.txt was made for other dependencies than the shipped build's: run scripts/hot-functions (the figures above may carry more resident text than the shipped image)".into(),
        ),
    }
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap_or_default();
    let image = dockerfile.lines().find_map(|l| l.strip_prefix("ARG RUST_VERSION="));
    match (image, header("toolchain")) {
        (Some(image), Some(listed)) if listed.starts_with(&format!("rustc {image} ")) => {}
        (image, listed) => notes.push(format!(
            "link/hot-functions.txt was made with {}, the image builds with rustc {}: run scripts/hot-functions with the image's toolchain",
            listed.as_deref().unwrap_or("an unknown toolchain"),
            image.unwrap_or("(no ARG RUST_VERSION in the Dockerfile)")
        )),
    }
    notes
}

/// The digest the script records: each crate and version of the shipped build once, sorted,
/// without paths or marks.
fn dependencies_digest() -> Result<String, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "--offline", "-e", "normal,build", "--no-default-features"])
        .args(["-p", "magento-token-sidecar", "--prefix", "none"])
        .current_dir(ROOT)
        .output()
        .map_err(|e| format!("cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo tree: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let mut crates: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().split(" (").next().unwrap_or_default().to_owned())
        .collect();
    crates.sort();
    crates.dedup();
    let digest: String = Sha256::digest(crates.join("\n")).iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{digest}"))
}
