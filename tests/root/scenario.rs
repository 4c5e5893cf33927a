//! Scenario processes: a TCP server and client with known pids and names, run inside a
//! test's network namespace. They are this test executable re-run with
//! `TWTRACE_TEST_ROLE=server|client` and their parameters in the environment.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

/// Who sends the first FIN (and so ends up with the TIME_WAIT socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    Client,
    Server,
}

impl Closer {
    fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

pub const SERVER_COMM: &str = "tw-server";
pub const CLIENT_COMM: &str = "tw-client";

/// Starts the server role: listens on `addr` in netns `netns`, serves `count` connections.
/// Returns once it is listening; its stdout line "ready PORT" gives the port.
pub fn spawn_server(netns: &str, addr: SocketAddr, count: usize, closer: Closer) -> (Child, u16) {
    let mut child = role_command("server", netns, addr, count, closer)
        .stdout(Stdio::piped())
        .spawn()
        .expect("failed to start the server process");
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("server said nothing");
    let port = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected server greeting {line:?}"));
    (child, port)
}

/// Runs the client role to completion: `count` sequential connections to `addr`.
pub fn spawn_client(netns: &str, addr: SocketAddr, count: usize, closer: Closer) -> Child {
    role_command("client", netns, addr, count, closer)
        .spawn()
        .expect("failed to start the client process")
}

fn role_command(
    role: &str,
    netns: &str,
    addr: SocketAddr,
    count: usize,
    closer: Closer,
) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("TWTRACE_TEST_ROLE", role)
        .env("TWTRACE_TEST_NETNS", netns)
        .env("TWTRACE_TEST_ADDR", addr.to_string())
        .env("TWTRACE_TEST_COUNT", count.to_string())
        .env("TWTRACE_TEST_CLOSER", closer.as_str());
    cmd
}

/// Called first in `main`: runs a role and returns its exit code when one is requested.
pub fn run_role_if_requested() -> Option<ExitCode> {
    let role = std::env::var("TWTRACE_TEST_ROLE").ok()?;
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    enter_netns(&env("TWTRACE_TEST_NETNS"));
    let addr: SocketAddr = env("TWTRACE_TEST_ADDR").parse().unwrap();
    let count: usize = env("TWTRACE_TEST_COUNT").parse().unwrap();
    let closer = if env("TWTRACE_TEST_CLOSER") == "client" {
        Closer::Client
    } else {
        Closer::Server
    };
    match role.as_str() {
        "server" => {
            set_comm(SERVER_COMM);
            server(addr, count, closer);
        }
        "client" => {
            set_comm(CLIENT_COMM);
            client(addr, count, closer);
        }
        other => panic!("unknown role {other}"),
    }
    Some(ExitCode::SUCCESS)
}

fn server(addr: SocketAddr, count: usize, closer: Closer) {
    let listener = TcpListener::bind(addr).expect("server: bind");
    println!("ready {}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for _ in 0..count {
        let (mut conn, _) = listener.accept().expect("server: accept");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match closer {
            // Close at once: the server sends the first FIN.
            Closer::Server => drop(conn),
            // Wait for the client's FIN, then close.
            Closer::Client => {
                let mut buf = [0u8; 64];
                while conn.read(&mut buf).expect("server: read") > 0 {}
            }
        }
    }
}

fn client(addr: SocketAddr, count: usize, closer: Closer) {
    for _ in 0..count {
        let mut conn =
            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("client: connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match closer {
            Closer::Client => {
                drop(conn);
                // Let the server see the FIN and answer with its own before the next
                // connection, so the transitions of one connection are not interleaved.
                std::thread::sleep(Duration::from_millis(20));
            }
            Closer::Server => {
                let mut buf = [0u8; 64];
                while conn.read(&mut buf).expect("client: read") > 0 {}
            }
        }
    }
}

fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: valid fd; CLONE_NEWNET switches only this (single-threaded) process.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

fn set_comm(name: &str) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: PR_SET_NAME takes a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) };
}
