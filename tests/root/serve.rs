//! `twtrace serve` as a fleet would run it: a real Prometheus server scrapes it while a
//! scenario exhausts a destination's ports, and its API must show the kernel's truth.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use libtest_mimic::Trial;
use serde_json::Value;

use crate::{
    scenario::{self, Closer},
    support::{Netns, TWTRACE, wait_for_ready, wait_ok, wait_output},
};

pub fn trials() -> Vec<Trial> {
    let have = |program: &str| {
        Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
    };
    let prometheus = have("prometheus") && have("promtool");
    vec![
        Trial::test("serve::prometheus_scrapes_time_wait_and_eaddrnotavail", || {
            scraped_by_prometheus();
            Ok(())
        })
        .with_ignored_flag(!prometheus),
        Trial::test("serve::sighup_reloads_filters_and_sigterm_exits_zero", || {
            sighup_and_sigterm();
            Ok(())
        }),
    ]
}

/// A child process killed on drop (bounded tests must not leave daemons behind).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `twtrace serve ARGS` and waits for its readiness line.
fn start_serve(metrics_port: u16, args: &[&str]) -> (Daemon, std::thread::JoinHandle<String>) {
    let mut child = Command::new(TWTRACE)
        .args(["serve", "--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start twtrace serve");
    let (mut stderr, seen) = wait_for_ready(&mut child, "twtrace: serving metrics");
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        seen + &rest
    });
    (Daemon(child), rest)
}

/// A plain HTTP/1.0 GET on loopback; returns (status line, body).
fn try_http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

fn http_get(port: u16, path: &str) -> (String, String) {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The single value of a Prometheus instant query, if it has one result.
fn query(prom_port: u16, promql: &str) -> Option<f64> {
    let (status, body) =
        http_get(prom_port, &format!("/api/v1/query?query={}", percent_encode(promql)));
    if !status.contains("200") {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

fn scraped_by_prometheus() {
    // Ten ports toward the destination, no reuse: the eleventh connect fails.
    let ns = Netns::new();
    ns.sysctl("net.ipv4.ip_local_port_range", "42000 42009");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let inode = ns.inode().to_string();
    let metrics_port = free_port();
    let (serve, serve_log) = start_serve(metrics_port, &["--netns", &inode]);

    let dir = std::env::temp_dir().join(format!("twtrace-test-{}-prometheus", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: twtrace\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let prometheus = Daemon(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start prometheus"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !try_http_get(prom_port, "/-/ready").is_ok_and(|(status, _)| status.contains("200")) {
        assert!(Instant::now() < deadline, "prometheus did not become ready in 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (mut server, port) =
        scenario::spawn_server_until_idle(&ns.path(), SocketAddr::new(ip, 7200), Closer::Client);
    let client =
        scenario::spawn_client(&ns.path(), SocketAddr::new(ip, port), 15, Closer::Client, true);
    let summary = wait_output(client, "client");
    wait_ok(&mut server, "server");
    assert!(summary.starts_with("connected 10 failed 5 errno 99"), "{summary}");
    ns.wait_for_time_wait(10);
    let in_kernel = ns.time_wait_count();

    let time_wait = format!("twtrace_time_wait_sockets{{dport=\"{port}\"}}");
    let failures = format!(
        "twtrace_connect_failures_total{{dport=\"{port}\",errno=\"EADDRNOTAVAIL\",netns=\"{inode}\"}}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (tw, failed) = loop {
        let seen = (query(prom_port, &time_wait), query(prom_port, &failures));
        if seen == (Some(in_kernel as f64), Some(5.0)) || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(tw, Some(10.0), "TIME_WAIT toward the destination as Prometheus has it");
    assert_eq!(tw, Some(in_kernel as f64), "and as the kernel has it");
    assert_eq!(failed, Some(5.0), "EADDRNOTAVAIL failures as Prometheus has it");
    let headroom = query(prom_port, &format!("twtrace_port_headroom_ratio{{dport=\"{port}\"}}"));
    assert_eq!(headroom, Some(0.0), "all ten ports held");

    // The exposition itself passes Prometheus's own linter.
    let (status, body) = http_get(metrics_port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(http_get(metrics_port, "/nothing").0.contains("404"));
    // Every metric the deployment files (dashboard, README) rely on is exported.
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/check.sh"))
            .expect("deploy/check.sh");
    let names = documented
        .split("METRICS=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the METRICS list in deploy/check.sh");
    for name in names.split_whitespace() {
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} is not exported:\n{body}");
    }

    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    stop_ok(serve, serve_log);
}

/// SIGTERM: flush and exit 0.
fn stop_ok(mut serve: Daemon, log: std::thread::JoinHandle<String>) -> String {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "twtrace serve did not exit within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log.join().unwrap();
    assert!(status.success(), "twtrace serve exited with {status}: {log}");
    log
}

fn sighup_and_sigterm() {
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let dir = std::env::temp_dir().join(format!("twtrace-test-{}-sighup", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let filters = dir.join("filters");
    // First only port 7301 counts, then (after SIGHUP) port 7302 too.
    std::fs::write(&filters, "# test\n--port 7301\n").unwrap();
    let metrics_port = free_port();
    let (serve, log) =
        start_serve(metrics_port, &["--netns", &inode, "--filters", filters.to_str().unwrap()]);
    // Events kept, all kinds: only the filter decides which scenario's events count.
    let events = || -> f64 {
        let (_, body) = http_get(metrics_port, "/metrics");
        body.lines()
            .filter(|l| l.starts_with("twtrace_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let run = |port: u16| {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (mut server, port) =
            scenario::spawn_server(&ns.path(), SocketAddr::new(ip, port), 3, Closer::Client);
        let mut client =
            scenario::spawn_client(&ns.path(), SocketAddr::new(ip, port), 3, Closer::Client, false);
        wait_ok(&mut client, "client");
        wait_ok(&mut server, "server");
        ns.wait_for_time_wait(3);
        // Published once a second.
        std::thread::sleep(Duration::from_millis(2500));
    };
    run(7302);
    assert_eq!(events(), 0.0, "port 7302 is filtered out");
    run(7301);
    let after_7301 = events();
    assert!(after_7301 > 0.0, "port 7301 passes the filter");
    std::fs::write(&filters, "--port 7301,7302\n").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    run(7302);
    assert!(events() > after_7301, "after SIGHUP, port 7302 passes too");
    let log = stop_ok(serve, log);
    assert!(log.contains("SIGHUP: filters reloaded"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
