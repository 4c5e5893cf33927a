//! Maps and load-time globals shared by the hooks: the event ring buffer, the socket
//! table (owner and last transition per socket), the listener table and the counters.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use twtrace_common::{
    Task,
    config::{KernelLayout, ResetLayout, SockStateLayout},
    counters,
};

/// Events to userspace. Size set by userspace (`--ring-buffer-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// What the kernel side could not do, per CPU (see `twtrace_common::counters`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

/// Per live socket: who owns it and when it last changed state. Keyed by `struct sock *`.
/// Entries are removed when the socket reaches CLOSE, so the table holds live sockets only.
/// Size set by userspace (`--max-sockets`).
#[map]
pub static SOCKETS: HashMap<u64, SocketEntry> = HashMap::with_max_entries(65536, 0);

/// Owners of listening sockets, keyed by [`listener_key`]: accepted connections inherit
/// them until the accepting process acts on the connection itself.
#[map]
pub static LISTENERS: HashMap<u64, Task> = HashMap::with_max_entries(4096, 0);

#[unsafe(no_mangle)]
pub static SOCK_STATE_LAYOUT: Global<SockStateLayout> = Global::new(SockStateLayout {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    sport: 0,
    dport: 0,
    family: 0,
    protocol: 0,
    protocol_size: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
});

#[unsafe(no_mangle)]
pub static RESET_LAYOUT: Global<ResetLayout> = Global::new(ResetLayout {
    skaddr: 0,
    present: 0,
});

#[unsafe(no_mangle)]
pub static KERNEL_LAYOUT: Global<KernelLayout> = Global::new(KernelLayout {
    sock_net: 0,
    net_ns_inum: 0,
});

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketEntry {
    pub owner: Task,
    /// `bpf_ktime_get_ns()` of the socket's last transition.
    pub last_change_ns: u64,
    /// A `twtrace_common::Attribution` value for `owner`.
    pub attribution: u8,
    /// An RST was received: the coming CLOSE does not enter TIME_WAIT.
    pub reset_seen: u8,
    pub _pad: [u8; 6],
}

pub const fn listener_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}
