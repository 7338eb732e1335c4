//! Moving write authority between the stores: `switchyard phase --to cutover` (NEW takes the
//! writes, OLD follows) and back (`--to read_shift`, `shadow_read` or `dual_write` from
//! `cutover`: a rollback), and `--to done` (NEW keeps the writes and stops mirroring them to
//! OLD: under the barrier the capture is removed from NEW instead of moved). Every configured
//! table moves together, or, when the configuration names table groups, the named table's group
//! (the proxies then run each transaction on its group's store; `done` still moves every table).
//! The steps, under the barrier (`crate::barrier`):
//!
//! 1. the guard rails of cutover, per table (not for a rollback);
//! 2. the barrier opens; every live proxy finishes its write transactions in flight, holds new
//!    ones, and confirms;
//! 3. the intents on the current authority are gone (every mirrored transaction is on the
//!    other store, or repaired);
//! 4. the sequences the tables use are moved past the current authority's on the other store;
//! 5. the capture triggers move: installed on the new authority (with the side tables the new
//!    follower needs), removed from the old one;
//! 6. every table's phase changes and the barrier closes, in one transaction; the proxies switch
//!    their sessions to the new authority and the held transactions go on.
//!
//! A step that fails or times out aborts the barrier (the capture stays where it was), and
//! writes resume on the authority they had.

use std::time::{Duration, Instant};

use serde::Serialize;
use switchyard_config::{Config, Phase, TableSettings};
use switchyard_store::prepare::{prepare_in, prepare_with, set_capture, set_capture_and_fence, Triggers};
use switchyard_store::sequences::{advance_sequences, SequenceMove, DEFAULT_MARGIN};
use switchyard_store::PreparedTable;
use switchyard_store::{Role, Roles, Store, StoreError};

use crate::{authoritative, barrier, guard, read, ControlError};

/// What a move of authority did.
#[derive(Debug, Clone, Serialize)]
pub struct Switched {
    /// The phase every configured table is in now.
    pub to: Phase,
    /// The store that takes the writes now.
    pub authority: &'static str,
    /// The barrier's epoch and the epoch after it.
    pub barrier_epoch: i64,
    pub epoch: i64,
    /// Proxies that confirmed the barrier.
    pub proxies: usize,
    /// From the barrier's announcement to its holding the writes: the side objects prepared
    /// and every proxy's engine for the new roles built, while writes went on.
    pub ahead_seconds: f64,
    /// From the barrier's holding the writes to its completion (writes were held at most this
    /// long).
    pub barrier_seconds: f64,
    pub sequences: Vec<SequenceMove>,
    /// Guard-rail refusals overridden by `--force`.
    pub overridden: Vec<String>,
    /// How long each step under the barrier took, in order.
    pub steps: Vec<Step>,
}

/// One step under the barrier and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub ms: f64,
}

/// The steps of [`under_barrier`] as they end.
struct Steps(Vec<Step>, Instant);

impl Default for Steps {
    fn default() -> Self {
        Steps(Vec::new(), Instant::now())
    }
}

impl Steps {
    fn done(&mut self, step: &'static str) {
        let now = Instant::now();
        self.0.push(Step {
            step,
            ms: (now - self.1).as_secs_f64() * 1000.0,
        });
        self.1 = now;
    }
}

/// Whether moving a table from `from` to `to` goes through the barrier: into `cutover`, back out
/// of it (a rollback), or on to `done` (the proxies stop mirroring to OLD).
pub fn moves_authority(from: Phase, to: Phase) -> bool {
    from != Phase::Done && (to == Phase::Done || (to == Phase::Cutover) != (from == Phase::Cutover))
}

fn not_allowed(table: &str, reason: impl Into<String>) -> ControlError {
    ControlError::NotAllowed {
        table: table.to_owned(),
        reason: reason.into(),
    }
}

fn store_of<'a>(role: Role, old: &'a Store, new: &'a Store) -> &'a Store {
    match role {
        Role::Old => old,
        Role::New => new,
    }
}

/// How long an announced barrier waits for the proxies to build the engine for the new roles.
const BUILD_WAIT: Duration = Duration::from_secs(2);

/// Moves every configured table to `to` (cutover or back), moving write authority under the
/// barrier. `facts` gathers a table's guard-rail facts (for entering cutover). The control
/// state lives on OLD throughout.
pub async fn switch_authority<F, Fut>(
    old: &Store,
    new: &Store,
    config: &Config,
    (table, to): (&str, Phase),
    force: bool,
    by: &str,
    facts: F,
) -> Result<Switched, ControlError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<guard::Facts, StoreError>>,
{
    let state = read(old)
        .await?
        .ok_or_else(|| not_allowed("*", "no control state; run `switchyard prepare` first"))?;
    if let Some(b) = &state.barrier {
        return Err(not_allowed(
            "*",
            format!(
                "a barrier is open already (epoch {}, writes moving to {})",
                b.epoch,
                b.authority.name()
            ),
        ));
    }
    let grouped = config.has_groups();
    // The tables that move: the named table's group (every configured table without groups);
    // `done` ends the whole migration, every table together.
    let group = crate::group_of(config, table);
    if group.is_empty() {
        return Err(not_allowed(table, "not a configured table"));
    }
    let names: Vec<String> = if to == Phase::Done {
        config.tables.iter().map(|t| t.name.to_string()).collect()
    } else {
        group
    };
    let to_authority = Role::taking_writes_in(to);
    let mut from_authority = None;
    for name in &names {
        let Some(c) = state.table(name) else {
            return Err(not_allowed(
                name,
                "not in the control state; run `switchyard prepare`",
            ));
        };
        let fits = match to {
            Phase::Cutover => c.phase == Phase::ReadShift || c.phase == Phase::Cutover,
            Phase::Done => c.phase == Phase::Cutover || c.phase == Phase::Done,
            Phase::DualWrite | Phase::ShadowRead | Phase::ReadShift => {
                c.phase == Phase::Cutover || c.phase == to
            }
            _ => false,
        };
        if !fits {
            let unit = match (grouped, to) {
                (_, Phase::Done) => "every configured table moves to done together, from cutover",
                (true, _) => {
                    "the tables of a group move together, from read_shift to cutover and from cutover back"
                }
                (false, _) => {
                    "every configured table moves together, from read_shift to cutover and from cutover back"
                }
            };
            return Err(not_allowed(
                name,
                format!(
                    "moving from {} to {to} is not a cutover or a rollback: {unit}",
                    c.phase
                ),
            ));
        }
        let authority = Role::taking_writes_in(c.phase);
        if from_authority.is_some_and(|a| a != authority) {
            return Err(not_allowed(
                name,
                "the tables of its group are written on different stores; move them back to one first",
            ));
        }
        from_authority = Some(authority);
    }
    let from_authority = from_authority.unwrap_or(Role::Old);
    if from_authority == to_authority && to != Phase::Done {
        return Err(not_allowed(
            "*",
            format!("writes are already {}'s", to_authority.name()),
        ));
    }
    if grouped && to == Phase::Cutover {
        // Sessions move between the stores per transaction, through the dual-write relay: every
        // other table must be mirrored (a table in passthrough is relayed plainly, on OLD only).
        for t in &config.tables {
            let name = t.name.to_string();
            if names.contains(&name) {
                continue;
            }
            let phase = state.table(&name).map_or(t.phase, |c| c.phase);
            if !switchyard_store::prepare::captured_phase(phase) || phase == Phase::Done {
                return Err(not_allowed(
                    &name,
                    format!(
                        "is in {phase}: before one table group cuts over, every other configured table must be mirrored \
                         (dual_write, shadow_read, read_shift or cutover)"
                    ),
                ));
            }
        }
    }
    let moving: Vec<TableSettings> = config
        .tables
        .iter()
        .filter(|t| names.contains(&t.name.to_string()))
        .cloned()
        .collect();
    let mut overridden = Vec::new();
    if to == Phase::Cutover {
        for name in &names {
            let f = facts(name.clone()).await?;
            for r in guard::cutover_refusals(&f, &config.control) {
                overridden.push(format!("{name}: {r}"));
            }
        }
        if !overridden.is_empty() && !force {
            return Err(ControlError::Refused {
                table: names.join(", "),
                reasons: overridden,
            });
        }
    }

    // The barrier is announced first: writes go on while every proxy builds the engine for the
    // new roles, and while the stores get what they need in those roles besides the capture
    // triggers (side objects, idempotent; the tables' definitions read), so that only the
    // triggers move while writes are held. `done` keeps the roles and creates nothing.
    let announced_at = Instant::now();
    let announced =
        barrier::announce_for(old, to_authority, to, grouped.then_some(names.as_slice()), by).await?;
    let live = barrier::live_within(&config.control);
    let ahead = async {
        let to_roles = Roles::with_authoritative(to_authority);
        let (Store::Postgres(dst), Store::Postgres(src)) = (
            store_of(to_authority, old, new),
            store_of(to_roles.follower, old, new),
        );
        let sides = prepare_with(
            to_roles,
            dst.pool(),
            src.pool(),
            &moving,
            to != Phase::Done,
            Triggers::Leave,
        )
        .await
        .map_err(|e| format!("preparing {} to take the writes: {e}", to_authority.name()))?;
        if !sides.is_ready() {
            return Err(format!(
                "{} is not ready to take the writes: {:?}",
                to_authority.name(),
                sides.mismatches
            ));
        }
        if grouped && to != Phase::Done {
            // With groups each store takes some tables' writes: the other groups' tables are
            // fenced on the store that does not take theirs, so that a write a transaction of
            // one group makes to another group's table (in a function, a trigger) fails there
            // instead of landing on one store only. Idempotent; NEW takes no direct writes
            // before this, so it is done while writes go on.
            for (store, role) in [(old, Role::Old), (new, Role::New)] {
                let fenced: Vec<switchyard_config::TableName> = config
                    .tables
                    .iter()
                    .filter(|t| !names.contains(&t.name.to_string()))
                    .filter(|t| crate::authority_of(&state, &t.name.to_string()) != role)
                    .map(|t| t.name.clone())
                    .collect();
                let Store::Postgres(pg) = store;
                switchyard_store::prepare::set_fence(pg.pool(), role, &fenced, true)
                    .await
                    .map_err(|e| format!("fencing the other groups' tables on {}: {e}", role.name()))?;
            }
        }
        // The proxies' engines: waited for a little (a proxy that cannot build one builds it
        // after the barrier, as a proxy that does not answer in time does).
        let deadline = Instant::now() + BUILD_WAIT;
        loop {
            let (waiting, _) = barrier::unbuilt(old, announced, live)
                .await
                .map_err(|e| e.to_string())?;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(proxies = %waiting.join(", "), "proxies did not build the engine for the new roles in time; they build it after the barrier");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(sides)
    }
    .await;
    let sides = match ahead {
        Ok(sides) => sides,
        Err(why) => {
            if let Err(e) = barrier::abort(old, announced, &why, by).await {
                tracing::error!(error = %e, "cannot abort the barrier; remove switchyard.switchyard_barrier's row by hand");
            }
            return Err(not_allowed("*", why));
        }
    };
    let ahead_seconds = announced_at.elapsed().as_secs_f64();

    let started = Instant::now();
    let epoch = match barrier::hold(old, announced, by).await {
        Ok(epoch) => epoch,
        Err(e) => {
            let _ = barrier::abort(old, announced, &e.to_string(), by).await;
            return Err(e.into());
        }
    };
    match under_barrier(
        old,
        new,
        config,
        (from_authority, to_authority, to),
        epoch,
        &moving,
        &sides.tables,
    )
    .await
    {
        Ok((proxies, sequences, mut steps)) => {
            let at = Instant::now();
            let after = barrier::complete(old, epoch, &names, to, &overridden, by).await?;
            steps.push(Step {
                step: "phases changed, barrier closed",
                ms: at.elapsed().as_secs_f64() * 1000.0,
            });
            Ok(Switched {
                to,
                authority: to_authority.name(),
                ahead_seconds,
                barrier_epoch: epoch,
                epoch: after,
                proxies,
                barrier_seconds: started.elapsed().as_secs_f64(),
                sequences,
                overridden,
                steps,
            })
        }
        Err(why) => {
            if let Err(e) = barrier::abort(old, epoch, &why, by).await {
                tracing::error!(error = %e, "cannot abort the barrier; remove switchyard.switchyard_barrier's row by hand");
            }
            Err(not_allowed(
                "*",
                format!("cutover barrier aborted, nothing moved: {why}"),
            ))
        }
    }
}

/// Steps 2 to 5 of the module's list. `Err` says why the barrier must be aborted.
async fn under_barrier(
    old: &Store,
    new: &Store,
    config: &Config,
    (from, to, phase): (Role, Role, Phase),
    epoch: i64,
    moving: &[TableSettings],
    prepared: &[PreparedTable],
) -> Result<(usize, Vec<SequenceMove>, Vec<Step>), String> {
    let live = barrier::live_within(&config.control);
    let mut steps = Steps::default();
    let timeout = config.control.barrier_timeout;
    let deadline = Instant::now() + timeout;
    // Every live proxy confirms.
    let proxies = loop {
        let (waiting, live_count) = barrier::unconfirmed(old, epoch, live)
            .await
            .map_err(|e| e.to_string())?;
        if waiting.is_empty() {
            break live_count;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "proxies {} did not confirm within {timeout:?} ([control] barrier_timeout_ms): a transaction open there too long, or sessions connected before dual writes started (they relay plainly until they reconnect)",
                waiting.join(", ")
            ));
        }
        // Writes are held meanwhile: checked often (a query on a table of a few rows).
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    steps.done("proxies confirmed");
    let (source, target) = (store_of(from, old, new), store_of(to, old, new));
    let follower = store_of(if from == Role::Old { Role::New } else { Role::Old }, old, new);
    let with_phase = |phase: Phase| -> Vec<TableSettings> {
        moving
            .iter()
            .map(|t| TableSettings { phase, ..t.clone() })
            .collect()
    };
    if phase == Phase::Done {
        settle(source, follower, from, deadline).await?;
        steps.done("intents drained");
        // NEW stays authoritative and stops capturing: OLD is left behind (still fenced).
        let Store::Postgres(pg_new) = new;
        set_capture(pg_new.pool(), Role::New, &with_phase(Phase::Done), prepared)
            .await
            .map_err(|e| format!("removing the capture from NEW: {e}"))?;
        steps.done("capture removed from NEW");
        return Ok((proxies, Vec::new(), steps.0));
    }
    // The capture moves: installed on the new authority and removed from the old one, which is
    // fenced in the same transaction (its tables refuse every write but Switchyard's own:
    // `store::capture::fence_sql`), both stores at once; if either fails, both go back. From
    // here nothing can commit a write on the old authority, not even a proxy that missed the
    // barrier (paused, or cut off from the control state, its heartbeat expired).
    let (Store::Postgres(src), Store::Postgres(dst)) = (source, target);
    let on_src: Vec<PreparedTable> = prepared.iter().map(switchyard_store::prepare::swapped).collect();
    let (captured, plain) = (with_phase(Phase::DualWrite), with_phase(Phase::Passthrough));
    // The new authority's fence as it was, for putting things back (fenced if it lost the
    // writes at an earlier barrier).
    let dst_fenced = switchyard_store::prepare::is_fenced(dst.pool(), to, prepared)
        .await
        .map_err(|e| e.to_string())?;
    let back = || async {
        let _ = tokio::join!(
            set_capture_and_fence(dst.pool(), to, &plain, prepared, Some(dst_fenced)),
            set_capture_and_fence(src.pool(), from, &captured, &on_src, Some(false)),
        );
    };
    let (installed, removed) = tokio::join!(
        set_capture_and_fence(dst.pool(), to, &captured, prepared, Some(false)),
        set_capture_and_fence(src.pool(), from, &plain, &on_src, Some(true)),
    );
    if installed.is_err() || removed.is_err() {
        back().await;
        let why = [
            installed
                .err()
                .map(|e| format!("installing the capture on {}: {e}", to.name())),
            removed
                .err()
                .map(|e| format!("removing the capture from {}: {e}", from.name())),
        ];
        return Err(why.into_iter().flatten().collect::<Vec<_>>().join("; "));
    }
    steps.done("capture moved, old authority fenced");
    // Every mirrored transaction is on both stores, including any a proxy that missed the
    // barrier committed before the fence: the follower's WAL flushed and the intents it holds
    // deleted at once; any other waits for its repair.
    if let Err(why) = settle(source, follower, from, deadline).await {
        back().await;
        return Err(why);
    }
    steps.done("intents drained");
    let tables: Vec<_> = moving.iter().map(|t| t.name.clone()).collect();
    let sequences = match advance_sequences(source, target, &tables, DEFAULT_MARGIN).await {
        Ok(s) => s,
        Err(e) => {
            back().await;
            return Err(format!("moving the sequences: {e}"));
        }
    };
    steps.done("sequences moved");
    Ok((proxies, sequences, steps.0))
}

/// Waits until every intent on the authoritative store `source` is settled on `follower`, or
/// fails at `deadline`.
async fn settle(source: &Store, follower: &Store, from: Role, deadline: Instant) -> Result<(), String> {
    loop {
        let n = switchyard_store::mirror::settle_intents(source, follower)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{n} intents on {} still wait for the follower's side or a repair",
                from.name()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Applied {
    /// One table's phase or read share changed ([`crate::change`]).
    Changed(crate::Changed),
    /// Write authority moved, every table together ([`switch_authority`]).
    Switched(Switched),
}

/// Makes `request` as `switchyard phase` and `switchyard shift` (and the admin API) do: into
/// `cutover` or back out of it through [`switch_authority`], any other change through
/// [`crate::change`], with the guard rails' facts gathered from `old` and `new`.
pub async fn apply(
    old: &Store,
    new: &Store,
    config: &Config,
    request: &crate::Request<'_>,
) -> Result<Applied, ControlError> {
    if let crate::Target::Phase(to) = request.target {
        let state = read(old).await?.unwrap_or_default();
        let from = state.table(&request.table.to_string()).map(|t| t.phase);
        if from.is_some_and(|f| moves_authority(f, to)) {
            let switched = switch_authority(
                old,
                new,
                config,
                (&request.table.to_string(), to),
                request.force,
                request.by,
                |name| async move { guard::gather(old, new, &name, config).await },
            )
            .await?;
            return Ok(Applied::Switched(switched));
        }
    }
    let table = request.table.to_string();
    if let crate::Target::Phase(Phase::DualWrite) = request.target {
        start_capture(old, new, config, &table).await?;
    }
    let changed = crate::change(old, request, &config.control, || {
        guard::gather(old, new, &table, config)
    })
    .await?;
    Ok(Applied::Changed(changed))
}

/// Before a table in `passthrough` moves to `dual_write`: `switchyard prepare` for it (its
/// side tables on NEW, its capture triggers on OLD, with the capture boundary the backfill
/// starts from), the other tables as the control state has them. From the triggers on, a write
/// no proxy mirrors yet (a session still relaying plainly) is recorded by the trigger's net and
/// copied by the repair loop, so nothing written in between is missed.
async fn start_capture(old: &Store, new: &Store, config: &Config, table: &str) -> Result<(), ControlError> {
    let Some(state) = read(old).await? else {
        return Ok(());
    };
    if state.table(table).map(|t| t.phase) != Some(Phase::Passthrough) {
        return Ok(());
    }
    if authoritative(&state) == Role::New {
        return Err(not_allowed(
            table,
            "the other tables have cut over to NEW: a table cannot start dual writes from OLD now",
        ));
    }
    let mut config = config.clone();
    crate::apply_to(&mut config, &state);
    for t in &mut config.tables {
        if t.name.to_string() == table {
            t.phase = Phase::DualWrite;
        }
    }
    let (Store::Postgres(pg_old), Store::Postgres(pg_new)) = (old, new);
    let report = prepare_in(
        Roles::OLD_AUTHORITATIVE,
        pg_old.pool(),
        pg_new.pool(),
        &config.tables,
        true,
    )
    .await?;
    if !report.is_ready() {
        let problems: Vec<String> = report.mismatches.iter().map(ToString::to_string).collect();
        return Err(not_allowed(
            table,
            format!("NEW is not ready for dual writes: {}", problems.join("; ")),
        ));
    }
    Ok(())
}
