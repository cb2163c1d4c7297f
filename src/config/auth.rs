//! `[auth]`: API keys (by SHA-256), their tenants and scopes, and the safe-by-default rule for
//! listeners on non-loopback addresses (`auth`).

use std::net::SocketAddr;

use super::raw::RawAuth;
use crate::auth::{CertificateRule, Key, Keys, Scope, Surface};

/// Validated `[auth]` (with `otlp.api_keys`, the deprecated form, folded in).
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    pub keys: Keys,
    pub allow_unauthenticated: bool,
    /// `otlp.api_keys` was used (a warning at start).
    pub deprecated_otlp_keys: bool,
}

pub(super) fn validate_auth(
    raw: RawAuth,
    otlp_keys: &std::collections::BTreeMap<String, String>,
    errors: &mut Vec<String>,
) -> AuthConfig {
    let mut keys = Vec::new();
    for (i, key) in raw.keys.iter().enumerate() {
        let at = format!("auth.keys[{i}]");
        let before = errors.len();
        let digest = hex_digest(&key.sha256);
        if digest.is_none() {
            errors.push(format!(
                "{at}.sha256: must be 64 hex digits (the SHA-256 of the key: `printf %s KEY | sha256sum`)"
            ));
        }
        let grant = validate_grant(&key.tenant, &key.scopes, &at, errors);
        let (Some(digest), Some((tenant, scopes))) = (digest, grant) else {
            continue;
        };
        if errors.len() != before {
            continue;
        }
        if keys.iter().any(|known: &Key| known.digest == digest) {
            errors.push(format!("{at}.sha256: the same key is listed twice"));
            continue;
        }
        keys.push(Key::new(digest, tenant, &scopes));
    }
    let mut certificates = Vec::new();
    for (i, certificate) in raw.certificates.iter().enumerate() {
        let at = format!("auth.certificates[{i}]");
        if certificate.common_name.trim().is_empty() {
            errors.push(format!("{at}.common_name: must not be empty"));
        }
        if let Some((tenant, scopes)) = validate_grant(&certificate.tenant, &certificate.scopes, &at, errors)
        {
            certificates.push(CertificateRule::new(
                certificate.common_name.clone(),
                tenant,
                &scopes,
            ));
        }
    }
    // The deprecated form: key → tenant, for OTLP ingest (it now works on every listener).
    for (key, tenant) in otlp_keys {
        let digest = crate::auth::digest_of(key);
        if !keys.iter().any(|known| known.digest == digest) {
            keys.push(Key::otlp_only(digest, tenant.clone()));
        }
    }
    AuthConfig {
        keys: Keys::with_certificates(keys, certificates),
        allow_unauthenticated: raw.allow_unauthenticated,
        deprecated_otlp_keys: !otlp_keys.is_empty(),
    }
}

fn hex_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// Safe by default: a listener reachable from other machines needs keys, unless the operator
/// says otherwise in so many words.
pub(super) fn check_exposure(
    auth: &AuthConfig,
    listeners: &[(&str, Option<SocketAddr>)],
    errors: &mut Vec<String>,
) {
    if auth.allow_unauthenticated {
        return;
    }
    for (key, addr) in listeners {
        let surface = if key.starts_with("server.otlp") {
            Surface::Otlp
        } else if key.starts_with("limits.") {
            Surface::Limits
        } else {
            Surface::Http
        };
        if auth.keys.guards(surface) {
            continue;
        }
        if let Some(addr) = addr.filter(|addr| !addr.ip().is_loopback()) {
            errors.push(format!(
                "{key}: {addr} is reachable from other machines but no API keys are configured: \
                 add [[auth.keys]] (or bind 127.0.0.1), or set auth.allow_unauthenticated = true to serve it open"
            ));
        }
    }
}

/// What a key or certificate entry grants: its tenant (None: `"*"`, the operator) and scopes;
/// None when the entry is unusable (the reasons are in `errors`, at `at`).
fn validate_grant(
    tenant: &str,
    scopes: &[String],
    at: &str,
    errors: &mut Vec<String>,
) -> Option<(Option<String>, Vec<Scope>)> {
    let before = errors.len();
    let tenant = match tenant {
        "*" => None,
        "" => {
            errors.push(format!(
                "{at}.tenant: must be a tenant, or \"*\" for the operator"
            ));
            None
        }
        tenant if tenant.len() > crate::model::MAX_ATTRIBUTE_BYTES => {
            errors.push(format!("{at}.tenant: longer than 256 bytes"));
            None
        }
        tenant => Some(tenant.to_string()),
    };
    let mut parsed = Vec::new();
    for scope in scopes {
        match Scope::parse(scope) {
            Some(scope) => parsed.push(scope),
            None => errors.push(format!(
                "{at}.scopes: `{scope}` is not one of ingest, read, admin"
            )),
        }
    }
    if scopes.is_empty() {
        errors.push(format!("{at}.scopes: list at least one of ingest, read, admin"));
    }
    if tenant.is_some() && parsed.contains(&Scope::Admin) {
        errors.push(format!(
            "{at}.scopes: `admin` acts on every tenant; give it to the operator (tenant = \"*\")"
        ));
    }
    (errors.len() == before).then_some((tenant, parsed))
}
