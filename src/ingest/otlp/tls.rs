//! TLS for the OTLP listeners (`[otlp.tls]`): the PEM identity, for tonic's own TLS (gRPC) and
//! as a rustls server config for OTLP/HTTP (h2 and http/1.1 by ALPN).

/// The TLS identity of `[otlp.tls]`, for both listeners.
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsIdentity {
    pub fn load(tls: &crate::config::RawTls) -> std::io::Result<TlsIdentity> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|error| std::io::Error::new(error.kind(), format!("{}: {error}", path.display())))
        };
        Ok(TlsIdentity {
            cert_pem: read(&tls.cert_path)?,
            key_pem: read(&tls.key_path)?,
        })
    }

    /// A rustls server config for OTLP/HTTP (h2 and http/1.1 by ALPN).
    pub fn rustls_config(&self) -> Result<tokio_rustls::rustls::ServerConfig, String> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("otlp.tls.cert_path: {error}"))?;
        if certs.is_empty() {
            return Err("otlp.tls.cert_path: no certificate in the file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|error| format!("otlp.tls.key_path: {error}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| format!("otlp.tls: {error}"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}
