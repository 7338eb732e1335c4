//! The control state as this proxy follows it: each table's phase and read share, read from the
//! authoritative store whenever a change is notified (`LISTEN switchyard_control`) and at least
//! every `[control] poll_interval_ms`, so a lost notification costs at most one interval.
//! `/status` shows the epoch this proxy runs, so an operator sees when every proxy caught up.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use switchyard_control::{ControlState, TableControl, CHANNEL};
use switchyard_store::Store;

use crate::shutdown::{Shutdown, ShutdownState};

/// What follows each table's change (the dual-write engine, for shadow reads).
pub(crate) type OnChange = Box<dyn Fn(&TableControl) + Send + Sync>;

/// The latest control state read, and when.
pub(crate) struct ControlFollower {
    latest: RwLock<Option<(Arc<ControlState>, Instant)>>,
    on_change: Option<OnChange>,
    /// Every state read, for the write authority's follower (`crate::authority`).
    updates: tokio::sync::watch::Sender<Option<Arc<ControlState>>>,
}

impl ControlFollower {
    /// A follower that calls `on_change` for every table whose row changed (and for every table
    /// at the first read).
    pub(crate) fn new(on_change: Option<OnChange>) -> ControlFollower {
        ControlFollower {
            latest: RwLock::default(),
            on_change,
            updates: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Every state read from now on (and the latest one).
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<ControlState>>> {
        self.updates.subscribe()
    }

    /// The state as last read; `None` until the control state exists (before `switchyard
    /// prepare` seeded it, the configuration file's phases apply).
    pub(crate) fn state(&self) -> Option<Arc<ControlState>> {
        let latest = self.latest.read().unwrap_or_else(PoisonError::into_inner);
        latest.as_ref().map(|(s, _)| Arc::clone(s))
    }

    /// Seconds since the state was last read.
    pub(crate) fn age(&self) -> Option<f64> {
        let latest = self.latest.read().unwrap_or_else(PoisonError::into_inner);
        latest.as_ref().map(|(_, at)| at.elapsed().as_secs_f64())
    }

    fn set(&self, state: ControlState) {
        let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
        let before = latest.as_ref().map(|(s, _)| s.epoch);
        if before != Some(state.epoch) {
            for t in &state.tables {
                let changed = latest
                    .as_ref()
                    .and_then(|(s, _)| s.table(&t.table))
                    .is_none_or(|old| old.epoch != t.epoch);
                if changed {
                    if let Some(f) = &self.on_change {
                        f(t);
                    }
                    tracing::info!(
                        epoch = state.epoch,
                        table = %t.table,
                        phase = %t.phase,
                        read_share = t.read_share,
                        by = %t.changed_by,
                        "control state"
                    );
                }
            }
        }
        let state = Arc::new(state);
        *latest = Some((Arc::clone(&state), Instant::now()));
        drop(latest);
        self.updates.send_replace(Some(state));
    }

    async fn refresh(&self, store: &Store) {
        match switchyard_control::read(store).await {
            Ok(Some(state)) => self.set(state),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the control state; keeping the last one read"),
        }
    }
}

/// Follows the control state on `store` until shutdown: a read at start, then one after every
/// notification and at least every `poll`.
pub(crate) async fn follow(
    follower: Arc<ControlFollower>,
    store: Store,
    poll: Duration,
    mut shutdown: Shutdown,
) {
    let Store::Postgres(pg) = &store;
    let mut listener: Option<PgListener> = None;
    loop {
        if listener.is_none() {
            match PgListener::connect_with(pg.pool()).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => listener = Some(l),
                    Err(e) => tracing::debug!(error = %e, "cannot listen for control changes; polling"),
                },
                Err(e) => tracing::debug!(error = %e, "cannot listen for control changes; polling"),
            }
        }
        // Read after (re)subscribing, so no change between the two is missed.
        follower.refresh(&store).await;
        let wait = async {
            match listener.as_mut() {
                Some(l) => match tokio::time::timeout(poll, l.recv()).await {
                    Ok(Ok(_)) | Err(_) => true,
                    // The connection broke: subscribe again.
                    Ok(Err(_)) => false,
                },
                None => {
                    tokio::time::sleep(poll).await;
                    true
                }
            }
        };
        tokio::select! {
            keep = wait => if !keep { listener = None },
            _ = shutdown.changed_from(ShutdownState::Running) => return,
        }
    }
}
