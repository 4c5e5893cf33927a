//! The kernel's per-CPU event ring buffers as one time-ordered stream.
//!
//! Each CPU writes its own ring (no lock shared between CPUs on the hot path), and the state
//! hook first gathers events in a per-CPU batch (`twtrace_common::staging`), so one
//! socket's transitions, made on different CPUs, reach userspace by different ways and at
//! different times. Before each read, the batches holding events old enough to be released
//! are flushed; events are then held back until nothing older can still come, and
//! released sorted by time.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

use anyhow::Context as _;
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::ProgramFd,
};
use twtrace_common::{EventHeader, EventKind, staging::Staging};

use crate::clock::Clock;

/// How long a record is held back. A program takes its timestamp a few microseconds
/// before it commits the record; this bounds that gap with a wide margin (interrupts,
/// slow emulated CPUs).
pub const HOLD_BACK_NS: u64 = 10_000_000;

/// A batch still in use after this long is not waited for.
const STUCK_BATCH_NS: u64 = 1_000_000_000;

/// The rings, polled through one epoll descriptor (readable when any ring is).
pub struct EventRings {
    rings: Vec<RingBuf<MapData>>,
    epoll: OwnedFd,
    reorder: Reorder,
    batches: Option<Batches>,
}

/// The state hook's per-CPU batches and the program that flushes one.
pub struct Batches {
    pub staging: PerCpuArray<MapData, Staging>,
    pub flush_program: ProgramFd,
    /// A flush failed for another reason than an offline CPU (said once).
    pub flush_failed: std::sync::atomic::AtomicBool,
}

impl Batches {
    /// Flushes every CPU's batch that holds an event stamped at or before `due_ns`;
    /// returns the timestamp of the oldest event still held by a batch whose flush was
    /// due (its CPU was using it at that instant), if any.
    ///
    /// A flush runs on the batch's CPU (an interrupt there), so the reader leaves alone
    /// the batches that would not hold anything back: [`EventRings::drain`] releases
    /// nothing younger than [`HOLD_BACK_NS`] anyway. Under load the batches fill and
    /// empty themselves many times between two reads, and no CPU is interrupted at all.
    fn flush(&self, due_ns: u64) -> Option<u64> {
        let per_cpu = self.staging.get(&0, 0).ok()?;
        let mut oldest_held: Option<u64> = None;
        for (cpu, batch) in per_cpu.iter().enumerate() {
            if batch.oldest_ns().is_none_or(|oldest| oldest > due_ns) {
                // Also when the copy raced with the batch's CPU: an event the batch held
                // since before `due_ns` was either seen here or flushed to the ring,
                // which is read after this.
                continue;
            }
            let busy = match run_on_cpu(&self.flush_program, cpu as u32) {
                Ok(ret) => ret != 0,
                // An offline CPU: what it holds cannot come before it is back.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => false,
                Err(e) => {
                    if !self.flush_failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        log::warn!(
                            "cannot flush CPU {cpu}'s batch of events ({e}): its events wait \
                             until the batch fills, or until exit; --wakeup-bytes 0 sends \
                             every event at once"
                        );
                    }
                    false
                }
            };
            if busy {
                // In use at that instant: what it holds now waits for the next read.
                let held = self
                    .staging
                    .get(&0, 0)
                    .ok()
                    .and_then(|again| again.get(cpu).and_then(Staging::oldest_ns));
                if let Some(ts) = held {
                    oldest_held = Some(oldest_held.map_or(ts, |o| o.min(ts)));
                }
            }
        }
        oldest_held
    }

    /// The events the batches still hold, copied out of the map: at exit only (a batch
    /// flushed later would deliver them twice).
    fn leftovers(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Ok(per_cpu) = self.staging.get(&0, 0) {
            for batch in per_cpu.iter() {
                let held = &batch.events[..(batch.count as usize).min(batch.events.len())];
                for event in held {
                    // SAFETY: SockStateEvent is plain data with explicit padding.
                    bytes.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(
                            std::ptr::from_ref(event).cast::<u8>(),
                            size_of_val(event),
                        )
                    });
                }
            }
        }
        bytes
    }
}

/// Runs the flush program on `cpu` (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_RUN_ON_CPU`: an
/// interrupt on that CPU); returns the program's return value. The same call as aya's
/// `RawTracePoint::test_run`, made on a duplicate of the program's descriptor: the
/// program stays with the loaded object in `Tracer`, these rings live in the reader.
fn run_on_cpu(program: &ProgramFd, cpu: u32) -> std::io::Result<u32> {
    use aya_obj::generated::{BPF_F_TEST_RUN_ON_CPU, bpf_attr, bpf_cmd};
    // SAFETY: an all-zero bpf_attr is valid for every command.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // Plain integers written into the union member this command reads.
    attr.test.prog_fd = program.as_fd().as_raw_fd() as u32;
    attr.test.flags = BPF_F_TEST_RUN_ON_CPU;
    attr.test.cpu = cpu;
    // SAFETY: bpf(2) with a valid attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_TEST_RUN as libc::c_long,
            &raw mut attr,
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled in the member it was given.
    Ok(unsafe { attr.test.retval })
}

impl EventRings {
    pub fn new(rings: Vec<RingBuf<MapData>>, batches: Option<Batches>) -> anyhow::Result<Self> {
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
        Ok(Self { rings, epoll, reorder: Reorder::default(), batches })
    }

    /// Hands `handle` every event that nothing can still precede, in time order.
    pub fn drain(&mut self, handle: impl FnMut(&[u8]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let now = Clock::monotonic_now_ns();
        // What a batch still holds goes out before anything newer; unless it has been held
        // for a second (then something is wrong with that batch: do not stall the rest).
        let release_up_to = now.saturating_sub(HOLD_BACK_NS);
        let held =
            self.take_all(release_up_to).filter(|&ts| now.saturating_sub(ts) < STUCK_BATCH_NS);
        let mark = release_up_to.min(held.map_or(u64::MAX, |ts| ts.saturating_sub(1)));
        self.reorder.release(mark, handle)
    }

    /// Hands `handle` every event waiting, held back or not, in time order: at exit, and
    /// before a snapshot of the kernel's sockets, which must follow every event before it.
    pub fn drain_all(
        &mut self,
        handle: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.take_all_settled();
        self.reorder.release(u64::MAX, handle)
    }

    /// [`Self::drain_all`] at exit: whatever a batch could not flush (in use, or the flush
    /// failed) is taken from the batch itself, so nothing stays behind.
    pub fn drain_at_exit(
        &mut self,
        handle: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.take_all_settled();
        let leftovers = self.batches.as_ref().map(Batches::leftovers).unwrap_or_default();
        for event in split_events(&leftovers) {
            self.reorder.push(event);
        }
        self.reorder.release(u64::MAX, handle)
    }

    /// [`Self::take_all`], tried again while a batch was in use: the program using it
    /// flushes it within microseconds, or the next try does.
    fn take_all_settled(&mut self) {
        for _ in 0..3 {
            if self.take_all(u64::MAX).is_none() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Flushes the batches holding events stamped at or before `due_ns` (see
    /// [`Batches::flush`]), then moves every event out of the rings; returns the oldest
    /// event a batch still holds of those.
    fn take_all(&mut self, due_ns: u64) -> Option<u64> {
        let held = self.batches.as_ref().and_then(|batches| batches.flush(due_ns));
        for ring in &mut self.rings {
            while let Some(record) = ring.next() {
                for event in split_events(&record) {
                    self.reorder.push(event);
                }
            }
        }
        held
    }
}

/// The events of one ring-buffer record (a batch holds several, back to back). An event
/// of unknown kind takes the rest of the record, to be reported undecodable.
pub fn split_events(mut record: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if record.is_empty() {
            return None;
        }
        let size = record
            .first()
            .and_then(|&kind| EventKind::from_u8(kind))
            .map_or(record.len(), EventKind::event_size)
            .min(record.len());
        let (event, rest) = record.split_at(size);
        record = rest;
        Some(event)
    })
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
    fn a_batch_record_splits_into_its_events() {
        let mut batch = Vec::new();
        for ts in [3u64, 4, 5] {
            let mut event = vec![0u8; size_of::<twtrace_common::SockStateEvent>()];
            event[0] = EventKind::State as u8;
            event[8..16].copy_from_slice(&ts.to_ne_bytes());
            batch.extend_from_slice(&event);
        }
        let events: Vec<&[u8]> = split_events(&batch).collect();
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| e.len() == 112));
        assert_eq!(timestamp(events[2]), 5);
    }

    #[test]
    fn an_unknown_kind_takes_the_rest_of_the_record() {
        let record = [0xee_u8; 40];
        let events: Vec<&[u8]> = split_events(&record).collect();
        assert_eq!(events, [&record[..]]);
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
