//! The HTTP surface: routes, shared handler state, health, readiness and `/metrics`.
//! The ingest route is `ingest::http`'s (merged here); usage queries in `query`.

pub mod limits;
pub mod query;
pub mod usage;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::auth::{AuthError, PeerCertificate, Principal, Scope, Surface};
use crate::ingest::admission::Admission;
use crate::state::Shared;
use crate::telemetry;

/// What the query, usage and health handlers share.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub prometheus: PrometheusHandle,
    /// Cluster mode: queries are answered by the owner of the tenant's partition.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl AppState {
    pub fn new(shared: Arc<Shared>, cluster: Option<Arc<crate::cluster::Cluster>>) -> AppState {
        AppState {
            shared,
            prometheus: telemetry::prometheus(),
            cluster,
        }
    }
}

/// The API's routes, with the CloudEvents ingest route of `admission`'s edge. Reads need a
/// `read` key, operator actions an `admin` key (`crate::auth`); health and metrics are open.
pub fn router(state: AppState, admission: Admission) -> Router {
    let reads = Router::new()
        .route("/api/v1/meters", get(query::list_meters))
        .route("/api/v1/meters/{slug}", get(query::get_meter))
        .route("/api/v1/meters/{slug}/query", get(query::query_meter))
        .route("/api/v1/tenants/{tenant}/usage", get(usage::tenant_usage))
        .route("/api/v1/tenants/{tenant}/limits", get(limits::tenant_limits))
        .route("/api/v1/rated", get(usage::list_rated))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_read));
    let admin = Router::new()
        .route(
            "/api/v1/outputs/{output}/replay",
            axum::routing::post(replay_parked),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .merge(reads)
        .merge(admin)
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Bodies are size-checked by the handlers themselves, with a 400 naming the limit.
        .with_state(state)
        .merge(crate::ingest::http::router(admission))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Health, readiness and metrics alone, for `server.admin_addr` (no keys: nothing there names
/// a tenant's usage).
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn require_read(State(app): State<AppState>, request: Request, next: Next) -> Response {
    authorize(&app, Scope::Read, request, next).await
}

async fn require_admin(State(app): State<AppState>, request: Request, next: Next) -> Response {
    authorize(&app, Scope::Admin, request, next).await
}

/// Authenticates the request for `scope` and hands its `Principal` to the handler (which
/// scopes it to the key's tenant); 401 / 403 otherwise.
async fn authorize(app: &AppState, scope: Scope, mut request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<PeerCertificate>().cloned();
    match app.shared.keys.current().authenticate_request(
        Surface::Http,
        request.headers(),
        peer.as_ref(),
        scope,
    ) {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => error.http_response("http"),
    }
}

/// 403 for a key asking for another tenant's usage (counted like any refusal).
pub fn other_tenant(principal: &Principal, tenant: &str) -> Response {
    AuthError::Tenant {
        key_id: principal.key_id.clone().unwrap_or_default(),
        tenant: tenant.to_string(),
    }
    .http_response("http")
}

/// Liveness: 503 once a stage died (the daemon is stopping; a supervisor should restart it).
async fn healthz(State(app): State<AppState>) -> Response {
    match app.shared.failure.lock().clone() {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(failure) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "failure": failure})),
        )
            .into_response(),
    }
}

async fn readyz(State(app): State<AppState>) -> Response {
    if app.shared.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        let faults = app.shared.faults.lock().clone();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "faults": faults})),
        )
            .into_response()
    }
}

async fn metrics_text(State(app): State<AppState>) -> Response {
    app.shared.limits.publish_metrics();
    metrics::gauge!(telemetry::DEDUP_PENDING).set(app.shared.dedup.len() as f64);
    metrics::gauge!(telemetry::SERIES_ACTIVE_TODAY).set(app.shared.names.series.active() as f64);
    metrics::gauge!(telemetry::INTERNED_VALUES, "table" => "tenants")
        .set(app.shared.names.tenants.len() as f64);
    metrics::gauge!(telemetry::INTERNED_VALUES, "table" => "dims").set(app.shared.names.dims.len() as f64);
    metrics::gauge!(telemetry::STORE_LIVE_BYTES).set(app.shared.store.live_data_bytes() as f64);
    let since_checkpoint_ms = crate::model::now_ms() - app.shared.last_checkpoint_ms.load(Ordering::Acquire);
    metrics::gauge!(telemetry::CHECKPOINT_LAG).set(since_checkpoint_ms.max(0) as f64 / 1000.0);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.prometheus.render(),
    )
        .into_response()
}

/// `POST /api/v1/outputs/{output}/replay`: the output sends its parked records again (once its
/// receiver is fixed). 202 with how many are parked; 404 for an output that is not configured.
async fn replay_parked(
    State(app): State<AppState>,
    axum::extract::Extension(principal): axum::extract::Extension<Principal>,
    axum::extract::Path(output): axum::extract::Path<String>,
) -> Response {
    if !crate::emit::configured(&app.shared.config).contains(&output.as_str()) || output == "file" {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no remote output `{output}`"),
        );
    }
    let path = crate::emit::parked_path(&app.shared, &output);
    let parked = std::fs::read(&path)
        .map(|text| text.iter().filter(|byte| **byte == b'\n').count())
        .unwrap_or(0);
    app.shared.replays.lock().insert(output.clone());
    // Audit: operator actions name the key that asked (its id, never the key).
    tracing::warn!(
        output,
        parked,
        key = principal.key_id.as_deref().unwrap_or("(no keys configured)"),
        "operator action: replay of parked records requested"
    );
    (
        StatusCode::ACCEPTED,
        Json(json!({"output": output, "parked": parked, "path": path.display().to_string()})),
    )
        .into_response()
}

/// A JSON error body: `{"error": code, "message": text}`.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": code, "message": message.into()}))).into_response()
}
