//! JSON Lines: one object per event, the schema documented in README.md.

use std::io::Write;

use serde::Serialize;

use super::EventSink;
use twtrace_common::Attribution;

use crate::{
    clock::Clock,
    container::{CgroupResolver, Workload},
    event::{Event, Failure, Family, Owner, StateChange, attribution_name},
};

pub struct JsonLines<W: Write> {
    out: W,
    /// Live tracing: names the owner's container/pod/unit from its cgroup id.
    resolver: Option<CgroupResolver>,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out, resolver: None }
    }

    /// Adds `container`, `runtime`, `pod_uid` and `unit` to events whose owner's cgroup
    /// names them (live only: a recording's cgroup ids may be gone).
    pub fn with_workloads(mut self) -> Self {
        self.resolver = Some(CgroupResolver::new());
        self
    }
}

/// What the owner's cgroup says (fields left out when unknown).
#[derive(Serialize, Default)]
struct WorkloadJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'a str>,
}

impl<'a> WorkloadJson<'a> {
    fn new(w: Option<&'a Workload>) -> Self {
        w.map_or_else(Self::default, |w| Self {
            container: w.container_id.as_deref(),
            runtime: w.runtime,
            pod_uid: w.pod_uid.as_deref(),
            unit: w.unit.as_deref(),
        })
    }
}

/// Serializes through `Display`, without building a `String` per event.
fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A kernel address, written `0xffff…` without an allocation per event.
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// The fields every event starts with: what, when, who, and the local endpoint.
#[derive(Serialize)]
struct Head<'a> {
    kind: &'static str,
    #[serde(serialize_with = "display")]
    ts: jiff::Timestamp,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<std::borrow::Cow<'a, str>>,
    /// cgroup v2 id of the owner (0 and absent owners are left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<u64>,
    attribution: &'static str,
    family: &'static str,
    saddr: std::net::IpAddr,
    sport: u16,
}

impl<'a> Head<'a> {
    #[expect(clippy::too_many_arguments, reason = "one per field, named at the two call sites")]
    fn new(
        kind: &'static str,
        ts_ns: u64,
        clock: &Clock,
        owner: Option<&'a Owner>,
        attribution: Attribution,
        family: Family,
        saddr: std::net::IpAddr,
        sport: u16,
    ) -> Self {
        Self {
            kind,
            ts: clock.wall(ts_ns),
            pid: owner.map(|o| o.pid),
            tid: owner.map(|o| o.tid),
            comm: owner.map(|o| o.comm()),
            cgroup: owner.map(|o| o.cgroup).filter(|&c| c != 0),
            attribution: attribution_name(attribution),
            family: family.name(),
            saddr,
            sport,
        }
    }
}

/// The JSON shape of a `state` / `time_wait` event. Field names are a public interface.
#[derive(Serialize)]
pub struct StateJson<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    daddr: std::net::IpAddr,
    dport: u16,
    old_state: &'static str,
    new_state: &'static str,
    prev_state_ns: Option<u64>,
    netns: u32,
    skaddr: Hex,
    cpu: u32,
    #[serde(flatten)]
    workload: WorkloadJson<'a>,
}

impl<'a> StateJson<'a> {
    pub fn new(s: &'a StateChange, clock: &Clock, workload: Option<&'a Workload>) -> Self {
        Self {
            head: Head::new(
                s.kind_name(),
                s.ts_ns,
                clock,
                s.owner.as_ref(),
                s.attribution,
                s.family,
                s.saddr,
                s.sport,
            ),
            daddr: s.daddr,
            dport: s.dport,
            old_state: s.old_state_name(),
            new_state: s.new_state_name(),
            prev_state_ns: s.prev_state_ns,
            netns: s.netns,
            skaddr: Hex(s.skaddr),
            cpu: s.cpu,
            workload: WorkloadJson::new(workload),
        }
    }
}

/// The JSON shape of a `connect_error` / `bind_error` event.
#[derive(Serialize)]
pub struct FailureJson<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daddr: Option<std::net::IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<u16>,
    errno: u32,
    error: std::borrow::Cow<'static, str>,
    source: &'static str,
    netns: u32,
    skaddr: Option<Hex>,
    cpu: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    port_range: Option<[u16; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_tw_reuse: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_wait_to_destination: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_wait_in_netns: Option<u64>,
    #[serde(flatten)]
    workload: WorkloadJson<'a>,
}

impl<'a> FailureJson<'a> {
    pub fn new(f: &'a Failure, clock: &Clock, workload: Option<&'a Workload>) -> Self {
        let connect = f.call == crate::event::Call::Connect;
        Self {
            head: Head::new(
                f.kind_name(),
                f.ts_ns,
                clock,
                f.owner.as_ref(),
                f.attribution,
                f.family,
                f.saddr,
                f.sport,
            ),
            daddr: connect.then_some(f.daddr),
            dport: connect.then_some(f.dport),
            errno: f.errno,
            error: f.error_name(),
            source: f.source_name(),
            netns: f.netns,
            skaddr: f.skaddr.map(Hex),
            cpu: f.cpu,
            port_range: f.context.and_then(|c| c.port_range).map(|(lo, hi)| [lo, hi]),
            tcp_tw_reuse: f.context.and_then(|c| c.tcp_tw_reuse),
            time_wait_to_destination: f.context.and_then(|c| c.time_wait_to_destination),
            time_wait_in_netns: f.context.and_then(|c| c.time_wait_in_netns),
            workload: WorkloadJson::new(workload),
        }
    }
}

impl<W: Write> EventSink for JsonLines<W> {
    fn write_event(&mut self, event: &Event, clock: &Clock) -> std::io::Result<()> {
        let owner = event.owner();
        let workload = match (&mut self.resolver, owner) {
            (Some(r), Some(o)) => r.resolve(o.cgroup),
            _ => None,
        };
        let workload = workload.as_deref();
        match event {
            Event::State(s) => {
                serde_json::to_writer(&mut self.out, &StateJson::new(s, clock, workload))?
            }
            Event::Failure(f) => {
                serde_json::to_writer(&mut self.out, &FailureJson::new(f, clock, workload))?
            }
        }
        self.out.write_all(b"\n")
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
        tests::{bytes_of, raw_state},
    };

    #[test]
    fn time_wait_json_has_the_documented_fields() {
        let ev = decode(bytes_of(&raw_state(EventKind::TimeWait, AF_INET))).unwrap();
        let mut out = Vec::new();
        let mut sink = JsonLines::new(&mut out);
        sink.write_event(&ev, &Clock::from_offset(1_700_000_000_000_000_000)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kind"], "time_wait");
        assert_eq!(v["ts"], "2023-11-14T22:13:20.000000042Z");
        assert_eq!(v["pid"], 1234);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["saddr"], "127.0.0.1");
        assert_eq!(v["sport"], 40000);
        assert_eq!(v["daddr"], "10.1.2.3");
        assert_eq!(v["dport"], 8080);
        assert_eq!(v["old_state"], "FIN_WAIT2");
        assert_eq!(v["new_state"], "TIME_WAIT");
        assert_eq!(v["netns"], 4026531840u32);
        assert_eq!(v["attribution"], "owner");
        assert_eq!(v["prev_state_ns"], 1_500_000);
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn connect_error_json_has_the_documented_fields() {
        let f = crate::event::tests::exhausted_connect();
        let mut out = Vec::new();
        JsonLines::new(&mut out).write_event(&Event::Failure(f), &Clock::from_offset(0)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kind"], "connect_error");
        assert_eq!(v["errno"], 99);
        assert_eq!(v["error"], "EADDRNOTAVAIL");
        assert_eq!(v["pid"], 77);
        assert_eq!(v["comm"], "nginx");
        assert_eq!(v["daddr"], "10.0.0.7");
        assert_eq!(v["dport"], 5432);
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["netns"], 4026531840u32);
        assert_eq!(v["source"], "syscall");
        assert_eq!(v["port_range"], serde_json::json!([40000, 40009]));
        assert_eq!(v["tcp_tw_reuse"], 0);
        assert_eq!(v["time_wait_to_destination"], 10);
    }

    #[test]
    fn bind_error_json_has_no_remote() {
        use crate::event::tests::raw_failure;
        let ev = decode(bytes_of(&raw_failure(EventKind::BindError, 98))).unwrap();
        let mut out = Vec::new();
        JsonLines::new(&mut out).write_event(&ev, &Clock::from_offset(0)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kind"], "bind_error");
        assert_eq!(v["error"], "EADDRINUSE");
        assert!(v.get("daddr").is_none() && v.get("dport").is_none(), "{v}");
        assert_eq!(v["port_range"], serde_json::json!([40000, 40009]));
    }
}
