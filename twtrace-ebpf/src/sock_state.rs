//! Hook on `sock:inet_sock_set_state`: every TCP state transition, IPv4 and IPv6, with the
//! socket's true owner and the time spent in the previous state.
//!
//! Ownership: the kernel makes many transitions in softirq context, where the current task
//! is whoever was on the CPU. The owner is therefore recorded in the socket table at the
//! transitions that run in the owner's own context (`runs_in_owner_context`), inherited
//! from the listener for accepted connections, and looked up for all other transitions.
//!
//! Two forms of the hook share that logic; the loader attaches one. `tp_btf` (Linux 5.11+
//! for socket storage from tracing programs) receives the `struct sock *` itself and keeps
//! the table in the socket ([`SocketStorage`]); the classic tracepoint reads the kernel's
//! formatted record and keeps the table in a hash map ([`SocketByAddress`]). The classic
//! form comes in two programs: one for the record as Linux 5.6+ lays it out, with the
//! offsets compiled in, and one that takes them from the format file.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use twtrace_common::{
    Attribution, EventKind, FailureEvent, FailureSource, SockStateEvent, SocketEntry, Task,
    config::{RECORD_BYTES, SockStateLayout, state_hook_cut},
    counters,
    tcp::{self, AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    connect::resolve_async_failure,
    kernel::{port_settings, socket_error, socket_netns},
    maps::{
        CALL_CONNECT, KERNEL_LAYOUT, LISTENERS, PAIRING_WINDOW_NS, PENDING_CALLS, RECORD,
        SOCK_STATE_LAYOUT, SocketByAddress, SocketStorage, SocketTable, TAKEN_ERRORS,
        UNREPORTED_FAILURES, count, event_ring, listener_key, wakeup_flags,
    },
    staging::send_state_event,
};

/// A `state_hook_cut` value, set by userspace (the benchmark's lower bounds only).
#[unsafe(no_mangle)]
static STATE_HOOK_CUT: Global<u32> = Global::new(state_hook_cut::NONE);

/// Whether the hook is to return at entry (see [`STATE_HOOK_CUT`]).
#[inline(always)]
fn cut_at_entry() -> bool {
    STATE_HOOK_CUT.load() == state_hook_cut::AT_ENTRY
}

/// The classic tracepoint on kernels with the usual record layout (Linux 5.6+).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if cut_at_entry() {
        return 0;
    }
    transition_in_usual_record(&ctx);
    0
}

/// The classic tracepoint on kernels that lay the record out otherwise: the offsets come
/// from the format file.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state_any_layout(ctx: TracePointContext) -> u32 {
    if cut_at_entry() {
        return 0;
    }
    if transition_in_any_record(&ctx).is_err() {
        count(counters::READ_FAILED);
    }
    0
}

/// `tp_btf` form: the tracepoint's arguments are the socket and the two states; the rest
/// is read from the socket at the offsets userspace found in BTF.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    if cut_at_entry() {
        return 0;
    }
    if try_inet_sock_set_state_btf(&ctx).is_err() {
        count(counters::READ_FAILED);
    }
    0
}

/// One transition, whichever form of the hook saw it.
struct Transition {
    skaddr: u64,
    old: u8,
    new: u8,
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

fn try_inet_sock_set_state_btf(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: *mut c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let l = KERNEL_LAYOUT.load();
    // SAFETY: fault-tolerant read; the offset comes from this kernel's BTF.
    let protocol: u16 =
        unsafe { bpf_probe_read_kernel(sk.byte_add(l.sock_protocol as usize).cast())? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    // The addresses and ports all lie in `struct sock_common`, at the start of the socket:
    // one read of its first RECORD_BYTES (userspace checked that they fit).
    let buf = RECORD.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: copies the start of the socket into this CPU's buffer, which nothing else
    // uses while this program runs.
    let common: &[u8; RECORD_BYTES] = unsafe {
        bpf_probe_read_kernel_buf(sk.cast::<u8>(), &mut *buf)?;
        &*buf
    };
    let family = u16::from_ne_bytes(field(common, l.skc_family as u16));
    let mut t = Transition {
        skaddr: sk as u64,
        old: old as u8,
        new: new as u8,
        family,
        // Ports in host order, as the classic tracepoint reports them.
        sport: u16::from_ne_bytes(field(common, l.skc_num as u16)),
        dport: u16::from_be_bytes(field(common, l.skc_dport as u16)),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if t.sport == 0 {
        // The port is released before the move to CLOSE (and not chosen yet when a
        // connect moves to SYN_SENT): the socket's own copy, which the tracepoint reports,
        // is still there.
        // SAFETY: fault-tolerant read; the offset comes from this kernel's BTF.
        let sport: u16 =
            unsafe { bpf_probe_read_kernel(sk.byte_add(l.inet_sport as usize).cast())? };
        t.sport = u16::from_be(sport);
    }
    if family == AF_INET {
        t.saddr[..4].copy_from_slice(&field::<4>(common, l.skc_rcv_saddr as u16));
        t.daddr[..4].copy_from_slice(&field::<4>(common, l.skc_daddr as u16));
    } else if family == AF_INET6 {
        t.saddr = field(common, l.skc_v6_rcv_saddr as u16);
        t.daddr = field(common, l.skc_v6_daddr as u16);
    } else {
        warn!(ctx, "inet_sock_set_state: unexpected address family {}", family);
        return Ok(());
    }
    handle_transition(ctx, &t, &SocketStorage(sk));
    Ok(())
}

/// Reads the record's fields with plain loads at offsets known when compiling: the
/// verifier checks each against the record, and no helper call copies it (~40 ns less per
/// state change than [`transition_in_any_record`]).
#[inline(always)]
fn transition_in_usual_record(ctx: &TracePointContext) {
    const L: SockStateLayout = SockStateLayout::USUAL;
    let rec = ctx.as_ptr().cast::<u8>().cast_const();
    // SAFETY (all loads below): the record has this layout (the loader attaches this
    // program only then), and every offset is aligned to its field's size.
    let load_u16 = |offset: u16| unsafe { record_load::<u16>(rec, offset) };
    let load_u32 = |offset: u16| unsafe { record_load::<u32>(rec, offset) };
    let load_u64 = |offset: u16| unsafe { record_load::<u64>(rec, offset) };
    if load_u16(L.protocol) != IPPROTO_TCP {
        return;
    }
    let mut t = Transition {
        skaddr: load_u64(L.skaddr),
        old: load_u32(L.oldstate) as u8,
        new: load_u32(L.newstate) as u8,
        family: load_u16(L.family),
        sport: load_u16(L.sport),
        dport: load_u16(L.dport),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if t.family == AF_INET {
        t.saddr[..4].copy_from_slice(&load_u32(L.saddr).to_ne_bytes());
        t.daddr[..4].copy_from_slice(&load_u32(L.daddr).to_ne_bytes());
    } else if t.family == AF_INET6 {
        t.saddr[..8].copy_from_slice(&load_u64(L.saddr_v6).to_ne_bytes());
        t.saddr[8..].copy_from_slice(&load_u64(L.saddr_v6 + 8).to_ne_bytes());
        t.daddr[..8].copy_from_slice(&load_u64(L.daddr_v6).to_ne_bytes());
        t.daddr[8..].copy_from_slice(&load_u64(L.daddr_v6 + 8).to_ne_bytes());
    } else {
        warn!(ctx, "inet_sock_set_state: unexpected address family {}", t.family);
        return;
    }
    handle_transition(ctx, &t, &SocketByAddress(t.skaddr));
}

/// One field of a classic tracepoint's record, loaded directly.
///
/// # Safety
/// `offset` must be a compile-time constant within the record, aligned to `T`'s size.
#[inline(always)]
unsafe fn record_load<T: Copy>(rec: *const u8, offset: u16) -> T {
    // Volatile: one load of exactly this size and offset, as the verifier wants for
    // context accesses (no merging or splitting by the optimiser).
    // SAFETY: see above.
    unsafe { rec.add(usize::from(offset)).cast::<T>().read_volatile() }
}

fn transition_in_any_record(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = SOCK_STATE_LAYOUT.load();
    // The record in one helper call rather than one per field (this is the hot path),
    // into a per-CPU buffer: the BPF stack has no room for it beside the event.
    let buf = RECORD.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: copies the start of the tracepoint record into this CPU's buffer, which
    // nothing else uses while this program runs; userspace checked that every field of
    // this kernel's layout lies within RECORD_BYTES.
    let rec: &[u8; RECORD_BYTES] = unsafe {
        bpf_probe_read_kernel_buf(ctx.as_ptr().cast::<u8>(), &mut *buf)?;
        &*buf
    };
    let protocol = if layout.protocol_size == 1 {
        u16::from(field::<1>(rec, layout.protocol)[0])
    } else {
        u16::from_ne_bytes(field(rec, layout.protocol))
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let mut t = Transition {
        skaddr: u64::from_ne_bytes(field(rec, layout.skaddr)),
        old: i32::from_ne_bytes(field(rec, layout.oldstate)) as u8,
        new: i32::from_ne_bytes(field(rec, layout.newstate)) as u8,
        family: u16::from_ne_bytes(field(rec, layout.family)),
        sport: u16::from_ne_bytes(field(rec, layout.sport)),
        dport: u16::from_ne_bytes(field(rec, layout.dport)),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if t.family == AF_INET {
        t.saddr[..4].copy_from_slice(&field::<4>(rec, layout.saddr));
        t.daddr[..4].copy_from_slice(&field::<4>(rec, layout.daddr));
    } else if t.family == AF_INET6 {
        t.saddr = field(rec, layout.saddr_v6);
        t.daddr = field(rec, layout.daddr_v6);
    } else {
        warn!(ctx, "inet_sock_set_state: unexpected address family {}", t.family);
        return Ok(());
    }
    handle_transition(ctx, &t, &SocketByAddress(t.skaddr));
    Ok(())
}

/// What both forms do with a transition: owner, connect tracking, the event.
#[inline(always)]
fn handle_transition<C: EbpfContext>(ctx: &C, t: &Transition, table: &impl SocketTable) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (task, attribution, prev_state_ns, reset_seen, netns) =
        if STATE_HOOK_CUT.load() == state_hook_cut::NO_OWNERS {
            (Task::default(), Attribution::Unknown, 0, false, 0)
        } else {
            let tracked = track_socket(ctx, t, table, now);
            if t.old == tcp::TCP_SYN_SENT || t.new == tcp::TCP_SYN_SENT {
                track_connect(t, &tracked.0, tracked.1, tracked.4);
            }
            tracked
        };

    let kind = if tcp::close_enters_time_wait(t.old, t.new) && !reset_seen {
        EventKind::TimeWait
    } else {
        EventKind::State
    };

    send_state_event(&SockStateEvent {
        header: header(kind, SockStateEvent::VERSION, now),
        skaddr: t.skaddr,
        prev_state_ns,
        task,
        netns,
        family: t.family,
        sport: t.sport,
        dport: t.dport,
        old_state: t.old,
        new_state: if kind == EventKind::TimeWait { tcp::TCP_TIME_WAIT } else { t.new },
        attribution: attribution as u8,
        _pad: [0; 3],
        saddr: t.saddr,
        daddr: t.daddr,
    });
}

#[inline(always)]
fn header(kind: EventKind, version: u8, now: u64) -> twtrace_common::EventHeader {
    twtrace_common::EventHeader {
        kind: kind as u8,
        version,
        _pad: [0; 2],
        // SAFETY: no preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: now,
    }
}

/// Sends a connect/bind failure to userspace.
#[inline(always)]
pub fn emit_failure(kind: EventKind, failure: &FailureEvent, now: u64) {
    let Some(ring) = event_ring() else {
        count(counters::RINGBUF_FULL);
        return;
    };
    let Some(mut entry) = ring.reserve_untyped::<FailureEvent>(0) else {
        count(counters::RINGBUF_FULL);
        return;
    };
    let mut ev = *failure;
    ev.header = header(kind, FailureEvent::VERSION, now);
    // Read now: by the time userspace looks, the namespace may be gone.
    if let Some((low, high, reuse)) = port_settings(ev.skaddr) {
        ev.port_range_low = low;
        ev.port_range_high = high;
        ev.tcp_tw_reuse = reuse;
        ev.settings_known = 1;
    }
    entry.write(ev);
    entry.submit(wakeup_flags(size_of::<FailureEvent>()));
}

/// Follows connect() through the state changes it causes. CLOSE -> SYN_SENT in the
/// caller's context ties the call in progress to its socket. SYN_SENT -> CLOSE ends a
/// connect: a failure when the socket holds an error (`sk_err`, set by the kernel before
/// it moves the socket to CLOSE: ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH…; or `sk_err_soft`,
/// an ICMP error that came while the owner held the lock, which SO_ERROR reports); no error means
/// the owner gave up (close() while connecting) or the port search failed, which the
/// connect() call reports itself.
#[inline(always)]
fn track_connect(t: &Transition, owner: &Task, attribution: Attribution, netns: u32) {
    if t.old == tcp::TCP_CLOSE && t.new == tcp::TCP_SYN_SENT {
        if let Some(call) = PENDING_CALLS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
            // SAFETY: map value pointer, valid while this program runs.
            unsafe {
                if (*call).call == CALL_CONNECT {
                    (*call).skaddr = t.skaddr;
                }
            }
        }
        return;
    }
    if !(t.old == tcp::TCP_SYN_SENT && t.new == tcp::TCP_CLOSE) {
        return;
    }
    let mut failure = FailureEvent {
        skaddr: t.skaddr,
        task: *owner,
        netns,
        errno: socket_error(t.skaddr),
        family: t.family,
        sport: t.sport,
        dport: t.dport,
        source: FailureSource::Async as u8,
        attribution: attribution as u8,
        saddr: t.saddr,
        daddr: t.daddr,
        ..Default::default()
    };
    if failure.errno == 0 && attribution != Attribution::Current {
        // The kernel itself closed the connecting socket, which it does only on an error,
        // and the error is gone: the owner, woken on another CPU, took it with
        // getsockopt(SO_ERROR), before now or soon (then that call or the socket's error
        // report tells).
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: map value copied out.
        match unsafe { TAKEN_ERRORS.get(&t.skaddr) }.copied() {
            Some(taken) if now.saturating_sub(taken.ts_ns) < PAIRING_WINDOW_NS => {
                let _ = TAKEN_ERRORS.remove(&t.skaddr);
                failure.errno = taken.errno;
            }
            _ => {
                failure.header.ts_ns = now;
                // An LRU map: the insert makes room by itself.
                let _ = UNREPORTED_FAILURES.insert(&t.skaddr, &failure, 0);
                return;
            }
        }
    }
    resolve_async_failure(&failure);
}

/// `N` bytes of the record at `offset` (zeros if out of range, which userspace rules out).
#[inline(always)]
fn field<const N: usize>(rec: &[u8; RECORD_BYTES], offset: u16) -> [u8; N] {
    let offset = usize::from(offset);
    let mut out = [0u8; N];
    if let Some(bytes) = rec.get(offset..offset + N) {
        out.copy_from_slice(bytes);
    }
    out
}

/// Updates the socket table for this transition and returns who owns the socket, how we
/// know, how long it spent in the old state, and whether an RST was received.
#[inline(always)]
fn track_socket<C: EbpfContext>(
    ctx: &C,
    t: &Transition,
    table: &impl SocketTable,
    now: u64,
) -> (Task, Attribution, u64, bool, u32) {
    let known = table.get();
    // A socket starts a new life by leaving CLOSE (connect, listen) or as a clone of its
    // listener: whatever the table holds then belongs to an earlier socket at this address
    // or an earlier life of this one, and must not leak into it. So must a closed entry
    // met without a new life (that start was missed, e.g. while the table was full).
    let new_life =
        t.old == tcp::TCP_CLOSE || (t.old == tcp::TCP_LISTEN && t.new == tcp::TCP_SYN_RECV);
    // SAFETY: map value pointer, valid for the duration of this program.
    let current = known.filter(|&e| !new_life && unsafe { (*e).closed } == 0);
    let (mut task, mut attribution, prev_state_ns, reset_seen, known_netns) = match current {
        // SAFETY: as above.
        Some(e) => unsafe {
            (
                (*e).owner,
                Attribution::from_u8((*e).attribution),
                now.saturating_sub((*e).last_change_ns),
                (*e).reset_seen != 0,
                (*e).netns,
            )
        },
        None => (Task::default(), Attribution::Unknown, 0, false, 0),
    };
    // A socket never changes namespace: two kernel reads saved on every later transition.
    let netns = if known_netns != 0 { known_netns } else { socket_netns(t.skaddr) };

    if tcp::runs_in_owner_context(t.old, t.new) {
        task = current_task();
        attribution = Attribution::Current;
    } else if attribution == Attribution::Current {
        // Recorded at an earlier transition; this one may run in softirq context.
        attribution = Attribution::Owner;
    } else if attribution == Attribution::Unknown
        && t.old == tcp::TCP_LISTEN
        && t.new == tcp::TCP_SYN_RECV
    {
        // A connection being accepted: the kernel clones the listener (state included),
        // so the child's first transition is LISTEN -> SYN_RECV. The listener's owner owns
        // it until the accepting process acts on it.
        // SAFETY: map value pointer, copied out at once.
        if let Some(owner) = unsafe { LISTENERS.get(&listener_key(netns, t.sport)) } {
            task = *owner;
            attribution = Attribution::Listener;
        }
    }

    if t.new == tcp::TCP_LISTEN {
        if LISTENERS.insert(&listener_key(netns, t.sport), &task, 0).is_err() {
            count(counters::LISTENER_TABLE_FULL);
            warn!(
                ctx,
                "listener table full: connections accepted on port {} have no owner", t.sport
            );
        }
    } else if t.old == tcp::TCP_LISTEN && t.new == tcp::TCP_CLOSE {
        let _ = LISTENERS.remove(&listener_key(netns, t.sport));
    }

    let closed = u8::from(t.new == tcp::TCP_CLOSE);
    match known {
        // SAFETY: map value pointer; concurrent updates of one socket are serialised by
        // the socket lock in the kernel, and a closed entry's socket is gone.
        Some(e) => unsafe {
            (*e).owner = task;
            (*e).attribution = attribution as u8;
            (*e).last_change_ns = now;
            (*e).closed = closed;
            if current.is_none() {
                (*e).reset_seen = 0;
                (*e).netns = netns;
            }
        },
        // A socket that closes without an entry needs none.
        None if closed == 0 => {
            let entry = SocketEntry {
                owner: task,
                last_change_ns: now,
                attribution: attribution as u8,
                netns,
                ..SocketEntry::default()
            };
            if !table.insert(&entry) {
                count(counters::SOCKET_TABLE_FULL);
                warn!(
                    ctx,
                    "socket table full (or socket storage out of memory): owner of new socket unknown"
                );
            }
        }
        None => {}
    }
    (task, attribution, prev_state_ns, reset_seen, netns)
}

#[inline(always)]
pub fn current_task() -> Task {
    let pid_tgid = bpf_get_current_pid_tgid();
    Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        // SAFETY: no preconditions.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
    }
}
