//! `output`: a directory whose files this process can write with the configured mode and owner,
//! or a Secret (`output.kubernetes`, checked in [`super::kubernetes`]).

use std::path::Path;
use std::time::Duration;

use super::raw::RawOutput;
use super::{kubernetes, Checks, CustomerConfig, Output, OutputDir, Problem, Validator};
use crate::fs::{Owner, Perms};
use crate::sink;

/// `output`: the directory (writable, with `Checks::Environment`), a mode no one else can write,
/// and an owner this process may give files to; or the Secret. `None` once a problem is said.
pub(super) fn check_output(v: &mut Validator, o: &RawOutput, checks: Checks) -> Option<Output> {
    let dir = match (&o.dir, &o.kubernetes) {
        (Some(dir), None) => dir,
        (None, Some(k)) => return check_kubernetes_output(v, o, k).map(Output::Kubernetes),
        (Some(_), Some(_)) => {
            v.problem("output.kubernetes", "give exactly one of output.dir and output.kubernetes, not both".into());
            return None;
        }
        (None, None) => {
            v.problem("output.dir", "one of output.dir and output.kubernetes is required".into());
            return None;
        }
    };
    let before = v.problems.len();
    if dir.as_os_str().is_empty() {
        v.problem("output.dir", "must not be empty".into());
    } else if checks == Checks::Environment {
        v.writable_dir("output.dir", dir);
    }
    let dir_ok = v.problems.len() == before;

    let mode = o.mode.0;
    if mode & 0o444 == 0 {
        v.problem(
            "output.mode",
            format!(
                "\"{mode:04o}\" lets no one read the token files, the app included; use \"0600\" (or \"0640\" for readers in the file's group)"
            ),
        );
    }
    if mode & 0o022 != 0 {
        v.problem(
            "output.mode",
            format!(
                "\"{mode:04o}\" makes every token file writable by its group or by others, who could replace the token the app sends; use \"0600\" (or \"0640\" for readers in the file's group)"
            ),
        );
    }

    for (key, id) in [("output.uid", o.uid), ("output.gid", o.gid)] {
        if id == Some(u32::MAX) {
            v.problem(key, format!("{}: not an id (chown reads it as \"leave unchanged\")", u32::MAX));
        }
    }
    let owner = owner_of(o);
    if checks == Checks::Environment && owner.is_set() && v.problems.len() == before {
        let refused = ownership_problems(owner, &Credentials::current());
        let none = refused.is_empty();
        v.problems.extend(refused);
        // The credentials allow it: a file given that owner for real, as every write does it
        // (a user namespace or a file system may still refuse).
        if none && dir_ok {
            if let Err(e) = probe_owner(dir, Perms { mode, owner }) {
                let (key, id) = match owner.uid {
                    Some(uid) => ("output.uid", uid),
                    None => ("output.gid", owner.gid.unwrap_or_default()),
                };
                v.problem(key, format!("{id}: a test file in {} could not be given to {owner}: {e}", dir.display()));
            }
        }
    }
    let index = o.index.as_ref().map(|name| dir.join(name));
    Some(Output::Files(OutputDir { dir: dir.clone(), mode, owner, index }))
}

/// `output.kubernetes`: a Secret has no owner, no file mode and no room for an index file:
/// the app's volume decides the files' mode and owner.
pub(super) fn check_kubernetes_output(
    v: &mut Validator,
    o: &RawOutput,
    k: &kubernetes::RawKubernetes,
) -> Option<kubernetes::KubeSettings> {
    for (key, set) in [("output.uid", o.uid.is_some()), ("output.gid", o.gid.is_some())] {
        if set {
            v.problem(key, "does not apply to output.kubernetes: the app's secret volume sets the files' owner (fsGroup) and mode (defaultMode)".into());
        }
    }
    if o.index.is_some() {
        v.problem("output.index", "is not written with output.kubernetes: each customer's token is a key of the Secret, and the mounted Secret is the directory".into());
    }
    if !cfg!(feature = "kubernetes") {
        v.problem("output.kubernetes", NO_KUBERNETES.into());
    }
    kubernetes::check(k, &mut v.problems)
}

/// `output.kubernetes.token_api` where it cannot work, and `token_api` where it is no key: the
/// token API is served by the admin server (none with `admin.listen: ""`) of central mode (with
/// `output.dir` the app reads the token file beside it).
pub(super) fn check_token_api(v: &mut Validator, o: &RawOutput, admin_listen: Option<std::net::SocketAddr>) {
    if o.token_api.is_some() {
        let why = match o.kubernetes {
            Some(_) => "is a key of output.kubernetes: write it as output.kubernetes.token_api",
            None => "the token API answers tokens from the Secret of output.kubernetes (central mode), as output.kubernetes.token_api; with output.dir the app reads its token file, or asks POST /refresh/<name> after a 401",
        };
        v.problem("output.token_api", why.into());
    }
    if o.kubernetes.as_ref().is_some_and(|k| k.token_api()) && admin_listen.is_none() {
        v.problem(
            "output.kubernetes.token_api",
            "the token API is served on admin.listen, which is \"\" (no admin server): give admin.listen an address the apps reach (the chart binds the pod's)".into(),
        );
    }
}

/// Why a build without the `kubernetes` feature refuses `output.kubernetes`, which it still
/// parses and checks like any other key: every command reports it as a bad configuration.
pub const NO_KUBERNETES: &str =
    "this build has no Kubernetes support (the sidecar image); use the central image, or build with --features kubernetes";

/// Every customer's content, with a token of the size `check` assumes, in one Secret.
pub(super) fn check_secret_size(v: &mut Validator, k: &kubernetes::KubeSettings, customers: &[CustomerConfig]) {
    let token = crate::secret::Secret::new("x".repeat(kubernetes::ASSUMED_TOKEN_BYTES));
    let when = std::time::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    // Each Secret holds its own customers' tokens.
    let mut by_secret: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
    for c in customers {
        let size = crate::format::render(c.format, &c.name, &token, when, when).len();
        by_secret.entry(c.secret.as_deref().unwrap_or(&k.secret)).or_default().push(size);
    }
    for (secret, sizes) in by_secret {
        if let Err(why) = kubernetes::check_size(&sizes, secret) {
            v.problem("customers", why);
        }
    }
}

fn owner_of(o: &RawOutput) -> Owner {
    Owner { uid: o.uid, gid: o.gid }
}

/// What this process may do about the owner of the files it creates.
#[derive(Debug, Clone)]
pub(super) struct Credentials {
    /// Effective user and group, and the supplementary groups.
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: Vec<u32>,
    /// Effective capabilities CAP_CHOWN and CAP_FOWNER.
    pub(super) chown: bool,
    pub(super) fowner: bool,
}

impl Credentials {
    pub(super) fn current() -> Credentials {
        use rustix::thread::CapabilitySet;
        let uid = rustix::process::geteuid().as_raw();
        // Unknown capabilities (no capget): root is taken to have them, and the probe decides.
        let caps = rustix::thread::capabilities(None).map(|c| c.effective).ok();
        let has = |cap: CapabilitySet| caps.map_or(uid == 0, |c| c.contains(cap));
        Credentials {
            uid,
            gid: rustix::process::getegid().as_raw(),
            groups: rustix::process::getgroups().unwrap_or_default().iter().map(|g| g.as_raw()).collect(),
            chown: has(CapabilitySet::CHOWN),
            fowner: has(CapabilitySet::FOWNER),
        }
    }
}

/// Whether a process with `c` may create files owned by `owner`, by the kernel's rules: a file
/// goes to another user only with CAP_CHOWN (root has it; being root without it is not
/// enough), and its mode is then set (after the owner, so no one else can open it in between)
/// only with CAP_FOWNER; its own file goes to a group without privilege only if the process is
/// a member of that group (its group, or a supplementary one: in Kubernetes the pod's
/// `fsGroup` and `supplementalGroups`), else with CAP_CHOWN.
pub(super) fn ownership_problems(owner: Owner, c: &Credentials) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut refuse = |path: &str, message: String| problems.push(Problem { path: path.into(), message });
    if let Some(uid) = owner.uid.filter(|uid| *uid != c.uid) {
        if !c.chown {
            refuse(
                "output.uid",
                format!(
                    "{uid}: this process (uid {}) may not give files away; run as root or with CAP_CHOWN and CAP_FOWNER, or drop output.uid",
                    c.uid
                ),
            );
        } else if !c.fowner {
            refuse(
                "output.uid",
                format!(
                    "{uid}: this process (uid {}) has CAP_CHOWN but not CAP_FOWNER, which it needs to set the mode of a file it gave away; add CAP_FOWNER, or drop output.uid",
                    c.uid
                ),
            );
        }
    }
    if let Some(gid) = owner.gid.filter(|gid| *gid != c.gid && !c.groups.contains(gid)) {
        if !c.chown {
            refuse(
                "output.gid",
                format!(
                    "{gid}: this process (uid {}) is not a member of group {gid} and may not give files to it; run it in that group (in Kubernetes: the pod's fsGroup or supplementalGroups), as root or with CAP_CHOWN, or drop output.gid",
                    c.uid
                ),
            );
        }
    }
    problems
}

/// Writes a test file in `dir` with `perms`, as every token file is written, and removes it.
fn probe_owner(dir: &Path, perms: Perms) -> std::io::Result<()> {
    let path = dir.join(format!(".magento-token-sidecar.check-{:08x}", rand::random::<u32>()));
    sink::write_atomic(&path, perms, b"", sink::Durability::FileOnly)?;
    // (It was given the owner: that was the question. A directory that lets a file be made but
    // not removed is no reason to refuse the owner.)
    let _ = std::fs::remove_file(&path);
    Ok(())
}
