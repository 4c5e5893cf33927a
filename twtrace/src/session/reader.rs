//! Reads recordings, recovering what can be recovered: a damaged region is skipped up to
//! the next valid frame (and its chunk up to the next sync point), a torn tail is
//! discarded; each is reported with its offset, size and reason. Never panics on input.

use std::{fs::File, io::Read, path::Path};

use anyhow::{Context as _, bail};

use super::{
    FORMAT_MAJOR, MAGIC,
    codec::{Decoder, Record, RecordError},
    frame::{self, Parsed},
    header::Header,
};

/// Something wrong with the file that the reader worked around.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Byte offset in the file where it starts.
    pub offset: u64,
    /// Bytes skipped or discarded (0 for a frame that was dropped whole).
    pub bytes: u64,
    pub what: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub frames: u64,
    pub records: u64,
    /// Bytes skipped over in damaged regions (not counting a torn tail).
    pub skipped_bytes: u64,
    /// Valid frames that could not be used (e.g. after damage, before the next sync point).
    pub dropped_frames: u64,
    /// The file ends with the writer's end marker.
    pub clean_end: bool,
    /// Bytes discarded at the end: a frame cut short.
    pub tail_discarded: u64,
}

const READ_CHUNK: usize = 1 << 20;
const PREFIX: usize = MAGIC.len() + 4;

pub struct RecordingReader<R = File> {
    src: R,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..]`; `base` is the file offset of `buf[0]`.
    start: usize,
    base: u64,
    eof: bool,
    header: Header,
    decoder: Decoder,
    problems: Vec<Problem>,
    /// Inside a damaged region: frames are dropped until a sync point.
    damaged: bool,
    pub stats: ReadStats,
}

impl RecordingReader<File> {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file =
            File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
        Self::new(file).with_context(|| format!("cannot read {}", path.display()))
    }
}

impl<R: Read> RecordingReader<R> {
    pub fn new(src: R) -> anyhow::Result<Self> {
        let mut reader = Self {
            src,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            base: 0,
            eof: false,
            header: Header::default(),
            decoder: Decoder::new(),
            problems: Vec::new(),
            damaged: false,
            stats: ReadStats::default(),
        };
        while reader.buf.len() < PREFIX && !reader.eof {
            reader.fill()?;
        }
        if reader.buf.len() < MAGIC.len() || reader.buf[..MAGIC.len()] != MAGIC {
            if reader.buf.is_empty() {
                bail!("the file is empty: not a twtrace recording");
            }
            bail!("not a twtrace recording (it does not start with twtrace's signature)");
        }
        if reader.buf.len() < PREFIX {
            bail!("the file is truncated: it ends inside the twtrace header");
        }
        let major = u16::from_le_bytes([reader.buf[8], reader.buf[9]]);
        let minor = u16::from_le_bytes([reader.buf[10], reader.buf[11]]);
        if major > FORMAT_MAJOR {
            bail!(
                "written by a newer twtrace (recording format {major}.{minor}); this twtrace reads \
                 format {FORMAT_MAJOR}.x: upgrade twtrace to read it"
            );
        }
        reader.start = PREFIX;
        loop {
            match frame::parse_frame(&reader.buf[reader.start..]) {
                Parsed::Frame { kind: frame::kind::HEADER, payload, len } => {
                    reader.header = Header::decode(payload).context("the header is damaged")?;
                    reader.start += len;
                    reader.stats.frames += 1;
                    return Ok(reader);
                }
                Parsed::Incomplete if !reader.eof => reader.fill()?,
                Parsed::Incomplete => {
                    bail!("the file is truncated: it ends inside the twtrace header")
                }
                Parsed::Frame { .. } | Parsed::Invalid(_) => bail!("the header is damaged"),
            }
        }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Problems found since the last call.
    pub fn take_problems(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.problems)
    }

    fn offset(&self) -> u64 {
        self.base + self.start as u64
    }

    /// Reads more of the file into the buffer, dropping what was consumed.
    fn fill(&mut self) -> anyhow::Result<()> {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.base += self.start as u64;
            self.start = 0;
        }
        // read_to_end fills spare capacity without zeroing it first.
        let n = (&mut self.src)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut self.buf)
            .context("failed to read the recording")?;
        self.eof = n == 0;
        Ok(())
    }

    /// The next record; `None` at the end of the file.
    pub fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            let parsed = frame::parse_frame(&self.buf[self.start..]);
            match parsed {
                Parsed::Frame { kind, payload, len } => {
                    let result = if kind == frame::kind::HEADER {
                        Ok(None)
                    } else {
                        self.decoder.frame(kind, payload)
                    };
                    let offset = self.offset();
                    self.start += len;
                    self.stats.frames += 1;
                    match result {
                        Ok(Some(record)) => {
                            self.damaged = false;
                            if matches!(record, Record::End { .. }) {
                                self.stats.clean_end = true;
                            }
                            self.stats.records += 1;
                            return Ok(Some(record));
                        }
                        Ok(None) => {
                            if kind == frame::kind::SYNC_POINT {
                                self.damaged = false;
                            }
                        }
                        Err(e) => self.drop_frame(offset, e),
                    }
                }
                Parsed::Incomplete if !self.eof => self.fill()?,
                Parsed::Incomplete => {
                    let left = (self.buf.len() - self.start) as u64;
                    if left > 0 {
                        self.problems.push(Problem {
                            offset: self.offset(),
                            bytes: left,
                            what: "incomplete frame at the end (the recording was cut short)"
                                .into(),
                        });
                        self.stats.tail_discarded = left;
                        self.start = self.buf.len();
                    }
                    return Ok(None);
                }
                Parsed::Invalid(why) => self.skip_damage(why)?,
            }
        }
    }

    fn drop_frame(&mut self, offset: u64, e: RecordError) {
        self.stats.dropped_frames += 1;
        // After damage, frames up to the next sync point are expected to be unusable;
        // report them as part of that damage, once.
        if !self.damaged {
            self.problems.push(Problem { offset, bytes: 0, what: format!("dropped a frame: {e}") });
        }
    }

    /// Skips from the current offset to the next position where a valid frame starts.
    fn skip_damage(&mut self, why: &'static str) -> anyhow::Result<()> {
        let from = self.offset();
        self.start += 1;
        loop {
            match self.buf[self.start..].iter().position(|&b| b == frame::SYNC) {
                Some(at) => {
                    self.start += at;
                    match frame::parse_frame(&self.buf[self.start..]) {
                        Parsed::Frame { .. } => break,
                        Parsed::Incomplete if !self.eof => self.fill()?,
                        Parsed::Incomplete => break,
                        Parsed::Invalid(_) => self.start += 1,
                    }
                }
                None if !self.eof => {
                    self.start = self.buf.len();
                    self.fill()?;
                }
                None => {
                    self.start = self.buf.len();
                    break;
                }
            }
        }
        let bytes = self.offset() - from;
        self.stats.skipped_bytes += bytes;
        self.problems.push(Problem {
            offset: from,
            bytes,
            what: format!("skipped damaged bytes ({why})"),
        });
        self.decoder.desync();
        self.damaged = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::Event,
        session::FORMAT_MINOR,
        session::{
            codec::{Encoder, tests::sample_events},
            frame::put_frame,
        },
    };

    fn recording(events: &[Event]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
        bytes.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
        let header = Header { hostname: "h".into(), ..Header::default() };
        put_frame(&mut bytes, frame::kind::HEADER, &header.encode());
        let mut enc = Encoder::new();
        for e in events {
            enc.event(e, &mut bytes);
        }
        enc.end(events.len() as u64, &mut bytes);
        bytes
    }

    fn read_all(bytes: &[u8]) -> (Vec<Event>, RecordingReader<&[u8]>, Vec<Problem>) {
        let mut r = RecordingReader::new(bytes).unwrap();
        let mut events = Vec::new();
        let mut problems = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            if let Record::Event(e) = rec {
                events.push(e);
            }
            problems.extend(r.take_problems());
        }
        problems.extend(r.take_problems());
        (events, r, problems)
    }

    #[test]
    fn reads_a_clean_file() {
        let events = sample_events();
        let bytes = recording(&events);
        let (read, r, problems) = read_all(&bytes);
        assert_eq!(read, events);
        assert!(r.stats.clean_end);
        assert!(problems.is_empty());
        assert_eq!(r.header().hostname, "h");
    }

    #[test]
    fn every_complete_frame_before_a_tear_is_read() {
        let events = sample_events();
        let bytes = recording(&events);
        let full = read_all(&bytes).0.len();
        let mut last = 0;
        let Parsed::Frame { len: header_len, .. } = frame::parse_frame(&bytes[PREFIX..]) else {
            panic!()
        };
        for cut in (PREFIX + header_len..=bytes.len()).step_by(7) {
            let (read, r, _) = read_all(&bytes[..cut]);
            assert!(read.len() >= last, "a longer prefix never yields fewer events");
            assert_eq!(read[..], events[..read.len()], "cut at {cut}");
            last = read.len();
            assert!(!r.stats.clean_end || cut == bytes.len());
        }
        assert!(last >= full - 2);
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_reported() {
        let events = sample_events();
        let mut bytes = recording(&events);
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 10] {
            *b = 0x55;
        }
        let (read, r, problems) = read_all(&bytes);
        assert!(read.len() < events.len() && !read.is_empty());
        assert!(r.stats.skipped_bytes >= 10, "{:?}", r.stats);
        assert!(problems.iter().any(|p| p.what.contains("damaged")), "{problems:?}");
        // Everything read is genuine: a prefix of the events.
        assert_eq!(read[..], events[..read.len()]);
    }

    #[test]
    fn damage_recovers_at_the_next_sync_point() {
        // Two chunks: damage in the first must not cost the second.
        let events = sample_events();
        let mut bytes = recording(&events[..10]);
        let damaged_at = bytes.len() - 30;
        bytes.truncate(bytes.len() - 6); // drop the end frame
        let mut enc = Encoder::new();
        for e in &events[10..] {
            enc.event(e, &mut bytes);
        }
        bytes[damaged_at] ^= 0xff;
        let (read, _, _) = read_all(&bytes);
        assert!(read.ends_with(&events[10..]), "the second chunk survives");
    }

    #[test]
    fn rejects_foreign_empty_truncated_and_future_files() {
        let err =
            |bytes: &[u8]| format!("{:#}", RecordingReader::new(bytes).err().expect("should fail"));
        assert!(err(b"").contains("empty"));
        assert!(err(b"{\"kind\":\"state\"}\n").contains("not a twtrace recording"));
        let good = recording(&sample_events());
        assert!(err(&good[..10]).contains("truncated"));
        assert!(err(&good[..PREFIX + 3]).contains("truncated"));
        let mut future = good.clone();
        future[8] = 9;
        let e = err(&future);
        assert!(e.contains("newer twtrace") && e.contains("format 9.0"), "{e}");
        let mut newer_minor = good;
        newer_minor[10] = 7;
        assert!(
            RecordingReader::new(&newer_minor[..]).is_ok(),
            "a newer minor version is readable"
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz loop; the cargo-fuzz target in fuzz/ goes further.
        let good = recording(&sample_events());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut bytes = good.clone();
            for _ in 0..(rand() % 8 + 1) {
                let i = (rand() as usize) % bytes.len();
                bytes[i] = rand() as u8;
            }
            if rand() % 3 == 0 {
                bytes.truncate((rand() as usize) % bytes.len());
            }
            if let Ok(mut r) = RecordingReader::new(&bytes[..]) {
                while let Ok(Some(_)) = r.next_record() {}
            }
        }
    }
}
