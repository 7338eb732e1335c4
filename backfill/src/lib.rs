//! The fenced backfill: copies the rows OLD had before dual writes began into NEW, chunk by
//! chunk, in parallel and resumably, without ever overwriting a row a mirrored write touched or
//! bringing back a deleted one. See `docs/backfill.md`.
//!
//! - [`run`] backfills the selected tables (`switchyard backfill`); [`cleanup_tombstones`]
//!   removes the tombstones of tables whose backfill finished; [`status`] reads the progress
//!   (`switchyard status`).
//! - Fencing: every key written by a mirrored write or a repair has a record in its table's
//!   `switchyard.switchyard_keys_*` on NEW (version >= 1, or a tombstone). A chunk claims the keys
//!   that have none (`INSERT ... ON CONFLICT DO NOTHING RETURNING`, version 0) and inserts only
//!   the rows of the keys it claimed, in the same NEW transaction ([`target::TargetTable::merge_sql`]).
//! - Tables without a key ([`keyless`]): the rows committed before the table's capture began
//!   (a snapshot `switchyard prepare` recorded on OLD), chunked by block ranges; mirrored rows
//!   are exactly the others, so no fence is needed.
//! - Progress lives on NEW ([`switchyard_store::backfill_state`]): chunks are planned lazily from a
//!   cursor and leased with `FOR UPDATE SKIP LOCKED`, and a chunk's rows and its `done` mark
//!   commit together ([`chunk`]).

pub mod chunk;
pub mod endpoint;
mod error;
pub mod keyless;
pub mod progress;
pub mod stop;
pub mod target;
pub mod throttle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use switchyard_config::{Config, Phase, TableName};
use switchyard_store::backfill_state::{
    backfill_progress, ensure_backfill_tables, ensure_fence_trigger, BackfillProgress,
};
use switchyard_store::StoreError;

use crate::chunk::{Lease, Plan, Worker};
use crate::endpoint::{retryable, Endpoint};
use crate::progress::{RunStatus, TableCounters, TableSummary};
use crate::stop::StopLevel;
use crate::target::{select_tables, TargetTable};
use crate::throttle::Throttle;

pub use error::BackfillError;
pub use progress::{ProgressMode, Summary};
pub use stop::{stop_channel, Stop, StopTrigger};

/// The most workers one process may run.
pub const MAX_WORKERS: usize = 64;
/// Tries of one step (a chunk, a plan) after retryable failures before the run fails.
const MAX_ATTEMPTS: u32 = 8;
/// How often a worker with nothing to lease looks again while other workers (or processes)
/// still hold chunks of the table (it takes a chunk over if its worker died).
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Tombstones removed per statement.
const CLEANUP_BATCH: i64 = 10_000;

/// What `switchyard backfill` was asked to do.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// `--table`: only these (each must be in dual_write or later); empty = every table in
    /// dual_write or later.
    pub tables: Vec<TableName>,
    /// `--workers`: chunks copied at once by this process (each worker has one connection to
    /// each store).
    pub workers: usize,
    /// `--chunk-rows`: rows per chunk.
    pub chunk_rows: u64,
    /// `--max-rows-per-sec`: the throttle, shared by this process's workers.
    pub max_rows_per_sec: Option<u64>,
    /// How progress is shown.
    pub progress: ProgressMode,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            tables: Vec::new(),
            workers: 4,
            chunk_rows: 10_000,
            max_rows_per_sec: None,
            progress: ProgressMode::Quiet,
        }
    }
}

impl BackfillOptions {
    fn validate(&self) -> Result<(), BackfillError> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(BackfillError::BadOption(format!(
                "--workers must be between 1 and {MAX_WORKERS}, not {}",
                self.workers
            )));
        }
        if self.chunk_rows == 0 || self.chunk_rows > 10_000_000 {
            return Err(BackfillError::BadOption(format!(
                "--chunk-rows must be between 1 and 10000000, not {}",
                self.chunk_rows
            )));
        }
        Ok(())
    }
}

/// The two stores' endpoints and small pools for the checks.
struct Stores {
    old_end: Endpoint,
    new_end: Endpoint,
    old: PgPool,
    new: PgPool,
}

impl Stores {
    async fn connect(config: &Config, need_old: bool) -> Result<Stores, BackfillError> {
        let timeout = config.proxy.connect_timeout;
        let old_end = Endpoint::new("old", &config.old.url, timeout);
        let new_end = Endpoint::new("new", &config.new.url, timeout);
        let new = new_end.pool(2).await?;
        let old = if need_old {
            old_end.pool(2).await?
        } else {
            PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(old_end.options().clone())
        };
        Ok(Stores {
            old_end,
            new_end,
            old,
            new,
        })
    }

    async fn check(&self, config: &Config, names: &[TableName]) -> Result<Vec<TargetTable>, BackfillError> {
        let selected = select_tables(config, names)?;
        let mut targets = Vec::with_capacity(selected.len());
        for (i, settings) in selected.iter().enumerate() {
            targets.push(TargetTable::check(&self.old, &self.new, settings, i).await?);
        }
        Ok(targets)
    }

    async fn close(self) {
        self.old.close().await;
        self.new.close().await;
    }
}

fn worker_id(n: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}/{n}", std::process::id())
}

/// Backfills the selected tables until every one is complete or `stop` says otherwise.
///
/// Checks every table first (phase, presence and compatibility on both stores, the keys table on
/// NEW, or for a table without a key its capture boundary on OLD) and fails before copying anything if one does not pass. A graceful stop lets
/// the chunks in flight commit; an immediate one rolls them back. Either way the run returns a
/// summary with [`RunStatus::Interrupted`] and a later run resumes.
pub async fn run(config: &Config, options: &BackfillOptions, stop: Stop) -> Result<Summary, BackfillError> {
    options.validate()?;
    let started = Instant::now();
    let stores = Stores::connect(config, true).await?;
    let targets = stores.check(config, &options.tables).await?;
    ensure_backfill_tables(&stores.new).await?;
    for t in targets.iter().filter(|t| t.boundary.is_none()) {
        ensure_fence_trigger(&stores.new, t.qualified(), t.keys_table(), &t.key).await?;
    }

    let mut setup = Worker::new(worker_id(0), stores.old_end.clone(), stores.new_end.clone());
    let mut tables = Vec::with_capacity(targets.len());
    for t in targets {
        let begun = setup.start_table(&t, options.chunk_rows).await?;
        let counters = Arc::new(TableCounters::new(t.name.to_string()));
        counters.rows_before.store(begun.rows_before, Ordering::Relaxed);
        counters
            .rows_estimated
            .store(begun.rows_estimated, Ordering::Relaxed);
        counters.finished.store(begun.done, Ordering::Relaxed);
        if begun.done {
            tracing::info!(table = %t.name, "backfill already complete");
        }
        tables.push((t, counters));
    }
    drop(setup);

    // Workers stop on the caller's signal, and gracefully when one of them fails.
    let (trigger, inner) = stop_channel();
    let forward = {
        let trigger = trigger.clone();
        let mut outer = stop.clone();
        tokio::spawn(async move {
            outer.reached(StopLevel::Graceful).await;
            trigger.graceful();
            outer.reached(StopLevel::Immediate).await;
            trigger.immediate();
        })
    };
    let counters: Arc<Vec<Arc<TableCounters>>> = Arc::new(tables.iter().map(|(_, c)| c.clone()).collect());
    let reported = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let reporter = tokio::spawn(progress::report(
        options.progress.clone(),
        counters.clone(),
        reported.clone(),
        wake.clone(),
    ));
    let crew = Arc::new(Crew {
        tables,
        throttle: Throttle::new(options.max_rows_per_sec),
        chunk_rows: options.chunk_rows,
        plan_ahead: options.workers as u64,
        trigger: trigger.clone(),
        moved: tokio::sync::Notify::new(),
    });
    let mut handles = Vec::with_capacity(options.workers);
    for n in 0..options.workers {
        let worker = Worker::new(worker_id(n), stores.old_end.clone(), stores.new_end.clone());
        handles.push(tokio::spawn(work(worker, crew.clone(), inner.clone())));
    }
    let mut failure = None;
    for h in handles {
        let outcome = match h.await {
            Ok(outcome) => outcome,
            Err(join) => Err(BackfillError::BadOption(format!(
                "a backfill worker panicked: {join}"
            ))),
        };
        if let Err(e) = outcome {
            failure.get_or_insert(e);
        }
    }
    forward.abort();
    reported.store(true, Ordering::Relaxed);
    wake.notify_one();
    let _ = reporter.await;
    if let Some(e) = failure {
        stores.close().await;
        return Err(e);
    }

    let recorded = backfill_progress(&stores.new).await?;
    stores.close().await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut all_done = true;
    let mut rows = 0;
    let summaries = crew
        .tables
        .iter()
        .map(|(t, c)| {
            let total = recorded.iter().find(|p| p.table == t.name.to_string()).cloned();
            let status = total.as_ref().map_or("running".to_owned(), |p| p.status.clone());
            all_done &= status == "done";
            let this_run = c.run_counts();
            rows += this_run.rows_read;
            TableSummary {
                table: t.name.to_string(),
                status,
                this_run,
                total,
            }
        })
        .collect();
    Ok(Summary {
        status: if all_done {
            RunStatus::Done
        } else {
            RunStatus::Interrupted
        },
        elapsed_secs: elapsed,
        workers: options.workers,
        chunk_rows: options.chunk_rows,
        max_rows_per_sec: options.max_rows_per_sec,
        rows_per_sec: if elapsed > 0.0 {
            (rows as f64 / elapsed).round()
        } else {
            0.0
        },
        tables: summaries,
    })
}

/// What the workers of one run share.
struct Crew {
    tables: Vec<(TargetTable, Arc<TableCounters>)>,
    throttle: Throttle,
    chunk_rows: u64,
    /// Chunks planned at a time (one per worker).
    plan_ahead: u64,
    /// Stops the others when one worker fails.
    trigger: StopTrigger,
    /// Wakes idle workers when a chunk is done or a table finishes.
    moved: tokio::sync::Notify,
}

/// One step of a worker.
enum Step {
    Copied,
    Planned,
    TableDone,
    Wait,
}

/// A worker's loop: the tables in order; for each, lease and copy chunks, plan more when none is
/// pending, and move on once the table is complete.
async fn work(mut worker: Worker, crew: Arc<Crew>, mut stop: Stop) -> Result<(), BackfillError> {
    let Crew {
        tables,
        throttle,
        chunk_rows,
        plan_ahead,
        trigger,
        moved,
    } = &*crew;
    let (chunk_rows, plan_ahead) = (*chunk_rows, *plan_ahead);
    for (t, counters) in tables.iter() {
        let mut attempts = 0;
        while !counters.finished.load(Ordering::Relaxed) {
            if stop.stopping() {
                return Ok(());
            }
            let at = throttle.reserve(chunk_rows).await;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.reached(StopLevel::Graceful) => return Ok(()),
            }
            let step = tokio::select! {
                step = one_step(&mut worker, t, counters, throttle, chunk_rows, plan_ahead) => step,
                _ = stop.reached(StopLevel::Immediate) => {
                    // The chunk in flight is rolled back with its connection.
                    worker.reset();
                    return Ok(());
                }
            };
            match step {
                Ok(Step::Copied | Step::Planned) => {
                    attempts = 0;
                    moved.notify_waiters();
                }
                Ok(Step::TableDone) => {
                    counters.finished.store(true, Ordering::Relaxed);
                    moved.notify_waiters();
                }
                Ok(Step::Wait) => {
                    // Another worker holds the last chunks: look again when one of ours finishes
                    // a chunk, or after a while (another process's, or a dead worker's).
                    tokio::select! {
                        _ = stop.sleep(IDLE_POLL) => {}
                        _ = moved.notified() => {}
                    }
                }
                Err(e) if retryable(&e) && attempts + 1 < MAX_ATTEMPTS => {
                    attempts += 1;
                    worker.reset();
                    let backoff = Duration::from_millis(100 << attempts.min(6));
                    tracing::warn!(table = %t.name, attempt = attempts, error = %e, "chunk failed; retrying");
                    stop.sleep(backoff).await;
                }
                Err(e) => {
                    tracing::error!(table = %t.name, error = %e, "backfill worker failed");
                    trigger.graceful();
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

async fn one_step(
    worker: &mut Worker,
    t: &TargetTable,
    counters: &TableCounters,
    throttle: &Throttle,
    chunk_rows: u64,
    plan_ahead: u64,
) -> Result<Step, BackfillError> {
    counters.chunk_started();
    let leased = worker.copy(t, chunk_rows).await;
    let done = match leased {
        Ok(Lease::Copied(done)) => done,
        Ok(Lease::NoneFree) => {
            throttle.settle(chunk_rows, 0).await;
            return match worker.plan(t, plan_ahead).await? {
                Plan::Planned => Ok(Step::Planned),
                Plan::Complete if worker.finish(t).await? => Ok(Step::TableDone),
                Plan::Complete => Ok(Step::Wait),
            };
        }
        Err(e) => {
            throttle.settle(chunk_rows, 0).await;
            return Err(e);
        }
    };
    throttle.settle(chunk_rows, done.read).await;
    counters.add(
        done.read,
        done.copied,
        done.read.saturating_sub(done.claimed),
        done.claimed.saturating_sub(done.copied),
    );
    tracing::debug!(table = %t.name, chunk = done.chunk_id, rows = done.read, copied = done.copied, "chunk copied");
    Ok(Step::Copied)
}

/// What `--cleanup-tombstones` did for one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// `schema.table`.
    pub table: String,
    /// Tombstones removed.
    pub removed: u64,
}

/// Removes the tombstones (`sy_deleted` records) of the selected tables whose backfill is
/// complete. Safe then: tombstones only stop the backfill from bringing deleted rows back, and
/// no chunk of a complete table is ever copied again. Dual writes keep writing tombstones for
/// later deletes; run it again to remove those. Fails for a table whose backfill is not done.
pub async fn cleanup_tombstones(
    config: &Config,
    names: &[TableName],
) -> Result<Vec<CleanupReport>, BackfillError> {
    let stores = Stores::connect(config, true).await?;
    let mut targets = stores.check(config, names).await?;
    // Tables without a key have no keys table, hence no tombstones.
    targets.retain(|t| t.boundary.is_none());
    ensure_backfill_tables(&stores.new).await?;
    let recorded = backfill_progress(&stores.new).await?;
    for t in &targets {
        let state = recorded.iter().find(|p| p.table == t.name.to_string());
        match state {
            Some(p) if p.status == "done" => {}
            Some(p) => {
                return Err(BackfillError::NotFinished {
                    table: t.name.clone(),
                    state: format!(
                        "{} of {} chunks planned so far copied",
                        p.chunks_done, p.chunks_planned
                    ),
                })
            }
            None => {
                return Err(BackfillError::NotFinished {
                    table: t.name.clone(),
                    state: "never started".to_owned(),
                })
            }
        }
    }
    let failed = |action: &str| {
        let action = action.to_owned();
        move |source| StoreError::Query {
            role: "new",
            action,
            source,
        }
    };
    let mut reports = Vec::with_capacity(targets.len());
    for t in &targets {
        let mut removed = 0;
        loop {
            let n = sqlx::query(sqlx::AssertSqlSafe(t.cleanup_sql(CLEANUP_BATCH)))
                .execute(&stores.new)
                .await
                .map_err(failed("removing tombstones"))?
                .rows_affected();
            removed += n;
            if n == 0 {
                break;
            }
        }
        sqlx::query(
            "UPDATE switchyard.switchyard_backfill_tables SET tombstones_cleaned_at = now(), \
             tombstones_cleaned = tombstones_cleaned + $2 WHERE table_name = $1",
        )
        .bind(t.name.to_string())
        .bind(i64::try_from(removed).unwrap_or(i64::MAX))
        .execute(&stores.new)
        .await
        .map_err(failed("recording the tombstone cleanup"))?;
        tracing::info!(table = %t.name, removed, "tombstones removed");
        reports.push(CleanupReport {
            table: t.name.to_string(),
            removed,
        });
    }
    stores.close().await;
    Ok(reports)
}

/// One configured table in `switchyard status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableStatus {
    /// `schema.table`.
    pub table: String,
    /// Its configured phase.
    pub phase: Phase,
    /// Its backfill as recorded on NEW; `None` when it never started.
    pub backfill: Option<BackfillProgress>,
}

/// Every configured table's phase and backfill progress (reads NEW only).
pub async fn status(config: &Config) -> Result<Vec<TableStatus>, BackfillError> {
    let stores = Stores::connect(config, false).await?;
    let recorded = backfill_progress(&stores.new).await?;
    stores.close().await;
    Ok(config
        .tables
        .iter()
        .map(|t| TableStatus {
            table: t.name.to_string(),
            phase: t.phase,
            backfill: recorded.iter().find(|p| p.table == t.name.to_string()).cloned(),
        })
        .collect())
}
