//! The state every session and the admin API share, built in one step at start.
//!
//! Modules depend on each other in one direction only: `server` (accept loop) uses `state`,
//! `session` and `admin`; `session` and `admin` use `state`; `state` uses `auth`, `cancel`,
//! `control_state`, `metrics` and the dual-write engine (`switchyard_dualwrite`), never the other way round.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use switchyard_config::Config;
use switchyard_dualwrite::Mirror;
use switchyard_pgwire::frame::MessageLimits;
use switchyard_store::wire::WireTarget;
use switchyard_store::{PoolSettings, Role, Roles, Store};
use tokio::sync::Semaphore;

use crate::auth::{AuthLookup, ClientAuth};
use crate::authority::{Authority, Engine, Shape};
use crate::cancel::CancelRegistry;
use crate::control_state::ControlFollower;
use crate::drift_figures::DriftFigures;
use crate::error::StartError;
use crate::login_gate::LoginGate;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Applies a table's control row to a dual-write engine.
type OnPhase = Arc<dyn Fn(&Mirror, &switchyard_control::TableControl) + Send + Sync>;

/// What every session and the admin API share.
pub(crate) struct ProxyState {
    pub(crate) config: Arc<Config>,
    /// The users clients log in as; a reload replaces them ([`run_with_reload`]).
    client_auth: RwLock<Arc<ClientAuth>>,
    /// `[auth] auth_lookup`, kept across reloads of the users.
    auth_lookup: Option<Arc<AuthLookup>>,
    pub(crate) cancel: Arc<CancelRegistry>,
    pub(crate) metrics: Metrics,
    pub(crate) connection_slots: Arc<Semaphore>,
    /// The soft limit on open file descriptors after start raised it ([`raise_fd_limit`]).
    pub(crate) fd_limit: Option<u64>,
    /// The latest drift results, read from NEW in the background.
    pub(crate) drift: Arc<DriftFigures>,
    /// TLS toward clients as configured now; a reload replaces it.
    tls: RwLock<Arc<TlsState>>,
    /// The control state (each table's phase and read share), followed in the background.
    pub(crate) control: Arc<ControlFollower>,
    /// Applies a table's control row to a dual-write engine (shadow and read shares).
    on_phase: OnPhase,
    /// Failed logins are logged at most this often.
    pub(crate) auth_failures: LogLimiter,
    /// The connections still logging in (`[proxy] max_pending_logins`).
    pub(crate) logins: Arc<LoginGate>,
    pub(crate) limits: MessageLimits,
    pub(crate) shutdown: Shutdown,
    pub(crate) started: Instant,
    /// The next session id. One counter for the whole process, not one per worker thread, so
    /// the `id` in logs and traces names one session.
    pub(crate) next_session_id: AtomicU64,
    pub(crate) old_store: Store,
    pub(crate) new_store: Store,
    /// Write authority: the store sessions log in to and the dual-write engine (when some
    /// table is in a mirrored phase), replaced at cutover; the barrier's gate.
    pub(crate) authority: Arc<Authority>,
    /// The newest protocol version of OLD's and of NEW's server, asked once, when a client
    /// first needs it ([`ProxyState::newest_protocol`]).
    newest_protocol: [tokio::sync::OnceCell<i32>; 2],
}

impl ProxyState {
    /// Builds the state in one step: checks the stores' engines, sets up the metrics, starts the
    /// dual-write engine when some table is in a mirrored phase (and registers its figures).
    /// Sessions log in to `roles.authoritative`.
    pub(crate) async fn build(
        config: Arc<Config>,
        roles: Option<Roles>,
        shutdown: Shutdown,
    ) -> Result<ProxyState, StartError> {
        // Only the engine can make a lazy connect fail.
        let connect = |role: Role| {
            Store::connect_lazy(role, &role.settings(&config).url).map_err(|e| match e {
                switchyard_store::StoreError::UnsupportedEngine { role, engine } => {
                    StartError::UnsupportedEngine { store: role, engine }
                }
                other => StartError::Store(Box::new(other)),
            })
        };
        let old_store = connect(Role::Old)?;
        let new_store = connect(Role::New)?;
        // Secrets are looked up on OLD (where the roles were made), unless the roles are fixed.
        let lookup_role = roles.map_or(Role::Old, |r| r.authoritative);
        let upstream_url = &lookup_role.settings(&config).url;
        let auth_lookup = match &config.auth.auth_query {
            Some(query) => Some(Arc::new(AuthLookup {
                // A pool of its own: lookups never wait behind the proxy's other queries.
                store: Store::connect_lazy_with(
                    lookup_role,
                    upstream_url,
                    &PoolSettings {
                        application_name: "switchyard auth_query",
                        max_connections: 2,
                        ..PoolSettings::default()
                    },
                )
                .map_err(|e| StartError::Store(Box::new(e)))?,
                query: query.clone(),
            })),
            None => None,
        };
        let client_auth = ClientAuth::new(config.auth.method, &config.auth.users, auth_lookup.clone())
            .map_err(StartError::Users)?;
        let tls = TlsState::new(&config.tls).map_err(StartError::Tls)?;
        // The OTLP exporter's blocking HTTP client must be built and shut down off the runtime.
        let telemetry = config.telemetry.clone();
        let metrics = tokio::task::spawn_blocking(move || {
            Metrics::new(
                &telemetry.service_name,
                telemetry.otlp_endpoint.as_ref().map(|u| u.as_str()),
            )
        })
        .await
        .map_err(|e| StartError::Telemetry(e.to_string()))??;
        let (config, _) = with_control_state(config, &old_store).await;
        // The control state says which store takes the writes (NEW once the tables cut over;
        // with table groups, each group's own), unless the caller chose the roles (the engine's
        // tests).
        let engine = match roles {
            Some(fixed) => {
                let mirror = Mirror::start(&config, fixed).await?;
                Engine::new(0, fixed, &config, mirror)
            }
            None => {
                // `config` carries the control state's phases where it has them.
                let shape = Shape::of_config(&config);
                let mut mirrors = Vec::new();
                for (role, _) in &shape.0 {
                    mirrors.push(Mirror::start(&config, Roles::with_authoritative(*role)).await?);
                }
                Engine::with_shape(0, shape, &config, mirrors)
            }
        };
        let mirror = engine.mirror.clone();
        let drift = Arc::new(DriftFigures::default());
        metrics.register_drift(
            Arc::clone(&drift),
            config.tables.iter().map(|t| t.name.to_string()).collect(),
        );
        if let Some(m) = &mirror {
            tracing::info!(tables = m.tables.len(), "dual writes enabled");
        }
        let on_phase: OnPhase = {
            let shares: Vec<(String, u8)> = config
                .tables
                .iter()
                .map(|t| (t.name.to_string(), t.shadow_share))
                .collect();
            Arc::new(move |m: &Mirror, t: &switchyard_control::TableControl| {
                let share = shares
                    .iter()
                    .find(|(n, _)| *n == t.table)
                    .map_or(100, |(_, s)| *s);
                m.follow_phase(&t.table, t.phase, share, t.read_share);
            })
        };
        let authority = Arc::new(Authority::new(engine));
        metrics.register_authority(Arc::clone(&authority));
        let current = Arc::downgrade(&authority);
        metrics.register_engine(Arc::new(move || {
            current
                .upgrade()
                .map(|a| a.engine().mirrors().cloned().collect())
                .unwrap_or_default()
        }));
        let control = {
            let authority = Arc::clone(&authority);
            let on_phase = Arc::clone(&on_phase);
            Arc::new(ControlFollower::new(Some(
                Box::new(move |t: &switchyard_control::TableControl| {
                    for m in authority.engine().mirrors() {
                        on_phase(m, t);
                    }
                }) as crate::control_state::OnChange,
            )))
        };
        Ok(ProxyState {
            client_auth: RwLock::new(Arc::new(client_auth)),
            auth_lookup,
            cancel: Arc::new(CancelRegistry::default()),
            metrics,
            connection_slots: Arc::new(Semaphore::new(config.proxy.max_connections as usize)),
            logins: LoginGate::new(config.proxy.max_pending_logins),
            fd_limit: raise_fd_limit(),
            auth_failures: LogLimiter::new(10, Duration::from_secs(1)),
            drift,
            control,
            on_phase,
            tls: RwLock::new(Arc::new(tls)),
            limits: MessageLimits {
                max_message_bytes: config.proxy.max_message_bytes,
            },
            shutdown,
            started: Instant::now(),
            next_session_id: AtomicU64::new(1),
            old_store,
            new_store,
            authority,
            newest_protocol: Default::default(),
            config,
        })
    }

    /// The newest protocol version `target`'s server speaks, asked the first time a client's
    /// startup needs it (a newer minor version or `_pq_.` options; most never do) and kept.
    /// `None` when the server cannot be asked now: the next client asks again.
    pub(crate) async fn newest_protocol(&self, target: &WireTarget) -> Option<i32> {
        let cell = &self.newest_protocol[match target.store {
            Role::Old => 0,
            Role::New => 1,
        }];
        let asked = cell
            .get_or_try_init(|| target.newest_protocol(self.config.proxy.connect_timeout))
            .await;
        match asked {
            Ok(v) => Some(*v),
            Err(e) => {
                tracing::warn!(error = %e, store = target.store.name(), "cannot ask the store's server for its protocol version");
                None
            }
        }
    }

    /// OLD's server, for clients of its other databases (relayed as they are, never migrated).
    pub(crate) fn old_target(&self) -> WireTarget {
        WireTarget {
            url: self.config.old.url.clone(),
            store: Role::Old,
        }
    }

    /// The engine as of now (the authoritative store, the dual-write engine).
    pub(crate) fn engine(&self) -> Arc<Engine> {
        self.authority.engine()
    }

    /// Builds the engine for `roles` (a move of write authority): the dual-write engine started
    /// for the control state's phases, with the current phases and read shares applied. With
    /// `ahead` (a cutover barrier's phase), it is built while the barrier is still open, for
    /// every configured table in that phase; the stores' readiness is then checked, and the
    /// control state applied, when the barrier ends ([`ProxyState::engine_ready`]).
    pub(crate) fn engine_builder(self: &Arc<Self>) -> crate::authority::BuildEngine {
        let me = Arc::downgrade(self);
        Box::new(
            move |generation, barrier: Option<switchyard_control::barrier::Barrier>| {
                let me = me.clone();
                Box::pin(async move {
                    let Some(state) = me.upgrade() else {
                        return Err("the proxy is stopping".to_owned());
                    };
                    let started = std::time::Instant::now();
                    let (config, control) =
                        with_control_state(Arc::clone(&state.config), &state.old_store).await;
                    let mut config = (*config).clone();
                    if let Some(b) = &barrier {
                        for t in &mut config.tables {
                            if b.moves(&t.name.to_string()) {
                                t.phase = b.to_phase;
                            }
                        }
                    }
                    let shape = Shape::of_config(&config);
                    let mut mirrors = Vec::new();
                    for (role, _) in &shape.0 {
                        let roles = Roles::with_authoritative(*role);
                        let mirror = match barrier {
                            Some(_) => Mirror::start_unchecked(&config, roles).await,
                            None => Mirror::start(&config, roles).await,
                        }
                        .map_err(|e| e.to_string())?;
                        if let (Some(m), Some(_)) = (&mirror, &barrier) {
                            // As many link connections as sessions may need at once right after the
                            // swap (bounded by the link's own size).
                            let sessions = (config.proxy.max_connections as usize)
                                .saturating_sub(state.connection_slots.available_permits());
                            m.warm(sessions.min(8)).await;
                        }
                        if let (Some(m), Some(c), None) = (&mirror, &control, &barrier) {
                            for t in &c.tables {
                                (state.on_phase)(m, t);
                            }
                        }
                        mirrors.push(mirror);
                    }
                    tracing::info!(
                        ahead = barrier.is_some(),
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "engine for the new roles started"
                    );
                    Ok(Engine::with_shape(generation, shape, &config, mirrors))
                })
            },
        )
    }

    /// Makes an engine built ahead of a barrier's end ready to take over: the stores checked
    /// for its roles (the barrier moved the capture) and the control state's phases and read
    /// shares applied.
    pub(crate) fn engine_ready(self: &Arc<Self>) -> crate::authority::ReadyEngine {
        let me = Arc::downgrade(self);
        Box::new(move |mirror, control| {
            let me = me.clone();
            Box::pin(async move {
                mirror.check_ready().await.map_err(|e| e.to_string())?;
                if let Some(state) = me.upgrade() {
                    for t in &control.tables {
                        (state.on_phase)(&mirror, t);
                    }
                }
                Ok(())
            })
        })
    }

    /// The users and how they prove who they are, as of now.
    pub(crate) fn client_auth(&self) -> Arc<ClientAuth> {
        Arc::clone(&self.client_auth.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// TLS toward clients as of now.
    pub(crate) fn tls(&self) -> Arc<TlsState> {
        Arc::clone(&self.tls.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies what a reloaded configuration may change at run time (the users, TLS); `running` is
    /// the configuration with those fields already taken from the new file
    /// ([`Config::with_hot_fields_of`]).
    pub(crate) fn reload(&self, running: &Config) {
        match ClientAuth::new(running.auth.method, &running.auth.users, self.auth_lookup.clone()) {
            Ok(auth) => {
                *self.client_auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
                tracing::info!(users = running.auth.users.users.len(), "users reloaded");
            }
            Err(e) => tracing::error!(error = %e, "users not reloaded; keeping the previous ones"),
        }
        // The certificate files are read again even if their names did not change: renewing a
        // certificate in place is the usual way. Sessions already running keep theirs.
        match TlsState::new(&running.tls) {
            Ok(tls) => {
                tracing::info!(mode = running.tls.mode.as_str(), "TLS settings reloaded");
                *self.tls.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tls);
            }
            Err(e) => tracing::error!(error = %e, "TLS settings not reloaded; keeping the previous ones"),
        }
    }
}

/// TLS toward clients: the mode and, unless disabled, the acceptor built from the files.
pub(crate) struct TlsState {
    pub(crate) mode: switchyard_config::TlsMode,
    pub(crate) acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// The certificate's `tls-server-end-point` binding, for SCRAM-SHA-256-PLUS.
    pub(crate) channel_binding: Option<Vec<u8>>,
}

impl TlsState {
    fn new(settings: &switchyard_config::TlsSettings) -> Result<TlsState, crate::tls::TlsError> {
        let (acceptor, channel_binding) = match crate::tls::acceptor(settings)? {
            Some(a) => (Some(a.acceptor), a.channel_binding),
            None => (None, None),
        };
        Ok(TlsState {
            mode: settings.mode,
            acceptor,
            channel_binding,
        })
    }
}

/// `config` with the phases and read shares of the control state on `authoritative`, which win
/// over the file's once `switchyard prepare` seeded it (a proxy restarted with an old file must
/// not undo a change made with `switchyard phase`). Without a control state, or when it cannot
/// be read, the file's values stand.
async fn with_control_state(
    config: Arc<Config>,
    authoritative: &Store,
) -> (Arc<Config>, Option<switchyard_control::ControlState>) {
    // Without tables there is nothing to take from it, and a proxy in front of an unreachable
    // store must still start at once (and tell its clients).
    if config.tables.is_empty() {
        return (config, None);
    }
    match switchyard_control::read(authoritative).await {
        Ok(Some(state)) => {
            let mut config = (*config).clone();
            for (table, file, control) in switchyard_control::apply_to(&mut config, &state) {
                tracing::info!(%table, %file, %control, epoch = state.epoch, "the control state's phase and read share apply");
            }
            (Arc::new(config), Some(state))
        }
        Ok(None) => (config, None),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the control state at start; the file's phases apply");
            (config, None)
        }
    }
}

/// Raises the soft limit on open file descriptors to the hard limit, as far as the system
/// allows, and logs both: each session holds two descriptors (client and store), and the usual
/// soft limit of 1,024 would cap the proxy near 500 sessions whatever `max_connections` says.
/// `None` when the limit cannot be read.
pub(crate) fn raise_fd_limit() -> Option<u64> {
    let before = rlimit::Resource::NOFILE.get().ok();
    let raised = rlimit::increase_nofile_limit(u64::MAX);
    let after = rlimit::Resource::NOFILE.get().ok();
    match (before, &raised, after) {
        (Some((soft_before, _)), Ok(_), Some((soft, hard))) => {
            tracing::info!(soft, hard, was = soft_before, "open file descriptor limit")
        }
        (_, Err(e), _) => {
            tracing::warn!(error = %e, limit = ?after, "cannot raise the open file descriptor limit")
        }
        _ => {}
    }
    after.map(|(soft, _)| soft)
}

/// Lets at most `per_window` events a window be logged; the next one logged says how many were
/// left out since.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    per_window: u32,
    window: Duration,
    /// Window start, events logged in it, events suppressed since the last logged one.
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    pub(crate) fn new(per_window: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            per_window,
            window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed before this one)` when this event may be logged, `None` when not.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(s.0) >= self.window {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 >= self.per_window {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_budget_and_the_next_line_counts_what_was_left_out() {
        let limiter = LogLimiter::new(3, Duration::from_millis(50));
        let admitted: Vec<Option<u64>> = (0..10).map(|_| limiter.admit()).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limiter.admit(), Some(7));
        assert_eq!(limiter.admit(), Some(0));
    }
}
