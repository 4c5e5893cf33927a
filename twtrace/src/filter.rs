//! Which events the user asked to see (`--pid`, `--comm`, `--port`, `--daddr`, `--state`,
//! `-4`/`-6`, `--netns`, `--cgroup`, `--container`). Each given list must match; an empty
//! list matches everything.

use std::net::IpAddr;

use crate::{
    container::{CgroupResolver, WorkloadFilter},
    event::{Call, Event, Failure, Family, Owner, StateChange},
};

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub ports: Vec<u16>,
    pub daddrs: Vec<IpAddr>,
    pub states: Vec<u8>,
    pub family: Option<Family>,
    pub netns: Vec<u32>,
    /// Only failures (connect_error, bind_error).
    pub failed: bool,
    /// Only processes in these cgroups / containers (needs a [`CgroupResolver`]).
    pub workloads: WorkloadFilter,
}

fn any_or<T>(list: &[T], pred: impl FnMut(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(pred)
}

/// Compares addresses treating an IPv4 address and its v4-mapped IPv6 form as equal.
fn same_addr(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

impl Filter {
    /// This filter with `other`'s lists added (each list still matches any of its values)
    /// and its flags.
    pub fn merged_with(mut self, other: Filter) -> Filter {
        self.pids.extend(other.pids);
        self.comms.extend(other.comms);
        self.ports.extend(other.ports);
        self.daddrs.extend(other.daddrs);
        self.states.extend(other.states);
        self.netns.extend(other.netns);
        self.family = self.family.or(other.family);
        self.failed |= other.failed;
        self.workloads = self.workloads.merged_with(other.workloads);
        self
    }

    /// [`Self::matches`], and the owner's cgroup against `--cgroup`/`--container`.
    pub fn matches_with(&self, event: &Event, resolver: &mut CgroupResolver) -> bool {
        if !self.matches(event) {
            return false;
        }
        if self.workloads.is_empty() {
            return true;
        }
        event.owner().is_some_and(|o| resolver.matches(o.cgroup, &self.workloads))
    }

    pub fn matches(&self, event: &Event) -> bool {
        match event {
            // --failed alone drops state events; with --state, the states asked for stay.
            Event::State(s) => !(self.failed && self.states.is_empty()) && self.matches_state(s),
            // --state alone asks for state events only.
            Event::Failure(f) => (self.failed || self.states.is_empty()) && self.matches_failure(f),
        }
    }

    fn matches_failure(&self, f: &Failure) -> bool {
        let pid = f.owner.map(|o| o.pid);
        let connect = f.call == Call::Connect;
        self.family.is_none_or(|fam| fam == f.family)
            && any_or(&self.netns, |&n| n == f.netns)
            && any_or(&self.pids, |&p| pid == Some(p))
            && any_or(&self.comms, |c| comm_is(f.owner.as_ref(), c))
            && any_or(&self.ports, |&p| p == f.sport || (connect && p == f.dport))
            && any_or(&self.daddrs, |&a| connect && same_addr(a, f.daddr))
    }

    fn matches_state(&self, s: &StateChange) -> bool {
        let pid = s.owner.map(|o| o.pid);
        self.family.is_none_or(|f| f == s.family)
            && any_or(&self.netns, |&n| n == s.netns)
            && any_or(&self.pids, |&p| pid == Some(p))
            && any_or(&self.comms, |c| comm_is(s.owner.as_ref(), c))
            && any_or(&self.ports, |&p| p == s.sport || p == s.dport)
            && any_or(&self.daddrs, |&a| same_addr(a, s.daddr))
            && any_or(&self.states, |&st| st == s.new_state)
    }
}

/// Whether the owner's command name is `comm` (compared as bytes: the kernel's name need
/// not be UTF-8, and no filter needs it decoded).
fn comm_is(owner: Option<&Owner>, comm: &str) -> bool {
    owner.is_some_and(|o| o.comm_bytes() == comm.as_bytes())
}

#[cfg(test)]
mod tests {
    use twtrace_common::{EventKind, tcp, tcp::AF_INET};

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes_of, raw_state},
    };

    fn time_wait_event() -> Event {
        decode(bytes_of(&raw_state(EventKind::TimeWait, AF_INET))).unwrap()
    }

    #[test]
    fn empty_filter_matches_all() {
        assert!(Filter::default().matches(&time_wait_event()));
    }

    #[test]
    fn each_criterion_filters() {
        let ev = time_wait_event();
        let yes = |f: Filter| assert!(f.matches(&ev), "{f:?} should match");
        let no = |f: Filter| assert!(!f.matches(&ev), "{f:?} should not match");
        yes(Filter { pids: vec![1, 1234], ..Default::default() });
        no(Filter { pids: vec![1], ..Default::default() });
        yes(Filter { comms: vec!["curl".into()], ..Default::default() });
        no(Filter { comms: vec!["cur".into()], ..Default::default() });
        yes(Filter { ports: vec![40000], ..Default::default() });
        yes(Filter { ports: vec![8080], ..Default::default() });
        no(Filter { ports: vec![80], ..Default::default() });
        yes(Filter { daddrs: vec!["10.1.2.3".parse().unwrap()], ..Default::default() });
        yes(Filter { daddrs: vec!["::ffff:10.1.2.3".parse().unwrap()], ..Default::default() });
        no(Filter { daddrs: vec!["127.0.0.1".parse().unwrap()], ..Default::default() });
        yes(Filter { states: vec![tcp::TCP_TIME_WAIT], ..Default::default() });
        no(Filter { states: vec![tcp::TCP_CLOSE], ..Default::default() });
        yes(Filter { family: Some(Family::Ipv4), ..Default::default() });
        no(Filter { family: Some(Family::Ipv6), ..Default::default() });
        yes(Filter { netns: vec![4026531840], ..Default::default() });
        no(Filter { netns: vec![1], ..Default::default() });
    }

    #[test]
    fn failed_and_state_select_kinds() {
        use crate::event::tests::raw_failure;
        let failure = decode(bytes_of(&raw_failure(EventKind::ConnectError, 99))).unwrap();
        let tw = time_wait_event();
        let failed = Filter { failed: true, ..Default::default() };
        assert!(failed.matches(&failure) && !failed.matches(&tw));
        let state = Filter { states: vec![tcp::TCP_TIME_WAIT], ..Default::default() };
        assert!(!state.matches(&failure) && state.matches(&tw));
        let both = Filter { failed: true, states: vec![tcp::TCP_TIME_WAIT], ..Default::default() };
        assert!(both.matches(&failure) && both.matches(&tw));
        assert!(Filter::default().matches(&failure));
        assert!(Filter { ports: vec![5432], ..Default::default() }.matches(&failure));
        assert!(
            Filter { daddrs: vec!["10.0.0.7".parse().unwrap()], ..Default::default() }
                .matches(&failure)
        );
        assert!(!Filter { pids: vec![1], ..Default::default() }.matches(&failure));
    }

    #[test]
    fn unknown_owner_never_matches_a_pid_or_comm() {
        let Event::State(mut s) = time_wait_event() else { panic!() };
        s.owner = None;
        let ev = Event::State(s);
        assert!(!Filter { pids: vec![1234], ..Default::default() }.matches(&ev));
        assert!(!Filter { comms: vec!["curl".into()], ..Default::default() }.matches(&ev));
    }
}
