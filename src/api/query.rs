//! Usage queries (OpenMeter-compatible shapes): `GET /api/v1/meters`, `/api/v1/meters/{slug}` and
//! `/api/v1/meters/{slug}/query`.
//!
//! The handlers only: parameters, cluster routing (which replica answers), answers. The
//! engine that reads the store, pending snapshots and live deltas is `crate::query`.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::{error_response, other_tenant, AppState};
use crate::auth::Principal;
use crate::cluster::{Cluster, Owner};
use crate::meter::{Meter, MeterSource};
use crate::query::{parse_params, run_query};
use crate::telemetry;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MeterView<'a> {
    slug: &'a str,
    description: Option<&'a str>,
    source: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metric_name: Option<&'a String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_name: Option<&'a String>,
    aggregation: &'static str,
    value_property: Option<&'a str>,
    group_by: BTreeMap<&'a str, &'a str>,
    window_size: &'static str,
    scale: u32,
}

fn meter_view(meter: &Meter) -> MeterView<'_> {
    MeterView {
        slug: &meter.slug,
        description: meter.description.as_deref(),
        source: meter.source.as_str(),
        event_type: &meter.event_type,
        metric_name: match &meter.source {
            MeterSource::OtlpMetric { metric_name } => Some(metric_name),
            _ => None,
        },
        event_name: match &meter.source {
            MeterSource::OtlpLog { event_name, .. } => Some(event_name),
            _ => None,
        },
        aggregation: meter.aggregation.as_str(),
        value_property: meter.value_property.as_ref().map(|p| p.as_str()),
        group_by: meter
            .group_by
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_str()))
            .chain(
                meter
                    .group_by_attributes
                    .iter()
                    .map(|(name, attribute)| (name.as_str(), attribute.as_str())),
            )
            .collect(),
        window_size: meter.window_size.as_str(),
        scale: meter.scale,
    }
}

pub async fn list_meters(State(app): State<AppState>) -> Response {
    let views: Vec<MeterView> = app.shared.meters.all().iter().map(meter_view).collect();
    Json(views).into_response()
}

pub async fn get_meter(State(app): State<AppState>, Path(slug): Path<String>) -> Response {
    match app.shared.meters.by_slug(&slug) {
        Some(meter) => Json(meter_view(meter)).into_response(),
        None => error_response(StatusCode::NOT_FOUND, "not_found", format!("no meter `{slug}`")),
    }
}

pub async fn query_meter(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(meter) = app.shared.meters.by_slug(&slug) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", format!("no meter `{slug}`"));
    };
    let mut params = match parse_params(raw.as_deref().unwrap_or(""), meter) {
        Ok(params) => params,
        Err(errors) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_request", "message": errors.join("; "), "errors": errors})),
            )
                .into_response()
        }
    };
    // A tenant's key reads its own usage only: no subject means its own.
    if let Some(own) = &principal.tenant {
        if let Some(other) = params.subjects.iter().find(|subject| *subject != own) {
            return other_tenant(&principal, other);
        }
        if params.subjects.is_empty() {
            params.subjects.push(own.clone());
        }
    }
    if let Some(cluster) = &app.cluster {
        let path = match &raw {
            Some(query) => format!("/api/v1/meters/{slug}/query?{query}"),
            None => format!("/api/v1/meters/{slug}/query"),
        };
        if let Some(response) = route_to_owner(cluster, &params.subjects, &path) {
            return response;
        }
    }
    let shared = app.shared.clone();
    match tokio::task::spawn_blocking(move || run_query(&shared, &slug, &params)).await {
        Ok(Ok(body)) => match &app.cluster {
            Some(cluster) => Json(owned_rows_only(cluster, body)).into_response(),
            None => Json(body).into_response(),
        },
        Ok(Err(error)) => {
            tracing::error!(%error, "query failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "query failed")
        }
        Err(error) => {
            tracing::error!(%error, "query panicked");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "query failed")
        }
    }
}

/// Cluster mode: `None` when this replica holds all the usage of every requested subject (or
/// none was named); otherwise where to ask: 307 to the one owner, 421 listing several, 503
/// while a partition is unclaimed, 409 when a subject's usage is split over partitions (no
/// replica can answer it whole).
pub(crate) fn route_to_owner(cluster: &Cluster, subjects: &[String], path: &str) -> Option<Response> {
    let routes: Vec<(&str, Vec<(i32, Owner)>)> = subjects
        .iter()
        .map(|subject| (subject.as_str(), cluster.route(subject)))
        .collect();
    if let Some(response) = split_subjects(cluster, &routes) {
        return Some(response);
    }
    // From here every subject has one owner (all its partitions with one replica).
    let elsewhere: Vec<(&str, Vec<i32>, Owner)> = routes
        .iter()
        .filter(|(_, parts)| parts.iter().any(|(_, owner)| *owner != Owner::Local))
        .map(|(subject, parts)| {
            let owner = parts
                .iter()
                .map(|(_, owner)| owner.clone())
                .find(|owner| *owner == Owner::Unknown)
                .unwrap_or_else(|| parts[0].1.clone());
            (
                *subject,
                parts.iter().map(|(partition, _)| *partition).collect(),
                owner,
            )
        })
        .collect();
    if elsewhere.is_empty() {
        return None;
    }
    metrics::counter!(telemetry::CLUSTER_QUERY_REDIRECTS).increment(1);
    let owners: Vec<Value> = elsewhere
        .iter()
        .map(|(subject, partitions, owner)| {
            let url = match owner {
                Owner::Remote(url) => Value::String(url.clone()),
                _ => Value::Null,
            };
            json!({"subject": subject, "partition": partitions[0], "partitions": partitions, "owner": url})
        })
        .collect();
    let remote: std::collections::BTreeSet<&str> = elsewhere
        .iter()
        .filter_map(|(_, _, owner)| match owner {
            Owner::Remote(url) => Some(url.as_str()),
            _ => None,
        })
        .collect();
    let unknown = elsewhere.iter().any(|(_, _, owner)| *owner == Owner::Unknown);
    let (status, message) = if unknown {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no replica owns some of these subjects yet (the group is rebalancing); retry".to_string(),
        )
    } else if remote.len() == 1 && elsewhere.len() == subjects.len() {
        (
            StatusCode::TEMPORARY_REDIRECT,
            format!("these subjects are counted by {}", remote.first().unwrap_or(&"")),
        )
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "these subjects are counted by different replicas; ask each owner for its subjects".to_string(),
        )
    };
    let mut response = (
        status,
        Json(json!({"error": "not_owner", "message": message, "replica": cluster.url, "owners": owners})),
    )
        .into_response();
    let location = match remote.first() {
        Some(url) if status == StatusCode::TEMPORARY_REDIRECT => format!("{url}{path}").parse().ok(),
        _ => None,
    };
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if unknown {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Some(response)
}

/// Whether a subject's usage was counted on more than one partition.
fn is_split(parts: &[(i32, Owner)]) -> bool {
    // Even when one replica owns every part: restoring one partition's changelog overwrites the
    // series the other partition fed (absolute states per series), so no store's total for a
    // split tenant can be trusted whole (ARCHITECTURE.md, cluster mode).
    parts.len() > 1
}

/// 409 `tenant_split` for subjects whose usage was counted on more than one partition: no
/// replica may answer them as if its total were whole.
fn split_subjects(cluster: &Cluster, routes: &[(&str, Vec<(i32, Owner)>)]) -> Option<Response> {
    let split: Vec<Value> = routes
        .iter()
        .filter(|(_, parts)| is_split(parts))
        .map(|(subject, parts)| {
            let parts: Vec<Value> = parts
                .iter()
                .map(|(partition, owner)| {
                    let url = match owner {
                        Owner::Remote(url) => url.as_str(),
                        _ => cluster.url.as_str(),
                    };
                    json!({"partition": partition, "owner": url})
                })
                .collect();
            json!({"subject": subject, "partitions": parts})
        })
        .collect();
    if split.is_empty() {
        return None;
    }
    metrics::counter!(telemetry::CLUSTER_SPLIT_ANSWERS).increment(1);
    Some(
        (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "tenant_split",
                "message": "these subjects' usage was counted on more than one partition of the ingest \
                            topic, so no replica holds a total it can vouch for; producers must keep \
                            each tenant on one partition (key = subject; README, cluster mode).",
                "replica": cluster.url,
                "subjects": split,
            })),
        )
            .into_response(),
    )
}

/// Cluster mode: rows of tenants whose whole usage this replica holds (its store may still
/// hold tenants of partitions it owned before, or split tenants), which partitions it owns,
/// and the split subjects it left out (`splitSubjects`).
fn owned_rows_only(cluster: &Cluster, mut body: Value) -> Value {
    let mut split = std::collections::BTreeSet::new();
    if let Some(Value::Array(rows)) = body.get_mut("data") {
        // A subject has a row per window and group: route it once.
        let mut whole: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
        rows.retain(|row| {
            let Some(subject) = row.get("subject").and_then(Value::as_str) else {
                return false;
            };
            *whole.entry(subject.to_string()).or_insert_with(|| {
                let parts = cluster.route(subject);
                if is_split(&parts) {
                    split.insert(subject.to_string());
                }
                crate::cluster::held_whole(&parts)
            })
        });
    }
    if let Value::Object(fields) = &mut body {
        fields.insert(
            "cluster".into(),
            json!({
                "replica": cluster.url,
                "partitions": cluster.partitions(),
                "ownedPartitions": cluster.owned(),
                "splitSubjects": split,
            }),
        );
    }
    body
}
