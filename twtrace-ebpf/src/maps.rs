//! Maps and load-time globals shared by the hooks: the per-CPU event ring buffers and
//! batches, the socket table (owner and last transition per socket), the listener table
//! and the counters.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::{ArrayOfMaps, RingBuf, SkStorage},
    helpers::{bpf_get_smp_processor_id, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use twtrace_common::{
    FailureEvent, SocketEntry, Task,
    config::{
        EVENT_RING_TEMPLATE_BYTES, KernelLayout, MAX_EVENT_RINGS, RECORD_BYTES, ResetLayout,
        SockStateLayout, SyscallLayout,
    },
    counters,
    staging::Staging,
};

/// One ring buffer of events.
pub type EventRing = RingBuf<u8, EVENT_RING_TEMPLATE_BYTES>;

/// Events to userspace: a ring buffer per CPU (up to [`MAX_EVENT_RINGS`]), created and
/// sized by userspace (`--ring-buffer-size`). One ring shared by all CPUs costs each
/// event ~45 ns more in a connect/close storm: its lock and positions bounce between the
/// CPUs of the two ends. Userspace merges the rings back into time order.
#[btf_map]
pub static EVENT_RINGS: ArrayOfMaps<EventRing, { MAX_EVENT_RINGS as usize }> = ArrayOfMaps::new();

/// How many of [`EVENT_RINGS`] userspace filled.
#[unsafe(no_mangle)]
pub static EVENT_RING_COUNT: Global<u32> = Global::new(1);

/// This CPU's event ring (`None` only if userspace did not fill the array).
#[inline(always)]
pub fn event_ring() -> Option<&'static EventRing> {
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    EVENT_RINGS.get(cpu % EVENT_RING_COUNT.load().max(1))
}

/// Wake userspace only once this CPU wrote this many bytes since it last did (0: on every
/// event). A wakeup per event is what makes other tracers expensive under load; userspace
/// also drains on a short timer, so a quiet trace still shows its events promptly.
#[unsafe(no_mangle)]
pub static WAKEUP_BYTES: Global<u32> = Global::new(0);

/// Bytes this CPU submitted since its last wakeup. Counted here rather than asked of the
/// ring (`bpf_ringbuf_query`): a per-CPU slot is cheaper than the helper call and the
/// ring's positions, which the reader on another CPU writes.
#[map]
static UNANNOUNCED_BYTES: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The flags for submitting an event of `size` bytes: see [`WAKEUP_BYTES`].
#[inline(always)]
pub fn wakeup_flags(size: usize) -> u64 {
    let threshold = WAKEUP_BYTES.load();
    if threshold == 0 {
        return 0;
    }
    let Some(pending) = UNANNOUNCED_BYTES.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
    unsafe {
        *pending += size as u32;
        if *pending >= threshold {
            *pending = 0;
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

// From include/uapi/linux/bpf.h.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// This CPU's batch of state events on their way to its ring (see `staging`).
#[map]
pub static STAGING: PerCpuArray<Staging> = PerCpuArray::with_max_entries(1, 0);

/// What the kernel side could not do, per CPU (see `twtrace_common::counters`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::KERNEL_COUNT, 0);

/// Scratch space for the state hook's copy of its tracepoint record, one per CPU.
#[map]
pub static RECORD: PerCpuArray<[u8; RECORD_BYTES]> = PerCpuArray::with_max_entries(1, 0);

/// Per socket: who owns it and when it last changed state. Keyed by `struct sock *`.
/// Entries are marked closed at CLOSE rather than deleted (see [`SocketEntry`]); userspace
/// sweeps them out when the table fills. Size set by userspace (`--max-sockets`).
#[map]
pub static SOCKETS: HashMap<u64, SocketEntry> = HashMap::with_max_entries(65536, 0);

/// Entries the state hook added to [`SOCKETS`], per CPU: with the entries userspace swept
/// out, how full the table is (a hash map has no cheap count).
#[map]
pub static SOCKETS_ADDED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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
pub static RESET_LAYOUT: Global<ResetLayout> = Global::new(ResetLayout { skaddr: 0, present: 0 });

#[unsafe(no_mangle)]
pub static KERNEL_LAYOUT: Global<KernelLayout> = Global::new(KernelLayout {
    sock_net: 0,
    net_ns_inum: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    sock_protocol: 0,
    fd_walk: 0,
    net_port_range: 0,
    port_range_format: 0,
    net_tw_reuse: 0,
    tw_reuse_size: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    sock_addrs: 0,
    sock_err: 0,
    sock_err_soft: 0,
    inet_sport: 0,
});

/// Arguments of a port search in progress (kprobe entry to kretprobe), keyed by
/// `bpf_get_current_pid_tgid()`.
#[map]
pub static PORT_SEARCHES: HashMap<u64, PortSearch> = HashMap::with_max_entries(4096, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PortSearch {
    pub sk: u64,
    /// The port asked for (inet_csk_get_port's `snum`; 0 = any).
    pub port: u16,
    pub _pad: [u8; 6],
}

/// connect() and bind() calls in flight, keyed by `bpf_get_current_pid_tgid()`: what the
/// caller asked for, and what the state hook learnt about the socket meanwhile.
#[map]
pub static PENDING_CALLS: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

#[unsafe(no_mangle)]
pub static CONNECT_LAYOUT: Global<SyscallLayout> = Global::new(SyscallLayout::EMPTY);

#[unsafe(no_mangle)]
pub static BIND_LAYOUT: Global<SyscallLayout> = Global::new(SyscallLayout::EMPTY);

#[unsafe(no_mangle)]
pub static GETSOCKOPT_LAYOUT: Global<SyscallLayout> = Global::new(SyscallLayout::EMPTY);

/// getsockopt(SOL_SOCKET, SO_ERROR) calls in flight, keyed by `bpf_get_current_pid_tgid()`:
/// the descriptor and where the error will be written.
#[map]
pub static PENDING_SO_ERROR: HashMap<u64, PendingSoError> = HashMap::with_max_entries(4096, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingSoError {
    pub optval: u64,
    pub fd: u32,
    pub _pad: u32,
}

pub const CALL_CONNECT: u8 = 1;
pub const CALL_BIND: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    /// `CALL_CONNECT` or `CALL_BIND`.
    pub call: u8,
    /// A port-search hook already reported this call's failure.
    pub reported: u8,
    /// Address family of the address passed in.
    pub family: u16,
    /// Port passed in (host order).
    pub port: u16,
    /// Local port the kernel picked, when the state hook saw it.
    pub sport: u16,
    pub fd: u32,
    /// Socket error of a connect that failed before the call returned EINPROGRESS.
    pub async_errno: u32,
    /// The socket, once the state hook saw this call move it (CLOSE -> SYN_SENT).
    pub skaddr: u64,
    /// Address passed in (network order).
    pub addr: [u8; 16],
    /// Local address the kernel picked, when the state hook saw it.
    pub saddr: [u8; 16],
}

/// The socket table in the socket itself: with the `tp_btf` hooks (Linux 5.11+) each
/// socket carries its [`SocketEntry`] as socket-local storage, found through the socket
/// without hashing, and freed by the kernel with the socket. Replaces [`SOCKETS`] there.
#[btf_map]
pub static SOCKET_STORAGE: SkStorage<SocketEntry> = SkStorage::new();

/// Where the state hook keeps one socket's [`SocketEntry`]: [`SOCKETS`] keyed by address
/// (classic tracepoints) or [`SOCKET_STORAGE`] (`tp_btf`). Neither deletes an entry when
/// its socket closes: the state hook marks it closed, and the next socket at the same
/// address (or, for storage, the same socket leaving CLOSE again) takes it over.
pub trait SocketTable {
    /// The entry at the socket's address or in the socket, if any (possibly closed).
    fn get(&self) -> Option<*mut SocketEntry>;
    /// Gives the socket its first entry; `false` when the table is full.
    fn insert(&self, entry: &SocketEntry) -> bool;
}

/// A socket's entry in [`SOCKETS`], by `struct sock *` address.
pub struct SocketByAddress(pub u64);

impl SocketTable for SocketByAddress {
    #[inline(always)]
    fn get(&self) -> Option<*mut SocketEntry> {
        SOCKETS.get_ptr_mut(&self.0)
    }

    #[inline(always)]
    fn insert(&self, entry: &SocketEntry) -> bool {
        if SOCKETS.insert(&self.0, entry, 0).is_err() {
            return false;
        }
        if let Some(added) = SOCKETS_ADDED.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
            unsafe { *added += 1 };
        }
        true
    }
}

/// A socket's entry in [`SOCKET_STORAGE`]. Holds the `struct sock *` a `tp_btf` program
/// received as its argument: the helpers accept only that typed pointer, not an address.
pub struct SocketStorage(pub *mut c_void);

impl SocketStorage {
    #[inline(always)]
    fn storage(&self, init: *mut SocketEntry, flags: u64) -> Option<*mut SocketEntry> {
        // aya-ebpf's SkStorage accessors take a sock_addr context only; the map is the
        // static's address, as for every BTF map.
        let map = core::ptr::from_ref(&SOCKET_STORAGE).cast_mut().cast::<c_void>();
        // SAFETY: `self.0` is the socket the tracepoint passed; the helper checks the rest.
        let entry = unsafe { bpf_sk_storage_get(map, self.0, init.cast(), flags) };
        (!entry.is_null()).then_some(entry.cast())
    }
}

impl SocketTable for SocketStorage {
    #[inline(always)]
    fn get(&self) -> Option<*mut SocketEntry> {
        self.storage(core::ptr::null_mut(), 0)
    }

    #[inline(always)]
    fn insert(&self, entry: &SocketEntry) -> bool {
        let init = core::ptr::from_ref(entry).cast_mut();
        self.storage(init, u64::from(BPF_SK_STORAGE_GET_F_CREATE)).is_some()
    }
}

pub const fn listener_key(netns: u32, port: u16) -> u64 {
    ((netns as u64) << 16) | port as u64
}

#[inline(always)]
pub fn count(index: u32) {
    count_n(index, 1);
}

#[inline(always)]
pub fn count_n(index: u32, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *slot += n };
    }
}

/// Connecting sockets the kernel closed on an error that was already gone when the state
/// hook looked (the owner took it with getsockopt(SO_ERROR) between the kernel setting
/// it and moving the socket to CLOSE: seen on 6.12 under QEMU), keyed by socket address.
/// The failure waits here for the owner's getsockopt or the socket's error report. LRU:
/// an entry that neither completes is simply pushed out.
#[map]
pub static UNREPORTED_FAILURES: LruHashMap<u64, FailureEvent> =
    LruHashMap::with_max_entries(1024, 0);

/// Socket errors owners took with getsockopt(SO_ERROR) before the state hook saw the
/// socket close, keyed by socket address: `(errno, when)`. LRU, like the above.
#[map]
pub static TAKEN_ERRORS: LruHashMap<u64, TakenError> = LruHashMap::with_max_entries(1024, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TakenError {
    pub ts_ns: u64,
    pub errno: u32,
    pub _pad: u32,
}

/// How long an entry of [`UNREPORTED_FAILURES`] or [`TAKEN_ERRORS`] stays valid: its
/// other half comes within microseconds; an older one belongs to an earlier socket at the
/// same address.
pub const PAIRING_WINDOW_NS: u64 = 1_000_000_000;
