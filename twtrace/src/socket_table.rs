//! Sweeps closed sockets out of the classic hooks' socket table (`SOCKETS`).
//!
//! The state hook marks a socket's entry closed at CLOSE instead of deleting it: the kernel
//! reuses socket memory at once, so the next socket at that address takes the entry over
//! in place, and the hot path saves a hash-map insert and delete per socket. Where sockets
//! keep landing at new addresses, closed entries would fill the table; this sweeper, a
//! thread beside the tracer, deletes them once the table is half full.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray};
use twtrace_common::SocketEntry;

use crate::clock::Clock;

/// How often the sweeper checks how full the table is (one map read).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Closed entries younger than this are left alone: their address is the likeliest to
/// be taken by a new socket while the sweep runs (a delete racing that takeover would
/// cost the new socket its owner until its owner acts on it again).
const MIN_CLOSED_AGE_NS: u64 = 1_000_000_000;

/// When to sweep: how many entries the table holds, estimated from the entries the
/// kernel added and the ones swept out (a hash map has no cheap count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepSchedule {
    capacity: u64,
    swept: u64,
    /// Sweep once the estimate reaches this.
    threshold: u64,
}

impl SweepSchedule {
    pub const fn new(capacity: u32) -> Self {
        let capacity = capacity as u64;
        Self { capacity, swept: 0, threshold: capacity.div_ceil(2) }
    }

    /// Entries in the table, by estimate, when the kernel has added `added` in all.
    pub const fn estimate(&self, added: u64) -> u64 {
        added.saturating_sub(self.swept)
    }

    pub const fn due(&self, added: u64) -> bool {
        self.estimate(added) >= self.threshold
    }

    /// A sweep removed `removed` entries and left `closed_young` closed too recently:
    /// the next one waits until the table is half full again and, beyond the entries
    /// that will go next time, an eighth of it fills anew, so a table full of live
    /// sockets is not walked every second.
    pub fn swept(&mut self, added: u64, removed: u64, closed_young: u64) {
        self.swept += removed;
        let live = self.estimate(added).saturating_sub(closed_young);
        self.threshold = self.capacity.div_ceil(2).max(live + self.capacity.div_ceil(8));
    }
}

/// Whether an entry can go: its socket closed long enough ago (see [`MIN_CLOSED_AGE_NS`]).
pub const fn removable(entry: &SocketEntry, now_ns: u64) -> bool {
    entry.closed != 0 && now_ns.saturating_sub(entry.last_change_ns) >= MIN_CLOSED_AGE_NS
}

/// The running sweeper; stops and joins when dropped.
pub struct Sweeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    pub fn start(
        mut table: HashMap<MapData, u64, SocketEntry>,
        added: PerCpuArray<MapData, u64>,
        capacity: u32,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("socket-sweeper".to_owned())
            .spawn(move || run(&mut table, &added, capacity, &stopped))
            .context("failed to start the socket-table sweeper thread")?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    table: &mut HashMap<MapData, u64, SocketEntry>,
    added: &PerCpuArray<MapData, u64>,
    capacity: u32,
    stopped: &mpsc::Receiver<()>,
) {
    let mut schedule = SweepSchedule::new(capacity);
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECK_EVERY) {
        let total = match added.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(e) => {
                log::warn!("socket-table sweeper stopped: cannot read SOCKETS_ADDED: {e}");
                return;
            }
        };
        if !schedule.due(total) {
            continue;
        }
        let (removed, closed_young) = sweep(table, Clock::monotonic_now_ns());
        schedule.swept(total, removed, closed_young);
        log::debug!(
            "socket table: swept {removed} closed entries, ~{} of {capacity} left",
            schedule.estimate(total)
        );
    }
}

/// Deletes the removable entries; returns how many went and how many closed entries
/// were too young to go.
fn sweep(table: &mut HashMap<MapData, u64, SocketEntry>, now_ns: u64) -> (u64, u64) {
    // Keys first, deletes after: deleting the key an iteration stands on restarts it.
    let mut old = Vec::new();
    let mut closed_young = 0;
    for (sk, entry) in table.iter().filter_map(Result::ok) {
        if removable(&entry, now_ns) {
            old.push(sk);
        } else if entry.closed != 0 {
            closed_young += 1;
        }
    }
    // An entry taken over by a new socket meanwhile is deleted too: that socket's owner
    // is then recorded again at its next transition in its owner's context.
    let removed = old.iter().filter(|sk| table.remove(sk).is_ok()).count() as u64;
    (removed, closed_young)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sweep_at_half_capacity() {
        let schedule = SweepSchedule::new(1000);
        assert!(!schedule.due(499));
        assert!(schedule.due(500));
    }

    #[test]
    fn a_table_of_live_sockets_is_not_swept_every_check() {
        let mut schedule = SweepSchedule::new(1000);
        // Nothing could go: 600 live sockets.
        schedule.swept(600, 0, 0);
        assert!(!schedule.due(700));
        assert!(schedule.due(725));
    }

    #[test]
    fn sockets_closed_too_recently_are_swept_at_the_next_check() {
        let mut schedule = SweepSchedule::new(1000);
        schedule.swept(600, 0, 550);
        assert!(schedule.due(600));
    }

    #[test]
    fn after_a_good_sweep_the_half_mark_counts_again() {
        let mut schedule = SweepSchedule::new(1000);
        schedule.swept(800, 700, 0);
        assert_eq!(schedule.estimate(800), 100);
        assert!(!schedule.due(1199));
        assert!(schedule.due(1200));
    }

    #[test]
    fn only_entries_closed_a_while_ago_go() {
        let now = 10_000_000_000;
        let entry =
            |closed, last_change_ns| SocketEntry { closed, last_change_ns, ..Default::default() };
        assert!(removable(&entry(1, now - MIN_CLOSED_AGE_NS), now));
        assert!(!removable(&entry(1, now - 1), now));
        assert!(!removable(&entry(0, 0), now));
    }
}
