//! Subcommands: thin glue over the loader, the decoder, filters and sinks.

pub mod trace;
