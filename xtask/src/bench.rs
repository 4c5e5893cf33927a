//! `bench`: twtrace against the tools people use today, side by side, on one machine in
//! one run. A loopback connect/close storm runs in a private network namespace, untraced
//! and under each tracer, interleaved over several rounds; the table reports medians as
//! ratios to the untraced rate (paired round by round), per-run BPF cost, delivery and
//! CPU. See docs/benchmarks.md.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::setup;

/// Transitions per storm connection: client CLOSE->SYN_SENT->ESTABLISHED->CLOSE_WAIT->
/// LAST_ACK->CLOSE, accepted socket LISTEN->SYN_RECV->ESTABLISHED->FIN_WAIT1->FIN_WAIT2->
/// (TIME_WAIT).
const EVENTS_PER_CONNECTION: u64 = 10;

/// What runs during a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    /// Programs that return at once, on the tracepoints twtrace hooks: what the kernel's
    /// tracepoint machinery alone costs, the floor under any tracer of these events.
    EmptyHooks,
    /// The same, on raw tracepoints, the cheapest attachment this kernel allows, with one
    /// `sys_exit` hook for all system calls in place of the per-call syscall tracepoints.
    EmptyRawHooks,
    TwtraceTrace,
    /// twtrace with a ring-buffer wakeup per event, as other tracers do: the baseline for
    /// twtrace's batched wakeups.
    TwtraceWakeEach,
    /// twtrace with the tp_btf state hook keeping owners in socket storage (the default
    /// keeps them in a preallocated hash map).
    TwtraceTpBtf,
    TwtraceRecord,
    /// `record` competing for the CPU on equal terms with the storm (twtrace's default
    /// nice value lets the traced threads run first).
    TwtraceRecordNice0,
    /// Lower bound: `record` with its state hook returning at entry. The connect() hooks,
    /// the reader and the hooks' dispatch, without any state event.
    TwtraceRecordCutAtEntry,
    /// Lower bound: `record` delivering every state event but attributing none (no owner
    /// table, no connect tracking): what delivering the events alone costs.
    TwtraceRecordNoOwners,
    Tcpstates,
    Bpftrace,
}

impl Config {
    const ALL: [Config; 12] = [
        Config::Untraced,
        Config::EmptyHooks,
        Config::EmptyRawHooks,
        Config::TwtraceTrace,
        Config::TwtraceWakeEach,
        Config::TwtraceTpBtf,
        Config::TwtraceRecord,
        Config::TwtraceRecordNice0,
        Config::TwtraceRecordCutAtEntry,
        Config::TwtraceRecordNoOwners,
        Config::Tcpstates,
        Config::Bpftrace,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::EmptyHooks => "floor: empty programs on twtrace's tracepoints",
            Config::EmptyRawHooks => "floor: the same as raw tracepoints, one sys_exit",
            Config::TwtraceTrace => "twtrace trace --json",
            Config::TwtraceWakeEach => "twtrace trace --json --wakeup-bytes 0",
            Config::TwtraceTpBtf => "twtrace trace --json --state-hooks tp-btf",
            Config::TwtraceRecord => "twtrace record",
            Config::TwtraceRecordNice0 => "twtrace record --nice 0",
            Config::TwtraceRecordCutAtEntry => "bound: record, state hook returns at entry",
            Config::TwtraceRecordNoOwners => "bound: record, events without owners",
            Config::Tcpstates => "tcpstates (libbpf-tools)",
            Config::Bpftrace => "bpftrace printf",
        }
    }
}

/// Where the storm and the tool run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the scheduler puts them, as in production: the storm's two threads wake
    /// each other across CPUs, so its rate depends on how fast an idle vCPU wakes.
    Free,
    /// The storm's threads on CPU 0, the tool on CPU 1: the storm is then CPU-bound, and
    /// the time a tool adds to each connection is the kernel-side work it does on the
    /// storm's path (its programs, the hooks' own overhead), without wakeup effects or
    /// competition from the tool's userspace.
    Pinned,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Free => "free",
            Placement::Pinned => "pinned",
        }
    }

    /// `program` run where this placement puts tools.
    fn command(self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Placement::Free => Command::new(program),
            Placement::Pinned => {
                let mut cmd = Command::new("taskset");
                cmd.args(["--cpu-list", "1"]).arg(program);
                cmd
            }
        }
    }
}

/// What a round measures. BPF statistics cost each program run two clock reads, which
/// would count against the traced rates: rates come from rounds with them off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Purpose {
    #[default]
    Rate,
    BpfCost,
}

impl Purpose {
    fn of_round(round: usize) -> Self {
        if round.is_multiple_of(2) { Purpose::Rate } else { Purpose::BpfCost }
    }
}

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Sample {
    round: usize,
    purpose: Purpose,
    conn_per_s: f64,
    connections: u64,
    /// Events the tool delivered to userspace, when it says.
    delivered: Option<u64>,
    lost: Option<u64>,
    /// Mean ns per run of the tool's busiest program (the state-change hook).
    ns_per_run: Option<f64>,
    /// All the tool's BPF time divided by the storm's connections.
    bpf_ns_per_connection: Option<f64>,
    /// Runs the kernel skipped (recursion), summed over the tool's programs.
    recursion_misses: Option<u64>,
    /// Userspace CPU (user + system) of the tool, in seconds.
    cpu_s: Option<f64>,
    bytes_per_event: Option<f64>,
}

pub fn run(
    root: &Path,
    env: &setup::Env,
    seconds: f64,
    rounds: usize,
    placement: Placement,
    json_out: &Path,
) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "the benchmark loads eBPF programs and creates a network namespace: run `sudo ./x bench`"
        );
    }
    setup::ensure_packages(
        &[("tcpstates", "libbpf-tools"), ("bpftrace", "bpftrace"), ("bpftool", "bpftool")],
        setup::Removals::Refuse,
    )?;
    if placement == Placement::Pinned && std::thread::available_parallelism()?.get() < 2 {
        bail!("--pin puts the storm on CPU 0 and the tool on CPU 1: this machine has one CPU");
    }
    crate::cargo(root, env, &["build", "--release", "--package", "twtrace"])?;
    let twtrace = root.join("target/release/twtrace");
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("failed to create {}", scratch.display()))?;

    let ns = Netns::create()?;
    let mut samples: BTreeMap<Config, Vec<Sample>> = BTreeMap::new();
    let total = rounds * Config::ALL.len();
    let mut done = 0;
    for round in 0..rounds {
        let purpose = Purpose::of_round(round);
        let _stats = if purpose == Purpose::BpfCost { Some(BpfStats::enable()?) } else { None };
        // Rotate the order every round so drift (thermal, caches) spreads over all configs.
        for i in 0..Config::ALL.len() {
            let config = Config::ALL[(i + round) % Config::ALL.len()];
            done += 1;
            let what = match purpose {
                Purpose::Rate => "rate",
                Purpose::BpfCost => "cost",
            };
            eprint!("bench: [{done}/{total}] round {} ({what}) {:<30}", round + 1, config.name());
            let mut sample = measure(config, &ns, &twtrace, &scratch, seconds, placement)
                .with_context(|| format!("measuring {}", config.name()))?;
            sample.round = round;
            sample.purpose = purpose;
            eprintln!(" {:>8.0} conn/s", sample.conn_per_s);
            samples.entry(config).or_default().push(sample);
        }
    }
    let report = Report::new(&samples);
    println!("{}", report.table(seconds, rounds, placement));
    std::fs::write(
        json_out,
        serde_json::to_string_pretty(&report.json(seconds, rounds, placement))?,
    )
    .with_context(|| format!("failed to write {}", json_out.display()))?;
    eprintln!("bench: results written to {}", json_out.display());
    Ok(())
}

/// A network namespace for the storm, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> anyhow::Result<Self> {
        let name = format!("twtrace-bench-{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    fn storm(&self, seconds: f64, placement: Placement) -> anyhow::Result<(u64, f64)> {
        let me = xtask_executable()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        if placement == Placement::Pinned {
            cmd.args(["taskset", "--cpu-list", "0"]);
        }
        let out = cmd
            .arg(me)
            .args(["storm", "--seconds", &seconds.to_string()])
            .output()
            .context("failed to run the storm")?;
        if !out.status.success() {
            bail!("the storm failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let connections = word_after(&text, "connections").context("storm printed no count")?;
        let elapsed = word_after(&text, "seconds").context("storm printed no time")?;
        Ok((connections as u64, elapsed))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// Turns on `kernel.bpf_stats_enabled` and restores the previous value on drop.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("failed to read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("failed to enable {BPF_STATS}"))?;
        Ok(Self { previous: previous.trim().to_owned() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.previous) {
            eprintln!("bench: failed to restore {BPF_STATS} to {}: {e}", self.previous);
        }
    }
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn word_after(text: &str, key: &str) -> Option<f64> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// A tracer under test, with its output consumed by threads (never a full pipe).
struct Tool {
    child: Child,
    stdout_lines: mpsc::Receiver<u64>,
    stderr: mpsc::Receiver<String>,
}

/// How to tell that a tool has attached its programs.
#[derive(Clone, Copy)]
enum Ready {
    /// It prints a line (stdout or stderr) that this matches.
    Line(fn(&str) -> bool),
    /// It says nothing unbuffered: it holds BPF programs (then a second to attach them).
    Programs,
}

impl Tool {
    /// Starts `cmd` and waits until it is ready.
    fn start(mut cmd: Command, ready: Ready) -> anyhow::Result<Self> {
        let matches = match ready {
            Ready::Line(f) => f,
            Ready::Programs => |_: &str| false,
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let (lines_tx, lines_rx) = mpsc::channel();
        let (err_tx, err_rx) = mpsc::channel();
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let ready_out = ready_tx.clone();
        std::thread::spawn(move || {
            let mut lines = 0u64;
            let mut reader = BufReader::with_capacity(1 << 20, stdout);
            let mut line = Vec::new();
            let mut signalled = false;
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if !signalled && matches(&String::from_utf8_lossy(&line)) {
                    let _ = ready_out.send(());
                    signalled = true;
                } else {
                    lines += 1;
                }
                line.clear();
            }
            let _ = lines_tx.send(lines);
        });
        std::thread::spawn(move || {
            let mut all = String::new();
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if matches(&line) {
                    let _ = ready_tx.send(());
                }
                all.push_str(&line);
                line.clear();
            }
            let _ = err_tx.send(all);
        });
        let became_ready = match ready {
            Ready::Line(_) => ready_rx.recv_timeout(Duration::from_secs(120)).is_ok(),
            Ready::Programs => {
                let pid = child.id();
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut loaded = false;
                while !loaded && Instant::now() < deadline && child.try_wait()?.is_none() {
                    loaded = bpf_prog_ids(pid).is_some_and(|ids| !ids.is_empty());
                    std::thread::sleep(Duration::from_millis(50));
                }
                if loaded {
                    std::thread::sleep(Duration::from_secs(1));
                }
                loaded
            }
        };
        if !became_ready {
            let _ = child.kill();
            let stderr = err_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
            bail!("{cmd:?} did not become ready: {stderr}");
        }
        // Let attach-time work settle before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, stdout_lines: lines_rx, stderr: err_rx })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the tool with SIGINT (bounded wait) and returns its stdout line count and stderr.
    fn stop(mut self) -> anyhow::Result<(u64, String)> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the tool did not exit within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines = self.stdout_lines.recv_timeout(Duration::from_secs(30)).unwrap_or(0);
        let stderr = self.stderr.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        Ok((lines, stderr))
    }
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Ids of the BPF programs a process holds open, each once: a program's own descriptor
/// and the perf event or link attaching it both name it, and counting it twice doubled
/// the BPF time per connection in earlier results.
fn bpf_prog_ids(pid: u32) -> Option<Vec<String>> {
    let mut ids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let info = std::fs::read_to_string(entry.ok()?.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().to_owned());
        }
    }
    Some(ids.into_iter().collect())
}

/// Run statistics of the BPF programs a process holds: (busiest program's ns/run,
/// total run time ns, recursion misses).
fn bpf_stats(pid: u32) -> Option<(f64, u64, u64)> {
    let ids = bpf_prog_ids(pid)?;
    let (mut busiest, mut total_ns, mut misses) = ((0u64, 0u64), 0u64, 0u64);
    for id in ids {
        let out =
            Command::new("bpftool").args(["prog", "show", "id", &id, "--json"]).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let (ns, cnt) =
            (v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0));
        total_ns += ns;
        misses += v["recursion_misses"].as_u64().unwrap_or(0);
        if cnt > busiest.1 {
            busiest = (ns, cnt);
        }
    }
    (busiest.1 > 0).then(|| (busiest.0 as f64 / busiest.1 as f64, total_ns, misses))
}

fn measure(
    config: Config,
    ns: &Netns,
    twtrace: &Path,
    scratch: &Path,
    seconds: f64,
    placement: Placement,
) -> anyhow::Result<Sample> {
    let recording = scratch.join("bench.twtrace");
    let tool = match config {
        Config::Untraced => None,
        Config::TwtraceTrace => {
            let mut cmd = placement.command(twtrace);
            cmd.args(["trace", "--json"]);
            Some(Tool::start(cmd, Ready::Line(|l| l.starts_with("twtrace: tracing")))?)
        }
        Config::TwtraceWakeEach => {
            let mut cmd = placement.command(twtrace);
            cmd.args(["trace", "--json", "--wakeup-bytes", "0"]);
            Some(Tool::start(cmd, Ready::Line(|l| l.starts_with("twtrace: tracing")))?)
        }
        Config::TwtraceTpBtf => {
            let mut cmd = placement.command(twtrace);
            cmd.args(["trace", "--json", "--state-hooks", "tp-btf"]);
            Some(Tool::start(cmd, Ready::Line(|l| l.starts_with("twtrace: tracing")))?)
        }
        Config::TwtraceRecord
        | Config::TwtraceRecordNice0
        | Config::TwtraceRecordCutAtEntry
        | Config::TwtraceRecordNoOwners => {
            let mut cmd = placement.command(twtrace);
            cmd.args(["record", "-o"]).arg(&recording);
            match config {
                Config::TwtraceRecordNice0 => cmd.args(["--nice", "0"]),
                Config::TwtraceRecordCutAtEntry => cmd.args(["--bench-cut", "entry"]),
                Config::TwtraceRecordNoOwners => cmd.args(["--bench-cut", "no-owners"]),
                _ => &mut cmd,
            };
            Some(Tool::start(cmd, Ready::Line(|l| l.starts_with("twtrace: tracing")))?)
        }
        Config::Tcpstates => {
            let mut cmd = placement.command("tcpstates");
            cmd.arg("-T");
            Some(Tool::start(cmd, Ready::Programs)?)
        }
        Config::EmptyHooks | Config::EmptyRawHooks => {
            let me = xtask_executable()?;
            let mut cmd = placement.command(me);
            cmd.arg("empty-hooks").args(empty_hooks(config == Config::EmptyRawHooks));
            Some(Tool::start(cmd, Ready::Line(|l| l.starts_with("empty-hooks: attached")))?)
        }
        Config::Bpftrace => {
            let mut cmd = placement.command("bpftrace");
            cmd.args([
                "-e",
                "tracepoint:sock:inet_sock_set_state { printf(\"%llu %d %s %d %d %d %d\\n\", nsecs, pid, comm, \
                 args->sport, args->dport, args->oldstate, args->newstate); }",
            ]);
            Some(Tool::start(cmd, Ready::Programs)?)
        }
    };
    let cpu_before = tool.as_ref().and_then(|t| cpu_seconds(t.pid()));
    let (connections, elapsed) = ns.storm(seconds, placement)?;
    let mut sample =
        Sample { conn_per_s: connections as f64 / elapsed, connections, ..Sample::default() };
    let Some(tool) = tool else {
        return Ok(sample);
    };
    // Give the tool a moment to drain what the storm produced, then read its counters
    // while its programs are still loaded.
    std::thread::sleep(Duration::from_millis(500));
    if let Some((ns_per_run, total_ns, misses)) = bpf_stats(tool.pid()) {
        sample.ns_per_run = Some(ns_per_run);
        sample.bpf_ns_per_connection = Some(total_ns as f64 / connections.max(1) as f64);
        sample.recursion_misses = Some(misses);
    }
    let cpu_after = cpu_seconds(tool.pid());
    sample.cpu_s = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
    let (lines, stderr) = tool.stop()?;
    match config {
        Config::TwtraceTrace
        | Config::TwtraceWakeEach
        | Config::TwtraceTpBtf
        | Config::TwtraceRecord
        | Config::TwtraceRecordNice0
        | Config::TwtraceRecordCutAtEntry
        | Config::TwtraceRecordNoOwners => {
            // "twtrace: N events (…), M shown, L lost, …"
            let summary = stderr.lines().find(|l| l.contains(" events (")).unwrap_or_default();
            sample.delivered = summary.split_whitespace().nth(1).and_then(|w| w.parse().ok());
            sample.lost = word_before(summary, "lost").map(|v| v as u64);
            // Only `record` prints it: "twtrace: recorded N events to F (B bytes, X bytes/event)".
            if let Some(recorded) = stderr.lines().find(|l| l.contains("bytes/event")) {
                sample.bytes_per_event = word_before(recorded, "bytes/event)");
            }
        }
        Config::Tcpstates | Config::Bpftrace => {
            sample.delivered = Some(lines);
            // tcpstates: "lost N events on CPU #C"; bpftrace: "Lost N events".
            let lost: u64 = stderr
                .lines()
                .filter_map(|l| {
                    let lower = l.to_ascii_lowercase();
                    lower
                        .strip_prefix("lost ")
                        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
                })
                .sum();
            sample.lost = Some(lost);
        }
        // Nothing delivered: the floor only counts what the tracepoints cost.
        Config::Untraced | Config::EmptyHooks | Config::EmptyRawHooks => {}
    }
    let _ = std::fs::remove_file(&recording);
    Ok(sample)
}

/// The hooks of a floor: twtrace's classic tracepoints (its raw `inet_sk_error_report`
/// hook never runs in the storm, so it is left out), or the same on raw tracepoints, with
/// one `sys_exit` hook, which sees every system call, for the six syscall tracepoints.
fn empty_hooks(raw: bool) -> Vec<String> {
    if raw {
        return ["raw:inet_sock_set_state", "raw:tcp_receive_reset", "raw:sys_exit"]
            .map(str::to_owned)
            .to_vec();
    }
    let mut hooks =
        vec!["tp:sock:inet_sock_set_state".to_owned(), "tp:tcp:tcp_receive_reset".to_owned()];
    for call in ["connect", "bind", "getsockopt"] {
        for phase in ["enter", "exit"] {
            hooks.push(format!("tp:syscalls:sys_{phase}_{call}"));
        }
    }
    hooks
}

/// This program: the storm and the floors are its own hidden subcommands.
fn xtask_executable() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the xtask executable")
}

fn word_before(text: &str, key: &str) -> Option<f64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| w.trim_end_matches(',') == key)?;
    words.get(at.checked_sub(1)?)?.trim_end_matches(',').parse().ok()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Medians per configuration.
struct Row {
    config: Config,
    /// Over the rate rounds.
    conn_per_s: f64,
    /// The median, lowest and highest of the rate rounds' ratios to the untraced rate of
    /// the same round.
    ratio: f64,
    ratio_range: (f64, f64),
    /// The median over the rate rounds of the time the tool added to each connection
    /// (1/rate - 1/untraced rate of the same round), in µs.
    added_us_per_connection: Option<f64>,
    ns_per_run: Option<f64>,
    bpf_ns_per_connection: Option<f64>,
    delivered_ratio: Option<f64>,
    lost: Option<f64>,
    recursion_misses: Option<f64>,
    cpu_ms_per_m_events: Option<f64>,
    cpu_percent: Option<f64>,
    bytes_per_event: Option<f64>,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn new(samples: &BTreeMap<Config, Vec<Sample>>) -> Self {
        let med = |config: Config, f: &dyn Fn(&Sample) -> Option<f64>| {
            median(
                samples.get(&config).map(|s| s.iter().filter_map(f).collect()).unwrap_or_default(),
            )
        };
        let rate = |s: &Sample| (s.purpose == Purpose::Rate).then_some(s.conn_per_s);
        let untraced_by_round: BTreeMap<usize, f64> = samples
            .get(&Config::Untraced)
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s.round, rate(s)?)))
            .collect();
        let rows = Config::ALL
            .iter()
            .map(|&config| {
                // Paired: each round's rate against the untraced rate of that round, so
                // drift between rounds cancels out.
                let paired: Vec<(f64, f64)> = samples
                    .get(&config)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| Some((rate(s)?, *untraced_by_round.get(&s.round)?)))
                    .collect();
                let ratios: Vec<f64> = paired.iter().map(|(r, base)| r / base).collect();
                let added_us =
                    paired.iter().map(|(r, base)| (1.0 / r - 1.0 / base) * 1e6).collect();
                let ratio_range =
                    ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
                        (lo.min(r), hi.max(r))
                    });
                Row {
                    config,
                    conn_per_s: med(config, &rate).unwrap_or(f64::NAN),
                    ratio: median(ratios).unwrap_or(f64::NAN),
                    ratio_range,
                    added_us_per_connection: median(added_us),
                    ns_per_run: med(config, &|s| s.ns_per_run),
                    bpf_ns_per_connection: med(config, &|s| s.bpf_ns_per_connection),
                    delivered_ratio: med(config, &|s| {
                        s.delivered
                            .map(|d| d as f64 / (s.connections * EVENTS_PER_CONNECTION) as f64)
                    }),
                    lost: med(config, &|s| s.lost.map(|l| l as f64)),
                    recursion_misses: med(config, &|s| s.recursion_misses.map(|l| l as f64)),
                    cpu_ms_per_m_events: med(config, &|s| {
                        let events = s.delivered? as f64;
                        let cpu_s = s.cpu_s?;
                        (events > 0.0).then(|| cpu_s * 1e3 / (events / 1e6))
                    }),
                    cpu_percent: med(config, &|s| {
                        Some(s.cpu_s? * 100.0 / (s.connections as f64 / s.conn_per_s))
                    }),
                    bytes_per_event: med(config, &|s| s.bytes_per_event),
                }
            })
            .collect();
        Self { rows }
    }

    fn table(&self, seconds: f64, rounds: usize, placement: Placement) -> String {
        let opt = |v: Option<f64>, prec: usize| {
            v.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into())
        };
        let mut out = format!(
            "Loopback connect/close storm in a private netns ({placement}), {seconds} s x {rounds} \
             rounds (rates from the rounds without BPF statistics, BPF costs from the others), \
             medians; vs untraced: median (lowest-highest) of the rounds' ratios.\n\n\
             | tool | conn/s | vs untraced | µs added per conn | ns per BPF run | BPF ns per conn | delivered / expected | lost | skipped runs | user CPU ms per M events | CPU % of a core | bytes/event |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            placement = placement.name(),
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {:.0} | {:.3} ({:.3}-{:.3}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.config.name(),
                r.conn_per_s,
                r.ratio,
                r.ratio_range.0,
                r.ratio_range.1,
                opt(r.added_us_per_connection.filter(|_| r.config != Config::Untraced), 2),
                opt(r.ns_per_run, 0),
                opt(r.bpf_ns_per_connection, 0),
                opt(r.delivered_ratio, 3),
                opt(r.lost, 0),
                opt(r.recursion_misses, 0),
                opt(r.cpu_ms_per_m_events, 0),
                opt(r.cpu_percent, 1),
                opt(r.bytes_per_event, 1),
            ));
        }
        out
    }

    fn json(&self, seconds: f64, rounds: usize, placement: Placement) -> serde_json::Value {
        json!({
            "placement": placement.name(),
            "seconds_per_run": seconds,
            "rounds": rounds,
            "events_per_connection": EVENTS_PER_CONNECTION,
            "results": self.rows.iter().map(|r| json!({
                "tool": r.config.name(),
                "conn_per_s": r.conn_per_s,
                "ratio_to_untraced": r.ratio,
                "ratio_to_untraced_lowest": r.ratio_range.0,
                "ratio_to_untraced_highest": r.ratio_range.1,
                "added_us_per_connection": r.added_us_per_connection,
                "ns_per_bpf_run": r.ns_per_run,
                "bpf_ns_per_connection": r.bpf_ns_per_connection,
                "delivered_ratio": r.delivered_ratio,
                "lost": r.lost,
                "recursion_misses": r.recursion_misses,
                "user_cpu_ms_per_million_events": r.cpu_ms_per_m_events,
                "cpu_percent_of_one_core": r.cpu_percent,
                "bytes_per_event": r.bytes_per_event,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_each_rate_round_with_its_untraced_run() {
        let sample = |round, purpose, conn_per_s, ns_per_run| Sample {
            round,
            purpose,
            conn_per_s,
            ns_per_run,
            ..Sample::default()
        };
        let mut samples = BTreeMap::new();
        samples.insert(
            Config::Untraced,
            vec![
                sample(0, Purpose::Rate, 100.0, None),
                sample(1, Purpose::BpfCost, 1000.0, None),
                sample(2, Purpose::Rate, 200.0, None),
            ],
        );
        samples.insert(
            Config::TwtraceRecord,
            vec![
                sample(0, Purpose::Rate, 90.0, None),
                // Slowed by the statistics: must not count as a rate.
                sample(1, Purpose::BpfCost, 10.0, Some(250.0)),
                sample(2, Purpose::Rate, 190.0, None),
            ],
        );
        let report = Report::new(&samples);
        let row = report.rows.iter().find(|r| r.config == Config::TwtraceRecord).unwrap();
        assert!((row.ratio - 0.925).abs() < 1e-9, "{}", row.ratio);
        assert_eq!(row.ratio_range, (0.9, 0.95));
        assert_eq!(row.conn_per_s, 140.0);
        assert_eq!(row.ns_per_run, Some(250.0));
        // µs per connection: (1/90 - 1/100) and (1/190 - 1/200) seconds, their median.
        let added = (1e6 / 90.0 - 1e6 / 100.0 + 1e6 / 190.0 - 1e6 / 200.0) / 2.0;
        assert!((row.added_us_per_connection.unwrap() - added).abs() < 1e-6);
        let untraced = report.rows.iter().find(|r| r.config == Config::Untraced).unwrap();
        assert_eq!(untraced.ratio, 1.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn parses_tool_summaries() {
        let s = "twtrace: 123 events (10 time_wait, 0 failures), 123 shown, 7 lost, 0 undecodable";
        assert_eq!(s.split_whitespace().nth(1), Some("123"));
        assert_eq!(word_before(s, "lost"), Some(7.0));
        let r = "twtrace: recorded 5 events to /x (150 bytes, 30 bytes/event)";
        assert_eq!(word_before(r, "bytes/event)"), Some(30.0));
        assert_eq!(word_after("connections 10 failures 0 seconds 1.5", "seconds"), Some(1.5));
    }

    #[test]
    fn cpu_of_this_process_is_readable() {
        assert!(cpu_seconds(std::process::id()).is_some());
    }
}
