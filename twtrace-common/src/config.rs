//! Load-time knobs: where the running kernel keeps the fields the programs read.
//!
//! Userspace fills these from the kernel itself (tracepoint format files and BTF) and
//! writes them into the programs' read-only globals before loading, so nothing about a
//! particular kernel's layout is compiled into the eBPF object.

/// How much of its work the state hook does, for the benchmark's lower bounds only (the
/// hidden `--bench-cut` option): what a tracer of these events costs when it returns at
/// once, and when it delivers every event but attributes none. The value is a read-only
/// global: the verifier knows it and drops the branches not taken, so the default costs
/// a load and a jump per check.
pub mod state_hook_cut {
    /// The whole hook (the default).
    pub const NONE: u32 = 0;
    /// Return at entry: no event.
    pub const AT_ENTRY: u32 = 1;
    /// Send every event, without owners, time in state, namespace or connect tracking.
    pub const NO_OWNERS: u32 = 2;
}

/// How many bytes of the `sock:inet_sock_set_state` record the program copies at once;
/// every field must end within it (the record is 72 bytes from Linux 5.6 to 6.18).
pub const RECORD_BYTES: usize = 96;

/// Most event ring buffers: one per CPU, CPUs beyond this share them (CPU % rings).
pub const MAX_EVENT_RINGS: u32 = 64;

/// Size of the ring buffer the kernel is shown as the template of every event ring (the
/// real ones are created by userspace at `--ring-buffer-size`): small, a multiple of
/// every page size.
pub const EVENT_RING_TEMPLATE_BYTES: usize = 256 * 1024;

/// Byte offsets of the fields of the `sock:inet_sock_set_state` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    /// 1 before Linux 5.6 (`__u8 protocol`), 2 since.
    pub protocol_size: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
}

impl SockStateLayout {
    /// The record as every kernel since Linux 5.6 lays it out. The state hook for this
    /// layout has the offsets compiled in and loads the fields straight from the record.
    pub const USUAL: Self = Self {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        protocol_size: 2,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
    };
}

/// Byte offsets of the `tcp:tcp_receive_reset` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLayout {
    pub skaddr: u16,
    /// Nonzero when the tracepoint exists and is attached.
    pub present: u16,
}

/// Byte offsets of the `syscalls:sys_enter_connect`/`bind`/`getsockopt` records (`fd`,
/// the user address: the socket address, or getsockopt's `optval`; getsockopt's `level`
/// and `optname`) and of `sys_exit_*` (`ret`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallLayout {
    pub enter_fd: u16,
    pub enter_addr: u16,
    pub exit_ret: u16,
    pub enter_level: u16,
    pub enter_optname: u16,
    pub _pad: [u16; 3],
}

impl SyscallLayout {
    /// No tracepoint: every hook using it stays idle.
    pub const EMPTY: Self = Self {
        enter_fd: 0,
        enter_addr: 0,
        exit_ret: 0,
        enter_level: 0,
        enter_optname: 0,
        _pad: [0; 3],
    };
}

/// Offsets inside kernel structures, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `offsetof(struct sock, __sk_common.skc_net)`: the `struct net *` of the socket.
    pub sock_net: u32,
    /// `offsetof(struct net, ns.inum)`: the namespace inode number `ip netns` and
    /// `/proc/PID/ns/net` show.
    pub net_ns_inum: u32,
    /// File descriptor to socket, for failures of sockets that never changed state:
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`,
    /// `file.private_data`, `socket.sk`, `sock.sk_protocol` (a u16 since Linux 5.6).
    /// `fd_walk` is 0 when any of them is unavailable.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sock_protocol: u32,
    pub fd_walk: u32,
    /// `offsetof(struct net, ipv4.ip_local_ports.range)`; 0 when unavailable.
    pub net_port_range: u32,
    /// 1: `u32 range` (low | high << 16, Linux 6.3+); 2: `int range[2]` (before).
    pub port_range_format: u32,
    /// `offsetof(struct net, ipv4.sysctl_tcp_tw_reuse)`; 0 when unavailable.
    pub net_tw_reuse: u32,
    /// Size of `sysctl_tcp_tw_reuse`: 1 (u8, recent kernels) or 4 (int).
    pub tw_reuse_size: u32,
    /// A socket's own addresses (`struct sock_common`), for the port-search hooks that
    /// get only the socket: `skc_family`, `skc_daddr`, `skc_rcv_saddr`, `skc_dport`
    /// (network order), `skc_num` (host order), `skc_v6_daddr`, `skc_v6_rcv_saddr`.
    /// `sock_addrs` is 0 when any of them is unavailable.
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub sock_addrs: u32,
    /// `offsetof(struct sock, sk_err)`: the error a failing socket reports, set before the
    /// kernel moves it to CLOSE; 0 when unavailable.
    pub sock_err: u32,
    /// `offsetof(struct sock, sk_err_soft)`: the error an ICMP left while the owner held
    /// the socket lock, which getsockopt(SO_ERROR) returns when `sk_err` is 0; 0 when
    /// unavailable.
    pub sock_err_soft: u32,
    /// `offsetof(struct inet_sock, inet_sport)` (network order): the local port as the
    /// classic state tracepoint reports it. The kernel releases the port (`skc_num` = 0)
    /// before it moves a socket to CLOSE, so the `tp_btf` hook reads this one then; 0 when
    /// unavailable (the hook is then not used).
    pub inet_sport: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs of integers with no padding.
    unsafe impl aya::Pod for super::SockStateLayout {}
    unsafe impl aya::Pod for super::ResetLayout {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::SyscallLayout {}
}
