//! `GET /api/v1/tenants/{tenant}/limits`: where each of the tenant's limits stands now — for a
//! quota, `used` is the period quantity rating bills (the number `/usage` shows), with the
//! billing period and when it resets; for a rate limit, what the burst has left and when it is
//! whole again. Amounts are exact decimal strings in the meter's units.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::query::route_to_owner;
use super::usage::path_segment;
use super::{error_response, other_tenant, AppState};
use crate::auth::Principal;
use crate::model::{rfc3339, rfc3339_ms};
use crate::state::limits::Standing;

pub async fn tenant_limits(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(tenant): Path<String>,
) -> Response {
    if !principal.covers(&tenant) {
        return other_tenant(&principal, &tenant);
    }
    if app.shared.plans.read().for_tenant(&tenant).is_none() {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_plan",
            format!("tenant `{tenant}` has no plan: list it in [[tenants]] or set rating.default_plan"),
        );
    }
    if let Some(cluster) = &app.cluster {
        let path = format!("/api/v1/tenants/{}/limits", path_segment(&tenant));
        if let Some(response) = route_to_owner(cluster, std::slice::from_ref(&tenant), &path) {
            return response;
        }
    }
    let shared = app.shared.clone();
    let name = tenant.clone();
    let standing = tokio::task::spawn_blocking(move || crate::query::limits_now(&shared, &name)).await;
    match standing {
        Ok(Ok(limits)) => Json(json!({
            "tenant": tenant,
            "limits": limits.iter().map(render).collect::<Vec<Value>>(),
        }))
        .into_response(),
        Ok(Err(error)) => {
            tracing::error!(?error, "limits unreadable");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the quotas' usage could not be read; retry",
            )
        }
        Err(error) => {
            tracing::error!(%error, "limits panicked");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "limits failed")
        }
    }
}

fn render(standing: &Standing) -> Value {
    let limit = &standing.limit;
    json!({
        "meter": limit.meter,
        "kind": limit.kind.as_str(),
        "mode": limit.mode.as_str(),
        "limit": limit.format(limit.limit),
        "used": limit.format(standing.used),
        "remaining": limit.format(standing.remaining),
        "state": standing.state.as_str(),
        "period_start": rfc3339(standing.period.0),
        "period_end": rfc3339(standing.period.1),
        // Whole seconds as the period bounds are written; a rate's reset to the millisecond.
        "resets_at": match standing.resets_at_ms.rem_euclid(1000) {
            0 => rfc3339(standing.resets_at_ms.div_euclid(1000)),
            _ => rfc3339_ms(standing.resets_at_ms),
        },
        "thresholds": limit.thresholds,
    })
}
