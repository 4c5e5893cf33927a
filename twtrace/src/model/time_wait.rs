//! TIME_WAIT sockets per destination, as seen by twtrace since it started: each
//! `time_wait` event counts for 60 s (TCP_TIMEWAIT_LEN, fixed on Linux).

use std::{collections::VecDeque, net::IpAddr};

// foldhash: randomly seeded like std's hasher, and much faster on these small keys.
use foldhash::HashMap;

use crate::event::{Event, StateChange};

/// Linux keeps a socket in TIME_WAIT for 60 s (TCP_TIMEWAIT_LEN).
pub const TIME_WAIT_NS: u64 = 60_000_000_000;

/// A destination as port exhaustion sees it: local ports are shared per remote endpoint
/// within a network namespace.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Destination {
    pub netns: u32,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl Destination {
    pub fn new(netns: u32, daddr: IpAddr, dport: u16) -> Self {
        Self { netns, daddr: daddr.to_canonical(), dport }
    }
}

#[derive(Debug, Default)]
pub struct TimeWaitTracker {
    /// Entry times (CLOCK_MONOTONIC ns), oldest first.
    by_destination: HashMap<Destination, VecDeque<u64>>,
}

impl TimeWaitTracker {
    pub fn observe(&mut self, event: &Event) {
        if let Event::State(s @ StateChange { time_wait: true, .. }) = event {
            let dest = Destination::new(s.netns, s.daddr, s.dport);
            self.by_destination.entry(dest).or_default().push_back(s.ts_ns);
        }
    }

    /// TIME_WAIT sockets toward `dest` at time `now_ns`.
    pub fn count(&mut self, dest: &Destination, now_ns: u64) -> u64 {
        let Some(entries) = self.by_destination.get_mut(dest) else {
            return 0;
        };
        while entries.front().is_some_and(|&t| now_ns.saturating_sub(t) >= TIME_WAIT_NS) {
            entries.pop_front();
        }
        let n = entries.len() as u64;
        if n == 0 {
            self.by_destination.remove(dest);
        }
        n
    }

    /// TIME_WAIT sockets in network namespace `netns` at time `now_ns`.
    pub fn count_in_netns(&mut self, netns: u32, now_ns: u64) -> u64 {
        self.expire(now_ns);
        self.by_destination
            .iter()
            .filter(|(d, _)| d.netns == netns)
            .map(|(_, e)| e.len() as u64)
            .sum()
    }

    /// Forgets expired entries everywhere (call now and then to bound memory).
    pub fn expire(&mut self, now_ns: u64) {
        self.by_destination.retain(|_, entries| {
            while entries.front().is_some_and(|&t| now_ns.saturating_sub(t) >= TIME_WAIT_NS) {
                entries.pop_front();
            }
            !entries.is_empty()
        });
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

    fn time_wait_at(ts_ns: u64) -> Event {
        let mut raw = raw_state(EventKind::TimeWait, AF_INET);
        raw.header.ts_ns = ts_ns;
        decode(bytes_of(&raw)).unwrap()
    }

    #[test]
    fn counts_per_destination_and_expires_after_60s() {
        let mut tw = TimeWaitTracker::default();
        for t in [0, 1_000, 30_000_000_000] {
            tw.observe(&time_wait_at(t));
        }
        let dest = Destination::new(4026531840, "10.1.2.3".parse().unwrap(), 8080);
        assert_eq!(tw.count(&dest, 31_000_000_000), 3);
        assert_eq!(tw.count(&dest, TIME_WAIT_NS + 1_000), 1, "the first two expired");
        let other = Destination::new(4026531840, "10.1.2.3".parse().unwrap(), 8081);
        assert_eq!(tw.count(&other, 0), 0);
        assert_eq!(tw.count_in_netns(4026531840, 31_000_000_000), 1, "only the unexpired one");
        assert_eq!(tw.count_in_netns(1, 31_000_000_000), 0);
        tw.expire(TIME_WAIT_NS * 3);
        assert_eq!(tw.count(&dest, TIME_WAIT_NS * 3), 0);
    }

    #[test]
    fn v4_mapped_destination_is_the_same_destination() {
        let a = Destination::new(1, "::ffff:10.1.2.3".parse().unwrap(), 80);
        let b = Destination::new(1, "10.1.2.3".parse().unwrap(), 80);
        assert_eq!(a, b);
    }

    #[test]
    fn state_events_do_not_count() {
        let mut tw = TimeWaitTracker::default();
        tw.observe(&decode(bytes_of(&raw_state(EventKind::State, AF_INET))).unwrap());
        assert_eq!(
            tw.count(&Destination::new(4026531840, "10.1.2.3".parse().unwrap(), 8080), 100),
            0
        );
    }
}
