//! Finds transitions the kernel never reported: a socket whose next transition does not
//! start in the state its last one ended in. Kernels before 6.7 skip a classic tracepoint's
//! program when it fires inside another BPF program on the same CPU (a softirq nested in
//! a program run) without counting it anywhere; this is how such losses still show.

// foldhash: randomly seeded like std's hasher, and much faster on these small keys.
use foldhash::HashMap;
use std::collections::hash_map::Entry;

use twtrace_common::tcp::{TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV};

use crate::event::StateChange;

/// More sockets than this remembered means their closes were missed: start afresh.
const MAX_REMEMBERED: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct GapFinder {
    /// The state each live socket's last transition ended in, by socket address.
    last_state: HashMap<u64, u8>,
    gaps: u64,
}

impl GapFinder {
    /// Checks `change` against the socket's previous transition; true when one is missing.
    pub fn observe(&mut self, change: &StateChange) -> bool {
        // Leaving CLOSE (connect, listen) or a clone of a listener starts a new socket
        // life at this address: nothing to chain to.
        let new_life = change.old_state == TCP_CLOSE
            || (change.old_state == TCP_LISTEN && change.new_state == TCP_SYN_RECV);
        // A `time_wait` event stands for the kernel's move to CLOSE.
        let closes = change.new_state == TCP_CLOSE || change.time_wait;
        if !closes && self.last_state.len() >= MAX_REMEMBERED {
            self.last_state.clear();
        }
        // One hash probe per event: this runs for every event the reader handles.
        let gap = match self.last_state.entry(change.skaddr) {
            Entry::Occupied(mut known) => {
                let gap = !new_life && *known.get() != change.old_state;
                if closes {
                    known.remove();
                } else {
                    known.insert(change.new_state);
                }
                gap
            }
            Entry::Vacant(slot) => {
                if !closes {
                    slot.insert(change.new_state);
                }
                false
            }
        };
        self.gaps += u64::from(gap);
        gap
    }

    /// Gaps found so far.
    pub const fn gaps(&self) -> u64 {
        self.gaps
    }
}

#[cfg(test)]
mod tests {
    use twtrace_common::tcp::{
        TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_SYN_SENT,
        TCP_TIME_WAIT,
    };

    use twtrace_common::Attribution;

    use super::*;
    use crate::event::Family;

    fn change(skaddr: u64, old_state: u8, new_state: u8) -> StateChange {
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        StateChange {
            time_wait: new_state == TCP_TIME_WAIT,
            ts_ns: 1,
            cpu: 0,
            skaddr,
            prev_state_ns: None,
            owner: None,
            attribution: Attribution::Unknown,
            netns: 1,
            family: Family::Ipv4,
            saddr: localhost,
            sport: 40000,
            daddr: localhost,
            dport: 80,
            old_state,
            new_state,
        }
    }

    #[test]
    fn a_full_connection_has_no_gap() {
        let mut finder = GapFinder::default();
        for (old, new) in [
            (TCP_CLOSE, TCP_SYN_SENT),
            (TCP_SYN_SENT, TCP_ESTABLISHED),
            (TCP_ESTABLISHED, TCP_FIN_WAIT1),
            (TCP_FIN_WAIT1, TCP_FIN_WAIT2),
            (TCP_FIN_WAIT2, TCP_TIME_WAIT),
            // The address's next socket.
            (TCP_CLOSE, TCP_SYN_SENT),
        ] {
            assert!(!finder.observe(&change(1, old, new)));
        }
        assert_eq!(finder.gaps(), 0);
    }

    #[test]
    fn a_missing_transition_is_a_gap() {
        let mut finder = GapFinder::default();
        finder.observe(&change(1, TCP_CLOSE, TCP_SYN_SENT));
        finder.observe(&change(1, TCP_SYN_SENT, TCP_ESTABLISHED));
        // ESTABLISHED -> CLOSE_WAIT was never reported.
        assert!(finder.observe(&change(1, TCP_CLOSE_WAIT, TCP_LAST_ACK)));
        assert!(!finder.observe(&change(1, TCP_LAST_ACK, TCP_CLOSE)));
        assert_eq!(finder.gaps(), 1);
    }

    #[test]
    fn sockets_older_than_the_trace_are_not_gaps() {
        let mut finder = GapFinder::default();
        assert!(!finder.observe(&change(7, TCP_ESTABLISHED, TCP_CLOSE_WAIT)));
        assert_eq!(finder.gaps(), 0);
    }

    #[test]
    fn accepted_connections_start_a_life() {
        let mut finder = GapFinder::default();
        finder.observe(&change(2, TCP_CLOSE, TCP_LISTEN));
        finder.observe(&change(2, TCP_LISTEN, TCP_CLOSE));
        assert!(!finder.observe(&change(2, TCP_LISTEN, TCP_SYN_RECV)));
        assert!(!finder.observe(&change(2, TCP_SYN_RECV, TCP_ESTABLISHED)));
        assert_eq!(finder.gaps(), 0);
    }
}
