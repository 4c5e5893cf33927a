//! What to change when a destination runs short of local ports, from the seeds' analysis:
//! reuse TIME_WAIT ports on the client (tcp_tw_reuse), widen the port range, spread over
//! more destinations, reuse connections. Never tcp_tw_recycle.

use serde::Serialize;

use super::view::{DestinationView, Forecast, NetnsContext};

/// A destination counts as under pressure from this share of its range in use (now or
/// at steady state).
pub const PRESSURE_SHARE: f64 = 0.5;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Advice {
    /// Stable identifier, e.g. `enable_tw_reuse`.
    pub id: &'static str,
    pub text: String,
}

/// Whether `view` needs advice: failures to get a port, a forecast exhaustion, or half
/// the range in use.
pub fn under_pressure(view: &DestinationView) -> bool {
    let share_now = view.pressure().unwrap_or(0.0);
    let steady = match view.forecast {
        Forecast::Exhausts { .. } => return true,
        Forecast::Steady { steady_state_share } => steady_state_share,
        Forecast::Unknown => 0.0,
    };
    view.eaddrnotavail > 0 || share_now >= PRESSURE_SHARE || steady >= PRESSURE_SHARE
}

/// Advice for one destination under pressure, most effective first.
pub fn advise(view: &DestinationView, context: Option<&NetnsContext>) -> Vec<Advice> {
    let mut out = Vec::new();
    let dest = format!("{}:{}", view.key.daddr, view.key.dport);
    let reuse = context.and_then(|c| c.tcp_tw_reuse);
    let reuse_covers = match reuse {
        Some(1) => true,
        Some(2) => view.key.daddr.is_loopback(),
        _ => false,
    };
    if !reuse_covers {
        out.push(Advice {
            id: "enable_tw_reuse",
            text: format!(
                "Set net.ipv4.tcp_tw_reuse=1 on this client (now {}): new connections to {dest} \
                 may then take a TIME_WAIT socket's port after 1 s instead of 60 s (safe with \
                 TCP timestamps, on by default).",
                reuse.map_or_else(|| "unknown".to_owned(), |r| r.to_string())
            ),
        });
    }
    if view.conn_per_sec >= 1.0 {
        let who = view
            .processes
            .first()
            .map(|p| format!(" in {} (pid {})", p.comm, p.pid))
            .unwrap_or_default();
        out.push(Advice {
            id: "reuse_connections",
            text: format!(
                "Reuse connections{who}: HTTP keep-alive or a connection pool; {:.0} new \
                 connections/s to {dest} each leave a port in TIME_WAIT for 60 s.",
                view.conn_per_sec
            ),
        });
    }
    if let Some((low, high)) = context.and_then(|c| c.port_range) {
        let size = u32::from(high) - u32::from(low) + 1;
        if size < 60000 {
            out.push(Advice {
                id: "widen_port_range",
                text: format!(
                    "Widen net.ipv4.ip_local_port_range (now {low}-{high}, {size} ports), e.g. \
                     to 10000 65000; keep listening ports out with ip_local_reserved_ports."
                ),
            });
        }
    }
    out.push(Advice {
        id: "spread_destinations",
        text: format!(
            "Spread the load over more destination IPs or ports (or more source IPs): each \
             (source IP, destination IP, port) has its own port range; {dest} has one."
        ),
    });
    out
}

/// Namespace-wide advice: TIME_WAIT bucket overflow, and the warning against
/// tcp_tw_recycle, which users still find in old guides.
pub fn advise_netns(context: &NetnsContext) -> Vec<Advice> {
    let mut out = Vec::new();
    if let Some(t) = context.tcpext
        && t.time_wait_overflow > 0
    {
        out.push(Advice {
            id: "time_wait_overflow",
            text: format!(
                "netns {}: {} closes skipped TIME_WAIT because net.ipv4.tcp_max_tw_buckets ({}) \
                 was reached; the limit protects memory, raise it only with the port range.",
                context.netns,
                t.time_wait_overflow,
                context.tcp_max_tw_buckets.map_or_else(|| "?".to_owned(), |n| n.to_string())
            ),
        });
    }
    out
}

/// Shown with any advice: the setting people reach for first is the wrong one.
pub const NEVER_RECYCLE: &str = "Do not look for net.ipv4.tcp_tw_recycle: it was removed in \
    Linux 4.12 because it dropped connections from clients behind NAT; tcp_tw_reuse is the \
    safe, client-side setting.";

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::pressure::view::ProcessShare;

    fn view(daddr: IpAddr, conn_per_sec: f64, headroom: f64) -> DestinationView {
        DestinationView {
            time_wait: 20000,
            live: 10,
            headroom: Some(headroom),
            conn_per_sec,
            time_wait_per_sec: conn_per_sec,
            processes: vec![ProcessShare { pid: 7, comm: "app".into(), connections: 9 }],
            forecast: Forecast::Exhausts { seconds: 38.0, steady_state_share: 1.09 },
            ..DestinationView::example(daddr, 5432)
        }
    }

    fn ctx(reuse: u8) -> NetnsContext {
        NetnsContext {
            netns: 1,
            port_range: Some((32768, 60999)),
            tcp_tw_reuse: Some(reuse),
            ..Default::default()
        }
    }

    fn ids(advice: &[Advice]) -> Vec<&str> {
        advice.iter().map(|a| a.id).collect()
    }

    #[test]
    fn remote_destination_without_reuse_gets_everything() {
        let v = view(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 512.0, 0.2);
        assert!(under_pressure(&v));
        let advice = advise(&v, Some(&ctx(2)));
        assert_eq!(
            ids(&advice),
            ["enable_tw_reuse", "reuse_connections", "widen_port_range", "spread_destinations"]
        );
        assert!(advice[1].text.contains("app (pid 7)"), "{}", advice[1].text);
        assert!(advice.iter().all(|a| !a.text.contains("tcp_tw_recycle")));
    }

    #[test]
    fn loopback_is_covered_by_reuse_2() {
        let v = view(IpAddr::V4(Ipv4Addr::LOCALHOST), 512.0, 0.2);
        assert!(!ids(&advise(&v, Some(&ctx(2)))).contains(&"enable_tw_reuse"));
    }

    #[test]
    fn quiet_destination_is_not_under_pressure() {
        let mut v = view(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 1.0, 0.99);
        v.forecast = Forecast::Steady { steady_state_share: 0.002 };
        assert!(!under_pressure(&v));
        v.eaddrnotavail = 1;
        assert!(under_pressure(&v));
    }
}
