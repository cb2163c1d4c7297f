//! Who may do what: API keys with a tenant and scopes, one scheme for every listener (HTTP API,
//! OTLP/HTTP, OTLP/gRPC).
//!
//! A key is configured by its SHA-256 only (`[[auth.keys]]`), so the config file and the logs
//! never hold a secret; a request presents the key itself as `authorization: Bearer KEY` or
//! `x-api-key: KEY`. The presented key is hashed and compared with every configured digest in
//! constant time (no early exit, no comparison that stops at the first differing byte), so
//! neither timing nor the order of keys tells an attacker anything. A key belongs to a tenant
//! (it ingests and reads only that tenant's usage) or to the operator (`tenant = "*"`: every
//! tenant), and has scopes: `ingest` (post usage), `read` (queries, usage, bills, rated
//! records), `admin` (operator actions such as replaying parked records).
//!
//! Authentication happens before a request's body is read or inflated: an unauthenticated
//! client costs a header parse, not a buffer. Every refusal is counted
//! (`tallyd_auth_failures_total{listener,reason}`) and logged with the key's id (the first
//! 8 hex digits of its digest), never the key.
//!
//! Keys reload with the config file (`pipeline::reload`): rotation needs no restart.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::telemetry;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The listeners a key is checked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// The HTTP API (ingest, queries, operator actions).
    Http,
    /// OTLP/gRPC and OTLP/HTTP.
    Otlp,
    /// The limits listener (Envoy RLS/RLQS, `tallyd.quota.v1`).
    Limits,
}

/// One configured key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub digest: [u8; 32],
    /// None: an operator key (`tenant = "*"`).
    pub tenant: Option<String>,
    scopes: u8,
    /// From `otlp.api_keys` (deprecated): checked on OTLP only, as before `[auth]` existed.
    otlp_only: bool,
}

impl Key {
    pub fn new(digest: [u8; 32], tenant: Option<String>, scopes: &[Scope]) -> Key {
        Key {
            digest,
            tenant,
            scopes: scopes.iter().fold(0, |bits, scope| bits | scope.bit()),
            otlp_only: false,
        }
    }

    /// A key of the deprecated `otlp.api_keys`: OTLP ingest for its tenant, nothing else.
    pub fn otlp_only(digest: [u8; 32], tenant: String) -> Key {
        Key {
            otlp_only: true,
            ..Key::new(digest, Some(tenant), &[Scope::Ingest])
        }
    }

    fn on(&self, surface: Surface) -> bool {
        surface == Surface::Otlp || !self.otlp_only
    }

    /// The key's id in logs: the first 8 hex digits of its digest.
    pub fn id(&self) -> String {
        key_id(&self.digest)
    }
}

fn key_id(digest: &[u8; 32]) -> String {
    digest[..4].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The SHA-256 of a key, as `[[auth.keys]] sha256` holds it (hex).
pub fn digest_of(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The configured keys (`Default`: none, every request is allowed as the operator).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keys {
    keys: Vec<Key>,
    /// Client certificates (mTLS) by their subject's common name.
    certificates: Vec<CertificateRule>,
}

/// `[[auth.certificates]]`: a client certificate's subject CN and what it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRule {
    pub common_name: String,
    /// None: an operator certificate (`tenant = "*"`).
    pub tenant: Option<String>,
    scopes: u8,
}

impl CertificateRule {
    pub fn new(common_name: String, tenant: Option<String>, scopes: &[Scope]) -> CertificateRule {
        CertificateRule {
            common_name,
            tenant,
            scopes: scopes.iter().fold(0, |bits, scope| bits | scope.bit()),
        }
    }
}

/// The DER of the certificate a client presented in the TLS handshake (verified against the
/// listener's `client_ca_path`), as a request extension of every request on that connection.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub std::sync::Arc<Vec<u8>>);

impl PeerCertificate {
    /// The subject's common name (None: none, or not a certificate this parser reads).
    pub fn common_name(&self) -> Option<String> {
        let (_, certificate) = x509_parser::parse_x509_certificate(&self.0).ok()?;
        let name = certificate
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        Some(name)
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// None: an operator key, or no keys configured.
    pub tenant: Option<String>,
    scopes: u8,
    /// The key's id (None: no keys configured).
    pub key_id: Option<String>,
}

impl Principal {
    /// The principal of every request when no keys are configured: unrestricted.
    pub fn open() -> Principal {
        Principal {
            tenant: None,
            scopes: u8::MAX,
            key_id: None,
        }
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// Whether this principal may act on `tenant`'s usage.
    pub fn covers(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|own| own == tenant)
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401 / UNAUTHENTICATED.
    #[error("API key required: send `authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// 401 / UNAUTHENTICATED.
    #[error("unknown API key")]
    Unknown,
    /// 403 / PERMISSION_DENIED.
    #[error("key {key_id} lacks the `{}` scope", scope.as_str())]
    Scope { key_id: String, scope: Scope },
    /// 403 / PERMISSION_DENIED.
    #[error("key {key_id} is for another tenant than `{tenant}`")]
    Tenant { key_id: String, tenant: String },
}

impl AuthError {
    /// The `reason` label of `tallyd_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_key",
            AuthError::Unknown => "unknown_key",
            AuthError::Scope { .. } => "scope",
            AuthError::Tenant { .. } => "tenant",
        }
    }

    /// 401 for who you are, 403 for what you may do.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, AuthError::Missing | AuthError::Unknown)
    }

    /// Counts and logs the refusal (the key's id at most, never the key).
    pub fn record(&self, listener: &'static str) {
        metrics::counter!(telemetry::AUTH_FAILURES, "listener" => listener, "reason" => self.reason())
            .increment(1);
        tracing::info!(listener, reason = self.reason(), "request refused: {self}");
    }

    /// The HTTP answer, recorded: 401 with `WWW-Authenticate: Bearer`, or 403; the API's error
    /// body `{"error", "message"}`.
    pub fn http_response(&self, listener: &'static str) -> axum::response::Response {
        use axum::http::{header, HeaderValue, StatusCode};
        use axum::response::IntoResponse;
        self.record(listener);
        let (status, code) = if self.is_unauthenticated() {
            (StatusCode::UNAUTHORIZED, "unauthenticated")
        } else {
            (StatusCode::FORBIDDEN, "forbidden")
        };
        let body = axum::Json(serde_json::json!({"error": code, "message": self.to_string()}));
        let mut response = (status, body).into_response();
        if self.is_unauthenticated() {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl Keys {
    pub fn new(keys: Vec<Key>) -> Keys {
        Keys {
            keys,
            certificates: Vec::new(),
        }
    }

    /// `new` with client-certificate rules.
    pub fn with_certificates(keys: Vec<Key>, certificates: Vec<CertificateRule>) -> Keys {
        Keys { keys, certificates }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `surface` checks keys at all (none configured for it: it is open).
    pub fn guards(&self, surface: Surface) -> bool {
        self.keys.iter().any(|key| key.on(surface)) || !self.certificates.is_empty()
    }

    /// The principal of a request on `surface`: its key when it presents one, else its verified
    /// client certificate, with `scope` required.
    pub fn authenticate_request(
        &self,
        surface: Surface,
        headers: &axum::http::HeaderMap,
        peer: Option<&PeerCertificate>,
        scope: Scope,
    ) -> Result<Principal, AuthError> {
        let (authorization, api_key) = credentials(headers);
        self.authenticate_presented(surface, authorization, api_key, peer, scope)
    }

    /// `authenticate_request` for credentials already taken out of their headers (gRPC metadata).
    pub fn authenticate_presented(
        &self,
        surface: Surface,
        authorization: Option<&str>,
        api_key: Option<&str>,
        peer: Option<&PeerCertificate>,
        scope: Scope,
    ) -> Result<Principal, AuthError> {
        let presents_key = api_key.is_some() || authorization.is_some();
        match peer {
            Some(peer) if !presents_key && !self.certificates.is_empty() => {
                self.authenticate_certificate(peer, scope)
            }
            _ => self.authenticate(surface, authorization, api_key, scope),
        }
    }

    fn authenticate_certificate(&self, peer: &PeerCertificate, scope: Scope) -> Result<Principal, AuthError> {
        let name = peer.common_name().ok_or(AuthError::Unknown)?;
        let rule = self
            .certificates
            .iter()
            .find(|rule| rule.common_name == name)
            .ok_or(AuthError::Unknown)?;
        let key_id = format!("cn:{name}");
        if rule.scopes & scope.bit() == 0 {
            return Err(AuthError::Scope { key_id, scope });
        }
        Ok(Principal {
            tenant: rule.tenant.clone(),
            scopes: rule.scopes,
            key_id: Some(key_id),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The ids of the configured keys and certificate subjects (for the audit log of a reload).
    pub fn ids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(Key::id)
            .chain(
                self.certificates
                    .iter()
                    .map(|rule| format!("cn:{}", rule.common_name)),
            )
            .collect()
    }

    /// The principal presenting these headers on `surface`, with `scope` required.
    pub fn authenticate(
        &self,
        surface: Surface,
        authorization: Option<&str>,
        api_key: Option<&str>,
        scope: Scope,
    ) -> Result<Principal, AuthError> {
        if !self.guards(surface) {
            return Ok(Principal::open());
        }
        let presented = api_key.or_else(|| {
            authorization.and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
        });
        let presented = presented.map(str::trim).filter(|key| !key.is_empty());
        let Some(presented) = presented else {
            return Err(AuthError::Missing);
        };
        let digest = digest_of(presented);
        // Every digest is compared, whatever matched: the time taken says nothing.
        let mut found: Option<&Key> = None;
        for key in self.keys.iter().filter(|key| key.on(surface)) {
            let difference = key
                .digest
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(difference) == 0 && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or(AuthError::Unknown)?;
        if key.scopes & scope.bit() == 0 {
            return Err(AuthError::Scope {
                key_id: key.id(),
                scope,
            });
        }
        Ok(Principal {
            tenant: key.tenant.clone(),
            scopes: key.scopes,
            key_id: Some(key.id()),
        })
    }
}

/// The keys in force, replaced as a whole when the config reloads.
#[derive(Debug, Default)]
pub struct KeyRing {
    current: parking_lot::RwLock<Arc<Keys>>,
}

impl KeyRing {
    pub fn new(keys: Keys) -> KeyRing {
        KeyRing {
            current: parking_lot::RwLock::new(Arc::new(keys)),
        }
    }

    pub fn current(&self) -> Arc<Keys> {
        self.current.read().clone()
    }

    /// Swaps the keys; logs which key ids came and went (audit), never the keys. Returns
    /// whether anything changed.
    pub fn replace(&self, keys: Keys) -> bool {
        let mut current = self.current.write();
        if **current == keys {
            return false;
        }
        let before: std::collections::BTreeSet<String> = current.ids().into_iter().collect();
        let after: std::collections::BTreeSet<String> = keys.ids().into_iter().collect();
        let added: Vec<&String> = after.difference(&before).collect();
        let removed: Vec<&String> = before.difference(&after).collect();
        tracing::warn!(?added, ?removed, keys = keys.len(), "API keys reloaded");
        metrics::counter!(telemetry::AUTH_RELOADS).increment(1);
        *current = Arc::new(keys);
        true
    }
}

/// The credentials of an HTTP request's headers: (`authorization`, `x-api-key`).
pub fn credentials(headers: &axum::http::HeaderMap) -> (Option<&str>, Option<&str>) {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    (text("authorization"), text("x-api-key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keys {
        Keys::new(vec![
            Key::new(
                digest_of("acme-key-0123456789"),
                Some("acme".into()),
                &[Scope::Ingest, Scope::Read],
            ),
            Key::new(
                digest_of("ops-key-0123456789"),
                None,
                &[Scope::Read, Scope::Admin],
            ),
        ])
    }

    #[test]
    fn keys_name_their_tenant_and_scopes() {
        let keys = ring();
        let acme = keys
            .authenticate(
                Surface::Http,
                Some("Bearer acme-key-0123456789"),
                None,
                Scope::Ingest,
            )
            .unwrap();
        assert_eq!(acme.tenant.as_deref(), Some("acme"));
        assert!(acme.covers("acme") && !acme.covers("globex"));
        assert_eq!(acme.key_id, Some(key_id(&digest_of("acme-key-0123456789"))));
        // x-api-key wins over authorization; the scheme is case-insensitive.
        let ops = keys
            .authenticate(
                Surface::Http,
                Some("bearer nope"),
                Some("ops-key-0123456789"),
                Scope::Admin,
            )
            .unwrap();
        assert!(ops.tenant.is_none() && ops.covers("globex"));
        assert!(keys
            .authenticate(
                Surface::Http,
                Some("BEARER ops-key-0123456789"),
                None,
                Scope::Read
            )
            .is_ok());
    }

    #[test]
    fn refusals_say_why_without_the_key() {
        let keys = ring();
        assert_eq!(
            keys.authenticate(Surface::Http, None, None, Scope::Read),
            Err(AuthError::Missing)
        );
        assert_eq!(
            keys.authenticate(Surface::Http, Some("Bearer "), None, Scope::Read),
            Err(AuthError::Missing)
        );
        assert_eq!(
            keys.authenticate(
                Surface::Http,
                Some("Basic acme-key-0123456789"),
                None,
                Scope::Read
            ),
            Err(AuthError::Missing)
        );
        assert_eq!(
            keys.authenticate(Surface::Http, None, Some("acme-key-012345678"), Scope::Read),
            Err(AuthError::Unknown)
        );
        let refused = keys
            .authenticate(Surface::Http, None, Some("acme-key-0123456789"), Scope::Admin)
            .unwrap_err();
        assert_eq!(refused.reason(), "scope");
        assert!(!refused.to_string().contains("acme-key"), "{refused}");
        assert!(!refused.is_unauthenticated());
        let ops = keys.authenticate(Surface::Http, None, Some("ops-key-0123456789"), Scope::Ingest);
        assert_eq!(ops.unwrap_err().reason(), "scope");
    }

    #[test]
    fn without_keys_everyone_is_the_operator() {
        let open = Keys::default()
            .authenticate(Surface::Http, None, None, Scope::Admin)
            .unwrap();
        assert!(open.covers("anyone") && open.has(Scope::Admin));
    }

    /// `otlp.api_keys` (deprecated) keeps meaning what it meant: keys for OTLP ingest, the
    /// HTTP API as open as before.
    #[test]
    fn deprecated_otlp_keys_guard_otlp_only() {
        let keys = Keys::new(vec![Key::otlp_only(
            digest_of("old-otlp-key-0123456"),
            "acme".into(),
        )]);
        assert!(keys.guards(Surface::Otlp) && !keys.guards(Surface::Http));
        assert_eq!(
            keys.authenticate(Surface::Otlp, None, None, Scope::Ingest),
            Err(AuthError::Missing)
        );
        let acme = keys
            .authenticate(Surface::Otlp, None, Some("old-otlp-key-0123456"), Scope::Ingest)
            .unwrap();
        assert_eq!(acme.tenant.as_deref(), Some("acme"));
        assert!(keys.authenticate(Surface::Http, None, None, Scope::Read).is_ok());
    }

    #[test]
    fn a_reload_swaps_the_keys() {
        let ring_ = KeyRing::new(ring());
        assert!(!ring_.replace(ring()));
        assert!(ring_.replace(Keys::new(vec![Key::new(
            digest_of("acme-key-rotated-000"),
            Some("acme".into()),
            &[Scope::Ingest]
        )])));
        let keys = ring_.current();
        assert_eq!(
            keys.authenticate(Surface::Http, None, Some("acme-key-0123456789"), Scope::Ingest),
            Err(AuthError::Unknown)
        );
        assert!(keys
            .authenticate(Surface::Http, None, Some("acme-key-rotated-000"), Scope::Ingest)
            .is_ok());
    }
}
