//! The first frame of a recording: where and when it was made, how to turn its kernel
//! timestamps into wall-clock time, and the settings that decide port exhaustion.

use bytes::{Buf, BufMut};

use super::frame::{PayloadError, get_bytes, get_u8, get_varint, put_varint};

/// Port settings of one network namespace at the start of the recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsSettings {
    pub netns: u32,
    /// `net.ipv4.ip_local_port_range`.
    pub port_range: (u16, u16),
    /// `net.ipv4.tcp_tw_reuse`.
    pub tcp_tw_reuse: u8,
    /// `net.ipv4.tcp_max_tw_buckets`.
    pub tcp_max_tw_buckets: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub hostname: String,
    /// `uname -r` of the traced kernel.
    pub kernel_release: String,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC at the start, in ns: maps event times to wall time.
    pub clock_offset_ns: i128,
    /// twtrace version that wrote the file.
    pub twtrace_version: String,
    /// The command line that made the recording.
    pub command: String,
    pub netns_settings: Vec<NetnsSettings>,
}

// Field tags. Unknown tags are skipped by readers, so new fields need no major version.
const HOSTNAME: u64 = 1;
const KERNEL_RELEASE: u64 = 2;
const CLOCK_OFFSET: u64 = 3;
const TWTRACE_VERSION: u64 = 4;
const COMMAND: u64 = 5;
const NETNS_SETTINGS: u64 = 6;

fn put_field(out: &mut Vec<u8>, tag: u64, value: &[u8]) {
    put_varint(out, tag);
    put_varint(out, value.len() as u64);
    out.put_slice(value);
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        put_field(&mut out, HOSTNAME, self.hostname.as_bytes());
        put_field(&mut out, KERNEL_RELEASE, self.kernel_release.as_bytes());
        put_field(&mut out, CLOCK_OFFSET, &self.clock_offset_ns.to_le_bytes());
        put_field(&mut out, TWTRACE_VERSION, self.twtrace_version.as_bytes());
        put_field(&mut out, COMMAND, self.command.as_bytes());
        for s in &self.netns_settings {
            let mut v = Vec::with_capacity(13);
            v.put_u32_le(s.netns);
            v.put_u16_le(s.port_range.0);
            v.put_u16_le(s.port_range.1);
            v.put_u8(s.tcp_tw_reuse);
            v.put_u32_le(s.tcp_max_tw_buckets);
            put_field(&mut out, NETNS_SETTINGS, &v);
        }
        out
    }

    pub fn decode(mut payload: &[u8]) -> Result<Self, PayloadError> {
        let mut h = Self::default();
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        while payload.has_remaining() {
            let tag = get_varint(&mut payload)?;
            let len = get_varint(&mut payload)? as usize;
            if payload.remaining() < len {
                return Err(PayloadError::Short);
            }
            let (mut value, rest) = payload.split_at(len);
            payload = rest;
            match tag {
                HOSTNAME => h.hostname = text(value),
                KERNEL_RELEASE => h.kernel_release = text(value),
                CLOCK_OFFSET => h.clock_offset_ns = i128::from_le_bytes(get_bytes(&mut value)?),
                TWTRACE_VERSION => h.twtrace_version = text(value),
                COMMAND => h.command = text(value),
                NETNS_SETTINGS => {
                    let netns = u32::from_le_bytes(get_bytes(&mut value)?);
                    let lo = u16::from_le_bytes(get_bytes(&mut value)?);
                    let hi = u16::from_le_bytes(get_bytes(&mut value)?);
                    let tcp_tw_reuse = get_u8(&mut value)?;
                    let tcp_max_tw_buckets = u32::from_le_bytes(get_bytes(&mut value)?);
                    h.netns_settings.push(NetnsSettings {
                        netns,
                        port_range: (lo, hi),
                        tcp_tw_reuse,
                        tcp_max_tw_buckets,
                    });
                }
                _ => {}
            }
        }
        Ok(h)
    }

    /// The header for a recording made on this machine now.
    pub fn for_this_host(clock_offset_ns: i128, command: String) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
        };
        let netns_settings = own_netns_settings().into_iter().collect();
        Self {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            clock_offset_ns,
            twtrace_version: env!("CARGO_PKG_VERSION").to_owned(),
            command,
            netns_settings,
        }
    }
}

/// Port settings of twtrace's own network namespace (the host's, normally).
fn own_netns_settings() -> Option<NetnsSettings> {
    use std::os::unix::fs::MetadataExt as _;
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok();
    let netns = std::fs::metadata("/proc/self/ns/net").ok()?.ino() as u32;
    let range = read("ip_local_port_range")?;
    let mut parts = range.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    Some(NetnsSettings {
        netns,
        port_range: (parts.next()?, parts.next()?),
        tcp_tw_reuse: read("tcp_tw_reuse")?.trim().parse().ok()?,
        tcp_max_tw_buckets: read("tcp_max_tw_buckets")?.trim().parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_skips_unknown_fields() {
        let h = Header {
            hostname: "web-1".into(),
            kernel_release: "6.18.0".into(),
            clock_offset_ns: -123_456_789_000_000_000,
            twtrace_version: "0.1.0".into(),
            command: "twtrace record -o x".into(),
            netns_settings: vec![NetnsSettings {
                netns: 4026531840,
                port_range: (32768, 60999),
                tcp_tw_reuse: 2,
                tcp_max_tw_buckets: 262144,
            }],
        };
        let mut bytes = h.encode();
        put_field(&mut bytes, 99, b"from the future");
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        assert!(Header::decode(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn this_host_has_settings() {
        let h = Header::for_this_host(0, String::new());
        assert!(!h.kernel_release.is_empty());
        assert_eq!(h.netns_settings.len(), 1);
    }
}
