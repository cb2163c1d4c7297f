//! The limits listener (`[limits] grpc_addr`): Envoy's rate limit service (RLS v3,
//! `ShouldRateLimit`), Envoy's rate limit quota service (RLQS v3, `StreamRateLimitQuotas`) and
//! `tallyd.quota.v1` (`Check`, `Watch`) on one gRPC port, deciding
//! from the same gate admission uses (`state::limits`): one GCRA per tenant and meter, quotas
//! from the billed totals.
//!
//! Every call authenticates like the other listeners (`authorization: Bearer KEY` or
//! `x-api-key` metadata; `[[auth.keys]]`): RLS needs the `ingest` scope (it takes from rate
//! limits), `Check` and `Watch` need `read`; a tenant's key is confined to its tenant.

pub mod quota;
pub mod rlqs;
pub mod rls;

use std::sync::Arc;
use std::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::auth::{AuthError, Scope, Surface};
use crate::ingest::error::IngestError;
use crate::state::limits::{Answer, Ask, LimitError};
use crate::state::Shared;
use crate::telemetry;

/// The generated `tallyd.quota.v1` types and service.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/tallyd.quota.v1.rs"));
}

const LISTENER: &str = "limits_grpc";

/// What the limits services share.
#[derive(Clone)]
pub struct LimitsEdge {
    pub shared: Arc<Shared>,
}

impl LimitsEdge {
    /// The caller's principal, with `scope`.
    fn principal(&self, metadata: &MetadataMap, scope: Scope) -> Result<crate::auth::Principal, Status> {
        let text = |name: &str| metadata.get(name).and_then(|value| value.to_str().ok());
        let keys = self.shared.keys.current();
        keys.authenticate(Surface::Limits, text("authorization"), text("x-api-key"), scope)
            .map_err(|error| refuse(&error))
    }

    /// The caller's key, with `scope`, covering every tenant in `tenants`.
    fn authorize<'t>(
        &self,
        metadata: &MetadataMap,
        scope: Scope,
        tenants: impl IntoIterator<Item = &'t str>,
    ) -> Result<(), Status> {
        let principal = self.principal(metadata, scope)?;
        for tenant in tenants {
            if !principal.covers(tenant) {
                return Err(refuse(&AuthError::Tenant {
                    key_id: principal.key_id.clone().unwrap_or_default(),
                    tenant: tenant.to_string(),
                }));
            }
        }
        Ok(())
    }

    /// `Limits::ask` off the executor (a quota period not tracked yet reads the store).
    async fn ask(&self, asks: Vec<(String, String, i128)>, consume: bool) -> Result<Vec<Answer>, Status> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let asks: Vec<Ask<'_>> = asks
                .iter()
                .map(|(tenant, meter, units)| Ask {
                    tenant,
                    meter,
                    units: *units,
                })
                .collect();
            let load = crate::query::quota_loader(&shared);
            shared
                .limits
                .ask(&asks, consume, &shared.names, &shared.meters, &load)
        })
        .await
        .map_err(|error| Status::internal(format!("limits decision failed: {error}")))?
        .map_err(unavailable)
    }

    /// A meter's amount (decimal text in its units, or whole hits) at its limit scale.
    fn units_of(&self, meter: &str, whole: Option<u64>, text: Option<&str>) -> Result<i128, String> {
        let Some(meter) = self.shared.meters.by_slug(meter) else {
            // Unknown meters have no limits: any amount is allowed.
            return Ok(whole.map_or(1, i128::from));
        };
        let scale = crate::limit::unit_scale(meter.aggregation, meter.scale);
        match (whole, text) {
            (Some(hits), _) => i128::from(hits)
                .checked_mul(10i128.pow(scale))
                .ok_or_else(|| "hits: too large".to_string()),
            (None, Some(text)) if !text.trim().is_empty() => {
                crate::model::parse_decimal(text, scale).map_err(|error| format!("units: `{text}` {error}"))
            }
            (None, _) => Ok(10i128.pow(scale)),
        }
    }
}

fn refuse(error: &AuthError) -> Status {
    error.record(LISTENER);
    IngestError::from(error.clone()).grpc_status()
}

fn unavailable(error: LimitError) -> Status {
    match error {
        LimitError::Load(message) => {
            tracing::error!(%message, "quota usage unreadable");
            Status::unavailable("the quotas' usage could not be read; retry")
        }
        LimitError::Rate(refusal) => Status::internal(format!("unexpected rate refusal: {refusal:?}")),
    }
}

/// Counts a call and its latency (`tallyd_limits_requests_total{service,code}`,
/// `tallyd_limits_request_seconds{service}`).
fn observe(service: &'static str, started: Instant, result: &Result<impl Sized, Status>) {
    let code = match result {
        Ok(_) => "ok".to_string(),
        Err(status) => format!("{:?}", status.code()).to_lowercase(),
    };
    metrics::counter!(telemetry::LIMITS_REQUESTS, "service" => service, "code" => code).increment(1);
    metrics::histogram!(telemetry::LIMITS_REQUEST_SECONDS, "service" => service)
        .record(started.elapsed().as_secs_f64());
}

/// Serves RLS and `tallyd.quota.v1` on `listener` until `shutdown`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    use crate::ingest::listen;
    let limits = shared.config.connections;
    let edge = LimitsEdge { shared };
    let rls = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer::new(
        rls::Rls(edge.clone()),
    );
    let rlqs = envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer::new(
        rlqs::Rlqs(edge.clone()),
    );
    let quota = proto::quota_server::QuotaServer::new(quota::QuotaService(edge));
    let incoming = listen::accept(listener, LISTENER, limits, shutdown.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(listen::H2_PING_INTERVAL))
        .http2_keepalive_timeout(Some(listen::H2_PING_TIMEOUT))
        .add_service(rls)
        .add_service(rlqs)
        .add_service(quota)
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await
}
