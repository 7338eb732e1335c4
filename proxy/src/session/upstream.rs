//! Connecting and logging in to a store with the credentials of its URL: OLD for client
//! sessions, NEW for the mirror's connections. Every error names the store it was about.
//!
//! The client's own startup parameters (`application_name`, `options`, `DateStyle`, ...) go into
//! the upstream StartupMessage, so the server applies them at backend start exactly as it would
//! for a direct connection, and `RESET` behaves the same. What the server answers after
//! authentication (ParameterStatus, BackendKeyData, notices) is kept as raw bytes and forwarded
//! to the client unchanged: the client sees the real backend's pid, cancel key and settings.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use switchyard_config::StoreUrl;
use switchyard_pgwire::backend::{self, Authentication, ServerMessage};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_pgwire::frontend;
use switchyard_pgwire::startup::{CancelKey, StartupMessage};
use switchyard_store::Role;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::io::{read_frame, Peer};
use crate::error::SessionError;

/// Where and as whom the proxy logs in upstream.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamTarget {
    pub(crate) url: StoreUrl,
    /// Which store `url` is, for messages.
    pub(crate) store: Role,
}

/// A logged-in upstream connection.
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    /// Bytes already read past the startup reply.
    pub(crate) buf: BytesMut,
    /// Everything the server sent after AuthenticationOk, up to and including ReadyForQuery.
    pub(crate) greeting: Bytes,
    /// The backend's cancel key, if it sent one.
    pub(crate) cancel_key: Option<CancelKey>,
    /// The server's NegotiateProtocolVersion, when it downgraded the client's requested minor
    /// version or ignored `_pq_` options; the client must see it before AuthenticationOk.
    pub(crate) negotiation: Option<Bytes>,
}

/// Login ended with the server's ErrorResponse, to be forwarded to the client as it came.
pub(crate) struct LoginRefused {
    pub(crate) raw: Bytes,
    pub(crate) message: String,
}

pub(crate) enum LoginOutcome {
    Ready(Upstream),
    Refused(LoginRefused),
}

impl UpstreamTarget {
    /// `"OLD"` or `"NEW"`, as the messages name the store.
    fn store_name(&self) -> &'static str {
        match self.store {
            Role::Old => "OLD",
            Role::New => "NEW",
        }
    }

    /// Connects and logs in, forwarding the client's parameters.
    pub(crate) async fn connect(
        &self,
        protocol: i32,
        client_params: &[(String, String)],
        timeout: Duration,
        keepalive: Option<Duration>,
    ) -> Result<LoginOutcome, SessionError> {
        tokio::time::timeout(timeout, self.connect_inner(protocol, client_params, keepalive))
            .await
            .map_err(|_| {
                SessionError::Timeout(match self.store {
                    Role::Old => "connecting to the OLD store",
                    Role::New => "connecting to the NEW store",
                })
            })?
    }

    async fn connect_inner(
        &self,
        protocol: i32,
        client_params: &[(String, String)],
        keepalive: Option<Duration>,
    ) -> Result<LoginOutcome, SessionError> {
        let url = &self.url;
        let mut stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| {
                SessionError::UpstreamLogin(format!(
                    "cannot connect to the {} store at {}: {e}",
                    self.store_name(),
                    url.redacted()
                ))
            })?;
        crate::server::tune_socket(&stream, keepalive);

        let mut params = vec![
            ("user".to_owned(), url.user.clone()),
            ("database".to_owned(), url.database.clone()),
        ];
        params.extend(
            client_params
                .iter()
                .filter(|(k, _)| k != "user" && k != "database")
                .cloned(),
        );
        for key in ["application_name", "options"] {
            if let Some(v) = url.param(key) {
                if !params.iter().any(|(k, _)| k == key) {
                    params.push((key.to_owned(), v.to_owned()));
                }
            }
        }
        let mut out = BytesMut::with_capacity(256);
        StartupMessage { protocol, params }.encode(&mut out);
        stream.write_all(&out).await.map_err(SessionError::UpstreamIo)?;

        let limits = MessageLimits::default();
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut scram: Option<ScramSha256> = None;
        let mut negotiation = None;
        // Authentication exchange.
        loop {
            let (tag, body) = read_frame(&mut stream, &mut buf, limits, Peer::Upstream).await?;
            let msg = backend::parse(tag, &body).map_err(SessionError::UpstreamProtocol)?;
            out.clear();
            match msg {
                ServerMessage::Authentication(Authentication::Ok) => break,
                ServerMessage::Authentication(Authentication::CleartextPassword) => {
                    frontend::password(&mut out, self.password()?.as_bytes());
                }
                ServerMessage::Authentication(Authentication::Md5Password { salt }) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        url.user.as_bytes(),
                        self.password()?.as_bytes(),
                        salt,
                    );
                    frontend::password(&mut out, hash.as_bytes());
                }
                ServerMessage::Authentication(Authentication::Sasl { mechanisms }) => {
                    if !mechanisms.contains(&"SCRAM-SHA-256") {
                        return Err(SessionError::UpstreamLogin(format!(
                            "the {} store offers SASL mechanisms {mechanisms:?}; only SCRAM-SHA-256 is supported",
                            self.store_name()
                        )));
                    }
                    let client = ScramSha256::new(self.password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", client.message());
                    scram = Some(client);
                }
                ServerMessage::Authentication(Authentication::SaslContinue(data)) => {
                    let client = scram.as_mut().ok_or_else(|| self.unexpected("SASLContinue"))?;
                    client.update(data).map_err(|e| {
                        SessionError::UpstreamLogin(format!(
                            "SCRAM with the {} store: {e}",
                            self.store_name()
                        ))
                    })?;
                    frontend::sasl_response(&mut out, client.message());
                }
                ServerMessage::Authentication(Authentication::SaslFinal(data)) => {
                    let mut client = scram.take().ok_or_else(|| self.unexpected("SASLFinal"))?;
                    client.finish(data).map_err(|e| {
                        SessionError::UpstreamLogin(format!(
                            "the {} store's SCRAM signature is invalid: {e}",
                            self.store_name()
                        ))
                    })?;
                }
                ServerMessage::Authentication(Authentication::Unsupported(code)) => {
                    return Err(SessionError::UpstreamLogin(format!(
                        "the {} store asks for authentication method {code}, which the proxy does not support",
                        self.store_name()
                    )));
                }
                ServerMessage::ErrorResponse(fields) => {
                    return Ok(LoginOutcome::Refused(LoginRefused {
                        raw: reframe(tag, &body),
                        message: fields.message(),
                    }));
                }
                ServerMessage::Other(b'v') => {
                    negotiation = Some(reframe(tag, &body));
                    continue;
                }
                // Notices may precede authentication.
                _ => continue,
            }
            if !out.is_empty() {
                stream.write_all(&out).await.map_err(SessionError::UpstreamIo)?;
            }
        }

        // Post-authentication: ParameterStatus, BackendKeyData, notices, then ReadyForQuery.
        let mut greeting = BytesMut::with_capacity(1024);
        let mut cancel_key = None;
        loop {
            let (tag, body) = read_frame(&mut stream, &mut buf, limits, Peer::Upstream).await?;
            match backend::parse(tag, &body).map_err(SessionError::UpstreamProtocol)? {
                ServerMessage::BackendKeyData { pid, secret } => {
                    cancel_key = Some(CancelKey {
                        pid,
                        secret: Bytes::copy_from_slice(secret),
                    });
                }
                ServerMessage::ErrorResponse(fields) => {
                    return Ok(LoginOutcome::Refused(LoginRefused {
                        raw: reframe(tag, &body),
                        message: fields.message(),
                    }));
                }
                _ => {}
            }
            greeting.put_slice(&reframe(tag, &body));
            if tag == b'Z' {
                break;
            }
        }
        Ok(LoginOutcome::Ready(Upstream {
            stream,
            buf,
            greeting: greeting.freeze(),
            cancel_key,
            negotiation,
        }))
    }

    fn password(&self) -> Result<&str, SessionError> {
        self.url.password.as_deref().ok_or_else(|| {
            SessionError::UpstreamLogin(format!(
                "the {} store asks for a password but {} has none",
                self.store_name(),
                self.url.redacted()
            ))
        })
    }

    fn unexpected(&self, what: &str) -> SessionError {
        SessionError::UpstreamLogin(format!("unexpected {what} from the {} store", self.store_name()))
    }
}

/// Rebuilds a frame from its tag and body (startup replies are few and small).
fn reframe(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(store: Role, port: u16) -> UpstreamTarget {
        let url = StoreUrl::parse(&format!("postgres://postgres@127.0.0.1:{port}/db")).unwrap();
        UpstreamTarget { url, store }
    }

    async fn login_error(target: &UpstreamTarget) -> SessionError {
        match target
            .connect(196_608, &[], Duration::from_millis(300), None)
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("login to a silent or closed port succeeded"),
        }
    }

    /// The mirror logs in to NEW with the same code as sessions log in to OLD: its errors must
    /// not blame OLD.
    #[tokio::test]
    async fn errors_name_the_store_logged_in_to() {
        // A port that accepts and never answers: the login times out.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        for (store, name, other) in [(Role::New, "NEW", "OLD"), (Role::Old, "OLD", "NEW")] {
            let e = login_error(&target(store, port)).await.to_string();
            assert!(e.contains(name) && !e.contains(other), "{e}");
        }
        // A port nobody listens on: the connection is refused.
        drop(silent);
        for (store, name, other) in [(Role::New, "NEW", "OLD"), (Role::Old, "OLD", "NEW")] {
            let e = login_error(&target(store, port)).await.to_string();
            assert!(e.contains(name) && !e.contains(other), "{e}");
        }
    }
}
