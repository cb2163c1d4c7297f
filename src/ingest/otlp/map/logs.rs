//! Log records → events: each record of a metered event name is one event, valued by an
//! attribute or 1, deduplicated by its id attribute like a CloudEvents id.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};

use crate::aggregate::{AggState, Aggregation, Observation};
use crate::ingest::decode::dedup_key;
pub use crate::ingest::error::RefusalReason;
use crate::meter::{Meter, MeterSource};
use crate::model::{decimal_from_f64, parse_decimal, DimsCache, QuantityError, MAX_ATTRIBUTE_BYTES};

use super::*;

/// The record's event name: the `event_name` field, else the `event.name` attribute.
pub(super) fn event_name(record: &opentelemetry_proto::tonic::logs::v1::LogRecord) -> Option<&str> {
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
        // Looked up once per resource, interned once a series of it is admitted.
        let mut tenant = tenant_of(resource, context).map(|tenant| {
            let id = context.names.tenants.get(&tenant);
            (tenant, id)
        });
        // Like a CloudEvents `source`: ids are unique per emitting service.
        let source = find(resource, "service.name")
            .and_then(attribute_text)
            .unwrap_or_default();
        for scope_logs in &resource_logs.scope_logs {
            let scope_attributes: &[KeyValue] =
                scope_logs.scope.as_ref().map_or(&[], |scope| &scope.attributes);
            let scope_refusal = too_many_attributes("scope", scope_attributes).err();
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
                let outcome = match (&mut tenant, &scope_refusal) {
                    (_, Some(refusal)) => Err(refusal.clone()),
                    (Ok((tenant, tenant_id)), None) => map_record(
                        record,
                        time_ns,
                        &meters,
                        (tenant, tenant_id),
                        (&source, resource),
                        context,
                        &mut dims,
                    ),
                    (Err(refusal), None) => Err(refusal.clone()),
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

pub(super) fn map_record(
    record: &opentelemetry_proto::tonic::logs::v1::LogRecord,
    time_ns: u64,
    meters: &[&Meter],
    (tenant, tenant_id): (&str, &mut Option<crate::model::TenantId>),
    (source, resource): (&str, &[KeyValue]),
    context: &MapContext<'_>,
    dims: &mut DimsCache,
) -> Result<MappedPoint, (RefusalReason, String)> {
    let ts_ms = point_time(time_ns, context)?;
    too_many_attributes("log record", &record.attributes)?;
    let invalid = |message: String| (RefusalReason::Invalid, message);
    let attribute = |key: &str| find(&record.attributes, key).or_else(|| find(resource, key));
    let mut point = MappedPoint {
        dedup_key: None,
        updates: smallvec::SmallVec::with_capacity(meters.len()),
        late: false,
    };
    // Every meter's reading first: a record refused for its value starts no series.
    let mut readings = smallvec::SmallVec::<[_; 2]>::new();
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
                record_observation(meter, value_attribute, value)
                    .map_err(|error| (error.reason, error.message))?
            }
        };
        let dims = lookup_dims(dims, meter, &record.attributes, resource, context.names).map_err(invalid)?;
        readings.push((meter, dims, observation));
    }
    for (meter, dims_ref, observation) in readings {
        let key = series_key(
            context,
            dims,
            meter,
            (tenant, &mut *tenant_id),
            dims_ref,
            ts_ms,
            &mut point.late,
        )?;
        point.updates.push((
            key,
            AggState::from_observation(meter.aggregation, observation, ts_ms, meter.unique_exact_limit),
        ));
    }
    Ok(point)
}

/// A log record's value attribute as an observation of `meter`.
pub(super) fn record_observation(
    meter: &Meter,
    attribute: &str,
    value: &AnyValue,
) -> Result<Observation, PointError> {
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
            return Err(PointError::from(format!(
                "attribute `{attribute}` must be a number or a decimal string"
            )))
        }
    };
    let value = parsed.map_err(|error| match error {
        QuantityError::NotANumber => {
            PointError::from(format!("attribute `{attribute}` is not a finite decimal number"))
        }
        other => super::metrics::quantity_error(&format!("attribute `{attribute}`"), other),
    })?;
    if value < 0 && !meter.allow_negative {
        return Err(PointError::from(format!(
            "attribute `{attribute}` is negative and meter `{}` does not allow_negative",
            meter.slug
        )));
    }
    match &meter.per_event_fee {
        Some(fee) => fee
            .apply(value, meter.scale)
            .map(Observation::Value)
            .map_err(|reason| PointError::from(format!("attribute `{attribute}` {reason}"))),
        None => Ok(Observation::Value(value)),
    }
}
