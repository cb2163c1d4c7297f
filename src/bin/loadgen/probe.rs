//! Event-to-queryable probes beside the load.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;

use crate::*;

/// Event-to-queryable figures of one run.
pub(crate) struct Probes {
    pub(crate) latency: Histogram<u64>,
    pub(crate) sent: u64,
    pub(crate) timeouts: u64,
    pub(crate) errors: u64,
}

impl Probes {
    pub(crate) fn summary(&self) -> serde_json::Value {
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
pub(crate) async fn probe(mut target: Target, args: Args, deadline: Instant) -> anyhow::Result<Probes> {
    use opentelemetry_proto::tonic::metrics::v1::{number_data_point, NumberDataPoint};
    let tenant = format!("probe-{}-{}", args.seed, chrono::Utc::now().timestamp_millis());
    let meter = match target {
        Target::Http { .. } => "api_calls",
        Target::OtlpGrpc(_) | Target::OtlpHttp { .. } => "requests",
        Target::Rls(_) => anyhow::bail!("probes measure usage ingest: not with --rls"),
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
            Target::Rls(_) => anyhow::bail!("probes measure usage ingest: not with --rls"),
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
