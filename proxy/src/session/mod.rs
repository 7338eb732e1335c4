//! One client session: startup, authentication, upstream login, relay, goodbye.
//!
//! Startup and authentication are straight-line async code; after login the session is a relay
//! loop ([`relay`]). Every way a session ends is decided here: the client gets a FATAL
//! ErrorResponse with a proper SQLSTATE when the proxy ends it, and the upstream gets Terminate.

pub(crate) mod meter;
pub(crate) mod relay;
mod reroute;

use reroute::Who;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use switchyard_pgwire::backend::{self, ErrorResponse};
use switchyard_pgwire::startup::{
    StartupMessage, StartupPacket, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE,
};
use switchyard_pgwire::{frontend, sqlstate};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::auth::{send_fatal, ClientCredential};
use crate::io;
use crate::net::ClientStream;
use relay::{RelayParams, SessionEnd};
use switchyard_config::UpstreamLogin;
use switchyard_config::{OtherDatabases, TlsMode};
use switchyard_store::wire::ClientLogin;
use switchyard_store::wire::LoginOutcome;

use crate::error::SessionError;
use crate::shutdown::ShutdownState;
use crate::state::ProxyState;

/// How long a client may take from connecting to finishing authentication (PostgreSQL's
/// `authentication_timeout` default).
const AUTHENTICATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves one accepted client connection to the end.
pub(crate) async fn serve(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let span = tracing::info_span!(
        "session",
        id,
        %peer,
        user = tracing::field::Empty,
        backend_pid = tracing::field::Empty
    );
    let counters = &state.metrics.counters;
    counters.connection_opened();
    let result = run_session(&state, stream, peer, id, &span).await;
    counters.connection_closed();
    let _entered = span.enter();
    match result {
        Ok(end) => tracing::debug!(?end, "session ended"),
        Err(e) => {
            counters.error(e.source(), e.kind());
            match &e {
                SessionError::AuthFailed(user) => {
                    // The span carries the peer. Bounded: a flood of wrong passwords must not
                    // turn into a flood of log lines.
                    if let Some(suppressed) = state.auth_failures.admit() {
                        tracing::warn!(user = %user, suppressed, "password authentication failed");
                    }
                }
                SessionError::ClientIo(_) | SessionError::Refused(_) => {
                    tracing::debug!(error = %e, "session ended")
                }
                _ => tracing::warn!(error = %e, source = e.source().as_str(), "session failed"),
            }
        }
    }
}

/// Startup and login run inside the session span; the relay does not enter it on every poll
/// (that costs a subscriber call per wake-up on the hot path) but parents its statement spans
/// to it explicitly.
async fn run_session(
    state: &Arc<ProxyState>,
    client: TcpStream,
    peer: SocketAddr,
    id: u64,
    span: &tracing::Span,
) -> Result<SessionEnd, SessionError> {
    let mut client = ClientStream::Plain(client);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let ticket = state.logins.enter(id);
    let login = tokio::time::timeout(
        AUTHENTICATION_TIMEOUT,
        handshake(state, &mut client, peer, &mut buf),
    )
    .instrument(span.clone());
    let outcome = tokio::select! {
        outcome = login => outcome,
        () = ticket.shed() => {
            let e = ErrorResponse::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                "sorry, too many clients are still logging in",
            );
            send_fatal(&mut client, e).await;
            return Err(SessionError::Refused("shed: too many connections still logging in".into()));
        }
    };
    drop(ticket);
    let Admitted {
        startup,
        credential,
        other_database,
        negotiated,
    } = match outcome {
        Ok(Ok(Some(admitted))) => admitted,
        Ok(Ok(None)) => return Ok(SessionEnd::ClientClosed),
        Ok(Err(e)) => {
            if let Some(fatal) = e.client_message() {
                send_fatal(&mut client, fatal).await;
            }
            return Err(e);
        }
        Err(_) => return Err(SessionError::Timeout("client authentication")),
    };
    let user = startup.param("user").unwrap_or_default().to_owned();
    span.record("user", user.as_str());

    let _permit = match state.connection_slots.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            let e = ErrorResponse::fatal(sqlstate::TOO_MANY_CONNECTIONS, "sorry, too many clients already");
            send_fatal(&mut client, e).await;
            return Err(SessionError::Refused("max_connections reached".into()));
        }
    };
    if state.shutdown.state() != ShutdownState::Running {
        let e = ErrorResponse::fatal(sqlstate::CANNOT_CONNECT_NOW, "the proxy is shutting down");
        send_fatal(&mut client, e).await;
        return Err(SessionError::Refused("shutting down".into()));
    }

    let settings = &state.config.proxy;
    let database = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
    // Another database of the same server is relayed as it is, on OLD's server: only the
    // store's own database is migrated.
    let mut engine = state.engine();
    let target = if other_database {
        state.old_target()
    } else {
        engine.upstream.clone()
    };
    // Kept for the connections the session opens later as its client (reads served by NEW).
    let client_login = Arc::new(ClientLogin { user, credential });
    let user = client_login.user.as_str();
    let who = Who {
        user,
        database: &database,
        credential: &client_login.credential,
        startup: &startup,
    };
    let login = who.login(state, &target).instrument(span.clone()).await;
    let upstream = match login {
        Ok(LoginOutcome::Ready(u)) => u,
        Ok(LoginOutcome::Refused(refused)) => {
            // The server's own error, byte for byte.
            let _ = client.write_all(&refused.raw).await;
            let _ = client.flush().await;
            return Err(SessionError::UpstreamLogin(refused.message));
        }
        Err(e) => {
            tracing::warn!(error = %e, store = target.store.name(), "cannot open a session on the store");
            let fatal = e.client_message().unwrap_or_else(|| {
                ErrorResponse::fatal(
                    sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                    "the proxy cannot reach the database server",
                )
                .with_hint("see the proxy's log for details")
            });
            send_fatal(&mut client, fatal).await;
            return Err(e);
        }
    };
    let upstream_addr = upstream.stream.peer_addr().map_err(SessionError::UpstreamIo)?;
    // The key the client knows is the first backend's; after a move to the other store it
    // still names this session.
    let cancel_guard = upstream.cancel_key.clone().map(|key| {
        span.record("backend_pid", key.pid);
        state.cancel.register(key.clone(), upstream_addr, key)
    });

    let mut hello = BytesMut::with_capacity(upstream.greeting.len() + 64);
    match (&negotiated, &upstream.negotiation) {
        // The server could not be asked before authentication: its answer, late, is better
        // than none.
        (None, Some(late)) => hello.extend_from_slice(late),
        (Some(sent), Some(server)) if sent != server => {
            tracing::warn!("the server negotiated the protocol unlike the proxy did before authentication")
        }
        _ => {}
    }
    backend::auth_ok(&mut hello);
    hello.extend_from_slice(&upstream.greeting);
    client.write_all(&hello).await.map_err(SessionError::ClientIo)?;
    client.flush().await.map_err(SessionError::ClientIo)?;

    let (mut client_rd, mut client_wr) = client.into_split().map_err(SessionError::ClientIo)?;
    let (mut up_rd, mut up_wr) = crate::net::split_store(upstream.stream);
    let mut up_buf = upstream.buf;
    let mut client_buf = buf;
    let mut resume: Option<switchyard_dualwrite::session::Resume> = None;
    // The session's store, and its connection to the other one while table groups are split
    // between the stores (kept between its transactions there).
    let mut store = target.store;
    let mut parked: Option<reroute::Parked> = None;
    // The cancel key and address of the backend the session uses now (the client's key maps to
    // it), which a connection it parks keeps.
    let mut current = (upstream.cancel_key.clone(), upstream_addr);
    // A session of the migrated database logs in ahead to the store a barrier announces.
    let standby = Arc::new(reroute::Standby::default());
    let _follow = (!other_database && engine.mirror.is_some()).then(|| {
        AbortOnDrop(reroute::follow_barriers(
            Arc::clone(state),
            reroute::Owned {
                login: Arc::clone(&client_login),
                database: database.clone(),
                startup: startup.clone(),
            },
            Arc::clone(&standby),
        ))
    });
    let end = loop {
        let params = RelayParams {
            limits: state.limits,
            idle_timeout: settings.client_idle_timeout,
            metrics: &state.metrics,
            span,
        };
        let route_mirror = if other_database {
            None
        } else {
            engine.route(store).1.cloned()
        };
        let end = match route_mirror.as_ref() {
            None => {
                // A plain relay of the migrated database cannot move to another store, so it
                // counts as busy for its whole life: a cutover barrier waits for it (and is
                // aborted if it stays). It exists while no table was mirrored when it started.
                let counted = !other_database && !state.authority.enter(engine.generation).await;
                let _plain = (!other_database).then(|| state.authority.plain_session());
                let end = relay::relay(
                    params,
                    (&mut client_rd, &mut client_wr),
                    std::mem::take(&mut client_buf),
                    (&mut up_rd, &mut up_wr),
                    std::mem::take(&mut up_buf),
                    state.shutdown.clone(),
                )
                .await;
                if counted {
                    state.authority.quiet();
                }
                end
            }
            Some(mirror) => {
                let mut host = meter::DualHost::new(
                    state.shutdown.clone(),
                    &state.metrics,
                    (&state.authority, engine.generation),
                );
                switchyard_dualwrite::session::relay(
                    mirror,
                    switchyard_dualwrite::session::SessionParams {
                        limits: params.limits,
                        idle_timeout: params.idle_timeout,
                        startup: startup.params.clone(),
                        login: match state.config.auth.upstream_login {
                            UpstreamLogin::Client => Some(Arc::clone(&client_login)),
                            UpstreamLogin::Service => None,
                        },
                    },
                    (&mut client_rd, &mut client_wr),
                    std::mem::take(&mut client_buf),
                    (&mut up_rd, &mut up_wr),
                    std::mem::take(&mut up_buf),
                    &mut host,
                    &mut resume,
                )
                .await
                .map_err(SessionError::from)
            }
        };
        if !matches!(end, Ok(SessionEnd::Reroute)) {
            break end;
        }
        // Write authority moved, or the session's next transaction runs on the other store
        // (table groups split between the stores): the session goes on there.
        let before = store;
        engine = state.engine();
        let Some(r) = resume.as_mut() else {
            break Err(SessionError::Refused("rerouted without its state".into()));
        };
        let routed = r.to.take();
        let may_hold_state = r.may_hold_state();
        // Where write authority went: its store if it still takes some table's writes.
        let to = routed.unwrap_or_else(|| engine.route(before).0.store);
        if to == before {
            // The same store (the engine changed, not the authority: `done`): the session goes
            // on with its connection; without a dual-write engine nothing else is carried.
            tracing::debug!(generation = engine.generation, "session stays on its store");
            if engine.route(before).1.is_none() {
                client_buf = std::mem::take(&mut r.client_buf);
                resume = None;
            }
            continue;
        }
        let moving = std::time::Instant::now();
        // A move of write authority leaves the connection for good: what the session holds
        // there that cannot follow it ends the session with a clear error instead of being
        // lost without a word (an advisory lock would be released under the client's feet).
        // Read at the same time as the session moves (one round trip on each connection).
        let check = async {
            match routed {
                None if may_hold_state => Some(reroute::held(&mut up_rd, &mut up_wr, &mut up_buf).await),
                _ => None,
            }
        };
        let (target, _) = engine.route(to);
        let target = target.clone();
        let mover = async {
            match parked.take() {
                Some(p) if p.store == to => reroute::replay(p.conn, r, &p.held).await,
                other => {
                    // A connection parked on a store that takes no writes any more is ended.
                    parked = other;
                    let ahead = standby.take(to);
                    reroute::to(state, &who, &target, r, ahead)
                        .instrument(span.clone())
                        .await
                }
            }
        };
        let (held, moved) = tokio::join!(check, mover);
        let channels = match held {
            Some(Ok(held)) if !held.unmovable.is_empty() => {
                if let Ok(next) = moved {
                    retire(next.wr);
                }
                let what = held.unmovable.join(", ");
                let fatal = ErrorResponse::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    format!(
                        "terminating connection because Switchyard moved write authority to {} and this session holds {what}, which cannot move with it",
                        to.name()
                    ),
                )
                .with_hint("Reconnect: a new session runs on the database that takes the writes now.");
                send_fatal(&mut client_wr, fatal).await;
                break Err(SessionError::Refused(format!(
                    "session state cannot move: {what}"
                )));
            }
            Some(Ok(held)) => held.channels,
            Some(Err(e)) => break Err(e),
            None => Vec::new(),
        };
        let moved = match moved {
            Ok(mut next) => reroute::listen(&mut next, &channels).await.map(|()| next),
            Err(e) => Err(e),
        };
        let next = match moved {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, store = to.name(), "cannot move the session to the other store");
                break Err(e);
            }
        };
        if let (Some(guard), Some(real)) = (cancel_guard.as_ref(), next.cancel_key.clone()) {
            guard.retarget(next.addr, real);
        }
        let (cancel_key, addr) = std::mem::replace(&mut current, (next.cancel_key.clone(), next.addr));
        let left = reroute::Moved {
            rd: std::mem::replace(&mut up_rd, next.rd),
            wr: std::mem::replace(&mut up_wr, next.wr),
            buf: std::mem::replace(&mut up_buf, next.buf),
            cancel_key,
            addr,
        };
        store = to;
        let keep = engine.other.is_some() && engine.route(before).0.store == before;
        if keep {
            // Table groups split between the stores: the session will be back.
            parked = Some(reroute::Parked {
                store: before,
                conn: left,
                held: r.statements(),
            });
        } else {
            // The connection left behind is idle (the move happens between transactions); it
            // is ended a moment later, not while every session's first transaction on the new
            // store needs the CPU (`authority::RETIRE_AFTER`).
            retire(left.wr);
            if let Some(p) = parked.take() {
                retire(p.conn.wr);
            }
        }
        tracing::debug!(
            store = to.name(),
            ms = moving.elapsed().as_secs_f64() * 1e3,
            "session moved to the other store"
        );
    };
    drop(cancel_guard);

    let goodbye = match &end {
        Ok(SessionEnd::Drained | SessionEnd::ShutdownNow) => Some(ErrorResponse::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        )),
        Ok(SessionEnd::IdleTimeout) => Some(ErrorResponse::fatal(
            sqlstate::IDLE_SESSION_TIMEOUT,
            "terminating connection due to idle-session timeout",
        )),
        Err(e) => e.client_message(),
        Ok(_) => None,
    };
    if let Some(fatal) = goodbye {
        send_fatal(&mut client_wr, fatal).await;
    }
    if !matches!(end, Ok(SessionEnd::ClientTerminated | SessionEnd::UpstreamClosed)) {
        let mut bye = BytesMut::with_capacity(5);
        frontend::terminate(&mut bye);
        let _ = up_wr.write_all(&bye).await;
    }
    let _ = client_wr.shutdown().await;
    let _ = up_wr.shutdown().await;
    if let Some(mut p) = parked {
        let mut bye = BytesMut::with_capacity(5);
        frontend::terminate(&mut bye);
        let _ = p.conn.wr.write_all(&bye).await;
        let _ = p.conn.wr.shutdown().await;
    }
    end
}

/// A client through authentication: what it asked for and what it proved.
struct Admitted {
    startup: StartupMessage,
    /// What logs in upstream as the client (`[auth] upstream_login = "client"`).
    credential: ClientCredential,
    /// The client named a database other than the store's (`[proxy] other_databases =
    /// "passthrough"`): a plain relay, nothing migrated.
    other_database: bool,
    /// The NegotiateProtocolVersion the proxy sent before authentication, if any.
    negotiated: Option<bytes::Bytes>,
}

/// Reads the startup packet (an SSLRequest answered 'S' and the TLS handshake done when `[tls]`
/// allows it, 'N' otherwise; GSS encryption requests answered 'N'; cancel requests forwarded),
/// checks the parameters, and authenticates the client.
///
/// Returns `None` when the connection only carried a CancelRequest.
async fn handshake(
    state: &ProxyState,
    client: &mut ClientStream,
    peer: SocketAddr,
    buf: &mut BytesMut,
) -> Result<Option<Admitted>, SessionError> {
    let tls = state.tls();
    // Each kind of encryption request may come once, as PostgreSQL allows; a second one of the
    // same kind is not a request any more but an unknown protocol version, refused as the server
    // refuses it.
    let (mut ssl_asked, mut gss_asked) = (false, false);
    let startup = loop {
        match io::read_startup(client, buf).await? {
            packet @ (StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                let (asked, code) = match packet {
                    StartupPacket::SslRequest => (&mut ssl_asked, SSL_REQUEST_CODE),
                    _ => (&mut gss_asked, GSSENC_REQUEST_CODE),
                };
                if std::mem::replace(asked, true) {
                    return Err(SessionError::ClientProtocol(
                        switchyard_pgwire::ProtocolError::UnsupportedProtocol {
                            major: (code >> 16) as u16,
                            minor: (code & 0xffff) as u16,
                        },
                    ));
                }
                if !buf.is_empty() {
                    // Bytes after an encryption request, before our answer, would be a
                    // man-in-the-middle's injection (CVE-2021-23214): refuse them.
                    return Err(SessionError::ClientProtocol(
                        switchyard_pgwire::ProtocolError::Malformed {
                            what: "SSLRequest",
                            detail: "unexpected data after the encryption request",
                        },
                    ));
                }
                match (&tls.acceptor, packet) {
                    (Some(acceptor), StartupPacket::SslRequest) => {
                        client.write_all(b"S").await.map_err(SessionError::ClientIo)?;
                        let ClientStream::Plain(tcp) = std::mem::replace(client, ClientStream::Detached)
                        else {
                            unreachable!("an SSLRequest is accepted once, on a plain connection");
                        };
                        let stream = acceptor.accept(tcp).await.map_err(SessionError::ClientIo)?;
                        *client = ClientStream::Tls(Box::new(stream));
                        // On an encrypted connection a GSSENCRequest is refused too: PostgreSQL
                        // takes one only after an SSLRequest it answered N
                        // (backend_startup.c, ProcessStartupPacket(port, true, SSLok == 'S')).
                        gss_asked = true;
                    }
                    // No TLS configured, or GSS encryption: refuse, and the client goes on in
                    // plain text (or gives up, if it insists on encryption).
                    _ => client.write_all(b"N").await.map_err(SessionError::ClientIo)?,
                }
            }
            StartupPacket::Cancel(key) => {
                match state.cancel.forward(&key).await {
                    Ok(true) => tracing::debug!(pid = key.pid, "cancel request forwarded"),
                    Ok(false) => tracing::debug!(pid = key.pid, "cancel request for an unknown key dropped"),
                    Err(e) => tracing::warn!(pid = key.pid, error = %e, "cannot forward cancel request"),
                }
                return Ok(None);
            }
            StartupPacket::Startup(startup) => break startup,
        }
    };
    let mut startup = startup;
    let negotiated = negotiate(state, client, &mut startup).await?;

    let Some(user) = startup.param("user").filter(|u| !u.is_empty()) else {
        let e = ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        );
        send_fatal(client, e).await;
        return Err(SessionError::Refused("no user name".into()));
    };
    if tls.mode == TlsMode::Require && !client.is_tls() {
        // As PostgreSQL words it when pg_hba.conf has only `hostssl` lines.
        let database = startup
            .param("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(user);
        let e = ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "no pg_hba.conf entry for host \"{}\", user \"{user}\", database \"{database}\", no encryption",
                peer.ip()
            ),
        );
        send_fatal(client, e).await;
        return Err(SessionError::Refused(
            "plain-text startup under [tls] mode = \"require\"".into(),
        ));
    }
    if startup.param("replication").is_some_and(asks_for_replication) {
        let e = ErrorResponse::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported through the proxy",
        )
        .with_hint("connect to the database server directly for replication");
        send_fatal(client, e).await;
        return Err(SessionError::Refused("replication connection".into()));
    }
    // The users as of this login (a reload may swap them meanwhile).
    let client_auth = state.client_auth();
    // SCRAM-SHA-256-PLUS binds the exchange to this TLS connection's certificate.
    let channel_binding = match client.is_tls() {
        true => tls.channel_binding.as_deref(),
        false => None,
    };
    let credential = client_auth
        .authenticate(client, buf, user, state.limits, channel_binding)
        .await?;

    // Checked after authentication, as PostgreSQL does, so it reveals nothing to strangers.
    let database = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(user);
    let other_database = names_other_database(state, database);
    if other_database && state.config.proxy.other_databases == OtherDatabases::Refuse {
        let e = ErrorResponse::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        )
        .with_hint(format!(
            "this proxy serves the database \"{}\"",
            state.config.old.url.database
        ));
        send_fatal(client, e).await;
        return Err(SessionError::Refused(format!("unknown database {database}")));
    }
    Ok(Some(Admitted {
        startup,
        credential,
        other_database,
        negotiated,
    }))
}

/// Whether the client names a database other than the store's. Clients name OLD's database
/// (their connection strings predate the migration); NEW's name is the same database too.
fn names_other_database(state: &ProxyState, database: &str) -> bool {
    database != state.config.old.url.database && database != state.config.new.url.database
}

/// Answers a startup that asks for a newer minor protocol version or sends `_pq_.` options with
/// NegotiateProtocolVersion, as PostgreSQL does: straight after the startup packet, before any
/// authentication request (its `ProcessStartupPacket`), for the server the client will reach.
/// The startup's version becomes the one agreed, so the sessions upstream speak what the client
/// was told. Returns the message sent. When the server cannot be asked, nothing is sent here and
/// the server's own answer reaches the client after authentication, as a fallback.
async fn negotiate(
    state: &ProxyState,
    client: &mut ClientStream,
    startup: &mut StartupMessage,
) -> Result<Option<bytes::Bytes>, SessionError> {
    // Most clients ask for 3.0 without options: then there is nothing to ask the server.
    if startup.negotiation(PROTOCOL_3_0).is_none() {
        return Ok(None);
    }
    let database = startup
        .param("database")
        .filter(|d| !d.is_empty())
        .or(startup.param("user"))
        .unwrap_or_default();
    let target = match names_other_database(state, database) {
        true => state.old_target(),
        false => state.engine().upstream.clone(),
    };
    let Some(newest) = state.newest_protocol(&target).await else {
        return Ok(None);
    };
    let mut out = BytesMut::new();
    let version = match startup.negotiation(newest) {
        Some((version, options)) => {
            backend::negotiate_protocol_version(&mut out, version, &options);
            version
        }
        None => return Ok(None),
    };
    client.write_all(&out).await.map_err(SessionError::ClientIo)?;
    client.flush().await.map_err(SessionError::ClientIo)?;
    startup.protocol = version;
    Ok(Some(out.freeze()))
}

/// Whether a `replication` startup parameter asks for a replication connection: `database`, or
/// a true boolean as PostgreSQL's `parse_bool` reads it (unique prefixes of true/yes/on, 1).
/// Values it cannot read are left for the server to reject.
fn asks_for_replication(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    v == "database" || v == "1" || v == "on" || prefix_of("true") || prefix_of("yes")
}

/// Ends a connection a session left (idle: moves happen between transactions) a moment later,
/// not while the sessions' first transactions on the new store need the CPU
/// (`authority::RETIRE_AFTER`).
fn retire(mut wr: crate::net::NetWrite) {
    tokio::spawn(async move {
        tokio::time::sleep(crate::authority::RETIRE_AFTER).await;
        let mut bye = BytesMut::with_capacity(5);
        frontend::terminate(&mut bye);
        let _ = wr.write_all(&bye).await;
        let _ = wr.shutdown().await;
    });
}

/// Aborts a task when dropped (a session's helper task ends with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::asks_for_replication;

    #[test]
    fn replication_values_read_like_postgresql() {
        for yes in ["database", "true", "t", "TRUE", "yes", "y", "on", "1"] {
            assert!(asks_for_replication(yes), "{yes}");
        }
        for no in ["false", "f", "no", "n", "off", "0", "of", "bogus", "o"] {
            assert!(!asks_for_replication(no), "{no}");
        }
    }
}
