//! Indices of the kernel-side counters (a per-CPU array named `COUNTERS`): everything the
//! programs could not do is counted here, so userspace can report it instead of losing it.

/// Ring buffer full: an event could not be reserved and was dropped.
pub const RINGBUF_FULL: u32 = 0;
/// Socket table full (classic hooks) or no memory for socket storage (tp_btf): a socket
/// could not be tracked, so its owner and state durations are unknown for later transitions.
pub const SOCKET_TABLE_FULL: u32 = 1;
/// Listener table full: accepted connections on that port cannot inherit the listener's owner.
pub const LISTENER_TABLE_FULL: u32 = 2;
/// A tracepoint argument could not be read (bpf_probe_read failed).
pub const READ_FAILED: u32 = 3;

/// In-flight connect()/bind() table full: the oldest call was forgotten.
pub const SYSCALL_TABLE_FULL: u32 = 4;

/// Number of counters the programs keep; the size of the `COUNTERS` map.
pub const KERNEL_COUNT: u32 = 5;

/// Runs of twtrace's programs the kernel skipped (`recursion_misses`: a program was
/// already running on that CPU, e.g. interrupted by a softirq): events never seen.
/// Userspace reads it from the kernel's per-program statistics, not from `COUNTERS`.
pub const SKIPPED_RUNS: u32 = 5;

/// Number of counters reported to the user and recorded.
pub const COUNT: u32 = 6;

/// Human names, indexed like the counters above.
pub const NAMES: [&str; COUNT as usize] = [
    "ring buffer full (events dropped)",
    "socket table full (owner unknown)",
    "listener table full (accepted owner unknown)",
    "tracepoint read failures",
    "in-flight connect/bind table evictions",
    "program runs skipped by the kernel (events missed)",
];
