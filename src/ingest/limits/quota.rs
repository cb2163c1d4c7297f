//! `tallyd.quota.v1.Quota`: `Check` (would these units be allowed now? consumes nothing) and
//! `Watch` (the tenant's limits as they stand, then every change, from the gate's signals).

use std::pin::Pin;
use std::time::Instant;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::proto::quota_server::Quota;
use super::proto::{CheckRequest, CheckResponse, LimitState, WatchRequest};
use super::{observe, LimitsEdge};
use crate::auth::Scope;
use crate::model::{now_ms, rfc3339, rfc3339_ms};
use crate::state::limits::{Signal, Standing};
use crate::telemetry;

pub struct QuotaService(pub LimitsEdge);

/// A standing as `LimitState`.
pub fn limit_state(tenant: &str, standing: &Standing, crossed: &[u32], at_ms: i64) -> LimitState {
    let limit = &standing.limit;
    let time = |ms: i64| match ms.rem_euclid(1000) {
        0 => rfc3339(ms.div_euclid(1000)),
        _ => rfc3339_ms(ms),
    };
    LimitState {
        tenant: tenant.to_string(),
        meter: limit.meter.clone(),
        kind: limit.kind.as_str().into(),
        mode: limit.mode.as_str().into(),
        state: standing.state.as_str().into(),
        limit: limit.format(limit.limit),
        used: limit.format(standing.used),
        remaining: limit.format(standing.remaining),
        period_start: rfc3339(standing.period.0),
        period_end: rfc3339(standing.period.1),
        resets_at: time(standing.resets_at_ms),
        at: rfc3339_ms(at_ms),
        crossed: crossed.to_vec(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<LimitState, Status>> + Send>>;

impl QuotaService {
    /// The tenant's limits as they stand now.
    async fn current(&self, tenant: &str) -> Result<Vec<LimitState>, Status> {
        let shared = self.0.shared.clone();
        let name = tenant.to_string();
        let standings = tokio::task::spawn_blocking(move || crate::query::limits_now(&shared, &name))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(super::unavailable)?;
        let at = now_ms();
        Ok(standings
            .iter()
            .map(|standing| limit_state(tenant, standing, &[], at))
            .collect())
    }
}

#[tonic::async_trait]
impl Quota for QuotaService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let started = Instant::now();
        let tenant = request.get_ref().tenant.clone();
        let result = async {
            if tenant.is_empty() {
                return Err(Status::invalid_argument("tenant: required"));
            }
            self.0.authorize(&request, Scope::Read, [tenant.as_str()])?;
            self.0.held_here(&tenant)?;
            // Subscribed before the current states are read: no change falls in between.
            let mut signals = self.0.shared.limits.subscribe();
            let current = self.current(&tenant).await?;
            let service = QuotaService(self.0.clone());
            let (sender, receiver) = tokio::sync::mpsc::channel(64);
            // Ends when the client goes away (the send fails) or the gate is dropped.
            tokio::spawn(async move {
                let send = |state: LimitState| {
                    metrics::counter!(telemetry::LIMIT_SIGNALS, "channel" => "watch").increment(1);
                    sender.send(Ok(state))
                };
                for state in current {
                    if send(state).await.is_err() {
                        return;
                    }
                }
                loop {
                    let received = tokio::select! {
                        received = signals.recv() => received,
                        // The client went away, or the daemon stops.
                        _ = sender.closed() => return,
                        _ = service.0.shutdown.cancelled() => return,
                    };
                    let states = match received {
                        Ok(Signal {
                            tenant: of,
                            standing,
                            crossed,
                            at_ms,
                        }) if *of == *tenant => vec![limit_state(&tenant, &standing, &crossed, at_ms)],
                        Ok(_) => continue,
                        // Fell behind: the current states again, then on.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            match service.current(&tenant).await {
                                Ok(states) => states,
                                Err(status) => {
                                    let _ = sender.send(Err(status)).await;
                                    return;
                                }
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    for state in states {
                        if send(state).await.is_err() {
                            return;
                        }
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
            Ok(Box::pin(stream) as WatchStream)
        }
        .await;
        observe("watch", started, &result);
        result.map(Response::new)
    }

    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let edge = &self.0;
            let CheckRequest { tenant, meter, units } = request.get_ref().clone();
            if tenant.is_empty() || meter.is_empty() {
                return Err(Status::invalid_argument("tenant and meter: required"));
            }
            edge.authorize(&request, Scope::Read, [tenant.as_str()])?;
            edge.held_here(&tenant)?;
            if edge.shared.meters.by_slug(&meter).is_none() {
                return Err(Status::not_found(format!("meter: no meter `{meter}`")));
            }
            let units = edge
                .units_of(&meter, None, Some(&units))
                .map_err(Status::invalid_argument)?;
            let answers = edge.ask(vec![(tenant.clone(), meter, units)], false).await?;
            let answer = &answers[0];
            let at = now_ms();
            Ok(CheckResponse {
                allowed: answer.allowed,
                limits: answer
                    .limits
                    .iter()
                    .map(|standing| limit_state(&tenant, standing, &[], at))
                    .collect(),
                retry_after_seconds: match (answer.allowed, answer.retry_after_ns) {
                    (false, Some(ns)) => ns as f64 / 1e9,
                    _ => 0.0,
                },
            })
        }
        .await;
        observe("check", started, &result);
        result.map(Response::new)
    }
}
