//! DISTRIBUTION: a mergeable HdrHistogram of values at the meter's scale (2 significant
//! digits: every value is kept within 1 % of itself), so percentiles over any range are the
//! percentiles of the merged windows, whatever order or batching the observations came in.
//!
//! Stored as the list of recorded `(bucket value, count)` pairs; re-recording a bucket's value
//! lands in the same bucket, so encoding round-trips exactly.

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Significant decimal digits kept per value: ~1 % value error, a few KB per series.
const SIGNIFICANT_DIGITS: u8 = 2;

#[derive(Clone, Debug)]
pub struct Distribution {
    histogram: Histogram<u64>,
}

impl Default for Distribution {
    fn default() -> Self {
        Distribution {
            histogram: Histogram::new(SIGNIFICANT_DIGITS).expect("invariant: 2 significant digits is valid"),
        }
    }
}

impl Distribution {
    /// Records `count` observations of `value` (fixed point at the meter's scale).
    pub fn record(&mut self, value: u64, count: u64) {
        // Auto-resizing histograms accept any u64.
        let _ = self.histogram.record_n(value, count);
    }

    pub fn merge(&mut self, other: &Distribution) {
        // Same precision on both sides and auto-resize: addition cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value below which `quantile` (0..=1) of the observations fall (fixed point).
    pub fn value_at_quantile(&self, quantile: f64) -> u64 {
        self.histogram.value_at_quantile(quantile)
    }

    fn buckets(&self) -> Vec<(u64, u64)> {
        self.histogram
            .iter_recorded()
            .map(|bucket| (bucket.value_iterated_to(), bucket.count_at_value()))
            .collect()
    }
}

impl PartialEq for Distribution {
    fn eq(&self, other: &Distribution) -> bool {
        self.buckets() == other.buckets()
    }
}

impl Eq for Distribution {}

impl Serialize for Distribution {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.buckets().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Distribution {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Distribution, D::Error> {
        let buckets = Vec::<(u64, u64)>::deserialize(deserializer)?;
        let mut distribution = Distribution::default();
        for (value, count) in buckets {
            distribution.record(value, count);
        }
        Ok(distribution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_one_percent_and_encoding_round_trips() {
        let mut distribution = Distribution::default();
        for value in 1..=1000u64 {
            distribution.record(value * 1000, 1);
        }
        let p99 = distribution.value_at_quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.01, "{p99}");
        let bytes = postcard::to_stdvec(&distribution).unwrap();
        let back: Distribution = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, distribution);
        assert_eq!(back.count(), 1000);
    }
}
