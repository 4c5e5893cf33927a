//! `empty-hooks`: attaches a BPF program that returns at once to each named tracepoint and
//! holds them until killed. The benchmark's floors: what a hook costs before a tracer does
//! any work, on classic tracepoints (`tp:CATEGORY:NAME`, as twtrace attaches them) or on
//! raw tracepoints (`raw:NAME`, the cheapest attachment this kernel allows: kprobes are
//! compiled out and fentry is refused). bpftrace cannot stand in: its programs return 1,
//! which sends each event on into perf's own processing, and the Debian version cannot
//! attach raw tracepoints.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PERF_TYPE_TRACEPOINT: u64 = 2;
/// `_IOW('$', 8, __u32)` and `_IO('$', 0)` from linux/perf_event.h.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// PERF_FLAG_FD_CLOEXEC from linux/perf_event.h.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// `r0 = 0; exit`: BPF_ALU64|BPF_MOV|BPF_K into r0, then BPF_JMP|BPF_EXIT, one 8-byte
/// instruction each (opcode in the first byte, registers and immediate all zero). Zero is
/// also what twtrace's programs return: the event goes no further.
const RETURN_ZERO: [u64; 2] = [0xb7, 0x95];

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel takes the size we
/// pass and treats the fields after it as zero.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// `union bpf_attr`'s `raw_tracepoint` member, for BPF_RAW_TRACEPOINT_OPEN.
#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// A hook to attach, as named on the command line.
#[derive(Debug, PartialEq, Eq)]
enum Hook<'a> {
    Classic { category: &'a str, name: &'a str },
    Raw(&'a str),
}

fn parse(spec: &str) -> anyhow::Result<Hook<'_>> {
    match spec.split(':').collect::<Vec<_>>()[..] {
        ["tp", category, name] => Ok(Hook::Classic { category, name }),
        ["raw", name] => Ok(Hook::Raw(name)),
        _ => bail!("`{spec}`: name a hook as tp:CATEGORY:NAME or raw:NAME"),
    }
}

/// Loads and attaches one empty program per hook, says so on stderr, then waits to be
/// killed (the kernel detaches the programs when the process's descriptors close).
pub fn run(specs: &[String]) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for spec in specs {
        held.extend(match parse(spec)? {
            Hook::Classic { category, name } => attach_classic(category, name)?,
            Hook::Raw(name) => attach_raw(name)?,
        });
    }
    // The bench stops its tools with SIGINT, which a parent shell may have set to ignored.
    // SAFETY: restoring a default disposition has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    eprintln!("empty-hooks: attached {} empty programs", specs.len());
    loop {
        std::thread::park();
    }
}

fn load_empty(prog_type: u32) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: RETURN_ZERO.len() as u32,
        insns: RETURN_ZERO.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
    };
    bpf(BPF_PROG_LOAD, &attr).context("loading an empty BPF program failed (are you root?)")
}

fn attach_raw(tracepoint: &str) -> anyhow::Result<Vec<OwnedFd>> {
    let program = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT)?;
    let name = std::ffi::CString::new(tracepoint)?;
    let attr = RawTracepointAttr {
        name: name.as_ptr() as u64,
        prog_fd: program.as_raw_fd() as u32,
        _pad: 0,
    };
    let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr).with_context(|| {
        format!("attaching to raw tracepoint {tracepoint} failed (is the name right?)")
    })?;
    Ok(vec![program, link])
}

/// As aya and libbpf do it: a perf event on the tracepoint (any task, CPU 0), the program
/// set on it; the program then runs for the tracepoint on every CPU.
fn attach_classic(category: &str, name: &str) -> anyhow::Result<Vec<OwnedFd>> {
    let id_file = format!("/sys/kernel/tracing/events/{category}/{name}/id");
    let id: u64 = std::fs::read_to_string(&id_file)
        .with_context(|| format!("failed to read {id_file} (is tracefs mounted? `./x setup`)"))?
        .trim()
        .parse()
        .with_context(|| format!("{id_file} holds no number"))?;
    let program = load_empty(BPF_PROG_TYPE_TRACEPOINT)?;
    // struct perf_event_attr, zero but for type, size, config and sample_period.
    let mut attr = [0u64; 16];
    attr[0] = PERF_TYPE_TRACEPOINT | ((size_of_val(&attr) as u64) << 32);
    attr[1] = id;
    attr[2] = 1;
    // SAFETY: `attr` is a zeroed perf_event_attr of the size it declares.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::c_int,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("perf_event_open on {category}:{name} failed"));
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (request, arg, what) in [
        (PERF_EVENT_IOC_SET_BPF, program.as_raw_fd(), "setting the program"),
        (PERF_EVENT_IOC_ENABLE, 0, "enabling the event"),
    ] {
        // SAFETY: a perf event descriptor and a request that takes an int argument.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{what} on {category}:{name} failed"));
        }
    }
    Ok(vec![program, event])
}

/// The bpf(2) system call with one attribute struct; a new descriptor on success.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` of the
    // size passed; pointers inside it outlive the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as libc::c_uint)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_named_by_kind() {
        assert_eq!(
            parse("tp:sock:inet_sock_set_state").unwrap(),
            Hook::Classic { category: "sock", name: "inet_sock_set_state" }
        );
        assert_eq!(parse("raw:sys_exit").unwrap(), Hook::Raw("sys_exit"));
        for bad in ["sys_exit", "tp:sock", "raw:a:b", "kprobe:x"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
