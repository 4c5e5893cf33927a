//! Hook on `tcp:tcp_receive_reset`: marks the socket so that its coming CLOSE from
//! FIN_WAIT2/CLOSING is not mistaken for an entry into TIME_WAIT.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use twtrace_common::counters;

use crate::maps::{RESET_LAYOUT, SOCKETS, count};

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let layout = RESET_LAYOUT.load();
    // SAFETY: offset from this kernel's format file for this record.
    let Ok(skaddr) = (unsafe { ctx.read_at::<u64>(layout.skaddr.into()) }) else {
        count(counters::READ_FAILED);
        return 0;
    };
    if let Some(entry) = SOCKETS.get_ptr_mut(&skaddr) {
        // SAFETY: map value pointer, valid while this program runs.
        unsafe { (*entry).reset_seen = 1 };
    }
    0
}
