//! Rate-limited warnings: a client or guest that repeats a mistake a million times
//! gets a warning a second, each one saying how many like it were held back, instead
//! of a million lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a rate-limited warning may be logged.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One warning's limiter. Lock-free, so it can be a `static` beside the warning or a
/// field of whatever the warning is about.
#[derive(Debug)]
pub struct RateLimit {
    interval_ns: u64,
    /// Nanoseconds since [`epoch`] of the last warning let through, plus one (0: never).
    last: AtomicU64,
    /// Warnings held back since the last one let through.
    held: AtomicU64,
}

impl RateLimit {
    /// At most one warning per `interval`.
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval_ns: interval.as_nanos() as u64,
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// At most one warning per [`WARN_INTERVAL`].
    pub const fn per_second() -> Self {
        Self::new(WARN_INTERVAL)
    }

    /// `Some(held back since the last one)` when this warning is to be logged, `None`
    /// when it is held back (and counted).
    pub fn check(&self) -> Option<u64> {
        let now = epoch().elapsed().as_nanos() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ns {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Another thread let one through just now.
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::per_second()
    }
}

/// `tracing::warn!` through a [`RateLimit`]: logs at most once per interval, with a
/// `held_back` field counting the warnings not logged since the last one.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(held_back) = $limit.check() {
            tracing::warn!(held_back, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_and_the_rest_counted() {
        let l = RateLimit::new(Duration::from_millis(200));
        assert_eq!(l.check(), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            l.check(),
            Some(1000),
            "the next one says how many were held"
        );
        assert_eq!(l.check(), None);
    }
}
