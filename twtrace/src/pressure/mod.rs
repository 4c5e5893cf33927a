//! Port pressure: which destinations are closest to running out of local ports, why, and
//! what to change. The aggregator turns events (live or recorded) and kernel snapshots
//! into per-destination views; `top` and `report` show them.

pub mod advice;
pub mod aggregator;
pub mod kernel_view;
pub mod report;
pub mod screen;
pub mod view;

use aggregator::NetnsSnapshot;
use twtrace_common::tcp::TCP_LISTEN;

/// Reads every network namespace twtrace can enter (or only those in `only`): settings,
/// counters, and the sockets the aggregator needs (listeners and clients' sockets; a
/// server's accepted connections share its listening port and are left out). A
/// namespace that cannot be read is skipped with a warning.
pub fn snapshots(only: &[u32]) -> Vec<NetnsSnapshot> {
    let mut out = Vec::new();
    for (inode, path) in kernel_view::find_netns() {
        if !only.is_empty() && !only.contains(&inode) {
            continue;
        }
        let ts_ns = crate::clock::Clock::monotonic_now_ns();
        match kernel_view::read_netns(inode, &path) {
            Ok(view) => {
                let listening: std::collections::HashSet<u16> = view
                    .sockets
                    .iter()
                    .filter(|s| s.state == TCP_LISTEN)
                    .map(|s| s.sport)
                    .collect();
                let sockets = view
                    .sockets
                    .iter()
                    .filter(|s| {
                        s.state == TCP_LISTEN || (s.dport != 0 && !listening.contains(&s.sport))
                    })
                    .copied()
                    .collect();
                out.push(NetnsSnapshot { ts_ns, context: view.context, sockets });
            }
            Err(e) => log::warn!("netns {inode} ({}): {e:#}", path.display()),
        }
    }
    out
}
