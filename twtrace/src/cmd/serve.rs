//! `twtrace serve`: the daemon. Runs the port-pressure aggregator continuously, exposes
//! Prometheus metrics, optionally records; SIGHUP re-reads the filter file, SIGTERM and
//! SIGINT flush and exit 0.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{FilterArgs, ServeArgs},
    clock::Clock,
    filter::Filter,
    loader::{self, Tracer},
    metrics::{self, MetricsState},
    model::Model,
    pipeline::Pipeline,
    pressure::aggregator::Aggregator,
    priority, privileges,
    session::{header::Header, writer::RecordingWriter},
};

/// How often the daemon corrects its model from the kernel's socket lists, and records a
/// snapshot when recording.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(30);

/// What the tracing loop and the metrics endpoint share.
struct Shared {
    aggregator: Aggregator,
    metrics: MetricsState,
}

pub async fn serve(args: ServeArgs, verbose: u8) -> anyhow::Result<()> {
    privileges::check()?;
    priority::set_nice(args.kernel.nice)?;
    privileges::warn_if_namespaces_hidden();
    let filter = current_filter(&args.filter, args.filters.as_deref())?;
    let clock = Clock::anchor_now();
    let recorder = match &args.write {
        Some(path) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let header = Header::for_this_host(clock.offset_ns(), command);
            Some(RecordingWriter::create(
                path,
                header,
                args.recording.rotate,
                args.recording.keep as usize,
            )?)
        }
        None => None,
    };
    // Bind before attaching: a taken port is the commonest mistake, fail fast on it.
    let listener = metrics::bind(args.metrics_addr).await?;
    let mut tracer = Tracer::start(&args.kernel.to_options(verbose))?;
    let _run_statistics = match args.no_bpf_stats {
        true => None,
        false => match loader::enable_run_statistics() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("{e:#}: twtrace_bpf_run_seconds_total will be missing");
                None
            }
        },
    };
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as
    // the AsyncFd that registered it lives.
    let mut events = unsafe {
        AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the event ring buffer")?;

    let by_process = !filter.workloads.is_empty();
    let shared = Arc::new(Mutex::new(Shared {
        aggregator: Aggregator::new().only_observed(by_process),
        metrics: MetricsState::new(args.top),
    }));
    let metrics_view = Arc::new(Mutex::new(MetricsState::new(args.top)));
    let http = tokio::spawn(metrics::serve_http(listener, Arc::clone(&metrics_view)));

    let mut pipeline = Pipeline::new(filter, clock, Some(Model::new()));
    pipeline.recorder = recorder;
    let tap_shared = Arc::clone(&shared);
    pipeline.tap = Some(Box::new(move |event| {
        if let Ok(mut s) = tap_shared.lock() {
            s.aggregator.observe(event);
            s.metrics.event(event);
        }
    }));
    snapshot(&shared, &mut pipeline)?;

    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("failed to handle SIGHUP")?;
    let mut drain_tick = tokio::time::interval(loader::DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let mut snapshot_tick = tokio::time::interval(SNAPSHOT_EVERY);
    snapshot_tick.tick().await;
    eprintln!(
        "twtrace: serving metrics on http://{}/metrics (tracepoints: {}; port search: {})",
        args.metrics_addr,
        tracer.tracepoints.join(", "),
        tracer.port_search.unwrap_or("none")
    );
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("failed to wait for events")?;
                pipeline.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => pipeline.drain(events.get_mut())?,
            _ = every_second.tick() => {
                pipeline.drain(events.get_mut())?;
                if let Ok(counters) = tracer.counters() {
                    pipeline.losses(Clock::monotonic_now_ns(), &counters)?;
                }
                pipeline.tick()?;
                publish(&shared, &metrics_view, &tracer, pipeline.lost_events());
            }
            _ = snapshot_tick.tick() => {
                // Events already waiting go first: the snapshot includes their effect.
                pipeline.drain_all(events.get_mut())?;
                snapshot(&shared, &mut pipeline)?;
            }
            _ = sighup.recv() => match current_filter(&args.filter, args.filters.as_deref()) {
                Ok(filter) => {
                    eprintln!("twtrace: SIGHUP: filters reloaded");
                    pipeline.filter = filter;
                }
                Err(e) => eprintln!("twtrace: SIGHUP: keeping the current filters: {e:#}"),
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    http.abort();
    pipeline.drain_at_exit(events.get_mut())?;
    pipeline.finish()?;
    eprintln!("{}", pipeline.summary());
    Ok(())
}

/// The filters from the command line, then those of the filter file (re-read on SIGHUP):
/// `trace`'s filter options, any number per line, `#` comments.
fn current_filter(cli: &FilterArgs, file: Option<&Path>) -> anyhow::Result<Filter> {
    let Some(path) = file else {
        return cli.to_filter();
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the filter file {}", path.display()))?;
    let words = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(str::split_whitespace);
    #[derive(Parser)]
    #[command(name = "filter file", no_binary_name = true)]
    struct FilterFile {
        #[command(flatten)]
        filter: FilterArgs,
    }
    let parsed = FilterFile::try_parse_from(words)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.render().to_string().trim()))?;
    Ok(cli.to_filter()?.merged_with(parsed.filter.to_filter()?))
}

/// Reads the namespaces' sockets into the model (and the recording).
fn snapshot(shared: &Mutex<Shared>, pipeline: &mut Pipeline) -> anyhow::Result<()> {
    let netns = pipeline.filter.netns.clone();
    for snapshot in crate::pressure::snapshots(&netns) {
        if let Some(recorder) = &mut pipeline.recorder {
            recorder.netns(&snapshot)?;
        }
        if let Ok(mut s) = shared.lock() {
            let drift = s.aggregator.snapshot(&snapshot);
            log::debug!("netns {}: reconciled with the kernel: {drift:?}", snapshot.context.netns);
        }
    }
    Ok(())
}

/// Copies what a scrape shows out of the tracing side, so a scrape never waits on it.
fn publish(shared: &Mutex<Shared>, view: &Mutex<MetricsState>, tracer: &Tracer, lost: u64) {
    let Ok(mut s) = shared.lock() else {
        return;
    };
    s.aggregator.tick(Clock::monotonic_now_ns());
    let destinations = s.aggregator.views();
    let contexts = s.aggregator.contexts().cloned().collect();
    s.metrics.destinations = destinations;
    s.metrics.contexts = contexts;
    s.metrics.lost_events = lost;
    s.metrics.programs = tracer.program_stats();
    if let Ok(mut v) = view.lock() {
        v.clone_from(&s.metrics);
    }
}
