//! OTLP in cluster mode: the edge maps a request as usual, then produces its accepted points to
//! the ingest topic, keyed by tenant, as `ForwardedUsage` messages (postcard, header
//! `content-type: application/x-tallyd-usage; v=1`); the partition's owner folds them with its
//! Kafka batch (dedup by the point's key, exactly as for a local export) and the client is
//! answered only once Kafka acknowledged every message.
//!
//! What is forwarded is the point's *updates* (series and state), so any point that maps to
//! stateless updates travels: delta sums, histograms' count and sum (and DISTRIBUTION from delta
//! histograms), gauges for MAX/MIN/LATEST, log records. Cumulative points, TIME_WEIGHTED gauges
//! and cumulative histogram buckets need the stream's previous point, which lives with the
//! partition's owner and is not replicated yet: in cluster mode they are refused per point with
//! a reason naming the fix (delta temporality; the Collector's `cumulativetodelta` processor).

use serde::{Deserialize, Serialize};

use crate::aggregate::AggState;
use crate::model::{Names, SeriesKey};

use super::map::{Mapped, PointRefusal, RefusalReason};

/// Header value marking a forwarded-usage message on the ingest topic.
pub const CONTENT_TYPE: &str = "application/x-tallyd-usage; v=1";

/// Points per message: keeps messages far below broker limits.
const POINTS_PER_MESSAGE: usize = 500;

/// One forwarded point, interned: its dedup key and its series updates.
pub type PointUpdates = (Option<u128>, Vec<(SeriesKey, AggState)>);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ForwardedUsage {
    pub tenant: String,
    pub points: Vec<ForwardedPoint>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ForwardedPoint {
    /// Counted once per key (None: idempotent updates).
    pub dedup_key: Option<u128>,
    pub updates: Vec<ForwardedUpdate>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ForwardedUpdate {
    pub meter: String,
    pub window_start: i64,
    pub dims: Vec<(String, String)>,
    pub state: AggState,
}

impl ForwardedUsage {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: forwarded usage serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<ForwardedUsage, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The points' updates with ids interned locally, or why not: every meter must be one this
    /// replica has with the same state kind (replicas share a config, but a rolling change may
    /// not have reached this one yet).
    pub fn intern(&self, names: &Names, meters: &crate::meter::Meters) -> Result<Vec<PointUpdates>, String> {
        for update in self.points.iter().flat_map(|point| &point.updates) {
            let Some(meter) = meters.by_slug(&update.meter) else {
                return Err(format!(
                    "meter `{}` is not configured on this replica",
                    update.meter
                ));
            };
            if meter.aggregation.state_kind() != update.state.kind() {
                return Err(format!(
                    "meter `{}` is {} here, the update is {}",
                    update.meter,
                    meter.aggregation.as_str(),
                    update.state.kind()
                ));
            }
        }
        let tenant = names.tenants.intern(&self.tenant);
        Ok(self
            .points
            .iter()
            .map(|point| {
                let updates = point
                    .updates
                    .iter()
                    .map(|update| {
                        let key = SeriesKey {
                            meter: names.meters.intern(&update.meter),
                            tenant,
                            dims: names.dims.intern(&update.dims),
                            window_start: update.window_start,
                        };
                        (key, update.state.clone())
                    })
                    .collect();
                (point.dedup_key, updates)
            })
            .collect())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Aggregation, Observation};

    #[test]
    fn forwarded_usage_round_trips_and_interns_locally() {
        let names = Names::default();
        let state = AggState::from_observation(Aggregation::Sum, Observation::Value(42), 0, 0);
        let message = ForwardedUsage {
            tenant: "acme".into(),
            points: vec![ForwardedPoint {
                dedup_key: Some(7),
                updates: vec![ForwardedUpdate {
                    meter: "requests".into(),
                    window_start: 120,
                    dims: vec![("route".into(), "/x".into())],
                    state: state.clone(),
                }],
            }],
        };
        let decoded = ForwardedUsage::decode(&message.encode()).unwrap();
        assert_eq!(decoded, message);
        let config = crate::config::Config::load(crate::config::DEFAULT_CONFIG, &Default::default()).unwrap();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let interned = decoded.intern(&names, &meters).unwrap();
        let (key, got) = &interned[0].1[0];
        assert_eq!(interned[0].0, Some(7));
        assert_eq!(&*names.tenants.resolve(key.tenant), "acme");
        assert_eq!(&*names.meters.resolve(key.meter), "requests");
        assert_eq!(key.window_start, 120);
        assert_eq!(got, &state);
        assert!(ForwardedUsage::decode(b"\xff\xff").is_err());
        let unknown = ForwardedUsage {
            tenant: "acme".into(),
            points: vec![ForwardedPoint {
                dedup_key: None,
                updates: vec![ForwardedUpdate {
                    meter: "nope".into(),
                    window_start: 0,
                    dims: vec![],
                    state,
                }],
            }],
        };
        assert!(unknown
            .intern(&names, &meters)
            .unwrap_err()
            .contains("not configured"));
    }
}
