//! Prometheus metrics for `twtrace serve`: the state the daemon keeps between scrapes, its
//! exposition in the classic text format, and the small HTTP endpoint that serves it.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    event::{Call, Event},
    pressure::{
        screen::{SortBy, sort_rows},
        view::{DestinationView, Forecast, NetnsContext},
    },
};

/// Distinct (netns, destination, errno) label sets kept for `connect_failures_total`;
/// later ones are counted under `daddr="other"` so a scan of many destinations cannot
/// blow up Prometheus.
pub const MAX_FAILURE_SERIES: usize = 500;

/// Everything a scrape shows, updated by the tracing loop.
#[derive(Clone, Debug, Default)]
pub struct MetricsState {
    /// Destinations, most pressed first, as of the last refresh.
    pub destinations: Vec<DestinationView>,
    pub contexts: Vec<NetnsContext>,
    /// Per-destination series exported; the rest are summed into `daddr="other"`.
    pub top: usize,
    events: [u64; 4],
    failures: HashMap<FailureKey, u64>,
    pub lost_events: u64,
    /// (program, run time, runs), cumulative; empty without BPF run statistics.
    pub programs: Vec<(String, Duration, u64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct FailureKey {
    netns: u32,
    daddr: Option<IpAddr>,
    dport: u16,
    errno: std::borrow::Cow<'static, str>,
}

impl MetricsState {
    pub fn new(top: usize) -> Self {
        Self { top, ..Self::default() }
    }

    /// Counts one event (after filtering).
    pub fn event(&mut self, event: &Event) {
        let kind = match event {
            Event::State(s) if s.time_wait => 1,
            Event::State(_) => 0,
            Event::Failure(f) if f.call == Call::Connect => 2,
            Event::Failure(_) => 3,
        };
        self.events[kind] += 1;
        let Event::Failure(f) = event else {
            return;
        };
        if f.call != Call::Connect {
            return;
        }
        let mut key = FailureKey {
            netns: f.netns,
            daddr: Some(f.daddr.to_canonical()),
            dport: f.dport,
            errno: f.error_name(),
        };
        if !self.failures.contains_key(&key) && self.failures.len() >= MAX_FAILURE_SERIES {
            key.daddr = None;
            key.dport = 0;
        }
        *self.failures.entry(key).or_default() += 1;
    }

    /// The exposition, Prometheus text format 0.0.4.
    pub fn render(&self) -> anyhow::Result<Vec<u8>> {
        let registry = Registry::new();
        let labels = ["netns", "saddr", "daddr", "dport"];
        let time_wait = gauge_vec(
            "twtrace_time_wait_sockets",
            "Sockets in TIME_WAIT toward the destination (a client's local ports held)",
            &labels,
        )?;
        let headroom = gauge_vec(
            "twtrace_port_headroom_ratio",
            "Free local ports toward the destination over the port range size (0-1)",
            &labels,
        )?;
        let rate = gauge_vec(
            "twtrace_connections_per_second",
            "New connections to the destination per second (10 s average)",
            &labels,
        )?;
        let exhaustion = gauge_vec(
            "twtrace_port_exhaustion_seconds",
            "Seconds until the destination runs out of local ports at the current rate (absent when it settles)",
            &labels,
        )?;
        let mut rows = self.destinations.clone();
        sort_rows(&mut rows, SortBy::Pressure);
        let (shown, rest) = rows.split_at(rows.len().min(self.top));
        for d in shown {
            let k = &d.key;
            let (netns, saddr, daddr, dport) = (
                k.netns.to_string(),
                k.saddr.to_string(),
                k.daddr.to_string(),
                k.dport.to_string(),
            );
            let values = [netns.as_str(), saddr.as_str(), daddr.as_str(), dport.as_str()];
            time_wait.with_label_values(&values).set(d.time_wait as f64);
            if let Some(h) = d.headroom {
                headroom.with_label_values(&values).set(h);
            }
            rate.with_label_values(&values).set(d.conn_per_sec);
            if let Forecast::Exhausts { seconds, .. } = d.forecast {
                exhaustion.with_label_values(&values).set(seconds);
            }
        }
        if !rest.is_empty() {
            let other = ["", "", "other", ""];
            time_wait.with_label_values(&other).set(rest.iter().map(|d| d.time_wait as f64).sum());
            rate.with_label_values(&other).set(rest.iter().map(|d| d.conn_per_sec).sum());
        }
        for g in [time_wait, headroom, rate, exhaustion] {
            registry.register(Box::new(g))?;
        }

        let failures = IntCounterVec::new(
            Opts::new("twtrace_connect_failures_total", "Failed connects by destination and errno"),
            &["netns", "daddr", "dport", "errno"],
        )?;
        for (k, &n) in &self.failures {
            let daddr = k.daddr.map_or_else(|| "other".to_owned(), |a| a.to_string());
            let dport = if k.daddr.is_some() { k.dport.to_string() } else { String::new() };
            let netns = k.netns.to_string();
            failures.with_label_values(&[netns.as_str(), &daddr, &dport, &k.errno]).inc_by(n);
        }
        registry.register(Box::new(failures))?;

        let events = IntCounterVec::new(
            Opts::new("twtrace_events_total", "Events twtrace received and kept, by kind"),
            &["kind"],
        )?;
        for (kind, &n) in
            ["state", "time_wait", "connect_error", "bind_error"].iter().zip(&self.events)
        {
            events.with_label_values(&[kind]).inc_by(n);
        }
        registry.register(Box::new(events))?;
        let lost = prometheus::IntCounter::new(
            "twtrace_lost_events_total",
            "Events the kernel side could not deliver (ring buffer full, runs skipped)",
        )?;
        lost.inc_by(self.lost_events);
        registry.register(Box::new(lost))?;

        if !self.programs.is_empty() {
            let seconds = prometheus::CounterVec::new(
                Opts::new("twtrace_bpf_run_seconds_total", "Time spent in twtrace's BPF programs"),
                &["program"],
            )?;
            let runs = IntCounterVec::new(
                Opts::new("twtrace_bpf_runs_total", "Runs of twtrace's BPF programs"),
                &["program"],
            )?;
            for (name, time, count) in &self.programs {
                seconds.with_label_values(&[name]).inc_by(time.as_secs_f64());
                runs.with_label_values(&[name]).inc_by(*count);
            }
            registry.register(Box::new(seconds))?;
            registry.register(Box::new(runs))?;
        }

        let range = gauge_vec(
            "twtrace_netns_port_range_size",
            "Ports in the network namespace's ip_local_port_range",
            &["netns"],
        )?;
        let reuse = gauge_vec(
            "twtrace_netns_tcp_tw_reuse",
            "The network namespace's net.ipv4.tcp_tw_reuse (0 off, 1 on, 2 loopback only)",
            &["netns"],
        )?;
        for c in &self.contexts {
            let netns = c.netns.to_string();
            if let Some((low, high)) = c.port_range {
                range.with_label_values(&[&netns]).set(f64::from(high) - f64::from(low) + 1.0);
            }
            if let Some(r) = c.tcp_tw_reuse {
                reuse.with_label_values(&[&netns]).set(f64::from(r));
            }
        }
        registry.register(Box::new(range))?;
        registry.register(Box::new(reuse))?;

        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&registry.gather(), &mut out)?;
        Ok(out)
    }
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> anyhow::Result<GaugeVec> {
    Ok(GaugeVec::new(Opts::new(name, help), labels)?)
}

/// Serves `GET /metrics` on `listener` until the task is dropped. One request per
/// connection; anything else gets 404. Slow or silent clients are dropped after 10 s.
pub async fn serve_http(listener: TcpListener, state: Arc<Mutex<MetricsState>>) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(10), async {
                let mut request = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                // Read the request head (bounded): up to the blank line.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
                let (status, kind, body) = if line.starts_with(b"GET /metrics ")
                    || line == b"GET /metrics"
                {
                    let rendered = state.lock().map_err(|_| poisoned())?.render();
                    match rendered {
                        Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                        Err(e) => (
                            "500 Internal Server Error",
                            "text/plain",
                            format!("failed to render the metrics: {e:#}\n").into_bytes(),
                        ),
                    }
                } else {
                    ("404 Not Found", "text/plain", b"twtrace serves /metrics\n".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(&body).await?;
                conn.shutdown().await
            })
            .await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics endpoint: {peer}: {e}"),
                Err(_) => log::debug!("metrics endpoint: {peer}: timed out"),
            }
        });
    }
}

fn poisoned() -> std::io::Error {
    std::io::Error::other("the metrics state lock is poisoned")
}

/// Binds the metrics endpoint, with an error that says what to do.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("failed to listen on {addr} for metrics: is another twtrace serve running? (choose another --metrics-addr)")
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::pressure::view::ProcessShare;

    fn row(port: u16, time_wait: u64, headroom: f64) -> DestinationView {
        let mut view = DestinationView {
            time_wait,
            range_size: Some(1000),
            headroom: Some(headroom),
            conn_per_sec: 10.0,
            time_wait_per_sec: 10.0,
            time_wait_entered: time_wait,
            processes: vec![ProcessShare { pid: 1, comm: "x".into(), connections: 1 }],
            forecast: Forecast::Exhausts { seconds: 12.5, steady_state_share: 1.2 },
            ..DestinationView::example(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), port)
        };
        view.key.netns = 7;
        view
    }

    #[test]
    fn top_destinations_and_the_rest_as_other() {
        let mut state = MetricsState::new(2);
        state.destinations = vec![row(1, 100, 0.9), row(2, 500, 0.5), row(3, 50, 0.95)];
        let text = String::from_utf8(state.render().unwrap()).unwrap();
        assert!(text.contains(
            r#"twtrace_time_wait_sockets{daddr="10.0.0.2",dport="2",netns="7",saddr="10.0.0.1"} 500"#
        ), "{text}");
        assert!(
            text.contains(
                r#"twtrace_time_wait_sockets{daddr="other",dport="",netns="",saddr=""} 50"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"twtrace_port_exhaustion_seconds{daddr="10.0.0.2",dport="2",netns="7",saddr="10.0.0.1"} 12.5"#), "{text}");
        assert!(text.contains("# TYPE twtrace_events_total counter"), "{text}");
    }
}
