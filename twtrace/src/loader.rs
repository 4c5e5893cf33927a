//! Loads the eBPF programs with this kernel's layouts, attaches them, and hands out the
//! ring buffer and counters. Which hooks are used is decided here and reported to the user.

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, KProbe, RawTracePoint, TracePoint},
    util::KernelVersion,
};
use twtrace_common::{
    config::{
        KernelLayout, MAX_EVENT_RINGS, RECORD_BYTES, ResetLayout, SockStateLayout, SyscallLayout,
        state_hook_cut,
    },
    counters,
};

use crate::{
    kernel_btf,
    rings::{Batches, EventRings},
    socket_table::Sweeper,
    tracefs,
};

/// The compiled eBPF object, cross-built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twtrace"));

/// What the user can tune about the kernel side.
#[derive(Clone, Debug)]
pub struct Options {
    /// All event ring buffers together, in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Capacity of the socket table.
    pub max_sockets: u32,
    /// BTF to read kernel layouts from, instead of the kernel's own.
    pub btf: Option<std::path::PathBuf>,
    /// Most verbose kernel-side log level to emit (aya-log; 0 = off).
    pub kernel_log_level: u8,
    /// How to hook the kernel's port search.
    pub port_search_hooks: PortSearchHooks,
    /// Which form of the state-change hook to use.
    pub state_hooks: StateHooks,
    /// Ring-buffer bytes before a wakeup; `None` for the default.
    pub wakeup_bytes: Option<u32>,
    /// How much of its work the state hook skips (the benchmark's lower bounds only).
    pub bench_cut: Option<BenchCut>,
}

/// Work the state hook skips, for the benchmark's lower bounds (`xtask bench`): never
/// for real use, since the events then lack what makes them worth having.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchCut {
    /// Return at entry: hooks attached, no state events.
    Entry,
    /// Deliver every state event, without owners, time in state, namespace or connect
    /// tracking: what delivering the events costs alone.
    NoOwners,
}

impl BenchCut {
    /// The kernel side's `state_hook_cut` value for `cut`.
    fn kernel_value(cut: Option<Self>) -> u32 {
        match cut {
            None => state_hook_cut::NONE,
            Some(Self::Entry) => state_hook_cut::AT_ENTRY,
            Some(Self::NoOwners) => state_hook_cut::NO_OWNERS,
        }
    }
}

/// Ways to hook the kernel's local-port search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PortSearchHooks {
    /// fexit if the kernel allows it, else kprobes, else none.
    Auto,
    /// fentry/fexit (BTF trampolines, Linux 5.17+): cheapest.
    Fexit,
    /// kprobe + kretprobe.
    Kprobe,
    /// Do not hook the port search; rely on the syscall tracepoints.
    None,
}

/// Forms of the state-change hook (and of the reset hook, which shares its socket table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateHooks {
    /// Classic tracepoints keeping owners in a preallocated hash map of `--max-sockets`
    /// entries: the cheapest per state change.
    Tracepoint,
    /// BTF tracepoints keeping each socket's owner in the socket itself (socket storage,
    /// Linux 5.11+): no table to size, memory follows the live sockets; creating the
    /// storage makes a state change ~150 ns dearer (docs/benchmarks.md).
    TpBtf,
    /// The classic tracepoint reading its record at the offsets of the format file, as it
    /// does by itself on kernels whose record differs from Linux 5.6+'s (for tests).
    #[value(hide = true)]
    TracepointAnyLayout,
}

/// The `tp_btf` programs: (program, tracepoint).
const TP_BTF_PROGRAMS: [(&str, &str); 2] = [
    ("inet_sock_set_state_btf", "inet_sock_set_state"),
    ("tcp_receive_reset_btf", "tcp_receive_reset"),
];

/// The programs of one way of hooking the port search: (program, kernel function).
const FEXIT_PROGRAMS: [(&str, &str); 2] =
    [("hash_connect_fexit", "__inet_hash_connect"), ("get_port_fexit", "inet_csk_get_port")];
const KPROBE_PROGRAMS: [(&str, &str); 4] = [
    ("hash_connect_entry", "__inet_hash_connect"),
    ("hash_connect_return", "__inet_hash_connect"),
    ("get_port_entry", "inet_csk_get_port"),
    ("get_port_return", "inet_csk_get_port"),
];

/// A loaded and attached set of programs.
pub struct Tracer {
    ebpf: Ebpf,
    /// The per-CPU event rings and the state hook's batches, until taken.
    rings: Option<(Vec<RingBuf<MapData>>, Option<Batches>)>,
    /// The tracepoints attached, e.g. `sock:inet_sock_set_state`.
    pub tracepoints: Vec<String>,
    /// How the kernel's port search is hooked (`fexit`, `kprobe`), if it is.
    pub port_search: Option<&'static str>,
    /// Keeps the classic hooks' socket table clear of closed sockets (not needed with
    /// tp_btf, whose entries live and die with their sockets).
    _sweeper: Option<Sweeper>,
}

impl Tracer {
    /// Checks the kernel, loads and attaches everything.
    pub fn start(opts: &Options) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this twtrace was built without its eBPF programs (AYA_BUILD_SKIP): rebuild it with `./x build`"
            );
        }
        let tracefs = tracefs::ensure_mounted()?;
        let btf = kernel_btf::load(opts.btf.as_deref())?;
        let kernel_layout = kernel_btf::kernel_layout(&btf)
            .context("failed to find socket and network-namespace fields in the kernel's BTF")?;
        let state_layout = sock_state_layout(&tracefs)?;
        let reset_layout = reset_layout(&tracefs)?;
        let connect_layout = syscall_layout(&tracefs, "connect", "uservaddr", false)?;
        let bind_layout = syscall_layout(&tracefs, "bind", "umyaddr", false)?;
        let getsockopt_layout = syscall_layout(&tracefs, "getsockopt", "optval", true)?;
        raise_memlock_limit();

        // The tp_btf hooks keep owners in the sockets themselves: the hash-map table is
        // then left at one entry rather than --max-sockets preallocated ones.
        let tp_btf = opts.state_hooks == StateHooks::TpBtf;
        let rings = RingLayout::new(opts.ring_buffer_bytes, possible_cpus()?, page_size());
        let asked = opts.wakeup_bytes.unwrap_or_else(|| default_wakeup_bytes(rings.bytes_each));
        // A threshold the ring cannot hold before it fills would never wake the reader.
        let wakeup = asked.min(rings.bytes_each / 2);
        if wakeup < asked {
            log::warn!(
                "--wakeup-bytes {asked} is more than half a CPU's ring buffer ({} bytes): using \
                 {wakeup}; raise --ring-buffer-size for more",
                rings.bytes_each
            );
        }
        // Batches are flushed by running a program on a chosen CPU (Linux 5.10+), and
        // would delay the wakeup asked for each event.
        let batch = wakeup != 0
            && aya::util::KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 10, 0));
        let mut ebpf = EbpfLoader::new()
            .override_global("SOCK_STATE_LAYOUT", &state_layout, true)
            .override_global("RESET_LAYOUT", &reset_layout, true)
            .override_global("CONNECT_LAYOUT", &connect_layout.unwrap_or_default(), true)
            .override_global("BIND_LAYOUT", &bind_layout.unwrap_or_default(), true)
            .override_global("GETSOCKOPT_LAYOUT", &getsockopt_layout.unwrap_or_default(), true)
            .override_global("KERNEL_LAYOUT", &kernel_layout, true)
            .override_global("AYA_LOG_LEVEL", &opts.kernel_log_level, false)
            .override_global("WAKEUP_BYTES", &wakeup, true)
            .override_global("BATCH_EVENTS", &u32::from(batch), true)
            .override_global("EVENT_RING_COUNT", &rings.count, true)
            .override_global("STATE_HOOK_CUT", &BenchCut::kernel_value(opts.bench_cut), true)
            .map_max_entries("SOCKETS", if tp_btf { 1 } else { opts.max_sockets })
            .load(EBPF_OBJECT)
            .context("failed to load the eBPF programs into the kernel")?;
        let event_rings = create_event_rings(&mut ebpf, rings)?;
        let batches = if batch { Some(batches(&mut ebpf)?) } else { None };

        let mut tracepoints = Vec::new();
        let with_reset = reset_layout.present != 0;
        if !with_reset {
            log::warn!(
                "tcp:tcp_receive_reset is missing on this kernel: a reset in FIN_WAIT2 may be \
                 reported as an entry into TIME_WAIT"
            );
        }
        if tp_btf {
            attach_tp_btf_hooks(&mut ebpf, &kernel_layout, with_reset).context(
                "the tp_btf hooks are not available on this kernel; use --state-hooks tracepoint",
            )?;
            tracepoints.push("tp_btf:sock:inet_sock_set_state".to_owned());
            if with_reset {
                tracepoints.push("tp_btf:tcp:tcp_receive_reset".to_owned());
            }
        } else {
            // Offsets compiled in where the record has the usual layout.
            let program = if state_layout == SockStateLayout::USUAL
                && opts.state_hooks != StateHooks::TracepointAnyLayout
            {
                "inet_sock_set_state"
            } else {
                "inet_sock_set_state_any_layout"
            };
            attach_tracepoint(&mut ebpf, program, "sock", "inet_sock_set_state")?;
            tracepoints.push("sock:inet_sock_set_state".to_owned());
            log::debug!("state hook: {program}");
            if with_reset {
                attach_tracepoint(&mut ebpf, "tcp_receive_reset", "tcp", "tcp_receive_reset")?;
                tracepoints.push("tcp:tcp_receive_reset".to_owned());
            }
        }
        // Failed connects: the syscall tracepoints give caller, address and errno. The
        // socket error report and getsockopt(SO_ERROR) give the errno of a non-blocking
        // connect whose owner took the error before the state hook could read it.
        match attach_raw_tracepoint(&mut ebpf, "inet_sk_error_report") {
            Ok(()) => tracepoints.push("raw:inet_sk_error_report".to_owned()),
            Err(e) => log::warn!(
                "{e:#}: some failed non-blocking connects may be reported without their errno"
            ),
        }
        for (call, layout) in
            [("connect", connect_layout), ("bind", bind_layout), ("getsockopt", getsockopt_layout)]
        {
            if layout.is_some() {
                for phase in ["enter", "exit"] {
                    let name = format!("sys_{phase}_{call}");
                    attach_tracepoint(&mut ebpf, &name, "syscalls", &name)?;
                }
                tracepoints.push(format!("syscalls:sys_*_{call}"));
            } else {
                log::warn!(
                    "this kernel has no syscalls:sys_enter_{call} tracepoint (CONFIG_FTRACE_SYSCALLS): \
                     failed {call}() calls will not be reported"
                );
            }
        }
        let port_search = attach_port_search(&mut ebpf, opts.port_search_hooks)?;
        let sweeper = if tp_btf { None } else { Some(start_sweeper(&mut ebpf, opts.max_sockets)?) };
        Ok(Self {
            ebpf,
            rings: Some((event_rings, batches)),
            tracepoints,
            port_search,
            _sweeper: sweeper,
        })
    }

    /// The event rings, read as one stream (can be taken once).
    pub fn take_events(&mut self) -> anyhow::Result<EventRings> {
        let (rings, batches) = self.rings.take().context("the event rings were already taken")?;
        EventRings::new(rings, batches)
    }

    /// Kernel-side diagnostics (aya-log), to be forwarded to the `log` crate.
    pub fn take_kernel_log(
        &mut self,
    ) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("failed to set up the kernel log")
    }

    /// Run time and runs of every loaded program, cumulative (zero unless BPF run
    /// statistics are on: see [`enable_run_statistics`]).
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some((name.to_owned(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Reads the kernel-side counters (see `twtrace_common::counters`), summed over CPUs,
    /// and the runs the kernel skipped.
    pub fn counters(&self) -> anyhow::Result<[u64; counters::COUNT as usize]> {
        let map = self.ebpf.map("COUNTERS").context("the COUNTERS map is missing")?;
        let array =
            PerCpuArray::<_, u64>::try_from(map).context("COUNTERS is not a per-CPU array")?;
        let mut out = [0u64; counters::COUNT as usize];
        for (i, slot) in out.iter_mut().take(counters::KERNEL_COUNT as usize).enumerate() {
            let values =
                array.get(&(i as u32), 0).with_context(|| format!("failed to read counter {i}"))?;
            *slot = values.iter().sum();
        }
        out[counters::SKIPPED_RUNS as usize] = skipped_runs();
        Ok(out)
    }
}

/// How the event ring buffers are laid out: one per CPU (CPUs beyond
/// [`MAX_EVENT_RINGS`] share them), each an equal power-of-two share of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub count: u32,
    pub bytes_each: u32,
}

impl RingLayout {
    pub fn new(total_bytes: u32, cpus: u32, page_size: u32) -> Self {
        let count = cpus.clamp(1, MAX_EVENT_RINGS);
        let share = total_bytes / count;
        // A ring buffer is a power-of-two number of pages.
        let bytes_each = if share == 0 { 0 } else { 1 << share.ilog2() };
        Self { count, bytes_each: bytes_each.max(page_size) }
    }
}

fn possible_cpus() -> anyhow::Result<u32> {
    aya::util::nr_cpus()
        .map(std::num::NonZero::get)
        .map_err(|(path, e)| anyhow::anyhow!("failed to read {path}: {e}"))
}

fn page_size() -> u32 {
    // SAFETY: plain sysconf(3).
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// Creates the event rings and puts them in `EVENT_RINGS`, where each CPU finds its own.
fn create_event_rings(
    ebpf: &mut Ebpf,
    layout: RingLayout,
) -> anyhow::Result<Vec<RingBuf<MapData>>> {
    let map = ebpf.map_mut("EVENT_RINGS").context("the EVENT_RINGS map is missing")?;
    let mut array: ArrayOfMaps<&mut MapData, RingBuf<MapData>> =
        ArrayOfMaps::try_from(map).context("EVENT_RINGS is not an array of maps")?;
    (0..layout.count)
        .map(|i| {
            let def = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
                0,
                0,
                layout.bytes_each,
                0,
            );
            let data = MapData::create(def, &format!("EVENTS_{i}"), None).with_context(|| {
                format!("failed to create event ring {i} of {} bytes", layout.bytes_each)
            })?;
            let ring = RingBuf::try_from(Map::RingBuf(data))
                .context("a new ring buffer map is not a ring buffer")?;
            array.set(i, &ring, 0).with_context(|| format!("failed to install event ring {i}"))?;
            Ok(ring)
        })
        .collect()
}

/// The state hook's batches, and the program userspace runs to flush one.
fn batches(ebpf: &mut Ebpf) -> anyhow::Result<Batches> {
    let program: &mut RawTracePoint = program_mut(ebpf, "flush_staged_events")?;
    program.load().context("failed to load the batch flush program")?;
    let flush_program = program
        .fd()
        .context("the batch flush program has no descriptor")?
        .try_clone()
        .context("failed to duplicate the batch flush program's descriptor")?;
    let staging = ebpf.take_map("STAGING").context("the STAGING map is missing")?;
    let staging = PerCpuArray::try_from(staging).context("STAGING is not a per-CPU array")?;
    Ok(Batches { staging, flush_program, flush_failed: std::sync::atomic::AtomicBool::new(false) })
}

fn start_sweeper(ebpf: &mut Ebpf, capacity: u32) -> anyhow::Result<Sweeper> {
    let table = ebpf.take_map("SOCKETS").context("the SOCKETS map is missing")?;
    let table = HashMap::try_from(table).context("SOCKETS is not a hash map of socket entries")?;
    let added = ebpf.take_map("SOCKETS_ADDED").context("the SOCKETS_ADDED map is missing")?;
    let added = PerCpuArray::try_from(added).context("SOCKETS_ADDED is not a per-CPU array")?;
    Sweeper::start(table, added, capacity)
}

/// Attaches the `tp_btf` form of the state and reset hooks.
fn attach_tp_btf_hooks(
    ebpf: &mut Ebpf,
    layout: &KernelLayout,
    with_reset: bool,
) -> anyhow::Result<()> {
    if layout.sock_addrs == 0 || layout.sock_protocol == 0 || layout.inet_sport == 0 {
        bail!("the kernel's BTF lacks the socket fields the tp_btf hook reads");
    }
    // The program copies the start of the socket in one read of RECORD_BYTES.
    let end = [
        layout.skc_family + 2,
        layout.skc_num + 2,
        layout.skc_dport + 2,
        layout.skc_daddr + 4,
        layout.skc_rcv_saddr + 4,
        layout.skc_v6_daddr + 16,
        layout.skc_v6_rcv_saddr + 16,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if end as usize > RECORD_BYTES {
        bail!("struct sock_common is laid out beyond the {RECORD_BYTES} bytes the hook reads");
    }
    let btf = aya::Btf::from_sys_fs().context("failed to read the kernel's BTF")?;
    for (program, tracepoint) in TP_BTF_PROGRAMS {
        if tracepoint == "tcp_receive_reset" && !with_reset {
            continue;
        }
        let prog: &mut BtfTracePoint = program_mut(ebpf, program)?;
        // Socket storage from tracing programs needs Linux 5.11: older kernels reject
        // the program here.
        prog.load(tracepoint, &btf).with_context(|| format!("tp_btf {tracepoint}: load failed"))?;
        prog.attach().with_context(|| format!("tp_btf {tracepoint}: attach failed"))?;
    }
    Ok(())
}

/// Attaches the port-search hooks as asked; returns the kind attached, if any.
fn attach_port_search(
    ebpf: &mut Ebpf,
    choice: PortSearchHooks,
) -> anyhow::Result<Option<&'static str>> {
    let try_fexit = |ebpf: &mut Ebpf| -> anyhow::Result<()> {
        let btf = aya::Btf::from_sys_fs().context("failed to read the kernel's BTF")?;
        for (program, function) in FEXIT_PROGRAMS {
            let prog: &mut FExit = program_mut(ebpf, program)?;
            prog.load(function, &btf)
                .with_context(|| format!("fexit on {function}: load failed"))?;
            prog.attach().with_context(|| format!("fexit on {function}: attach failed"))?;
        }
        Ok(())
    };
    let try_kprobe = |ebpf: &mut Ebpf| -> anyhow::Result<()> {
        for (program, function) in KPROBE_PROGRAMS {
            let prog: &mut KProbe = program_mut(ebpf, program)?;
            prog.load().with_context(|| format!("kprobe on {function}: load failed"))?;
            prog.attach(function, 0)
                .with_context(|| format!("kprobe on {function}: attach failed"))?;
        }
        Ok(())
    };
    // A failed attempt must not leave half its programs attached.
    let unload_fexit = |ebpf: &mut Ebpf| {
        for (program, _) in FEXIT_PROGRAMS {
            if let Ok(prog) = program_mut::<FExit>(ebpf, program) {
                let _ = prog.unload();
            }
        }
    };
    let unload_kprobe = |ebpf: &mut Ebpf| {
        for (program, _) in KPROBE_PROGRAMS {
            if let Ok(prog) = program_mut::<KProbe>(ebpf, program) {
                let _ = prog.unload();
            }
        }
    };
    match choice {
        PortSearchHooks::None => Ok(None),
        PortSearchHooks::Fexit => try_fexit(ebpf)
            .context("fexit hooks are not available on this kernel; try --port-search-hooks kprobe or auto")
            .map(|()| Some("fexit")),
        PortSearchHooks::Kprobe => try_kprobe(ebpf)
            .context("kprobes are not available on this kernel; try --port-search-hooks fexit or auto")
            .map(|()| Some("kprobe")),
        PortSearchHooks::Auto => {
            let fexit_error = match try_fexit(ebpf) {
                Ok(()) => return Ok(Some("fexit")),
                Err(e) => e,
            };
            unload_fexit(ebpf);
            let kprobe_error = match try_kprobe(ebpf) {
                Ok(()) => return Ok(Some("kprobe")),
                Err(e) => e,
            };
            unload_kprobe(ebpf);
            log::info!(
                "the kernel's port search cannot be hooked here ({fexit_error:#}; {kprobe_error:#}); \
                 failed connect()/bind() calls are still reported from the syscall tracepoints"
            );
            Ok(None)
        }
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, program: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(program)
        .with_context(|| format!("program {program} is missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {program} has an unexpected type"))
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let prog: &mut RawTracePoint = program_mut(ebpf, name)?;
    prog.load().with_context(|| format!("failed to load the program for raw tracepoint {name}"))?;
    prog.attach(name).with_context(|| format!("failed to attach to raw tracepoint {name}"))?;
    Ok(())
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> anyhow::Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} is missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {program} is not a tracepoint program"))?;
    prog.load().with_context(|| format!("the kernel rejected the {program} program"))?;
    prog.attach(category, name)
        .with_context(|| format!("failed to attach to tracepoint {category}:{name}"))?;
    Ok(())
}

/// Reads the `sock:inet_sock_set_state` record layout from this kernel.
fn sock_state_layout(tracefs: &Path) -> anyhow::Result<SockStateLayout> {
    let Some(format) = tracefs::Format::read(tracefs, "sock", "inet_sock_set_state")? else {
        bail!(
            "this kernel has no sock:inet_sock_set_state tracepoint (added in Linux 4.16); \
             twtrace cannot trace TCP state changes here"
        );
    };
    let read = || -> anyhow::Result<SockStateLayout> {
        let protocol = format.field("protocol", &[1, 2])?;
        Ok(SockStateLayout {
            skaddr: format.field("skaddr", &[8])?.offset,
            oldstate: format.field("oldstate", &[4])?.offset,
            newstate: format.field("newstate", &[4])?.offset,
            sport: format.field("sport", &[2])?.offset,
            dport: format.field("dport", &[2])?.offset,
            family: format.field("family", &[2])?.offset,
            protocol: protocol.offset,
            protocol_size: protocol.size,
            saddr: format.field("saddr", &[4])?.offset,
            daddr: format.field("daddr", &[4])?.offset,
            saddr_v6: format.field("saddr_v6", &[16])?.offset,
            daddr_v6: format.field("daddr_v6", &[16])?.offset,
        })
    };
    // The program copies the first RECORD_BYTES of the record in one read.
    if let Some(end) = format.end()
        && usize::from(end) > RECORD_BYTES
    {
        bail!(
            "the sock:inet_sock_set_state record is {end} bytes, more than the {RECORD_BYTES} \
             twtrace reads: this kernel needs a newer twtrace"
        );
    }
    read().context("unsupported sock:inet_sock_set_state layout on this kernel")
}

fn reset_layout(tracefs: &Path) -> anyhow::Result<ResetLayout> {
    let Some(format) = tracefs::Format::read(tracefs, "tcp", "tcp_receive_reset")? else {
        return Ok(ResetLayout::default());
    };
    Ok(ResetLayout {
        skaddr: format
            .field("skaddr", &[8])
            .context("unsupported tcp:tcp_receive_reset layout")?
            .offset,
        present: 1,
    })
}

/// Layout of `syscalls:sys_enter_<call>` / `sys_exit_<call>`; `None` without syscall
/// tracepoints.
fn syscall_layout(
    tracefs: &Path,
    call: &str,
    addr_field: &str,
    option_fields: bool,
) -> anyhow::Result<Option<SyscallLayout>> {
    let enter = tracefs::Format::read(tracefs, "syscalls", &format!("sys_enter_{call}"))?;
    let exit = tracefs::Format::read(tracefs, "syscalls", &format!("sys_exit_{call}"))?;
    let (Some(enter), Some(exit)) = (enter, exit) else {
        return Ok(None);
    };
    let read = || -> anyhow::Result<SyscallLayout> {
        Ok(SyscallLayout {
            enter_fd: enter.field("fd", &[8])?.offset,
            enter_addr: enter.field(addr_field, &[8])?.offset,
            exit_ret: exit.field("ret", &[8])?.offset,
            enter_level: if option_fields { enter.field("level", &[8])?.offset } else { 0 },
            enter_optname: if option_fields { enter.field("optname", &[8])?.offset } else { 0 },
            _pad: [0; 3],
        })
    };
    read()
        .with_context(|| format!("unsupported syscalls:sys_*_{call} layout on this kernel"))
        .map(Some)
}

/// Runs of this process's BPF programs the kernel skipped (`recursion_misses` in the
/// programs' fdinfo, Linux 5.12+): aya's program info does not expose it.
fn skipped_runs() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter(|info| info.contains("prog_id:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// How much data waits in the ring buffer before the kernel wakes the reader: an eighth
/// of it, at most 256 KiB (about 2,500 events), so the reader wakes a few times a second
/// under load and never lets the buffer fill; [`DRAIN_EVERY`] bounds the delay otherwise.
fn default_wakeup_bytes(ring_buffer_bytes: u32) -> u32 {
    (ring_buffer_bytes / 8).min(256 * 1024)
}

/// How often the reader drains the ring buffer without a wakeup.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it where allowed.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

/// Turns on the kernel's BPF run-time statistics for as long as the returned descriptor
/// is open (BPF_ENABLE_STATS: unlike the `kernel.bpf_stats_enabled` sysctl, nothing to
/// restore if twtrace dies). They cost a clock read per program run.
pub fn enable_run_statistics() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("failed to enable BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+)")
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// The programs never call the byte-at-a-time `memset`/`memmove` the object carries:
    /// LLVM writes those operations as loads and stores (twtrace-ebpf/build.rs says why;
    /// the calls cost the state hook ~150 ns a run).
    #[test]
    fn programs_call_no_byte_loop_memset_or_memmove() {
        let file = object::File::parse(super::EBPF_OBJECT)
            .expect("the embedded eBPF object should be ELF (built without AYA_BUILD_SKIP)");
        let mut calls = Vec::new();
        for section in file.sections() {
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else { continue };
                let name = file.symbol_by_index(index).and_then(|s| s.name()).unwrap_or_default();
                if name == "memset" || name == "memmove" {
                    calls.push(format!("{}+{offset:#x}: {name}", section.name().unwrap_or("?")));
                }
            }
        }
        assert!(calls.is_empty(), "calls to byte loops: {calls:?}");
    }
}
