//! Hook on `sock:inet_sk_error_report`: the errno of a failing TCP socket (e.g.
//! ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH), paired with the socket's SYN_SENT -> CLOSE
//! through [`ASYNC_FAILURE`] to report failed non-blocking connects.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use twtrace_common::{counters, tcp::IPPROTO_TCP};

use crate::{
    connect::resolve_async_failure,
    maps::{ASYNC_FAILURE, ERROR_REPORT_LAYOUT, count},
};

#[tracepoint(category = "sock", name = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    if try_inet_sk_error_report(&ctx).is_err() {
        count(counters::READ_FAILED);
    }
    0
}

fn try_inet_sk_error_report(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = ERROR_REPORT_LAYOUT.load();
    // SAFETY (all read_at): offsets from this kernel's format file for this record.
    let protocol = unsafe {
        if layout.protocol_size == 1 {
            u16::from(ctx.read_at::<u8>(layout.protocol.into())?)
        } else {
            ctx.read_at::<u16>(layout.protocol.into())?
        }
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: offsets from this kernel's format file for this record.
    let (errno, sport, dport) = unsafe {
        (
            ctx.read_at::<i32>(layout.error.into())?.unsigned_abs(),
            ctx.read_at::<u16>(layout.sport.into())?,
            ctx.read_at::<u16>(layout.dport.into())?,
        )
    };
    if errno == 0 {
        return Ok(());
    }
    let Some(slot) = ASYNC_FAILURE.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU meanwhile.
    unsafe {
        if (*slot).close_waiting != 0
            && (*slot).close.sport == sport
            && (*slot).close.dport == dport
        {
            (*slot).close_waiting = 0;
            resolve_async_failure(&(*slot).close, errno);
        } else {
            (*slot).error_errno = errno;
            (*slot).error_sport = sport;
            (*slot).error_dport = dport;
        }
    }
    Ok(())
}
