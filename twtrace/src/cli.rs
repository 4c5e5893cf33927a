//! Command-line interface definitions (clap derive); the doc comments are the help text.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use twtrace_common::tcp;

use crate::{event::Family, filter::Filter, loader, loader::PortSearchHooks};

/// Live-trace TCP state changes and TIME_WAIT, attributed to the real process.
///
/// twtrace attaches eBPF programs to the kernel's TCP state tracepoint and reports every
/// transition with the process that owns the socket, even when the kernel makes the
/// transition in softirq context (where other tools print pid 0 or a bystander).
/// Needs root (or CAP_BPF + CAP_PERFMON).
#[derive(Debug, Parser)]
#[command(
    name = "twtrace",
    version,
    propagate_version = true,
    max_term_width = 100
)]
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
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Print JSON Lines (one object per event) instead of aligned columns.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,
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
    pub fn to_filter(&self) -> Filter {
        Filter {
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
        }
    }
}

/// Kernel-side resources.
#[derive(Debug, Args)]
#[command(next_help_heading = "Kernel side")]
pub struct KernelArgs {
    /// Size of the event ring buffer: a power of two, e.g. 512K, 4M, 64M.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// How many live sockets the kernel-side owner table can track.
    #[arg(long, value_name = "N", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sockets: u32,

    /// How to hook the kernel's local-port search (`__inet_hash_connect`,
    /// `inet_csk_get_port`): `auto` tries fexit, then kprobes, then goes without (the
    /// syscall tracepoints still report the failures callers see).
    #[arg(long, value_name = "HOOKS", value_enum, default_value_t = PortSearchHooks::Auto)]
    pub port_search_hooks: PortSearchHooks,

    /// Read kernel structure layouts from this BTF file instead of /sys/kernel/btf/vmlinux.
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,
}

impl KernelArgs {
    pub fn to_options(&self, verbose: u8) -> loader::Options {
        loader::Options {
            ring_buffer_bytes: self.ring_buffer_size,
            max_sockets: self.max_sockets,
            btf: self.btf.clone(),
            port_search_hooks: self.port_search_hooks,
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

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let (digits, unit) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_owned(), 1u64 << 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_owned(), 1u64 << 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_owned(), 1u64 << 30),
        t => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512K, 4M or 1G"))?;
    let bytes = n.saturating_mul(unit);
    if !bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&bytes) {
        return Err(format!(
            "ring buffer size must be a power of two from 4K to 1G, got `{s}`"
        ));
    }
    Ok(bytes as u32)
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
        assert!(parse_ring_size("3M").is_err());
        assert!(parse_ring_size("1K").is_err());
        assert!(parse_ring_size("lots").is_err());
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
        let Command::Trace(args) = cli.command;
        let f = args.filter.to_filter();
        assert_eq!(f.pids, vec![1, 2]);
        assert_eq!(f.ports, vec![80]);
        assert_eq!(f.states, vec![tcp::TCP_TIME_WAIT]);
        assert_eq!(f.family, Some(Family::Ipv4));
        assert!(Cli::try_parse_from(["twtrace", "trace", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["twtrace", "trace", "--port", "70000"]).is_err());
    }
}
