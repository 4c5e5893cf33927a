//! The per-CPU batch in which the state hook gathers events before it copies them to its
//! CPU's ring buffer in one go; userspace reads it to know what is still held there.

use crate::SockStateEvent;

/// Events per batch: one ring-buffer reservation (~110 ns on the test machine, whatever
/// the size) then carries eight events instead of one.
pub const STAGED_EVENTS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Staging {
    /// Nonzero while a program on this CPU is adding to or flushing the batch: a program
    /// that interrupts it (a softirq, the flush run from userspace) sends its event
    /// straight to the ring instead.
    pub busy: u32,
    /// Events held, at most [`STAGED_EVENTS`].
    pub count: u32,
    pub events: [SockStateEvent; STAGED_EVENTS],
}

impl Staging {
    /// Timestamp of the oldest event held, if any.
    pub fn oldest_ns(&self) -> Option<u64> {
        (self.count > 0).then(|| self.events[0].header.ts_ns)
    }
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data struct of integers and events with no implicit padding.
unsafe impl aya::Pod for Staging {}
