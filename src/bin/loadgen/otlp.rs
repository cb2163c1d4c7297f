//! OTLP load: delta `http.server.requests` points encoded field by field into reused buffers,
//! sent as bytes over gRPC (`RawCodec`) as a collector does.

use crate::*;

pub(crate) fn text_attribute(key: &str, value: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An export request of monotonic delta `http.server.requests` points, one resource per tenant.
pub(crate) fn delta_requests(
    tenants: impl IntoIterator<
        Item = (
            String,
            Vec<opentelemetry_proto::tonic::metrics::v1::NumberDataPoint>,
        ),
    >,
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, AggregationTemporality, Metric, ResourceMetrics, ScopeMetrics, Sum,
    };
    opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
        resource_metrics: tenants
            .into_iter()
            .map(|(tenant, points)| ResourceMetrics {
                resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                    attributes: vec![text_attribute("tenant.id", &tenant)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "http.server.requests".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Delta as i32,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Field numbers of the OTLP messages that wrap the points (opentelemetry/proto/metrics/v1 and
/// collector/metrics/v1); a test checks the bytes against the generated types' encoding.
pub(crate) mod otlp_fields {
    pub const REQUEST_RESOURCE_METRICS: u32 = 1;
    pub const RESOURCE_METRICS_RESOURCE: u32 = 1;
    pub const RESOURCE_METRICS_SCOPE_METRICS: u32 = 2;
    pub const SCOPE_METRICS_METRICS: u32 = 2;
    pub const METRIC_NAME: u32 = 1;
    pub const METRIC_SUM: u32 = 7;
    pub const SUM_DATA_POINTS: u32 = 1;
    pub const SUM_AGGREGATION_TEMPORALITY: u32 = 2;
    pub const SUM_IS_MONOTONIC: u32 = 3;
}

/// Writes an export request of monotonic delta `http.server.requests` points, one resource per
/// tenant (the bytes `delta_requests` encodes to), from points pushed one at a time.
#[derive(Default)]
pub(crate) struct DeltaRequestEncoder {
    /// Encoded `Sum.data_points` fields per tenant index; emptied by `finish`, capacity kept.
    pub(crate) points: Vec<Vec<u8>>,
    /// Tenants with points in the request being built.
    pub(crate) touched: Vec<usize>,
    /// Each tenant's encoded `Resource`, made on its first request.
    pub(crate) resources: Vec<Option<Vec<u8>>>,
}

impl DeltaRequestEncoder {
    pub(crate) fn push_point(
        &mut self,
        tenant: usize,
        point: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint,
    ) {
        if self.points.len() <= tenant {
            self.points.resize_with(tenant + 1, Vec::new);
            self.resources.resize_with(tenant + 1, || None);
        }
        let buffer = &mut self.points[tenant];
        if buffer.is_empty() {
            self.touched.push(tenant);
        }
        prost::encoding::message::encode(otlp_fields::SUM_DATA_POINTS, point, buffer);
    }

    /// The request holding every point pushed since the last call, tenants in ascending order.
    /// `tenant_name` must name a tenant the same way every call (its resource is encoded once).
    pub(crate) fn finish(&mut self, tenant_name: impl Fn(usize) -> String) -> Vec<u8> {
        use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        use prost::Message;
        const NAME: &str = "http.server.requests";
        let field_len = |len: usize| 1 + encoded_len_varint(len as u64) + len;
        let put_header = |field: u32, len: usize, out: &mut Vec<u8>| {
            encode_key(field, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
        };
        self.touched.sort_unstable();
        let total: usize = self
            .touched
            .iter()
            .map(|tenant| self.points[*tenant].len() + 128)
            .sum();
        let mut out = Vec::with_capacity(total);
        for tenant in self.touched.drain(..) {
            let points = &mut self.points[tenant];
            let resource = self.resources[tenant].get_or_insert_with(|| {
                opentelemetry_proto::tonic::resource::v1::Resource {
                    attributes: vec![text_attribute("tenant.id", &tenant_name(tenant))],
                    ..Default::default()
                }
                .encode_to_vec()
            });
            // Two one-byte varint fields follow the points: temporality and is_monotonic.
            let sum_len = points.len() + 4;
            let metric_len = field_len(NAME.len()) + field_len(sum_len);
            let scope_len = field_len(metric_len);
            let resource_metrics_len = field_len(resource.len()) + field_len(scope_len);
            put_header(
                otlp_fields::REQUEST_RESOURCE_METRICS,
                resource_metrics_len,
                &mut out,
            );
            put_header(otlp_fields::RESOURCE_METRICS_RESOURCE, resource.len(), &mut out);
            out.extend_from_slice(resource);
            put_header(otlp_fields::RESOURCE_METRICS_SCOPE_METRICS, scope_len, &mut out);
            put_header(otlp_fields::SCOPE_METRICS_METRICS, metric_len, &mut out);
            put_header(otlp_fields::METRIC_NAME, NAME.len(), &mut out);
            out.extend_from_slice(NAME.as_bytes());
            put_header(otlp_fields::METRIC_SUM, sum_len, &mut out);
            out.extend_from_slice(points);
            encode_key(
                otlp_fields::SUM_AGGREGATION_TEMPORALITY,
                WireType::Varint,
                &mut out,
            );
            encode_varint(AggregationTemporality::Delta as u64, &mut out);
            encode_key(otlp_fields::SUM_IS_MONOTONIC, WireType::Varint, &mut out);
            encode_varint(1, &mut out);
            points.clear();
        }
        out
    }
}

/// Per-worker state of the OTLP generator.
pub(crate) struct OtlpGenerator {
    /// One point per route with its `http.route` attribute set; times and value change per use.
    pub(crate) route_points: Vec<opentelemetry_proto::tonic::metrics::v1::NumberDataPoint>,
    pub(crate) encoder: DeltaRequestEncoder,
}

impl OtlpGenerator {
    pub(crate) fn new(routes: usize) -> OtlpGenerator {
        OtlpGenerator {
            route_points: (0..routes)
                .map(|route| opentelemetry_proto::tonic::metrics::v1::NumberDataPoint {
                    attributes: vec![text_attribute("http.route", &format!("/v1/r{route}"))],
                    ..Default::default()
                })
                .collect(),
            encoder: DeltaRequestEncoder::default(),
        }
    }
}

/// A new OTLP/gRPC connection to `addr`.
pub(crate) async fn otlp_grpc_target(addr: &str) -> anyhow::Result<Target> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Target::OtlpGrpc(
        tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20),
    ))
}

/// One unary `MetricsService/Export` call with an encoded request; true when every point was
/// accepted (no partial success).
pub(crate) async fn otlp_grpc_export(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    body: Vec<u8>,
) -> bool {
    use prost::Message;
    use tallyd::ingest::otlp::grpc::{Metrics, RawCodec, SignalService};
    if client.ready().await.is_err() {
        return false;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(Metrics::PATH);
    match client.unary(tonic::Request::new(body), path, RawCodec).await {
        Ok(response) => {
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse::decode(
                response.into_inner(),
            )
            .is_ok_and(|response| response.partial_success.is_none())
        }
        Err(_) => false,
    }
}
