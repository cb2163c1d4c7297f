//! GCRA (the generic cell rate algorithm): an exact rate limiter whose whole state per key is
//! one number, the theoretical arrival time (TAT). `limit` units per `per_ns`, `burst` units at
//! once: a request of `q` units at `now` is allowed when `max(tat, now) + q·T − now ≤ τ`, with
//! the emission interval `T = per / limit` and the tolerance `τ = burst · T`.
//!
//! No floating point and no rounding: times are kept multiplied by `limit` ("scaled"), so
//! `T = per_ns` and `τ = burst · per_ns` are integers and fractional units (a meter's scale)
//! cost exactly their share. A key whose TAT is in the past holds nothing (a fresh key is the
//! same): callers forget it, so state is O(1) per active key.

/// A rate limit: `limit` units per `per_ns`, at most `burst` at once (units at the meter's
/// scale).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateSpec {
    pub limit: i128,
    pub per_ns: i128,
    pub burst: i128,
}

/// The largest rate limit or burst GCRA takes (10^18 units): with times up to 10^17 ns
/// (three years of a process's uptime) every scaled time stays under 10^36 < i128::MAX.
pub const MAX_RATE_UNITS: i128 = 1_000_000_000_000_000_000;

/// One key's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Scaled TAT (ns × limit); `i128::MIN`: never used.
    tat: i128,
}

impl Default for Gcra {
    fn default() -> Gcra {
        Gcra { tat: i128::MIN }
    }
}

/// The answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Units that would still be allowed at once after this decision.
    pub remaining: i128,
    /// Refused: nanoseconds until the same request would be allowed (None: never, it is
    /// larger than the burst).
    pub retry_after_ns: Option<i128>,
    /// Nanoseconds until the key is back to its full burst.
    pub reset_ns: i128,
}

fn ceil_div(a: i128, b: i128) -> i128 {
    if a <= 0 {
        0
    } else {
        div(a + b - 1, b)
    }
}

// i128 multiplication and division are library calls (`__muloti4` for the checked and
// saturating forms, `__divti3`) costing more than the rest of a decision; every operand here
// fits in 64 bits (times up to 10^17 ns, limits, bursts and units up to 10^18, periods up to a
// day in ns), where one instruction does it exactly: a 64 × 64-bit product never overflows
// 128 bits. The wide forms stay for what does not fit.

/// `a · b`, saturating.
#[inline]
fn mul(a: i128, b: i128) -> i128 {
    match (i64::try_from(a), i64::try_from(b)) {
        (Ok(a), Ok(b)) => i128::from(a) * i128::from(b),
        _ => a.saturating_mul(b),
    }
}

/// `a · b`, None on overflow.
#[inline]
fn checked_mul(a: i128, b: i128) -> Option<i128> {
    match (i64::try_from(a), i64::try_from(b)) {
        (Ok(a), Ok(b)) => Some(i128::from(a) * i128::from(b)),
        _ => a.checked_mul(b),
    }
}

/// `a / b` (b > 0), truncating like `/`.
#[inline]
fn div(a: i128, b: i128) -> i128 {
    match (i64::try_from(a), i64::try_from(b)) {
        // i64::MIN / -1 cannot happen: b > 0.
        (Ok(a), Ok(b)) => i128::from(a / b),
        _ => a / b,
    }
}

impl Gcra {
    fn scaled(now_ns: i128, spec: &RateSpec) -> i128 {
        mul(now_ns, spec.limit)
    }

    /// `check` without the answer's details (no division): whether `units` at `now_ns` are
    /// allowed, taken from the key when they are. The admission gate's fast path.
    pub fn take(&mut self, now_ns: i128, units: i128, spec: &RateSpec) -> bool {
        let now = Gcra::scaled(now_ns, spec);
        let tau = mul(spec.burst, spec.per_ns);
        let tat = self.tat.max(now);
        match checked_mul(units, spec.per_ns).and_then(|cost| tat.checked_add(cost)) {
            Some(new_tat) if units <= spec.burst && new_tat - now <= tau => {
                self.tat = new_tat;
                true
            }
            _ => false,
        }
    }

    /// Decides a request of `units` at `now_ns`; an allowed one is taken from the key.
    pub fn check(&mut self, now_ns: i128, units: i128, spec: &RateSpec) -> RateDecision {
        let now = Gcra::scaled(now_ns, spec);
        let tau = mul(spec.burst, spec.per_ns);
        let tat = self.tat.max(now);
        let new_tat = checked_mul(units, spec.per_ns).and_then(|cost| tat.checked_add(cost));
        match new_tat {
            Some(new_tat) if units <= spec.burst && new_tat - now <= tau => {
                self.tat = new_tat;
                RateDecision {
                    allowed: true,
                    remaining: div(tau - (new_tat - now), spec.per_ns),
                    retry_after_ns: None,
                    reset_ns: ceil_div(new_tat - now, spec.limit),
                }
            }
            _ => RateDecision {
                allowed: false,
                remaining: div(tau - (tat - now), spec.per_ns),
                retry_after_ns: match new_tat {
                    Some(new_tat) if units <= spec.burst => Some(ceil_div(new_tat - tau - now, spec.limit)),
                    _ => None,
                },
                reset_ns: ceil_div(tat - now, spec.limit),
            },
        }
    }

    /// Takes `units` whatever the answer (a log's usage, which nothing can refuse any more),
    /// charged at `at_ns`, when the log received them: a consumer catching up charges each
    /// unit at its own time, so draining a backlog is not mistaken for a burst. The answer is
    /// the key's standing `now_ns`: over (not allowed) while the taken units exceed the burst
    /// the rate has earned back by now, with `retry_after_ns` until the excess has drained
    /// (`remaining` back to 0) and `reset_ns` until the burst is whole.
    pub fn charge(&mut self, now_ns: i128, at_ns: i128, units: i128, spec: &RateSpec) -> RateDecision {
        let now = Gcra::scaled(now_ns, spec);
        let tau = mul(spec.burst, spec.per_ns);
        self.tat = self
            .tat
            .max(Gcra::scaled(at_ns.min(now_ns), spec))
            .saturating_add(mul(units, spec.per_ns));
        let ahead = self.tat.saturating_sub(now);
        let over = ahead > tau;
        RateDecision {
            allowed: !over,
            remaining: div(tau.saturating_sub(ahead), spec.per_ns),
            retry_after_ns: over.then(|| ceil_div(ahead - tau, spec.limit)),
            reset_ns: ceil_div(ahead, spec.limit),
        }
    }

    /// The key's state at `now_ns` without taking anything: (remaining units, ns until full).
    pub fn peek(&self, now_ns: i128, spec: &RateSpec) -> (i128, i128) {
        let now = Gcra::scaled(now_ns, spec);
        let tau = mul(spec.burst, spec.per_ns);
        let tat = self.tat.max(now);
        (
            div(tau - (tat - now), spec.per_ns),
            ceil_div(tat - now, spec.limit),
        )
    }

    /// Gives back `units` taken from the key (a request refused as a whole after this key had
    /// allowed its part): as if they had not been taken, but for the time passed meanwhile.
    pub fn give_back(&mut self, units: i128, spec: &RateSpec) {
        self.tat = self.tat.saturating_sub(mul(units, spec.per_ns));
    }

    /// The same state under another spec (a plan reload changed the limit): the TAT as a time
    /// is kept, so a reload neither grants a fresh burst nor takes one away.
    pub fn rescale(self, from: &RateSpec, to: &RateSpec) -> Gcra {
        if self.tat == i128::MIN || from == to {
            return self;
        }
        Gcra {
            tat: mul(div(self.tat, from.limit.max(1)), to.limit),
        }
    }

    /// The state as one number (for an atomic word) and back.
    pub fn to_raw(self) -> i128 {
        self.tat
    }

    pub fn from_raw(tat: i128) -> Gcra {
        Gcra { tat }
    }

    /// Holds nothing any more at `now_ns` (the key can be forgotten).
    pub fn is_idle(&self, now_ns: i128, spec: &RateSpec) -> bool {
        self.tat <= Gcra::scaled(now_ns, spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: i128 = 1_000_000_000;

    #[test]
    fn twenty_a_minute_then_429_then_one_more_every_three_seconds() {
        let spec = RateSpec {
            limit: 20,
            per_ns: 60 * SECOND,
            burst: 20,
        };
        let mut key = Gcra::default();
        let start = 1_000 * SECOND;
        for n in 0..20 {
            let decision = key.check(start, 1, &spec);
            assert!(decision.allowed, "call {n}");
            assert_eq!(decision.remaining, 19 - n);
        }
        let refused = key.check(start, 1, &spec);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ns, Some(3 * SECOND));
        assert_eq!(refused.reset_ns, 60 * SECOND);
        assert!(!key.check(start + 3 * SECOND - 1, 1, &spec).allowed);
        assert!(key.check(start + 3 * SECOND, 1, &spec).allowed);
        // Larger than the burst: never allowed, and retrying does not help.
        assert_eq!(key.check(start + 3600 * SECOND, 21, &spec).retry_after_ns, None);
        assert!(key.is_idle(start + 3600 * SECOND, &spec));
    }

    #[test]
    fn fractional_units_cost_exactly_their_share() {
        // 1.5 GB a second at scale 9, burst 3 GB: six 0.5 GB requests at once, then one per third of a second.
        let spec = RateSpec {
            limit: 1_500_000_000,
            per_ns: SECOND,
            burst: 3_000_000_000,
        };
        let mut key = Gcra::default();
        for _ in 0..6 {
            assert!(key.check(0, 500_000_000, &spec).allowed);
        }
        let refused = key.check(0, 500_000_000, &spec);
        assert_eq!(refused.retry_after_ns, Some(SECOND / 3 + 1));
        assert!(key.check(SECOND / 3 + 1, 500_000_000, &spec).allowed);
    }

    #[test]
    fn a_log_charged_at_its_own_times_is_over_only_while_its_producer_was() {
        // 10 a second, burst 10. A backlog of 60 s at exactly the rate, drained in one go a
        // minute later: never over. The same minute at twice the rate: over, with 60 s of
        // excess (less the burst) to drain.
        let spec = RateSpec {
            limit: 10,
            per_ns: SECOND,
            burst: 10,
        };
        let now = 120 * SECOND;
        let mut at_rate = Gcra::default();
        let mut twice = Gcra::default();
        for tenth in 0..600 {
            let at = 60 * SECOND + tenth * SECOND / 10;
            assert!(at_rate.charge(now, at, 1, &spec).allowed, "unit {tenth}");
            twice.charge(now, at, 1, &spec);
            let last = twice.charge(now, at, 1, &spec);
            assert_eq!(last.allowed, tenth < 305, "unit {tenth}");
        }
        let over = twice.charge(now, now, 0, &spec);
        // TAT = 60 s + 1200 units · 0.1 s = 180 s: 60 s ahead of now, 59 s past the burst.
        assert_eq!(over.retry_after_ns, Some(59 * SECOND));
        assert_eq!(over.reset_ns, 60 * SECOND);
        // Charged later than now (a producer's clock ahead): charged now.
        let mut ahead = Gcra::default();
        assert_eq!(ahead.charge(now, now + 3600 * SECOND, 10, &spec).reset_ns, SECOND);
    }

    /// Values at and around the 64-bit boundary, where the narrow forms hand over to the wide.
    fn edge_or_any() -> impl Strategy<Value = i128> {
        prop_oneof![
            any::<i128>(),
            any::<i64>().prop_map(i128::from),
            (-3i128..=3).prop_map(|d| i128::from(i64::MAX) + d),
            (-3i128..=3).prop_map(|d| i128::from(i64::MIN) + d),
            (-3i128..=3).prop_map(|d| i128::MAX - d.abs()),
            (-3i128..=3).prop_map(|d| i128::MIN + d.abs()),
        ]
    }

    proptest! {
        /// The GCRA bound: in any interval [t_i, t_j] the allowed units are at most
        /// burst + limit × (t_j − t_i) / per, whatever the sizes and spacing of requests.
        #[test]
        fn allowed_units_never_exceed_burst_plus_rate_over_any_interval(
            limit in 1i128..1_000,
            per_s in 1i128..100,
            burst_extra in 0i128..1_000,
            requests in prop::collection::vec((0i128..3 * SECOND, 1i128..500), 1..200),
        ) {
            let spec = RateSpec { limit, per_ns: per_s * SECOND, burst: limit + burst_extra };
            let mut key = Gcra::default();
            let mut now = 0;
            let mut allowed = Vec::new();
            for (gap, units) in requests {
                now += gap;
                if key.check(now, units, &spec).allowed {
                    allowed.push((now, units));
                }
            }
            for i in 0..allowed.len() {
                let mut sum = 0;
                for j in i..allowed.len() {
                    sum += allowed[j].1;
                    let span = allowed[j].0 - allowed[i].0;
                    prop_assert!(sum * spec.per_ns <= spec.burst * spec.per_ns + spec.limit * span,
                        "{sum} units in {span} ns");
                }
            }
        }

        /// The narrow fast paths answer exactly what i128's own operations do.
        #[test]
        fn narrow_arithmetic_is_the_wide_arithmetic(a in edge_or_any(), b in edge_or_any()) {
            prop_assert_eq!(mul(a, b), a.saturating_mul(b));
            prop_assert_eq!(checked_mul(a, b), a.checked_mul(b));
            if b > 0 {
                prop_assert_eq!(div(a, b), a / b);
            }
        }

        /// Exactness: a refused request is allowed at exactly `retry_after` later (not a
        /// nanosecond before), and allowing it keeps the bound.
        #[test]
        fn retry_after_is_exact(
            limit in 1i128..1_000,
            per_s in 1i128..100,
            first in 1i128..1_000,
            second in 1i128..1_000,
        ) {
            let spec = RateSpec { limit, per_ns: per_s * SECOND, burst: limit };
            let mut key = Gcra::default();
            let _ = key.check(0, first.min(limit), &spec);
            let mut fast = key;
            let decision = key.check(0, second, &spec);
            prop_assert_eq!(fast.take(0, second, &spec), decision.allowed);
            prop_assert_eq!(fast, key);
            if let Some(wait) = decision.retry_after_ns {
                prop_assert!(!decision.allowed);
                let mut early = key;
                prop_assert!(wait == 0 || !early.check(wait - 1, second, &spec).allowed);
                prop_assert!(key.check(wait, second, &spec).allowed);
            } else {
                prop_assert!(decision.allowed || second > spec.burst);
            }
        }
    }
}
