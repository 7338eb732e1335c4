//! Logging a session in upstream, and moving it to the other store when write authority moves
//! (`docs/cutover.md`): a new connection to the new authoritative store, logged in as the
//! session was, given the session's settings and its prepared statements again, before the
//! client's next message goes there. The client sees nothing of it: its connection, its cancel
//! key and its statements stay. The channels it listens on are listened on again; what cannot
//! move (temporary tables, session advisory locks, SQL-level `PREPARE`, `WITH HOLD` cursors)
//! ends the session with a clear error instead ([`held`]). With table groups split between the
//! stores, a session also moves for a transaction on the other store, and keeps its connection
//! to each ([`Parked`]).

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::Arc;
use switchyard_config::UpstreamLogin;
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::startup::{CancelKey, StartupMessage};
use switchyard_pgwire::{backend, frontend};

use switchyard_store::wire::{ClientLogin, Login, LoginOutcome, Upstream, WireTarget};

use crate::net::{NetRead, NetWrite};
use switchyard_store::Role;
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

/// A session's connection to the store an announced barrier moves the writes to, opened (logged
/// in as the session was) while the barrier is announced, so that the session's move after it
/// only replays its state. Dropped if the barrier ends without moving the writes there.
#[derive(Default)]
pub(crate) struct Standby(std::sync::Mutex<Option<(Role, Upstream)>>);

impl Standby {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(Role, Upstream)>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection opened to `role`, if any.
    pub(crate) fn take(&self, role: Role) -> Option<Upstream> {
        let mut slot = self.slot();
        match slot.take() {
            Some((r, u)) if r == role => Some(u),
            other => {
                *slot = other;
                None
            }
        }
    }
}

/// What a session's standby login needs, owned.
pub(crate) struct Owned {
    pub(crate) login: Arc<ClientLogin>,
    pub(crate) database: String,
    pub(crate) startup: StartupMessage,
}

/// Follows the proxy's announced barriers for one session: logs in ahead to the store a barrier
/// moves the writes to, and drops that connection when a barrier ends without moving them
/// there. Aborted with the session.
pub(crate) fn follow_barriers(
    state: Arc<ProxyState>,
    who: Owned,
    standby: Arc<Standby>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut announced = state.authority.announced.subscribe();
        loop {
            let target = *announced.borrow_and_update();
            let current = state.engine().upstream.store;
            match target {
                Some(role) if role != current && standby.slot().as_ref().is_none_or(|(r, _)| *r != role) => {
                    let target = WireTarget {
                        url: role.settings(&state.config).url.clone(),
                        store: role,
                    };
                    let w = Who {
                        user: &who.login.user,
                        database: &who.database,
                        credential: &who.login.credential,
                        startup: &who.startup,
                    };
                    match w.login(&state, &target).await {
                        Ok(LoginOutcome::Ready(u)) => *standby.slot() = Some((role, u)),
                        Ok(LoginOutcome::Refused(r)) => {
                            tracing::debug!(error = %r.message, "no connection ahead of the move")
                        }
                        Err(e) => tracing::debug!(error = %e, "no connection ahead of the move"),
                    }
                }
                None => {
                    let mut slot = standby.slot();
                    if slot.as_ref().is_some_and(|(r, _)| *r != current) {
                        *slot = None;
                    }
                }
                _ => {}
            }
            if announced.changed().await.is_err() {
                return;
            }
        }
    })
}

/// A session's new upstream connection, split for the relay.
pub(crate) struct Moved {
    pub(crate) rd: NetRead,
    pub(crate) wr: NetWrite,
    pub(crate) buf: BytesMut,
    pub(crate) cancel_key: Option<CancelKey>,
    pub(crate) addr: std::net::SocketAddr,
}

/// A session's connection to the other store while table groups are split between the stores,
/// kept between its transactions there.
pub(crate) struct Parked {
    pub(crate) store: Role,
    pub(crate) conn: Moved,
    /// The session's prepared statements (Parse message by name) when it left that
    /// connection: they are still there.
    pub(crate) held: HashMap<Vec<u8>, Bytes>,
}

/// Logs the session in to `target` and replays what it had: its settings, then its prepared
/// statements. A statement the new store cannot prepare is logged (the client's later use of
/// it fails there, as it would on a server where it was never prepared).
pub(crate) async fn to(
    state: &ProxyState,
    who: &Who<'_>,
    target: &WireTarget,
    resume: &mut switchyard_dualwrite::session::Resume,
    standby: Option<Upstream>,
) -> Result<Moved, SessionError> {
    if let Some(ahead) = standby {
        match replay(fresh(ahead)?, resume, &HashMap::new()).await {
            Ok(moved) => return Ok(moved),
            // Opened ahead and lost since (a server restart): a fresh login.
            Err(e) => tracing::debug!(error = %e, "the connection opened ahead failed; logging in again"),
        }
    }
    let upstream = match who.login(state, target).await? {
        LoginOutcome::Ready(u) => u,
        LoginOutcome::Refused(r) => return Err(SessionError::UpstreamLogin(r.message)),
    };
    replay(fresh(upstream)?, resume, &HashMap::new()).await
}

/// A connection just logged in, split.
fn fresh(upstream: Upstream) -> Result<Moved, SessionError> {
    let addr = upstream.stream.peer_addr().map_err(SessionError::UpstreamIo)?;
    let (rd, wr) = crate::net::split_store(upstream.stream);
    Ok(Moved {
        rd,
        wr,
        buf: upstream.buf,
        cancel_key: upstream.cancel_key,
        addr,
    })
}

/// Gives the session's state to `conn`: its settings and its prepared statements. `held`: the
/// statements the connection holds from an earlier visit of the session (a parked one; empty
/// for a new connection).
pub(crate) async fn replay(
    mut conn: Moved,
    resume: &mut switchyard_dualwrite::session::Resume,
    held: &HashMap<Vec<u8>, Bytes>,
) -> Result<Moved, SessionError> {
    // The statements the connection still holds from the session's last visit stay when the
    // session still has them as they were; the others are closed (the session closed or
    // redefined them since; its SQL-level PREPAREs stay) and what it lacks is prepared.
    let (prelude, close, parses) = resume.replay_over(held);
    let mut out = BytesMut::new();
    let mut answers = 0;
    if let Some(sql) = &prelude {
        frontend::query(&mut out, sql);
        answers += 1;
    }
    if !parses.is_empty() || !close.is_empty() {
        for name in &close {
            frontend::close(&mut out, frontend::Target::Statement, name);
        }
        for p in &parses {
            out.extend_from_slice(p);
        }
        frontend::sync(&mut out);
        answers += 1;
    }
    if answers > 0 {
        conn.wr.write_all(&out).await.map_err(SessionError::UpstreamIo)?;
        conn.wr.flush().await.map_err(SessionError::UpstreamIo)?;
        for _ in 0..answers {
            for error in until_ready(&mut conn.rd, &mut conn.buf).await? {
                tracing::warn!(error = %error, "the store refused part of the session's state");
            }
        }
    }
    Ok(conn)
}

/// What a session holds on the server it leaves at a move of write authority, read there just
/// before the move (the session is between transactions).
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// What cannot follow the session to another server (named for the client).
    pub(crate) unmovable: Vec<&'static str>,
    /// The channels it listens on (quoted): listened on again on the new connection.
    pub(crate) channels: Vec<String>,
}

/// Session-level advisory locks, temporary relations, holdable cursors, SQL-level prepared
/// statements, and the channels listened on, of the connection it runs on.
const HELD_SQL: &str = "SELECT \
    (SELECT count(*) FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory'), \
    (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
    (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable), \
    (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql), \
    (SELECT coalesce(string_agg(pg_catalog.quote_ident(c), ' '), '') FROM pg_catalog.pg_listening_channels() c)";

/// Reads [`Held`] on the connection a session is about to leave.
pub(crate) async fn held(
    rd: &mut NetRead,
    wr: &mut NetWrite,
    buf: &mut BytesMut,
) -> Result<Held, SessionError> {
    let mut out = BytesMut::new();
    frontend::query(&mut out, HELD_SQL);
    wr.write_all(&out).await.map_err(SessionError::UpstreamIo)?;
    wr.flush().await.map_err(SessionError::UpstreamIo)?;
    let mut row: Vec<String> = Vec::new();
    let errors = until_ready_with(rd, buf, |tag, body| {
        if let (b'D', Some(fields)) = (tag, backend::data_row_fields(body)) {
            row = fields
                .iter()
                .map(|f| String::from_utf8_lossy(f.unwrap_or_default()).into_owned())
                .collect();
        }
    })
    .await?;
    if let Some(e) = errors.first() {
        return Err(SessionError::Refused(format!("reading the session's state: {e}")));
    }
    let count = |i: usize| row.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let mut held = Held::default();
    for (i, what) in [
        (0, "a session-level advisory lock"),
        (1, "temporary tables"),
        (2, "a cursor WITH HOLD"),
        (3, "statements prepared with SQL PREPARE"),
    ] {
        if count(i) > 0 {
            held.unmovable.push(what);
        }
    }
    held.channels = row
        .get(4)
        .map(|c| {
            c.split(' ')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(held)
}

/// Listens on `channels` on the session's new connection (at a move of write authority).
pub(crate) async fn listen(conn: &mut Moved, channels: &[String]) -> Result<(), SessionError> {
    if channels.is_empty() {
        return Ok(());
    }
    let sql: Vec<String> = channels.iter().map(|c| format!("LISTEN {c}")).collect();
    let mut out = BytesMut::new();
    frontend::query(&mut out, &sql.join("; "));
    conn.wr.write_all(&out).await.map_err(SessionError::UpstreamIo)?;
    conn.wr.flush().await.map_err(SessionError::UpstreamIo)?;
    for error in until_ready(&mut conn.rd, &mut conn.buf).await? {
        tracing::warn!(error = %error, "the store refused to listen on the session's channels");
    }
    Ok(())
}

/// Reads up to ReadyForQuery; the errors seen on the way.
async fn until_ready(stream: &mut NetRead, buf: &mut BytesMut) -> Result<Vec<String>, SessionError> {
    until_ready_with(stream, buf, |_, _| {}).await
}

/// [`until_ready`], showing every other message (tag, body) to `each`.
async fn until_ready_with(
    stream: &mut NetRead,
    buf: &mut BytesMut,
    mut each: impl FnMut(u8, &[u8]),
) -> Result<Vec<String>, SessionError> {
    let mut errors = Vec::new();
    loop {
        while let Some(frame) =
            take_frame(buf, MessageLimits::SERVER).map_err(SessionError::UpstreamProtocol)?
        {
            let body: Bytes = frame.bytes.slice(5..);
            match frame.tag {
                b'E' => errors.push(backend::error_fields(&body).summary()),
                b'Z' => return Ok(errors),
                tag => each(tag, &body),
            }
        }
        buf.reserve(8192);
        if stream.read_buf(buf).await.map_err(SessionError::UpstreamIo)? == 0 {
            return Err(SessionError::UpstreamIo(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}
