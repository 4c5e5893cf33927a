//! Event layouts and load-time knobs shared by the twtrace eBPF programs and userspace.
//!
//! Everything here is `#[repr(C)]`, built from fixed-width integers and byte arrays with
//! explicit padding, so the kernel and userspace agree byte for byte. Each ring-buffer
//! record starts with an [`EventHeader`]; userspace decodes by its `kind`.
#![no_std]

pub mod config;
pub mod counters;
pub mod event;
pub mod socket_table;
pub mod staging;
pub mod tcp;

pub use event::{
    Attribution, EventHeader, EventKind, FailureEvent, FailureSource, SockStateEvent, Task,
};
pub use socket_table::SocketEntry;
