//! Events to frames and back. Within a chunk (between two sync points) tasks and socket
//! endpoints are written once and referred to by small ids, and times are deltas: a
//! state change then takes about 15 bytes instead of the kernel's 112.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// foldhash: randomly seeded like std's hasher, and much faster on these small keys.
use foldhash::HashMap;

use bytes::{Buf, BufMut};
use twtrace_common::{Attribution, FailureSource};

use super::frame::{
    PayloadError, get_bytes, get_signed, get_u8, get_varint, kind, put_frame, put_signed,
    put_varint,
};
use crate::{
    event::{Call, Event, Failure, Family, Owner, PortContext, StateChange},
    pressure::{
        aggregator::{NetnsSnapshot, SnapshotSocket},
        view::{NetnsContext, TcpExt},
    },
};

/// What a recording holds besides events.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Event(Event),
    /// Cumulative counts of the kernel-side counters (`twtrace_common::counters`) at `ts_ns`.
    Lost {
        ts_ns: u64,
        counters: Vec<u64>,
    },
    /// Clean end of the file: how many events the writer wrote.
    End {
        events: u64,
    },
    /// A kernel snapshot of one network namespace.
    Netns(NetnsSnapshot),
}

/// A socket endpoint as recorded: the socket and its addresses at one time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    skaddr: u64,
    netns: u32,
    family: Family,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
}

/// Hashes the socket and its ports only: they tell endpoints apart well enough, and the
/// addresses (two enums) would double the work of a lookup made for every event. Equal
/// endpoints still hash equally, as `Hash` requires.
impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.skaddr.hash(state);
        self.sport.hash(state);
        self.dport.hash(state);
    }
}

/// Start a new chunk after this many bytes, so damage costs at most one chunk and the
/// tables stay small.
const CHUNK_BYTES: usize = 1 << 20;
/// ...or after this many table entries.
const MAX_TABLE: usize = 1 << 16;

#[derive(Debug, Default)]
pub struct Encoder {
    tasks: HashMap<Owner, u64>,
    endpoints: HashMap<Endpoint, u64>,
    last_ts: u64,
    bytes_in_chunk: usize,
    in_chunk: bool,
    payload: Vec<u8>,
}

fn put_addr(buf: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => buf.put_slice(&a.octets()),
        IpAddr::V6(a) => buf.put_slice(&a.octets()),
    }
}

fn family_code(f: Family) -> u8 {
    match f {
        Family::Ipv4 => 4,
        Family::Ipv6 => 6,
    }
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the frames for `event` to `out`.
    pub fn event(&mut self, event: &Event, out: &mut Vec<u8>) {
        let start = out.len();
        self.maybe_sync(event.ts_ns(), out);
        match event {
            Event::State(s) => self.state(s, out),
            Event::Failure(f) => self.failure(f, out),
        }
        self.bytes_in_chunk += out.len() - start;
    }

    /// Appends a record of the kernel-side counters.
    pub fn lost(&mut self, ts_ns: u64, counters: &[u64], out: &mut Vec<u8>) {
        self.maybe_sync(ts_ns, out);
        let mut p = std::mem::take(&mut self.payload);
        p.clear();
        put_signed(&mut p, ts_ns.wrapping_sub(self.last_ts) as i64);
        self.last_ts = ts_ns;
        put_varint(&mut p, counters.len() as u64);
        for &c in counters {
            put_varint(&mut p, c);
        }
        put_frame(out, kind::LOST, &p);
        self.payload = p;
    }

    /// Appends a namespace snapshot (absolute time: the frame stands alone).
    pub fn netns(&mut self, snapshot: &NetnsSnapshot, out: &mut Vec<u8>) {
        let mut p = Vec::with_capacity(64 + snapshot.sockets.len() * 16);
        let c = &snapshot.context;
        put_varint(&mut p, snapshot.ts_ns);
        put_varint(&mut p, u64::from(c.netns));
        // Optional values: 0 for unknown, else value + 1.
        let (low, high) =
            c.port_range.map_or((0, 0), |(l, h)| (u64::from(l) + 1, u64::from(h) + 1));
        put_varint(&mut p, low);
        put_varint(&mut p, high);
        put_varint(&mut p, c.tcp_tw_reuse.map_or(0, |r| u64::from(r) + 1));
        put_varint(&mut p, c.tcp_max_tw_buckets.map_or(0, |n| n + 1));
        match c.tcpext {
            Some(t) => {
                p.put_u8(1);
                for v in [t.tw, t.tw_recycled, t.tw_killed, t.time_wait_overflow] {
                    put_varint(&mut p, v);
                }
            }
            None => p.put_u8(0),
        }
        put_varint(&mut p, snapshot.sockets.len() as u64);
        for s in &snapshot.sockets {
            let family = if s.saddr.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 };
            p.put_u8(family_code(family));
            p.put_u8(s.state);
            put_addr(&mut p, s.saddr);
            p.put_u16_le(s.sport);
            put_addr(&mut p, s.daddr);
            p.put_u16_le(s.dport);
            put_varint(&mut p, s.expires_ms.map_or(0, |ms| u64::from(ms) + 1));
        }
        put_frame(out, kind::NETNS, &p);
    }

    /// Appends the clean-end frame.
    pub fn end(&mut self, events: u64, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        put_varint(&mut p, events);
        put_frame(out, kind::END, &p);
    }

    /// Forces a new chunk at the next record (a new file after rotation needs one).
    pub fn restart(&mut self) {
        self.in_chunk = false;
    }

    fn maybe_sync(&mut self, ts_ns: u64, out: &mut Vec<u8>) {
        let full = self.tasks.len() >= MAX_TABLE || self.endpoints.len() >= MAX_TABLE;
        if self.in_chunk && self.bytes_in_chunk < CHUNK_BYTES && !full {
            return;
        }
        self.tasks.clear();
        self.endpoints.clear();
        self.bytes_in_chunk = 0;
        self.in_chunk = true;
        self.last_ts = ts_ns;
        let mut p = Vec::with_capacity(10);
        put_varint(&mut p, ts_ns);
        put_frame(out, kind::SYNC_POINT, &p);
    }

    /// The id of `owner` in this chunk, defining it first if new; 0 for no owner.
    fn task_id(&mut self, owner: Option<&Owner>, out: &mut Vec<u8>) -> u64 {
        let Some(owner) = owner else {
            return 0;
        };
        if let Some(&id) = self.tasks.get(owner) {
            return id;
        }
        let id = self.tasks.len() as u64 + 1;
        self.tasks.insert(*owner, id);
        let comm = owner.comm_bytes();
        let mut p = Vec::with_capacity(32);
        put_varint(&mut p, id);
        put_varint(&mut p, u64::from(owner.pid));
        put_varint(&mut p, u64::from(owner.tid));
        p.put_u8(comm.len() as u8);
        p.put_slice(comm);
        put_varint(&mut p, owner.cgroup);
        put_frame(out, kind::TASK, &p);
        id
    }

    fn endpoint_id(&mut self, e: Endpoint, out: &mut Vec<u8>) -> u64 {
        if let Some(&id) = self.endpoints.get(&e) {
            return id;
        }
        let id = self.endpoints.len() as u64 + 1;
        self.endpoints.insert(e, id);
        let mut p = Vec::with_capacity(64);
        put_varint(&mut p, id);
        p.put_u64_le(e.skaddr);
        put_varint(&mut p, u64::from(e.netns));
        p.put_u8(family_code(e.family));
        put_addr(&mut p, e.saddr);
        p.put_u16_le(e.sport);
        put_addr(&mut p, e.daddr);
        p.put_u16_le(e.dport);
        put_frame(out, kind::SOCKET, &p);
        id
    }

    fn state(&mut self, s: &StateChange, out: &mut Vec<u8>) {
        let endpoint = Endpoint {
            skaddr: s.skaddr,
            netns: s.netns,
            family: s.family,
            saddr: s.saddr,
            sport: s.sport,
            daddr: s.daddr,
            dport: s.dport,
        };
        let sock = self.endpoint_id(endpoint, out);
        let task = self.task_id(s.owner.as_ref(), out);
        let mut p = std::mem::take(&mut self.payload);
        p.clear();
        put_signed(&mut p, s.ts_ns.wrapping_sub(self.last_ts) as i64);
        self.last_ts = s.ts_ns;
        put_varint(&mut p, sock);
        put_varint(&mut p, task);
        p.put_u8((s.old_state << 4) | (s.new_state & 0x0f));
        p.put_u8(u8::from(s.time_wait) | ((s.attribution as u8) << 1));
        put_varint(&mut p, s.prev_state_ns.unwrap_or(0));
        put_varint(&mut p, u64::from(s.cpu));
        put_frame(out, kind::STATE, &p);
        self.payload = p;
    }

    fn failure(&mut self, f: &Failure, out: &mut Vec<u8>) {
        let task = self.task_id(f.owner.as_ref(), out);
        let mut p = std::mem::take(&mut self.payload);
        p.clear();
        put_signed(&mut p, f.ts_ns.wrapping_sub(self.last_ts) as i64);
        self.last_ts = f.ts_ns;
        put_varint(&mut p, task);
        let call = u8::from(f.call == Call::Bind);
        p.put_u8(call | ((f.source as u8) << 1) | ((f.attribution as u8) << 4));
        put_varint(&mut p, u64::from(f.errno));
        put_varint(&mut p, u64::from(f.netns));
        p.put_u64_le(f.skaddr.unwrap_or(0));
        p.put_u8(family_code(f.family));
        put_addr(&mut p, f.saddr);
        p.put_u16_le(f.sport);
        put_addr(&mut p, f.daddr);
        p.put_u16_le(f.dport);
        put_varint(&mut p, u64::from(f.cpu));
        let ctx = f.context;
        let settings = ctx.and_then(|c| c.port_range.zip(c.tcp_tw_reuse));
        let to_dest = ctx.and_then(|c| c.time_wait_to_destination);
        let in_netns = ctx.and_then(|c| c.time_wait_in_netns);
        let flags = u8::from(ctx.is_some())
            | (u8::from(settings.is_some()) << 1)
            | (u8::from(to_dest.is_some()) << 2)
            | (u8::from(in_netns.is_some()) << 3);
        p.put_u8(flags);
        if let Some(((lo, hi), reuse)) = settings {
            p.put_u16_le(lo);
            p.put_u16_le(hi);
            p.put_u8(reuse);
        }
        if let Some(n) = to_dest {
            put_varint(&mut p, n);
        }
        if let Some(n) = in_netns {
            put_varint(&mut p, n);
        }
        put_frame(out, kind::FAILURE, &p);
        self.payload = p;
    }
}

/// Why a frame's content was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("malformed {what} frame: {error}")]
    Malformed { what: &'static str, error: PayloadError },
    #[error("{0} frame before the first sync point")]
    BeforeSync(&'static str),
    #[error("{what} frame refers to undefined {table} {id}")]
    UndefinedRef { what: &'static str, table: &'static str, id: u64 },
}

#[derive(Debug, Default)]
pub struct Decoder {
    tasks: HashMap<u64, Owner>,
    endpoints: HashMap<u64, Endpoint>,
    last_ts: u64,
    synced: bool,
}

fn get_addr(buf: &mut &[u8], family: Family) -> Result<IpAddr, PayloadError> {
    Ok(match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::from(get_bytes::<4>(buf)?)),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(get_bytes::<16>(buf)?)),
    })
}

fn get_family(buf: &mut &[u8]) -> Result<Family, PayloadError> {
    match get_u8(buf)? {
        4 => Ok(Family::Ipv4),
        6 => Ok(Family::Ipv6),
        _ => Err(PayloadError::Invalid("unknown address family")),
    }
}

fn get_u16(buf: &mut &[u8]) -> Result<u16, PayloadError> {
    Ok(u16::from_le_bytes(get_bytes(buf)?))
}

fn get_u32(buf: &mut &[u8]) -> Result<u32, PayloadError> {
    u32::try_from(get_varint(buf)?).map_err(|_| PayloadError::Invalid("value out of range"))
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the chunk: after damage, frames are unusable until the next sync point.
    pub fn desync(&mut self) {
        self.synced = false;
    }

    /// Decodes one frame; `Ok(None)` for frames that only update the decoder's tables
    /// and for kinds this version does not know (skipped, for forward compatibility).
    pub fn frame(&mut self, kind: u8, payload: &[u8]) -> Result<Option<Record>, RecordError> {
        let what = kind_name(kind);
        let malformed = |error| RecordError::Malformed { what, error };
        let mut p = payload;
        match kind {
            kind::SYNC_POINT => {
                self.tasks.clear();
                self.endpoints.clear();
                self.last_ts = get_varint(&mut p).map_err(malformed)?;
                self.synced = true;
                Ok(None)
            }
            kind::END => Ok(Some(Record::End { events: get_varint(&mut p).map_err(malformed)? })),
            kind::NETNS => decode_netns(&mut p).map(|s| Some(Record::Netns(s))).map_err(malformed),
            kind::TASK | kind::SOCKET | kind::STATE | kind::FAILURE | kind::LOST
                if !self.synced =>
            {
                Err(RecordError::BeforeSync(what))
            }
            kind::TASK => {
                let (id, owner) = decode_task(&mut p).map_err(malformed)?;
                self.tasks.insert(id, owner);
                Ok(None)
            }
            kind::SOCKET => {
                let (id, endpoint) = decode_endpoint(&mut p).map_err(malformed)?;
                self.endpoints.insert(id, endpoint);
                Ok(None)
            }
            kind::STATE => self.state(&mut p).map(|s| Some(Record::Event(Event::State(s)))),
            kind::FAILURE => self.failure(&mut p).map(|f| Some(Record::Event(Event::Failure(f)))),
            kind::LOST => {
                let ts_ns = self.next_ts(&mut p).map_err(malformed)?;
                let n = get_varint(&mut p).map_err(malformed)?.min(64);
                let counters = (0..n)
                    .map(|_| get_varint(&mut p))
                    .collect::<Result<_, _>>()
                    .map_err(malformed)?;
                Ok(Some(Record::Lost { ts_ns, counters }))
            }
            _ => Ok(None),
        }
    }

    fn next_ts(&mut self, p: &mut &[u8]) -> Result<u64, PayloadError> {
        let delta = get_signed(p)?;
        self.last_ts = self.last_ts.wrapping_add(delta as u64);
        Ok(self.last_ts)
    }

    fn owner(&self, id: u64, what: &'static str) -> Result<Option<Owner>, RecordError> {
        if id == 0 {
            return Ok(None);
        }
        self.tasks.get(&id).copied().map(Some).ok_or(RecordError::UndefinedRef {
            what,
            table: "task",
            id,
        })
    }

    fn state(&mut self, p: &mut &[u8]) -> Result<StateChange, RecordError> {
        let malformed = |error| RecordError::Malformed { what: "state", error };
        let ts_ns = self.next_ts(p).map_err(malformed)?;
        let sock = get_varint(p).map_err(malformed)?;
        let task = get_varint(p).map_err(malformed)?;
        let states = get_u8(p).map_err(malformed)?;
        let flags = get_u8(p).map_err(malformed)?;
        let prev = get_varint(p).map_err(malformed)?;
        let cpu = get_u32(p).map_err(malformed)?;
        let e = *self.endpoints.get(&sock).ok_or(RecordError::UndefinedRef {
            what: "state",
            table: "socket",
            id: sock,
        })?;
        Ok(StateChange {
            time_wait: flags & 1 != 0,
            ts_ns,
            cpu,
            skaddr: e.skaddr,
            prev_state_ns: (prev != 0).then_some(prev),
            owner: self.owner(task, "state")?,
            attribution: Attribution::from_u8((flags >> 1) & 3),
            netns: e.netns,
            family: e.family,
            saddr: e.saddr,
            sport: e.sport,
            daddr: e.daddr,
            dport: e.dport,
            old_state: states >> 4,
            new_state: states & 0x0f,
        })
    }

    fn failure(&mut self, p: &mut &[u8]) -> Result<Failure, RecordError> {
        let malformed = |error| RecordError::Malformed { what: "failure", error };
        let ts_ns = self.next_ts(p).map_err(malformed)?;
        let task = get_varint(p).map_err(malformed)?;
        let bits = get_u8(p).map_err(malformed)?;
        let source = FailureSource::from_u8((bits >> 1) & 7)
            .ok_or(malformed(PayloadError::Invalid("unknown failure source")))?;
        let errno = get_u32(p).map_err(malformed)?;
        let netns = get_u32(p).map_err(malformed)?;
        let skaddr = u64::from_le_bytes(get_bytes(p).map_err(malformed)?);
        let family = get_family(p).map_err(malformed)?;
        let saddr = get_addr(p, family).map_err(malformed)?;
        let sport = get_u16(p).map_err(malformed)?;
        let daddr = get_addr(p, family).map_err(malformed)?;
        let dport = get_u16(p).map_err(malformed)?;
        let cpu = get_u32(p).map_err(malformed)?;
        let flags = get_u8(p).map_err(malformed)?;
        let mut context = None;
        if flags & 1 != 0 {
            let mut c = PortContext {
                port_range: None,
                tcp_tw_reuse: None,
                time_wait_to_destination: None,
                time_wait_in_netns: None,
            };
            if flags & 2 != 0 {
                c.port_range =
                    Some((get_u16(p).map_err(malformed)?, get_u16(p).map_err(malformed)?));
                c.tcp_tw_reuse = Some(get_u8(p).map_err(malformed)?);
            }
            if flags & 4 != 0 {
                c.time_wait_to_destination = Some(get_varint(p).map_err(malformed)?);
            }
            if flags & 8 != 0 {
                c.time_wait_in_netns = Some(get_varint(p).map_err(malformed)?);
            }
            context = Some(c);
        }
        Ok(Failure {
            call: if bits & 1 != 0 { Call::Bind } else { Call::Connect },
            ts_ns,
            cpu,
            skaddr: (skaddr != 0).then_some(skaddr),
            owner: self.owner(task, "failure")?,
            attribution: Attribution::from_u8((bits >> 4) & 3),
            netns,
            errno,
            source,
            family,
            saddr,
            sport,
            daddr,
            dport,
            context,
        })
    }
}

fn decode_task(p: &mut &[u8]) -> Result<(u64, Owner), PayloadError> {
    let id = get_varint(p)?;
    let pid = get_u32(p)?;
    let tid = get_u32(p)?;
    let len = usize::from(get_u8(p)?);
    if len > 16 || p.remaining() < len {
        return Err(PayloadError::Invalid("bad command name length"));
    }
    let mut comm = [0u8; 16];
    comm[..len].copy_from_slice(&p[..len]);
    p.advance(len);
    // Added after the first release: absent in older files.
    let cgroup = if p.has_remaining() { get_varint(p)? } else { 0 };
    Ok((id, Owner::new(pid, tid, comm).with_cgroup(cgroup)))
}

fn decode_endpoint(p: &mut &[u8]) -> Result<(u64, Endpoint), PayloadError> {
    let id = get_varint(p)?;
    let skaddr = u64::from_le_bytes(get_bytes(p)?);
    let netns = get_u32(p)?;
    let family = get_family(p)?;
    let saddr = get_addr(p, family)?;
    let sport = get_u16(p)?;
    let daddr = get_addr(p, family)?;
    let dport = get_u16(p)?;
    Ok((id, Endpoint { skaddr, netns, family, saddr, sport, daddr, dport }))
}

fn decode_netns(p: &mut &[u8]) -> Result<NetnsSnapshot, PayloadError> {
    let ts_ns = get_varint(p)?;
    let netns = get_u32(p)?;
    let optional = |v: u64| v.checked_sub(1);
    let narrow = |v: Option<u64>| -> Result<Option<u16>, PayloadError> {
        v.map(|v| u16::try_from(v).map_err(|_| PayloadError::Invalid("port out of range")))
            .transpose()
    };
    let low = narrow(optional(get_varint(p)?))?;
    let high = narrow(optional(get_varint(p)?))?;
    let tcp_tw_reuse = optional(get_varint(p)?).map(|r| r.min(255) as u8);
    let tcp_max_tw_buckets = optional(get_varint(p)?);
    let tcpext = match get_u8(p)? {
        0 => None,
        _ => Some(TcpExt {
            tw: get_varint(p)?,
            tw_recycled: get_varint(p)?,
            tw_killed: get_varint(p)?,
            time_wait_overflow: get_varint(p)?,
        }),
    };
    let count = get_varint(p)?;
    // Each socket takes at least 14 bytes: a count beyond that is damage, not a plan.
    if count > (p.len() / 14) as u64 {
        return Err(PayloadError::Invalid("socket count larger than the frame"));
    }
    let mut sockets = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let family = get_family(p)?;
        let state = get_u8(p)?;
        let saddr = get_addr(p, family)?;
        let sport = get_u16(p)?;
        let daddr = get_addr(p, family)?;
        let dport = get_u16(p)?;
        let expires_ms = optional(get_varint(p)?).map(|ms| ms.min(u64::from(u32::MAX)) as u32);
        sockets.push(SnapshotSocket { saddr, sport, daddr, dport, state, expires_ms });
    }
    Ok(NetnsSnapshot {
        ts_ns,
        context: NetnsContext {
            netns,
            port_range: low.zip(high),
            tcp_tw_reuse,
            tcp_max_tw_buckets,
            tcpext,
        },
        sockets,
    })
}

pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::HEADER => "header",
        kind::SYNC_POINT => "sync point",
        kind::TASK => "task",
        kind::SOCKET => "socket",
        kind::STATE => "state",
        kind::FAILURE => "failure",
        kind::LOST => "lost",
        kind::END => "end",
        kind::NETNS => "netns snapshot",
        _ => "unknown",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use twtrace_common::{
        EventKind,
        tcp::{AF_INET, AF_INET6},
    };

    use super::*;
    use crate::{
        event::{
            decode,
            tests::{bytes_of, raw_failure, raw_state},
        },
        session::frame::{Parsed, parse_frame},
    };

    /// A realistic mix: v4 and v6 states, TIME_WAIT, unknown owners, failures.
    pub(crate) fn sample_events() -> Vec<Event> {
        let mut events = Vec::new();
        for i in 0..50u64 {
            let mut raw = raw_state(
                if i % 5 == 4 { EventKind::TimeWait } else { EventKind::State },
                if i % 7 == 0 { AF_INET6 } else { AF_INET },
            );
            raw.header.ts_ns = 1_000_000 + i * 1_234;
            raw.skaddr += (i / 5) * 0x100;
            raw.sport = 40000 + (i / 5) as u16;
            raw.attribution = (i % 4) as u8;
            events.push(decode(bytes_of(&raw)).unwrap());
        }
        let mut f = decode(bytes_of(&raw_failure(EventKind::ConnectError, 99))).unwrap();
        if let Event::Failure(f) = &mut f {
            f.ts_ns = 999_000; // earlier than the event before: deltas may be negative
            f.context = Some(PortContext {
                port_range: Some((1, 2)),
                tcp_tw_reuse: Some(1),
                time_wait_to_destination: Some(7),
                time_wait_in_netns: None,
            });
        }
        events.push(f);
        events.push(decode(bytes_of(&raw_failure(EventKind::BindError, 98))).unwrap());
        events
    }

    pub(crate) fn decode_all(bytes: &[u8]) -> Vec<Record> {
        let mut dec = Decoder::new();
        let mut rest = bytes;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let Parsed::Frame { kind, payload, len } = parse_frame(rest) else {
                panic!("bad frame")
            };
            if let Some(r) = dec.frame(kind, payload).unwrap() {
                out.push(r);
            }
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn events_round_trip() {
        let events = sample_events();
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        for e in &events {
            enc.event(e, &mut bytes);
        }
        enc.lost(2_000_000, &[0, 3, 0, 0, 1], &mut bytes);
        enc.end(events.len() as u64, &mut bytes);
        let records = decode_all(&bytes);
        let decoded: Vec<Event> = records
            .iter()
            .filter_map(|r| if let Record::Event(e) = r { Some(*e) } else { None })
            .collect();
        assert_eq!(decoded, events);
        assert!(
            records.contains(&Record::Lost { ts_ns: 2_000_000, counters: vec![0, 3, 0, 0, 1] })
        );
        assert_eq!(records.last(), Some(&Record::End { events: events.len() as u64 }));
    }

    #[test]
    fn netns_snapshots_round_trip() {
        let tw = SnapshotSocket {
            saddr: "10.0.0.1".parse().unwrap(),
            sport: 40001,
            daddr: "10.0.0.2".parse().unwrap(),
            dport: 5432,
            state: twtrace_common::tcp::TCP_TIME_WAIT,
            expires_ms: Some(59_000),
        };
        let listener = SnapshotSocket {
            saddr: "::".parse().unwrap(),
            sport: 8080,
            daddr: "::".parse().unwrap(),
            dport: 0,
            state: twtrace_common::tcp::TCP_LISTEN,
            expires_ms: None,
        };
        let full = NetnsSnapshot {
            ts_ns: 123_456_789,
            context: NetnsContext {
                netns: 4026531840,
                port_range: Some((32768, 60999)),
                tcp_tw_reuse: Some(0),
                tcp_max_tw_buckets: Some(262144),
                tcpext: Some(TcpExt { tw: 5, tw_recycled: 0, tw_killed: 1, time_wait_overflow: 2 }),
            },
            sockets: vec![tw, listener],
        };
        let empty = NetnsSnapshot {
            ts_ns: 5,
            context: NetnsContext { netns: 7, ..Default::default() },
            sockets: vec![],
        };
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        enc.netns(&full, &mut bytes);
        enc.netns(&empty, &mut bytes);
        assert_eq!(decode_all(&bytes), vec![Record::Netns(full), Record::Netns(empty)]);
        // A count the payload cannot hold is damage.
        let mut dec = Decoder::new();
        assert!(dec.frame(kind::NETNS, &[1, 1, 0, 0, 0, 0, 0, 200]).is_err());
    }

    #[test]
    fn repeated_sockets_are_compact() {
        let events = sample_events();
        let mut enc = Encoder::new();
        let mut bytes = Vec::new();
        for e in events.iter().filter(|e| matches!(e, Event::State(_))) {
            enc.event(e, &mut bytes);
        }
        let per_event = bytes.len() / 50;
        assert!(per_event <= 40, "{per_event} bytes per event");
    }

    #[test]
    fn frames_before_a_sync_point_or_with_unknown_ids_are_rejected() {
        let mut dec = Decoder::new();
        assert!(matches!(
            dec.frame(kind::STATE, &[0, 1, 1, 0x17, 0, 0, 0]),
            Err(RecordError::BeforeSync(_))
        ));
        dec.frame(kind::SYNC_POINT, &[5]).unwrap();
        assert!(matches!(
            dec.frame(kind::STATE, &[0, 9, 0, 0x17, 0, 0, 0]),
            Err(RecordError::UndefinedRef { table: "socket", id: 9, .. })
        ));
        assert_eq!(dec.frame(200, b"future frame kind").unwrap(), None);
    }
}
