//! The userspace view of kernel events: decoding ring-buffer records into [`Event`].
//! This is the one place that knows every event kind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use twtrace_common::{
    Attribution, EventHeader, EventKind, FailureEvent, FailureSource, SockStateEvent,
    tcp::{AF_INET, AF_INET6, state_name},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte layout (kind {kind})")]
    Truncated { kind: u8, len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("event kind {kind} has an invalid {field} ({value})")]
    BadField { kind: u8, field: &'static str, value: u64 },
    #[error("event kind {kind} has layout version {version}, newer than this twtrace understands")]
    UnsupportedVersion { kind: u8, version: u8 },
}

/// Address family of a socket.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// The process an event is attributed to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub tid: u32,
    comm: [u8; 16],
    /// cgroup v2 id; 0 when unknown (recordings made before twtrace recorded it).
    pub cgroup: u64,
}

impl Owner {
    pub fn new(pid: u32, tid: u32, comm: [u8; 16]) -> Self {
        Self { pid, tid, comm, cgroup: 0 }
    }

    pub fn with_cgroup(self, cgroup: u64) -> Self {
        Self { cgroup, ..self }
    }

    /// The command name, up to the first NUL; invalid UTF-8 is replaced.
    pub fn comm(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.comm_bytes())
    }

    /// The command name's bytes, up to the first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(self.comm.len());
        &self.comm[..len]
    }
}

/// A TCP state transition (kind `state`) or an entry into TIME_WAIT (kind `time_wait`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    pub time_wait: bool,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cpu: u32,
    pub skaddr: u64,
    /// Time spent in `old_state`, when known.
    pub prev_state_ns: Option<u64>,
    /// `None` when the owner is unknown.
    pub owner: Option<Owner>,
    pub attribution: Attribution,
    pub netns: u32,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub old_state: u8,
    pub new_state: u8,
}

impl StateChange {
    pub const fn kind_name(&self) -> &'static str {
        if self.time_wait { "time_wait" } else { "state" }
    }
    pub const fn old_state_name(&self) -> &'static str {
        state_name(self.old_state)
    }
    pub const fn new_state_name(&self) -> &'static str {
        state_name(self.new_state)
    }
}

/// Which call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Connect,
    Bind,
}

/// What the user needs to judge a port-allocation failure (EADDRNOTAVAIL, EADDRINUSE):
/// the port range and TIME_WAIT reuse setting of the socket's network namespace, and how
/// many TIME_WAIT sockets twtrace knows that hold ports: toward the same destination (for
/// connect, where ports are shared per destination) or in the namespace (for bind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortContext {
    pub port_range: Option<(u16, u16)>,
    pub tcp_tw_reuse: Option<u8>,
    pub time_wait_to_destination: Option<u64>,
    pub time_wait_in_netns: Option<u64>,
}

/// A failed connect() or bind() (kinds `connect_error`, `bind_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub call: Call,
    pub ts_ns: u64,
    pub cpu: u32,
    /// The socket, when known.
    pub skaddr: Option<u64>,
    pub owner: Option<Owner>,
    pub attribution: Attribution,
    pub netns: u32,
    /// Positive errno.
    pub errno: u32,
    pub source: FailureSource,
    pub family: Family,
    /// Local address: the one the kernel picked (connect), or asked for (bind).
    pub saddr: IpAddr,
    pub sport: u16,
    /// Remote address asked for (connect); unspecified for bind.
    pub daddr: IpAddr,
    pub dport: u16,
    /// Filled in by userspace for EADDRNOTAVAIL / EADDRINUSE.
    pub context: Option<PortContext>,
}

impl Failure {
    pub const fn kind_name(&self) -> &'static str {
        match self.call {
            Call::Connect => "connect_error",
            Call::Bind => "bind_error",
        }
    }
    pub fn error_name(&self) -> std::borrow::Cow<'static, str> {
        crate::errno::name(self.errno)
    }
    pub const fn source_name(&self) -> &'static str {
        match self.source {
            FailureSource::Syscall => "syscall",
            FailureSource::Async => "async",
            FailureSource::HashConnect => "__inet_hash_connect",
            FailureSource::GetPort => "inet_csk_get_port",
        }
    }
}

/// Every kind of event twtrace reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    State(StateChange),
    Failure(Failure),
}

impl Event {
    pub const fn ts_ns(&self) -> u64 {
        match self {
            Self::State(s) => s.ts_ns,
            Self::Failure(f) => f.ts_ns,
        }
    }

    /// The process the event is attributed to, if known.
    pub const fn owner(&self) -> Option<Owner> {
        match self {
            Self::State(s) => s.owner,
            Self::Failure(f) => f.owner,
        }
    }

    /// Inode of the socket's network namespace (0 when unknown).
    pub const fn netns(&self) -> u32 {
        match self {
            Self::State(s) => s.netns,
            Self::Failure(f) => f.netns,
        }
    }
}

/// Reads a `T` from the start of `bytes`, checking the length first.
fn read<T: Copy>(bytes: &[u8], kind: u8) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated { kind, len: bytes.len(), need });
    }
    // SAFETY: length checked above; T is a repr(C) plain-old-data layout; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes, 0)?;
    let check_version = |supported: u8| {
        if header.version == supported {
            Ok(())
        } else {
            Err(DecodeError::UnsupportedVersion { kind: header.kind, version: header.version })
        }
    };
    match EventKind::from_u8(header.kind) {
        Some(EventKind::State | EventKind::TimeWait) => {
            check_version(SockStateEvent::VERSION)?;
            let raw: SockStateEvent = read(bytes, header.kind)?;
            Ok(Event::State(state_change(&raw)))
        }
        Some(kind @ (EventKind::ConnectError | EventKind::BindError)) => {
            check_version(FailureEvent::VERSION)?;
            let raw: FailureEvent = read(bytes, header.kind)?;
            let call = if kind == EventKind::BindError { Call::Bind } else { Call::Connect };
            Ok(Event::Failure(failure(&raw, call)?))
        }
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

fn failure(raw: &FailureEvent, call: Call) -> Result<Failure, DecodeError> {
    let family = if raw.family == AF_INET6 { Family::Ipv6 } else { Family::Ipv4 };
    let attribution = Attribution::from_u8(raw.attribution);
    let source = FailureSource::from_u8(raw.source).ok_or(DecodeError::BadField {
        kind: raw.header.kind,
        field: "source",
        value: raw.source.into(),
    })?;
    Ok(Failure {
        call,
        ts_ns: raw.header.ts_ns,
        cpu: raw.header.cpu,
        skaddr: (raw.skaddr != 0).then_some(raw.skaddr),
        owner: (attribution != Attribution::Unknown).then(|| {
            Owner::new(raw.task.pid, raw.task.tid, raw.task.comm).with_cgroup(raw.task.cgroup)
        }),
        attribution,
        netns: raw.netns,
        errno: raw.errno,
        source,
        family,
        saddr: addr(family, raw.saddr),
        sport: raw.sport,
        daddr: addr(family, raw.daddr),
        dport: raw.dport,
        context: (raw.settings_known != 0).then_some(PortContext {
            port_range: Some((raw.port_range_low, raw.port_range_high)),
            tcp_tw_reuse: Some(raw.tcp_tw_reuse),
            time_wait_to_destination: None,
            time_wait_in_netns: None,
        }),
    })
}

fn addr(family: Family, bytes: [u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(bytes)),
    }
}

fn state_change(raw: &SockStateEvent) -> StateChange {
    let family = if raw.family == AF_INET6 { Family::Ipv6 } else { Family::Ipv4 };
    debug_assert!(raw.family == AF_INET || raw.family == AF_INET6);
    let attribution = Attribution::from_u8(raw.attribution);
    StateChange {
        time_wait: raw.header.kind == EventKind::TimeWait as u8,
        ts_ns: raw.header.ts_ns,
        cpu: raw.header.cpu,
        skaddr: raw.skaddr,
        prev_state_ns: (raw.prev_state_ns != 0).then_some(raw.prev_state_ns),
        owner: (attribution != Attribution::Unknown).then(|| {
            Owner::new(raw.task.pid, raw.task.tid, raw.task.comm).with_cgroup(raw.task.cgroup)
        }),
        attribution,
        netns: raw.netns,
        family,
        saddr: addr(family, raw.saddr),
        sport: raw.sport,
        daddr: addr(family, raw.daddr),
        dport: raw.dport,
        old_state: raw.old_state,
        new_state: raw.new_state,
    }
}

/// Name of an attribution, as written in JSON.
pub const fn attribution_name(a: Attribution) -> &'static str {
    match a {
        Attribution::Unknown => "unknown",
        Attribution::Current => "current",
        Attribution::Owner => "owner",
        Attribution::Listener => "listener",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use twtrace_common::{FailureSource, Task, tcp};

    use super::*;

    pub(crate) fn raw_state(kind: EventKind, family: u16) -> SockStateEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
            daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        } else {
            saddr = Ipv6Addr::LOCALHOST.octets();
            daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        }
        SockStateEvent {
            header: EventHeader {
                kind: kind as u8,
                version: SockStateEvent::VERSION,
                _pad: [0; 2],
                cpu: 1,
                ts_ns: 42,
            },
            skaddr: 0xffff_8880_0000_1000,
            prev_state_ns: 1_500_000,
            task: Task { pid: 1234, tid: 1235, comm, cgroup: 4321 },
            netns: 4026531840,
            family,
            sport: 40000,
            dport: 8080,
            old_state: tcp::TCP_FIN_WAIT2,
            new_state: if kind == EventKind::TimeWait {
                tcp::TCP_TIME_WAIT
            } else {
                tcp::TCP_CLOSE
            },
            attribution: Attribution::Owner as u8,
            _pad: [0; 3],
            saddr,
            daddr,
        }
    }

    pub(crate) fn bytes_of<T>(v: &T) -> &[u8] {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    #[test]
    fn decodes_ipv4_time_wait() {
        let raw = raw_state(EventKind::TimeWait, AF_INET);
        let Event::State(s) = decode(bytes_of(&raw)).unwrap() else { panic!() };
        assert!(s.time_wait);
        assert_eq!(s.kind_name(), "time_wait");
        assert_eq!(s.saddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(s.daddr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!((s.sport, s.dport), (40000, 8080));
        assert_eq!(s.owner.unwrap().pid, 1234);
        assert_eq!(s.owner.unwrap().comm(), "curl");
        assert_eq!((s.old_state_name(), s.new_state_name()), ("FIN_WAIT2", "TIME_WAIT"));
        assert_eq!(s.prev_state_ns, Some(1_500_000));
    }

    #[test]
    fn decodes_ipv6_state() {
        let raw = raw_state(EventKind::State, AF_INET6);
        let Event::State(s) = decode(bytes_of(&raw)).unwrap() else { panic!() };
        assert!(!s.time_wait);
        assert_eq!(s.family, Family::Ipv6);
        assert_eq!(s.daddr, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(s.new_state_name(), "CLOSE");
    }

    #[test]
    fn unknown_owner_has_no_process() {
        let mut raw = raw_state(EventKind::State, AF_INET);
        raw.attribution = Attribution::Unknown as u8;
        let Event::State(s) = decode(bytes_of(&raw)).unwrap() else { panic!() };
        assert_eq!(s.owner, None);
    }

    #[test]
    fn rejects_short_unknown_and_newer_records() {
        let raw = raw_state(EventKind::State, AF_INET);
        let bytes = bytes_of(&raw);
        assert!(matches!(decode(&bytes[..20]), Err(DecodeError::Truncated { need: 112, .. })));
        assert!(matches!(decode(&bytes[..3]), Err(DecodeError::Truncated { need: 16, .. })));
        let mut unknown = raw;
        unknown.header.kind = 200;
        assert_eq!(decode(bytes_of(&unknown)), Err(DecodeError::UnknownKind(200)));
        let mut newer = raw;
        newer.header.version = 9;
        assert!(matches!(
            decode(bytes_of(&newer)),
            Err(DecodeError::UnsupportedVersion { version: 9, .. })
        ));
    }

    pub(crate) fn raw_failure(kind: EventKind, errno: u32) -> FailureEvent {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"nginx");
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 0, 0, 7]);
        FailureEvent {
            header: EventHeader {
                kind: kind as u8,
                version: FailureEvent::VERSION,
                _pad: [0; 2],
                cpu: 0,
                ts_ns: 7,
            },
            skaddr: 0xffff_8880_0000_2000,
            task: Task { pid: 77, tid: 78, comm, cgroup: 0 },
            netns: 4026531840,
            errno,
            family: AF_INET,
            sport: 0,
            dport: 5432,
            source: FailureSource::Syscall as u8,
            attribution: Attribution::Current as u8,
            saddr: [0; 16],
            daddr,
            port_range_low: 40000,
            port_range_high: 40009,
            tcp_tw_reuse: 0,
            settings_known: 1,
            _pad: [0; 2],
        }
    }

    /// A decoded EADDRNOTAVAIL with the context userspace adds: 10 ports, all in TIME_WAIT.
    pub(crate) fn exhausted_connect() -> Failure {
        let Event::Failure(mut f) =
            decode(bytes_of(&raw_failure(EventKind::ConnectError, 99))).unwrap()
        else {
            panic!("not a failure")
        };
        f.context = Some(PortContext {
            port_range: Some((40000, 40009)),
            tcp_tw_reuse: Some(0),
            time_wait_to_destination: Some(10),
            time_wait_in_netns: None,
        });
        f
    }

    #[test]
    fn decodes_connect_error() {
        let raw = raw_failure(EventKind::ConnectError, 99);
        let Event::Failure(f) = decode(bytes_of(&raw)).unwrap() else { panic!() };
        assert_eq!(f.kind_name(), "connect_error");
        assert_eq!(f.error_name(), "EADDRNOTAVAIL");
        assert_eq!(f.source_name(), "syscall");
        assert_eq!(f.owner.unwrap().comm(), "nginx");
        assert_eq!(f.daddr, "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(f.dport, 5432);
        assert_eq!(f.skaddr, Some(0xffff_8880_0000_2000));
        let ctx = f.context.unwrap();
        assert_eq!((ctx.port_range, ctx.tcp_tw_reuse), (Some((40000, 40009)), Some(0)));
    }

    #[test]
    fn rejects_a_bad_failure_source() {
        let mut raw = raw_failure(EventKind::BindError, 98);
        raw.source = 99;
        assert!(matches!(
            decode(bytes_of(&raw)),
            Err(DecodeError::BadField { field: "source", .. })
        ));
        assert!(matches!(
            decode(&bytes_of(&raw)[..103]),
            Err(DecodeError::Truncated { need: 112, .. })
        ));
    }

    #[test]
    fn odd_comm_bytes_do_not_panic() {
        let owner = Owner::new(1, 1, [0xff; 16]);
        assert_eq!(owner.comm().chars().count(), 16);
    }
}
