//! The backfill of tables without a key (mirrored append-only, duplicates allowed).
//!
//! Such rows have no identity, so nothing can be fenced by key. Instead the rows to copy are
//! fixed by time: exactly those committed before the table's capture began. `switchyard prepare`
//! records that moment on OLD when it installs the capture trigger, in the same transaction and
//! under the trigger's table lock ([`switchyard_store::capture::BOUNDARY_TABLE`]): a snapshot, the
//! table's size in blocks and its file node. Every row visible in that snapshot was inserted
//! without a trigger and reaches NEW only through the backfill; every other row was captured,
//! and reaches NEW as a mirrored (or repaired) append. The two sets are disjoint, so each chunk
//! simply COPYs its rows into NEW's table, in the NEW transaction that marks the chunk done.
//!
//! Chunks are block ranges `[lo, hi)` of OLD's heap below the boundary's block count (rows in
//! later blocks were all written after the boundary), read with a TID range scan
//! (`ctid >= '(lo,0)' AND ctid < '(hi,0)'`, PostgreSQL 14 and later). A row's `xmin` is its
//! inserting transaction (UPDATE and DELETE are refused on such tables by the capture's guard);
//! its 32-bit value is widened to `xid8` with the epoch of the reading snapshot's newest id, and
//! tested with `pg_visible_in_snapshot`. Ids below 3 (bootstrap, frozen by PostgreSQL before
//! 9.4) are visible. A rewrite of the table (`VACUUM FULL`, `CLUSTER`) moves rows between
//! blocks, so every chunk first checks that the file node is still the boundary's.

use std::time::Instant;

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection as _, Row as _};
use switchyard_config::TableName;
use switchyard_store::capture::{widen_xid, BOUNDARY_TABLE};
use switchyard_store::mirror::escape_literal;
use switchyard_store::{quote_ident, StoreError, SIDE_SCHEMA};

use crate::chunk::{lease, mark_done, pipe, ChunkDone, Lease, Source};
use crate::endpoint::Endpoint;
use crate::target::TargetTable;
use crate::BackfillError;

/// 2^32: beyond this many transactions, a row's 32-bit `xmin` no longer names one transaction.
const XID_SPACE: i64 = 1 << 32;

/// When a table's capture began, as recorded on OLD by `switchyard prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    /// `pg_snapshot` text (`xmin:xmax:xip,...`): rows of transactions visible in it are copied.
    pub snapshot: String,
    /// The table's size in blocks then: rows of later blocks were all captured.
    pub blocks: i64,
    /// The table's file node then (`None` if it had none recorded).
    pub filenode: Option<i64>,
}

/// Reads `table`'s capture boundary on OLD; `None` when none is recorded (the side table or its
/// row is missing).
pub async fn load_boundary(old: &PgPool, table: &TableName) -> Result<Option<Boundary>, BackfillError> {
    let failed = |source| StoreError::Query {
        role: "old",
        action: format!("reading the capture boundary of {table}"),
        source,
    };
    let side = format!("{}.{}", quote_ident(SIDE_SCHEMA), quote_ident(BOUNDARY_TABLE));
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&side)
        .fetch_one(old)
        .await
        .map_err(failed)?;
    if !exists {
        return Ok(None);
    }
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT snapshot::text, blocks, filenode::int8, \
                pg_snapshot_xmax(pg_current_snapshot())::text::int8 FROM {side} WHERE table_name = $1"
    )))
    .bind(table.to_string())
    .fetch_optional(old)
    .await
    .map_err(failed)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let boundary = Boundary {
        snapshot: row.try_get(0).map_err(failed)?,
        blocks: row.try_get(1).map_err(failed)?,
        filenode: row.try_get(2).map_err(failed)?,
    };
    let next: i64 = row.try_get(3).map_err(failed)?;
    if next >= XID_SPACE {
        // Rows older than 2^32 transactions (all frozen) show a 32-bit xmin that may fall among
        // the ids of transactions that began after the boundary.
        tracing::warn!(
            table = %table,
            "OLD has used more than 2^32 transaction ids: a row inserted more than 2^32 transactions \
             ago may be mistaken for a captured one (see docs/backfill.md, \"Tables without a key\")"
        );
    }
    Ok(Some(boundary))
}

/// The upper bounds of the next `chunks` block ranges after `cursor` (0 when `None`), each
/// `blocks_per_chunk` blocks, the last one ending at `upper`.
pub fn block_bounds(cursor: Option<i64>, upper: i64, blocks_per_chunk: i64, chunks: i64) -> Vec<i64> {
    let step = blocks_per_chunk.max(1);
    let mut lo = cursor.unwrap_or(0);
    let mut out = Vec::new();
    while lo < upper && i64::try_from(out.len()).unwrap_or(i64::MAX) < chunks.max(1) {
        lo = lo.saturating_add(step).min(upper);
        out.push(lo);
    }
    out
}

/// Blocks per chunk for about `chunk_rows` rows, from the estimate of `rows` in `blocks` blocks.
pub fn blocks_per_chunk(chunk_rows: i64, rows: i64, blocks: i64) -> i64 {
    if rows <= 0 || blocks <= 0 {
        return 1;
    }
    let per_block = (rows / blocks).max(1);
    (chunk_rows / per_block).max(1)
}

/// On OLD: the rows of blocks `[lo, hi)` of `table` (qualified) visible in `boundary`'s snapshot,
/// as COPY data of `columns` (quoted) in `format`.
pub fn copy_out_sql(
    table: &str,
    columns: &[String],
    format: &str,
    boundary: &Boundary,
    lo: i64,
    hi: i64,
) -> String {
    let latest = "(SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::int8 - 1)";
    format!(
        "COPY (SELECT {cols} FROM {table} WHERE ctid >= '({lo},0)'::tid AND ctid < '({hi},0)'::tid \
         AND (xmin::text::int8 < 3 OR pg_catalog.pg_visible_in_snapshot({xid}, {snapshot}::pg_catalog.pg_snapshot))) \
         TO STDOUT (FORMAT {format})",
        cols = columns.join(", "),
        xid = widen_xid("xmin", latest),
        snapshot = escape_literal(&boundary.snapshot),
    )
}

/// On OLD: whether `table` (qualified) still has the boundary's file node (not rewritten since).
pub fn same_file_sql(table: &str, boundary: &Boundary) -> Option<String> {
    boundary.filenode.map(|node| {
        format!(
            "SELECT pg_catalog.pg_relation_filenode({}::regclass)::int8 IS NOT DISTINCT FROM {node}",
            escape_literal(table)
        )
    })
}

/// A chunk's bound as stored in the state tables (`text[]` of one block number).
pub fn stored(block: i64) -> Vec<String> {
    vec![block.to_string()]
}

/// A stored bound back as a block number.
pub fn block_of(bound: Option<&[String]>) -> Option<i64> {
    bound.and_then(|b| b.first()).and_then(|b| b.parse().ok())
}

/// Leases a pending chunk of `t` (a table without a key) and copies it: OLD's rows of its block
/// range that are older than the capture, straight into NEW's table with COPY, and the chunk
/// marked done, in one NEW transaction.
pub async fn copy_chunk(
    (old_end, new_end): (&Endpoint, &Endpoint),
    old: &mut PgConnection,
    new: &mut PgConnection,
    t: &TargetTable,
    boundary: &Boundary,
    worker: &str,
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
    let lo = block_of(lo.as_deref()).unwrap_or(0);
    let hi = block_of(Some(&hi)).unwrap_or(lo);
    let source = Source {
        copy_out: t.keyless_copy_out_sql(boundary, lo, hi),
        count_left_out: None,
        same_file: same_file_sql(t.qualified(), boundary).map(|q| (q, t.name.clone())),
    };
    let (read, _) = pipe(old, &mut tx, &source, &t.copy_into_table_sql(), (oerr, nerr)).await?;
    let done = ChunkDone {
        chunk_id,
        read,
        claimed: read,
        copied: read,
    };
    mark_done(&mut tx, &name, &done, (worker, "copy", started), nerr).await?;
    tx.commit().await.map_err(nerr)?;
    tracing::debug!(table = %t.name, chunk = chunk_id, blocks = ?(lo, hi), rows = read, "chunk committed");
    Ok(Lease::Copied(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges_end_at_the_boundary() {
        assert_eq!(block_bounds(None, 10, 4, 5), vec![4, 8, 10]);
        assert_eq!(block_bounds(Some(8), 10, 4, 5), vec![10]);
        assert_eq!(block_bounds(Some(10), 10, 4, 5), Vec::<i64>::new());
        assert_eq!(block_bounds(None, 10, 3, 2), vec![3, 6]);
        assert_eq!(blocks_per_chunk(1000, 0, 0), 1);
        assert_eq!(blocks_per_chunk(1000, 18_500, 100), 5);
        assert_eq!(block_of(Some(&stored(42))), Some(42));
    }

    #[test]
    fn rows_are_chosen_by_block_range_and_snapshot() {
        let b = Boundary {
            snapshot: "100:105:102".into(),
            blocks: 7,
            filenode: Some(16400),
        };
        let sql = copy_out_sql("\"public\".\"log\"", &["\"a\"".into()], "binary", &b, 2, 7);
        assert!(
            sql.starts_with("COPY (SELECT \"a\" FROM \"public\".\"log\" WHERE ctid >= '(2,0)'::tid AND ctid < '(7,0)'::tid"),
            "{sql}"
        );
        assert!(sql.contains("E'100:105:102'::pg_catalog.pg_snapshot"), "{sql}");
        assert!(sql.ends_with("TO STDOUT (FORMAT binary)"), "{sql}");
        assert!(same_file_sql("\"public\".\"log\"", &b)
            .unwrap_or_default()
            .ends_with("IS NOT DISTINCT FROM 16400"));
    }
}
