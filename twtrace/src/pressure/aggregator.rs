//! The port-pressure model: per destination (netns, source IP, destination IP, port), the
//! sockets holding local ports now, how fast new ones come, who opens them, and where that
//! leads. Fed by events (live or recorded) and corrected by kernel snapshots.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use twtrace_common::tcp::{TCP_CLOSE, TCP_LISTEN, TCP_SYN_SENT, TCP_TIME_WAIT};

use super::view::{DestinationKey, DestinationView, Forecast, NetnsContext, ProcessShare};
use crate::{
    errno::EADDRNOTAVAIL,
    event::{Call, Event, Failure, StateChange},
};

/// Linux keeps a socket in TIME_WAIT for 60 s (TCP_TIMEWAIT_LEN, fixed).
pub const TIME_WAIT_NS: u64 = 60_000_000_000;
/// With tcp_tw_reuse, a new connection may take a TIME_WAIT socket's port once the socket
/// is older than one second (tcp_twsk_unique).
pub const REUSE_AFTER_NS: u64 = 1_000_000_000;
/// Rates are averaged over this many one-second buckets.
const RATE_WINDOW_SECS: usize = 10;
const SEC: u64 = 1_000_000_000;

/// New events per second over the last [`RATE_WINDOW_SECS`] seconds.
#[derive(Clone, Debug, Default)]
struct Rate {
    buckets: [u32; RATE_WINDOW_SECS],
    /// The second (ts / 1 s) of the newest bucket.
    newest: u64,
    /// The second of the first event, to average over less than a full window at start.
    first: Option<u64>,
}

impl Rate {
    fn add(&mut self, ts_ns: u64) {
        let second = ts_ns / SEC;
        self.advance(second);
        if second + (RATE_WINDOW_SECS as u64) > self.newest {
            let i = (second % RATE_WINDOW_SECS as u64) as usize;
            self.buckets[i] += 1;
        }
        self.first.get_or_insert(second);
    }

    /// Moves the window so that `second` is its newest bucket, clearing skipped seconds.
    fn advance(&mut self, second: u64) {
        if second <= self.newest {
            return;
        }
        let gap = (second - self.newest).min(RATE_WINDOW_SECS as u64);
        for s in 0..gap {
            self.buckets[((second - s) % RATE_WINDOW_SECS as u64) as usize] = 0;
        }
        self.newest = second;
    }

    fn per_second(&mut self, now_ns: u64) -> f64 {
        let now = now_ns / SEC;
        self.advance(now);
        let Some(first) = self.first else {
            return 0.0;
        };
        // Whole seconds observed, up to the window; the current second counts as one.
        let span = (now.saturating_sub(first) + 1).min(RATE_WINDOW_SECS as u64);
        let newest_idx = now % RATE_WINDOW_SECS as u64;
        let sum: u64 = (0..span)
            .map(|back| {
                let i = (newest_idx + RATE_WINDOW_SECS as u64 - back) % RATE_WINDOW_SECS as u64;
                u64::from(self.buckets[i as usize])
            })
            .sum();
        sum as f64 / span as f64
    }
}

#[derive(Clone, Debug, Default)]
struct Destination {
    /// TIME_WAIT sockets now: local port -> expiry (CLOCK_MONOTONIC ns).
    time_wait: HashMap<u16, u64>,
    /// Sockets opened toward it that hold their port and are not in TIME_WAIT.
    live: u64,
    connects: Rate,
    time_wait_rate: Rate,
    entered: u64,
    expired: u64,
    reused: u64,
    killed: u64,
    failures: u64,
    eaddrnotavail: u64,
    processes: HashMap<u32, (String, u64)>,
    /// An event (not only a snapshot) mentioned it.
    observed: bool,
    /// TIME_WAIT ports the last snapshot lacked: dropped if the next one lacks them too
    /// (a sock_diag dump can skip a socket; seen on Debian's 6.1 and 6.12).
    missing_once: std::collections::HashSet<u16>,
}

/// What the model knows of one socket it saw open a connection.
#[derive(Clone, Copy, Debug)]
struct OpenSocket {
    key: DestinationKey,
}

/// A TCP socket as a kernel snapshot lists it (sock_diag, see `kernel_view`; recordings
/// keep them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSocket {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// Kernel TCP state number: 1 ESTABLISHED ... 6 TIME_WAIT, 10 LISTEN.
    pub state: u8,
    /// TIME_WAIT only: milliseconds left (`idiag_expires`).
    pub expires_ms: Option<u32>,
}

/// What the kernel had in a network namespace at `ts_ns`: its port settings and
/// TIME_WAIT counters, and the sockets that matter for ports (clients' sockets, and
/// listeners, which tell clients from servers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsSnapshot {
    pub ts_ns: u64,
    pub context: NetnsContext,
    pub sockets: Vec<SnapshotSocket>,
}

/// What a reconciliation found the model had wrong (kept for the notes and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// TIME_WAIT sockets the kernel has and the model did not (created before twtrace
    /// started, or missed).
    pub adopted: u64,
    /// TIME_WAIT sockets the model had and the kernel no longer has.
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub struct Aggregator {
    destinations: HashMap<DestinationKey, Destination>,
    open: HashMap<u64, OpenSocket>,
    contexts: BTreeMap<u32, NetnsContext>,
    now_ns: u64,
    /// Show only destinations that events mentioned: with a process filter
    /// (`--container`…), snapshots list every process's sockets.
    only_observed: bool,
}

fn key(netns: u32, saddr: IpAddr, daddr: IpAddr, dport: u16) -> DestinationKey {
    DestinationKey { netns, saddr: saddr.to_canonical(), daddr: daddr.to_canonical(), dport }
}

impl Aggregator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Views will show only destinations that events mentioned (see `only_observed`).
    pub fn only_observed(mut self, yes: bool) -> Self {
        self.only_observed = yes;
        self
    }

    /// The latest time seen (CLOCK_MONOTONIC ns): events and ticks move it forward.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Sets the namespace's settings and counters (from `/proc/sys` and netstat).
    pub fn set_context(&mut self, context: NetnsContext) {
        self.contexts.insert(context.netns, context);
    }

    pub fn contexts(&self) -> impl Iterator<Item = &NetnsContext> {
        self.contexts.values()
    }

    /// Takes in one event.
    pub fn observe(&mut self, event: &Event) {
        self.now_ns = self.now_ns.max(event.ts_ns());
        match event {
            Event::State(s) => self.state(s),
            Event::Failure(f) => self.failure(f),
        }
    }

    fn state(&mut self, s: &StateChange) {
        if s.time_wait {
            // The socket leaves the live set and holds its port for 60 s.
            let known = self.open.remove(&s.skaddr);
            let is_client = known.is_some() || self.looks_like_client(s);
            if !is_client {
                return;
            }
            let k = key(s.netns, s.saddr, s.daddr, s.dport);
            let d = self.destinations.entry(k).or_default();
            d.observed = true;
            if known.is_some() {
                d.live = d.live.saturating_sub(1);
            }
            d.time_wait.insert(s.sport, s.ts_ns + TIME_WAIT_NS);
            d.entered += 1;
            d.time_wait_rate.add(s.ts_ns);
            return;
        }
        match (s.old_state, s.new_state) {
            (TCP_CLOSE, TCP_SYN_SENT) => {
                // connect(): the destination and source address are set, the port is not.
                let k = key(s.netns, s.saddr, s.daddr, s.dport);
                self.open.insert(s.skaddr, OpenSocket { key: k });
                let d = self.destinations.entry(k).or_default();
                d.observed = true;
                d.live += 1;
                d.connects.add(s.ts_ns);
                if let Some(owner) = s.owner {
                    let entry =
                        d.processes.entry(owner.pid).or_insert_with(|| (owner.comm().into(), 0));
                    entry.1 += 1;
                }
            }
            (TCP_SYN_SENT, _) => {
                // The port is known now: if it was a TIME_WAIT socket's, tcp_tw_reuse
                // handed it over.
                if let Some(open) = self.open.get(&s.skaddr)
                    && let Some(d) = self.destinations.get_mut(&open.key)
                    && d.time_wait.remove(&s.sport).is_some()
                {
                    d.reused += 1;
                }
                if s.new_state == TCP_CLOSE {
                    self.close(s.skaddr);
                }
            }
            (_, TCP_CLOSE) => self.close(s.skaddr),
            _ => {}
        }
    }

    fn close(&mut self, skaddr: u64) {
        if let Some(open) = self.open.remove(&skaddr)
            && let Some(d) = self.destinations.get_mut(&open.key)
        {
            d.live = d.live.saturating_sub(1);
        }
    }

    /// For a socket the model never saw connect (it predates twtrace): a client's local
    /// port is ephemeral, inside the namespace's range.
    fn looks_like_client(&self, s: &StateChange) -> bool {
        match self.contexts.get(&s.netns).and_then(|c| c.port_range) {
            Some((low, high)) => (low..=high).contains(&s.sport),
            None => s.sport >= 32768,
        }
    }

    fn failure(&mut self, f: &Failure) {
        if f.call != Call::Connect {
            return;
        }
        if let Some(ctx) = f.context {
            let c = self
                .contexts
                .entry(f.netns)
                .or_insert_with(|| NetnsContext { netns: f.netns, ..Default::default() });
            c.port_range = c.port_range.or(ctx.port_range);
            c.tcp_tw_reuse = c.tcp_tw_reuse.or(ctx.tcp_tw_reuse);
        }
        // A failed port search picked no source address: charge the destination's
        // busiest source.
        let k = if f.saddr.is_unspecified() {
            self.destinations
                .iter()
                .filter(|(k, _)| {
                    k.netns == f.netns
                        && k.daddr == f.daddr.to_canonical()
                        && k.dport == f.dport
                        && !k.saddr.is_unspecified()
                })
                .max_by_key(|(_, d)| d.time_wait.len() as u64 + d.live)
                .map(|(k, _)| *k)
                .unwrap_or_else(|| key(f.netns, f.saddr, f.daddr, f.dport))
        } else {
            key(f.netns, f.saddr, f.daddr, f.dport)
        };
        let d = self.destinations.entry(k).or_default();
        d.observed = true;
        d.failures += 1;
        if f.errno == EADDRNOTAVAIL {
            d.eaddrnotavail += 1;
        }
    }

    /// Moves time forward to `now_ns`: TIME_WAIT sockets older than 60 s expire.
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let now = self.now_ns;
        for d in self.destinations.values_mut() {
            let before = d.time_wait.len();
            d.time_wait.retain(|_, &mut expires| expires > now);
            d.expired += (before - d.time_wait.len()) as u64;
        }
        // Forget destinations with nothing left to show.
        self.destinations.retain(|_, d| {
            !d.time_wait.is_empty()
                || d.live > 0
                || d.failures > 0
                || d.connects.per_second(now) > 0.0
        });
    }

    /// Takes in a snapshot: the namespace's settings, then [`Self::reconcile`].
    pub fn snapshot(&mut self, snapshot: &NetnsSnapshot) -> Drift {
        self.set_context(snapshot.context.clone());
        self.reconcile(snapshot.context.netns, &snapshot.sockets, snapshot.ts_ns)
    }

    /// Makes the model agree with the kernel's sockets of namespace `netns`, listed at
    /// `now_ns`. TIME_WAIT sockets toward remote ports are adopted when they are a
    /// client's (local port not a listening one); TIME_WAIT sockets the kernel no longer
    /// has were reused (their 4-tuple is live again) or killed; live counts are reset to
    /// the kernel's.
    pub fn reconcile(&mut self, netns: u32, sockets: &[SnapshotSocket], now_ns: u64) -> Drift {
        self.tick(now_ns);
        let now = self.now_ns;
        let listening: std::collections::HashSet<u16> =
            sockets.iter().filter(|s| s.state == TCP_LISTEN).map(|s| s.sport).collect();
        let mut kernel_tw: HashMap<DestinationKey, HashMap<u16, u64>> = HashMap::new();
        let mut kernel_live: HashMap<DestinationKey, u64> = HashMap::new();
        let mut live_tuples = std::collections::HashSet::new();
        for s in sockets {
            if s.state == TCP_LISTEN || listening.contains(&s.sport) || s.dport == 0 {
                continue;
            }
            let k = key(netns, s.saddr, s.daddr, s.dport);
            if s.state == TCP_TIME_WAIT {
                let left = u64::from(s.expires_ms.unwrap_or(0)) * 1_000_000;
                kernel_tw.entry(k).or_default().insert(s.sport, now + left);
            } else if s.state != TCP_CLOSE {
                *kernel_live.entry(k).or_default() += 1;
                live_tuples.insert((k, s.sport));
            }
        }
        let mut drift = Drift::default();
        for (k, d) in self.destinations.iter_mut().filter(|(k, _)| k.netns == netns) {
            let kernel = kernel_tw.remove(k).unwrap_or_default();
            let mut missing_now = std::collections::HashSet::new();
            let missing_before = std::mem::take(&mut d.missing_once);
            d.time_wait.retain(|sport, _| {
                if kernel.contains_key(sport) {
                    return true;
                }
                let reused = live_tuples.contains(&(*k, *sport));
                if !reused && !missing_before.contains(sport) {
                    // Missing for the first time: wait for the next snapshot to agree.
                    missing_now.insert(*sport);
                    return true;
                }
                if reused {
                    d.reused += 1;
                } else {
                    d.killed += 1;
                }
                drift.dropped += 1;
                false
            });
            d.missing_once = missing_now;
            for (sport, expires) in kernel {
                if let std::collections::hash_map::Entry::Vacant(e) = d.time_wait.entry(sport) {
                    e.insert(expires);
                    drift.adopted += 1;
                }
            }
            d.live = kernel_live.remove(k).unwrap_or(0);
        }
        for (k, tw) in kernel_tw {
            let d = self.destinations.entry(k).or_default();
            drift.adopted += tw.len() as u64;
            d.time_wait = tw;
            d.live = kernel_live.remove(&k).unwrap_or(0);
        }
        for (k, live) in kernel_live {
            self.destinations.entry(k).or_default().live = live;
        }
        drift
    }

    /// Every destination as the views show it, in no particular order.
    pub fn views(&mut self) -> Vec<DestinationView> {
        let now = self.now_ns;
        let contexts = &self.contexts;
        let only_observed = self.only_observed;
        self.destinations
            .iter_mut()
            .filter(|(_, d)| d.observed || !only_observed)
            .map(|(k, d)| view(k, d, contexts.get(&k.netns), now))
            .collect()
    }
}

fn view(
    k: &DestinationKey,
    d: &mut Destination,
    context: Option<&NetnsContext>,
    now: u64,
) -> DestinationView {
    let range_size = context
        .and_then(|c| c.port_range)
        .map(|(low, high)| u64::from(high.saturating_sub(low)) + 1);
    let reuse = tw_reuse_applies(k, context.and_then(|c| c.tcp_tw_reuse));
    // With tcp_tw_reuse a TIME_WAIT port is free again after a second.
    let holding =
        |expires: u64| !reuse || expires.saturating_sub(now) > TIME_WAIT_NS - REUSE_AFTER_NS;
    let blocking = d.time_wait.values().filter(|&&e| holding(e)).count() as u64;
    let headroom =
        range_size.map(|size| (size.saturating_sub(blocking + d.live)) as f64 / size as f64);
    let time_wait_per_sec = d.time_wait_rate.per_second(now);
    let forecast = match range_size {
        None => Forecast::Unknown,
        Some(size) => {
            let lifetime = if reuse { REUSE_AFTER_NS } else { TIME_WAIT_NS };
            // With reuse, a TIME_WAIT socket stops blocking its port a second after entry.
            let held_until = |e: u64| if reuse { e - (TIME_WAIT_NS - REUSE_AFTER_NS) } else { e };
            let expiries: Vec<u64> = d.time_wait.values().map(|&e| held_until(e)).collect();
            forecast(size, d.live, &expiries, time_wait_per_sec, lifetime, now)
        }
    };
    let mut processes: Vec<ProcessShare> = d
        .processes
        .iter()
        .map(|(&pid, (comm, n))| ProcessShare { pid, comm: comm.clone(), connections: *n })
        .collect();
    processes.sort_by(|a, b| b.connections.cmp(&a.connections).then(a.pid.cmp(&b.pid)));
    processes.truncate(5);
    DestinationView {
        key: *k,
        time_wait: d.time_wait.len() as u64,
        live: d.live,
        range_size,
        headroom,
        conn_per_sec: d.connects.per_second(now),
        time_wait_per_sec,
        time_wait_entered: d.entered,
        time_wait_expired: d.expired,
        time_wait_reused: d.reused,
        time_wait_killed: d.killed,
        failures: d.failures,
        eaddrnotavail: d.eaddrnotavail,
        processes,
        forecast,
    }
}

/// tcp_tw_reuse 1 applies everywhere, 2 to loopback traffic only.
fn tw_reuse_applies(k: &DestinationKey, setting: Option<u8>) -> bool {
    match setting {
        Some(1) => true,
        Some(2) => k.daddr.is_loopback(),
        _ => false,
    }
}

/// Ports in use `x` seconds from now if `rate` new TIME_WAIT sockets come per second,
/// each holding its port for `lifetime_ns`, on top of `live` sockets and the TIME_WAIT
/// sockets expiring at `expiries`: the first `x` where that reaches `size`, if any. After
/// one lifetime the use no longer grows, so looking that far ahead is enough.
pub fn forecast(
    size: u64,
    live: u64,
    expiries: &[u64],
    rate: f64,
    lifetime_ns: u64,
    now: u64,
) -> Forecast {
    let lifetime_s = lifetime_ns as f64 / SEC as f64;
    let steady_state_share = (live as f64 + rate * lifetime_s) / size as f64;
    let mut sorted = expiries.to_vec();
    sorted.sort_unstable();
    let size = size as f64;
    // 0.1 s steps over one lifetime (at most 600 steps).
    let steps = (lifetime_s * 10.0).ceil() as u64;
    for step in 0..=steps {
        let x = step as f64 / 10.0;
        let at = now + (x * SEC as f64) as u64;
        let existing = sorted.len() - sorted.partition_point(|&e| e <= at);
        let new = rate * x.min(lifetime_s);
        if live as f64 + existing as f64 + new >= size {
            return Forecast::Exhausts { seconds: x, steady_state_share };
        }
    }
    Forecast::Steady { steady_state_share }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use twtrace_common::{Attribution, tcp, tcp::TCP_ESTABLISHED};

    use super::*;
    use crate::event::{Family, Owner};

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    const NS: u32 = 4026531840;

    fn change(skaddr: u64, ts_ns: u64, old: u8, new: u8, sport: u16, tw: bool) -> Event {
        let comm = *b"client\0\0\0\0\0\0\0\0\0\0";
        Event::State(StateChange {
            time_wait: tw,
            ts_ns,
            cpu: 0,
            skaddr,
            prev_state_ns: None,
            owner: Some(Owner::new(42, 42, comm)),
            attribution: Attribution::Current,
            netns: NS,
            family: Family::Ipv4,
            saddr: CLIENT,
            sport,
            daddr: SERVER,
            dport: 5432,
            old_state: old,
            new_state: if tw { tcp::TCP_TIME_WAIT } else { new },
        })
    }

    /// One client-closes-first connection: connect at `t`, TIME_WAIT 1 ms later.
    fn connection(agg: &mut Aggregator, skaddr: u64, t: u64, sport: u16) {
        agg.observe(&change(skaddr, t, TCP_CLOSE, TCP_SYN_SENT, 0, false));
        agg.observe(&change(skaddr, t + 100, TCP_SYN_SENT, TCP_ESTABLISHED, sport, false));
        agg.observe(&change(skaddr, t + 1_000_000, tcp::TCP_FIN_WAIT2, TCP_CLOSE, sport, true));
    }

    fn with_range(reuse: u8) -> Aggregator {
        let mut agg = Aggregator::new();
        agg.set_context(NetnsContext {
            netns: NS,
            port_range: Some((40000, 40999)),
            tcp_tw_reuse: Some(reuse),
            ..Default::default()
        });
        agg
    }

    fn only(agg: &mut Aggregator) -> DestinationView {
        let views = agg.views();
        assert_eq!(views.len(), 1, "{views:#?}");
        views.into_iter().next().unwrap()
    }

    #[test]
    fn time_wait_counts_headroom_and_expiry() {
        let mut agg = with_range(0);
        for i in 0..100 {
            connection(&mut agg, 0x1000 + i, 10 * SEC + i * 10_000_000, 40000 + i as u16);
        }
        let v = only(&mut agg);
        assert_eq!((v.time_wait, v.live, v.time_wait_entered), (100, 0, 100));
        assert_eq!(v.range_size, Some(1000));
        assert_eq!(v.headroom, Some(0.9));
        assert_eq!(v.processes[0].comm, "client");
        assert_eq!(v.processes[0].connections, 100);
        // 60 s after the first entry, the first ones expire.
        agg.tick(10 * SEC + 1_000_000 + TIME_WAIT_NS + 5 * 10_000_000);
        let v = only(&mut agg);
        assert_eq!(v.time_wait_expired, 6);
        assert_eq!(v.time_wait, 94);
    }

    #[test]
    fn live_sockets_hold_ports_until_closed() {
        let mut agg = with_range(0);
        agg.observe(&change(1, SEC, TCP_CLOSE, TCP_SYN_SENT, 0, false));
        agg.observe(&change(1, SEC + 5, TCP_SYN_SENT, TCP_ESTABLISHED, 40001, false));
        assert_eq!(only(&mut agg).live, 1);
        // The server closed first: no TIME_WAIT here.
        agg.observe(&change(1, 2 * SEC, tcp::TCP_LAST_ACK, TCP_CLOSE, 40001, false));
        let v = only(&mut agg);
        assert_eq!((v.live, v.time_wait), (0, 0));
    }

    #[test]
    fn a_new_connection_on_a_time_wait_port_is_a_reuse() {
        let mut agg = with_range(1);
        connection(&mut agg, 1, SEC, 40005);
        agg.observe(&change(2, 3 * SEC, TCP_CLOSE, TCP_SYN_SENT, 0, false));
        agg.observe(&change(2, 3 * SEC + 5, TCP_SYN_SENT, TCP_ESTABLISHED, 40005, false));
        let v = only(&mut agg);
        assert_eq!((v.time_wait_reused, v.time_wait, v.live), (1, 0, 1));
    }

    #[test]
    fn rates_average_over_the_window() {
        let mut agg = with_range(0);
        // 50 connections/s for 20 s.
        for i in 0..1000u64 {
            connection(&mut agg, i + 1, 100 * SEC + i * 20_000_000, (40000 + i % 1000) as u16);
        }
        agg.tick(120 * SEC - 1);
        let v = only(&mut agg);
        assert!((v.conn_per_sec - 50.0).abs() < 1.0, "{}", v.conn_per_sec);
        assert!((v.time_wait_per_sec - 50.0).abs() < 1.0, "{}", v.time_wait_per_sec);
    }

    #[test]
    fn forecast_exhaustion_and_steady_state() {
        // 1000 ports, 500 in TIME_WAIT expiring late, 10/s more: 500 more take 50 s.
        let now = 1000 * SEC;
        let late = vec![now + 59 * SEC; 500];
        match forecast(1000, 0, &late, 10.0, TIME_WAIT_NS, now) {
            Forecast::Exhausts { seconds, steady_state_share } => {
                assert!((seconds - 50.0).abs() < 0.15, "{seconds}");
                assert!((steady_state_share - 0.6).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
        // The same 500 expiring soon: the steady state is 600 ports, 60%.
        let soon = vec![now + SEC; 500];
        assert_eq!(
            forecast(1000, 0, &soon, 10.0, TIME_WAIT_NS, now),
            Forecast::Steady { steady_state_share: 0.6 }
        );
        // 512/s without reuse against 28232 ports: out in about 55 s from empty.
        match forecast(28232, 0, &[], 512.0, TIME_WAIT_NS, now) {
            Forecast::Exhausts { seconds, .. } => assert!((seconds - 55.2).abs() < 0.2),
            other => panic!("{other:?}"),
        }
        // With reuse a port is held one second: 512/s uses 512 ports.
        match forecast(28232, 0, &[], 512.0, REUSE_AFTER_NS, now) {
            Forecast::Steady { steady_state_share } => {
                assert!((steady_state_share - 512.0 / 28232.0).abs() < 1e-9)
            }
            other => panic!("{other:?}"),
        }
        // Full now.
        assert!(matches!(
            forecast(10, 10, &[], 0.0, TIME_WAIT_NS, now),
            Forecast::Exhausts { seconds: 0.0, .. }
        ));
    }

    #[test]
    fn reuse_makes_time_wait_ports_free_after_a_second() {
        let mut agg = with_range(1);
        for i in 0..100 {
            connection(&mut agg, i + 1, 10 * SEC, 40000 + i as u16);
        }
        agg.tick(10 * SEC + 2_000_000);
        assert_eq!(only(&mut agg).headroom, Some(0.9));
        agg.tick(12 * SEC);
        let v = only(&mut agg);
        assert_eq!((v.headroom, v.time_wait), (Some(1.0), 100));
        // More TIME_WAIT sockets than ports, all reusable: no exhaustion ahead.
        let mut small = with_range(1);
        for i in 0..2000 {
            connection(&mut small, i + 1, 10 * SEC, 40000 + (i % 1000) as u16);
        }
        small.tick(30 * SEC);
        assert!(matches!(only(&mut small).forecast, Forecast::Steady { .. }));
    }

    #[test]
    fn only_observed_hides_destinations_known_from_snapshots_only() {
        let mut agg = with_range(0).only_observed(true);
        let tw = SnapshotSocket {
            saddr: CLIENT,
            sport: 40001,
            daddr: SERVER,
            dport: 80,
            state: TCP_TIME_WAIT,
            expires_ms: Some(30_000),
        };
        agg.reconcile(NS, &[tw], SEC);
        assert!(agg.views().is_empty());
        connection(&mut agg, 1, 2 * SEC, 40002);
        assert_eq!(only(&mut agg).key.dport, 5432);
    }

    #[test]
    fn reconcile_adopts_drops_and_resets_live() {
        let mut agg = with_range(0);
        connection(&mut agg, 1, SEC, 40001); // the kernel still has it
        connection(&mut agg, 2, SEC, 40002); // killed
        connection(&mut agg, 3, SEC, 40003); // its tuple is live again: reused
        let tw = |sport| SnapshotSocket {
            saddr: CLIENT,
            sport,
            daddr: SERVER,
            dport: 5432,
            state: TCP_TIME_WAIT,
            expires_ms: Some(30_000),
        };
        let live = SnapshotSocket { state: TCP_ESTABLISHED, expires_ms: None, ..tw(40003) };
        // A server-side TIME_WAIT (local port is a listener's) is not a client's.
        let listener = SnapshotSocket {
            saddr: CLIENT,
            sport: 8080,
            daddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dport: 0,
            state: TCP_LISTEN,
            expires_ms: None,
        };
        let server_tw = SnapshotSocket { sport: 8080, dport: 50000, ..tw(8080) };
        let snapshot = [tw(40001), tw(40010), tw(40011), live, listener, server_tw];
        // A TIME_WAIT socket missing from one dump is kept (dumps can skip one); its tuple
        // in use again is a reuse at once.
        assert_eq!(agg.reconcile(NS, &snapshot, 2 * SEC), Drift { adopted: 2, dropped: 1 });
        assert_eq!(agg.reconcile(NS, &snapshot, 3 * SEC), Drift { adopted: 0, dropped: 1 });
        let v = only(&mut agg);
        assert_eq!((v.time_wait, v.live, v.time_wait_killed, v.time_wait_reused), (3, 1, 1, 1));
    }

    #[test]
    fn failures_without_a_source_go_to_the_busiest_source() {
        let mut agg = with_range(0);
        connection(&mut agg, 1, SEC, 40001);
        let failure = Failure {
            call: Call::Connect,
            ts_ns: 2 * SEC,
            cpu: 0,
            skaddr: None,
            owner: None,
            attribution: Attribution::Current,
            netns: NS,
            errno: EADDRNOTAVAIL,
            source: twtrace_common::FailureSource::Syscall,
            family: Family::Ipv4,
            saddr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            sport: 0,
            daddr: SERVER,
            dport: 5432,
            context: None,
        };
        agg.observe(&Event::Failure(failure));
        let v = only(&mut agg);
        assert_eq!((v.failures, v.eaddrnotavail, v.key.saddr), (1, 1, CLIENT));
    }
}
