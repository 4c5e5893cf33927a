#![no_std]
// Exists so that tooling (cargo check, rust-analyzer) sees a library target; the programs
// are in the `twtrace` binary target (src/main.rs).
