//! The cutover barrier (`docs/cutover.md`, "The barrier"): moving write authority from one
//! store to the other while the application runs through several proxies.
//!
//! Two proxies must never write one key with different authorities at once. So the change is
//! a barrier kept in the control state: `switchyard phase --to cutover` (or back) opens it with
//! a new epoch; every proxy, seeing it, lets the write transactions in flight finish and holds
//! new ones (they wait, they do not fail), then confirms by writing the barrier's epoch in its
//! row of [`PROXIES_TABLE`]. Once every live proxy confirmed (a proxy whose row was not renewed
//! within the liveness window is gone: its connections died with it), the command moves the
//! sequences, moves the capture triggers to the new authority, and commits the phases of every
//! configured table together with the barrier's end; the proxies switch their sessions to the
//! new authority and let the held transactions go. A barrier not confirmed in time is aborted:
//! nothing moved, writes resume where they were.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;
use switchyard_config::Phase;
use switchyard_store::{Role, Store, StoreError};

use crate::{begin, failed, lock, log, next_epoch, notify, CHANNEL};

/// The open barrier, at most one row.
pub const BARRIER_TABLE: &str = "switchyard_barrier";
/// One row per proxy: its heartbeat, the epoch and authority it runs, the barrier it confirmed.
pub const PROXIES_TABLE: &str = "switchyard_proxies";

/// The tables of this module, created with the control state's.
pub(crate) const DDL: &str = "CREATE TABLE IF NOT EXISTS switchyard.switchyard_barrier ( \
       id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1), \
       epoch bigint NOT NULL, \
       authority text NOT NULL, \
       to_phase text NOT NULL, \
       started_at timestamptz NOT NULL DEFAULT clock_timestamp(), \
       started_by text NOT NULL); \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_proxies ( \
       proxy_id text PRIMARY KEY, \
       epoch bigint NOT NULL, \
       authority text NOT NULL, \
       paused_for bigint, \
       seen_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
     ALTER TABLE switchyard.switchyard_barrier ADD COLUMN IF NOT EXISTS holding boolean NOT NULL DEFAULT true; \
     ALTER TABLE switchyard.switchyard_proxies ADD COLUMN IF NOT EXISTS built_for bigint; \
     ALTER TABLE switchyard.switchyard_barrier ADD COLUMN IF NOT EXISTS tables text[]; \
     ALTER TABLE switchyard.switchyard_proxies ADD COLUMN IF NOT EXISTS plain_sessions bigint NOT NULL DEFAULT 0";

/// An open barrier: writes are moving to `authority`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Barrier {
    pub epoch: i64,
    /// The store that will take the writes.
    #[serde(serialize_with = "role_name")]
    pub authority: Role,
    /// The phase the tables it moves move to.
    pub to_phase: Phase,
    /// The tables it moves (`schema.table`): one table group's; `None`, every configured table.
    pub tables: Option<Vec<String>>,
    /// Whether writes are held: `false` while the barrier is only announced (the proxies build
    /// the engine for the new roles meanwhile, and writes go on).
    pub holding: bool,
}

impl Barrier {
    /// Whether the barrier moves `table` (`schema.table`).
    pub fn moves(&self, table: &str) -> bool {
        self.tables.as_ref().is_none_or(|t| t.iter().any(|t| t == table))
    }
}

fn role_name<S: serde::Serializer>(r: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

fn role_of(s: &str) -> Role {
    if s == "new" {
        Role::New
    } else {
        Role::Old
    }
}

/// The open barrier, if any, read in `tx` (the control state's snapshot).
pub(crate) async fn open_barrier_in(
    tx: &mut crate::Tx<'_>,
    store: &Store,
) -> Result<Option<Barrier>, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('switchyard.switchyard_barrier') IS NOT NULL")
        .fetch_one(&mut **tx)
        .await
        .map_err(failed(store, "reading the barrier"))?;
    if !exists {
        return Ok(None);
    }
    let row =
        sqlx::query("SELECT epoch, authority, to_phase, holding, tables FROM switchyard.switchyard_barrier")
            .fetch_optional(&mut **tx)
            .await
            .map_err(failed(store, "reading the barrier"))?;
    Ok(row.and_then(|r| {
        Some(Barrier {
            epoch: r.get(0),
            authority: role_of(r.get::<&str, _>(1)),
            to_phase: r.get::<&str, _>(2).parse().ok()?,
            holding: r.get(3),
            tables: r.get(4),
        })
    }))
}

/// What a proxy says of itself at each poll.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub proxy_id: &'a str,
    pub epoch: i64,
    pub authority: Role,
    /// The barrier this proxy holds its writes for (in flight ones finished).
    pub paused_for: Option<i64>,
    /// The announced barrier this proxy has built the new roles' engine for.
    pub built_for: Option<i64>,
    /// Its sessions of the migrated database relaying plainly (started while no table was
    /// mirrored).
    pub plain_sessions: i64,
}

/// Renews `beat`'s row on `store`. A proxy newer than the control tables (a column this version
/// added is missing: the state was seeded by an older version and no command of this one has run
/// since) adds what is missing and tries again, rather than staying out of the barrier's count.
pub async fn heartbeat(store: &Store, beat: &Heartbeat<'_>) -> Result<(), StoreError> {
    match renew(store, beat).await {
        Err(StoreError::Query { source, .. })
            if source
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|c| c == "42703") =>
        {
            let Store::Postgres(pg) = store;
            tracing::info!("the control tables lack a column this version uses; adding it");
            sqlx::raw_sql(DDL)
                .execute(pg.pool())
                .await
                .map_err(failed(store, "adding the barrier tables' new columns"))?;
            renew(store, beat).await
        }
        other => other,
    }
}

async fn renew(store: &Store, beat: &Heartbeat<'_>) -> Result<(), StoreError> {
    let Store::Postgres(pg) = store;
    sqlx::query(
        "INSERT INTO switchyard.switchyard_proxies (proxy_id, epoch, authority, paused_for, built_for, plain_sessions, seen_at) \
         VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp()) ON CONFLICT (proxy_id) DO UPDATE SET \
         epoch = EXCLUDED.epoch, authority = EXCLUDED.authority, paused_for = EXCLUDED.paused_for, \
         built_for = EXCLUDED.built_for, plain_sessions = EXCLUDED.plain_sessions, seen_at = EXCLUDED.seen_at",
    )
    .bind(beat.proxy_id)
    .bind(beat.epoch)
    .bind(beat.authority.as_str())
    .bind(beat.paused_for)
    .bind(beat.built_for)
    .bind(beat.plain_sessions)
    .execute(pg.pool())
    .await
    .map_err(failed(store, "renewing the proxy's heartbeat"))?;
    Ok(())
}

/// Removes a stopping proxy's row (it no longer counts for a barrier).
pub async fn leave(store: &Store, proxy_id: &str) -> Result<(), StoreError> {
    let Store::Postgres(pg) = store;
    sqlx::query("DELETE FROM switchyard.switchyard_proxies WHERE proxy_id = $1")
        .bind(proxy_id)
        .execute(pg.pool())
        .await
        .map_err(failed(store, "removing the proxy's heartbeat"))?;
    Ok(())
}

/// Opens a barrier moving writes to `authority` and every table to `to_phase`, holding writes
/// at once; fails when one is open already. Returns its epoch.
pub async fn open(store: &Store, authority: Role, to_phase: Phase, by: &str) -> Result<i64, StoreError> {
    open_with(store, authority, to_phase, None, by, true).await
}

/// Announces a barrier: like [`open`], but writes go on until [`hold`]; meanwhile every proxy
/// builds the engine for the new roles and says so in its heartbeat ([`unbuilt`]).
pub async fn announce(store: &Store, authority: Role, to_phase: Phase, by: &str) -> Result<i64, StoreError> {
    open_with(store, authority, to_phase, None, by, false).await
}

/// [`announce`] for the tables of one table group only (`None`: every configured table).
pub async fn announce_for(
    store: &Store,
    authority: Role,
    to_phase: Phase,
    tables: Option<&[String]>,
    by: &str,
) -> Result<i64, StoreError> {
    open_with(store, authority, to_phase, tables, by, false).await
}

/// Makes the announced barrier `announced` hold writes, under a new epoch (the one the
/// proxies confirm). Fails when it is no longer there (aborted).
pub async fn hold(store: &Store, announced: i64, by: &str) -> Result<i64, StoreError> {
    let mut tx = begin(store, "holding the writes").await?;
    lock(&mut tx, store).await?;
    let epoch = next_epoch(&mut tx, store).await?;
    let held =
        sqlx::query("UPDATE switchyard.switchyard_barrier SET epoch = $1, holding = true WHERE epoch = $2")
            .bind(epoch)
            .bind(announced)
            .execute(&mut *tx)
            .await
            .map_err(failed(store, "holding the writes"))?
            .rows_affected();
    if held == 0 {
        return Err(StoreError::Query {
            role: store.role().as_str(),
            action: "holding the writes".to_owned(),
            source: sqlx::Error::Protocol(format!(
                "barrier {announced} is no longer announced (aborted by someone else?)"
            )),
        });
    }
    log(
        &mut tx,
        store,
        epoch,
        "*",
        "barrier holds",
        None,
        "writes wait",
        &[],
        by,
    )
    .await?;
    notify_barrier(&mut tx, store, epoch).await?;
    tx.commit().await.map_err(failed(store, "holding the writes"))?;
    Ok(epoch)
}

async fn open_with(
    store: &Store,
    authority: Role,
    to_phase: Phase,
    tables: Option<&[String]>,
    by: &str,
    holding: bool,
) -> Result<i64, StoreError> {
    let mut tx = begin(store, "opening the barrier").await?;
    lock(&mut tx, store).await?;
    let epoch = next_epoch(&mut tx, store).await?;
    sqlx::query(
        "INSERT INTO switchyard.switchyard_barrier (epoch, authority, to_phase, started_by, holding, tables) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(epoch)
    .bind(authority.as_str())
    .bind(to_phase.as_str())
    .bind(by)
    .bind(holding)
    .bind(tables)
    .execute(&mut *tx)
    .await
    .map_err(failed(store, "opening the barrier (is another one open?)"))?;
    log(
        &mut tx,
        store,
        epoch,
        "*",
        "barrier",
        None,
        &format!("writes to {}", authority.name()),
        &[],
        by,
    )
    .await?;
    notify_barrier(&mut tx, store, epoch).await?;
    tx.commit().await.map_err(failed(store, "opening the barrier"))?;
    Ok(epoch)
}

async fn notify_barrier(tx: &mut crate::Tx<'_>, store: &Store, epoch: i64) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(epoch.to_string())
        .execute(&mut **tx)
        .await
        .map_err(failed(store, "notifying the proxies"))?;
    Ok(())
}

/// Aborts the barrier of `epoch`: nothing moved, writes resume where they were.
pub async fn abort(store: &Store, epoch: i64, why: &str, by: &str) -> Result<(), StoreError> {
    let mut tx = begin(store, "aborting the barrier").await?;
    lock(&mut tx, store).await?;
    sqlx::query("DELETE FROM switchyard.switchyard_barrier WHERE epoch = $1")
        .bind(epoch)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "aborting the barrier"))?;
    let at = next_epoch(&mut tx, store).await?;
    log(&mut tx, store, at, "*", "barrier aborted", None, why, &[], by).await?;
    notify_barrier(&mut tx, store, at).await?;
    tx.commit().await.map_err(failed(store, "aborting the barrier"))?;
    Ok(())
}

/// The live proxies (a row renewed within `live`) that have not confirmed barrier `epoch`, by
/// id; and how many live proxies there are.
pub async fn unconfirmed(
    store: &Store,
    epoch: i64,
    live: Duration,
) -> Result<(Vec<String>, usize), StoreError> {
    waiting(store, "paused_for", epoch, live).await
}

/// The live proxies that have not built the engine for announced barrier `epoch` yet; and how
/// many live proxies there are.
pub async fn unbuilt(store: &Store, epoch: i64, live: Duration) -> Result<(Vec<String>, usize), StoreError> {
    waiting(store, "built_for", epoch, live).await
}

/// How recent a proxy's heartbeat must be for it to count as running: three poll intervals and
/// a second.
pub fn live_within(control: &switchyard_config::ControlSettings) -> Duration {
    control.poll_interval * 3 + Duration::from_secs(1)
}

/// The live proxies (heartbeat younger than `live`) with sessions relaying plainly, and how
/// many each has. Empty before any proxy ran.
pub async fn plain_sessions(store: &Store, live: Duration) -> Result<Vec<(String, i64)>, StoreError> {
    if !store.has_relation("switchyard.switchyard_proxies").await? {
        return Ok(Vec::new());
    }
    let Store::Postgres(pg) = store;
    let rows = sqlx::query(
        "SELECT proxy_id, plain_sessions FROM switchyard.switchyard_proxies \
         WHERE seen_at > clock_timestamp() - make_interval(secs => $1) AND plain_sessions > 0 \
         ORDER BY proxy_id",
    )
    .bind(live.as_secs_f64())
    .fetch_all(pg.pool())
    .await
    .map_err(failed(store, "reading the proxies' plain sessions"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn waiting(
    store: &Store,
    column: &'static str,
    epoch: i64,
    live: Duration,
) -> Result<(Vec<String>, usize), StoreError> {
    let Store::Postgres(pg) = store;
    let sql = format!(
        "SELECT proxy_id, {column} IS NOT DISTINCT FROM $1 FROM switchyard.switchyard_proxies \
         WHERE seen_at > clock_timestamp() - make_interval(secs => $2)"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(epoch)
        .bind(live.as_secs_f64())
        .fetch_all(pg.pool())
        .await
        .map_err(failed(store, "reading the proxies' confirmations"))?;
    let live = rows.len();
    let waiting = rows
        .iter()
        .filter(|r| !r.get::<bool, _>(1))
        .map(|r| r.get::<String, _>(0))
        .collect();
    Ok((waiting, live))
}

/// Ends barrier `epoch` by moving every table of `tables` to `to_phase` (read share kept), in
/// one transaction with the barrier's removal. Returns the new epoch.
pub async fn complete(
    store: &Store,
    epoch: i64,
    tables: &[String],
    to_phase: Phase,
    overridden: &[String],
    by: &str,
) -> Result<i64, StoreError> {
    let mut tx = begin(store, "completing the barrier").await?;
    lock(&mut tx, store).await?;
    let gone = sqlx::query("DELETE FROM switchyard.switchyard_barrier WHERE epoch = $1")
        .bind(epoch)
        .execute(&mut *tx)
        .await
        .map_err(failed(store, "completing the barrier"))?
        .rows_affected();
    if gone == 0 {
        return Err(StoreError::Query {
            role: store.role().as_str(),
            action: "completing the barrier".to_owned(),
            source: sqlx::Error::Protocol(format!(
                "barrier {epoch} is no longer open (aborted by someone else?)"
            )),
        });
    }
    let mut last = epoch;
    for t in tables {
        let at = next_epoch(&mut tx, store).await?;
        let from: Option<String> =
            sqlx::query_scalar("SELECT phase FROM switchyard.switchyard_control WHERE table_name = $1")
                .bind(t)
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed(store, "reading the control state"))?;
        sqlx::query(crate::SET_PHASE)
            .bind(t)
            .bind(to_phase.as_str())
            .bind(at)
            .bind(by)
            .execute(&mut *tx)
            .await
            .map_err(failed(store, "changing the control state"))?;
        log(
            &mut tx,
            store,
            at,
            t,
            "phase",
            from.as_deref(),
            to_phase.as_str(),
            overridden,
            by,
        )
        .await?;
        last = at;
    }
    notify(&mut tx, store).await?;
    tx.commit()
        .await
        .map_err(failed(store, "completing the barrier"))?;
    Ok(last)
}
