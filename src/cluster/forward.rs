//! Forwarded usage, the cluster's own record on the ingest topic: an edge that maps OTLP
//! points produces their series updates here (keyed by tenant), and the partition's owner folds
//! them with its Kafka batch. Format: postcard, header `content-type: application/x-tallyd-usage;
//! v=1` (the version is in the header: a record of another version is dead-lettered, never
//! misread).
//!
//! Must not: trust what it decodes beyond its shape; the owner checks every meter and state kind
//! against its own config (`intern`).

use serde::{Deserialize, Serialize};

use crate::aggregate::AggState;
use crate::meter::Meters;
use crate::model::{Names, SeriesKey};

/// Header value marking a forwarded-usage message on the ingest topic.
pub const CONTENT_TYPE: &str = "application/x-tallyd-usage; v=1";

/// Header carrying the hex HMAC-SHA256 of the payload with `[cluster] secret`.
pub const SIGNATURE_HEADER: &str = "tallyd-signature";

/// The signature of a forwarded-usage payload.
pub fn sign(secret: &[u8], payload: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("invariant: HMAC takes any key length");
    mac.update(payload);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Whether `signature` (hex) is the payload's signature with `secret`, compared in constant time.
pub fn verify(secret: &[u8], payload: &[u8], signature: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let Some(bytes) = decode_hex(signature) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("invariant: HMAC takes any key length");
    mac.update(payload);
    mac.verify_slice(&bytes).is_ok()
}

fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    text.chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// One forwarded point, interned: its dedup key and its series updates.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardedUnit {
    /// Counted once per key (None: idempotent updates).
    pub dedup_key: Option<u128>,
    pub updates: Vec<(SeriesKey, AggState)>,
}

/// Why forwarded usage cannot be counted on this replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InternError {
    #[error("meter `{0}` is not configured on this replica")]
    UnknownMeter(String),
    #[error("meter `{0}`: not a state tallyd makes (malformed)")]
    InvalidState(String),
    #[error("meter `{meter}` is {here} here, the update is {update}")]
    OtherKind {
        meter: String,
        here: &'static str,
        update: &'static str,
    },
}

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
    pub fn intern(&self, names: &Names, meters: &Meters) -> Result<Vec<ForwardedUnit>, InternError> {
        for update in self.points.iter().flat_map(|point| &point.updates) {
            if !update.state.is_valid() {
                return Err(InternError::InvalidState(update.meter.clone()));
            }
            let Some(meter) = meters.by_slug(&update.meter) else {
                return Err(InternError::UnknownMeter(update.meter.clone()));
            };
            if meter.aggregation.state_kind() != update.state.kind() {
                return Err(InternError::OtherKind {
                    meter: update.meter.clone(),
                    here: meter.aggregation.as_str(),
                    update: update.state.kind(),
                });
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
                ForwardedUnit {
                    dedup_key: point.dedup_key,
                    updates,
                }
            })
            .collect())
    }
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
        // Golden bytes (version 1 of `forwarded_usage`, see `store::format`): replicas of
        // different builds exchange these records, so the encoding must not drift.
        let hex: String = message.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0461636d6501010701087265717565737473f0010105726f757465022f780054"
        );
        let decoded = ForwardedUsage::decode(&message.encode()).unwrap();
        assert_eq!(decoded, message);
        let config = crate::config::Config::load(crate::config::DEFAULT_CONFIG, &Default::default()).unwrap();
        let meters = crate::meter::Meters::new(config.meters.clone(), &names);
        let interned = decoded.intern(&names, &meters).unwrap();
        let (key, got) = &interned[0].updates[0];
        assert_eq!(interned[0].dedup_key, Some(7));
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
            .to_string()
            .contains("not configured"));
    }
}
