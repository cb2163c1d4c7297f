//! OTLP requests → meter updates. Pure: no shared state but the name tables, no I/O, no clock
//! (the caller passes `now`), so it can be property-tested like the CloudEvents decoder.
//!
//! A data point (or log record) is the unit of acceptance: it is either mapped (every meter it
//! feeds gets its update) or refused with a reason, never half-counted. Refused points are
//! reported in the OTLP partial success and dead-lettered by the edge.
//!
//! How points become usage (see the README's OTLP section for the operator's view):
//! - tenant: the resource attribute `tenant_attribute`, or the API key's tenant;
//! - meters match by metric name (`otlp_metric`) or by the record's event name (`otlp_log`);
//! - group-by dimensions come from point/record attributes, then resource attributes;
//! - DELTA sums and histogram counts/sums add, deduplicated per point by (stream, start, time)
//!   so a collector's retry never counts twice; CUMULATIVE ones become `CumulativePoint`s that
//!   the commit stage turns into deltas per stream (`aggregate::streams`);
//! - gauges (and sums' current values) feed MAX / MIN / LATEST, which are idempotent;
//! - log records count 1 (or `value_attribute`) and dedup by `id_attribute` like CloudEvents ids.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};
use prost::Message;

use crate::aggregate::streams::{CumulativePoint, StreamKind};
use crate::aggregate::{AggState, Aggregation, Observation};
use crate::ingest::decode::{dedup_key, Acceptance, MAX_ATTRIBUTE_BYTES};
use crate::meter::{Meter, MeterSource, Meters, MAX_DIMENSION_VALUE_BYTES};
use crate::model::{
    decimal_from_f64, parse_decimal, Dims, DimsCache, DimsId, Names, QuantityError, SeriesKey,
};

/// What the mapping needs besides the request.
pub struct MapContext<'a> {
    pub meters: &'a Meters,
    pub names: &'a Names,
    /// Resource attribute naming the tenant.
    pub tenant_attribute: &'a str,
    /// The authenticated tenant (API key); points may belong to it only.
    pub key_tenant: Option<&'a str>,
    pub now_ms: i64,
    pub acceptance: Acceptance,
}

/// Why a point or record is not counted (a closed set: it is a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// No tenant (attribute missing or not a string).
    NoTenant,
    /// The resource names a tenant other than the API key's.
    WrongTenant,
    /// A value, timestamp, attribute or shape problem.
    Invalid,
    TooLate,
    TooFarInFuture,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoTenant => "no_tenant",
            RefusalReason::WrongTenant => "wrong_tenant",
            RefusalReason::Invalid => "invalid",
            RefusalReason::TooLate => "too_late",
            RefusalReason::TooFarInFuture => "too_far_in_future",
        }
    }
}

/// A refused point or record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointRefusal {
    pub reason: RefusalReason,
    pub message: String,
    /// Metric name or log event name.
    pub name: String,
    pub tenant: Option<String>,
    pub time_unix_nano: u64,
}

/// One accepted point's direct updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedPoint {
    /// Set when the point adds (delta sums, counts, log records with an id): counted once per
    /// key. Idempotent updates (MAX, MIN, LATEST) need none.
    pub dedup_key: Option<u128>,
    /// Inline for one meter (the usual case): no allocation per point.
    pub updates: smallvec::SmallVec<[(SeriesKey, AggState); 1]>,
    /// Lands in a window that had already closed (it amends it).
    pub late: bool,
}

/// A request, mapped.
#[derive(Debug, Default)]
pub struct Mapped {
    pub points: Vec<MappedPoint>,
    pub cumulative: Vec<CumulativePoint>,
    pub refused: Vec<PointRefusal>,
    /// Points or records that no meter reads (accepted, not counted).
    pub unmetered: usize,
    /// Points or records in the request.
    pub total: usize,
}

impl Mapped {
    /// Points or records that count (some of them may still be duplicates).
    pub fn accepted(&self) -> usize {
        self.total - self.unmetered - self.refused.len()
    }

    /// The partial-success message: counts per distinct reason, most frequent first.
    pub fn refusal_summary(&self, noun: &str) -> String {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for refusal in &self.refused {
            match counts.iter_mut().find(|(message, _)| *message == refusal.message) {
                Some((_, count)) => *count += 1,
                None => counts.push((&refusal.message, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = counts
            .iter()
            .take(5)
            .map(|(message, count)| format!("{count} × {message}"))
            .collect();
        let more = counts.len().saturating_sub(5);
        format!(
            "{} of {} {noun} rejected: {}{}",
            self.refused.len(),
            self.total,
            shown.join("; "),
            if more > 0 {
                format!("; and {more} other reasons")
            } else {
                String::new()
            }
        )
    }
}

/// An attribute value as a dimension or id string; composite values have none.
fn attribute_text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(number) => Some(number.to_string()),
        any_value::Value::BoolValue(flag) => Some(flag.to_string()),
        any_value::Value::DoubleValue(number) if number.is_finite() => Some(number.to_string()),
        _ => None,
    }
}

fn find<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// The bytes an identity hash is taken over, gathered and then hashed in one call. The digest
/// is the one a streaming `Xxh3` fed the same bytes gives (the hashes are stored: dedup keys,
/// stream states), but a point's identity is a few short pieces, and streaming set up a
/// 600-byte hasher and copied each piece into its buffer: most of the mapping's hashing time.
#[derive(Default)]
struct HashInput(smallvec::SmallVec<[u8; 256]>);

impl HashInput {
    fn update(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn digest128(&self) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&self.0)
    }
}

/// Hashes attributes independently of their order (SDKs need not sort them).
fn hash_attributes(hasher: &mut HashInput, attributes: &[KeyValue]) {
    hasher.update(&(attributes.len() as u32).to_le_bytes());
    let hash_one = |hasher: &mut HashInput, kv: &KeyValue| {
        hash_str(hasher, &kv.key);
        hash_value(hasher, kv.value.as_ref().and_then(|value| value.value.as_ref()));
    };
    // Most points carry a few attributes, already sorted: no copy to sort them (the sort is
    // stable, so both ways hash equal keys in the same order).
    if attributes.windows(2).all(|pair| pair[0].key <= pair[1].key) {
        for kv in attributes {
            hash_one(hasher, kv);
        }
    } else {
        let mut sorted: Vec<&KeyValue> = attributes.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for kv in sorted {
            hash_one(hasher, kv);
        }
    }
}

/// A type tag, then the value: `"1"` and `1` are different attributes.
fn hash_value(hasher: &mut HashInput, value: Option<&any_value::Value>) {
    match value {
        None => hasher.update(&[0]),
        Some(any_value::Value::StringValue(text)) => {
            hasher.update(&[1]);
            hash_str(hasher, text);
        }
        Some(any_value::Value::BoolValue(flag)) => hasher.update(&[2, u8::from(*flag)]),
        Some(any_value::Value::IntValue(number)) => {
            hasher.update(&[3]);
            hasher.update(&number.to_le_bytes());
        }
        Some(any_value::Value::DoubleValue(number)) => {
            hasher.update(&[4]);
            hasher.update(&number.to_bits().to_le_bytes());
        }
        // Composite values: prost's encoding is deterministic for one value.
        Some(other) => {
            hasher.update(&[5]);
            let encoded = AnyValue {
                value: Some(other.clone()),
            }
            .encode_to_vec();
            hasher.update(&(encoded.len() as u32).to_le_bytes());
            hasher.update(&encoded);
        }
    }
}

fn hash_str(hasher: &mut HashInput, text: &str) {
    hasher.update(&(text.len() as u32).to_le_bytes());
    hasher.update(text.as_bytes());
}

/// The tenant of a resource, or why there is none.
fn tenant_of(resource: &[KeyValue], context: &MapContext<'_>) -> Result<String, (RefusalReason, String)> {
    let named = find(resource, context.tenant_attribute);
    let named = match named {
        None => None,
        Some(value) => match &value.value {
            Some(any_value::Value::StringValue(text)) if !text.is_empty() => Some(text.as_str()),
            _ => {
                return Err((
                    RefusalReason::NoTenant,
                    format!(
                        "resource attribute `{}` must be a non-empty string",
                        context.tenant_attribute
                    ),
                ))
            }
        },
    };
    match (named, context.key_tenant) {
        (Some(named), Some(key)) if named != key => Err((
            RefusalReason::WrongTenant,
            format!(
                "resource attribute `{}` names another tenant than the API key's",
                context.tenant_attribute
            ),
        )),
        (_, Some(key)) => Ok(key.to_string()),
        (Some(named), None) if named.len() > MAX_ATTRIBUTE_BYTES => Err((
            RefusalReason::NoTenant,
            format!(
                "resource attribute `{}` is longer than {MAX_ATTRIBUTE_BYTES} bytes",
                context.tenant_attribute
            ),
        )),
        (Some(named), None) => Ok(named.to_string()),
        (None, None) => Err((
            RefusalReason::NoTenant,
            format!(
                "resource attribute `{}` missing (it names the tenant)",
                context.tenant_attribute
            ),
        )),
    }
}

/// A meter's dimensions from the point's attributes, then the resource's.
fn dimensions(meter: &Meter, point: &[KeyValue], resource: &[KeyValue]) -> Result<Dims, String> {
    let mut dims = Vec::with_capacity(meter.group_by_attributes.len());
    for (name, attribute) in &meter.group_by_attributes {
        let Some(value) = find(point, attribute).or_else(|| find(resource, attribute)) else {
            continue;
        };
        let Some(text) = attribute_text(value) else {
            return Err(format!(
                "attribute `{attribute}` (group_by `{name}`) must be a string, number or boolean"
            ));
        };
        if text.len() > MAX_DIMENSION_VALUE_BYTES {
            return Err(format!(
                "attribute `{attribute}` (group_by `{name}`) is {} bytes, more than {MAX_DIMENSION_VALUE_BYTES}",
                text.len()
            ));
        }
        dims.push((name.clone(), text));
    }
    Ok(dims)
}

/// A fingerprint of `meter`'s dimension values for a point (`model::DimsCache`): each value
/// hashes self-delimited (type tag, length), an absent one as `0xff`.
fn dims_fingerprint(meter: &Meter, point: &[KeyValue], resource: &[KeyValue]) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&meter.id.to_le_bytes());
    for (_, attribute) in &meter.group_by_attributes {
        match find(point, attribute).or_else(|| find(resource, attribute)) {
            None => hasher.update(&[0xff]),
            Some(value) => hash_value(&mut hasher, value.value.as_ref()),
        }
    }
    hasher.digest128()
}

/// The interned id of `meter`'s dimensions for a point, or why they cannot be read.
fn intern_dims(
    cache: &mut DimsCache,
    meter: &Meter,
    point: &[KeyValue],
    resource: &[KeyValue],
    names: &Names,
) -> Result<DimsId, String> {
    cache.get_or_intern(Some(dims_fingerprint(meter, point, resource)), names, || {
        dimensions(meter, point, resource)
    })
}

/// The point's time in unix ms, refused when absent or outside the acceptance window.
fn point_time(time_unix_nano: u64, context: &MapContext<'_>) -> Result<i64, (RefusalReason, String)> {
    if time_unix_nano == 0 {
        return Err((RefusalReason::Invalid, "time_unix_nano missing".into()));
    }
    let ts_ms = (time_unix_nano / 1_000_000) as i64;
    let acceptance = context.acceptance;
    if ts_ms < context.now_ms - acceptance.max_lateness_secs * 1000 {
        return Err((
            RefusalReason::TooLate,
            format!(
                "time is more than max_lateness_secs ({}) in the past",
                acceptance.max_lateness_secs
            ),
        ));
    }
    if ts_ms > context.now_ms + acceptance.max_future_secs * 1000 {
        return Err((
            RefusalReason::TooFarInFuture,
            format!(
                "time is more than max_future_secs ({}) in the future",
                acceptance.max_future_secs
            ),
        ));
    }
    Ok(ts_ms)
}

fn quantity_error(what: &str, error: QuantityError) -> String {
    match error {
        QuantityError::NotANumber => format!("{what} is NaN or infinite"),
        other => format!("{what} {other}"),
    }
}

/// A number data point's value at `scale`.
fn number_value(value: Option<&number_data_point::Value>, scale: u32) -> Result<i128, String> {
    match value {
        None => Err("value missing (neither as_int nor as_double)".into()),
        Some(number_data_point::Value::AsInt(int)) => {
            parse_decimal(&int.to_string(), scale).map_err(|error| quantity_error("value", error))
        }
        Some(number_data_point::Value::AsDouble(double)) => {
            decimal_from_f64(*double, scale).map_err(|error| quantity_error("value", error))
        }
    }
}

/// The shape of one metric data point, as meters read it.
struct PointShape<'a> {
    kind: &'static str,
    attributes: &'a [KeyValue],
    start_ns: u64,
    time_ns: u64,
    /// DELTA (true) or CUMULATIVE (false); gauges count as delta (their values are levels).
    delta: bool,
    monotonic: bool,
    values: PointValues<'a>,
}

enum PointValues<'a> {
    /// Gauge or sum.
    Number(Option<&'a number_data_point::Value>),
    /// Histogram, exponential histogram or summary.
    Distribution {
        count: u64,
        sum: Option<f64>,
        min: Option<f64>,
        max: Option<f64>,
        buckets: Buckets<'a>,
    },
}

/// A histogram point's buckets, as DISTRIBUTION meters read them.
enum Buckets<'a> {
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
fn bucket_values(
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
fn canonical_buckets(
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

/// What one meter takes from one point.
enum MeterUpdate {
    /// Added to the series (deduplicated per point).
    Add(AggState),
    /// Idempotent (MAX, MIN, LATEST).
    Level(AggState),
    /// Becomes a delta at commit.
    Cumulative { value: i128, monotonic: bool },
    /// A level integrated over time at commit.
    TimeWeighted { value: i128 },
    /// A cumulative histogram's buckets `(bucket, value at scale, cumulative count)`: each a
    /// cumulative count whose delta is recorded at the bucket's value at commit.
    CumulativeBuckets(Vec<(i64, u64, u64)>),
}

fn meter_update(meter: &Meter, shape: &PointShape<'_>, ts_ms: i64) -> Result<MeterUpdate, String> {
    let slug = &meter.slug;
    let aggregation = meter.aggregation;
    let non_negative = |value: i128, what: &str| -> Result<i128, String> {
        if value < 0 && !meter.allow_negative {
            Err(format!(
                "{what} is negative and meter `{slug}` does not allow_negative"
            ))
        } else {
            Ok(value)
        }
    };
    let level = |value: i128| {
        MeterUpdate::Level(AggState::from_observation(
            aggregation,
            Observation::Value(value),
            ts_ms,
            meter.unique_exact_limit,
        ))
    };
    match (&shape.values, aggregation) {
        (_, Aggregation::UniqueCount) => Err(format!(
            "meter `{slug}` is UNIQUE_COUNT, which metric points cannot feed"
        )),
        (PointValues::Number(_), Aggregation::Count) => Ok(MeterUpdate::Add(AggState::Count(1))),
        (PointValues::Number(value), Aggregation::TimeWeighted) => {
            let value = non_negative(number_value(*value, meter.scale)?, "value")?;
            Ok(MeterUpdate::TimeWeighted { value })
        }
        (PointValues::Number(value), Aggregation::Distribution) => {
            let value = non_negative(number_value(*value, meter.scale)?, "value")?;
            Ok(MeterUpdate::Add(AggState::from_observation(
                aggregation,
                Observation::Value(value),
                ts_ms,
                meter.unique_exact_limit,
            )))
        }
        (
            PointValues::Distribution {
                min, max, buckets, ..
            },
            Aggregation::Distribution,
        ) => {
            let values = match buckets {
                // A cumulative exponential histogram's scale may shrink between points, which
                // renames its buckets: its streams are kept at one canonical scale instead.
                Buckets::Exponential {
                    scale,
                    zero_count,
                    positive,
                    negative,
                } if !shape.delta => {
                    if negative.is_some_and(|negative| negative.bucket_counts.iter().any(|count| *count > 0))
                    {
                        return Err("negative buckets: DISTRIBUTION meters take no negative values".into());
                    }
                    canonical_buckets(*scale, *zero_count, *positive, *min, *max)
                        .map_err(|reason| format!("{reason} (meter `{slug}`)"))?
                }
                _ => bucket_values(buckets, *min, *max)?,
            };
            let mut observed = Vec::new();
            for (bucket, value, count) in values {
                let value =
                    decimal_from_f64(value, meter.scale).map_err(|error| quantity_error("bucket", error))?;
                let value = u64::try_from(value)
                    .map_err(|_| format!("bucket value out of range for meter `{slug}`"))?;
                observed.push((bucket, value, count));
            }
            if !shape.delta {
                // Each bucket's count is a cumulative stream of its own (see `streams`).
                return Ok(MeterUpdate::CumulativeBuckets(observed));
            }
            let mut distribution = crate::aggregate::distribution::Distribution::default();
            for (_, value, count) in observed {
                distribution.record(value, count);
            }
            Ok(MeterUpdate::Add(AggState::Distribution(Box::new(distribution))))
        }
        (PointValues::Distribution { .. }, Aggregation::TimeWeighted) => Err(format!(
            "a {} has no level to integrate (meter `{slug}` is TIME_WEIGHTED); use a gauge",
            shape.kind
        )),
        (PointValues::Number(value), Aggregation::Max | Aggregation::Min | Aggregation::Latest) => {
            let value = non_negative(number_value(*value, meter.scale)?, "value")?;
            Ok(level(value))
        }
        (PointValues::Number(_), Aggregation::Sum) if shape.kind == "gauge" => Err(format!(
            "a gauge is not additive (meter `{slug}` is SUM); use MAX, MIN or LATEST"
        )),
        (PointValues::Number(value), Aggregation::Sum) => {
            let value = number_value(*value, meter.scale)?;
            if shape.monotonic && value < 0 {
                return Err("negative value on a monotonic sum".into());
            }
            if shape.delta {
                let value = non_negative(value, "value")?;
                return Ok(MeterUpdate::Add(AggState::Sum(value.into())));
            }
            if !shape.monotonic && !meter.allow_negative {
                return Err(format!(
                    "a non-monotonic cumulative sum can decrease; meter `{slug}` needs allow_negative (or use LATEST)"
                ));
            }
            Ok(MeterUpdate::Cumulative {
                value,
                monotonic: shape.monotonic,
            })
        }
        (PointValues::Distribution { count, .. }, Aggregation::Count) => {
            if shape.delta {
                Ok(MeterUpdate::Add(AggState::Count(*count)))
            } else {
                Ok(MeterUpdate::Cumulative {
                    value: i128::from(*count),
                    monotonic: true,
                })
            }
        }
        (PointValues::Distribution { sum, .. }, Aggregation::Sum) => {
            let Some(sum) = sum else {
                return Err(format!("{} point has no sum (meter `{slug}` is SUM)", shape.kind));
            };
            let sum = decimal_from_f64(*sum, meter.scale).map_err(|error| quantity_error("sum", error))?;
            let sum = non_negative(sum, "sum")?;
            if shape.delta {
                Ok(MeterUpdate::Add(AggState::Sum(sum.into())))
            } else {
                Ok(MeterUpdate::Cumulative {
                    value: sum,
                    // Without negative measurements a cumulative sum only grows.
                    monotonic: !meter.allow_negative,
                })
            }
        }
        (PointValues::Distribution { min, max, .. }, Aggregation::Max | Aggregation::Min) => {
            let (what, bound) = if aggregation == Aggregation::Max {
                ("max", max)
            } else {
                ("min", min)
            };
            let Some(bound) = bound else {
                return Err(format!("{} point has no {what} (meter `{slug}`)", shape.kind));
            };
            let value = decimal_from_f64(*bound, meter.scale).map_err(|error| quantity_error(what, error))?;
            Ok(level(non_negative(value, what)?))
        }
        (PointValues::Distribution { .. }, Aggregation::Latest) => Err(format!(
            "a {} has no single value (meter `{slug}` is LATEST); use COUNT, SUM, MAX or MIN",
            shape.kind
        )),
    }
}

/// Identity of a point's stream without the meter: tenant (it may come from an API key, not
/// the resource), resource, scope, metric, attributes.
fn series_hash(tenant: &str, scope_hash: u128, metric: &str, attributes: &[KeyValue]) -> u128 {
    let mut hasher = HashInput::default();
    hash_str(&mut hasher, tenant);
    hasher.update(&scope_hash.to_le_bytes());
    hash_str(&mut hasher, metric);
    hash_attributes(&mut hasher, attributes);
    hasher.digest128()
}

/// A scope's part of its points' identity: the resource's attributes, the scope's name and
/// version.
fn scope_hash(resource_hash: u128, scope: Option<(&str, &str)>) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&resource_hash.to_le_bytes());
    if let Some((name, version)) = scope {
        hash_str(&mut hasher, name);
        hash_str(&mut hasher, version);
    }
    hasher.digest128()
}

/// One bucket of a histogram stream (the bucket's index: bounds must not change mid-stream,
/// as the OTLP data model requires of cumulative points).
fn bucket_stream(stream: u128, bucket: i64) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&stream.to_le_bytes());
    hasher.update(&bucket.to_le_bytes());
    hasher.digest128()
}

fn with_meter(series: u128, slug: &str) -> u128 {
    let mut hasher = HashInput::default();
    hasher.update(&series.to_le_bytes());
    hash_str(&mut hasher, slug);
    hasher.digest128()
}

/// A delta point's identity for dedup: the same point re-sent by a retrying collector has the
/// same stream, start and time; two different points of one stream never do.
/// `series` already names the tenant. One-shot over a fixed layout with its own seed, apart from
/// CloudEvents and log-record ids (it runs once per point).
fn point_dedup_key(series: u128, start_ns: u64, time_ns: u64) -> u128 {
    const POINT_KEY_SEED: u64 = 0x6f74_6c70_2e70_6f69; // "otlp.poi"
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&series.to_le_bytes());
    bytes[16..24].copy_from_slice(&start_ns.to_le_bytes());
    bytes[24..].copy_from_slice(&time_ns.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128_with_seed(&bytes, POINT_KEY_SEED)
}

/// Maps a metrics export request.
pub fn map_metrics(request: &ExportMetricsServiceRequest, context: &MapContext<'_>) -> Mapped {
    let mut mapped = Mapped::default();
    let mut dims = DimsCache::default();
    for resource_metrics in &request.resource_metrics {
        let resource: &[KeyValue] = resource_metrics
            .resource
            .as_ref()
            .map_or(&[], |resource| &resource.attributes);
        let tenant = tenant_of(resource, context);
        // Interned once per resource, not per point.
        let tenant_id = tenant
            .as_ref()
            .ok()
            .map(|tenant| context.names.tenants.intern(tenant));
        let mut resource_hasher = HashInput::default();
        hash_attributes(&mut resource_hasher, resource);
        let resource_hash = resource_hasher.digest128();
        for scope_metrics in &resource_metrics.scope_metrics {
            let scope_hash = scope_hash(
                resource_hash,
                scope_metrics
                    .scope
                    .as_ref()
                    .map(|scope| (scope.name.as_str(), scope.version.as_str())),
            );
            for metric in &scope_metrics.metrics {
                let shapes = point_shapes(metric);
                mapped.total += shapes.len();
                let meters: Vec<&Meter> = context.meters.matching_metric(&metric.name).collect();
                if meters.is_empty() {
                    mapped.unmetered += shapes.len();
                    continue;
                }
                for shape in shapes {
                    let shape = match shape {
                        Ok(shape) => shape,
                        Err(message) => {
                            mapped.refused.push(PointRefusal {
                                reason: RefusalReason::Invalid,
                                message,
                                name: metric.name.clone(),
                                tenant: tenant.as_ref().ok().cloned(),
                                time_unix_nano: 0,
                            });
                            continue;
                        }
                    };
                    let refuse = |reason, message| PointRefusal {
                        reason,
                        message,
                        name: metric.name.clone(),
                        tenant: tenant.as_ref().ok().cloned(),
                        time_unix_nano: shape.time_ns,
                    };
                    let tenant = match &tenant {
                        Ok(tenant) => tenant,
                        Err((reason, message)) => {
                            mapped.refused.push(refuse(*reason, message.clone()));
                            continue;
                        }
                    };
                    match map_point(
                        &shape,
                        &meters,
                        (tenant, tenant_id.unwrap_or_default()),
                        scope_hash,
                        &metric.name,
                        resource,
                        context,
                        &mut dims,
                        &mut mapped,
                    ) {
                        Ok(()) => {}
                        Err((reason, message)) => mapped.refused.push(refuse(reason, message)),
                    }
                }
            }
        }
    }
    mapped
}

#[allow(clippy::too_many_arguments)]
fn map_point(
    shape: &PointShape<'_>,
    meters: &[&Meter],
    (tenant, tenant_id): (&str, crate::model::TenantId),
    scope_hash: u128,
    metric: &str,
    resource: &[KeyValue],
    context: &MapContext<'_>,
    dims: &mut DimsCache,
    mapped: &mut Mapped,
) -> Result<(), (RefusalReason, String)> {
    let ts_ms = point_time(shape.time_ns, context)?;
    let invalid = |message: String| (RefusalReason::Invalid, message);
    let series = series_hash(tenant, scope_hash, metric, shape.attributes);
    let mut point = MappedPoint {
        dedup_key: None,
        updates: smallvec::SmallVec::with_capacity(meters.len()),
        late: false,
    };
    let mut cumulative = Vec::new();
    for meter in meters {
        let dims = intern_dims(dims, meter, shape.attributes, resource, context.names).map_err(invalid)?;
        let window_start = meter.window_size.start_of(ts_ms);
        let window_end = window_start + meter.window_size.seconds();
        point.late |= (window_end + context.acceptance.allowed_lateness_secs) * 1000 <= context.now_ms;
        let key = SeriesKey {
            meter: meter.id,
            tenant: tenant_id,
            dims,
            window_start,
        };
        match meter_update(meter, shape, ts_ms).map_err(invalid)? {
            MeterUpdate::Add(state) => {
                point.dedup_key = Some(point_dedup_key(series, shape.start_ns, shape.time_ns));
                point.updates.push((key, state));
            }
            MeterUpdate::Level(state) => point.updates.push((key, state)),
            MeterUpdate::Cumulative { value, monotonic } => cumulative.push(CumulativePoint {
                stream: with_meter(series, &meter.slug),
                start_ns: shape.start_ns,
                time_ns: shape.time_ns,
                value,
                kind: StreamKind::Cumulative { monotonic },
                key,
                aggregation: meter.aggregation,
            }),
            MeterUpdate::CumulativeBuckets(buckets) => {
                let stream = with_meter(series, &meter.slug);
                for (bucket, at, count) in buckets {
                    cumulative.push(CumulativePoint {
                        stream: bucket_stream(stream, bucket),
                        start_ns: shape.start_ns,
                        time_ns: shape.time_ns,
                        value: i128::from(count),
                        kind: StreamKind::CumulativeBucket { at },
                        key,
                        aggregation: Aggregation::Distribution,
                    });
                }
            }
            MeterUpdate::TimeWeighted { value } => cumulative.push(CumulativePoint {
                stream: with_meter(series, &meter.slug),
                start_ns: 0,
                time_ns: shape.time_ns,
                value,
                kind: StreamKind::TimeWeighted {
                    window_secs: meter.window_size.seconds(),
                    max_gap_ms: meter.max_gap_secs * 1000,
                },
                key,
                aggregation: Aggregation::TimeWeighted,
            }),
        }
    }
    if !point.updates.is_empty() {
        mapped.points.push(point);
    }
    mapped.cumulative.append(&mut cumulative);
    Ok(())
}

/// Every data point of a metric, or why one cannot be read.
fn point_shapes(
    metric: &opentelemetry_proto::tonic::metrics::v1::Metric,
) -> Vec<Result<PointShape<'_>, String>> {
    let temporality = |value: i32| -> Result<bool, String> {
        match AggregationTemporality::try_from(value) {
            Ok(AggregationTemporality::Delta) => Ok(true),
            Ok(AggregationTemporality::Cumulative) => Ok(false),
            _ => Err(format!(
                "aggregation_temporality {value} is neither DELTA nor CUMULATIVE"
            )),
        }
    };
    match &metric.data {
        None => Vec::new(),
        Some(metric::Data::Gauge(gauge)) => gauge
            .data_points
            .iter()
            .map(|point| {
                Ok(PointShape {
                    kind: "gauge",
                    attributes: &point.attributes,
                    start_ns: point.start_time_unix_nano,
                    time_ns: point.time_unix_nano,
                    delta: true,
                    monotonic: false,
                    values: PointValues::Number(point.value.as_ref()),
                })
            })
            .collect(),
        Some(metric::Data::Sum(sum)) => sum
            .data_points
            .iter()
            .map(|point| {
                Ok(PointShape {
                    kind: "sum",
                    attributes: &point.attributes,
                    start_ns: point.start_time_unix_nano,
                    time_ns: point.time_unix_nano,
                    delta: temporality(sum.aggregation_temporality)?,
                    monotonic: sum.is_monotonic,
                    values: PointValues::Number(point.value.as_ref()),
                })
            })
            .collect(),
        Some(metric::Data::Histogram(histogram)) => histogram
            .data_points
            .iter()
            .map(|point| {
                Ok(PointShape {
                    kind: "histogram",
                    attributes: &point.attributes,
                    start_ns: point.start_time_unix_nano,
                    time_ns: point.time_unix_nano,
                    delta: temporality(histogram.aggregation_temporality)?,
                    monotonic: true,
                    values: PointValues::Distribution {
                        count: point.count,
                        sum: point.sum,
                        min: point.min,
                        max: point.max,
                        buckets: Buckets::Explicit {
                            bounds: &point.explicit_bounds,
                            counts: &point.bucket_counts,
                        },
                    },
                })
            })
            .collect(),
        Some(metric::Data::ExponentialHistogram(histogram)) => histogram
            .data_points
            .iter()
            .map(|point| {
                Ok(PointShape {
                    kind: "exponential histogram",
                    attributes: &point.attributes,
                    start_ns: point.start_time_unix_nano,
                    time_ns: point.time_unix_nano,
                    delta: temporality(histogram.aggregation_temporality)?,
                    monotonic: true,
                    values: PointValues::Distribution {
                        count: point.count,
                        sum: point.sum,
                        min: point.min,
                        max: point.max,
                        buckets: Buckets::Exponential {
                            scale: point.scale,
                            zero_count: point.zero_count,
                            positive: point.positive.as_ref(),
                            negative: point.negative.as_ref(),
                        },
                    },
                })
            })
            .collect(),
        // Summaries are cumulative by definition.
        Some(metric::Data::Summary(summary)) => summary
            .data_points
            .iter()
            .map(|point| {
                Ok(PointShape {
                    kind: "summary",
                    attributes: &point.attributes,
                    start_ns: point.start_time_unix_nano,
                    time_ns: point.time_unix_nano,
                    delta: false,
                    monotonic: true,
                    values: PointValues::Distribution {
                        count: point.count,
                        sum: Some(point.sum),
                        min: None,
                        max: None,
                        buckets: Buckets::None,
                    },
                })
            })
            .collect(),
    }
}

/// The record's event name: the `event_name` field, else the `event.name` attribute.
fn event_name(record: &opentelemetry_proto::tonic::logs::v1::LogRecord) -> Option<&str> {
    if !record.event_name.is_empty() {
        return Some(&record.event_name);
    }
    match find(&record.attributes, "event.name")?.value.as_ref()? {
        any_value::Value::StringValue(name) => Some(name),
        _ => None,
    }
}

/// Maps a logs export request: each record of a metered event name is one event.
pub fn map_logs(request: &ExportLogsServiceRequest, context: &MapContext<'_>) -> Mapped {
    let mut mapped = Mapped::default();
    let mut dims = DimsCache::default();
    for resource_logs in &request.resource_logs {
        let resource: &[KeyValue] = resource_logs
            .resource
            .as_ref()
            .map_or(&[], |resource| &resource.attributes);
        let tenant = tenant_of(resource, context).map(|tenant| {
            let id = context.names.tenants.intern(&tenant);
            (tenant, id)
        });
        // Like a CloudEvents `source`: ids are unique per emitting service.
        let source = find(resource, "service.name")
            .and_then(attribute_text)
            .unwrap_or_default();
        for scope_logs in &resource_logs.scope_logs {
            for record in &scope_logs.log_records {
                mapped.total += 1;
                let Some(name) = event_name(record) else {
                    mapped.unmetered += 1;
                    continue;
                };
                let meters: Vec<&Meter> = context.meters.matching_log_event(name).collect();
                if meters.is_empty() {
                    mapped.unmetered += 1;
                    continue;
                }
                let time_ns = if record.time_unix_nano != 0 {
                    record.time_unix_nano
                } else {
                    record.observed_time_unix_nano
                };
                let outcome = match &tenant {
                    Ok(tenant) => map_record(
                        record,
                        time_ns,
                        &meters,
                        (&tenant.0, tenant.1),
                        (&source, resource),
                        context,
                        &mut dims,
                    ),
                    Err(refusal) => Err(refusal.clone()),
                };
                match outcome {
                    Ok(point) => mapped.points.push(point),
                    Err((reason, message)) => mapped.refused.push(PointRefusal {
                        reason,
                        message,
                        name: name.to_string(),
                        tenant: tenant.as_ref().ok().map(|(tenant, _)| tenant.clone()),
                        time_unix_nano: time_ns,
                    }),
                }
            }
        }
    }
    mapped
}

fn map_record(
    record: &opentelemetry_proto::tonic::logs::v1::LogRecord,
    time_ns: u64,
    meters: &[&Meter],
    (tenant, tenant_id): (&str, crate::model::TenantId),
    (source, resource): (&str, &[KeyValue]),
    context: &MapContext<'_>,
    dims: &mut DimsCache,
) -> Result<MappedPoint, (RefusalReason, String)> {
    let ts_ms = point_time(time_ns, context)?;
    let invalid = |message: String| (RefusalReason::Invalid, message);
    let attribute = |key: &str| find(&record.attributes, key).or_else(|| find(resource, key));
    let mut point = MappedPoint {
        dedup_key: None,
        updates: smallvec::SmallVec::with_capacity(meters.len()),
        late: false,
    };
    for meter in meters {
        let MeterSource::OtlpLog {
            value_attribute,
            id_attribute,
            ..
        } = &meter.source
        else {
            continue;
        };
        if let (Some(id_attribute), None) = (id_attribute, point.dedup_key) {
            let id = attribute(id_attribute)
                .and_then(attribute_text)
                .filter(|id| !id.is_empty() && id.len() <= MAX_ATTRIBUTE_BYTES)
                .ok_or_else(|| {
                    invalid(format!(
                        "attribute `{id_attribute}` missing or not a short string (meter `{}` dedups by it)",
                        meter.slug
                    ))
                })?;
            point.dedup_key = Some(dedup_key(tenant, source, &id));
        }
        let observation = match value_attribute {
            None => Observation::Value(parse_decimal("1", meter.scale).map_err(|e| invalid(e.to_string()))?),
            Some(value_attribute) => {
                let value = attribute(value_attribute).ok_or_else(|| {
                    invalid(format!(
                        "attribute `{value_attribute}` missing (meter `{}` reads its value there)",
                        meter.slug
                    ))
                })?;
                record_observation(meter, value_attribute, value).map_err(invalid)?
            }
        };
        let dims = intern_dims(dims, meter, &record.attributes, resource, context.names).map_err(invalid)?;
        let window_start = meter.window_size.start_of(ts_ms);
        let window_end = window_start + meter.window_size.seconds();
        point.late |= (window_end + context.acceptance.allowed_lateness_secs) * 1000 <= context.now_ms;
        let key = SeriesKey {
            meter: meter.id,
            tenant: tenant_id,
            dims,
            window_start,
        };
        point.updates.push((
            key,
            AggState::from_observation(meter.aggregation, observation, ts_ms, meter.unique_exact_limit),
        ));
    }
    Ok(point)
}

/// A log record's value attribute as an observation of `meter`.
fn record_observation(meter: &Meter, attribute: &str, value: &AnyValue) -> Result<Observation, String> {
    if meter.aggregation == Aggregation::UniqueCount {
        let text = attribute_text(value)
            .ok_or_else(|| format!("attribute `{attribute}` must be a string, number or boolean"))?;
        return Ok(Observation::Unique(xxhash_rust::xxh3::xxh3_64(text.as_bytes())));
    }
    let parsed = match value.value.as_ref() {
        Some(any_value::Value::IntValue(int)) => parse_decimal(&int.to_string(), meter.scale),
        Some(any_value::Value::DoubleValue(double)) => decimal_from_f64(*double, meter.scale),
        Some(any_value::Value::StringValue(text)) => parse_decimal(text, meter.scale),
        _ => {
            return Err(format!(
                "attribute `{attribute}` must be a number or a decimal string"
            ))
        }
    };
    let value = parsed.map_err(|error| match error {
        QuantityError::NotANumber => format!("attribute `{attribute}` is not a finite decimal number"),
        other => format!("attribute `{attribute}` {other}"),
    })?;
    if value < 0 && !meter.allow_negative {
        return Err(format!(
            "attribute `{attribute}` is negative and meter `{}` does not allow_negative",
            meter.slug
        ));
    }
    match &meter.per_event_fee {
        Some(fee) => fee
            .apply(value, meter.scale)
            .map(Observation::Value)
            .map_err(|reason| format!("attribute `{attribute}` {reason}")),
        None => Ok(Observation::Value(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use proptest::prelude::*;

    const NOW_MS: i64 = 1_795_321_200_000;
    const NOW_NS: u64 = NOW_MS as u64 * 1_000_000;

    fn meters(names: &Names) -> Meters {
        let config = crate::Config::load(
            r#"
[[meters]]
slug = "requests"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "SUM"
group_by = { route = "http.route", region = "cloud.region" }
scale = 0
[[meters]]
slug = "request_points"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "COUNT"
[[meters]]
slug = "storage_peak"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "MAX"
scale = 3
[[meters]]
slug = "storage_sum"
source = "otlp_metric"
metric_name = "storage.bad"
aggregation = "SUM"
[[meters]]
slug = "latency_count"
source = "otlp_metric"
metric_name = "latency"
aggregation = "COUNT"
[[meters]]
slug = "latency_sum"
source = "otlp_metric"
metric_name = "latency"
aggregation = "SUM"
scale = 3
[[meters]]
slug = "runs"
source = "otlp_log"
event_name = "workflow.run"
value_attribute = "steps"
id_attribute = "event.id"
aggregation = "SUM"
scale = 0
"#,
            &Default::default(),
        )
        .unwrap();
        Meters::new(config.meters, names)
    }

    fn context<'a>(meters: &'a Meters, names: &'a Names, key_tenant: Option<&'a str>) -> MapContext<'a> {
        MapContext {
            meters,
            names,
            tenant_attribute: "tenant.id",
            key_tenant,
            now_ms: NOW_MS,
            acceptance: Acceptance {
                allowed_lateness_secs: 60,
                max_lateness_secs: 86_400,
                max_future_secs: 300,
            },
        }
    }

    fn text(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn number(value: number_data_point::Value, attributes: Vec<KeyValue>, time: u64) -> NumberDataPoint {
        NumberDataPoint {
            attributes,
            start_time_unix_nano: NOW_NS - 60_000_000_000,
            time_unix_nano: time,
            value: Some(value),
            ..Default::default()
        }
    }

    fn request(tenant: Option<&str>, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: tenant
                        .map(|t| vec![text("tenant.id", t), text("cloud.region", "eu")])
                        .unwrap_or_default(),
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn sum(
        name: &str,
        temporality: AggregationTemporality,
        monotonic: bool,
        points: Vec<NumberDataPoint>,
    ) -> Metric {
        Metric {
            name: name.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: points,
                aggregation_temporality: temporality as i32,
                is_monotonic: monotonic,
            })),
            ..Default::default()
        }
    }

    fn int(value: i64) -> number_data_point::Value {
        number_data_point::Value::AsInt(value)
    }

    #[test]
    fn delta_sums_add_with_a_dedup_key_and_resource_dimensions() {
        let names = Names::default();
        let meters = meters(&names);
        let points = vec![number(int(5), vec![text("http.route", "/a")], NOW_NS)];
        let metric = sum(
            "http.server.requests",
            AggregationTemporality::Delta,
            true,
            points,
        );
        let mapped = map_metrics(
            &request(Some("acme"), vec![metric.clone()]),
            &context(&meters, &names, None),
        );
        assert_eq!((mapped.total, mapped.accepted(), mapped.refused.len()), (1, 1, 0));
        let point = &mapped.points[0];
        assert!(point.dedup_key.is_some());
        let mut states: Vec<(String, Dims, AggState)> = point
            .updates
            .iter()
            .map(|(key, state)| {
                (
                    names.meters.resolve(key.meter).to_string(),
                    names.dims.resolve(key.dims).to_vec(),
                    state.clone(),
                )
            })
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            states,
            vec![
                ("request_points".into(), Vec::new(), AggState::Count(1)),
                (
                    "requests".into(),
                    vec![("region".into(), "eu".into()), ("route".into(), "/a".into())],
                    AggState::Sum(5.into())
                ),
            ]
        );
        // The same point re-sent has the same key; another tenant's does not.
        let again = map_metrics(
            &request(Some("acme"), vec![metric.clone()]),
            &context(&meters, &names, None),
        );
        assert_eq!(again.points[0].dedup_key, point.dedup_key);
        let other = map_metrics(
            &request(Some("globex"), vec![metric]),
            &context(&meters, &names, None),
        );
        assert_ne!(other.points[0].dedup_key, point.dedup_key);
    }

    /// Tenant `acme`'s monotonic `http.server.requests` points, mapped.
    fn map_requests(
        meters: &Meters,
        names: &Names,
        temporality: AggregationTemporality,
        points: Vec<NumberDataPoint>,
    ) -> Mapped {
        let metric = sum("http.server.requests", temporality, true, points);
        map_metrics(
            &request(Some("acme"), vec![metric]),
            &context(meters, names, None),
        )
    }

    #[test]
    fn points_sharing_a_request_get_their_own_dimensions() {
        let names = Names::default();
        let meters = meters(&names);
        let int_attribute = |key: &str, value: i64| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(value)),
            }),
            ..Default::default()
        };
        // (attributes, expected `requests` dims); the resource says region "eu".
        type Case = (Vec<KeyValue>, Vec<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            (
                vec![text("http.route", "/a")],
                vec![("region", "eu"), ("route", "/a")],
            ),
            (
                vec![text("http.route", "/b")],
                vec![("region", "eu"), ("route", "/b")],
            ),
            (
                vec![text("http.route", "/a")],
                vec![("region", "eu"), ("route", "/a")],
            ),
            (vec![], vec![("region", "eu")]),
            (
                vec![text("http.route", "")],
                vec![("region", "eu"), ("route", "")],
            ),
            (
                vec![int_attribute("http.route", 7)],
                vec![("region", "eu"), ("route", "7")],
            ),
            (
                vec![text("http.route", "7")],
                vec![("region", "eu"), ("route", "7")],
            ),
            (
                vec![text("cloud.region", "us"), text("http.route", "/a")],
                vec![("region", "us"), ("route", "/a")],
            ),
        ];
        let points = cases
            .iter()
            .enumerate()
            .map(|(i, (attributes, _))| number(int(1), attributes.clone(), NOW_NS + i as u64))
            .collect();
        let mapped = map_requests(&meters, &names, AggregationTemporality::Delta, points);
        assert_eq!(mapped.points.len(), cases.len());
        let requests = names.meters.get("requests").unwrap();
        for (point, (_, expected)) in mapped.points.iter().zip(&cases) {
            let (key, _) = point
                .updates
                .iter()
                .find(|(key, _)| key.meter == requests)
                .unwrap();
            let mut expected: Dims = expected
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            expected.sort();
            let mut got = names.dims.resolve(key.dims).to_vec();
            got.sort();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn cumulative_sums_become_stream_points() {
        let names = Names::default();
        let meters = meters(&names);
        let points = vec![number(int(40), vec![text("http.route", "/a")], NOW_NS)];
        let mapped = map_requests(&meters, &names, AggregationTemporality::Cumulative, points);
        assert_eq!(mapped.cumulative.len(), 1);
        let point = &mapped.cumulative[0];
        assert_eq!(
            (point.value, point.kind, point.aggregation),
            (40, StreamKind::Cumulative { monotonic: true }, Aggregation::Sum)
        );
        // The COUNT meter counts the point directly (deduplicated).
        assert_eq!(mapped.points.len(), 1);
        assert_eq!(mapped.points[0].updates[0].1, AggState::Count(1));
    }

    #[test]
    fn bad_points_are_refused_one_by_one_with_reasons() {
        let names = Names::default();
        let meters = meters(&names);
        let route = || vec![text("http.route", "/a")];
        let points = vec![
            number(int(1), route(), NOW_NS),
            number(number_data_point::Value::AsDouble(f64::NAN), route(), NOW_NS),
            number(number_data_point::Value::AsDouble(f64::INFINITY), route(), NOW_NS),
            number(int(-1), route(), NOW_NS),
            number(int(1), route(), 0),
            number(int(1), route(), NOW_NS - 2 * 86_400 * 1_000_000_000),
            number(int(1), route(), NOW_NS + 3_600 * 1_000_000_000),
            number(int(1), vec![text("http.route", &"r".repeat(300))], NOW_NS),
        ];
        let gauge = Metric {
            name: "storage.bad".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![number(int(1), Vec::new(), NOW_NS)],
            })),
            ..Default::default()
        };
        let metrics = vec![
            sum(
                "http.server.requests",
                AggregationTemporality::Delta,
                true,
                points,
            ),
            gauge,
        ];
        let mapped = map_metrics(&request(Some("acme"), metrics), &context(&meters, &names, None));
        assert_eq!((mapped.total, mapped.accepted()), (9, 1));
        let reasons: Vec<(RefusalReason, &str)> = mapped
            .refused
            .iter()
            .map(|refusal| (refusal.reason, refusal.message.as_str()))
            .collect();
        let has = |reason: RefusalReason, text: &str| {
            assert!(
                reasons
                    .iter()
                    .any(|(r, message)| *r == reason && message.contains(text)),
                "{reason:?} {text}: {reasons:?}"
            )
        };
        has(RefusalReason::Invalid, "NaN or infinite");
        has(RefusalReason::Invalid, "negative value on a monotonic sum");
        has(RefusalReason::Invalid, "time_unix_nano missing");
        has(RefusalReason::TooLate, "max_lateness_secs");
        has(RefusalReason::TooFarInFuture, "max_future_secs");
        has(RefusalReason::Invalid, "more than 256");
        has(RefusalReason::Invalid, "a gauge is not additive");
        assert_eq!(mapped.refused.len(), 8);
        let summary = mapped.refusal_summary("data points");
        assert!(summary.starts_with("8 of 9 data points rejected: "), "{summary}");
    }

    #[test]
    fn tenants_come_from_the_resource_or_the_api_key() {
        let names = Names::default();
        let meters = meters(&names);
        let metric = || {
            sum(
                "http.server.requests",
                AggregationTemporality::Delta,
                true,
                vec![number(int(1), Vec::new(), NOW_NS)],
            )
        };
        let none = map_metrics(&request(None, vec![metric()]), &context(&meters, &names, None));
        assert_eq!(none.refused[0].reason, RefusalReason::NoTenant);
        let keyed = map_metrics(
            &request(None, vec![metric()]),
            &context(&meters, &names, Some("acme")),
        );
        assert_eq!(keyed.accepted(), 1);
        let key = keyed.points[0].updates[0].0;
        assert_eq!(&*names.tenants.resolve(key.tenant), "acme");
        let spoofed = map_metrics(
            &request(Some("globex"), vec![metric()]),
            &context(&meters, &names, Some("acme")),
        );
        assert_eq!(spoofed.refused[0].reason, RefusalReason::WrongTenant);
    }

    #[test]
    fn histograms_feed_count_and_sum() {
        let names = Names::default();
        let meters = meters(&names);
        let histogram = |temporality: AggregationTemporality| Metric {
            name: "latency".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    start_time_unix_nano: NOW_NS - 1,
                    time_unix_nano: NOW_NS,
                    count: 3,
                    sum: Some(0.1 + 0.2 + 0.25),
                    ..Default::default()
                }],
                aggregation_temporality: temporality as i32,
            })),
            ..Default::default()
        };
        let mapped = map_metrics(
            &request(Some("acme"), vec![histogram(AggregationTemporality::Delta)]),
            &context(&meters, &names, None),
        );
        let mut states: Vec<AggState> = mapped.points[0]
            .updates
            .iter()
            .map(|(_, state)| state.clone())
            .collect();
        states.sort_by_key(|state| state.kind());
        assert_eq!(states, vec![AggState::Count(3), AggState::Sum(550.into())]);
        let mapped = map_metrics(
            &request(Some("acme"), vec![histogram(AggregationTemporality::Cumulative)]),
            &context(&meters, &names, None),
        );
        let mut values: Vec<i128> = mapped.cumulative.iter().map(|point| point.value).collect();
        values.sort();
        assert_eq!(values, vec![3, 550]);
    }

    #[test]
    fn histogram_buckets_become_distribution_observations() {
        use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets as ExpBuckets;
        let explicit = Buckets::Explicit {
            bounds: &[1.0, 10.0],
            counts: &[2, 3, 4],
        };
        assert_eq!(
            bucket_values(&explicit, Some(0.5), Some(20.0)).unwrap(),
            vec![(0, 0.75, 2), (1, 5.5, 3), (2, 20.0, 4)]
        );
        assert!(bucket_values(
            &Buckets::Explicit {
                bounds: &[1.0],
                counts: &[1]
            },
            None,
            None
        )
        .is_err());
        let positive = ExpBuckets {
            offset: 0,
            bucket_counts: vec![1, 0, 2],
        };
        // Scale 0: base 2, bucket k covers (2^k, 2^(k+1)], taken at 2^(k + 0.5).
        let exponential = Buckets::Exponential {
            scale: 0,
            zero_count: 5,
            positive: Some(&positive),
            negative: None,
        };
        let values = bucket_values(&exponential, None, None).unwrap();
        assert_eq!(values[0], (i64::MIN, 0.0, 5));
        assert!((values[1].1 - 2f64.sqrt()).abs() < 1e-12 && values[1].2 == 1);
        assert!((values[2].1 - 2f64.powf(2.5)).abs() < 1e-9 && values[2].2 == 2);
        let negative = ExpBuckets {
            offset: 0,
            bucket_counts: vec![1],
        };
        let with_negative = Buckets::Exponential {
            scale: 0,
            zero_count: 0,
            positive: None,
            negative: Some(&negative),
        };
        assert!(bucket_values(&with_negative, None, None).is_err());
        assert!(bucket_values(&Buckets::None, None, None).is_err());
    }

    fn log_request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![text("tenant.id", "acme"), text("service.name", "engine")],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn record(attributes: Vec<KeyValue>) -> LogRecord {
        LogRecord {
            time_unix_nano: NOW_NS,
            attributes,
            ..Default::default()
        }
    }

    #[test]
    fn log_records_are_events_with_ids() {
        let names = Names::default();
        let meters = meters(&names);
        let steps = |n: i64| KeyValue {
            key: "steps".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(n)),
            }),
            ..Default::default()
        };
        let records = vec![
            record(vec![
                text("event.name", "workflow.run"),
                text("event.id", "r1"),
                steps(4),
            ]),
            record(vec![
                text("event.name", "workflow.run"),
                text("event.id", "r1"),
                steps(4),
            ]),
            record(vec![text("event.name", "workflow.run"), steps(2)]),
            record(vec![
                text("event.name", "workflow.run"),
                text("event.id", "r2"),
                text("steps", "many"),
            ]),
            record(vec![text("event.name", "other")]),
            record(Vec::new()),
        ];
        let mapped = map_logs(&log_request(records), &context(&meters, &names, None));
        assert_eq!((mapped.total, mapped.unmetered, mapped.refused.len()), (6, 2, 2));
        assert_eq!(mapped.points.len(), 2);
        assert_eq!(mapped.points[0].dedup_key, mapped.points[1].dedup_key);
        assert_eq!(
            mapped.points[0].dedup_key,
            Some(dedup_key("acme", "engine", "r1"))
        );
        assert_eq!(mapped.points[0].updates[0].1, AggState::Sum(4.into()));
        assert!(mapped
            .refused
            .iter()
            .any(|r| r.message.contains("`event.id` missing")));
        assert!(mapped
            .refused
            .iter()
            .any(|r| r.message.contains("`steps` is not a finite decimal number")));
    }

    /// Identities are stored (dedup keys in RocksDB and the ingest log, stream states), so a
    /// new version must compute exactly the old values or retries after an upgrade would count
    /// twice and cumulative streams restart. These values come from the first implementation.
    #[test]
    fn stored_identities_keep_their_values() {
        let attributes = vec![
            text("http.route", "/v1/r3"),
            KeyValue {
                key: "code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(200)),
                }),
                ..Default::default()
            },
            KeyValue {
                key: "list".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::ArrayValue(
                        opentelemetry_proto::tonic::common::v1::ArrayValue {
                            values: vec![AnyValue {
                                value: Some(any_value::Value::BoolValue(true)),
                            }],
                        },
                    )),
                }),
                ..Default::default()
            },
        ];
        let series = series_hash(
            "acme",
            0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
            "http.server.requests",
            &attributes,
        );
        assert_eq!(series, 0xf53bbd772eb3aceadbebac1abc194bfa);
        assert_eq!(point_dedup_key(series, 1, 2), 0x2ce8729e1823db89dcc42e3af2334f17);
        assert_eq!(with_meter(series, "requests"), 0x4f6761613286748eccd85c0dcb6de958);
        assert_eq!(bucket_stream(series, -3), 0xe18fac28c7b14e112446703032aba5b2);
        let mut hasher = HashInput::default();
        hash_attributes(&mut hasher, &attributes);
        assert_eq!(hasher.digest128(), 0x8b277837f25d68ac1e8137ebb85708d2);
        let mut resource = HashInput::default();
        hash_attributes(&mut resource, &attributes[..2]);
        assert_eq!(
            scope_hash(resource.digest128(), Some(("io.opentelemetry.sdk", "1.2.3"))),
            0x906ffc736d06a3b34fe91f57c13880cb
        );
    }

    fn any_double() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
            Just(1e300),
            Just(-1e-300),
            -1e6f64..1e6,
            any::<f64>(),
        ]
    }

    fn any_time() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            Just(NOW_NS),
            (NOW_NS - 3_600_000_000_000)..(NOW_NS + 3_600_000_000_000),
            any::<u64>(),
        ]
    }

    fn any_number_point() -> impl Strategy<Value = NumberDataPoint> {
        (
            any_time(),
            any_time(),
            prop_oneof![
                any::<i64>().prop_map(number_data_point::Value::AsInt),
                any_double().prop_map(number_data_point::Value::AsDouble),
            ],
            proptest::option::of("[a-z/]{0,300}"),
        )
            .prop_map(|(start, time, value, route)| NumberDataPoint {
                attributes: route.map(|r| vec![text("http.route", &r)]).unwrap_or_default(),
                start_time_unix_nano: start,
                time_unix_nano: time,
                value: Some(value),
                ..Default::default()
            })
    }

    proptest! {
        /// An SDK halving a cumulative exponential histogram's resolution (merging bucket pairs)
        /// leaves its canonical buckets unchanged, so every canonical stream stays monotonic.
        #[test]
        fn rescaling_keeps_canonical_buckets(
            scale in CANONICAL_SCALE + 1..12,
            offset in -200i32..200,
            counts in proptest::collection::vec(0u64..50, 1..40),
            zero in 0u64..5,
        ) {
            use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets as ExpBuckets;
            let fine = ExpBuckets { offset, bucket_counts: counts.clone() };
            // Downscale by one: index i → i >> 1 (floor), as SDKs do.
            let coarse_offset = offset >> 1;
            let mut coarse_counts = Vec::new();
            for (k, count) in counts.iter().enumerate() {
                let target = ((offset + k as i32) >> 1) - coarse_offset;
                if coarse_counts.len() <= target as usize {
                    coarse_counts.resize(target as usize + 1, 0);
                }
                coarse_counts[target as usize] += count;
            }
            let coarse = ExpBuckets { offset: coarse_offset, bucket_counts: coarse_counts };
            let before = canonical_buckets(scale, zero, Some(&fine), None, None).unwrap();
            let after = canonical_buckets(scale - 1, zero, Some(&coarse), None, None).unwrap();
            prop_assert_eq!(before, after);
        }
    }

    #[test]
    fn coarse_cumulative_exponential_histograms_are_refused() {
        let error = canonical_buckets(CANONICAL_SCALE - 1, 0, None, None, None).unwrap_err();
        assert!(error.contains("DELTA"), "{error}");
    }

    fn any_metric() -> impl Strategy<Value = Metric> {
        use opentelemetry_proto::tonic::metrics::v1::{
            exponential_histogram_data_point, ExponentialHistogram, ExponentialHistogramDataPoint, Summary,
            SummaryDataPoint,
        };
        let names = proptest::sample::select(vec![
            "http.server.requests",
            "storage.used",
            "storage.bad",
            "latency",
            "other",
        ]);
        let data = prop_oneof![
            proptest::collection::vec(any_number_point(), 0..4)
                .prop_map(|data_points| metric::Data::Gauge(Gauge { data_points })),
            (
                proptest::collection::vec(any_number_point(), 0..4),
                -1i32..4,
                any::<bool>()
            )
                .prop_map(|(data_points, temporality, monotonic)| metric::Data::Sum(Sum {
                    data_points,
                    aggregation_temporality: temporality,
                    is_monotonic: monotonic,
                })),
            (
                any_time(),
                proptest::collection::vec(any_double(), 0..5),
                proptest::collection::vec(0u64..1000, 0..7),
                proptest::option::of(any_double()),
                proptest::option::of(any_double()),
                -1i32..4,
            )
                .prop_map(|(time, bounds, counts, sum, max, temporality)| {
                    metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            start_time_unix_nano: time.saturating_sub(1),
                            time_unix_nano: time,
                            count: counts.iter().sum(),
                            sum,
                            bucket_counts: counts,
                            explicit_bounds: bounds,
                            max,
                            min: sum,
                            ..Default::default()
                        }],
                        aggregation_temporality: temporality,
                    })
                }),
            (
                any_time(),
                -20i32..30,
                any::<i32>(),
                proptest::collection::vec(0u64..100, 0..5),
                0u64..3
            )
                .prop_map(|(time, scale, offset, counts, zero_count)| {
                    metric::Data::ExponentialHistogram(ExponentialHistogram {
                        data_points: vec![ExponentialHistogramDataPoint {
                            start_time_unix_nano: time.saturating_sub(1),
                            time_unix_nano: time,
                            count: counts.iter().sum::<u64>() + zero_count,
                            scale,
                            zero_count,
                            positive: Some(exponential_histogram_data_point::Buckets {
                                offset,
                                bucket_counts: counts.clone(),
                            }),
                            negative: Some(exponential_histogram_data_point::Buckets {
                                offset,
                                bucket_counts: counts,
                            }),
                            ..Default::default()
                        }],
                        aggregation_temporality: 1,
                    })
                }),
            (any_time(), any_double()).prop_map(|(time, sum)| metric::Data::Summary(Summary {
                data_points: vec![SummaryDataPoint {
                    time_unix_nano: time,
                    sum,
                    count: 3,
                    ..Default::default()
                }],
            })),
        ];
        (names, proptest::option::of(data)).prop_map(|(name, data)| Metric {
            name: name.into(),
            data,
            ..Default::default()
        })
    }

    fn every_aggregation(names: &Names) -> Meters {
        let mut text = String::new();
        for (name, aggregations) in [
            (
                "http.server.requests",
                vec!["SUM", "COUNT", "MAX", "TIME_WEIGHTED", "DISTRIBUTION"],
            ),
            ("storage.used", vec!["MIN", "LATEST", "TIME_WEIGHTED"]),
            ("latency", vec!["SUM", "COUNT", "MAX", "MIN", "DISTRIBUTION"]),
        ] {
            for (i, aggregation) in aggregations.iter().enumerate() {
                let scale = if i % 2 == 0 { 18 } else { 0 };
                let value_scale = if *aggregation == "COUNT" {
                    String::new()
                } else {
                    format!("scale = {scale}\n")
                };
                text.push_str(&format!(
                    "[[meters]]\nslug = \"m{}\"\nsource = \"otlp_metric\"\nmetric_name = \"{name}\"\naggregation = \"{aggregation}\"\ngroup_by = {{ route = \"http.route\" }}\n{value_scale}",
                    text.len()
                ));
            }
        }
        Meters::new(
            crate::Config::load(&text, &Default::default()).unwrap().meters,
            names,
        )
    }

    proptest! {
        /// Whatever a client sends, mapping never panics and accounts for every point: each is
        /// accepted, refused with a reason, or unmetered; and the accepted ones fold (with the
        /// commit stage's stream conversion) without a panic.
        #[test]
        fn any_request_maps_without_panicking_and_accounts_for_every_point(
            resources in proptest::collection::vec(
                (proptest::option::of("[a-z]{0,3}|x{257}"), proptest::collection::vec(any_metric(), 0..4)),
                0..3,
            ),
            key_tenant in proptest::option::of(Just("acme")),
        ) {
            let names = Names::default();
            let meters = every_aggregation(&names);
            let request = ExportMetricsServiceRequest {
                resource_metrics: resources
                    .into_iter()
                    .map(|(tenant, metrics)| {
                        let mut request = request(None, metrics);
                        if let Some(tenant) = tenant {
                            request.resource_metrics[0].resource = Some(Resource {
                                attributes: vec![text("tenant.id", &tenant)],
                                ..Default::default()
                            });
                        }
                        request.resource_metrics.remove(0)
                    })
                    .collect(),
            };
            let mapped = map_metrics(&request, &context(&meters, &names, key_tenant));
            let points: usize = request
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .map(|m| point_shapes(m).len())
                .sum();
            prop_assert_eq!(mapped.total, points);
            prop_assert!(mapped.refused.len() + mapped.unmetered <= mapped.total);
            prop_assert!(mapped.refused.iter().all(|refusal| !refusal.message.is_empty()));
            let mut batch = crate::aggregate::PreAggregated::default();
            for point in &mapped.points {
                for (key, state) in &point.updates {
                    let _ = batch.merge_state(*key, state);
                }
            }
            let mut streams = crate::aggregate::streams::Streams::default();
            let _ = streams.fold(&mapped.cumulative, &mut batch, &mut Default::default());
        }

        /// Gathering the bytes and hashing them at once gives what streaming them gives, for
        /// any split into pieces (the identities were first computed with a streaming hasher).
        #[test]
        fn gathered_input_hashes_as_streamed(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut streamed = xxhash_rust::xxh3::Xxh3::new();
            let mut gathered = HashInput::default();
            for piece in &pieces {
                streamed.update(piece);
                gathered.update(piece);
            }
            prop_assert_eq!(gathered.digest128(), streamed.digest128());
        }

        /// SDKs need not order attributes: a point's identity (dedup key, stream) ignores order.
        #[test]
        fn attribute_order_does_not_change_identity(
            attributes in proptest::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,6}", 0..6),
            seed in any::<u64>(),
        ) {
            let names = Names::default();
            let meters = meters(&names);
            let mut ordered: Vec<KeyValue> = attributes.iter().map(|(k, v)| text(k, v)).collect();
            let mapped_for = |attributes: Vec<KeyValue>, temporality| {
                let metric = sum("http.server.requests", temporality, true, vec![number(int(3), attributes, NOW_NS)]);
                map_metrics(&request(Some("acme"), vec![metric]), &context(&meters, &names, None))
            };
            let first = mapped_for(ordered.clone(), AggregationTemporality::Delta);
            let first_cumulative = mapped_for(ordered.clone(), AggregationTemporality::Cumulative);
            let len = ordered.len().max(1);
            ordered.rotate_left((seed as usize) % len);
            ordered.reverse();
            let second = mapped_for(ordered.clone(), AggregationTemporality::Delta);
            let second_cumulative = mapped_for(ordered, AggregationTemporality::Cumulative);
            prop_assert_eq!(first.points[0].dedup_key, second.points[0].dedup_key);
            prop_assert_eq!(first_cumulative.cumulative[0].stream, second_cumulative.cumulative[0].stream);
        }
    }
}
