//! Crash points: `TALLYD_CRASH_AT=<point>[:<n>]` makes the process abort, as a `kill -9` would,
//! the n-th time (default: the first) it passes `<point>`. The crash campaign and the tests use
//! them to land a crash exactly between two steps whose order the totals depend on, where a
//! randomly timed kill lands only now and then. Unset (production): one load per pass.
//!
//! Points: `after-changelog-publish` (a checkpoint's changelog flush is acknowledged by the
//! broker, its local commit not yet written).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const AFTER_CHANGELOG_PUBLISH: &str = "after-changelog-publish";

struct Armed {
    point: String,
    /// Passes left before the crash.
    remaining: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("TALLYD_CRASH_AT").ok()?;
            let (point, nth) = match spec.split_once(':') {
                Some((point, nth)) => (point, nth.parse().ok()?),
                None => (spec.as_str(), 1),
            };
            Some(Armed {
                point: point.to_string(),
                remaining: AtomicU64::new(nth),
            })
        })
        .as_ref()
}

/// Aborts the process if `point` is armed and this is the pass it names.
pub fn pass(point: &str) {
    let Some(armed) = armed() else { return };
    if armed.point != point {
        return;
    }
    let before = armed
        .remaining
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(1));
    if before == Ok(1) {
        eprintln!("TALLYD_CRASH_AT: crashing at {point}");
        std::process::abort();
    }
}
