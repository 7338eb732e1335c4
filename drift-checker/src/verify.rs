//! `drift verify`: the exact comparison, resumable and parallel.
//!
//! Key ranges are cut from OLD's keys; each range is hashed on both stores at once, in the
//! databases, and a range whose hashes differ is read key by key. Workers take ranges one at a
//! time. Each finished range is recorded on NEW (`switchyard.switchyard_verify_ranges`, under a
//! run in `switchyard.switchyard_verify_runs`) with its row counts and the keys it found
//! differing, so a verify that is killed starts again where it stopped: the next `verify` of the
//! same table with the same range size takes the run over and compares only the ranges not yet
//! recorded. The keys found are read again at the end, as always, so a key that was repaired or
//! caught up in the meantime does not count.
//!
//! One verify of a table runs at a time: a session advisory lock on NEW, held by a connection of
//! the run (and freed by the server when the process dies), keeps a second one out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use switchyard_store::Store;

use crate::table::{failed, DriftTable, RangesFrom};
use crate::{confirmed_differences, differing_keys, DriftError, Recheck, VerifyReport};

/// A key range `(lo, hi]`; `None` ends are open.
type KeyRange = (Option<Vec<String>>, Option<Vec<String>>);

/// How a verify runs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// OLD's keys per hashed range.
    pub chunk_rows: u64,
    /// Ranges compared at once (each hashes on both stores at the same time).
    pub workers: usize,
    /// At most this many rows (both stores together) per second; 0 for no limit. A verify reads
    /// every row of OLD, the database the business runs on.
    pub max_rows_per_sec: u64,
    /// Take over an unfinished run of the same table and range size instead of starting anew.
    pub resume: bool,
    pub recheck: Recheck,
    /// Counters the caller may watch (a progress bar).
    pub progress: Arc<VerifyProgress>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 10_000,
            workers: 2,
            max_rows_per_sec: 0,
            resume: true,
            recheck: Recheck::default(),
            progress: Arc::default(),
        }
    }
}

/// How far a verify is: ranges in all, ranges done (including those of the run it took over),
/// rows compared (both stores).
#[derive(Debug, Default)]
pub struct VerifyProgress {
    pub ranges_total: AtomicU64,
    pub ranges_done: AtomicU64,
    pub rows: AtomicU64,
}

/// The most workers a verify runs (the drift checker's pools have room for them).
pub const MAX_WORKERS: usize = 8;

const STATE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS switchyard; \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_verify_runs ( \
       id bigserial PRIMARY KEY, \
       table_name text NOT NULL, \
       chunk_rows bigint NOT NULL, \
       started_on_old text NOT NULL, \
       bounds jsonb NOT NULL, \
       ranges_from text NOT NULL, \
       started_at timestamptz NOT NULL DEFAULT now(), \
       finished_at timestamptz, \
       started_by text NOT NULL); \
     CREATE TABLE IF NOT EXISTS switchyard.switchyard_verify_ranges ( \
       run_id bigint NOT NULL REFERENCES switchyard.switchyard_verify_runs ON DELETE CASCADE, \
       range_no integer NOT NULL, \
       rows_old bigint NOT NULL, \
       rows_new bigint NOT NULL, \
       suspects jsonb NOT NULL, \
       PRIMARY KEY (run_id, range_no))";

/// A run's state on NEW.
struct Run {
    id: i64,
    started_on_old: String,
    ranges: Vec<KeyRange>,
    ranges_from: RangesFrom,
    /// Ranges already compared: row counts and the keys found differing.
    done: BTreeMap<usize, RangeResult>,
}

#[derive(Debug, Default, Clone)]
struct RangeResult {
    rows: (u64, u64),
    suspects: Vec<Vec<String>>,
}

/// Compares `table` on both stores exactly: ranges of `options.chunk_rows` keys hashed in the
/// databases, differing ranges read key by key. Every differing key is listed. `by` names the
/// process in the run's state.
pub async fn verify(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    options: &VerifyOptions,
    by: &str,
) -> Result<VerifyReport, DriftError> {
    let started = Instant::now();
    let Store::Postgres(pg_new) = new;
    sqlx::raw_sql(STATE_DDL)
        .execute(pg_new.pool())
        .await
        .map_err(failed(new, "creating the verify state tables"))?;
    let _lock = lock_table(new, table).await?;
    let chunk_rows = options.chunk_rows.max(1);
    let run = match options.resume {
        true => unfinished_run(new, table, chunk_rows).await?,
        false => None,
    };
    let resumed = run.is_some();
    let run = match run {
        Some(run) => run,
        None => start_run(old, new, table, chunk_rows, by).await?,
    };
    let progress = &options.progress;
    progress
        .ranges_total
        .store(run.ranges.len() as u64, Ordering::Relaxed);
    progress
        .ranges_done
        .store(run.done.len() as u64, Ordering::Relaxed);
    let pending: Vec<usize> = (0..run.ranges.len())
        .filter(|i| !run.done.contains_key(i))
        .collect();
    let resumed_ranges = run.done.len() as u64;

    let next = AtomicUsize::new(0);
    let pace = Pace::new(options.max_rows_per_sec);
    let worker = || async {
        let mut found = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&range_no) = pending.get(i) else {
                return Ok::<_, DriftError>(found);
            };
            let (lo, hi) = &run.ranges[range_no];
            let result = compare_range(old, new, table, lo.as_deref(), hi.as_deref()).await?;
            record_range(new, run.id, range_no, &result).await?;
            let rows = result.rows.0 + result.rows.1;
            progress.rows.fetch_add(rows, Ordering::Relaxed);
            progress.ranges_done.fetch_add(1, Ordering::Relaxed);
            found.push((range_no, result));
            pace.after(rows).await;
        }
    };
    let workers = options.workers.clamp(1, MAX_WORKERS);
    let results = futures_util::future::try_join_all((0..workers).map(|_| worker())).await?;
    let mut all = run.done;
    all.extend(results.into_iter().flatten());

    // The ranges cover every key of both stores: their counts are the tables' row counts.
    let rows_old = all.values().map(|r| r.rows.0).sum();
    let rows_new = all.values().map(|r| r.rows.1).sum();
    let suspects: Vec<Vec<String>> = all.into_values().flat_map(|r| r.suspects).collect();
    let differing = confirmed_differences(old, new, table, &suspects, options.recheck).await?;
    finish_run(new, run.id).await?;

    let mut report = VerifyReport::new(table.name.to_string(), rows_old, rows_new);
    report.chunks = run.ranges.len() as u64;
    report.resumed_ranges = resumed_ranges;
    report.resumed = resumed;
    report.ranges_from = Some(run.ranges_from);
    report.started_on_old = run.started_on_old;
    for d in differing {
        report.add(d);
    }
    report.seconds = started.elapsed().as_secs_f64();
    // Rows compared by this process, per second.
    report.rows_per_sec = progress.rows.load(Ordering::Relaxed) as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// Holds the table's verify lock on NEW until dropped (the connection goes back to the pool
/// without it: the lock is released first). Refuses when another verify holds it.
struct TableLock(Option<PoolConnection<Postgres>>);

impl Drop for TableLock {
    fn drop(&mut self) {
        // A pooled connection keeps session locks: close this one instead of returning it.
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

async fn lock_table(new: &Store, table: &DriftTable) -> Result<TableLock, DriftError> {
    let Store::Postgres(pg) = new;
    let name = format!("switchyard.verify:{}", table.name);
    let mut conn = pg
        .pool()
        .acquire()
        .await
        .map_err(failed(new, "taking a connection for the verify lock"))?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(&name)
        .fetch_one(&mut *conn)
        .await
        .map_err(failed(new, "taking the verify lock"))?;
    if !got {
        return Err(DriftError::Table {
            table: table.name.to_string(),
            problem: "another drift verify of this table is running (it holds its lock on NEW)".to_owned(),
        });
    }
    Ok(TableLock(Some(conn)))
}

/// The latest unfinished run of `table` with the same range size, with the ranges it finished.
async fn unfinished_run(new: &Store, table: &DriftTable, chunk_rows: u64) -> Result<Option<Run>, DriftError> {
    let Store::Postgres(pg) = new;
    let row: Option<(i64, String, String, String)> = sqlx::query_as(
        "SELECT id, started_on_old, bounds::text, to_jsonb(ranges_from)::text FROM switchyard.switchyard_verify_runs \
         WHERE table_name = $1 AND chunk_rows = $2 AND finished_at IS NULL ORDER BY id DESC LIMIT 1",
    )
    .bind(table.name.to_string())
    .bind(chunk_rows as i64)
    .fetch_optional(pg.pool())
    .await
    .map_err(failed(new, "looking for an unfinished verify"))?;
    let Some((id, started_on_old, bounds, ranges_from)) = row else {
        return Ok(None);
    };
    let bounds: Vec<Vec<String>> = serde_json::from_str(&bounds).map_err(|e| DriftError::Table {
        table: table.name.to_string(),
        problem: format!(
            "verify run {id}'s saved key ranges cannot be read ({e}); run verify with --restart"
        ),
    })?;
    let rows: Vec<(i32, i64, i64, String)> = sqlx::query_as(
        "SELECT range_no, rows_old, rows_new, suspects::text FROM switchyard.switchyard_verify_ranges WHERE run_id = $1",
    )
    .bind(id)
    .fetch_all(pg.pool())
    .await
    .map_err(failed(new, "reading an unfinished verify's ranges"))?;
    let mut done = BTreeMap::new();
    for (range_no, rows_old, rows_new, suspects) in rows {
        let suspects = serde_json::from_str(&suspects).map_err(|e| DriftError::Table {
            table: table.name.to_string(),
            problem: format!(
                "verify run {id}'s range {range_no} cannot be read ({e}); run verify with --restart"
            ),
        })?;
        done.insert(
            range_no as usize,
            RangeResult {
                rows: (rows_old as u64, rows_new as u64),
                suspects,
            },
        );
    }
    Ok(Some(Run {
        id,
        started_on_old,
        ranges: ranges_between(bounds),
        ranges_from: serde_json::from_str(&ranges_from).unwrap_or(RangesFrom::Keys),
        done,
    }))
}

/// A new run: OLD's clock, the range bounds from OLD's keys, recorded on NEW. Unfinished runs
/// of the table are dropped (a run with another range size cannot be taken over).
async fn start_run(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    chunk_rows: u64,
    by: &str,
) -> Result<Run, DriftError> {
    let Store::Postgres(pg) = new;
    let started_on_old = table.clock(old).await?;
    let (bounds, ranges_from) = table.range_bounds(old, chunk_rows).await?;
    sqlx::query("DELETE FROM switchyard.switchyard_verify_runs WHERE table_name = $1")
        .bind(table.name.to_string())
        .execute(pg.pool())
        .await
        .map_err(failed(new, "dropping earlier verify runs"))?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO switchyard.switchyard_verify_runs (table_name, chunk_rows, started_on_old, bounds, ranges_from, started_by) \
         VALUES ($1, $2, $3, $4::text::jsonb, $5, $6) RETURNING id",
    )
    .bind(table.name.to_string())
    .bind(chunk_rows as i64)
    .bind(&started_on_old)
    .bind(keys_json(&bounds))
    .bind(match ranges_from {
        RangesFrom::Statistics => "statistics",
        RangesFrom::Keys => "keys",
    })
    .bind(by)
    .fetch_one(pg.pool())
    .await
    .map_err(failed(new, "recording a verify run"))?;
    Ok(Run {
        id,
        started_on_old,
        ranges: ranges_between(bounds),
        ranges_from,
        done: BTreeMap::new(),
    })
}

/// Keys as a JSON array of arrays of text, as the state tables keep them.
fn keys_json(keys: &[Vec<String>]) -> String {
    serde_json::Value::from(
        keys.iter()
            .map(|k| serde_json::Value::from(k.clone()))
            .collect::<Vec<_>>(),
    )
    .to_string()
}

/// The ranges between `bounds` (each an upper bound): the first open below, the last open above,
/// so they cover every key either store has.
fn ranges_between(bounds: Vec<Vec<String>>) -> Vec<KeyRange> {
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut lo = None;
    for b in bounds {
        ranges.push((lo, Some(b.clone())));
        lo = Some(b);
    }
    ranges.push((lo, None));
    ranges
}

async fn record_range(
    new: &Store,
    run: i64,
    range_no: usize,
    result: &RangeResult,
) -> Result<(), DriftError> {
    let Store::Postgres(pg) = new;
    sqlx::query(
        "INSERT INTO switchyard.switchyard_verify_ranges (run_id, range_no, rows_old, rows_new, suspects) \
         VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT DO NOTHING",
    )
    .bind(run)
    .bind(range_no as i32)
    .bind(result.rows.0 as i64)
    .bind(result.rows.1 as i64)
    .bind(keys_json(&result.suspects))
    .execute(pg.pool())
    .await
    .map_err(failed(new, "recording a verified range"))?;
    Ok(())
}

/// Marks the run finished; its ranges are no longer needed.
async fn finish_run(new: &Store, run: i64) -> Result<(), DriftError> {
    let Store::Postgres(pg) = new;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DELETE FROM switchyard.switchyard_verify_ranges WHERE run_id = {run}; \
         UPDATE switchyard.switchyard_verify_runs SET finished_at = now(), bounds = '[]' WHERE id = {run}"
    )))
    .execute(pg.pool())
    .await
    .map_err(failed(new, "finishing a verify run"))?;
    Ok(())
}

/// One range hashed on both stores at once; when the hashes differ, its rows read key by key
/// and the differing keys kept.
async fn compare_range(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    lo: Option<&[String]>,
    hi: Option<&[String]>,
) -> Result<RangeResult, DriftError> {
    let (a, b) = tokio::try_join!(table.range_hash(old, lo, hi), table.range_hash(new, lo, hi))?;
    let rows = (a.0 as u64, b.0 as u64);
    if a == b {
        return Ok(RangeResult {
            rows,
            suspects: Vec::new(),
        });
    }
    let (a, b) = tokio::try_join!(table.range_rows(old, lo, hi), table.range_rows(new, lo, hi))?;
    Ok(RangeResult {
        rows,
        suspects: differing_keys(&a, &b).into_iter().map(|(key, _)| key).collect(),
    })
}

/// Keeps the rows read per second under a limit, across workers: each worker, after a range,
/// sleeps until the rows read so far are within budget.
struct Pace {
    limit: u64,
    start: tokio::time::Instant,
    rows: AtomicU64,
}

impl Pace {
    fn new(limit: u64) -> Pace {
        Pace {
            limit,
            start: tokio::time::Instant::now(),
            rows: AtomicU64::new(0),
        }
    }

    async fn after(&self, rows: u64) {
        if self.limit == 0 {
            return;
        }
        let total = self.rows.fetch_add(rows, Ordering::Relaxed) + rows;
        let due = Duration::from_secs_f64(total as f64 / self.limit as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_below_between_and_above_the_bounds() {
        let b = |s: &str| vec![s.to_owned()];
        let ranges = ranges_between(vec![b("10"), b("20")]);
        assert_eq!(
            ranges,
            [
                (None, Some(b("10"))),
                (Some(b("10")), Some(b("20"))),
                (Some(b("20")), None)
            ]
        );
        assert_eq!(ranges_between(Vec::new()), [(None, None)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_holds_rows_per_second_under_the_limit() {
        let pace = Pace::new(1_000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            pace.after(500).await;
        }
        // 2,500 rows at 1,000 rows/s: 2.5 s.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2_400), "{took:?}");
        assert!(took <= Duration::from_millis(2_600), "{took:?}");
        let unlimited = Pace::new(0);
        let start = tokio::time::Instant::now();
        unlimited.after(1_000_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
