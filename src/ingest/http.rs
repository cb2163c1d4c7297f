//! `POST /api/v1/events`: CloudEvents over HTTP (OpenMeter-compatible).
//!
//! 400 when any event is invalid (every problem listed, nothing counted: fix and resend, dedup
//! makes resending safe); 202 once the accepted events are durable, listing events refused by
//! policy (dead-lettered); 503 + Retry-After when the ingest byte budget is exhausted or the
//! daemon is shutting down (nothing counted, retry).

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::aggregate::PreAggregated;
use crate::api::AppState;
use crate::cluster::Cluster;
use crate::ingest::decode::{self, FieldError, Refusal};
use crate::model::{now_ms, rfc3339_ms};
use crate::pipeline::commit::CommitRequest;
use crate::pipeline::Shared;
use crate::store::log::LogBatch;
use crate::telemetry;

const SOURCE: &str = "http";

#[derive(Debug, Serialize)]
pub struct IngestSummary {
    /// Events counted now.
    pub accepted: usize,
    /// Events already counted earlier (same subject, source and id within the dedup horizon).
    pub duplicates: usize,
    /// Valid events whose type matches no meter (accepted, counted in a metric only).
    pub unmetered: usize,
    /// Events refused by policy, written to the dead-letter file, never counted.
    pub refused: Vec<Refusal>,
    /// Cluster mode: events produced to the ingest topic and acknowledged by Kafka. The owning
    /// replica counts them (and recognises duplicates, so `duplicates` is 0 here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<usize>,
}

/// What a request hands to the commit stage (see `CommitRequest`).
struct PendingCommit {
    payload: Vec<u8>,
    batch: PreAggregated,
    dedup_keys: Vec<u128>,
    dead_letters: Vec<Vec<u8>>,
}

enum Prepared {
    /// The problems, and how many events the request held (all of them count as invalid).
    Invalid(Vec<FieldError>, usize),
    Ready {
        summary: IngestSummary,
        request: Option<PendingCommit>,
        late: usize,
    },
}

fn count_events(outcome: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(telemetry::INGEST_EVENTS, "source" => SOURCE, "outcome" => outcome)
            .increment(n as u64);
    }
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response {
    metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE, "code" => status.as_str().to_string())
        .increment(1);
    (status, Json(body)).into_response()
}

fn invalid(errors: Vec<FieldError>) -> Response {
    let events = errors
        .iter()
        .filter_map(|e| e.index)
        .collect::<std::collections::BTreeSet<_>>();
    let message = match errors.first() {
        Some(first) if errors.len() == 1 => format!("{}: {}", first.field, first.reason),
        _ => format!(
            "{} problems in {} event(s); nothing was counted",
            errors.len(),
            events.len()
        ),
    };
    respond(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "message": message, "errors": errors}),
    )
}

fn unavailable(message: &str) -> Response {
    let mut response = respond(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "unavailable", "message": message}),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

pub async fn post_events(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let kind = match decode::body_kind(content_type) {
        Ok(kind) => kind,
        Err(error) => return invalid(vec![error]),
    };
    let limit = app.shared.config.max_body_bytes;
    let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || error.to_string().contains("length limit");
            let reason = if too_large {
                format!("larger than max_body_bytes ({limit}); split the batch")
            } else {
                format!("could not be read: {error}")
            };
            return invalid(vec![FieldError {
                index: None,
                field: "body".into(),
                reason,
            }]);
        }
    };
    // Push sources fail fast when the pipeline is full: the client retries, nothing is lost.
    let Ok(_permit) = app
        .budget
        .clone()
        .try_acquire_many_owned(u32::try_from(bytes.len().max(1)).unwrap_or(u32::MAX))
    else {
        return unavailable("ingest is overloaded; retry after the delay");
    };
    if !app.shared.ready.load(std::sync::atomic::Ordering::Acquire) {
        return unavailable("not ready (starting, shutting down or storage failure)");
    }

    if let Some(cluster) = app.cluster.clone() {
        return forward(&app, &cluster, bytes, kind).await;
    }
    if app.shared.checkpoints_behind() {
        metrics::counter!(crate::telemetry::INGEST_BACKPRESSURE, "source" => "http").increment(1);
        return unavailable("checkpoints are behind (aggregate.max_pending_series); retry after the delay");
    }

    let shared = app.shared.clone();
    let prepared = match tokio::task::spawn_blocking(move || prepare(&shared, &bytes, kind)).await {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(message)) => {
            tracing::error!(%message, "ingest preparation failed");
            return unavailable("storage unavailable");
        }
        Err(error) => {
            tracing::error!(%error, "ingest preparation panicked");
            return unavailable("internal error");
        }
    };
    let (summary, request, late) = match prepared {
        Prepared::Invalid(errors, events) => {
            count_events("invalid", events);
            return invalid(errors);
        }
        Prepared::Ready {
            summary,
            request,
            late,
        } => (summary, request, late),
    };

    if let Some(PendingCommit {
        payload,
        batch,
        dedup_keys,
        dead_letters,
    }) = request
    {
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = CommitRequest {
            payload,
            batch,
            dedup_keys,
            cumulative: Vec::new(),
            dead_letters,
            reply: reply_tx,
        };
        // A refused send hands the request back: its keys are released, not copied beforehand.
        if let Err(std::sync::mpsc::SendError(request)) = app.commits.send(request) {
            app.shared.dedup.remove_all(&request.dedup_keys);
            return unavailable("shutting down");
        }
        match reply_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "ingest batch not committed");
                return unavailable("storage unavailable; nothing from this request was counted");
            }
            Err(_) => return unavailable("shutting down; nothing from this request was counted"),
        }
    }

    count_events("accepted", summary.accepted + summary.unmetered);
    count_events("duplicate", summary.duplicates);
    count_events("refused", summary.refused.len());
    for refusal in &summary.refused {
        metrics::counter!(telemetry::INGEST_REFUSED, "source" => SOURCE, "reason" => refusal.reason.as_str())
            .increment(1);
    }
    if summary.unmetered > 0 {
        metrics::counter!(telemetry::INGEST_UNMETERED, "source" => SOURCE)
            .increment(summary.unmetered as u64);
    }
    if late > 0 {
        metrics::counter!(telemetry::INGEST_LATE, "source" => SOURCE).increment(late as u64);
    }
    respond(
        StatusCode::ACCEPTED,
        serde_json::to_value(&summary).expect("invariant: summaries serialize"),
    )
}

/// Cluster mode: validate exactly as a single replica would (a 400 names every problem), then
/// produce every event to the ingest topic keyed by its subject; 202 once Kafka acknowledged all.
async fn forward(app: &AppState, cluster: &Cluster, bytes: Bytes, kind: decode::BodyKind) -> Response {
    let shared = app.shared.clone();
    let checked = tokio::task::spawn_blocking(move || check_for_forwarding(&shared, &bytes, kind)).await;
    let (summary, events) = match checked {
        Ok(Ok(checked)) => checked,
        Ok(Err((errors, events))) => {
            count_events("invalid", events);
            return invalid(errors);
        }
        Err(error) => {
            tracing::error!(%error, "ingest validation panicked");
            return unavailable("internal error");
        }
    };
    let events = events
        .iter()
        .map(|(tenant, payload)| (tenant.as_str(), payload.as_slice()));
    if let Err(message) = cluster.forward(events).await {
        tracing::warn!(%message, "forwarding to the ingest topic failed");
        return unavailable(
            "the ingest topic did not acknowledge every event; retry (duplicates are dropped)",
        );
    }
    respond(
        StatusCode::ACCEPTED,
        serde_json::to_value(&summary).expect("invariant: summaries serialize"),
    )
}

/// Every event's subject and JSON, or the request's problems (and its event count).
type Forwardable = (IngestSummary, Vec<(String, Vec<u8>)>);

fn check_for_forwarding(
    shared: &Shared,
    body: &[u8],
    kind: decode::BodyKind,
) -> Result<Forwardable, (Vec<FieldError>, usize)> {
    let raw = decode::split_body(body, kind).map_err(|error| (vec![error], 1))?;
    let config = &shared.config;
    let acceptance = config.acceptance();
    let decoded = decode::decode_events(&raw, &shared.meters, &shared.names, now_ms(), acceptance)
        .map_err(|errors| (errors, raw.len()))?;
    #[derive(serde::Deserialize)]
    struct Subject<'a> {
        #[serde(borrow)]
        subject: Option<crate::meter::JsonStr<'a>>,
    }
    let events = raw
        .iter()
        .map(|event| {
            let subject = serde_json::from_str::<Subject<'_>>(event.get())
                .ok()
                .and_then(|s| s.subject)
                .map(|subject| subject.0.into_owned())
                .unwrap_or_default();
            (subject, event.get().as_bytes().to_vec())
        })
        .collect();
    let summary = IngestSummary {
        accepted: decoded.metered.len(),
        duplicates: 0,
        unmetered: decoded.unmetered,
        refused: decoded.refused,
        forwarded: Some(raw.len()),
    };
    Ok((summary, events))
}

/// Decode, validate, dedup and pre-aggregate (blocking: it reads the store).
fn prepare(shared: &Shared, body: &[u8], kind: decode::BodyKind) -> Result<Prepared, String> {
    let raw = match decode::split_body(body, kind) {
        Ok(raw) => raw,
        Err(error) => return Ok(Prepared::Invalid(vec![error], 1)),
    };
    let config = &shared.config;
    let now = now_ms();
    let acceptance = config.acceptance();
    let decoded = match decode::decode_events(&raw, &shared.meters, &shared.names, now, acceptance) {
        Ok(decoded) => decoded,
        Err(errors) => return Ok(Prepared::Invalid(errors, raw.len())),
    };

    // Reserve first, then consult the store (see ingest::dedup for why this order is race-free).
    let keys: Vec<u128> = decoded.metered.iter().map(|event| event.dedup_key).collect();
    let fresh = shared
        .dedup
        .claim(
            &shared.store,
            &keys,
            now.div_euclid(1000),
            config.dedup_horizon_secs,
        )
        .map_err(|error| error.to_string())?;
    let mut batch = PreAggregated::with_capacity(keys.len());
    let mut fresh_keys = Vec::with_capacity(keys.len());
    let mut late = 0;
    for (event, fresh) in decoded.metered.iter().zip(fresh) {
        if !fresh {
            continue;
        }
        fresh_keys.push(event.dedup_key);
        late += usize::from(event.late);
        if let Err(error) = event.fold_into(&mut batch) {
            shared.dedup.remove_all(&fresh_keys);
            return Err(format!("event {}: {error}", event.index));
        }
    }

    let received_at = rfc3339_ms(now);
    let dead_letters: Vec<Vec<u8>> = decoded
        .refused
        .iter()
        .map(|refusal| {
            let event = serde_json::from_str::<serde_json::Value>(raw[refusal.index].get())
                .unwrap_or(serde_json::Value::Null);
            let mut line = serde_json::to_vec(&json!({
                "received_at": received_at,
                "source": SOURCE,
                "reason": refusal.reason.as_str(),
                "message": refusal.message,
                "index": refusal.index,
                "event": event,
            }))
            .expect("invariant: dead letters serialize");
            line.push(b'\n');
            line
        })
        .collect();

    let summary = IngestSummary {
        accepted: fresh_keys.len(),
        duplicates: decoded.metered.len() - fresh_keys.len(),
        unmetered: decoded.unmetered,
        refused: decoded.refused,
        forwarded: None,
    };
    let request = if fresh_keys.is_empty() && dead_letters.is_empty() {
        None
    } else {
        let payload = if fresh_keys.is_empty() {
            Vec::new()
        } else {
            LogBatch::from_batch(&batch, &fresh_keys, &shared.names).encode()
        };
        Some(PendingCommit {
            payload,
            batch,
            dedup_keys: fresh_keys,
            dead_letters,
        })
    };
    Ok(Prepared::Ready {
        summary,
        request,
        late,
    })
}
