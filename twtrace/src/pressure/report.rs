//! `twtrace report`: the port-pressure analysis of a recording, as text, JSON, or an SVG
//! chart of TIME_WAIT per destination and failures over time.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    advice::{self, Advice},
    aggregator::Aggregator,
    screen::{SortBy, plain_table, sort_rows},
    view::{DestinationKey, DestinationView, NetnsContext},
};

/// Destinations drawn in the chart (the most pressed).
const CHART_LINES: usize = 5;

/// One sample per second of recorded time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    /// Seconds since the first event.
    pub seconds: Vec<u64>,
    /// TIME_WAIT sockets per charted destination, one value per second.
    pub time_wait: Vec<(DestinationKey, Vec<u64>)>,
    /// Failed connects per second, all destinations.
    pub failures: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct DestinationReport {
    #[serde(flatten)]
    pub view: DestinationView,
    /// The most TIME_WAIT sockets it had at once.
    pub peak_time_wait: u64,
    pub advice: Vec<Advice>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub destinations: Vec<DestinationReport>,
    pub netns: Vec<NetnsContext>,
    pub netns_advice: Vec<Advice>,
    pub note: Option<&'static str>,
    #[serde(skip)]
    pub timeline: Timeline,
}

/// One second of recorded time: (seconds since the start, TIME_WAIT per destination,
/// failed connects in that second).
type Sample = (u64, Vec<(DestinationKey, u64)>, u64);

/// Builds a report while events are fed to `aggregator`: call [`Sampler::sample`] once per
/// second of event time, then [`Sampler::finish`].
#[derive(Debug, Default)]
pub struct Sampler {
    start_s: Option<u64>,
    last_s: u64,
    samples: Vec<Sample>,
    failures_this_second: u64,
    peaks: std::collections::HashMap<DestinationKey, u64>,
}

impl Sampler {
    pub fn failure(&mut self) {
        self.failures_this_second += 1;
    }

    /// Takes a sample when a new second of event time starts.
    pub fn maybe_sample(&mut self, aggregator: &mut Aggregator, now_ns: u64) {
        let s = now_ns / 1_000_000_000;
        if s <= self.last_s && !self.samples.is_empty() {
            return;
        }
        self.sample(aggregator, now_ns);
    }

    fn sample(&mut self, aggregator: &mut Aggregator, now_ns: u64) {
        let s = now_ns / 1_000_000_000;
        let start = *self.start_s.get_or_insert(s);
        aggregator.tick(now_ns);
        let counts: Vec<(DestinationKey, u64)> =
            aggregator.views().into_iter().map(|v| (v.key, v.time_wait)).collect();
        for (k, n) in &counts {
            let peak = self.peaks.entry(*k).or_default();
            *peak = (*peak).max(*n);
        }
        self.samples.push((s - start, counts, std::mem::take(&mut self.failures_this_second)));
        self.last_s = s;
    }

    pub fn finish(mut self, aggregator: &mut Aggregator) -> Report {
        // The state at the last event closes the timeline (in place of a sample taken
        // earlier in the same second).
        if self.start_s.is_some() {
            let now = aggregator.now_ns();
            if self.last_s == now / 1_000_000_000 {
                let failures = self.samples.pop().map_or(0, |s| s.2);
                self.failures_this_second += failures;
            }
            self.sample(aggregator, now);
        }
        let mut views = aggregator.views();
        for v in &views {
            let peak = self.peaks.entry(v.key).or_default();
            *peak = (*peak).max(v.time_wait);
        }
        sort_rows(&mut views, SortBy::Pressure);
        let contexts: Vec<NetnsContext> = aggregator.contexts().cloned().collect();
        let charted: Vec<DestinationKey> = {
            let mut by_peak: Vec<_> = self.peaks.iter().collect();
            by_peak.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            by_peak.into_iter().take(CHART_LINES).map(|(k, _)| *k).collect()
        };
        let timeline = Timeline {
            seconds: self.samples.iter().map(|s| s.0).collect(),
            time_wait: charted
                .iter()
                .map(|k| {
                    let series = self
                        .samples
                        .iter()
                        .map(|(_, counts, _)| {
                            counts.iter().find(|(c, _)| c == k).map_or(0, |(_, n)| *n)
                        })
                        .collect();
                    (*k, series)
                })
                .collect(),
            failures: self.samples.iter().map(|s| s.2).collect(),
        };
        let destinations: Vec<DestinationReport> = views
            .into_iter()
            .map(|view| {
                let context = contexts.iter().find(|c| c.netns == view.key.netns);
                let advice = if advice::under_pressure(&view) {
                    advice::advise(&view, context)
                } else {
                    Vec::new()
                };
                DestinationReport {
                    peak_time_wait: self.peaks.get(&view.key).copied().unwrap_or(0),
                    view,
                    advice,
                }
            })
            .collect();
        let netns_advice = contexts.iter().flat_map(advice::advise_netns).collect();
        let any_advice = destinations.iter().any(|d| !d.advice.is_empty());
        Report {
            destinations,
            netns: contexts,
            netns_advice,
            note: any_advice.then_some(advice::NEVER_RECYCLE),
            timeline,
        }
    }
}

impl Report {
    /// The text form: the table as `top --once` prints it, then advice per destination.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.destinations.is_empty() {
            out.push_str("no outgoing connections in this recording\n");
            return out;
        }
        let rows: Vec<DestinationView> = self.destinations.iter().map(|d| d.view.clone()).collect();
        out.push_str(&plain_table(&rows));
        for c in &self.netns {
            let _ = write!(out, "\nnetns {}:", c.netns);
            if let Some((low, high)) = c.port_range {
                let _ = write!(out, " ip_local_port_range {low}-{high}");
            }
            if let Some(r) = c.tcp_tw_reuse {
                let _ = write!(out, ", tcp_tw_reuse {r}");
            }
            out.push('\n');
        }
        for d in self.destinations.iter().filter(|d| !d.advice.is_empty()) {
            let k = &d.view.key;
            let _ = writeln!(
                out,
                "\n{} -> {}:{} (peak {} in TIME_WAIT, {} EADDRNOTAVAIL):",
                k.saddr, k.daddr, k.dport, d.peak_time_wait, d.view.eaddrnotavail
            );
            for a in &d.advice {
                let _ = writeln!(out, "  - {}", a.text);
            }
        }
        for a in &self.netns_advice {
            let _ = writeln!(out, "\n- {}", a.text);
        }
        if let Some(note) = self.note {
            let _ = writeln!(out, "\nNote: {note}");
        }
        out
    }

    /// A self-contained SVG: TIME_WAIT sockets over time for the most pressed
    /// destinations, and failed connects per second as bars.
    pub fn svg(&self) -> String {
        const W: f64 = 900.0;
        const H: f64 = 420.0;
        const LEFT: f64 = 70.0;
        const RIGHT: f64 = 260.0;
        const TOP: f64 = 40.0;
        const BOTTOM: f64 = 60.0;
        const COLORS: [&str; CHART_LINES] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"];
        let t = &self.timeline;
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        let max_s = t.seconds.last().copied().unwrap_or(0).max(1) as f64;
        let max_tw = t.time_wait.iter().flat_map(|(_, s)| s.iter()).copied().max().unwrap_or(0);
        let max_y = nice_ceiling(max_tw.max(1));
        let max_fail = t.failures.iter().copied().max().unwrap_or(0);
        let x = |s: u64| LEFT + s as f64 / max_s * plot_w;
        let y = |v: u64| TOP + plot_h - v as f64 / max_y as f64 * plot_h;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">TIME_WAIT sockets per destination, failed connects per second</text>"#
        );
        // Axes and grid.
        let divisions = [5, 4, 2, 1].into_iter().find(|d| max_y.is_multiple_of(*d)).unwrap_or(1);
        for i in 0..=divisions {
            let v = max_y * i / divisions;
            let yy = y(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                yy + 4.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the first event (0–{})</text>"#,
            LEFT + plot_w / 2.0,
            H - 20.0,
            max_s as u64
        );
        // Failures: bars from the bottom, scaled to a quarter of the height.
        if max_fail > 0 {
            let bar_w = (plot_w / max_s).max(1.0);
            for (s, &f) in t.seconds.iter().zip(&t.failures).filter(|(_, f)| **f > 0) {
                let h = f as f64 / max_fail as f64 * plot_h / 4.0;
                let _ = writeln!(
                    svg,
                    r##"<rect x="{:.1}" y="{:.1}" width="{bar_w:.1}" height="{h:.1}" fill="#444" opacity="0.5"><title>{f} failed connects</title></rect>"##,
                    x(*s),
                    TOP + plot_h - h
                );
            }
        }
        for (i, (k, series)) in t.time_wait.iter().enumerate() {
            let points: Vec<String> = t
                .seconds
                .iter()
                .zip(series)
                .map(|(&s, &v)| format!("{:.1},{:.1}", x(s), y(v)))
                .collect();
            let color = COLORS[i % COLORS.len()];
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}">{} → {}:{}</text>"#,
                W - RIGHT + 15.0,
                ly - 10.0,
                W - RIGHT + 32.0,
                ly,
                k.saddr,
                k.daddr,
                k.dport
            );
        }
        if max_fail > 0 {
            let ly = TOP + 10.0 + t.time_wait.len() as f64 * 20.0;
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="#444" opacity="0.5"/><text x="{:.1}" y="{ly:.1}">failed connects (peak {max_fail}/s)</text>"##,
                W - RIGHT + 15.0,
                ly - 10.0,
                W - RIGHT + 32.0,
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// A self-contained HTML page: the chart and the text report.
    pub fn html(&self) -> String {
        let escaped = self.text().replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>twtrace report</title></head>\n\
             <body style=\"font-family:sans-serif\">\n<h1>twtrace port-pressure report</h1>\n{}\n<pre>{}</pre>\n</body></html>\n",
            self.svg(),
            escaped
        )
    }
}

/// The smallest 1/2/5 × 10^n at or above `v`.
fn nice_ceiling(v: u64) -> u64 {
    let mut base = 1;
    loop {
        for m in [1, 2, 5] {
            if base * m >= v {
                return base * m;
            }
        }
        base *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!([1, 3, 7, 10, 11, 480, 501].map(nice_ceiling), [1, 5, 10, 10, 20, 500, 1000]);
    }
}
