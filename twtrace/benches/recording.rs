//! Recording format benchmark: bytes per event on disk, write throughput and replay
//! throughput, on a synthetic connection storm shaped like real traffic (each connection:
//! a client socket and an accepted socket going through their usual transitions).
//!
//! Run: `cargo bench -p twtrace --bench recording` (no root needed). Prints numbers; the
//! goals (issue "record"): <= 40 bytes/event, replay >= 2M events/s.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use twtrace::{
    clock::Clock,
    event::{Event, Family, Owner, StateChange},
    output::{EventSink, JsonLines},
    session::{codec::Record, header::Header, reader::RecordingReader, writer::RecordingWriter},
};
use twtrace_common::{Attribution, tcp::*};

fn comm(name: &str) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..name.len()].copy_from_slice(name.as_bytes());
    c
}

/// The events of `connections` client-closes-first connections, 1.5 µs apart.
fn storm(connections: u64) -> Vec<Event> {
    let client = Owner::new(4242, 4242, comm("loadgen"));
    let server = Owner::new(1717, 1720, comm("nginx"));
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut events = Vec::with_capacity(connections as usize * 11);
    let mut ts = 1_000_000_000u64;
    for i in 0..connections {
        let sport = 32768 + (i % 28232) as u16;
        let (csk, ssk) = (
            0xffff_8880_1000_0000 + (i % 4096) * 0x800,
            0xffff_8880_2000_0000 + (i % 4096) * 0x800,
        );
        let client_side = [
            (TCP_CLOSE, TCP_SYN_SENT, 0),
            (TCP_SYN_SENT, TCP_ESTABLISHED, sport),
            (TCP_ESTABLISHED, TCP_FIN_WAIT1, sport),
            (TCP_FIN_WAIT1, TCP_FIN_WAIT2, sport),
            (TCP_FIN_WAIT2, TCP_TIME_WAIT, sport),
        ];
        let server_side = [
            (TCP_LISTEN, TCP_SYN_RECV),
            (TCP_SYN_RECV, TCP_ESTABLISHED),
            (TCP_ESTABLISHED, TCP_CLOSE_WAIT),
            (TCP_CLOSE_WAIT, TCP_LAST_ACK),
            (TCP_LAST_ACK, TCP_CLOSE),
        ];
        for (k, &(old, new, port)) in client_side.iter().enumerate() {
            ts += 1_500 + (i * 7 + k as u64) % 900;
            events.push(Event::State(StateChange {
                time_wait: new == TCP_TIME_WAIT,
                ts_ns: ts,
                cpu: (i % 2) as u32,
                skaddr: csk,
                prev_state_ns: (k > 0).then_some(20_000 + (i % 5000)),
                owner: Some(client),
                attribution: if k == 0 || k == 2 {
                    Attribution::Current
                } else {
                    Attribution::Owner
                },
                netns: 4026531840,
                family: Family::Ipv4,
                saddr: lo,
                sport: port,
                daddr: lo,
                dport: 8080,
                old_state: old,
                new_state: new,
            }));
        }
        for (k, &(old, new)) in server_side.iter().enumerate() {
            ts += 1_100 + (i * 3 + k as u64) % 700;
            events.push(Event::State(StateChange {
                time_wait: false,
                ts_ns: ts,
                cpu: (i % 2) as u32,
                skaddr: ssk,
                prev_state_ns: (k > 0).then_some(15_000 + (i % 3000)),
                owner: Some(server),
                attribution: if k == 3 { Attribution::Current } else { Attribution::Listener },
                netns: 4026531840,
                family: Family::Ipv4,
                saddr: lo,
                sport: 8080,
                daddr: lo,
                dport: sport,
                old_state: old,
                new_state: new,
            }));
        }
    }
    events
}

fn main() {
    let events = storm(200_000);
    let n = events.len() as f64;
    let dir = std::env::temp_dir().join(format!("twtrace-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("storm.twtrace");

    let started = Instant::now();
    let mut writer =
        RecordingWriter::create(&path, Header::for_this_host(0, "bench".into()), None, 1).unwrap();
    for e in &events {
        writer.event(e).unwrap();
    }
    let (_, bytes) = writer.finish().unwrap();
    let write_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut reader = RecordingReader::open(&path).unwrap();
    let mut read = 0u64;
    while let Some(record) = reader.next_record().unwrap() {
        if let Record::Event(e) = record {
            std::hint::black_box(e);
            read += 1;
        }
    }
    let read_s = started.elapsed().as_secs_f64();
    assert_eq!(read, events.len() as u64);

    // Replay as `twtrace replay --json > /dev/null` does it: read, decode, format.
    let started = Instant::now();
    let mut reader = RecordingReader::open(&path).unwrap();
    let clock = Clock::from_offset(reader.header().clock_offset_ns);
    let mut sink = JsonLines::new(std::io::BufWriter::new(std::io::sink()));
    while let Some(record) = reader.next_record().unwrap() {
        if let Record::Event(e) = record {
            sink.write_event(&e, &clock).unwrap();
        }
    }
    sink.flush().unwrap();
    let json_s = started.elapsed().as_secs_f64();

    println!(
        "recording benchmark: {} events ({} connections), synthetic storm",
        events.len(),
        events.len() / 10
    );
    println!(
        "  bytes on disk     {bytes} ({:.1} bytes/event; goal <= 40; the kernel record is 112)",
        bytes as f64 / n
    );
    println!(
        "  write throughput  {:.2} M events/s ({write_s:.3} s, file synced at the end)",
        n / write_s / 1e6
    );
    println!(
        "  replay throughput {:.2} M events/s ({read_s:.3} s, read + decode; goal >= 2)",
        n / read_s / 1e6
    );
    println!(
        "  replay to JSON    {:.2} M events/s ({json_s:.3} s, read + decode + JSON Lines)",
        n / json_s / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}
