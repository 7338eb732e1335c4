//! `switchyard prepare`: checks that NEW's tables can take OLD's row images and creates the side
//! tables that dual writes and the backfill rely on.
//!
//! Side objects, all in the [`SIDE_SCHEMA`] schema (the user's schemas are never touched):
//!
//! - on NEW, `switchyard_tables` (one row per configured table: its keys table and key columns),
//!   one `switchyard_keys_<schema>_<table>` per keyed table (per-key version and tombstone, the
//!   backfill's fence), `switchyard_applied` (the intents whose changes NEW has applied), and the
//!   backfill's progress tables `switchyard_backfill_tables` and `switchyard_backfill_chunks`
//!   ([`crate::backfill_state`]);
//! - on OLD, `switchyard_intents` (the changes of each mirrored transaction, committed with it),
//!   `switchyard_verify` (tables marked for a full verification) and `switchyard_capture_boundary`
//!   (when each table's capture began, for the backfill of tables without a key), and on every table in a
//!   mirrored phase the capture triggers of [`crate::capture`] (removed again from tables back in
//!   `passthrough`).
//!
//! Creation is idempotent (`IF NOT EXISTS`, an upsert for `switchyard_tables`), one transaction
//! per store, and happens only when no table has a mismatch.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::AssertSqlSafe;
use switchyard_config::{Phase, TableName, TableSettings};

use crate::postgres::catalog::{
    column_list, compare_in, effective_key, keys_table_name, load_table, quote_ident, quote_table, Mismatch,
    TableSchema, SIDE_SCHEMA,
};
use crate::{Role, Roles, StoreError};

/// The per-table record on NEW listing every prepared table.
pub const TABLES_TABLE: &str = "switchyard_tables";
/// NEW's record of applied intents.
pub const APPLIED_TABLE: &str = "switchyard_applied";
/// OLD's intent records, one per mirrored transaction.
pub const INTENTS_TABLE: &str = "switchyard_intents";
/// OLD's records of transactions whose mirror failed, for the read lease
/// (`crate::stale_reads`).
pub const STALE_READS_TABLE: &str = "switchyard_stale_reads";
/// OLD's tables awaiting a full verification.
pub const VERIFY_TABLE: &str = "switchyard_verify";

/// The columns every keys table has after the key columns, as `(name, format_type text)`.
const KEYS_TABLE_BOOKKEEPING: [(&str, &str); 3] = [
    ("sy_version", "bigint"),
    ("sy_deleted", "boolean"),
    ("sy_updated_at", "timestamp with time zone"),
];

/// One configured table that exists on both stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreparedTable {
    /// The table.
    pub name: TableName,
    /// The columns identifying a row ([`effective_key`]); empty = mirrored append-only.
    pub key: Vec<String>,
    /// The keys table's name in [`SIDE_SCHEMA`] (unqualified), when the table has a key.
    pub keys_table: Option<String>,
    /// The table as OLD has it.
    pub old: TableSchema,
    /// The table as NEW has it.
    pub new: TableSchema,
}

/// What `prepare` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PrepareReport {
    /// The configured tables present on both stores, in configuration order.
    pub tables: Vec<PreparedTable>,
    /// Every problem found, tables missing on a store included; empty when ready.
    pub mismatches: Vec<Mismatch>,
}

impl PrepareReport {
    /// No mismatches: dual writes may begin (once the side objects exist).
    pub fn is_ready(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Loads and compares every configured table (any phase); when there are no mismatches and
/// `apply` is true, creates the side objects, idempotently (`IF NOT EXISTS`), one transaction per
/// store (NEW first, then OLD). With mismatches nothing is created.
///
/// Besides [`compare`]'s checks, reports two configured tables whose keys tables would have the
/// same name, and a keys table left on NEW by an earlier `prepare` whose columns no longer fit
/// (the key changed): it holds version records, so it is never altered or dropped here.
pub async fn prepare(
    old: &PgPool,
    new: &PgPool,
    tables: &[TableSettings],
    apply: bool,
) -> Result<PrepareReport, StoreError> {
    prepare_in(Roles::OLD_AUTHORITATIVE, old, new, tables, apply).await
}

/// [`prepare`] for stores in any roles: the capture triggers and intents go to the
/// `authoritative` store, the key records and applied markers to the `follower` (at cutover NEW
/// becomes authoritative and OLD follows). In the report, `old` is the authoritative store's
/// definition and `new` the follower's.
pub async fn prepare_in(
    roles: Roles,
    authoritative: &PgPool,
    follower: &PgPool,
    tables: &[TableSettings],
    apply: bool,
) -> Result<PrepareReport, StoreError> {
    prepare_with(roles, authoritative, follower, tables, apply, Triggers::Set).await
}

/// What [`prepare_with`] does with the capture triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggers {
    /// Installs them on the tables in a mirrored phase, removes them from the others.
    Set,
    /// Leaves them as they are: a cutover prepares the side objects for the new roles before its
    /// barrier, and moves only the triggers under it ([`set_capture`]).
    Leave,
}

/// Installs the capture triggers on `pool` (the store that is, or becomes, authoritative as
/// `role`) for the tables whose phase in `settings` is mirrored, and removes them from the
/// others, in one transaction and one round trip. `tables` come from a [`prepare_with`] report
/// for the roles in which `role` is authoritative (their `old` is that store's definition).
pub async fn set_capture(
    pool: &PgPool,
    role: Role,
    settings: &[TableSettings],
    tables: &[PreparedTable],
) -> Result<(), StoreError> {
    set_capture_and_fence(pool, role, settings, tables, None).await
}

/// [`set_capture`], and in the same transaction every table of `tables` fenced (`Some(true)`:
/// the store loses write authority) or its fence lifted (`Some(false)`: it gains it), as
/// [`crate::capture::fence_sql`] describes.
pub async fn set_capture_and_fence(
    pool: &PgPool,
    role: Role,
    settings: &[TableSettings],
    tables: &[PreparedTable],
    fence: Option<bool>,
) -> Result<(), StoreError> {
    let mut batch = String::from("SET TRANSACTION ISOLATION LEVEL READ COMMITTED;\n");
    for (sql, _) in capture_steps(settings, tables) {
        batch.push_str(&sql);
        batch.push_str(";\n");
    }
    let fences = fence.map(|on| crate::capture::fence_sql(tables.iter().map(|t| &t.name), on));
    for sql in fences.iter().flatten() {
        batch.push_str(sql);
        batch.push_str(";\n");
    }
    let actions = (
        "installing or removing the capture triggers",
        "committing the capture triggers",
    );
    in_transaction(pool, role, &batch, actions).await
}

/// Runs `batch` (statements separated by `;`) in one transaction on the store of `pool`;
/// `(running, committing)` name what failed.
async fn in_transaction(
    pool: &PgPool,
    role: Role,
    batch: &str,
    (running, committing): (&'static str, &'static str),
) -> Result<(), StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(failed(role, "starting a transaction"))?;
    sqlx::raw_sql(AssertSqlSafe(batch))
        .execute(&mut *tx)
        .await
        .map_err(failed(role, running))?;
    tx.commit().await.map_err(failed(role, committing))
}

/// Whether any of `tables` carries the write fence on the store of `pool`
/// ([`crate::capture::fence_sql`]).
pub async fn is_fenced(pool: &PgPool, role: Role, tables: &[PreparedTable]) -> Result<bool, StoreError> {
    let names: Vec<String> = tables.iter().map(|t| quote_table(&t.name)).collect();
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) AS t JOIN pg_catalog.pg_trigger g \
         ON g.tgrelid = to_regclass(t) WHERE g.tgname = $2)",
    )
    .bind(&names)
    .bind(crate::capture::FENCE_TRIGGER)
    .fetch_one(pool)
    .await
    .map_err(failed(role, "looking for the write fence"))
}

/// Fences `tables` on this store (`on`) or lifts their fence, in one transaction, capture left
/// as it is: with table groups, a store that takes some groups' writes is fenced for the others'
/// tables ([`crate::capture::fence_sql`]).
pub async fn set_fence(pool: &PgPool, role: Role, tables: &[TableName], on: bool) -> Result<(), StoreError> {
    if tables.is_empty() {
        return Ok(());
    }
    let batch = crate::capture::fence_sql(tables, on).join(";\n");
    let actions = ("setting the write fence", "setting the write fence");
    in_transaction(pool, role, &batch, actions).await
}

/// `table` seen from the other store: its `old` and `new` definitions swapped (for
/// [`set_capture`] on the store that is the follower in the report's roles).
pub fn swapped(table: &PreparedTable) -> PreparedTable {
    PreparedTable {
        old: table.new.clone(),
        new: table.old.clone(),
        ..table.clone()
    }
}

/// [`prepare_in`], with the capture triggers set or left as they are.
pub async fn prepare_with(
    roles: Roles,
    authoritative: &PgPool,
    follower: &PgPool,
    tables: &[TableSettings],
    apply: bool,
    triggers: Triggers,
) -> Result<PrepareReport, StoreError> {
    let (old, new) = (authoritative, follower);
    let mut report = PrepareReport::default();
    for settings in tables {
        let name = &settings.name;
        let old_schema = load_table(old, name)
            .await
            .map_err(|e| e.in_store(roles.authoritative))?;
        let new_schema = load_table(new, name)
            .await
            .map_err(|e| e.in_store(roles.follower))?;
        let (old_schema, new_schema) = match (old_schema, new_schema) {
            (Some(o), Some(n)) => (o, n),
            (o, n) => {
                for (store, missing) in [
                    (roles.authoritative.name(), o.is_none()),
                    (roles.follower.name(), n.is_none()),
                ] {
                    if missing {
                        let problem = format!("table does not exist on {store}");
                        report.mismatches.push(Mismatch::new(name, problem));
                    }
                }
                continue;
            }
        };
        let key = effective_key(settings, &old_schema);
        report
            .mismatches
            .extend(compare_in(roles, &old_schema, &new_schema, &key));
        report.tables.push(PreparedTable {
            name: name.clone(),
            keys_table: (!key.is_empty()).then(|| keys_table_name(name)),
            key,
            old: old_schema,
            new: new_schema,
        });
    }
    report.mismatches.extend(shared_keys_tables(&report.tables));
    for table in &report.tables {
        if let Some(m) = stale_keys_table(new, roles.follower, table).await? {
            report.mismatches.push(m);
        }
    }

    if apply && report.is_ready() {
        create_side_objects(new, roles.follower, &new_side_ddl(&report.tables), &report.tables).await?;
        // READ COMMITTED whatever OLD's default: the capture boundary's snapshot must be taken
        // after the trigger's lock was granted, not at the transaction's first statement.
        let mut old_steps = vec![(
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED".to_owned(),
            "choosing READ COMMITTED".to_owned(),
        )];
        old_steps.extend(old_side_ddl());
        if triggers == Triggers::Set {
            old_steps.extend(capture_steps(tables, &report.tables));
        }
        create_side_objects(old, roles.authoritative, &old_steps, &[]).await?;
    }
    Ok(report)
}

/// Whether writes to a table in `phase` are captured on the authoritative store and mirrored
/// to the follower (OLD to NEW, and in `cutover` NEW to OLD).
pub fn captured_phase(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::DualWrite | Phase::ShadowRead | Phase::ReadShift | Phase::Cutover
    )
}

/// OLD's capture triggers ([`crate::capture`]): installed on the tables in a mirrored phase,
/// removed from the others.
fn capture_steps(settings: &[TableSettings], tables: &[PreparedTable]) -> Vec<Step> {
    let mut steps = Vec::new();
    for t in tables {
        let Some(s) = settings.iter().find(|s| s.name == t.name) else {
            continue;
        };
        let (sql, action) = if captured_phase(s.phase) {
            (
                crate::capture::install_sql(&t.name, &t.key, &t.old.columns, s.on_uncaptured),
                format!("installing the capture triggers on {}", t.name),
            )
        } else {
            (
                crate::capture::uninstall_sql(&t.name),
                format!("removing the capture triggers from {}", t.name),
            )
        };
        steps.extend(sql.into_iter().map(|q| (q, action.clone())));
    }
    steps
}

/// Configured tables whose keys-table names coincide (`a_b.c` and `a.b_c` both give
/// `switchyard_keys_a_b_c`).
fn shared_keys_tables(tables: &[PreparedTable]) -> Vec<Mismatch> {
    let mut first_user: HashMap<&str, &TableName> = HashMap::new();
    let mut out = Vec::new();
    for t in tables {
        let Some(keys_table) = &t.keys_table else {
            continue;
        };
        if let Some(earlier) = first_user.insert(keys_table, &t.name) {
            out.push(Mismatch::new(
                &t.name,
                format!(
                    "its keys table {SIDE_SCHEMA}.{keys_table} would also be the one of {earlier}; \
                     migrate one of the two tables in a separate run"
                ),
            ));
            first_user.insert(keys_table, earlier);
        }
    }
    out
}

/// The layout `table`'s keys table must have: `(column, type)` in order, NOT NULL throughout.
fn keys_table_layout(table: &PreparedTable) -> Vec<(String, String)> {
    let mut columns: Vec<(String, String)> = table
        .key
        .iter()
        .map(|k| {
            let type_name = table
                .new
                .column(k)
                .map(|c| c.type_name.clone())
                .unwrap_or_default();
            (k.clone(), type_name)
        })
        .collect();
    columns.extend(KEYS_TABLE_BOOKKEEPING.map(|(n, t)| (n.to_owned(), t.to_owned())));
    columns
}

/// A mismatch when `table`'s keys table already exists on NEW with other columns or another
/// primary key than it would be created with now.
async fn stale_keys_table(
    new: &PgPool,
    role: Role,
    table: &PreparedTable,
) -> Result<Option<Mismatch>, StoreError> {
    let Some(keys_table) = &table.keys_table else {
        return Ok(None);
    };
    let side_name = TableName::new(SIDE_SCHEMA, keys_table.as_str());
    let Some(existing) = load_table(new, &side_name).await.map_err(|e| e.in_store(role))? else {
        return Ok(None);
    };
    let want = keys_table_layout(table);
    let have: Vec<(String, String)> = existing
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.type_name.clone()))
        .collect();
    if have == want && existing.columns.iter().all(|c| c.not_null) && existing.primary_key == table.key {
        return Ok(None);
    }
    let show = |cols: &[(String, String)]| {
        cols.iter()
            .map(|(n, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(Some(Mismatch::new(
        &table.name,
        format!(
            "keys table {side_name} already exists on {} with columns ({}) and primary key ({}), but \
             key ({}) needs columns ({}); it holds version records from an earlier prepare, so it is \
             left alone: restore the earlier key, or drop it before dual writes begin",
            role.name(),
            show(&have),
            column_list(&existing.primary_key),
            column_list(&table.key),
            show(&want),
        ),
    )))
}

/// `"switchyard"."name"`.
pub(crate) fn side(name: &str) -> String {
    format!("{}.{}", quote_ident(SIDE_SCHEMA), quote_ident(name))
}

/// A statement and what it does, for error messages.
pub(crate) type Step = (String, String);

/// Serializes concurrent `prepare` runs on one store: `CREATE SCHEMA/TABLE IF NOT EXISTS` racing
/// each other can fail with a unique violation on the catalogs.
pub(crate) fn lock_step() -> Step {
    (
        "SELECT pg_advisory_xact_lock(hashtextextended('switchyard.prepare', 0))".to_owned(),
        "waiting for other prepare runs".to_owned(),
    )
}

pub(crate) fn schema_step() -> Step {
    (
        format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(SIDE_SCHEMA)),
        format!("creating schema {SIDE_SCHEMA}"),
    )
}

fn create_step(name: &str, body: &str) -> Step {
    (
        format!("CREATE TABLE IF NOT EXISTS {} ({body})", side(name)),
        format!("creating {SIDE_SCHEMA}.{name}"),
    )
}

/// NEW's side objects for `tables`.
fn new_side_ddl(tables: &[PreparedTable]) -> Vec<Step> {
    let mut steps = vec![
        lock_step(),
        schema_step(),
        create_step(
            TABLES_TABLE,
            "table_name text PRIMARY KEY, keys_table text, key_columns text[] NOT NULL, \
             prepared_at timestamptz NOT NULL DEFAULT now()",
        ),
        create_step(
            APPLIED_TABLE,
            "intent_id bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()",
        ),
    ];
    steps.extend(crate::backfill_state::backfill_ddl());
    for table in tables {
        let Some(keys_table) = &table.keys_table else {
            continue;
        };
        let mut columns: Vec<String> = keys_table_layout(table)
            .into_iter()
            .take(table.key.len())
            .map(|(name, type_name)| format!("{} {type_name} NOT NULL", quote_ident(&name)))
            .collect();
        columns.extend([
            "sy_version bigint NOT NULL".to_owned(),
            "sy_deleted boolean NOT NULL DEFAULT false".to_owned(),
            "sy_updated_at timestamptz NOT NULL DEFAULT now()".to_owned(),
        ]);
        let key: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
        columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
        steps.push(create_step(keys_table, &columns.join(", ")));
    }
    steps
}

/// OLD's side objects.
fn old_side_ddl() -> Vec<Step> {
    vec![
        lock_step(),
        schema_step(),
        create_step(
            INTENTS_TABLE,
            "id bigint PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), proxy text NOT NULL, \
             changes jsonb NOT NULL",
        ),
        // A client session records its transaction's intent itself, with whatever role it runs
        // as (`SET ROLE` to one bound by row-level security, say): every role may add an
        // intent, none may read, change or delete one. (An intent only makes the repair copy
        // the keys it lists from OLD again.)
        (
            format!("GRANT USAGE ON SCHEMA {} TO PUBLIC", quote_ident(SIDE_SCHEMA)),
            format!("letting every role reach {SIDE_SCHEMA}.{INTENTS_TABLE}"),
        ),
        (
            format!("GRANT INSERT ON {} TO PUBLIC", side(INTENTS_TABLE)),
            format!("letting every role record intents in {SIDE_SCHEMA}.{INTENTS_TABLE}"),
        ),
        create_step(
            STALE_READS_TABLE,
            "intent_id bigint PRIMARY KEY, recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()",
        ),
        create_step(
            VERIFY_TABLE,
            "table_name text PRIMARY KEY, reason text NOT NULL, marked_at timestamptz NOT NULL DEFAULT now()",
        ),
        (
            crate::capture::boundary_table_sql(),
            format!("creating {SIDE_SCHEMA}.{}", crate::capture::BOUNDARY_TABLE),
        ),
    ]
}

/// Runs `steps` in order on `conn` (a transaction); the first failure names its step.
pub(crate) async fn run_steps(conn: &mut PgConnection, role: Role, steps: &[Step]) -> Result<(), StoreError> {
    for (sql, action) in steps {
        sqlx::raw_sql(AssertSqlSafe(sql.as_str()))
            .execute(&mut *conn)
            .await
            .map_err(failed(role, action.as_str()))?;
    }
    Ok(())
}

/// The error for a failed statement on `role`'s store.
fn failed(role: Role, action: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let action = action.into();
    move |source| StoreError::Query {
        role: role.as_str(),
        action,
        source,
    }
}

/// Runs `steps` on `role`'s store in one transaction; on NEW, also upserts one
/// `switchyard_tables` row per table before committing.
async fn create_side_objects(
    pool: &PgPool,
    role: Role,
    steps: &[Step],
    register: &[PreparedTable],
) -> Result<(), StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(failed(role, "starting a transaction"))?;
    run_steps(&mut tx, role, steps).await?;
    let upsert = format!(
        "INSERT INTO {} (table_name, keys_table, key_columns) VALUES ($1, $2, $3) \
         ON CONFLICT (table_name) DO UPDATE SET keys_table = EXCLUDED.keys_table, \
         key_columns = EXCLUDED.key_columns, prepared_at = now()",
        side(TABLES_TABLE)
    );
    for table in register {
        sqlx::query(AssertSqlSafe(upsert.as_str()))
            .bind(table.name.to_string())
            .bind(table.keys_table.as_deref())
            .bind(&table.key)
            .execute(&mut *tx)
            .await
            .map_err(failed(
                role,
                format!("recording {} in {SIDE_SCHEMA}.{TABLES_TABLE}", table.name),
            ))?;
    }
    tx.commit()
        .await
        .map_err(failed(role, "committing the side objects"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::catalog::Column;

    fn table(name: &str, key: &[&str]) -> PreparedTable {
        let name: TableName = name.parse().unwrap();
        let schema = TableSchema {
            name: name.clone(),
            columns: vec![
                Column {
                    name: "Id".into(),
                    type_name: "uuid".into(),
                    type_oid: 2950,
                    not_null: true,
                    has_default: false,
                    generated: false,
                    identity: None,
                },
                Column {
                    name: "n".into(),
                    type_name: "character varying(20)".into(),
                    type_oid: 1043,
                    not_null: true,
                    has_default: false,
                    generated: false,
                    identity: None,
                },
            ],
            primary_key: vec![],
            unique_keys: vec![],
        };
        let key: Vec<String> = key.iter().map(|k| k.to_string()).collect();
        PreparedTable {
            keys_table: (!key.is_empty()).then(|| keys_table_name(&name)),
            name,
            key,
            old: schema.clone(),
            new: schema,
        }
    }

    #[test]
    fn keys_table_ddl_quotes_and_uses_new_types() {
        let steps = new_side_ddl(&[table("public.t", &["Id", "n"]), table("public.log", &[])]);
        let sql: Vec<&str> = steps.iter().map(|(s, _)| s.as_str()).collect();
        let backfill = crate::backfill_state::backfill_ddl().len();
        assert_eq!(sql.len(), 5 + backfill, "{sql:#?}");
        assert_eq!(
            sql[4 + backfill],
            "CREATE TABLE IF NOT EXISTS \"switchyard\".\"switchyard_keys_public_t\" (\"Id\" uuid NOT NULL, \
             \"n\" character varying(20) NOT NULL, sy_version bigint NOT NULL, sy_deleted boolean NOT NULL \
             DEFAULT false, sy_updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (\"Id\", \"n\"))"
        );
        assert!(sql[2].contains("\"switchyard\".\"switchyard_tables\""));
        assert!(old_side_ddl()[2].0.contains("changes jsonb NOT NULL"));
    }

    #[test]
    fn colliding_keys_tables_are_reported() {
        let found = shared_keys_tables(&[
            table("a_b.c", &["Id"]),
            table("a.b_c", &["Id"]),
            table("x.y", &[]),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].table.to_string(), "a.b_c");
        assert!(found[0].problem.contains("a_b.c"), "{}", found[0].problem);
    }
}
