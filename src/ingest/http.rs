//! `POST /api/v1/events`: CloudEvents over HTTP (OpenMeter-compatible). The protocol only:
//! reading the body, decoding (`decode`), rendering answers; admission, dedup, the commit and
//! the metrics are `admission`'s.
//!
//! 400 when any event is invalid (every problem listed, nothing counted: fix and resend, dedup
//! makes resending safe); 202 once the accepted events are durable, listing events refused by
//! policy (dead-lettered); 503 + Retry-After when the ingest byte budget is exhausted or the
//! daemon is shutting down (nothing counted, retry).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use super::admission::{
    dead_letter_line, received_at, Admission, Admitted, BodyError, Forward, LateRefusal, Prepared, Source,
    Tally,
};
use super::decode::{self, BodyKind, MeteredEvent, Refusal};
use super::error::{FieldError, IngestError};
use crate::state::Shared;
use crate::telemetry;

const SOURCE: Source = Source::Http;

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

/// Routes `POST /api/v1/events` (the API router merges it).
pub fn router(admission: Admission) -> Router {
    Router::new()
        .route("/api/v1/events", post(post_events))
        .with_state(admission)
}

fn respond(status: StatusCode, body: serde_json::Value) -> Response {
    metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE.as_str(), "code" => status.as_str().to_string())
        .increment(1);
    (status, Json(body)).into_response()
}

/// The CloudEvents API's error body: `{"error", "message"}`, plus `errors` (index, field,
/// reason) for invalid requests.
fn error_response(error: &IngestError) -> Response {
    let status = error.http_status();
    let body = match error {
        IngestError::Invalid { message, errors } => {
            json!({"error": "invalid_request", "message": message, "errors": errors})
        }
        IngestError::Unavailable(message) => json!({"error": "unavailable", "message": message}),
        other => json!({"error": other.outcome(), "message": other.to_string()}),
    };
    let mut response = respond(status, body);
    error.insert_headers(response.headers_mut());
    response
}

/// Counts a request refused as invalid as a whole: every event in it is invalid.
fn count_invalid(events: usize) {
    if events > 0 {
        metrics::counter!(telemetry::INGEST_EVENTS, "source" => SOURCE.as_str(), "outcome" => "invalid")
            .increment(events as u64);
    }
}

pub async fn post_events(
    State(admission): State<Admission>,
    peer: Option<axum::Extension<crate::auth::PeerCertificate>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The key (or client certificate) first: nothing of the body is read without one.
    let principal = match admission.shared.keys.current().authenticate_request(
        crate::auth::Surface::Http,
        &headers,
        peer.as_ref().map(|peer| &peer.0),
        crate::auth::Scope::Ingest,
    ) {
        Ok(principal) => principal,
        Err(error) => {
            metrics::counter!(telemetry::INGEST_REQUESTS, "source" => SOURCE.as_str(), "code" => if error.is_unauthenticated() { "401" } else { "403" })
                .increment(1);
            return error.http_response("http");
        }
    };
    match accept(&admission, &headers, body, principal.tenant).await {
        Ok(summary) => respond(
            StatusCode::ACCEPTED,
            serde_json::to_value(&summary).expect("invariant: summaries serialize"),
        ),
        Err(error) => error_response(&error),
    }
}

async fn accept(
    admission: &Admission,
    headers: &HeaderMap,
    body: Body,
    tenant: Option<String>,
) -> Result<IngestSummary, IngestError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let kind = decode::body_kind(content_type).map_err(|error| IngestError::fields(vec![error]))?;
    let (permit, bytes) = admission.read_body(headers, body).await.map_err(|error| {
        let reason = match error {
            BodyError::Refused(error) => return error,
            BodyError::TooLarge(limit) => format!("larger than max_body_bytes ({limit}); split the batch"),
            BodyError::TimedOut(timeout) => {
                return IngestError::TimedOut(format!(
                    "body: not received within {}s (server.body_timeout_secs)",
                    timeout.as_secs()
                ))
            }
            BodyError::Unreadable(error) => format!("could not be read: {error}"),
        };
        IngestError::fields(vec![FieldError::body(reason)])
    })?;
    if let Some(cluster) = admission.cluster.clone() {
        let Admitted { tally, answer } = admission
            .forward(SOURCE, cluster, permit, move |shared, now| {
                forwardable(shared, &bytes, kind, now, tenant.as_deref())
            })
            .await?;
        // The owner counts what was forwarded; the edge only what it refused itself.
        debug_assert_eq!(
            tally.accepted + tally.duplicates,
            0,
            "the owner counts forwarded events"
        );
        return Ok(answer);
    }
    let Admitted { tally, answer } = admission
        .commit(SOURCE, permit, move |shared, now| {
            prepare(shared, &bytes, kind, now, tenant.as_deref())
        })
        .await?;
    Ok(IngestSummary {
        accepted: tally.accepted,
        duplicates: tally.duplicates,
        unmetered: tally.unmetered,
        refused: answer,
        forwarded: None,
    })
}

/// An invalid request of `events` events: every problem listed, every event counted invalid.
fn invalid(errors: Vec<FieldError>, events: usize) -> IngestError {
    count_invalid(events);
    IngestError::fields(errors)
}

/// The body's events (raw) and what they decode to, or every problem (the whole request is
/// invalid: nothing counts).
fn decode_body<'b>(
    shared: &Shared,
    body: &'b [u8],
    kind: BodyKind,
    now: i64,
    tenant: Option<&str>,
) -> Result<(Vec<&'b serde_json::value::RawValue>, decode::Decoded), IngestError> {
    let raw = decode::split_body(body, kind).map_err(|error| invalid(vec![error], 1))?;
    let decoded = decode::decode_events(
        &raw,
        &shared.meters,
        &shared.names,
        now,
        shared.acceptance(),
        tenant,
    )
    .map_err(|errors| invalid(errors, raw.len()))?;
    Ok((raw, decoded))
}

/// The dead-letter lines of `refused` events, each with its index and the event as sent.
fn dead_letters<'r>(
    raw: &[&serde_json::value::RawValue],
    refused: impl Iterator<Item = &'r Refusal>,
    now: i64,
) -> Vec<Vec<u8>> {
    let received_at = received_at(now);
    refused
        .map(|refusal| {
            let event = serde_json::from_str::<serde_json::Value>(raw[refusal.index].get())
                .unwrap_or(serde_json::Value::Null);
            dead_letter_line(
                &received_at,
                SOURCE,
                refusal.reason,
                &refusal.message,
                json!({"index": refusal.index, "event": event}),
            )
        })
        .collect()
}

/// Decode and validate; the events that count (blocking pool).
fn prepare(
    shared: &Shared,
    body: &bytes::Bytes,
    kind: BodyKind,
    now: i64,
    tenant: Option<&str>,
) -> Result<Prepared<MeteredEvent, Vec<Refusal>>, IngestError> {
    let (raw, decoded) = decode_body(shared, body, kind, now, tenant)?;
    let dead_letters = dead_letters(&raw, decoded.refused.iter(), now);
    let mut tally = Tally {
        accepted: decoded.metered.len(),
        unmetered: decoded.unmetered,
        ..Default::default()
    };
    for refusal in &decoded.refused {
        tally.refuse(refusal.reason);
    }
    Ok(Prepared {
        units: decoded.metered,
        cumulative: Vec::new(),
        dead_letters,
        tally,
        answer: decoded.refused,
        refuse: Some(late_refusal(body, kind, now)),
        limited: super::admission::Limited::All,
    })
}

/// Refuses an event after the claim (over a hard quota): listed in the answer's `refused`,
/// dead-lettered with the event as sent. The body is split again on the first refusal only.
fn late_refusal(body: &bytes::Bytes, kind: BodyKind, now: i64) -> LateRefusal<MeteredEvent, Vec<Refusal>> {
    let body = body.clone();
    let mut spans: Option<Vec<(usize, usize)>> = None;
    Box::new(
        move |event: &MeteredEvent, refused: &mut Vec<Refusal>, reason, message: &str| {
            let spans = spans.get_or_insert_with(|| {
                decode::split_body(&body, kind)
                    .map(|raw| {
                        raw.iter()
                            .map(|event| {
                                let start = event.get().as_ptr() as usize - body.as_ptr() as usize;
                                (start, start + event.get().len())
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            });
            let event_json = spans
                .get(event.index)
                .and_then(|&(start, end)| serde_json::from_slice::<serde_json::Value>(&body[start..end]).ok())
                .unwrap_or(serde_json::Value::Null);
            refused.push(Refusal {
                index: event.index,
                reason,
                message: message.to_string(),
            });
            refused.sort_by_key(|refusal| refusal.index);
            dead_letter_line(
                &received_at(now),
                SOURCE,
                reason,
                message,
                json!({"index": event.index, "event": event_json}),
            )
        },
    )
}

/// Cluster mode: the metered events an exhausted hard quota (as the owners published it)
/// refuses, with the reason a single replica gives.
fn replicated_refusals(shared: &Shared, metered: &[super::decode::MeteredEvent], now: i64) -> Vec<Refusal> {
    let replicated = &shared.limits.replicated;
    if replicated.is_empty() {
        return Vec::new();
    }
    metered
        .iter()
        .filter_map(|event| {
            let tenant = shared.names.tenants.resolve(event.tenant);
            event.updates.iter().find_map(|update| {
                let meter = shared.meters.by_id(update.key.meter)?;
                let resets_at =
                    replicated.exhausted(&tenant, &meter.slug, event.ts_ms.div_euclid(1000), now)?;
                Some(Refusal {
                    index: event.index,
                    reason: super::error::RefusalReason::QuotaExceeded,
                    message: format!(
                        "tenant `{tenant}` has used up its quota of `{}` this period; the quota resets at {}",
                        meter.slug,
                        crate::model::rfc3339(resets_at.div_euclid(1000))
                    ),
                })
            })
        })
        .collect()
}

/// Cluster mode: validate exactly as a single replica would (a 400 names every problem), then
/// every event goes to the ingest topic keyed by its subject. The owner counts, dedups and
/// dead-letters; the edge counts nothing itself.
fn forwardable(
    shared: &Shared,
    body: &[u8],
    kind: BodyKind,
    now: i64,
    tenant: Option<&str>,
) -> Result<Forward<IngestSummary>, IngestError> {
    let (raw, decoded) = decode_body(shared, body, kind, now, tenant)?;
    let keys = decoded.metered.iter().flat_map(|event| {
        event
            .updates
            .iter()
            .map(|update| (event.tenant, update.key.meter))
    });
    if let Some(refused) = super::admission::replicated_rate_limited(shared, keys, now) {
        return Err(refused);
    }
    #[derive(serde::Deserialize)]
    struct Subject<'a> {
        #[serde(borrow)]
        subject: Option<crate::meter::JsonStr<'a>>,
    }
    // Events for another tenant than the key's stop here: the owner cannot tell them apart.
    let foreign: std::collections::BTreeSet<usize> = decoded
        .refused
        .iter()
        .filter(|refusal| refusal.reason == super::error::RefusalReason::WrongTenant)
        .map(|refusal| refusal.index)
        .collect();
    let dead_letters = dead_letters(
        &raw,
        decoded
            .refused
            .iter()
            .filter(|refusal| foreign.contains(&refusal.index)),
        now,
    );
    let mut tally = Tally::default();
    for _ in &foreign {
        tally.refuse(super::error::RefusalReason::WrongTenant);
    }
    // Events of a tenant whose owner published its hard quota as exhausted stop here too,
    // refused as the owner would refuse them.
    let mut refused = decoded.refused;
    let over_quota = replicated_refusals(shared, &decoded.metered, now);
    let mut stopped = foreign;
    for refusal in &over_quota {
        stopped.insert(refusal.index);
        tally.refuse(refusal.reason);
    }
    let mut dead_letters = dead_letters;
    dead_letters.extend(self::dead_letters(&raw, over_quota.iter(), now));
    let metered = decoded.metered.len() - over_quota.len();
    refused.extend(over_quota);
    refused.sort_by_key(|refusal| refusal.index);
    let foreign = stopped;
    let messages = raw
        .iter()
        .enumerate()
        .filter(|(index, _)| !foreign.contains(index))
        .map(|(_, event)| {
            let subject = serde_json::from_str::<Subject<'_>>(event.get())
                .ok()
                .and_then(|s| s.subject)
                .map(|subject| subject.0.into_owned())
                .unwrap_or_default();
            (subject, event.get().as_bytes().to_vec())
        })
        .collect();
    // The summary says what the owner will do; the metrics are the owner's to count (its
    // Kafka source); the edge tallies only the events it refused for another tenant.
    let summary = IngestSummary {
        accepted: metered,
        duplicates: 0,
        unmetered: decoded.unmetered,
        refused,
        forwarded: Some(raw.len() - foreign.len()),
    };
    Ok(Forward {
        messages,
        content_type: None,
        dead_letters,
        tally,
        answer: summary,
    })
}
