//! The accept loop and the state every session shares.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_config::{Config, Engine};
use switchyard_pgwire::frame::MessageLimits;
use switchyard_store::{Role, Store};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cancel::CancelRegistry;
use crate::error::StartError;
use crate::metrics::Metrics;
use crate::session::upstream::UpstreamTarget;
use crate::session::{self, ClientAuth};
use crate::shutdown::{Shutdown, ShutdownState};

/// What every session and the admin API share.
pub(crate) struct ProxyState {
    pub(crate) config: Arc<Config>,
    pub(crate) client_auth: ClientAuth,
    pub(crate) upstream: UpstreamTarget,
    pub(crate) cancel: Arc<CancelRegistry>,
    pub(crate) metrics: Metrics,
    pub(crate) connection_slots: Arc<Semaphore>,
    pub(crate) limits: MessageLimits,
    pub(crate) shutdown: Shutdown,
    pub(crate) started: Instant,
    pub(crate) old_store: Store,
    pub(crate) new_store: Store,
}

/// The sockets a proxy serves, bound before [`run`] so tests can bind port 0 and read the port.
#[derive(Debug)]
pub struct Listeners {
    /// Where applications connect.
    pub client: TcpListener,
    /// The admin HTTP API, if enabled.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in the config. The client socket sets `SO_REUSEPORT`, so a new proxy
    /// process can bind the same address while the old one drains (zero-downtime upgrade).
    pub fn bind(config: &Config) -> Result<Listeners, StartError> {
        let client = bind_reuseport(config.proxy.listen)?;
        let admin = config.proxy.admin_listen.map(bind_reuseport).transpose()?;
        Ok(Listeners { client, admin })
    }

    /// The client listener's address.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        self.client.local_addr().ok()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

fn bind_reuseport(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Low latency and dead-peer detection on both sides of a session.
pub(crate) fn tune_socket(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}

/// Runs the proxy until `shutdown` completes: serves clients on `listeners.client` and the admin
/// API on `listeners.admin`.
///
/// Returns when every session has ended after a drain or an immediate shutdown.
pub async fn run(config: Arc<Config>, listeners: Listeners, shutdown: Shutdown) -> Result<(), StartError> {
    let state = Arc::new(build_state(config, shutdown.clone())?);
    if let Some(admin) = listeners.admin {
        tokio::spawn(crate::admin::serve(Arc::clone(&state), admin, shutdown.clone()));
    }
    tracing::info!(
        listen = ?listeners.client.local_addr().ok(),
        old = %state.upstream.url.redacted(),
        "proxy ready"
    );
    let result = accept_loop(&state, listeners.client, shutdown).await;
    state.metrics.shutdown();
    result
}

fn build_state(config: Arc<Config>, shutdown: Shutdown) -> Result<ProxyState, StartError> {
    for (role, url) in [("old", &config.old.url), ("new", &config.new.url)] {
        if url.engine != Engine::Postgres {
            return Err(StartError::Unsupported(format!(
                "{role}.url: the {} engine is not supported yet; this build proxies PostgreSQL only",
                url.engine.as_str()
            )));
        }
    }
    let client_auth = ClientAuth::new(config.auth.method, &config.auth.users).map_err(StartError::Config)?;
    let telemetry = &config.telemetry;
    let metrics = Metrics::new(
        &telemetry.service_name,
        telemetry.otlp_endpoint.as_ref().map(|u| u.as_str()),
    )?;
    let store_err = |e: switchyard_store::StoreError| StartError::Unsupported(e.to_string());
    Ok(ProxyState {
        client_auth,
        upstream: UpstreamTarget {
            url: config.old.url.clone(),
        },
        cancel: Arc::new(CancelRegistry::default()),
        metrics,
        connection_slots: Arc::new(Semaphore::new(config.proxy.max_connections as usize)),
        limits: MessageLimits {
            max_message_bytes: config.proxy.max_message_bytes,
        },
        shutdown,
        started: Instant::now(),
        old_store: Store::connect_lazy(Role::Old, &config.old.url).map_err(store_err)?,
        new_store: Store::connect_lazy(Role::New, &config.new.url).map_err(store_err)?,
        config,
    })
}

async fn accept_loop(
    state: &Arc<ProxyState>,
    listener: TcpListener,
    mut shutdown: Shutdown,
) -> Result<(), StartError> {
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tune_socket(&stream, state.config.proxy.tcp_keepalive);
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    sessions.spawn(session::serve(Arc::clone(state), stream, peer, id));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = shutdown.changed_from(ShutdownState::Running) => break,
        }
    }
    // Stop accepting: a successor process bound with SO_REUSEPORT takes new clients from here.
    drop(listener);
    tracing::info!(
        sessions = sessions.len(),
        "no longer accepting; waiting for sessions to end"
    );
    while sessions.join_next().await.is_some() {}
    tracing::info!("all sessions ended");
    Ok(())
}
