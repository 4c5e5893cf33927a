//! Fuzzes the recording reader: any bytes must give records or errors, never a panic,
//! a hang or unbounded memory. Run: `cd fuzz && cargo +nightly-2026-10-29 fuzz run read_recording`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twtrace::session::reader::RecordingReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = RecordingReader::new(data) {
        while let Ok(Some(_)) = reader.next_record() {}
        let _ = reader.take_problems();
    }
});
