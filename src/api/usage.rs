//! Rating's API. `GET /api/v1/rated`: rated records (`list_rated`).
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
use axum::Extension;
use axum::Json;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::query::route_to_owner;
use super::{error_response, other_tenant, AppState};
use crate::auth::Principal;
use crate::model::{now_ms, parse_rfc3339_ms, rfc3339, rfc3339_ms_compact};
use crate::query::{run_query, QueryParams};
use crate::rate::plan::{Plan, Plans};
use crate::rate::record::{model_name, money};
use crate::state::Shared;

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
    Extension(principal): Extension<Principal>,
    Path(tenant): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    if !principal.covers(&tenant) {
        return other_tenant(&principal, &tenant);
    }
    let (from, to) = match parse_range(raw.as_deref().unwrap_or("")) {
        Ok(range) => range,
        Err(errors) => return bad_request(errors),
    };
    let plans = app.shared.plans.read().clone();
    let Some((plan, discount)) = plans.for_tenant(&tenant) else {
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
    let (mut plan, zone, shared) = (plan.clone(), plans.timezone(&tenant), app.shared.clone());
    plan.period = plans.period_of(&tenant, &plan);
    let blocking = move || {
        // A period already rated keeps the plan version it started with (a reload applies from
        // the next period): price it with that one when the range lies in one period.
        let (start, end) = plan
            .period
            .containing_in(from.unwrap_or_else(now_ms).div_euclid(1000), zone);
        let within = to.is_none_or(|to| to <= end * 1000);
        let meters: Vec<String> = plan.charges.iter().map(|charge| charge.meter.clone()).collect();
        let pinned = match within {
            true => shared
                .store
                .pinned_plan(&tenant, &meters, start)
                .map_err(|e| e.to_string())?,
            false => None,
        };
        let (plan, discount) = match pinned {
            Some((id, version, pinned_discount)) => {
                let plans = shared.plans.read().clone();
                match plans.version(&id, version) {
                    Some(old) => {
                        let mut old = old.clone();
                        old.period = plans.period_of(&tenant, &old);
                        (old, pinned_discount.parse().unwrap_or(discount))
                    }
                    None => (plan, discount),
                }
            }
            None => (plan, discount),
        };
        preview(&shared, &tenant, &plan, discount, zone, from, to)
    };
    match tokio::task::spawn_blocking(blocking).await {
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

/// `GET /api/v1/rated?tenant&from&to&meter&limit`: the latest revision of every rated record
/// whose window starts in `[from, to)` (default: all retained), of one tenant or all, optionally
/// one meter; at most `limit` (default 1000, at most 10000), `truncated` saying whether more
/// matched. `totals` sums the listed amounts per currency.
pub async fn list_rated(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
        Ok(pairs) => pairs,
        Err(error) => return bad_request(vec![format!("query string: {error}")]),
    };
    let (mut tenant, mut meter, mut from, mut to, mut limit) = (None, None, i64::MIN, i64::MAX, 1000usize);
    let mut errors = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "tenant" => tenant = Some(value),
            "meter" => meter = Some(value),
            "from" | "to" => match parse_rfc3339_ms(&value) {
                // Window starts are whole seconds: `from` rounds up, `to` (exclusive) rounds up.
                Some(ms) if key == "from" => from = (ms + 999).div_euclid(1000),
                Some(ms) => to = (ms + 999).div_euclid(1000),
                None => errors.push(format!("{key}: `{value}` is not an RFC 3339 timestamp")),
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=10_000).contains(&n) => limit = n,
                _ => errors.push(format!("limit: `{value}` must be an integer from 1 to 10000")),
            },
            other => errors.push(format!(
                "{other}: unknown parameter (tenant, meter, from, to, limit)"
            )),
        }
    }
    if from > to {
        errors.push("from: must not be after to".into());
    }
    let meters: Vec<String> = match &meter {
        Some(slug) if !app.shared.catalog.contains_key(slug) => {
            errors.push(format!("meter: no meter `{slug}`"));
            Vec::new()
        }
        Some(slug) => vec![slug.clone()],
        None => {
            let mut all: Vec<String> = app.shared.catalog.keys().cloned().collect();
            all.sort();
            all
        }
    };
    if !errors.is_empty() {
        return bad_request(errors);
    }
    // A tenant's key lists its own records only: no tenant means its own.
    if let Some(own) = &principal.tenant {
        match &tenant {
            Some(asked) if asked != own => return other_tenant(&principal, asked),
            _ => tenant = Some(own.clone()),
        }
    }
    if let (Some(cluster), Some(tenant)) = (&app.cluster, &tenant) {
        let path = match &raw {
            Some(query) => format!("/api/v1/rated?{query}"),
            None => "/api/v1/rated".to_string(),
        };
        if let Some(response) = route_to_owner(cluster, std::slice::from_ref(tenant), &path) {
            return response;
        }
    }
    let shared = app.shared.clone();
    let listed = tokio::task::spawn_blocking(move || {
        shared
            .store
            .rated_records(&meters, tenant.as_deref(), from, to, limit)
    })
    .await;
    match listed {
        Ok(Ok((mut records, truncated))) => {
            // Cluster mode, all tenants: records of tenants whose whole usage is here only (the
            // store may keep records of tenants whose partitions moved away, or split ones).
            if let Some(cluster) = &app.cluster {
                records.retain(|record| cluster.answers_whole(&record.tenant));
            }
            let mut totals: std::collections::BTreeMap<String, Decimal> = Default::default();
            for record in &records {
                if let Ok(amount) = Decimal::from_str(&record.amount) {
                    let total = totals.entry(record.currency.clone()).or_default();
                    let Ok(sum) = crate::rate::add(*total, amount) else {
                        return error_response(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "overflow",
                            format!(
                                "the {} total of these records overflows; narrow the query",
                                record.currency
                            ),
                        );
                    };
                    *total = sum;
                }
            }
            let totals: serde_json::Map<String, Value> = totals
                .into_iter()
                .map(|(currency, amount)| {
                    let minor = crate::rate::minor_unit_exponent(&currency).unwrap_or(2);
                    (currency, Value::String(money(amount, minor)))
                })
                .collect();
            Json(json!({"data": records, "truncated": truncated, "totals": totals})).into_response()
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "listing rated records failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())
        }
        Err(error) => {
            tracing::error!(%error, "listing rated records panicked");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", "listing failed")
        }
    }
}

fn bad_request(errors: Vec<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "invalid_request", "message": errors.join("; "), "errors": errors})),
    )
        .into_response()
}

/// A tenant id as one URL path segment (percent-encoding all but RFC 3986 unreserved bytes).
pub(super) fn path_segment(text: &str) -> String {
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
    zone: Option<chrono_tz::Tz>,
    from: Option<i64>,
    to: Option<i64>,
) -> Result<Value, String> {
    let (period_start, period_end) = plan.period.containing_in(now_ms().div_euclid(1000), zone);
    let from_ms = from.unwrap_or(period_start * 1000);
    let to_ms = to.unwrap_or(period_end * 1000);
    let minor_units = crate::rate::minor_unit_exponent(&plan.currency).unwrap_or(2);
    let money = |amount: Decimal| money(amount, minor_units);
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
        total = crate::rate::add(total, priced.rounded)
            .map_err(|error| format!("the bill's subtotal: {error}"))?;
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
    let settled = plan
        .settle(total)
        .map_err(|error| format!("the bill's settlement: {error}"))?;
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
