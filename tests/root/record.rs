//! Recordings of real traffic: replay equals the live output, and what a crash, a torn
//! tail or damage in the middle leave behind is still read, with the damage reported.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use libtest_mimic::Trial;

use crate::{
    scenario::{self, Closer},
    support::{Netns, TWTRACE, Tracer, wait_ok},
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("record::replay_prints_what_trace_printed_live", replay_equals_live),
        trial("record::sigkill_during_record_leaves_a_readable_file", sigkill_during_record),
        trial("record::damage_in_the_middle_is_skipped_and_reported", damage_in_the_middle),
        trial("record::torn_tail_is_discarded_and_reported", torn_tail),
        trial("record::foreign_and_future_files_get_one_clear_error", foreign_and_future_files),
        trial("record::rotation_keeps_the_newest_files", rotation_keeps_newest),
    ]
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("twtrace-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn twtrace(args: &[&str]) -> Output {
    Command::new(TWTRACE).args(args).output().expect("failed to run twtrace")
}

/// Client-closes-first traffic with known processes in `ns`.
fn traffic(ns: &Netns, connections: usize) {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (mut server, port) =
        scenario::spawn_server(&ns.path(), SocketAddr::new(ip, 0), connections, Closer::Client);
    let mut client = scenario::spawn_client(
        &ns.path(),
        SocketAddr::new(ip, port),
        connections,
        Closer::Client,
        false,
    );
    wait_ok(&mut client, "client");
    wait_ok(&mut server, "server");
    ns.wait_for_time_wait(connections);
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes).lines().map(str::to_owned).collect()
}

/// Records live traffic with `trace --json --write`; returns the live lines and the file.
fn record_live(ns: &Netns, dir: &Scratch, connections: usize) -> (Vec<String>, PathBuf) {
    let file = dir.path("live.twtrace");
    let inode = ns.inode().to_string();
    let tracer = Tracer::start(&["--json", "--netns", &inode, "--write", file.to_str().unwrap()]);
    traffic(ns, connections);
    let out = tracer.stop();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("recorded "), "no recording summary");
    (lines(&out.stdout), file)
}

fn replay_json(file: &Path) -> Output {
    twtrace(&["replay", file.to_str().unwrap(), "--json"])
}

fn replay_equals_live() {
    let ns = Netns::new();
    let dir = Scratch::new("roundtrip");
    let (live, file) = record_live(&ns, &dir, 5);
    assert!(live.len() >= 5 * 8, "too few live events: {}", live.len());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "recordings hold addresses and process names");

    let out = replay_json(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out.stdout), live, "replay differs from the live output");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same filters give the same subset, and human output replays too.
    let filtered = twtrace(&["replay", file.to_str().unwrap(), "--json", "--state", "TIME_WAIT"]);
    let expected: Vec<String> =
        live.iter().filter(|l| l.contains("\"kind\":\"time_wait\"")).cloned().collect();
    assert_eq!(lines(&filtered.stdout), expected);
    assert_eq!(expected.len(), 5);
    let human = twtrace(&["replay", file.to_str().unwrap()]);
    assert!(human.status.success());
    assert_eq!(
        lines(&human.stdout).iter().filter(|l| l.contains("FIN_WAIT2 -> TIME_WAIT")).count(),
        5
    );

    // Export: JSON Lines equal to the live output; CSV with a header and one row each.
    let jsonl = twtrace(&["export", file.to_str().unwrap(), "--format", "jsonl"]);
    assert_eq!(lines(&jsonl.stdout), live);
    let csv = twtrace(&["export", file.to_str().unwrap(), "--format", "csv"]);
    let csv_lines = lines(&csv.stdout);
    assert!(csv_lines[0].starts_with("kind,ts,pid,"), "{}", csv_lines[0]);
    assert_eq!(csv_lines.len(), live.len() + 1);
}

fn sigkill_during_record() {
    let ns = Netns::new();
    let dir = Scratch::new("sigkill");
    let file = dir.path("killed.twtrace");
    let inode = ns.inode().to_string();
    // A live trace alongside is the ground truth for what the recorder saw.
    let watcher = Tracer::start(&["--json", "--netns", &inode]);
    let mut recorder = Command::new(TWTRACE)
        .args(["record", "-o", file.to_str().unwrap(), "--netns", &inode])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the recorder is attached (its start line), bounded by its own exit.
    let mut stderr = std::io::BufReader::new(recorder.stderr.take().unwrap());
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap_or(0) > 0
        && !line.contains("tracing")
    {
        line.clear();
    }
    assert!(line.contains("tracing"), "recorder did not start");
    traffic(&ns, 5);
    // More than the one-second flush interval, then no chance to clean up.
    std::thread::sleep(Duration::from_millis(2500));
    recorder.kill().unwrap();
    recorder.wait().unwrap();
    let live = lines(&watcher.stop().stdout);

    let out = replay_json(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two tracers see the same transitions, each with its own clock reading and socket
    // table: compare what identifies each event.
    let identity = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                [
                    "kind",
                    "pid",
                    "comm",
                    "saddr",
                    "sport",
                    "daddr",
                    "dport",
                    "old_state",
                    "new_state",
                    "skaddr",
                ]
                .map(|k| v[k].to_string())
                .join(" ")
            })
            .collect()
    };
    let (replayed, live) = (identity(&lines(&out.stdout)), identity(&live));
    assert_eq!(replayed.len(), live.len(), "every event flushed before the kill is readable");
    // Each tracer has its own ring buffer, so transitions made at the same moment on two
    // CPUs may be committed in either order; one socket's transitions are serialised by
    // the kernel, so compare the order socket by socket (the line ends with the skaddr).
    let by_socket = |lines: &[String]| {
        let mut map = std::collections::BTreeMap::<String, Vec<String>>::new();
        for l in lines {
            let socket = l.rsplit(' ').next().unwrap().to_string();
            map.entry(socket).or_default().push(l.clone());
        }
        map
    };
    let (replayed, live) = (by_socket(&replayed), by_socket(&live));
    for (socket, transitions) in &live {
        assert_eq!(replayed.get(socket), Some(transitions), "socket {socket} differs");
    }
    assert_eq!(replayed.len(), live.len(), "the recording has sockets the live trace lacks");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no end marker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn damage_in_the_middle() {
    let ns = Netns::new();
    let dir = Scratch::new("damage");
    let (live, file) = record_live(&ns, &dir, 10);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 16].fill(0xEE);
    let damaged = dir.path("damaged.twtrace");
    std::fs::write(&damaged, &bytes).unwrap();

    let out = replay_json(&damaged);
    assert!(out.status.success(), "damage is not fatal: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("skipped damaged bytes") && stderr.contains("at offset"), "{stderr}");
    let replayed = lines(&out.stdout);
    assert!(
        !replayed.is_empty() && replayed.len() < live.len(),
        "{} of {}",
        replayed.len(),
        live.len()
    );
    for l in &replayed {
        assert!(live.contains(l), "replay invented an event: {l}");
    }
}

fn torn_tail() {
    let ns = Netns::new();
    let dir = Scratch::new("torn");
    let (live, file) = record_live(&ns, &dir, 5);
    let bytes = std::fs::read(&file).unwrap();
    let torn = dir.path("torn.twtrace");
    // Cut inside a frame: a cut can land on a frame boundary, so move on a byte at a time
    // (frames are under 100 bytes) until the reader reports a torn frame.
    let start = bytes.len() * 2 / 3;
    for cut in start..start + 100 {
        std::fs::write(&torn, &bytes[..cut]).unwrap();
        let out = replay_json(&torn);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("incomplete frame at the end") {
            continue;
        }
        assert!(stderr.contains("bytes at offset") && stderr.contains("no end marker"), "{stderr}");
        let replayed = lines(&out.stdout);
        assert!(!replayed.is_empty());
        assert_eq!(replayed[..], live[..replayed.len()], "a torn file replays a prefix");
        return;
    }
    panic!("no cut from byte {start} on was reported as a torn frame");
}

fn foreign_and_future_files() {
    let dir = Scratch::new("foreign");
    let one_line_error = |path: &Path, expect: &str| {
        let out = replay_json(path);
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(stderr.lines().count(), 1, "one clear error line: {stderr}");
        assert!(stderr.contains(expect) && stderr.contains(path.to_str().unwrap()), "{stderr}");
    };
    let text = dir.path("notes.txt");
    std::fs::write(&text, "not a recording\n").unwrap();
    one_line_error(&text, "not a twtrace recording");
    let empty = dir.path("empty.twtrace");
    std::fs::write(&empty, "").unwrap();
    one_line_error(&empty, "empty");
    one_line_error(&dir.path("missing.twtrace"), "failed to open");

    let ns = Netns::new();
    let (_, file) = record_live(&ns, &dir, 1);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8] = 2; // format major version 2
    let future = dir.path("future.twtrace");
    std::fs::write(&future, &bytes).unwrap();
    one_line_error(&future, "newer twtrace");
    let truncated = dir.path("truncated.twtrace");
    std::fs::write(&truncated, &bytes[..10]).unwrap();
    one_line_error(&truncated, "truncated");
}

fn rotation_keeps_newest() {
    let ns = Netns::new();
    let dir = Scratch::new("rotate");
    let base = dir.path("cap.twtrace");
    let inode = ns.inode().to_string();
    let mut recorder = Command::new(TWTRACE)
        .args([
            "record",
            "-o",
            base.to_str().unwrap(),
            "--netns",
            &inode,
            "--rotate",
            "1s",
            "--keep",
            "2",
        ])
        .args(["--duration", "4s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    traffic(&ns, 3);
    wait_ok(&mut recorder, "twtrace record");
    let mut files: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "only the newest 2 are kept: {files:?}");
    assert!(files.iter().all(|f| f.starts_with("cap.") && f.ends_with(".twtrace")), "{files:?}");
    for f in &files {
        let out = replay_json(&dir.path(f));
        assert!(out.status.success());
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("no end marker"),
            "rotated files end cleanly: {f}"
        );
    }
}
