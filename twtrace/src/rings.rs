//! The kernel's per-CPU event ring buffers as one time-ordered stream.
//!
//! Each CPU writes its own ring (no lock shared between CPUs on the hot path), so one
//! socket's transitions, made on different CPUs, sit in different rings. Reading ring after
//! ring would put them out of order whenever a drain falls between them; so records are
//! held back until no ring can still deliver an older one, and released sorted by time.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use twtrace_common::EventHeader;

use crate::clock::Clock;

/// How long a record is held back. A program takes its timestamp a few microseconds
/// before it commits the record; this bounds that gap with a wide margin (interrupts,
/// slow emulated CPUs).
pub const HOLD_BACK_NS: u64 = 10_000_000;

/// The rings, polled through one epoll descriptor (readable when any ring is).
pub struct EventRings {
    rings: Vec<RingBuf<MapData>>,
    epoll: OwnedFd,
    reorder: Reorder,
}

impl EventRings {
    pub fn new(rings: Vec<RingBuf<MapData>>) -> anyhow::Result<Self> {
        // SAFETY: plain epoll_create1(2); the descriptor is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1 failed");
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for (i, ring) in rings.iter().enumerate() {
            let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
            // SAFETY: both descriptors are open; `event` is a valid epoll_event.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    ring.as_raw_fd(),
                    &raw mut event,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("failed to poll event ring {i}"));
            }
        }
        Ok(Self { rings, epoll, reorder: Reorder::default() })
    }

    /// Hands `handle` every record that no ring can still precede, in time order.
    pub fn drain(&mut self, handle: impl FnMut(&[u8]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let now = Clock::monotonic_now_ns();
        self.take_all();
        self.reorder.release(now.saturating_sub(HOLD_BACK_NS), handle)
    }

    /// Hands `handle` every record waiting, held back or not, in time order: at exit, and
    /// before a snapshot of the kernel's sockets, which must follow every event before it.
    pub fn drain_all(
        &mut self,
        handle: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.take_all();
        self.reorder.release(u64::MAX, handle)
    }

    fn take_all(&mut self) {
        for ring in &mut self.rings {
            while let Some(record) = ring.next() {
                self.reorder.push(&record);
            }
        }
    }
}

impl AsFd for EventRings {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl AsRawFd for EventRings {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// Records waiting to be released in time order, copied out of the rings (so the rings'
/// space is freed at once) into one reused buffer.
#[derive(Default)]
pub struct Reorder {
    bytes: Vec<u8>,
    held: Vec<Held>,
    /// Arrival number: keeps records with equal timestamps in arrival order.
    next_seq: u64,
    spare: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Held {
    ts_ns: u64,
    seq: u64,
    start: usize,
    len: usize,
}

impl Reorder {
    pub fn push(&mut self, record: &[u8]) {
        self.held.push(Held {
            ts_ns: timestamp(record),
            seq: self.next_seq,
            start: self.bytes.len(),
            len: record.len(),
        });
        self.next_seq += 1;
        self.bytes.extend_from_slice(record);
    }

    /// Records held.
    pub const fn len(&self) -> usize {
        self.held.len()
    }

    pub const fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hands over, in (time, arrival) order, the records stamped at or before `up_to_ns`.
    pub fn release(
        &mut self,
        up_to_ns: u64,
        mut handle: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Each ring is already in time order: the sort mostly merges runs.
        self.held.sort_by_key(|h| (h.ts_ns, h.seq));
        let ready = self.held.partition_point(|h| h.ts_ns <= up_to_ns);
        let mut result = Ok(());
        for h in &self.held[..ready] {
            result = handle(&self.bytes[h.start..h.start + h.len]);
            if result.is_err() {
                break;
            }
        }
        // Keep the rest (a few milliseconds' worth) in a compacted buffer.
        self.spare.clear();
        for h in &mut self.held[ready..] {
            let start = self.spare.len();
            self.spare.extend_from_slice(&self.bytes[h.start..h.start + h.len]);
            h.start = start;
        }
        self.held.drain(..ready);
        std::mem::swap(&mut self.bytes, &mut self.spare);
        result
    }
}

/// The record's kernel timestamp (0 for a record too short to have one: released first,
/// then reported undecodable).
fn timestamp(record: &[u8]) -> u64 {
    let at = std::mem::offset_of!(EventHeader, ts_ns);
    record.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ts_ns: u64, tag: u8) -> Vec<u8> {
        let mut r = vec![0u8; 24];
        r[8..16].copy_from_slice(&ts_ns.to_ne_bytes());
        r[16] = tag;
        r
    }

    fn released(reorder: &mut Reorder, up_to: u64) -> Vec<u8> {
        let mut tags = Vec::new();
        reorder
            .release(up_to, |r| {
                tags.push(r[16]);
                Ok(())
            })
            .unwrap();
        tags
    }

    #[test]
    fn records_from_two_rings_come_out_in_time_order() {
        let mut reorder = Reorder::default();
        // Ring 0, then ring 1, each in its own order.
        for (ts, tag) in [(10, 1), (30, 3), (50, 5), (20, 2), (40, 4)] {
            reorder.push(&record(ts, tag));
        }
        assert_eq!(released(&mut reorder, 100), [1, 2, 3, 4, 5]);
        assert!(reorder.is_empty());
    }

    #[test]
    fn records_newer_than_the_mark_wait_for_the_next_release() {
        let mut reorder = Reorder::default();
        reorder.push(&record(10, 1));
        reorder.push(&record(30, 3));
        assert_eq!(released(&mut reorder, 20), [1]);
        assert_eq!(reorder.len(), 1);
        // An older record arrives late from another ring: it still goes first.
        reorder.push(&record(25, 2));
        assert_eq!(released(&mut reorder, 40), [2, 3]);
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut reorder = Reorder::default();
        for tag in 1..=4 {
            reorder.push(&record(7, tag));
        }
        assert_eq!(released(&mut reorder, 7), [1, 2, 3, 4]);
    }

    #[test]
    fn held_records_keep_their_bytes_across_releases() {
        let mut reorder = Reorder::default();
        reorder.push(&record(5, 1));
        reorder.push(&record(50, 9));
        reorder.push(&record(60, 8));
        assert_eq!(released(&mut reorder, 10), [1]);
        reorder.push(&record(55, 7));
        assert_eq!(released(&mut reorder, 100), [9, 7, 8]);
    }

    #[test]
    fn a_short_record_is_released_first() {
        let mut reorder = Reorder::default();
        reorder.push(&record(5, 1));
        reorder.push(&[0xff; 3]);
        let mut lens = Vec::new();
        reorder
            .release(0, |r| {
                lens.push(r.len());
                Ok(())
            })
            .unwrap();
        assert_eq!(lens, [3]);
    }
}
