//! Subcommands: thin glue over the loader, the pipeline, sinks and recordings.

pub mod pressure;
pub mod replay;
pub mod serve;
pub mod trace;
