//! Container and workload attribution: turns the cgroup v2 id an event carries into the
//! cgroup path, container id, runtime, Kubernetes pod UID or systemd unit users recognise,
//! and matches events against `--cgroup` / `--container` style filters.
//!
//! The id `bpf_get_current_cgroup_id()` returns is the inode number of the cgroup's
//! directory under the cgroup2 mount, so [`CgroupResolver`] walks that mount (reading only
//! directory entries, which carry the inode number) and keeps an id -> [`Workload`] map.
//! Paths are parsed by [`parse_cgroup_path`], which knows the layouts of docker, containerd,
//! cri-o, podman, nerdctl, LXC, systemd-nspawn, Kubernetes (systemd and cgroupfs drivers)
//! and plain systemd.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// What a cgroup path says about the workload in it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// The cgroup path relative to the cgroup2 root, e.g. "/system.slice/nginx.service".
    pub cgroup: String,
    /// Container id (full, 64 hex chars usually) when the path names one. LXC and
    /// systemd-nspawn containers have names instead. `None` for the cri-o and podman
    /// `conmon` monitor scopes: the monitor is not the container (its `runtime` is set).
    pub container_id: Option<String>,
    /// "docker", "containerd", "cri-o", "podman", "lxc", "systemd-nspawn" when recognised.
    /// `None` for a bare container id whose runtime the path does not tell (the cgroupfs
    /// driver of Kubernetes is used by containerd and cri-dockerd alike).
    pub runtime: Option<&'static str>,
    /// Kubernetes pod UID when the path names one (kubepods…pod<uid>…), with the systemd
    /// driver's '_' turned back into '-'.
    pub pod_uid: Option<String>,
    /// systemd unit (e.g. "nginx.service") when the path is under a systemd slice and no
    /// container: the deepest service, scope, socket, mount or swap in the path.
    pub unit: Option<String>,
}

impl Workload {
    /// A workload that says nothing but its cgroup path.
    fn bare(cgroup: String) -> Self {
        Self { cgroup, container_id: None, runtime: None, pod_uid: None, unit: None }
    }
}

/// Parses a cgroup path (as in /proc/<pid>/cgroup, relative to the cgroup2 root).
///
/// The deepest component naming a container wins, so nested layouts (kind's
/// `/docker/<node>/kubepods/…/<id>`, systemd running inside a container) name the
/// innermost container.
pub fn parse_cgroup_path(path: &str) -> Workload {
    let mut w = Workload::bare(normalize_path(path));
    let parts: Vec<&str> = w.cgroup.split('/').filter(|p| !p.is_empty()).collect();

    let container = parts.iter().enumerate().rev().find_map(|(i, part)| {
        let parent = i.checked_sub(1).map(|p| parts[p]);
        container_of(part, parent)
    });
    if parts.iter().any(|p| p.contains("kubepods")) {
        w.pod_uid = parts.iter().rev().find_map(|p| pod_uid_of(p));
    }
    match container {
        Some((runtime, id)) => {
            w.runtime = runtime;
            w.container_id = id;
        }
        None => w.unit = unit_of(&parts),
    }
    w
}

/// "/" for the root; otherwise a leading '/', no trailing '/' and no empty components.
fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 1);
    for part in path.split('/').filter(|p| !p.is_empty()) {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether `s` looks like a full container id: 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Container scope prefixes: (prefix, runtime, whether the scope is the container itself
/// rather than its `conmon` monitor).
const SCOPE_PREFIXES: &[(&str, &str, bool)] = &[
    ("docker-", "docker", true),
    ("cri-containerd-", "containerd", true),
    ("crio-conmon-", "cri-o", false),
    ("crio-", "cri-o", true),
    ("libpod-conmon-", "podman", false),
    ("libpod-", "podman", true),
    ("nerdctl-", "containerd", true),
];

/// The runtime and container id one path component names, if it names a container.
fn container_of(
    part: &str,
    parent: Option<&str>,
) -> Option<(Option<&'static str>, Option<String>)> {
    // systemd driver: "<prefix><id>.scope"; cgroupfs drivers of cri-o and podman drop ".scope".
    let name = part.strip_suffix(".scope").unwrap_or(part);
    for &(prefix, runtime, is_container) in SCOPE_PREFIXES {
        if let Some(id) = name.strip_prefix(prefix).filter(|id| is_container_id(id)) {
            return Some((Some(runtime), is_container.then(|| id.to_owned())));
        }
    }
    if is_container_id(part) {
        // cgroupfs drivers: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>, /ecs/<task>/<id>, ...
        let runtime = matches!(parent, Some("docker" | "moby")).then_some("docker");
        return Some((runtime, Some(part.to_owned())));
    }
    if let Some(name) = part.strip_prefix("lxc.payload.") {
        return Some((Some("lxc"), Some(name.to_owned())));
    }
    if part.starts_with("lxc.monitor.") {
        return Some((Some("lxc"), None));
    }
    if parent == Some("lxc") {
        return Some((Some("lxc"), Some(part.to_owned())));
    }
    if let Some(name) =
        part.strip_prefix("systemd-nspawn@").and_then(|n| n.strip_suffix(".service"))
    {
        return Some((Some("systemd-nspawn"), Some(name.to_owned())));
    }
    None
}

/// The pod UID one component of a kubepods path names: "pod<uid>" (cgroupfs driver) or
/// "kubepods[-<qos>]-pod<uid_with_underscores>.slice" (systemd driver).
fn pod_uid_of(part: &str) -> Option<String> {
    let raw = match part.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => part.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-");
    // UUIDs from the API server; static pods use a 32 hex digit hash.
    let valid = uid.len() >= 32
        && uid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' | b'-'));
    valid.then_some(uid)
}

const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".socket", ".mount", ".swap"];

/// The deepest systemd unit in a path that systemd manages (its top component is a slice or
/// a unit of the root slice, like "/init.scope").
fn unit_of(parts: &[&str]) -> Option<String> {
    let is_unit = |p: &str| UNIT_SUFFIXES.iter().any(|s| p.len() > s.len() && p.ends_with(s));
    let top = parts.first()?;
    if !(top.ends_with(".slice") || is_unit(top)) {
        return None;
    }
    parts.iter().rev().find(|p| is_unit(p)).map(|p| (*p).to_owned())
}

/// A `--container` value that cannot match anything sensibly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("container id prefix {0:?} is too short: give at least 4 characters")]
    ContainerTooShort(String),
    #[error("container id {0:?} contains '/': give a container id, name or pod UID")]
    ContainerWithSlash(String),
    #[error("empty cgroup path")]
    EmptyCgroup,
}

/// Which workloads the user asked to see. Each given list must match; an empty list matches
/// everything. Build it with [`WorkloadFilter::new`], which normalises the entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadFilter {
    /// cgroup path prefixes, matched on whole components ("/system.slice" matches
    /// "/system.slice/nginx.service", not "/system.slice2").
    cgroups: Vec<String>,
    /// Lowercase prefixes of container ids (or names) or of pod UIDs, '_' read as '-'.
    containers: Vec<String>,
}

/// Mount points users paste in front of cgroup paths; stripped from `--cgroup` values.
const WELL_KNOWN_MOUNTS: &[&str] = &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

impl WorkloadFilter {
    /// `cgroups`: cgroup paths (as in /proc/<pid>/cgroup; a leading "/sys/fs/cgroup" is
    /// dropped). `containers`: container id prefixes (at least 4 characters), LXC or nspawn
    /// names, or pod UIDs (with '-' or '_'), case-insensitive.
    pub fn new<C, K>(cgroups: C, containers: K) -> Result<Self, FilterError>
    where
        C: IntoIterator,
        C::Item: AsRef<str>,
        K: IntoIterator,
        K::Item: AsRef<str>,
    {
        let cgroups = cgroups
            .into_iter()
            .map(|c| {
                let c = c.as_ref().trim();
                if c.is_empty() {
                    return Err(FilterError::EmptyCgroup);
                }
                let c = WELL_KNOWN_MOUNTS
                    .iter()
                    .find_map(|m| {
                        c.strip_prefix(m).filter(|rest| rest.is_empty() || rest.starts_with('/'))
                    })
                    .unwrap_or(c);
                Ok(normalize_path(c))
            })
            .collect::<Result<_, _>>()?;
        let containers = containers
            .into_iter()
            .map(|c| {
                let c = c.as_ref().trim();
                if c.contains('/') {
                    Err(FilterError::ContainerWithSlash(c.to_owned()))
                } else if c.chars().count() < 4 {
                    Err(FilterError::ContainerTooShort(c.to_owned()))
                } else {
                    Ok(c.to_ascii_lowercase().replace('_', "-"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { cgroups, containers })
    }

    /// This filter with `other`'s entries added.
    pub fn merged_with(mut self, other: WorkloadFilter) -> Self {
        self.cgroups.extend(other.cgroups);
        self.containers.extend(other.containers);
        self
    }

    /// True when the filter lets everything through (no lookups needed).
    pub fn is_empty(&self) -> bool {
        self.cgroups.is_empty() && self.containers.is_empty()
    }

    /// Whether a resolved workload passes the filter.
    pub fn matches_workload(&self, w: &Workload) -> bool {
        let cgroup_ok =
            self.cgroups.is_empty() || self.cgroups.iter().any(|p| path_under(&w.cgroup, p));
        cgroup_ok
            && (self.containers.is_empty()
                || self.containers.iter().any(|c| {
                    w.container_id.as_deref().is_some_and(|id| starts_with_ignore_case(id, c))
                        || w.pod_uid.as_deref().is_some_and(|uid| starts_with_ignore_case(uid, c))
                }))
    }
}

/// `path` is `prefix` or below it (both normalised).
fn path_under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `s` starts with `lower_prefix` (already lowercase), ignoring ASCII case in `s`.
fn starts_with_ignore_case(s: &str, lower_prefix: &str) -> bool {
    s.len() >= lower_prefix.len()
        && s.as_bytes()[..lower_prefix.len()].eq_ignore_ascii_case(lower_prefix.as_bytes())
}

/// Never rescan more often than this.
const MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// ... nor spend more than 1/this of the time scanning (a busy host has thousands of cgroups).
const RESCAN_COST_FACTOR: u32 = 20;
/// A scan stops after this many cgroups.
const MAX_SCAN_CGROUPS: usize = 200_000;
/// Cgroups removed since they were seen stay resolvable (events can arrive late), up to
/// this many; the oldest (lowest ids) go first.
const MAX_VANISHED: usize = 4096;

#[derive(Debug)]
enum Mount {
    /// /proc/self/mountinfo not read yet.
    Unprobed,
    /// No cgroup2 mount (looked again at each rescan).
    Missing,
    /// Directory of the cgroup2 mount, and the cgroup path of that directory.
    At { dir: PathBuf, root: String },
}

#[derive(Debug)]
struct Entry {
    workload: Arc<Workload>,
    /// Scan generation that last saw the cgroup.
    seen: u64,
}

/// Resolves cgroup ids to workloads: walks the cgroup2 mount (found from
/// /proc/self/mountinfo) mapping directory inode -> path, and caches. A miss rescans, at most
/// once per second (less often when scans are slow); ids still unknown stay unknown until the
/// next rescan. Does no I/O until the first lookup, and returns `None` without a cgroup2 mount.
#[derive(Debug)]
pub struct CgroupResolver {
    mount: Mount,
    entries: HashMap<u64, Entry>,
    generation: u64,
    next_scan: Option<Instant>,
    min_interval: Duration,
}

impl Default for CgroupResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl CgroupResolver {
    pub fn new() -> Self {
        Self::with_mount(Mount::Unprobed)
    }

    /// A resolver reading the cgroup2 hierarchy mounted at `dir`, whose own cgroup path is
    /// "/" (tests point it at any directory tree).
    pub fn with_mount_dir(dir: impl Into<PathBuf>) -> Self {
        Self::with_mount(Mount::At { dir: dir.into(), root: "/".to_owned() })
    }

    fn with_mount(mount: Mount) -> Self {
        Self {
            mount,
            entries: HashMap::new(),
            generation: 0,
            next_scan: None,
            min_interval: MIN_RESCAN_INTERVAL,
        }
    }

    /// The workload of a cgroup id; `None` for 0 (unknown), for ids of cgroups not found and
    /// without a cgroup2 mount.
    pub fn resolve(&mut self, cgroup_id: u64) -> Option<Arc<Workload>> {
        if cgroup_id == 0 {
            return None;
        }
        if let Some(e) = self.entries.get(&cgroup_id) {
            return Some(Arc::clone(&e.workload));
        }
        let now = Instant::now();
        if self.next_scan.is_some_and(|next| now < next) {
            return None;
        }
        self.rescan(now);
        self.entries.get(&cgroup_id).map(|e| Arc::clone(&e.workload))
    }

    /// Whether the event of a task in cgroup `cgroup_id` passes `filter`. Free for an empty
    /// filter; otherwise a cached lookup plus a few prefix comparisons. Unresolvable ids
    /// match only the empty filter.
    pub fn matches(&mut self, cgroup_id: u64, filter: &WorkloadFilter) -> bool {
        filter.is_empty() || self.resolve(cgroup_id).is_some_and(|w| filter.matches_workload(&w))
    }

    /// The directory of the cgroup2 mount in use, once a lookup has found it.
    pub fn mount_dir(&self) -> Option<&Path> {
        match &self.mount {
            Mount::At { dir, .. } => Some(dir),
            _ => None,
        }
    }

    fn rescan(&mut self, now: Instant) {
        if !matches!(self.mount, Mount::At { .. }) {
            self.mount = match find_cgroup2_mount() {
                Some((dir, root)) => Mount::At { dir, root },
                None => Mount::Missing,
            };
        }
        let Mount::At { dir, root } = &self.mount else {
            self.next_scan = Some(now + self.min_interval);
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let entries = &mut self.entries;
        let scanned = walk(dir, |ino, rel| {
            let path = join_root(root, rel);
            match entries.get_mut(&ino) {
                Some(e) if e.workload.cgroup == path => e.seen = generation,
                _ => {
                    let workload = Arc::new(parse_cgroup_path(&path));
                    entries.insert(ino, Entry { workload, seen: generation });
                }
            }
        });
        if let Err(e) = scanned {
            log::debug!("cgroup scan of {} incomplete: {e}", dir.display());
        }
        self.forget_vanished();
        let cost = now.elapsed();
        self.next_scan = Some(Instant::now() + self.min_interval.max(cost * RESCAN_COST_FACTOR));
    }

    /// Keeps at most [`MAX_VANISHED`] cgroups the last scan did not see, the newest ones.
    fn forget_vanished(&mut self) {
        let generation = self.generation;
        let mut vanished: Vec<u64> =
            self.entries.iter().filter(|(_, e)| e.seen != generation).map(|(&id, _)| id).collect();
        if vanished.len() > MAX_VANISHED {
            let excess = vanished.len() - MAX_VANISHED;
            vanished.select_nth_unstable(excess - 1);
            for id in &vanished[..excess] {
                self.entries.remove(id);
            }
        }
    }
}

/// Cgroup path of `rel` (relative to the mount, "/" for the mount itself) given the cgroup
/// path of the mount's root.
fn join_root(root: &str, rel: &str) -> String {
    match (root, rel) {
        ("/", _) => rel.to_owned(),
        (_, "/") => root.to_owned(),
        _ => format!("{root}{rel}"),
    }
}

/// Calls `found(inode, path relative to dir)` for `dir` ("/") and every directory below it,
/// reading directory entries only (their inode numbers are the cgroup ids). Stops after
/// [`MAX_SCAN_CGROUPS`]. Directories that vanish during the walk are skipped.
fn walk(dir: &Path, mut found: impl FnMut(u64, &str)) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;

    found(fs::metadata(dir)?.ino(), "/");
    let mut count = 1;
    let mut stack: Vec<(PathBuf, String)> = vec![(dir.to_owned(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&abs) else { continue };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if count >= MAX_SCAN_CGROUPS {
                return Err(std::io::Error::other(format!("more than {MAX_SCAN_CGROUPS} cgroups")));
            }
            count += 1;
            let name = entry.file_name();
            let child = format!("{rel}/{}", name.to_string_lossy());
            found(entry.ino(), &child);
            stack.push((entry.path(), child));
        }
    }
    Ok(())
}

/// The cgroup2 mount from /proc/self/mountinfo: its directory and the cgroup path of its
/// root (not "/" for a bind mount of a subtree), preferring a mount of the whole hierarchy.
fn find_cgroup2_mount() -> Option<(PathBuf, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&info)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    let mounts: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|line| {
            // id parent maj:min root mount-point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut fields = left.split_whitespace();
            let root = unescape_mountinfo(fields.nth(3)?);
            let dir = unescape_mountinfo(fields.next()?);
            Some((root, dir))
        })
        .collect();
    let (root, dir) = mounts.iter().find(|(root, _)| root == "/").or_else(|| mounts.first())?;
    // A root outside our cgroup namespace shows as "/.."; paths are then only relative.
    let root = if root.starts_with('/') && !root.split('/').any(|p| p == "..") {
        normalize_path(root)
    } else {
        "/".to_owned()
    };
    Some((PathBuf::from(dir), root))
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    const ID: &str = "3f2a1c9e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f";
    const ID2: &str = "9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c";
    const UID: &str = "0b6c2a3e-7f1d-4c8a-9e5b-2d4f6a8c0e1b";
    const UID_: &str = "0b6c2a3e_7f1d_4c8a_9e5b_2d4f6a8c0e1b";

    fn container(
        path: &str,
        runtime: Option<&'static str>,
        id: &str,
        pod: Option<&str>,
    ) -> Workload {
        Workload {
            cgroup: path.to_owned(),
            container_id: Some(id.to_owned()),
            runtime,
            pod_uid: pod.map(str::to_owned),
            unit: None,
        }
    }

    fn unit(path: &str, unit: &str) -> Workload {
        Workload { unit: Some(unit.to_owned()), ..Workload::bare(path.to_owned()) }
    }

    fn check(path: &str, expected: Workload) {
        assert_eq!(parse_cgroup_path(path), expected, "{path}");
    }

    #[test]
    fn docker_cgroupfs_driver() {
        let p = format!("/docker/{ID}");
        check(&p, container(&p, Some("docker"), ID, None));
        // dockerd in rootless / dind setups names its parent "moby".
        let p = format!("/moby/{ID}");
        check(&p, container(&p, Some("docker"), ID, None));
    }

    #[test]
    fn docker_systemd_driver() {
        let p = format!("/system.slice/docker-{ID}.scope");
        check(&p, container(&p, Some("docker"), ID, None));
    }

    #[test]
    fn systemd_inside_a_container_names_the_container() {
        let p = format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service");
        check(&p, container(&p, Some("docker"), ID, None));
        let p = format!("/machine.slice/libpod-{ID}.scope/container");
        check(&p, container(&p, Some("podman"), ID, None));
    }

    #[test]
    fn kubernetes_systemd_driver_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        check(&p, container(&p, Some("containerd"), ID, Some(UID)));
        // Guaranteed QoS pods sit right under kubepods.slice.
        let p = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        check(&p, container(&p, Some("containerd"), ID, Some(UID)));
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        check(&p, container(&p, None, ID, Some(UID)));
        let p = format!("/kubepods/pod{UID}/{ID}");
        check(&p, container(&p, None, ID, Some(UID)));
        // cri-o with the cgroupfs driver.
        let p = format!("/kubepods/besteffort/pod{UID}/crio-{ID}");
        check(&p, container(&p, Some("cri-o"), ID, Some(UID)));
    }

    #[test]
    fn kubernetes_static_pod_uid_is_a_hash() {
        let hash = "5c7ba1a8ee1b7f4d7a7f5bd0ff1cf2f0";
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope"
        );
        check(&p, container(&p, Some("containerd"), ID, Some(hash)));
    }

    #[test]
    fn kind_node_in_docker_names_the_pod_container() {
        let p = format!(
            "/docker/{ID2}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        check(&p, container(&p, Some("containerd"), ID, Some(UID)));
        // The node's own services belong to the node container.
        let p = format!("/docker/{ID2}/system.slice/containerd.service");
        check(&p, container(&p, Some("docker"), ID2, None));
    }

    #[test]
    fn pod_level_cgroup_has_a_pod_but_no_container() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        );
        check(&p, Workload { pod_uid: Some(UID.to_owned()), ..Workload::bare(p.clone()) });
    }

    #[test]
    fn crio_systemd_driver_and_conmon() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
        );
        check(&p, container(&p, Some("cri-o"), ID, Some(UID)));
        // conmon monitors the container from outside it: cri-o's, but not the container.
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
        );
        check(
            &p,
            Workload {
                runtime: Some("cri-o"),
                pod_uid: Some(UID.to_owned()),
                ..Workload::bare(p.clone())
            },
        );
    }

    #[test]
    fn podman_root_rootless_and_conmon() {
        let p = format!("/machine.slice/libpod-{ID}.scope");
        check(&p, container(&p, Some("podman"), ID, None));
        let p = format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        );
        check(&p, container(&p, Some("podman"), ID, None));
        let p = format!("/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope");
        check(&p, container(&p, Some("podman"), ID, None));
        let p = format!("/machine.slice/libpod-conmon-{ID}.scope");
        check(&p, Workload { runtime: Some("podman"), ..Workload::bare(p.clone()) });
        // cgroupfs manager.
        let p = format!("/libpod_parent/libpod-{ID}");
        check(&p, container(&p, Some("podman"), ID, None));
    }

    #[test]
    fn nerdctl_lxc_and_nspawn() {
        let p = format!("/system.slice/nerdctl-{ID}.scope");
        check(&p, container(&p, Some("containerd"), ID, None));
        check("/lxc.payload.web1/system.slice/nginx.service", {
            container("/lxc.payload.web1/system.slice/nginx.service", Some("lxc"), "web1", None)
        });
        check(
            "/lxc.monitor.web1",
            Workload { runtime: Some("lxc"), ..Workload::bare("/lxc.monitor.web1".into()) },
        );
        check("/lxc/web1", container("/lxc/web1", Some("lxc"), "web1", None));
        let p = "/machine.slice/systemd-nspawn@debian.service/payload";
        check(p, container(p, Some("systemd-nspawn"), "debian", None));
    }

    #[test]
    fn plain_systemd_units() {
        check("/system.slice/nginx.service", unit("/system.slice/nginx.service", "nginx.service"));
        check(
            "/system.slice/docker.service",
            unit("/system.slice/docker.service", "docker.service"),
        );
        check(
            "/system.slice/system-getty.slice/getty@tty1.service",
            unit("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
        );
        check("/init.scope", unit("/init.scope", "init.scope"));
        check(
            "/user.slice/user-1000.slice/session-3.scope",
            unit("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        );
        let p = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1a2b.scope";
        check(p, unit(p, "vte-spawn-1a2b.scope"));
        let p = "/user.slice/user-1000.slice/user@1000.service/init.scope";
        check(p, unit(p, "init.scope"));
        // A service delegating its subtree: the service is what the user knows.
        let p = "/system.slice/buildkitd.service/workers/w1";
        check(p, unit(p, "buildkitd.service"));
    }

    #[test]
    fn root_unknown_and_untidy_paths() {
        check("/", Workload::bare("/".into()));
        check("", Workload::bare("/".into()));
        check("/system.slice", Workload::bare("/system.slice".into()));
        check(
            "/process_api/8e5df0b4225f612218d1457e4b8ed168",
            Workload::bare("/process_api/8e5df0b4225f612218d1457e4b8ed168".into()),
        );
        check("/my-app/nginx.service", Workload::bare("/my-app/nginx.service".into()));
        check("system.slice//nginx.service/", unit("/system.slice/nginx.service", "nginx.service"));
        // Not ids: wrong length, uppercase, or a unit that merely starts like a scope.
        check("/docker/abc123", Workload::bare("/docker/abc123".into()));
        let upper = ID.to_ascii_uppercase();
        check(&format!("/docker/{upper}"), Workload::bare(format!("/docker/{upper}")));
        check(
            "/system.slice/docker-compose@web.service",
            unit("/system.slice/docker-compose@web.service", "docker-compose@web.service"),
        );
        // "pod..." outside kubepods is no pod.
        check(&format!("/podman/pod{UID}"), Workload::bare(format!("/podman/pod{UID}")));
    }

    #[test]
    fn workload_serializes_with_null_for_unknowns() {
        let w = parse_cgroup_path("/system.slice/nginx.service");
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cgroup": "/system.slice/nginx.service",
                "container_id": null,
                "runtime": null,
                "pod_uid": null,
                "unit": "nginx.service",
            })
        );
    }

    #[test]
    fn filter_by_cgroup_prefix_matches_whole_components() {
        let f = WorkloadFilter::new(["/system.slice/"], [""; 0]).unwrap();
        assert!(f.matches_workload(&parse_cgroup_path("/system.slice/nginx.service")));
        assert!(f.matches_workload(&parse_cgroup_path("/system.slice")));
        assert!(!f.matches_workload(&parse_cgroup_path("/system.slice2/x.service")));
        assert!(!f.matches_workload(&parse_cgroup_path("/user.slice")));
        let all = WorkloadFilter::new(["/"], [""; 0]).unwrap();
        assert!(all.matches_workload(&parse_cgroup_path("/anything")));
        // Pasted filesystem paths and missing leading slashes are accepted.
        for given in
            ["/sys/fs/cgroup/system.slice", "/sys/fs/cgroup/unified/system.slice", "system.slice"]
        {
            assert_eq!(WorkloadFilter::new([given], [""; 0]).unwrap(), f, "{given}");
        }
    }

    #[test]
    fn filter_by_container_or_pod() {
        let docker = parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        let pod = parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{ID2}"));
        let f = |c: &str| WorkloadFilter::new([""; 0], [c]).unwrap();
        assert!(f(&ID[..12]).matches_workload(&docker));
        assert!(f(&ID[..12].to_ascii_uppercase()).matches_workload(&docker));
        assert!(!f(&ID[..12]).matches_workload(&pod));
        assert!(f(UID).matches_workload(&pod));
        assert!(f(UID_).matches_workload(&pod));
        assert!(f(&ID2[..4]).matches_workload(&pod));
        assert!(!f(UID).matches_workload(&parse_cgroup_path("/system.slice/nginx.service")));
        assert_eq!(
            WorkloadFilter::new([""; 0], ["3f2"]),
            Err(FilterError::ContainerTooShort("3f2".into()))
        );
        assert!(matches!(
            WorkloadFilter::new([""; 0], ["a/b/c"]),
            Err(FilterError::ContainerWithSlash(_))
        ));
        assert_eq!(WorkloadFilter::new([" "], [""; 0]), Err(FilterError::EmptyCgroup));
    }

    #[test]
    fn filter_lists_must_all_match() {
        let f = WorkloadFilter::new(["/kubepods"], [UID]).unwrap();
        assert!(
            f.matches_workload(&parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{ID}")))
        );
        assert!(
            !f.matches_workload(&parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}x/{ID}")))
        );
        assert!(!f.matches_workload(&parse_cgroup_path(&format!("/docker/{ID}"))));
        assert!(WorkloadFilter::default().is_empty());
        assert!(WorkloadFilter::default().matches_workload(&parse_cgroup_path("/")));
    }

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(("/sys/fs/cgroup/unified".into(), "/".into()))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(unified), Some(("/sys/fs/cgroup".into(), "/".into())));
        // A bind-mounted subtree first, the whole hierarchy (with a space in its path) later.
        let two = "\
50 24 0:30 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
51 24 0:30 / /mnt/cg\\040two rw shared:1 master:2 - cgroup2 none rw
";
        assert_eq!(parse_cgroup2_mount(two), Some(("/mnt/cg two".into(), "/".into())));
        let sub = "50 24 0:30 /system.slice/ /mnt/sub rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(sub), Some(("/mnt/sub".into(), "/system.slice".into())));
        let outside = "50 24 0:30 /../.. /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(outside), Some(("/sys/fs/cgroup".into(), "/".into())));
        assert_eq!(
            parse_cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn joins_the_mount_root() {
        assert_eq!(join_root("/", "/a/b"), "/a/b");
        assert_eq!(join_root("/sub", "/"), "/sub");
        assert_eq!(join_root("/sub", "/a"), "/sub/a");
    }

    /// A directory tree standing in for a cgroup2 mount, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("twtrace-container-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn mkdir(&self, rel: &str) -> u64 {
            let dir = self.0.join(rel.trim_start_matches('/'));
            fs::create_dir_all(&dir).unwrap();
            fs::metadata(&dir).unwrap().ino()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolves_directory_inodes_and_rescans_at_most_once_per_interval() {
        let tree = Tree::new("rescan");
        let nginx = tree.mkdir("/system.slice/nginx.service");
        fs::write(tree.0.join("system.slice/cgroup.procs"), "").unwrap();
        let mut r = CgroupResolver::with_mount_dir(&tree.0);
        r.min_interval = Duration::from_secs(3600);

        let w = r.resolve(nginx).unwrap();
        assert_eq!(*w, unit("/system.slice/nginx.service", "nginx.service"));
        assert!(Arc::ptr_eq(&w, &r.resolve(nginx).unwrap()), "cached");
        let root = fs::metadata(&tree.0).unwrap().ino();
        assert_eq!(r.resolve(root).unwrap().cgroup, "/");
        assert_eq!(r.resolve(0), None);

        // A cgroup made after the scan stays unknown until the next rescan is due.
        let docker = tree.mkdir(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(r.resolve(docker), None);
        r.next_scan = None;
        assert_eq!(
            *r.resolve(docker).unwrap(),
            container(&format!("/system.slice/docker-{ID}.scope"), Some("docker"), ID, None)
        );
        assert!(Arc::ptr_eq(&w, &r.resolve(nginx).unwrap()), "unchanged paths keep their workload");

        // Removed cgroups stay resolvable (late events).
        fs::remove_dir(tree.0.join("system.slice/nginx.service")).unwrap();
        r.next_scan = None;
        assert_eq!(r.resolve(u64::MAX), None);
        assert_eq!(r.resolve(nginx).unwrap().unit.as_deref(), Some("nginx.service"));

        let all_docker = WorkloadFilter::new([""; 0], [&ID[..8]]).unwrap();
        assert!(r.matches(docker, &all_docker));
        assert!(!r.matches(nginx, &all_docker));
        assert!(!r.matches(u64::MAX, &all_docker));
        assert!(r.matches(u64::MAX, &WorkloadFilter::default()));
    }

    #[test]
    fn forgets_the_oldest_vanished_cgroups_beyond_the_limit() {
        let mut r = CgroupResolver::with_mount_dir("/nonexistent/twtrace");
        r.generation = 2;
        for id in 1..=(MAX_VANISHED as u64 + 10) {
            let workload = Arc::new(Workload::bare(format!("/c{id}")));
            r.entries.insert(id, Entry { workload, seen: 1 });
        }
        r.entries.insert(
            1_000_000,
            Entry { workload: Arc::new(Workload::bare("/live".into())), seen: 2 },
        );
        r.forget_vanished();
        assert_eq!(r.entries.len(), MAX_VANISHED + 1);
        assert!(r.entries.contains_key(&1_000_000));
        assert!(!r.entries.contains_key(&10) && r.entries.contains_key(&11));
    }

    #[test]
    fn without_a_mount_nothing_resolves() {
        let mut r = CgroupResolver::with_mount_dir("/nonexistent/twtrace");
        assert_eq!(r.resolve(1), None);
        assert!(r.next_scan.is_some());
    }
}
