//! OTLP edges: `MetricsService/Export` and `LogsService/Export` over gRPC (tonic) and OTLP/HTTP
//! (`POST /v1/metrics`, `/v1/logs`; protobuf or JSON; gzip), so an unmodified OpenTelemetry
//! Collector (`otlp` / `otlphttp` exporter) or SDK can export usage to tallyd.
//!
//! Both transports hand the request bytes to one path (`OtlpIngest::accept`): decode (off the
//! async executor), authenticate the tenant, map points to meter updates (`map`), dedup, and
//! commit through the same ingest log as HTTP CloudEvents; the answer is sent only once the
//! accepted points are durable. Refused points are counted in `partial_success` with a message
//! naming the reasons, and dead-lettered. Overload and shutdown answer UNAVAILABLE (HTTP 503)
//! with a retry delay, so collectors retry without losing data; retries count once (dedup per
//! point, cumulative streams by position).
//!
//! Must not: block the executor (decoding and mapping run in `spawn_blocking`).

pub mod forward;
pub mod grpc;
pub mod http;
pub mod map;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use serde_json::json;

use super::admission::{
    dead_letter_line, received_at, Admission, Admitted, Countable, Forward, Prepared, Source, Tally,
};
use super::error::IngestError;
use crate::aggregate::{MergeError, PreAggregated};
use crate::state::Shared;
use crate::telemetry;
use map::{MapContext, Mapped, MappedPoint};

pub use crate::ingest::tls::TlsIdentity;
pub use http::serve_http;

const SOURCE: Source = Source::Otlp;

/// The two OTLP signals tallyd reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Logs,
}

impl Signal {
    fn noun(self) -> &'static str {
        match self {
            Signal::Metrics => "data points",
            Signal::Logs => "log records",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }
}

/// How the request body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

/// An accepted request: how many points were rejected, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub rejected: i64,
    pub message: String,
}

impl Outcome {
    fn metrics_response(&self) -> ExportMetricsServiceResponse {
        ExportMetricsServiceResponse {
            partial_success: (self.rejected > 0).then(|| ExportMetricsPartialSuccess {
                rejected_data_points: self.rejected,
                error_message: self.message.clone(),
            }),
        }
    }

    fn logs_response(&self) -> ExportLogsServiceResponse {
        ExportLogsServiceResponse {
            partial_success: (self.rejected > 0).then(|| ExportLogsPartialSuccess {
                rejected_log_records: self.rejected,
                error_message: self.message.clone(),
            }),
        }
    }

    /// The response message, encoded like the request.
    pub fn encode(&self, signal: Signal, encoding: Encoding) -> Vec<u8> {
        match (signal, encoding) {
            (Signal::Metrics, Encoding::Protobuf) => Ok(self.metrics_response().encode_to_vec()),
            (Signal::Logs, Encoding::Protobuf) => Ok(self.logs_response().encode_to_vec()),
            // Proto3 JSON omits unset fields: a full success is `{}`.
            (Signal::Metrics, Encoding::Json) => {
                serde_json::to_value(self.metrics_response()).map(without_nulls)
            }
            (Signal::Logs, Encoding::Json) => serde_json::to_value(self.logs_response()).map(without_nulls),
        }
        .unwrap_or_else(|error| unreachable!("invariant: responses serialize: {error}"))
    }
}

fn without_nulls(mut value: serde_json::Value) -> Vec<u8> {
    if let serde_json::Value::Object(fields) = &mut value {
        fields.retain(|_, field| !field.is_null());
    }
    serde_json::to_vec(&value).expect("invariant: JSON values serialize")
}

/// A decoded export request.
enum Request {
    Metrics(ExportMetricsServiceRequest),
    Logs(ExportLogsServiceRequest),
}

fn decode(signal: Signal, encoding: Encoding, body: &[u8]) -> Result<Request, IngestError> {
    let invalid = |error: String| {
        IngestError::invalid(format!(
            "body is not an OTLP {} export request: {error}",
            signal.as_str()
        ))
    };
    match (signal, encoding) {
        (Signal::Metrics, Encoding::Protobuf) => ExportMetricsServiceRequest::decode(body)
            .map(Request::Metrics)
            .map_err(|error| invalid(error.to_string())),
        (Signal::Logs, Encoding::Protobuf) => ExportLogsServiceRequest::decode(body)
            .map(Request::Logs)
            .map_err(|error| invalid(error.to_string())),
        (Signal::Metrics, Encoding::Json) => serde_json::from_slice(body)
            .map(Request::Metrics)
            .map_err(|error| invalid(error.to_string())),
        (Signal::Logs, Encoding::Json) => serde_json::from_slice(body)
            .map(Request::Logs)
            .map_err(|error| invalid(error.to_string())),
    }
}

impl crate::state::limits::Contributes for MappedPoint {
    fn contributions(&self, each: &mut dyn FnMut(crate::model::SeriesKey, i128)) {
        crate::state::limits::state_contributions(&self.updates, each);
    }
}

impl Countable for MappedPoint {
    fn dedup_key(&self) -> Option<u128> {
        self.dedup_key
    }

    fn is_late(&self) -> bool {
        self.late
    }

    fn fold_into(&self, batch: &mut PreAggregated) -> Result<(), MergeError> {
        self.updates
            .iter()
            .try_for_each(|(key, state)| batch.merge_state(*key, state))
    }
}

/// The OTLP front end shared by the gRPC and HTTP transports.
#[derive(Clone)]
pub struct OtlpIngest {
    pub admission: Admission,
}

impl OtlpIngest {
    /// The tenant an `ingest` key stands for (`crate::auth`); `None` for an operator key or
    /// when no keys are configured (points name their tenant by resource attribute).
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
        peer: Option<&crate::auth::PeerCertificate>,
        listener: &'static str,
    ) -> Result<Option<String>, IngestError> {
        self.admission
            .shared
            .keys
            .current()
            .authenticate_presented(
                crate::auth::Surface::Otlp,
                authorization,
                api_key,
                peer,
                crate::auth::Scope::Ingest,
            )
            .map(|principal| principal.tenant)
            .map_err(|error| {
                error.record(listener);
                IngestError::from(error)
            })
    }

    /// The whole path for one request body; answers once accepted points are durable.
    pub async fn accept(
        &self,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
    ) -> Result<Outcome, IngestError> {
        self.accept_admitted(signal, encoding, body, key_tenant, None)
            .await
    }

    /// `accept` for a body whose budget was taken before it was read (OTLP/HTTP).
    pub async fn accept_admitted(
        &self,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Outcome, IngestError> {
        let result = self
            .accept_inner(signal, encoding, body, key_tenant, permit)
            .await;
        let code = match &result {
            Ok(_) => "ok",
            Err(error) => error.outcome(),
        };
        metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE.as_str(), "code" => code)
            .increment(1);
        result
    }

    async fn accept_inner(
        &self,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Outcome, IngestError> {
        let limit = self.admission.shared.config.max_body_bytes;
        if body.len() > limit {
            return Err(IngestError::TooLarge(format!(
                "request of {} bytes is larger than max_body_bytes ({limit}); export smaller batches",
                body.len()
            )));
        }
        let permit = match permit {
            Some(permit) => permit,
            None => self.admission.admit(body.len())?,
        };
        let Admitted { answer, .. } = match self.admission.cluster.clone() {
            Some(cluster) => {
                self.admission
                    .forward(SOURCE, cluster, permit, move |shared, now| {
                        forwardable(shared, signal, encoding, &body, key_tenant.as_deref(), now)
                    })
                    .await?
            }
            None => {
                self.admission
                    .commit(SOURCE, permit, move |shared, now| {
                        prepare(shared, signal, encoding, &body, key_tenant.as_deref(), now)
                    })
                    .await?
            }
        };
        Ok(answer)
    }
}

/// Decode and map a request (pure but for interning names).
fn map_request(
    shared: &Shared,
    signal: Signal,
    encoding: Encoding,
    body: &[u8],
    key_tenant: Option<&str>,
    now: i64,
) -> Result<Mapped, IngestError> {
    let request = decode(signal, encoding, body)?;
    let context = MapContext {
        meters: &shared.meters,
        names: &shared.names,
        tenant_attribute: &shared.config.otlp.tenant_attribute,
        key_tenant,
        now_ms: now,
        acceptance: shared.acceptance(),
    };
    Ok(match &request {
        Request::Metrics(request) => map::map_metrics(request, &context),
        Request::Logs(request) => map::map_logs(request, &context),
    })
}

/// What a mapped request tells its sender, the dead-letter file and the metrics: one line per
/// refused point, the partial-success outcome, the tally (accepted = points that count unless
/// they are duplicates; cumulative points are never duplicates: the commit stage drops stale
/// ones).
fn report(mapped: &Mapped, signal: Signal, now: i64) -> (Vec<Vec<u8>>, Tally, Outcome) {
    let received_at = received_at(now);
    let dead_letters = mapped
        .refused
        .iter()
        .map(|refusal| {
            dead_letter_line(
                &received_at,
                SOURCE,
                refusal.reason,
                &refusal.message,
                json!({
                    "signal": signal.as_str(),
                    "name": refusal.name,
                    "tenant": refusal.tenant,
                    "time_unix_nano": refusal.time_unix_nano.to_string(),
                }),
            )
        })
        .collect();
    let mut tally = Tally {
        accepted: mapped.accepted(),
        unmetered: mapped.unmetered,
        ..Tally::default()
    };
    for refusal in &mapped.refused {
        tally.refuse(refusal.reason);
    }
    let outcome = Outcome {
        rejected: mapped.refused.len() as i64,
        message: if mapped.refused.is_empty() {
            String::new()
        } else {
            mapped.refusal_summary(signal.noun())
        },
    };
    (dead_letters, tally, outcome)
}

/// Decode and map (blocking pool); the points that count.
fn prepare(
    shared: &Shared,
    signal: Signal,
    encoding: Encoding,
    body: &[u8],
    key_tenant: Option<&str>,
    now: i64,
) -> Result<Prepared<MappedPoint, Outcome>, IngestError> {
    let mapped = map_request(shared, signal, encoding, body, key_tenant, now)?;
    let (dead_letters, tally, outcome) = report(&mapped, signal, now);
    Ok(Prepared {
        units: mapped.points,
        cumulative: mapped.cumulative,
        dead_letters,
        tally,
        answer: outcome,
        refuse: Some(late_refusal(signal, now)),
        limited: super::admission::Limited::All,
    })
}

/// Rejects a point after the claim (over a hard quota): counted in `partial_success` with the
/// reason, which names the tenant, the meter and when the quota resets. No RetryInfo: the
/// collector must not retry for days; the point is dead-lettered.
fn late_refusal(signal: Signal, now: i64) -> super::admission::LateRefusal<MappedPoint, Outcome> {
    Box::new(
        move |point: &MappedPoint, outcome: &mut Outcome, reason, message: &str| {
            outcome.rejected += 1;
            let note = format!("{}: {message}", reason.as_str());
            if outcome.message.is_empty() {
                outcome.message = format!("{} rejected: {note}", signal.noun());
            } else if !outcome.message.contains(reason.as_str()) {
                outcome.message.push_str(&format!("; {note}"));
            }
            let series: Vec<serde_json::Value> = point
                .updates
                .iter()
                .map(|(key, _)| json!({"meter_id": key.meter, "window_start": key.window_start}))
                .collect();
            dead_letter_line(
                &received_at(now),
                SOURCE,
                reason,
                message,
                json!({"signal": signal.as_str(), "series": series}),
            )
        },
    )
}

/// Cluster mode: map here (refusing points that need stream state), produce the accepted
/// points to the ingest topic; the owner of each tenant counts and dedups them.
fn forwardable(
    shared: &Shared,
    signal: Signal,
    encoding: Encoding,
    body: &[u8],
    key_tenant: Option<&str>,
    now: i64,
) -> Result<Forward<Outcome>, IngestError> {
    let mut mapped = map_request(shared, signal, encoding, body, key_tenant, now)?;
    forward::refuse_stateful(&mut mapped, &shared.names);
    let keys = mapped
        .points
        .iter()
        .flat_map(|point| point.updates.iter().map(|(key, _)| (key.tenant, key.meter)));
    if let Some(refused) = super::admission::replicated_rate_limited(shared, keys, now) {
        return Err(refused);
    }
    forward::refuse_exhausted(&mut mapped, shared, now);
    let messages = forward::messages(&mapped, &shared.names);
    let (dead_letters, tally, outcome) = report(&mapped, signal, now);
    Ok(Forward {
        messages,
        content_type: Some(crate::cluster::forward::CONTENT_TYPE),
        dead_letters,
        tally,
        answer: outcome,
    })
}
