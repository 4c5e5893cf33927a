//! Writes recordings: buffered, flushed every second (what is on disk is then complete
//! frames, up to one second behind), synced to disk every few seconds on a thread of its
//! own, optionally rotated by size or age with only the newest files kept.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{FORMAT_MAJOR, FORMAT_MINOR, MAGIC, codec::Encoder, frame, header::Header};
use crate::event::Event;

/// When to start a new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// After this many bytes.
    Size(u64),
    /// After this long.
    Age(Duration),
}

impl std::str::FromStr for Rotation {
    type Err = String;

    /// `100MB`, `1GiB`, `512KB` (sizes) or `30s`, `10m`, `1h` (ages).
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = crate::cli::number_and_unit(s)
            .ok_or_else(|| format!("`{s}` is not a size (100MB) or an age (1h)"))?;
        let size = |mult: u64| Ok(Rotation::Size(n.saturating_mul(mult)));
        let rotation = match unit.to_ascii_lowercase().as_str() {
            "b" => size(1),
            "kb" | "kib" => size(1 << 10),
            "mb" | "mib" => size(1 << 20),
            "gb" | "gib" => size(1 << 30),
            "s" => Ok(Rotation::Age(Duration::from_secs(n))),
            "m" | "min" => Ok(Rotation::Age(Duration::from_secs(n * 60))),
            "h" => Ok(Rotation::Age(Duration::from_secs(n * 3600))),
            _ => Err(format!("`{s}`: use a size like 100MB or an age like 10m or 1h")),
        }?;
        match rotation {
            Rotation::Size(b) if b < 64 * 1024 => Err(format!("`{s}` is too small: at least 64KB")),
            Rotation::Age(d) if d < Duration::from_secs(1) => {
                Err(format!("`{s}` is too short: at least 1s"))
            }
            r => Ok(r),
        }
    }
}

/// How often buffered frames go to the file, and the file to the disk.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const SYNC_EVERY: Duration = Duration::from_secs(5);
/// Buffered bytes that trigger an early write.
const BUFFER_BYTES: usize = 256 * 1024;

pub struct RecordingWriter {
    base: PathBuf,
    rotation: Option<Rotation>,
    keep: usize,
    header: Header,
    file: File,
    path: PathBuf,
    index: u32,
    file_bytes: u64,
    opened: Instant,
    last_flush: Instant,
    last_sync: Instant,
    sync: BackgroundSync,
    buf: Vec<u8>,
    enc: Encoder,
    events_in_file: u64,
    /// Events written over all files.
    events: u64,
    /// Bytes written over all files.
    bytes: u64,
}

/// The path of rotated file number `index`: `cap.twtrace` -> `cap.0001.twtrace`.
pub fn rotated_path(base: &Path, index: u32) -> PathBuf {
    let stem = base.file_stem().unwrap_or_default().to_string_lossy();
    let name = match base.extension() {
        Some(ext) => format!("{stem}.{index:04}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{index:04}"),
    };
    base.with_file_name(name)
}

fn create(path: &Path, header: &Header) -> anyhow::Result<(File, u64)> {
    // Recordings hold addresses and process names: owner-only, as tcpdump -w does not.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    let mut start = Vec::with_capacity(512);
    start.extend_from_slice(&MAGIC);
    start.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    start.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    frame::put_frame(&mut start, frame::kind::HEADER, &header.encode());
    file.write_all(&start).with_context(|| format!("failed to write to {}", path.display()))?;
    Ok((file, start.len() as u64))
}

impl RecordingWriter {
    pub fn create(
        base: &Path,
        header: Header,
        rotation: Option<Rotation>,
        keep: usize,
    ) -> anyhow::Result<Self> {
        let index = u32::from(rotation.is_some());
        let path = if rotation.is_some() { rotated_path(base, index) } else { base.to_path_buf() };
        let (file, file_bytes) = create(&path, &header)?;
        let now = Instant::now();
        Ok(Self {
            base: base.to_path_buf(),
            rotation,
            keep: keep.max(1),
            header,
            file,
            path,
            index,
            file_bytes,
            opened: now,
            last_flush: now,
            last_sync: now,
            sync: BackgroundSync::default(),
            buf: Vec::with_capacity(BUFFER_BYTES + 4096),
            enc: Encoder::new(),
            events_in_file: 0,
            events: 0,
            bytes: file_bytes,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        self.enc.event(event, &mut self.buf);
        self.events += 1;
        self.events_in_file += 1;
        if self.buf.len() >= BUFFER_BYTES {
            self.write_buffer()?;
        }
        Ok(())
    }

    /// Records the kernel-side counters (cumulative) at `ts_ns`.
    pub fn lost(&mut self, ts_ns: u64, counters: &[u64]) -> anyhow::Result<()> {
        self.enc.lost(ts_ns, counters, &mut self.buf);
        Ok(())
    }

    /// Records what the kernel had in one network namespace.
    pub fn netns(
        &mut self,
        snapshot: &crate::pressure::aggregator::NetnsSnapshot,
    ) -> anyhow::Result<()> {
        self.enc.netns(snapshot, &mut self.buf);
        if self.buf.len() >= BUFFER_BYTES {
            self.write_buffer()?;
        }
        Ok(())
    }

    /// Periodic work: write buffered frames, sync to disk, rotate.
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.write_buffer()?;
            self.last_flush = Instant::now();
        }
        // A sync still running (a slow disk) is not stacked upon: the next tick retries.
        if self.last_sync.elapsed() >= SYNC_EVERY && !self.sync.running() {
            let file = self
                .file
                .try_clone()
                .with_context(|| format!("failed to sync {}", self.path.display()))?;
            self.sync.start(file, &self.path, Durability::Data)?;
            self.last_sync = Instant::now();
        }
        let due = match self.rotation {
            Some(Rotation::Size(max)) => self.file_bytes >= max,
            Some(Rotation::Age(max)) => self.opened.elapsed() >= max,
            None => false,
        };
        if due {
            self.rotate()?;
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> anyhow::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .with_context(|| format!("failed to write to {}", self.path.display()))?;
        self.file_bytes += self.buf.len() as u64;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        if matches!(self.rotation, Some(Rotation::Size(max)) if self.file_bytes >= max) {
            self.rotate()?;
        }
        Ok(())
    }

    /// Ends the current file cleanly and starts the next; deletes files beyond `keep`.
    fn rotate(&mut self) -> anyhow::Result<()> {
        self.end_file()?;
        self.index += 1;
        let path = rotated_path(&self.base, self.index);
        let (file, bytes) = create(&path, &self.header)?;
        let ended = std::mem::replace(&mut self.file, file);
        self.sync.start(ended, &self.path, Durability::All)?;
        self.path = path;
        self.file_bytes = bytes;
        self.bytes += bytes;
        self.opened = Instant::now();
        self.events_in_file = 0;
        self.enc.restart();
        if self.index as usize > self.keep {
            let old = rotated_path(&self.base, self.index - self.keep as u32);
            if let Err(e) = std::fs::remove_file(&old) {
                log::warn!("failed to remove old recording {}: {e}", old.display());
            }
        }
        Ok(())
    }

    /// Writes the end marker and everything buffered to the current file.
    fn end_file(&mut self) -> anyhow::Result<()> {
        self.enc.end(self.events_in_file, &mut self.buf);
        let rotation = self.rotation.take();
        let result = self.write_buffer();
        self.rotation = rotation;
        result
    }

    /// Writes the end marker and everything buffered, syncs to disk (waiting for it), and
    /// returns the events and bytes written over all files.
    pub fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        self.end_file()?;
        self.sync.wait()?;
        self.file.sync_all().with_context(|| format!("failed to sync {}", self.path.display()))?;
        Ok((self.events, self.bytes))
    }
}

/// What a sync makes durable.
#[derive(Clone, Copy)]
enum Durability {
    /// The data (`fdatasync`): the periodic sync of the file being written.
    Data,
    /// Data and metadata (`fsync`): a file that is complete.
    All,
}

/// Syncs recordings to disk on a thread, one sync at a time. A sync of a busy recording
/// takes tens of milliseconds (39 ms for 66 MB here), and the reader that waited for it
/// would leave the kernel's rings undrained meanwhile: at 600,000 events/s a CPU's ring
/// fills in ~30 ms, and events would be lost. A failed sync fails the recording, at the
/// next sync or at the end.
#[derive(Default)]
struct BackgroundSync {
    pending: Option<(PathBuf, JoinHandle<std::io::Result<()>>)>,
}

impl BackgroundSync {
    /// Whether a sync is still running.
    fn running(&self) -> bool {
        self.pending.as_ref().is_some_and(|(_, sync)| !sync.is_finished())
    }

    /// Starts syncing `file` (which the thread then closes), after the sync before it.
    fn start(&mut self, file: File, path: &Path, durability: Durability) -> anyhow::Result<()> {
        self.wait()?;
        let sync = std::thread::Builder::new()
            .name("twtrace-sync".into())
            .spawn(move || match durability {
                Durability::Data => file.sync_data(),
                Durability::All => file.sync_all(),
            })
            .with_context(|| format!("failed to start syncing {}", path.display()))?;
        self.pending = Some((path.to_path_buf(), sync));
        Ok(())
    }

    /// Waits for the sync in flight, if any, and reports how it went.
    fn wait(&mut self) -> anyhow::Result<()> {
        let Some((path, sync)) = self.pending.take() else {
            return Ok(());
        };
        let result = sync.join().map_err(|_| anyhow::anyhow!("the sync thread panicked"));
        result?.with_context(|| format!("failed to sync {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_values() {
        assert_eq!("100MB".parse(), Ok(Rotation::Size(100 << 20)));
        assert_eq!("1GiB".parse(), Ok(Rotation::Size(1 << 30)));
        assert_eq!("10m".parse(), Ok(Rotation::Age(Duration::from_secs(600))));
        assert_eq!("1h".parse(), Ok(Rotation::Age(Duration::from_secs(3600))));
        assert!("100".parse::<Rotation>().is_err());
        assert!("1KB".parse::<Rotation>().is_err());
        assert!("lots".parse::<Rotation>().is_err());
    }

    /// Rotation by size, with each ended file synced in the background: every file kept
    /// reads back whole, up to its end frame, and the older ones are gone.
    #[test]
    fn rotated_files_end_cleanly() {
        use crate::session::{codec::Record, reader::RecordingReader};
        let dir = std::env::temp_dir().join(format!("twtrace-writer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("cap.twtrace");
        let header = Header::for_this_host(0, "test".into());
        let mut writer =
            RecordingWriter::create(&base, header, Some(Rotation::Size(64 * 1024)), 3).unwrap();
        let events = crate::session::codec::tests::sample_events();
        // ~2.4 MB: the buffer goes to the file every 256 KiB, each write past 64 KiB.
        for _ in 0..2000 {
            for e in &events {
                writer.event(e).unwrap();
            }
            writer.tick().unwrap();
        }
        let (written, _) = writer.finish().unwrap();
        assert_eq!(written, 2000 * events.len() as u64);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(!files.contains(&rotated_path(&base, 1)), "the oldest were removed: {files:?}");
        for file in &files {
            let mut reader = RecordingReader::open(file).unwrap();
            let mut last = None;
            while let Some(record) = reader.next_record().unwrap() {
                last = Some(record);
            }
            assert!(
                matches!(last, Some(Record::End { .. })),
                "{} ends with {last:?}",
                file.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotated_names() {
        assert_eq!(rotated_path(Path::new("/x/cap.twtrace"), 7), Path::new("/x/cap.0007.twtrace"));
        assert_eq!(rotated_path(Path::new("cap"), 12), Path::new("cap.0012"));
    }
}
