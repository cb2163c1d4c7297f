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
pub mod map;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use serde_json::json;
use tokio::sync::oneshot;

use crate::aggregate::PreAggregated;
use crate::api::AppState;
use crate::model::{now_ms, rfc3339_ms};
use crate::pipeline::commit::CommitRequest;
use crate::pipeline::Shared;
use crate::store::log::LogBatch;
use crate::telemetry;
use map::{MapContext, Mapped};

const SOURCE: &str = "otlp";

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

/// Why a whole request is not accepted. One place maps these to gRPC and HTTP statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestError {
    /// Missing or unknown API key.
    Unauthenticated(String),
    /// Malformed body: nothing counted; retrying the same bytes cannot help.
    Invalid(String),
    /// Too large for `max_body_bytes`.
    TooLarge(String),
    /// Overloaded, shutting down or storage trouble: nothing counted; retry after the delay.
    Unavailable(String),
}

impl IngestError {
    pub fn grpc_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        match self {
            IngestError::Unauthenticated(message) => tonic::Status::unauthenticated(message.clone()),
            IngestError::Invalid(message) => tonic::Status::invalid_argument(message.clone()),
            IngestError::TooLarge(message) => tonic::Status::resource_exhausted(message.clone()),
            // Retryable per the OTLP spec; RetryInfo tells the exporter how long to wait.
            IngestError::Unavailable(message) => tonic::Status::with_error_details(
                tonic::Code::Unavailable,
                message.clone(),
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            ),
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            IngestError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            IngestError::Invalid(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn message(&self) -> &str {
        match self {
            IngestError::Unauthenticated(message)
            | IngestError::Invalid(message)
            | IngestError::TooLarge(message)
            | IngestError::Unavailable(message) => message,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            IngestError::Unauthenticated(_) => "unauthenticated",
            IngestError::Invalid(_) | IngestError::TooLarge(_) => "invalid",
            IngestError::Unavailable(_) => "unavailable",
        }
    }
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
        IngestError::Invalid(format!(
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

/// The OTLP front end shared by the gRPC and HTTP transports.
#[derive(Clone)]
pub struct OtlpIngest {
    pub app: AppState,
}

/// What a request hands to the commit stage.
struct Prepared {
    accepted: usize,
    duplicates: usize,
    unmetered: usize,
    late: usize,
    refusals: Vec<(map::RefusalReason, usize)>,
    outcome: Outcome,
    request: Option<CommitRequest>,
    reply: Option<oneshot::Receiver<Result<(), crate::pipeline::commit::CommitError>>>,
}

impl OtlpIngest {
    /// Cluster mode: map here, produce the accepted points to the ingest topic (the owner of
    /// each tenant counts and dedups them) and answer once Kafka acknowledged them all.
    async fn forward(
        &self,
        cluster: &crate::cluster::Cluster,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
    ) -> Result<Outcome, IngestError> {
        let shared = self.app.shared.clone();
        let mapped = tokio::task::spawn_blocking(move || {
            let request = decode(signal, encoding, &body)?;
            let now = now_ms();
            let context = MapContext {
                meters: &shared.meters,
                names: &shared.names,
                tenant_attribute: &shared.config.otlp.tenant_attribute,
                key_tenant: key_tenant.as_deref(),
                now_ms: now,
                acceptance: shared.config.acceptance(),
            };
            let mut mapped: Mapped = match &request {
                Request::Metrics(request) => map::map_metrics(request, &context),
                Request::Logs(request) => map::map_logs(request, &context),
            };
            forward::refuse_stateful(&mut mapped, &shared.names);
            let messages = forward::messages(&mapped, &shared.names);
            let (dead_letters, refusals, outcome) = report(&mapped, signal, now);
            Ok::<_, IngestError>((
                mapped.accepted(),
                mapped.unmetered,
                messages,
                dead_letters,
                refusals,
                outcome,
            ))
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, "otlp mapping panicked");
            IngestError::Unavailable("internal error".into())
        })??;
        let (accepted, unmetered, messages, dead_letters, refusals, outcome) = mapped;
        cluster
            .forward_as(
                messages
                    .iter()
                    .map(|(tenant, payload)| (tenant.as_str(), payload.as_slice())),
                Some(forward::CONTENT_TYPE),
            )
            .await
            .map_err(|error| IngestError::Unavailable(format!("{error}; retry (duplicates are dropped)")))?;
        if !dead_letters.is_empty() {
            // Refused points go to this replica's dead-letter file, as for a local export.
            let (reply_tx, reply_rx) = oneshot::channel();
            let request = CommitRequest {
                payload: Vec::new(),
                batch: PreAggregated::with_capacity(0),
                dedup_keys: Vec::new(),
                cumulative: Vec::new(),
                dead_letters,
                reply: reply_tx,
            };
            if self.app.commits.send(request).is_ok() {
                let _ = reply_rx.await;
            }
        }
        count_outcome(accepted, 0, unmetered, 0, &refusals);
        metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE, "code" => "ok").increment(1);
        Ok(outcome)
    }

    /// The tenant an API key stands for; `None` when keys are off.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<Option<String>, IngestError> {
        let keys = &self.app.shared.config.otlp.api_keys;
        if keys.is_empty() {
            return Ok(None);
        }
        let presented = api_key.or_else(|| {
            authorization.and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
        });
        let Some(presented) = presented.map(str::trim) else {
            return Err(IngestError::Unauthenticated(
                "API key required: send `authorization: Bearer <key>` or `x-api-key: <key>`".into(),
            ));
        };
        keys.get(presented)
            .cloned()
            .map(Some)
            .ok_or_else(|| IngestError::Unauthenticated("unknown API key".into()))
    }

    /// The whole path for one request body; answers once accepted points are durable.
    pub async fn accept(
        &self,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
    ) -> Result<Outcome, IngestError> {
        let result = self.accept_inner(signal, encoding, body, key_tenant).await;
        if let Err(error) = &result {
            metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE, "code" => error.outcome())
                .increment(1);
        }
        result
    }

    async fn accept_inner(
        &self,
        signal: Signal,
        encoding: Encoding,
        body: Bytes,
        key_tenant: Option<String>,
    ) -> Result<Outcome, IngestError> {
        let limit = self.app.shared.config.max_body_bytes;
        if body.len() > limit {
            return Err(IngestError::TooLarge(format!(
                "request of {} bytes is larger than max_body_bytes ({limit}); export smaller batches",
                body.len()
            )));
        }
        // Push sources fail fast when the pipeline is full: the exporter retries, nothing is lost.
        let Ok(_permit) = self
            .app
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(body.len().max(1)).unwrap_or(u32::MAX))
        else {
            return Err(IngestError::Unavailable(
                "ingest is overloaded; retry after the delay".into(),
            ));
        };
        if !self.app.shared.ready.load(Ordering::Acquire) {
            return Err(IngestError::Unavailable(
                "not ready (starting, shutting down or storage failure)".into(),
            ));
        }
        if let Some(cluster) = self.app.cluster.clone() {
            return self.forward(&cluster, signal, encoding, body, key_tenant).await;
        }
        if self.app.shared.checkpoints_behind() {
            metrics::counter!(crate::telemetry::INGEST_BACKPRESSURE, "source" => "otlp").increment(1);
            return Err(IngestError::Unavailable(
                "checkpoints are behind (aggregate.max_pending_series); retry after the delay".into(),
            ));
        }
        let shared = self.app.shared.clone();
        let started = std::time::Instant::now();
        let prepared = tokio::task::spawn_blocking(move || {
            prepare(&shared, signal, encoding, &body, key_tenant.as_deref())
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, "otlp preparation panicked");
            IngestError::Unavailable("internal error".into())
        })??;
        let Prepared {
            accepted,
            duplicates,
            unmetered,
            late,
            refusals,
            outcome,
            request,
            reply,
        } = prepared;
        metrics::histogram!(telemetry::INGEST_STAGE_SECONDS, "source" => SOURCE, "stage" => "prepare")
            .record(started.elapsed().as_secs_f64());
        let started = std::time::Instant::now();
        if let (Some(request), Some(reply)) = (request, reply) {
            // A refused send hands the request back: its keys are released, not copied beforehand.
            if let Err(std::sync::mpsc::SendError(request)) = self.app.commits.send(request) {
                self.app.shared.dedup.remove_all(&request.dedup_keys);
                return Err(IngestError::Unavailable("shutting down".into()));
            }
            match reply.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "otlp batch not committed");
                    return Err(IngestError::Unavailable(
                        "storage unavailable; nothing from this request was counted".into(),
                    ));
                }
                Err(_) => {
                    return Err(IngestError::Unavailable(
                        "shutting down; nothing from this request was counted".into(),
                    ))
                }
            }
            metrics::histogram!(telemetry::INGEST_STAGE_SECONDS, "source" => SOURCE, "stage" => "commit")
                .record(started.elapsed().as_secs_f64());
        }
        count_outcome(accepted, duplicates, unmetered, late, &refusals);
        metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE, "code" => "ok").increment(1);
        Ok(outcome)
    }
}

/// What a mapped request tells its sender and the dead-letter file: one line per refused point,
/// counts per reason (metrics), the partial-success outcome.
fn report(
    mapped: &Mapped,
    signal: Signal,
    now: i64,
) -> (Vec<Vec<u8>>, Vec<(map::RefusalReason, usize)>, Outcome) {
    let received_at = rfc3339_ms(now);
    let dead_letters: Vec<Vec<u8>> = mapped
        .refused
        .iter()
        .map(|refusal| {
            let mut line = serde_json::to_vec(&json!({
                "received_at": received_at,
                "source": SOURCE,
                "signal": signal.as_str(),
                "reason": refusal.reason.as_str(),
                "message": refusal.message,
                "name": refusal.name,
                "tenant": refusal.tenant,
                "time_unix_nano": refusal.time_unix_nano.to_string(),
            }))
            .expect("invariant: dead letters serialize");
            line.push(b'\n');
            line
        })
        .collect();
    let mut refusals: Vec<(map::RefusalReason, usize)> = Vec::new();
    for refusal in &mapped.refused {
        match refusals.iter_mut().find(|(reason, _)| *reason == refusal.reason) {
            Some((_, n)) => *n += 1,
            None => refusals.push((refusal.reason, 1)),
        }
    }
    let outcome = Outcome {
        rejected: mapped.refused.len() as i64,
        message: if mapped.refused.is_empty() {
            String::new()
        } else {
            mapped.refusal_summary(signal.noun())
        },
    };
    (dead_letters, refusals, outcome)
}

/// The request's outcome in the ingest metrics.
fn count_outcome(
    accepted: usize,
    duplicates: usize,
    unmetered: usize,
    late: usize,
    refusals: &[(map::RefusalReason, usize)],
) {
    let count = |outcome: &'static str, n: usize| {
        if n > 0 {
            metrics::counter!(telemetry::INGEST_EVENTS, "source" => SOURCE, "outcome" => outcome)
                .increment(n as u64);
        }
    };
    count("accepted", accepted + unmetered);
    count("duplicate", duplicates);
    for &(reason, n) in refusals {
        count("refused", n);
        metrics::counter!(telemetry::INGEST_REFUSED, "source" => SOURCE, "reason" => reason.as_str())
            .increment(n as u64);
    }
    if unmetered > 0 {
        metrics::counter!(telemetry::INGEST_UNMETERED, "source" => SOURCE).increment(unmetered as u64);
    }
    if late > 0 {
        metrics::counter!(telemetry::INGEST_LATE, "source" => SOURCE).increment(late as u64);
    }
}

/// Decode, map, dedup and pre-aggregate (blocking: it reads the store).
fn prepare(
    shared: &Shared,
    signal: Signal,
    encoding: Encoding,
    body: &[u8],
    key_tenant: Option<&str>,
) -> Result<Prepared, IngestError> {
    let request = decode(signal, encoding, body)?;
    let config = &shared.config;
    let now = now_ms();
    let context = MapContext {
        meters: &shared.meters,
        names: &shared.names,
        tenant_attribute: &config.otlp.tenant_attribute,
        key_tenant,
        now_ms: now,
        acceptance: config.acceptance(),
    };
    let mapped: Mapped = match &request {
        Request::Metrics(request) => map::map_metrics(request, &context),
        Request::Logs(request) => map::map_logs(request, &context),
    };

    // Reserve first, then consult the store (see ingest::dedup for why this order is race-free).
    let keys: Vec<u128> = mapped.points.iter().filter_map(|point| point.dedup_key).collect();
    let fresh = shared
        .dedup
        .claim(
            &shared.store,
            &keys,
            now.div_euclid(1000),
            config.dedup_horizon_secs,
        )
        .map_err(|error| {
            tracing::error!(%error, "dedup lookup failed");
            IngestError::Unavailable("storage unavailable".into())
        })?;
    let mut fresh = fresh.into_iter();
    let mut batch = PreAggregated::with_capacity(mapped.points.len());
    let mut fresh_keys = Vec::with_capacity(keys.len());
    let (mut duplicates, mut late) = (0, 0);
    for point in &mapped.points {
        if let Some(key) = point.dedup_key {
            if fresh.next() != Some(true) {
                duplicates += 1;
                continue;
            }
            fresh_keys.push(key);
        }
        late += usize::from(point.late);
        for (key, state) in &point.updates {
            if let Err(error) = batch.merge_state(*key, state) {
                shared.dedup.remove_all(&fresh_keys);
                tracing::error!(%error, "otlp points overflow a series");
                return Err(IngestError::Invalid(format!("a series would overflow: {error}")));
            }
        }
    }
    // Cumulative points are never "duplicates" here: the commit stage drops stale ones.
    let accepted = mapped.accepted() - duplicates;

    let (dead_letters, refusals, outcome) = report(&mapped, signal, now);
    let nothing = batch.is_empty() && fresh_keys.is_empty() && mapped.cumulative.is_empty();
    let (request, reply) = if nothing && dead_letters.is_empty() {
        (None, None)
    } else {
        let payload = if nothing {
            Vec::new()
        } else {
            LogBatch::from_parts(&batch, &fresh_keys, &mapped.cumulative, &shared.names).encode()
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        (
            Some(CommitRequest {
                payload,
                batch,
                dedup_keys: fresh_keys,
                cumulative: mapped.cumulative,
                dead_letters,
                reply: reply_tx,
            }),
            Some(reply_rx),
        )
    };
    Ok(Prepared {
        accepted,
        duplicates,
        unmetered: mapped.unmetered,
        late,
        refusals,
        outcome,
        request,
        reply,
    })
}

// ---------------------------------------------------------------------------------------------
// OTLP/HTTP

/// Routes `POST /v1/metrics` and `POST /v1/logs`.
pub fn http_router(ingest: OtlpIngest) -> axum::Router {
    axum::Router::new()
        .route("/v1/metrics", axum::routing::post(post_metrics))
        .route("/v1/logs", axum::routing::post(post_logs))
        .with_state(ingest)
}

async fn post_metrics(State(ingest): State<OtlpIngest>, headers: HeaderMap, body: Body) -> Response {
    post(ingest, Signal::Metrics, headers, body).await
}

async fn post_logs(State(ingest): State<OtlpIngest>, headers: HeaderMap, body: Body) -> Response {
    post(ingest, Signal::Logs, headers, body).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

const PROTOBUF: &str = "application/x-protobuf";

async fn post(ingest: OtlpIngest, signal: Signal, headers: HeaderMap, body: Body) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE.as_str())
        .map(|value| value.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let encoding = match content_type.as_deref() {
        Some("application/x-protobuf" | "application/protobuf") => Encoding::Protobuf,
        Some("application/json") => Encoding::Json,
        other => {
            let message = format!(
                "content-type `{}` is not application/x-protobuf or application/json",
                other.unwrap_or("(missing)")
            );
            return http_error(Encoding::Json, StatusCode::UNSUPPORTED_MEDIA_TYPE, &message, None);
        }
    };
    let limit = ingest.app.shared.config.max_body_bytes;
    let result = async {
        let key_tenant = ingest.authenticate(
            header_str(&headers, header::AUTHORIZATION.as_str()),
            header_str(&headers, "x-api-key"),
        )?;
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|error| {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || error.to_string().contains("length limit");
            if too_large {
                IngestError::TooLarge(format!(
                    "body larger than max_body_bytes ({limit}); export smaller batches"
                ))
            } else {
                IngestError::Invalid(format!("body could not be read: {error}"))
            }
        })?;
        let bytes = match header_str(&headers, header::CONTENT_ENCODING.as_str()).map(str::trim) {
            None | Some("identity") => bytes,
            Some("gzip") => gunzip(&bytes, limit)?,
            Some(other) => {
                return Err(IngestError::Invalid(format!(
                    "content-encoding `{other}` is not supported (use gzip or none)"
                )))
            }
        };
        ingest.accept(signal, encoding, bytes, key_tenant).await
    }
    .await;
    match result {
        Ok(outcome) => {
            let content_type = match encoding {
                Encoding::Protobuf => PROTOBUF,
                Encoding::Json => "application/json",
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type)],
                outcome.encode(signal, encoding),
            )
                .into_response()
        }
        Err(error) => {
            let retry = matches!(error, IngestError::Unavailable(_)).then_some("1");
            http_error(encoding, error.http_status(), error.message(), retry)
        }
    }
}

/// Inflates a gzip body, refusing one that inflates past `limit` (a zip bomb is a bad request).
fn gunzip(bytes: &[u8], limit: usize) -> Result<Bytes, IngestError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(bytes.len() * 4);
    let mut decoder = flate2::read::GzDecoder::new(bytes).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|error| IngestError::Invalid(format!("gzip body does not inflate: {error}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge(format!(
            "body inflates past max_body_bytes ({limit}); export smaller batches"
        )));
    }
    Ok(Bytes::from(out))
}

/// An error body as the OTLP spec asks: a `google.rpc.Status`, encoded like the request.
fn http_error(
    encoding: Encoding,
    status: StatusCode,
    message: &str,
    retry_after: Option<&'static str>,
) -> Response {
    let grpc_code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => tonic::Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
        StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
        _ => tonic::Code::Unavailable,
    } as i32;
    let (content_type, body) = match encoding {
        Encoding::Protobuf => (
            PROTOBUF,
            tonic_types::pb::Status {
                code: grpc_code,
                message: message.to_string(),
                details: Vec::new(),
            }
            .encode_to_vec(),
        ),
        Encoding::Json => (
            "application/json",
            serde_json::to_vec(&json!({"code": grpc_code, "message": message}))
                .expect("invariant: errors serialize"),
        ),
    };
    let mut response = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
    if let Some(delay) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(delay));
    }
    response
}

/// The TLS identity of `[otlp.tls]`, for both listeners.
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsIdentity {
    pub fn load(tls: &crate::config::RawTls) -> std::io::Result<TlsIdentity> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|error| std::io::Error::new(error.kind(), format!("{}: {error}", path.display())))
        };
        Ok(TlsIdentity {
            cert_pem: read(&tls.cert_path)?,
            key_pem: read(&tls.key_path)?,
        })
    }

    /// A rustls server config for OTLP/HTTP (h2 and http/1.1 by ALPN).
    pub fn rustls_config(&self) -> Result<tokio_rustls::rustls::ServerConfig, String> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("otlp.tls.cert_path: {error}"))?;
        if certs.is_empty() {
            return Err("otlp.tls.cert_path: no certificate in the file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|error| format!("otlp.tls.key_path: {error}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| format!("otlp.tls: {error}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Serves OTLP/HTTP on `listener` until `shutdown`, over TLS when `tls` is set.
pub async fn serve_http(
    ingest: OtlpIngest,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
) -> std::io::Result<()> {
    let router = http_router(ingest);
    let Some(tls) = tls else {
        return axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    };
    // axum::serve has no TLS: accept, handshake, then hand each connection to hyper.
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "otlp http accept failed");
                    continue;
                }
            },
        };
        let (acceptor, router, shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "otlp http tls handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // HTTP/2 (by ALPN): the gRPC listener's windows, for the same reason (`grpc`).
            builder
                .http2()
                .initial_connection_window_size(grpc::H2_CONNECTION_WINDOW_BYTES)
                .initial_stream_window_size(grpc::H2_STREAM_WINDOW_BYTES);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    // In-flight requests finish; the client is told to go away.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}
