//! TLS for the listeners (`[server.tls]` on the HTTP API, `[otlp.tls]` on both OTLP listeners):
//! PEM files, as a rustls server config (h2 and http/1.1 by ALPN; OTLP/gRPC keeps h2 only).
//!
//! Every listener picks its certificate up again when its files change (checked at most once a
//! second, on a handshake): a renewed certificate needs no restart. A pair that does not load
//! (half-written, key and certificate not matching) is logged and the previous one kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often a handshake may look at the files again.
const RECHECK: Duration = Duration::from_secs(1);

/// A TLS identity's PEM files, as configured (`section` names them in errors: `server.tls`).
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    section: &'static str,
    paths: (PathBuf, PathBuf),
    /// The CAs client certificates are verified against (PEM; None: none asked for).
    client_ca_pem: Option<Vec<u8>>,
}

impl TlsIdentity {
    pub fn load(tls: &crate::config::RawTls, section: &'static str) -> std::io::Result<TlsIdentity> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|error| std::io::Error::new(error.kind(), format!("{}: {error}", path.display())))
        };
        Ok(TlsIdentity {
            cert_pem: read(&tls.cert_path)?,
            key_pem: read(&tls.key_path)?,
            section,
            paths: (tls.cert_path.clone(), tls.key_path.clone()),
            client_ca_pem: tls.client_ca_path.as_deref().map(read).transpose()?,
        })
    }

    /// A rustls server config (h2 and http/1.1 by ALPN) that reloads the files when they change.
    pub fn rustls_config(&self) -> Result<rustls::ServerConfig, String> {
        let key = certified_key(&self.cert_pem, &self.key_pem, self.section)?;
        let resolver = ReloadingCert {
            section: self.section,
            paths: self.paths.clone(),
            state: Mutex::new(Loaded {
                key: Arc::new(key),
                stamps: stamps(&self.paths),
                checked: Instant::now(),
            }),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in CertificateDer::pem_slice_iter(pem) {
                    let certificate =
                        certificate.map_err(|error| format!("{}.client_ca_path: {error}", self.section))?;
                    roots
                        .add(certificate)
                        .map_err(|error| format!("{}.client_ca_path: {error}", self.section))?;
                }
                // A client without a certificate is still served (it authenticates by key);
                // one with a certificate this CA did not sign fails the handshake.
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|error| format!("{}.client_ca_path: {error}", self.section))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The certificate chain and key of PEM files, checked to match.
fn certified_key(cert_pem: &[u8], key_pem: &[u8], section: &str) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{section}.cert_path: {error}"))?;
    if certs.is_empty() {
        return Err(format!("{section}.cert_path: no certificate in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| format!("{section}.key_path: {error}"))?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map_err(|error| format!("{section}: {error}"))
}

fn stamps(paths: &(PathBuf, PathBuf)) -> [Option<SystemTime>; 2] {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|meta| meta.modified()).ok();
    [modified(&paths.0), modified(&paths.1)]
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: [Option<SystemTime>; 2],
    checked: Instant,
}

/// Serves the current certificate, loading the files again when their modification times
/// change.
#[derive(Debug)]
struct ReloadingCert {
    section: &'static str,
    paths: (PathBuf, PathBuf),
    state: Mutex<Loaded>,
}

impl ReloadingCert {
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock();
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.paths);
            if now != state.stamps {
                let loaded = std::fs::read(&self.paths.0)
                    .and_then(|cert| Ok((cert, std::fs::read(&self.paths.1)?)))
                    .map_err(|error| error.to_string())
                    .and_then(|(cert, key)| certified_key(&cert, &key, self.section));
                match loaded {
                    Ok(key) => {
                        state.key = Arc::new(key);
                        state.stamps = now;
                        tracing::warn!(section = self.section, "TLS certificate reloaded");
                    }
                    // Half-written files: keep serving the old pair, try again next time.
                    Err(error) => {
                        tracing::error!(section = self.section, %error, "TLS certificate not reloaded")
                    }
                }
            }
        }
        state.key.clone()
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
