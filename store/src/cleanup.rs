//! `switchyard cleanup`: removes everything Switchyard created on a store once the migration is
//! done.
//!
//! Everything Switchyard creates lives in the [`SIDE_SCHEMA`] schema (see [`crate::prepare`]:
//! the keys tables with their tombstones, `switchyard_tables`, `switchyard_applied`, the
//! backfill's state and its fence functions and triggers, the intents, the verify marks, the
//! capture boundary, the net's intent sequence, the capture and guard functions; the drift
//! checker's results and verify state; the control state and its log; the write counters of
//! [`crate::table_writes`]) except the capture and guard triggers on the migrated tables
//! themselves, which run functions of that schema. So [`remove_side_objects`] drops those
//! triggers, then the schema with what is in it, in one transaction. It first checks that no
//! object outside the schema depends on one inside (a user's view over the drift results, a
//! column default calling the net's sequence): those would be dropped by the cascade, so it
//! names them and removes nothing instead. Running it again finds no schema and does nothing.

use serde::Serialize;
use sqlx::AssertSqlSafe;

use crate::postgres::catalog::{quote_ident, SIDE_SCHEMA};
use crate::{Store, StoreError};

/// What [`remove_side_objects`] removed from one store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    /// `OLD` or `NEW`.
    pub store: &'static str,
    /// Whether the schema existed (false: nothing to do).
    pub found: bool,
    /// The triggers dropped from user tables, as `trigger on schema.table`.
    pub triggers: Vec<String>,
    /// Tables removed with the schema (side tables, keys tables with their tombstones).
    pub tables: Vec<String>,
    /// Functions, sequences and other objects removed with the schema.
    pub other_objects: i64,
}

/// Why a store was not cleaned.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A query failed, or the store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Objects outside the schema depend on objects inside it; nothing was removed.
    #[error("{store} store: objects outside schema {SIDE_SCHEMA} depend on it and would be dropped with it: {}; \
             drop or change them first (nothing was removed)", objects.join("; "))]
    Dependents {
        /// `OLD` or `NEW`.
        store: &'static str,
        /// Each object, as `pg_describe_object` names it.
        objects: Vec<String>,
    },
}

/// Triggers on tables outside the schema that run a function inside it (partitions' clones,
/// which go with their parent's, left out).
const TRIGGERS_SQL: &str =
    "SELECT t.tgname::text, quote_ident(cn.nspname) || '.' || quote_ident(c.relname), \
       cn.nspname || '.' || c.relname \
     FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
     JOIN pg_namespace pn ON pn.oid = p.pronamespace \
     JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
     WHERE pn.nspname = $1 AND cn.nspname <> $1 AND t.tgparentid = 0 AND NOT t.tgisinternal \
     ORDER BY 3, 1";

/// Objects outside the schema that depend on an object inside it (or on the schema itself). A
/// column default, trigger, rule, policy or constraint is where its table (or constraint) is;
/// `pg_identify_object` gives no schema for those.
const DEPENDENTS_SQL: &str = "WITH s AS (SELECT oid FROM pg_namespace WHERE nspname = $1), \
     inside AS ( \
       SELECT 'pg_class'::regclass AS classid, c.oid FROM pg_class c, s WHERE c.relnamespace = s.oid \
       UNION ALL SELECT 'pg_proc'::regclass, p.oid FROM pg_proc p, s WHERE p.pronamespace = s.oid \
       UNION ALL SELECT 'pg_type'::regclass, y.oid FROM pg_type y, s WHERE y.typnamespace = s.oid \
       UNION ALL SELECT 'pg_namespace'::regclass, s.oid FROM s) \
     SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) \
     FROM pg_depend d JOIN inside i ON d.refclassid = i.classid AND d.refobjid = i.oid, s \
     WHERE d.deptype IN ('n', 'a') AND s.oid IS DISTINCT FROM CASE d.classid \
       WHEN 'pg_attrdef'::regclass THEN (SELECT c.relnamespace FROM pg_attrdef a \
         JOIN pg_class c ON c.oid = a.adrelid WHERE a.oid = d.objid) \
       WHEN 'pg_trigger'::regclass THEN (SELECT c.relnamespace FROM pg_trigger t \
         JOIN pg_class c ON c.oid = t.tgrelid WHERE t.oid = d.objid) \
       WHEN 'pg_rewrite'::regclass THEN (SELECT c.relnamespace FROM pg_rewrite r \
         JOIN pg_class c ON c.oid = r.ev_class WHERE r.oid = d.objid) \
       WHEN 'pg_policy'::regclass THEN (SELECT c.relnamespace FROM pg_policy p \
         JOIN pg_class c ON c.oid = p.polrelid WHERE p.oid = d.objid) \
       WHEN 'pg_constraint'::regclass THEN (SELECT k.connamespace FROM pg_constraint k WHERE k.oid = d.objid) \
       ELSE (SELECT n.oid FROM pg_namespace n \
         WHERE n.nspname = (pg_identify_object(d.classid, d.objid, d.objsubid)).schema) END \
     ORDER BY 1";

/// Whether `store` has the [`SIDE_SCHEMA`] schema.
pub async fn has_side_schema(store: &Store) -> Result<bool, StoreError> {
    let Store::Postgres(pg) = store;
    sqlx::query_scalar(SCHEMA_EXISTS_SQL)
        .bind(SIDE_SCHEMA)
        .fetch_one(pg.pool())
        .await
        .map_err(crate::mirror::failed(
            store.role().as_str(),
            "looking for the side schema",
        ))
}

const SCHEMA_EXISTS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)";

/// Drops Switchyard's triggers from user tables, then the [`SIDE_SCHEMA`] schema and all it
/// holds, in one transaction on `store`; refuses ([`CleanupError::Dependents`]) when objects
/// outside the schema depend on it. Idempotent: without the schema, does nothing. With `apply`
/// false the transaction is rolled back: the report says what would be removed (a dry run, to
/// check every store before changing any).
pub async fn remove_side_objects(store: &Store, apply: bool) -> Result<CleanupReport, CleanupError> {
    let Store::Postgres(pg) = store;
    let failed = |action: &'static str| crate::mirror::failed(store.role().as_str(), action);
    let mut report = CleanupReport {
        store: store.role().name(),
        ..CleanupReport::default()
    };
    let mut tx = pg.pool().begin().await.map_err(failed("starting the cleanup"))?;
    // No `prepare` (nor a first write-counter snapshot) creating objects meanwhile.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('switchyard.prepare', 0)), \
                pg_advisory_xact_lock(hashtextextended('switchyard.table_writes', 0))",
    )
    .execute(&mut *tx)
    .await
    .map_err(failed("waiting for other prepare runs"))?;
    let exists: bool = sqlx::query_scalar(SCHEMA_EXISTS_SQL)
        .bind(SIDE_SCHEMA)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed("looking for the side schema"))?;
    if !exists {
        return Ok(report);
    }
    report.found = true;
    let triggers: Vec<(String, String, String)> = sqlx::query_as(TRIGGERS_SQL)
        .bind(SIDE_SCHEMA)
        .fetch_all(&mut *tx)
        .await
        .map_err(failed("listing Switchyard's triggers"))?;
    for (trigger, quoted_table, table) in triggers {
        let sql = format!(
            "DROP TRIGGER IF EXISTS {} ON {quoted_table}",
            quote_ident(&trigger)
        );
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .map_err(failed("dropping Switchyard's triggers"))?;
        report.triggers.push(format!("{trigger} on {table}"));
    }
    let dependents: Vec<String> = sqlx::query_scalar(DEPENDENTS_SQL)
        .bind(SIDE_SCHEMA)
        .fetch_all(&mut *tx)
        .await
        .map_err(failed("looking for objects that depend on the side schema"))?;
    if !dependents.is_empty() {
        return Err(CleanupError::Dependents {
            store: report.store,
            objects: dependents,
        });
    }
    report.tables = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 1",
    )
    .bind(SIDE_SCHEMA)
    .fetch_all(&mut *tx)
    .await
    .map_err(failed("listing the side tables"))?;
    report.other_objects = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = $1 AND c.relkind IN ('S', 'v', 'm')) \
              + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                  WHERE n.nspname = $1)",
    )
    .bind(SIDE_SCHEMA)
    .fetch_one(&mut *tx)
    .await
    .map_err(failed("counting the side objects"))?;
    let drop = format!("DROP SCHEMA {} CASCADE", quote_ident(SIDE_SCHEMA));
    sqlx::query(AssertSqlSafe(drop))
        .execute(&mut *tx)
        .await
        .map_err(failed("dropping the side schema"))?;
    if apply {
        tx.commit().await.map_err(failed("committing the cleanup"))?;
    } else {
        tx.rollback().await.map_err(failed("rolling back the dry run"))?;
    }
    Ok(report)
}
