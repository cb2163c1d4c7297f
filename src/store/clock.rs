//! The clock that expiry decisions use, so that a wall clock stepped forward cannot make a
//! retried event count twice.
//!
//! Dedup keys expire when first seen more than `dedup_horizon_secs` ago: lookups ignore them
//! and compaction drops them. By the wall clock alone, a clock stepped 40 days forward (a bad
//! NTP server, a reset RTC) would drop within seconds every key of the last 35 days; once the
//! clock is corrected, retries of events within `max_lateness_secs` would count a second time.
//! So expiry reads its own clock: the wall clock, but never running faster than twice real
//! (monotonic) time from the last recorded mark. While the wall clock is sane the two agree
//! (a restart's downtime is caught up at one extra second per second); a step forward of J
//! is followed only over J of real time, so a correction within that time finds every key
//! still there. Each checkpoint records the expiry clock's highest reading
//! (`M clock_high_water`); the next start continues from it.
//!
//! What is left: a wall clock wrong by more than `horizon − max_lateness − max_future` for
//! longer than that (about 34 days with the defaults) may still have expired keys of events
//! the corrected clock accepts. For that case admission refuses, as too late with a reason,
//! events older than `high water − horizon + max_future_secs` (`Acceptance::not_before_ms`),
//! exactly those whose keys expiry may have dropped; with a sane clock that bound lies before
//! `now − max_lateness_secs` (config validation), so it refuses nothing else.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The meta key (`M clock_high_water`): the expiry clock's highest recorded reading.
pub(super) const META_CLOCK: &str = "clock_high_water";
/// The reading before the store's mark is read: so early that nothing expires, and far enough
/// from i64::MIN that callers may subtract a horizon from it.
const NEVER: i64 = i64::MIN / 4;
/// How much faster than real time the expiry clock may run to catch up with the wall clock.
const CATCH_UP_RATE: i64 = 2;

#[derive(Clone, Debug)]
pub struct ExpiryClock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The recorded mark this process started from (i64::MIN until the store's is read:
    /// nothing expires before).
    base_secs: AtomicI64,
    started: Instant,
    /// The highest reading recorded so far (what checkpoints persist).
    high_water_secs: AtomicI64,
}

impl ExpiryClock {
    pub(super) fn new() -> ExpiryClock {
        ExpiryClock {
            inner: Arc::new(Inner {
                base_secs: AtomicI64::new(i64::MIN),
                started: Instant::now(),
                high_water_secs: AtomicI64::new(i64::MIN),
            }),
        }
    }

    /// The store's mark as read at open (None: a new store, or one from before the mark:
    /// the wall clock is all there is).
    pub(super) fn start(&self, stored: Option<i64>) {
        let wall = super::unix_now_secs();
        let base = stored.unwrap_or(wall);
        if base > wall + 60 {
            tracing::warn!(
                behind_secs = base - wall,
                "the wall clock is behind the highest time this store has used: it went back"
            );
        }
        self.inner.base_secs.store(base, Ordering::Release);
        self.inner.high_water_secs.fetch_max(base, Ordering::AcqRel);
    }

    /// Now for expiry: the wall clock, but no later than the mark plus twice the real time
    /// since this process started from it.
    pub fn now_secs(&self) -> i64 {
        let base = self.inner.base_secs.load(Ordering::Acquire);
        if base == i64::MIN {
            return NEVER;
        }
        let elapsed = self.inner.started.elapsed().as_secs() as i64;
        super::unix_now_secs().min(base.saturating_add(CATCH_UP_RATE * elapsed))
    }

    /// The reading a checkpoint records (the highest so far).
    pub(super) fn record(&self) -> i64 {
        let now = self.now_secs();
        self.inner
            .high_water_secs
            .fetch_max(now, Ordering::AcqRel)
            .max(now)
    }

    /// The highest recorded reading.
    pub fn high_water_secs(&self) -> i64 {
        self.inner.high_water_secs.load(Ordering::Acquire)
    }

    /// The oldest event time (unix ms) whose dedup key cannot have expired: events before it
    /// are refused (see the module doc). Far in the past unless the clock went back a lot.
    pub fn not_before_ms(&self, dedup_horizon_secs: i64, max_future_secs: i64) -> i64 {
        self.high_water_secs()
            .saturating_sub(dedup_horizon_secs)
            .saturating_add(max_future_secs)
            .saturating_mul(1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark from the future (the wall clock went back) holds expiry at the wall clock; a
    /// mark from the past is caught up at twice real time, never jumping to the wall clock.
    #[test]
    fn expiry_follows_the_wall_clock_no_faster_than_twice_real_time() {
        let wall = super::super::unix_now_secs();
        let ahead = ExpiryClock::new();
        assert_eq!(ahead.now_secs(), NEVER, "nothing expires before the mark is read");
        ahead.start(Some(wall + 86_400));
        assert!((ahead.now_secs() - wall).abs() <= 2);
        assert_eq!(ahead.high_water_secs(), wall + 86_400);
        assert_eq!(
            ahead.not_before_ms(3 * 86_400, 300),
            (wall - 2 * 86_400 + 300) * 1000
        );

        let behind = ExpiryClock::new();
        behind.start(Some(wall - 40 * 86_400));
        let now = behind.now_secs();
        assert!(
            now <= wall - 40 * 86_400 + 2,
            "jumped to the wall clock: {now} vs {wall}"
        );
        assert!(behind.record() >= wall - 40 * 86_400);

        let fresh = ExpiryClock::new();
        fresh.start(None);
        assert!((fresh.now_secs() - wall).abs() <= 2);
    }
}
