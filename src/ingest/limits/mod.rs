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

use tonic::Status;

use crate::aggregate::AggState;
use crate::auth::{AuthError, Scope, Surface};
use crate::cluster::forward::ForwardedUnit;
use crate::ingest::admission::{dead_letter_line, received_at, Admission, Limited, Prepared, Source, Tally};
use crate::ingest::error::IngestError;
use crate::model::SeriesKey;
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
    /// Records the hits of `source = "envoy"` meters as usage.
    pub admission: Admission,
    /// Ends the streams (Watch, RLQS): they hold `admission`, whose commit sender the commit
    /// stage waits for before its final checkpoint.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl LimitsEdge {
    /// The caller's principal, with `scope`.
    /// The caller: its key (metadata), else its verified client certificate (`[limits.tls]`
    /// with `client_ca_path` and `[[auth.certificates]]`).
    fn principal<T>(
        &self,
        request: &tonic::Request<T>,
        scope: Scope,
    ) -> Result<crate::auth::Principal, Status> {
        let metadata = request.metadata();
        let text = |name: &str| metadata.get(name).and_then(|value| value.to_str().ok());
        let peer = request
            .extensions()
            .get::<crate::ingest::listen::TlsPeer>()
            .and_then(|peer| peer.certificate.as_ref());
        let keys = self.shared.keys.current();
        keys.authenticate_presented(
            Surface::Limits,
            text("authorization"),
            text("x-api-key"),
            peer,
            scope,
        )
        .map_err(|error| refuse(&error))
    }

    /// The caller's key, with `scope`, covering every tenant in `tenants`.
    fn authorize<'t, T>(
        &self,
        request: &tonic::Request<T>,
        scope: Scope,
        tenants: impl IntoIterator<Item = &'t str>,
    ) -> Result<(), Status> {
        let principal = self.principal(request, scope)?;
        self.covers(&principal, tenants)
    }

    /// `principal` may act for every tenant in `tenants`.
    fn covers<'t>(
        &self,
        principal: &crate::auth::Principal,
        tenants: impl IntoIterator<Item = &'t str>,
    ) -> Result<(), Status> {
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

    /// Cluster mode: `Check` and `Watch` answer from the quotas' billed totals, which only the
    /// tenant's owner holds; another replica's answer would be its own partial count. Refused
    /// there with FAILED_PRECONDITION naming who answers (its HTTP base URL: `GET
    /// /api/v1/tenants/{tenant}/limits` there, or its limits listener).
    fn held_here(&self, tenant: &str) -> Result<(), Status> {
        let Some(cluster) = &self.admission.cluster else {
            return Ok(());
        };
        if cluster.answers_whole(tenant) {
            return Ok(());
        }
        let owners: Vec<String> = cluster
            .route(tenant)
            .into_iter()
            .map(|(partition, owner)| match owner {
                crate::cluster::Owner::Remote(url) => format!("{url} (partition {partition})"),
                crate::cluster::Owner::Local => format!("this replica (partition {partition})"),
                crate::cluster::Owner::Unknown => {
                    format!("nobody yet (partition {partition}: a rebalance is in progress)")
                }
            })
            .collect();
        Err(Status::failed_precondition(format!(
            "tenant `{tenant}`'s usage is counted by {}; ask there (its /api/v1/tenants/{tenant}/limits or its limits listener)",
            owners.join(", ")
        )))
    }

    /// `Limits::ask`: on the executor when every quota period it needs is tracked (the common
    /// case: a decision is memory only), else off it (a period not tracked yet reads the
    /// store; the first attempt took nothing).
    async fn ask(&self, asks: Vec<(String, String, i128)>, consume: bool) -> Result<Vec<Answer>, Status> {
        const UNTRACKED: &str = "a quota period is not tracked yet";
        {
            let shared = &self.shared;
            let borrowed = borrowed_asks(&asks);
            let untracked = |_: &str, _: &str, _: i64, _: i64| Err(UNTRACKED.to_string());
            match shared
                .limits
                .ask(&borrowed, consume, &shared.names, &shared.meters, &untracked)
            {
                Err(LimitError::Load(message)) if message == UNTRACKED => {}
                decided => return decided.map_err(unavailable),
            }
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let asks = borrowed_asks(&asks);
            let load = crate::query::quota_loader(&shared);
            shared
                .limits
                .ask(&asks, consume, &shared.names, &shared.meters, &load)
        })
        .await
        .map_err(|error| Status::internal(format!("limits decision failed: {error}")))?
        .map_err(unavailable)
    }

    /// Records allowed hits of `source = "envoy"` meters as usage, through the admission path
    /// like any edge's (durable before the answer). Only quotas decide there: the rate limits
    /// already took these hits. Units of other meters, and tenants without a plan, are skipped.
    /// `whole`: the hits are one unit, refused together when one would take a hard quota past
    /// its limit (one RLS call: its request passes or not). Whether nothing was refused (the
    /// quota decided again here, where it counts: a look before may be stale by then). In
    /// cluster mode the tenant's owner decides later: true.
    async fn record_hits(&self, hits: Vec<(String, String, i128)>, whole: bool) -> Result<bool, Status> {
        let shared = &self.shared;
        let hits: Vec<(String, String, i128)> = hits
            .into_iter()
            .filter(|(tenant, meter, units)| {
                *units > 0
                    && !tenant.is_empty()
                    && shared
                        .meters
                        .by_slug(meter)
                        .is_some_and(|meter| meter.source == crate::meter::MeterSource::Envoy)
                    && shared.plans.read().for_tenant(tenant).is_some()
            })
            .collect();
        if hits.is_empty() {
            return Ok(true);
        }
        let permit = self
            .admission
            .admit(64 * hits.len())
            .map_err(|error| error.grpc_status())?;
        if let Some(cluster) = self.admission.cluster.clone() {
            // Cluster mode: forwarded to each tenant's owner like any edge's usage (the owner
            // decides its quotas), durable in the ingest topic before the answer.
            return self
                .admission
                .forward(
                    Source::Envoy,
                    cluster,
                    permit,
                    move |shared: &Shared, now: i64| Ok(forwarded_hits(shared, &hits, now)),
                )
                .await
                .map(|_| true)
                .map_err(|error| error.grpc_status());
        }
        self.admission
            .commit(Source::Envoy, permit, move |shared: &Shared, now: i64| {
                let dims = shared.names.dims.intern(&[]);
                let updates = hits.iter().filter_map(|(tenant, slug, units)| {
                    let meter = shared.meters.by_slug(slug)?;
                    let key = SeriesKey {
                        meter: meter.id,
                        tenant: shared.names.tenants.intern(tenant),
                        dims,
                        window_start: meter.window_size.start_of(now),
                    };
                    Some((key, hit_state(meter.aggregation, *units)))
                });
                let units: Vec<ForwardedUnit> = if whole {
                    vec![ForwardedUnit {
                        dedup_key: None,
                        updates: updates.collect(),
                    }]
                } else {
                    updates
                        .map(|update| ForwardedUnit {
                            dedup_key: None,
                            updates: vec![update],
                        })
                        .collect()
                };
                let received_at = received_at(now);
                Ok(Prepared {
                    tally: Tally {
                        accepted: units.len(),
                        ..Tally::default()
                    },
                    units,
                    cumulative: Vec::new(),
                    dead_letters: Vec::new(),
                    answer: (),
                    refuse: Some(Box::new(move |unit: &ForwardedUnit, _: &mut (), reason, message: &str| {
                        let series: Vec<serde_json::Value> = unit
                            .updates
                            .iter()
                            .map(|(key, _)| serde_json::json!({"meter_id": key.meter, "window_start": key.window_start}))
                            .collect();
                        dead_letter_line(&received_at, Source::Envoy, reason, message, serde_json::json!({"series": series}))
                    })),
                    limited: Limited::Quotas,
                })
            })
            .await
            .map(|admitted| admitted.tally.refused.is_empty())
            .map_err(|error| error.grpc_status())
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

fn borrowed_asks(asks: &[(String, String, i128)]) -> Vec<Ask<'_>> {
    asks.iter()
        .map(|(tenant, meter, units)| Ask {
            tenant,
            meter,
            units: *units,
        })
        .collect()
}

/// Cluster mode: envoy meters' hits as forwarded usage, one message per tenant (its owner
/// counts them; each hit is its own usage, so no dedup key).
fn forwarded_hits(
    shared: &Shared,
    hits: &[(String, String, i128)],
    now: i64,
) -> crate::ingest::admission::Forward<()> {
    use crate::cluster::forward::{ForwardedPoint, ForwardedUpdate, ForwardedUsage, CONTENT_TYPE};
    let mut by_tenant: std::collections::BTreeMap<&str, Vec<ForwardedPoint>> = Default::default();
    for (tenant, slug, units) in hits {
        let Some(meter) = shared.meters.by_slug(slug) else {
            continue;
        };
        by_tenant.entry(tenant).or_default().push(ForwardedPoint {
            dedup_key: None,
            updates: vec![ForwardedUpdate {
                meter: slug.clone(),
                window_start: meter.window_size.start_of(now),
                dims: Vec::new(),
                state: hit_state(meter.aggregation, *units),
            }],
        });
    }
    let messages = by_tenant
        .into_iter()
        .map(|(tenant, points)| {
            let usage = ForwardedUsage {
                tenant: tenant.to_string(),
                points,
            };
            (tenant.to_string(), usage.encode())
        })
        .collect();
    crate::ingest::admission::Forward {
        messages,
        content_type: Some(CONTENT_TYPE),
        dead_letters: Vec::new(),
        tally: Tally::default(),
        answer: (),
    }
}

/// An envoy meter's state for `units` hits (COUNT: whole hits; SUM: units at its scale).
fn hit_state(aggregation: crate::aggregate::Aggregation, units: i128) -> AggState {
    match aggregation {
        crate::aggregate::Aggregation::Count => AggState::Count(u64::try_from(units).unwrap_or(u64::MAX)),
        _ => AggState::Sum(units.into()),
    }
}

/// Serves RLS, RLQS and `tallyd.quota.v1` on `listener` until `shutdown`, over TLS when `tls`
/// is set (rustls with the reloading certificate and optional client certificates, as the
/// OTLP/gRPC listener does).
pub async fn serve(
    admission: Admission,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
) -> Result<(), tonic::transport::Error> {
    use crate::ingest::listen;
    let shared = admission.shared.clone();
    let limits = shared.config.connections;
    let edge = LimitsEdge {
        shared,
        admission,
        shutdown: shutdown.clone(),
    };
    let rls = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer::new(
        rls::Rls(edge.clone()),
    );
    let rlqs = envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer::new(
        rlqs::Rlqs(edge.clone()),
    );
    let quota = proto::quota_server::QuotaServer::new(quota::QuotaService(edge));
    let incoming = listen::accept(listener, LISTENER, limits, shutdown.clone());
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(listen::H2_PING_INTERVAL))
        .http2_keepalive_timeout(Some(listen::H2_PING_TIMEOUT))
        .add_service(rls)
        .add_service(rlqs)
        .add_service(quota);
    let stop = async move { shutdown.cancelled().await };
    match tls {
        None => router.serve_with_incoming_shutdown(incoming, stop).await,
        Some(mut config) => {
            config.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let incoming = listen::handshake(incoming, acceptor, LISTENER, limits);
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    }
}
