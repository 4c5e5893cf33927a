//! Hook on `sock:inet_sock_set_state`: every TCP state transition, IPv4 and IPv6, with the
//! socket's true owner and the time spent in the previous state.
//!
//! Ownership: the kernel makes many transitions in softirq context, where the current task
//! is whoever was on the CPU. The owner is therefore recorded in [`SOCKETS`] at the
//! transitions that run in the owner's own context (`runs_in_owner_context`), inherited
//! from the listener for accepted connections, and looked up for all other transitions.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use twtrace_common::{
    Attribution, EventKind, SockStateEvent, Task, counters,
    tcp::{self, AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::maps::{
    EVENTS, KERNEL_LAYOUT, LISTENERS, SOCK_STATE_LAYOUT, SOCKETS, SocketEntry, count, listener_key,
};

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        count(counters::READ_FAILED);
    }
    0
}

/// The fields of one tracepoint record that we use.
struct Transition {
    skaddr: u64,
    old: u8,
    new: u8,
    family: u16,
    sport: u16,
    dport: u16,
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = SOCK_STATE_LAYOUT.load();
    // SAFETY (all read_at): offsets come from this kernel's format file for this record.
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
    let t = unsafe {
        Transition {
            skaddr: ctx.read_at::<u64>(layout.skaddr.into())?,
            old: ctx.read_at::<i32>(layout.oldstate.into())? as u8,
            new: ctx.read_at::<i32>(layout.newstate.into())? as u8,
            family: ctx.read_at::<u16>(layout.family.into())?,
            sport: ctx.read_at::<u16>(layout.sport.into())?,
            dport: ctx.read_at::<u16>(layout.dport.into())?,
        }
    };
    if t.family != AF_INET && t.family != AF_INET6 {
        warn!(
            ctx,
            "inet_sock_set_state: unexpected address family {}", t.family
        );
        return Ok(());
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let netns = socket_netns(t.skaddr);

    let (task, attribution, prev_state_ns, reset_seen) = track_socket(ctx, &t, netns, now);

    let kind = if tcp::close_enters_time_wait(t.old, t.new) && !reset_seen {
        EventKind::TimeWait
    } else {
        EventKind::State
    };

    let Some(mut entry) = EVENTS.reserve::<SockStateEvent>(0) else {
        count(counters::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned SockStateEvent-sized slot;
    // every field is written before submit.
    unsafe {
        (*ev).header.kind = kind as u8;
        (*ev).header.version = SockStateEvent::VERSION;
        (*ev).header._pad = [0; 2];
        (*ev).header.cpu = bpf_get_smp_processor_id();
        (*ev).header.ts_ns = now;
        (*ev).skaddr = t.skaddr;
        (*ev).prev_state_ns = prev_state_ns;
        (*ev).task = task;
        (*ev).netns = netns;
        (*ev).family = t.family;
        (*ev).sport = t.sport;
        (*ev).dport = t.dport;
        (*ev).old_state = t.old;
        (*ev).new_state = if kind == EventKind::TimeWait {
            tcp::TCP_TIME_WAIT
        } else {
            t.new
        };
        (*ev).attribution = attribution as u8;
        (*ev)._pad = [0; 3];
        (*ev).saddr = [0; 16];
        (*ev).daddr = [0; 16];
        let read = if t.family == AF_INET {
            read_addrs::<4>(
                ctx,
                layout.saddr,
                layout.daddr,
                &mut (*ev).saddr,
                &mut (*ev).daddr,
            )
        } else {
            read_addrs::<16>(
                ctx,
                layout.saddr_v6,
                layout.daddr_v6,
                &mut (*ev).saddr,
                &mut (*ev).daddr,
            )
        };
        if read.is_err() {
            count(counters::READ_FAILED);
        }
    }
    entry.submit(0);
    Ok(())
}

/// Copies the source and destination addresses (N bytes each) from the record.
///
/// # Safety
/// The offsets must be those of this kernel's record.
#[inline(always)]
unsafe fn read_addrs<const N: usize>(
    ctx: &TracePointContext,
    saddr_off: u16,
    daddr_off: u16,
    saddr: &mut [u8; 16],
    daddr: &mut [u8; 16],
) -> Result<(), i32> {
    let s: [u8; N] = unsafe { ctx.read_at(saddr_off.into())? };
    let d: [u8; N] = unsafe { ctx.read_at(daddr_off.into())? };
    saddr[..N].copy_from_slice(&s);
    daddr[..N].copy_from_slice(&d);
    Ok(())
}

/// Updates the socket table for this transition and returns who owns the socket, how we
/// know, how long it spent in the old state, and whether an RST was received.
#[inline(always)]
fn track_socket(
    ctx: &TracePointContext,
    t: &Transition,
    netns: u32,
    now: u64,
) -> (Task, Attribution, u64, bool) {
    let known = SOCKETS.get_ptr_mut(&t.skaddr);
    let (mut task, mut attribution, prev_state_ns, reset_seen) = match known {
        // SAFETY: map value pointer, valid for the duration of this program.
        Some(e) => unsafe {
            (
                (*e).owner,
                Attribution::from_u8((*e).attribution),
                now.saturating_sub((*e).last_change_ns),
                (*e).reset_seen != 0,
            )
        },
        None => (Task::default(), Attribution::Unknown, 0, false),
    };

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
        if LISTENERS
            .insert(&listener_key(netns, t.sport), &task, 0)
            .is_err()
        {
            count(counters::LISTENER_TABLE_FULL);
            warn!(
                ctx,
                "listener table full: connections accepted on port {} have no owner", t.sport
            );
        }
    } else if t.old == tcp::TCP_LISTEN && t.new == tcp::TCP_CLOSE {
        let _ = LISTENERS.remove(&listener_key(netns, t.sport));
    }

    if t.new == tcp::TCP_CLOSE {
        // A socket never leaves CLOSE except by connect()/listen(), which record it anew.
        if known.is_some() {
            let _ = SOCKETS.remove(&t.skaddr);
        }
    } else {
        match known {
            // SAFETY: map value pointer; concurrent updates of one socket are serialised
            // by the socket lock in the kernel.
            Some(e) => unsafe {
                (*e).owner = task;
                (*e).attribution = attribution as u8;
                (*e).last_change_ns = now;
            },
            None => {
                let entry = SocketEntry {
                    owner: task,
                    last_change_ns: now,
                    attribution: attribution as u8,
                    reset_seen: 0,
                    _pad: [0; 6],
                };
                if SOCKETS.insert(&t.skaddr, &entry, 0).is_err() {
                    count(counters::SOCKET_TABLE_FULL);
                    warn!(
                        ctx,
                        "socket table full: owner of new socket unknown (raise --max-sockets)"
                    );
                }
            }
        }
    }
    (task, attribution, prev_state_ns, reset_seen)
}

#[inline(always)]
fn current_task() -> Task {
    let pid_tgid = bpf_get_current_pid_tgid();
    Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// Inode number of the socket's network namespace; 0 when BTF gave no offsets.
#[inline(always)]
fn socket_netns(skaddr: u64) -> u32 {
    let layout = KERNEL_LAYOUT.load();
    if layout.sock_net == 0 {
        return 0;
    }
    // SAFETY: reads of kernel memory through the fault-tolerant helper.
    unsafe {
        let net: u64 =
            match bpf_probe_read_kernel((skaddr + u64::from(layout.sock_net)) as *const u64) {
                Ok(net) => net,
                Err(_) => return 0,
            };
        bpf_probe_read_kernel((net + u64::from(layout.net_ns_inum)) as *const u32).unwrap_or(0)
    }
}
