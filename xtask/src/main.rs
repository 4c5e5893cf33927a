//! twtrace's developer tasks (`cargo xtask …`, usually through `./x`): install the eBPF
//! toolchain, build, run the tracer, run the tests (here and in QEMU), benchmark.

mod bench;
mod empty_hooks;
mod setup;
mod storm;
mod vm;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The dated nightly that compiles the eBPF crate. Keep in sync with `x` and
/// twtrace/build.rs (a unit test below checks).
pub const NIGHTLY: &str = "nightly-2026-10-29";
/// bpf-linker release built against that nightly's LLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask", about = "twtrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (idempotent): bpf-linker for the pinned nightly,
    /// Debian packages the tests use, tracefs.
    Setup,
    /// Set up, build twtrace (release) and run `twtrace trace ARGS…` as root.
    Trace {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then run every test: unit tests and the root integration tests.
    Test {
        /// Extra arguments for the test harnesses (e.g. a name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Formatting and clippy checks.
    Lint,
    /// Set up and build twtrace (release).
    Build,
    /// Benchmark twtrace against tcpstates and bpftrace on a loopback connect/close storm
    /// (needs root; installs libbpf-tools, bpftrace, bpftool). See docs/benchmarks.md.
    Bench {
        /// Seconds of storm per measurement.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Rounds; each runs every configuration once, in a rotating order. Rounds alternate
        /// between measuring rates (BPF statistics off, as in production) and measuring BPF
        /// cost (`kernel.bpf_stats_enabled` on), so at least 2.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(2..=100))]
        rounds: u64,
        /// Pin the storm to CPU 0 and each tool to CPU 1: the storm is then CPU-bound, and
        /// "µs added per conn" is the kernel-side work a tool does on the storm's path,
        /// without the vCPUs' wakeup effects (the default placement is the scheduler's).
        #[arg(long)]
        pin: bool,
        /// Where to write the results as JSON.
        #[arg(long, default_value = "target/bench/results.json")]
        json: PathBuf,
    },
    /// The benchmark's load: a loopback connect/close storm (run inside a namespace).
    #[command(hide = true)]
    Storm {
        #[arg(long)]
        seconds: f64,
    },
    /// Times connect() calls that fail at once (EBADF): what a hook adds to one call.
    #[command(hide = true)]
    ConnectLoop {
        /// How many calls to time.
        #[arg(long, default_value_t = 3_000_000)]
        calls: u64,
    },
    /// The benchmark's floors: empty programs on the named hooks (`tp:CATEGORY:NAME`,
    /// `raw:NAME`), held until killed.
    #[command(hide = true)]
    EmptyHooks {
        /// Hooks to attach, e.g. `tp:sock:inet_sock_set_state raw:sys_exit`.
        #[arg(required = true)]
        hooks: Vec<String>,
    },
    /// Run the root integration tests inside Debian kernels booted under QEMU (TCG), one
    /// kernel at a time, e.g. `vm-test --kernel 6.1 -- connect::`.
    VmTest {
        /// Kernels to test, comma-separated or repeated: `6.1`, `6.12`, `all` (both), or
        /// `host` (this machine's kernel, natively, like `test`).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
        kernel: Vec<vm::KernelArg>,
        /// Seconds one kernel may take to boot and run the suite before QEMU is killed (a
        /// run takes about 3 minutes; a guest that times out is booted once more).
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Extra arguments for the test harness (e.g. a name filter, `--skip NAME`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => {
            setup::run(&root)?;
        }
        Task::Build => {
            let env = setup::run(&root)?;
            cargo(&root, &env, &["build", "--release", "--package", "twtrace"])?;
        }
        Task::Trace { args } => {
            let env = setup::run(&root)?;
            cargo(&root, &env, &["build", "--release", "--package", "twtrace"])?;
            let bin = root.join("target/release/twtrace");
            let mut cmd = as_root(&bin)?;
            cmd.arg("trace").args(args);
            let status =
                cmd.status().with_context(|| format!("failed to run {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { args } => {
            let env = setup::run(&root)?;
            if !setup::is_root() {
                bail!(
                    "the integration tests load eBPF programs and create network namespaces: run `sudo ./x test`"
                );
            }
            let mut test_args: Vec<OsString> = vec!["test".into()];
            if !args.is_empty() {
                test_args.push("--".into());
                test_args.extend(args);
            }
            cargo(&root, &env, &test_args)?;
        }
        Task::Lint => {
            let env = setup::run(&root)?;
            cargo(&root, &env, &["fmt", "--all", "--", "--check"])?;
            cargo(&root, &env, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
            // The deployment files: systemd unit, Kubernetes manifest, Grafana dashboard.
            setup::ensure_packages(
                &[("systemd-analyze", "systemd"), ("promtool", "prometheus")],
                setup::Removals::Refuse,
            )?;
            setup::ensure_python_module("yaml", "python3-yaml")?;
            let status = std::process::Command::new(root.join("deploy/check.sh"))
                .status()
                .context("failed to run deploy/check.sh")?;
            if !status.success() {
                bail!("deploy/check.sh failed ({status})");
            }
        }
        Task::Bench { seconds, rounds, pin, json } => {
            let env = setup::run(&root)?;
            std::fs::create_dir_all(root.join("target/bench"))?;
            let placement = if pin { bench::Placement::Pinned } else { bench::Placement::Free };
            bench::run(&root, &env, seconds, rounds as usize, placement, &root.join(json))?;
        }
        Task::Storm { seconds } => storm::run(seconds)?,
        Task::ConnectLoop { calls } => storm::connect_loop(calls)?,
        Task::EmptyHooks { hooks } => empty_hooks::run(&hooks)?,
        Task::VmTest { kernel, timeout, args } => {
            let env = setup::run(&root)?;
            vm::run(&root, &env, &kernel, std::time::Duration::from_secs(timeout), &args)?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs cargo in the workspace with the environment from setup (bpf-linker on PATH).
fn cargo<S: AsRef<std::ffi::OsStr>>(
    root: &Path,
    env: &setup::Env,
    args: &[S],
) -> anyhow::Result<()> {
    let status = cargo_command(root, env).args(args).status().context("failed to run cargo")?;
    if !status.success() {
        bail!(
            "`cargo {}` failed ({status})",
            args.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}

/// A cargo command in the workspace with the environment from setup, for callers that
/// need its output.
pub(crate) fn cargo_command(root: &Path, env: &setup::Env) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).env("PATH", &env.path);
    cmd
}

/// A command running `bin` as root: directly when we are root, else through sudo.
fn as_root(bin: &Path) -> anyhow::Result<Command> {
    if setup::is_root() {
        return Ok(Command::new(bin));
    }
    if Command::new("sudo").arg("-n").arg("true").status().is_ok_and(|s| s.success())
        || which("sudo")
    {
        let mut cmd = Command::new("sudo");
        cmd.arg("--").arg(bin);
        return Ok(cmd);
    }
    bail!("twtrace needs root: run this again as root (sudo is not available)")
}

fn which(program: &str) -> bool {
    find_program(program).is_some()
}

/// Where `program` is: on PATH, or in the sbin directories a non-root PATH lacks.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nightly is named in three places that cannot share a constant.
    #[test]
    fn nightly_pins_agree() {
        let root = workspace_root();
        for file in ["x", "twtrace/build.rs"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            assert!(text.contains(NIGHTLY), "{file} does not pin {NIGHTLY}");
        }
        let stable = std::fs::read_to_string(root.join("rust-toolchain.toml")).unwrap();
        let x = std::fs::read_to_string(root.join("x")).unwrap();
        let channel =
            stable.lines().find_map(|l| l.strip_prefix("channel = ")).unwrap().trim_matches('"');
        assert!(x.contains(&format!("STABLE={channel}")), "x does not pin stable {channel}");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
