//! The signal topic (`[limits] signal_topic`, when `[kafka]` is configured): every limit state
//! change the gate signals (`state::limits::Signal`) as a record keyed `tenant/meter/kind` —
//! a compacted topic, so a new reader finds each limit's latest state — with the JSON value
//! `{tenant, meter, kind, mode, state, used, limit, remaining, period_start, period_end,
//! resets_at, retry_at, at, crossed}`. Amounts are exact decimal strings in the meter's units;
//! `retry_at` (null but for a rate limit `exceeded`) is when the excess has drained: a log's
//! usage is charged whatever the answer, so a tenant past its rate stays over until then, and
//! edges in cluster mode refuse it until then (`state::limits::Replicated`).
//!
//! Best effort by nature: a state is superseded by the next one, so a record that cannot be
//! delivered (librdkafka retries it, idempotently) is counted and logged, never replayed.
//!
//! Threshold crossings also go to the webhook (`[emit.webhook]`, signed like rated records):
//! `{"records": [{"kind": "limit", ...the fields above}]}`, retried with backoff for about a
//! minute, then dropped (the topic and `Watch` carry the same state).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::kafka::{create_topics, producer_config, DeliveryContext};
use crate::model::{rfc3339, rfc3339_ms};
use crate::state::limits::Signal;
use crate::state::Shared;
use crate::telemetry;

/// A signal as the topic carries it: (key, JSON value).
pub fn record(signal: &Signal) -> (String, Vec<u8>) {
    let standing = &signal.standing;
    let limit = &standing.limit;
    let key = format!("{}/{}/{}", signal.tenant, limit.meter, limit.kind.as_str());
    let resets_at = match standing.resets_at_ms.rem_euclid(1000) {
        0 => rfc3339(standing.resets_at_ms.div_euclid(1000)),
        _ => rfc3339_ms(standing.resets_at_ms),
    };
    let value = json!({
        "tenant": &*signal.tenant,
        "meter": limit.meter,
        "kind": limit.kind.as_str(),
        "mode": limit.mode.as_str(),
        "state": standing.state.as_str(),
        "used": limit.format(standing.used),
        "limit": limit.format(limit.limit),
        "remaining": limit.format(standing.remaining),
        "period_start": rfc3339(standing.period.0),
        "period_end": rfc3339(standing.period.1),
        "resets_at": resets_at,
        "retry_at": standing.retry_at_ms.map(rfc3339_ms),
        "at": rfc3339_ms(signal.at_ms),
        "crossed": signal.crossed,
    });
    (
        key,
        serde_json::to_vec(&value).expect("invariant: signals serialize"),
    )
}

/// Posts threshold crossings to the webhook, on a thread of its own (the sink blocks); none
/// without `[emit.webhook]`.
pub fn spawn_webhook(shared: &Arc<Shared>) -> Result<(), super::EmitError> {
    use super::Sink;
    let Some(config) = &shared.config.emit_webhook else {
        return Ok(());
    };
    let mut sink = super::webhook::WebhookSink::new(config)?;
    let mut signals = shared.limits.subscribe();
    std::thread::Builder::new()
        .name("tallyd-limit-webhook".into())
        .spawn(move || loop {
            let signal = match signals.blocking_recv() {
                Ok(signal) if !signal.crossed.is_empty() => signal,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let (_, value) = record(&signal);
            let mut value: serde_json::Value = serde_json::from_slice(&value).expect("invariant: just serialized");
            value["kind"] = json!("limit");
            let line = serde_json::to_vec(&value).expect("invariant: signals serialize");
            let mut delay = Duration::from_millis(500);
            for attempt in 1..=8 {
                match sink.deliver(&[&line]) {
                    Ok(()) => {
                        metrics::counter!(telemetry::LIMIT_SIGNALS, "channel" => "webhook").increment(1);
                        break;
                    }
                    Err(error) => {
                        metrics::counter!(telemetry::EMIT_FAILURES, "output" => "limit_webhook").increment(1);
                        tracing::warn!(%error, attempt, tenant = %signal.tenant, "threshold webhook not delivered");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(16));
                    }
                }
            }
        })?;
    Ok(())
}

/// Publishes the gate's signals to the signal topic until `shutdown` (then flushes).
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(kafka) = shared.config.kafka.clone() else {
        return;
    };
    // Subscribed first: states signalled while the topic is set up wait in the channel.
    let mut signals = shared.limits.subscribe();
    let topic = shared.config.limits.signal_topic.clone();
    let wanted = NewTopic::new(&topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    if let Err(error) = create_topics(&kafka, &[wanted]).await {
        tracing::warn!(%error, topic, "signal topic not created; create it yourself (compacted)");
    }
    let producer: BaseProducer<DeliveryContext> =
        match producer_config(&kafka).create_with_context(DeliveryContext::new("signals")) {
            Ok(producer) => producer,
            Err(error) => {
                tracing::error!(%error, "no signal topic producer; limit states are not published");
                return;
            }
        };
    let secret = shared
        .config
        .cluster
        .as_ref()
        .map(|cluster| cluster.secret.as_bytes());
    tracing::info!(topic, "publishing limit states");
    loop {
        let signal = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = signals.recv() => match received {
                Ok(signal) => signal,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "signal topic fell behind; later states supersede the missed ones");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        };
        let (key, value) = record(&signal);
        let mut message = BaseRecord::to(&topic).key(&key).payload(&value);
        // Cluster mode: edges refuse tenants by these states, so only a replica may write
        // them (`cluster::limits` ignores records without this cluster's signature).
        let signature = secret.map(|secret| crate::cluster::members::sign(secret, &key, &value));
        if let Some(signature) = &signature {
            message = message.headers(rdkafka::message::OwnedHeaders::new().insert(
                rdkafka::message::Header {
                    key: crate::cluster::forward::SIGNATURE_HEADER,
                    value: Some(signature.as_str()),
                },
            ));
        }
        match producer.send(message) {
            Ok(()) => metrics::counter!(telemetry::LIMIT_SIGNALS, "channel" => "kafka").increment(1),
            Err((error, _)) => {
                tracing::warn!(%error, key, "limit state not queued for the signal topic");
                metrics::counter!(telemetry::EMIT_FAILURES, "output" => "signals").increment(1);
            }
        }
        producer.poll(Duration::ZERO);
    }
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Kind, Limit, Mode, State};
    use crate::state::limits::{Replicated, Standing};

    /// The period the events below fall in: the 30 days around now (`Replicated::apply`
    /// forgets states whose reset has passed by the wall clock, so fixed dates would expire).
    fn period() -> (i64, i64) {
        let now = crate::model::now_ms().div_euclid(1000);
        (now - 10 * 86_400, now + 20 * 86_400)
    }

    fn signal(state: State, mode: Mode, used: i128) -> Signal {
        let (start, end) = period();
        Signal {
            tenant: Arc::from("acme"),
            standing: Standing {
                limit: Limit {
                    meter: "tokens".into(),
                    kind: Kind::Quota,
                    mode,
                    limit: 100,
                    scale: 0,
                    thresholds: vec![80, 100],
                    rate: None,
                },
                used,
                remaining: (100 - used).max(0),
                state,
                period: (start, end),
                resets_at_ms: end * 1000,
                retry_at_ms: None,
            },
            crossed: vec![],
            at_ms: crate::model::now_ms(),
        }
    }

    /// What an owner publishes is what an edge admits by: an exhausted hard quota refuses
    /// events of its period until it resets; a soft one, another period, or a later `ok`
    /// (a new period, a raised limit) refuses nothing.
    #[test]
    fn edges_read_back_the_states_owners_publish() {
        let replicated = Replicated::default();
        let (start, end) = period();
        let now_ms = crate::model::now_ms();
        let now = now_ms.div_euclid(1000);
        replicated
            .apply(&record(&signal(State::Exceeded, Mode::Soft, 120)).1)
            .unwrap();
        assert_eq!(replicated.exhausted("acme", "tokens", now, now_ms), None);
        replicated
            .apply(&record(&signal(State::Exceeded, Mode::Hard, 100)).1)
            .unwrap();
        assert_eq!(
            replicated.exhausted("acme", "tokens", now, now_ms),
            Some(end * 1000)
        );
        assert_eq!(replicated.exhausted("globex", "tokens", now, now_ms), None);
        assert_eq!(replicated.exhausted("acme", "api_calls", now, now_ms), None);
        // An event of the period before (late) or after is another period's.
        assert_eq!(replicated.exhausted("acme", "tokens", start - 1, now_ms), None);
        assert_eq!(replicated.exhausted("acme", "tokens", end, now_ms), None);
        // Past the reset, nothing is refused even before a new state arrives.
        assert_eq!(replicated.exhausted("acme", "tokens", now, end * 1000), None);
        replicated
            .apply(&record(&signal(State::Ok, Mode::Hard, 0)).1)
            .unwrap();
        assert!(replicated.is_empty());
        assert!(replicated.apply(b"{not json").is_err());
    }

    /// A rate limit `exceeded` carries when its excess drains (`retry_at`): edges refuse the
    /// tenant until then, or until the owner publishes `ok`.
    #[test]
    fn edges_hold_a_rate_exceeded_until_it_drains() {
        let now_ms = crate::model::now_ms();
        let rate = |state: State, retry_at_ms: Option<i64>| {
            let mut signal = signal(state, Mode::Hard, 100);
            signal.standing.limit.kind = Kind::Rate;
            signal.standing.limit.rate = Some(crate::limit::RateSpec {
                limit: 100,
                per_ns: 60_000_000_000,
                burst: 100,
            });
            signal.standing.period = (now_ms / 1000, now_ms / 1000 + 120);
            signal.standing.resets_at_ms = now_ms + 120_000;
            signal.standing.retry_at_ms = retry_at_ms;
            record(&signal).1
        };
        let value: serde_json::Value =
            serde_json::from_slice(&rate(State::Exceeded, Some(now_ms + 60_000))).unwrap();
        assert_eq!(value["retry_at"], rfc3339_ms(now_ms + 60_000));
        assert_eq!(value["kind"], "rate");
        let replicated = Replicated::default();
        replicated
            .apply(&rate(State::Exceeded, Some(now_ms + 60_000)))
            .unwrap();
        assert_eq!(
            replicated.throttled("acme", "tokens", now_ms),
            Some(now_ms + 60_000)
        );
        assert_eq!(replicated.throttled("acme", "tokens", now_ms + 60_000), None);
        assert_eq!(replicated.throttled("globex", "tokens", now_ms), None);
        // A rate's state says nothing of the quota of the same meter.
        assert_eq!(
            replicated.exhausted("acme", "tokens", now_ms / 1000, now_ms),
            None
        );
        replicated.apply(&rate(State::Ok, None)).unwrap();
        assert_eq!(replicated.throttled("acme", "tokens", now_ms), None);
        assert!(replicated.is_empty());
        // Without `retry_at` (an older writer): held until the burst is whole.
        replicated.apply(&rate(State::Exceeded, None)).unwrap();
        assert_eq!(
            replicated.throttled("acme", "tokens", now_ms),
            Some(now_ms + 120_000)
        );
    }
}
