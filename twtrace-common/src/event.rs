//! Ring-buffer records. Every record starts with [`EventHeader`]; `kind` says which
//! payload follows and `version` lets a newer userspace read an older layout.

/// What a record is. Values are stable: they are also written to recordings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// A TCP state transition, as the kernel made it ([`SockStateEvent`]).
    State = 1,
    /// A full socket handed over to a timewait socket: the kernel's FIN_WAIT2/CLOSING ->
    /// CLOSE, reported as -> TIME_WAIT ([`SockStateEvent`] with `new_state` TIME_WAIT).
    TimeWait = 2,
    /// A failed connect() ([`FailureEvent`]).
    ConnectError = 3,
    /// A failed bind() of a TCP socket ([`FailureEvent`]).
    BindError = 4,
}

impl EventKind {
    /// Bytes of an event of this kind: a ring-buffer record may carry several events
    /// back to back (the state hook's per-CPU batches).
    pub const fn event_size(self) -> usize {
        match self {
            Self::State | Self::TimeWait => size_of::<SockStateEvent>(),
            Self::ConnectError | Self::BindError => size_of::<FailureEvent>(),
        }
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::State),
            2 => Some(Self::TimeWait),
            3 => Some(Self::ConnectError),
            4 => Some(Self::BindError),
            _ => None,
        }
    }
}

/// Common prefix of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u8,
    /// Layout version of the payload for this kind.
    pub version: u8,
    pub _pad: [u8; 2],
    /// CPU the event was produced on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 16);

/// A task as the kernel names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Task {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; 16],
    /// The task's cgroup v2 id (the inode of its cgroup directory): which container,
    /// pod or service it runs in.
    pub cgroup: u64,
}
const _: () = assert!(core::mem::size_of::<Task>() == 32);

/// How the process of an event was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Attribution {
    /// No owner known: the socket predates twtrace, or its tracking was lost.
    Unknown = 0,
    /// The transition ran in the owner's own context (connect, listen, close, shutdown).
    Current = 1,
    /// Taken from the socket table, recorded when the owner last acted on the socket.
    Owner = 2,
    /// An accepted connection the process has not acted on yet: the listener's owner.
    Listener = 3,
}

impl Attribution {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Current,
            2 => Self::Owner,
            3 => Self::Listener,
            _ => Self::Unknown,
        }
    }
}

/// Payload of [`EventKind::State`] and [`EventKind::TimeWait`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStateEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sock`: identifies the socket while it lives.
    pub skaddr: u64,
    /// Nanoseconds spent in `old_state`; 0 when unknown (socket seen for the first time).
    pub prev_state_ns: u64,
    /// The owning process, per `attribution`.
    pub task: Task,
    /// Network namespace inode number.
    pub netns: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub old_state: u8,
    pub new_state: u8,
    /// An [`Attribution`] value.
    pub attribution: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockStateEvent>() == 112);

impl SockStateEvent {
    /// 2: the task carries its cgroup id.
    pub const VERSION: u8 = 2;
}

/// Where a failure was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FailureSource {
    /// The return value of the connect() or bind() system call.
    Syscall = 1,
    /// The socket error of a non-blocking connect() that returned EINPROGRESS.
    Async = 2,
    /// The return value of `__inet_hash_connect` (local port search for connect()).
    HashConnect = 3,
    /// The return value of `inet_csk_get_port` (local port search for bind()/listen()).
    GetPort = 4,
}

impl FailureSource {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Syscall),
            2 => Some(Self::Async),
            3 => Some(Self::HashConnect),
            4 => Some(Self::GetPort),
            _ => None,
        }
    }
}

/// Payload of [`EventKind::ConnectError`] and [`EventKind::BindError`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sock`; 0 when unknown.
    pub skaddr: u64,
    /// The process that made the call (connect()/bind() run in the caller's context).
    pub task: Task,
    /// Network namespace inode number; 0 when unknown.
    pub netns: u32,
    /// Positive errno value, e.g. 99 for EADDRNOTAVAIL.
    pub errno: u32,
    /// AF_INET or AF_INET6 (of the address passed to the call).
    pub family: u16,
    /// Host byte order; 0 when no local port was assigned.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    /// A [`FailureSource`] value.
    pub source: u8,
    /// An [`Attribution`] value for `task`.
    pub attribution: u8,
    /// Network byte order; IPv4 uses the first 4 bytes. For bind_error, `saddr`/`sport`
    /// hold the local address asked for and `daddr`/`dport` are zero.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The namespace's `ip_local_port_range` and `tcp_tw_reuse` at the time of the
    /// failure, read from the kernel; valid when `settings_known` is nonzero.
    pub port_range_low: u16,
    pub port_range_high: u16,
    pub tcp_tw_reuse: u8,
    pub settings_known: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FailureEvent>() == 112);

impl FailureEvent {
    /// 2: the task carries its cgroup id.
    pub const VERSION: u8 = 2;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C) structs of integers and byte arrays with explicit padding.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::Task {}
    unsafe impl aya::Pod for super::SockStateEvent {}
    unsafe impl aya::Pod for super::FailureEvent {}
}
