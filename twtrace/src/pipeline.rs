//! The userspace half of the data path: decode -> model -> filter -> sink, with counts.

use crate::{
    clock::Clock,
    event::{self, Event},
    filter::Filter,
    model::Model,
    output::EventSink,
};

/// Event counts for the summary at exit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub seen: u64,
    pub time_wait: u64,
    pub failures: u64,
    pub shown: u64,
    pub undecodable: u64,
}

pub struct Pipeline {
    pub filter: Filter,
    pub sink: Box<dyn EventSink>,
    pub clock: Clock,
    pub model: Model,
    pub tally: Tally,
}

impl Pipeline {
    /// Handles one kernel record.
    pub fn record(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tally.seen += 1;
        match event::decode(bytes) {
            Ok(event) => self.event(event),
            Err(e) => {
                self.tally.undecodable += 1;
                log::warn!("skipped a kernel record: {e}");
                Ok(())
            }
        }
    }

    /// Handles one decoded event.
    pub fn event(&mut self, mut event: Event) -> std::io::Result<()> {
        self.model.observe(&mut event);
        match &event {
            Event::State(s) => self.tally.time_wait += u64::from(s.time_wait),
            Event::Failure(_) => self.tally.failures += 1,
        }
        if self.filter.matches(&event) {
            self.tally.shown += 1;
            self.sink.write_event(&event, &self.clock)?;
        }
        Ok(())
    }

    pub fn summary(&self, lost: u64) -> String {
        let t = &self.tally;
        format!(
            "twtrace: {} events ({} time_wait, {} failures), {} shown, {} lost, {} undecodable",
            t.seen, t.time_wait, t.failures, t.shown, lost, t.undecodable
        )
    }
}
