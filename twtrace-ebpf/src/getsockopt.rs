//! Hooks on `syscalls:sys_enter/exit_getsockopt`: the errno of a failed non-blocking
//! connect that its owner read with getsockopt(SOL_SOCKET, SO_ERROR) before the state
//! hook could (see `UNREPORTED_FAILURES` and `TAKEN_ERRORS`).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};

use twtrace_common::tcp::IPPROTO_TCP;

use crate::{
    connect::{resolve_async_failure, take_unreported_failure},
    kernel::current_socket,
    maps::{GETSOCKOPT_LAYOUT, PENDING_SO_ERROR, PendingSoError, TAKEN_ERRORS, TakenError},
};

const SOL_SOCKET: u64 = 1;
const SO_ERROR: u64 = 4;

#[tracepoint(category = "syscalls", name = "sys_enter_getsockopt")]
pub fn sys_enter_getsockopt(ctx: TracePointContext) -> u32 {
    let l = GETSOCKOPT_LAYOUT.load();
    // SAFETY: offsets from this kernel's format file for this record.
    let (Ok(level), Ok(optname)) = (unsafe {
        (ctx.read_at::<u64>(l.enter_level.into()), ctx.read_at::<u64>(l.enter_optname.into()))
    }) else {
        return 0;
    };
    if level != SOL_SOCKET || optname != SO_ERROR {
        return 0;
    }
    // SAFETY: as above.
    let (Ok(fd), Ok(optval)) = (unsafe {
        (ctx.read_at::<u64>(l.enter_fd.into()), ctx.read_at::<u64>(l.enter_addr.into()))
    }) else {
        return 0;
    };
    let call = PendingSoError { optval, fd: fd as u32, _pad: 0 };
    let _ = PENDING_SO_ERROR.insert(&bpf_get_current_pid_tgid(), &call, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_getsockopt")]
pub fn sys_exit_getsockopt(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: map value copied out before the entry is removed.
    let Some(call) = (unsafe { PENDING_SO_ERROR.get(&id) }).copied() else {
        return 0;
    };
    let _ = PENDING_SO_ERROR.remove(&id);
    let l = GETSOCKOPT_LAYOUT.load();
    // SAFETY: offset from this kernel's format file for this record.
    if unsafe { ctx.read_at::<i64>(l.exit_ret.into()) } != Ok(0) {
        return 0;
    }
    // SAFETY: a fault-tolerant read of the caller's memory, just written by the kernel.
    let errno = match unsafe { bpf_probe_read_user(call.optval as *const i32) } {
        Ok(e) if e > 0 => e as u32,
        _ => return 0,
    };
    let Some((skaddr, IPPROTO_TCP)) = current_socket(call.fd) else {
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut failure) = take_unreported_failure(skaddr, now) else {
        // Taken before the kernel moved the socket to CLOSE: the state hook pairs it.
        let taken = TakenError { ts_ns: now, errno, _pad: 0 };
        let _ = TAKEN_ERRORS.insert(&skaddr, &taken, 0);
        return 0;
    };
    failure.errno = errno;
    resolve_async_failure(&failure);
    0
}
