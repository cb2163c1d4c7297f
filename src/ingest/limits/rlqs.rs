//! Envoy RLQS v3 (`envoy.service.rate_limit_quota.v3.RateLimitQuotaService/
//! StreamRateLimitQuotas`): Envoy reports its buckets; each `bucket_id` names a tenant and a meter
//! (`[limits] tenant_key`, `meter_key`). The answer to every report is each reported bucket's
//! assignment, and a change of a bucket's limits (the gate's signals) pushes a new one at once:
//! `DENY_ALL` while a hard quota is exhausted (TTL until its period resets), a `token_bucket`
//! for a rate limit (one token per `per / limit`, `burst` tokens), `ALLOW_ALL` otherwise, and
//! `AbandonAction` for buckets naming no tenant with a plan or no known meter.
//! Each report's `num_requests_allowed` of a `source = "envoy"` meter's bucket is recorded as
//! usage (a failed recording is logged: the report is not sent again).

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use envoy_types::pb::envoy::r#type::v3::{RateLimitStrategy, TokenBucket};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::{
    AbandonAction, BucketAction as Action, QuotaAssignmentAction,
};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::BucketAction;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaService;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::LimitsEdge;
use crate::auth::Scope;
use crate::limit::{Kind, Mode};
use crate::state::limits::Answer;
use crate::telemetry;

/// How long an ALLOW_ALL or token-bucket assignment holds if no report renews it.
const ASSIGNMENT_TTL: Duration = Duration::from_secs(300);

/// Distinct buckets one stream may report: each is remembered for the stream's life (to push
/// its changes), so a client naming ever new buckets would otherwise grow the server without
/// bound. Envoy reports one bucket per tenant and meter it limits.
pub const MAX_BUCKETS_PER_STREAM: usize = 10_000;

pub struct Rlqs(pub LimitsEdge);

fn proto_duration(duration: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A bucket's assignment from its meter's limits as they stand.
fn assignment(answer: &Answer, now_ms: i64) -> Action {
    if !answer.known {
        return Action::AbandonAction(AbandonAction {});
    }
    let assign = |strategy: Strategy, ttl: Duration| {
        Action::QuotaAssignmentAction(QuotaAssignmentAction {
            assignment_time_to_live: Some(proto_duration(ttl)),
            rate_limit_strategy: Some(RateLimitStrategy {
                strategy: Some(strategy),
            }),
        })
    };
    let exhausted = answer.limits.iter().find(|standing| {
        standing.limit.kind == Kind::Quota && standing.limit.mode == Mode::Hard && standing.remaining <= 0
    });
    if let Some(standing) = exhausted {
        let until_reset = Duration::from_millis((standing.resets_at_ms - now_ms).max(1000) as u64);
        return assign(Strategy::BlanketRule(BlanketRule::DenyAll as i32), until_reset);
    }
    let rate = answer
        .limits
        .iter()
        .find_map(|standing| standing.limit.rate.map(|spec| (standing, spec)));
    if let Some((standing, spec)) = rate {
        let per_unit = 10i128.pow(standing.limit.scale);
        let whole = |units: i128| u32::try_from((units / per_unit).max(1)).unwrap_or(u32::MAX);
        // One token per emission interval: the GCRA's own rate, in whole units.
        let interval_ns = (spec.per_ns * per_unit / spec.limit.max(1)).max(1);
        return assign(
            Strategy::TokenBucket(TokenBucket {
                max_tokens: whole(spec.burst),
                tokens_per_fill: Some(UInt32Value { value: 1 }),
                fill_interval: Some(proto_duration(Duration::from_nanos(
                    u64::try_from(interval_ns).unwrap_or(u64::MAX),
                ))),
            }),
            ASSIGNMENT_TTL,
        );
    }
    assign(
        Strategy::BlanketRule(BlanketRule::AllowAll as i32),
        ASSIGNMENT_TTL,
    )
}

/// What an assignment does, without its TTL (None: abandon).
fn strategy(action: &Action) -> Option<Option<RateLimitStrategy>> {
    match action {
        Action::QuotaAssignmentAction(assignment) => Some(assignment.rate_limit_strategy),
        Action::AbandonAction(_) => None,
    }
}

/// A bucket's (tenant, meter) by the configured keys (empty when absent).
fn names(bucket: &BucketId, tenant_key: &str, meter_key: &str) -> (String, String) {
    let get = |key: &str| bucket.bucket.get(key).cloned().unwrap_or_default();
    (get(tenant_key), get(meter_key))
}

#[tonic::async_trait]
impl RateLimitQuotaService for Rlqs {
    type StreamRateLimitQuotasStream = ReceiverStream<Result<RateLimitQuotaResponse, Status>>;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Self::StreamRateLimitQuotasStream>, Status> {
        let edge = self.0.clone();
        let principal = edge.principal(&request, Scope::Ingest)?;
        let mut reports = request.into_inner();
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let config = edge.shared.config.limits.clone();
            let mut signals = edge.shared.limits.subscribe();
            // Cluster mode: what the owners publish (an exhausted quota) re-assigns too.
            let mut published = edge.shared.limits.replicated.subscribe();
            // Every bucket reported on this stream, with the action last sent for it.
            let mut buckets: BTreeMap<Vec<(String, String)>, (BucketId, String, String, Action)> =
                BTreeMap::new();
            loop {
                // Buckets to answer for, and whether a report asked (else a signal: only a
                // changed assignment is pushed).
                let mut changed: Vec<(Vec<(String, String)>, bool)> = Vec::new();
                tokio::select! {
                    _ = edge.shutdown.cancelled() => return,
                    _ = sender.closed() => return,
                    report = reports.message() => {
                        let report = match report {
                            Ok(Some(report)) => report,
                            Ok(None) | Err(_) => return,
                        };
                        if report.domain != config.envoy_domain {
                            let _ = sender.send(Err(Status::invalid_argument(format!(
                                "domain `{}` is not served here (limits.envoy_domain = `{}`)",
                                report.domain, config.envoy_domain
                            )))).await;
                            return;
                        }
                        let mut allowed = Vec::new();
                        for usage in report.bucket_quota_usages {
                            let bucket = usage.bucket_id.unwrap_or_default();
                            let (tenant, meter) = names(&bucket, &config.tenant_key, &config.meter_key);
                            if let Ok(units) = edge.units_of(&meter, Some(usage.num_requests_allowed), None) {
                                allowed.push((tenant.clone(), meter.clone(), units));
                            }
                            if !tenant.is_empty() && !principal.covers(&tenant) {
                                let _ = sender.send(Err(Status::permission_denied(format!(
                                    "this key is for another tenant than `{tenant}`"
                                )))).await;
                                return;
                            }
                            let mut key: Vec<(String, String)> = bucket.bucket.clone().into_iter().collect();
                            key.sort();
                            if buckets.len() >= MAX_BUCKETS_PER_STREAM && !buckets.contains_key(&key) {
                                metrics::counter!(telemetry::LIMITS_REQUESTS, "service" => "rlqs", "code" => "resource_exhausted")
                                    .increment(1);
                                let _ = sender.send(Err(Status::resource_exhausted(format!(
                                    "more than {MAX_BUCKETS_PER_STREAM} buckets reported on one stream; \
                                     open another stream for more"
                                )))).await;
                                return;
                            }
                            buckets.insert(key.clone(), (bucket, tenant, meter, Action::AbandonAction(AbandonAction {})));
                            changed.push((key, true));
                        }
                        // What Envoy allowed of `source = "envoy"` meters is usage.
                        if let Err(status) = edge.record_hits(allowed, false).await {
                            tracing::warn!(%status, "RLQS usage not recorded; Envoy reports it again only as new usage");
                        }
                        metrics::counter!(telemetry::LIMITS_REQUESTS, "service" => "rlqs", "code" => "ok").increment(1);
                    }
                    signal = signals.recv() => match signal {
                        Ok(signal) => changed.extend(
                            buckets
                                .iter()
                                .filter(|(_, (_, tenant, meter, _))| {
                                    **tenant == *signal.tenant && *meter == signal.standing.limit.meter
                                })
                                .map(|(key, _)| (key.clone(), false)),
                        ),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            changed.extend(buckets.keys().map(|key| (key.clone(), false)))
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    change = published.recv() => match change {
                        Ok((tenant, meter)) => changed.extend(
                            buckets
                                .iter()
                                .filter(|(_, (_, of, named, _))| *of == tenant && *named == meter)
                                .map(|(key, _)| (key.clone(), false)),
                        ),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            changed.extend(buckets.keys().map(|key| (key.clone(), false)))
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
                if changed.is_empty() {
                    continue;
                }
                let asks: Vec<(String, String, i128)> = changed
                    .iter()
                    .map(|(key, _)| {
                        let (_, tenant, meter, _) = &buckets[key];
                        (tenant.clone(), meter.clone(), 1)
                    })
                    .collect();
                let answers = match edge.ask(asks, false).await {
                    Ok(answers) => answers,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                let now_ms = crate::model::now_ms();
                let mut actions = Vec::new();
                for ((key, reported), answer) in changed.iter().zip(&answers) {
                    let action = assignment(answer, now_ms);
                    let entry = buckets.get_mut(key).expect("invariant: collected above");
                    let unchanged = strategy(&entry.3) == strategy(&action);
                    entry.3 = action;
                    if *reported || !unchanged {
                        actions.push(BucketAction {
                            bucket_id: Some(entry.0.clone()),
                            bucket_action: Some(action),
                        });
                    }
                }
                if actions.is_empty() {
                    continue;
                }
                metrics::counter!(telemetry::LIMIT_SIGNALS, "channel" => "rlqs")
                    .increment(actions.len() as u64);
                if sender
                    .send(Ok(RateLimitQuotaResponse {
                        bucket_action: actions,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
