//! Command-line interface definitions (clap derive); the doc comments are the help text.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use twtrace_common::tcp;

use crate::{
    event::Family,
    filter::Filter,
    loader,
    loader::{PortSearchHooks, StateHooks},
    priority,
    session::writer::Rotation,
};

/// Live-trace TCP state changes and TIME_WAIT, attributed to the real process.
///
/// twtrace attaches eBPF programs to the kernel's TCP state tracepoint and reports every
/// transition with the process that owns the socket, even when the kernel makes the
/// transition in softirq context (where other tools print pid 0 or a bystander).
/// Needs root (or CAP_BPF + CAP_PERFMON).
#[derive(Debug, Parser)]
#[command(name = "twtrace", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// More diagnostics on stderr (-v: info, -vv: debug, -vvv: trace, kernel side included).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream TCP state transitions until Ctrl-C.
    ///
    /// A socket that closes first and enters TIME_WAIT is reported as one `time_wait`
    /// event (FIN_WAIT2 -> TIME_WAIT or CLOSING -> TIME_WAIT) in place of the kernel's
    /// FIN_WAIT2/CLOSING -> CLOSE of the full socket. Failed connect() and bind() calls on
    /// TCP sockets are reported as `connect_error` / `bind_error` with the errno.
    ///
    /// Examples:
    ///   twtrace trace                       every transition, human-readable
    ///   twtrace trace --state TIME_WAIT     who is filling the machine with TIME_WAIT
    ///   twtrace trace --json --port 5432    JSON Lines for one service port
    ///   twtrace trace --failed              failed connects (EADDRNOTAVAIL, ECONNREFUSED…)
    #[command(verbatim_doc_comment)]
    Trace(TraceArgs),

    /// Record events to a file until Ctrl-C or the end of --duration.
    ///
    /// The file is twtrace's compact binary format (docs/recording-format.md), created
    /// mode 0600. It survives crashes: after a kill or a power loss, everything written
    /// up to about a second before is readable. Read it with `replay` or `export`.
    ///
    /// Examples:
    ///   twtrace record -o night.twtrace --duration 8h
    ///   twtrace record -o cap.twtrace --rotate 100MB --keep 20 --failed
    #[command(verbatim_doc_comment)]
    Record(RecordArgs),

    /// Print a recording as `trace` printed it live (same formats, same filters).
    ///
    /// Examples:
    ///   twtrace replay night.twtrace --state TIME_WAIT
    ///   twtrace replay cap.*.twtrace --json --failed
    #[command(verbatim_doc_comment)]
    Replay(ReplayArgs),

    /// Print a shell completion script, e.g. `twtrace completions bash > /etc/bash_completion.d/twtrace`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the manual page (roff), e.g. `twtrace man | man -l -`.
    Man,

    /// Live port pressure per destination, full-screen (q quits, s changes the sort).
    ///
    /// Local ports run out per (netns, source IP, destination IP, destination port): a
    /// closed connection holds its port in TIME_WAIT for 60 s. `top` starts from the
    /// sockets that exist (sock_diag), follows every change, and shows per destination the
    /// ports in use, the headroom left, connections per second, failures, the process
    /// driving it and when the range runs out at this rate.
    ///
    /// Examples:
    ///   twtrace top
    ///   twtrace top --once            print the table once (also when stdout is not a TTY)
    ///   twtrace top --once --json     the same as one JSON document
    #[command(verbatim_doc_comment)]
    Top(TopArgs),

    /// Port-pressure analysis of recordings: table, advice, and a chart.
    ///
    /// Examples:
    ///   twtrace report night.twtrace
    ///   twtrace report night.twtrace --json
    ///   twtrace report night.twtrace --html night.html
    #[command(verbatim_doc_comment)]
    Report(ReportArgs),

    /// Run as a daemon: port pressure and failures as Prometheus metrics.
    ///
    /// Serves /metrics on --metrics-addr (loopback by default: say 0.0.0.0 yourself to
    /// expose it). Optionally records (--write, with --rotate/--keep). SIGHUP re-reads
    /// --filters FILE; SIGTERM or Ctrl-C flush everything and exit 0. See deploy/ for a
    /// systemd unit, a Kubernetes DaemonSet and a Grafana dashboard.
    ///
    /// Examples:
    ///   twtrace serve
    ///   twtrace serve --metrics-addr 0.0.0.0:9477 --write /var/lib/twtrace/tw.twtrace --rotate 100MB --keep 10
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),

    /// Convert a recording to JSON Lines or CSV.
    ///
    /// Examples:
    ///   twtrace export night.twtrace --format csv -o night.csv
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Print JSON Lines (one object per event) instead of aligned columns.
    #[arg(long)]
    pub json: bool,

    /// Also record the events shown to this file (see `twtrace record`).
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,

    #[command(flatten)]
    pub recording: RecordingArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print the table once, after one --interval, and exit (the default when stdout is
    /// not a terminal).
    #[arg(long)]
    pub once: bool,

    /// With --once: print one JSON document (destinations, namespaces) instead of the table.
    #[arg(long, requires = "once")]
    pub json: bool,

    /// Seconds between refreshes.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,

    /// Seconds between corrections of the model from the kernel's socket list.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconcile: u64,

    /// Only destinations in this network namespace (inode, as in `ls -iL /run/netns/NAME`); repeatable.
    #[arg(long, value_name = "INODE")]
    pub netns: Vec<u32>,

    #[command(flatten)]
    pub workloads: WorkloadArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// Which processes' connections to keep, by cgroup or container (`trace`, `top`, …).
#[derive(Debug, Args, Default)]
pub struct WorkloadArgs {
    /// Only processes in this cgroup or below it, e.g. /system.slice/nginx.service (as in
    /// /proc/PID/cgroup; comma-separated).
    #[arg(long, value_name = "PATH", value_delimiter = ',')]
    pub cgroup: Vec<String>,

    /// Only processes in this container: a container id prefix (docker, containerd,
    /// cri-o, podman; 4+ characters) or a Kubernetes pod UID (comma-separated).
    #[arg(long, value_name = "ID", value_delimiter = ',')]
    pub container: Vec<String>,
}

impl WorkloadArgs {
    pub fn to_filter(&self) -> anyhow::Result<crate::container::WorkloadFilter> {
        crate::container::WorkloadFilter::new(&self.cgroup, &self.container)
            .map_err(|e| anyhow::anyhow!("--cgroup/--container: {e}"))
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds between 0.1 and 3600")),
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to serve the metrics (HTTP, path /metrics).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9477")]
    pub metrics_addr: std::net::SocketAddr,

    /// Destinations exported per metric, most pressed first; the rest are summed under
    /// daddr="other" (keeps Prometheus's series count bounded).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub top: usize,

    /// Filter options as for `trace`, read from this file (any number per line, `#`
    /// comments) on start and again on SIGHUP; added to those on the command line.
    #[arg(long, value_name = "FILE")]
    pub filters: Option<PathBuf>,

    /// Also record the events to this file (see `twtrace record`).
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,

    /// Do not turn on the kernel's BPF run statistics (twtrace_bpf_run_*): they add a
    /// clock read to every BPF program run on the host, not only twtrace's.
    #[arg(long)]
    pub no_bpf_stats: bool,

    #[command(flatten)]
    pub recording: RecordingArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Recordings, in order (rotated files: all of them).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Print the report as one JSON document.
    #[arg(long)]
    pub json: bool,

    /// Also write the chart as an SVG image.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,

    /// Also write a self-contained HTML page (chart and report).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The recording to write (replaced if it exists).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Stop after this long, e.g. 30s, 10m, 8h.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<DurationArg>,

    #[command(flatten)]
    pub recording: RecordingArgs,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// How recordings are written.
#[derive(Debug, Args, Clone, Copy)]
#[command(next_help_heading = "Recording")]
pub struct RecordingArgs {
    /// Start a new file after this size (e.g. 100MB) or age (e.g. 1h). Files are then
    /// numbered: FILE.0001.twtrace, FILE.0002.twtrace, …
    #[arg(long, value_name = "SIZE|AGE")]
    pub rotate: Option<Rotation>,

    /// With --rotate, keep only the newest N files, so a long capture cannot fill the disk.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub keep: u32,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Recordings to read, in order (rotated files: FILE.*.twtrace).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Print JSON Lines instead of aligned columns.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Recordings to read, in order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,

    /// Write here instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// JSON Lines, the schema of `trace --json`.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// Splits `100MB` into `(100, "MB")`; `None` without a leading number.
pub(crate) fn number_and_unit(s: &str) -> Option<(u64, &str)> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    Some((digits.parse().ok()?, unit))
}

/// A duration like `30s`, `10m`, `8h` (or plain seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg(std::time::Duration);

impl From<DurationArg> for std::time::Duration {
    fn from(d: DurationArg) -> Self {
        d.0
    }
}

impl std::str::FromStr for DurationArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = number_and_unit(s)
            .ok_or_else(|| format!("`{s}` is not a duration like 30s, 10m or 8h"))?;
        let secs = match unit {
            "" | "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            _ => return Err(format!("`{s}`: use s, m or h, e.g. 30s, 10m, 8h")),
        };
        if secs == 0 {
            return Err("the duration must be at least 1s".into());
        }
        Ok(Self(std::time::Duration::from_secs(secs)))
    }
}

/// Event filters shared by the commands that print events.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only events of these process ids (comma-separated).
    #[arg(long, value_name = "PID", value_delimiter = ',')]
    pub pid: Vec<u32>,

    /// Only events of processes with this command name (exact, as in /proc/PID/comm).
    #[arg(long, value_name = "COMM")]
    pub comm: Vec<String>,

    /// Only sockets with this local or remote port (comma-separated).
    #[arg(long, value_name = "PORT", value_delimiter = ',')]
    pub port: Vec<u16>,

    /// Only sockets with this remote address (IPv4 or IPv6; comma-separated).
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub daddr: Vec<IpAddr>,

    /// Only transitions into these states, e.g. TIME_WAIT, CLOSE, SYN_SENT (comma-separated).
    #[arg(long, value_name = "STATE", value_delimiter = ',', value_parser = parse_state)]
    pub state: Vec<u8>,

    /// Only sockets in these network namespaces (inode numbers, as `ls -iL /proc/PID/ns/net`).
    #[arg(long, value_name = "INODE", value_delimiter = ',')]
    pub netns: Vec<u32>,

    #[command(flatten)]
    pub workloads: WorkloadArgs,

    /// Only failures: connect() and bind() errors (connect_error, bind_error events).
    /// With --state, the states asked for are shown too.
    #[arg(long)]
    pub failed: bool,

    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

impl FilterArgs {
    pub fn to_filter(&self) -> anyhow::Result<Filter> {
        Ok(Filter {
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            ports: self.port.clone(),
            daddrs: self.daddr.clone(),
            states: self.state.clone(),
            family: if self.ipv4 {
                Some(Family::Ipv4)
            } else if self.ipv6 {
                Some(Family::Ipv6)
            } else {
                None
            },
            netns: self.netns.clone(),
            failed: self.failed,
            workloads: self.workloads.to_filter()?,
        })
    }
}

/// Kernel-side resources.
#[derive(Debug, Args)]
#[command(next_help_heading = "Kernel side")]
pub struct KernelArgs {
    /// Size of the event ring buffers together (one per CPU, up to 64, each an equal
    /// power-of-two share): a power of two, e.g. 512K, 4M, 64M.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// Bytes a CPU writes to its ring buffer before the kernel wakes twtrace (0: on every
    /// event, as other tracers do), e.g. 64K; at most half a CPU's ring buffer. Default: an
    /// eighth of a CPU's ring buffer, at most 256K; twtrace also drains every 50 ms, so
    /// events never wait much longer than that.
    #[arg(long, value_name = "BYTES", value_parser = parse_wakeup_bytes)]
    pub wakeup_bytes: Option<u32>,

    /// How many live sockets the kernel-side owner table can track (preallocated, ~100
    /// bytes each; not used with --state-hooks tp-btf).
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sockets: u32,

    /// How to hook the kernel's local-port search (`__inet_hash_connect`,
    /// `inet_csk_get_port`): `auto` tries fexit, then kprobes, then goes without (the
    /// syscall tracepoints still report the failures callers see).
    #[arg(long, value_name = "HOOKS", value_enum, default_value_t = PortSearchHooks::Auto)]
    pub port_search_hooks: PortSearchHooks,

    /// How to hook TCP state changes: `tracepoint` keeps owners in a table of
    /// --max-sockets entries (cheapest); `tp-btf` keeps each in its socket (Linux 5.11+: no
    /// table to size, for hosts with more live sockets than that; ~150 ns more per change).
    #[arg(long, value_name = "HOOKS", value_enum, default_value_t = StateHooks::Tracepoint)]
    pub state_hooks: StateHooks,

    /// Read kernel structure layouts from this BTF file instead of /sys/kernel/btf/vmlinux.
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,

    /// Nice value of twtrace's threads, from -20 (runs first) to 19 (runs last). The
    /// default lets the traced services' threads run before twtrace's when both want a
    /// CPU: tracing then delays them less, while the ring buffers hold the events (should
    /// a starved twtrace ever fall behind, the lost events are counted and reported). 0
    /// competes on equal terms.
    #[arg(long, value_name = "N", default_value_t = priority::DEFAULT_NICE,
          allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,

    /// For the benchmark's lower bounds only (hidden): the state hook skips its work.
    #[arg(long, value_name = "CUT", value_enum, hide = true)]
    pub bench_cut: Option<loader::BenchCut>,
}

impl KernelArgs {
    pub fn to_options(&self, verbose: u8) -> loader::Options {
        loader::Options {
            ring_buffer_bytes: self.ring_buffer_size,
            max_sockets: self.max_sockets,
            btf: self.btf.clone(),
            port_search_hooks: self.port_search_hooks,
            state_hooks: self.state_hooks,
            wakeup_bytes: self.wakeup_bytes,
            bench_cut: self.bench_cut,
            // aya-log levels: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
            kernel_log_level: 2 + verbose.min(3),
        }
    }
}

fn parse_state(s: &str) -> Result<u8, String> {
    tcp::state_from_name(s).ok_or_else(|| {
        format!(
            "unknown TCP state `{s}`; expected one of ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, \
             FIN_WAIT2, TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING"
        )
    })
}

/// A byte count, plain or with a K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_owned(), 1u64 << 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_owned(), 1u64 << 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_owned(), 1u64 << 30),
        t => (t, 1),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size like 512K, 4M or 1G"))?;
    Ok(n.saturating_mul(unit))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if !bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&bytes) {
        return Err(format!("ring buffer size must be a power of two from 4K to 1G, got `{s}`"));
    }
    Ok(bytes as u32)
}

fn parse_wakeup_bytes(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    u32::try_from(bytes)
        .ok()
        .filter(|&b| b <= 1 << 30)
        .ok_or_else(|| format!("wakeup bytes must be at most 1G, got `{s}`"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4M"), Ok(4 << 20));
        assert_eq!(parse_ring_size("512k"), Ok(512 << 10));
        assert_eq!(parse_ring_size("65536"), Ok(65536));
        assert_eq!(parse_wakeup_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_wakeup_bytes("0"), Ok(0));
        assert_eq!(parse_wakeup_bytes("1000"), Ok(1000));
        assert!(parse_wakeup_bytes("2G").is_err());
        assert!(parse_wakeup_bytes("lots").is_err());
        assert!(parse_ring_size("3M").is_err());
        assert!(parse_ring_size("1K").is_err());
        assert!(parse_ring_size("lots").is_err());
    }

    #[test]
    fn recording_options_parse() {
        let cli = Cli::try_parse_from([
            "twtrace",
            "record",
            "-o",
            "x.twtrace",
            "--duration",
            "10m",
            "--rotate",
            "100MB",
            "--keep",
            "3",
        ])
        .unwrap();
        let Command::Record(args) = cli.command else { panic!() };
        assert_eq!(args.duration, Some(DurationArg(std::time::Duration::from_secs(600))));
        assert_eq!(args.recording.rotate, Some(Rotation::Size(100 << 20)));
        assert_eq!(args.recording.keep, 3);
        assert!(Cli::try_parse_from(["twtrace", "record"]).is_err(), "-o is required");
        assert!(Cli::try_parse_from(["twtrace", "record", "-o", "x", "--duration", "0s"]).is_err());
        assert!(Cli::try_parse_from(["twtrace", "replay"]).is_err(), "a file is required");
        assert!(Cli::try_parse_from(["twtrace", "export", "x", "--format", "xml"]).is_err());
    }

    #[test]
    fn states_by_kernel_name() {
        assert_eq!(parse_state("TIME_WAIT"), Ok(tcp::TCP_TIME_WAIT));
        assert_eq!(parse_state("time_wait"), Ok(tcp::TCP_TIME_WAIT));
        assert_eq!(parse_state("TCP_CLOSE"), Ok(tcp::TCP_CLOSE));
        assert!(parse_state("WAITING").is_err());
    }

    #[test]
    fn filters_parse() {
        let cli = Cli::try_parse_from([
            "twtrace",
            "trace",
            "--pid",
            "1,2",
            "--port",
            "80",
            "--state",
            "TIME_WAIT",
            "-4",
            "--daddr",
            "::1",
        ])
        .unwrap();
        let Command::Trace(args) = cli.command else { panic!() };
        let f = args.filter.to_filter().unwrap();
        assert_eq!(f.pids, vec![1, 2]);
        assert_eq!(f.ports, vec![80]);
        assert_eq!(f.states, vec![tcp::TCP_TIME_WAIT]);
        assert_eq!(f.family, Some(Family::Ipv4));
        assert!(Cli::try_parse_from(["twtrace", "trace", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["twtrace", "trace", "--port", "70000"]).is_err());
    }
}
