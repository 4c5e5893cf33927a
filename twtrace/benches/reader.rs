//! Reader benchmark: twtrace's userspace work per kernel event, without the kernel. Kernel
//! records shaped like a connect/close storm's go through what the live reader does with
//! them: the time-order merge, decoding, the model, the filter, then a recording
//! (`twtrace record`) or JSON Lines to nowhere (`twtrace trace --json > /dev/null`).
//!
//! Run: `cargo bench -p twtrace --bench reader [-- record|json]` (no root needed; the
//! argument keeps one of the two, e.g. for a profiler). Prints ns per event; the storm
//! benchmark (`./x bench`) measures the same work as CPU time, with the kernel's.

use std::time::Instant;

use twtrace::{
    clock::Clock,
    filter::Filter,
    model::Model,
    output::JsonLines,
    pipeline::Pipeline,
    rings::Reorder,
    session::{header::Header, writer::RecordingWriter},
};
use twtrace_common::{
    Attribution, EventHeader, EventKind, SockStateEvent, Task,
    tcp::{self, AF_INET},
};

/// Records a reader takes from the rings per read: one wakeup's worth (256 KiB).
const RECORDS_PER_READ: usize = 2_340;

/// How long the live reader holds records back before releasing them (rings.rs).
const HOLD_BACK_NS: u64 = 10_000_000;

fn task(pid: u32, comm: &str) -> Task {
    let mut name = [0u8; 16];
    name[..comm.len()].copy_from_slice(comm.as_bytes());
    Task { pid, tid: pid, comm: name, cgroup: 4242 }
}

/// The kernel records of `connections` client-closes-first loopback connections, as the
/// state hook writes them: an event every 7 µs, as in the storm on the test machine.
fn storm(connections: u64) -> Vec<u8> {
    let (client, server) = (task(4242, "loadgen"), task(1717, "nginx"));
    let lo = [127, 0, 0, 1];
    let mut records = Vec::with_capacity(connections as usize * 10 * 112);
    let mut ts = 1_000_000_000u64;
    let client_side = [
        (tcp::TCP_CLOSE, tcp::TCP_SYN_SENT, Attribution::Current),
        (tcp::TCP_SYN_SENT, tcp::TCP_ESTABLISHED, Attribution::Owner),
        (tcp::TCP_ESTABLISHED, tcp::TCP_FIN_WAIT1, Attribution::Current),
        (tcp::TCP_FIN_WAIT1, tcp::TCP_FIN_WAIT2, Attribution::Owner),
        (tcp::TCP_FIN_WAIT2, tcp::TCP_TIME_WAIT, Attribution::Owner),
    ];
    let server_side = [
        (tcp::TCP_LISTEN, tcp::TCP_SYN_RECV, Attribution::Listener),
        (tcp::TCP_SYN_RECV, tcp::TCP_ESTABLISHED, Attribution::Listener),
        (tcp::TCP_ESTABLISHED, tcp::TCP_CLOSE_WAIT, Attribution::Listener),
        (tcp::TCP_CLOSE_WAIT, tcp::TCP_LAST_ACK, Attribution::Current),
        (tcp::TCP_LAST_ACK, tcp::TCP_CLOSE, Attribution::Owner),
    ];
    for i in 0..connections {
        let port = 32768 + (i % 28232) as u16;
        let sides = [
            (&client_side, client, 0xffff_8880_1000_0000 + (i % 4096) * 0x800, port, 8080),
            (&server_side, server, 0xffff_8880_2000_0000 + (i % 4096) * 0x800, 8080, port),
        ];
        for (side, owner, skaddr, sport, dport) in sides {
            for (k, &(old, new, attribution)) in side.iter().enumerate() {
                ts += 7_000;
                let time_wait = new == tcp::TCP_TIME_WAIT;
                let event = SockStateEvent {
                    header: EventHeader {
                        kind: if time_wait { EventKind::TimeWait } else { EventKind::State } as u8,
                        version: SockStateEvent::VERSION,
                        _pad: [0; 2],
                        cpu: (i % 2) as u32,
                        ts_ns: ts,
                    },
                    skaddr,
                    prev_state_ns: if k == 0 { 0 } else { 20_000 },
                    task: owner,
                    netns: 4026531840,
                    family: AF_INET,
                    sport,
                    dport,
                    old_state: old,
                    new_state: new,
                    attribution: attribution as u8,
                    _pad: [0; 3],
                    saddr: [lo, [0; 4], [0; 4], [0; 4]].concat().try_into().unwrap(),
                    daddr: [lo, [0; 4], [0; 4], [0; 4]].concat().try_into().unwrap(),
                };
                // SAFETY: plain data with explicit padding, as the kernel writes it.
                records.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(
                        std::ptr::from_ref(&event).cast::<u8>(),
                        size_of::<SockStateEvent>(),
                    )
                });
            }
        }
    }
    records
}

/// Feeds every record through `pipeline` as the live reader does: a read's worth at a
/// time into the merge, released up to the hold-back mark. Returns ns per event.
fn run(records: &[u8], pipeline: &mut Pipeline) -> f64 {
    let size = size_of::<SockStateEvent>();
    let mut reorder = Reorder::default();
    let started = Instant::now();
    for read in records.chunks(RECORDS_PER_READ * size) {
        for record in read.chunks(size) {
            reorder.push(record);
        }
        let newest = u64::from_ne_bytes(read[read.len() - size + 8..][..8].try_into().unwrap());
        reorder.release(newest.saturating_sub(HOLD_BACK_NS), |r| pipeline.record(r)).unwrap();
    }
    reorder.release(u64::MAX, |r| pipeline.record(r)).unwrap();
    pipeline.finish().unwrap();
    let events = records.len() / size;
    assert_eq!(pipeline.tally.seen, events as u64, "every record reached the pipeline");
    started.elapsed().as_nanos() as f64 / events as f64
}

fn main() {
    let records = storm(200_000);
    let events = records.len() / size_of::<SockStateEvent>();
    let dir = std::env::temp_dir().join(format!("twtrace-reader-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let clock = Clock::from_offset(0);

    // `cargo bench` passes `--bench`; a word names the one path to run.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runs = |path: &str| only.as_deref().is_none_or(|o| o == path);
    println!("reader benchmark: {events} kernel records (200000 connections), synthetic storm");
    for round in 1..=3 {
        let mut line = format!("  round {round}:");
        if runs("record") {
            let mut record = Pipeline::new(Filter::default(), clock, Some(Model::new()));
            record.recorder = Some(
                RecordingWriter::create(
                    &dir.join("storm.twtrace"),
                    Header::for_this_host(0, "bench".into()),
                    None,
                    1,
                )
                .unwrap(),
            );
            line += &format!(" record {:.0} ns/event", run(&records, &mut record));
        }
        if runs("json") {
            let mut json = Pipeline::new(Filter::default(), clock, Some(Model::new()));
            json.sink = Some(Box::new(JsonLines::new(std::io::BufWriter::new(std::io::sink()))));
            line += &format!(" trace --json {:.0} ns/event", run(&records, &mut json));
        }
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
