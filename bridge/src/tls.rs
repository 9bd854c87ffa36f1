//! The hub's TLS settings (`[tls]`), read and checked once at start-up and shared by both
//! ports: the gRPC port (tonic) and the HTTP port (rustls directly), so that bearer tokens
//! never cross either in clear and a bad path fails before the hub says it is listening.

use std::{path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, server::WebPkiClientVerifier},
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

/// The certificate, key and client CA of `[tls]`, checked.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    http: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files `config` names; `None` when TLS is off. Errors name the key
    /// and the file.
    pub fn load(config: &TlsConfig) -> Result<Option<Self>, String> {
        if !config.enabled() {
            return Ok(None);
        }
        let cert_pem = read(&config.cert, "cert")?;
        let key_pem = read(&config.key, "key")?;
        let chain = certificates(&cert_pem, &config.cert, "cert")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "tls.key: {} holds no PEM private key: {e}",
                config.key.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?;
        let client_ca_pem = if config.client_ca.as_os_str().is_empty() {
            None
        } else {
            Some(read(&config.client_ca, "client_ca")?)
        };
        let builder = match &client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(pem, &config.client_ca, "client_ca")? {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "tls.client_ca: {} is not a usable CA certificate: {e}",
                            config.client_ca.display()
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("tls.client_ca: {}: {e}", config.client_ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut http = builder.with_single_cert(chain, key).map_err(|e| {
            format!(
                "tls.cert/tls.key: {} and {} do not make a certificate and its key: {e}",
                config.cert.display(),
                config.key.display()
            )
        })?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self {
            cert_pem,
            key_pem,
            client_ca_pem,
            http: Arc::new(http),
        }))
    }

    /// For the gRPC port, with `handshake_timeout` for the TLS handshake.
    pub fn grpc(&self, handshake_timeout: Duration) -> ServerTlsConfig {
        let mut server = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(handshake_timeout);
        if let Some(ca) = &self.client_ca_pem {
            server = server.client_ca_root(Certificate::from_pem(ca));
        }
        server
    }

    /// For the HTTP port (HTTP/1.1 over TLS).
    pub fn http(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.http.clone())
    }
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{key}: cannot read {}: {e}", path.display()))
}

fn certificates(
    pem: &[u8],
    path: &Path,
    key: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.{key}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.{key}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}
