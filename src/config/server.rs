//! `[server]` (listeners and request limits) and `[otlp]` (tenancy, keys, TLS of the OTLP
//! listeners).

use std::net::SocketAddr;

use super::raw::{RawOtlp, RawServer, RawTls};

/// Validated `[otlp]`.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub tenant_attribute: String,
    pub tls: Option<RawTls>,
}

/// The listeners' addresses (`""`: off) and request limits.
pub(super) struct Listeners {
    pub http_addr: Option<SocketAddr>,
    pub otlp_grpc_addr: Option<SocketAddr>,
    pub otlp_http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

pub(super) fn validate_server(raw: &RawServer, errors: &mut Vec<String>) -> Listeners {
    let http_addr = match raw.http_addr.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(format!(
                "server.http_addr: `{}` is not an address like 127.0.0.1:8080",
                raw.http_addr
            ));
            None
        }
    };
    let otlp_grpc_addr = optional_addr("server.otlp_grpc_addr", &raw.otlp_grpc_addr, errors);
    let otlp_http_addr = optional_addr("server.otlp_http_addr", &raw.otlp_http_addr, errors);
    let admin_addr = optional_addr("server.admin_addr", &raw.admin_addr, errors);
    if raw.max_body_bytes == 0 {
        errors.push("server.max_body_bytes: must be positive".into());
    }
    if raw.ingest_budget_bytes < raw.max_body_bytes {
        errors.push("server.ingest_budget_bytes: must be at least server.max_body_bytes".into());
    }
    if !(1..=3600).contains(&raw.body_timeout_secs) {
        errors.push("server.body_timeout_secs: must be between 1 and 3600".into());
    }
    if !(1..=1_000_000).contains(&raw.max_connections) {
        errors.push("server.max_connections: must be between 1 and 1000000".into());
    }
    if let Some(tls) = &raw.tls {
        check_tls_files("server.tls", tls, errors);
    }
    if !(1..=3600).contains(&raw.header_read_timeout_secs) {
        errors.push("server.header_read_timeout_secs: must be between 1 and 3600".into());
    }
    Listeners {
        http_addr,
        otlp_grpc_addr,
        otlp_http_addr,
        admin_addr,
    }
}

/// How each listener admits connections (`ingest::listen`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: std::time::Duration,
}

pub(super) fn validate_otlp(raw: RawOtlp, errors: &mut Vec<String>) -> OtlpConfig {
    // `api_keys` (deprecated) are folded into `[auth]` (`config::auth`); checked here.
    if raw.tenant_attribute.is_empty() {
        errors.push("otlp.tenant_attribute: must not be empty".into());
    }
    for (key, tenant) in &raw.api_keys {
        // Keys are secrets: name the tenant, never the key.
        if key.len() < 16 {
            errors.push(format!(
                "otlp.api_keys: the key of tenant `{tenant}` is shorter than 16 characters"
            ));
        }
        if tenant.is_empty() || tenant.len() > crate::model::MAX_ATTRIBUTE_BYTES {
            errors.push("otlp.api_keys: tenants must be 1-256 bytes".into());
        }
    }
    if let Some(tls) = &raw.tls {
        check_tls_files("otlp.tls", tls, errors);
    }
    OtlpConfig {
        tenant_attribute: raw.tenant_attribute,
        tls: raw.tls,
    }
}

/// Every file a TLS section names exists (read again when the listener starts).
pub(super) fn check_tls_files(section: &str, tls: &RawTls, errors: &mut Vec<String>) {
    let paths = [
        ("cert_path", Some(&tls.cert_path)),
        ("key_path", Some(&tls.key_path)),
        ("client_ca_path", tls.client_ca_path.as_ref()),
    ];
    for (key, path) in paths {
        if let Some((path, Err(error))) = path.map(|path| (path, std::fs::metadata(path))) {
            errors.push(format!("{section}.{key}: {}: {error}", path.display()));
        }
    }
}

/// A listener's address, `""` for off.
pub(super) fn optional_addr(key: &str, text: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    if text.is_empty() {
        return None;
    }
    text.parse::<SocketAddr>().map_or_else(
        |_| {
            errors.push(format!(
                "{key}: `{text}` is not an address like 0.0.0.0:4317 (or \"\" for off)"
            ));
            None
        },
        Some,
    )
}
