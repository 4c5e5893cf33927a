//! Maps the kernel's CLOCK_MONOTONIC event timestamps to wall-clock time.

use jiff::Timestamp;

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, taken once at start-up.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn anchor_now() -> Self {
        let mono = now_ns(libc::CLOCK_MONOTONIC);
        let real = now_ns(libc::CLOCK_REALTIME);
        Self { realtime_minus_monotonic_ns: real - mono }
    }

    /// A clock with a known anchor (recordings carry theirs).
    pub const fn from_offset(realtime_minus_monotonic_ns: i128) -> Self {
        Self { realtime_minus_monotonic_ns }
    }

    pub const fn offset_ns(&self) -> i128 {
        self.realtime_minus_monotonic_ns
    }

    /// Wall-clock time of a CLOCK_MONOTONIC timestamp.
    pub fn wall(&self, monotonic_ns: u64) -> Timestamp {
        let ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        Timestamp::from_nanosecond(ns).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// Current CLOCK_MONOTONIC time in nanoseconds.
    pub fn monotonic_now_ns() -> u64 {
        u64::try_from(now_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_adds_the_anchor() {
        let clock = Clock::from_offset(1_700_000_000_000_000_000);
        assert_eq!(clock.wall(5).as_nanosecond(), 1_700_000_000_000_000_005);
    }

    #[test]
    fn anchor_is_close_to_now() {
        let clock = Clock::anchor_now();
        let wall = clock.wall(Clock::monotonic_now_ns());
        let drift = (wall.as_nanosecond() - Timestamp::now().as_nanosecond()).abs();
        assert!(drift < 1_000_000_000, "drift {drift} ns");
    }
}
