//! `vm-test`: the root integration tests inside Debian kernels booted under QEMU (TCG), for
//! what this machine's kernel cannot show (kprobes, fentry, other tracepoint layouts).
//!
//! A guest boots from an initramfs built here: the host's own programs and their shared
//! libraries, the test executable and twtrace at the paths they have on the host (the tests
//! find twtrace through a path compiled into them), the modules the tests need, and an
//! `/init` that runs the suite and prints a result marker on the serial console. Debian
//! kernels are downloaded once into the cache and unpacked there, never installed.

use std::{
    collections::{HashMap, HashSet},
    ffi::{OsStr, OsString},
    fmt::Write as _,
    fs::File,
    io::{BufWriter, Read as _, Write},
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup;

/// What `--kernel` accepts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelArg {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    /// Every Debian kernel (not the host).
    All,
    /// This machine's kernel, natively.
    Host,
}

/// A Debian kernel series. Its package is found through a metapackage because the ABI
/// number in the real package name changes with every Debian point release.
#[derive(PartialEq)]
struct Debian {
    label: &'static str,
    metapackage: &'static str,
}

const DEBIAN_KERNELS: [Debian; 2] = [
    Debian { label: "6.1", metapackage: "linux-image-amd64" },
    Debian { label: "6.12", metapackage: "linux-image-6.12-amd64" },
];

/// Modules the tests need that Debian builds as modules, not into the kernel:
/// `connect::host_unreachable_async` creates a veth pair; `top` and `record` list sockets
/// with sock_diag (a real system loads these on demand; the guest has no modprobe).
const MODULES: &[&str] = &["veth", "inet_diag", "tcp_diag"];

/// The line `/init` prints after the suite, followed by its exit code.
const MARKER: &str = "TWTRACE-VM-RESULT";

/// How long a guest may take to power off once it has printed its result.
const POWER_OFF_GRACE: Duration = Duration::from_secs(30);

#[derive(PartialEq)]
enum Target {
    Host,
    Vm(&'static Debian),
}

enum Outcome {
    Passed,
    Failed(i32),
    NoResult,
    TimedOut,
    Error,
}

struct RunResult {
    kernel: String,
    outcome: Outcome,
    /// Boot plus suite (VM) or the suite (host); `None` when it never started.
    elapsed: Option<Duration>,
}

pub fn run(
    root: &Path,
    env: &setup::Env,
    kernels: &[KernelArg],
    timeout: Duration,
    args: &[OsString],
) -> anyhow::Result<()> {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .with_context(|| format!("test argument {a:?} is not UTF-8"))
        })
        .collect::<anyhow::Result<_>>()?;
    let targets = targets(kernels);
    let build = if targets.iter().any(|t| matches!(t, Target::Vm(_))) {
        setup::ensure_packages(
            &[
                ("qemu-system-x86_64", "qemu-system-x86"),
                // insmod for the guest, depmod for the unpacked kernels.
                ("insmod", "kmod"),
                ("depmod", "kmod"),
                ("xz", "xz-utils"),
            ],
            setup::Removals::Allow(
                "Debian 12's qemu-system-x86 (7.2) replaces a newer qemu-utils from backports if one \
             is installed (this machine image ships one); twtrace needs qemu-system only, not qemu-img",
            ),
        )?;
        Some(build_tests(root, env)?)
    } else {
        None
    };

    let mut results = Vec::new();
    for target in &targets {
        let result = match (target, &build) {
            (Target::Host, _) => run_host(root, env, &args),
            (Target::Vm(debian), Some(build)) => {
                let attempt = || {
                    run_vm(debian, build, timeout, &args).unwrap_or_else(|e| {
                        eprintln!("xtask: vm-test {}: {e:#}", debian.label);
                        RunResult {
                            kernel: debian.label.to_owned(),
                            outcome: Outcome::Error,
                            elapsed: None,
                        }
                    })
                };
                let first = attempt();
                // A guest that never reports (emulated CPUs stalled: TCG shows RCU stalls
                // now and then) says nothing about the tests: boot it once more. A suite
                // that ran and failed is never retried.
                if matches!(first.outcome, Outcome::TimedOut | Outcome::NoResult) {
                    eprintln!(
                        "xtask: vm-test {}: the guest did not report a result; booting it once more",
                        debian.label
                    );
                    attempt()
                } else {
                    first
                }
            }
            (Target::Vm(_), None) => unreachable!("the tests are built when a VM is wanted"),
        };
        results.push(result);
    }

    print_summary(&results);
    let failed = results.iter().filter(|r| !matches!(r.outcome, Outcome::Passed)).count();
    if failed > 0 {
        bail!("the root tests failed on {failed} of {} kernels", results.len());
    }
    Ok(())
}

/// `--kernel` values in the order given, `all` expanded, duplicates dropped.
fn targets(kernels: &[KernelArg]) -> Vec<Target> {
    let mut targets = Vec::new();
    let mut add = |t: Target| {
        if !targets.contains(&t) {
            targets.push(t);
        }
    };
    for k in kernels {
        match k {
            KernelArg::V6_1 => add(Target::Vm(&DEBIAN_KERNELS[0])),
            KernelArg::V6_12 => add(Target::Vm(&DEBIAN_KERNELS[1])),
            KernelArg::All => DEBIAN_KERNELS.iter().for_each(|d| add(Target::Vm(d))),
            KernelArg::Host => add(Target::Host),
        }
    }
    targets
}

fn run_host(root: &Path, env: &setup::Env, args: &[String]) -> RunResult {
    let kernel = format!("host {}", host_release());
    if !setup::is_root() {
        eprintln!("xtask: the root tests need root on the host: run `sudo ./x vm-test`");
        return RunResult { kernel, outcome: Outcome::Error, elapsed: None };
    }
    let start = Instant::now();
    let status = crate::cargo_command(root, env)
        .args(["test", "--package", "twtrace", "--test", "root", "--"])
        .args(args)
        .status();
    let outcome = match status {
        Ok(s) if s.success() => Outcome::Passed,
        Ok(s) => Outcome::Failed(s.code().unwrap_or(-1)),
        Err(e) => {
            eprintln!("xtask: failed to run cargo test: {e}");
            Outcome::Error
        }
    };
    RunResult { kernel, outcome, elapsed: Some(start.elapsed()) }
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The built root test executable and what it runs.
struct Build {
    tests: PathBuf,
    twtrace: PathBuf,
    /// Cargo runs tests from their package's directory; the guest does the same.
    package_dir: PathBuf,
}

/// Builds the root tests (debug, like `cargo test`) and reads the executables' paths from
/// cargo's messages. Building an integration test also builds its package's binaries, so
/// twtrace's path is the one compiled into the tests as `CARGO_BIN_EXE_twtrace`.
fn build_tests(root: &Path, env: &setup::Env) -> anyhow::Result<Build> {
    eprintln!("xtask: building the root tests");
    let out = crate::cargo_command(root, env)
        .args(["test", "--package", "twtrace", "--test", "root", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run cargo")?;
    if !out.status.success() {
        bail!("building the root tests failed ({})", out.status);
    }
    let (mut tests, mut twtrace, mut package_dir) = (None, None, None);
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        let is = |kind: &str| {
            msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|v| v == kind))
        };
        if name == "root" && is("test") {
            tests = Some(PathBuf::from(exe));
            package_dir = msg["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).parent())
                .map(Path::to_path_buf);
        } else if name == "twtrace" && is("bin") {
            twtrace = Some(PathBuf::from(exe));
        }
    }
    Ok(Build {
        tests: tests.context("cargo reported no executable for the `root` test")?,
        twtrace: twtrace.context("cargo reported no executable for the `twtrace` binary")?,
        package_dir: package_dir.context("cargo reported no manifest path for `root`")?,
    })
}

fn run_vm(
    debian: &Debian,
    build: &Build,
    timeout: Duration,
    args: &[String],
) -> anyhow::Result<RunResult> {
    let kernel = fetch_kernel(debian)?;
    // Rebuilt on every run, kept (one per kernel) so the guest can be booted by hand.
    let initramfs = setup::cache_dir()?.join("vm").join(format!("{}.cpio", kernel.version));
    write_initramfs(&initramfs, build, &kernel, args)
        .with_context(|| format!("failed to build the initramfs {}", initramfs.display()))?;

    eprintln!(
        "xtask: booting {} with {} under QEMU (TCG, timeout {} s)",
        kernel.version,
        initramfs.display(),
        timeout.as_secs()
    );
    let start = Instant::now();
    let outcome = boot(&kernel.vmlinuz, &initramfs, timeout)?;
    Ok(RunResult { kernel: kernel.version, outcome, elapsed: Some(start.elapsed()) })
}

/// A Debian kernel package unpacked in the cache.
struct Kernel {
    /// The unpacked package: `boot/`, `lib/modules/<version>/`.
    root: PathBuf,
    version: String,
    vmlinuz: PathBuf,
}

/// The newest kernel of a series, from the cache or downloaded into it.
fn fetch_kernel(debian: &Debian) -> anyhow::Result<Kernel> {
    let package = match resolve(debian) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("xtask: {e:#}; refreshing apt's package lists");
            apt_update()?;
            resolve(debian)?
        }
    };
    let dir = setup::cache_dir()?.join("kernels");
    let root = dir.join(&package);
    if !root.is_dir() {
        download(&package, &dir, &root)?;
    }
    let version = kernel_version(&root)?;
    Ok(Kernel { vmlinuz: root.join(format!("boot/vmlinuz-{version}")), root, version })
}

/// The unsigned image package the metapackage points at today (same kernel, no Secure Boot
/// signature, and not tied to the signed package's install scripts).
fn resolve(debian: &Debian) -> anyhow::Result<String> {
    let deps = setup::output(Command::new("apt-cache").args(["depends", debian.metapackage]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(|p| format!("{p}-unsigned"))
        .with_context(|| format!("apt-cache names no kernel image for {}", debian.metapackage))
}

fn apt_update() -> anyhow::Result<()> {
    let status =
        Command::new("apt-get").arg("update").status().context("failed to run apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status}); it needs root and network access");
    }
    Ok(())
}

/// Downloads and unpacks `package` into `root`, through a staging directory so that an
/// interrupted run never leaves a half-unpacked kernel that looks cached.
fn download(package: &str, dir: &Path, root: &Path) -> anyhow::Result<()> {
    eprintln!("xtask: downloading {package} into {}", dir.display());
    let staging = dir.join(format!("{package}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("failed to remove {}", staging.display()))?;
    }
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("failed to create {}", staging.display()))?;
    let apt_download = || {
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(&staging)
            .status()
            .is_ok_and(|s| s.success())
    };
    // Stale package lists name versions the mirror no longer has.
    if !apt_download() && !(apt_update().is_ok() && apt_download()) {
        bail!("`apt-get download {package}` failed; check network access and apt's sources");
    }
    let deb = std::fs::read_dir(&staging)
        .with_context(|| format!("failed to list {}", staging.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .with_context(|| format!("apt-get put no .deb into {}", staging.display()))?;
    let unpacked = staging.join("root");
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    std::fs::remove_file(&deb).with_context(|| format!("failed to remove {}", deb.display()))?;
    // modules.dep is made by depmod when a package is installed, so the .deb has none.
    let version = kernel_version(&unpacked)?;
    run_checked(Command::new("depmod").arg("--basedir").arg(&unpacked).arg(&version))?;
    std::fs::rename(&unpacked, root)
        .with_context(|| format!("failed to move the kernel to {}", root.display()))?;
    std::fs::remove_dir(&staging).with_context(|| format!("failed to remove {}", staging.display()))
}

/// The release of the kernel unpacked in `root`, from its `boot/vmlinuz-<release>`.
fn kernel_version(root: &Path) -> anyhow::Result<String> {
    let boot = root.join("boot");
    std::fs::read_dir(&boot)
        .with_context(|| format!("failed to list {}", boot.display()))?
        .filter_map(Result::ok)
        .find_map(|e| {
            e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_owned)
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// Runs `cmd`, failing with its name when it fails.
fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("failed to run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Host programs the tests and `/init` run, looked up on this machine.
const GUEST_PROGRAMS: &[&str] =
    &["mount", "mkdir", "ip", "ss", "nstat", "sysctl", "setpriv", "insmod", "tmux"];

/// Writes the guest's initramfs to `path`, through a temporary file so that a guest being
/// booted from the previous one never reads half a file.
fn write_initramfs(
    path: &Path,
    build: &Build,
    kernel: &Kernel,
    args: &[String],
) -> anyhow::Result<()> {
    let dir = path.parent().context("the initramfs path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let partial = path.with_extension("cpio.partial");
    let file = File::create(&partial)
        .with_context(|| format!("failed to create {}", partial.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc"] {
        cpio.dir(Path::new(dir))?;
    }
    // The kernel opens init's stdin/out/err on /dev/console before devtmpfs is mounted.
    cpio.char_device(Path::new("dev/console"), (5, 1))?;
    // The interpreter /init names, then what /init and the tests run.
    cpio.host_program(Path::new("/bin/sh"))?;
    for program in GUEST_PROGRAMS {
        let path = crate::find_program(program)
            .with_context(|| format!("`{program}` is not installed on this machine"))?;
        cpio.host_program(&path)?;
    }
    // tmux (the full-screen test) refuses to start without a UTF-8 character set.
    let ctype = Path::new("/usr/lib/locale/C.utf8/LC_CTYPE");
    if ctype.exists() {
        cpio.host_path(ctype)?;
    }
    cpio.host_program(&build.tests)?;
    cpio.host_program(&build.twtrace)?;
    cpio.host_path(&build.package_dir)?;
    let modules = add_modules(&mut cpio, kernel)?;
    let init = init_script(build, &modules, args);
    cpio.file(Path::new("init"), 0o755, init.as_bytes())?;
    cpio.finish()?.flush().with_context(|| format!("failed to write {}", partial.display()))?;
    std::fs::rename(&partial, path)
        .with_context(|| format!("failed to rename {} to {}", partial.display(), path.display()))
}

/// Adds [`MODULES`] and what they depend on, decompressed here so that the guest's insmod
/// needs no decompression support. Returns their guest paths in load order.
fn add_modules(cpio: &mut Cpio<impl Write>, kernel: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let base = kernel.root.join("lib/modules").join(&kernel.version);
    let dep_file = base.join("modules.dep");
    let deps = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("failed to read {}", dep_file.display()))?;
    // "kernel/drivers/net/veth.ko.xz: dep.ko.xz …", dependencies listed transitively, the
    // ones to load first last.
    let by_name: HashMap<String, (&str, Vec<&str>)> = deps
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(module, deps)| {
            (module_name(module), (module, deps.split_whitespace().rev().collect()))
        })
        .collect();
    let mut order = Vec::new();
    for name in MODULES {
        let (module, deps) = by_name
            .get(*name)
            .with_context(|| format!("{} lists no module `{name}`", dep_file.display()))?;
        for file in deps.iter().chain([module]) {
            let (plain, decompress) = match file.rsplit_once(".ko.") {
                Some((stem, "xz")) => (format!("{stem}.ko"), Some("xz")),
                Some((stem, "zst")) => (format!("{stem}.ko"), Some("zstd")),
                Some((stem, "gz")) => (format!("{stem}.ko"), Some("gzip")),
                _ => ((*file).to_owned(), None),
            };
            let guest = Path::new("usr/lib/modules").join(&kernel.version).join(plain);
            if order.contains(&guest) {
                continue;
            }
            let host = base.join(file);
            let data = match decompress {
                Some(tool) => decompress_with(tool, &host)?,
                None => std::fs::read(&host)
                    .with_context(|| format!("failed to read {}", host.display()))?,
            };
            cpio.file(&guest, 0o644, &data)?;
            order.push(guest);
        }
    }
    Ok(order)
}

/// `kernel/drivers/net/veth.ko.xz` -> `veth` (kmod treats `-` and `_` alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn decompress_with(tool: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("failed to run {tool}"))?;
    if !out.status.success() {
        bail!(
            "`{tool} -dc {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// `/init`: mounts what the tests use, loads the modules, runs the suite, reports, powers
/// off.
fn init_script(build: &Build, modules: &[PathBuf], args: &[String]) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by xtask/src/vm.rs (`./x vm-test`).\n");
    s.push_str("export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n");
    for (fs, dir) in [
        ("proc", "/proc"),
        ("sysfs", "/sys"),
        ("devtmpfs", "/dev"),
        // Pseudo-terminals, for the full-screen test (tmux).
        ("devpts", "/dev/pts"),
        // ip netns keeps its namespaces in /run/netns and needs a writable /run.
        ("tmpfs", "/run"),
        ("tracefs", "/sys/kernel/tracing"),
        // Containers are cgroups: the container tests make their own.
        ("cgroup2", "/sys/fs/cgroup"),
    ] {
        // The initramfs root is writable already (so /tmp needs no tmpfs), and a mount over
        // a directory holding the test binaries (a checkout under /run, say) would hide them.
        if fs == "tmpfs" && build.tests.starts_with(dir) {
            continue;
        }
        if fs == "devpts" {
            let _ = writeln!(s, "mkdir -p {dir}");
        }
        let _ = writeln!(s, "mount -t {fs} {fs} {dir}");
    }
    s.push_str("ip link set lo up\n");
    for m in modules {
        let path = Path::new("/").join(m);
        let _ = writeln!(
            s,
            "insmod {} || echo 'twtrace-vm: insmod failed: the tests that need it will fail'",
            shell_quote(&path.to_string_lossy())
        );
    }
    s.push_str("read -r release < /proc/sys/kernel/osrelease\n");
    s.push_str("echo \"twtrace-vm: running the root tests on Linux $release\"\n");
    let _ = writeln!(s, "cd {}", shell_quote(&build.package_dir.to_string_lossy()));
    let _ = write!(s, "{} --test-threads=1", shell_quote(&build.tests.to_string_lossy()));
    for a in args {
        let _ = write!(s, " {}", shell_quote(a));
    }
    let _ = writeln!(s, "\necho \"{MARKER} $?\"");
    // Power off now rather than by exiting: a dying init makes the kernel print a panic.
    s.push_str("echo o > /proc/sysrq-trigger\nread -r _ < /dev/console\n");
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots the guest, streams its console to stdout and returns what `/init` reported.
fn boot(vmlinuz: &Path, initramfs: &Path, timeout: Duration) -> anyhow::Result<Outcome> {
    let mut qemu = Command::new("qemu-system-x86_64")
        // KVM here is a nested paravirtual flavour that fails with these kernels, and QEMU
        // does not fall back when it opens: ask for TCG on purpose.
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1G", "-smp", "2"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        // A soft lockup (seen once in the 6.1 guest, under TCG) prints its stack at
        // loglevel 5 and panics the guest, which then stops at once and is booted again,
        // instead of hanging until the timeout.
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_panic=1"])
        // No network card: the guest only uses loopback and veth, and without one no iPXE
        // ROM prints its banner or delays the boot.
        .args(["-nic", "none", "-nographic", "-no-reboot"])
        // No terminal on stdin, so QEMU leaves the user's terminal settings alone.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start qemu-system-x86_64")?;
    let mut console = qemu.stdout.take().context("QEMU's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stream = Console::default();
        let mut stdout = std::io::stdout();
        let mut buf = [0; 4096];
        loop {
            let n = match console.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(code) = stream.feed(&buf[..n], &mut stdout) {
                let _ = tx.send(code);
            }
        }
        if !stream.line.is_empty() {
            let _ = stream.feed(b"\n", &mut stdout);
        }
    });

    let deadline = Instant::now() + timeout;
    let outcome = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(0) => Outcome::Passed,
        Ok(code) => Outcome::Failed(code),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            eprintln!(
                "xtask: the guest stopped without printing its result; to see boot errors, \
                 drop `quiet` from the kernel command line in {}",
                file!()
            );
            Outcome::NoResult
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Outcome::TimedOut,
    };
    let grace = match outcome {
        Outcome::TimedOut => Duration::ZERO,
        _ => POWER_OFF_GRACE,
    };
    let stop = Instant::now() + grace;
    loop {
        if qemu.try_wait().context("failed to wait for QEMU")?.is_some() {
            break;
        }
        if Instant::now() >= stop {
            if matches!(outcome, Outcome::TimedOut) {
                eprintln!("xtask: no result after {} s: killing QEMU", timeout.as_secs());
            } else {
                eprintln!("xtask: the guest did not power off: killing QEMU");
            }
            let _ = qemu.kill();
            qemu.wait().context("failed to wait for QEMU")?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = reader.join();
    Ok(outcome)
}

/// The guest's serial console turned into clean text: without `\r` and terminal escape
/// sequences. Partial lines are shown at once: libtest prints a test's name before running
/// it, which tells which test hangs.
#[derive(Default)]
struct Console {
    /// The current line, raw.
    line: Vec<u8>,
    /// How many bytes of the current line's clean text are written already.
    shown: usize,
}

impl Console {
    /// Writes the newly printable text to `out`; returns the result code when the marker line
    /// is complete.
    fn feed(&mut self, bytes: &[u8], out: &mut impl Write) -> Option<i32> {
        let mut code = None;
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(chunk);
            let complete = self.line.ends_with(b"\n");
            let ready = if complete { self.line.len() } else { printable_len(&self.line) };
            let text = clean_console_line(&self.line[..ready]);
            let _ = out.write_all(text.get(self.shown..).unwrap_or_default().as_bytes());
            self.shown = text.len();
            if complete {
                let _ = out.write_all(b"\n");
                code = code.or(result_code(&text));
                self.line.clear();
                self.shown = 0;
            }
        }
        let _ = out.flush();
        code
    }
}

/// How much of an unfinished line cleans to the same text whatever follows: up to a
/// character cut in half or an escape sequence not yet ended.
fn printable_len(line: &[u8]) -> usize {
    let utf8 = match std::str::from_utf8(line) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => line.len(),
    };
    let escape = match line.iter().rposition(|&b| b == 0x1b) {
        Some(i) => match line.get(i + 1) {
            None => i,
            Some(b'[') if !line[i + 2..].iter().any(|b| (0x40..=0x7e).contains(b)) => i,
            Some(_) => line.len(),
        },
        None => line.len(),
    };
    utf8.min(escape)
}

/// A console line as text: without the serial line's `\r` and terminal escape sequences.
fn clean_console_line(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // CSI: ESC [ parameters, then one final byte in @..~; other escapes are 2 chars.
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// The exit code in a `TWTRACE-VM-RESULT <code>` line (kernel messages may share the line).
fn result_code(line: &str) -> Option<i32> {
    let (_, rest) = line.split_once(MARKER)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn print_summary(results: &[RunResult]) {
    println!("\nxtask: vm-test summary");
    println!("{:<32} {:<22} {:>9}", "KERNEL", "RESULT", "TIME");
    for r in results {
        let outcome = match r.outcome {
            Outcome::Passed => "passed".to_owned(),
            Outcome::Failed(code) => format!("failed (exit {code})"),
            Outcome::NoResult => "no result (guest died)".to_owned(),
            Outcome::TimedOut => "timed out".to_owned(),
            Outcome::Error => "error (see above)".to_owned(),
        };
        let time = r.elapsed.map_or_else(
            || "-".to_owned(),
            |d| format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60),
        );
        println!("{:<32} {outcome:<22} {time:>9}", r.kernel);
    }
}

/// A cpio archive in the "newc" format, the one the kernel unpacks as an initramfs.
struct Cpio<W: Write> {
    out: W,
    /// Bytes written so far: every header and every file's data start 4-byte aligned.
    offset: u64,
    next_ino: u32,
    /// Paths already in the archive, so shared libraries and directories appear once.
    added: HashSet<PathBuf>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self { out, offset: 0, next_ino: 1, added: HashSet::new() }
    }

    /// Writes one header and name; the caller writes `size` bytes of data after it.
    fn header(
        &mut self,
        name: &Path,
        mode: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> anyhow::Result<()> {
        let name = name.to_str().context("a path in the initramfs is not UTF-8")?;
        let size = u32::try_from(size).with_context(|| format!("{name} is over 4 GiB"))?;
        let nlink = if mode & libc::S_IFMT == libc::S_IFDIR { 2 } else { 1 };
        let ino = self.next_ino;
        self.next_ino += 1;
        let name_size = u32::try_from(name.len() + 1).context("a path is too long")?;
        // After the magic: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize (with its NUL), check.
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0];
        let mut header = String::from("070701");
        for field in fields {
            let _ = write!(header, "{field:08X}");
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(bytes).context("failed to write the initramfs")?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> anyhow::Result<()> {
        let n = (4 - self.offset % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }

    /// Adds an entry at `path` (relative to the guest's /) once, its parents first.
    fn claim(&mut self, path: &Path) -> anyhow::Result<bool> {
        if !self.added.insert(path.to_path_buf()) {
            return Ok(false);
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.dir(parent)?;
        }
        Ok(true)
    }

    fn dir(&mut self, path: &Path) -> anyhow::Result<()> {
        if self.claim(path)? {
            self.header(path, libc::S_IFDIR | 0o755, 0, (0, 0))?;
        }
        Ok(())
    }

    fn file(&mut self, path: &Path, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        if self.claim(path)? {
            self.header(path, libc::S_IFREG | mode, data.len() as u64, (0, 0))?;
            self.put(data)?;
            self.pad()?;
        }
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: &Path) -> anyhow::Result<()> {
        if self.claim(path)? {
            let target = target.to_str().context("a symlink target is not UTF-8")?;
            self.header(path, libc::S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
            self.put(target.as_bytes())?;
            self.pad()?;
        }
        Ok(())
    }

    fn char_device(&mut self, path: &Path, (major, minor): (u32, u32)) -> anyhow::Result<()> {
        if self.claim(path)? {
            self.header(path, libc::S_IFCHR | 0o600, 0, (major, minor))?;
        }
        Ok(())
    }

    /// Adds a host program and every shared library it loads (with the dynamic loader).
    fn host_program(&mut self, program: &Path) -> anyhow::Result<()> {
        self.host_path(program)?;
        let ldd = setup::output(Command::new("ldd").arg(program))
            // ldd fails on static executables: they need nothing more.
            .unwrap_or_default();
        if ldd.contains("not found") {
            bail!("{} lacks shared libraries:\n{ldd}", program.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)"
        for lib in ldd
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(PathBuf::from)
            .collect::<Vec<_>>()
        {
            self.host_path(&lib)?;
        }
        Ok(())
    }

    /// Adds the host file (or empty directory) at `path` at the same place in the guest,
    /// with every symlink met on the way (`/lib64 -> usr/lib64`, `/usr/sbin/insmod ->
    /// /bin/kmod`), so that it is found under each name programs use.
    fn host_path(&mut self, path: &Path) -> anyhow::Result<()> {
        // Components still to resolve, next one last; symlink targets are pushed on top.
        let mut todo: Vec<OsString> = Vec::new();
        push_components(&mut todo, path);
        let mut real = PathBuf::from("/");
        let mut links = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                real.pop();
                continue;
            }
            let next = real.join(&part);
            let meta = std::fs::symlink_metadata(&next)
                .with_context(|| format!("failed to stat {}", next.display()))?;
            let guest = next.strip_prefix("/").unwrap_or(&next).to_path_buf();
            if meta.is_symlink() {
                links += 1;
                if links > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                let target = std::fs::read_link(&next)
                    .with_context(|| format!("failed to read the link {}", next.display()))?;
                self.symlink(&guest, &target)?;
                if target.is_absolute() {
                    real = PathBuf::from("/");
                }
                push_components(&mut todo, &target);
            } else if meta.is_dir() {
                self.dir(&guest)?;
                real = next;
            } else if todo.is_empty() {
                self.host_file(&next, &guest, &meta)?;
            } else {
                bail!("{} is not a directory", next.display());
            }
        }
        Ok(())
    }

    fn host_file(
        &mut self,
        host: &Path,
        guest: &Path,
        meta: &std::fs::Metadata,
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        if !self.claim(guest)? {
            return Ok(());
        }
        let mut file =
            File::open(host).with_context(|| format!("failed to open {}", host.display()))?;
        self.header(
            guest,
            libc::S_IFREG | (meta.permissions().mode() & 0o7777),
            meta.len(),
            (0, 0),
        )?;
        let copied = std::io::copy(&mut file, &mut self.out)
            .with_context(|| format!("failed to copy {}", host.display()))?;
        if copied != meta.len() {
            bail!("{} changed size while being copied", host.display());
        }
        self.offset += copied;
        self.pad()
    }

    /// Writes the trailer and returns the writer.
    fn finish(mut self) -> anyhow::Result<W> {
        self.header(Path::new("TRAILER!!!"), 0, 0, (0, 0))?;
        Ok(self.out)
    }
}

/// Pushes `path`'s components onto a stack so that the first one is popped first.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_carriage_returns_and_escapes() {
        let line = b"\x1b[0m\x1b[1;32mtest a ... ok\x1b[0m\r\r\n";
        assert_eq!(clean_console_line(line), "test a ... ok");
    }

    #[test]
    fn console_shows_partial_lines_and_finds_the_result() {
        let mut console = Console::default();
        let mut out = Vec::new();
        let mut codes = Vec::new();
        for chunk in [
            &b"test a ... "[..],
            b"\x1b[3",
            b"2mok\x1b[0m\r",
            b"\n\xc3",
            b"\xa9\r\nTWTRACE-VM-RESULT 3\r\n",
        ] {
            codes.extend(console.feed(chunk, &mut out));
        }
        assert_eq!(String::from_utf8(out).unwrap(), "test a ... ok\n\u{e9}\nTWTRACE-VM-RESULT 3\n");
        assert_eq!(codes, [3]);
    }

    #[test]
    fn result_marker_is_found_among_kernel_messages() {
        assert_eq!(result_code("TWTRACE-VM-RESULT 0"), Some(0));
        assert_eq!(result_code("[ 3.1] x TWTRACE-VM-RESULT 101"), Some(101));
        assert_eq!(result_code("TWTRACE-VM-RESULT"), None);
        assert_eq!(result_code("test result: ok"), None);
    }

    #[test]
    fn module_names_ignore_compression_and_dashes() {
        assert_eq!(module_name("kernel/drivers/net/veth.ko.xz"), "veth");
        assert_eq!(module_name("kernel/net/ipv4/ip-tunnel.ko"), "ip_tunnel");
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file(Path::new("a/b"), 0o644, b"hello").unwrap();
        let out = cpio.finish().unwrap();
        // "a" (dir), "a/b", trailer: each header starts with the magic, 4-byte aligned.
        let starts: Vec<usize> =
            out.windows(6).enumerate().filter(|(_, w)| w == b"070701").map(|(i, _)| i).collect();
        assert_eq!(starts.len(), 3);
        assert!(starts.iter().all(|i| i % 4 == 0));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// Regression: CI's checkout under /tmp was hidden by a tmpfs mounted over /tmp.
    #[test]
    fn init_does_not_mount_over_the_checkout() {
        for root in ["/tmp/ci", "/run/ci", "/work/main"] {
            let build = Build {
                tests: Path::new(root).join("target/debug/deps/root-1"),
                twtrace: Path::new(root).join("target/debug/twtrace"),
                package_dir: Path::new(root).join("twtrace"),
            };
            let init = init_script(&build, &[], &[]);
            for line in init.lines().filter(|l| l.starts_with("mount -t tmpfs")) {
                let dir = line.rsplit(' ').next().unwrap();
                assert!(!build.tests.starts_with(dir), "{line} hides {}", build.tests.display());
            }
            assert!(init.contains("mount -t proc proc /proc"));
        }
    }
}
