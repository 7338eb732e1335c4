//! TLS toward clients (`[tls]`): the acceptor built from PEM files with rustls, rebuilt on every
//! reload so a renewed certificate is served to new connections without dropping sessions.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use switchyard_config::{TlsMode, TlsSettings};
use tokio_rustls::TlsAcceptor;

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key} {path}: {detail}")]
    File {
        key: &'static str,
        path: String,
        detail: String,
    },
    #[error("tls: {0}")]
    Config(String),
}

fn file_error<'a>(key: &'static str, path: &'a Path) -> impl Fn(String) -> TlsError + 'a {
    move |detail| TlsError::File {
        key,
        path: path.display().to_string(),
        detail,
    }
}

/// An acceptor and the `tls-server-end-point` channel binding of its certificate (`None` for a
/// signature algorithm without one).
pub(crate) struct Acceptor {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) channel_binding: Option<Vec<u8>>,
}

/// The acceptor for `settings`; `None` when TLS is disabled.
pub(crate) fn acceptor(settings: &TlsSettings) -> Result<Option<Acceptor>, TlsError> {
    if settings.mode == TlsMode::Disable {
        return Ok(None);
    }
    let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
        return Err(TlsError::Config(
            "cert_file and key_file are needed unless mode = \"disable\"".to_owned(),
        ));
    };
    let certs = certificates("cert_file", cert_file)?;
    let binding = certs
        .first()
        .and_then(|leaf| switchyard_pgwire::auth::tls_server_end_point(leaf.as_ref()));
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| file_error("key_file", key_file)(format!("no private key read: {e}")))?;
    // rustls 0.23.48 marks the ring provider deprecated because ring has no post-quantum key
    // exchange; the aws-lc-rs provider that has one needs cmake and a much longer build.
    // Classical ECDHE (X25519, P-256, P-384) is what PostgreSQL itself offers through OpenSSL.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates("client_ca_file", ca_file)? {
                roots
                    .add(ca)
                    .map_err(|e| file_error("client_ca_file", ca_file)(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("client_ca_file", ca_file)(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_error("key_file", key_file)(format!("does not match cert_file: {e}")))?;
    // PostgreSQL speaks its own protocol inside TLS, without ALPN (libpq 17's direct TLS
    // negotiation would ask for "postgresql"; offering it lets such clients through).
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Acceptor {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        channel_binding: binding,
    }))
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path)(format!("cannot be read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path)(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(key, path)("holds no certificate".to_owned()));
    }
    Ok(certs)
}
