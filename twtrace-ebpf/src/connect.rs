//! Hooks on `syscalls:sys_enter/exit_connect` and `sys_enter/exit_bind`: failed connect()
//! and bind() calls on TCP sockets, with the caller, the address asked for and the errno.
//!
//! Entry remembers the call in [`PENDING_CALLS`]; the state hook adds what it sees of the
//! socket meanwhile (which socket, the local address picked, an error that arrived before
//! a non-blocking connect returned); exit reports a failure.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use twtrace_common::{
    Attribution, EventKind, FailureEvent, FailureSource, counters,
    tcp::{AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    kernel::{current_socket, socket_netns},
    maps::{
        BIND_LAYOUT, CALL_BIND, CALL_CONNECT, CONNECT_LAYOUT, PAIRING_WINDOW_NS, PENDING_CALLS,
        PendingCall, UNREPORTED_FAILURES, count,
    },
    sock_state::{current_task, emit_failure},
};

const EBADF: u32 = 9;
const ENOTSOCK: u32 = 88;
const EALREADY: u32 = 114;
const EINPROGRESS: u32 = 115;
const EISCONN: u32 = 106;

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let layout = CONNECT_LAYOUT.load();
    remember_call(&ctx, CALL_CONNECT, layout.enter_fd, layout.enter_addr);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let layout = CONNECT_LAYOUT.load();
    let Some((call, errno)) = finish_call(&ctx, layout.exit_ret) else {
        return 0;
    };
    // The kernel's port search failed and its hook already said so, from the source.
    if call.reported != 0 {
        return 0;
    }
    if errno == EINPROGRESS {
        // Non-blocking: a failure that already arrived (on loopback, before connect()
        // even returned) was parked here by the state hook; a later one is reported there.
        if call.async_errno != 0 {
            report(
                &call,
                EventKind::ConnectError,
                FailureSource::Async,
                call.async_errno,
                call.skaddr,
            );
        }
        return 0;
    }
    // Progress reports of a non-blocking connect, and calls on things that are not sockets.
    if matches!(errno, EALREADY | EISCONN | EBADF | ENOTSOCK) {
        return 0;
    }
    // A socket this call moved to SYN_SENT is TCP; otherwise look at the socket itself.
    let skaddr = if call.skaddr != 0 {
        call.skaddr
    } else {
        match current_socket(call.fd) {
            Some((sk, IPPROTO_TCP)) => sk,
            _ => return 0,
        }
    };
    report(&call, EventKind::ConnectError, FailureSource::Syscall, errno, skaddr);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    let layout = BIND_LAYOUT.load();
    remember_call(&ctx, CALL_BIND, layout.enter_fd, layout.enter_addr);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let layout = BIND_LAYOUT.load();
    let Some((call, errno)) = finish_call(&ctx, layout.exit_ret) else {
        return 0;
    };
    if call.reported != 0 || matches!(errno, EBADF | ENOTSOCK) {
        return 0;
    }
    if let Some((sk, IPPROTO_TCP)) = current_socket(call.fd) {
        report(&call, EventKind::BindError, FailureSource::Syscall, errno, sk);
    }
    0
}

/// A failed non-blocking connect, found by the state hook: parked in the connect() call
/// still in progress on the owning thread (its exit reports it, with the errno it
/// returns), or reported now (the call returned EINPROGRESS before the failure).
#[inline(always)]
pub fn resolve_async_failure(failure: &FailureEvent) {
    let owner_id = (u64::from(failure.task.pid) << 32) | u64::from(failure.task.tid);
    if let Some(call) = PENDING_CALLS.get_ptr_mut(&owner_id) {
        // SAFETY: map value pointer, valid while this program runs.
        unsafe {
            if (*call).skaddr == failure.skaddr {
                (*call).saddr = failure.saddr;
                (*call).sport = failure.sport;
                (*call).async_errno = failure.errno;
                return;
            }
        }
    }
    if failure.errno != 0 {
        // SAFETY: no preconditions.
        emit_failure(EventKind::ConnectError, failure, unsafe { bpf_ktime_get_ns() });
    }
}

/// The failure waiting in [`UNREPORTED_FAILURES`] for `skaddr`, if recent enough to be
/// this socket's; taken out of the table.
#[inline(always)]
pub fn take_unreported_failure(skaddr: u64, now: u64) -> Option<FailureEvent> {
    // SAFETY: map value copied out before the entry is removed.
    let failure = unsafe { UNREPORTED_FAILURES.get(&skaddr) }.copied()?;
    let _ = UNREPORTED_FAILURES.remove(&skaddr);
    (now.saturating_sub(failure.header.ts_ns) < PAIRING_WINDOW_NS).then_some(failure)
}

/// Records an inet connect()/bind() call at entry.
#[inline(always)]
fn remember_call(ctx: &TracePointContext, kind: u8, fd_offset: u16, addr_offset: u16) {
    // SAFETY: offsets from this kernel's format file for this record.
    let (fd, uaddr) = unsafe {
        match (ctx.read_at::<u64>(fd_offset.into()), ctx.read_at::<u64>(addr_offset.into())) {
            (Ok(fd), Ok(addr)) => (fd as u32, addr),
            _ => {
                count(counters::READ_FAILED);
                return;
            }
        }
    };
    // struct sockaddr_in / sockaddr_in6: family, port (network order), then the address
    // at byte 4 (IPv4) or 8 (IPv6, after the flow label).
    // SAFETY: fault-tolerant reads of the caller's memory.
    let Ok(family) = (unsafe { bpf_probe_read_user(uaddr as *const u16) }) else {
        return;
    };
    let mut call = PendingCall {
        call: kind,
        reported: 0,
        family,
        port: 0,
        sport: 0,
        fd,
        async_errno: 0,
        skaddr: 0,
        addr: [0; 16],
        saddr: [0; 16],
    };
    let port = unsafe { bpf_probe_read_user((uaddr + 2) as *const u16) };
    call.port = u16::from_be(port.unwrap_or(0));
    match family {
        AF_INET => {
            if let Ok(a) = unsafe { bpf_probe_read_user((uaddr + 4) as *const [u8; 4]) } {
                call.addr[..4].copy_from_slice(&a);
            }
        }
        AF_INET6 => {
            if let Ok(a) = unsafe { bpf_probe_read_user((uaddr + 8) as *const [u8; 16]) } {
                call.addr = a;
            }
        }
        // AF_UNSPEC (disconnect), AF_UNIX and others: not ours.
        _ => return,
    }
    if PENDING_CALLS.insert(&bpf_get_current_pid_tgid(), &call, 0).is_err() {
        count(counters::SYSCALL_TABLE_FULL);
    }
}

/// Takes the call remembered at entry; returns it with the positive errno when it failed.
#[inline(always)]
fn finish_call(ctx: &TracePointContext, ret_offset: u16) -> Option<(PendingCall, u32)> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: map value copied out before the entry is removed.
    let call = unsafe { *PENDING_CALLS.get(&id)? };
    let _ = PENDING_CALLS.remove(&id);
    // SAFETY: offset from this kernel's format file for this record.
    let ret = unsafe { ctx.read_at::<i64>(ret_offset.into()) }.ok()?;
    (ret < 0).then(|| (call, ret.unsigned_abs() as u32))
}

#[inline(always)]
fn report(call: &PendingCall, kind: EventKind, source: FailureSource, errno: u32, skaddr: u64) {
    let is_bind = kind == EventKind::BindError;
    let failure = FailureEvent {
        header: Default::default(),
        skaddr,
        task: current_task(),
        netns: socket_netns(skaddr),
        errno,
        family: call.family,
        // For bind() the address asked for is the local one.
        sport: if is_bind { call.port } else { call.sport },
        dport: if is_bind { 0 } else { call.port },
        source: source as u8,
        attribution: Attribution::Current as u8,
        saddr: if is_bind { call.addr } else { call.saddr },
        daddr: if is_bind { [0; 16] } else { call.addr },
        ..Default::default()
    };
    // SAFETY: no preconditions.
    emit_failure(kind, &failure, unsafe { bpf_ktime_get_ns() });
}
