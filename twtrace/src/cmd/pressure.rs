//! `twtrace top` (live port pressure per destination) and `twtrace report` (the same
//! analysis over recordings).

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{ReportArgs, TopArgs},
    clock::Clock,
    container::{CgroupResolver, WorkloadFilter},
    event::{self, Event},
    loader::Tracer,
    model::Model,
    pressure::{
        aggregator::Aggregator,
        report::Sampler,
        screen::{Key, Screen, SortBy, plain_table, sort_rows},
    },
    priority, privileges,
    rings::EventRings,
    session::{codec::Record, reader::RecordingReader},
};

pub async fn top(args: TopArgs, verbose: u8) -> anyhow::Result<()> {
    privileges::check()?;
    priority::set_nice(args.kernel.nice)?;
    privileges::warn_if_namespaces_hidden();
    let mut tracer = Tracer::start(&args.kernel.to_options(verbose))?;
    // SAFETY: the event rings own their epoll fd and keep it open, unchanged, for as long as
    // the AsyncFd that registered it lives.
    let mut events = unsafe {
        AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the event ring buffer")?;
    let workloads = args.workloads.to_filter()?;
    let mut source = Source { model: Model::new(), resolver: CgroupResolver::new(), workloads };
    let mut aggregator = Aggregator::new().only_observed(!source.workloads.is_empty());
    // A true start: the sockets that exist already.
    snapshot(&mut aggregator, &args.netns);

    let interactive = !args.once && std::io::stdout().is_terminal();
    if !interactive {
        // Scripts and tests wait for this line: the programs are attached.
        eprintln!(
            "twtrace: watching port pressure (tracepoints: {}); the table follows in {} s",
            tracer.tracepoints.join(", "),
            args.interval
        );
    }
    let mut screen = if interactive { Some(Screen::enter()?) } else { None };
    // Log lines on the terminal would tear the screen: hold them while it is up.
    let log_level = log::max_level();
    if interactive {
        log::set_max_level(log::LevelFilter::Off);
    }
    let mut sort = SortBy::Pressure;
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut drain_tick = tokio::time::interval(crate::loader::DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = Duration::from_secs_f64(args.interval);
    let mut refresh = tokio::time::interval(interval);
    refresh.tick().await;
    let mut reconcile = tokio::time::interval(Duration::from_secs(args.reconcile));
    reconcile.tick().await;
    let mut seen = 0u64;
    let mut seen_at_last_frame = 0u64;
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("failed to wait for events")?;
                seen += drain(guard.get_inner_mut(), false, &mut aggregator, &mut source, &args.netns);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                seen += drain(events.get_mut(), false, &mut aggregator, &mut source, &args.netns);
                if let Some(s) = &mut screen {
                    match s.poll_key(Duration::ZERO)? {
                        Some(Key::Quit) => break,
                        Some(Key::NextSort) => {
                            sort = sort.next();
                            draw(s, &mut aggregator, sort, seen, 0.0)?;
                        }
                        None => {}
                    }
                }
            }
            _ = refresh.tick() => {
                seen += drain(events.get_mut(), false, &mut aggregator, &mut source, &args.netns);
                aggregator.tick(Clock::monotonic_now_ns());
                let rate = (seen - seen_at_last_frame) as f64 / interval.as_secs_f64();
                seen_at_last_frame = seen;
                match &mut screen {
                    Some(s) => draw(s, &mut aggregator, sort, seen, rate)?,
                    None => {
                        let mut rows = filtered_views(&mut aggregator, &args.netns);
                        sort_rows(&mut rows, sort);
                        let text = if args.json {
                            let netns: Vec<_> = aggregator
                                .contexts()
                                .filter(|c| args.netns.is_empty() || args.netns.contains(&c.netns))
                                .cloned()
                                .collect();
                            let doc = serde_json::json!({ "destinations": rows, "netns": netns });
                            format!("{doc:#}\n")
                        } else {
                            plain_table(&rows)
                        };
                        let mut out = std::io::stdout().lock();
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                        break;
                    }
                }
            }
            _ = reconcile.tick() => {
                // Events already waiting go first: the snapshot includes their effect.
                seen += drain(events.get_mut(), true, &mut aggregator, &mut source, &args.netns);
                snapshot(&mut aggregator, &args.netns);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(screen);
    log::set_max_level(log_level);
    Ok(())
}

fn draw(
    screen: &mut Screen,
    aggregator: &mut Aggregator,
    sort: SortBy,
    seen: u64,
    rate: f64,
) -> anyhow::Result<()> {
    let mut rows = aggregator.views();
    sort_rows(&mut rows, sort);
    let contexts: Vec<_> = aggregator.contexts().cloned().collect();
    let status = format!("{seen} events, {rate:.0}/s");
    screen.draw(&rows, &contexts, sort, &status)
}

fn filtered_views(
    aggregator: &mut Aggregator,
    netns: &[u32],
) -> Vec<crate::pressure::view::DestinationView> {
    aggregator
        .views()
        .into_iter()
        .filter(|v| netns.is_empty() || netns.contains(&v.key.netns))
        .collect()
}

/// Corrects the model with what the kernel has now (every namespace, or those asked for).
fn snapshot(aggregator: &mut Aggregator, only: &[u32]) {
    for snapshot in crate::pressure::snapshots(only) {
        let drift = aggregator.snapshot(&snapshot);
        log::debug!("netns {}: reconciled with the kernel: {drift:?}", snapshot.context.netns);
    }
}

/// What decides which events reach the aggregator.
struct Source {
    model: Model,
    resolver: CgroupResolver,
    workloads: WorkloadFilter,
}

/// Feeds the aggregator the events the rings hold: as far as they can be put in time order
/// yet, or all of them (`all`, before a snapshot); returns how many.
fn drain(
    rings: &mut EventRings,
    all: bool,
    aggregator: &mut Aggregator,
    source: &mut Source,
    netns: &[u32],
) -> u64 {
    let mut n = 0;
    let feed = |record: &[u8]| {
        n += 1;
        source.feed(record, aggregator, netns);
        Ok(())
    };
    let _ = if all { rings.drain_all(feed) } else { rings.drain(feed) };
    n
}

impl Source {
    fn feed(&mut self, record: &[u8], aggregator: &mut Aggregator, netns: &[u32]) {
        match event::decode(record) {
            Ok(mut e) => {
                self.model.observe(&mut e);
                if !netns.is_empty() && !netns.contains(&e.netns()) {
                    return;
                }
                if !self.workloads.is_empty() {
                    let cgroup = e.owner().map_or(0, |o| o.cgroup);
                    if !self.resolver.matches(cgroup, &self.workloads) {
                        return;
                    }
                }
                aggregator.observe(&e);
            }
            Err(e) => log::warn!("skipped a kernel record: {e}"),
        }
    }
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let mut aggregator = Aggregator::new();
    let mut sampler = Sampler::default();
    for path in &args.files {
        let mut reader = RecordingReader::open(path)?;
        while let Some(record) = reader.next_record()? {
            match record {
                Record::Event(e) => {
                    sampler.maybe_sample(&mut aggregator, e.ts_ns());
                    if matches!(e, Event::Failure(_)) {
                        sampler.failure();
                    }
                    aggregator.observe(&e);
                }
                Record::Netns(snapshot) => {
                    aggregator.snapshot(&snapshot);
                }
                Record::Lost { .. } | Record::End { .. } => {}
            }
        }
        for problem in reader.take_problems() {
            eprintln!("twtrace: warning: {}: {}", path.display(), problem.what);
        }
    }
    let report = sampler.finish(&mut aggregator);
    if let Some(path) = &args.svg {
        write_file(path, &report.svg())?;
    }
    if let Some(path) = &args.html {
        write_file(path, &report.html())?;
    }
    let text =
        if args.json { format!("{:#}\n", serde_json::to_value(&report)?) } else { report.text() };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn write_file(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("failed to write {}", path.display()))
}
