//! OTLP in cluster mode: the edge maps a request as usual, then produces its accepted points to
//! the ingest topic, keyed by tenant, as `ForwardedUsage` messages (`cluster::forward`: the
//! wire format); the partition's owner folds them with its Kafka batch (dedup by the point's
//! key, exactly as for a local export) and the client is answered only once Kafka acknowledged
//! every message.
//!
//! What is forwarded is the point's *updates* (series and state), so any point that maps to
//! stateless updates travels: delta sums, histograms' count and sum (and DISTRIBUTION from delta
//! histograms), gauges for MAX/MIN/LATEST, log records. Cumulative points, TIME_WEIGHTED gauges
//! and cumulative histogram buckets need the stream's previous point, which lives with the
//! partition's owner and is not replicated yet: in cluster mode they are refused per point with
//! a reason naming the fix (delta temporality; the Collector's `cumulativetodelta` processor).

use crate::cluster::forward::{ForwardedPoint, ForwardedUpdate, ForwardedUsage};
use crate::ingest::admission::RefusalReason;
use crate::model::Names;

use super::map::{Mapped, PointRefusal};

/// Points per message: keeps messages far below broker limits.
const POINTS_PER_MESSAGE: usize = 500;

/// Moves the points that need stream state into the refusals (cluster mode).
pub fn refuse_stateful(mapped: &mut Mapped, names: &Names) {
    let mut seen = rustc_hash::FxHashSet::default();
    for point in std::mem::take(&mut mapped.cumulative) {
        // One refusal per exported point, not per meter it feeds.
        if !seen.insert((point.stream, point.time_ns)) {
            continue;
        }
        mapped.refused.push(PointRefusal {
            reason: RefusalReason::Invalid,
            message: "cumulative and TIME_WEIGHTED points need the stream's state, which is not \
                      forwarded in cluster mode; export delta temporality (Collector: \
                      cumulativetodelta processor)"
                .into(),
            name: names.meters.resolve(point.key.meter).to_string(),
            tenant: Some(names.tenants.resolve(point.key.tenant).to_string()),
            time_unix_nano: point.time_ns,
        });
    }
}

/// Points of a tenant whose owner published the meter's hard quota as exhausted (the signal
/// topic, `state::limits::Replicated`) stop here, refused as the owner would refuse them.
pub fn refuse_exhausted(mapped: &mut Mapped, shared: &crate::state::Shared, now_ms: i64) {
    let replicated = &shared.limits.replicated;
    if replicated.is_empty() {
        return;
    }
    let names = &shared.names;
    let mut refused = Vec::new();
    mapped.points.retain(|point| {
        let exhausted = point.updates.iter().find_map(|(key, _)| {
            let tenant = names.tenants.resolve(key.tenant);
            let meter = names.meters.resolve(key.meter);
            replicated
                .exhausted(&tenant, &meter, key.window_start, now_ms)
                .map(|resets_at| (tenant, meter, resets_at, key.window_start))
        });
        let Some((tenant, meter, resets_at, window_start)) = exhausted else {
            return true;
        };
        refused.push(PointRefusal {
            reason: RefusalReason::QuotaExceeded,
            message: format!(
                "tenant `{tenant}` has used up its quota of `{meter}` this period; the quota resets at {}",
                crate::model::rfc3339(resets_at.div_euclid(1000))
            ),
            name: meter.to_string(),
            tenant: Some(tenant.to_string()),
            time_unix_nano: u64::try_from(window_start)
                .unwrap_or(0)
                .saturating_mul(1_000_000_000),
        });
        false
    });
    mapped.refused.extend(refused);
}

/// The accepted points as messages: (tenant, payload), at most `POINTS_PER_MESSAGE` each.
pub fn messages(mapped: &Mapped, names: &Names) -> Vec<(String, Vec<u8>)> {
    let mut by_tenant: rustc_hash::FxHashMap<u32, Vec<ForwardedPoint>> = Default::default();
    for point in &mapped.points {
        let Some((first, _)) = point.updates.first() else {
            continue;
        };
        let updates = point
            .updates
            .iter()
            .map(|(key, state)| ForwardedUpdate {
                meter: names.meters.resolve(key.meter).to_string(),
                window_start: key.window_start,
                dims: names.dims.resolve(key.dims).to_vec(),
                state: state.clone(),
            })
            .collect();
        by_tenant.entry(first.tenant).or_default().push(ForwardedPoint {
            dedup_key: point.dedup_key,
            updates,
        });
    }
    let mut out = Vec::new();
    for (tenant, points) in by_tenant {
        let tenant = names.tenants.resolve(tenant).to_string();
        let mut points = points.into_iter().peekable();
        while points.peek().is_some() {
            let chunk: Vec<ForwardedPoint> = points.by_ref().take(POINTS_PER_MESSAGE).collect();
            let message = ForwardedUsage {
                tenant: tenant.clone(),
                points: chunk,
            };
            out.push((tenant.clone(), message.encode()));
        }
    }
    out
}
