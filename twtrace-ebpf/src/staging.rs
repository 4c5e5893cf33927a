//! Batches state events per CPU (see `twtrace_common::staging`), and the program userspace
//! runs on each CPU to flush its batch before it reads the rings.
//!
//! A ring-buffer reservation costs about as much as the rest of the state hook together
//! (its lock, the positions the reader also touches), whatever the record's size; eight
//! events per reservation cut that to an eighth.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{Global, macros::raw_tracepoint, programs::RawTracePointContext};
use twtrace_common::{
    SockStateEvent, counters,
    staging::{STAGED_EVENTS, Staging},
};

use crate::maps::{STAGING, count_n, event_ring, wakeup_flags};

/// Whether to batch at all (set by userspace): not when every event must wake the reader
/// (`--wakeup-bytes 0`), nor on kernels that cannot run the flush on a given CPU.
#[unsafe(no_mangle)]
static BATCH_EVENTS: Global<u32> = Global::new(0);

/// Sends a state event: into this CPU's batch, which goes to the ring when full; straight
/// to the ring when the batch is in use (this program interrupted another on this CPU)
/// or batching is off.
#[inline(always)]
pub fn send_state_event(event: &SockStateEvent) {
    let Some(staging) = STAGING.get_ptr_mut(0) else {
        send_now(event);
        return;
    };
    if BATCH_EVENTS.load() == 0 {
        send_now(event);
        return;
    }
    // SAFETY: this CPU's slot. Programs on one CPU run one at a time except when one
    // interrupts another; `busy` keeps an interrupting one out of the batch.
    unsafe {
        let busy = &raw mut (*staging).busy;
        if busy.read_volatile() != 0 {
            send_now(event);
            return;
        }
        busy.write_volatile(1);
        // The batch is touched only between the flag's two writes.
        compiler_fence(Ordering::SeqCst);
        let held = (*staging).count as usize;
        if let Some(slot) = (*staging).events.get_mut(held) {
            *slot = *event;
            (*staging).count = held as u32 + 1;
        }
        if held + 1 >= STAGED_EVENTS {
            flush(staging);
        }
        compiler_fence(Ordering::SeqCst);
        busy.write_volatile(0);
    }
}

/// Copies the batch to this CPU's ring and empties it.
///
/// # Safety
/// `staging` is this CPU's slot and its `busy` flag is set by the caller.
#[inline(always)]
unsafe fn flush(staging: *mut Staging) {
    // SAFETY: see above.
    unsafe {
        let held = ((*staging).count as usize).min(STAGED_EVENTS);
        (*staging).count = 0;
        if held == 0 {
            return;
        }
        let bytes = held * size_of::<SockStateEvent>();
        let sent = event_ring().is_some_and(|ring| {
            let events =
                core::slice::from_raw_parts((&raw const (*staging).events).cast::<u8>(), bytes);
            ring.output_untyped::<[u8]>(events, wakeup_flags(bytes)).is_ok()
        });
        if !sent {
            count_n(counters::RINGBUF_FULL, held as u64);
        }
    }
}

/// One event straight to the ring.
#[inline(always)]
fn send_now(event: &SockStateEvent) {
    let sent = event_ring().is_some_and(|ring| {
        ring.output_untyped(event, wakeup_flags(size_of::<SockStateEvent>())).is_ok()
    });
    if !sent {
        count_n(counters::RINGBUF_FULL, 1);
    }
}

/// Flushes this CPU's batch. Never attached: userspace runs it on each CPU that holds
/// events (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`, Linux 5.10+) before it
/// reads the rings, so no event waits in a batch longer than between two reads.
#[raw_tracepoint(tracepoint = "twtrace_flush")]
pub fn flush_staged_events(_ctx: RawTracePointContext) -> i32 {
    let Some(staging) = STAGING.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; see send_state_event for `busy`.
    unsafe {
        let busy = &raw mut (*staging).busy;
        if busy.read_volatile() != 0 {
            // This runs in an interrupt that came in the middle of a program adding to
            // the batch: leave it; userspace sees the batch still held and waits.
            return 1;
        }
        busy.write_volatile(1);
        compiler_fence(Ordering::SeqCst);
        flush(staging);
        compiler_fence(Ordering::SeqCst);
        busy.write_volatile(0);
    }
    0
}
