//! Metric data points → meter updates: sums (delta and cumulative), gauges, histograms
//! (count, sum, buckets) and exponential histograms, per meter that reads the metric.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality};

use crate::aggregate::streams::{CumulativePoint, StreamKind};
use crate::aggregate::{AggState, Aggregation, Observation};
pub use crate::ingest::error::RefusalReason;
use crate::meter::Meter;
use crate::model::{decimal_from_f64, parse_decimal, DimsCache, QuantityError};

use super::histograms::*;
use super::*;

/// A value that cannot be read at the meter's scale: NaN and infinities are invalid, a value
/// beyond the representable range is refused as `overflow`.
pub(super) fn quantity_error(what: &str, error: QuantityError) -> PointError {
    match error {
        QuantityError::NotANumber => PointError::from(format!("{what} is NaN or infinite")),
        QuantityError::OutOfRange => PointError {
            reason: RefusalReason::Overflow,
            message: format!("{what} {}", QuantityError::OutOfRange),
        },
        other => PointError::from(format!("{what} {other}")),
    }
}

/// A number data point's value at `scale`.
pub(super) fn number_value(value: Option<&number_data_point::Value>, scale: u32) -> Result<i128, PointError> {
    match value {
        None => Err(PointError::from(
            "value missing (neither as_int nor as_double)".to_string(),
        )),
        Some(number_data_point::Value::AsInt(int)) => {
            parse_decimal(&int.to_string(), scale).map_err(|error| quantity_error("value", error))
        }
        Some(number_data_point::Value::AsDouble(double)) => {
            decimal_from_f64(*double, scale).map_err(|error| quantity_error("value", error))
        }
    }
}

/// The shape of one metric data point, as meters read it.
pub(super) struct PointShape<'a> {
    kind: &'static str,
    attributes: &'a [KeyValue],
    start_ns: u64,
    time_ns: u64,
    /// DELTA (true) or CUMULATIVE (false); gauges count as delta (their values are levels).
    delta: bool,
    monotonic: bool,
    values: PointValues<'a>,
}

pub(super) enum PointValues<'a> {
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

/// What one meter takes from one point.
pub(super) enum MeterUpdate {
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

pub(super) fn meter_update(
    meter: &Meter,
    shape: &PointShape<'_>,
    ts_ms: i64,
) -> Result<MeterUpdate, PointError> {
    let slug = &meter.slug;
    let aggregation = meter.aggregation;
    let non_negative = |value: i128, what: &str| -> Result<i128, PointError> {
        if value < 0 && !meter.allow_negative {
            Err(PointError::from(format!(
                "{what} is negative and meter `{slug}` does not allow_negative"
            )))
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
        (_, Aggregation::UniqueCount) => Err(PointError::from(format!(
            "meter `{slug}` is UNIQUE_COUNT, which metric points cannot feed"
        ))),
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
                        return Err(PointError::from(
                            "negative buckets: DISTRIBUTION meters take no negative values".to_string(),
                        ));
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
        (PointValues::Distribution { .. }, Aggregation::TimeWeighted) => Err(PointError::from(format!(
            "a {} has no level to integrate (meter `{slug}` is TIME_WEIGHTED); use a gauge",
            shape.kind
        ))),
        (PointValues::Number(value), Aggregation::Max | Aggregation::Min | Aggregation::Latest) => {
            let value = non_negative(number_value(*value, meter.scale)?, "value")?;
            Ok(level(value))
        }
        (PointValues::Number(_), Aggregation::Sum) if shape.kind == "gauge" => Err(PointError::from(
            format!("a gauge is not additive (meter `{slug}` is SUM); use MAX, MIN or LATEST"),
        )),
        (PointValues::Number(value), Aggregation::Sum) => {
            let value = number_value(*value, meter.scale)?;
            if shape.monotonic && value < 0 {
                return Err(PointError::from("negative value on a monotonic sum".to_string()));
            }
            if shape.delta {
                let value = non_negative(value, "value")?;
                return Ok(MeterUpdate::Add(AggState::Sum(value.into())));
            }
            if !shape.monotonic && !meter.allow_negative {
                return Err(PointError::from(format!(
                    "a non-monotonic cumulative sum can decrease; meter `{slug}` needs allow_negative (or use LATEST)"
                )));
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
                return Err(PointError::from(format!(
                    "{} point has no sum (meter `{slug}` is SUM)",
                    shape.kind
                )));
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
                return Err(PointError::from(format!(
                    "{} point has no {what} (meter `{slug}`)",
                    shape.kind
                )));
            };
            let value = decimal_from_f64(*bound, meter.scale).map_err(|error| quantity_error(what, error))?;
            Ok(level(non_negative(value, what)?))
        }
        (PointValues::Distribution { .. }, Aggregation::Latest) => Err(PointError::from(format!(
            "a {} has no single value (meter `{slug}` is LATEST); use COUNT, SUM, MAX or MIN",
            shape.kind
        ))),
    }
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
        // Looked up once per resource, interned once a series of it is admitted.
        let mut tenant_id = tenant
            .as_ref()
            .ok()
            .and_then(|tenant| context.names.tenants.get(tenant));
        let mut resource_hasher = HashInput::default();
        hash_attributes(&mut resource_hasher, resource);
        let resource_hash = resource_hasher.digest128();
        for scope_metrics in &resource_metrics.scope_metrics {
            let scope_attributes: &[KeyValue] = scope_metrics
                .scope
                .as_ref()
                .map_or(&[], |scope| &scope.attributes);
            let scope_refusal = too_many_attributes("scope", scope_attributes).err();
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
                    let tenant = match (&tenant, &scope_refusal) {
                        (Ok(tenant), None) => tenant,
                        (Err((reason, message)), _) | (_, Some((reason, message))) => {
                            mapped.refused.push(refuse(*reason, message.clone()));
                            continue;
                        }
                    };
                    match map_point(
                        &shape,
                        &meters,
                        (tenant, &mut tenant_id),
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
pub(super) fn map_point(
    shape: &PointShape<'_>,
    meters: &[&Meter],
    (tenant, tenant_id): (&str, &mut Option<crate::model::TenantId>),
    scope_hash: u128,
    metric: &str,
    resource: &[KeyValue],
    context: &MapContext<'_>,
    dims: &mut DimsCache,
    mapped: &mut Mapped,
) -> Result<(), (RefusalReason, String)> {
    let ts_ms = point_time(shape.time_ns, context)?;
    too_many_attributes("data point", shape.attributes)?;
    let invalid = |message: String| (RefusalReason::Invalid, message);
    let series = series_hash(tenant, scope_hash, metric, shape.attributes);
    let mut point = MappedPoint {
        dedup_key: None,
        updates: smallvec::SmallVec::with_capacity(meters.len()),
        late: false,
    };
    let mut cumulative = Vec::new();
    // Every meter's reading first: a point refused for its value starts no series.
    let mut readings = smallvec::SmallVec::<[_; 2]>::new();
    for meter in meters {
        let dims = lookup_dims(dims, meter, shape.attributes, resource, context.names).map_err(invalid)?;
        let update = meter_update(meter, shape, ts_ms).map_err(|error| (error.reason, error.message))?;
        readings.push((meter, dims, update));
    }
    for (meter, dims_ref, update) in readings {
        let key = series_key(
            context,
            dims,
            meter,
            (tenant, &mut *tenant_id),
            dims_ref,
            ts_ms,
            &mut point.late,
        )?;
        match update {
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
pub(super) fn point_shapes(
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
