//! Write authority at run time (`docs/cutover.md`): the engine sessions use (the authoritative
//! store they log in to, the dual-write engine mirroring to the other), replaced when the
//! control state moves authority, and the gate the cutover barrier closes.
//!
//! A session counts as busy from the moment it leaves quiet (no transaction, nothing
//! unanswered) until it is quiet again. While a barrier is open the gate is closed: a quiet
//! session the client sends something waits at the gate instead of starting. Once no session is
//! busy, the proxy confirms the barrier in its heartbeat row. When the barrier ends with the
//! authority moved, the proxy builds the engine for the new roles, opens the gate, and every
//! session moves to the new authority before it goes on (`session::reroute`). Counting and
//! closing happen under one lock, so no session can slip past a gate that was just closed.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use switchyard_config::{Config, Phase, TableSettings};
use switchyard_control::barrier::Barrier;
use switchyard_control::barrier::{heartbeat, leave, Heartbeat};
use switchyard_control::ControlState;
use switchyard_dualwrite::Mirror;
use switchyard_store::wire::WireTarget;
use switchyard_store::{Role, Roles, Store};
use tokio::sync::{watch, Notify};

use crate::shutdown::{Shutdown, ShutdownState};

/// How long after a move of write authority the connections it left behind are closed: the
/// replaced engine's pools, and each moved session's connection to the store it left.
pub(crate) const RETIRE_AFTER: Duration = Duration::from_secs(1);

/// What the engine is built for: each store that takes some configured table's writes, with
/// the tables it mirrors (`schema.table`), the home store first (OLD while it takes any table's
/// writes). One entry without table groups; two while groups are split between the stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape(pub(crate) Vec<(Role, Vec<String>)>);

impl Shape {
    /// The shape for the tables' phases as `phase_of` gives them.
    fn of(config: &Config, phase_of: impl Fn(&TableSettings) -> Phase) -> Shape {
        let tables: Vec<(String, Role, bool)> = config
            .tables
            .iter()
            .map(|t| {
                let phase = phase_of(t);
                (
                    t.name.to_string(),
                    Role::taking_writes_in(phase),
                    switchyard_store::prepare::captured_phase(phase),
                )
            })
            .collect();
        let mirrored = |role: Option<Role>| -> Vec<String> {
            tables
                .iter()
                .filter(|(_, r, captured)| *captured && role.is_none_or(|role| role == *r))
                .map(|(n, _, _)| n.clone())
                .collect()
        };
        if !config.has_groups() {
            // Every table moves together: NEW once any has moved.
            let role = match tables.iter().any(|(_, r, _)| *r == Role::New) {
                true => Role::New,
                false => Role::Old,
            };
            return Shape(vec![(role, mirrored(None))]);
        }
        let mut shape = Vec::new();
        for role in [Role::Old, Role::New] {
            if tables.iter().any(|(_, r, _)| *r == role) {
                shape.push((role, mirrored(Some(role))));
            }
        }
        if shape.is_empty() {
            shape.push((Role::Old, Vec::new()));
        }
        Shape(shape)
    }

    /// The shape for the phases `config` gives (a configuration the control state was applied
    /// to, or the file's).
    pub(crate) fn of_config(config: &Config) -> Shape {
        Shape::of(config, |t| t.phase)
    }

    /// The shape of `state` (with, for the tables `barrier` moves, the phase it moves them to);
    /// the file's phase for a table the state does not have.
    pub(crate) fn of_state(config: &Config, state: &ControlState, barrier: Option<&Barrier>) -> Shape {
        Shape::of(config, |t| {
            let name = t.name.to_string();
            match barrier {
                Some(b) if b.moves(&name) => b.to_phase,
                _ => state.table(&name).map_or(t.phase, |c| c.phase),
            }
        })
    }

    /// The home store: sessions log in there.
    pub(crate) fn home(&self) -> Role {
        self.0.first().map_or(Role::Old, |(r, _)| *r)
    }
}

/// The other store's side of an engine while table groups are split between the stores: a
/// session runs a transaction there when its first statement names a table of a group whose
/// writes that store takes.
pub(crate) struct OtherRoute {
    pub(crate) upstream: WireTarget,
    pub(crate) mirror: Arc<Mirror>,
}

/// What sessions of one authority use.
pub(crate) struct Engine {
    /// Grows with every change of authority.
    pub(crate) generation: u64,
    /// The roles of the home store (the authoritative store sessions log in to).
    pub(crate) roles: Roles,
    /// The home store sessions log in to.
    pub(crate) upstream: WireTarget,
    /// The dual-write engine of the home store, when some table is mirrored.
    pub(crate) mirror: Option<Arc<Mirror>>,
    /// The other store's side, while table groups are split between the stores.
    pub(crate) other: Option<OtherRoute>,
    /// What it was built for.
    pub(crate) shape: Shape,
}

impl Engine {
    /// An engine with one store taking the writes (no table groups split between the stores).
    pub(crate) fn new(generation: u64, roles: Roles, config: &Config, mirror: Option<Arc<Mirror>>) -> Engine {
        let mirrored = mirror
            .as_ref()
            .map(|m| m.tables.iter().map(|t| t.name.to_string()).collect())
            .unwrap_or_default();
        Engine {
            generation,
            roles,
            upstream: target(config, roles.authoritative),
            mirror,
            other: None,
            shape: Shape(vec![(roles.authoritative, mirrored)]),
        }
    }

    /// An engine for `shape`, with the dual-write engine of each of its stores (in its order).
    pub(crate) fn with_shape(
        generation: u64,
        shape: Shape,
        config: &Config,
        mut mirrors: Vec<Option<Arc<Mirror>>>,
    ) -> Engine {
        let home = shape.home();
        let other = match (shape.0.get(1), mirrors.get_mut(1).and_then(Option::take)) {
            (Some((role, _)), Some(mirror)) => Some(OtherRoute {
                upstream: target(config, *role),
                mirror,
            }),
            _ => None,
        };
        Engine {
            generation,
            roles: Roles::with_authoritative(home),
            upstream: target(config, home),
            mirror: mirrors.into_iter().next().flatten(),
            other,
            shape,
        }
    }

    /// The store sessions use and its dual-write engine, for a session on `store`: that store's
    /// if it takes some table's writes, else the home store's.
    pub(crate) fn route(&self, store: Role) -> (&WireTarget, Option<&Arc<Mirror>>) {
        match &self.other {
            Some(o) if o.upstream.store == store => (&o.upstream, Some(&o.mirror)),
            _ => (&self.upstream, self.mirror.as_ref()),
        }
    }

    /// Every dual-write engine it runs.
    pub(crate) fn mirrors(&self) -> impl Iterator<Item = &Arc<Mirror>> {
        self.mirror.iter().chain(self.other.as_ref().map(|o| &o.mirror))
    }
}

fn target(config: &Config, store: Role) -> WireTarget {
    WireTarget {
        url: store.settings(config).url.clone(),
        store,
    }
}

#[derive(Default)]
struct Gate {
    /// The barrier the gate is closed for.
    closed_for: Option<i64>,
    /// Sessions between [`Authority::enter`] and [`Authority::quiet`].
    busy: usize,
    closed_at: Option<Instant>,
}

/// The proxy's engine and gate.
pub(crate) struct Authority {
    engine: RwLock<Arc<Engine>>,
    gate: Mutex<Gate>,
    opened: Notify,
    /// Wakes [`follow`] when the last busy session goes quiet while the gate is closed, so the
    /// proxy confirms a barrier at once instead of at its next check.
    drained: Notify,
    /// This proxy's row in the control state's proxies table.
    pub(crate) proxy_id: String,
    /// The barrier this proxy confirmed (0: none).
    confirmed: AtomicI64,
    /// How long the gate was last closed, in microseconds
    /// (`switchyard_cutover_pause_seconds`).
    pub(crate) last_pause_us: AtomicU64,
    /// The store an announced (or holding) barrier moves the writes to; `None` once there is
    /// none. Sessions log in there ahead of their move (`session::reroute::Standby`).
    pub(crate) announced: watch::Sender<Option<Role>>,
    /// Sessions of the migrated database relaying plainly (they started while no table was
    /// mirrored): reported in the heartbeat, so moving reads to NEW is refused while they last
    /// (their writes reach NEW only through the repair loop).
    pub(crate) plain_sessions: AtomicI64,
}

/// Counts one plain relay in [`Authority::plain_sessions`] for its life.
pub(crate) struct PlainSession<'a>(&'a AtomicI64);

impl Drop for PlainSession<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Authority {
    /// Counts a plain relay of the migrated database until the guard drops.
    pub(crate) fn plain_session(&self) -> PlainSession<'_> {
        self.plain_sessions.fetch_add(1, Relaxed);
        PlainSession(&self.plain_sessions)
    }

    pub(crate) fn new(engine: Engine) -> Authority {
        Authority {
            engine: RwLock::new(Arc::new(engine)),
            gate: Mutex::default(),
            opened: Notify::new(),
            drained: Notify::new(),
            proxy_id: format!(
                "{}-{}-{:08x}",
                hostname(),
                std::process::id(),
                rand::random::<u32>()
            ),
            confirmed: AtomicI64::new(0),
            last_pause_us: AtomicU64::new(0),
            announced: watch::channel(None).0,
            plain_sessions: AtomicI64::new(0),
        }
    }

    /// The engine as of now.
    pub(crate) fn engine(&self) -> Arc<Engine> {
        Arc::clone(&self.engine.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A quiet session of engine `generation` is about to go on: waits while the gate is
    /// closed, then counts it busy. `true` (not counted) when the engine changed: the session
    /// must move first.
    pub(crate) async fn enter(&self, generation: u64) -> bool {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            {
                let mut g = self.gate();
                if g.closed_for.is_none() {
                    if self.engine().generation != generation {
                        return true;
                    }
                    g.busy += 1;
                    return false;
                }
            }
            opened.await;
        }
    }

    /// A session counted by [`Authority::enter`] is quiet again.
    pub(crate) fn quiet(&self) {
        let mut g = self.gate();
        g.busy = g.busy.saturating_sub(1);
        if g.busy == 0 && g.closed_for.is_some() {
            self.drained.notify_one();
        }
    }

    /// Sessions busy now.
    pub(crate) fn busy(&self) -> usize {
        self.gate().busy
    }

    /// The barrier the gate is closed for.
    pub(crate) fn closed_for(&self) -> Option<i64> {
        self.gate().closed_for
    }

    fn close(&self, epoch: i64) {
        let mut g = self.gate();
        if g.closed_for != Some(epoch) {
            g.closed_for = Some(epoch);
            g.closed_at.get_or_insert_with(Instant::now);
            tracing::info!(
                barrier = epoch,
                busy = g.busy,
                "cutover barrier: new transactions wait"
            );
        }
    }

    fn open(&self) {
        let mut g = self.gate();
        if g.closed_for.take().is_some() {
            if let Some(at) = g.closed_at.take() {
                let us = at.elapsed().as_micros() as u64;
                self.last_pause_us.store(us, Relaxed);
                tracing::info!(paused_ms = us / 1000, "cutover barrier over: transactions go on");
            }
        }
        drop(g);
        self.confirmed.store(0, Relaxed);
        self.opened.notify_waiters();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "proxy".to_owned())
}

/// What [`follow`] needs besides the authority.
pub(crate) struct Follow {
    pub(crate) control_store: Store,
    pub(crate) poll: Duration,
    /// Builds the engine for new roles (the dual-write engine started for them).
    pub(crate) build: BuildEngine,
    /// Makes an engine built during a barrier ready once the barrier ended.
    pub(crate) ready: ReadyEngine,
    /// Whether the control state decides the roles (else they were fixed at start).
    pub(crate) follow_authority: bool,
    /// The proxy's configuration (its tables and groups).
    pub(crate) config: Arc<Config>,
}

type Boxed<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>;

/// Builds the engine for the control state with `generation`; with a barrier, ahead of its end,
/// for the tables it moves in the phase it moves them to, without checking the stores'
/// readiness yet.
pub(crate) type BuildEngine = Box<dyn Fn(u64, Option<Barrier>) -> Boxed<Engine> + Send + Sync>;

/// Checks an engine built ahead on the stores and applies the control state to it.
pub(crate) type ReadyEngine = Box<dyn Fn(Arc<Mirror>, Arc<ControlState>) -> Boxed<()> + Send + Sync>;

/// The engine being built for barrier `epoch` (as first seen: announced), for the shape it
/// leaves.
struct Ahead {
    epoch: i64,
    shape: Shape,
    task: tokio::task::JoinHandle<Result<Engine, String>>,
}

impl Drop for Ahead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the control state's barrier and authority until shutdown: closes the gate while a
/// barrier is open and confirms it once no session is busy; builds the new engine and opens the
/// gate when it ends; renews this proxy's heartbeat at every poll.
pub(crate) async fn follow(
    authority: Arc<Authority>,
    follow: Follow,
    mut updates: watch::Receiver<Option<Arc<ControlState>>>,
    mut shutdown: Shutdown,
) {
    let mut last_beat: Option<(Instant, i64, i64, Option<i64>, Role)> = None;
    // Whether the last heartbeat failed: the first failure after a success is a warning (a
    // proxy whose heartbeat is old is not counted by a cutover barrier), the repeats are not.
    let mut beat_failing = false;
    let mut ahead: Option<Ahead> = None;
    loop {
        let state = updates.borrow_and_update().clone();
        if let Some(state) = &state {
            step(&authority, &follow, state, &mut ahead).await;
            let engine = authority.engine();
            let confirmed = authority.confirmed.load(Relaxed);
            let built_for = ahead.as_ref().filter(|a| a.task.is_finished()).map(|a| a.epoch);
            let due = last_beat.is_none_or(|(at, epoch, c, b, role)| {
                at.elapsed() >= follow.poll
                    || epoch != state.epoch
                    || c != confirmed
                    || b != built_for
                    || role != engine.roles.authoritative
            });
            if due {
                let beat = Heartbeat {
                    proxy_id: &authority.proxy_id,
                    epoch: state.epoch,
                    authority: engine.roles.authoritative,
                    paused_for: (confirmed != 0).then_some(confirmed),
                    built_for,
                    plain_sessions: authority.plain_sessions.load(Relaxed),
                };
                match heartbeat(&follow.control_store, &beat).await {
                    Ok(()) => {
                        if std::mem::take(&mut beat_failing) {
                            tracing::info!("the proxy's heartbeat is renewed again");
                        }
                        last_beat = Some((
                            Instant::now(),
                            state.epoch,
                            confirmed,
                            built_for,
                            engine.roles.authoritative,
                        ))
                    }
                    Err(e) if !beat_failing => {
                        beat_failing = true;
                        tracing::warn!(
                            error = %e,
                            "cannot renew the proxy's heartbeat; until it is renewed, a cutover barrier does not count this proxy"
                        );
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot renew the proxy's heartbeat"),
                }
            }
        }
        // While a barrier waits for this proxy's sessions or its engine, look again soon.
        let waited_for = (authority.closed_for().is_some() && authority.confirmed.load(Relaxed) == 0)
            || ahead.as_ref().is_some_and(|a| !a.task.is_finished());
        let wait = if waited_for {
            Duration::from_millis(5)
        } else {
            follow.poll
        };
        tokio::select! {
            r = updates.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
            () = authority.drained.notified() => {}
            _ = shutdown.changed_from(ShutdownState::Running) => {
                let _ = leave(&follow.control_store, &authority.proxy_id).await;
                return;
            }
        }
    }
}

async fn step(authority: &Authority, follow: &Follow, state: &Arc<ControlState>, ahead: &mut Option<Ahead>) {
    match &state.barrier {
        Some(b) => {
            authority.announced.send_if_modified(|a| {
                let changed = *a != Some(b.authority);
                *a = Some(b.authority);
                changed
            });
            // The engine for the roles the barrier moves to is built as soon as it is announced,
            // while writes go on (its catalog reads and logins take a good part of a second), so
            // the gate opens at once when the barrier ends.
            let shape = Shape::of_state(&follow.config, state, Some(b));
            if follow.follow_authority && ahead.as_ref().is_none_or(|a| a.shape != shape) {
                let generation = authority.engine().generation + 1;
                *ahead = Some(Ahead {
                    epoch: b.epoch,
                    shape,
                    task: tokio::spawn((follow.build)(generation, Some(b.clone()))),
                });
            }
            if !b.holding {
                return;
            }
            authority.close(b.epoch);
            if authority.confirmed.load(Relaxed) != b.epoch && authority.busy() == 0 {
                authority.confirmed.store(b.epoch, Relaxed);
                tracing::info!(
                    barrier = b.epoch,
                    "cutover barrier: no transaction in flight here; confirmed"
                );
            }
        }
        None => {
            // The barrier this proxy held for ended (completed or aborted) only in a state
            // newer than it; an older one read late says nothing about it.
            if authority.closed_for().is_some_and(|e| state.epoch <= e) {
                return;
            }
            let engine = authority.engine();
            let shape = if follow.follow_authority {
                Shape::of_state(&follow.config, state, None)
            } else {
                engine.shape.clone()
            };
            let built = ahead.take();
            if shape != engine.shape {
                let swap_started = Instant::now();
                let next = match built {
                    Some(a) if a.shape == shape => take_ahead(a, follow, state).await,
                    _ => None,
                };
                let next = match next {
                    Some(n) => Ok(n),
                    None => (follow.build)(engine.generation + 1, None).await,
                };
                match next {
                    Ok(next) => {
                        tracing::info!(
                            authoritative = next.roles.authoritative.name(),
                            other = next.other.as_ref().map(|o| o.upstream.store.name()),
                            generation = next.generation,
                            ms = swap_started.elapsed().as_secs_f64() * 1e3,
                            "write authority moved; sessions follow at their next transaction"
                        );
                        let before = std::mem::replace(
                            &mut *authority.engine.write().unwrap_or_else(PoisonError::into_inner),
                            Arc::new(next),
                        );
                        // Its sessions move at their next transaction and never use its pools
                        // again: their connections go soon, not when the last session moved; not
                        // at once either, as each is a backend exiting on a store, CPU the moved
                        // sessions' first transactions need on a machine with few cores.
                        for m in before.mirrors() {
                            let m = Arc::clone(m);
                            tokio::spawn(async move {
                                tokio::time::sleep(RETIRE_AFTER).await;
                                m.close().await
                            });
                        }
                    }
                    Err(e) => {
                        // Writes stay held: going on with the old authority would write both.
                        tracing::error!(error = %e, "cannot start the engine for the new authority; writes stay held");
                        authority.close(-1);
                        return;
                    }
                }
            }
            authority.open();
            // After the swap: a session's connection opened ahead is kept for its move.
            authority.announced.send_if_modified(|a| a.take().is_some());
        }
    }
}

/// The engine built while the barrier was open, made ready for the state the barrier left
/// (`None`: it failed or is not ready; the caller builds one the usual way).
async fn take_ahead(mut a: Ahead, follow: &Follow, state: &Arc<ControlState>) -> Option<Engine> {
    let engine = match (&mut a.task).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the engine built during the barrier failed; building it again");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the engine built during the barrier was lost; building it again");
            return None;
        }
    };
    for m in engine.mirrors() {
        if let Err(e) = (follow.ready)(Arc::clone(m), Arc::clone(state)).await {
            tracing::warn!(error = %e, "the engine built during the barrier is not ready; building it again");
            return None;
        }
    }
    Some(engine)
}
