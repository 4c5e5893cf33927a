//! Aligned, one line per event, for people: like `tcpstates -T`, with the true owner.

use std::{fmt::Write as _, io::Write};

use jiff::tz::TimeZone;

use super::EventSink;
use crate::{
    clock::Clock,
    event::{Call, Event, Failure, StateChange},
};

pub struct Human<W: Write> {
    out: W,
    tz: TimeZone,
    line: String,
}

impl<W: Write> Human<W> {
    pub fn new(out: W) -> Self {
        Self { out, tz: TimeZone::system(), line: String::with_capacity(160) }
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

/// Pads `line` with spaces so that what was written since `start` is `width` wide.
fn pad_from(line: &mut String, start: usize, width: usize) {
    let written = line[start..].chars().count();
    line.extend(std::iter::repeat_n(' ', width.saturating_sub(written)));
}

/// Appends the TIME, PID and COMM columns (`-` for an unknown owner), written straight
/// into `line`: this runs for every event.
fn lead_columns(
    line: &mut String,
    time: impl std::fmt::Display,
    owner: Option<&crate::event::Owner>,
) {
    let start = line.len();
    let _ = write!(line, "{time}");
    pad_from(line, start, 12);
    line.push(' ');
    let start = line.len();
    match owner {
        Some(o) => {
            let _ = write!(line, "{}", o.pid);
            pad_from(line, start, 7);
            line.push(' ');
            let start = line.len();
            line.push_str(&o.comm());
            pad_from(line, start, 16);
        }
        None => {
            line.push('-');
            pad_from(line, start, 7);
            line.push_str(" -");
            line.extend(std::iter::repeat_n(' ', 15));
        }
    }
    line.push(' ');
}

/// Appends the LOCAL and REMOTE columns.
fn endpoints(
    line: &mut String,
    local: (std::net::IpAddr, u16),
    remote: Option<(std::net::IpAddr, u16)>,
) {
    let start = line.len();
    endpoint(line, local.0, local.1);
    let width = line.len() - start;
    line.extend(std::iter::repeat_n(' ', 23usize.saturating_sub(width).max(1)));
    match remote {
        Some((addr, port)) => endpoint(line, addr, port),
        None => line.push('-'),
    }
}

/// Formats one state change into `line` (without newline).
pub(crate) fn format_state(line: &mut String, s: &StateChange, time: impl std::fmt::Display) {
    lead_columns(line, time, s.owner.as_ref());
    let start = line.len();
    let _ = write!(line, "{} -> {}", s.old_state_name(), s.new_state_name());
    pad_from(line, start, 26);
    let _ = match s.prev_state_ns {
        Some(ns) => write!(line, " {:>10.3}  ", ns as f64 / 1e6),
        None => write!(line, " {:>10}  ", "-"),
    };
    endpoints(line, (s.saddr, s.sport), Some((s.daddr, s.dport)));
}

/// Formats one failure into `line` (without newline): the call and errno in the
/// TRANSITION column, then the port context when there is one.
pub(crate) fn format_failure(line: &mut String, f: &Failure, time: impl std::fmt::Display) {
    lead_columns(line, time, f.owner.as_ref());
    let call = match f.call {
        Call::Connect => "connect",
        Call::Bind => "bind",
    };
    let start = line.len();
    let _ = write!(line, "{call}: {}", f.error_name());
    pad_from(line, start, 26);
    let _ = write!(line, " {:>10}  ", "-");
    let remote = (f.call == Call::Connect).then_some((f.daddr, f.dport));
    endpoints(line, (f.saddr, f.sport), remote);
    if let Some(ctx) = &f.context {
        line.push_str("  [");
        if let Some((lo, hi)) = ctx.port_range {
            let _ = write!(line, "ports {lo}-{hi} ({}), ", u32::from(hi.saturating_sub(lo)) + 1);
        }
        if let Some(reuse) = ctx.tcp_tw_reuse {
            let _ = write!(line, "tcp_tw_reuse={reuse}, ");
        }
        match (ctx.time_wait_to_destination, ctx.time_wait_in_netns) {
            (Some(n), _) => {
                let _ = write!(line, "{n} in TIME_WAIT to it]");
            }
            (None, Some(n)) => {
                let _ = write!(line, "{n} in TIME_WAIT in netns]");
            }
            (None, None) => {
                line.truncate(line.trim_end_matches([',', ' ']).len());
                line.push(']');
            }
        }
    }
}

impl<W: Write> EventSink for Human<W> {
    fn begin(&mut self) -> std::io::Result<()> {
        writeln!(self.out, "{}", header())
    }

    fn write_event(&mut self, event: &Event, clock: &Clock) -> std::io::Result<()> {
        let zoned = clock.wall(event.ts_ns()).to_zoned(self.tz.clone());
        let time = zoned.strftime("%H:%M:%S%.3f");
        self.line.clear();
        match event {
            Event::State(s) => format_state(&mut self.line, s, time),
            Event::Failure(f) => format_failure(&mut self.line, f, time),
        }
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
        let Event::State(s) = decode(bytes_of(&raw_state(kind, family))).unwrap() else { panic!() };
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
    fn failure_line_shows_errno_and_context() {
        let f = crate::event::tests::exhausted_connect();
        let mut line = String::new();
        format_failure(&mut line, &f, "20:09:20.123");
        assert_eq!(
            line,
            "20:09:20.123 77      nginx            connect: EADDRNOTAVAIL              -  0.0.0.0:0              10.0.0.7:5432  [ports 40000-40009 (10), tcp_tw_reuse=0, 10 in TIME_WAIT to it]"
        );
    }

    #[test]
    fn ipv6_in_brackets() {
        let line = line_for(EventKind::State, AF_INET6);
        assert!(line.ends_with("[::1]:40000            [fd00::2]:8080"), "{line}");
    }
}
