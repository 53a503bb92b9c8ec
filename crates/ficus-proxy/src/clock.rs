//! The coarse clocks of the request path.
//!
//! A precise clock read (`Instant::now`, `SystemTime::now`) costs about 25 ns
//! on this project's hosts (the vDSO reads the TSC), and a forwarded request
//! used to read it some ten times: its latency, its census and traffic stamps,
//! the pool's idle times, hyper's `Date`. Where a stamp is only compared with
//! timeouts of seconds or kept to the millisecond for people, the kernel's
//! coarse clocks do: they return the time of the last timer tick (a few
//! milliseconds old at most) for about 5 ns. Latencies and timer deadlines
//! keep the precise clock.

use std::time::Duration;

use ficus_core::Timestamp;
use rustix::time::{ClockId, clock_gettime};

/// Time since an unspecified start, never going back, as of the kernel's
/// last timer tick.
pub(crate) fn coarse_monotonic() -> Duration {
    let t = clock_gettime(ClockId::MonotonicCoarse);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The wall clock as of the kernel's last timer tick, in milliseconds.
pub(crate) fn coarse_now() -> Timestamp {
    let t = clock_gettime(ClockId::RealtimeCoarse);
    Timestamp::from_unix_millis(t.tv_sec * 1000 + t.tv_nsec / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_keep_up_with_the_precise_ones() {
        // The coarse clocks lag by a timer tick at most (4 ms at 250 Hz); a
        // second is room enough for any kernel's tick.
        let precise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as i64;
        let coarse = coarse_now().unix_millis();
        assert!((precise - coarse).abs() < 1000, "{precise} vs {coarse}");
        let a = coarse_monotonic();
        let b = coarse_monotonic();
        assert!(b >= a);
    }
}
