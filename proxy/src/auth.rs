//! Authenticating the client to the proxy, as `[auth]` says: trust, md5 or SCRAM-SHA-256.
//!
//! Failures are answered the way PostgreSQL answers them: FATAL 28P01 `password authentication
//! failed for user "..."`, whether the user is unknown or the password wrong, so the answer does
//! not reveal which user names exist. An unknown user still goes through a full exchange.
//!
//! A user the users file does not list is looked up on the authoritative store when
//! `[auth] auth_lookup = "old"` ([`AuthLookup`], PgBouncer's `auth_query`); nothing is cached,
//! so a changed or dropped role counts at the next login.
//!
//! A successful login leaves a [`ClientCredential`]: what the proxy can prove upstream as that
//! client (`[auth] upstream_login = "client"`): the users file's plaintext password, the md5
//! secret, or the SCRAM keys recovered from the client's own exchange.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use switchyard_config::{AuthMethod, UserCredential, UsersFile};
use switchyard_pgwire::auth::{
    md5_salt, verify_md5_response, Md5Source, ScramError, ScramSecret, ScramServer, SCRAM_SHA_256_PLUS,
};
use switchyard_pgwire::backend::{self, ErrorResponse};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_pgwire::{frontend, sqlstate};
pub(crate) use switchyard_store::wire::ClientCredential;
use switchyard_store::Store;
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
    /// Where users the file does not list are looked up, if anywhere.
    lookup: Option<Arc<AuthLookup>>,
}

/// `[auth] auth_lookup = "old"`: the secret of a user the users file does not list is fetched
/// with `auth_query` over the proxy's own small pool to the authoritative store (its URL's
/// login), never over a client's session.
#[derive(Debug)]
pub(crate) struct AuthLookup {
    pub(crate) store: Store,
    pub(crate) query: String,
}

/// What a login is checked against, prepared once at start (or fetched at login).
#[derive(Debug)]
enum Verifier {
    Md5(Md5Source),
    /// With the plaintext password when the users file gave one.
    Scram {
        secret: ScramSecret,
        password: Option<String>,
    },
}

/// What the users file's md5 entry proves upstream: its password, or its md5 secret.
fn credential_of_md5(source: &Md5Source) -> ClientCredential {
    match source {
        Md5Source::Password(p) => ClientCredential::Password(p.clone()),
        Md5Source::Secret(s) => ClientCredential::Md5Secret(s.clone()),
    }
}

impl ClientAuth {
    /// Prepares the verifiers. A plaintext password is turned into a SCRAM secret here, once,
    /// because deriving one costs thousands of hash rounds.
    pub(crate) fn new(
        method: AuthMethod,
        users: &UsersFile,
        lookup: Option<Arc<AuthLookup>>,
    ) -> Result<Self, String> {
        let mut mock_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut mock_key);
        let mut verifiers = HashMap::new();
        for entry in &users.users {
            let verifier = match (method, &entry.credential) {
                // Under trust nothing is checked, but a password (or md5 secret) in the users
                // file still serves the upstream login as the client, as PgBouncer's auth_file
                // does.
                (AuthMethod::Trust | AuthMethod::Md5, UserCredential::Password(p)) => {
                    Verifier::Md5(Md5Source::Password(p.clone()))
                }
                (AuthMethod::Trust | AuthMethod::Md5, UserCredential::Md5Secret(s)) => {
                    Verifier::Md5(Md5Source::Secret(s.clone()))
                }
                (AuthMethod::Trust, UserCredential::ScramSecret(_)) => continue,
                (AuthMethod::ScramSha256, UserCredential::Password(p)) => Verifier::Scram {
                    secret: ScramSecret::generate(p)
                        .map_err(|e| format!("users file: user \"{}\": {e}", entry.name))?,
                    password: Some(p.clone()),
                },
                (AuthMethod::ScramSha256, UserCredential::ScramSecret(s)) => Verifier::Scram {
                    secret: ScramSecret::parse(s)
                        .map_err(|e| format!("users file: user \"{}\": {e}", entry.name))?,
                    password: None,
                },
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
            lookup,
        })
    }

    /// The verifier of a user the users file does not list, from `auth_query`: a secret the
    /// method can check, or `None` (no such role, no password, or a secret of the other kind),
    /// which the caller treats as an unknown user.
    async fn looked_up(&self, user: &str) -> Result<Option<Verifier>, SessionError> {
        let Some(lookup) = &self.lookup else {
            return Ok(None);
        };
        let secret = lookup
            .store
            .role_secret(&lookup.query, user)
            .await
            .map_err(|e| SessionError::AuthLookup(e.to_string()))?;
        Ok(match (self.method, secret) {
            (AuthMethod::ScramSha256, Some(s)) => ScramSecret::parse(&s).ok().map(|secret| Verifier::Scram {
                secret,
                password: None,
            }),
            (AuthMethod::Md5, Some(s)) if s.starts_with("md5") => Some(Verifier::Md5(Md5Source::Secret(s))),
            _ => None,
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
    ) -> Result<ClientCredential, SessionError> {
        let fetched = match (self.method, self.users.contains_key(user)) {
            (AuthMethod::Trust, _) | (_, true) => None,
            (_, false) => self.looked_up(user).await?,
        };
        let verifier = self.users.get(user).or(fetched.as_ref());
        let proven = match self.method {
            AuthMethod::Trust => Some(match verifier {
                Some(Verifier::Md5(source)) => credential_of_md5(source),
                _ => ClientCredential::None,
            }),
            AuthMethod::Md5 => self.md5(stream, buf, user, verifier, limits).await?,
            AuthMethod::ScramSha256 => {
                self.scram(stream, buf, user, verifier, limits, channel_binding)
                    .await?
            }
        };
        if let Some(credential) = proven {
            return Ok(credential);
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
        verifier: Option<&Verifier>,
        limits: MessageLimits,
    ) -> Result<Option<ClientCredential>, SessionError> {
        let salt = md5_salt();
        let mut out = BytesMut::new();
        backend::auth_md5(&mut out, salt);
        stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
        stream.flush().await.map_err(SessionError::ClientIo)?;
        let body = read_password_message(stream, buf, limits).await?;
        let response = frontend::parse_password(&body)?;
        match verifier {
            Some(Verifier::Md5(source)) if verify_md5_response(source, user, salt, response) => {
                Ok(Some(credential_of_md5(source)))
            }
            _ => Ok(None),
        }
    }

    /// SCRAM-SHA-256, and on a TLS connection whose certificate allows it (`channel_binding`)
    /// SCRAM-SHA-256-PLUS offered first, as PostgreSQL offers them.
    async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        user: &str,
        verifier: Option<&Verifier>,
        limits: MessageLimits,
        channel_binding: Option<&[u8]>,
    ) -> Result<Option<ClientCredential>, SessionError> {
        let (server, password) = match verifier {
            Some(Verifier::Scram { secret, password }) => {
                (ScramServer::new(secret.clone()), password.as_ref())
            }
            _ => (ScramServer::for_unknown_user(user, &self.mock_key), None),
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
        match waiting.client_final_with_keys(&body) {
            Ok((server_final, keys)) => {
                out.clear();
                backend::auth_sasl_final(&mut out, &server_final);
                stream.write_all(&out).await.map_err(SessionError::ClientIo)?;
                stream.flush().await.map_err(SessionError::ClientIo)?;
                // The plaintext password, when the users file gave one, also answers servers
                // that ask for md5 or a cleartext password.
                Ok(Some(match password {
                    Some(p) => ClientCredential::Password(p.clone()),
                    None => ClientCredential::ScramKeys(keys),
                }))
            }
            Err(e) => scram_failure(stream, e).await,
        }
    }
}

/// A wrong proof is an ordinary failed login; a malformed exchange is a protocol violation.
async fn scram_failure<S: AsyncWrite + Unpin>(
    stream: &mut S,
    e: ScramError,
) -> Result<Option<ClientCredential>, SessionError> {
    if e.is_client_error() && e.sqlstate() != sqlstate::INVALID_PASSWORD {
        send_fatal(stream, ErrorResponse::fatal(e.sqlstate(), e.to_string())).await;
        return Err(SessionError::Refused(e.to_string()));
    }
    Ok(None)
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
