//! Load-time knobs: where the running kernel keeps the fields the programs read.
//!
//! Userspace fills these from the kernel itself (tracepoint format files and BTF) and
//! writes them into the programs' read-only globals before loading, so nothing about a
//! particular kernel's layout is compiled into the eBPF object.

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

/// Byte offsets of the `tcp:tcp_receive_reset` tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLayout {
    pub skaddr: u16,
    /// Nonzero when the tracepoint exists and is attached.
    pub present: u16,
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
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs of integers with no padding.
    unsafe impl aya::Pod for super::SockStateLayout {}
    unsafe impl aya::Pod for super::ResetLayout {}
    unsafe impl aya::Pod for super::KernelLayout {}
}
