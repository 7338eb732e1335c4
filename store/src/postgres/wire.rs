//! Logging in to a PostgreSQL store at the wire level, with the credentials of its URL: the
//! proxy's sessions log in to the authoritative store this way and relay bytes, the dual-write
//! engine's link to the follower logs in the same way. Every error names the store it was about.
//! Also the other raw-socket pieces both need: reading a whole frame, a CancelRequest, socket
//! options.
//!
//! The client's own startup parameters (`application_name`, `options`, `DateStyle`, ...) go into
//! the upstream StartupMessage, so the server applies them at backend start exactly as it would
//! for a direct connection, and `RESET` behaves the same. What the server answers after
//! authentication (ParameterStatus, BackendKeyData, notices) is kept as raw bytes and forwarded
//! to the client unchanged: the client sees the real backend's pid, cancel key and settings.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use switchyard_config::{SslMode, StoreTls, StoreUrl};
use switchyard_pgwire::auth::{md5_response_from_secret, ScramKeyClient, ScramKeys};
use switchyard_pgwire::backend::{self, Authentication, ServerMessage};
use switchyard_pgwire::frame::{peek_header, reserve_ahead, MessageLimits};
use switchyard_pgwire::frontend;
use switchyard_pgwire::startup::{CancelKey, StartupMessage, SSL_REQUEST_CODE};
use switchyard_pgwire::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

pub use super::tls::StoreStream;
use crate::Role;

/// Why a wire-level login (or a read during it) failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Connecting, or the authentication exchange, failed; the message names the store.
    #[error("{0}")]
    Refused(String),
    /// The store did not finish the login in time (what was being done).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The socket failed.
    #[error("upstream I/O: {0}")]
    Io(std::io::Error),
    /// The server broke the protocol.
    #[error("upstream protocol violation: {0}")]
    Protocol(ProtocolError),
    /// TLS could not be set up as `sslmode` asks (no TLS on the server, a certificate that
    /// does not verify, an unreadable file); the message names the store.
    #[error("{0}")]
    Tls(String),
    /// The server asks for a proof the proxy does not hold for this role (a password it was
    /// never given, an authentication method its credential cannot answer); the message says
    /// which role, which store and how to give the proxy what it needs.
    #[error("{0}")]
    NoCredential(String),
}

/// As whom a wire-level login is made, and what proves it.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// The role (`user` in the StartupMessage).
    pub user: &'a str,
    /// The database to open.
    pub database: &'a str,
    /// What answers the server's authentication request.
    pub credential: Credential<'a>,
    /// Whether this is the URL's own login ([`WireTarget::url_login`]): a missing password is
    /// then the URL's to fix.
    pub of_url: bool,
}

/// What answers a server's authentication request during a [`Login`].
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// Nothing: enough when the server trusts the connection; a password request is refused
    /// with [`LoginError::NoCredential`].
    None,
    /// A plaintext password: answers cleartext, md5 and SCRAM-SHA-256 requests.
    Password(&'a str),
    /// A stored md5 secret (`md5<hex>`): answers md5 requests (the md5 challenge only needs
    /// md5(password || user), which is what the secret holds).
    Md5Secret(&'a str),
    /// A SCRAM ClientKey recovered from the client's own exchange with the proxy, with the
    /// secret it was checked against: answers SCRAM-SHA-256 requests from a server that holds
    /// the same secret ([`switchyard_pgwire::auth::ScramKeyClient`]).
    ScramKeys(&'a ScramKeys),
}

impl Credential<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Credential::None => "no credential",
            Credential::Password(_) => "a password",
            Credential::Md5Secret(_) => "an md5 secret",
            Credential::ScramKeys(_) => "SCRAM keys",
        }
    }
}

/// What a client's successful login to the proxy leaves for logging in upstream as that client
/// (`[auth] upstream_login = "client"`): owned, so it outlives the login and can open more
/// connections on the session's behalf (a move to the other store, reads served by NEW).
/// `Debug` shows only the kind.
pub enum ClientCredential {
    /// Nothing (trust): the upstream login works only if the server asks for nothing either.
    None,
    Password(String),
    Md5Secret(String),
    ScramKeys(ScramKeys),
}

impl ClientCredential {
    /// The same, as a [`Login`] takes it.
    pub fn as_wire(&self) -> Credential<'_> {
        match self {
            ClientCredential::None => Credential::None,
            ClientCredential::Password(p) => Credential::Password(p),
            ClientCredential::Md5Secret(s) => Credential::Md5Secret(s),
            ClientCredential::ScramKeys(k) => Credential::ScramKeys(k),
        }
    }
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientCredential::None => "None",
            ClientCredential::Password(_) => "Password(<redacted>)",
            ClientCredential::Md5Secret(_) => "Md5Secret(<redacted>)",
            ClientCredential::ScramKeys(_) => "ScramKeys(<redacted>)",
        })
    }
}

/// A client's role and what proves it, kept by its session for the connections it opens later
/// as that client (reads served by NEW, shadow reads): the same login the session made
/// upstream, to the store's own database.
#[derive(Debug)]
pub struct ClientLogin {
    pub user: String,
    pub credential: ClientCredential,
}

impl ClientLogin {
    /// The login to `target`'s database.
    pub fn to<'a>(&'a self, target: &'a WireTarget) -> Login<'a> {
        Login {
            user: &self.user,
            database: &target.url.database,
            credential: self.credential.as_wire(),
            of_url: false,
        }
    }
}

/// Where and as whom the proxy logs in upstream.
#[derive(Debug, Clone)]
pub struct WireTarget {
    pub url: StoreUrl,
    /// Which store `url` is, for messages.
    pub store: Role,
}

/// A logged-in upstream connection.
pub struct Upstream {
    /// In TLS or in plain text, as the URL's `sslmode` and the server decided.
    pub stream: StoreStream,
    /// Bytes already read past the startup reply.
    pub buf: BytesMut,
    /// Everything the server sent after AuthenticationOk, up to and including ReadyForQuery.
    pub greeting: Bytes,
    /// The backend's cancel key, if it sent one.
    pub cancel_key: Option<CancelKey>,
    /// The server's NegotiateProtocolVersion, when it downgraded the client's requested minor
    /// version or ignored `_pq_` options; the client must see it before AuthenticationOk.
    pub negotiation: Option<Bytes>,
}

/// Login ended with the server's ErrorResponse, to be forwarded to the client as it came.
pub struct LoginRefused {
    pub raw: Bytes,
    pub message: String,
}

pub enum LoginOutcome {
    Ready(Upstream),
    Refused(LoginRefused),
}

impl WireTarget {
    /// Connects and logs in as the URL's user to its database, forwarding the client's
    /// parameters.
    pub async fn connect(
        &self,
        protocol: i32,
        client_params: &[(String, String)],
        timeout: Duration,
        keepalive: Option<Duration>,
    ) -> Result<LoginOutcome, LoginError> {
        self.connect_as(self.url_login(), protocol, client_params, timeout, keepalive)
            .await
    }

    /// The newest protocol version the URL's server speaks, asked once with the URL's own
    /// login: a startup asking for minor version 65535 is answered with NegotiateProtocolVersion
    /// naming it (PostgreSQL before 18 speaks 3.0, 18 speaks 3.2). The proxy needs it to answer
    /// a client's startup before that client has authenticated, as the server would.
    pub async fn newest_protocol(&self, timeout: Duration) -> Result<i32, LoginError> {
        const NEWEST_ASKABLE: i32 = 0x0003_ffff;
        let outcome = self.connect(NEWEST_ASKABLE, &[], timeout, None).await?;
        let LoginOutcome::Ready(mut upstream) = outcome else {
            return Err(LoginError::Refused(format!(
                "the {} store refused the login that asks for its protocol version",
                self.store.name()
            )));
        };
        let mut bye = BytesMut::with_capacity(5);
        frontend::terminate(&mut bye);
        let _ = upstream.stream.write_all(&bye).await;
        let _ = upstream.stream.shutdown().await;
        // A server that said nothing speaks every 3.x version asked for.
        Ok(match &upstream.negotiation {
            Some(v) => backend::negotiated_version(v.get(5..).unwrap_or_default()).ok_or(
                LoginError::Protocol(ProtocolError::Malformed {
                    what: "NegotiateProtocolVersion",
                    detail: "too short",
                }),
            )?,
            None => NEWEST_ASKABLE,
        })
    }

    /// The URL's own login: its user, its database, its password if it has one.
    pub fn url_login(&self) -> Login<'_> {
        Login {
            user: &self.url.user,
            database: &self.url.database,
            credential: self
                .url
                .password
                .as_deref()
                .map_or(Credential::None, Credential::Password),
            of_url: true,
        }
    }

    /// Connects to the URL's server (host, port, TLS settings) and logs in as `login` says,
    /// forwarding the client's parameters.
    pub async fn connect_as(
        &self,
        login: Login<'_>,
        protocol: i32,
        client_params: &[(String, String)],
        timeout: Duration,
        keepalive: Option<Duration>,
    ) -> Result<LoginOutcome, LoginError> {
        tokio::time::timeout(
            timeout,
            self.connect_inner(login, protocol, client_params, keepalive),
        )
        .await
        .map_err(|_| {
            LoginError::Timeout(match self.store {
                Role::Old => "connecting to the OLD store",
                Role::New => "connecting to the NEW store",
            })
        })?
    }

    /// Tries plain text and TLS in libpq's order for the URL's `sslmode`: `prefer` falls back
    /// to plain text when the server answers `N`, when the handshake fails or when the server
    /// refuses the login over TLS; `allow` retries in TLS when the server refuses the plain-text
    /// login. <https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-PROTECTION>
    async fn connect_inner(
        &self,
        login: Login<'_>,
        protocol: i32,
        client_params: &[(String, String)],
        keepalive: Option<Duration>,
    ) -> Result<LoginOutcome, LoginError> {
        let tls = StoreTls::of(&self.url).map_err(|e| self.tls_error(&e))?;
        let attempt = |encryption| self.attempt(encryption, &tls, login, protocol, client_params, keepalive);
        match tls.mode {
            SslMode::Disable => attempt(Encryption::Plain).await.map(|(o, _)| o),
            SslMode::Allow => match attempt(Encryption::Plain).await? {
                (LoginOutcome::Refused(plain), _) => match attempt(Encryption::Required).await {
                    Ok((outcome, _)) => Ok(outcome),
                    Err(e) => {
                        tracing::debug!(store = self.store.name(), error = %e, "sslmode=allow: TLS retry failed");
                        Ok(LoginOutcome::Refused(plain))
                    }
                },
                (outcome, _) => Ok(outcome),
            },
            SslMode::Prefer => match attempt(Encryption::Preferred).await {
                Ok((LoginOutcome::Refused(in_tls), true)) => match attempt(Encryption::Plain).await {
                    Ok((outcome, _)) => Ok(outcome),
                    Err(_) => Ok(LoginOutcome::Refused(in_tls)),
                },
                Err(LoginError::Tls(e)) => {
                    tracing::debug!(store = self.store.name(), error = %e, "sslmode=prefer: TLS failed, plain text");
                    attempt(Encryption::Plain).await.map(|(o, _)| o)
                }
                other => other.map(|(o, _)| o),
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                attempt(Encryption::Required).await.map(|(o, _)| o)
            }
        }
    }

    /// One connection and login; also says whether it ran in TLS.
    async fn attempt(
        &self,
        encryption: Encryption,
        tls: &StoreTls,
        login: Login<'_>,
        protocol: i32,
        client_params: &[(String, String)],
        keepalive: Option<Duration>,
    ) -> Result<(LoginOutcome, bool), LoginError> {
        let url = &self.url;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| {
                LoginError::Refused(format!(
                    "cannot connect to the {} store at {}: {e}",
                    self.store.name(),
                    url.redacted()
                ))
            })?;
        tune_socket(&tcp, keepalive);
        let stream = match encryption {
            Encryption::Plain => StoreStream::Plain(tcp),
            Encryption::Preferred => self.negotiate_tls(tcp, tls, false).await?,
            Encryption::Required => self.negotiate_tls(tcp, tls, true).await?,
        };
        let encrypted = stream.is_tls();
        Ok((
            self.login(stream, login, protocol, client_params).await?,
            encrypted,
        ))
    }

    /// Sends an SSLRequest and, when the server answers `S`, does the handshake. `N` leaves the
    /// connection in plain text, unless TLS is `required`.
    async fn negotiate_tls(
        &self,
        mut tcp: TcpStream,
        tls: &StoreTls,
        required: bool,
    ) -> Result<StoreStream, LoginError> {
        let (connector, name) = super::tls::connector(tls, &self.url.host).map_err(|e| self.tls_error(&e))?;
        let mut request = BytesMut::with_capacity(8);
        request.put_i32(8);
        request.put_i32(SSL_REQUEST_CODE);
        tcp.write_all(&request).await.map_err(LoginError::Io)?;
        // Exactly one byte: anything the server sent after it would have to come inside TLS
        // (CVE-2021-23222).
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(LoginError::Io)?;
        match answer[0] {
            b'S' => match connector.connect(name, tcp).await {
                Ok(stream) => Ok(StoreStream::Tls(Box::new(stream))),
                Err(e) => Err(self.tls_error(&format!("TLS handshake failed: {e}"))),
            },
            b'N' if !required => Ok(StoreStream::Plain(tcp)),
            b'N' => Err(self.tls_error(&format!(
                "the server does not support TLS (it answered N to the SSLRequest), and sslmode={} requires it",
                tls.mode
            ))),
            other => Err(self.tls_error(&format!("unexpected answer {other:#04x} to the SSLRequest"))),
        }
    }

    fn tls_error(&self, detail: &str) -> LoginError {
        LoginError::Tls(format!(
            "TLS with the {} store at {}: {detail}",
            self.store.name(),
            self.url.redacted()
        ))
    }

    /// The startup message and the authentication exchange on a connected stream.
    async fn login(
        &self,
        mut stream: StoreStream,
        login: Login<'_>,
        protocol: i32,
        client_params: &[(String, String)],
    ) -> Result<LoginOutcome, LoginError> {
        let url = &self.url;
        let mut params = vec![
            ("user".to_owned(), login.user.to_owned()),
            ("database".to_owned(), login.database.to_owned()),
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
        stream.write_all(&out).await.map_err(LoginError::Io)?;
        // TLS keeps ciphertext buffered until flushed; TCP flushes nothing.
        stream.flush().await.map_err(LoginError::Io)?;

        let limits = MessageLimits::default();
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut scram: Option<ScramLogin> = None;
        let mut negotiation = None;
        // Authentication exchange.
        loop {
            let (tag, body) = read_frame(&mut stream, &mut buf, limits).await?;
            let msg = backend::parse(tag, &body).map_err(LoginError::Protocol)?;
            out.clear();
            match msg {
                ServerMessage::Authentication(Authentication::Ok) => break,
                ServerMessage::Authentication(Authentication::CleartextPassword) => {
                    let Credential::Password(password) = login.credential else {
                        return Err(self.no_credential(&login, "a password"));
                    };
                    frontend::password(&mut out, password.as_bytes());
                }
                ServerMessage::Authentication(Authentication::Md5Password { salt }) => {
                    let hash = match login.credential {
                        Credential::Password(password) => postgres_protocol::authentication::md5_hash(
                            login.user.as_bytes(),
                            password.as_bytes(),
                            salt,
                        ),
                        Credential::Md5Secret(secret) => md5_response_from_secret(secret, salt),
                        _ => return Err(self.no_credential(&login, "an md5 password")),
                    };
                    frontend::password(&mut out, hash.as_bytes());
                }
                ServerMessage::Authentication(Authentication::Sasl { mechanisms }) => {
                    if !mechanisms.contains(&"SCRAM-SHA-256") {
                        return Err(LoginError::Refused(format!(
                            "the {} store offers SASL mechanisms {mechanisms:?}; only SCRAM-SHA-256 is supported",
                            self.store.name()
                        )));
                    }
                    let client = match login.credential {
                        Credential::Password(password) => ScramLogin::Password(Box::new(ScramSha256::new(
                            password.as_bytes(),
                            ChannelBinding::unsupported(),
                        ))),
                        Credential::ScramKeys(keys) => {
                            ScramLogin::KeysFirst(ScramKeyClient::new(keys.clone()))
                        }
                        _ => return Err(self.no_credential(&login, "a SCRAM-SHA-256 password")),
                    };
                    let first = match &client {
                        ScramLogin::Password(c) => c.message().to_vec(),
                        ScramLogin::KeysFirst(c) => c.client_first_message(),
                        ScramLogin::KeysFinal(_) => Vec::new(),
                    };
                    frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", &first);
                    scram = Some(client);
                }
                ServerMessage::Authentication(Authentication::SaslContinue(data)) => {
                    let scram_error = |e: &dyn std::fmt::Display| {
                        LoginError::Refused(format!("SCRAM with the {} store: {e}", self.store.name()))
                    };
                    let next = match scram.take().ok_or_else(|| self.unexpected("SASLContinue"))? {
                        ScramLogin::Password(mut client) => {
                            client.update(data).map_err(|e| scram_error(&e))?;
                            frontend::sasl_response(&mut out, client.message());
                            ScramLogin::Password(client)
                        }
                        ScramLogin::KeysFirst(client) => {
                            // Keys that do not fit the server's secret are a credential the
                            // operator must fix, not a fault of the server.
                            let (waiting, message) = client.server_first(data).map_err(|e| {
                                LoginError::NoCredential(format!(
                                    "SCRAM with the {} store as role \"{}\": {e}; the users file's secret must be \
                                     the role's secret on that server (pg_authid.rolpassword), or drop it from the \
                                     users file and use auth_lookup = \"old\"",
                                    self.store.name(),
                                    login.user
                                ))
                            })?;
                            frontend::sasl_response(&mut out, &message);
                            ScramLogin::KeysFinal(waiting)
                        }
                        ScramLogin::KeysFinal(_) => return Err(self.unexpected("SASLContinue")),
                    };
                    scram = Some(next);
                }
                ServerMessage::Authentication(Authentication::SaslFinal(data)) => {
                    let invalid = |e: &dyn std::fmt::Display| {
                        LoginError::Refused(format!(
                            "the {} store's SCRAM signature is invalid: {e}",
                            self.store.name()
                        ))
                    };
                    match scram.take().ok_or_else(|| self.unexpected("SASLFinal"))? {
                        ScramLogin::Password(mut client) => client.finish(data).map_err(|e| invalid(&e))?,
                        ScramLogin::KeysFinal(waiting) => {
                            waiting.server_final(data).map_err(|e| invalid(&e))?
                        }
                        ScramLogin::KeysFirst(_) => return Err(self.unexpected("SASLFinal")),
                    }
                }
                ServerMessage::Authentication(Authentication::Unsupported(code)) => {
                    return Err(LoginError::Refused(format!(
                        "the {} store asks for authentication method {code}, which the proxy does not support",
                        self.store.name()
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
                stream.write_all(&out).await.map_err(LoginError::Io)?;
                stream.flush().await.map_err(LoginError::Io)?;
            }
        }

        // Post-authentication: ParameterStatus, BackendKeyData, notices, then ReadyForQuery.
        let mut greeting = BytesMut::with_capacity(1024);
        let mut cancel_key = None;
        loop {
            let (tag, body) = read_frame(&mut stream, &mut buf, limits).await?;
            match backend::parse(tag, &body).map_err(LoginError::Protocol)? {
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

    /// The server asks `login` for `what`, which its credential cannot give.
    fn no_credential(&self, login: &Login<'_>, what: &str) -> LoginError {
        let store = self.store.name();
        if login.of_url {
            return LoginError::NoCredential(format!(
                "the {store} store asks for a password but {} has none",
                self.url.redacted()
            ));
        }
        LoginError::NoCredential(format!(
            "the {store} store asks role \"{}\" for {what}, and the proxy holds {} for it: give the user a \
             plaintext password in the users file, or use [auth] method = \"scram-sha-256\" with the role's \
             SCRAM secret (in the users file, or fetched with auth_lookup = \"old\"), or set \
             [auth] upstream_login = \"service\"",
            login.user,
            login.credential.kind()
        ))
    }

    fn unexpected(&self, what: &str) -> LoginError {
        LoginError::Refused(format!("unexpected {what} from the {} store", self.store.name()))
    }
}

/// The SCRAM exchange in progress with the server: with a password (postgres-protocol's
/// client), or with reused keys before and after the server-first message.
enum ScramLogin {
    Password(Box<ScramSha256>),
    KeysFirst(ScramKeyClient),
    KeysFinal(switchyard_pgwire::auth::ScramKeyClientAwaitingFinal),
}

/// How one connection attempt encrypts.
#[derive(Clone, Copy)]
enum Encryption {
    Plain,
    /// TLS if the server accepts the SSLRequest, plain text if it answers `N`.
    Preferred,
    Required,
}

/// Rebuilds a frame from its tag and body (startup replies are few and small).
fn reframe(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
    out.freeze()
}

/// Why a whole message could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The socket failed or closed.
    Io(std::io::Error),
    /// The peer broke the protocol (a bad length, say).
    Protocol(ProtocolError),
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => LoginError::Io(e),
            ReadError::Protocol(e) => LoginError::Protocol(e),
        }
    }
}

/// Reads one whole tagged message (from the server during login, from the client during its
/// authentication) and returns its tag and body.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: MessageLimits,
) -> Result<(u8, Bytes), ReadError> {
    loop {
        let header = peek_header(buf, limits).map_err(ReadError::Protocol)?;
        if let Some(h) = header {
            if buf.len() >= h.frame_len {
                let frame = buf.split_to(h.frame_len).freeze();
                return Ok((h.tag, frame.slice(h.body_range())));
            }
            reserve_ahead(buf, h.frame_len - buf.len());
        } else {
            reserve_for_read(buf, 1024);
        }
        if rd.read_buf(buf).await.map_err(ReadError::Io)? == 0 {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Makes sure `buf` has room for at least `want` more bytes without many small reads.
pub fn reserve_for_read(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(8 * 1024));
    }
}

/// Sends a CancelRequest for `key` on a new connection to the server at `addr`: the server
/// interrupts the backend's current statement (if any) and sends nothing back.
/// <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-CANCELING-REQUESTS>
pub async fn send_cancel_request(addr: impl ToSocketAddrs, key: &CancelKey) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(16);
    key.encode_request(&mut out);
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// `TCP_NODELAY` (every message is a request or an answer someone waits for) and, with
/// `keepalive`, TCP keepalives after that much idle time, so a peer that vanished is noticed.
pub fn tune_socket(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that announces a huge message and sends nothing more gets an error, and the
    /// buffer never held more than a bounded margin.
    #[tokio::test]
    async fn a_huge_announced_frame_is_not_allocated_up_front() {
        use tokio::io::AsyncWriteExt as _;
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let limits = MessageLimits::SERVER;
        let mut header = vec![b'R'];
        header.extend_from_slice(&((limits.max_message_bytes - 1) as u32).to_be_bytes());
        theirs.write_all(&header).await.unwrap();
        drop(theirs);
        let mut buf = BytesMut::new();
        let e = read_frame(&mut ours, &mut buf, limits).await.unwrap_err();
        assert!(matches!(e, ReadError::Io(_)), "{e:?}");
        assert!(
            buf.capacity() <= 2 * switchyard_pgwire::frame::RESERVE_AHEAD_MAX,
            "{}",
            buf.capacity()
        );
    }

    fn target(store: Role, port: u16) -> WireTarget {
        let url = StoreUrl::parse(&format!("postgres://postgres@127.0.0.1:{port}/db")).unwrap();
        WireTarget { url, store }
    }

    async fn login_error(target: &WireTarget) -> LoginError {
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
