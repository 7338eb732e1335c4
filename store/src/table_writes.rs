//! Which tables of the authoritative store are written but not migrated: a cutover guard rail.
//!
//! Transactions cannot span two authorities, so a table the application writes that is not in
//! `[[tables]]` would be left behind on OLD at cutover. PostgreSQL counts every table's row
//! writes (`pg_stat_user_tables`: `n_tup_ins + n_tup_upd + n_tup_del`, flushed by each
//! backend about once a second), but only as totals since the last statistics reset. So the
//! proxies record a snapshot of those totals ([`record_table_writes`], at most every
//! [`RECORD_EVERY`], in [`WRITES_TABLE`]), keeping a bounded history, and
//! [`unconfigured_writes`] compares the current totals with the youngest snapshot at least the
//! window old (or, when the history is shorter, the oldest one, and says so).
//! <https://www.postgresql.org/docs/current/monitoring-stats.html#MONITORING-PG-STAT-ALL-TABLES-VIEW>
//!
//! Tables are identified by OID (a renamed table keeps its history). Writes to a partition
//! count for its root, so a configured partitioned table covers its partitions. The
//! [`SIDE_SCHEMA`] schema and temporary tables are left out.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgPool;
use switchyard_config::TableName;

use crate::postgres::catalog::SIDE_SCHEMA;
use crate::prepare::side;
use crate::{Store, StoreError};

/// The snapshots of write counters: one row per snapshot, `{oid: writes}` as JSON.
pub const WRITES_TABLE: &str = "switchyard_table_writes";

/// The shortest time between two snapshots, whatever the number of proxies.
pub const RECORD_EVERY: Duration = Duration::from_secs(30);

/// Every user table's writes so far, by OID (as text), with its name and its partition root's.
const CURRENT_SQL: &str = "SELECT s.relid::int8, n.nspname::text, c.relname::text, \
       rn.nspname::text, r.relname::text, (s.n_tup_ins + s.n_tup_upd + s.n_tup_del)::int8 \
     FROM pg_stat_user_tables s \
     JOIN pg_class c ON c.oid = s.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_class r ON r.oid = coalesce(pg_partition_root(s.relid), s.relid) \
     JOIN pg_namespace rn ON rn.oid = r.relnamespace \
     WHERE n.nspname <> $1 AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'";

/// Records a snapshot of every user table's write counters on `store` unless one younger than
/// [`RECORD_EVERY`] exists (or another process is recording right now), and removes snapshots
/// no longer needed: those older than `keep`, except the youngest of them (the one a window of
/// `keep` compares with). Creates [`WRITES_TABLE`] when missing, in the [`SIDE_SCHEMA`] schema
/// `prepare` created (without it, records nothing). Returns whether it recorded.
/// Meant to be called once per poll round by every proxy.
pub async fn record_table_writes(store: &Store, keep: Duration) -> Result<bool, StoreError> {
    let Store::Postgres(pg) = store;
    let failed = |action: &'static str| crate::mirror::failed(store.role().as_str(), action);
    if !store
        .has_relation(&format!("{SIDE_SCHEMA}.{WRITES_TABLE}"))
        .await?
    {
        // Only where `prepare` created the schema: not before, nor after `cleanup` removed it.
        if !crate::cleanup::has_side_schema(store).await? {
            return Ok(false);
        }
        let ddl = format!(
            "SELECT pg_advisory_xact_lock(hashtextextended('switchyard.table_writes', 0)); \
             CREATE TABLE IF NOT EXISTS {} (recorded_at timestamptz PRIMARY KEY, counters jsonb NOT NULL)",
            side(WRITES_TABLE)
        );
        let mut tx = pg
            .pool()
            .begin()
            .await
            .map_err(failed("creating the write counters"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *tx)
            .await
            .map_err(failed("creating the write counters"))?;
        tx.commit().await.map_err(failed("creating the write counters"))?;
    }
    let mut tx = pg
        .pool()
        .begin()
        .await
        .map_err(failed("recording write counters"))?;
    let mine: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('switchyard.table_writes', 1))",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(failed("recording write counters"))?;
    let recent: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE recorded_at > clock_timestamp() - make_interval(secs => $1))",
        side(WRITES_TABLE)
    )))
    .bind(RECORD_EVERY.as_secs_f64())
    .fetch_one(&mut *tx)
    .await
    .map_err(failed("recording write counters"))?;
    if !mine || recent {
        return Ok(false);
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (recorded_at, counters) \
         SELECT clock_timestamp(), coalesce(jsonb_object_agg(s.relid::text, s.n_tup_ins + s.n_tup_upd + s.n_tup_del), '{{}}') \
         FROM pg_stat_user_tables s WHERE s.schemaname <> $1",
        side(WRITES_TABLE)
    )))
    .bind(SIDE_SCHEMA)
    .execute(&mut *tx)
    .await
    .map_err(failed("recording write counters"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {t} WHERE recorded_at < (SELECT max(recorded_at) FROM {t} \
         WHERE recorded_at <= clock_timestamp() - make_interval(secs => $1))",
        t = side(WRITES_TABLE)
    )))
    .bind(keep.as_secs_f64())
    .execute(&mut *tx)
    .await
    .map_err(failed("pruning write counters"))?;
    tx.commit().await.map_err(failed("recording write counters"))?;
    Ok(true)
}

/// A table written within the window that is not configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableWrites {
    /// `schema.table` (a partition's root when it is one).
    pub table: String,
    /// Rows inserted, updated and deleted since the snapshot compared with.
    pub writes: i64,
}

/// What [`unconfigured_writes`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UnconfiguredWrites {
    /// How old the snapshot compared with is, in seconds; `None` when there is none yet.
    pub observed_secs: Option<f64>,
    /// The window asked for, in seconds.
    pub window_secs: f64,
    /// The tables written since that snapshot that are not configured, most written first.
    pub tables: Vec<TableWrites>,
}

/// The tables of `store` outside `configured` (and outside [`SIDE_SCHEMA`]) written since the
/// youngest snapshot at least `window` old, or since the oldest snapshot when none is that
/// old ([`UnconfiguredWrites::observed_secs`] says how long was observed; `None` when nothing
/// was recorded yet).
pub async fn unconfigured_writes(
    store: &Store,
    configured: &[TableName],
    window: Duration,
) -> Result<UnconfiguredWrites, StoreError> {
    let Store::Postgres(pg) = store;
    let failed = |action: &'static str| crate::mirror::failed(store.role().as_str(), action);
    let mut out = UnconfiguredWrites {
        window_secs: window.as_secs_f64(),
        ..UnconfiguredWrites::default()
    };
    if !store
        .has_relation(&format!("{SIDE_SCHEMA}.{WRITES_TABLE}"))
        .await?
    {
        return Ok(out);
    }
    let snapshot: Option<(f64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT extract(epoch FROM clock_timestamp() - recorded_at)::float8, counters::text FROM {} \
         ORDER BY recorded_at <= clock_timestamp() - make_interval(secs => $1) DESC, \
                  CASE WHEN recorded_at <= clock_timestamp() - make_interval(secs => $1) \
                       THEN -extract(epoch FROM recorded_at) ELSE extract(epoch FROM recorded_at) END \
         LIMIT 1",
        side(WRITES_TABLE)
    )))
    .bind(window.as_secs_f64())
    .fetch_optional(pg.pool())
    .await
    .map_err(failed("reading write counters"))?;
    let Some((age, counters)) = snapshot else {
        return Ok(out);
    };
    out.observed_secs = Some(age);
    // Written by `record_table_writes` only; an unreadable one counts as empty (every write
    // since the statistics reset is then reported: the cautious side).
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap_or_default();
    out.tables = current_unconfigured(pg.pool(), configured, &counters)
        .await
        .map_err(failed("reading write counters"))?;
    Ok(out)
}

async fn current_unconfigured(
    pool: &PgPool,
    configured: &[TableName],
    before: &serde_json::Value,
) -> Result<Vec<TableWrites>, sqlx::Error> {
    let rows: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(CURRENT_SQL)
        .bind(SIDE_SCHEMA)
        .fetch_all(pool)
        .await?;
    let is_configured =
        |schema: &str, table: &str| configured.iter().any(|c| c.schema == schema && c.table == table);
    let mut by_table: Vec<TableWrites> = Vec::new();
    for (oid, schema, table, root_schema, root_table, now) in rows {
        if is_configured(&schema, &table) || is_configured(&root_schema, &root_table) {
            continue;
        }
        let then = before.get(oid.to_string()).and_then(serde_json::Value::as_i64);
        // Counters below the snapshot's were reset since: count what they say now.
        let writes = match then {
            Some(then) if then <= now => now - then,
            _ => now,
        };
        if writes == 0 {
            continue;
        }
        let name = format!("{root_schema}.{root_table}");
        match by_table.iter_mut().find(|t| t.table == name) {
            Some(t) => t.writes += writes,
            None => by_table.push(TableWrites { table: name, writes }),
        }
    }
    by_table.sort_by(|a, b| b.writes.cmp(&a.writes).then_with(|| a.table.cmp(&b.table)));
    Ok(by_table)
}
