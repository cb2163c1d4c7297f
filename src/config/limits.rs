//! `[limits]`: the limits listener (Envoy RLS v3, Envoy RLQS v3 and `tallyd.quota.v1` on one
//! gRPC port) and how Envoy's descriptors name tenants and meters. The limits themselves are
//! the plans' (`[[plans.limits]]`, `crate::limit`).

use std::net::SocketAddr;

use super::raw::RawLimits;

/// Validated `[limits]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    pub grpc_addr: Option<SocketAddr>,
    pub envoy_domain: String,
    pub tenant_key: String,
    pub meter_key: String,
    pub signal_topic: String,
    pub tls: Option<super::raw::RawTls>,
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
    if let Some(tls) = &raw.tls {
        super::server::check_tls_files("limits.tls", tls, errors);
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
        tls: raw.tls,
    }
}
