//! The state every session and the admin API share, built in one step at start.
//!
//! Modules depend on each other in one direction only: `server` (accept loop) uses `state`,
//! `session` and `admin`; `session` and `admin` use `state`; `state` uses `auth`, `cancel`,
//! `metrics` and the dual-write engine (`switchyard_dualwrite`), never the other way round.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use switchyard_config::Config;
use switchyard_dualwrite::Mirror;
use switchyard_pgwire::frame::MessageLimits;
use switchyard_store::wire::WireTarget;
use switchyard_store::{Role, Roles, Store};
use tokio::sync::Semaphore;

use crate::auth::ClientAuth;
use crate::cancel::CancelRegistry;
use crate::error::StartError;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What every session and the admin API share.
pub(crate) struct ProxyState {
    pub(crate) config: Arc<Config>,
    /// The users clients log in as; a reload replaces them ([`run_with_reload`]).
    client_auth: RwLock<Arc<ClientAuth>>,
    pub(crate) upstream: WireTarget,
    pub(crate) cancel: Arc<CancelRegistry>,
    pub(crate) metrics: Metrics,
    pub(crate) connection_slots: Arc<Semaphore>,
    pub(crate) limits: MessageLimits,
    pub(crate) shutdown: Shutdown,
    pub(crate) started: Instant,
    /// The next session id. One counter for the whole process, not one per worker thread, so
    /// the `id` in logs and traces names one session.
    pub(crate) next_session_id: AtomicU64,
    pub(crate) old_store: Store,
    pub(crate) new_store: Store,
    /// The dual-write engine, when some table is in a mirrored phase.
    pub(crate) mirror: Option<Arc<Mirror>>,
}

impl ProxyState {
    /// Builds the state in one step: checks the stores' engines, sets up the metrics, starts the
    /// dual-write engine when some table is in a mirrored phase (and registers its figures).
    /// Sessions log in to `roles.authoritative`.
    pub(crate) async fn build(
        config: Arc<Config>,
        roles: Roles,
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
        let client_auth =
            ClientAuth::new(config.auth.method, &config.auth.users).map_err(StartError::Users)?;
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
        let mirror = Mirror::start(&config, roles).await?;
        if let Some(m) = &mirror {
            metrics.register_mirror(Arc::clone(&m.stats));
            tracing::info!(tables = m.tables.len(), "dual writes enabled");
        }
        Ok(ProxyState {
            client_auth: RwLock::new(Arc::new(client_auth)),
            upstream: WireTarget {
                url: roles.authoritative.settings(&config).url.clone(),
                store: roles.authoritative,
            },
            cancel: Arc::new(CancelRegistry::default()),
            metrics,
            connection_slots: Arc::new(Semaphore::new(config.proxy.max_connections as usize)),
            limits: MessageLimits {
                max_message_bytes: config.proxy.max_message_bytes,
            },
            shutdown,
            started: Instant::now(),
            next_session_id: AtomicU64::new(1),
            old_store,
            new_store,
            mirror,
            config,
        })
    }

    /// The users and how they prove who they are, as of now.
    pub(crate) fn client_auth(&self) -> Arc<ClientAuth> {
        Arc::clone(&self.client_auth.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies what a reloaded configuration may change at run time (the users); `running` is
    /// the configuration with those fields already taken from the new file
    /// ([`Config::with_hot_fields_of`]).
    pub(crate) fn reload(&self, running: &Config) {
        match ClientAuth::new(running.auth.method, &running.auth.users) {
            Ok(auth) => {
                *self.client_auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
                tracing::info!(users = running.auth.users.users.len(), "users reloaded");
            }
            Err(e) => tracing::error!(error = %e, "users not reloaded; keeping the previous ones"),
        }
    }
}
