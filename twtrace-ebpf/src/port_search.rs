//! Hooks on the kernel's local-port search, where port exhaustion actually happens:
//! `__inet_hash_connect` (connect() without bind(): a port per destination) and
//! `inet_csk_get_port` (bind(), listen() autobind). A failure is reported from the source,
//! whoever called it (a syscall, io_uring, the kernel itself).
//!
//! Two ways in, chosen by userspace at start-up by what the kernel allows: fexit (one
//! program per function, return value and arguments together) or kprobe + kretprobe
//! (arguments saved at entry in [`PORT_SEARCHES`]). Some kernels allow neither; the
//! syscall tracepoints (connect.rs) then catch the failures the callers see.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use twtrace_common::{
    Attribution, EventKind, FailureEvent, FailureSource, counters,
    tcp::{AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    kernel::socket_netns,
    maps::{
        CALL_BIND, CALL_CONNECT, KERNEL_LAYOUT, PENDING_CALLS, PORT_SEARCHES, PortSearch, count,
    },
    sock_state::{current_task, emit_failure},
};

const EADDRINUSE: u32 = 98;

#[fexit(function = "__inet_hash_connect")]
pub fn hash_connect_fexit(ctx: FExitContext) -> u32 {
    let ret: i32 = ctx.ret().unwrap_or(0);
    if ret < 0 {
        // __inet_hash_connect(death_row, sk, ...): the socket is the second argument.
        let sk: u64 = ctx.arg(1);
        report(sk, ret.unsigned_abs(), FailureSource::HashConnect, 0);
    }
    0
}

#[fexit(function = "inet_csk_get_port")]
pub fn get_port_fexit(ctx: FExitContext) -> u32 {
    let ret: i32 = ctx.ret().unwrap_or(0);
    if ret != 0 {
        let sk: u64 = ctx.arg(0);
        let snum: u64 = ctx.arg(1);
        report(sk, get_port_errno(ret), FailureSource::GetPort, snum as u16);
    }
    0
}

#[kprobe(function = "__inet_hash_connect")]
pub fn hash_connect_entry(ctx: ProbeContext) -> u32 {
    remember(ctx.arg(1), 0);
    0
}

#[kretprobe(function = "__inet_hash_connect")]
pub fn hash_connect_return(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    if let Some(search) = take() {
        if ret < 0 {
            report(search.sk, ret.unsigned_abs(), FailureSource::HashConnect, 0);
        }
    }
    0
}

#[kprobe(function = "inet_csk_get_port")]
pub fn get_port_entry(ctx: ProbeContext) -> u32 {
    let snum: u64 = ctx.arg(1).unwrap_or(0);
    remember(ctx.arg(0), snum as u16);
    0
}

#[kretprobe(function = "inet_csk_get_port")]
pub fn get_port_return(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    if let Some(search) = take() {
        if ret != 0 {
            report(search.sk, get_port_errno(ret), FailureSource::GetPort, search.port);
        }
    }
    0
}

/// inet_csk_get_port returned 1 for "in use" before Linux 4.6, a negative errno since.
#[inline(always)]
fn get_port_errno(ret: i32) -> u32 {
    if ret > 0 { EADDRINUSE } else { ret.unsigned_abs() }
}

#[inline(always)]
fn remember(sk: Option<u64>, port: u16) {
    let Some(sk) = sk else {
        return;
    };
    let search = PortSearch { sk, port, _pad: [0; 6] };
    if PORT_SEARCHES.insert(&bpf_get_current_pid_tgid(), &search, 0).is_err() {
        count(counters::SYSCALL_TABLE_FULL);
    }
}

#[inline(always)]
fn take() -> Option<PortSearch> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: map value copied out before the entry is removed.
    let search = unsafe { *PORT_SEARCHES.get(&id)? };
    let _ = PORT_SEARCHES.remove(&id);
    Some(search)
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: fault-tolerant read of kernel memory.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// Reports a failed port search on TCP socket `sk` by the current task. For bind
/// failures (`GetPort`) the local address and the port asked for are reported.
#[inline(always)]
fn report(sk: u64, errno: u32, source: FailureSource, asked_port: u16) {
    let l = KERNEL_LAYOUT.load();
    if l.sock_addrs == 0 {
        return;
    }
    if l.sock_protocol != 0 && read::<u16>(sk + u64::from(l.sock_protocol)) != Some(IPPROTO_TCP) {
        return;
    }
    let Some(family) = read::<u16>(sk + u64::from(l.skc_family)) else {
        return;
    };
    let mut failure = FailureEvent {
        skaddr: sk,
        task: current_task(),
        netns: socket_netns(sk),
        errno,
        family,
        source: source as u8,
        attribution: Attribution::Current as u8,
        ..Default::default()
    };
    match family {
        AF_INET => {
            if let (Some(s), Some(d)) = (
                read::<[u8; 4]>(sk + u64::from(l.skc_rcv_saddr)),
                read::<[u8; 4]>(sk + u64::from(l.skc_daddr)),
            ) {
                failure.saddr[..4].copy_from_slice(&s);
                failure.daddr[..4].copy_from_slice(&d);
            }
        }
        AF_INET6 => {
            failure.saddr = read(sk + u64::from(l.skc_v6_rcv_saddr)).unwrap_or_default();
            failure.daddr = read(sk + u64::from(l.skc_v6_daddr)).unwrap_or_default();
        }
        _ => return,
    }
    let (kind, call) = if source == FailureSource::GetPort {
        // A bind: the local address and the port asked for; no remote end.
        failure.sport = asked_port;
        failure.daddr = [0; 16];
        (EventKind::BindError, CALL_BIND)
    } else {
        failure.dport = u16::from_be(read(sk + u64::from(l.skc_dport)).unwrap_or(0));
        failure.sport = read(sk + u64::from(l.skc_num)).unwrap_or(0);
        (EventKind::ConnectError, CALL_CONNECT)
    };
    // SAFETY: no preconditions.
    emit_failure(kind, &failure, unsafe { bpf_ktime_get_ns() });
    // The syscall this search serves will return the failure too: say it was reported.
    if let Some(pending) = PENDING_CALLS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
        // SAFETY: map value pointer, valid while this program runs.
        unsafe {
            if (*pending).call == call {
                (*pending).reported = 1;
            }
        }
    }
}
