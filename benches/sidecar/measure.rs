//! Measuring processes from the outside: CPU and peak RSS of a finished child (`wait4`),
//! CPU, context switches and RSS of a running one (`/proc`), a directory watch (inotify) for
//! the moment a token file appears, and one plain HTTP exchange.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a finished child cost, its own and that of every descendant it waited for.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub wall: Duration,
    pub user: Duration,
    pub sys: Duration,
    /// The largest RSS of the child or of any descendant it waited for (not their sum).
    pub max_rss_kib: u64,
    /// Context switches, voluntary and involuntary (`ru_nvcsw + ru_nivcsw`), of the child and
    /// of the descendants it waited for.
    pub switches: u64,
    /// The exit status, `None` when a signal ended it.
    pub code: Option<i32>,
}

impl Usage {
    pub fn cpu(&self) -> Duration {
        self.user + self.sys
    }
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
}

/// Runs `cmd` to its end, with stdin empty and stdout and stderr into `log`; a child still
/// running after `limit` is killed (its usage is still reported, with `code: None`).
///
/// The child is started by a launcher, this same executable in [`launcher`] mode, and not
/// by the benchmark itself: Linux carries the parent's peak RSS into a child's `ru_maxrss`
/// across `exec` (the memory the child had before it, shared with the parent, counts), so a
/// child of the benchmark could never measure below the benchmark's own peak. The launcher is
/// small, so its children start from a floor of a megabyte or two.
pub fn run(cmd: &Command, log: &std::fs::File, limit: Duration) -> io::Result<Usage> {
    let result = tempfile::NamedTempFile::new()?;
    let mut launch = Command::new(std::env::current_exe()?);
    launch
        .arg(LAUNCH)
        .arg(result.path())
        .arg(limit.as_millis().to_string())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => launch.env(key, v),
            None => launch.env_remove(key),
        };
    }
    let status = launch.status()?;
    if !status.success() {
        return Err(io::Error::other(format!("the launcher failed: {status}")));
    }
    let text = std::fs::read_to_string(result.path())?;
    let v: Vec<i64> = text.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    let [wall, user, sys, rss, switches, code] = v[..] else {
        return Err(io::Error::other(format!("the launcher wrote {text:?}")));
    };
    let ns = |n: i64| Duration::from_nanos(n as u64);
    Ok(Usage {
        wall: ns(wall),
        user: ns(user),
        sys: ns(sys),
        max_rss_kib: rss as u64,
        switches: switches as u64,
        code: (code >= 0).then_some(code as i32),
    })
}

/// The first argument that makes this executable a launcher.
pub const LAUNCH: &str = "--launch";

/// Launcher mode: `--launch RESULT_FILE LIMIT_MS PROGRAM ARGS...` runs the program (stdio
/// inherited), then writes `wall_ns user_ns sys_ns max_rss_kib switches exit_code` into RESULT_FILE
/// (`-1` for a child ended by a signal).
pub fn launcher(args: &[String]) -> io::Result<()> {
    let [result, limit, program, rest @ ..] = args else {
        return Err(io::Error::other("usage: --launch RESULT_FILE LIMIT_MS PROGRAM ARGS..."));
    };
    let limit = Duration::from_millis(limit.parse().map_err(io::Error::other)?);
    let start = Instant::now();
    let child = Command::new(program).args(rest).spawn()?;
    let u = wait(child, start, limit)?;
    std::fs::write(
        result,
        format!(
            "{} {} {} {} {} {}",
            u.wall.as_nanos(),
            u.user.as_nanos(),
            u.sys.as_nanos(),
            u.max_rss_kib,
            u.switches,
            u.code.unwrap_or(-1)
        ),
    )
}

/// Waits for a child started at `start`, killing it after `limit`.
pub fn wait(child: Child, start: Instant, limit: Duration) -> io::Result<Usage> {
    let pid = child.id() as libc::pid_t;
    // A watchdog thread, so the wait itself is a plain blocking wait4 that returns the moment
    // the child ends (polling would blur the wall time).
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) with a pid we own and have not reaped yet: it cannot be reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let result = loop {
        // SAFETY: valid pointers to locals; pid is our unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    let wall = start.elapsed();
    let _ = done.send(());
    let _ = watchdog.join();
    // The pid is reaped: std must not wait for it again. Dropping a Child neither waits nor kills.
    drop(child);
    result?;
    let code = if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None };
    Ok(Usage {
        wall,
        user: timeval(usage.ru_utime),
        sys: timeval(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        switches: (usage.ru_nvcsw + usage.ru_nivcsw) as u64,
        code,
    })
}

/// Sends SIGTERM and waits (at most `grace`, then SIGKILL).
pub fn stop(child: Child, grace: Duration) -> io::Result<Usage> {
    // SAFETY: our unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    wait(child, Instant::now(), grace)
}

/// Kills a child that is no longer wanted; used on error paths so nothing is left running.
pub struct Guard(pub Option<Child>);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    pub fn take(&mut self) -> Child {
        self.0.take().expect("the child is still held")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One look at a running process, every thread included.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Per thread id: (CPU time in ns from schedstat, voluntary + involuntary context switches).
    threads: HashMap<u32, (u64, u64)>,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub hwm_kib: u64,
    /// utime + stime of the whole process, dead threads included (10 ms resolution).
    pub ticks_cpu: Duration,
}

impl Sample {
    pub fn take(pid: u32) -> io::Result<Sample> {
        let mut threads = HashMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let tid: u32 = match entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
                Some(t) => t,
                None => continue,
            };
            // A thread may end between the listing and the reads: skip it.
            let Ok(schedstat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")) else { continue };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else { continue };
            let cpu_ns = schedstat.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let switches = status_field(&status, "voluntary_ctxt_switches:")
                + status_field(&status, "nonvoluntary_ctxt_switches:");
            threads.insert(tid, (cpu_ns, switches));
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(Sample {
            threads,
            rss_kib: status_field(&status, "VmRSS:"),
            anon_kib: status_field(&status, "RssAnon:"),
            hwm_kib: status_field(&status, "VmHWM:"),
            ticks_cpu: stat_cpu(pid)?,
        })
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// CPU time and context switches from `earlier` to this sample, over the threads alive now
    /// (a thread that started in between counts from zero).
    pub fn since(&self, earlier: &Sample) -> (Duration, u64) {
        let (mut ns, mut switches) = (0u64, 0u64);
        for (tid, (cpu, sw)) in &self.threads {
            let (cpu0, sw0) = earlier.threads.get(tid).copied().unwrap_or((0, 0));
            ns += cpu.saturating_sub(cpu0);
            switches += sw.saturating_sub(sw0);
        }
        (Duration::from_nanos(ns), switches)
    }
}

fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process (all its threads, dead ones included).
pub fn stat_cpu(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line; after the name, 12 and 13 (0-based 11, 12).
    let total = ticks(11) + ticks(12);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

pub fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map_or(0, |d| d.filter_map(Result::ok).filter(|e| !e.file_name().as_bytes().starts_with(b".")).count())
}

/// Polls until `dir` holds `n` files (temporary `.` files aside), at most `limit`.
pub fn wait_for_files(dir: &Path, n: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if count_files(dir) >= n {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// An inotify watch on a directory, reporting files renamed into it.
pub struct DirWatch {
    fd: libc::c_int,
}

impl DirWatch {
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let watch = DirWatch { fd };
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: fd is ours, path a valid C string.
        if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(watch)
    }

    /// Waits until a file called `name` is renamed (or written and closed) into the directory.
    pub fn wait_for(&self, name: &str, limit: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                continue;
            }
            // SAFETY: buf is ours and large enough for at least one event with its name.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel wrote a whole event at `at`; read_unaligned copes with alignment.
                let event: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
                let name_bytes = &buf[at + header..at + header + event.len as usize];
                let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
                if event.mask & libc::IN_MOVED_TO != 0 && &name_bytes[..end] == name.as_bytes() {
                    return Ok(true);
                }
                at += header + event.len as usize;
            }
        }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        // SAFETY: closing our own descriptor once.
        unsafe { libc::close(self.fd) };
    }
}

/// One HTTP/1.1 exchange on a new connection (`Connection: close`): the status line's code,
/// the body and how long it took from connect to the last byte.
pub fn http(addr: SocketAddr, request: &[u8]) -> io::Result<(u16, Vec<u8>, Duration)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let took = start.elapsed();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| io::Error::other("no HTTP header"))?;
    let code = std::str::from_utf8(&answer[..split])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, answer[split + 4..].to_vec(), took))
}

pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
