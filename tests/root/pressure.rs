//! Port pressure (`top`, `report`) against ground truth: the kernel's own socket list
//! (`ss`) and TcpExt counters of the test's namespace.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use libtest_mimic::Trial;
use serde_json::Value;

use crate::{
    scenario::{self, CLIENT_COMM, Closer},
    support::{Netns, TWTRACE, wait_for_ready, wait_ok},
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("pressure::top_counts_time_wait_like_ss_and_headroom", live_counts_match_ss),
        trial("pressure::top_starts_from_existing_time_wait_sockets", snapshot_at_start),
        trial("pressure::top_shows_tcp_tw_reuse_reuses", tw_reuse_reuses),
        trial("pressure::report_of_a_recording_matches_the_live_view", report_of_recording),
        trial("pressure::top_screen_draws_and_quits_on_q", screen_quits_on_q),
    ]
}

const RANGE: (u16, u16) = (40000, 40999);
const RANGE_SIZE: f64 = (RANGE.1 - RANGE.0 + 1) as f64;

fn netns_with_range(reuse: &str, range: (u16, u16)) -> Netns {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.ip_local_port_range", &format!("{} {}", range.0, range.1));
    ns.sysctl("net.ipv4.tcp_tw_reuse", reuse);
    ns
}

/// `count` client-closes-first connections from the client role, to a fresh server.
fn connections(ns: &Netns, count: usize) -> (u16, u32) {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (mut server, port) =
        scenario::spawn_server(&ns.path(), SocketAddr::new(ip, 0), count, Closer::Client);
    let mut client =
        scenario::spawn_client(&ns.path(), SocketAddr::new(ip, port), count, Closer::Client, false);
    let pid = client.id();
    wait_ok(&mut client, "client");
    wait_ok(&mut server, "server");
    (port, pid)
}

/// TIME_WAIT sockets in the namespace, as the kernel lists them (what `ss` shows).
fn kernel_time_wait(ns: &Netns) -> usize {
    ns.time_wait_count()
}

/// `twtrace top --once --json` over `interval` seconds, started and ready.
struct Top {
    child: Child,
}

impl Top {
    fn start(ns: &Netns, interval: &str, extra: &[&str]) -> Self {
        let inode = ns.inode().to_string();
        let mut child = Command::new(TWTRACE)
            .args(["top", "--once", "--json", "--interval", interval, "--netns", &inode])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start twtrace top");
        let (mut stderr, _) = wait_for_ready(&mut child, "twtrace: watching port pressure");
        // Keep stderr drained.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Self { child }
    }

    /// Waits for the table and returns it.
    fn output(mut self) -> Value {
        wait_ok(&mut self.child, "twtrace top");
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().unwrap(), &mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

/// The one destination toward `port` in the table.
fn destination(doc: &Value, port: u16) -> &Value {
    let found: Vec<&Value> = doc["destinations"]
        .as_array()
        .expect("destinations")
        .iter()
        .filter(|d| d["dport"] == port)
        .collect();
    assert_eq!(found.len(), 1, "{doc:#}");
    found[0]
}

fn live_counts_match_ss() {
    let ns = netns_with_range("0", RANGE);
    let top = Top::start(&ns, "6", &[]);
    let n = 150;
    let (port, pid) = connections(&ns, n);
    ns.wait_for_time_wait(n);
    let doc = top.output();
    let d = destination(&doc, port);
    assert_eq!(d["time_wait"], kernel_time_wait(&ns), "{d:#}");
    assert_eq!(d["time_wait"], n, "{d:#}");
    assert_eq!(d["time_wait_entered"], n, "{d:#}");
    assert_eq!(d["live"], 0, "{d:#}");
    assert_eq!(d["range_size"], RANGE_SIZE as u64, "{d:#}");
    let headroom = d["headroom"].as_f64().unwrap();
    assert!((headroom - (RANGE_SIZE - n as f64) / RANGE_SIZE).abs() < 1e-9, "{d:#}");
    assert_eq!(d["processes"][0]["pid"], pid, "{d:#}");
    assert_eq!(d["processes"][0]["comm"], CLIENT_COMM, "{d:#}");
    assert!(d["conn_per_sec"].as_f64().unwrap() > 0.0, "{d:#}");
    assert_eq!(doc["netns"][0]["port_range"], serde_json::json!([RANGE.0, RANGE.1]));
    assert_eq!(doc["netns"][0]["tcp_tw_reuse"], 0);
}

fn snapshot_at_start() {
    let ns = netns_with_range("0", RANGE);
    let n = 40;
    let (port, _) = connections(&ns, n);
    ns.wait_for_time_wait(n);
    // twtrace starts after the sockets entered TIME_WAIT: only the snapshot knows them.
    let doc = Top::start(&ns, "1", &[]).output();
    let d = destination(&doc, port);
    assert_eq!(d["time_wait"], kernel_time_wait(&ns), "{d:#}");
    assert_eq!(d["time_wait"], n, "{d:#}");
    assert_eq!(d["time_wait_entered"], 0, "seen by the snapshot, not entered live: {d:#}");
    let headroom = d["headroom"].as_f64().unwrap();
    assert!((headroom - (RANGE_SIZE - n as f64) / RANGE_SIZE).abs() < 1e-9, "{d:#}");
}

fn tw_reuse_reuses() {
    // Ten ports: the eleventh connection must take a TIME_WAIT socket's port, which
    // tcp_tw_reuse allows once it is a second old.
    let ns = netns_with_range("1", (41000, 41009));
    let recycled = |ns: &Netns| -> u64 {
        let out = ns.exec(&["nstat", "-az", "TcpExtTWRecycled"]);
        out.lines()
            .find_map(|l| l.strip_prefix("TcpExtTWRecycled"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no TWRecycled in {out}"))
    };
    let before = recycled(&ns);
    let top = Top::start(&ns, "8", &[]);
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // A fixed port: port 0 would take one of the ten from the range.
    let (mut server, port) =
        scenario::spawn_server(&ns.path(), SocketAddr::new(ip, 7100), 15, Closer::Client);
    let addr = SocketAddr::new(ip, port);
    let mut first = scenario::spawn_client(&ns.path(), addr, 10, Closer::Client, false);
    wait_ok(&mut first, "client");
    std::thread::sleep(Duration::from_millis(1500));
    let mut second = scenario::spawn_client(&ns.path(), addr, 5, Closer::Client, false);
    wait_ok(&mut second, "client");
    wait_ok(&mut server, "server");
    // At least the second client's five connections reuse a port. On a slow machine one
    // of the first ten can too: the port search takes a TIME_WAIT port over a free one
    // when it comes to it first and the socket is already a second old.
    let reused = recycled(&ns) - before;
    assert!(reused >= 5, "the kernel reused {reused} TIME_WAIT sockets");
    ns.wait_for_time_wait(15 - reused as usize);
    let doc = top.output();
    let d = destination(&doc, port);
    assert_eq!(d["time_wait_reused"], reused, "{d:#}");
    assert_eq!(d["time_wait"], kernel_time_wait(&ns), "{d:#}");
    assert_eq!(d["time_wait_entered"], 15, "{d:#}");
}

fn report_of_recording() {
    let ns = netns_with_range("0", RANGE);
    let dir = std::env::temp_dir().join(format!("twtrace-test-{}-report", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("r.twtrace");
    let html = dir.join("r.html");
    // 20 TIME_WAIT sockets before the recording starts (its snapshot has them), 60 during.
    let (before_port, _) = connections(&ns, 20);
    ns.wait_for_time_wait(20);
    let inode = ns.inode().to_string();
    let recorder = crate::support::Tracer::start_command(
        "record",
        &["-o", file.to_str().unwrap(), "--netns", &inode],
    );
    let (port, pid) = connections(&ns, 60);
    ns.wait_for_time_wait(80);
    let out = recorder.stop();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = Command::new(TWTRACE)
        .args(["report", file.to_str().unwrap(), "--json", "--html", html.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let doc: Value = serde_json::from_slice(&report.stdout).unwrap();
    let d = destination(&doc, port);
    assert_eq!(d["time_wait"], 60, "{d:#}");
    assert_eq!(d["processes"][0]["pid"], pid, "{d:#}");
    let headroom = d["headroom"].as_f64().unwrap();
    assert!((headroom - (RANGE_SIZE - 60.0) / RANGE_SIZE).abs() < 1e-9, "{d:#}");
    assert_eq!(destination(&doc, before_port)["time_wait"], 20, "from the snapshot: {doc:#}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains(&format!(":{port}")), "{page}");
    // The text form names the destination and its outlook.
    let text = Command::new(TWTRACE).args(["report", file.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The full-screen view in a real terminal (tmux): it draws, and `q` ends it with 0.
fn screen_quits_on_q() {
    let session = format!("twtrace-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        // -u: UTF-8 without a locale (the test guests have none).
        let out = Command::new("tmux").arg("-u").args(args).output().expect("failed to run tmux");
        assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let marker = std::env::temp_dir().join(format!("{session}.exit"));
    let _ = std::fs::remove_file(&marker);
    let command = format!("{TWTRACE} top; echo $? > {}", marker.display());
    tmux(&["new-session", "-d", "-s", &session, "-x", "100", "-y", "30", &command]);
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).output();
        }
    }
    let _guard = Kill(session.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let screen = loop {
        let screen = tmux(&["capture-pane", "-p", "-t", &session]);
        if screen.contains("port pressure per destination") {
            break screen;
        }
        assert!(Instant::now() < deadline, "top never drew its screen:\n{screen}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(screen.contains("q quit"), "{screen}");
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    let code = std::fs::read_to_string(&marker).unwrap();
    let _ = std::fs::remove_file(&marker);
    assert_eq!(code.trim(), "0", "exit status of twtrace top");
}
