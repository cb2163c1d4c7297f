//! `tallyd-loadgen`: drives a running tallyd with realistic CloudEvents usage over HTTP.
//!
//! Tenants and dimension values are Zipf-skewed; a share of events repeat an earlier id
//! (duplicates) or are stamped minutes in the past (late). Closed loop (`--rate 0`): each of
//! `--concurrency` workers sends batches back to back. Open loop (`--rate N`): batches are
//! scheduled at N events/s whatever the latency, and a batch that finds every slot busy is
//! counted as missed. Prints achieved rate, errors and an HdrHistogram of request latency, and
//! writes the same as JSON with `--json-out`.
//!
//! `--baseline-server ADDR` instead runs the comparison point for benchmarks: an axum server that
//! decodes and validates CloudEvents with tallyd's own decoder and the default meters, answers
//! 202, and does nothing else (no dedup, no log, no fsync, no aggregation).
//!
//! OTLP: `--otlp-grpc ADDR` (or `--otlp-http URL`, protobuf) sends `ExportMetricsServiceRequest`s of `--batch-size` delta data
//! points of the counter `http.server.requests` (Zipf tenants and routes, each point its own
//! timestamp, `--dup-pct` of them repeats) to an OTLP/gRPC endpoint, over one connection as
//! one exporter does (`--grpc-connections N` spreads them over N);
//! `--otlp-baseline-server ADDR` runs the comparison point: tonic's generated MetricsService with
//! prost decoding, which discards every request.
//!
//! `--probe-interval-ms N` measures event-to-queryable latency beside the load: every N ms one
//! probe event (tenant `probe-<seed>-<start ms>`, over the same protocol as the load: an
//! `api.request` CloudEvent, or one OTLP delta point of `http.server.requests`) is sent, then
//! `--url`'s query API is polled until the probe tenant's total includes it; the time from
//! sending to seeing it goes into a second histogram. `--stop-after-events N` ends a closed-loop
//! run once N events were acknowledged (to fill a store with a known amount of usage).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tallyd-loadgen",
    about = "Load generator for tallyd (CloudEvents over HTTP, or into a Kafka topic)"
)]
struct Args {
    /// tallyd base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Target events/s (open loop); 0 = closed loop at maximum speed.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Distinct values of each dimension (model, route).
    #[arg(long, default_value_t = 20)]
    dim_cardinality: usize,
    /// Zipf exponent for tenants and dimension values (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    /// Percent of events that repeat an earlier event id.
    #[arg(long, default_value_t = 1.0)]
    dup_pct: f64,
    /// Percent of events stamped 2-4 minutes in the past.
    #[arg(long, default_value_t = 1.0)]
    late_pct: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Run the decode-only baseline server on this address instead of generating load.
    #[arg(long)]
    baseline_server: Option<std::net::SocketAddr>,
    /// Kafka mode: produce `--events` events (one CloudEvent per message, key = tenant) to
    /// `--kafka-topic` on these brokers, then exit.
    #[arg(long)]
    kafka_produce: Option<String>,
    /// Kafka baseline: a bare consumer (no group, every partition from the start) that only
    /// counts `--events` messages of `--kafka-topic` on these brokers and reports the rate.
    #[arg(long)]
    kafka_count: Option<String>,
    #[arg(long, default_value = "usage")]
    kafka_topic: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// OTLP mode: send metrics export requests to this OTLP/gRPC address (host:port).
    #[arg(long)]
    otlp_grpc: Option<String>,
    /// OTLP/HTTP mode: POST the same requests (protobuf) to this base URL's `/v1/metrics`.
    #[arg(long)]
    otlp_http: Option<String>,
    /// OTLP/gRPC connections the requests are spread over (1: all on one, as one exporter of
    /// an OpenTelemetry Collector sends them).
    #[arg(long, default_value_t = 1)]
    grpc_connections: usize,
    /// Run the decode-and-discard OTLP/gRPC baseline server on this address instead.
    #[arg(long)]
    otlp_baseline_server: Option<std::net::SocketAddr>,
    /// Every N ms, send one probe event and time until the query API (`--url`) shows it
    /// (event-to-queryable latency); 0 = no probes.
    #[arg(long, default_value_t = 0)]
    probe_interval_ms: u64,
    /// Closed loop: stop once this many events were acknowledged (0 = run for the duration).
    #[arg(long, default_value_t = 0)]
    stop_after_events: u64,
}

/// Decode-and-discard OTLP/gRPC baseline: tonic + prost decode, then an empty response.
async fn otlp_baseline_server(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    struct Discard;
    #[tonic::async_trait]
    impl MetricsService for Discard {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            std::hint::black_box(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("otlp decode-only baseline listening on {addr}");
    // The daemon's HTTP/2 windows, so both servers receive alike.
    tonic::transport::Server::builder()
        .initial_connection_window_size(Some(tallyd::ingest::otlp::grpc::H2_CONNECTION_WINDOW_BYTES))
        .initial_stream_window_size(Some(tallyd::ingest::otlp::grpc::H2_STREAM_WINDOW_BYTES))
        .add_service(
            MetricsServiceServer::new(Discard)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}

/// Decode-only baseline: the same decode and validation as tallyd's ingest, then 202.
async fn baseline_server(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use axum::http::{header, HeaderMap, StatusCode};
    use tallyd::ingest::decode;

    struct Baseline {
        meters: tallyd::meter::Meters,
        names: tallyd::model::Names,
    }
    let config = tallyd::Config::load(tallyd::config::DEFAULT_CONFIG, &Default::default())
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let names = tallyd::model::Names::default();
    let acceptance = config.acceptance();
    let meters = tallyd::meter::Meters::new(config.meters, &names);
    let state = Arc::new(Baseline { meters, names });
    let ingest = move |axum::extract::State(state): axum::extract::State<Arc<Baseline>>,
                       headers: HeaderMap,
                       body: axum::body::Bytes| async move {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let decoded = tokio::task::spawn_blocking(move || {
            let kind = decode::body_kind(content_type.as_deref()).ok()?;
            let raw = decode::split_body(&body, kind).ok()?;
            let now = tallyd::model::now_ms();
            decode::decode_events(&raw, &state.meters, &state.names, now, acceptance)
                .ok()
                .map(|decoded| decoded.metered.len())
        })
        .await
        .ok()
        .flatten();
        match decoded {
            Some(accepted) => (StatusCode::ACCEPTED, axum::Json(json!({"accepted": accepted}))),
            None => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "invalid_request"})),
            ),
        }
    };
    let app = axum::Router::new()
        .route("/api/v1/events", axum::routing::post(ingest))
        .route("/readyz", axum::routing::get(|| async { "ready" }))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("decode-only baseline listening on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}

/// Samples ranks 0..n with probability ∝ 1/(rank+1)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cdf.push(total);
        }
        for value in &mut cdf {
            *value /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|p| *p < u).min(self.cdf.len() - 1)
    }
}

struct Generator {
    args: Args,
    tenants: Zipf,
    dims: Zipf,
    rng: SmallRng,
    next_id: u64,
    worker: usize,
    /// OTLP point times count up from here (1 µs apart), so every point is its own.
    started_ns: u64,
    otlp: OtlpGenerator,
}

impl Generator {
    /// The next item's id (`--dup-pct` of the time an earlier one's) and the RNG everything
    /// else about it derives from: a duplicate repeats the whole item.
    fn next_item(&mut self) -> (u64, SmallRng) {
        let duplicate = self.next_id > 0 && self.rng.gen_bool((self.args.dup_pct / 100.0).clamp(0.0, 1.0));
        let id = if duplicate {
            self.rng.gen_range(0..self.next_id)
        } else {
            self.next_id += 1;
            self.next_id - 1
        };
        (
            id,
            SmallRng::seed_from_u64(self.args.seed ^ (id << 8) ^ self.worker as u64),
        )
    }

    /// One OTLP export request of `batch_size` delta points (a duplicate repeats an earlier
    /// point exactly: same stream, start and time), encoded. The points are the generated
    /// `NumberDataPoint` type, one reused template per route; only the envelope is written
    /// field by field (`DeltaRequestEncoder`), so the generator spends its CPU on the load's
    /// bytes instead of on building and freeing a message tree per request (the daemon under
    /// test shares these two cores with it).
    fn otlp_request(&mut self) -> Vec<u8> {
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        for _ in 0..self.args.batch_size {
            let (id, mut point_rng) = self.next_item();
            let tenant = self.tenants.sample(&mut point_rng);
            let route = self.dims.sample(&mut point_rng);
            // Distinct (start, time) per point of a stream; a duplicate repeats its original's.
            let time = self.started_ns + id * 1000 + self.worker as u64;
            let point = &mut self.otlp.route_points[route];
            point.start_time_unix_nano = time - 1;
            point.time_unix_nano = time.min(now_ns);
            point.value = Some(
                opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(
                    point_rng.gen_range(1..100),
                ),
            );
            self.otlp.encoder.push_point(tenant, point);
        }
        self.otlp.encoder.finish(|tenant| format!("tenant-{tenant}"))
    }

    /// A JSON array of `batch_size` CloudEvents.
    fn batch(&mut self) -> (Vec<u8>, usize) {
        let now = chrono::Utc::now();
        let now_text = event_time(now);
        let mut body = Vec::with_capacity(self.args.batch_size * 224);
        body.push(b'[');
        for n in 0..self.args.batch_size {
            if n > 0 {
                body.push(b',');
            }
            self.write_event(now, &now_text, &mut body);
        }
        body.push(b']');
        (body, self.args.batch_size)
    }

    /// Appends one CloudEvent as JSON and returns its tenant. Written as text, not through a
    /// `serde_json::Value` per event: every string here is plain ASCII that needs no escaping,
    /// and the generator's CPU is taken from the daemon it measures (same two cores).
    fn write_event(
        &mut self,
        now: chrono::DateTime<chrono::Utc>,
        now_text: &str,
        out: &mut Vec<u8>,
    ) -> usize {
        use std::io::Write;
        let (id, mut event_rng) = self.next_item();
        let tenant = self.tenants.sample(&mut event_rng);
        let dim = self.dims.sample(&mut event_rng);
        let late = event_rng.gen_bool((self.args.late_pct / 100.0).clamp(0.0, 1.0));
        let late_text;
        let time = if late {
            late_text = event_time(now - chrono::Duration::seconds(event_rng.gen_range(120..240)));
            late_text.as_str()
        } else {
            now_text
        };
        let kind = event_rng.gen_range(0..10);
        let event_type = match kind {
            0..=5 => "llm.prompt",
            6..=8 => "api.request",
            _ => "user.active",
        };
        let (seed, worker) = (self.args.seed, self.worker);
        write!(
            out,
            r#"{{"specversion":"1.0","id":"lg-{seed}-{worker}-{id}","source":"tallyd-loadgen","type":"{event_type}","subject":"tenant-{tenant}","time":"{time}","data":"#
        )
        .expect("invariant: writing to a Vec cannot fail");
        match kind {
            0..=5 => write!(
                out,
                r#"{{"tokens":{},"model":"model-{dim}"}}}}"#,
                event_rng.gen_range(1..4000)
            ),
            6..=8 => write!(out, r#"{{"route":"/v1/r{dim}","method":"GET"}}}}"#),
            _ => write!(
                out,
                r#"{{"user_id":"user-{}"}}}}"#,
                event_rng.gen_range(0..100_000)
            ),
        }
        .expect("invariant: writing to a Vec cannot fail");
        tenant
    }
}

/// A CloudEvent `time`: RFC 3339 UTC with milliseconds.
fn event_time(time: chrono::DateTime<chrono::Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn text_attribute(key: &str, value: &str) -> opentelemetry_proto::tonic::common::v1::KeyValue {
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
fn delta_requests(
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
mod otlp_fields {
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
struct DeltaRequestEncoder {
    /// Encoded `Sum.data_points` fields per tenant index; emptied by `finish`, capacity kept.
    points: Vec<Vec<u8>>,
    /// Tenants with points in the request being built.
    touched: Vec<usize>,
    /// Each tenant's encoded `Resource`, made on its first request.
    resources: Vec<Option<Vec<u8>>>,
}

impl DeltaRequestEncoder {
    fn push_point(
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
    fn finish(&mut self, tenant_name: impl Fn(usize) -> String) -> Vec<u8> {
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
struct OtlpGenerator {
    /// One point per route with its `http.route` attribute set; times and value change per use.
    route_points: Vec<opentelemetry_proto::tonic::metrics::v1::NumberDataPoint>,
    encoder: DeltaRequestEncoder,
}

impl OtlpGenerator {
    fn new(routes: usize) -> OtlpGenerator {
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

/// Produces `args.events` events, one per message, keyed by tenant (one record per batch:
/// tansu 0.6 cannot fetch from inside a batch, see ARCHITECTURE.md).
fn kafka_produce(args: &Args, brokers: &str) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut generator = Generator {
        args: args.clone(),
        tenants: Zipf::new(args.tenants, args.zipf_s),
        dims: Zipf::new(args.dim_cardinality, args.zipf_s),
        rng: SmallRng::seed_from_u64(args.seed),
        next_id: 0,
        worker: 0,
        started_ns: 0,
        otlp: OtlpGenerator::new(0),
    };
    let started = Instant::now();
    let mut produced = 0u64;
    let mut bytes = 0u64;
    let mut payload = Vec::with_capacity(256);
    while produced < args.events {
        let now = chrono::Utc::now();
        let now_text = event_time(now);
        for _ in 0..args.batch_size {
            if produced == args.events {
                break;
            }
            payload.clear();
            let key = format!("tenant-{}", generator.write_event(now, &now_text, &mut payload));
            bytes += payload.len() as u64;
            let mut record = BaseRecord::<str, [u8]>::to(&args.kafka_topic)
                .key(&key)
                .payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(5));
                    }
                }
            }
            produced += 1;
        }
    }
    producer.flush(Duration::from_secs(300))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"produced": produced, "avg_bytes": bytes / produced.max(1), "seconds": secs, "per_sec": produced as f64 / secs})
    );
    Ok(())
}

/// The bare consumer baseline: counts messages, nothing else.
fn kafka_count(args: &Args, brokers: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tallyd-loadgen-count")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "100000")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&args.kafka_topic), Duration::from_secs(10))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            assignment.add_partition_offset(&args.kafka_topic, partition.id(), rdkafka::Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let mut counted = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counted < args.events && Instant::now() < deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            counted += 1;
        }
    }
    let secs = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
    println!(
        "{}",
        json!({"counted": counted, "seconds_from_first_message": secs, "per_sec": counted as f64 / secs.max(1e-9)})
    );
    anyhow::ensure!(
        counted == args.events,
        "only {counted} of {} messages",
        args.events
    );
    Ok(())
}

#[derive(Default)]
struct Totals {
    requests: AtomicU64,
    events: AtomicU64,
    errors: AtomicU64,
    missed: AtomicU64,
}

/// Where load goes.
#[derive(Clone)]
enum Target {
    Http {
        client: reqwest::Client,
        url: String,
    },
    /// Requests go out as the bytes the generator encoded (`RawCodec`), as a collector's do.
    OtlpGrpc(tonic::client::Grpc<tonic::transport::Channel>),
    OtlpHttp {
        client: reqwest::Client,
        url: String,
    },
}

/// One request's payload.
enum Payload {
    Http(Vec<u8>),
    /// An encoded `ExportMetricsServiceRequest`.
    Otlp(Vec<u8>),
}

impl Target {
    fn payload(&self, generator: &mut Generator) -> (Payload, usize) {
        match self {
            Target::Http { .. } => {
                let (body, events) = generator.batch();
                (Payload::Http(body), events)
            }
            Target::OtlpGrpc(_) | Target::OtlpHttp { .. } => {
                (Payload::Otlp(generator.otlp_request()), generator.args.batch_size)
            }
        }
    }
}

async fn send(
    target: &mut Target,
    payload: Payload,
    events: usize,
    totals: &Totals,
    latency: &Mutex<Histogram<u64>>,
) {
    let started = Instant::now();
    let ok = match (target, payload) {
        (Target::Http { client, url }, Payload::Http(body)) => {
            let result = client
                .post(url.as_str())
                .header("content-type", "application/cloudevents-batch+json")
                .body(body)
                .send()
                .await;
            matches!(&result, Ok(response) if response.status() == 202)
        }
        (Target::OtlpGrpc(client), Payload::Otlp(body)) => otlp_grpc_export(client, body).await,
        (Target::OtlpHttp { client, url }, Payload::Otlp(request)) => {
            let result = client
                .post(url.as_str())
                .header("content-type", "application/x-protobuf")
                .body(request)
                .send()
                .await;
            matches!(&result, Ok(response) if response.status() == 200)
        }
        _ => unreachable!("invariant: payloads match their target"),
    };
    let micros = started.elapsed().as_micros() as u64;
    latency.lock().record(micros.max(1)).ok();
    totals.requests.fetch_add(1, Ordering::Relaxed);
    if ok {
        totals.events.fetch_add(events as u64, Ordering::Relaxed);
    } else {
        totals.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// A new OTLP/gRPC connection to `addr`.
async fn otlp_grpc_target(addr: &str) -> anyhow::Result<Target> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(Target::OtlpGrpc(
        tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20),
    ))
}

/// One unary `MetricsService/Export` call with an encoded request; true when every point was
/// accepted (no partial success).
async fn otlp_grpc_export(
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.baseline_server {
        return baseline_server(addr).await;
    }
    if let Some(brokers) = args.kafka_produce.clone() {
        return tokio::task::spawn_blocking(move || kafka_produce(&args, &brokers)).await?;
    }
    if let Some(brokers) = args.kafka_count.clone() {
        return tokio::task::spawn_blocking(move || kafka_count(&args, &brokers)).await?;
    }
    if let Some(addr) = args.otlp_baseline_server {
        return otlp_baseline_server(addr).await;
    }
    let http_client = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .timeout(Duration::from_secs(30))
            .build()
    };
    let target = match &args.otlp_grpc {
        None if args.otlp_http.is_some() => Target::OtlpHttp {
            client: http_client()?,
            url: format!(
                "{}/v1/metrics",
                args.otlp_http
                    .as_deref()
                    .unwrap_or_default()
                    .trim_end_matches('/')
            ),
        },
        Some(addr) => otlp_grpc_target(addr).await?,
        None => Target::Http {
            client: http_client()?,
            url: format!("{}/api/v1/events", args.url.trim_end_matches('/')),
        },
    };
    // More gRPC connections: each worker (or open-loop request) takes one in turn.
    let mut targets = vec![target.clone()];
    if let Some(addr) = &args.otlp_grpc {
        for _ in 1..args.grpc_connections.max(1) {
            targets.push(otlp_grpc_target(addr).await?);
        }
    }
    let totals = Arc::new(Totals::default());
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let started = Instant::now();

    let probes = (args.probe_interval_ms > 0).then(|| {
        let (target, args) = (target.clone(), args.clone());
        tokio::spawn(async move { probe(target, args, deadline).await })
    });
    let mut workers = Vec::new();
    if args.rate == 0 {
        for worker in 0..args.concurrency {
            let (mut target, totals, latency, args) = (
                targets[worker % targets.len()].clone(),
                totals.clone(),
                latency.clone(),
                args.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut generator = generator(&args, worker);
                let limit = if args.stop_after_events == 0 {
                    u64::MAX
                } else {
                    args.stop_after_events
                };
                while Instant::now() < deadline && totals.events.load(Ordering::Relaxed) < limit {
                    let (payload, events) = target.payload(&mut generator);
                    send(&mut target, payload, events, &totals, &latency).await;
                }
            }));
        }
    } else {
        let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
        let batches_per_sec = args.rate as f64 / args.batch_size as f64;
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / batches_per_sec));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut generator = generator(&args, 0);
        while Instant::now() < deadline {
            interval.tick().await;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                totals.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (payload, events) = target.payload(&mut generator);
            let (mut target, totals, latency) = (
                targets[workers.len() % targets.len()].clone(),
                totals.clone(),
                latency.clone(),
            );
            workers.push(tokio::spawn(async move {
                send(&mut target, payload, events, &totals, &latency).await;
                drop(permit);
            }));
        }
    }
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let probe_summary = match probes {
        Some(probes) => probes.await??.summary(),
        None => serde_json::Value::Null,
    };
    let latency = latency.lock();
    let events = totals.events.load(Ordering::Relaxed);
    let mut summary = json!({
        "url": match (&args.otlp_grpc, &args.otlp_http) {
            (Some(addr), _) => format!("otlp-grpc://{addr}"),
            (None, Some(url)) => format!("{url} (otlp/http)"),
            (None, None) => args.url.clone(),
        },
        "mode": if args.rate == 0 { "closed" } else { "open" },
        "target_events_per_sec": args.rate,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "elapsed_secs": elapsed,
        "requests": totals.requests.load(Ordering::Relaxed),
        "events_acked": events,
        "events_per_sec": events as f64 / elapsed,
        "errors": totals.errors.load(Ordering::Relaxed),
        "missed_batches": totals.missed.load(Ordering::Relaxed),
        "latency_ms": {
            "p50": latency.value_at_quantile(0.50) as f64 / 1000.0,
            "p90": latency.value_at_quantile(0.90) as f64 / 1000.0,
            "p99": latency.value_at_quantile(0.99) as f64 / 1000.0,
            "max": latency.max() as f64 / 1000.0,
        },
    });
    if !probe_summary.is_null() {
        summary["event_to_queryable"] = probe_summary;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// Event-to-queryable figures of one run.
struct Probes {
    latency: Histogram<u64>,
    sent: u64,
    timeouts: u64,
    errors: u64,
}

impl Probes {
    fn summary(&self) -> serde_json::Value {
        let ms = |quantile: f64| self.latency.value_at_quantile(quantile) as f64 / 1000.0;
        json!({
            "probes": self.sent,
            "seen": self.latency.len(),
            "timeouts": self.timeouts,
            "errors": self.errors,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": self.latency.max() as f64 / 1000.0},
        })
    }
}

/// Sends one probe event every `--probe-interval-ms` over the load's protocol and polls the
/// query API until the probe tenant's total counts it (each probe adds exactly 1, so the k-th
/// probe is visible once the total reaches k). A probe not visible within 10 s is a timeout,
/// and the next one waits for the total to catch up first, so one lost probe cannot make every
/// later one look instant.
async fn probe(mut target: Target, args: Args, deadline: Instant) -> anyhow::Result<Probes> {
    use opentelemetry_proto::tonic::metrics::v1::{number_data_point, NumberDataPoint};
    let tenant = format!("probe-{}-{}", args.seed, chrono::Utc::now().timestamp_millis());
    let meter = match target {
        Target::Http { .. } => "api_calls",
        Target::OtlpGrpc(_) | Target::OtlpHttp { .. } => "requests",
    };
    let query = format!(
        "{}/api/v1/meters/{meter}/query?subject={tenant}",
        args.url.trim_end_matches('/')
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let total = |client: reqwest::Client, query: String| async move {
        let body: serde_json::Value = client
            .get(&query)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let rows = body["data"].as_array().cloned().unwrap_or_default();
        anyhow::Ok(
            rows.iter()
                .map(|row| match &row["value"] {
                    serde_json::Value::Number(n) => n.as_f64().unwrap_or(0.0),
                    serde_json::Value::String(s) => s.parse().unwrap_or(0.0),
                    _ => 0.0,
                })
                .sum::<f64>()
                .round() as u64,
        )
    };
    let mut probes = Probes {
        latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        sent: 0,
        timeouts: 0,
        errors: 0,
    };
    let mut interval = tokio::time::interval(Duration::from_millis(args.probe_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
    while Instant::now() < deadline {
        interval.tick().await;
        let want = probes.sent + 1;
        let now_ns = (chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64).max(last_ns + 1);
        let payload = match target {
            Target::Http { .. } => Payload::Http(serde_json::to_vec(&json!([{
                "specversion": "1.0",
                "id": format!("{tenant}-{want}"),
                "source": "tallyd-loadgen-probe",
                "type": "api.request",
                "subject": tenant,
                "time": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                "data": {"route": "/probe", "method": "GET"},
            }]))?),
            Target::OtlpGrpc(_) | Target::OtlpHttp { .. } => {
                Payload::Otlp(prost::Message::encode_to_vec(&delta_requests([(
                    tenant.clone(),
                    vec![NumberDataPoint {
                        attributes: vec![text_attribute("http.route", "/probe")],
                        start_time_unix_nano: last_ns,
                        time_unix_nano: now_ns,
                        value: Some(number_data_point::Value::AsInt(1)),
                        ..Default::default()
                    }],
                )])))
            }
        };
        last_ns = now_ns;
        let scratch = Totals::default();
        let request_latency = Mutex::new(Histogram::<u64>::new(3)?);
        let started = Instant::now();
        send(&mut target, payload, 1, &scratch, &request_latency).await;
        if scratch.events.load(Ordering::Relaxed) != 1 {
            // Refused (overload, shutdown): not counted, so the total will not include it.
            probes.errors += 1;
            continue;
        }
        probes.sent = want;
        let give_up = started + Duration::from_secs(10);
        loop {
            match total(client.clone(), query.clone()).await {
                Ok(seen) if seen >= want => {
                    probes
                        .latency
                        .record((started.elapsed().as_micros() as u64).max(1))
                        .ok();
                    break;
                }
                Ok(_) => {}
                Err(_) => probes.errors += 1,
            }
            if Instant::now() > give_up {
                probes.timeouts += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(probes)
}

fn generator(args: &Args, worker: usize) -> Generator {
    Generator {
        args: args.clone(),
        tenants: Zipf::new(args.tenants.max(1), args.zipf_s),
        dims: Zipf::new(args.dim_cardinality.max(1), args.zipf_s),
        rng: SmallRng::seed_from_u64(args.seed.wrapping_add(worker as u64)),
        next_id: 0,
        worker,
        // Behind now, so that points never look like they come from the future.
        started_ns: (chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64)
            .saturating_sub(args.duration_secs * 2_000_000_000),
        otlp: OtlpGenerator::new(args.dim_cardinality.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{number_data_point, NumberDataPoint};
    use prost::Message;

    fn args() -> Args {
        Args::parse_from([
            "tallyd-loadgen",
            "--batch-size",
            "300",
            "--late-pct",
            "20",
            "--dup-pct",
            "10",
        ])
    }

    fn point(route: &str, time: u64, value: i64) -> NumberDataPoint {
        NumberDataPoint {
            attributes: vec![text_attribute("http.route", route)],
            start_time_unix_nano: time - 1,
            time_unix_nano: time,
            value: Some(number_data_point::Value::AsInt(value)),
            ..Default::default()
        }
    }

    #[test]
    fn the_request_encoder_writes_what_the_generated_types_encode() {
        let mut encoder = DeltaRequestEncoder::default();
        let pushed = [
            (7, point("/a", 10, 1)),
            (2, point("/b", 20, 2)),
            (7, point("/c", 30, 3)),
        ];
        for _ in 0..2 {
            // Twice: `finish` leaves the encoder empty for the next request.
            for (tenant, point) in &pushed {
                encoder.push_point(*tenant, point);
            }
            let bytes = encoder.finish(|tenant| format!("tenant-{tenant}"));
            let expected = delta_requests([
                ("tenant-2".to_string(), vec![pushed[1].1.clone()]),
                (
                    "tenant-7".to_string(),
                    vec![pushed[0].1.clone(), pushed[2].1.clone()],
                ),
            ]);
            assert_eq!(
                ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap(),
                expected
            );
            assert_eq!(bytes, expected.encode_to_vec());
        }
        assert!(encoder.finish(|tenant| format!("tenant-{tenant}")).is_empty());
    }

    #[test]
    fn an_otlp_request_holds_batch_size_points_with_repeats_of_earlier_ones() {
        let mut generator = generator(&args(), 1);
        let mut seen = std::collections::HashSet::new();
        let (mut points, mut repeats) = (0, 0);
        for _ in 0..10 {
            let request = ExportMetricsServiceRequest::decode(generator.otlp_request().as_slice()).unwrap();
            for resource in &request.resource_metrics {
                let tenant = format!("{:?}", resource.resource.as_ref().unwrap().attributes);
                let sum = match &resource.scope_metrics[0].metrics[0].data {
                    Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(sum)) => sum,
                    other => panic!("not a sum: {other:?}"),
                };
                for point in &sum.data_points {
                    points += 1;
                    if !seen.insert((
                        tenant.clone(),
                        format!("{:?}", point.attributes),
                        point.time_unix_nano,
                    )) {
                        repeats += 1;
                    }
                }
            }
        }
        assert_eq!(points, 3000);
        // --dup-pct 10: about 300 exact repeats (same tenant, route and time).
        assert!((200..400).contains(&repeats), "{repeats} repeats");
    }

    /// The events as the generator built them before it wrote text: one `serde_json::Value`
    /// per event, from the same random draws in the same order.
    fn value_events(generator: &mut Generator, now: chrono::DateTime<chrono::Utc>) -> Vec<serde_json::Value> {
        (0..generator.args.batch_size)
            .map(|_| {
                let (id, mut rng) = generator.next_item();
                let tenant = generator.tenants.sample(&mut rng);
                let dim = generator.dims.sample(&mut rng);
                let time = if rng.gen_bool((generator.args.late_pct / 100.0).clamp(0.0, 1.0)) {
                    now - chrono::Duration::seconds(rng.gen_range(120..240))
                } else {
                    now
                };
                let (event_type, data) = match rng.gen_range(0..10) {
                    0..=5 => (
                        "llm.prompt",
                        json!({"tokens": rng.gen_range(1..4000), "model": format!("model-{dim}")}),
                    ),
                    6..=8 => (
                        "api.request",
                        json!({"route": format!("/v1/r{dim}"), "method": "GET"}),
                    ),
                    _ => (
                        "user.active",
                        json!({"user_id": format!("user-{}", rng.gen_range(0..100_000))}),
                    ),
                };
                json!({
                    "specversion": "1.0",
                    "id": format!("lg-{}-{}-{id}", generator.args.seed, generator.worker),
                    "source": "tallyd-loadgen",
                    "type": event_type,
                    "subject": format!("tenant-{tenant}"),
                    "time": event_time(time),
                    "data": data,
                })
            })
            .collect()
    }

    #[test]
    fn events_written_as_text_are_the_events_of_the_value_builder() {
        let (mut written, mut built) = (generator(&args(), 3), generator(&args(), 3));
        let now = chrono::Utc::now();
        let now_text = event_time(now);
        let mut body = Vec::new();
        let mut tenants = Vec::new();
        body.push(b'[');
        for n in 0..written.args.batch_size {
            if n > 0 {
                body.push(b',');
            }
            tenants.push(written.write_event(now, &now_text, &mut body));
        }
        body.push(b']');
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let expected = value_events(&mut built, now);
        assert_eq!(parsed, expected);
        for (event, tenant) in parsed.iter().zip(tenants) {
            assert_eq!(event["subject"], format!("tenant-{tenant}"));
        }
        // Every kind of event and some late ones were drawn (the comparison covers each shape).
        for kind in ["llm.prompt", "api.request", "user.active"] {
            assert!(parsed.iter().any(|event| event["type"] == kind), "no {kind}");
        }
        assert!(parsed.iter().any(|event| event["time"] != now_text.as_str()));
    }
}
