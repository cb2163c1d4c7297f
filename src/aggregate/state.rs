//! Mergeable aggregation states: every state is a commutative monoid element, so a series'
//! total is the same whatever order, batching or thread split the observations arrived in.

use serde::{Deserialize, Serialize};

use super::distribution::Distribution;
use super::unique::UniqueState;
use crate::model::format_decimal;

/// How a meter folds its events. Names are the config/API spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    Sum,
    Count,
    Max,
    Min,
    Latest,
    UniqueCount,
    /// A gauge integrated over time (e.g. GB-hours): each point's value holds until the
    /// stream's next point. Stored as a SUM of value × milliseconds; shown in value × hours.
    TimeWeighted,
    /// A mergeable histogram of values (percentiles over any range).
    Distribution,
}

/// Milliseconds per unit of a TIME_WEIGHTED result (value × hours).
pub const TIME_WEIGHTED_UNIT_MS: i128 = 3_600_000;

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "SUM",
            Aggregation::Count => "COUNT",
            Aggregation::Max => "MAX",
            Aggregation::Min => "MIN",
            Aggregation::Latest => "LATEST",
            Aggregation::UniqueCount => "UNIQUE_COUNT",
            Aggregation::TimeWeighted => "TIME_WEIGHTED",
            Aggregation::Distribution => "DISTRIBUTION",
        }
    }

    /// The `AggState::kind` this aggregation's states have (TIME_WEIGHTED integrals are sums).
    pub fn state_kind(self) -> &'static str {
        match self {
            Aggregation::TimeWeighted => "SUM",
            other => other.as_str(),
        }
    }

    /// The config/API spelling back to the aggregation.
    pub fn parse(name: &str) -> Option<Aggregation> {
        [
            Aggregation::Sum,
            Aggregation::Count,
            Aggregation::Max,
            Aggregation::Min,
            Aggregation::Latest,
            Aggregation::UniqueCount,
            Aggregation::TimeWeighted,
            Aggregation::Distribution,
        ]
        .into_iter()
        .find(|aggregation| aggregation.as_str() == name)
    }

    /// Whether events must carry a value at `value_property`.
    pub fn needs_value(self) -> bool {
        !matches!(self, Aggregation::Count)
    }
}

/// One event's contribution to one meter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A fixed-point value at the meter's scale (ignored by COUNT).
    Value(i128),
    /// The 64-bit hash of a UNIQUE_COUNT value.
    Unique(u64),
}

/// An `i128` stored with 8-byte alignment. A bare `i128` is 16-byte aligned, which would pad
/// `AggState` to 32 bytes; this keeps it at 24 and the engine under 128 bytes per series.
/// Serialized exactly as an `i128`.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "i128", into = "i128")]
pub struct Wide([u64; 2]);

impl Wide {
    pub fn get(self) -> i128 {
        (u128::from(self.0[0]) | (u128::from(self.0[1]) << 64)) as i128
    }
}

impl From<i128> for Wide {
    fn from(value: i128) -> Wide {
        let bits = value as u128;
        Wide([bits as u64, (bits >> 64) as u64])
    }
}

impl From<Wide> for i128 {
    fn from(value: Wide) -> i128 {
        value.get()
    }
}

impl std::fmt::Debug for Wide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggState {
    Sum(Wide),
    Count(u64),
    Max(Wide),
    Min(Wide),
    /// The value with the greatest `(ts_ms, value)`: ties on time break on value, so the result
    /// never depends on arrival order. Boxed (like `Unique`) to keep the common states at
    /// 24 bytes: the engine's memory per series is dominated by this enum.
    Latest(Box<Latest>),
    Unique(Box<UniqueState>),
    /// Appended last: earlier variants keep their encoding.
    Distribution(Box<Distribution>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    pub ts_ms: i64,
    pub value: i128,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("cannot merge {0} state into {1} state")]
    Mismatch(&'static str, &'static str),
    #[error("sum overflows 128 bits")]
    Overflow,
}

impl AggState {
    pub fn from_observation(
        aggregation: Aggregation,
        observation: Observation,
        ts_ms: i64,
        unique_limit: u32,
    ) -> AggState {
        match (aggregation, observation) {
            (Aggregation::Count, _) => AggState::Count(1),
            (Aggregation::UniqueCount, Observation::Unique(hash)) => {
                AggState::Unique(Box::new(UniqueState::single(unique_limit, hash)))
            }
            (Aggregation::UniqueCount, Observation::Value(value)) => {
                // Numeric unique values are hashed by their fixed-point representation.
                AggState::Unique(Box::new(UniqueState::single(
                    unique_limit,
                    xxhash_rust::xxh3::xxh3_64(&value.to_le_bytes()),
                )))
            }
            (_, Observation::Unique(_)) => {
                unreachable!("invariant: unique observations only reach UNIQUE_COUNT meters")
            }
            (Aggregation::Sum | Aggregation::TimeWeighted, Observation::Value(value)) => {
                AggState::Sum(value.into())
            }
            (Aggregation::Max, Observation::Value(value)) => AggState::Max(value.into()),
            (Aggregation::Min, Observation::Value(value)) => AggState::Min(value.into()),
            (Aggregation::Latest, Observation::Value(value)) => {
                AggState::Latest(Box::new(Latest { ts_ms, value }))
            }
            (Aggregation::Distribution, Observation::Value(value)) => {
                let mut distribution = Distribution::default();
                // Negative values are refused at the edges (DISTRIBUTION meters take none).
                distribution.record(u64::try_from(value).unwrap_or(0), 1);
                AggState::Distribution(Box::new(distribution))
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AggState::Sum(_) => "SUM",
            AggState::Count(_) => "COUNT",
            AggState::Max(_) => "MAX",
            AggState::Min(_) => "MIN",
            AggState::Latest(_) => "LATEST",
            AggState::Unique(_) => "UNIQUE_COUNT",
            AggState::Distribution(_) => "DISTRIBUTION",
        }
    }

    /// Folds `other` into `self`. Commutative and associative for every state kind.
    pub fn merge(&mut self, other: &AggState) -> Result<(), MergeError> {
        match (self, other) {
            (AggState::Sum(a), AggState::Sum(b)) => {
                *a = a.get().checked_add(b.get()).ok_or(MergeError::Overflow)?.into()
            }
            (AggState::Count(a), AggState::Count(b)) => *a = a.checked_add(*b).ok_or(MergeError::Overflow)?,
            (AggState::Max(a), AggState::Max(b)) => *a = a.get().max(b.get()).into(),
            (AggState::Min(a), AggState::Min(b)) => *a = a.get().min(b.get()).into(),
            (AggState::Latest(mine), AggState::Latest(theirs)) => {
                if (theirs.ts_ms, theirs.value) > (mine.ts_ms, mine.value) {
                    **mine = (**theirs).clone();
                }
            }
            (AggState::Unique(a), AggState::Unique(b)) => a.merge(b),
            (AggState::Distribution(a), AggState::Distribution(b)) => a.merge(b),
            (mine, theirs) => return Err(MergeError::Mismatch(theirs.kind(), mine.kind())),
        }
        Ok(())
    }

    /// Folds one observation in without building a temporary state (the hot path).
    pub fn observe(&mut self, observation: Observation, ts_ms: i64) -> Result<(), MergeError> {
        match (self, observation) {
            (AggState::Sum(a), Observation::Value(v)) => {
                *a = a.get().checked_add(v).ok_or(MergeError::Overflow)?.into()
            }
            (AggState::Count(a), _) => *a += 1,
            (AggState::Max(a), Observation::Value(v)) => *a = a.get().max(v).into(),
            (AggState::Min(a), Observation::Value(v)) => *a = a.get().min(v).into(),
            (AggState::Latest(latest), Observation::Value(v)) => {
                if (ts_ms, v) > (latest.ts_ms, latest.value) {
                    latest.ts_ms = ts_ms;
                    latest.value = v;
                }
            }
            (AggState::Unique(set), Observation::Unique(hash)) => set.insert(hash),
            (AggState::Unique(set), Observation::Value(v)) => {
                set.insert(xxhash_rust::xxh3::xxh3_64(&v.to_le_bytes()))
            }
            (AggState::Distribution(distribution), Observation::Value(v)) => {
                distribution.record(u64::try_from(v).unwrap_or(0), 1)
            }
            (mine, _) => return Err(MergeError::Mismatch("observation", mine.kind())),
        }
        Ok(())
    }

    /// The state's value as the meter reports it: exact, except TIME_WEIGHTED integrals, which
    /// are converted from value × ms to value × hours and rounded half away from zero to `scale`.
    pub fn quantity_string(&self, aggregation: Aggregation, scale: u32) -> String {
        match (aggregation, self) {
            (Aggregation::TimeWeighted, AggState::Sum(integral)) => {
                let integral = integral.get();
                let half = TIME_WEIGHTED_UNIT_MS / 2;
                let rounded = if integral >= 0 {
                    integral.saturating_add(half) / TIME_WEIGHTED_UNIT_MS
                } else {
                    integral.saturating_sub(half) / TIME_WEIGHTED_UNIT_MS
                };
                format_decimal(rounded, scale)
            }
            _ => self.value_string(scale),
        }
    }

    /// The state's value as an exact decimal string, `scale` being the meter's scale.
    pub fn value_string(&self, scale: u32) -> String {
        match self {
            AggState::Sum(v) | AggState::Max(v) | AggState::Min(v) => format_decimal(v.get(), scale),
            AggState::Latest(latest) => format_decimal(latest.value, scale),
            AggState::Count(n) => n.to_string(),
            AggState::Unique(set) => set.count().to_string(),
            AggState::Distribution(distribution) => distribution.count().to_string(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: aggregation states always serialize")
    }

    /// `encode` appended to `out`.
    pub fn encode_into(&self, out: Vec<u8>) -> Vec<u8> {
        postcard::to_extend(self, out).expect("invariant: aggregation states always serialize")
    }

    /// Decodes and checks a state: one this build could not have made (a malformed sketch from
    /// a forged or damaged record) is an error here, never a panic in a later merge.
    pub fn decode(bytes: &[u8]) -> Result<AggState, postcard::Error> {
        let state: AggState = postcard::from_bytes(bytes)?;
        if state.is_valid() {
            Ok(state)
        } else {
            Err(postcard::Error::DeserializeBadEncoding)
        }
    }

    /// Whether this is a state the engine can make (see `UniqueState::is_valid`): what any
    /// decoder of untrusted bytes must check before a state reaches a merge.
    pub fn is_valid(&self) -> bool {
        match self {
            AggState::Unique(unique) => unique.is_valid(),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state no merge could make is refused at decoding: an empty HyperLogLog sketch (bytes
    /// [Unique, Sketch, 0 registers]) once reached RocksDB's merge callback and aborted.
    #[test]
    fn malformed_states_are_refused_at_decoding() {
        assert!(AggState::decode(&[5, 1, 0]).is_err());
        let mut sketch = vec![5, 1, 0x80, 0x80, 0x01];
        sketch.extend(std::iter::repeat_n(52u8, 1 << 14));
        assert!(AggState::decode(&sketch).is_err(), "a rank no hash can have");
        let valid = AggState::from_observation(Aggregation::UniqueCount, Observation::Unique(7), 0, 100);
        assert_eq!(AggState::decode(&valid.encode()).unwrap(), valid);
    }
    use proptest::prelude::*;

    fn arb_state() -> impl Strategy<Value = AggState> {
        prop_oneof![
            any::<i64>().prop_map(|v| AggState::Sum((v as i128).into())),
            any::<u32>().prop_map(|v| AggState::Count(v as u64)),
            any::<i64>().prop_map(|v| AggState::Max((v as i128).into())),
            any::<i64>().prop_map(|v| AggState::Min((v as i128).into())),
            (any::<i32>(), any::<i64>()).prop_map(|(t, v)| AggState::Latest(Box::new(Latest {
                ts_ms: t as i64,
                value: v as i128
            }))),
            (1u32..40, proptest::collection::vec(0u64..60, 0..50)).prop_map(|(limit, values)| {
                let mut set = UniqueState::new(limit);
                for v in values {
                    set.insert(xxhash_rust::xxh3::xxh3_64(&v.to_le_bytes()));
                }
                AggState::Unique(Box::new(set))
            }),
            proptest::collection::vec((0u64..10_000_000, 1u64..5), 0..30).prop_map(|values| {
                let mut distribution = Distribution::default();
                for (value, count) in values {
                    distribution.record(value, count);
                }
                AggState::Distribution(Box::new(distribution))
            }),
        ]
    }

    fn same_kind_triple() -> impl Strategy<Value = (AggState, AggState, AggState)> {
        (arb_state(), arb_state(), arb_state()).prop_filter("same kind", |(a, b, c)| {
            a.kind() == b.kind() && b.kind() == c.kind()
        })
    }

    fn merged(a: &AggState, b: &AggState) -> AggState {
        let mut out = a.clone();
        out.merge(b).unwrap();
        out
    }

    proptest! {
        #[test]
        fn wide_round_trips_every_i128(v in any::<i128>()) {
            prop_assert_eq!(Wide::from(v).get(), v);
            // Same bytes on disk as a plain i128.
            prop_assert_eq!(postcard::to_stdvec(&Wide::from(v)).unwrap(), postcard::to_stdvec(&v).unwrap());
        }

        #[test]
        fn merge_is_commutative((a, b, _c) in same_kind_triple()) {
            let ab = merged(&a, &b);
            let ba = merged(&b, &a);
            prop_assert_eq!(ab.value_string(6), ba.value_string(6));
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn merge_is_associative((a, b, c) in same_kind_triple()) {
            let left = merged(&merged(&a, &b), &c);
            let right = merged(&a, &merged(&b, &c));
            prop_assert_eq!(left, right);
        }

        #[test]
        fn encoding_round_trips(a in arb_state()) {
            prop_assert_eq!(AggState::decode(&a.encode()).unwrap(), a);
        }
    }

    #[test]
    fn mismatched_kinds_are_an_error_not_a_silent_drop() {
        let mut sum = AggState::Sum(1.into());
        assert_eq!(
            sum.merge(&AggState::Max(2.into())),
            Err(MergeError::Mismatch("MAX", "SUM"))
        );
        assert_eq!(sum, AggState::Sum(1.into()));
    }

    #[test]
    fn time_weighted_integrals_show_in_value_hours_rounded_half_away() {
        // 10.000 GB for 30 s + 20.000 GB for 60 s = 1500 GB·s = 0.41666… GB·h.
        let integral = AggState::Sum((10_000 * 30_000 + 20_000 * 60_000).into());
        assert_eq!(integral.quantity_string(Aggregation::TimeWeighted, 3), "0.417");
        // Exactly half a unit at the last place rounds away from zero, both signs.
        let half = AggState::Sum((TIME_WEIGHTED_UNIT_MS / 2).into());
        assert_eq!(half.quantity_string(Aggregation::TimeWeighted, 0), "1");
        let negative = AggState::Sum((-TIME_WEIGHTED_UNIT_MS / 2).into());
        assert_eq!(negative.quantity_string(Aggregation::TimeWeighted, 0), "-1");
        assert_eq!(
            integral.quantity_string(Aggregation::Sum, 3),
            integral.value_string(3)
        );
        for aggregation in [
            Aggregation::Sum,
            Aggregation::TimeWeighted,
            Aggregation::UniqueCount,
        ] {
            assert_eq!(Aggregation::parse(aggregation.as_str()), Some(aggregation));
        }
    }

    #[test]
    fn common_states_stay_small() {
        // Memory per active series is dominated by this size (BENCHMARKS.md, "Memory per active series").
        assert_eq!(std::mem::size_of::<AggState>(), 24);
    }

    #[test]
    fn latest_breaks_time_ties_on_value() {
        let a = AggState::Latest(Box::new(Latest { ts_ms: 5, value: 1 }));
        let b = AggState::Latest(Box::new(Latest { ts_ms: 5, value: 9 }));
        assert_eq!(merged(&a, &b), merged(&b, &a));
        assert_eq!(merged(&a, &b).value_string(0), "9");
    }
}
