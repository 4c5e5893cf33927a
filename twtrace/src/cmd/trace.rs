//! `twtrace trace` and `twtrace record`: stream events from the kernel, to stdout and/or
//! a recording, until Ctrl-C, SIGTERM or the end of `--duration`.

use std::{
    io::{self, BufWriter},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{KernelArgs, RecordArgs, TraceArgs},
    clock::Clock,
    filter::Filter,
    loader::Tracer,
    model::Model,
    output::{EventSink, Human, JsonLines},
    pipeline::Pipeline,
    priority, privileges,
    rings::EventRings,
    session::{header::Header, writer::RecordingWriter},
};

/// How often a recording gets kernel snapshots of the network namespaces.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(60);

pub async fn trace(args: TraceArgs, verbose: u8) -> anyhow::Result<()> {
    let stdout = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let sink: Box<dyn EventSink> = if args.json {
        Box::new(JsonLines::new(stdout).with_workloads())
    } else {
        Box::new(Human::new(stdout))
    };
    let recording = args.write.map(|path| (path, args.recording));
    run(&args.kernel, args.filter.to_filter()?, Some(sink), recording, None, verbose).await
}

pub async fn record(args: RecordArgs, verbose: u8) -> anyhow::Result<()> {
    let recording = Some((args.output, args.recording));
    run(
        &args.kernel,
        args.filter.to_filter()?,
        None,
        recording,
        args.duration.map(Into::into),
        verbose,
    )
    .await
}

async fn run(
    kernel: &KernelArgs,
    filter: Filter,
    mut sink: Option<Box<dyn EventSink>>,
    recording: Option<(std::path::PathBuf, crate::cli::RecordingArgs)>,
    duration: Option<Duration>,
    verbose: u8,
) -> anyhow::Result<()> {
    privileges::check()?;
    priority::set_nice(kernel.nice)?;
    let clock = Clock::anchor_now();
    // The recording is created before anything is attached, so a bad path fails fast.
    let recorder = match recording {
        Some((path, opts)) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let header = Header::for_this_host(clock.offset_ns(), command);
            Some(RecordingWriter::create(&path, header, opts.rotate, opts.keep as usize)?)
        }
        None => None,
    };

    let mut tracer = Tracer::start(&kernel.to_options(verbose))?;
    // SAFETY (both): each value owns its map fd and keeps it open, unchanged, for as long
    // as the AsyncFd that registered it lives.
    let mut kernel_log = unsafe {
        AsyncFd::register_with_interest(tracer.take_kernel_log()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the kernel log")?;
    let mut events = unsafe {
        AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the event ring buffers")?;

    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    // The kernel wakes us only when enough data waits (WAKEUP_BYTES): drain regularly too.
    let mut drain_tick = tokio::time::interval(crate::loader::DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);

    let snapshot_netns = filter.netns.clone();
    let mut pipeline = Pipeline::new(filter, clock, Some(Model::new()));
    pipeline.recorder = recorder;
    // Recordings start from the sockets that exist, and are corrected now and then, so
    // that `report` sees what `top` would have (and a rotated file stands on its own).
    let mut snapshot_tick = tokio::time::interval(SNAPSHOT_EVERY);
    snapshot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    snapshot_tick.tick().await;
    record_snapshots(events.get_mut(), &mut pipeline, &snapshot_netns)?;

    // Tests and scripts wait for this line: the programs are attached once it is printed.
    eprintln!(
        "twtrace: tracing TCP state changes and failed connects (tracepoints: {}; port search: {}). Ctrl-C to stop.",
        tracer.tracepoints.join(", "),
        tracer.port_search.unwrap_or("none")
    );
    if let Some(sink) = &mut sink {
        sink.begin()?;
        sink.flush()?;
    }
    pipeline.sink = sink;
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("failed to wait for events")?;
                pipeline.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => pipeline.drain(events.get_mut())?,
            guard = kernel_log.readable_mut() => {
                let mut guard = guard.context("failed to wait for the kernel log")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = snapshot_tick.tick() => {
                record_snapshots(events.get_mut(), &mut pipeline, &snapshot_netns)?;
            }
            _ = every_second.tick() => {
                report_losses(&tracer, &mut pipeline)?;
                pipeline.tick()?;
            }
            _ = &mut deadline => break,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Events already in the ring buffers when the signal came are still delivered.
    pipeline.drain_at_exit(events.get_mut())?;
    kernel_log.get_mut().flush();
    report_losses(&tracer, &mut pipeline)?;
    pipeline.finish()?;
    eprintln!("{}", pipeline.summary());
    Ok(())
}

/// Records the kernel's view of the namespaces (when recording). The events already in
/// the ring buffer go first, so that `report` replays them before the snapshot that
/// includes their effect.
fn record_snapshots(
    rings: &mut EventRings,
    pipeline: &mut Pipeline,
    netns: &[u32],
) -> anyhow::Result<()> {
    if pipeline.recorder.is_none() {
        return Ok(());
    }
    pipeline.drain_all(rings)?;
    for snapshot in crate::pressure::snapshots(netns) {
        if let Some(recorder) = &mut pipeline.recorder {
            recorder.netns(&snapshot)?;
        }
    }
    Ok(())
}

fn report_losses(tracer: &Tracer, pipeline: &mut Pipeline) -> anyhow::Result<()> {
    match tracer.counters() {
        Ok(counters) => pipeline.losses(Clock::monotonic_now_ns(), &counters),
        Err(e) => {
            log::warn!("{e:#}");
            Ok(())
        }
    }
}
