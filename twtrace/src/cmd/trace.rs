//! `twtrace trace`: stream events from the kernel to stdout until Ctrl-C or SIGTERM.

use std::{
    io::{self, BufWriter},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use twtrace_common::counters;

use crate::{
    cli::TraceArgs,
    clock::Clock,
    loader::Tracer,
    model::Model,
    output::{EventSink, Human, JsonLines},
    pipeline::{Pipeline, Tally},
    privileges,
};

pub async fn run(args: TraceArgs, verbose: u8) -> anyhow::Result<()> {
    privileges::check()?;
    let filter = args.filter.to_filter();
    let stdout = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut sink: Box<dyn EventSink> = if args.json {
        Box::new(JsonLines::new(stdout))
    } else {
        Box::new(Human::new(stdout))
    };

    let mut tracer = Tracer::start(&args.kernel.to_options(verbose))?;
    // SAFETY (both): each value owns its map fd and keeps it open, unchanged, for as long
    // as the AsyncFd that registered it lives.
    let mut kernel_log = unsafe {
        AsyncFd::register_with_interest(tracer.take_kernel_log()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the kernel log")?;
    let mut events = unsafe {
        AsyncFd::register_with_interest(tracer.take_events()?, tokio::io::Interest::READABLE)
    }
    .context("failed to poll the event ring buffer")?;

    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let mut lost_seen = [0u64; counters::COUNT as usize];

    // Tests and scripts wait for this line: the programs are attached once it is printed.
    eprintln!(
        "twtrace: tracing TCP state changes and failed connects (tracepoints: {}; port search: {}). Ctrl-C to stop.",
        tracer.tracepoints.join(", "),
        tracer.port_search.unwrap_or("none")
    );
    sink.begin()?;
    sink.flush()?;
    let mut pipeline = Pipeline {
        filter,
        sink,
        clock: Clock::anchor_now(),
        model: Model::new(),
        tally: Tally::default(),
    };
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("failed to wait for events")?;
                drain(guard.get_inner_mut(), &mut pipeline)?;
                guard.clear_ready();
            }
            guard = kernel_log.readable_mut() => {
                let mut guard = guard.context("failed to wait for the kernel log")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = lost_check.tick() => report_new_losses(&tracer, &mut lost_seen),
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Events already in the ring buffer when the signal came are still delivered.
    drain(events.get_mut(), &mut pipeline)?;
    kernel_log.get_mut().flush();
    report_new_losses(&tracer, &mut lost_seen);
    let lost = lost_seen[counters::RINGBUF_FULL as usize];
    eprintln!("{}", pipeline.summary(lost));
    Ok(())
}

/// Decodes, filters and writes every record waiting in the ring buffer.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline,
) -> anyhow::Result<()> {
    while let Some(record) = ring.next() {
        pipeline.record(&record)?;
    }
    pipeline.sink.flush()?;
    Ok(())
}

/// Prints on stderr whatever the kernel side could not do since the last call.
fn report_new_losses(tracer: &Tracer, seen: &mut [u64; counters::COUNT as usize]) {
    let now = match tracer.counters() {
        Ok(now) => now,
        Err(e) => {
            log::warn!("{e:#}");
            return;
        }
    };
    for (i, (&n, prev)) in now.iter().zip(seen.iter_mut()).enumerate() {
        if n > *prev {
            let hint = match i as u32 {
                counters::RINGBUF_FULL => "; raise --ring-buffer-size",
                counters::SOCKET_TABLE_FULL => "; raise --max-sockets",
                _ => "",
            };
            eprintln!(
                "twtrace: warning: {} x {}{hint}",
                n - *prev,
                counters::NAMES[i]
            );
            *prev = n;
        }
    }
}
