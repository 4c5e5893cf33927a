//! `storm`: a loopback connect/close storm, the load the benchmarks trace. A server thread
//! accepts, reads to EOF and closes; the client connects and closes first, as busy clients
//! do, as fast as it can until the deadline. Prints `connections N seconds S`.

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub fn run(seconds: f64) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("storm: failed to listen on loopback")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            // Bounded: the client closes every connection right away.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut connections = 0u64;
    let mut failures = 0u64;
    while Instant::now() < deadline {
        match TcpStream::connect(addr) {
            Ok(conn) => {
                connections += 1;
                drop(conn);
            }
            // Out of ports (should not happen with tcp_tw_reuse=1): count, back off briefly.
            Err(_) => {
                failures += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    println!(
        "connections {connections} failures {failures} seconds {:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
