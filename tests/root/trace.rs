//! `twtrace trace` against ground truth made by the test: known processes open and close
//! connections in a private network namespace; the events must name them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libtest_mimic::Trial;
use serde_json::Value;

use crate::{
    scenario::{self, CLIENT_COMM, Closer, SERVER_COMM},
    support::{self, Netns, Tracer, json_lines, wait_ok, wait_output},
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("trace::client_closes_first_ipv4_time_wait_owned_by_client", || {
            time_wait_scenario(IpAddr::V4(Ipv4Addr::LOCALHOST), Closer::Client, Hooks::Classic)
        }),
        trial("trace::server_closes_first_ipv4_time_wait_owned_by_server", || {
            time_wait_scenario(IpAddr::V4(Ipv4Addr::LOCALHOST), Closer::Server, Hooks::Default)
        }),
        trial("trace::client_closes_first_ipv6_time_wait_owned_by_client", || {
            time_wait_scenario(IpAddr::V6(Ipv6Addr::LOCALHOST), Closer::Client, Hooks::Default)
        }),
        trial("trace::server_closes_first_ipv6_time_wait_owned_by_server", || {
            time_wait_scenario(IpAddr::V6(Ipv6Addr::LOCALHOST), Closer::Server, Hooks::Default)
        }),
        trial("trace::tp_btf_client_closes_first_ipv6", || {
            time_wait_scenario(IpAddr::V6(Ipv6Addr::LOCALHOST), Closer::Client, Hooks::TpBtf)
        }),
        trial("trace::tp_btf_server_closes_first_ipv6", || {
            time_wait_scenario(IpAddr::V6(Ipv6Addr::LOCALHOST), Closer::Server, Hooks::TpBtf)
        }),
        trial("trace::any_layout_hook_client_closes_first_ipv4", || {
            time_wait_scenario(IpAddr::V4(Ipv4Addr::LOCALHOST), Closer::Client, Hooks::AnyLayout)
        }),
        trial("trace::any_layout_hook_server_closes_first_ipv6", || {
            time_wait_scenario(IpAddr::V6(Ipv6Addr::LOCALHOST), Closer::Server, Hooks::AnyLayout)
        }),
        trial("trace::reset_in_fin_wait2_is_not_time_wait_tp_btf", || {
            reset_is_not_time_wait(Hooks::TpBtf)
        }),
        trial("trace::reset_in_fin_wait2_is_not_time_wait_classic", || {
            reset_is_not_time_wait(Hooks::Classic)
        }),
        trial("trace::owner_table_full_is_reported_classic", || {
            more_sockets_than_the_table(Hooks::Classic)
        }),
        trial("trace::owner_table_size_does_not_bind_tp_btf", || {
            more_sockets_than_the_table(Hooks::TpBtf)
        }),
        trial("trace::closed_sockets_are_swept_from_the_owner_table", closed_sockets_are_swept),
        trial("trace::each_socket_transitions_arrive_in_order", || {
            // Small wakeups: many reads, so many chances to split a socket's transitions.
            transitions_in_order(&["--json", "--wakeup-bytes", "1024"])
        }),
        trial("trace::unbatched_with_wakeup_bytes_0_in_order", || {
            transitions_in_order(&["--json", "--wakeup-bytes", "0"])
        }),
        trial("trace::state_filter_time_wait_shows_only_time_wait", state_filter_time_wait),
        trial("trace::human_output_names_the_owner", human_output_names_the_owner),
        trial("trace::sigterm_detaches_and_exits_zero", sigterm_exits_zero),
        trial("trace::runs_at_its_nice_value_on_every_thread", runs_at_its_nice_value),
    ]
}

const CONNECTIONS: usize = 5;

/// Which form of the state hook a test asks for (`--state-hooks`; `Default`: none asked,
/// which is the classic tracepoint; `AnyLayout`: the classic tracepoint program for
/// records laid out unlike Linux 5.6+'s, which this kernel's is not).
#[derive(Clone, Copy)]
enum Hooks {
    Default,
    TpBtf,
    Classic,
    AnyLayout,
}

impl Hooks {
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Default => &[],
            Self::TpBtf => &["--state-hooks", "tp-btf"],
            Self::Classic => &["--state-hooks", "tracepoint"],
            Self::AnyLayout => &["--state-hooks", "tracepoint-any-layout"],
        }
    }

    /// Checks that the start-up line names the form asked for.
    fn check_start_line(self, stderr: &str) {
        let tp_btf = stderr.contains("tp_btf:sock:inet_sock_set_state");
        match self {
            Self::TpBtf => assert!(tp_btf, "tp_btf not attached: {stderr}"),
            Self::Default | Self::Classic | Self::AnyLayout => assert!(
                !tp_btf && stderr.contains("sock:inet_sock_set_state"),
                "classic tracepoint not attached: {stderr}"
            ),
        }
    }
}

/// What [`run_scenario`] saw.
struct Scenario {
    stdout: Vec<u8>,
    server_pid: u32,
    client_pid: u32,
    port: u16,
    /// State-hook runs the kernel skipped and twtrace reported (see [`skipped_runs`]).
    skipped: usize,
}

/// Runs `count` connections between a server and a client process in `ns`, traced with
/// `args` and the state hook `hooks`. Events may be lost only as runs the kernel skipped
/// and twtrace reported, a few at most.
fn run_scenario(
    ns: &Netns,
    ip: IpAddr,
    closer: Closer,
    count: usize,
    hooks: Hooks,
    args: &[&str],
) -> Scenario {
    let inode = ns.inode().to_string();
    let mut all_args = vec!["--netns", inode.as_str()];
    all_args.extend_from_slice(args);
    all_args.extend_from_slice(hooks.args());
    let tracer = Tracer::start(&all_args);
    let (mut server, port) =
        scenario::spawn_server(&ns.path(), SocketAddr::new(ip, 0), count, closer);
    let mut client =
        scenario::spawn_client(&ns.path(), SocketAddr::new(ip, port), count, closer, false);
    let (server_pid, client_pid) = (server.id(), client.id());
    wait_ok(&mut client, "client");
    wait_ok(&mut server, "server");
    ns.wait_for_time_wait(count);
    let out = tracer.stop();
    assert!(out.status.success(), "twtrace failed: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let skipped = skipped_runs(&stderr);
    assert!(
        summary_lost(&stderr) == skipped && skipped <= MAX_SKIPPED_RUNS,
        "events were lost other than as a few runs the kernel skipped: {stderr}"
    );
    hooks.check_start_line(&stderr);
    Scenario { stdout: out.stdout, server_pid, client_pid, port, skipped }
}

/// How many state-hook runs a scenario tolerates the kernel skipping. It skips a run when
/// a softirq transition lands while the same program runs on that CPU; seen twice in 50
/// events once, in the 6.12 guest under TCG's slow emulation, with `tp_btf`.
const MAX_SKIPPED_RUNS: usize = 3;

/// Runs of twtrace's programs the kernel skipped, as twtrace warned of them (kernels that
/// count them: 6.7 and later).
fn skipped_runs(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains(" x program runs skipped by the kernel"))
        .filter_map(|l| {
            l.strip_prefix("twtrace: warning: ")?.split(' ').next()?.parse::<usize>().ok()
        })
        .sum()
}

fn time_wait_scenario(ip: IpAddr, closer: Closer, hooks: Hooks) {
    let ns = Netns::new();
    let Scenario { stdout, server_pid, client_pid, port, skipped } =
        run_scenario(&ns, ip, closer, CONNECTIONS, hooks, &["--json"]);
    let events = json_lines(&stdout);
    let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };

    // Nothing from other namespaces leaks through --netns.
    for e in &events {
        assert_eq!(e["netns"], ns.inode(), "event from another netns: {e}");
        assert_eq!(e["family"], family, "{e}");
    }

    let time_waits: Vec<&Value> = events.iter().filter(|e| e["kind"] == "time_wait").collect();
    let (owner_pid, owner_comm) = match closer {
        Closer::Client => (client_pid, CLIENT_COMM),
        Closer::Server => (server_pid, SERVER_COMM),
    };
    let closings: Vec<&Value> = events
        .iter()
        .filter(|e| {
            ["FIN_WAIT1", "FIN_WAIT2", "CLOSING"].contains(&e["old_state"].as_str().unwrap_or(""))
        })
        .collect();
    assert_per_connection(
        time_waits.len(),
        skipped,
        &format!("time_wait events; the closing transitions were: {closings:#?}"),
    );
    for e in &time_waits {
        assert_eq!(e["pid"], owner_pid, "wrong owner: {e}");
        assert_eq!(e["comm"], owner_comm, "{e}");
        assert_eq!(e["new_state"], "TIME_WAIT", "{e}");
        assert!(e["old_state"] == "FIN_WAIT2" || e["old_state"] == "CLOSING", "{e}");
        assert_eq!(e["daddr"], ip.to_string(), "{e}");
        match closer {
            Closer::Client => assert_eq!(e["dport"], port, "{e}"),
            Closer::Server => assert_eq!(e["sport"], port, "{e}"),
        }
        assert!(e["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')), "ts not RFC 3339: {e}");
    }

    // Ground truth from the kernel itself: as many TIME_WAIT sockets as events.
    let tw = ns.time_wait_count();
    assert_eq!(tw, CONNECTIONS, "the kernel lists:\n{}", ns.kernel_sockets().join("\n"));

    // Every connection was opened by the client in its own context...
    let connects = events
        .iter()
        .filter(|e| e["old_state"] == "CLOSE" && e["new_state"] == "SYN_SENT")
        .inspect(|e| assert_eq!(e["pid"], client_pid, "{e}"))
        .count();
    assert_per_connection(connects, skipped, "connects");
    // ...and the server's half, handled in softirq context before the server acted on
    // it, is attributed to the listener's process, never to the client that was running.
    let passive_close = if closer == Closer::Client { "CLOSE_WAIT" } else { "FIN_WAIT2" };
    let server_side: Vec<&Value> =
        events.iter().filter(|e| e["sport"] == port && e["new_state"] == passive_close).collect();
    assert_per_connection(server_side.len(), skipped, &format!("{server_side:#?}"));
    for e in server_side {
        assert_eq!(e["pid"], server_pid, "server-side transition misattributed: {e}");
    }
}

/// Checks that `seen` events came for [`CONNECTIONS`] connections: all of them, less at most
/// one per run the kernel skipped and twtrace reported (`skipped`). Kernels before 6.7 skip
/// the state hook without counting it when it fires inside another BPF program on the same
/// CPU (a softirq run on an interrupt's exit), and when that takes a connection's last
/// transitions nothing shows, not even a gap: there one more may be missing. Seen once in
/// the 6.1 guest: one connection's FIN_WAIT1 -> FIN_WAIT2 and -> TIME_WAIT missing, with
/// 5 TIME_WAIT sockets in the kernel and "0 lost".
fn assert_per_connection(seen: usize, skipped: usize, what: &str) {
    let unreported = if support::kernel_counts_skipped_runs() { 0 } else { 1 };
    let allowed = skipped + unreported;
    assert!(seen <= CONNECTIONS && seen + allowed >= CONNECTIONS, "{seen} of {CONNECTIONS} {what}");
}

/// A reset received in FIN_WAIT2 closes the socket without TIME_WAIT: the reset hook must
/// keep that CLOSE from being reported as an entry into TIME_WAIT.
fn reset_is_not_time_wait(hooks: Hooks) {
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let tracer = Tracer::start(&[&["--json", "--netns", &inode], hooks.args()].concat());
    let role = scenario::spawn_role(
        "reset",
        &ns.path(),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
        1,
    );
    let line = wait_output(role, "reset");
    let port: u64 = line
        .trim()
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {line:?}"));
    // Ground truth: the kernel holds no TIME_WAIT socket afterwards.
    assert_eq!(ns.time_wait_count(), 0, "{}", ns.kernel_sockets().join("\n"));
    let out = tracer.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    hooks.check_start_line(&stderr);
    let events = json_lines(&out.stdout);
    let client: Vec<&Value> = events.iter().filter(|e| e["sport"] == port).collect();
    let closes: Vec<&Value> =
        client.iter().copied().filter(|e| e["old_state"] == "FIN_WAIT2").collect();
    assert_eq!(closes.len(), 1, "the client's transitions: {client:#?}");
    assert_eq!(closes[0]["kind"], "state", "{}", closes[0]);
    assert_eq!(closes[0]["new_state"], "CLOSE", "{}", closes[0]);
    assert!(events.iter().all(|e| e["kind"] != "time_wait"), "{events:#?}");
}

/// 600 connections held open at once (1,200 live sockets) against the smallest owner table
/// (1,024): the classic hooks must say the table overflowed; tp_btf, with no table, must
/// not, and must attribute every TIME_WAIT to its process.
fn more_sockets_than_the_table(hooks: Hooks) {
    const HELD: usize = 600;
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let args = [
        &["--json", "--netns", &inode, "--state", "TIME_WAIT", "--max-sockets", "1024"],
        hooks.args(),
    ]
    .concat();
    let tracer = Tracer::start(&args);
    let role = scenario::spawn_role(
        "hold",
        &ns.path(),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
        HELD,
    );
    let pid = role.id();
    let line = wait_output(role, "hold");
    assert_eq!(line.trim(), format!("held {HELD}"));
    ns.wait_for_time_wait(HELD);
    let out = tracer.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    hooks.check_start_line(&stderr);
    let events = json_lines(&out.stdout);
    assert!(events.len() <= HELD, "more time_wait events than connections: {stderr}");
    let table_full = stderr.contains("socket table full");
    match hooks {
        Hooks::TpBtf => {
            assert!(!table_full, "{stderr}");
            // 1,200 sockets at once on a slow guest: the kernel may skip runs that nest
            // in a softirq on the same CPU. tp_btf runs count those, twtrace reports them:
            // nothing may be missing unreported.
            let lost = summary_lost(&stderr);
            assert!(events.len() + lost >= HELD, "{} events, {lost} lost: {stderr}", events.len());
            let attributed = events.iter().filter(|e| e["pid"] == pid).count();
            assert_eq!(attributed, events.len(), "every owner known without a table: {stderr}");
        }
        // How many owners userspace still recovers (from each socket's events in the
        // owner's own context) depends on timing, and kernels before 6.7 do not count
        // classic tracepoint runs skipped while another BPF program ran on the CPU: only
        // the report of the overflow is certain.
        _ => assert!(table_full, "the overflow must be reported: {stderr}"),
    }
}

/// The classic hooks mark a closed socket's entry instead of deleting it (the next socket
/// at that address takes it over); once the table is half full, twtrace must sweep the
/// closed entries out so that later sockets find room. Two rounds of 300 connections held
/// at once (600 sockets and a listener each) against the smallest table (1,024 entries).
fn closed_sockets_are_swept() {
    const HELD: usize = 300;
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let args =
        ["-vv", "--json", "--netns", &inode, "--state", "TIME_WAIT", "--max-sockets", "1024"];
    let tracer = Tracer::start(&args);
    let mut pids = Vec::new();
    for round in 1..=2 {
        let role = scenario::spawn_role(
            "hold",
            &ns.path(),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
            HELD,
        );
        pids.push(role.id());
        assert_eq!(wait_output(role, "hold").trim(), format!("held {HELD}"));
        ns.wait_for_time_wait(round * HELD);
        if round == 1 {
            // The sweeper looks once a second and leaves entries closed under a second.
            std::thread::sleep(std::time::Duration::from_millis(2500));
        }
    }
    let out = tracer.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("socket table full"), "{stderr}");
    let swept: u64 = stderr
        .lines()
        .filter_map(|l| {
            l.split("socket table: swept ").nth(1)?.split(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    // Most of round one's 601 entries (some may have been too recently closed at the
    // sweep, and wait for the next): without the sweep, round two would not have fit.
    assert!(swept >= HELD as u64, "swept {swept}: {stderr}");
    let events = json_lines(&out.stdout);
    // Every TIME_WAIT reported is its holder's.
    for pid in &pids {
        let owned = events.iter().filter(|e| e["pid"] == *pid).count();
        assert!(owned <= HELD, "TIME_WAIT of holder {pid}: {events:#?}");
    }
    let attributed = events.iter().filter(|e| pids.iter().any(|p| e["pid"] == *p)).count();
    assert_eq!(attributed, events.len(), "{events:#?}");
    // All of them, delivered or reported lost, where the kernel does not drop some
    // silently: 300 sockets closing at once on the slow 6.1 guest lost ~190 of 600 runs
    // of the classic tracepoint so.
    if support::kernel_counts_skipped_runs() {
        let lost = summary_lost(&stderr);
        assert!(events.len() + lost >= 2 * HELD, "{} events, {lost} lost: {stderr}", events.len());
    }
}

/// 400 connections as fast as the processes go, server and client pinned to different
/// CPUs: one socket's transitions happen on both (the server's FIN reaches the client's
/// socket in a softirq on the server's CPU), so they reach userspace through different
/// ring buffers and per-CPU batches. Every socket's transitions must still come out in
/// order, each starting where the previous ended, and all of them must come.
fn transitions_in_order(args: &[&str]) {
    const COUNT: usize = 400;
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let tracer = Tracer::start(&[&["--netns", inode.as_str()], args].concat());
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
    let (mut server, port) = scenario::spawn_server(&ns.path(), addr, COUNT, Closer::Server);
    pin_to_cpu(server.id(), 0);
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let mut client = scenario::spawn_client(&ns.path(), addr, COUNT, Closer::Server, false);
    pin_to_cpu(client.id(), 1);
    wait_ok(&mut client, "client");
    wait_ok(&mut server, "server");
    ns.wait_for_time_wait(COUNT);
    ns.wait_until_settled();
    let out = tracer.stop();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(" 0 lost"), "events were lost: {stderr}");
    let events = json_lines(&out.stdout);
    // Ten transitions per connection: the listener's own two aside (its LISTEN -> SYN_RECV
    // clones are the connections' own; on 6.1 their remote port is still 0).
    let listener_own = |e: &&Value| {
        e["new_state"] == "LISTEN" || (e["old_state"] == "LISTEN" && e["new_state"] == "CLOSE")
    };
    let connection_events: Vec<&Value> = events.iter().filter(|e| !listener_own(e)).collect();
    // Kernels before 6.7 may skip runs without counting them (see assert_per_connection):
    // there a few may be missing, and the order check allows as many breaks as twtrace
    // reported gaps. 6.12 and 6.18 check it all strictly.
    let strict = support::kernel_counts_skipped_runs();
    let allowed_missing = if strict { 0 } else { COUNT / 10 };
    let seen = connection_events.len();
    if seen > 10 * COUNT || seen + allowed_missing < 10 * COUNT {
        let mut by_transition = std::collections::BTreeMap::new();
        for e in &connection_events {
            let key = format!("{} -> {} ({})", e["old_state"], e["new_state"], e["comm"]);
            *by_transition.entry(key).or_insert(0) += 1;
        }
        panic!(
            "{} events for {COUNT} connections to port {port}: {by_transition:#?}\n{stderr}",
            connection_events.len()
        );
    }
    let breaks = chain_breaks(&events);
    let allowed_breaks = if strict { 0 } else { summary_gaps(&stderr) };
    assert!(
        breaks.len() <= allowed_breaks,
        "out of order: {:#?}\n{stderr}",
        &breaks[..breaks.len().min(5)]
    );
}

/// The gaps twtrace's exit summary reports (0 when it names none).
fn summary_gaps(stderr: &str) -> usize {
    stderr
        .lines()
        .find_map(|l| {
            l.split(" gaps (")
                .next()
                .filter(|_| l.contains(" gaps ("))?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Moves a process to one CPU (the machines this runs on have at least two).
fn pin_to_cpu(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pin {pid} to CPU {cpu}: {}", std::io::Error::last_os_error());
}

/// Where each socket's events fail to chain: a transition starts in the state the previous
/// one ended in, unless it starts a new life of the socket address (leaving CLOSE, or a
/// connection cloned from its listener).
fn chain_breaks(events: &[Value]) -> Vec<String> {
    let mut last_state: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let mut breaks = Vec::new();
    for e in events {
        let sk = e["skaddr"].as_str().expect("skaddr");
        let (old, new) = (e["old_state"].as_str().unwrap(), e["new_state"].as_str().unwrap());
        let new_life = old == "CLOSE" || (old == "LISTEN" && new == "SYN_RECV");
        if let Some(prev) = last_state.get(sk)
            && !new_life
            && *prev != old
        {
            breaks.push(format!("socket {sk} was {prev}, then {e}"));
        }
        last_state.insert(sk, new);
    }
    breaks
}

/// The events twtrace's exit summary counts as lost.
fn summary_lost(stderr: &str) -> usize {
    stderr
        .lines()
        .find(|l| l.contains(" lost,"))
        .and_then(|l| l.split(" lost,").next()?.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {stderr}"))
}

fn state_filter_time_wait() {
    let ns = Netns::new();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Scenario { stdout, client_pid, skipped, .. } = run_scenario(
        &ns,
        ip,
        Closer::Client,
        3,
        Hooks::Default,
        &["--json", "--state", "TIME_WAIT"],
    );
    let events = json_lines(&stdout);
    assert!(events.len() <= 3 && events.len() + skipped >= 3, "{skipped} skipped: {events:#?}");
    for e in &events {
        assert_eq!(e["kind"], "time_wait", "{e}");
        assert_eq!(e["pid"], client_pid, "{e}");
    }
}

fn human_output_names_the_owner() {
    let ns = Netns::new();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Scenario { stdout, client_pid, port, skipped, .. } =
        run_scenario(&ns, ip, Closer::Client, 2, Hooks::Default, &[]);
    let text = String::from_utf8(stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().expect("no header");
    assert!(header.starts_with("TIME") && header.contains("TRANSITION"), "{header}");
    let tw: Vec<&str> = lines.filter(|l| l.contains("FIN_WAIT2 -> TIME_WAIT")).collect();
    assert!(tw.len() <= 2 && tw.len() + skipped >= 2, "{skipped} skipped: {text}");
    for line in tw {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], client_pid.to_string(), "{line}");
        assert_eq!(cols[2], CLIENT_COMM, "{line}");
        assert!(line.ends_with(&format!("127.0.0.1:{port}")), "{line}");
    }
}

fn sigterm_exits_zero() {
    let tracer = Tracer::start(&["--json", "--port", "1"]);
    let out = tracer.stop_with(libc::SIGTERM);
    assert!(out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("events ("), "no summary at exit: {stderr}");
}

/// twtrace yields the CPU to the services it traces by default (nice 10), on every thread:
/// the reader and the owner-table sweeper alike.
fn runs_at_its_nice_value() {
    for (args, expected) in [(&["--port", "1"][..], 10), (&["--port", "1", "--nice", "-3"], -3)] {
        let tracer = Tracer::start(args);
        let nice = tracer.thread_nice_values();
        tracer.stop();
        assert!(nice.len() >= 2, "expected the reader and the sweeper threads: {nice:?}");
        assert!(nice.iter().all(|&n| n == expected), "{args:?}: threads at {nice:?}");
    }
}
