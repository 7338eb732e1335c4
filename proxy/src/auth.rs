//! Authenticating the client to the proxy, as `[auth]` says: trust, md5 or SCRAM-SHA-256.
//!
//! Failures are answered the way PostgreSQL answers them: FATAL 28P01 `password authentication
//! failed for user "..."`, whether the user is unknown or the password wrong, so the answer does
//! not reveal which user names exist. An unknown user still goes through a full exchange.

use std::collections::HashMap;

use bytes::BytesMut;
use switchyard_config::{AuthMethod, UserCredential, UsersFile};
use switchyard_pgwire::auth::{
    md5_salt, verify_md5_response, Md5Source, ScramError, ScramSecret, ScramServer, SCRAM_SHA_256_PLUS,
};
use switchyard_pgwire::backend::{self, ErrorResponse};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_pgwire::{frontend, sqlstate};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::SessionError;
use crate::io::read_frame;

const SCRAM_MECHANISM: &str = switchyard_pgwire::auth::SCRAM_SHA_256;

/// Users and method, resolved once at start so logins do no parsing.
#[derive(Debug)]
pub(crate) struct ClientAuth {
    method: AuthMethod,
    users: HashMap<String, Verifier>,
    /// Key for the mock SCRAM exchange of unknown users (stable per process).
    mock_key: [u8; 32],
}

/// What a login is checked against, prepared once at start.
#[derive(Debug)]
enum Verifier {
    Md5(Md5Source),
    Scram(ScramSecret),
}

impl ClientAuth {
    /// Prepares the verifiers. A plaintext password is turned into a SCRAM secret here, once,
    /// because deriving one costs thousands of hash rounds.
    pub(crate) fn new(method: AuthMethod, users: &UsersFile) -> Result<Self, String> {
        let mut mock_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut mock_key);
        let mut verifiers = HashMap::new();
        for entry in &users.users {
            let verifier = match (method, &entry.credential) {
                (AuthMethod::Trust, _) => continue,
                (AuthMethod::Md5, UserCredential::Password(p)) => {
                    Verifier::Md5(Md5Source::Password(p.clone()))
                }
                (AuthMethod::Md5, UserCredential::Md5Secret(s)) => {
                    Verifier::Md5(Md5Source::Secret(s.clone()))
                }
                (AuthMethod::ScramSha256, UserCredential::Password(p)) => Verifier::Scram(
                    ScramSecret::generate(p)
                        .map_err(|e| format!("users file: user \"{}\": {e}", entry.name))?,
                ),
                (AuthMethod::ScramSha256, UserCredential::ScramSecret(s)) => Verifier::Scram(
                    ScramSecret::parse(s).map_err(|e| format!("users file: user \"{}\": {e}", entry.name))?,
                ),
                (method, credential) => {
                    return Err(format!(
                    "users file: user \"{}\" has a {} credential, which cannot be used with auth method {}",
                    entry.name,
                    credential.kind(),
                    method.as_str()
                ))
                }
            };
            verifiers.insert(entry.name.clone(), verifier);
        }
        Ok(ClientAuth {
            method,
            users: verifiers,
            mock_key,
        })
    }

    /// Runs the exchange. On success nothing has been sent yet for AuthenticationOk: the caller
    /// sends it together with the upstream's parameters. On failure the client has been told.
    pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        user: &str,
        limits: MessageLimits,
        channel_binding: Option<&[u8]>,
    ) -> Result<(), SessionError> {
        let ok = match self.method {
            AuthMethod::Trust => true,
            AuthMethod::Md5 => self.md5(stream, buf, user, limits).await?,
            AuthMethod::ScramSha256 => self.scram(stream, buf, user, limits, channel_binding).await?,
        };
        if ok {
            return Ok(());
        }
        let msg = format!("password authentication failed for user \"{user}\"");
        send_fatal(
            stream,
            ErrorResponse::fatal(sqlstate::INVALID_PASSWORD, msg.clone()),
        )
        .await;
        Err(SessionError::AuthFailed(user.to_owned()))
    }

    async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        user: &str,
        limits: MessageLimits,
    ) -> Result<bool, SessionError> {
        let salt = md5_salt();
        let mut out = BytesMut::new();
        backend::auth_md5(&mut out, salt);
        stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
        stream.flush().await.map_err(SessionError::ClientIo)?;
        let body = read_password_message(stream, buf, limits).await?;
        let response = frontend::parse_password(&body)?;
        match self.users.get(user) {
            Some(Verifier::Md5(source)) => Ok(verify_md5_response(source, user, salt, response)),
            _ => Ok(false),
        }
    }

    /// SCRAM-SHA-256, and on a TLS connection whose certificate allows it (`channel_binding`)
    /// SCRAM-SHA-256-PLUS offered first, as PostgreSQL offers them.
    async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        user: &str,
        limits: MessageLimits,
        channel_binding: Option<&[u8]>,
    ) -> Result<bool, SessionError> {
        let server = match self.users.get(user) {
            Some(Verifier::Scram(secret)) => ScramServer::new(secret.clone()),
            _ => ScramServer::for_unknown_user(user, &self.mock_key),
        };
        let mut out = BytesMut::new();
        match channel_binding {
            Some(_) => backend::auth_sasl(&mut out, &[SCRAM_SHA_256_PLUS, SCRAM_MECHANISM]),
            None => backend::auth_sasl(&mut out, &[SCRAM_MECHANISM]),
        }
        stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
        stream.flush().await.map_err(SessionError::ClientIo)?;

        let body = read_password_message(stream, buf, limits).await?;
        let (mechanism, first) = frontend::parse_sasl_initial_response(&body)?;
        let server = match (mechanism, channel_binding) {
            (SCRAM_MECHANISM, None) => server,
            (SCRAM_MECHANISM, Some(data)) => server.with_channel_binding(data.to_vec(), false),
            (SCRAM_SHA_256_PLUS, Some(data)) => server.with_channel_binding(data.to_vec(), true),
            _ => {
                let e = ErrorResponse::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                );
                send_fatal(stream, e).await;
                return Err(SessionError::Refused(format!("SASL mechanism {mechanism}")));
            }
        };
        let waiting = match server.client_first(first) {
            Ok(w) => w,
            Err(e) => return scram_failure(stream, e).await,
        };
        out.clear();
        backend::auth_sasl_continue(&mut out, waiting.server_first_message());
        stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
        stream.flush().await.map_err(SessionError::ClientIo)?;

        let body = read_password_message(stream, buf, limits).await?;
        match waiting.client_final(&body) {
            Ok(server_final) => {
                out.clear();
                backend::auth_sasl_final(&mut out, &server_final);
                stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
                stream.flush().await.map_err(SessionError::ClientIo)?;
                Ok(true)
            }
            Err(e) => scram_failure(stream, e).await,
        }
    }
}

/// A wrong proof is an ordinary failed login; a malformed exchange is a protocol violation.
async fn scram_failure<S: AsyncWrite + Unpin>(stream: &mut S, e: ScramError) -> Result<bool, SessionError> {
    if e.is_client_error() && e.sqlstate() != sqlstate::INVALID_PASSWORD {
        send_fatal(stream, ErrorResponse::fatal(e.sqlstate(), e.to_string())).await;
        return Err(SessionError::Refused(e.to_string()));
    }
    Ok(false)
}

async fn read_password_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limits: MessageLimits,
) -> Result<bytes::Bytes, SessionError> {
    let (tag, body) = read_frame(stream, buf, limits).await?;
    if tag != b'p' {
        return Err(SessionError::ClientProtocol(
            switchyard_pgwire::ProtocolError::Malformed {
                what: "authentication",
                detail: "expected a password response",
            },
        ));
    }
    Ok(body)
}

/// Best-effort FATAL to the client; the connection is closing anyway.
pub(crate) async fn send_fatal<S: AsyncWrite + Unpin>(stream: &mut S, error: ErrorResponse) {
    let mut out = BytesMut::new();
    error.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}
