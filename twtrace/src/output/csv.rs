//! CSV: one row per event, every kind in one table (columns that do not apply are empty).

use std::io::Write;

use super::EventSink;
use crate::{
    clock::Clock,
    event::{Event, attribution_name},
};

const COLUMNS: [&str; 25] = [
    "kind",
    "ts",
    "pid",
    "tid",
    "comm",
    "attribution",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "old_state",
    "new_state",
    "prev_state_ns",
    "errno",
    "error",
    "source",
    "netns",
    "skaddr",
    "cpu",
    "port_range_low",
    "port_range_high",
    "tcp_tw_reuse",
    "time_wait_to_destination",
    "time_wait_in_netns",
];

pub struct Csv<W: Write> {
    out: csv::Writer<W>,
}

impl<W: Write> Csv<W> {
    pub fn new(out: W) -> Self {
        Self { out: csv::Writer::from_writer(out) }
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl<W: Write> EventSink for Csv<W> {
    fn begin(&mut self) -> std::io::Result<()> {
        self.out.write_record(COLUMNS).map_err(std::io::Error::other)
    }

    fn write_event(&mut self, event: &Event, clock: &Clock) -> std::io::Result<()> {
        let row: [String; 25] = match event {
            Event::State(s) => [
                s.kind_name().into(),
                clock.wall(s.ts_ns).to_string(),
                opt(s.owner.map(|o| o.pid)),
                opt(s.owner.map(|o| o.tid)),
                opt(s.owner.as_ref().map(|o| o.comm())),
                attribution_name(s.attribution).into(),
                s.family.name().into(),
                s.saddr.to_string(),
                s.sport.to_string(),
                s.daddr.to_string(),
                s.dport.to_string(),
                s.old_state_name().into(),
                s.new_state_name().into(),
                opt(s.prev_state_ns),
                String::new(),
                String::new(),
                String::new(),
                s.netns.to_string(),
                format!("{:#x}", s.skaddr),
                s.cpu.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ],
            Event::Failure(f) => {
                let ctx = f.context;
                let connect = f.call == crate::event::Call::Connect;
                [
                    f.kind_name().into(),
                    clock.wall(f.ts_ns).to_string(),
                    opt(f.owner.map(|o| o.pid)),
                    opt(f.owner.map(|o| o.tid)),
                    opt(f.owner.as_ref().map(|o| o.comm())),
                    attribution_name(f.attribution).into(),
                    f.family.name().into(),
                    f.saddr.to_string(),
                    f.sport.to_string(),
                    if connect { f.daddr.to_string() } else { String::new() },
                    if connect { f.dport.to_string() } else { String::new() },
                    String::new(),
                    String::new(),
                    String::new(),
                    f.errno.to_string(),
                    f.error_name().into_owned(),
                    f.source_name().into(),
                    f.netns.to_string(),
                    opt(f.skaddr.map(|a| format!("{a:#x}"))),
                    f.cpu.to_string(),
                    opt(ctx.and_then(|c| c.port_range).map(|r| r.0)),
                    opt(ctx.and_then(|c| c.port_range).map(|r| r.1)),
                    opt(ctx.and_then(|c| c.tcp_tw_reuse)),
                    opt(ctx.and_then(|c| c.time_wait_to_destination)),
                    opt(ctx.and_then(|c| c.time_wait_in_netns)),
                ]
            }
        };
        self.out.write_record(&row).map_err(std::io::Error::other)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use twtrace_common::{EventKind, tcp::AF_INET};

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes_of, raw_failure, raw_state},
    };

    #[test]
    fn rows_line_up_with_the_header() {
        let mut out = Vec::new();
        {
            let mut sink = Csv::new(&mut out);
            sink.begin().unwrap();
            let clock = Clock::from_offset(0);
            sink.write_event(
                &decode(bytes_of(&raw_state(EventKind::TimeWait, AF_INET))).unwrap(),
                &clock,
            )
            .unwrap();
            sink.write_event(
                &decode(bytes_of(&raw_failure(EventKind::ConnectError, 99))).unwrap(),
                &clock,
            )
            .unwrap();
            sink.flush().unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        let col = |name: &str| COLUMNS.iter().position(|c| *c == name).unwrap();
        assert_eq!(&rows[0][col("kind")], "time_wait");
        assert_eq!(&rows[0][col("new_state")], "TIME_WAIT");
        assert_eq!(&rows[0][col("comm")], "curl");
        assert_eq!(&rows[1][col("error")], "EADDRNOTAVAIL");
        assert_eq!(&rows[1][col("port_range_low")], "40000");
        assert_eq!(&rows[1][col("dport")], "5432");
    }
}
