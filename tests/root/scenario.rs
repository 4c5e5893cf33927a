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

/// Starts the client role: `count` sequential connections to `addr`. With `tolerate`,
/// failed connects are counted instead of fatal, and the client prints
/// `connected N failed M errno E` when done.
pub fn spawn_client(
    netns: &str,
    addr: SocketAddr,
    count: usize,
    closer: Closer,
    tolerate: bool,
) -> Child {
    role_command("client", netns, addr, count, closer)
        .env("TWTRACE_TEST_TOLERATE", if tolerate { "1" } else { "0" })
        .stdout(Stdio::piped())
        .spawn()
        .expect("failed to start the client process")
}

/// [`spawn_client`] inside the cgroup directory `cgroup` (as a container's process).
pub fn spawn_client_in_cgroup(
    netns: &str,
    addr: SocketAddr,
    count: usize,
    cgroup: &std::path::Path,
) -> Child {
    role_command("client", netns, addr, count, Closer::Client)
        .env("TWTRACE_TEST_TOLERATE", "0")
        .env("TWTRACE_TEST_CGROUP", cgroup)
        .stdout(Stdio::piped())
        .spawn()
        .expect("failed to start the client process")
}

/// Starts a one-shot role (`refuse`, `bind`, `unreachable`, `nonblocking`) that prints
/// one result line.
pub fn spawn_role(role: &str, netns: &str, addr: SocketAddr, count: usize) -> Child {
    role_command(role, netns, addr, count, Closer::Client)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start the {role} process: {e}"))
}

/// Starts the server role in "until idle" mode: serves any number of connections and
/// exits after a second without one.
pub fn spawn_server_until_idle(netns: &str, addr: SocketAddr, closer: Closer) -> (Child, u16) {
    spawn_server(netns, addr, usize::MAX, closer)
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
    // A container's process: move into its cgroup before any socket exists.
    if let Ok(cgroup) = std::env::var("TWTRACE_TEST_CGROUP") {
        let procs = std::path::Path::new(&cgroup).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .unwrap_or_else(|e| panic!("failed to join {}: {e}", procs.display()));
    }
    let addr: SocketAddr = env("TWTRACE_TEST_ADDR").parse().unwrap();
    let count: usize = env("TWTRACE_TEST_COUNT").parse().unwrap();
    let closer =
        if env("TWTRACE_TEST_CLOSER") == "client" { Closer::Client } else { Closer::Server };
    match role.as_str() {
        "server" => {
            set_comm(SERVER_COMM);
            server(addr, count, closer);
        }
        "client" => {
            set_comm(CLIENT_COMM);
            client(
                addr,
                count,
                closer,
                std::env::var("TWTRACE_TEST_TOLERATE").as_deref() == Ok("1"),
            );
        }
        "refuse" => {
            set_comm(CLIENT_COMM);
            refuse(addr);
        }
        "bind" => {
            set_comm(CLIENT_COMM);
            bind_until_failure(addr, count);
        }
        "nonblocking" => {
            set_comm(CLIENT_COMM);
            let err = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .expect_err("connect should fail");
            // 0: the socket closed with no error to read (a kernel race, see the test).
            println!("errno {}", err.raw_os_error().unwrap_or(0));
        }
        "unreachable" => {
            set_comm(CLIENT_COMM);
            unreachable(addr);
        }
        "reset" => {
            set_comm(CLIENT_COMM);
            reset_in_fin_wait2(addr);
        }
        "hold" => {
            set_comm(CLIENT_COMM);
            hold_connections(addr, count);
        }
        other => panic!("unknown role {other}"),
    }
    Some(ExitCode::SUCCESS)
}

fn server(addr: SocketAddr, count: usize, closer: Closer) {
    let listener = TcpListener::bind(addr).expect("server: bind");
    println!("ready {}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    // With an unbounded count, stop after a second without connections (bounded loop).
    listener.set_nonblocking(count == usize::MAX).unwrap();
    let mut idle_since = std::time::Instant::now();
    let mut served = 0;
    while served < count {
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if idle_since.elapsed() > Duration::from_secs(1) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => panic!("server: accept: {e}"),
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        match closer {
            // Close at once: the server sends the first FIN.
            Closer::Server => drop(conn),
            // Wait for the client's FIN, then close.
            Closer::Client => {
                let mut buf = [0u8; 64];
                while conn.read(&mut buf).expect("server: read") > 0 {}
            }
        }
        served += 1;
        idle_since = std::time::Instant::now();
    }
}

fn client(addr: SocketAddr, count: usize, closer: Closer, tolerate: bool) {
    let (mut connected, mut failed, mut errno) = (0, 0, 0);
    for _ in 0..count {
        let mut conn = match TcpStream::connect(addr) {
            Ok(conn) => conn,
            Err(e) if tolerate => {
                failed += 1;
                errno = e.raw_os_error().unwrap_or(0);
                continue;
            }
            Err(e) => panic!("client: connect: {e}"),
        };
        connected += 1;
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
    if tolerate {
        println!("connected {connected} failed {failed} errno {errno}");
    }
}

/// One connection, both ends in this process: the client half-closes (FIN_WAIT2, still
/// open), the server answers with a reset (SO_LINGER 0), so the client's socket goes from
/// FIN_WAIT2 to CLOSE without entering TIME_WAIT. Prints the client's local port.
fn reset_in_fin_wait2(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("reset: bind");
    let client = TcpStream::connect(listener.local_addr().unwrap()).expect("reset: connect");
    let (mut server, _) = listener.accept().expect("reset: accept");
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.shutdown(std::net::Shutdown::Write).expect("reset: shutdown");
    // The FIN arrived once the server reads end of stream; the client is in FIN_WAIT2.
    let mut buf = [0u8; 16];
    while server.read(&mut buf).expect("reset: server read") > 0 {}
    // The server's ACK of that FIN may be delayed: wait (bounded) for the client to get it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tcp_state(&client) != TCP_FIN_WAIT2 {
        assert!(std::time::Instant::now() < deadline, "reset: the client never reached FIN_WAIT2");
        std::thread::sleep(Duration::from_millis(5));
    }
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and option buffer of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&server),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "reset: SO_LINGER: {}", std::io::Error::last_os_error());
    drop(server);
    let mut client = client;
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let err = client.read(&mut buf).expect_err("the client should see the reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    println!("port {}", client.local_addr().unwrap().port());
}

/// `TCP_FIN_WAIT2` of include/net/tcp_states.h.
const TCP_FIN_WAIT2: u8 = 5;

/// Opens `count` connections to a listener of its own and holds all of them (2 × `count`
/// live sockets), then closes every client end first (TIME_WAIT on the client side) and
/// the server ends after. Prints `held N`.
fn hold_connections(addr: SocketAddr, count: usize) {
    // Two descriptors per connection: more than the usual soft limit of 1,024 (the test
    // guests' too). Raise the soft limit; the hard one only if it is lower (that needs
    // CAP_SYS_RESOURCE).
    let want = (2 * count + 64) as libc::rlim_t;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit(2)/setrlimit(2) with a valid struct.
    let rc = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_cur.max(want);
        limit.rlim_max = limit.rlim_max.max(want);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit)
    };
    assert_eq!(rc, 0, "hold: RLIMIT_NOFILE {want}: {}", std::io::Error::last_os_error());
    let listener = TcpListener::bind(addr).expect("hold: bind");
    let target = listener.local_addr().unwrap();
    let mut pairs = Vec::with_capacity(count);
    for _ in 0..count {
        let client = TcpStream::connect(target).expect("hold: connect");
        let (server, _) = listener.accept().expect("hold: accept");
        pairs.push((client, server));
    }
    let (clients, servers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    drop(clients);
    // Each server end reads the client's FIN, then closes: the client end enters TIME_WAIT.
    for mut server in servers {
        server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        while server.read(&mut buf).expect("hold: server read") > 0 {}
    }
    println!("held {count}");
}

/// The socket's TCP state (`tcpi_state`).
fn tcp_state(stream: &TcpStream) -> u8 {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_state
}

/// Connects to a port nobody listens on, blocking then non-blocking; prints both errnos.
fn refuse(addr: SocketAddr) {
    let blocking = TcpStream::connect(addr).expect_err("blocking connect should fail");
    // connect_timeout is a non-blocking connect (EINPROGRESS), then poll and SO_ERROR.
    let nonblocking = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .expect_err("non-blocking connect should fail");
    println!(
        "blocking {} nonblocking {}",
        blocking.raw_os_error().unwrap(),
        nonblocking.raw_os_error().unwrap()
    );
}

/// Binds TCP sockets to `addr` (port 0) until one fails; prints how many succeeded.
fn bind_until_failure(addr: SocketAddr, max: usize) {
    let mut held = Vec::new();
    for _ in 0..max {
        let fd = socket(addr, libc::SOCK_STREAM);
        match bind(fd, addr) {
            Ok(()) => held.push(fd),
            Err(e) => {
                println!("bound {} errno {}", held.len(), e.raw_os_error().unwrap());
                return;
            }
        }
    }
    println!("bound {} errno 0", held.len());
}

/// Connects TCP then UDP to an address with no route; prints both errnos. Only the TCP
/// failure may be reported.
fn unreachable(addr: SocketAddr) {
    let tcp = TcpStream::connect(addr).expect_err("no route: connect should fail");
    let udp = std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0))
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap();
    let udp_err = udp.connect(addr).expect_err("no route: UDP connect should fail");
    println!("tcp {} udp {}", tcp.raw_os_error().unwrap(), udp_err.raw_os_error().unwrap());
}

fn socket(addr: SocketAddr, kind: i32) -> i32 {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, kind, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    fd
}

fn bind(fd: i32, addr: SocketAddr) -> std::io::Result<()> {
    // SAFETY: the sockaddr structs are fully initialised and sized for their family.
    let rc = unsafe {
        match addr {
            SocketAddr::V4(a) => {
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as u32)
            }
            SocketAddr::V6(a) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_port = a.port().to_be();
                sa.sin6_addr.s6_addr = a.ip().octets();
                libc::bind(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in6>() as u32)
            }
        }
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
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
