//! Histogram buckets as DISTRIBUTION meters read them: representative values per bucket,
//! and cumulative exponential histograms folded to one canonical scale.

/// A histogram point's buckets, as DISTRIBUTION meters read them.
pub(super) enum Buckets<'a> {
    /// `counts[i]` observations in `(bounds[i-1], bounds[i]]` (the first from -∞, the last to +∞).
    Explicit { bounds: &'a [f64], counts: &'a [u64] },
    /// Base `2^(2^-scale)`: positive bucket `offset + k` is `(base^(offset+k), base^(offset+k+1)]`.
    Exponential {
        scale: i32,
        zero_count: u64,
        positive:
            Option<&'a opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets>,
        negative:
            Option<&'a opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets>,
    },
    /// Summaries carry quantiles, not buckets.
    None,
}

/// A histogram point's observations as `(bucket, representative value, count)` (bucket: its
/// index, the zero bucket `i64::MIN`), each bucket taken at
/// its midpoint (geometric for exponential buckets), clamped to the point's min and max when
/// present; the open-ended first and last buckets are taken at their finite bound (or the
/// point's min/max). Negative observations are refused: DISTRIBUTION meters take none.
pub(super) fn bucket_values(
    buckets: &Buckets<'_>,
    min: Option<f64>,
    max: Option<f64>,
) -> Result<Vec<(i64, f64, u64)>, String> {
    let clamp = |value: f64| {
        let value = min.map_or(value, |min| value.max(min));
        max.map_or(value, |max| value.min(max))
    };
    let mut out = Vec::new();
    match buckets {
        Buckets::None => return Err("a summary has no buckets (DISTRIBUTION needs a histogram)".into()),
        Buckets::Explicit { bounds, counts } => {
            if counts.len() != bounds.len() + 1 && !counts.is_empty() {
                return Err(format!(
                    "{} bucket counts for {} explicit bounds (expected one more count than bounds)",
                    counts.len(),
                    bounds.len()
                ));
            }
            for (index, count) in counts.iter().enumerate() {
                if *count == 0 {
                    continue;
                }
                let value = match (index.checked_sub(1).map(|i| bounds[i]), bounds.get(index)) {
                    (None, None) => max.or(min).unwrap_or(0.0),
                    (None, Some(upper)) => min.map_or(*upper, |min| (min + upper) / 2.0),
                    (Some(lower), None) => max.unwrap_or(lower),
                    (Some(lower), Some(upper)) => (lower + upper) / 2.0,
                };
                out.push((index as i64, clamp(value), *count));
            }
        }
        Buckets::Exponential {
            scale,
            zero_count,
            positive,
            negative,
        } => {
            if negative.is_some_and(|negative| negative.bucket_counts.iter().any(|count| *count > 0)) {
                return Err("negative buckets: DISTRIBUTION meters take no negative values".into());
            }
            if *zero_count > 0 {
                out.push((i64::MIN, 0.0, *zero_count));
            }
            let base = 2f64.powf(2f64.powi(-*scale));
            if let Some(positive) = positive {
                for (k, count) in positive.bucket_counts.iter().enumerate() {
                    if *count > 0 {
                        let index = f64::from(positive.offset) + k as f64;
                        out.push((index as i64, clamp(base.powf(index + 0.5)), *count));
                    }
                }
            }
        }
    }
    if out.iter().any(|(_, value, _)| *value < 0.0 || !value.is_finite()) {
        return Err("negative or non-finite bucket: DISTRIBUTION meters take no negative values".into());
    }
    Ok(out)
}

/// The scale cumulative exponential histograms are tracked at (base 2^(1/4): a bucket's
/// geometric midpoint is within ±9 % of any value in it).
pub const CANONICAL_SCALE: i32 = 2;

/// A cumulative exponential histogram point's positive buckets folded to `CANONICAL_SCALE`:
/// `(canonical index, representative value, count)`, the zero bucket as `i64::MIN`. SDKs only
/// ever lower a histogram's scale by merging adjacent bucket pairs (index `i` at scale `s`
/// becomes `i >> 1` at `s − 1`), and the canonical index of `i` at `s` is `i >> (s − C)`: so the
/// same observations give the same canonical buckets before and after a rescale, and each
/// canonical bucket's count stays a cumulative (monotonic) stream. Points coarser than the
/// canonical scale cannot be split and are refused.
pub(super) fn canonical_buckets(
    scale: i32,
    zero_count: u64,
    positive: Option<&opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets>,
    min: Option<f64>,
    max: Option<f64>,
) -> Result<Vec<(i64, f64, u64)>, String> {
    if scale < CANONICAL_SCALE {
        return Err(format!(
            "a cumulative exponential histogram at scale {scale} is coarser than tallyd's scale \
             {CANONICAL_SCALE} for DISTRIBUTION; export DELTA temporality or keep max_scale ≥ {CANONICAL_SCALE}"
        ));
    }
    let shift = (scale - CANONICAL_SCALE).min(63) as u32;
    let mut folded: std::collections::BTreeMap<i64, u64> = std::collections::BTreeMap::new();
    if let Some(positive) = positive {
        for (k, count) in positive.bucket_counts.iter().enumerate() {
            if *count > 0 {
                let index = i64::from(positive.offset) + k as i64;
                *folded.entry(index >> shift).or_default() += count;
            }
        }
    }
    let clamp = |value: f64| {
        let value = min.map_or(value, |min| value.max(min));
        max.map_or(value, |max| value.min(max))
    };
    let base = 2f64.powf(2f64.powi(-CANONICAL_SCALE));
    let mut out = Vec::with_capacity(folded.len() + 1);
    if zero_count > 0 {
        out.push((i64::MIN, 0.0, zero_count));
    }
    for (index, count) in folded {
        let value = clamp(base.powf(index as f64 + 0.5));
        if !value.is_finite() {
            return Err("bucket value out of range".into());
        }
        out.push((index, value, count));
    }
    Ok(out)
}
