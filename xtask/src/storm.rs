//! `storm`: a loopback connect/close storm, the load the benchmarks trace. A server thread
//! accepts and closes at once (the server closes first, as HTTP servers do, so TIME_WAIT
//! builds up on the server side and the client's port search stays cheap); the client
//! connects, reads to EOF and closes, as fast as it can until the deadline.
//! Prints `connections N failures F seconds S`. Also `connect-loop`, a per-call microbenchmark.

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
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut connections = 0u64;
    let mut failures = 0u64;
    while Instant::now() < deadline {
        match TcpStream::connect(addr) {
            Ok(mut conn) => {
                connections += 1;
                // Bounded: the server closes every connection at once.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 64];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            }
            // Out of ports (should not happen: the client holds no TIME_WAIT): count, back off.
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

/// `connect-loop`: `calls` connect() calls on an invalid descriptor (each fails at once
/// with EBADF), timed: what a hook on connect() adds to one call, without any TCP work.
/// Prints `ns_per_call N`.
pub fn connect_loop(calls: u64) -> anyhow::Result<()> {
    anyhow::ensure!(calls > 0, "connect-loop: give a positive number of calls");
    // SAFETY: an all-zero sockaddr_in is valid; the family and port are set below.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = 80u16.to_be();
    let started = Instant::now();
    for _ in 0..calls {
        // SAFETY: `addr` is a live sockaddr_in of the size passed; descriptor -1 makes the
        // kernel fail the call before it touches anything.
        unsafe {
            libc::connect(
                -1,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
    }
    println!("ns_per_call {:.1}", started.elapsed().as_nanos() as f64 / calls as f64);
    Ok(())
}
