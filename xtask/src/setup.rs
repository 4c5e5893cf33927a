//! `setup`: everything a fresh machine lacks to build and test twtrace, installed into
//! project-owned places (`~/.cache/twtrace`), idempotently: a second run takes seconds.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{BPF_LINKER_VERSION, NIGHTLY};

/// What later steps need from setup.
pub struct Env {
    /// PATH with the project's bpf-linker first.
    pub path: OsString,
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run(_root: &Path) -> anyhow::Result<Env> {
    let linker_dir = ensure_bpf_linker()?;
    if is_root() {
        ensure_debian_packages()?;
        ensure_tracefs();
    } else {
        eprintln!(
            "xtask: not root: skipping Debian packages and tracefs (twtrace itself needs root)"
        );
    }
    let mut paths = vec![linker_dir];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    Ok(Env { path: std::env::join_paths(paths).context("PATH contains an invalid entry")? })
}

/// Where the project keeps what it installs or downloads: `$TWTRACE_CACHE`, else
/// `~/.cache/twtrace`.
pub(crate) fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TWTRACE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set TWTRACE_CACHE instead")?;
    Ok(PathBuf::from(home).join(".cache/twtrace"))
}

/// Builds bpf-linker against the pinned nightly's own libLLVM (no prebuilt binary can be
/// downloaded, and the LLVM major must match rustc's). Returns the directory holding it.
fn ensure_bpf_linker() -> anyhow::Result<PathBuf> {
    let prefix = cache_dir()?.join("bpf-linker").join(format!("{NIGHTLY}-{BPF_LINKER_VERSION}"));
    let bin_dir = prefix.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file()
        && Command::new(&linker).arg("--version").output().is_ok_and(|o| o.status.success())
    {
        return Ok(bin_dir);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s LLVM (about a minute)…"
    );
    let sysroot =
        output(Command::new("rustc").arg(format!("+{NIGHTLY}")).args(["--print", "sysroot"]))
            .with_context(|| {
                format!("toolchain {NIGHTLY} is missing; run ./x setup (it installs it)")
            })?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("failed to list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    // libLLVM.so.23.1-rust-1.101.0-nightly -> 23
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {libllvm}"))?
        .to_owned();

    // An LLVM "prefix" holding only the nightly's shared library, under both names the
    // build and the loader look for.
    let llvm_lib = prefix.join("llvm/lib");
    std::fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("failed to create {}", llvm_lib.display()))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = llvm_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("failed to link {}", link.display()))?;
    }
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&prefix)
        .env("LLVM_PREFIX", prefix.join("llvm"))
        .status()
        .context("failed to run cargo install")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status})");
    }
    Ok(bin_dir)
}

/// Debian packages the tests and the tracer's users rely on: `ip` (iproute2, for network
/// namespaces), `ss` and `nstat` (ground truth), `setpriv` (util-linux), `tmux` (a real
/// terminal for the full-screen test), `prometheus` and `promtool` (scraping `serve`).
fn ensure_debian_packages() -> anyhow::Result<()> {
    ensure_packages(
        &[
            ("ip", "iproute2"),
            ("ss", "iproute2"),
            ("nstat", "iproute2"),
            ("setpriv", "util-linux"),
            ("sysctl", "procps"),
            ("tmux", "tmux"),
            ("prometheus", "prometheus"),
            ("promtool", "prometheus"),
        ],
        Removals::Refuse,
    )
}

/// Whether apt may remove installed packages to install the wanted ones.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removals {
    Refuse,
    /// Allowed, for the reason given (printed when packages are installed).
    Allow(&'static str),
}

/// Installs the Debian package of every `(command, package)` pair whose command is missing.
pub(crate) fn ensure_packages(wanted: &[(&str, &str)], removals: Removals) -> anyhow::Result<()> {
    let mut missing: Vec<&str> =
        wanted.iter().filter(|(cmd, _)| !crate::which(cmd)).map(|&(_, pkg)| pkg).collect();
    missing.dedup();
    install(&missing, removals)
}

/// Installs `package` unless python3 can import `module` already.
pub(crate) fn ensure_python_module(module: &str, package: &str) -> anyhow::Result<()> {
    let present = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present { Ok(()) } else { install(&[package], Removals::Refuse) }
}

/// Installs Debian packages with apt-get (as root).
fn install(missing: &[&str], removals: Removals) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {0}; run this again as root, or `sudo apt-get install {0}`",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "--no-install-recommends"]);
    match removals {
        // Never remove what the user installed to make room: fail and let them choose.
        Removals::Refuse => {
            install.arg("--no-remove");
        }
        Removals::Allow(why) => eprintln!("xtask: note: {why}"),
    }
    let ok = Command::new("apt-get").arg("update").status().is_ok_and(|s| s.success())
        && install
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "failed to install {0} with apt-get (see its message above); if it would have to \
             remove other packages, resolve that and run `apt-get install {0}` yourself",
            missing.join(" ")
        );
    }
    Ok(())
}

/// twtrace mounts tracefs itself when needed; mounting here too lets other tools
/// (bpftool, perf) see it during development.
fn ensure_tracefs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" tracefs "));
    if !mounted {
        let _ =
            Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]).status();
    }
}

/// Runs `cmd` and returns its stdout; an error holds its stderr.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
