//! What twtrace knows about the sockets it has seen, built from the event stream, and
//! the context it adds to failures from it.

pub mod time_wait;

use time_wait::{Destination, TimeWaitTracker};

use crate::{
    errno::{EADDRINUSE, EADDRNOTAVAIL},
    event::{Call, Event, PortContext},
};

/// Feeds on every event (before filtering) and adds port context to failures.
#[derive(Debug, Default)]
pub struct Model {
    time_wait: TimeWaitTracker,
    events_since_expiry: u32,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records what `event` tells and, for a port-allocation failure, attaches how many
    /// TIME_WAIT sockets hold ports: toward the destination (connect) or in the
    /// namespace (bind). The kernel side already read the namespace's settings.
    pub fn observe(&mut self, event: &mut Event) {
        self.time_wait.observe(event);
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
