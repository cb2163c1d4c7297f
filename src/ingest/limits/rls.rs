//! Envoy RLS v3 (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`): each
//! descriptor names a tenant and a meter (`[limits] tenant_key`, `meter_key` entries) and asks
//! for `hits_addend` units of it (0 means 1; a descriptor's own `hits_addend` overrides). A
//! descriptor is OVER_LIMIT when a rate limit or a hard quota of the tenant's plan would refuse
//! its hits; then nothing is taken from any rate limit (refused hits never count). Descriptors
//! naming no tenant or meter with limits are OK, without a `current_limit`. When every
//! descriptor is allowed, the hits of `source = "envoy"` meters are recorded as usage (durable
//! before the answer): a gateway limits and meters each request with one call.

use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use super::{borrowed_asks, observe, LimitsEdge};
use crate::auth::Scope;
use crate::limit::{Kind, Mode};
use crate::state::limits::{Answer, Standing};

pub struct Rls(pub LimitsEdge);

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let started = Instant::now();
        // The decision runs to its end on its own task, even if the caller hangs up: once
        // `ask` has taken rate units, only the record's outcome may settle them (kept when
        // the hits were counted, given back when not). Dropped at an await, the call would
        // keep units for hits never counted.
        let rls = Rls(self.0.clone());
        let result = tokio::spawn(async move {
            let result = rls.decide(request).await;
            observe("rls", started, &result);
            result
        })
        .await
        .unwrap_or_else(|error| Err(Status::internal(format!("limits decision failed: {error}"))));
        result.map(Response::new)
    }
}

impl Rls {
    async fn decide(&self, request: Request<RateLimitRequest>) -> Result<RateLimitResponse, Status> {
        let edge = &self.0;
        let config = &edge.shared.config.limits;
        // Authenticated first (the key or certificate); its tenants checked once named.
        let principal = edge.principal(&request, Scope::Ingest)?;
        let request = request.into_inner();
        if request.domain != config.envoy_domain {
            return Err(Status::invalid_argument(format!(
                "domain `{}` is not served here (limits.envoy_domain = `{}`)",
                request.domain, config.envoy_domain
            )));
        }
        let default_hits = u64::from(request.hits_addend.max(1));
        let mut asks = Vec::with_capacity(request.descriptors.len());
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            let entry = |key: &str| {
                descriptor
                    .entries
                    .iter()
                    .find(|entry| entry.key == key)
                    .map(|entry| entry.value.clone())
            };
            let hits = descriptor.hits_addend.map_or(default_hits, |value| value.value);
            let (tenant, meter) = (entry(&config.tenant_key), entry(&config.meter_key));
            let units = match &meter {
                Some(meter) => edge
                    .units_of(meter, Some(hits), None)
                    .map_err(|reason| Status::invalid_argument(format!("descriptors[{index}].{reason}")))?,
                None => 0,
            };
            asks.push((tenant.unwrap_or_default(), meter.unwrap_or_default(), units));
        }
        edge.covers(
            &principal,
            asks.iter()
                .map(|(tenant, _, _)| tenant.as_str())
                .filter(|tenant| !tenant.is_empty()),
        )?;
        let mut answers = edge.ask(asks.clone(), true).await?;
        // Allowed hits of `source = "envoy"` meters are usage (denied ones never count),
        // recorded as one unit: their quotas decide again there, atomically with the count.
        let withdraw = |over_quota: bool| {
            let shared = &edge.shared;
            let asks = borrowed_asks(&asks);
            shared
                .limits
                .withdraw(&asks, over_quota, &shared.names, &shared.meters);
        };
        let recorded = match answers.iter().all(|answer| answer.allowed) {
            true => edge.record_hits(asks.clone(), true).await.inspect_err(|_| {
                // Not recorded (overload, a failing store): the hits took nothing.
                withdraw(false);
            })?,
            false => true,
        };
        if !recorded {
            // Another call took a hard quota's last units between the look and the record:
            // the request is refused (nothing of it counted), and what stands now is shown.
            withdraw(true);
            answers = edge.ask(asks.clone(), false).await?;
            for (answer, (_, meter, _)) in answers.iter_mut().zip(&asks) {
                let recorded = edge
                    .shared
                    .meters
                    .by_slug(meter)
                    .is_some_and(|meter| meter.source == crate::meter::MeterSource::Envoy);
                let quota = answer.limits.iter().position(|standing| {
                    standing.limit.kind == Kind::Quota && standing.limit.mode == Mode::Hard
                });
                if let (true, Some(quota)) = (recorded, quota) {
                    answer.allowed = false;
                    answer.deciding = Some(quota);
                }
            }
        }
        let now_ms = crate::model::now_ms();
        let statuses: Vec<DescriptorStatus> = answers
            .iter()
            .zip(&asks)
            .map(|(answer, (tenant, meter, _))| status(answer, tenant, meter, now_ms))
            .collect();
        let over = answers.iter().position(|answer| !answer.allowed);
        let shown = over.or_else(|| answers.iter().position(|answer| answer.deciding.is_some()));
        let mut headers = Vec::new();
        if let Some(answer) = shown.map(|index| &answers[index]) {
            if let Some(standing) = answer.deciding.map(|i| &answer.limits[i]) {
                headers.extend(rate_limit_headers(standing, now_ms));
            }
            if let (false, Some(wait)) = (answer.allowed, answer.retry_after_ns) {
                headers.push(header(
                    "retry-after",
                    ((wait + 999_999_999) / 1_000_000_000).max(1).to_string(),
                ));
            }
        }
        Ok(RateLimitResponse {
            overall_code: if over.is_some() { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: headers,
            ..RateLimitResponse::default()
        })
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        ..HeaderValue::default()
    }
}

/// Whole units of a standing's amount (RLS counts in u32 requests).
fn whole(standing: &Standing, units: i128) -> u32 {
    let per_unit = 10i128.pow(standing.limit.scale);
    u32::try_from((units / per_unit).max(0)).unwrap_or(u32::MAX)
}

/// The draft-10 `RateLimit-Policy` / `RateLimit` headers of the deciding limit.
fn rate_limit_headers(standing: &Standing, now_ms: i64) -> Vec<HeaderValue> {
    let limit = &standing.limit;
    let name = format!("{}-{}", limit.meter, limit.kind.as_str());
    let window = match limit.rate {
        Some(spec) => spec.per_ns / 1_000_000_000,
        None => i128::from(standing.period.1 - standing.period.0),
    };
    let reset = ((standing.resets_at_ms - now_ms).max(0) + 999) / 1000;
    vec![
        header(
            "ratelimit-policy",
            format!("\"{name}\";q={};w={window}", limit.format(limit.limit)),
        ),
        header(
            "ratelimit",
            format!("\"{name}\";r={};t={reset}", limit.format(standing.remaining)),
        ),
    ]
}

fn status(answer: &Answer, tenant: &str, meter: &str, now_ms: i64) -> DescriptorStatus {
    let code = if answer.allowed { Code::Ok } else { Code::OverLimit } as i32;
    let Some(standing) = answer.deciding.map(|i| &answer.limits[i]) else {
        return DescriptorStatus {
            code,
            ..DescriptorStatus::default()
        };
    };
    let limit = &standing.limit;
    let unit = match (limit.kind, limit.rate.map(|spec| spec.per_ns / 1_000_000_000)) {
        (Kind::Rate, Some(1)) => Unit::Second,
        (Kind::Rate, Some(60)) => Unit::Minute,
        (Kind::Rate, Some(3600)) => Unit::Hour,
        (Kind::Rate, _) => Unit::Day,
        (Kind::Quota, _) if standing.period.1 - standing.period.0 <= 86_400 => Unit::Day,
        (Kind::Quota, _) => Unit::Month,
    };
    let until_reset_ms = (standing.resets_at_ms - now_ms).max(0);
    DescriptorStatus {
        code,
        current_limit: Some(RateLimit {
            name: format!("{tenant}/{meter}/{}", limit.kind.as_str()),
            requests_per_unit: whole(standing, limit.limit),
            unit: unit as i32,
        }),
        limit_remaining: whole(standing, standing.remaining),
        duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: until_reset_ms / 1000,
            nanos: ((until_reset_ms % 1000) * 1_000_000) as i32,
        }),
        quota: None,
    }
}
