//! The backfill's progress state on NEW: one row per table and one per chunk, in
//! [`SIDE_SCHEMA`], so a restarted backfill resumes where it stopped and several backfill
//! processes share the work (see `docs/backfill.md`).
//!
//! - `switchyard_backfill_tables`: per table its status (`running`, `done`), the key columns, the
//!   upper bound of the key range to copy (OLD's largest key when the table's backfill began),
//!   the planning cursor (the upper bound of the last chunk planned), whether planning reached the
//!   upper bound, an estimate of the row count (for ETAs), and when it started and finished.
//! - `switchyard_backfill_chunks`: per chunk its key range `(lo, hi]` (each bound the key columns'
//!   text forms; `lo` NULL = from the first key), `pending` or `done`, and once done the rows read
//!   from OLD, copied, skipped by the fence, and conflicting (NEW had a row with no key record),
//!   which worker copied it, how (`copy`: the fast path, straight COPY into the table and the
//!   keys table; `merge`: staged rows and the per-key claim) and when.
//!
//! A chunk goes from `pending` to `done` in the same NEW transaction that writes its rows, and a
//! worker holds the chunk's row lock (`FOR UPDATE SKIP LOCKED`) while it copies: a chunk is never
//! copied twice, and a chunk whose worker died is `pending` again as soon as NEW notices the
//! connection is gone.
//!
//! The tables are created by `switchyard prepare` (with the other side tables on NEW) and,
//! idempotently, by the backfill itself ([`ensure_backfill_tables`]).

use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::postgres::catalog::{quote_ident, SIDE_SCHEMA};
use crate::prepare::{lock_step, run_steps, schema_step, side, Step};
use crate::{Role, StoreError};

/// One row per backfilled table.
pub const BACKFILL_TABLES: &str = "switchyard_backfill_tables";
/// One row per planned chunk.
pub const BACKFILL_CHUNKS: &str = "switchyard_backfill_chunks";

/// The `CREATE TABLE IF NOT EXISTS` statements of the backfill's state tables, with what each
/// does (for error messages). The caller runs them after creating [`SIDE_SCHEMA`].
pub fn backfill_ddl() -> Vec<Step> {
    vec![
        (
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\
                 table_name text PRIMARY KEY, \
                 status text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done')), \
                 key_columns text[] NOT NULL, \
                 chunk_rows integer NOT NULL, \
                 upper_bound text[], \
                 cursor text[], \
                 planning_done boolean NOT NULL DEFAULT false, \
                 next_chunk bigint NOT NULL DEFAULT 1, \
                 rows_estimated bigint, \
                 started_at timestamptz NOT NULL DEFAULT now(), \
                 finished_at timestamptz, \
                 tombstones_cleaned_at timestamptz, \
                 tombstones_cleaned bigint NOT NULL DEFAULT 0)",
                side(BACKFILL_TABLES)
            ),
            format!("creating {SIDE_SCHEMA}.{BACKFILL_TABLES}"),
        ),
        (
            format!(
                "CREATE TABLE IF NOT EXISTS {} (\
                 table_name text NOT NULL, \
                 chunk_id bigint NOT NULL, \
                 lo text[], \
                 hi text[] NOT NULL, \
                 status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')), \
                 rows_read bigint NOT NULL DEFAULT 0, \
                 rows_copied bigint NOT NULL DEFAULT 0, \
                 rows_skipped bigint NOT NULL DEFAULT 0, \
                 rows_conflicting bigint NOT NULL DEFAULT 0, \
                 worker text, \
                 method text CHECK (method IN ('copy', 'merge')), \
                 planned_at timestamptz NOT NULL DEFAULT now(), \
                 copied_at timestamptz, \
                 copy_ms bigint, \
                 PRIMARY KEY (table_name, chunk_id))",
                side(BACKFILL_CHUNKS)
            ),
            format!("creating {SIDE_SCHEMA}.{BACKFILL_CHUNKS}"),
        ),
        (
            format!(
                "CREATE INDEX IF NOT EXISTS switchyard_backfill_chunks_pending ON {} (table_name, chunk_id) \
                 WHERE status = 'pending'",
                side(BACKFILL_CHUNKS)
            ),
            format!("creating the pending-chunk index of {SIDE_SCHEMA}.{BACKFILL_CHUNKS}"),
        ),
    ]
}

fn failed(action: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |source| StoreError::Query {
        role: "new",
        action: action.to_owned(),
        source,
    }
}

/// Creates [`SIDE_SCHEMA`] and the backfill's state tables on NEW if they are missing, in one
/// transaction serialized with `switchyard prepare` runs.
pub async fn ensure_backfill_tables(new: &PgPool) -> Result<(), StoreError> {
    let mut tx = new.begin().await.map_err(failed("starting a transaction"))?;
    let mut steps = vec![lock_step(), schema_step()];
    steps.extend(backfill_ddl());
    run_steps(&mut tx, Role::New, &steps).await?;
    tx.commit()
        .await
        .map_err(failed("committing the backfill state tables"))
}

/// The trigger on a keys table that closes the one gap a single-statement mirrored delete leaves.
pub const FENCE_TRIGGER: &str = "switchyard_backfill_fence";
/// Its function (one for every table; the table and key come as trigger arguments).
pub const FENCE_FUNCTION: &str = "switchyard_backfill_fence";

/// Makes sure `keys_table` (qualified) has the fence trigger for `table` (qualified), whose key
/// columns are `key`.
///
/// Why: a mirrored delete is one statement, `DELETE` of the row then an upsert of the key's
/// tombstone, with one snapshot. If a backfill chunk claimed the key and inserted its row but
/// has not committed yet, the `DELETE` does not see that row (an uncommitted insert is
/// invisible and not waited for), and the tombstone upsert waits for the chunk, then turns the
/// version-0 record into a tombstone: the row would stay. The trigger fires exactly then (a
/// record going from version 0 to deleted) and deletes the row again from PL/pgSQL, where each
/// statement takes a fresh snapshot and so sees the chunk's committed row.
/// <https://www.postgresql.org/docs/current/xfunc-volatility.html>
pub async fn ensure_fence_trigger(
    new: &PgPool,
    table: &str,
    keys_table: &str,
    key: &[String],
) -> Result<(), StoreError> {
    let present: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2)",
    )
    .bind(keys_table)
    .bind(FENCE_TRIGGER)
    .fetch_one(new)
    .await
    .map_err(failed("looking for the backfill fence trigger"))?;
    if present {
        return Ok(());
    }
    let function = format!("{}.{}", quote_ident(SIDE_SCHEMA), quote_ident(FENCE_FUNCTION));
    let condition = key
        .iter()
        .map(|k| format!("{0} = ($1).{0}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let steps = [
        lock_step(),
        (
            format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fence$ \
                 BEGIN \
                   EXECUTE 'DELETE FROM ' || TG_ARGV[0] || ' WHERE ' || TG_ARGV[1] USING NEW; \
                   RETURN NULL; \
                 END $fence$"
            ),
            "creating the backfill fence function".to_owned(),
        ),
        (
            format!(
                "DROP TRIGGER IF EXISTS {} ON {keys_table}",
                quote_ident(FENCE_TRIGGER)
            ),
            "replacing the backfill fence trigger".to_owned(),
        ),
        (
            format!(
                "CREATE TRIGGER {} AFTER UPDATE ON {keys_table} FOR EACH ROW \
                 WHEN (OLD.sy_version = 0 AND NEW.sy_deleted AND NOT OLD.sy_deleted) \
                 EXECUTE FUNCTION {function}({}, {})",
                quote_ident(FENCE_TRIGGER),
                literal(table),
                literal(&condition)
            ),
            "creating the backfill fence trigger".to_owned(),
        ),
    ];
    let mut tx = new.begin().await.map_err(failed("starting a transaction"))?;
    run_steps(&mut tx, Role::New, &steps).await?;
    tx.commit()
        .await
        .map_err(failed("committing the backfill fence trigger"))
}

/// One table's backfill as recorded on NEW.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackfillProgress {
    /// `schema.table`.
    pub table: String,
    /// `running` or `done`.
    pub status: String,
    /// Rows per chunk asked for by the latest run.
    pub chunk_rows: i64,
    /// Whether every chunk up to the upper bound has been planned (so `chunks_planned` is final).
    pub planning_done: bool,
    /// Chunks planned so far.
    pub chunks_planned: i64,
    /// Chunks copied.
    pub chunks_done: i64,
    /// Rows read from OLD by the chunks done.
    pub rows_read: i64,
    /// Rows written to NEW (their keys claimed with version 0).
    pub rows_copied: i64,
    /// Rows not written because NEW already had a version record or tombstone for their key.
    pub rows_skipped: i64,
    /// Keys claimed for which NEW already had a row (not overwritten).
    pub rows_conflicting: i64,
    /// OLD's row count estimate when the backfill began (`pg_class.reltuples`, or a count).
    pub rows_estimated: Option<i64>,
    /// When the first run began (UTC, RFC 3339).
    pub started_at: String,
    /// When the last chunk was copied, once done.
    pub finished_at: Option<String>,
    /// When tombstones were last removed (`switchyard backfill --cleanup-tombstones`).
    pub tombstones_cleaned_at: Option<String>,
}

const TS: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'";

/// Every table's backfill progress on NEW, in table-name order; empty when the state tables do
/// not exist yet (no backfill ever ran and `prepare` predates them).
pub async fn backfill_progress(new: &PgPool) -> Result<Vec<BackfillProgress>, StoreError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT to_regclass('switchyard.switchyard_backfill_tables') IS NOT NULL \
         AND to_regclass('switchyard.switchyard_backfill_chunks') IS NOT NULL",
    )
    .fetch_one(new)
    .await
    .map_err(failed("looking for the backfill state tables"))?;
    if !exists {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT t.table_name, t.status, t.chunk_rows::int8, t.planning_done, \
                count(c.chunk_id), count(c.chunk_id) FILTER (WHERE c.status = 'done'), \
                coalesce(sum(c.rows_read), 0)::int8, coalesce(sum(c.rows_copied), 0)::int8, \
                coalesce(sum(c.rows_skipped), 0)::int8, coalesce(sum(c.rows_conflicting), 0)::int8, \
                t.rows_estimated, \
                to_char(t.started_at AT TIME ZONE 'UTC', {TS}), \
                to_char(t.finished_at AT TIME ZONE 'UTC', {TS}), \
                to_char(t.tombstones_cleaned_at AT TIME ZONE 'UTC', {TS}) \
         FROM {side}.{tables} t LEFT JOIN {side}.{chunks} c ON c.table_name = t.table_name \
         GROUP BY t.table_name ORDER BY t.table_name",
        side = quote_ident(SIDE_SCHEMA),
        tables = quote_ident(BACKFILL_TABLES),
        chunks = quote_ident(BACKFILL_CHUNKS),
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(new)
        .await
        .map_err(failed("reading backfill progress"))?;
    rows.iter()
        .map(|r| {
            Ok(BackfillProgress {
                table: r.try_get(0)?,
                status: r.try_get(1)?,
                chunk_rows: r.try_get(2)?,
                planning_done: r.try_get(3)?,
                chunks_planned: r.try_get(4)?,
                chunks_done: r.try_get(5)?,
                rows_read: r.try_get(6)?,
                rows_copied: r.try_get(7)?,
                rows_skipped: r.try_get(8)?,
                rows_conflicting: r.try_get(9)?,
                rows_estimated: r.try_get(10)?,
                started_at: r.try_get(11)?,
                finished_at: r.try_get(12)?,
                tombstones_cleaned_at: r.try_get(13)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(failed("decoding backfill progress"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_idempotent_and_in_the_side_schema() {
        for (sql, _) in backfill_ddl() {
            assert!(sql.contains("IF NOT EXISTS"), "{sql}");
            assert!(sql.contains("\"switchyard\".\"switchyard_backfill_"), "{sql}");
        }
    }
}
