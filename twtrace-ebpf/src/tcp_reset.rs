//! Hook on `tcp:tcp_receive_reset`: marks the socket so that its coming CLOSE from
//! FIN_WAIT2/CLOSING is not mistaken for an entry into TIME_WAIT. Two forms, matching the
//! two forms of the state hook's socket table (see `sock_state`).

use core::ffi::c_void;

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use twtrace_common::counters;

use crate::maps::{RESET_LAYOUT, SocketByAddress, SocketStorage, SocketTable, count};

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let layout = RESET_LAYOUT.load();
    // SAFETY: offset from this kernel's format file for this record.
    let Ok(skaddr) = (unsafe { ctx.read_at::<u64>(layout.skaddr.into()) }) else {
        count(counters::READ_FAILED);
        return 0;
    };
    mark_reset(&SocketByAddress(skaddr));
    0
}

/// `tp_btf` form: the argument is the socket itself.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    mark_reset(&SocketStorage(sk));
    0
}

#[inline(always)]
fn mark_reset(table: &impl SocketTable) {
    if let Some(entry) = table.get() {
        // SAFETY: map value pointer, valid while this program runs.
        unsafe { (*entry).reset_seen = 1 };
    }
}
