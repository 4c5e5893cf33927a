//! The state hook's record of one socket (owner, last transition), shared with userspace,
//! which sweeps closed records out of the classic hooks' socket table.

use crate::Task;

/// Per socket: who owns it and when it last changed state.
///
/// A record is not deleted when its socket reaches CLOSE, only marked `closed`: the kernel
/// reuses socket memory at once, so the next socket at the same address takes the record
/// over in place. That spares a hash-map insert and delete per socket (~80 ns per state
/// change in the connect/close storm, docs/benchmarks.md). Userspace deletes closed
/// records when the table fills (`twtrace::socket_table`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketEntry {
    pub owner: Task,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the socket's last transition.
    pub last_change_ns: u64,
    /// A [`crate::Attribution`] value for `owner`.
    pub attribution: u8,
    /// An RST was received: the coming CLOSE does not enter TIME_WAIT.
    pub reset_seen: u8,
    /// 1 once the socket reached CLOSE: the record belongs to no live socket.
    pub closed: u8,
    pub _pad: u8,
    /// The socket's network namespace inode, read once per socket life.
    pub netns: u32,
}
const _: () = assert!(core::mem::size_of::<SocketEntry>() == 48);

#[cfg(feature = "user")]
// SAFETY: plain-old-data struct of integers with explicit padding.
unsafe impl aya::Pod for SocketEntry {}
