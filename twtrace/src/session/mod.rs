//! Recordings: twtrace's own compact, crash-safe binary file format (spec in
//! docs/recording-format.md). [`frame`] is the framing layer, [`codec`] turns events into
//! frames and back, [`writer`] and [`reader`] deal with files (rotation, recovery).

pub mod codec;
pub mod frame;
pub mod header;
pub mod reader;
pub mod writer;

/// First bytes of every recording. The high byte and the CR/LF/EOF characters catch
/// transfers that mangle binary files, as PNG's signature does.
pub const MAGIC: [u8; 8] = *b"\x89TWT\r\n\x1a\n";
/// Format version written. A reader accepts any minor version of its major version
/// (unknown frame kinds and header fields are skipped) and refuses a newer major.
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;
