//! Where decoded events go: one trait, one implementation per output format.

mod csv;
mod human;
mod json;

use std::io;

pub use csv::Csv;
pub use human::Human;
pub use json::JsonLines;

use crate::{clock::Clock, event::Event};

/// An output format for a stream of events.
pub trait EventSink {
    /// Writes anything that precedes the events (a column header).
    fn begin(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn write_event(&mut self, event: &Event, clock: &Clock) -> io::Result<()>;
    /// Pushes buffered output to its destination; called after each batch of events.
    fn flush(&mut self) -> io::Result<()>;
}
