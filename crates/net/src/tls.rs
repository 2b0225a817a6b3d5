//! Optional TLS around pstrain's frames (rustls with the ring provider): a shard presents a
//! certificate (`--tls-cert/--tls-key`), a client checks it against a CA it trusts
//! (`--tls-ca`). Off by default. The run token still decides who belongs; TLS keeps the
//! weights and gradients private and unaltered on the network path.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpStream;

/// A PEM file longer than this is refused unread (a certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = 4 << 20;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what}: {why}")]
    Pem { what: String, why: String },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("`{0}` is not a host name or IP address a certificate can name")]
    ServerName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.into(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.into()));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    pstrain_store::read_at_most(path, MAX_PEM_BYTES).map_err(|e| TlsError::Pem {
        what: path.display().to_string(),
        why: e.to_string(),
    })
}

/// A shard's side: its certificate chain and private key.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer(..)")
    }
}

impl TlsServer {
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certificates(cert_pem, "the certificate file")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "the key file".into(),
            why: e.to_string(),
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(TlsServer {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }
}

/// A client's side: the CA certificates it trusts to sign shards' certificates.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClient(..)")
    }
}

impl TlsClient {
    pub fn from_ca_file(ca: &Path) -> Result<Self, TlsError> {
        Self::from_ca_pem(&read(ca)?)
    }

    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(pem, "the CA file")? {
            roots.add(cert)?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// TLS over `stream` to the shard at `addr` (`host:port`), whose certificate must name
    /// `host`.
    pub(crate) async fn connect(
        &self,
        addr: &str,
        stream: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                TlsError::ServerName(host.into()),
            )
        })?;
        self.connector.connect(name, stream).await
    }
}
