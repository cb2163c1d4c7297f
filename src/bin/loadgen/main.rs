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
//! Envoy RLS: `--rls ADDR` sends `ShouldRateLimit` calls (one descriptor: a Zipf tenant and
//! `--rls-meter`; each call one decision, OK and OVER_LIMIT alike counted as answered, the
//! OVER_LIMIT share reported) over `--grpc-connections` connections;
//! `--rls-baseline-server ADDR` runs the comparison point, an RLS server that answers OK.
//!
//! `--probe-interval-ms N` measures event-to-queryable latency beside the load: every N ms one
//! probe event (tenant `probe-<seed>-<start ms>`, over the same protocol as the load: an
//! `api.request` CloudEvent, or one OTLP delta point of `http.server.requests`) is sent, then
//! `--url`'s query API is polled until the probe tenant's total includes it; the time from
//! sending to seeing it goes into a second histogram. `--stop-after-events N` ends a closed-loop
//! run once N events were acknowledged (to fill a store with a known amount of usage).

mod baseline;
mod kafka;
mod otlp;
mod probe;
mod rls;
mod workload;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;

pub(crate) use baseline::*;
pub(crate) use kafka::*;
pub(crate) use otlp::*;
pub(crate) use probe::*;
pub(crate) use rls::*;
pub(crate) use workload::*;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tallyd-loadgen",
    about = "Load generator for tallyd (CloudEvents over HTTP, or into a Kafka topic)"
)]
pub(crate) struct Args {
    /// tallyd base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// Target events/s (open loop); 0 = closed loop at maximum speed.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    #[arg(long, default_value_t = 500)]
    pub(crate) batch_size: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    pub(crate) tenants: usize,
    /// Distinct values of each dimension (model, route).
    #[arg(long, default_value_t = 20)]
    pub(crate) dim_cardinality: usize,
    /// Zipf exponent for tenants and dimension values (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    pub(crate) zipf_s: f64,
    /// Percent of events that repeat an earlier event id.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) dup_pct: f64,
    /// Percent of events stamped 2-4 minutes in the past.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) late_pct: f64,
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    pub(crate) json_out: Option<std::path::PathBuf>,
    /// Run the decode-only baseline server on this address instead of generating load.
    #[arg(long)]
    pub(crate) baseline_server: Option<std::net::SocketAddr>,
    /// Kafka mode: produce `--events` events (one CloudEvent per message, key = tenant) to
    /// `--kafka-topic` on these brokers, then exit.
    #[arg(long)]
    pub(crate) kafka_produce: Option<String>,
    /// Kafka baseline: a bare consumer (no group, every partition from the start) that only
    /// counts `--events` messages of `--kafka-topic` on these brokers and reports the rate.
    #[arg(long)]
    pub(crate) kafka_count: Option<String>,
    #[arg(long, default_value = "usage")]
    pub(crate) kafka_topic: String,
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) events: u64,
    /// OTLP mode: send metrics export requests to this OTLP/gRPC address (host:port).
    #[arg(long)]
    pub(crate) otlp_grpc: Option<String>,
    /// OTLP/HTTP mode: POST the same requests (protobuf) to this base URL's `/v1/metrics`.
    #[arg(long)]
    pub(crate) otlp_http: Option<String>,
    /// OTLP/gRPC connections the requests are spread over (1: all on one, as one exporter of
    /// an OpenTelemetry Collector sends them).
    #[arg(long, default_value_t = 1)]
    pub(crate) grpc_connections: usize,
    /// Run the decode-and-discard OTLP/gRPC baseline server on this address instead.
    #[arg(long)]
    pub(crate) otlp_baseline_server: Option<std::net::SocketAddr>,
    /// Every N ms, send one probe event and time until the query API (`--url`) shows it
    /// (event-to-queryable latency); 0 = no probes.
    #[arg(long, default_value_t = 0)]
    pub(crate) probe_interval_ms: u64,
    /// Closed loop: stop once this many events were acknowledged (0 = run for the duration).
    #[arg(long, default_value_t = 0)]
    pub(crate) stop_after_events: u64,
    /// Soak: every `--interval-secs`, append one JSON line to this file with that interval's
    /// events, errors and request latency (p50/p99/max), so latency can be plotted over time.
    #[arg(long)]
    pub(crate) intervals_out: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub(crate) interval_secs: u64,
    /// RLS mode: Envoy `ShouldRateLimit` calls to this gRPC address (host:port).
    #[arg(long)]
    pub(crate) rls: Option<String>,
    /// Run the do-nothing RLS server (answers OK) on this address instead.
    #[arg(long)]
    pub(crate) rls_baseline_server: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "tallyd")]
    pub(crate) rls_domain: String,
    #[arg(long, default_value = "api_calls")]
    pub(crate) rls_meter: String,
}

#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) requests: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) missed: AtomicU64,
    /// RLS: answers OVER_LIMIT.
    pub(crate) over_limit: AtomicU64,
    /// The current interval's latencies (`--intervals-out`), swapped out by the reporter.
    pub(crate) interval: Mutex<Option<Histogram<u64>>>,
}

/// Where load goes.
#[derive(Clone)]
pub(crate) enum Target {
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
    Rls(
        envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<
            tonic::transport::Channel,
        >,
    ),
}

/// One request's payload.
pub(crate) enum Payload {
    Http(Vec<u8>),
    /// An encoded `ExportMetricsServiceRequest`.
    Otlp(Vec<u8>),
    Rls(envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest),
}

impl Target {
    pub(crate) fn payload(&self, generator: &mut Generator) -> (Payload, usize) {
        match self {
            Target::Http { .. } => {
                let (body, events) = generator.batch();
                (Payload::Http(body), events)
            }
            Target::OtlpGrpc(_) | Target::OtlpHttp { .. } => {
                (Payload::Otlp(generator.otlp_request()), generator.args.batch_size)
            }
            Target::Rls(_) => (Payload::Rls(rls_request(generator)), 1),
        }
    }
}

pub(crate) async fn send(
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
        (Target::Rls(client), Payload::Rls(request)) => match rls_call(client, request).await {
            Some(over_limit) => {
                totals
                    .over_limit
                    .fetch_add(u64::from(over_limit), Ordering::Relaxed);
                true
            }
            None => false,
        },
        _ => unreachable!("invariant: payloads match their target"),
    };
    let micros = started.elapsed().as_micros() as u64;
    latency.lock().record(micros.max(1)).ok();
    if let Some(interval) = totals.interval.lock().as_mut() {
        interval.record(micros.max(1)).ok();
    }
    totals.requests.fetch_add(1, Ordering::Relaxed);
    if ok {
        totals.events.fetch_add(events as u64, Ordering::Relaxed);
    } else {
        totals.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Appends one JSON line per interval until `deadline`: seconds since start, the interval's
/// acknowledged events and errors, and its request latency quantiles in ms.
async fn report_intervals(
    path: std::path::PathBuf,
    every_secs: u64,
    totals: Arc<Totals>,
    deadline: Instant,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(every_secs));
    ticker.tick().await;
    let (mut events, mut errors) = (0, 0);
    while Instant::now() < deadline {
        ticker.tick().await;
        let fresh = Histogram::new_with_bounds(1, 60_000_000, 3)?;
        let Some(window) = totals.interval.lock().replace(fresh) else {
            break;
        };
        let (now_events, now_errors) = (
            totals.events.load(Ordering::Relaxed),
            totals.errors.load(Ordering::Relaxed),
        );
        let line = json!({
            "t_secs": started.elapsed().as_secs_f64().round(),
            "events": now_events - events,
            "errors": now_errors - errors,
            "requests": window.len(),
            "p50_ms": window.value_at_quantile(0.50) as f64 / 1000.0,
            "p99_ms": window.value_at_quantile(0.99) as f64 / 1000.0,
            "max_ms": window.max() as f64 / 1000.0,
        });
        (events, errors) = (now_events, now_errors);
        writeln!(out, "{line}")?;
    }
    Ok(())
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
    if let Some(addr) = args.rls_baseline_server {
        return rls_baseline_server(addr).await;
    }
    let http_client = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .timeout(Duration::from_secs(30))
            .build()
    };
    let target = match &args.otlp_grpc {
        None if args.rls.is_some() => rls_target(args.rls.as_deref().unwrap_or_default()).await?,
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
    if let Some(addr) = &args.rls {
        for _ in 1..args.grpc_connections.max(1) {
            targets.push(rls_target(addr).await?);
        }
    }
    let totals = Arc::new(Totals::default());
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let deadline = Instant::now() + Duration::from_secs(args.duration_secs);
    let started = Instant::now();

    let reporter = args.intervals_out.clone().map(|path| {
        *totals.interval.lock() = Histogram::new_with_bounds(1, 60_000_000, 3).ok();
        tokio::spawn(report_intervals(
            path,
            args.interval_secs.max(1),
            totals.clone(),
            deadline,
        ))
    });
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
    if let Some(reporter) = reporter {
        reporter.await??;
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
            _ if args.rls.is_some() => format!("rls://{}", args.rls.as_deref().unwrap_or_default()),
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
        "over_limit": totals.over_limit.load(Ordering::Relaxed),
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{number_data_point, NumberDataPoint};
    use prost::Message;
    use rand::Rng;

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
