//! tracefs: find it (mounting it when it is missing) and read tracepoint format files.
//!
//! Classic tracepoints need tracefs for their ids and formats; many machines (this
//! project's CI among them) boot without it mounted.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

const DEFAULT_MOUNT: &str = "/sys/kernel/tracing";
const LEGACY_MOUNT: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs mount point, mounting tracefs at /sys/kernel/tracing if needed.
pub fn ensure_mounted() -> anyhow::Result<PathBuf> {
    if let Some(dir) = find_mounted()? {
        return Ok(dir);
    }
    mount_at(Path::new(DEFAULT_MOUNT))?;
    Ok(PathBuf::from(DEFAULT_MOUNT))
}

fn find_mounted() -> anyhow::Result<Option<PathBuf>> {
    let mounts = fs::read_to_string("/proc/mounts").context("failed to read /proc/mounts")?;
    let mounted: Vec<&str> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "tracefs").then_some(dir)
        })
        .collect();
    // aya looks only at these two places, so a tracefs mounted elsewhere does not count.
    Ok([DEFAULT_MOUNT, LEGACY_MOUNT]
        .into_iter()
        .find(|dir| mounted.contains(dir))
        .map(PathBuf::from))
}

fn mount_at(dir: &Path) -> anyhow::Result<()> {
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(c"nodev".as_ptr(), c_dir.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {} failed: {err}; mount it with \
             `mount -t tracefs nodev {}` (needs CAP_SYS_ADMIN) and run twtrace again",
            dir.display(),
            dir.display()
        );
    }
    log::info!("mounted tracefs at {}", dir.display());
    Ok(())
}

/// One field of a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// The fields of a tracepoint record, by name, from its `format` file.
#[derive(Debug, Default)]
pub struct Format {
    fields: HashMap<String, Field>,
}

impl Format {
    /// Reads `events/<category>/<name>/format`; `Ok(None)` when the tracepoint does not exist.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> anyhow::Result<Option<Self>> {
        let path = tracefs.join("events").join(category).join(name).join("format");
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text)
                .with_context(|| format!("failed to parse {}", path.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
        }
    }

    /// Parses lines like `field:__u16 sport; offset:24; size:2; signed:0;` (tab-separated).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut fields = HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("field:")) {
            let mut decl = None;
            let (mut offset, mut size) = (None, None);
            for part in line.split(';').map(str::trim) {
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset =
                        Some(v.parse::<u16>().with_context(|| format!("bad offset in `{line}`"))?);
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = Some(v.parse::<u16>().with_context(|| format!("bad size in `{line}`"))?);
                }
            }
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                bail!("incomplete field line `{line}`");
            };
            // The name is the last word of the declaration, without any array suffix.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .unwrap_or(decl)
                .split('[')
                .next()
                .unwrap_or_default();
            fields.insert(name.to_owned(), Field { offset, size });
        }
        if fields.is_empty() {
            bail!("no fields found");
        }
        Ok(Self { fields })
    }

    /// Where the record's last field ends.
    pub fn end(&self) -> Option<u16> {
        self.fields.values().map(|f| f.offset + f.size).max()
    }

    /// The field `name`, checked to be `sizes` bytes wide (any of them).
    pub fn field(&self, name: &str, sizes: &[u16]) -> anyhow::Result<Field> {
        let field = *self
            .fields
            .get(name)
            .with_context(|| format!("field `{name}` is missing from the tracepoint format"))?;
        if !sizes.contains(&field.size) {
            bail!("field `{name}` is {} bytes wide; twtrace supports {sizes:?}", field.size);
        }
        Ok(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn parses_fields_pointers_and_arrays() {
        let f = Format::parse(INET_SOCK_SET_STATE_6_18).unwrap();
        assert_eq!(f.field("skaddr", &[8]).unwrap(), Field { offset: 8, size: 8 });
        assert_eq!(f.field("oldstate", &[4]).unwrap(), Field { offset: 16, size: 4 });
        assert_eq!(f.field("protocol", &[1, 2]).unwrap(), Field { offset: 30, size: 2 });
        assert_eq!(f.field("saddr_v6", &[16]).unwrap(), Field { offset: 40, size: 16 });
        assert_eq!(f.end(), Some(56));
    }

    #[test]
    fn rejects_unexpected_width_and_missing_fields() {
        let f = Format::parse(INET_SOCK_SET_STATE_6_18).unwrap();
        let err = f.field("protocol", &[4]).unwrap_err().to_string();
        assert!(err.contains("2 bytes wide"), "{err}");
        assert!(f.field("daddr", &[4]).unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn rejects_text_without_fields() {
        assert!(Format::parse("name: x\nprint fmt: \"\"").is_err());
    }
}
