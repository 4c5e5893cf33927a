//! Names of the errno values connect() and bind() fail with (Linux, all architectures
//! twtrace runs on share these numbers).

/// The symbolic name of `errno`, e.g. `EADDRNOTAVAIL` for 99; `E<n>` when unlisted.
pub fn name(errno: u32) -> std::borrow::Cow<'static, str> {
    let known = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        22 => "EINVAL",
        24 => "EMFILE",
        88 => "ENOTSOCK",
        91 => "EPROTOTYPE",
        93 => "EPROTONOSUPPORT",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        105 => "ENOBUFS",
        106 => "EISCONN",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        112 => "EHOSTDOWN",
        113 => "EHOSTUNREACH",
        114 => "EALREADY",
        115 => "EINPROGRESS",
        125 => "ECANCELED",
        _ => return format!("E{errno}").into(),
    };
    known.into()
}

pub const EADDRINUSE: u32 = 98;
pub const EADDRNOTAVAIL: u32 = 99;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_libc() {
        for (n, expect) in [
            (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
            (libc::EADDRINUSE, "EADDRINUSE"),
            (libc::ECONNREFUSED, "ECONNREFUSED"),
            (libc::ETIMEDOUT, "ETIMEDOUT"),
            (libc::EHOSTUNREACH, "EHOSTUNREACH"),
            (libc::ENETUNREACH, "ENETUNREACH"),
        ] {
            assert_eq!(name(n as u32), expect);
        }
        assert_eq!(EADDRNOTAVAIL, libc::EADDRNOTAVAIL as u32);
        assert_eq!(EADDRINUSE, libc::EADDRINUSE as u32);
        assert_eq!(name(4000), "E4000");
    }
}
