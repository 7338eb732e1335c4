//! TLS toward a PostgreSQL store for the wire-level logins (the sessions' upstream, the mirror's
//! link to the follower), with rustls and the ring provider, as libpq does it: an SSLRequest,
//! the server's one-byte answer, the handshake, then the startup message inside TLS.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>
//!
//! Which certificate checks run follows `sslmode` (see [`switchyard_config::StoreTls`]):
//! `allow`, `prefer` and `require` (without a root certificate) encrypt without verifying;
//! `verify-ca` verifies the chain against `sslrootcert` only; `verify-full` also checks the
//! host name or IP address against the certificate's subject alternative names.
//!
//! The sqlx pools get the same settings through [`super::connect_options`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use switchyard_config::{SslMode, StoreTls};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// rustls 0.23.48 marks the ring provider deprecated because ring has no post-quantum key
/// exchange; the aws-lc-rs provider would need cmake. Classical ECDHE is what PostgreSQL offers.
#[allow(deprecated)]
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// A connection to a store, in plain text or in TLS.
pub enum StoreStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl StoreStream {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, StoreStream::Tls(_))
    }

    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            StoreStream::Plain(s) => s,
            StoreStream::Tls(s) => s.get_ref().0,
        }
    }

    /// The server's address.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().peer_addr()
    }
}

impl AsyncRead for StoreStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StoreStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            StoreStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for StoreStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            StoreStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            StoreStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StoreStream::Plain(s) => Pin::new(s).poll_flush(cx),
            StoreStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            StoreStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            StoreStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The connector for `tls` toward `host` (the URL's host, checked against the certificate under
/// `verify-full`), and the name the handshake uses. Files are read on every call, as libpq
/// reads them for every connection, so renewed certificates are picked up.
pub(crate) fn connector(tls: &StoreTls, host: &str) -> Result<(TlsConnector, ServerName<'static>), String> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("the host {host:?} cannot be checked against a certificate: {e}"))?;
    let builder = ClientConfig::builder_with_provider(Arc::clone(&PROVIDER))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match (tls.mode, &tls.root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(path)) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("sslrootcert", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&PROVIDER))
                .build()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if tls.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(Lenient {
                    chain: Some(webpki),
                    provider: Arc::clone(&PROVIDER),
                })
            }
        }
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!("sslmode={} needs sslrootcert", tls.mode));
        }
        _ => Arc::new(Lenient {
            chain: None,
            provider: Arc::clone(&PROVIDER),
        }),
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs("sslcert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: no private key read: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))?
        }
    };
    // As libpq 17 does; servers before 17 ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok((TlsConnector::from(Arc::new(config)), name))
}

fn read_certs(param: &str, path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{param} {}: cannot be read: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{param} {}: is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{param} {}: holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The server certificate check of `verify-ca` (`chain`: it must lead to a trusted root; the
/// names in it are not looked at) and of `allow`, `prefer`, `require` without a root
/// certificate (no `chain`: not verified, as libpq does). Either way the handshake's signatures
/// are checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
