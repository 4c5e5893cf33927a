//! Container awareness: events carry the owner's cgroup id, `trace --json` names the
//! container it belongs to, and `--container` / `--cgroup` select its processes only.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
};

use libtest_mimic::Trial;

use crate::{
    scenario::{self, CLIENT_COMM, Closer},
    support::{Netns, Tracer, json_lines, wait_ok},
    trial,
};

pub fn trials() -> Vec<Trial> {
    vec![trial("container::docker_scope_is_named_and_filtered", docker_scope)]
}

/// The cgroup2 mount (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("no cgroup2 mount on this machine")
}

/// A cgroup laid out as Docker's systemd driver does, removed on drop.
struct Scope {
    slice: PathBuf,
    scope: PathBuf,
}

impl Scope {
    fn new(id: &str) -> Self {
        let slice = cgroup2_mount().join(format!("twtrace-test-{}.slice", std::process::id()));
        let scope = slice.join(format!("docker-{id}.scope"));
        std::fs::create_dir_all(&scope).unwrap();
        Self { slice, scope }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.scope);
        let _ = std::fs::remove_dir(&self.slice);
    }
}

fn docker_scope() {
    let id = format!("{:064x}", 0x7e57_c0de_u64 + u64::from(std::process::id()));
    let scope = Scope::new(&id);
    let cgroup_id = std::fs::metadata(&scope.scope).unwrap().ino();
    let ns = Netns::new();
    let inode = ns.inode().to_string();
    let by_container = Tracer::start(&["--json", "--netns", &inode, "--container", &id[..12]]);
    let slice_path = format!("/{}", scope.slice.file_name().unwrap().to_str().unwrap());
    let by_cgroup = Tracer::start(&["--json", "--netns", &inode, "--cgroup", &slice_path]);
    let everything = Tracer::start(&["--json", "--netns", &inode]);

    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (mut server, port) =
        scenario::spawn_server(&ns.path(), SocketAddr::new(ip, 0), 3, Closer::Client);
    let mut client =
        scenario::spawn_client_in_cgroup(&ns.path(), SocketAddr::new(ip, port), 3, &scope.scope);
    let client_pid = client.id();
    wait_ok(&mut client, "client");
    wait_ok(&mut server, "server");
    ns.wait_for_time_wait(3);

    let all = json_lines(&everything.stop().stdout);
    let mine: Vec<_> = all.iter().filter(|e| e["pid"] == client_pid).collect();
    assert!(mine.len() >= 3 * 3, "connect, established, time_wait per connection: {all:#?}");
    assert!(all.iter().any(|e| e["pid"] != client_pid), "the server's events are there too");
    for e in &mine {
        assert_eq!(e["cgroup"], cgroup_id, "{e}");
        assert_eq!(e["container"], id.as_str(), "{e}");
        assert_eq!(e["runtime"], "docker", "{e}");
        assert_eq!(e["comm"], CLIENT_COMM, "{e}");
    }
    for tracer in [by_container, by_cgroup] {
        let shown = json_lines(&tracer.stop().stdout);
        assert_eq!(shown.len(), mine.len(), "only the container's events: {shown:#?}");
        assert!(shown.iter().all(|e| e["pid"] == client_pid), "{shown:#?}");
    }
    assert_eq!(
        all.iter().filter(|e| e["kind"] == "time_wait" && e["pid"] == client_pid).count(),
        3
    );
    drop(scope);
}
