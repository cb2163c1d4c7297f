//! `[[meters]]`: each meter's source, aggregation, value and dimension paths, window, scale and
//! per-event fee, every misplaced or missing key named.

use std::collections::HashSet;

use super::raw::RawMeter;
use crate::aggregate::Aggregation;
use crate::meter::{JsonPath, Meter, MeterSource};
use crate::model::{WindowSize, MAX_SCALE};

/// TIME_WEIGHTED: SDKs export every 10–60 s; 15 silent minutes mean the stream stopped.
const DEFAULT_MAX_GAP_SECS: u64 = 900;

pub(super) fn validate_meters(raw_meters: Vec<RawMeter>, errors: &mut Vec<String>) -> Vec<Meter> {
    let mut meters = Vec::new();
    let mut slugs = HashSet::new();
    for (index, raw) in raw_meters.into_iter().enumerate() {
        let at = format!("meters[{index}] ({})", raw.slug);
        if !valid_slug(&raw.slug) {
            errors.push(format!(
                "{at}.slug: must be 1-64 characters of a-z, 0-9, `_` or `-`"
            ));
        }
        if !slugs.insert(raw.slug.clone()) {
            errors.push(format!("{at}.slug: duplicate slug"));
        }
        let source = meter_source(&raw, &at, errors);
        let aggregation = match raw.aggregation.as_str() {
            "SUM" => Some(Aggregation::Sum),
            "COUNT" => Some(Aggregation::Count),
            "MAX" => Some(Aggregation::Max),
            "MIN" => Some(Aggregation::Min),
            "LATEST" => Some(Aggregation::Latest),
            "UNIQUE_COUNT" => Some(Aggregation::UniqueCount),
            "TIME_WEIGHTED" => Some(Aggregation::TimeWeighted),
            "DISTRIBUTION" => Some(Aggregation::Distribution),
            other => {
                errors.push(format!(
                    "{at}.aggregation: `{other}` is not one of SUM | COUNT | MAX | MIN | LATEST | UNIQUE_COUNT | TIME_WEIGHTED | DISTRIBUTION"
                ));
                None
            }
        };
        if raw.max_gap_secs.is_some() && aggregation != Some(Aggregation::TimeWeighted) {
            errors.push(format!("{at}.max_gap_secs: only for TIME_WEIGHTED meters"));
        }
        if raw.allow_negative && aggregation == Some(Aggregation::Distribution) {
            errors.push(format!(
                "{at}.allow_negative: DISTRIBUTION meters take no negative values"
            ));
        }
        if raw.max_gap_secs == Some(0) {
            errors.push(format!("{at}.max_gap_secs: must be positive"));
        }
        if let (Some(source), Some(aggregation)) = (&source, aggregation) {
            check_source_aggregation(source, aggregation, &at, errors);
        }
        let cloudevents = matches!(source, Some(MeterSource::CloudEvents));
        let value_property = match (&raw.value_property, aggregation) {
            (Some(_), _) if !cloudevents => {
                errors.push(format!(
                    "{at}.value_property: only for cloudevents meters (OTLP metrics carry their value; logs use value_attribute)"
                ));
                None
            }
            (None, _) if !cloudevents => None,
            (None, Some(aggregation)) if aggregation.needs_value() => {
                errors.push(format!(
                    "{at}.value_property: required for {}",
                    aggregation.as_str()
                ));
                None
            }
            (Some(_), Some(Aggregation::Count)) => {
                errors.push(format!("{at}.value_property: COUNT meters take no value"));
                None
            }
            (Some(path), _) => match JsonPath::parse(path) {
                Ok(path) => Some(path),
                Err(reason) => {
                    errors.push(format!("{at}.value_property: `{path}` {reason}"));
                    None
                }
            },
            (None, _) => None,
        };
        let mut group_by = Vec::new();
        let mut group_by_attributes = Vec::new();
        for (name, path) in &raw.group_by {
            if name.is_empty() || name.len() > 64 {
                errors.push(format!("{at}.group_by: name `{name}` must be 1-64 bytes"));
            }
            if !cloudevents {
                // OTLP meters name attributes, not paths.
                if path.is_empty() || path.len() > 256 {
                    errors.push(format!(
                        "{at}.group_by.{name}: attribute name must be 1-256 bytes"
                    ));
                }
                group_by_attributes.push((name.clone(), path.clone()));
                continue;
            }
            match JsonPath::parse(path) {
                Ok(parsed) => group_by.push((name.clone(), parsed)),
                Err(reason) => errors.push(format!("{at}.group_by.{name}: `{path}` {reason}")),
            }
        }
        let window_size = WindowSize::parse(&raw.window_size).unwrap_or_else(|| {
            errors.push(format!(
                "{at}.window_size: `{}` is not one of MINUTE | HOUR | DAY",
                raw.window_size
            ));
            WindowSize::Minute
        });
        if raw.scale > MAX_SCALE {
            errors.push(format!("{at}.scale: must be at most {MAX_SCALE}"));
        }
        if raw.unique_exact_limit == 0 {
            errors.push(format!("{at}.unique_exact_limit: must be positive"));
        }
        let per_event_fee = raw.per_event_fee.as_ref().and_then(|fee| {
            let fee_at = format!("{at}.per_event_fee");
            if aggregation != Some(Aggregation::Sum)
                || raw.value_property.is_none() && raw.value_attribute.is_none()
            {
                errors.push(format!(
                    "{fee_at}: needs a SUM meter with a value (value_property or value_attribute)"
                ));
            }
            // The percent at up to 6 decimals (2.9 → 2.900000).
            let percent =
                crate::model::fixed_point_setting(&fee.percent, 6, &format!("{fee_at}.percent"), errors)?;
            let percent = rust_decimal::Decimal::from_i128_with_scale(percent, 6).normalize();
            if percent <= rust_decimal::Decimal::ZERO || percent > rust_decimal::Decimal::ONE_HUNDRED {
                errors.push(format!("{fee_at}.percent: must be above 0 and at most 100"));
            }
            let min = fee.min.as_ref().and_then(|v| {
                crate::model::fixed_point_setting(v, raw.scale, &format!("{fee_at}.min"), errors)
            });
            let max = fee.max.as_ref().and_then(|v| {
                crate::model::fixed_point_setting(v, raw.scale, &format!("{fee_at}.max"), errors)
            });
            if let (Some(min), Some(max)) = (min, max) {
                if min > max {
                    errors.push(format!("{fee_at}: min must not exceed max"));
                }
            }
            Some(crate::meter::PerEventFee { percent, min, max })
        });
        if let (Some(aggregation), Some(source)) = (aggregation, source) {
            meters.push(Meter {
                id: 0,
                slug: raw.slug,
                description: raw.description,
                source,
                event_type: raw.event_type,
                aggregation,
                value_property,
                group_by,
                group_by_attributes,
                window_size,
                scale: if aggregation == Aggregation::Count {
                    0
                } else {
                    raw.scale
                },
                unique_exact_limit: raw.unique_exact_limit,
                allow_negative: raw.allow_negative,
                max_gap_secs: raw.max_gap_secs.unwrap_or(DEFAULT_MAX_GAP_SECS) as i64,
                per_event_fee,
            });
        }
    }
    meters
}

/// The meter's source and its matching keys; every misplaced or missing key is named.
fn meter_source(raw: &RawMeter, at: &str, errors: &mut Vec<String>) -> Option<MeterSource> {
    let misplaced = |key: &str, set: bool, errors: &mut Vec<String>| {
        if set {
            errors.push(format!("{at}.{key}: not used by source `{}`", raw.source));
        }
    };
    let required = |key: &str, value: &Option<String>, errors: &mut Vec<String>| -> String {
        match value {
            Some(value) if !value.is_empty() => value.clone(),
            _ => {
                errors.push(format!("{at}.{key}: required for source `{}`", raw.source));
                String::new()
            }
        }
    };
    match raw.source.as_str() {
        "cloudevents" => {
            if raw.event_type.is_empty() {
                errors.push(format!("{at}.event_type: must not be empty"));
            }
            misplaced("metric_name", raw.metric_name.is_some(), errors);
            misplaced("event_name", raw.event_name.is_some(), errors);
            misplaced("value_attribute", raw.value_attribute.is_some(), errors);
            misplaced("id_attribute", raw.id_attribute.is_some(), errors);
            Some(MeterSource::CloudEvents)
        }
        "otlp_metric" => {
            misplaced("event_type", !raw.event_type.is_empty(), errors);
            misplaced("event_name", raw.event_name.is_some(), errors);
            misplaced("value_attribute", raw.value_attribute.is_some(), errors);
            misplaced("id_attribute", raw.id_attribute.is_some(), errors);
            Some(MeterSource::OtlpMetric {
                metric_name: required("metric_name", &raw.metric_name, errors),
            })
        }
        "otlp_log" => {
            misplaced("event_type", !raw.event_type.is_empty(), errors);
            misplaced("metric_name", raw.metric_name.is_some(), errors);
            let non_empty = |key: &str, value: &Option<String>, errors: &mut Vec<String>| {
                if value.as_deref() == Some("") {
                    errors.push(format!("{at}.{key}: must not be empty"));
                }
                value.clone()
            };
            Some(MeterSource::OtlpLog {
                event_name: required("event_name", &raw.event_name, errors),
                value_attribute: non_empty("value_attribute", &raw.value_attribute, errors),
                id_attribute: non_empty("id_attribute", &raw.id_attribute, errors),
            })
        }
        "envoy" => {
            misplaced("event_type", !raw.event_type.is_empty(), errors);
            misplaced("metric_name", raw.metric_name.is_some(), errors);
            misplaced("event_name", raw.event_name.is_some(), errors);
            misplaced("value_attribute", raw.value_attribute.is_some(), errors);
            misplaced("id_attribute", raw.id_attribute.is_some(), errors);
            Some(MeterSource::Envoy)
        }
        other => {
            errors.push(format!(
                "{at}.source: `{other}` is not one of cloudevents | otlp_metric | otlp_log | envoy"
            ));
            None
        }
    }
}

/// Aggregations a source cannot feed meaningfully are refused up front.
fn check_source_aggregation(
    source: &MeterSource,
    aggregation: Aggregation,
    at: &str,
    errors: &mut Vec<String>,
) {
    match (source, aggregation) {
        (MeterSource::OtlpMetric { .. }, Aggregation::UniqueCount) => errors.push(format!(
            "{at}.aggregation: UNIQUE_COUNT counts distinct values; metric points have none (use an otlp_log meter)"
        )),
        (MeterSource::CloudEvents | MeterSource::OtlpLog { .. }, Aggregation::TimeWeighted) => errors.push(format!(
            "{at}.aggregation: TIME_WEIGHTED integrates gauge streams; use source `otlp_metric`"
        )),
        (
            MeterSource::OtlpLog {
                value_attribute: None,
                ..
            },
            Aggregation::Max
            | Aggregation::Min
            | Aggregation::Latest
            | Aggregation::UniqueCount
            | Aggregation::Distribution,
        ) => errors.push(format!(
            "{at}.value_attribute: required for {} on source `otlp_log`",
            aggregation.as_str()
        )),
        (MeterSource::Envoy, aggregation) if !matches!(aggregation, Aggregation::Count | Aggregation::Sum) => {
            errors.push(format!(
                "{at}.aggregation: an envoy meter counts hits: COUNT or SUM, not {}",
                aggregation.as_str()
            ))
        }
        _ => {}
    }
}

fn valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= 64
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
