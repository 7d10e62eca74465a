//! The daemon's child processes: the commands `notify.exec` starts, and every orphan the kernel
//! hands the daemon.
//!
//! What a command leaves running (`(sleep 1 &)`, a program that forks into the background, a
//! grandchild that called `setsid`) outlives it, and once its parent is gone it is re-parented
//! to the nearest reaper above it: PID 1 in a container whose entrypoint is this binary, or
//! the daemon itself anywhere else, because [`adopt`] makes it a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`) when `run` starts. Either way every process notify started, and
//! everything those started, stays the daemon's descendant, so the daemon owes each two
//! things: to wait for it when it ends (else it stays a zombie, a slot of the pid table, for
//! as long as the daemon runs), and to kill it at stop (else it outlives the daemon).
//!
//! **Reaping without stealing a command's status.** tokio waits for the commands it started
//! by their pid. A blanket `waitpid(-1)` would now and then take a command's exit status
//! first, and tokio would report "no child processes" for a command that succeeded. So the
//! reaper waits only for children that are not commands: every command starts through
//! [`spawn`], which registers its pid under the lock the reaper holds while it looks, so even a
//! command that ends at once is never taken for an orphan; the pid leaves the register when its
//! [`Registered`] guard drops, once tokio has waited for it (an orphan that reuses that pid
//! meanwhile waits for the next sweep). The reaper wakes on SIGCHLD and every [`SWEEP`]
//! (signals coalesce), asks `waitid(P_ALL, WNOWAIT)` whether any child has ended at all (one
//! system call, and nothing consumed), and only then reads its children's states in `/proc`
//! and waits, by pid, for each ended one that is not a command.
//!
//! **Stopping.** [`finish`] runs when `run` is over and the runtime is gone (every task dropped:
//! a command still running was killed with its process group, and nothing waits for any child
//! any more). It closes [`spawn`], then kills (SIGKILL) every live descendant of the daemon and
//! reaps them, round after round until none is left: a process whose parent was killed in one
//! round comes back to the daemon for the next, even one that left its command's process group
//! and session with `setsid`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, WaitOptions};
use tracing::{info, warn};

/// The longest the reaper sleeps without a SIGCHLD: signals coalesce, and one that came while
/// a command's pid was still registered is not repeated.
pub const SWEEP: Duration = Duration::from_secs(5);

/// [`finish`]'s rounds of killing, [`FINISH_PAUSE`] apart: a process forking as fast as it
/// can still loses within a few.
const FINISH_ROUNDS: usize = 200;
const FINISH_PAUSE: Duration = Duration::from_millis(10);

/// The commands tokio waits for, and whether the daemon reaps at all.
struct Register {
    /// Pids of the commands started through [`spawn`] and not yet waited for.
    commands: Vec<i32>,
    /// [`adopt`] ran: the daemon is a reaper, [`finish`] has work to do.
    adopted: bool,
    /// [`finish`] ran: no command may start.
    closed: bool,
}

/// One register per process: children, SIGCHLD and the reaper role all are the process's.
static REGISTER: Mutex<Register> = Mutex::new(Register { commands: Vec::new(), adopted: false, closed: false });

fn register() -> MutexGuard<'static, Register> {
    REGISTER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the daemon the reaper of its descendants (PID 1 already is one) and starts reaping
/// them, in a task of the current runtime. Call once, when `run` starts.
pub fn adopt() {
    if rustix::process::getpid().is_init() {
        info!("running as PID 1: every orphan of the container is reaped here");
    } else if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        warn!(error = %e, "cannot become the reaper of what notify commands leave running (prctl PR_SET_CHILD_SUBREAPER): they may outlive the daemon");
    }
    register().adopted = true;
    tokio::spawn(reap_forever());
}

async fn reap_forever() {
    let mut sigchld = match signal_hook_tokio::Signals::new([signal_hook::consts::SIGCHLD]) {
        Ok(signals) => Some(signals),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGCHLD: ended orphans are reaped every {}", humantime::format_duration(SWEEP));
            None
        }
    };
    loop {
        match &mut sigchld {
            Some(signals) => {
                let _ = tokio::time::timeout(SWEEP, signals.next()).await;
            }
            None => tokio::time::sleep(SWEEP).await,
        }
        reap_orphans(Path::new("/proc"));
    }
}

/// Waits for every ended child that is not a command; how many.
fn reap_orphans(proc: &Path) -> usize {
    let register = register();
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    if !matches!(rustix::process::waitid(WaitId::All, options), Ok(Some(_))) {
        return 0;
    }
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let mut reaped = 0;
    for (pid, process) in processes(proc) {
        if process.parent != me || process.state != 'Z' || register.commands.contains(&pid) {
            continue;
        }
        if let Some(p) = Pid::from_raw(pid) {
            if matches!(rustix::process::waitpid(Some(p), WaitOptions::NOHANG), Ok(Some(_))) {
                reaped += 1;
            }
        }
    }
    reaped
}

/// A command started through [`spawn`]: the reaper leaves its pid to tokio until this drops.
/// Drop it after the command was waited for.
#[must_use]
pub struct Registered(i32);

impl Drop for Registered {
    fn drop(&mut self) {
        register().commands.retain(|pid| *pid != self.0);
    }
}

/// Starts `command`, its pid registered before the reaper can look (see the module doc).
/// Refused once the daemon is stopping.
pub fn spawn(command: &mut tokio::process::Command) -> std::io::Result<(tokio::process::Child, Registered)> {
    let mut register = register();
    if register.closed {
        return Err(std::io::Error::other("the daemon is stopping"));
    }
    let child = command.spawn()?;
    let pid = child.id().map_or(0, |id| id as i32);
    register.commands.push(pid);
    Ok((child, Registered(pid)))
}

/// Kills (SIGKILL) every live descendant of `root`, not `root` itself: what a command started,
/// in its process group or not, while the command still holds them as its descendants.
pub fn kill_descendants(root: u32) {
    let table = processes(Path::new("/proc"));
    for pid in descendants(&table, root as i32) {
        if let Some(p) = Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
    }
}

/// At the end of `run`, once the runtime is gone: no command starts any more, every live
/// descendant of the daemon is killed and every child reaped (see the module doc).
pub fn finish() {
    let mut register = register();
    register.closed = true;
    if !register.adopted {
        return;
    }
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let mut killed = HashSet::new();
    for _ in 0..FINISH_ROUNDS {
        // Nothing else waits for a child now: every ended one is reaped.
        while let Ok(Some(_)) = rustix::process::waitpid(None, WaitOptions::NOHANG) {}
        let alive = descendants(&processes(Path::new("/proc")), me);
        if alive.is_empty() {
            break;
        }
        for pid in alive {
            if let Some(p) = Pid::from_raw(pid) {
                if rustix::process::kill_process(p, Signal::KILL).is_ok() {
                    killed.insert(pid);
                }
            }
        }
        std::thread::sleep(FINISH_PAUSE);
    }
    while let Ok(Some(_)) = rustix::process::waitpid(None, WaitOptions::NOHANG) {}
    if !killed.is_empty() {
        info!(processes = killed.len(), "killed what notify commands had left running");
    }
}

/// One process of `/proc`, as far as the reaper cares.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Process {
    parent: i32,
    /// `R`, `S`, `Z` (ended, not yet waited for)...
    state: char,
}

/// Every process under `proc` (`/proc`), by pid.
fn processes(proc: &Path) -> HashMap<i32, Process> {
    let Ok(entries) = std::fs::read_dir(proc) else { return HashMap::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let mut stat = String::new();
            std::fs::File::open(entry.path().join("stat")).ok()?.take(4096).read_to_string(&mut stat).ok()?;
            Some((pid, parse_stat(&stat)?))
        })
        .collect()
}

/// State and parent from a `stat` line, read after the command name (which may hold anything).
fn parse_stat(stat: &str) -> Option<Process> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some(Process { parent, state })
}

/// The live (not ended) descendants of `root` in `table`, `root` itself aside.
fn descendants(table: &HashMap<i32, Process>, root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, p) in table {
        children.entry(p.parent).or_default().push(*pid);
    }
    let mut found = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut next = vec![root];
    while let Some(parent) = next.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            if seen.insert(*child) {
                next.push(*child);
                if table[child].state != 'Z' {
                    found.push(*child);
                }
            }
        }
    }
    found.sort_unstable();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_read_after_the_command_name() {
        let p = parse_stat("42 (a) Z 7 (x) S 1) R 9 42 42 0 -1 4194560").unwrap();
        assert_eq!(p, Process { parent: 9, state: 'R' });
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_are_found_through_every_generation_and_zombies_left_out() {
        let p = |parent, state| Process { parent, state };
        let table = HashMap::from([
            (1, p(0, 'S')),
            (10, p(1, 'S')),  // the daemon
            (11, p(10, 'S')), // a command
            (12, p(11, 'S')), // its child
            (13, p(12, 'S')), // a grandchild (setsid changes no parent)
            (14, p(10, 'Z')), // an ended orphan, not yet reaped
            (15, p(10, 'R')), // an orphan re-parented to the daemon
            (20, p(1, 'S')),  // not the daemon's
            (21, p(20, 'S')),
        ]);
        assert_eq!(descendants(&table, 10), [11, 12, 13, 15]);
        assert_eq!(descendants(&table, 11), [12, 13]);
        assert_eq!(descendants(&table, 13), Vec::<i32>::new());
        // A loop in a table read while processes come and go ends.
        let looped = HashMap::from([(5, p(6, 'S')), (6, p(5, 'S'))]);
        assert_eq!(descendants(&looped, 5), [6]);
    }
}
