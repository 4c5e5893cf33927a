//! TCP state numbers and address families as the kernel defines them (include/net/tcp_states.h).

pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSING: u8 = 11;
pub const TCP_NEW_SYN_RECV: u8 = 12;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Kernel name of a TCP state, as `ss` and the tracepoint's format string print it.
pub const fn state_name(state: u8) -> &'static str {
    match state {
        TCP_ESTABLISHED => "ESTABLISHED",
        TCP_SYN_SENT => "SYN_SENT",
        TCP_SYN_RECV => "SYN_RECV",
        TCP_FIN_WAIT1 => "FIN_WAIT1",
        TCP_FIN_WAIT2 => "FIN_WAIT2",
        TCP_TIME_WAIT => "TIME_WAIT",
        TCP_CLOSE => "CLOSE",
        TCP_CLOSE_WAIT => "CLOSE_WAIT",
        TCP_LAST_ACK => "LAST_ACK",
        TCP_LISTEN => "LISTEN",
        TCP_CLOSING => "CLOSING",
        TCP_NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// Inverse of [`state_name`]; accepts an optional `TCP_` prefix, any case.
pub fn state_from_name(name: &str) -> Option<u8> {
    let bare = name.strip_prefix("TCP_").or_else(|| name.strip_prefix("tcp_")).unwrap_or(name);
    (TCP_ESTABLISHED..=TCP_NEW_SYN_RECV).find(|&s| state_name(s).eq_ignore_ascii_case(bare))
}

/// True for the transitions the kernel makes in the context of the socket's owning task:
/// connect() (CLOSE -> SYN_SENT), listen() (-> LISTEN), and close()/shutdown() starting the
/// FIN handshake (ESTABLISHED -> FIN_WAIT1, CLOSE_WAIT -> LAST_ACK). Only at these moments
/// is "the current task" the socket's owner; every other transition may run in softirq
/// context on behalf of whichever task happened to be on the CPU.
pub const fn runs_in_owner_context(old: u8, new: u8) -> bool {
    matches!(
        (old, new),
        (TCP_CLOSE, TCP_SYN_SENT)
            | (_, TCP_LISTEN)
            | (TCP_ESTABLISHED, TCP_FIN_WAIT1)
            | (TCP_CLOSE_WAIT, TCP_LAST_ACK)
    )
}

/// True when a full socket reaching CLOSE from `old` means the kernel has just handed the
/// connection to a timewait socket (tcp_time_wait() then tcp_done()): only the side that
/// sent the first FIN passes through FIN_WAIT2 or CLOSING. A reset on the way (RST received)
/// also ends in CLOSE without TIME_WAIT; the caller excludes that case.
pub const fn close_enters_time_wait(old: u8, new: u8) -> bool {
    new == TCP_CLOSE && (old == TCP_FIN_WAIT2 || old == TCP_CLOSING)
}
