//! Rebuild when the bpf-linker in use changes (it is an undeclared dependency of this crate),
//! and tell it how to lower memset and memmove.
fn main() {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let linker = dir.join("bpf-linker");
            if linker.exists() {
                println!("cargo:rerun-if-changed={}", linker.display());
                break;
            }
        }
    }
    // bpf-linker asks LLVM by default to expand memcpy "in order", and that setting also
    // stops LLVM from expanding memset and memmove inline: every `[0; 16]`, every copy of
    // a `Task` became a call to a byte-at-a-time loop (aya-ebpf's `memset`/`memmove`),
    // ~400 instructions and four calls per state-hook run. Without it, LLVM writes them
    // as a few loads and stores.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
