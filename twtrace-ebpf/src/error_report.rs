//! Hook on the raw tracepoint `inet_sk_error_report`: the errno of a connecting socket
//! closed on an error the state hook did not see (see [`UNREPORTED_FAILURES`]).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};

use crate::{
    connect::{resolve_async_failure, take_unreported_failure},
    kernel::socket_error,
    maps::UNREPORTED_FAILURES,
};

#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(const struct sock *sk)
    let skaddr: u64 = ctx.arg(0);
    // SAFETY: map lookup only.
    if unsafe { UNREPORTED_FAILURES.get(&skaddr) }.is_none() {
        return 0;
    }
    // Gone already when the owner took it first: its getsockopt(SO_ERROR) will tell.
    let errno = socket_error(skaddr);
    if errno == 0 {
        return 0;
    }
    // SAFETY: no preconditions.
    let Some(mut failure) = take_unreported_failure(skaddr, unsafe { bpf_ktime_get_ns() }) else {
        return 0;
    };
    failure.errno = errno;
    resolve_async_failure(&failure);
    0
}
