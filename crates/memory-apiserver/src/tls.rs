//! HTTPS, for a server that requires a token: kubectl (client-go) sends credentials only over TLS,
//! so a token over plain HTTP would shut kubectl out. The certificates are made at start and live
//! in memory only: a private CA, which clients are given (kubeconfig `certificate-authority-data`,
//! kube-rs `root_cert`), and a server certificate it signs for 127.0.0.1 and localhost.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// A handshake that has not finished by then is dropped, so that a client that connects and says
/// nothing holds no task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS identity and the CA certificate clients trust it by. Cheap to clone.
#[derive(Clone)]
pub struct Tls(Arc<Identity>);

struct Identity {
    ca_pem: String,
    ca_der: Vec<u8>,
    server_der: Vec<u8>,
    server_key_der: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("making the TLS certificate: {e}"))
}

impl Tls {
    /// A new CA and a server certificate it signs for 127.0.0.1 and localhost.
    pub fn generate() -> std::io::Result<Tls> {
        let ca_key = rcgen::KeyPair::generate().map_err(io_error)?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(io_error)?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "memory-apiserver CA");
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(io_error)?;

        let server_key = rcgen::KeyPair::generate().map_err(io_error)?;
        let mut server = rcgen::CertificateParams::new(vec!["localhost".to_string()]).map_err(io_error)?;
        server.subject_alt_names.push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server.distinguished_name.push(rcgen::DnType::CommonName, "memory-apiserver");
        server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).map_err(io_error)?;

        Ok(Tls(Arc::new(Identity {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            server_der: server_cert.der().to_vec(),
            server_key_der: server_key.serialize_der(),
        })))
    }

    /// The CA certificate (PEM) that clients trust the server by.
    pub fn ca_pem(&self) -> &str {
        &self.0.ca_pem
    }

    /// The CA certificate (DER), as kube-rs takes it (`Config::root_cert`).
    pub fn ca_der(&self) -> &[u8] {
        &self.0.ca_der
    }

    fn acceptor(&self) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.server_key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(self.0.server_der.clone())], key)
            .map_err(std::io::Error::other)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` completes; then stops accepting (open
/// connections, watches among them, end with the runtime).
pub async fn serve(
    listener: TcpListener,
    tls: &Tls,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tls.acceptor()?;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pass, rather than spin or stop serving.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) =
                builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service).await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}
