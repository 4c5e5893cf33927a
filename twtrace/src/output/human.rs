//! Aligned, one line per event, for people: like `tcpstates -T`, with the true owner.

use std::{fmt::Write as _, io::Write};

use jiff::tz::TimeZone;

use super::EventSink;
use crate::{
    clock::Clock,
    event::{Event, StateChange},
};

pub struct Human<W: Write> {
    out: W,
    tz: TimeZone,
    line: String,
}

impl<W: Write> Human<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            tz: TimeZone::system(),
            line: String::with_capacity(160),
        }
    }
}

/// Column header, formatted with the same widths as [`format_state`].
fn header() -> String {
    format!(
        "{:<12} {:<7} {:<16} {:<26} {:>10}  {:<23}{}",
        "TIME", "PID", "COMM", "TRANSITION", "MS", "LOCAL", "REMOTE"
    )
}

/// `addr:port`, IPv6 in brackets.
fn endpoint(line: &mut String, addr: std::net::IpAddr, port: u16) {
    let _ = match addr {
        std::net::IpAddr::V4(a) => write!(line, "{a}:{port}"),
        std::net::IpAddr::V6(a) => write!(line, "[{a}]:{port}"),
    };
}

/// Formats one state change into `line` (without newline).
pub(crate) fn format_state(line: &mut String, s: &StateChange, time: &str) {
    let (pid, comm) = match &s.owner {
        Some(o) => (o.pid.to_string(), o.comm().into_owned()),
        None => ("-".to_owned(), "-".to_owned()),
    };
    let transition = format!("{} -> {}", s.old_state_name(), s.new_state_name());
    let ms = match s.prev_state_ns {
        Some(ns) => format!("{:.3}", ns as f64 / 1e6),
        None => "-".to_owned(),
    };
    let _ = write!(
        line,
        "{time:<12} {pid:<7} {comm:<16} {transition:<26} {ms:>10}  "
    );
    let start = line.len();
    endpoint(line, s.saddr, s.sport);
    let width = line.len() - start;
    line.extend(std::iter::repeat_n(' ', 23usize.saturating_sub(width)));
    endpoint(line, s.daddr, s.dport);
}

impl<W: Write> EventSink for Human<W> {
    fn begin(&mut self) -> std::io::Result<()> {
        writeln!(self.out, "{}", header())
    }

    fn write_event(&mut self, event: &Event, clock: &Clock) -> std::io::Result<()> {
        let Event::State(s) = event;
        let time = clock
            .wall(s.ts_ns)
            .to_zoned(self.tz.clone())
            .strftime("%H:%M:%S%.3f")
            .to_string();
        self.line.clear();
        format_state(&mut self.line, s, &time);
        self.line.push('\n');
        self.out.write_all(self.line.as_bytes())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use twtrace_common::{
        EventKind,
        tcp::{AF_INET, AF_INET6},
    };

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes_of, raw_state},
    };

    fn line_for(kind: EventKind, family: u16) -> String {
        let Event::State(s) = decode(bytes_of(&raw_state(kind, family))).unwrap();
        let mut line = String::new();
        format_state(&mut line, &s, "20:09:20.123");
        line
    }

    #[test]
    fn columns_line_up_with_the_header() {
        let line = line_for(EventKind::TimeWait, AF_INET);
        assert_eq!(
            line,
            "20:09:20.123 1234    curl             FIN_WAIT2 -> TIME_WAIT          1.500  127.0.0.1:40000        10.1.2.3:8080"
        );
        let header = header();
        for (col, value) in [
            ("PID", "1234"),
            ("COMM", "curl"),
            ("TRANSITION", "FIN_WAIT2"),
            ("LOCAL", "127."),
            ("REMOTE", "10.1"),
        ] {
            assert_eq!(header.find(col), line.find(value), "{col} column");
        }
        assert_eq!(
            header.find("MS").unwrap() + 2,
            line.find("1.500").unwrap() + 5,
            "MS right-aligned"
        );
    }

    #[test]
    fn ipv6_in_brackets() {
        let line = line_for(EventKind::State, AF_INET6);
        assert!(
            line.ends_with("[::1]:40000            [fd00::2]:8080"),
            "{line}"
        );
    }
}
