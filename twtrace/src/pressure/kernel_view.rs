//! What the kernel of one network namespace knows right now: its local port range, TIME_WAIT
//! settings and counters, and every TCP socket (sock_diag), read from inside that namespace.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, anyhow, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_TIME_WAIT},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::pressure::{
    aggregator::SnapshotSocket,
    view::{NetnsContext, TcpExt},
};

/// One namespace as the kernel sees it now.
#[derive(Clone, Debug)]
pub struct NetnsView {
    pub context: NetnsContext,
    /// Every TCP socket, as sock_diag reports it.
    pub sockets: Vec<SnapshotSocket>,
}

const OWN_NETNS: &str = "/proc/self/ns/net";
/// Where `ip netns add` bind-mounts the namespaces it names.
const NAMED_NETNS_DIR: &str = "/run/netns";

/// Where a namespace can be entered from: inode -> path, taken from `/proc/self/ns/net`,
/// `/run/netns/*` (bind mounts made by `ip netns add`) and `/proc/[0-9]*/ns/net`, in that
/// order; the first path found for an inode wins. Unreadable entries are skipped.
pub fn find_netns() -> BTreeMap<u32, PathBuf> {
    let mut found = BTreeMap::new();
    // Every namespace file lives on nsfs; a leftover plain file in /run/netns does not.
    let nsfs_dev = fs::metadata(OWN_NETNS).ok().map(|meta| meta.dev());
    let mut add = |path: PathBuf| {
        if let Some(inode) = netns_inode(&path, nsfs_dev) {
            found.entry(inode).or_insert(path);
        }
    };

    add(PathBuf::from(OWN_NETNS));

    if let Ok(entries) = fs::read_dir(NAMED_NETNS_DIR) {
        let mut named: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        named.sort();
        named.into_iter().for_each(&mut add);
    }

    if let Ok(entries) = fs::read_dir("/proc") {
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            add(PathBuf::from(format!("/proc/{pid}/ns/net")));
        }
    }
    found
}

/// The namespace inode behind `path`, if it is a namespace file (on nsfs).
fn netns_inode(path: &Path, nsfs_dev: Option<u64>) -> Option<u32> {
    let meta = fs::metadata(path).ok()?;
    if Some(meta.dev()) != nsfs_dev {
        return None;
    }
    u32::try_from(meta.ino()).ok()
}

/// Enters the namespace at `path` on a short-lived helper thread (setns(CLONE_NEWNET) only
/// affects that thread; it is joined before returning), and there reads
/// `net.ipv4.ip_local_port_range`, `tcp_tw_reuse`, `tcp_max_tw_buckets`, the TIME_WAIT
/// counters of TcpExt, and dumps all TCP sockets (IPv4 and IPv6, all states) through a
/// NETLINK_SOCK_DIAG socket opened on that thread, so it belongs to that namespace.
///
/// Settings and counters that cannot be read are left `None` (logged at debug level); failing
/// to enter the namespace or to dump its sockets is an error.
pub fn read_netns(inode: u32, path: &Path) -> anyhow::Result<NetnsView> {
    let netns = fs::File::open(path).with_context(|| {
        format!(
            "opening network namespace file {} (needs root; if its process exited or the \
             namespace was deleted, look it up again with find_netns)",
            path.display()
        )
    })?;
    let found = netns
        .metadata()
        .with_context(|| format!("reading the inode of network namespace file {}", path.display()))?
        .ino();
    if found != u64::from(inode) {
        bail!(
            "{} is now network namespace {found}, not {inode} (its process was replaced); look \
             the namespace up again with find_netns",
            path.display()
        );
    }

    let helper = std::thread::Builder::new()
        .name("twtrace-netns".into())
        .spawn(move || read_inside(inode, &netns))
        .context("starting the helper thread that enters the network namespace")?;
    helper
        .join()
        .map_err(|_| anyhow!("the helper thread reading network namespace {inode} panicked"))?
        .with_context(|| format!("reading network namespace {inode} ({})", path.display()))
}

/// Runs on the helper thread: enters `netns`, then reads everything from inside it.
fn read_inside(inode: u32, netns: &fs::File) -> anyhow::Result<NetnsView> {
    // Already there (twtrace's own namespace): no setns, so no CAP_SYS_ADMIN needed.
    let here = fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).ok();
    // SAFETY: `netns` is an open file for the duration of the call; setns changes only the
    // network namespace of this helper thread, which ends after this function.
    if here != Some(u64::from(inode))
        && unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0
    {
        return Err(std::io::Error::last_os_error()).context(
            "setns(CLONE_NEWNET) failed: entering a network namespace needs CAP_SYS_ADMIN \
             (run twtrace as root), and the file must be a network namespace",
        );
    }

    // /proc/sys/net resolves against the calling thread's namespace; /proc/net is
    // /proc/self/net, which is the main thread's, so the counters come from thread-self.
    let context = NetnsContext {
        netns: inode,
        port_range: optional(inode, read_sysctl("ip_local_port_range", parse_port_range)),
        tcp_tw_reuse: optional(inode, read_sysctl("tcp_tw_reuse", parse_number)),
        tcp_max_tw_buckets: optional(inode, read_sysctl("tcp_max_tw_buckets", parse_number)),
        tcpext: optional(inode, read_parsed("/proc/thread-self/net/netstat", parse_tcpext)),
    };

    let mut diag = SockDiag::open()?;
    let mut sockets = diag.dump_tcp(AF_INET)?;
    sockets.extend(diag.dump_tcp(AF_INET6)?);
    Ok(NetnsView { context, sockets })
}

fn optional<T>(inode: u32, value: anyhow::Result<T>) -> Option<T> {
    value.map_err(|err| log::debug!("network namespace {inode}: {err:#}")).ok()
}

fn read_sysctl<T>(name: &str, parse: impl FnOnce(&str) -> anyhow::Result<T>) -> anyhow::Result<T> {
    read_parsed(&format!("/proc/sys/net/ipv4/{name}"), parse)
        .with_context(|| format!("reading sysctl net.ipv4.{name}"))
}

fn read_parsed<T>(path: &str, parse: impl FnOnce(&str) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {path} (is /proc mounted and readable?)"))?;
    parse(&text).with_context(|| format!("parsing {path}"))
}

/// `ip_local_port_range`: two numbers, e.g. `"32768\t60999\n"`.
fn parse_port_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let mut fields = text.split_whitespace();
    let (Some(low), Some(high), None) = (fields.next(), fields.next(), fields.next()) else {
        bail!("expected two port numbers, found {text:?}");
    };
    let port = |field: &str| {
        field.parse::<u16>().with_context(|| format!("{field:?} is not a port number"))
    };
    Ok((port(low)?, port(high)?))
}

/// A sysctl holding one number.
fn parse_number<T>(text: &str) -> anyhow::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text = text.trim();
    text.parse().with_context(|| format!("{text:?} is not a number in range"))
}

/// The TIME_WAIT counters out of `/proc/net/netstat`, which comes as pairs of lines: a
/// `TcpExt:` line of names, then a `TcpExt:` line of values.
fn parse_tcpext(text: &str) -> anyhow::Result<TcpExt> {
    let mut counters = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(names) = line.strip_prefix("TcpExt:") else { continue };
        let values = lines
            .next()
            .and_then(|line| line.strip_prefix("TcpExt:"))
            .context("a TcpExt line of names is not followed by its line of values")?;
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if names.len() != values.len() {
            bail!("TcpExt has {} names but {} values", names.len(), values.len());
        }
        for (name, value) in names.into_iter().zip(values) {
            let value: u64 = value
                .parse()
                .with_context(|| format!("TcpExt {name} value {value:?} is not a number"))?;
            counters.insert(name, value);
        }
    }
    let counter = |name: &str| {
        counters.get(name).copied().with_context(|| format!("TcpExt has no {name} counter"))
    };
    Ok(TcpExt {
        tw: counter("TW")?,
        tw_recycled: counter("TWRecycled")?,
        tw_killed: counter("TWKilled")?,
        time_wait_overflow: counter("TCPTimeWaitOverflow")?,
    })
}

/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Offset of `idiag_expires` in `struct inet_diag_msg` (after family, state, timer,
/// retrans and the 48-byte `inet_diag_sockid`).
const IDIAG_EXPIRES_OFFSET: usize = 52;
/// Dump datagrams are at most ~32 KiB (the kernel caps them by the largest read buffer).
const RECV_BUFFER: usize = 64 * 1024;

/// `idiag_expires` of one whole sock_diag response message (netlink header included).
/// netlink-packet-sock-diag reports TIME_WAIT timers without it, so it is read here.
fn idiag_expires(message: &[u8]) -> Option<u32> {
    let at = NLMSG_HDRLEN + IDIAG_EXPIRES_OFFSET;
    let bytes = message.get(at..at + 4)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// Splits one received datagram into its netlink messages (each `NLMSG_ALIGN`ed).
fn split_messages(datagram: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let length = rest
            .get(..4)
            .and_then(|bytes| bytes.try_into().ok())
            .map(|bytes| u32::from_ne_bytes(bytes) as usize)
            .context("netlink datagram ends inside a message header")?;
        if length < NLMSG_HDRLEN || length > rest.len() {
            bail!("netlink message claims {length} bytes but {} remain", rest.len());
        }
        messages.push(&rest[..length]);
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(messages)
}

/// A NETLINK_SOCK_DIAG socket of the calling thread's network namespace.
struct SockDiag {
    socket: Socket,
    sequence: u32,
}

impl SockDiag {
    fn open() -> anyhow::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context(
            "opening a NETLINK_SOCK_DIAG socket (the kernel needs CONFIG_INET_DIAG / the \
             inet_diag and tcp_diag modules)",
        )?;
        socket.bind_auto().context("binding the NETLINK_SOCK_DIAG socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the NETLINK_SOCK_DIAG socket to the kernel")?;
        Ok(Self { socket, sequence: 0 })
    }

    /// Dumps every TCP socket of one address family, reading the multipart reply until
    /// NLMSG_DONE.
    fn dump_tcp(&mut self, family: u8) -> anyhow::Result<Vec<SnapshotSocket>> {
        let name = if family == AF_INET { "IPv4" } else { "IPv6" };
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .with_context(|| format!("sending the {name} TCP socket dump request (sock_diag)"))?;

        let mut sockets = Vec::new();
        let mut datagram = Vec::with_capacity(RECV_BUFFER);
        loop {
            datagram.clear();
            let length = self
                .socket
                .recv(&mut datagram, libc::MSG_TRUNC)
                .with_context(|| format!("receiving the {name} TCP socket dump (sock_diag)"))?;
            if length > datagram.len() {
                bail!(
                    "a {name} TCP socket dump datagram of {length} bytes did not fit the \
                     {}-byte buffer (this is a twtrace bug)",
                    datagram.len()
                );
            }
            for message in split_messages(&datagram)
                .with_context(|| format!("malformed {name} TCP socket dump"))?
            {
                let parsed = NetlinkMessage::<SockDiagMessage>::deserialize(message)
                    .with_context(|| format!("decoding a {name} TCP socket dump message"))?;
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(sockets),
                    NetlinkPayload::Error(error) if error.code.is_none() => {}
                    NetlinkPayload::Error(error) => {
                        let error = error.to_io();
                        if error.raw_os_error() == Some(libc::ENOENT) {
                            // No sock_diag handler for this family (IPv6 compiled out, or
                            // tcp_diag not loaded): nothing to list; the views start from
                            // the events alone.
                            if family == AF_INET {
                                log::warn!(
                                    "the kernel cannot list TCP sockets (sock_diag: {error}; \
                                     load the tcp_diag module): TIME_WAIT counts start from zero"
                                );
                            }
                            return Ok(sockets);
                        }
                        return Err(error).with_context(|| {
                            format!(
                                "the kernel refused the {name} TCP socket dump (NLMSG_ERROR); \
                                 it needs root and the inet_diag/tcp_diag modules"
                            )
                        });
                    }
                    NetlinkPayload::Overrun(_) => {
                        bail!("the {name} TCP socket dump overran (NLMSG_OVERRUN); retry")
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        sockets.extend(snapshot(&response, message));
                    }
                    // Noop and other messages carry no socket.
                    _ => {}
                }
            }
        }
    }
}

/// The snapshot of one sock_diag response; `message` is its raw bytes.
fn snapshot(response: &InetResponse, message: &[u8]) -> Option<SnapshotSocket> {
    let header = &response.header;
    if header.family != AF_INET && header.family != AF_INET6 {
        return None;
    }
    let id = &header.socket_id;
    Some(SnapshotSocket {
        saddr: id.source_address,
        sport: id.source_port,
        daddr: id.destination_address,
        dport: id.destination_port,
        state: header.state,
        expires_ms: if header.state == TCP_TIME_WAIT { idiag_expires(message) } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert_eq!(parse_port_range(" 1024 65535").unwrap(), (1024, 65535));
        assert!(parse_port_range("32768\n").is_err());
        assert!(parse_port_range("1 2 3").is_err());
        assert!(parse_port_range("1024 70000").is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number::<u8>("2\n").unwrap(), 2);
        assert_eq!(parse_number::<u64>("262144\n").unwrap(), 262_144);
        assert!(parse_number::<u8>("300").is_err());
        assert!(parse_number::<u64>("").is_err());
    }

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv TW TWRecycled TWKilled PAWSActive TCPTimeWaitOverflow
TcpExt: 0 0 41 3 1 0 7
IpExt: InNoRoutes InTruncatedPkts TW
IpExt: 0 0 99
MPTcpExt: MPCapableSYNRX
MPTcpExt: 0
";

    #[test]
    fn tcpext() {
        assert_eq!(
            parse_tcpext(NETSTAT).unwrap(),
            TcpExt { tw: 41, tw_recycled: 3, tw_killed: 1, time_wait_overflow: 7 }
        );
    }

    #[test]
    fn tcpext_errors() {
        let missing = "TcpExt: TW TWRecycled TWKilled\nTcpExt: 1 2 3\n";
        assert!(
            format!("{:#}", parse_tcpext(missing).unwrap_err()).contains("TCPTimeWaitOverflow")
        );
        assert!(parse_tcpext("TcpExt: TW\n").is_err());
        assert!(parse_tcpext("TcpExt: TW TWKilled\nTcpExt: 1\n").is_err());
        assert!(parse_tcpext("TcpExt: TW\nTcpExt: x\n").is_err());
    }

    #[test]
    fn messages_split_on_aligned_lengths() {
        let mut datagram = Vec::new();
        datagram.extend_from_slice(&18u32.to_ne_bytes());
        datagram.extend_from_slice(&[0; 14]);
        datagram.extend_from_slice(&[0; 2]); // padding to 20
        datagram.extend_from_slice(&16u32.to_ne_bytes());
        datagram.extend_from_slice(&[0; 12]);
        let messages = split_messages(&datagram).unwrap();
        assert_eq!(messages.iter().map(|m| m.len()).collect::<Vec<_>>(), [18, 16]);

        assert!(split_messages(&[1, 0]).is_err());
        assert!(split_messages(&8u32.to_ne_bytes()).is_err());
        assert!(split_messages(&64u32.to_ne_bytes()).is_err());
    }

    #[test]
    fn expires_read_from_inet_diag_msg() {
        let mut message = vec![0u8; NLMSG_HDRLEN + 72];
        message[NLMSG_HDRLEN + 52..NLMSG_HDRLEN + 56].copy_from_slice(&59_123u32.to_ne_bytes());
        assert_eq!(idiag_expires(&message), Some(59_123));
        assert_eq!(idiag_expires(&message[..NLMSG_HDRLEN + 54]), None);
    }
}
