//! twtrace: live-trace TCP TIME_WAIT and failed connects with the true owning process.
//!
//! Data flows one way: kernel hook -> ring buffer -> [`event::decode`] -> [`filter`] ->
//! [`output`] sinks. [`loader`] decides and attaches the hooks this kernel allows.

pub mod cli;
pub mod clock;
pub mod cmd;
pub mod container;
pub mod errno;
pub mod event;
pub mod filter;
pub mod kernel_btf;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod pressure;
pub mod priority;
pub mod privileges;
pub mod rings;
pub mod session;
pub mod socket_table;
pub mod tracefs;
