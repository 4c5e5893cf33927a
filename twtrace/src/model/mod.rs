//! What twtrace knows about the sockets it has seen, built from the event stream, and
//! the context it adds to failures from it.

pub mod gaps;
pub mod time_wait;

use gaps::GapFinder;
use time_wait::{Destination, TimeWaitTracker};

use crate::{
    errno::{EADDRINUSE, EADDRNOTAVAIL},
    event::{Call, Event, PortContext},
};

/// Feeds on every event (before filtering) and adds port context to failures.
#[derive(Debug, Default)]
pub struct Model {
    time_wait: TimeWaitTracker,
    gaps: GapFinder,
    events_since_expiry: u32,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sockets seen to miss a transition (see [`gaps`]).
    pub const fn gaps(&self) -> u64 {
        self.gaps.gaps()
    }

    /// Records what `event` tells and, for a port-allocation failure, attaches how many
    /// TIME_WAIT sockets hold ports: toward the destination (connect) or in the
    /// namespace (bind). The kernel side already read the namespace's settings.
    pub fn observe(&mut self, event: &mut Event) {
        self.time_wait.observe(event);
        if let Event::State(change) = event
            && self.gaps.observe(change)
            && self.gaps.gaps() == 1
        {
            eprintln!(
                "twtrace: warning: socket {:#x} went to {} without its transition to {}: \
                 that event was lost (see the warnings on lost events), or the kernel skipped \
                 a run of the state hook without counting it (kernels before 6.7 do, in a \
                 softirq nested in another BPF program; --state-hooks tp-btf counts them); \
                 the summary counts such gaps",
                change.skaddr,
                change.new_state_name(),
                change.old_state_name(),
            );
        }
        self.events_since_expiry += 1;
        if self.events_since_expiry >= 65536 {
            self.time_wait.expire(event.ts_ns());
            self.events_since_expiry = 0;
        }
        let Event::Failure(f) = event else {
            return;
        };
        if f.errno != EADDRNOTAVAIL && f.errno != EADDRINUSE {
            return;
        }
        let (to_destination, in_netns) = match f.call {
            Call::Connect => {
                let dest = Destination::new(f.netns, f.daddr, f.dport);
                (Some(self.time_wait.count(&dest, f.ts_ns)), None)
            }
            Call::Bind => (None, Some(self.time_wait.count_in_netns(f.netns, f.ts_ns))),
        };
        let kernel = f.context.unwrap_or(PortContext {
            port_range: None,
            tcp_tw_reuse: None,
            time_wait_to_destination: None,
            time_wait_in_netns: None,
        });
        f.context = Some(PortContext {
            time_wait_to_destination: to_destination,
            time_wait_in_netns: in_netns,
            ..kernel
        });
    }
}
