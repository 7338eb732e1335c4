//! Logging a session in upstream, and moving it to the other store when write authority moves
//! (`docs/cutover.md`): a new connection to the new authoritative store, logged in as the
//! session was, given the session's settings and its prepared statements again, before the
//! client's next message goes there. The client sees nothing of it: its connection, its cancel
//! key and its statements stay. What cannot move (temporary tables, `LISTEN`, session advisory
//! locks, SQL-level `PREPARE`, `WITH HOLD` cursors) is lost; the documentation says so.

use bytes::{Bytes, BytesMut};
use switchyard_config::UpstreamLogin;
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::startup::{CancelKey, StartupMessage};
use switchyard_pgwire::{backend, frontend};
use switchyard_store::wire::{Login, LoginOutcome, StoreStream, WireTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::ClientCredential;
use crate::error::SessionError;
use crate::state::ProxyState;

/// Who a session logs in upstream as.
pub(crate) struct Who<'a> {
    pub(crate) user: &'a str,
    /// The database the client named.
    pub(crate) database: &'a str,
    pub(crate) credential: &'a ClientCredential,
    pub(crate) startup: &'a StartupMessage,
}

impl Who<'_> {
    /// Logs in to `target` as the client (`[auth] upstream_login = "client"`) or as the URL's
    /// user. The migrated database is the target's own (OLD's and NEW's may be named
    /// differently); another database keeps its name.
    pub(crate) async fn login(
        &self,
        state: &ProxyState,
        target: &WireTarget,
    ) -> Result<LoginOutcome, SessionError> {
        let migrated =
            self.database == state.config.old.url.database || self.database == state.config.new.url.database;
        let database = if migrated {
            target.url.database.as_str()
        } else {
            self.database
        };
        let login = match state.config.auth.upstream_login {
            UpstreamLogin::Client => Login {
                user: self.user,
                database,
                credential: self.credential.as_wire(),
                of_url: false,
            },
            UpstreamLogin::Service => Login {
                database,
                ..target.url_login()
            },
        };
        let settings = &state.config.proxy;
        target
            .connect_as(
                login,
                self.startup.protocol,
                &self.startup.params,
                settings.connect_timeout,
                settings.tcp_keepalive,
            )
            .await
            .map_err(SessionError::from)
    }
}

/// A session's new upstream connection.
pub(crate) struct Moved {
    pub(crate) stream: StoreStream,
    pub(crate) buf: BytesMut,
    pub(crate) cancel_key: Option<CancelKey>,
    pub(crate) addr: std::net::SocketAddr,
}

/// Logs the session in to `target` and replays what it had: its settings, then its prepared
/// statements. A statement the new store cannot prepare is logged (the client's later use of
/// it fails there, as it would on a server where it was never prepared).
pub(crate) async fn to(
    state: &ProxyState,
    who: &Who<'_>,
    target: &WireTarget,
    resume: &mut switchyard_dualwrite::session::Resume,
) -> Result<Moved, SessionError> {
    let upstream = match who.login(state, target).await? {
        LoginOutcome::Ready(u) => u,
        LoginOutcome::Refused(r) => return Err(SessionError::UpstreamLogin(r.message)),
    };
    let addr = upstream.stream.peer_addr().map_err(SessionError::UpstreamIo)?;
    let mut stream = upstream.stream;
    let mut buf = upstream.buf;
    let (prelude, parses) = resume.replay();
    let mut out = BytesMut::new();
    let mut answers = 0;
    if let Some(sql) = &prelude {
        frontend::query(&mut out, sql);
        answers += 1;
    }
    if !parses.is_empty() {
        for p in &parses {
            out.extend_from_slice(p);
        }
        frontend::sync(&mut out);
        answers += 1;
    }
    if answers > 0 {
        stream.write_all(&out).await.map_err(SessionError::UpstreamIo)?;
        stream.flush().await.map_err(SessionError::UpstreamIo)?;
        for _ in 0..answers {
            for error in until_ready(&mut stream, &mut buf).await? {
                tracing::warn!(error = %error, "the new authoritative store refused part of the session's state");
            }
        }
    }
    Ok(Moved {
        stream,
        buf,
        cancel_key: upstream.cancel_key,
        addr,
    })
}

/// Reads up to ReadyForQuery; the errors seen on the way.
async fn until_ready(stream: &mut StoreStream, buf: &mut BytesMut) -> Result<Vec<String>, SessionError> {
    let mut errors = Vec::new();
    loop {
        while let Some(frame) =
            take_frame(buf, MessageLimits::SERVER).map_err(SessionError::UpstreamProtocol)?
        {
            let body: Bytes = frame.bytes.slice(5..);
            match frame.tag {
                b'E' => errors.push(backend::error_fields(&body).summary()),
                b'Z' => return Ok(errors),
                _ => {}
            }
        }
        buf.reserve(8192);
        if stream.read_buf(buf).await.map_err(SessionError::UpstreamIo)? == 0 {
            return Err(SessionError::UpstreamIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}
