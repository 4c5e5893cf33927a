//! The framing layer: `sync, kind, varint length, payload, crc32` and LEB128 varints.
//!
//! A frame is self-checking (CRC-32 over kind, length and payload), so a reader can tell
//! a complete frame from a torn or corrupted one and resynchronise on the sync byte.

use bytes::{Buf, BufMut};

/// Every frame starts with this byte.
pub const SYNC: u8 = 0xA7;
/// Longest payload a reader accepts: frames are small; anything larger is corruption.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Frame kinds. Values are part of the file format.
pub mod kind {
    /// File metadata (first frame of a file).
    pub const HEADER: u8 = 1;
    /// Start of a chunk: clears the task and socket tables, sets the time base.
    pub const SYNC_POINT: u8 = 2;
    /// Defines a task (process) id for the chunk.
    pub const TASK: u8 = 3;
    /// Defines a socket endpoint id for the chunk.
    pub const SOCKET: u8 = 4;
    /// A state change or TIME_WAIT entry.
    pub const STATE: u8 = 5;
    /// A failed connect()/bind().
    pub const FAILURE: u8 = 6;
    /// Cumulative counts of what the kernel side could not deliver.
    pub const LOST: u8 = 7;
    /// Clean end of file, with totals.
    pub const END: u8 = 8;
    /// A network namespace as the kernel had it: settings, counters, sockets holding
    /// ports (for `report`). Self-contained: readable outside a chunk.
    pub const NETNS: u8 = 9;
}

pub fn put_varint(buf: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

pub fn put_signed(buf: &mut impl BufMut, v: i64) {
    put_varint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload ends early")]
    Short,
    #[error("varint longer than 10 bytes")]
    LongVarint,
    #[error("{0}")]
    Invalid(&'static str),
}

pub fn get_varint(buf: &mut impl Buf) -> Result<u64, PayloadError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        if !buf.has_remaining() {
            return Err(PayloadError::Short);
        }
        let byte = buf.get_u8();
        if shift == 63 && byte > 1 {
            return Err(PayloadError::LongVarint);
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(PayloadError::LongVarint)
}

pub fn get_signed(buf: &mut impl Buf) -> Result<i64, PayloadError> {
    let v = get_varint(buf)?;
    Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
}

pub fn get_u8(buf: &mut impl Buf) -> Result<u8, PayloadError> {
    if buf.remaining() < 1 {
        return Err(PayloadError::Short);
    }
    Ok(buf.get_u8())
}

pub fn get_bytes<const N: usize>(buf: &mut impl Buf) -> Result<[u8; N], PayloadError> {
    if buf.remaining() < N {
        return Err(PayloadError::Short);
    }
    let mut out = [0u8; N];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// Appends one frame.
pub fn put_frame(out: &mut impl BufMut, kind: u8, payload: &[u8]) {
    let mut head = [0u8; 12];
    let mut cursor = &mut head[..];
    cursor.put_u8(SYNC);
    cursor.put_u8(kind);
    put_varint(&mut cursor, payload.len() as u64);
    let head_len = 12 - cursor.len();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[1..head_len]);
    crc.update(payload);
    out.put_slice(&head[..head_len]);
    out.put_slice(payload);
    out.put_u32_le(crc.finalize());
}

/// What is at the start of a byte slice.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A valid frame of `len` bytes in total.
    Frame { kind: u8, payload: &'a [u8], len: usize },
    /// The slice ends inside what may be a frame: more bytes are needed.
    Incomplete,
    /// Not a valid frame here (bad sync byte, length or checksum).
    Invalid(&'static str),
}

/// Parses the frame at the start of `bytes`.
pub fn parse_frame(bytes: &[u8]) -> Parsed<'_> {
    let Some((&sync, rest)) = bytes.split_first() else {
        return Parsed::Incomplete;
    };
    if sync != SYNC {
        return Parsed::Invalid("no frame start");
    }
    let Some((&kind, mut rest)) = rest.split_first() else {
        return Parsed::Incomplete;
    };
    let before = rest.len();
    let len = match get_varint(&mut rest) {
        Ok(len) => len as usize,
        Err(PayloadError::Short) => return Parsed::Incomplete,
        Err(_) => return Parsed::Invalid("bad frame length"),
    };
    if len > MAX_PAYLOAD {
        return Parsed::Invalid("frame length out of range");
    }
    let head_len = 2 + (before - rest.len());
    let total = head_len + len + 4;
    if bytes.len() < total {
        return Parsed::Incomplete;
    }
    let payload = &bytes[head_len..head_len + len];
    let stored = u32::from_le_bytes(bytes[head_len + len..total].try_into().expect("4 bytes"));
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[1..head_len]);
    crc.update(payload);
    if crc.finalize() != stored {
        return Parsed::Invalid("checksum mismatch");
    }
    Parsed::Frame { kind, payload, len: total }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(get_varint(&mut &buf[..]).unwrap(), v);
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            let mut buf = Vec::new();
            put_signed(&mut buf, v);
            assert_eq!(get_signed(&mut &buf[..]).unwrap(), v);
        }
        assert_eq!(get_varint(&mut &[0x80u8][..]), Err(PayloadError::Short));
        assert_eq!(get_varint(&mut &[0xffu8; 11][..]), Err(PayloadError::LongVarint));
    }

    #[test]
    fn frames_round_trip_and_detect_damage() {
        let mut buf = Vec::new();
        put_frame(&mut buf, kind::STATE, b"hello");
        let Parsed::Frame { kind, payload, len } = parse_frame(&buf) else { panic!() };
        assert_eq!((kind, payload, len), (kind::STATE, &b"hello"[..], buf.len()));
        assert_eq!(buf.len(), 1 + 1 + 1 + 5 + 4);
        for cut in 0..buf.len() {
            assert_eq!(parse_frame(&buf[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        for i in 1..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(!matches!(parse_frame(&bad), Parsed::Frame { .. }), "flip at {i} undetected");
        }
        assert_eq!(parse_frame(&[0u8; 8]), Parsed::Invalid("no frame start"));
    }
}
