//! Binding the listeners, the worker threads and their accept loops.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use switchyard_config::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::StartError;
use crate::session;
use crate::shutdown::{Shutdown, ShutdownState};
use crate::state::ProxyState;
use switchyard_store::wire::tune_socket;
use switchyard_store::Roles;

/// The sockets a proxy serves, bound before [`run`] so tests can bind port 0 and read the port.
#[derive(Debug)]
pub struct Listeners {
    /// Where applications connect: one socket per worker thread, all bound to the same address
    /// with `SO_REUSEPORT`, so the kernel spreads new connections over the workers.
    pub client: Vec<std::net::TcpListener>,
    /// The admin HTTP API, if enabled.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses in the config, one client socket per worker thread. `SO_REUSEPORT`
    /// also lets a new proxy process bind the same address while the old one drains
    /// (zero-downtime upgrade). Must be called inside a tokio runtime (for the admin socket).
    pub fn bind(config: &Config) -> Result<Listeners, StartError> {
        let workers = match config.proxy.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let first = bind_reuseport(config.proxy.listen)?;
        // With port 0 the kernel picked a port: the other workers bind that one.
        let addr = first.local_addr().map_err(|source| StartError::Bind {
            addr: config.proxy.listen,
            source,
        })?;
        let mut client = vec![first];
        for _ in 1..workers {
            client.push(bind_reuseport(addr)?);
        }
        let admin = match config.proxy.admin_listen {
            Some(addr) => {
                let std = bind_reuseport(addr)?;
                Some(TcpListener::from_std(std).map_err(|source| StartError::Bind { addr, source })?)
            }
            None => None,
        };
        Ok(Listeners { client, admin })
    }

    /// The client listeners' address.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        self.client.first().and_then(|l| l.local_addr().ok())
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

fn bind_reuseport(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
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
    Ok(socket.into())
}

/// Runs the proxy until `shutdown` completes: serves clients on `listeners.client` and the admin
/// API on `listeners.admin`. As [`run_with_reload`] without reloads.
pub async fn run(config: Arc<Config>, listeners: Listeners, shutdown: Shutdown) -> Result<(), StartError> {
    let (_never, reloads) = watch::channel(Arc::clone(&config));
    run_with_reload(config, listeners, shutdown, reloads).await
}

/// Runs the proxy until `shutdown` completes: serves clients on `listeners.client` and the admin
/// API on `listeners.admin`; each configuration sent on `reloads` (after SIGHUP) replaces the
/// users clients log in as. Other fields are read at start only.
///
/// Each client socket gets a worker thread with its own single-threaded runtime; a session lives
/// on the worker that accepted it, so its two sockets never wake another thread. (On a machine
/// where the proxy shares cores with the database and the clients, cross-thread wake-ups were
/// the largest cost of the multi-threaded scheduler.) The admin API runs on the caller's runtime.
/// Returns when every session has ended after a drain or an immediate shutdown.
pub async fn run_with_reload(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: Shutdown,
    reloads: watch::Receiver<Arc<Config>>,
) -> Result<(), StartError> {
    serve(config, None, listeners, shutdown, reloads).await
}

/// Runs the proxy with the stores in `roles`: sessions log in to `roles.authoritative` and the
/// dual-write engine mirrors to `roles.follower` (which `switchyard prepare` must have been run
/// for, with `switchyard_store::prepare_in`). Every proxy today runs with OLD authoritative
/// ([`run`]); cutover will switch the roles at run time. This entry point lets the engine's
/// tests run with NEW authoritative meanwhile.
pub async fn run_with_roles(
    config: Arc<Config>,
    roles: Roles,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let (_never, reloads) = watch::channel(Arc::clone(&config));
    serve(config, Some(roles), listeners, shutdown, reloads).await
}

async fn serve(
    config: Arc<Config>,
    // `None`: the control state says which store takes the writes, and the proxy follows it
    // when it changes (cutover); `Some`: fixed (the engine's tests).
    roles: Option<Roles>,
    listeners: Listeners,
    shutdown: Shutdown,
    mut reloads: watch::Receiver<Arc<Config>>,
) -> Result<(), StartError> {
    let state = Arc::new(ProxyState::build(config, roles, shutdown.clone()).await?);
    tokio::spawn(crate::drift_figures::poll_loop(
        Arc::clone(&state.drift),
        crate::drift_figures::Sources {
            old: state.old_store.clone(),
            new: state.new_store.clone(),
            tables: state.config.tables.iter().map(|t| t.name.to_string()).collect(),
            configured: state.config.tables.iter().map(|t| t.name.clone()).collect(),
            mirror_deadline: state.config.mirror.timeout,
            control: state.config.control.clone(),
        },
        shutdown.clone(),
    ));
    tokio::spawn(crate::control_state::follow(
        Arc::clone(&state.control),
        state.old_store.clone(),
        state.config.control.poll_interval,
        shutdown.clone(),
    ));
    tokio::spawn(crate::authority::follow(
        Arc::clone(&state.authority),
        crate::authority::Follow {
            control_store: state.old_store.clone(),
            poll: state.config.control.poll_interval,
            build: state.engine_builder(),
            config: Arc::clone(&state.config),
            ready: state.engine_ready(),
            follow_authority: roles.is_none(),
        },
        state.control.subscribe(),
        shutdown.clone(),
    ));
    let admin = listeners
        .admin
        .map(|admin| tokio::spawn(crate::admin::serve(Arc::clone(&state), admin, shutdown.clone())));
    reloads.mark_unchanged();
    let reloader = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let running = Arc::clone(&reloads.borrow_and_update());
                state.reload(&running);
            }
        })
    };
    let addr = listeners.client.first().and_then(|l| l.local_addr().ok());
    let mut workers = Vec::with_capacity(listeners.client.len());
    for (i, listener) in listeners.client.into_iter().enumerate() {
        let (done, finished) = tokio::sync::oneshot::channel();
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name(format!("switchyard-worker-{i}"))
            .spawn(move || {
                let _ = done.send(worker(state, listener, shutdown));
            })
            .map_err(StartError::Worker)?;
        workers.push(finished);
    }
    tracing::info!(
        listen = ?addr,
        workers = workers.len(),
        authoritative = state.engine().upstream.store.name(),
        url = %state.engine().upstream.url.redacted(),
        "proxy ready"
    );
    let mut result = Ok(());
    for finished in workers {
        match finished.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(StartError::WorkerDied),
        }
    }
    tracing::info!("all sessions ended");
    if let Some(admin) = admin {
        admin.abort();
    }
    reloader.abort();
    let flush = Arc::clone(&state);
    let _ = tokio::task::spawn_blocking(move || flush.metrics.shutdown()).await;
    result
}

/// One worker thread: a single-threaded runtime accepting on its own socket.
fn worker(
    state: Arc<ProxyState>,
    listener: std::net::TcpListener,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let addr = listener.local_addr().map_err(StartError::Worker)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Bind { addr, source })?;
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener).map_err(|source| StartError::Bind { addr, source })?;
        accept_loop(&state, listener, shutdown).await
    })
}

async fn accept_loop(
    state: &Arc<ProxyState>,
    listener: TcpListener,
    mut shutdown: Shutdown,
) -> Result<(), StartError> {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tune_socket(&stream, state.config.proxy.tcp_keepalive);
                    let id = state.next_session_id.fetch_add(1, Ordering::Relaxed);
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
    tracing::debug!(
        sessions = sessions.len(),
        "worker no longer accepting; waiting for its sessions to end"
    );
    while sessions.join_next().await.is_some() {}
    Ok(())
}
