//! The userspace half of the data path: decode -> model -> filter -> sinks (an output
//! format, a recording), with counts. Live tracing and replay share it, so a replay prints
//! exactly what the live trace printed.

use twtrace_common::counters;

use crate::{
    clock::Clock,
    container::CgroupResolver,
    event::{self, Event},
    filter::Filter,
    model::Model,
    output::EventSink,
    rings::EventRings,
    session::writer::RecordingWriter,
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

/// A consumer of the events that pass the filter.
pub type Tap = Box<dyn FnMut(&Event) + Send>;

pub struct Pipeline {
    pub filter: Filter,
    pub sink: Option<Box<dyn EventSink>>,
    pub recorder: Option<RecordingWriter>,
    pub clock: Clock,
    /// Adds context to failures. None when replaying: recorded events carry theirs.
    pub model: Option<Model>,
    /// Also sees every event that passes the filter (the daemon's aggregator and metrics).
    pub tap: Option<Tap>,
    pub tally: Tally,
    /// Turns the owners' cgroup ids into containers for `--cgroup`/`--container`.
    pub resolver: CgroupResolver,
    /// Kernel-side counters as last reported (cumulative).
    losses: [u64; counters::COUNT as usize],
}

impl Pipeline {
    pub fn new(filter: Filter, clock: Clock, model: Option<Model>) -> Self {
        Self {
            filter,
            sink: None,
            recorder: None,
            clock,
            model,
            tap: None,
            tally: Tally::default(),
            resolver: CgroupResolver::new(),
            losses: [0; counters::COUNT as usize],
        }
    }

    /// Handles the records the kernel's rings hold, as far as they can be put in time
    /// order yet (see [`EventRings`]), then flushes the output.
    pub fn drain(&mut self, rings: &mut EventRings) -> anyhow::Result<()> {
        rings.drain(|record| self.record(record))?;
        self.flush()
    }

    /// Handles every record the kernel's rings hold (before a snapshot).
    pub fn drain_all(&mut self, rings: &mut EventRings) -> anyhow::Result<()> {
        rings.drain_all(|record| self.record(record))?;
        self.flush()
    }

    /// Handles every event left, in the rings or in the kernel's batches (at exit).
    pub fn drain_at_exit(&mut self, rings: &mut EventRings) -> anyhow::Result<()> {
        rings.drain_at_exit(|record| self.record(record))?;
        self.flush()
    }

    /// Handles one kernel record.
    pub fn record(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
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
    pub fn event(&mut self, mut event: Event) -> anyhow::Result<()> {
        if let Some(model) = &mut self.model {
            model.observe(&mut event);
        }
        match &event {
            Event::State(s) => self.tally.time_wait += u64::from(s.time_wait),
            Event::Failure(_) => self.tally.failures += 1,
        }
        if self.filter.matches_with(&event, &mut self.resolver) {
            self.tally.shown += 1;
            if let Some(sink) = &mut self.sink {
                sink.write_event(&event, &self.clock)?;
            }
            if let Some(recorder) = &mut self.recorder {
                recorder.event(&event)?;
            }
            if let Some(tap) = &mut self.tap {
                tap(&event);
            }
        }
        Ok(())
    }

    /// Reports on stderr whatever the kernel side could not do since the last call
    /// (`counters` are cumulative), and records it.
    pub fn losses(&mut self, ts_ns: u64, counters: &[u64]) -> anyhow::Result<()> {
        let mut changed = false;
        for (i, (&n, prev)) in counters.iter().zip(self.losses.iter_mut()).enumerate() {
            if n > *prev {
                let hint = match i as u32 {
                    counters::RINGBUF_FULL => "; raise --ring-buffer-size",
                    counters::SOCKET_TABLE_FULL => {
                        "; raise --max-sockets (classic tracepoints), or free kernel memory (tp_btf)"
                    }
                    _ => "",
                };
                eprintln!("twtrace: warning: {} x {}{hint}", n - *prev, counters::NAMES[i]);
                *prev = n;
                changed = true;
            }
        }
        if changed && let Some(recorder) = &mut self.recorder {
            recorder.lost(ts_ns, counters)?;
        }
        Ok(())
    }

    /// Events the kernel side lost: dropped (ring buffer full) or never seen (runs the
    /// kernel skipped).
    pub fn lost_events(&self) -> u64 {
        self.losses[counters::RINGBUF_FULL as usize] + self.losses[counters::SKIPPED_RUNS as usize]
    }

    /// Pushes buffered output out (after each batch of events).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(sink) = &mut self.sink {
            sink.flush()?;
        }
        Ok(())
    }

    /// Periodic work (about once a second).
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if let Some(recorder) = &mut self.recorder {
            recorder.tick()?;
        }
        Ok(())
    }

    /// Flushes everything and closes the recording.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        if let Some(recorder) = self.recorder.take() {
            let path = recorder.path().to_path_buf();
            let (events, bytes) = recorder.finish()?;
            let per_event =
                bytes.checked_div(events).map(|b| format!(", {b} bytes/event")).unwrap_or_default();
            eprintln!(
                "twtrace: recorded {events} events to {} ({bytes} bytes{per_event})",
                path.display()
            );
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let t = &self.tally;
        let gaps = match self.model.as_ref().map_or(0, Model::gaps) {
            0 => String::new(),
            n => format!(", {n} gaps (sockets seen to miss a transition)"),
        };
        format!(
            "twtrace: {} events ({} time_wait, {} failures), {} shown, {} lost, {} undecodable{gaps}",
            t.seen,
            t.time_wait,
            t.failures,
            t.shown,
            self.lost_events(),
            t.undecodable
        )
    }
}
