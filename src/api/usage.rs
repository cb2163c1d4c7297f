//! `GET /api/v1/tenants/{tenant}/usage?from&to`: the current bill preview — per charged meter,
//! the tenant's quantity so far in the billing period and what it costs under the tenant's plan
//! (rounded per charge as `rate` states), and the total.
//!
//! Without `from`/`to` the range is the billing period containing now; with them, that range's
//! total is priced as one period (for "what would this range cost").

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::query::{route_to_owner, run_query, QueryParams};
use super::{error_response, AppState};
use crate::model::{now_ms, parse_rfc3339_ms, rfc3339, rfc3339_ms_compact};
use crate::pipeline::Shared;
use crate::rate::plan::{Plan, Plans};
use crate::rate::ChargeModel;

fn model_name(model: &ChargeModel) -> &'static str {
    match model {
        ChargeModel::Flat { .. } => "flat",
        ChargeModel::PerUnit { .. } => "per_unit",
        ChargeModel::Package { .. } => "package",
        ChargeModel::Graduated { .. } => "graduated",
        ChargeModel::Volume { .. } => "volume",
    }
}

/// `from`/`to` (RFC 3339), every problem named.
fn parse_range(raw: &str) -> Result<(Option<i64>, Option<i64>), Vec<String>> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw).map_err(|error| vec![format!("query string: {error}")])?;
    let (mut from, mut to, mut errors) = (None, None, Vec::new());
    for (key, value) in pairs {
        match (key.as_str(), parse_rfc3339_ms(&value)) {
            ("from", Some(ms)) => from = Some(ms),
            ("to", Some(ms)) => to = Some(ms),
            ("from" | "to", None) => errors.push(format!("{key}: `{value}` is not an RFC 3339 timestamp")),
            (other, _) => errors.push(format!("{other}: unknown parameter (from, to)")),
        }
    }
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            errors.push("from: must not be after to".into());
        }
    }
    if errors.is_empty() {
        Ok((from, to))
    } else {
        Err(errors)
    }
}

pub async fn tenant_usage(
    State(app): State<AppState>,
    Path(tenant): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let (from, to) = match parse_range(raw.as_deref().unwrap_or("")) {
        Ok(range) => range,
        Err(errors) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_request", "message": errors.join("; "), "errors": errors})),
            )
                .into_response()
        }
    };
    let Some((plan, discount)) = app.shared.config.plans.for_tenant(&tenant) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no_plan",
            format!("tenant `{tenant}` has no plan: list it in [[tenants]] or set rating.default_plan"),
        );
    };
    if let Some(cluster) = &app.cluster {
        let segment = path_segment(&tenant);
        let path = match &raw {
            Some(query) => format!("/api/v1/tenants/{segment}/usage?{query}"),
            None => format!("/api/v1/tenants/{segment}/usage"),
        };
        if let Some(response) = route_to_owner(cluster, std::slice::from_ref(&tenant), &path) {
            return response;
        }
    }
    let (plan, shared) = (plan.clone(), app.shared.clone());
    match tokio::task::spawn_blocking(move || preview(&shared, &tenant, &plan, discount, from, to)).await {
        Ok(Ok(body)) => Json(body).into_response(),
        Ok(Err(message)) => {
            tracing::error!(%message, "usage preview failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
        }
        Err(error) => {
            tracing::error!(%error, "usage preview panicked");
            error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "usage preview failed",
            )
        }
    }
}

/// A tenant id as one URL path segment (percent-encoding all but RFC 3986 unreserved bytes).
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Blocking: reads the store through the usage query.
fn preview(
    shared: &Arc<Shared>,
    tenant: &str,
    plan: &Plan,
    discount: Decimal,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<Value, String> {
    let (period_start, period_end) = plan.period.containing(now_ms().div_euclid(1000));
    let from_ms = from.unwrap_or(period_start * 1000);
    let to_ms = to.unwrap_or(period_end * 1000);
    let minor_units = crate::rate::minor_unit_exponent(&plan.currency).unwrap_or(2) as usize;
    // Money with exactly the currency's minor units: "16.65", "1.50", "0" for JPY.
    let money = |amount: Decimal| format!("{amount:.minor_units$}");
    let mut meters = Vec::new();
    let mut total = Decimal::ZERO;
    for charge in Plans::charges_for(plan, discount) {
        let params = QueryParams {
            subjects: vec![tenant.to_string()],
            from_ms: Some(from_ms),
            to_ms: Some(to_ms),
            ..QueryParams::default()
        };
        let result = run_query(shared, &charge.meter, &params).map_err(|error| error.to_string())?;
        // One row: one subject, no group-by, the whole range merged (a union for UNIQUE_COUNT).
        let quantity = match result["data"].as_array().and_then(|rows| rows.first()) {
            Some(row) => Decimal::from_str(&row["value"].to_string())
                .map_err(|error| format!("meter `{}` value {}: {error}", charge.meter, row["value"]))?,
            None => Decimal::ZERO,
        };
        let priced = charge
            .price(quantity)
            .map_err(|error| format!("pricing `{}`: {error}", charge.meter))?;
        total += priced.rounded;
        let tiers: Vec<Value> = priced
            .tiers
            .iter()
            .map(|line| {
                json!({
                    "tier": line.tier,
                    "units": line.units.normalize().to_string(),
                    "unit_price": line.unit_price.normalize().to_string(),
                    "flat_price": line.flat_price.normalize().to_string(),
                    "amount": line.amount.normalize().to_string(),
                })
            })
            .collect();
        meters.push(json!({
            "meter": charge.meter,
            "model": model_name(&charge.model),
            "quantity": quantity.normalize().to_string(),
            "free_units": charge.free_units.normalize().to_string(),
            "amount": money(priced.rounded),
            "tiers": tiers,
        }));
    }
    let settled = plan.settle(total);
    Ok(json!({
        "tenant": tenant,
        "plan_id": plan.id,
        "plan_version": plan.version,
        "currency": plan.currency,
        "discount_percent": discount.normalize().to_string(),
        "period_start": rfc3339(period_start),
        "period_end": rfc3339(period_end),
        "from": rfc3339_ms_compact(from_ms),
        "to": rfc3339_ms_compact(to_ms),
        "meters": meters,
        "subtotal": money(settled.subtotal),
        "minimum_spend": money(plan.minimum_spend),
        "minimum_true_up": money(settled.minimum_true_up),
        "total": money(settled.total),
        "prepaid_commitment": money(plan.prepaid_commitment),
        "prepaid_used": money(settled.prepaid_used),
        "overage": money(settled.overage),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tenant_ids_become_one_path_segment() {
        assert_eq!(super::path_segment("acme-01_x.y~"), "acme-01_x.y~");
        assert_eq!(super::path_segment("a/b c%ü"), "a%2Fb%20c%25%C3%BC");
    }
}
