//! `cargo bench --bench sidecar`: what the sidecar costs, side by side with the two loops
//! people write by hand (`benches/baselines/`), measured from the outside in one run.
//!
//! Every program under test is its own process, so the numbers are what a pod pays:
//!
//! * the shipped release binary, built first as the container image builds it, with
//!   `cargo build --release --no-default-features` (no dev server inside; or `SIDECAR_BENCH_BIN`);
//! * the dev server (`magento-token-sidecar devserver`) on loopback, one process for the whole
//!   run, holding every customer; its own CPU is measured around each workload;
//! * `once` for N customers, the Python loop and the curl loop on the same N: wall time, CPU
//!   (user + system, from `wait4`, descendants included) and peak RSS (`ru_maxrss`: the largest
//!   single process, for the curl loop the largest `curl`, `mv` or the shell);
//! * `run` holding N customers once every token is written: RSS, CPU and context switches
//!   (each one a wakeup) over a quiet window, from `/proc/<pid>/task/*/{schedstat,status}`;
//!   then what one `/metrics` scrape costs;
//! * process start to the first token file (inotify on the token directory), next to one
//!   login round trip on a new connection.
//!
//! Token files go to `/dev/shm`, a memory file system like the `emptyDir: {medium: Memory}`
//! the Helm chart mounts; `SIDECAR_BENCH_TOKEN_FS=disk` puts them on the temporary directory's
//! file system instead. `-- --quick` stops at 1,000 customers. The tables are printed and
//! written to `target/sidecar-bench.md`. Nothing here passes or fails a test: it reports.

mod fixture;
mod hot_list;
mod measure;

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fixture::{Fixture, TokenFs};
use measure::{median, Guard, Sample, Usage};

/// The sizes of the `once` workload.
const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];
/// How many times each `once` run is repeated (the median is reported): the sidecar and the
/// Python loop are quick enough for three runs up to 1,000 customers; the curl loop spends
/// about 5 ms a login, so its large runs happen once.
fn repeats(who: Who, n: usize) -> usize {
    match (who, n) {
        // The Python loop's CPU time swings by a factor of two from run to run (its eight
        // threads contend for the GIL): three runs at every size.
        (Who::Sidecar | Who::Python | Who::PythonNoFsync, _) => 3,
        (Who::Curl, n) if n <= 100 => 3,
        _ => 1,
    }
}
/// The dev server's time per login for the `once` runs: none (the dev server's microseconds),
/// and a store that takes its time (PHP-FPM behind nginx takes tens of milliseconds).
const LATENCIES: [Duration; 2] = [Duration::ZERO, Duration::from_millis(20)];

/// The quiet window over which the idle daemon is watched.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// tokio's blocking threads (the file writes) end after 10 s without work; the window starts
/// once they have, at most this long after the last token was written.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// First-token runs, and round trips measured for comparison.
const FIRST_TOKEN_RUNS: usize = 10;
const ROUND_TRIPS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Sidecar,
    Python,
    /// The same loop without fsync: write + rename only, what most people write.
    PythonNoFsync,
    Curl,
}

impl Who {
    fn label(self) -> &'static str {
        match self {
            Who::Sidecar => "sidecar `once`",
            Who::Python => "Python loop",
            Who::PythonNoFsync => "Python loop, no fsync",
            Who::Curl => "curl loop",
        }
    }
}

/// Where the programs under test are.
struct Tools {
    sidecar: PathBuf,
    /// `magento-devserver`, the dev server crate's own binary.
    devserver: PathBuf,
    python: Option<PathBuf>,
    curl: Option<String>,
    baselines: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(measure::LAUNCH) {
        if let Err(e) = measure::launcher(&args[1..]) {
            eprintln!("launcher: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and a benchmark of
    // minutes has no place in the test suite.
    if !args.iter().any(|a| a == "--bench") {
        println!("the sidecar benchmark runs with `cargo bench --bench sidecar`: skipped");
        return;
    }
    let started = Instant::now();
    let quick = args.iter().any(|a| a == "--quick");
    match bench(quick) {
        Ok(report) => {
            println!("{report}");
            let out = target_dir().join("sidecar-bench.md");
            match std::fs::write(&out, &report) {
                Ok(()) => {
                    println!("(also written to {}; whole benchmark took {:.0?})", out.display(), started.elapsed())
                }
                Err(e) => eprintln!("cannot write {}: {e}", out.display()),
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}

/// `<target>` from this executable's path, `<target>/release/deps/sidecar-<hash>`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn fail(message: String) -> io::Error {
    io::Error::other(message)
}

/// The shipped release binary: `SIDECAR_BENCH_BIN`, or the container image's build of it
/// (without the `demo` feature, so without the dev server).
fn sidecar_binary() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SIDECAR_BENCH_BIN") {
        return Ok(PathBuf::from(bin));
    }
    release_build(&["--no-default-features", "--bin", "magento-token-sidecar"], "magento-token-sidecar")
}

/// The dev server's own release binary.
fn devserver_binary() -> io::Result<PathBuf> {
    release_build(&["-p", "magento-devserver", "--bin", "magento-devserver"], "magento-devserver")
}

fn release_build(args: &[&str], bin: &str) -> io::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building {bin} (cargo build --release {}) ...", args.join(" "));
    let status =
        Command::new(cargo).args(["build", "--release"]).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).status()?;
    if !status.success() {
        return Err(fail(format!("cargo build --release {} failed: {status}", args.join(" "))));
    }
    let path = target_dir().join("release").join(bin);
    if !path.is_file() {
        return Err(fail(format!("{} is missing after cargo build --release", path.display())));
    }
    Ok(path)
}

/// The interpreter itself, not a shim (pyenv's `python3` is a shell script that would be
/// measured too).
fn find_python() -> Option<PathBuf> {
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

fn version_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(str::to_owned)
}

fn bench(quick: bool) -> io::Result<String> {
    let sizes: Vec<usize> = SIZES.iter().copied().filter(|&n| !quick || n <= 1_000).collect();
    let max_n = *sizes.last().expect("at least one size");
    // Idle RSS at 10,000 customers is an issue 12 target: measured by `--quick` too.
    let idle_sizes: Vec<usize> = vec![1, 1_000, 10_000];
    let tools = Tools {
        sidecar: sidecar_binary()?,
        devserver: devserver_binary()?,
        python: find_python(),
        curl: version_line("curl", &["--version"]).map(|_| "curl".to_owned()),
        baselines: Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join("baselines"),
    };
    let token_fs = match std::env::var("SIDECAR_BENCH_TOKEN_FS").as_deref() {
        Ok("disk") => TokenFs::Disk,
        _ if Path::new("/dev/shm").is_dir() => TokenFs::Memory,
        _ => TokenFs::Disk,
    };
    let mut report = String::new();
    let mut notes: Vec<String> = Vec::new();
    if tools.python.is_none() {
        notes.push("python3 not found: the Python baseline is skipped.".into());
    }
    if tools.curl.is_none() {
        notes.push("curl not found (`apt-get install -y curl`): the curl baseline is skipped.".into());
    }
    notes.extend(hot_list::staleness());

    eprintln!("preparing {max_n} customers ...");
    let fx = Fixture::new(max_n.max(10_000), token_fs)?;
    // The smallest peak RSS this set-up can report: `true`, started like everything else.
    let (_, log) = fx.log_file("floor")?;
    let floor = measure::run(&Command::new("true"), &log, Duration::from_secs(10))?;
    let server = DevServer::start(&tools.devserver, &fx, Duration::ZERO)?;
    eprintln!("dev server at {}", server.base_url);
    let slow_latency = LATENCIES[1];
    let slow = DevServer::start(&tools.devserver, &fx, slow_latency)?;
    eprintln!("dev server with {slow_latency:?} a login at {}", slow.base_url);

    // First token, before anything else has warmed the dev server's connection handling.
    eprintln!("start to first token ...");
    let first = first_token(&tools, &fx, &server)?;

    let mut rows: Vec<OnceRow> = Vec::new();
    for latency in LATENCIES {
        let at = if latency.is_zero() { &server } else { &slow };
        for &n in &sizes {
            for who in [Who::Sidecar, Who::Python, Who::PythonNoFsync, Who::Curl] {
                let available = match who {
                    Who::Sidecar => true,
                    Who::Python | Who::PythonNoFsync => tools.python.is_some(),
                    // One login at a time: 1,000 logins would wait 20 s on the latency alone.
                    Who::Curl => tools.curl.is_some() && latency.is_zero(),
                };
                if !available {
                    continue;
                }
                eprintln!("once: {} with {n} customers, {latency:?} a login ...", who.label());
                let mut runs = Vec::new();
                for _ in 0..repeats(who, n) {
                    runs.push(once_run(who, n, &tools, &fx, at)?);
                }
                rows.push(OnceRow { who, n, latency, runs });
            }
        }
    }
    if tools.curl.is_some() {
        notes.push(format!(
            "The curl loop logs in one customer at a time: it runs without latency only ({} a login would add N × {}).",
            ms(slow_latency.as_secs_f64()),
            ms(slow_latency.as_secs_f64())
        ));
    }

    eprintln!("idle daemons ...");
    let idle = idle_daemons(&idle_sizes, &tools, &fx, &server)?;
    eprintln!("validation: run with validate_every {VALIDATE_EVERY} over {VALIDATION_N} customers ...");
    let validation = validation_cost(&tools, &fx, &server)?;
    let server_end = Sample::take(server.pid())?;

    // The report.
    writeln!(report, "## Results\n").unwrap();
    machine(&mut report, &tools, token_fs)?;
    writeln!(
        report,
        "Peak RSS is `ru_maxrss` from `wait4`; the smallest this set-up can report (`true`) is {:.1} MiB.",
        floor.max_rss_kib as f64 / 1024.0
    )
    .unwrap();
    once_tables(&mut report, &rows, &sizes);
    idle_table(&mut report, &idle);
    validation_table(&mut report, &validation, &rows, &idle);
    first_token_table(&mut report, &first);
    writeln!(report, "\nDev server: {} KiB RSS at the end, serving every login of this run.", server_end.rss_kib)
        .unwrap();
    targets(&mut report, &rows, &idle, &first, &validation);
    for note in notes {
        writeln!(report, "\n> {note}").unwrap();
    }
    server.stop();
    slow.stop();
    Ok(report)
}

fn machine(out: &mut String, tools: &Tools, token_fs: TokenFs) -> io::Result<()> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let size = std::fs::metadata(&tools.sidecar)?.len();
    writeln!(out, "Machine: {model}, {cores} cores, {mem_mib} MiB, Linux {}.", kernel.trim()).unwrap();
    writeln!(
        out,
        "Sidecar: `{}` ({:.2} MiB), {}. Python: {}. curl: {}. Token files on {}.",
        tools.sidecar.display(),
        size as f64 / (1024.0 * 1024.0),
        version_line("rustc", &["-V"]).unwrap_or_else(|| "rustc ?".into()),
        tools
            .python
            .as_ref()
            .and_then(|p| version_line(&p.to_string_lossy(), &["-V"]))
            .unwrap_or_else(|| "absent".into()),
        tools
            .curl
            .as_ref()
            .and_then(|c| version_line(c, &["--version"]))
            .map_or("absent".into(), |v| { v.split_whitespace().take(2).collect::<Vec<_>>().join(" ") }),
        match token_fs {
            TokenFs::Memory => "tmpfs (/dev/shm, like the chart's memory emptyDir)",
            TokenFs::Disk => "the temporary directory's disk file system",
        }
    )
    .unwrap();
    Ok(())
}

/// The dev server as its own process.
struct DevServer {
    child: Guard,
    base_url: String,
    addr: SocketAddr,
    /// Its `--login-latency`.
    latency: Duration,
}

impl DevServer {
    fn start(bin: &Path, fx: &Fixture, latency: Duration) -> io::Result<DevServer> {
        let (log, file) = fx.log_file(&format!("devserver-{}ms", latency.as_millis()))?;
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--token-lifetime", "1h"])
            .arg("--login-latency")
            .arg(format!("{}ms", latency.as_millis()))
            .arg("--customers-file")
            .arg(fx.server_customers())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let child = Guard(Some(child));
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let base_url = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| fail(format!("the dev server said {line:?}: {}", fixture::tail(&log, 5))))?
            .to_owned();
        let addr = base_url
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| fail(format!("cannot read an address in {base_url}")))?;
        Ok(DevServer { child, base_url, addr, latency })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn cpu(&self) -> Duration {
        measure::stat_cpu(self.pid()).unwrap_or_default()
    }

    fn stop(mut self) {
        let _ = measure::stop(self.child.take(), Duration::from_secs(10));
    }
}

/// One `once` workload's repetitions.
struct OnceRow {
    who: Who,
    n: usize,
    /// The dev server's time per login.
    latency: Duration,
    runs: Vec<OnceRun>,
}

struct OnceRun {
    usage: Usage,
    /// The dev server's CPU over the run.
    server_cpu: Duration,
}

impl OnceRow {
    fn wall(&self) -> f64 {
        median(self.runs.iter().map(|r| r.usage.wall.as_secs_f64()).collect())
    }
    fn cpu(&self) -> f64 {
        median(self.runs.iter().map(|r| r.usage.cpu().as_secs_f64()).collect())
    }
    fn cpu_per_login(&self) -> f64 {
        self.cpu() / self.n as f64
    }
    fn switches_per_login(&self) -> f64 {
        median(self.runs.iter().map(|r| r.usage.switches as f64).collect()) / self.n as f64
    }
    fn rss_mib(&self) -> f64 {
        median(self.runs.iter().map(|r| r.usage.max_rss_kib as f64 / 1024.0).collect())
    }
    fn server_cpu_per_login(&self) -> f64 {
        median(self.runs.iter().map(|r| r.server_cpu.as_secs_f64()).collect()) / self.n as f64
    }
}

fn once_run(who: Who, n: usize, tools: &Tools, fx: &Fixture, server: &DevServer) -> io::Result<OnceRun> {
    let out = fx.out_dir(&format!("once-{who:?}-{n}"))?;
    let (log, file) = fx.log_file(&format!("once-{who:?}-{n}"))?;
    let mut cmd = match who {
        Who::Sidecar => {
            let config = fx.config(n, &server.base_url, &out, None)?;
            let mut c = Command::new(&tools.sidecar);
            c.arg("once").arg("--config").arg(config).args(["--timeout", "60s"]);
            c
        }
        Who::Python | Who::PythonNoFsync => {
            let mut c = Command::new(tools.python.as_ref().expect("checked by the caller"));
            c.arg(tools.baselines.join("python_loop.py"));
            if who == Who::PythonNoFsync {
                c.arg("--no-fsync");
            }
            c.arg(&server.base_url).arg(fx.customer_list(n)?).arg(&out);
            c
        }
        Who::Curl => {
            let mut c = Command::new("bash");
            c.arg(tools.baselines.join("curl_loop.sh")).arg(&server.base_url).arg(fx.customer_list(n)?).arg(&out);
            c
        }
    };
    cmd.env_remove("RUST_LOG");
    let server_before = server.cpu();
    let limit = Duration::from_secs(30) + Duration::from_millis(20) * n as u32 + server.latency * n as u32;
    let usage = measure::run(&cmd, &file, limit)?;
    let server_cpu = server.cpu().saturating_sub(server_before);
    let written = measure::count_files(&out);
    if usage.code != Some(0) || written != n {
        return Err(fail(format!(
            "{} with {n} customers: exit {:?}, {written} of {n} files written; log {}:\n{}",
            who.label(),
            usage.code,
            log.display(),
            fixture::tail(&log, 10)
        )));
    }
    std::fs::remove_dir_all(&out)?;
    Ok(OnceRun { usage, server_cpu })
}

fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A `run` daemon holding N customers, watched over the quiet window.
struct Idle {
    n: usize,
    /// Start to every token written, and the CPU that took.
    all_written: Duration,
    startup_cpu: Duration,
    startup_hwm_kib: u64,
    threads: usize,
    rss_kib: u64,
    /// The part of the RSS that is the process's own (heap, stacks), not mapped files.
    anon_kib: u64,
    window: Duration,
    window_cpu: Duration,
    switches: u64,
    /// Per scrape: bytes, CPU, and RSS after.
    scrapes: Vec<(usize, Duration, u64)>,
    exit: Option<i32>,
}

fn idle_daemons(sizes: &[usize], tools: &Tools, fx: &Fixture, server: &DevServer) -> io::Result<Vec<Idle>> {
    struct Running {
        n: usize,
        child: Guard,
        admin: SocketAddr,
        all_written: Duration,
        startup: Sample,
        log: PathBuf,
    }
    let mut running = Vec::new();
    // One at a time, so each start-up burst has the machine to itself.
    for &n in sizes {
        let out = fx.out_dir(&format!("run-{n}"))?;
        let admin = free_port()?;
        let config = fx.config(n, &server.base_url, &out, Some(admin))?;
        let (log, file) = fx.log_file(&format!("run-{n}"))?;
        let start = Instant::now();
        let child = spawn_run(tools, config, file)?;
        let child = Guard(Some(child));
        let limit = Duration::from_secs(30) + Duration::from_millis(5) * n as u32;
        let Some(_) = measure::wait_for_files(&out, n, limit) else {
            return Err(fail(format!(
                "run with {n} customers: {} of {n} files after {limit:?}; log {}:\n{}",
                measure::count_files(&out),
                log.display(),
                fixture::tail(&log, 10)
            )));
        };
        let all_written = start.elapsed();
        let startup = Sample::take(child.pid())?;
        running.push(Running { n, child, admin, all_written, startup, log });
    }
    // Let the blocking threads of the last burst end.
    let settle = Instant::now();
    while settle.elapsed() < SETTLE_LIMIT {
        let busy = running.iter().any(|r| Sample::take(r.child.pid()).is_ok_and(|s| s.thread_count() > 1));
        if !busy {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let before: Vec<Sample> = running.iter().map(|r| Sample::take(r.child.pid())).collect::<io::Result<_>>()?;
    let window_start = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let window = window_start.elapsed();
    let after: Vec<Sample> = running.iter().map(|r| Sample::take(r.child.pid())).collect::<io::Result<_>>()?;
    let mut results = Vec::new();
    for ((r, b), a) in running.into_iter().zip(before).zip(after) {
        let (window_cpu, switches) = a.since(&b);
        let mut scrapes = Vec::new();
        for _ in 0..3 {
            let s0 = Sample::take(r.child.pid())?;
            let request = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", r.admin);
            let (code, body, _) = measure::http(r.admin, request.as_bytes())?;
            if code != 200 {
                return Err(fail(format!("GET /metrics answered {code}; log {}", r.log.display())));
            }
            // The connection's task ends just after the last byte: let it.
            std::thread::sleep(Duration::from_millis(50));
            let s1 = Sample::take(r.child.pid())?;
            scrapes.push((body.len(), s1.since(&s0).0, s1.rss_kib));
        }
        let mut child = r.child;
        let exit = measure::stop(child.take(), Duration::from_secs(15))?.code;
        results.push(Idle {
            n: r.n,
            all_written: r.all_written,
            // Ticks count exited threads but in 10 ms steps; schedstat is exact but only for
            // the threads still alive: the larger of the two.
            startup_cpu: r.startup.ticks_cpu.max(r.startup.since(&Sample::default()).0),
            startup_hwm_kib: r.startup.hwm_kib,
            threads: a.thread_count(),
            rss_kib: a.rss_kib,
            anon_kib: a.anon_kib,
            window,
            window_cpu,
            switches,
            scrapes,
            exit,
        });
    }
    Ok(results)
}

struct FirstToken {
    /// Process start to the token file renamed into place, per run.
    first: Vec<Duration>,
    /// One login on a new connection, per request.
    round_trips: Vec<Duration>,
}

fn first_token(tools: &Tools, fx: &Fixture, server: &DevServer) -> io::Result<FirstToken> {
    let body = format!("{{\"username\":\"{}\",\"password\":\"pw-00000-Secret!\"}}", fixture::email(0));
    let request = format!(
        "POST /rest/V1/integration/customer/token HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    let mut round_trips = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let (code, _, took) = measure::http(server.addr, request.as_bytes())?;
        if code != 200 {
            return Err(fail(format!("a login to the dev server answered {code}")));
        }
        round_trips.push(took);
    }
    let mut first = Vec::new();
    for _ in 0..FIRST_TOKEN_RUNS {
        let out = fx.out_dir("first")?;
        let config = fx.config(1, &server.base_url, &out, None)?;
        let (log, file) = fx.log_file("first")?;
        let watch = measure::DirWatch::new(&out)?;
        let start = Instant::now();
        let child = spawn_run(tools, &config, file)?;
        let mut child = Guard(Some(child));
        let seen = watch.wait_for(&fixture::name(0), Duration::from_secs(10))?;
        let took = start.elapsed();
        measure::stop(child.take(), Duration::from_secs(15))?;
        if !seen {
            return Err(fail(format!(
                "no token file within 10 s; log {}:\n{}",
                log.display(),
                fixture::tail(&log, 10)
            )));
        }
        first.push(took);
        std::fs::remove_dir_all(&out)?;
    }
    Ok(FirstToken { first, round_trips })
}

fn ms(d: f64) -> String {
    let ms = d * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.0} µs", ms * 1e3)
    }
}

fn secs(d: f64) -> String {
    if d >= 1.0 {
        format!("{d:.2} s")
    } else {
        ms(d)
    }
}

fn find(rows: &[OnceRow], who: Who, n: usize, latency: Duration) -> Option<&OnceRow> {
    rows.iter().find(|r| r.who == who && r.n == n && r.latency == latency)
}

fn once_tables(out: &mut String, rows: &[OnceRow], sizes: &[usize]) {
    writeln!(out, "\n### `once`: log N customers in, write N files, exit\n").unwrap();
    writeln!(
        out,
        "Latency is the dev server's time per login (`--login-latency`); context switches are `ru_nvcsw + ru_nivcsw` from `wait4`.\n"
    )
    .unwrap();
    writeln!(
        out,
        "| latency | N | program | runs | wall | CPU | CPU per login | context switches per login | peak RSS | dev server CPU per login |"
    )
    .unwrap();
    writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for row in rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} MiB | {} |",
            ms(row.latency.as_secs_f64()),
            row.n,
            row.who.label(),
            row.runs.len(),
            secs(row.wall()),
            secs(row.cpu()),
            ms(row.cpu_per_login()),
            row.switches_per_login(),
            row.rss_mib(),
            ms(row.server_cpu_per_login()),
        )
        .unwrap();
    }
    writeln!(out, "\nSidecar ÷ baseline, same run (lower is better for the sidecar):\n").unwrap();
    writeln!(
        out,
        "| latency | N | CPU per login ÷ Python | ÷ Python, no fsync | ÷ curl | peak RSS ÷ Python | ÷ Python, no fsync | ÷ curl |"
    )
    .unwrap();
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for latency in LATENCIES {
        for &n in sizes {
            let Some(s) = find(rows, Who::Sidecar, n, latency) else { continue };
            let ratio = |who, f: fn(&OnceRow) -> f64| {
                find(rows, who, n, latency).map_or("—".to_owned(), |b| format!("1/{:.1}", f(b) / f(s)))
            };
            writeln!(
                out,
                "| {} | {n} | {} | {} | {} | {} | {} | {} |",
                ms(latency.as_secs_f64()),
                ratio(Who::Python, OnceRow::cpu_per_login),
                ratio(Who::PythonNoFsync, OnceRow::cpu_per_login),
                ratio(Who::Curl, OnceRow::cpu_per_login),
                ratio(Who::Python, OnceRow::rss_mib),
                ratio(Who::PythonNoFsync, OnceRow::rss_mib),
                ratio(Who::Curl, OnceRow::rss_mib),
            )
            .unwrap();
        }
    }
}

fn idle_table(out: &mut String, idle: &[Idle]) {
    writeln!(out, "\n### `run`: the daemon holding N customers between refreshes\n").unwrap();
    writeln!(
        out,
        "| N | start to all tokens written | CPU for that | peak RSS then | threads | RSS idle (anonymous) | CPU per minute | wakeups per second | one `/metrics` scrape |"
    )
    .unwrap();
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---|").unwrap();
    for i in idle {
        let per_sec = i.window_cpu.as_secs_f64() / i.window.as_secs_f64();
        let scrape_cpu = median(i.scrapes.iter().map(|s| s.1.as_secs_f64()).collect());
        let (bytes, _, rss) = i.scrapes.last().copied().unwrap_or_default();
        writeln!(
            out,
            "| {} | {} | {} | {:.1} MiB | {} | {:.1} MiB ({:.1}) | {} | {:.2} | {} CPU, {:.0} KiB of text, RSS after {:.1} MiB |",
            i.n,
            secs(i.all_written.as_secs_f64()),
            secs(i.startup_cpu.as_secs_f64()),
            i.startup_hwm_kib as f64 / 1024.0,
            i.threads,
            i.rss_kib as f64 / 1024.0,
            i.anon_kib as f64 / 1024.0,
            ms(per_sec * 60.0),
            i.switches as f64 / i.window.as_secs_f64(),
            ms(scrape_cpu),
            bytes as f64 / 1024.0,
            rss as f64 / 1024.0,
        )
        .unwrap();
        if i.exit != Some(0) {
            writeln!(out, "\n> `run` with {} customers exited with {:?} on SIGTERM.\n", i.n, i.exit).unwrap();
        }
    }
    writeln!(
        out,
        "\nIdle figures are over a {:.0} s window once every token is written and tokio's blocking threads have ended; \
         wakeups are context switches summed over the daemon's threads.",
        IDLE_WINDOW.as_secs_f64()
    )
    .unwrap();
}

fn first_token_table(out: &mut String, f: &FirstToken) {
    let first = median(f.first.iter().map(Duration::as_secs_f64).collect());
    let best = f.first.iter().min().copied().unwrap_or_default().as_secs_f64();
    let rtt = median(f.round_trips.iter().map(Duration::as_secs_f64).collect());
    writeln!(out, "\n### Start to the first token file (`run`, 1 customer)\n").unwrap();
    writeln!(out, "| process start to token file (median of {}) | best | one login round trip (median of {}) | start-up cost beyond the round trip |", f.first.len(), f.round_trips.len()).unwrap();
    writeln!(out, "|---:|---:|---:|---:|").unwrap();
    writeln!(out, "| {} | {} | {} | {} |", ms(first), ms(best), ms(rtt), ms(first - rtt)).unwrap();
}

fn targets(out: &mut String, rows: &[OnceRow], idle: &[Idle], first: &FirstToken, validation: &Validation) {
    writeln!(out, "\n### Targets\n").unwrap();
    writeln!(out, "| target | measured | |").unwrap();
    writeln!(out, "|---|---:|---|").unwrap();
    let mut line = |what: String, measured: String, ok: Option<bool>| {
        let verdict = match ok {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        writeln!(out, "| {what} | {measured} | {verdict} |").unwrap();
    };
    let zero = Duration::ZERO;
    for n in [1_000, 10_000] {
        let Some(s) = find(rows, Who::Sidecar, n, zero) else { continue };
        for (who, limit) in [(Who::Python, 10.0), (Who::Curl, 50.0)] {
            let (measured, ok) = match find(rows, who, n, zero) {
                Some(b) => {
                    let r = b.cpu_per_login() / s.cpu_per_login();
                    (format!("1/{r:.1}"), Some(r >= limit))
                }
                None => ("—".into(), None),
            };
            line(format!("CPU per login ≤ 1/{limit:.0} of the {}, N = {n}", who.label()), measured, ok);
        }
    }
    // Issue 12: against a store that takes 20 ms a login, beside the loop people write.
    let slow = LATENCIES[1];
    match (find(rows, Who::Sidecar, 1_000, slow), find(rows, Who::PythonNoFsync, 1_000, slow)) {
        (Some(s), Some(p)) => {
            let r = p.cpu_per_login() / s.cpu_per_login();
            line(
                format!(
                    "CPU per login ≤ 1/10 of the Python loop without fsync, N = 1,000, {} a login",
                    ms(slow.as_secs_f64())
                ),
                format!("1/{r:.1}"),
                Some(r >= 10.0),
            );
            let r = p.rss_mib() / s.rss_mib();
            line(
                format!(
                    "peak RSS ≤ 1/4 of the Python loop without fsync, N = 1,000, {} a login",
                    ms(slow.as_secs_f64())
                ),
                format!("1/{r:.1} ({:.1} vs {:.1} MiB)", s.rss_mib(), p.rss_mib()),
                Some(r >= 4.0),
            );
        }
        _ => line(format!("N = 1,000 at {} a login", ms(slow.as_secs_f64())), "—".into(), None),
    }
    match (find(rows, Who::Sidecar, 1_000, zero), find(rows, Who::Python, 1_000, zero)) {
        (Some(s), Some(p)) => {
            let r = p.rss_mib() / s.rss_mib();
            line(
                "peak RSS of `once` ≤ 1/4 of the Python loop's, N = 1,000".into(),
                format!("1/{r:.1} ({:.1} vs {:.1} MiB)", s.rss_mib(), p.rss_mib()),
                Some(r >= 4.0),
            );
        }
        _ => line("peak RSS of `once` ≤ 1/4 of the Python loop's, N = 1,000".into(), "—".into(), None),
    }
    if let Some(s) = find(rows, Who::Sidecar, 1, zero) {
        line("peak RSS of `once` ≤ 8 MiB, N = 1".into(), format!("{:.1} MiB", s.rss_mib()), Some(s.rss_mib() <= 8.0));
    }
    match idle.iter().find(|i| i.n == 10_000) {
        Some(i) => {
            let mib = i.rss_kib as f64 / 1024.0;
            line("idle daemon, 10,000 customers: RSS ≤ 32 MiB".into(), format!("{mib:.1} MiB"), Some(mib <= 32.0));
            let per_sec = i.window_cpu.as_secs_f64() / i.window.as_secs_f64();
            line(
                "idle daemon, 10,000 customers: CPU ≤ 1 ms per second".into(),
                format!("{} per second", ms(per_sec)),
                Some(per_sec <= 1e-3),
            );
        }
        None => line("idle daemon, 10,000 customers".into(), "— (quick run)".into(), None),
    }
    // A check against a login of the same daemon (`run`), and against `once`'s leaner login.
    match (validation.per_check(), run_cpu_per_login(idle, VALIDATION_N)) {
        (Some(check), Some(login)) => line(
            "validation (`refresh.validate_every`): CPU per check ≤ CPU per login of `run`, N = 1,000".into(),
            format!("{} vs {}", ms(check), ms(login)),
            Some(check <= login),
        ),
        _ => line("validation: CPU per check".into(), "—".into(), None),
    }
    if let (Some(check), Some(s)) = (validation.per_check(), find(rows, Who::Sidecar, 1_000, zero)) {
        line(
            "validation: CPU per check ≤ CPU per login of `once` at 0 ms, N = 1,000".into(),
            format!("{} vs {}", ms(check), ms(s.cpu_per_login())),
            Some(check <= s.cpu_per_login()),
        );
    }
    let first_ms = median(first.first.iter().map(Duration::as_secs_f64).collect());
    let rtt = median(first.round_trips.iter().map(Duration::as_secs_f64).collect());
    line(
        "first token on disk within 10 ms of start plus one round trip".into(),
        format!("{} = {} + {}", ms(first_ms), ms(first_ms - rtt), ms(rtt)),
        Some(first_ms - rtt <= 0.010),
    );
}

/// Customers and period of the validation run (`refresh.validate_every`).
const VALIDATION_N: usize = 1_000;
const VALIDATE_EVERY: &str = "1s";

/// `run` checking every token on disk (`GET /V1/customers/me`) every [`VALIDATE_EVERY`]: its
/// CPU over the window, and the checks the daemon counted (`magento_token_validations_total`).
struct Validation {
    window: Duration,
    cpu: Duration,
    checks: u64,
    switches: u64,
}

impl Validation {
    fn per_check(&self) -> Option<f64> {
        (self.checks > 0).then(|| self.cpu.as_secs_f64() / self.checks as f64)
    }
}

/// `run` on `config`, its output (stdout and stderr) to `file`, without the caller's RUST_LOG.
fn spawn_run(
    tools: &Tools,
    config: impl AsRef<std::ffi::OsStr>,
    file: std::fs::File,
) -> io::Result<std::process::Child> {
    Command::new(&tools.sidecar)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
}

fn validation_cost(tools: &Tools, fx: &Fixture, server: &DevServer) -> io::Result<Validation> {
    let n = VALIDATION_N;
    let out = fx.out_dir("validate")?;
    let admin = free_port()?;
    let refresh = format!("  validate_every: {VALIDATE_EVERY}\n");
    let config = fx.config_with(n, &server.base_url, &out, Some(admin), &refresh)?;
    let (log, file) = fx.log_file("validate")?;
    let child = spawn_run(tools, config, file)?;
    let mut child = Guard(Some(child));
    let limit = Duration::from_secs(30) + Duration::from_millis(5) * n as u32;
    if measure::wait_for_files(&out, n, limit).is_none() {
        return Err(fail(format!("validation run: not every file written; log {}", log.display())));
    }
    // Into the rhythm of checks: a few periods after the last login.
    std::thread::sleep(Duration::from_secs(3));
    let checks = |admin: SocketAddr| -> io::Result<u64> {
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        let (code, body, _) = measure::http(admin, request.as_bytes())?;
        if code != 200 {
            return Err(fail(format!("GET /metrics answered {code}")));
        }
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| l.starts_with("magento_token_validations_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    };
    let before = checks(admin)?;
    let s0 = Sample::take(child.pid())?;
    let start = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let s1 = Sample::take(child.pid())?;
    let window = start.elapsed();
    let after = checks(admin)?;
    let (cpu, switches) = s1.since(&s0);
    measure::stop(child.take(), Duration::from_secs(15))?;
    Ok(Validation { window, cpu, checks: after.saturating_sub(before), switches })
}

/// `run`'s CPU per login: its start with N customers (every one logged in) over N.
fn run_cpu_per_login(idle: &[Idle], n: usize) -> Option<f64> {
    idle.iter().find(|i| i.n == n).map(|i| i.startup_cpu.as_secs_f64() / n as f64)
}

fn validation_table(out: &mut String, v: &Validation, rows: &[OnceRow], idle: &[Idle]) {
    writeln!(out, "\n### Validation: `run` checking every token every {VALIDATE_EVERY}, {VALIDATION_N} customers\n")
        .unwrap();
    writeln!(
        out,
        "| window | checks | CPU | CPU per check | wakeups per check | `run` CPU per login (its start, N = 1,000) | `once` CPU per login (0 ms, N = 1,000) |"
    )
    .unwrap();
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let once = find(rows, Who::Sidecar, 1_000, Duration::ZERO).map_or("—".into(), |s| ms(s.cpu_per_login()));
    let run = run_cpu_per_login(idle, VALIDATION_N).map_or("—".into(), ms);
    writeln!(
        out,
        "| {:.1} s | {} | {} | {} | {:.2} | {run} | {once} |",
        v.window.as_secs_f64(),
        v.checks,
        secs(v.cpu.as_secs_f64()),
        v.per_check().map_or("—".into(), ms),
        v.switches as f64 / v.checks.max(1) as f64,
    )
    .unwrap();
}
