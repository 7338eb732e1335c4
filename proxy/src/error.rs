//! Errors of the proxy layer.
//!
//! Every error knows where it came from ([`ErrorSource`], a metrics label) and what the client
//! should be told. Errors from a store are forwarded to the client byte for byte and never become
//! one of these; these are the proxy's own.

use switchyard_pgwire::backend::ErrorResponse;
use switchyard_pgwire::{sqlstate, ProtocolError};

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something wrong.
    Client,
    /// The OLD store failed or went away.
    Old,
    /// The NEW store failed or went away.
    New,
    /// The proxy itself.
    Internal,
}

impl ErrorSource {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Old => "old",
            ErrorSource::New => "new",
            ErrorSource::Internal => "internal",
        }
    }
}

/// Error kinds counted per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A store answered a statement with an ErrorResponse.
    Statement,
    /// A socket failed.
    Io,
    /// A peer broke the protocol.
    Protocol,
    /// Logging in failed.
    Login,
    /// The proxy refused a connection.
    Refused,
    /// Something did not answer in time.
    Timeout,
}

pub(crate) const ERROR_KINDS: [ErrorKind; 6] = [
    ErrorKind::Statement,
    ErrorKind::Io,
    ErrorKind::Protocol,
    ErrorKind::Login,
    ErrorKind::Refused,
    ErrorKind::Timeout,
];

impl ErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Statement => "statement",
            ErrorKind::Io => "io",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Login => "login",
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the config.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A store's engine that this build cannot proxy.
    #[error("{store}.url: the {engine} engine is not supported yet; this build proxies PostgreSQL only")]
    UnsupportedEngine {
        /// `"old"` or `"new"`.
        store: &'static str,
        /// The URL's engine.
        engine: &'static str,
    },
    /// A store's handle could not be set up.
    #[error("{0}")]
    Store(Box<switchyard_store::StoreError>),
    /// The users file's entries cannot be turned into verifiers.
    #[error("{0}")]
    Users(String),
    /// The `[tls]` files cannot be used.
    #[error("{0}")]
    Tls(crate::tls::TlsError),
    /// A worker thread could not be started or its runtime built.
    #[error("worker thread: {0}")]
    Worker(std::io::Error),
    /// A worker thread ended with a panic.
    #[error("a worker thread died")]
    WorkerDied,
    /// Telemetry could not be set up.
    #[error("telemetry: {0}")]
    Telemetry(String),
    /// Dual writes cannot start: a table, its schema or the side objects are not ready, or a
    /// store cannot be reached.
    #[error("dual writes: {0}")]
    DualWrite(Box<switchyard_dualwrite::StartError>),
}

/// Why a client session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's socket failed.
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
    /// The authoritative store's socket failed.
    #[error("upstream I/O: {0}")]
    UpstreamIo(std::io::Error),
    /// The client broke the protocol.
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[from] ProtocolError),
    /// The upstream server broke the protocol.
    #[error("upstream protocol violation: {0}")]
    UpstreamProtocol(ProtocolError),
    /// Login to the store failed before the session started.
    #[error("upstream login: {0}")]
    UpstreamLogin(String),
    /// The store asked for a proof of the client's role that the proxy does not hold
    /// (`[auth] upstream_login = "client"`); the message says how to give it one.
    #[error("upstream login: {0}")]
    NoUpstreamCredential(String),
    /// `[auth] auth_query` could not be run on the store.
    #[error("auth_query: {0}")]
    AuthLookup(String),
    /// The proxy refused the session (auth, limits, shutdown) and told the client why.
    #[error("refused: {0}")]
    Refused(String),
    /// The client's password (or the user) was wrong; the client was told 28P01.
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    /// The client or upstream did not answer in time.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// `[mirror] fault_injection` made the session die here (crash tests).
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

impl From<switchyard_dualwrite::StartError> for StartError {
    fn from(e: switchyard_dualwrite::StartError) -> Self {
        StartError::DualWrite(Box::new(e))
    }
}

impl From<switchyard_dualwrite::SessionError> for SessionError {
    fn from(e: switchyard_dualwrite::SessionError) -> Self {
        use switchyard_dualwrite::SessionError as Dual;
        match e {
            Dual::ClientIo(e) => SessionError::ClientIo(e),
            Dual::UpstreamIo(e) => SessionError::UpstreamIo(e),
            Dual::ClientProtocol(e) => SessionError::ClientProtocol(e),
            Dual::UpstreamProtocol(e) => SessionError::UpstreamProtocol(e),
            Dual::Injected(what) => SessionError::Injected(what),
        }
    }
}

impl From<switchyard_store::wire::LoginError> for SessionError {
    fn from(e: switchyard_store::wire::LoginError) -> Self {
        use switchyard_store::wire::LoginError;
        match e {
            LoginError::Refused(message) | LoginError::Tls(message) => SessionError::UpstreamLogin(message),
            LoginError::NoCredential(message) => SessionError::NoUpstreamCredential(message),
            LoginError::Timeout(what) => SessionError::Timeout(what),
            LoginError::Io(e) => SessionError::UpstreamIo(e),
            LoginError::Protocol(e) => SessionError::UpstreamProtocol(e),
        }
    }
}

impl SessionError {
    /// Who caused it, for metrics.
    pub fn source(&self) -> ErrorSource {
        match self {
            SessionError::ClientIo(_)
            | SessionError::ClientProtocol(_)
            | SessionError::Refused(_)
            | SessionError::AuthFailed(_) => ErrorSource::Client,
            SessionError::Timeout(_) => ErrorSource::Client,
            SessionError::Injected(_) => ErrorSource::Internal,
            SessionError::UpstreamIo(_)
            | SessionError::UpstreamProtocol(_)
            | SessionError::UpstreamLogin(_)
            | SessionError::NoUpstreamCredential(_)
            | SessionError::AuthLookup(_) => ErrorSource::Old,
        }
    }

    /// What kind of failure it is, for metrics.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SessionError::ClientIo(_) | SessionError::UpstreamIo(_) => ErrorKind::Io,
            SessionError::ClientProtocol(_) | SessionError::UpstreamProtocol(_) => ErrorKind::Protocol,
            SessionError::UpstreamLogin(_)
            | SessionError::NoUpstreamCredential(_)
            | SessionError::AuthLookup(_) => ErrorKind::Login,
            SessionError::Refused(_) | SessionError::AuthFailed(_) => ErrorKind::Refused,
            SessionError::Timeout(_) => ErrorKind::Timeout,
            SessionError::Injected(_) => ErrorKind::Refused,
        }
    }

    /// The FATAL message the client should get before the connection closes, if any.
    pub fn client_message(&self) -> Option<ErrorResponse> {
        match self {
            SessionError::ClientProtocol(e) => Some(ErrorResponse::fatal(e.sqlstate(), e.to_string())),
            SessionError::UpstreamProtocol(_) => Some(ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "the upstream server sent an invalid message",
            )),
            SessionError::UpstreamIo(_) => Some(ErrorResponse::fatal(
                sqlstate::CONNECTION_FAILURE,
                "lost the connection to the database server",
            )),
            // The fix is the operator's: the details are in the proxy's log, not for the client.
            SessionError::NoUpstreamCredential(_) => Some(
                ErrorResponse::fatal(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    "the proxy holds no credential the database server accepts for this role",
                )
                .with_hint("see the proxy's log for how to give it one"),
            ),
            SessionError::AuthLookup(_) => Some(
                ErrorResponse::fatal(
                    sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    "the proxy cannot reach the database server",
                )
                .with_hint("see the proxy's log for details"),
            ),
            SessionError::ClientIo(_)
            | SessionError::UpstreamLogin(_)
            | SessionError::Refused(_)
            | SessionError::AuthFailed(_)
            | SessionError::Timeout(_)
            | SessionError::Injected(_) => None,
        }
    }
}
