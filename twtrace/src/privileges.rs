//! Up-front privilege check, so a missing capability is named before anything is loaded.

use anyhow::bail;

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with a message naming the missing capabilities unless this process may load and
/// attach tracing programs (CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN on any kernel).
pub fn check() -> anyhow::Result<()> {
    let effective = effective_capabilities();
    if let Some(missing) = missing_capabilities(effective) {
        bail!(
            "twtrace needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: {missing}); \
             run it with sudo, or grant them with `setcap cap_bpf,cap_perfmon,cap_sys_admin+ep $(command -v twtrace)`"
        );
    }
    Ok(())
}

fn effective_capabilities() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// Warns about what the port-pressure views lose without CAP_SYS_ADMIN (entering other
/// network namespaces to list their sockets) and CAP_SYS_PTRACE (finding namespaces
/// through other processes' /proc/PID/ns/net): those namespaces would silently be missing.
pub fn warn_if_namespaces_hidden() {
    let effective = effective_capabilities();
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    for (cap, name, what) in [
        (
            CAP_SYS_ADMIN,
            "CAP_SYS_ADMIN",
            "other network namespaces cannot be entered to list their sockets",
        ),
        (
            CAP_SYS_PTRACE,
            "CAP_SYS_PTRACE",
            "namespaces known only through other processes (containers) cannot be found",
        ),
    ] {
        if !has(cap) {
            log::warn!("without {name}, {what}: their TIME_WAIT counts start from zero");
        }
    }
}

/// The missing capability names, or `None` when `effective` suffices.
fn missing_capabilities(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(cap, _)| !has(cap))
        .map(|(_, name)| name)
        .collect();
    Some(missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing_capabilities(0).as_deref(), Some("CAP_BPF, CAP_PERFMON"));
        assert_eq!(missing_capabilities(1 << CAP_BPF).as_deref(), Some("CAP_PERFMON"));
        assert_eq!(missing_capabilities(1 << CAP_SYS_ADMIN), None);
        assert_eq!(missing_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
    }
}
