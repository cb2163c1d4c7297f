//! `[limits]`: the limits listener (Envoy RLS v3, Envoy RLQS v3 and `tallyd.quota.v1` on one
//! gRPC port) and how Envoy's descriptors name tenants and meters. The limits themselves are
//! the plans' (`[[plans.limits]]`, `crate::limit`).

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// `""` turns the listener off.
    pub grpc_addr: String,
    /// RLS/RLQS requests for another domain get an error.
    pub envoy_domain: String,
    /// The descriptor entry / RLQS bucket_id key that names the tenant.
    pub tenant_key: String,
    /// ... and the meter.
    pub meter_key: String,
    /// Compacted Kafka topic of limit states (when `[kafka]` is configured).
    pub signal_topic: String,
}

impl Default for RawLimits {
    fn default() -> RawLimits {
        RawLimits {
            grpc_addr: "127.0.0.1:8081".into(),
            envoy_domain: "tallyd".into(),
            tenant_key: "tenant".into(),
            meter_key: "meter".into(),
            signal_topic: "tallyd.signals".into(),
        }
    }
}

/// Validated `[limits]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    pub grpc_addr: Option<SocketAddr>,
    pub envoy_domain: String,
    pub tenant_key: String,
    pub meter_key: String,
    pub signal_topic: String,
}

pub(super) fn validate_limits(raw: RawLimits, errors: &mut Vec<String>) -> LimitsConfig {
    let grpc_addr = super::server::optional_addr("limits.grpc_addr", &raw.grpc_addr, errors);
    for (key, value) in [
        ("envoy_domain", &raw.envoy_domain),
        ("tenant_key", &raw.tenant_key),
        ("meter_key", &raw.meter_key),
        ("signal_topic", &raw.signal_topic),
    ] {
        if value.trim().is_empty() {
            errors.push(format!("limits.{key}: must not be empty"));
        }
    }
    if raw.tenant_key == raw.meter_key {
        errors.push("limits.meter_key: must differ from limits.tenant_key".into());
    }
    LimitsConfig {
        grpc_addr,
        envoy_domain: raw.envoy_domain,
        tenant_key: raw.tenant_key,
        meter_key: raw.meter_key,
        signal_topic: raw.signal_topic,
    }
}
