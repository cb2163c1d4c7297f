//! OTLP request builders shared by the black-box tests (OTLP ingest, cluster forwarding).

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics,
    ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

pub fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// One resource of `tenant` (None: no tenant attribute) with one `http.server.requests` sum.
pub fn sum_resource(
    tenant: Option<&str>,
    temporality: AggregationTemporality,
    points: Vec<NumberDataPoint>,
) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(Resource {
            attributes: tenant
                .map(|t| vec![string_attribute("tenant.id", t)])
                .unwrap_or_default(),
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            metrics: vec![Metric {
                name: "http.server.requests".into(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: temporality as i32,
                    is_monotonic: true,
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn point(route: &str, start_ns: u64, time_ns: u64, value: number_data_point::Value) -> NumberDataPoint {
    NumberDataPoint {
        attributes: vec![string_attribute("http.route", route)],
        start_time_unix_nano: start_ns,
        time_unix_nano: time_ns,
        value: Some(value),
        ..Default::default()
    }
}

pub fn int(value: i64) -> number_data_point::Value {
    number_data_point::Value::AsInt(value)
}
