//! What the port-pressure views show (`top`, `report`): one row per destination and the
//! namespace context, computed by the aggregator, drawn by the outputs.

use std::net::IpAddr;

use serde::Serialize;

/// Port-exhaustion scope: local ports are shared per (netns, source IP, destination IP,
/// destination port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DestinationKey {
    pub netns: u32,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// A process driving connections to a destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessShare {
    pub pid: u32,
    pub comm: String,
    /// Connections it opened to the destination since twtrace started.
    pub connections: u64,
}

/// Ports of one network namespace and its TIME_WAIT settings/counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetnsContext {
    pub netns: u32,
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub port_range: Option<(u16, u16)>,
    /// `net.ipv4.tcp_tw_reuse`: 0 off, 1 on, 2 loopback only (the default since 4.x/5.x).
    pub tcp_tw_reuse: Option<u8>,
    /// `net.ipv4.tcp_max_tw_buckets`.
    pub tcp_max_tw_buckets: Option<u64>,
    /// TcpExt counters of the namespace (`/proc/net/netstat`), cumulative.
    pub tcpext: Option<TcpExt>,
}

/// The TIME_WAIT counters of `/proc/net/netstat` (TcpExt).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TcpExt {
    /// `TW`: sockets put into TIME_WAIT (counted when they enter it).
    pub tw: u64,
    /// `TWRecycled`: TIME_WAIT sockets reused by a new connection (tcp_tw_reuse).
    pub tw_recycled: u64,
    /// `TWKilled`: TIME_WAIT sockets killed early.
    pub tw_killed: u64,
    /// `TCPTimeWaitOverflow`: closes that skipped TIME_WAIT because tcp_max_tw_buckets
    /// was reached.
    pub time_wait_overflow: u64,
}

/// One destination, as the views show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationView {
    #[serde(flatten)]
    pub key: DestinationKey,
    /// Sockets in TIME_WAIT toward it now.
    pub time_wait: u64,
    /// Other sockets holding a local port toward it now (SYN_SENT … LAST_ACK).
    pub live: u64,
    /// Ports in the namespace's range (None: range unknown).
    pub range_size: Option<u64>,
    /// Free ports / range size, 0.0–1.0 (None: range unknown).
    pub headroom: Option<f64>,
    /// New connections per second (recent average).
    pub conn_per_sec: f64,
    /// Entries into TIME_WAIT per second (recent average).
    pub time_wait_per_sec: f64,
    /// Totals since twtrace started.
    pub time_wait_entered: u64,
    pub time_wait_expired: u64,
    pub time_wait_reused: u64,
    pub time_wait_killed: u64,
    pub failures: u64,
    pub eaddrnotavail: u64,
    /// Processes by connections, most first.
    pub processes: Vec<ProcessShare>,
    pub forecast: Forecast,
}

impl DestinationView {
    /// The share of the range in use now, 0.0–1.0+ (None: range unknown).
    pub fn pressure(&self) -> Option<f64> {
        self.headroom.map(|h| 1.0 - h)
    }
}

#[cfg(test)]
impl DestinationView {
    /// A quiet destination for tests to fill in: from 10.0.0.1 in namespace 1, nothing in
    /// TIME_WAIT, the default port range, no forecast.
    pub fn example(daddr: IpAddr, dport: u16) -> Self {
        Self {
            key: DestinationKey {
                netns: 1,
                saddr: IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
                daddr,
                dport,
            },
            time_wait: 0,
            live: 0,
            range_size: Some(28232),
            headroom: None,
            conn_per_sec: 0.0,
            time_wait_per_sec: 0.0,
            time_wait_entered: 0,
            time_wait_expired: 0,
            time_wait_reused: 0,
            time_wait_killed: 0,
            failures: 0,
            eaddrnotavail: 0,
            processes: Vec::new(),
            forecast: Forecast::Unknown,
        }
    }
}

/// Where a destination is heading at its current rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "outlook", rename_all = "snake_case")]
pub enum Forecast {
    /// The range size is unknown.
    Unknown,
    /// At this rate the ports in use settle at `steady_state_share` of the range.
    Steady { steady_state_share: f64 },
    /// At this rate the range runs out in `seconds` (0: out of ports now).
    Exhausts { seconds: f64, steady_state_share: f64 },
}
