//! Cross-builds the eBPF programs (twtrace-ebpf) with the pinned nightly and embeds them.
use anyhow::{Context as _, anyhow};

/// The dated nightly that builds the eBPF crate; `./x setup` installs it with rust-src and
/// a bpf-linker built against its LLVM. Keep in sync with `x` and xtask.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-29";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("failed to read the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "twtrace-ebpf")
        .ok_or_else(|| anyhow!("package twtrace-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("failed to build the eBPF programs; run `./x setup` to install the eBPF toolchain")?;
    // With AYA_BUILD_SKIP=1 (e.g. the fuzz targets, which need only the file format) no
    // object is built; an empty one lets the crate compile, and the loader says why it
    // cannot trace.
    let object = std::path::Path::new(&std::env::var_os("OUT_DIR").context("OUT_DIR not set")?)
        .join("twtrace");
    if !object.exists() {
        std::fs::write(&object, b"").context("failed to write the placeholder eBPF object")?;
    }
    Ok(())
}
