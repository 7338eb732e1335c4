//! One worker's connections and the three things it does to a table: set up its state row,
//! plan the next chunks, and copy a leased chunk behind the fence.
//!
//! A chunk's copy is one NEW transaction: lease the chunk (`FOR UPDATE SKIP LOCKED` on its
//! state row, so no other worker can take it while this transaction lives, and a dead worker's
//! chunk is free again once NEW drops its connection); stream OLD's rows of the range, read in
//! one `REPEATABLE READ` snapshot, through COPY, either straight into the table (`copy`, when few
//! keys of the range have records; those are left out of the read), then under the fence lock
//! the rows that a racing mirrored delete left a tombstone for are removed again, or into a
//! staging table from which one statement claims (version 0) the keys that have no record and
//! inserts only their rows (`merge`); mark the chunk `done` with its counts; commit. Everything
//! or nothing.

use std::collections::HashSet;
use std::time::Instant;

use futures_util::StreamExt as _;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};
use switchyard_store::mirror::fence_lock_sql;
use switchyard_store::StoreError;

use crate::endpoint::{unique_violation, Endpoint};
use crate::keyless;
use crate::target::TargetTable;
use crate::BackfillError;

/// COPY data is forwarded to NEW in pieces of about this size: OLD sends one CopyData message
/// per row, and NEW accepts data split anywhere, so gathering rows saves a write per row.
/// <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-COPY>
const COPY_BUFFER: usize = 256 * 1024;

/// The state tables, qualified.
const TABLES: &str = "switchyard.switchyard_backfill_tables";
pub(crate) const CHUNKS: &str = "switchyard.switchyard_backfill_chunks";

/// What the start of a run found about a table.
#[derive(Debug, Clone)]
pub struct TableStart {
    /// Its backfill was already complete.
    pub done: bool,
    /// Rows read by chunks done before this run.
    pub rows_before: u64,
    /// OLD's estimated row count.
    pub rows_estimated: u64,
}

/// One leased and copied chunk.
#[derive(Debug, Clone, Copy)]
pub struct ChunkDone {
    /// Its id within the table.
    pub chunk_id: i64,
    /// Rows read from OLD.
    pub read: u64,
    /// Keys claimed (no record existed).
    pub claimed: u64,
    /// Rows inserted into NEW's table.
    pub copied: u64,
}

/// What looking for a chunk found.
#[derive(Debug, Clone, Copy)]
pub enum Lease {
    /// A chunk was copied.
    Copied(ChunkDone),
    /// No pending chunk is free (none, or all leased by other workers).
    NoneFree,
}

/// What planning found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// One more chunk is pending.
    Planned,
    /// Every chunk up to the upper bound is planned already.
    Complete,
}

/// A NEW connection and the staging tables it has created.
struct NewConn {
    conn: PgConnection,
    staged: HashSet<usize>,
}

/// One worker: a connection to each store, opened on first use and dropped after any failure.
pub struct Worker {
    /// Recorded in the chunks it copies: `host:pid/n`.
    pub id: String,
    old_end: Endpoint,
    new_end: Endpoint,
    old: Option<PgConnection>,
    new: Option<NewConn>,
}

impl Worker {
    /// A worker with no connections yet.
    pub fn new(id: String, old: Endpoint, new: Endpoint) -> Worker {
        Worker {
            id,
            old_end: old,
            new_end: new,
            old: None,
            new: None,
        }
    }

    async fn take_old(&mut self) -> Result<PgConnection, StoreError> {
        match self.old.take() {
            Some(c) => Ok(c),
            None => self.old_end.connect().await,
        }
    }

    async fn take_new(&mut self) -> Result<NewConn, StoreError> {
        if let Some(c) = self.new.take() {
            return Ok(c);
        }
        let mut conn = self.new_end.connect().await?;
        // Best effort: when the backfill and a mirrored transaction deadlock on a key, let the
        // backfill notice first and be the one rolled back (its chunk is simply retried).
        // Needs superuser; without it NEW's default applies.
        // <https://www.postgresql.org/docs/current/runtime-config-locks.html#GUC-DEADLOCK-TIMEOUT>
        if sqlx::raw_sql("SET deadlock_timeout = '100ms'")
            .execute(&mut conn)
            .await
            .is_err()
        {
            tracing::debug!("deadlock_timeout not settable; using NEW's default");
        }
        // A chunk's rows and its done mark are lost together or not at all if NEW crashes before
        // its commit reaches disk, and a mirrored write that waited for the chunk flushes the WAL
        // past the chunk's commit when it commits itself, so the backfill need not wait for the
        // flush of each chunk.
        // <https://www.postgresql.org/docs/current/wal-async-commit.html>
        sqlx::raw_sql("SET synchronous_commit = off")
            .execute(&mut conn)
            .await
            .map_err(self.new_end.failed("setting synchronous_commit"))?;
        Ok(NewConn {
            conn,
            staged: HashSet::new(),
        })
    }

    /// Drops both connections (after a failure, or a stop in the middle of a chunk).
    pub fn reset(&mut self) {
        self.old = None;
        self.new = None;
    }

    /// Creates or reads `table`'s state row; on the first run computes the upper bound (OLD's
    /// largest key) and the row estimate. Serialized with other processes by the row's lock.
    pub async fn start_table(
        &mut self,
        t: &TargetTable,
        chunk_rows: u64,
    ) -> Result<TableStart, BackfillError> {
        let mut old = self.take_old().await?;
        let mut new = self.take_new().await?;
        let result = start_table(
            &self.old_end,
            &self.new_end,
            &mut old,
            &mut new.conn,
            t,
            chunk_rows,
        )
        .await;
        if result.is_ok() {
            self.old = Some(old);
            self.new = Some(new);
        }
        result
    }

    /// Plans the next `ahead` chunks of `t` after the cursor, if any are left.
    pub async fn plan(&mut self, t: &TargetTable, ahead: u64) -> Result<Plan, BackfillError> {
        let mut old = self.take_old().await?;
        let mut new = self.take_new().await?;
        let ahead = i64::try_from(ahead.max(1)).unwrap_or(1);
        let result = plan_chunk(&self.old_end, &self.new_end, &mut old, &mut new.conn, t, ahead).await;
        if result.is_ok() {
            self.old = Some(old);
            self.new = Some(new);
        }
        result
    }

    /// Leases a pending chunk of `t` and copies it.
    pub async fn copy(&mut self, t: &TargetTable, chunk_rows: u64) -> Result<Lease, BackfillError> {
        let mut old = self.take_old().await?;
        let mut new = self.take_new().await?;
        if let Some(boundary) = &t.boundary {
            let ends = (&self.old_end, &self.new_end);
            let result = keyless::copy_chunk(ends, &mut old, &mut new.conn, t, boundary, &self.id).await;
            if result.is_ok() {
                self.old = Some(old);
                self.new = Some(new);
            }
            return result;
        }
        self.ensure_staging(&mut new, t).await?;
        let mut result = copy_chunk(
            &self.old_end,
            &self.new_end,
            &mut old,
            &mut new.conn,
            t,
            &self.id,
            Some(chunk_rows / 4),
        )
        .await;
        if result.as_ref().err().is_some_and(unique_violation) {
            // The fast path met a key written meanwhile: redo the chunk with the per-key claim,
            // on fresh connections (the failed COPY left both mid-transaction).
            tracing::debug!(table = %t.name, "fast path met a concurrent write; redoing the chunk");
            drop((old, new));
            old = self.take_old().await?;
            new = self.take_new().await?;
            self.ensure_staging(&mut new, t).await?;
            result = copy_chunk(
                &self.old_end,
                &self.new_end,
                &mut old,
                &mut new.conn,
                t,
                &self.id,
                None,
            )
            .await;
        }
        if result.is_ok() {
            self.old = Some(old);
            self.new = Some(new);
        }
        result
    }

    async fn ensure_staging(&self, new: &mut NewConn, t: &TargetTable) -> Result<(), BackfillError> {
        if !new.staged.contains(&t.index) {
            sqlx::raw_sql(AssertSqlSafe(t.create_staging_sql()))
                .execute(&mut new.conn)
                .await
                .map_err(self.new_end.failed("creating the staging table"))?;
            new.staged.insert(t.index);
        }
        Ok(())
    }

    /// Marks `t` done if every chunk is planned and copied; true when it is done (now or before).
    pub async fn finish(&mut self, t: &TargetTable) -> Result<bool, BackfillError> {
        let mut new = self.take_new().await?;
        let result = sqlx::query_scalar::<_, bool>(AssertSqlSafe(format!(
            "WITH f AS (UPDATE {TABLES} SET status = 'done', finished_at = now() \
               WHERE table_name = $1 AND status = 'running' AND planning_done \
               AND NOT EXISTS (SELECT 1 FROM {CHUNKS} WHERE table_name = $1 AND status = 'pending') \
               RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM f) OR coalesce((SELECT status = 'done' FROM {TABLES} WHERE table_name = $1), false)"
        )))
        .bind(t.name.to_string())
        .fetch_one(&mut new.conn)
        .await
        .map_err(self.new_end.failed("marking a table's backfill done"))
        .map_err(BackfillError::from);
        if result.is_ok() {
            self.new = Some(new);
        }
        result
    }
}

pub(crate) fn text_array(row: &sqlx::postgres::PgRow, i: usize) -> Result<Option<Vec<String>>, sqlx::Error> {
    row.try_get::<Option<Vec<String>>, _>(i)
}

async fn start_table(
    old_end: &Endpoint,
    new_end: &Endpoint,
    old: &mut PgConnection,
    new: &mut PgConnection,
    t: &TargetTable,
    chunk_rows: u64,
) -> Result<TableStart, BackfillError> {
    let nerr = new_end.failed("setting up the table's backfill state");
    let oerr = old_end.failed("reading the table's key range");
    let name = t.name.to_string();
    let chunk_rows = i32::try_from(chunk_rows).unwrap_or(i32::MAX);
    let mut tx = new.begin().await.map_err(nerr)?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {TABLES} (table_name, key_columns, chunk_rows) VALUES ($1, $2, $3) \
         ON CONFLICT (table_name) DO NOTHING"
    )))
    .bind(&name)
    .bind(&t.key)
    .bind(chunk_rows)
    .execute(&mut *tx)
    .await
    .map_err(nerr)?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT status, key_columns, rows_estimated, \
                (SELECT coalesce(sum(rows_read), 0)::int8 FROM {CHUNKS} WHERE table_name = $1 AND status = 'done') \
         FROM {TABLES} WHERE table_name = $1 FOR UPDATE"
    )))
    .bind(&name)
    .fetch_one(&mut *tx)
    .await
    .map_err(nerr)?;
    let status: String = row.try_get(0).map_err(nerr)?;
    let key_columns: Vec<String> = row.try_get(1).map_err(nerr)?;
    let estimate: Option<i64> = row.try_get(2).map_err(nerr)?;
    let rows_before: i64 = row.try_get(3).map_err(nerr)?;
    if key_columns != t.key {
        return Err(BackfillError::KeyChanged {
            table: t.name.clone(),
            was: key_columns.join(", "),
            now: t.key.join(", "),
        });
    }
    let estimate = match estimate {
        Some(e) => e,
        None => {
            // First run: fix the upper bound. Rows with larger keys committed after this were
            // written under dual writes and reach NEW as mirrored writes. Without a key: the
            // table's size in blocks when its capture began.
            let upper = match &t.boundary {
                Some(b) => (b.blocks > 0).then(|| keyless::stored(b.blocks)),
                None => sqlx::raw_sql(AssertSqlSafe(t.upper_bound_sql()))
                    .fetch_optional(&mut *old)
                    .await
                    .map_err(oerr)?
                    .map(|r| text_array(&r, 0))
                    .transpose()
                    .map_err(oerr)?
                    .flatten(),
            };
            let mut estimate: i64 = sqlx::raw_sql(AssertSqlSafe(t.estimate_sql()))
                .fetch_one(&mut *old)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(oerr)?;
            if estimate < 0 {
                estimate = sqlx::raw_sql(AssertSqlSafe(t.count_sql()))
                    .fetch_one(&mut *old)
                    .await
                    .and_then(|r| r.try_get(0))
                    .map_err(oerr)?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {TABLES} SET upper_bound = $2, planning_done = ($2::text[] IS NULL), rows_estimated = $3 \
                 WHERE table_name = $1"
            )))
            .bind(&name)
            .bind(&upper)
            .bind(estimate)
            .execute(&mut *tx)
            .await
            .map_err(nerr)?;
            estimate
        }
    };
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {TABLES} SET chunk_rows = $2 WHERE table_name = $1"
    )))
    .bind(&name)
    .bind(chunk_rows)
    .execute(&mut *tx)
    .await
    .map_err(nerr)?;
    tx.commit().await.map_err(nerr)?;
    Ok(TableStart {
        done: status == "done",
        rows_before: u64::try_from(rows_before).unwrap_or(0),
        rows_estimated: u64::try_from(estimate).unwrap_or(0),
    })
}

async fn plan_chunk(
    old_end: &Endpoint,
    new_end: &Endpoint,
    old: &mut PgConnection,
    new: &mut PgConnection,
    t: &TargetTable,
    ahead: i64,
) -> Result<Plan, BackfillError> {
    let nerr = new_end.failed("planning a chunk");
    let oerr = old_end.failed("finding the next chunk's upper bound");
    let name = t.name.to_string();
    let mut tx = new.begin().await.map_err(nerr)?;
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT planning_done, cursor, upper_bound, next_chunk, chunk_rows::int8, \
                coalesce(rows_estimated, 0) FROM {TABLES} WHERE table_name = $1 FOR UPDATE"
    )))
    .bind(&name)
    .fetch_one(&mut *tx)
    .await
    .map_err(nerr)?;
    let planning_done: bool = row.try_get(0).map_err(nerr)?;
    let cursor = text_array(&row, 1).map_err(nerr)?;
    let upper = text_array(&row, 2).map_err(nerr)?;
    let next_chunk: i64 = row.try_get(3).map_err(nerr)?;
    let chunk_rows: i64 = row.try_get(4).map_err(nerr)?;
    let estimate: i64 = row.try_get(5).map_err(nerr)?;
    let Some(upper) = upper.filter(|_| !planning_done) else {
        tx.rollback().await.map_err(nerr)?;
        return Ok(Plan::Complete);
    };
    let mut bounds = if t.boundary.is_some() {
        // Block ranges of about `chunk_rows` rows, by the table's average rows per block.
        let last = keyless::block_of(Some(&upper)).unwrap_or(0);
        let step = keyless::blocks_per_chunk(chunk_rows, estimate, last);
        keyless::block_bounds(keyless::block_of(cursor.as_deref()), last, step, ahead)
            .into_iter()
            .map(keyless::stored)
            .collect()
    } else {
        let rows = sqlx::raw_sql(AssertSqlSafe(t.next_bounds_sql(
            cursor.as_deref(),
            &upper,
            chunk_rows,
            ahead,
        )))
        .fetch_all(&mut *old)
        .await
        .map_err(oerr)?;
        rows.iter()
            .map(|r| text_array(r, 0).map(Option::unwrap_or_default))
            .collect::<Result<Vec<Vec<String>>, _>>()
            .map_err(oerr)?
    };
    // Fewer bounds than asked for: the rest of the range, up to the upper bound, is the last
    // chunk. (A bound equal to the upper bound ends planning too.)
    if let Some(at) = bounds.iter().position(|b| *b == upper) {
        bounds.truncate(at + 1);
    } else if i64::try_from(bounds.len()).unwrap_or(i64::MAX) < ahead {
        bounds.push(upper.clone());
    }
    let last = bounds.last().is_some_and(|b| *b == upper);
    let mut lo = cursor;
    let mut id = next_chunk;
    for hi in &bounds {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {CHUNKS} (table_name, chunk_id, lo, hi) VALUES ($1, $2, $3, $4)"
        )))
        .bind(&name)
        .bind(id)
        .bind(&lo)
        .bind(hi)
        .execute(&mut *tx)
        .await
        .map_err(nerr)?;
        lo = Some(hi.clone());
        id += 1;
    }
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {TABLES} SET cursor = $2, next_chunk = $3, planning_done = $4 WHERE table_name = $1"
    )))
    .bind(&name)
    .bind(&lo)
    .bind(id)
    .bind(last)
    .execute(&mut *tx)
    .await
    .map_err(nerr)?;
    tx.commit().await.map_err(nerr)?;
    Ok(Plan::Planned)
}

/// What to read from OLD for a chunk, in one `REPEATABLE READ` snapshot.
pub(crate) struct Source {
    /// The `COPY ... TO STDOUT`.
    pub(crate) copy_out: String,
    /// Run first: counts the rows the fence left out of the copy.
    pub(crate) count_left_out: Option<String>,
    /// Run first: true while the table was not rewritten since its capture began (tables without
    /// a key), with the table to name otherwise.
    pub(crate) same_file: Option<(String, switchyard_config::TableName)>,
}

/// Streams OLD's rows (one snapshot) into `sql`'s COPY on NEW; returns the rows NEW took and the
/// rows left out.
pub(crate) async fn pipe(
    old: &mut PgConnection,
    new: &mut PgConnection,
    source: &Source,
    sql: &str,
    (oerr, nerr): (
        impl Fn(sqlx::Error) -> StoreError + Copy,
        impl Fn(sqlx::Error) -> StoreError + Copy,
    ),
) -> Result<(u64, u64), BackfillError> {
    // <https://www.postgresql.org/docs/current/transaction-iso.html#XACT-REPEATABLE-READ>
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *old)
        .await
        .map_err(oerr)?;
    if let Some((check, table)) = &source.same_file {
        let same: bool = sqlx::raw_sql(AssertSqlSafe(check.as_str()))
            .fetch_one(&mut *old)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(oerr)?;
        if !same {
            return Err(BackfillError::Rewritten { table: table.clone() });
        }
    }
    let left_out: i64 = match &source.count_left_out {
        Some(count) => sqlx::raw_sql(AssertSqlSafe(count.as_str()))
            .fetch_one(&mut *old)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(oerr)?,
        None => 0,
    };
    let read = {
        let mut rows = old.copy_out_raw(&source.copy_out).await.map_err(oerr)?;
        let mut sink = new.copy_in_raw(sql).await.map_err(nerr)?;
        let mut buf: Vec<u8> = Vec::with_capacity(COPY_BUFFER + 64 * 1024);
        while let Some(piece) = rows.next().await {
            let piece = piece.map_err(oerr)?;
            buf.extend_from_slice(&piece);
            if buf.len() >= COPY_BUFFER {
                sink.send(buf.as_slice()).await.map_err(nerr)?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            sink.send(buf.as_slice()).await.map_err(nerr)?;
        }
        sink.finish().await.map_err(nerr)?
    };
    sqlx::raw_sql("COMMIT").execute(&mut *old).await.map_err(oerr)?;
    Ok((read, u64::try_from(left_out).unwrap_or(0)))
}

async fn copy_chunk(
    old_end: &Endpoint,
    new_end: &Endpoint,
    old: &mut PgConnection,
    new: &mut PgConnection,
    t: &TargetTable,
    worker: &str,
    fast_up_to: Option<u64>,
) -> Result<Lease, BackfillError> {
    let started = Instant::now();
    let nerr = new_end.failed("copying a chunk");
    let oerr = old_end.failed("reading a chunk");
    let name = t.name.to_string();
    let mut tx = new.begin().await.map_err(nerr)?;
    let Some((chunk_id, lo, hi)) = lease(&mut tx, &name, nerr).await? else {
        tx.rollback().await.map_err(nerr)?;
        return Ok(Lease::NoneFree);
    };

    // The fast path, when at most a quarter of the range's keys have records: those keys are
    // left out of the copy (the fence would skip them), the rest go straight into the table with
    // one COPY, without claims. A key that got a row meanwhile (a mirrored upsert) fails the
    // COPY with a unique violation, and the chunk is redone on the slow path. A mirrored delete
    // that missed the uncommitted rows left a tombstone: under the fence lock, which waits for
    // every mirrored delete of the table still open on NEW, the rows of the range with a
    // tombstone are removed again.
    let fast = match fast_up_to {
        Some(most) => {
            let most = i64::try_from(most).unwrap_or(i64::MAX);
            let rows = sqlx::raw_sql(AssertSqlSafe(t.records_in_range_sql(
                lo.as_deref(),
                &hi,
                most + 1,
            )))
            .fetch_all(&mut *tx)
            .await
            .map_err(nerr)?;
            let taken = rows
                .iter()
                .map(|r| text_array(r, 0).map(Option::unwrap_or_default))
                .collect::<Result<Vec<Vec<String>>, _>>()
                .map_err(nerr)?;
            (i64::try_from(taken.len()).unwrap_or(i64::MAX) <= most).then_some(taken)
        }
        None => None,
    };
    let method = if fast.is_some() { "copy" } else { "merge" };
    let leased_in = started.elapsed();
    let (read, claimed, copied) = match fast {
        Some(taken) => {
            let source = Source {
                copy_out: t.copy_out_except_sql(lo.as_deref(), &hi, &taken),
                count_left_out: (!taken.is_empty()).then(|| t.count_keys_sql(&taken)),
                same_file: None,
            };
            let (piped, left_out) =
                pipe(old, &mut tx, &source, &t.copy_into_table_sql(), (oerr, nerr)).await?;
            let piped_in = started.elapsed();
            sqlx::raw_sql(AssertSqlSafe(fence_lock_sql(&t.name, true)))
                .execute(&mut *tx)
                .await
                .map_err(nerr)?;
            let swept = sqlx::raw_sql(AssertSqlSafe(t.sweep_sql(lo.as_deref(), &hi)))
                .execute(&mut *tx)
                .await
                .map_err(nerr)?
                .rows_affected();
            tracing::debug!(
                pipe_ms = (piped_in - leased_in).as_millis() as u64,
                sweep_ms = (started.elapsed() - piped_in).as_millis() as u64,
                swept,
                "fast path"
            );
            let kept = piped.saturating_sub(swept);
            (piped + left_out, kept, kept)
        }
        // The slow path: the claim as one statement, INSERT ... ON CONFLICT DO NOTHING RETURNING
        // into the keys table, then only the claimed keys' rows from the staging table.
        None => {
            let source = Source {
                copy_out: t.copy_out_sql(lo.as_deref(), &hi),
                count_left_out: None,
                same_file: None,
            };
            let (read, _) = pipe(old, &mut tx, &source, &t.copy_in_sql(), (oerr, nerr)).await?;
            let (claimed, copied): (i64, i64) = if read == 0 {
                (0, 0)
            } else {
                sqlx::query_as(AssertSqlSafe(t.merge_sql()))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(nerr)?
            };
            (
                read,
                u64::try_from(claimed).unwrap_or(0),
                u64::try_from(copied).unwrap_or(0),
            )
        }
    };
    let done = ChunkDone {
        chunk_id,
        read,
        claimed,
        copied,
    };
    mark_done(&mut tx, &name, &done, (worker, method, started), nerr).await?;
    tx.commit().await.map_err(nerr)?;
    tracing::debug!(
        table = %t.name,
        chunk = chunk_id,
        method,
        lease_ms = leased_in.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "chunk committed"
    );
    Ok(Lease::Copied(done))
}

/// A leased chunk: its id and range as stored.
pub(crate) type Leased = (i64, Option<Vec<String>>, Vec<String>);

/// In the chunk's NEW transaction: leases the first pending chunk of `table` no other worker
/// holds (`FOR UPDATE SKIP LOCKED`), if any.
pub(crate) async fn lease(
    tx: &mut PgConnection,
    table: &str,
    nerr: impl Fn(sqlx::Error) -> StoreError + Copy,
) -> Result<Option<Leased>, BackfillError> {
    let leased = sqlx::query(AssertSqlSafe(format!(
        "SELECT chunk_id, lo, hi FROM {CHUNKS} WHERE table_name = $1 AND status = 'pending' \
         ORDER BY chunk_id LIMIT 1 FOR UPDATE SKIP LOCKED"
    )))
    .bind(table)
    .fetch_optional(&mut *tx)
    .await
    .map_err(nerr)?;
    let Some(leased) = leased else {
        return Ok(None);
    };
    let chunk_id: i64 = leased.try_get(0).map_err(nerr)?;
    let lo = text_array(&leased, 1).map_err(nerr)?;
    let hi = text_array(&leased, 2).map_err(nerr)?.unwrap_or_default();
    Ok(Some((chunk_id, lo, hi)))
}

/// In the chunk's NEW transaction: marks it done with its counts, `(worker, method, started)`.
pub(crate) async fn mark_done(
    tx: &mut PgConnection,
    table: &str,
    done: &ChunkDone,
    (worker, method, started): (&str, &str, Instant),
    nerr: impl Fn(sqlx::Error) -> StoreError + Copy,
) -> Result<(), BackfillError> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {CHUNKS} SET status = 'done', rows_read = $3, rows_copied = $4, rows_skipped = $5, \
         rows_conflicting = $6, worker = $7, copied_at = now(), copy_ms = $8, method = $9 \
         WHERE table_name = $1 AND chunk_id = $2"
    )))
    .bind(table)
    .bind(done.chunk_id)
    .bind(count(done.read))
    .bind(count(done.copied))
    .bind(count(done.read.saturating_sub(done.claimed)))
    .bind(count(done.claimed.saturating_sub(done.copied)))
    .bind(worker)
    .bind(i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX))
    .bind(method)
    .execute(&mut *tx)
    .await
    .map_err(nerr)?;
    Ok(())
}
