//! `twtrace replay` and `twtrace export`: read recordings back through the same pipeline
//! as a live trace, so the output is what `trace` printed.

use std::{
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    cli::{ExportArgs, ExportFormat, ReplayArgs},
    clock::Clock,
    filter::Filter,
    output::{Csv, EventSink, Human, JsonLines},
    pipeline::Pipeline,
    session::{codec::Record, reader::RecordingReader},
};

pub fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let stdout = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let sink: Box<dyn EventSink> =
        if args.json { Box::new(JsonLines::new(stdout)) } else { Box::new(Human::new(stdout)) };
    run(&args.files, args.filter.to_filter()?, sink)
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("failed to create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::with_capacity(64 * 1024, io::stdout().lock())),
    };
    let sink: Box<dyn EventSink> = match args.format {
        ExportFormat::Jsonl => Box::new(JsonLines::new(out)),
        ExportFormat::Csv => Box::new(Csv::new(out)),
    };
    run(&args.files, args.filter.to_filter()?, sink)
}

fn run(files: &[PathBuf], filter: Filter, mut sink: Box<dyn EventSink>) -> anyhow::Result<()> {
    sink.begin()?;
    let mut pipeline: Option<Pipeline> = None;
    let mut sink = Some(sink);
    let mut events = 0u64;
    for path in files {
        let mut reader = RecordingReader::open(path)?;
        // Each file carries its own clock anchor (rotated files share the first's).
        let clock = Clock::from_offset(reader.header().clock_offset_ns);
        let p = pipeline.get_or_insert_with(|| {
            let mut p = Pipeline::new(filter.clone(), clock, None);
            p.sink = sink.take();
            p
        });
        p.clock = clock;
        log::info!(
            "{}: recorded on {} (kernel {}) by twtrace {}: {}",
            path.display(),
            reader.header().hostname,
            reader.header().kernel_release,
            reader.header().twtrace_version,
            reader.header().command
        );
        while let Some(record) = reader.next_record()? {
            for problem in reader.take_problems() {
                warn(path, &problem);
            }
            match record {
                Record::Event(event) => {
                    events += 1;
                    p.tally.seen += 1;
                    p.event(event)?;
                }
                Record::Lost { ts_ns, counters } => p.losses(ts_ns, &counters)?,
                Record::End { .. } | Record::Netns(_) => {}
            }
        }
        for problem in reader.take_problems() {
            warn(path, &problem);
        }
        if !reader.stats.clean_end {
            eprintln!(
                "twtrace: note: {} has no end marker: the recording was not closed cleanly (killed, or still being written)",
                path.display()
            );
        }
        p.flush()?;
    }
    if let Some(p) = &mut pipeline {
        p.finish()?;
        eprintln!(
            "twtrace: replayed {events} events from {} file(s), {} shown, {} lost while recording",
            files.len(),
            p.tally.shown,
            p.lost_events()
        );
    }
    Ok(())
}

fn warn(path: &Path, problem: &crate::session::reader::Problem) {
    if problem.bytes > 0 {
        eprintln!(
            "twtrace: warning: {}: {} bytes at offset {}: {}",
            path.display(),
            problem.bytes,
            problem.offset,
            problem.what
        );
    } else {
        eprintln!(
            "twtrace: warning: {}: at offset {}: {}",
            path.display(),
            problem.offset,
            problem.what
        );
    }
}
