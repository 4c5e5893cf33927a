//! The drawing half of `twtrace top`: a live full-screen table of port pressure per
//! destination (ratatui on crossterm), plus the plain-text table for `--once` / non-TTY use.
//!
//! [`render`] draws one frame onto any ratatui [`Frame`] (tests use a `TestBackend`);
//! [`Screen`] owns the real terminal, reads keys, and puts the terminal back on drop or panic.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::io::{self, Stdout};
use std::net::IpAddr;
use std::sync::Once;
use std::sync::atomic::{self, AtomicBool};
use std::time::Duration;

use anyhow::{Context as _, bail};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{Clear, ClearType, EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute, terminal};
use ratatui::Frame;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use super::view::{DestinationView, Forecast, NetnsContext};

/// The order of the rows: which column is "most urgent first".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortBy {
    /// Least headroom first (unknown range last); ties by connection rate.
    #[default]
    Pressure,
    /// Most new connections per second first.
    ConnRate,
    /// Most sockets in TIME_WAIT first.
    TimeWait,
    /// Most failed connects first (EADDRNOTAVAIL breaks ties).
    Failures,
}

impl SortBy {
    /// The next key, cycling back to [`SortBy::Pressure`] after the last.
    pub fn next(self) -> Self {
        match self {
            Self::Pressure => Self::ConnRate,
            Self::ConnRate => Self::TimeWait,
            Self::TimeWait => Self::Failures,
            Self::Failures => Self::Pressure,
        }
    }

    /// Short name shown on screen.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pressure => "pressure",
            Self::ConnRate => "conn/s",
            Self::TimeWait => "TIME_WAIT",
            Self::Failures => "failures",
        }
    }

    /// The table column the rows are sorted by.
    fn column(self) -> usize {
        match self {
            Self::Pressure => COL_HEADROOM,
            Self::ConnRate => COL_CONN,
            Self::TimeWait => COL_TIME_WAIT,
            Self::Failures => COL_FAIL,
        }
    }
}

/// What a key press asks the live view to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Quit,
    NextSort,
}

/// Sorts rows in place, most urgent first, for the given key. Every key falls back to the
/// destination itself, so the order is stable from one frame to the next.
pub fn sort_rows(rows: &mut [DestinationView], sort: SortBy) {
    rows.sort_by(|a, b| compare(a, b, sort));
}

fn compare(a: &DestinationView, b: &DestinationView, sort: SortBy) -> Ordering {
    let by_headroom = || match (headroom(a), headroom(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    let by_rate = || rate(b).total_cmp(&rate(a));
    let by_time_wait = || b.time_wait.cmp(&a.time_wait);
    let primary = match sort {
        SortBy::Pressure => by_headroom().then_with(by_rate),
        SortBy::ConnRate => by_rate().then_with(by_headroom),
        SortBy::TimeWait => by_time_wait().then_with(by_rate),
        SortBy::Failures => b
            .failures
            .cmp(&a.failures)
            .then(b.eaddrnotavail.cmp(&a.eaddrnotavail))
            .then_with(by_headroom),
    };
    primary.then_with(by_time_wait).then_with(|| a.key.cmp(&b.key))
}

/// Headroom, with NaN treated as unknown.
fn headroom(row: &DestinationView) -> Option<f64> {
    row.headroom.filter(|h| !h.is_nan())
}

fn rate(row: &DestinationView) -> f64 {
    if row.conn_per_sec.is_nan() { 0.0 } else { row.conn_per_sec }
}

// ---------------------------------------------------------------------------------------
// Cell texts shared by the screen and the plain table
// ---------------------------------------------------------------------------------------

const HEADERS: [&str; 7] =
    ["DESTINATION", "HEADROOM", "CONN/S", "TIME_WAIT", "FAIL", "TOP PROCESS", "OUTLOOK"];
const COL_DEST: usize = 0;
const COL_HEADROOM: usize = 1;
const COL_CONN: usize = 2;
const COL_TIME_WAIT: usize = 3;
const COL_FAIL: usize = 4;
const COL_PROCESS: usize = 5;
const COL_OUTLOOK: usize = 6;
/// Numeric columns are right-aligned.
const RIGHT_ALIGNED: [bool; 7] = [false, false, true, true, true, false, false];

fn fmt_addr(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// `daddr:dport`, the part of the destination kept longest.
fn target_text(row: &DestinationView) -> String {
    format!("{}:{}", fmt_addr(row.key.daddr), row.key.dport)
}

/// `saddr → daddr:dport`.
fn destination_text(row: &DestinationView) -> String {
    format!("{} → {}", fmt_addr(row.key.saddr), target_text(row))
}

/// The destination in at most `width` columns: the source address is elided first (from
/// its left, keeping the distinctive end), then dropped, then the target is cut from the left.
fn destination_fit(row: &DestinationView, width: usize) -> String {
    let full = destination_text(row);
    if text_width(&full) <= width {
        return full;
    }
    let target = target_text(row);
    let tail = format!(" → {target}");
    let room = width.saturating_sub(text_width(&tail) + 1);
    // Fewer than four characters of an address tell nothing; drop it instead.
    if room >= 4 {
        return format!("{}{tail}", elide_left(&fmt_addr(row.key.saddr), room + 1));
    }
    let arrow = format!("→ {target}");
    if text_width(&arrow) <= width {
        return arrow;
    }
    elide_left(&target, width)
}

/// `comm[pid]` of the top process, `-` when none is known.
fn process_text(row: &DestinationView) -> String {
    match row.processes.first() {
        Some(p) => format!("{}[{}]", p.comm, p.pid),
        None => "-".to_owned(),
    }
}

/// The top process in at most `width` columns, shortening the command before the pid.
fn process_fit(row: &DestinationView, width: usize) -> String {
    let full = process_text(row);
    if text_width(&full) <= width {
        return full;
    }
    if let Some(p) = row.processes.first() {
        let pid = format!("[{}]", p.pid);
        let room = width.saturating_sub(text_width(&pid));
        if room >= 2 {
            return format!("{}{pid}", elide_right(&p.comm, room));
        }
    }
    elide_right(&full, width)
}

fn outlook_text(forecast: &Forecast) -> String {
    match *forecast {
        Forecast::Unknown => "range unknown".to_owned(),
        Forecast::Steady { steady_state_share } => {
            format!("steady {}%", percent(steady_state_share))
        }
        Forecast::Exhausts { seconds, steady_state_share } => {
            if seconds.is_infinite() && seconds > 0.0 {
                format!("steady {}%", percent(steady_state_share))
            } else if seconds.is_nan() || seconds <= 0.0 {
                "exhausted now".to_owned()
            } else {
                // Rounded up: never promise more time than there is.
                format!("exhausted in {}", fmt_duration(seconds.ceil() as u64))
            }
        }
    }
}

/// A compact duration of at most 3 characters up to 99 days: `38s`, `12m`, `5h`, `3d`.
fn fmt_duration(secs: u64) -> String {
    match secs {
        0..100 => format!("{secs}s"),
        100..6_000 => format!("{}m", secs / 60),
        6_000..360_000 => format!("{}h", secs / 3_600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A share 0.0–1.0 as a whole percent, clamped to 0–100 (rounded to nearest).
fn percent(share: f64) -> u64 {
    if share.is_nan() {
        return 0;
    }
    (share.clamp(0.0, 1.0) * 100.0).round() as u64
}

/// The free percent shown next to the gauge: rounded down, so "0%" only shows once less
/// than 1% is left and a nearly full range never reads as 1% better than it is.
fn free_percent(headroom: f64) -> u64 {
    (headroom.clamp(0.0, 1.0) * 100.0 + 1e-9).floor() as u64
}

/// The used share for the gauge, 0.0–1.0.
fn used_share(headroom: f64) -> f64 {
    (1.0 - headroom).clamp(0.0, 1.0)
}

fn conn_rate_text(per_sec: f64) -> String {
    let v = if per_sec.is_finite() { per_sec.max(0.0) } else { 0.0 };
    if v < 9.95 {
        format!("{v:.1}")
    } else if v < 9_999.5 {
        format!("{v:.0}")
    } else {
        format!("{:.0}k", v / 1_000.0)
    }
}

/// A count in at most 5 columns on screen (`123456` → `123k`).
fn count_compact(n: u64) -> String {
    match n {
        0..100_000 => n.to_string(),
        100_000..100_000_000 => format!("{}k", n / 1_000),
        _ => format!("{}M", n / 1_000_000),
    }
}

/// `[#####.....] 52%`: ten marks of the used share, then the percent free.
fn headroom_text_bar(headroom: Option<f64>) -> String {
    match headroom.filter(|h| !h.is_nan()) {
        Some(h) => {
            let marks = (used_share(h) * 10.0).round() as usize;
            format!("[{}{}] {}%", "#".repeat(marks), ".".repeat(10 - marks), free_percent(h))
        }
        None => "unknown".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Plain text
// ---------------------------------------------------------------------------------------

/// The plain-text table for `--once` / non-TTY output: a header line, then one line per row,
/// in the given order, with the same columns as the screen (headroom as `[#####.....] 52%`).
pub fn plain_table(rows: &[DestinationView]) -> String {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|row| {
            [
                destination_text(row),
                headroom_text_bar(row.headroom),
                conn_rate_text(row.conn_per_sec),
                row.time_wait.to_string(),
                row.failures.to_string(),
                process_text(row),
                outlook_text(&row.forecast),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(text_width);
    for line in &cells {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(text_width(cell));
        }
    }
    let mut out = String::new();
    let header = HEADERS.map(str::to_owned);
    for line in std::iter::once(&header).chain(&cells) {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - text_width(cell));
            if RIGHT_ALIGNED[i] {
                let _ = write!(text, "{pad}{cell}");
            } else {
                let _ = write!(text, "{cell}{pad}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// The frame
// ---------------------------------------------------------------------------------------

const TITLE: &str = "twtrace top — port pressure per destination";
const KEY_HELP: &str = "q quit  s sort";
const EMPTY: &str = "no outgoing connections seen yet";
/// Namespaces described in the footer before "+N more".
const MAX_CONTEXTS: usize = 3;

/// Fixed column widths on screen; DESTINATION and TOP PROCESS share the rest.
const HEADROOM_W: usize = 10; // 5-cell gauge, space, "100%"
const CONN_W: usize = 6;
const TIME_WAIT_W: usize = 9;
const FAIL_W: usize = 5;
const OUTLOOK_W: usize = 16; // "exhausted in 38s"
const SPACING: usize = 1;
const GAUGE_CELLS: usize = 5;
/// DESTINATION keeps this much before TOP PROCESS gives up any room.
const DEST_MIN: usize = 18;
const PROCESS_MIN: usize = 8;
const PROCESS_MAX: usize = 24;

/// Draws one frame of `twtrace top`: title, the table (sorted by `sort`, whatever order
/// `rows` come in), and a footer with the namespaces' context and `status`.
pub fn render(
    frame: &mut Frame<'_>,
    rows: &[DestinationView],
    contexts: &[NetnsContext],
    sort: SortBy,
    status: &str,
) {
    let area = frame.area();
    let mut sorted: Vec<&DestinationView> = rows.iter().collect();
    sorted.sort_by(|a, b| compare(a, b, sort));

    let footer = footer_lines(&sorted, contexts, status, area.width as usize);
    // Keep the title, the table header and a couple of rows whatever the footer wants.
    let footer_room = area.height.saturating_sub(4).max(2) as usize;
    let footer = fit_footer(footer, footer_room.saturating_sub(1));
    let [title_area, table_area, footer_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(footer.len() as u16 + 1),
    ])
    .areas(area);

    render_title(frame, title_area, sort);
    if sorted.is_empty() {
        let msg = Paragraph::new(EMPTY).centered().style(Style::new().add_modifier(Modifier::DIM));
        frame.render_widget(msg, table_area.centered_vertically(Constraint::Length(1)));
    } else {
        render_table(frame, table_area, &sorted, sort);
    }
    let block = Block::new().borders(Borders::TOP).border_style(Style::new().fg(Color::DarkGray));
    frame.render_widget(Paragraph::new(footer).block(block), footer_area);
}

fn render_title(frame: &mut Frame<'_>, area: Rect, sort: SortBy) {
    let help_w = text_width(KEY_HELP) as u16;
    let [left, right] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Length(help_w)]).areas(area);
    let title = Line::from(vec![
        Span::styled(TITLE, Style::new().add_modifier(Modifier::BOLD)),
        Span::raw("   sort: "),
        Span::styled(sort.label(), Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)),
    ]);
    frame.render_widget(title, left);
    frame.render_widget(
        Line::from(KEY_HELP).right_aligned().style(Style::new().add_modifier(Modifier::DIM)),
        right,
    );
}

fn render_table(frame: &mut Frame<'_>, area: Rect, rows: &[&DestinationView], sort: SortBy) {
    let widths = column_widths(area.width as usize, rows);

    let header = Row::new(HEADERS.iter().enumerate().map(|(i, h)| {
        let mut style = Style::new().add_modifier(Modifier::BOLD);
        if i == sort.column() {
            style = style.fg(Color::Cyan).add_modifier(Modifier::UNDERLINED);
        }
        let line = Line::styled(elide_right(h, widths[i]), style);
        Cell::from(if RIGHT_ALIGNED[i] { line.right_aligned() } else { line })
    }));

    // One line for the header; if rows don't all fit, the last line says how many are hidden.
    let room = (area.height as usize).saturating_sub(1);
    let (shown, hidden) = if rows.len() > room {
        let shown = room.saturating_sub(1);
        (shown, rows.len() - shown)
    } else {
        (rows.len(), 0)
    };
    let mut lines: Vec<Row<'_>> = rows[..shown].iter().map(|row| table_row(row, &widths)).collect();
    if hidden > 0 && room > 0 {
        let more = format!("… {hidden} more destinations");
        lines.push(Row::new([Cell::from(Line::styled(
            elide_right(&more, widths[COL_DEST]),
            Style::new().add_modifier(Modifier::DIM),
        ))]));
    }

    let table = Table::new(lines, widths.map(|w| Constraint::Length(w as u16)))
        .header(header)
        .column_spacing(SPACING as u16);
    frame.render_widget(table, area);
}

fn table_row<'a>(row: &DestinationView, widths: &[usize; 7]) -> Row<'a> {
    let failures_style = if row.eaddrnotavail > 0 {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else if row.failures > 0 {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new()
    };
    Row::new([
        Cell::from(destination_fit(row, widths[COL_DEST])),
        Cell::from(gauge(row.headroom)),
        Cell::from(Line::from(conn_rate_text(row.conn_per_sec)).right_aligned()),
        Cell::from(Line::from(count_compact(row.time_wait)).right_aligned()),
        Cell::from(Line::styled(count_compact(row.failures), failures_style).right_aligned()),
        Cell::from(process_fit(row, widths[COL_PROCESS])),
        Cell::from(Line::styled(
            elide_right(&outlook_text(&row.forecast), widths[COL_OUTLOOK]),
            outlook_style(&row.forecast),
        )),
    ])
}

/// Green / yellow / red for a used share below 50% / below 80% / from 80%.
fn pressure_color(used: f64) -> Color {
    if used < 0.5 {
        Color::Green
    } else if used < 0.8 {
        Color::Yellow
    } else {
        Color::Red
    }
}

/// A 5-cell bar of the used share (eighth blocks on a dark track), then the percent free.
fn gauge(headroom: Option<f64>) -> Line<'static> {
    const PARTIAL: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let Some(h) = headroom.filter(|h| !h.is_nan()) else {
        return Line::styled("unknown", Style::new().add_modifier(Modifier::DIM));
    };
    let used = used_share(h);
    let eighths = (used * (GAUGE_CELLS * 8) as f64).round() as usize;
    let (full, part) = (eighths / 8, eighths % 8);
    let mut bar = "█".repeat(full);
    bar.push_str(PARTIAL[part]);
    let drawn = full + usize::from(part > 0);
    bar.push_str(&" ".repeat(GAUGE_CELLS - drawn));
    let color = pressure_color(used);
    Line::from(vec![
        Span::styled(bar, Style::new().fg(color).bg(Color::DarkGray)),
        Span::styled(format!(" {:>3}%", free_percent(h)), Style::new().fg(color)),
    ])
}

fn outlook_style(forecast: &Forecast) -> Style {
    match *forecast {
        Forecast::Unknown => Style::new().add_modifier(Modifier::DIM),
        Forecast::Steady { steady_state_share } => {
            Style::new().fg(pressure_color(steady_state_share))
        }
        Forecast::Exhausts { seconds, .. } if seconds.is_infinite() && seconds > 0.0 => {
            Style::new().fg(Color::Yellow)
        }
        Forecast::Exhausts { .. } => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

/// Column widths for a table `total` columns wide. The fixed columns keep their width;
/// DESTINATION gives up room first (down to [`DEST_MIN`]), then TOP PROCESS, then
/// DESTINATION again. Neither grows past its widest text.
fn column_widths(total: usize, rows: &[&DestinationView]) -> [usize; 7] {
    let fixed = HEADROOM_W + CONN_W + TIME_WAIT_W + FAIL_W + OUTLOOK_W + SPACING * 6;
    let avail = total.saturating_sub(fixed);
    let dest_ideal = rows
        .iter()
        .map(|r| text_width(&destination_text(r)))
        .chain([text_width(HEADERS[COL_DEST])])
        .max()
        .unwrap_or(0);
    let process_ideal = rows
        .iter()
        .map(|r| text_width(&process_text(r)))
        .chain([text_width(HEADERS[COL_PROCESS])])
        .max()
        .unwrap_or(0)
        .min(PROCESS_MAX);
    let process = if avail >= dest_ideal + process_ideal {
        process_ideal
    } else {
        process_ideal.min(avail.saturating_sub(DEST_MIN).max(PROCESS_MIN)).min(avail)
    };
    // Spare room stays at the right edge rather than widening DESTINATION.
    let dest = dest_ideal.min(avail - process);
    let mut widths = [0; 7];
    widths[COL_DEST] = dest;
    widths[COL_HEADROOM] = HEADROOM_W;
    widths[COL_CONN] = CONN_W;
    widths[COL_TIME_WAIT] = TIME_WAIT_W;
    widths[COL_FAIL] = FAIL_W;
    widths[COL_PROCESS] = process;
    widths[COL_OUTLOOK] = OUTLOOK_W;
    widths
}

/// Footer text: each namespace's context (those of the top rows first), then `status`.
fn footer_lines(
    rows: &[&DestinationView],
    contexts: &[NetnsContext],
    status: &str,
    width: usize,
) -> Vec<Line<'static>> {
    let mut ordered: Vec<&NetnsContext> = Vec::with_capacity(contexts.len());
    for netns in rows.iter().map(|r| r.key.netns) {
        if !ordered.iter().any(|c| c.netns == netns)
            && let Some(ctx) = contexts.iter().find(|c| c.netns == netns)
        {
            ordered.push(ctx);
        }
    }
    for ctx in contexts {
        if !ordered.iter().any(|c| c.netns == ctx.netns) {
            ordered.push(ctx);
        }
    }
    let mut lines: Vec<Line<'static>> =
        ordered.iter().take(MAX_CONTEXTS).flat_map(|ctx| context_lines(ctx, width)).collect();
    if ordered.len() > MAX_CONTEXTS {
        lines.push(Line::styled(
            format!("+{} more namespaces", ordered.len() - MAX_CONTEXTS),
            Style::new().add_modifier(Modifier::DIM),
        ));
    }
    lines.push(Line::from(status.to_owned()));
    lines
}

/// Drops context lines (never the status line, which is last) to fit `room` lines.
fn fit_footer(mut lines: Vec<Line<'static>>, room: usize) -> Vec<Line<'static>> {
    let room = room.max(1);
    if lines.len() > room {
        let status = lines.pop();
        lines.truncate(room - 1);
        lines.extend(status);
    }
    lines
}

/// One namespace's context, packed into lines of at most `width` columns.
fn context_lines(ctx: &NetnsContext, width: usize) -> Vec<Line<'static>> {
    let mut parts = vec![match ctx.port_range {
        Some((lo, hi)) => {
            format!("ports {lo}–{hi} ({})", u32::from(hi).saturating_sub(u32::from(lo)) + 1)
        }
        None => "ports ?".to_owned(),
    }];
    parts.push(match ctx.tcp_tw_reuse {
        Some(0) => "tcp_tw_reuse 0 (off)".to_owned(),
        Some(1) => "tcp_tw_reuse 1 (on)".to_owned(),
        Some(2) => "tcp_tw_reuse 2 (loopback only)".to_owned(),
        Some(v) => format!("tcp_tw_reuse {v}"),
        None => "tcp_tw_reuse ?".to_owned(),
    });
    if let Some(t) = ctx.tcpext {
        parts.push(format!("TWRecycled {}", t.tw_recycled));
        parts.push(format!("TCPTimeWaitOverflow {}", t.time_wait_overflow));
    }

    let head = format!("netns {}:", ctx.netns);
    let mut lines = Vec::new();
    let mut used = text_width(&head);
    let mut spans = vec![Span::styled(head, Style::new().add_modifier(Modifier::BOLD))];
    // After the head one space; between parts two; none after a continuation indent.
    let mut sep = " ";
    for part in parts {
        let w = text_width(&part);
        if sep == "  " && used + sep.len() + w > width {
            lines.push(Line::from(std::mem::take(&mut spans)));
            spans.push(Span::raw("  "));
            used = 2;
            sep = "";
        }
        spans.push(Span::raw(format!("{sep}{part}")));
        used += sep.len() + w;
        sep = "  ";
    }
    lines.push(Line::from(spans));
    lines
}

// ---------------------------------------------------------------------------------------
// Text width helpers
// ---------------------------------------------------------------------------------------

fn text_width(s: &str) -> usize {
    Span::raw(s).width()
}

fn char_width(c: char) -> usize {
    text_width(c.encode_utf8(&mut [0; 4]))
}

/// `s` in at most `width` columns, cut at the end with `…`.
fn elide_right(s: &str, width: usize) -> String {
    if text_width(s) <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = char_width(c);
        if used + w > width - 1 {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    out
}

/// `s` in at most `width` columns, cut at the start with `…`.
fn elide_left(s: &str, width: usize) -> String {
    if text_width(s) <= width {
        return s.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut kept = Vec::new();
    let mut used = 0;
    for c in s.chars().rev() {
        let w = char_width(c);
        if used + w > width - 1 {
            break;
        }
        kept.push(c);
        used += w;
    }
    std::iter::once('…').chain(kept.into_iter().rev()).collect()
}

// ---------------------------------------------------------------------------------------
// The terminal
// ---------------------------------------------------------------------------------------

/// Whether the terminal is in raw mode on the alternate screen (set by [`Screen::enter`]).
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Leaves the alternate screen and raw mode, once; safe to call from a panic hook.
fn restore_terminal() {
    if ACTIVE.swap(false, atomic::Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Restores the terminal before the previous hook prints the panic, so the message lands
/// on the normal screen and the shell is usable afterwards.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// The live view's terminal: alternate screen and raw mode while it lives.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    /// Enters the alternate screen + raw mode; restores the terminal on drop (also on
    /// panic: a panic hook restores it before the panic message is printed).
    pub fn enter() -> anyhow::Result<Self> {
        if ACTIVE.swap(true, atomic::Ordering::SeqCst) {
            bail!("the live view is already on screen");
        }
        install_panic_hook();
        let setup = || -> anyhow::Result<Terminal<CrosstermBackend<Stdout>>> {
            terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
            // Cleared here rather than with `Terminal::clear`, which asks the terminal for
            // the cursor position and fails where nothing answers.
            execute!(io::stdout(), EnterAlternateScreen, Clear(ClearType::All), cursor::Hide)
                .context("entering the alternate screen")?;
            Terminal::new(CrosstermBackend::new(io::stdout())).context("setting up the terminal")
        };
        match setup() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore_terminal();
                Err(e)
            }
        }
    }

    /// Draws one frame. `status` is a one-line footer text (e.g. events/s, lost events).
    pub fn draw(
        &mut self,
        rows: &[DestinationView],
        contexts: &[NetnsContext],
        sort: SortBy,
        status: &str,
    ) -> anyhow::Result<()> {
        self.terminal
            .draw(|frame| render(frame, rows, contexts, sort, status))
            .context("drawing the live view")?;
        Ok(())
    }

    /// Waits up to `timeout` for a key: q/Esc/Ctrl-C quit, s changes the sort; any other
    /// key, a resize (the next draw adapts) or no event at all gives `None`.
    pub fn poll_key(&mut self, timeout: Duration) -> anyhow::Result<Option<Key>> {
        if !event::poll(timeout).context("waiting for a key")? {
            return Ok(None);
        }
        match event::read().context("reading a key")? {
            Event::Key(key) => Ok(map_key(key)),
            _ => Ok(None),
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn map_key(key: KeyEvent) -> Option<Key> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    match key.code {
        KeyCode::Char('c' | 'C') if ctrl => Some(Key::Quit),
        _ if ctrl => None,
        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Some(Key::Quit),
        KeyCode::Char('s' | 'S') => Some(Key::NextSort),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use ratatui::backend::TestBackend;

    use super::*;
    use crate::pressure::view::{ProcessShare, TcpExt};

    fn row(
        daddr: [u8; 4],
        dport: u16,
        headroom: Option<f64>,
        conn_per_sec: f64,
    ) -> DestinationView {
        let mut view = DestinationView {
            range_size: headroom.map(|_| 28232),
            headroom,
            conn_per_sec,
            ..DestinationView::example(IpAddr::V4(daddr.into()), dport)
        };
        view.key.netns = 4026531840;
        view
    }

    fn ports(rows: &[DestinationView]) -> Vec<u16> {
        rows.iter().map(|r| r.key.dport).collect()
    }

    fn two_rows() -> Vec<DestinationView> {
        let mut a = row([10, 0, 0, 2], 443, Some(0.52), 812.4);
        a.time_wait = 13_456;
        a.live = 12;
        a.failures = 3;
        a.eaddrnotavail = 2;
        a.processes = vec![
            ProcessShare { pid: 4242, comm: "curl".into(), connections: 900 },
            ProcessShare { pid: 7, comm: "wget".into(), connections: 3 },
        ];
        a.forecast = Forecast::Exhausts { seconds: 37.2, steady_state_share: 1.4 };
        let mut b = row([0; 4], 5432, Some(0.9), 2.0);
        b.key.saddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
        b.key.daddr = IpAddr::V6("fd00::5".parse().unwrap());
        b.time_wait = 120;
        b.processes = vec![ProcessShare { pid: 99, comm: "psql".into(), connections: 40 }];
        b.forecast = Forecast::Steady { steady_state_share: 0.61 };
        vec![a, b]
    }

    fn context() -> NetnsContext {
        NetnsContext {
            netns: 4026531840,
            port_range: Some((32768, 60999)),
            tcp_tw_reuse: Some(2),
            tcp_max_tw_buckets: Some(262144),
            tcpext: Some(TcpExt { tw: 10, tw_recycled: 17, tw_killed: 0, time_wait_overflow: 4 }),
        }
    }

    fn draw(width: u16, height: u16, rows: &[DestinationView], sort: SortBy) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| render(f, rows, &[context()], sort, "812 events/s  0 lost")).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    #[test]
    fn sort_by_pressure_puts_least_headroom_first_and_unknown_last() {
        let mut rows = vec![
            row([10, 0, 0, 2], 1, Some(0.9), 100.0),
            row([10, 0, 0, 2], 2, None, 1000.0),
            row([10, 0, 0, 2], 3, Some(0.2), 5.0),
            row([10, 0, 0, 2], 4, Some(0.2), 50.0),
            row([10, 0, 0, 2], 5, Some(f64::NAN), 1.0),
        ];
        sort_rows(&mut rows, SortBy::Pressure);
        assert_eq!(ports(&rows), [4, 3, 1, 2, 5]);
    }

    #[test]
    fn sort_by_the_other_keys() {
        let mut rows = vec![
            row([10, 0, 0, 2], 1, Some(0.9), 100.0),
            row([10, 0, 0, 2], 2, None, 1000.0),
            row([10, 0, 0, 2], 3, Some(0.2), 5.0),
        ];
        rows[0].time_wait = 50;
        rows[1].time_wait = 10;
        rows[2].time_wait = 500;
        rows[0].failures = 4;
        rows[1].failures = 4;
        rows[1].eaddrnotavail = 1;

        sort_rows(&mut rows, SortBy::ConnRate);
        assert_eq!(ports(&rows), [2, 1, 3]);
        sort_rows(&mut rows, SortBy::TimeWait);
        assert_eq!(ports(&rows), [3, 1, 2]);
        sort_rows(&mut rows, SortBy::Failures);
        assert_eq!(ports(&rows), [2, 1, 3]);
    }

    #[test]
    fn sort_key_cycles() {
        let mut sort = SortBy::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(sort.label());
            sort = sort.next();
        }
        assert_eq!(sort, SortBy::Pressure);
        assert_eq!(seen, ["pressure", "conn/s", "TIME_WAIT", "failures"]);
    }

    #[test]
    fn plain_table_for_two_rows() {
        let expected = "\
DESTINATION              HEADROOM          CONN/S  TIME_WAIT  FAIL  TOP PROCESS  OUTLOOK
10.0.0.1 → 10.0.0.2:443  [#####.....] 52%     812      13456     3  curl[4242]   exhausted in 38s
[::1] → [fd00::5]:5432   [#.........] 90%     2.0        120     0  psql[99]     steady 61%
";
        assert_eq!(plain_table(&two_rows()), expected);
    }

    #[test]
    fn plain_table_unknown_range_and_no_process() {
        let out = plain_table(&[row([1, 2, 3, 4], 80, None, 0.0)]);
        let line = out.lines().nth(1).unwrap();
        assert!(line.contains("unknown"), "{line}");
        assert!(line.contains(" - "), "{line}");
        assert!(line.ends_with("range unknown"), "{line}");
    }

    #[test]
    fn screen_shows_destinations_outlook_and_context() {
        let rows = two_rows();
        let screen = draw(120, 12, &rows, SortBy::Pressure).join("\n");
        assert!(screen.contains("twtrace top — port pressure per destination"), "{screen}");
        assert!(screen.contains("q quit  s sort"), "{screen}");
        assert!(screen.contains("10.0.0.1 → 10.0.0.2:443"), "{screen}");
        assert!(screen.contains("[::1] → [fd00::5]:5432"), "{screen}");
        assert!(screen.contains("exhausted in 38s"), "{screen}");
        assert!(screen.contains("steady 61%"), "{screen}");
        assert!(screen.contains("curl[4242]"), "{screen}");
        assert!(screen.contains("ports 32768–60999 (28232)"), "{screen}");
        assert!(screen.contains("tcp_tw_reuse 2 (loopback only)"), "{screen}");
        assert!(screen.contains("TWRecycled 17"), "{screen}");
        assert!(screen.contains("TCPTimeWaitOverflow 4"), "{screen}");
        assert!(screen.contains("812 events/s  0 lost"), "{screen}");
        // Most pressure first: 52% free before 90% free.
        let a = screen.find("10.0.0.2:443").unwrap();
        let b = screen.find("[fd00::5]:5432").unwrap();
        assert!(a < b);
    }

    #[test]
    fn screen_on_80_columns_elides_the_destination_first() {
        let rows = two_rows();
        let lines = draw(80, 14, &rows, SortBy::TimeWait);
        let screen = lines.join("\n");
        assert!(screen.contains("sort: TIME_WAIT"), "{screen}");
        assert!(screen.contains("10.0.0.2:443"), "{screen}");
        assert!(screen.contains("[fd00::5]:5432"), "{screen}");
        assert!(screen.contains("curl[4242]"), "{screen}");
        assert!(screen.contains("exhausted in 38s"), "{screen}");
        assert!(screen.contains(" 52%"), "{screen}");
        // The context wraps rather than being cut, and the status stays last.
        assert!(screen.contains("TCPTimeWaitOverflow 4"), "{screen}");
        assert!(lines.last().unwrap().starts_with("812 events/s"), "{screen}");
    }

    #[test]
    fn screen_without_rows_says_so() {
        let lines = draw(80, 10, &[], SortBy::Pressure);
        let msg = lines.iter().position(|l| l.contains(EMPTY)).expect("message shown");
        assert!((3..=5).contains(&msg), "{lines:#?}");
        let line = &lines[msg];
        let left = line.find(EMPTY).unwrap();
        let right = line.len() - left - EMPTY.len();
        assert!(left.abs_diff(right) <= 1, "{line:?}");
    }

    #[test]
    fn screen_says_how_many_rows_do_not_fit() {
        let rows: Vec<_> = (1..=20).map(|p| row([10, 0, 0, 2], p, Some(0.5), 1.0)).collect();
        let screen = draw(100, 12, &rows, SortBy::Pressure).join("\n");
        assert!(screen.contains("more destinations"), "{screen}");
    }

    #[test]
    fn destination_elision_keeps_the_target() {
        let r = &two_rows()[0];
        assert_eq!(destination_fit(r, 40), "10.0.0.1 → 10.0.0.2:443");
        assert_eq!(destination_fit(r, 20), "….0.1 → 10.0.0.2:443");
        assert_eq!(destination_fit(r, 16), "→ 10.0.0.2:443");
        assert_eq!(destination_fit(r, 8), "…0.2:443");
        assert_eq!(process_fit(r, 10), "curl[4242]");
        assert_eq!(process_fit(r, 8), "c…[4242]");
        assert_eq!(process_fit(r, 5), "curl…");
    }

    #[test]
    fn outlook_texts() {
        let ex = |seconds| Forecast::Exhausts { seconds, steady_state_share: 1.2 };
        assert_eq!(outlook_text(&ex(0.0)), "exhausted now");
        assert_eq!(outlook_text(&ex(99.0)), "exhausted in 99s");
        assert_eq!(outlook_text(&ex(150.0)), "exhausted in 2m");
        assert_eq!(outlook_text(&ex(7_200.0)), "exhausted in 2h");
        assert_eq!(outlook_text(&Forecast::Unknown), "range unknown");
        assert_eq!(headroom_text_bar(Some(0.29)), "[#######...] 29%");
        assert_eq!(headroom_text_bar(Some(1.0)), "[..........] 100%");
        assert_eq!(headroom_text_bar(Some(-0.1)), "[##########] 0%");
    }

    #[test]
    fn keys() {
        let key = |code, modifiers| map_key(KeyEvent::new(code, modifiers));
        assert_eq!(key(KeyCode::Char('q'), KeyModifiers::NONE), Some(Key::Quit));
        assert_eq!(key(KeyCode::Esc, KeyModifiers::NONE), Some(Key::Quit));
        assert_eq!(key(KeyCode::Char('c'), KeyModifiers::CONTROL), Some(Key::Quit));
        assert_eq!(key(KeyCode::Char('s'), KeyModifiers::NONE), Some(Key::NextSort));
        assert_eq!(key(KeyCode::Char('s'), KeyModifiers::CONTROL), None);
        assert_eq!(key(KeyCode::Char('x'), KeyModifiers::NONE), None);
    }
}
