//! The control state: each table's phase and read share, shared by every proxy of a migration.
//!
//! Several proxies serve one migration, so a phase or read share must change for all of them
//! together. The state lives in `switchyard.switchyard_control` on the authoritative store, one
//! row per table, each with the epoch of its last change; the state's epoch is the largest. The
//! configuration file only seeds it ([`seed`]: rows for tables that have none; an existing row
//! always wins over a file, so a proxy restarted with an old file does not undo a change).
//! [`change`] changes one table in one transaction on that store: the table's row locked,
//! the move checked ([`transition`]) and its guard rails ([`guard`]) evaluated, the new
//! epoch written with a log row (`switchyard.switchyard_control_log`: what, who, when, whether
//! forced and over which refusals), and a notification sent on channel
//! [`CHANNEL`], which proxies listen to (and poll, so a lost notification costs at most one
//! poll interval).

pub mod barrier;
pub mod guard;
pub mod switch;

use serde::Serialize;
use switchyard_config::{Config, ControlSettings, Phase, TableName};
use switchyard_store::{Role, Store, StoreError};

/// The notification channel proxies listen on; the payload is the new epoch.
pub const CHANNEL: &str = "switchyard_control";

const DDL: &str = "SELECT pg_advisory_xact_lock(hashtextextended('switchyard.control', 0)); \
     CREATE SCHEMA IF NOT EXISTS switchyard; \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_control ( \
       table_name text PRIMARY KEY, \
       phase text NOT NULL, \
       read_share integer NOT NULL CHECK (read_share BETWEEN 0 AND 100), \
       epoch bigint NOT NULL, \
       changed_at timestamptz NOT NULL DEFAULT now(), \
       changed_by text NOT NULL); \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_control_log ( \
       epoch bigint PRIMARY KEY, \
       table_name text NOT NULL, \
       change text NOT NULL, \
       from_value text, \
       to_value text NOT NULL, \
       forced boolean NOT NULL DEFAULT false, \
       overridden text[] NOT NULL DEFAULT '{}', \
       changed_by text NOT NULL, \
       changed_at timestamptz NOT NULL DEFAULT now())";

/// Sets table `$1`'s phase to `$2` at epoch `$3`, changed by `$4`.
pub(crate) const SET_PHASE: &str =
    "UPDATE switchyard.switchyard_control SET phase = $2, epoch = $3, changed_at = now(), changed_by = $4 \
     WHERE table_name = $1";

/// One table's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableControl {
    /// `schema.table`.
    pub table: String,
    pub phase: Phase,
    /// Percent of sessions whose eligible reads NEW serves (in `read_shift`).
    pub read_share: u8,
    /// The epoch of the table's last change.
    pub epoch: i64,
    pub changed_at: String,
    pub changed_by: String,
}

/// The whole state as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ControlState {
    /// The largest epoch: grows with every change.
    pub epoch: i64,
    pub tables: Vec<TableControl>,
    /// The cutover barrier, while one is open (`barrier`).
    pub barrier: Option<barrier::Barrier>,
}

impl ControlState {
    /// The row of `table` (`schema.table`).
    pub fn table(&self, table: &str) -> Option<&TableControl> {
        self.tables.iter().find(|t| t.table == table)
    }
}

/// What a change asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Phase(Phase),
    ReadShare(u8),
}

/// The outcome of [`change`].
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub table: String,
    /// `phase` or `read_share`.
    pub change: &'static str,
    pub from: String,
    pub to: String,
    /// The new epoch (unchanged when nothing changed).
    pub epoch: i64,
    /// Refusals overridden with `--force`.
    pub overridden: Vec<String>,
}

/// Why a change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The move itself is not allowed (whatever the guard rails say).
    #[error("table {table}: {reason}")]
    NotAllowed { table: String, reason: String },
    /// A guard rail refused; `--force` overrides.
    #[error("table {table}: refused: {}", reasons.join("; "))]
    Refused { table: String, reasons: Vec<String> },
}

fn failed(store: &Store, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    let role = store.role().as_str();
    move |source| StoreError::Query {
        role,
        action: action.to_owned(),
        source,
    }
}

/// Creates the control tables on `store` if missing and adds a row, with a new epoch, for every
/// configured table that has none (its phase and read share from the file). Returns the state.
pub async fn seed(store: &Store, config: &Config, by: &str) -> Result<ControlState, StoreError> {
    let mut tx = begin(store, "seeding the control state").await?;
    sqlx::raw_sql(DDL)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "creating the control tables"))?;
    sqlx::raw_sql(barrier::DDL)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "creating the barrier's tables"))?;
    lock(&mut tx, store).await?;
    let mut added = 0;
    for t in &config.tables {
        let epoch = next_epoch(&mut tx, store).await?;
        let inserted = sqlx::query(
            "INSERT INTO switchyard.switchyard_control (table_name, phase, read_share, epoch, changed_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (table_name) DO NOTHING",
        )
        .bind(t.name.to_string())
        .bind(t.phase.as_str())
        .bind(i32::from(t.read_share))
        .bind(epoch)
        .bind(by)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "seeding the control state"))?
        .rows_affected();
        if inserted > 0 {
            log(
                &mut tx,
                store,
                epoch,
                &t.name.to_string(),
                "seed",
                None,
                t.phase.as_str(),
                &[],
                by,
            )
            .await?;
            added += 1;
        }
    }
    if added > 0 {
        notify(&mut tx, store).await?;
    }
    tx.commit()
        .await
        .map_err(failed(store, "seeding the control state"))?;
    Ok(read(store).await?.unwrap_or_default())
}

/// The control state on `store`; `None` when it was never seeded.
pub async fn read(store: &Store) -> Result<Option<ControlState>, StoreError> {
    let Store::Postgres(pg) = store;
    if !store.has_relation("switchyard.switchyard_control").await? {
        return Ok(None);
    }
    // One snapshot: a barrier that completes between two reads must not look open and
    // closed at once (the phases from before it, no barrier row after it).
    let mut tx = pg
        .pool()
        .begin()
        .await
        .map_err(failed(store, "reading the control state"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "reading the control state"))?;
    let rows: Vec<(String, String, i32, i64, String, String)> = sqlx::query_as(
        "SELECT table_name, phase, read_share, epoch, changed_at::text, changed_by \
         FROM switchyard.switchyard_control ORDER BY table_name",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(failed(store, "reading the control state"))?;
    let mut state = ControlState::default();
    for (table, phase, read_share, epoch, changed_at, changed_by) in rows {
        let Ok(phase) = phase.parse::<Phase>() else {
            tracing::warn!(table, phase, "unknown phase in the control state; row ignored");
            continue;
        };
        state.epoch = state.epoch.max(epoch);
        state.tables.push(TableControl {
            table,
            phase,
            read_share: u8::try_from(read_share).unwrap_or(0),
            epoch,
            changed_at,
            changed_by,
        });
    }
    // Every change is logged with its epoch, barriers opened and aborted included.
    let logged: i64 =
        sqlx::query_scalar("SELECT coalesce(max(epoch), 0)::int8 FROM switchyard.switchyard_control_log")
            .fetch_one(&mut *tx)
            .await
            .map_err(failed(store, "reading the control epoch"))?;
    state.epoch = state.epoch.max(logged);
    state.barrier = barrier::open_barrier_in(&mut tx, store).await?;
    tx.rollback()
        .await
        .map_err(failed(store, "reading the control state"))?;
    Ok(Some(state))
}

/// Whether a table may move from `from` to `to` at run time, and why not. Forward one phase at
/// a time (`dual_write` may go straight to `read_shift`, shadow reads being optional), back to
/// any earlier mirrored phase (rollback), never out of `done`. Moves that change what the
/// proxies' sessions relay (into or out of the mirrored phases, cutover, done) are refused
/// until proxies can switch relays at run time.
pub fn transition(from: Phase, to: Phase) -> Result<(), String> {
    use Phase::*;
    if from == to {
        return Ok(());
    }
    match (from, to) {
        (Done, _) => Err("a table in done stays there (OLD is no longer written)".to_owned()),
        // The capture triggers are installed first (`switch::apply`), then every proxy starts
        // mirroring the table.
        (Passthrough, DualWrite) => Ok(()),
        (DualWrite, ShadowRead | ReadShift) | (ShadowRead, ReadShift) => Ok(()),
        (ShadowRead | ReadShift, DualWrite) | (ReadShift, ShadowRead) => Ok(()),
        // Write authority moves for every table together, under the barrier (`switch`).
        (ReadShift, Cutover) | (Cutover, DualWrite | ShadowRead | ReadShift | Done) => Ok(()),
        (_, Cutover) => Err(format!(
            "cutover comes from read_shift (the table is in {from}); move it there first"
        )),
        (_, Done) => Err(format!("done comes from cutover (the table is in {from})")),
        (Cutover, _) => Err(format!(
            "from cutover a table goes back to a mirrored phase (a rollback) or on to done, not to {to}"
        )),
        (_, Passthrough) => Err(format!(
            "moving back from {from} to passthrough would stop mirroring while NEW holds copied rows; \
             set the phase in the configuration and restart the proxies instead"
        )),
        _ => Err(format!(
            "{from} cannot move to {to} directly; go one phase at a time"
        )),
    }
}

/// A change asked for: `table` to `target`, by whom (recorded), overriding refusals or not.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub table: &'a TableName,
    pub target: Target,
    pub by: &'a str,
    pub force: bool,
}

/// Makes `request` on the authoritative `store` in one transaction, after its guard rails:
/// raising the read share, and entering `cutover`, need every rail of [`guard::refusals`] (for
/// cutover, [`guard::cutover_refusals`]) to pass under `thresholds` (`facts` reads them while the control state is locked), unless
/// `force`, which is recorded with the refusals it overrode.
pub async fn change<F, Fut>(
    store: &Store,
    request: &Request<'_>,
    thresholds: &ControlSettings,
    facts: F,
) -> Result<Changed, ControlError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<guard::Facts, StoreError>>,
{
    let &Request {
        table,
        target,
        by,
        force,
    } = request;
    let name = table.to_string();
    let mut tx = begin(store, "changing the control state").await?;
    lock(&mut tx, store).await?;
    let row: Option<(String, i32)> =
        sqlx::query_as("SELECT phase, read_share FROM switchyard.switchyard_control WHERE table_name = $1")
            .bind(&name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed(store, "reading the control state"))?;
    let not_allowed = |reason: String| ControlError::NotAllowed {
        table: name.clone(),
        reason,
    };
    let Some((phase, share)) = row else {
        return Err(not_allowed(
            "not in the control state; add it to [[tables]] and run `switchyard prepare`".to_owned(),
        ));
    };
    let phase: Phase = phase.parse().map_err(not_allowed)?;
    let share = u8::try_from(share).unwrap_or(0);
    let (change, from, to, guarded) = match target {
        Target::Phase(to) => {
            transition(phase, to).map_err(not_allowed)?;
            (
                "phase",
                phase.to_string(),
                to.to_string(),
                to == Phase::Cutover && phase != to,
            )
        }
        Target::ReadShare(to) => {
            if to > 100 {
                return Err(not_allowed(format!(
                    "read share {to} is not a percentage (0 to 100)"
                )));
            }
            if to > 0 && phase != Phase::ReadShift {
                return Err(not_allowed(format!(
                    "reads move to NEW only in read_shift (the table is in {phase}); run `switchyard phase --to read_shift` first"
                )));
            }
            ("read_share", share.to_string(), to.to_string(), to > share)
        }
    };
    let mut overridden = Vec::new();
    if guarded {
        let facts = facts().await?;
        let reasons = match target {
            Target::Phase(Phase::Cutover) => guard::cutover_refusals(&facts, thresholds),
            _ => guard::refusals(&facts, thresholds),
        };
        if !reasons.is_empty() && !force {
            return Err(ControlError::Refused { table: name, reasons });
        }
        overridden = reasons;
    }
    if from == to {
        let epoch = read_epoch(&mut tx, store).await?;
        return Ok(Changed {
            table: name,
            change,
            from,
            to,
            epoch,
            overridden,
        });
    }
    let epoch = next_epoch(&mut tx, store).await?;
    let (sql, value) = match target {
        Target::Phase(p) => (SET_PHASE, p.as_str().to_owned()),
        Target::ReadShare(n) => (
            "UPDATE switchyard.switchyard_control SET read_share = $2::int, epoch = $3, changed_at = now(), \
             changed_by = $4 WHERE table_name = $1",
            n.to_string(),
        ),
    };
    sqlx::query(sql)
        .bind(&name)
        .bind(&value)
        .bind(epoch)
        .bind(by)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "changing the control state"))?;
    log(
        &mut tx,
        store,
        epoch,
        &name,
        change,
        Some(&from),
        &to,
        &overridden,
        by,
    )
    .await?;
    notify(&mut tx, store).await?;
    tx.commit()
        .await
        .map_err(failed(store, "committing the control change"))?;
    Ok(Changed {
        table: name,
        change,
        from,
        to,
        epoch,
        overridden,
    })
}

/// The control state of a migration wherever it is: read on both stores, the one with the
/// larger epoch wins (at cutover the authoritative store changes, and a copy left on the other
/// is older). `None` when neither store has one.
pub async fn locate(old: &Store, new: &Store) -> Result<Option<(Role, ControlState)>, StoreError> {
    let on_old = read(old).await?;
    let on_new = read(new).await?;
    Ok(match (on_old, on_new) {
        (Some(o), Some(n)) if n.epoch > o.epoch => Some((Role::New, n)),
        (Some(o), _) => Some((Role::Old, o)),
        (None, Some(n)) => Some((Role::New, n)),
        (None, None) => None,
    })
}

/// The store `state` makes authoritative: NEW once a table is in `cutover` or `done` (the
/// configured tables move together), OLD before.
pub fn authoritative(state: &ControlState) -> Role {
    let moved = state
        .tables
        .iter()
        .any(|t| matches!(t.phase, Phase::Cutover | Phase::Done));
    if moved {
        Role::New
    } else {
        Role::Old
    }
}

/// The configured tables of `table`'s group (`schema.table` names), in the file's order; every
/// configured table when the file names no groups. Empty when `table` is not configured.
pub fn group_of(config: &Config, table: &str) -> Vec<String> {
    let Some(group) = config
        .tables
        .iter()
        .find(|t| t.name.to_string() == table)
        .map(|t| t.group())
    else {
        return Vec::new();
    };
    config
        .tables
        .iter()
        .filter(|t| t.group() == group)
        .map(|t| t.name.to_string())
        .collect()
}

/// The store that takes `table`'s writes in `state` (OLD for a table the state does not have).
pub fn authority_of(state: &ControlState, table: &str) -> Role {
    state
        .table(table)
        .map_or(Role::Old, |t| Role::taking_writes_in(t.phase))
}

/// The configured tables that are not `done` in `state`, each with its phase, as reasons to
/// refuse what needs the migration finished (`switchyard cleanup`).
pub fn not_done(config: &Config, state: &ControlState) -> Vec<String> {
    config
        .tables
        .iter()
        .filter_map(|t| {
            let name = t.name.to_string();
            match state.table(&name) {
                Some(c) if c.phase == Phase::Done => None,
                Some(c) => Some(format!("table {name} is in {}, not done", c.phase)),
                None => Some(format!(
                    "table {name} is not in the control state (run `switchyard prepare`)"
                )),
            }
        })
        .collect()
}

/// `config` with each table's phase and read share taken from `state` where it has the table:
/// the control state wins over the file, which only seeds it. Returns the tables whose file
/// values differed, as `(table, file's phase, control's phase)`, for the caller to report.
pub fn apply_to(config: &mut Config, state: &ControlState) -> Vec<(String, Phase, Phase)> {
    let mut differed = Vec::new();
    for t in &mut config.tables {
        let name = t.name.to_string();
        if let Some(c) = state.table(&name) {
            if c.phase != t.phase || c.read_share != t.read_share {
                differed.push((name, t.phase, c.phase));
            }
            t.phase = c.phase;
            t.read_share = c.read_share;
        }
    }
    differed
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

async fn begin(store: &Store, action: &'static str) -> Result<Tx<'static>, StoreError> {
    let Store::Postgres(pg) = store;
    pg.pool().begin().await.map_err(failed(store, action))
}

/// Serializes changes (readers are not blocked).
async fn lock(tx: &mut Tx<'_>, store: &Store) -> Result<(), StoreError> {
    sqlx::query("LOCK TABLE switchyard.switchyard_control IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut **tx)
        .await
        .map_err(failed(store, "locking the control state"))?;
    Ok(())
}

async fn read_epoch(tx: &mut Tx<'_>, store: &Store) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT coalesce(max(epoch), 0)::int8 FROM switchyard.switchyard_control")
        .fetch_one(&mut **tx)
        .await
        .map_err(failed(store, "reading the control epoch"))
}

async fn next_epoch(tx: &mut Tx<'_>, store: &Store) -> Result<i64, StoreError> {
    let log: i64 =
        sqlx::query_scalar("SELECT coalesce(max(epoch), 0)::int8 FROM switchyard.switchyard_control_log")
            .fetch_one(&mut **tx)
            .await
            .map_err(failed(store, "reading the control epoch"))?;
    Ok(read_epoch(tx, store).await?.max(log) + 1)
}

#[allow(clippy::too_many_arguments)]
async fn log(
    tx: &mut Tx<'_>,
    store: &Store,
    epoch: i64,
    table: &str,
    change: &str,
    from: Option<&str>,
    to: &str,
    overridden: &[String],
    by: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO switchyard.switchyard_control_log \
         (epoch, table_name, change, from_value, to_value, forced, overridden, changed_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(epoch)
    .bind(table)
    .bind(change)
    .bind(from)
    .bind(to)
    .bind(!overridden.is_empty())
    .bind(overridden)
    .bind(by)
    .execute(&mut **tx)
    .await
    .map_err(failed(store, "logging the control change"))?;
    Ok(())
}

async fn notify(tx: &mut Tx<'_>, store: &Store) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, (SELECT max(epoch) FROM switchyard.switchyard_control)::text)")
        .bind(CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(failed(store, "notifying the proxies"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_one_phase_at_a_time_back_to_any_mirrored_phase() {
        use Phase::*;
        for (from, to) in [
            (DualWrite, ShadowRead),
            (DualWrite, ReadShift),
            (ShadowRead, ReadShift),
            (ReadShift, ShadowRead),
            (ReadShift, DualWrite),
            (ShadowRead, DualWrite),
            (ReadShift, ReadShift),
            (ReadShift, Cutover),
            (Cutover, ReadShift),
            (Cutover, DualWrite),
            (Cutover, Done),
            (Passthrough, DualWrite),
        ] {
            assert_eq!(transition(from, to), Ok(()), "{from} -> {to}");
        }
        for (from, to, why) in [
            (Passthrough, ReadShift, "one phase at a time"),
            (DualWrite, Passthrough, "restart the proxies"),
            (DualWrite, Cutover, "comes from read_shift"),
            (ReadShift, Done, "comes from cutover"),
            (Done, ReadShift, "stays there"),
        ] {
            let refused = transition(from, to).unwrap_err();
            assert!(refused.contains(why), "{from} -> {to}: {refused}");
        }
    }
}
