//! Test support: network namespaces that clean up after themselves, and a running
//! `twtrace trace` whose output can be collected.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const TWTRACE: &str = env!("CARGO_BIN_EXE_twtrace");

/// A network namespace with loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name =
            format!("twtrace-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // RFC 1337: a TIME_WAIT socket ignores resets. On a slow emulated machine a FIN
        // is sometimes retransmitted; the peer, already closed, answers the second ACK
        // with a reset, which would kill the TIME_WAIT socket a test is about to count.
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_rfc1337=1"]);
        ns
    }

    /// Waits (bounded) until the kernel holds `n` TIME_WAIT sockets in the namespace: the
    /// last FIN of a scenario may be processed by ksoftirqd after the processes exited,
    /// late on a slow (emulated) machine.
    pub fn wait_for_time_wait(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let count = self.time_wait_count();
            if count >= n {
                // The list shows a timewait socket as soon as it is hashed, a moment
                // before the kernel moves the full socket to CLOSE (what twtrace reports).
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            if Instant::now() >= deadline {
                let tcp = self.kernel_sockets().join("\n");
                let counters = self.tcp_counters();
                panic!(
                    "only {count} of {n} sockets reached TIME_WAIT in 20 s ({counters}):\n{tcp}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until every connection in the namespace is over: only TIME_WAIT
    /// and listening sockets left (a LAST_ACK socket waits for the final ACK, which a slow
    /// machine may process after the processes exited).
    pub fn wait_until_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sockets = self.kernel_sockets();
            // State is the 4th column, in hex: 06 = TIME_WAIT, 0A = LISTEN.
            let busy = sockets
                .iter()
                .filter(|l| !matches!(l.split_whitespace().nth(3), Some("06" | "0A")))
                .count();
            if busy == 0 {
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{busy} connections still open after 20 s:\n{}",
                sockets.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// TIME_WAIT sockets in the namespace, as the kernel lists them.
    pub fn time_wait_count(&self) -> usize {
        // State is the 4th column, in hex: 06 = TIME_WAIT.
        self.kernel_sockets().iter().filter(|l| l.split_whitespace().nth(3) == Some("06")).count()
    }

    /// The namespace's TCP sockets (lines of /proc/net/tcp and tcp6, headers left out),
    /// read from inside it. This is the kernel's own list: `ss` reads the same through
    /// sock_diag, whose dump skipped a socket now and then on Debian's 6.12 when many
    /// other namespaces' TIME_WAIT sockets shared the hash table.
    pub fn kernel_sockets(&self) -> Vec<String> {
        self.read_proc_net(&["tcp", "tcp6"])
            .iter()
            .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    /// The namespace's TCP counters that explain a TIME_WAIT socket gone early: resets
    /// sent and received, retransmissions, overflows (from /proc/net/snmp and netstat).
    pub fn tcp_counters(&self) -> String {
        const NAMES: [&str; 6] =
            ["OutRsts", "RetransSegs", "EstabResets", "TW", "TWRecycled", "TCPTimeWaitOverflow"];
        let mut found = Vec::new();
        for text in self.read_proc_net(&["snmp", "netstat"]) {
            // Each protocol has a header line of names followed by a line of values.
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.chunks(2) {
                let [names, values] = pair else { continue };
                for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                    if NAMES.contains(&name) {
                        found.push(format!("{name}={value}"));
                    }
                }
            }
        }
        found.join(" ")
    }

    /// Reads /proc/net files as the namespace sees them, from a thread that joined it.
    fn read_proc_net(&self, files: &[&str]) -> Vec<String> {
        let path = self.path();
        let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: changes the network namespace of this short-lived thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            files
                .iter()
                .map(|f| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .unwrap_or_default()
                })
                .collect()
        })
        .join()
        .expect("reading the namespace's /proc/net")
    }

    /// Path to pass to setns(2).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The namespace's inode number, as twtrace reports it in `netns`.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).expect("netns path").ino()
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }
}

impl Netns {
    /// Sets a sysctl inside the namespace, e.g. `net.ipv4.tcp_tw_reuse`.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out =
        Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running `twtrace trace`, started and ready (its programs attached). Its output is
/// collected by reader threads so a full pipe can never stall it.
/// Waits (bounded: twtrace exits on any error) for the stderr line of `child` that starts
/// with `ready`; returns the rest of stderr and what came before, included.
pub fn wait_for_ready(
    child: &mut Child,
    ready: &str,
) -> (BufReader<std::process::ChildStderr>, String) {
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped"));
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).unwrap_or(0);
        seen.push_str(&line);
        if line.starts_with(ready) {
            return (stderr, seen);
        }
        if n == 0 || Instant::now() > deadline {
            let _ = child.kill();
            panic!("twtrace did not start (waited for {ready:?}): {seen}");
        }
    }
}

pub struct Tracer {
    child: Child,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr_start: String,
}

fn collect(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Tracer {
    pub fn start(args: &[&str]) -> Self {
        Self::start_command("trace", args)
    }

    /// `twtrace SUBCOMMAND ARGS` (trace or record), once it is attached.
    pub fn start_command(subcommand: &str, args: &[&str]) -> Self {
        let mut child = Command::new(TWTRACE)
            .arg(subcommand)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start twtrace");
        let stdout = collect(child.stdout.take().unwrap());
        let (stderr, seen) = wait_for_ready(&mut child, "twtrace: tracing");
        Self { child, stdout: Some(stdout), stderr: Some(collect(stderr)), stderr_start: seen }
    }

    /// Stops with `signal` and returns the exit status, stdout and the whole stderr.
    pub fn stop_with(mut self, signal: i32) -> Output {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("twtrace did not exit within 20 s of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let mut stderr = std::mem::take(&mut self.stderr_start).into_bytes();
        stderr.extend(self.stderr.take().unwrap().join().unwrap());
        Output { status, stdout, stderr }
    }

    pub fn stop(self) -> Output {
        self.stop_with(libc::SIGINT)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The nice value of each of twtrace's threads.
    pub fn thread_nice_values(&self) -> Vec<i32> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap();
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
            .map(|stat| {
                // Field 19 (nice); fields counted after the command name, which may hold
                // spaces, end with ')'.
                let after_comm = stat.rsplit_once(')').unwrap().1;
                after_comm.split_whitespace().nth(16).unwrap().parse().unwrap()
            })
            .collect()
    }

    /// How twtrace hooked the kernel's port search (`fexit`, `kprobe`, `none`), from its
    /// start-up line.
    pub fn port_search(&self) -> String {
        self.stderr_start
            .split("port search: ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("no port search in {:?}", self.stderr_start))
            .to_owned()
    }
}

/// Which kinds of port-search hooks this kernel allows, found once by starting twtrace
/// with each (fexit is refused on some kernels, kprobes are compiled out of others).
pub struct PortSearchSupport {
    pub fexit: bool,
    pub kprobe: bool,
}

impl PortSearchSupport {
    pub fn get() -> &'static Self {
        static SUPPORT: std::sync::OnceLock<PortSearchSupport> = std::sync::OnceLock::new();
        SUPPORT.get_or_init(|| Self { fexit: can_start("fexit"), kprobe: can_start("kprobe") })
    }

    pub fn has(&self, mode: &str) -> bool {
        match mode {
            "fexit" => self.fexit,
            "kprobe" => self.kprobe,
            _ => true,
        }
    }

    /// What `--port-search-hooks auto` should choose here.
    pub fn best(&self) -> &'static str {
        if self.fexit {
            "fexit"
        } else if self.kprobe {
            "kprobe"
        } else {
            "none"
        }
    }
}

fn can_start(mode: &str) -> bool {
    let mut child = Command::new(TWTRACE)
        .args(["trace", "--json", "--netns", "1", "--port-search-hooks", mode])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start twtrace");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut ready = false;
    let mut line = String::new();
    // Bounded: twtrace prints its start line or exits with an error.
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        if line.starts_with("twtrace: tracing") {
            ready = true;
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    ready
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses JSON Lines output.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits for a child with a deadline, asserting success, and returns its stdout.
/// Whether this kernel counts the runs of classic tracepoint programs it skips (a
/// tracepoint firing inside another BPF program on the same CPU): Linux 6.7 and later.
/// Before, such events are lost without a trace (twtrace finds the ones in the middle of
/// a socket's transitions as gaps, not the last).
pub fn kernel_counts_skipped_runs() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

pub fn wait_output(mut child: Child, what: &str) -> String {
    wait_ok(&mut child, what);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout piped"), &mut out)
        .unwrap();
    out
}

/// Waits for a child with a deadline, asserting success.
pub fn wait_ok(child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
