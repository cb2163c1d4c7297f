//! Black-box OTLP tests: the real daemon, exported to by the OpenTelemetry Python SDK (gRPC and
//! HTTP exporters, delta and cumulative) and by a tonic client for the protocol's edges:
//! partial success, retries after overload, duplicates, malformed requests, API keys.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use common::otlp::{int, point, string_attribute, sum_resource};
use common::{client, edit_config, metrics_text, query, read_jsonl, sum_rows, write_config, Daemon};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::Digest;

const OTLP_METERS: &str = r#"
[[meters]]
slug = "requests"
source = "otlp_metric"
metric_name = "http.server.requests"
aggregation = "SUM"
group_by = { route = "http.route" }
scale = 0

[[meters]]
slug = "queue_net"
source = "otlp_metric"
metric_name = "queue.depth"
aggregation = "SUM"
allow_negative = true
scale = 0

[[meters]]
slug = "queue_level"
source = "otlp_metric"
metric_name = "queue.depth"
aggregation = "LATEST"
allow_negative = true
scale = 0

[[meters]]
slug = "storage_peak"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "MAX"
scale = 0

[[meters]]
slug = "storage_latest"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "LATEST"
scale = 0

[[meters]]
slug = "storage_gb_hours"
source = "otlp_metric"
metric_name = "storage.used"
aggregation = "TIME_WEIGHTED"
scale = 3

[[meters]]
slug = "latency"
source = "otlp_metric"
metric_name = "latency.dist"
aggregation = "DISTRIBUTION"
scale = 3

[[meters]]
slug = "request_count"
source = "otlp_metric"
metric_name = "request.duration"
aggregation = "COUNT"

[[meters]]
slug = "request_seconds"
source = "otlp_metric"
metric_name = "request.duration"
aggregation = "SUM"
scale = 3

[[meters]]
slug = "workflow_runs"
source = "otlp_log"
event_name = "workflow.run"
value_attribute = "steps"
id_attribute = "event.id"
aggregation = "SUM"
scale = 0

[[meters]]
slug = "workflow_count"
source = "otlp_log"
event_name = "workflow.run"
id_attribute = "event.id"
aggregation = "COUNT"
"#;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn total(daemon: &Daemon, meter: &str, tenant: &str) -> i64 {
    sum_rows(&query(&client(), daemon, meter, &format!("subject={tenant}")).await)
}

/// The one value a meter holds for a tenant over all windows (exact decimal).
async fn value(daemon: &Daemon, meter: &str, tenant: &str) -> Decimal {
    let result = query(&client(), daemon, meter, &format!("subject={tenant}")).await;
    let rows = result["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{meter} for {tenant}: {result}");
    Decimal::from_str(&rows[0]["value"].to_string()).unwrap()
}

async fn grpc_metrics(daemon: &Daemon) -> MetricsServiceClient<tonic::transport::Channel> {
    MetricsServiceClient::connect(format!("http://{}", daemon.otlp_grpc.as_ref().unwrap()))
        .await
        .unwrap()
}

fn start(extra: &str) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("{extra}\n{OTLP_METERS}"));
    let daemon = Daemon::start(&config);
    (dir, daemon)
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_exports_count_exactly_over_grpc_and_http() {
    let (_dir, daemon) = start("");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/sdk_export.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--grpc", daemon.otlp_grpc.as_ref().unwrap()])
        .args(["--http", daemon.otlp_http.as_ref().unwrap()])
        .output()
        .expect("python3 runs (scripts/test.sh installs the OpenTelemetry SDK)");
    assert!(
        output.status.success(),
        "the SDK exporter failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.logs()
    );
    let recorded: Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("the SDK recorded: {recorded}");

    let metrics = recorded["metrics"].as_object().unwrap();
    assert_eq!(metrics.len(), 4, "grpc/http × delta/cumulative");
    for (tenant, totals) in metrics {
        for (route, expected) in totals["requests"].as_object().unwrap() {
            let result = query(
                &client(),
                &daemon,
                "requests",
                &format!("subject={tenant}&groupBy=route&filterGroupBy[route]={route}"),
            )
            .await;
            assert_eq!(
                sum_rows(&result),
                expected.as_i64().unwrap(),
                "{tenant} requests {route}"
            );
        }
        let exact = |name: &str| Decimal::from_str(&totals[name].to_string().replace('"', "")).unwrap();
        assert_eq!(
            value(&daemon, "queue_net", tenant).await,
            exact("queue_net"),
            "{tenant} queue_net"
        );
        if totals.get("queue_level").is_some() {
            assert_eq!(
                value(&daemon, "queue_level", tenant).await,
                exact("queue_level"),
                "{tenant}"
            );
        }
        assert_eq!(
            value(&daemon, "storage_peak", tenant).await,
            exact("storage_peak"),
            "{tenant}"
        );
        assert_eq!(
            value(&daemon, "storage_latest", tenant).await,
            exact("storage_latest"),
            "{tenant}"
        );
        assert_eq!(
            total(&daemon, "request_count", tenant).await,
            totals["request_count"].as_i64().unwrap(),
            "{tenant}"
        );
        assert_eq!(
            value(&daemon, "request_seconds", tenant).await,
            exact("request_seconds"),
            "{tenant} request_seconds"
        );
    }
    let logs = recorded["logs"].as_object().unwrap();
    assert_eq!(logs.len(), 2);
    for (tenant, totals) in logs {
        assert_eq!(
            total(&daemon, "workflow_runs", tenant).await,
            totals["workflow_runs"].as_i64().unwrap(),
            "{tenant}"
        );
        // The duplicate record (same event.id) counted once.
        assert_eq!(
            total(&daemon, "workflow_count", tenant).await,
            totals["runs"].as_i64().unwrap(),
            "{tenant}"
        );
    }
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_points_are_reported_in_partial_success_and_dead_lettered() {
    let (dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let long_ago = now - 20 * 86_400 * 1_000_000_000;
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![
            sum_resource(
                Some("acme"),
                AggregationTemporality::Delta,
                vec![
                    point("/ok", now - 2_000_000_000, now, int(7)),
                    point(
                        "/nan",
                        now - 2_000_000_000,
                        now,
                        number_data_point::Value::AsDouble(f64::NAN),
                    ),
                    point("/negative", now - 2_000_000_000, now, int(-3)),
                    point("/old", long_ago - 1, long_ago, int(5)),
                    point(&"x".repeat(300), now - 2_000_000_000, now, int(1)),
                ],
            ),
            sum_resource(
                None,
                AggregationTemporality::Delta,
                vec![point("/ok", 1, now, int(9))],
            ),
        ],
    };
    let response = grpc.export(request).await.unwrap().into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 5, "{}", partial.error_message);
    for reason in [
        "NaN",
        "negative value on a monotonic sum",
        "max_lateness_secs",
        "more than 256",
        "`tenant.id` missing",
    ] {
        assert!(
            partial.error_message.contains(reason),
            "{reason}: {}",
            partial.error_message
        );
    }
    assert_eq!(total(&daemon, "requests", "acme").await, 7);
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    let reasons: BTreeMap<String, usize> = dead.iter().fold(BTreeMap::new(), |mut counts, line| {
        assert_eq!(line["source"], "otlp");
        *counts
            .entry(line["reason"].as_str().unwrap().to_string())
            .or_default() += 1;
        counts
    });
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("invalid".into(), 3),
            ("no_tenant".into(), 1),
            ("too_late".into(), 1)
        ])
    );
    let metrics = common::metrics_text(&client(), &daemon).await;
    assert!(
        metrics.contains(r#"tallyd_ingest_refused_total{source="otlp",reason="invalid"} 3"#),
        "{metrics}"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_exports_count_once_for_delta_and_cumulative() {
    let (_dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let start = now - 60_000_000_000;
    let delta = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("delta-co"),
            AggregationTemporality::Delta,
            vec![
                point("/a", start, now - 1_000_000_000, int(4)),
                point("/a", now - 1_000_000_000, now, int(6)),
            ],
        )],
    };
    let cumulative = |time: u64, value: i64| ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("cumulative-co"),
            AggregationTemporality::Cumulative,
            vec![point("/a", start, time, int(value))],
        )],
    };
    // A collector whose acknowledgement got lost re-sends; a cumulative stream is re-sent and
    // reordered (an older point after a newer one).
    for request in [
        delta.clone(),
        delta.clone(),
        cumulative(now - 3_000_000_000, 10),
        cumulative(now - 2_000_000_000, 25),
        cumulative(now - 2_000_000_000, 25),
        cumulative(now - 3_000_000_000, 10),
        cumulative(now - 1_000_000_000, 40),
    ] {
        let response = grpc.export(request).await.unwrap().into_inner();
        assert!(response.partial_success.is_none(), "{response:?}");
    }
    assert_eq!(total(&daemon, "requests", "delta-co").await, 10);
    assert_eq!(total(&daemon, "requests", "cumulative-co").await, 40);
    // The stream state survives a restart: the same points again add nothing, a newer one adds
    // only its increment, and a reset (new start time) counts from zero.
    let config = daemon.config_path.clone();
    daemon.stop();
    let daemon = Daemon::start(&config);
    let mut grpc = grpc_metrics(&daemon).await;
    grpc.export(delta).await.unwrap();
    grpc.export(cumulative(now - 1_000_000_000, 40)).await.unwrap();
    grpc.export(cumulative(now - 500_000_000, 45)).await.unwrap();
    let reset = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("cumulative-co"),
            AggregationTemporality::Cumulative,
            vec![point("/a", now - 100_000_000, now, int(3))],
        )],
    };
    grpc.export(reset).await.unwrap();
    assert_eq!(total(&daemon, "requests", "delta-co").await, 10);
    assert_eq!(total(&daemon, "requests", "cumulative-co").await, 48);
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn overloaded_ingest_answers_unavailable_and_retries_lose_nothing() {
    // A budget of one request in flight: concurrent exporters get UNAVAILABLE and retry.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), OTLP_METERS);
    edit_config(
        &config,
        "otlp_http_addr = \"127.0.0.1:0\"",
        "otlp_http_addr = \"127.0.0.1:0\"\nmax_body_bytes = 4096\ningest_budget_bytes = 4096",
    );
    let daemon = Daemon::start(&config);
    let address = format!("http://{}", daemon.otlp_grpc.as_ref().unwrap());
    let now = now_ns();
    let mut tasks = Vec::new();
    for exporter in 0..16u64 {
        let address = address.clone();
        tasks.push(tokio::spawn(async move {
            let mut grpc = MetricsServiceClient::connect(address).await.unwrap();
            let (mut sent, mut unavailable) = (0i64, 0u64);
            for batch in 0..20u64 {
                let points = (0..10u64)
                    .map(|i| {
                        let time = now - 1_000_000 * (exporter * 1000 + batch * 10 + i);
                        point(&format!("/e{exporter}"), time - 1, time, int(1 + i as i64))
                    })
                    .collect();
                let request = ExportMetricsServiceRequest {
                    resource_metrics: vec![sum_resource(Some("busy"), AggregationTemporality::Delta, points)],
                };
                sent += (1..=10).sum::<i64>();
                loop {
                    match grpc.export(request.clone()).await {
                        Ok(response) => {
                            assert!(response.into_inner().partial_success.is_none());
                            break;
                        }
                        Err(status) => {
                            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }
            (sent, unavailable)
        }));
    }
    let (mut sent, mut unavailable) = (0, 0);
    for task in tasks {
        let (s, u) = task.await.unwrap();
        sent += s;
        unavailable += u;
    }
    assert!(
        unavailable > 0,
        "the budget never ran out: the test did not exercise overload"
    );
    assert_eq!(total(&daemon, "requests", "busy").await, sent);
    daemon.stop();
}

/// Checkpoints behind (`aggregate.max_pending_series` unflushed series): an Export gets
/// UNAVAILABLE with RetryInfo, nothing of it counted; once a checkpoint drains the engine the
/// retry is accepted and counted once.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_behind_answer_unavailable_with_retry_info() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), OTLP_METERS);
    edit_config(
        &config,
        "flush_interval_ms = 100",
        "flush_interval_ms = 1500\nmax_pending_series = 3",
    );
    let daemon = Daemon::start(&config);
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let request = |first: u64| ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("lagging"),
            AggregationTemporality::Delta,
            (first..first + 5)
                .map(|i| point(&format!("/r{i}"), now - 2_000 - i, now - 1_000 - i, int(7)))
                .collect(),
        )],
    };
    // Start right after a checkpoint, so the next one is 1.5 s away.
    let checkpoints = async || {
        let text = common::metrics_text(&client(), &daemon).await;
        text.lines()
            .find_map(|line| line.strip_prefix("tallyd_flush_duration_seconds_count "))
            .map_or(0, |count| count.trim().parse::<u64>().unwrap())
    };
    let before = checkpoints().await;
    common::eventually("a checkpoint", async || {
        (checkpoints().await > before).then_some(())
    })
    .await;
    let response = grpc.export(request(0)).await.unwrap().into_inner();
    assert!(response.partial_success.is_none());
    let status = grpc.export(request(5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("max_pending_series"), "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo detail");
    assert!(retry.retry_delay.is_some_and(|delay| delay > Duration::ZERO));
    common::eventually("the retry to be accepted", async || {
        grpc.clone().export(request(5)).await.ok().map(|_| ())
    })
    .await;
    assert_eq!(total(&daemon, "requests", "lagging").await, 70);
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_invalid_argument_and_400() {
    let (_dir, daemon) = start("");
    // gRPC: a frame whose bytes are not an ExportMetricsServiceRequest.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.otlp_grpc.as_ref().unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(vec![0xff, 0xff, 0xff, 0x01, 0x02]),
            "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
                .parse()
                .unwrap(),
            raw::RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // HTTP: garbage protobuf → 400 with a google.rpc.Status body; unsupported type → 415.
    let http = client();
    let url = format!("http://{}/v1/metrics", daemon.otlp_http.as_ref().unwrap());
    let response = http
        .post(&url)
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff, 0xff, 0xff, 0x01])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let status = tonic_types::pb::Status::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(status.code, tonic::Code::InvalidArgument as i32);
    assert!(
        status.message.contains("not an OTLP metrics export request"),
        "{}",
        status.message
    );
    let response = http
        .post(&url)
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_http_takes_json_and_gzip() {
    let (_dir, daemon) = start("");
    let http = client();
    let base = format!("http://{}", daemon.otlp_http.as_ref().unwrap());
    let now = now_ns();
    // OTLP/JSON: camelCase names, 64-bit integers as strings, enums as numbers.
    let json = serde_json::json!({
        "resourceMetrics": [{
            "resource": {"attributes": [{"key": "tenant.id", "value": {"stringValue": "json-co"}}]},
            "scopeMetrics": [{"metrics": [{
                "name": "http.server.requests",
                "sum": {
                    "aggregationTemporality": 1,
                    "isMonotonic": true,
                    "dataPoints": [{
                        "attributes": [{"key": "http.route", "value": {"stringValue": "/j"}}],
                        "startTimeUnixNano": (now - 1_000_000_000).to_string(),
                        "timeUnixNano": now.to_string(),
                        "asInt": "12"
                    }]
                }
            }]}]
        }]
    });
    let response = http
        .post(format!("{base}/v1/metrics"))
        .header("content-type", "application/json")
        .body(json.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "{}",
        "a full success has no partialSuccess"
    );
    assert_eq!(total(&daemon, "requests", "json-co").await, 12);

    // Protobuf, gzip-compressed.
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("gzip-co"),
            AggregationTemporality::Delta,
            vec![point("/g", now - 1, now, int(5))],
        )],
    };
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut encoder, &request.encode_to_vec()).unwrap();
    let response = http
        .post(format!("{base}/v1/metrics"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse::decode(
        response.bytes().await.unwrap(),
    )
    .unwrap();
    assert!(body.partial_success.is_none());
    assert_eq!(total(&daemon, "requests", "gzip-co").await, 5);
    daemon.stop();
}

/// Inflation is capped by `max_body_bytes`: a small gzip body that inflates past it (a zip bomb)
/// is refused as too large after reading no more than the cap; a corrupt gzip body and an
/// encoding tallyd does not read are bad requests; the daemon keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn otlp_http_refuses_zip_bombs_corrupt_gzip_and_unknown_encodings() {
    let (_dir, daemon) = start("");
    // A fresh connection per request: the server answers a refused body before reading all of
    // it and then closes that connection (as HTTP allows), which a pooled client would reuse.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://{}/v1/metrics", daemon.otlp_http.as_ref().unwrap());
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    };
    // 64 MiB of zeros in ≈ 64 KiB: eight times the 8 MiB default cap.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 128 << 10, "{}", bomb.len());
    let post = |body: Vec<u8>, encoding: &'static str| {
        http.post(&url)
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", encoding)
            .body(body)
            .send()
    };
    let response = post(bomb, "gzip").await.unwrap();
    assert_eq!(response.status(), 413);
    let status = tonic_types::pb::Status::decode(response.bytes().await.unwrap()).unwrap();
    assert!(status.message.contains("max_body_bytes"), "{status:?}");
    let response = post(b"\x1f\x8b\x08\x00not gzip at all".to_vec(), "gzip")
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = post(b"anything".to_vec(), "br").await.unwrap();
    assert_eq!(response.status(), 400);
    let status = tonic_types::pb::Status::decode(response.bytes().await.unwrap()).unwrap();
    assert!(status.message.contains("content-encoding `br`"), "{status:?}");
    // Still serving: a valid gzip export counts.
    let now = now_ns();
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("after-bomb"),
            AggregationTemporality::Delta,
            vec![point("/g", now - 1, now, int(3))],
        )],
    };
    let response = post(gzip(&request.encode_to_vec()), "gzip").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(total(&daemon, "requests", "after-bomb").await, 3);
    daemon.stop();
}

/// The OpenTelemetry Python SDK's own exporters against `[[auth.keys]]`: without a key both
/// transports fail (401 / UNAUTHENTICATED, not retried), with a tenant's key both succeed and
/// their points count for that tenant (the data names none).
#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_exporters_need_a_key() {
    const KEY: &str = "sdk-acme-key-0f1e2d3c";
    let digest: String = sha2::Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let (_dir, daemon) = start(&format!(
        "[[auth.keys]]\nsha256 = \"{digest}\"\ntenant = \"acme\"\nscopes = [\"ingest\", \"read\"]\n"
    ));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/sdk_keys.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--grpc", daemon.otlp_grpc.as_ref().unwrap()])
        .args(["--http", daemon.otlp_http.as_ref().unwrap()])
        .args(["--key", KEY, "--value", "21"])
        .output()
        .expect("python3 runs (scripts/test.sh installs the OpenTelemetry SDK)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        results,
        json!({"grpc_without_key": "FAILURE", "grpc_with_key": "SUCCESS",
               "http_without_key": "FAILURE", "http_with_key": "SUCCESS"})
    );
    let response = client()
        .get(daemon.url("/api/v1/meters/requests/query"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(sum_rows(&body), 42, "{body}");
    assert!(body["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row["subject"] == "acme"));
    let metrics = metrics_text(&client(), &daemon).await;
    for listener in ["otlp_grpc", "otlp_http"] {
        assert!(
            metrics.contains(&format!(
                "tallyd_auth_failures_total{{listener=\"{listener}\",reason=\"missing_key\"}} 1"
            )),
            "{metrics}"
        );
    }
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_bind_points_to_their_tenant() {
    let (_dir, daemon) = start("[otlp.api_keys]\n\"acme-key-0123456789abcdef\" = \"acme\"\n");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let request = |tenant: Option<&str>, value: i64, offset: u64| ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            tenant,
            AggregationTemporality::Delta,
            vec![point("/k", now - offset - 1, now - offset, int(value))],
        )],
    };
    let status = grpc.export(request(Some("acme"), 1, 0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let with_key = |request: ExportMetricsServiceRequest, key: &str| {
        let mut request = tonic::Request::new(request);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    };
    let status = grpc
        .export(with_key(
            request(Some("acme"), 1, 0),
            "wrong-key-0123456789abcdef",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // No tenant attribute: the key's tenant. Another tenant's attribute: refused.
    let key = "acme-key-0123456789abcdef";
    grpc.export(with_key(request(None, 3, 1), key)).await.unwrap();
    grpc.export(with_key(request(Some("acme"), 4, 2), key))
        .await
        .unwrap();
    let response = grpc
        .export(with_key(request(Some("globex"), 100, 3), key))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.unwrap();
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("another tenant"),
        "{}",
        partial.error_message
    );
    assert_eq!(total(&daemon, "requests", "acme").await, 7);
    assert_eq!(total(&daemon, "requests", "globex").await, 0);
    // Logs need the key too.
    let mut logs = LogsServiceClient::connect(format!("http://{}", daemon.otlp_grpc.as_ref().unwrap()))
        .await
        .unwrap();
    let status = logs
        .export(opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    daemon.stop();
}

/// A pass-through codec for sending bytes that are not a valid message.
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Clone, Copy, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, buffer: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            buffer.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let mut out = vec![0; buffer.remaining()];
            buffer.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }
}

fn gauge_request(tenant: &str, time_ns: u64, value: i64) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_attribute("tenant.id", tenant)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "storage.used".into(),
                    data: Some(metric::Data::Gauge(
                        opentelemetry_proto::tonic::metrics::v1::Gauge {
                            data_points: vec![NumberDataPoint {
                                time_unix_nano: time_ns,
                                value: Some(int(value)),
                                ..Default::default()
                            }],
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gauges_integrate_into_gb_hours_across_windows_and_restarts() {
    let (_dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let second = 1_000_000_000u64;
    // A minute boundary ten minutes ago.
    let t0 = (now_ns() / (60 * second) - 10) * 60 * second;
    grpc.export(gauge_request("tw-co", t0, 10)).await.unwrap();
    grpc.export(gauge_request("tw-co", t0 + 30 * second, 20))
        .await
        .unwrap();
    // The stream's last point survives a restart.
    let config = daemon.config_path.clone();
    daemon.stop();
    let daemon = Daemon::start(&config);
    let mut grpc = grpc_metrics(&daemon).await;
    grpc.export(gauge_request("tw-co", t0 + 90 * second, 5))
        .await
        .unwrap();
    grpc.export(gauge_request("tw-co", t0 + 90 * second, 5))
        .await
        .unwrap(); // a retry
    grpc.export(gauge_request("tw-co", t0 + 60 * second, 99))
        .await
        .unwrap(); // out of order
    grpc.export(gauge_request("tw-co", t0 + 100 * second, 0))
        .await
        .unwrap();
    // 10 GB × 30 s + 20 GB × 60 s + 5 GB × 10 s = 1550 GB·s = 0.4305… GB·h.
    assert_eq!(
        value(&daemon, "storage_gb_hours", "tw-co").await,
        Decimal::from_str("0.431").unwrap()
    );
    let per_minute = query(
        &client(),
        &daemon,
        "storage_gb_hours",
        "subject=tw-co&windowSize=MINUTE",
    )
    .await;
    let values: Vec<String> = per_minute["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["value"].to_string())
        .collect();
    // 900 GB·s in the first minute, 650 GB·s in the second.
    assert_eq!(values, vec!["0.25", "0.181"], "{per_minute}");
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn histograms_feed_distributions_with_percentiles() {
    use opentelemetry_proto::tonic::metrics::v1::{Histogram, HistogramDataPoint};
    let (_dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let histogram = |time: u64, counts: Vec<u64>| ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![string_attribute("tenant.id", "dist-co")],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "latency.dist".into(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            start_time_unix_nano: time - 1_000_000_000,
                            time_unix_nano: time,
                            count: counts.iter().sum(),
                            explicit_bounds: vec![0.1, 0.5, 1.0, 5.0],
                            bucket_counts: counts,
                            min: Some(0.01),
                            max: Some(4.0),
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Delta as i32,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    // Buckets are taken at their midpoints: 0.055 (from min), 0.3, 0.75, 3. Ranked, the 200
    // observations are 10 × 0.055, 50 × 0.3, 30 × 0.75, 110 × 3.
    let first = histogram(now - 2_000_000_000, vec![10, 50, 30, 10, 0]);
    grpc.export(first.clone()).await.unwrap();
    grpc.export(first).await.unwrap(); // a retry counts once
    grpc.export(histogram(now, vec![0, 0, 0, 100, 0])).await.unwrap();
    let result = query(
        &client(),
        &daemon,
        "latency",
        "subject=dist-co&percentiles=25,40,99",
    )
    .await;
    let row = &result["data"][0];
    assert_eq!(row["value"], 200, "{result}");
    let near = |name: &str, expected: f64| {
        let actual = row["percentiles"][name].as_f64().unwrap();
        assert!(
            (actual - expected).abs() / expected < 0.01,
            "{name}: {actual} vs {expected}: {result}"
        );
    };
    near("p25", 0.3);
    near("p40", 0.75);
    near("p99", 3.0);
    // Cumulative histograms: each bucket's count is differenced per stream (retries and
    // stale points add nothing).
    let cumulative = |time: u64, counts: Vec<u64>| {
        let mut request = histogram(time, counts);
        let resource = &mut request.resource_metrics[0];
        resource.resource.as_mut().unwrap().attributes = vec![string_attribute("tenant.id", "cumdist-co")];
        if let Some(metric::Data::Histogram(histogram)) = &mut resource.scope_metrics[0].metrics[0].data {
            histogram.aggregation_temporality = AggregationTemporality::Cumulative as i32;
            histogram.data_points[0].start_time_unix_nano = now - 60_000_000_000;
        }
        request
    };
    for request in [
        cumulative(now - 3_000_000_000, vec![1, 2, 0, 0, 0]),
        cumulative(now - 2_000_000_000, vec![3, 2, 4, 0, 0]),
        cumulative(now - 2_000_000_000, vec![3, 2, 4, 0, 0]),
        cumulative(now - 3_000_000_000, vec![1, 2, 0, 0, 0]),
        cumulative(now - 1_000_000_000, vec![3, 5, 4, 1, 0]),
    ] {
        let response = grpc.export(request).await.unwrap().into_inner();
        assert!(response.partial_success.is_none(), "{response:?}");
    }
    let result = query(
        &client(),
        &daemon,
        "latency",
        "subject=cumdist-co&percentiles=10,50,90",
    )
    .await;
    let row = &result["data"][0];
    // 3 × 0.055, 5 × 0.3, 4 × 0.75, 1 × 3: the last point's buckets.
    assert_eq!(row["value"], 13, "{result}");
    let near = |name: &str, expected: f64| {
        let actual = row["percentiles"][name].as_f64().unwrap();
        assert!(
            (actual - expected).abs() / expected < 0.01,
            "{name}: {actual} vs {expected}: {result}"
        );
    };
    near("p10", 0.055);
    near("p50", 0.3);
    near("p90", 0.75);

    // Cumulative exponential histograms, with the SDK halving the resolution between points
    // (scale 5 → 4: bucket pairs merge): counts stay exact, percentiles within a canonical
    // bucket (±9 %).
    let exponential = |time: u64, scale: i32, offset: i32, counts: Vec<u64>| {
        use opentelemetry_proto::tonic::metrics::v1::{
            exponential_histogram_data_point::Buckets, ExponentialHistogram, ExponentialHistogramDataPoint,
        };
        let mut request = histogram(time, vec![]);
        let resource = &mut request.resource_metrics[0];
        resource.resource.as_mut().unwrap().attributes = vec![string_attribute("tenant.id", "expdist-co")];
        resource.scope_metrics[0].metrics[0].data =
            Some(metric::Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![ExponentialHistogramDataPoint {
                    start_time_unix_nano: now - 60_000_000_000,
                    time_unix_nano: time,
                    count: counts.iter().sum(),
                    scale,
                    positive: Some(Buckets {
                        offset,
                        bucket_counts: counts,
                    }),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            }));
        request
    };
    // Scale 5: base 2^(1/32); index 32 is [2, 2.04), index 64 is [4, 4.09). 10 values near 2.
    grpc.export(exponential(now - 2_000_000_000, 5, 32, vec![10]))
        .await
        .unwrap();
    // Then 20 near 4 arrive and the SDK rescales to 4 (index 16 = [2, 2.09), 32 = [4, 4.18)).
    let mut counts = vec![0u64; 17];
    counts[0] = 10;
    counts[16] = 20;
    let response = grpc
        .export(exponential(now - 1_000_000_000, 4, 16, counts))
        .await
        .unwrap()
        .into_inner();
    assert!(response.partial_success.is_none(), "{response:?}");
    let result = query(
        &client(),
        &daemon,
        "latency",
        "subject=expdist-co&percentiles=20,90",
    )
    .await;
    let row = &result["data"][0];
    assert_eq!(row["value"], 30, "{result}");
    for (name, expected) in [("p20", 2.0), ("p90", 4.0)] {
        let actual = row["percentiles"][name].as_f64().unwrap();
        assert!(
            (actual - expected).abs() / expected < 0.1,
            "{name}: {actual} vs {expected}: {result}"
        );
    }
    // Bad percentiles are named.
    let response = client()
        .get(daemon.url("/api/v1/meters/latency/query?percentiles=0,150"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    daemon.stop();
}

/// Round `round` of an exporter: every stream's cumulative value, and fresh delta points.
fn crash_round(round: u64, start_ns: u64) -> (ExportMetricsServiceRequest, ExportMetricsServiceRequest) {
    let time = start_ns + (round + 1) * 1_000_000_000;
    let cumulative = (0..10)
        .map(|stream| {
            point(
                &format!("/s{stream}"),
                start_ns,
                time,
                int(((round + 1) * (stream + 1)) as i64),
            )
        })
        .collect();
    let delta = (0..10)
        .map(|stream| {
            point(
                &format!("/d{stream}"),
                time - 1_000_000_000,
                time,
                int((round + stream) as i64),
            )
        })
        .collect();
    (
        ExportMetricsServiceRequest {
            resource_metrics: vec![sum_resource(
                Some("crashy"),
                AggregationTemporality::Cumulative,
                cumulative,
            )],
        },
        ExportMetricsServiceRequest {
            resource_metrics: vec![sum_resource(Some("crashy"), AggregationTemporality::Delta, delta)],
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_export_then_resend_everything_gives_exact_totals() {
    const ROUNDS: u64 = 600;
    let (_dir, daemon) = start("");
    let address = format!("http://{}", daemon.otlp_grpc.as_ref().unwrap());
    // Minutes back, so that the resent rounds are still within the acceptance window.
    let start_ns = now_ns() - 600 * 1_000_000_000;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let Ok(mut grpc) = MetricsServiceClient::connect(address).await else {
                return;
            };
            for round in 0..ROUNDS {
                let (cumulative, delta) = crash_round(round, start_ns);
                if grpc.export(cumulative).await.is_err() || grpc.export(delta).await.is_err() {
                    return;
                }
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    while acked.load(std::sync::atomic::Ordering::SeqCst) < ROUNDS / 2 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let config = daemon.config_path.clone();
    daemon.kill();
    let _ = sender.await;
    let acked = acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(acked < ROUNDS, "the kill landed after the last export");

    let daemon = Daemon::start(&config);
    // Everything acknowledged survived: each stream holds at least its acked cumulative value.
    let recovered = total(&daemon, "requests", "crashy").await;
    let cumulative_at = |rounds: u64| (1..=10).map(|stream| (rounds * stream) as i64).sum::<i64>();
    let delta_upto = |rounds: u64| {
        (0..rounds)
            .map(|round| (0..10).map(|s| (round + s) as i64).sum::<i64>())
            .sum::<i64>()
    };
    assert!(
        recovered >= cumulative_at(acked) + delta_upto(acked),
        "acknowledged {acked} rounds, recovered only {recovered}"
    );
    // The exporter re-sends everything, as a collector with a persistent queue would.
    let mut grpc = grpc_metrics(&daemon).await;
    for round in 0..ROUNDS {
        let (cumulative, delta) = crash_round(round, start_ns);
        grpc.export(cumulative).await.unwrap();
        grpc.export(delta).await.unwrap();
    }
    assert_eq!(
        total(&daemon, "requests", "crashy").await,
        cumulative_at(ROUNDS) + delta_upto(ROUNDS),
        "killed after {acked} of {ROUNDS} rounds acknowledged"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listeners_serve_the_python_sdk_over_grpc_and_https() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "[otlp.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let config = write_config(dir.path(), &format!("{tls}\n{OTLP_METERS}"));
    let daemon = Daemon::start(&config);
    let port = |addr: &Option<String>| addr.as_ref().unwrap().rsplit(':').next().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/tls_export.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--grpc", &format!("localhost:{}", port(&daemon.otlp_grpc))])
        .args(["--http", &format!("localhost:{}", port(&daemon.otlp_http))])
        .arg("--ca")
        .arg(&cert)
        // requests lets these override the exporter's own `certificate_file`.
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the TLS exporter failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.logs()
    );
    let recorded: Value = serde_json::from_slice(&output.stdout).unwrap();
    for (tenant, expected) in recorded.as_object().unwrap() {
        assert_eq!(
            total(&daemon, "requests", tenant).await,
            expected.as_i64().unwrap(),
            "{tenant}"
        );
    }
    // Plain HTTP to the TLS port is not served.
    let plain = client()
        .post(format!(
            "http://{}/v1/metrics",
            daemon.otlp_http.as_ref().unwrap()
        ))
        .header("content-type", "application/x-protobuf")
        .body(Vec::new())
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    daemon.stop();
}

/// mTLS on both OTLP listeners (`otlp.tls.client_ca_path`), with the OpenTelemetry Python SDK's
/// exporters: a client certificate listed in `[[auth.certificates]]` names the tenant its points
/// count for (the data names none), a listed-nowhere certificate and no certificate are
/// refused (UNAUTHENTICATED / 401, nothing counted). Then the server certificate is renewed on
/// disk: OTLP/gRPC serves the new one from a later handshake on, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn otlp_client_certificates_name_the_tenant_and_a_renewed_certificate_is_served() {
    use common::pki::{server_pair, write, Authority};
    const OPS: &str = "ops-read-key-5e6f7a8b";
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new("collectors");
    ca.issue_client(dir.path(), "acme-collector", "acme");
    ca.issue_client(dir.path(), "unlisted-collector", "unlisted");
    let client_ca = write(dir.path(), "collectors-ca.pem", &ca.pem());
    let (first_cert, first_key) = server_pair();
    write(dir.path(), "first.ca.pem", &first_cert);
    let cert = write(dir.path(), "server.crt", &first_cert);
    let key = write(dir.path(), "server.key", &first_key);
    let digest: String = sha2::Sha256::digest(OPS.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let extra = format!(
        "[otlp.tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\nclient_ca_path = \"{}\"\n\
         [[auth.certificates]]\ncommon_name = \"acme-collector\"\ntenant = \"acme\"\nscopes = [\"ingest\"]\n\
         [[auth.keys]]\nsha256 = \"{digest}\"\ntenant = \"*\"\nscopes = [\"read\"]\n",
        cert.display(),
        key.display(),
        client_ca.display()
    );
    let (_config_dir, daemon) = start(&extra);
    let port = |addr: &Option<String>| addr.as_ref().unwrap().rsplit(':').next().unwrap().to_string();
    let export = |ca: &str, certificate: Option<&str>, value: i64| -> Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/mtls_export.py");
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--grpc", &format!("localhost:{}", port(&daemon.otlp_grpc))])
            .args(["--http", &format!("localhost:{}", port(&daemon.otlp_http))])
            .arg("--ca")
            .arg(dir.path().join(format!("{ca}.ca.pem")))
            .args(["--value", &value.to_string()])
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE");
        if let Some(name) = certificate {
            command.arg("--cert").arg(dir.path().join(name));
        }
        let output = command.output().expect("python3 runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let acme_total = async || {
        let response = client()
            .get(daemon.url("/api/v1/meters/requests/query?subject=acme"))
            .bearer_auth(OPS)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        sum_rows(&response.json().await.unwrap())
    };
    let both = |result: &str| json!({"grpc": result, "http": result});
    assert_eq!(export("first", Some("acme"), 5), both("SUCCESS"));
    assert_eq!(export("first", Some("unlisted"), 100), both("FAILURE"));
    assert_eq!(export("first", None, 1000), both("FAILURE"));
    assert_eq!(acme_total().await, 10);
    let metrics = metrics_text(&client(), &daemon).await;
    for listener in ["otlp_grpc", "otlp_http"] {
        for reason in ["missing_key", "unknown_key"] {
            let line = format!("tallyd_auth_failures_total{{listener=\"{listener}\",reason=\"{reason}\"}} 1");
            assert!(metrics.contains(&line), "{line}\n{metrics}");
        }
    }
    // Renewal: from a handshake after the recheck on, clients trusting only the new pair get in
    // (the exporter retries a failed handshake within its timeout).
    let (second_cert, second_key) = server_pair();
    write(dir.path(), "second.ca.pem", &second_cert);
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&key, &second_key).unwrap();
    std::fs::write(&cert, &second_cert).unwrap();
    assert_eq!(export("second", Some("acme"), 7), both("SUCCESS"));
    assert_eq!(acme_total().await, 24);
    assert!(
        daemon.logs().contains("TLS certificate reloaded"),
        "{}",
        daemon.logs()
    );
    daemon.stop();
}

/// Limits on OTLP. Over a rate limit the OpenTelemetry Python SDK's exporters get
/// RESOURCE_EXHAUSTED with RetryInfo (gRPC) / 429 with Retry-After (HTTP), wait, retry and
/// succeed: everything counts once. Over a hard quota, points are rejected in
/// `partial_success` with a message naming the tenant, the meter and when the quota resets;
/// the call itself succeeds (no RetryInfo: a collector must not retry for days).
#[tokio::test(flavor = "multi_thread")]
async fn limits_answer_otlp_exporters_with_retry_info_or_partial_success() {
    let plans = r#"
[[plans]]
id = "metered"
currency = "USD"
[[plans.limits]]
meter = "requests"
kind = "rate"
limit = 10
per = "second"
[[plans]]
id = "capped"
currency = "USD"
[[plans.limits]]
meter = "requests"
kind = "quota"
limit = 20
[[tenants]]
id = "acme"
plan = "metered"
[[tenants]]
id = "capped"
plan = "capped"
"#;
    let (_dir, daemon) = start(plans);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp/sdk_limits.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--grpc", daemon.otlp_grpc.as_ref().unwrap()])
        .args(["--http", daemon.otlp_http.as_ref().unwrap()])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    for transport in ["grpc", "http"] {
        let result = &results[transport];
        assert_eq!(
            (result["first"].as_str(), result["second"].as_str()),
            (Some("SUCCESS"), Some("SUCCESS")),
            "{results}"
        );
        // The second export waited for the RetryInfo / Retry-After delay (1 s) and retried.
        assert!(result["second_secs"].as_f64().unwrap() >= 0.9, "{results}");
    }
    assert_eq!(total(&daemon, "requests", "acme").await, 30);
    let metrics = metrics_text(&client(), &daemon).await;
    assert!(
        metrics.contains("tallyd_limit_decisions_total{kind=\"rate\",outcome=\"refused\"} 2"),
        "{metrics}"
    );
    // What the exporters were told: RESOURCE_EXHAUSTED with RetryInfo both in the status
    // details and as the `google.rpc.retryinfo-bin` trailer.
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let export_for = |tenant: &str, value: i64, offset: u64| ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some(tenant),
            AggregationTemporality::Delta,
            vec![point("/q", now - offset - 1, now - offset, int(value))],
        )],
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    grpc.export(export_for("acme", 10, 4)).await.unwrap();
    let status = grpc.export(export_for("acme", 5, 3)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    use tonic_types::StatusExt;
    let retry = status.get_details_retry_info().expect("RetryInfo in the details");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
    assert!(status.metadata().get_bin("google.rpc.retryinfo-bin").is_some());
    assert_eq!(total(&daemon, "requests", "acme").await, 40);
    // The quota: 15 fit, the next 10 do not.
    let export = |value: i64, offset: u64| export_for("capped", value, offset);
    let first = grpc.export(export(15, 2)).await.unwrap().into_inner();
    assert!(first.partial_success.is_none(), "{first:?}");
    let second = grpc.export(export(10, 1)).await.unwrap().into_inner();
    let partial = second
        .partial_success
        .expect("the point over the quota is rejected");
    assert_eq!(partial.rejected_data_points, 1);
    for expected in ["quota_exceeded", "tenant `capped`", "`requests`", "resets at"] {
        assert!(
            partial.error_message.contains(expected),
            "{expected}: {}",
            partial.error_message
        );
    }
    assert_eq!(total(&daemon, "requests", "capped").await, 15);
    daemon.stop();
}

/// An exporter sends its concurrent exports (≈ 70 kB per 1,000 points) over one HTTP/2
/// connection; with h2's default 64 KiB windows they queued behind window updates and the
/// daemon sat half idle (BENCHMARKS.md, "OTLP ingest"). A raw h2 client checks what the listener grants:
/// two streams each get the whole per-stream window at once, which a 64 KiB connection
/// window would not allow.
#[tokio::test(flavor = "multi_thread")]
async fn otlp_grpc_grants_large_http2_windows() {
    use tallyd::ingest::otlp::grpc::{
        Metrics, SignalService, H2_CONNECTION_WINDOW_BYTES, H2_STREAM_WINDOW_BYTES,
    };
    use tonic::codegen::http;
    let (_dir, daemon) = start("");
    let address = daemon.otlp_grpc.clone().unwrap();
    let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .max_send_buffer_size(2 * H2_CONNECTION_WINDOW_BYTES as usize)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let want = H2_STREAM_WINDOW_BYTES as usize;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let request = http::Request::post(format!("http://{address}{}", Metrics::PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let mut ready = client.clone().ready().await.unwrap();
        let (_response, mut stream) = ready.send_request(request, false).unwrap();
        stream.reserve_capacity(want);
        streams.push(stream);
    }
    for stream in &mut streams {
        // Capacity grows as the server's SETTINGS and WINDOW_UPDATE frames arrive.
        let granted = tokio::time::timeout(Duration::from_secs(10), async {
            while stream.capacity() < want {
                if std::future::poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .is_none()
                {
                    break;
                }
            }
            stream.capacity()
        })
        .await
        .unwrap_or_else(|_| stream.capacity());
        assert_eq!(granted, want, "send capacity granted by the OTLP/gRPC listener");
    }
}

/// A value beyond the representable range (24 significant digits at the meter's scale) is
/// refused per point with reason `overflow`, before it is acknowledged, and nothing fails
/// later: checkpoints keep succeeding and other points count. Before the range, two DELTA sums
/// of 9.9e37 were both accepted and every later checkpoint failed for every tenant.
#[tokio::test(flavor = "multi_thread")]
async fn values_beyond_the_range_are_refused_as_overflow_and_checkpoints_go_on() {
    let (dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let huge = number_data_point::Value::AsDouble(9.9e37);
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("big"),
            AggregationTemporality::Delta,
            vec![
                point("/huge", now - 2_000_000, now - 1_000_000, huge),
                point("/huge", now - 1_000_000, now, huge),
                point(
                    "/int",
                    now - 3_000_000,
                    now - 2_000_000,
                    int(1_000_000_000_000_000_000),
                ),
                point("/ok", now - 5_000_000, now - 4_000_000, int(11)),
            ],
        )],
    };
    let response = grpc.export(request).await.unwrap().into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 2, "{}", partial.error_message);
    assert!(
        partial.error_message.contains("out of range"),
        "{}",
        partial.error_message
    );
    // 10^18 at scale 0 has 19 digits: in range, counted.
    assert_eq!(total(&daemon, "requests", "big").await, 1_000_000_000_000_000_011);
    let dead = read_jsonl(&dir.path().join("data/dead-letter.jsonl"));
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|line| line["reason"] == "overflow"), "{dead:?}");
    // Checkpoints still succeed (every flush would have failed with the sum in the engine).
    let client = client();
    let metrics = common::eventually("a checkpoint after the refusal", async || {
        let text = common::metrics_text(&client, &daemon).await;
        text.contains("tallyd_checkpoint_series_total").then_some(text)
    })
    .await;
    assert!(!metrics.contains("tallyd_checkpoint_failures_total"), "{metrics}");
    assert!(
        metrics.contains(r#"tallyd_ingest_refused_total{source="otlp",reason="overflow"} 2"#),
        "{metrics}"
    );
    let ready = client.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    daemon.stop();
}

/// The hostile-input catalogue for OTLP points: infinities, 1 MB attribute values, times in
/// 1970 and 2300 are each refused alone with a reason in the partial success (dead-lettered),
/// the point beside them counts, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_points_are_refused_one_by_one_and_the_rest_counts() {
    let (_dir, daemon) = start("");
    let mut grpc = grpc_metrics(&daemon).await;
    let now = now_ns();
    let year_2300 = 10_413_792_000u64 * 1_000_000_000;
    let request = ExportMetricsServiceRequest {
        resource_metrics: vec![sum_resource(
            Some("hostile"),
            AggregationTemporality::Delta,
            vec![
                point(
                    "/inf",
                    now - 2_000,
                    now - 1_000,
                    number_data_point::Value::AsDouble(f64::INFINITY),
                ),
                point(
                    "/-inf",
                    now - 4_000,
                    now - 3_000,
                    number_data_point::Value::AsDouble(f64::NEG_INFINITY),
                ),
                point(&"y".repeat(1 << 20), now - 6_000, now - 5_000, int(1)),
                point("/1970", 1_000_000_000, 2_000_000_000, int(1)),
                point("/2300", year_2300 - 1, year_2300, int(1)),
                point("/ok", now - 8_000, now - 7_000, int(4)),
            ],
        )],
    };
    let response = grpc.export(request).await.unwrap().into_inner();
    let partial = response.partial_success.expect("partial success");
    assert_eq!(partial.rejected_data_points, 5, "{}", partial.error_message);
    for reason in [
        "NaN or infinite",
        "more than 256",
        "max_lateness_secs",
        "max_future_secs",
    ] {
        assert!(
            partial.error_message.contains(reason),
            "{reason}: {}",
            partial.error_message
        );
    }
    assert_eq!(total(&daemon, "requests", "hostile").await, 4);
    daemon.stop();
}
