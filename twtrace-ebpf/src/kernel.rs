//! Reads of kernel structures through offsets userspace found in BTF: a socket's network
//! namespace, and the socket behind a file descriptor of the current task.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::KERNEL_LAYOUT;

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: fault-tolerant read of kernel memory.
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// Inode number of the socket's network namespace; 0 when unknown.
#[inline(always)]
pub fn socket_netns(skaddr: u64) -> u32 {
    let layout = KERNEL_LAYOUT.load();
    if layout.sock_net == 0 || skaddr == 0 {
        return 0;
    }
    read::<u64>(skaddr + u64::from(layout.sock_net))
        .and_then(|net| read::<u32>(net + u64::from(layout.net_ns_inum)))
        .unwrap_or(0)
}

/// The error a socket reports to getsockopt(SO_ERROR), positive errno: `sk_err`, else
/// `sk_err_soft`; 0 for none or unknown.
#[inline(always)]
pub fn socket_error(skaddr: u64) -> u32 {
    let l = KERNEL_LAYOUT.load();
    let read_err = |offset: u32| {
        if offset == 0 {
            return 0;
        }
        read::<i32>(skaddr + u64::from(offset)).map(i32::unsigned_abs).unwrap_or(0)
    };
    match read_err(l.sock_err) {
        0 => read_err(l.sock_err_soft),
        err => err,
    }
}

/// The namespace settings that decide port exhaustion, read at the moment of a failure:
/// `(low, high, tcp_tw_reuse)` of the socket's network namespace.
#[inline(always)]
pub fn port_settings(skaddr: u64) -> Option<(u16, u16, u8)> {
    let l = KERNEL_LAYOUT.load();
    if l.sock_net == 0 || l.net_port_range == 0 || l.net_tw_reuse == 0 || skaddr == 0 {
        return None;
    }
    let net: u64 = read(skaddr + u64::from(l.sock_net))?;
    let (low, high) = if l.port_range_format == 1 {
        let packed: u32 = read(net + u64::from(l.net_port_range))?;
        (packed as u16, (packed >> 16) as u16)
    } else {
        let pair: [i32; 2] = read(net + u64::from(l.net_port_range))?;
        (pair[0] as u16, pair[1] as u16)
    };
    let reuse = if l.tw_reuse_size == 1 {
        read::<u8>(net + u64::from(l.net_tw_reuse))?
    } else {
        read::<i32>(net + u64::from(l.net_tw_reuse))? as u8
    };
    Some((low, high, reuse))
}

/// The `struct sock *` behind file descriptor `fd` of the current task, with its protocol.
/// Only called on failure paths, where `fd` is known to be a socket.
#[inline(always)]
pub fn current_socket(fd: u32) -> Option<(u64, u16)> {
    let l = KERNEL_LAYOUT.load();
    if l.fd_walk == 0 {
        return None;
    }
    // SAFETY: no preconditions; the pointer is only used through read().
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + u64::from(l.task_files))?;
    let fdt: u64 = read(files + u64::from(l.files_fdt))?;
    let max_fds: u32 = read(fdt + u64::from(l.fdt_max_fds))?;
    if fd >= max_fds {
        return None;
    }
    let fds: u64 = read(fdt + u64::from(l.fdt_fd))?;
    let file: u64 = read(fds + u64::from(fd) * 8)?;
    let socket: u64 = read(file + u64::from(l.file_private_data))?;
    let sk: u64 = read(socket + u64::from(l.socket_sk))?;
    let protocol: u16 = read(sk + u64::from(l.sock_protocol))?;
    Some((sk, protocol))
}
