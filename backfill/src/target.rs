//! Which tables to backfill, the checks they must pass, and the SQL each chunk runs.
//!
//! A chunk is a key range `(lo, hi]`. Bounds are the key columns' text forms (`col::text`, as
//! OLD prints them) and go back into SQL as literals cast to the column's type, so any key type
//! whose text form reads back as the same value (all built-in types; that is what `pg_dump`
//! relies on) works, composite keys included: ranges are row-value comparisons
//! `("a", "b") > (x, y)`, which a B-tree index on `(a, b)` serves directly.
//! <https://www.postgresql.org/docs/current/functions-comparisons.html#ROW-WISE-COMPARISON>

use switchyard_config::{Config, Phase, TableName, TableSettings};
use switchyard_store::mirror::escape_literal;
use switchyard_store::{
    compare, effective_key, keys_table, keys_table_name, load_table, quote_ident, quote_table, Identity,
    Mismatch, Role, TableSchema, SIDE_SCHEMA,
};

use crate::keyless::{self, Boundary};
use crate::BackfillError;

/// Type oids below this are built in (`FirstNormalObjectId`): their binary COPY form is the same
/// in every database. Arrays and composites of user-defined types carry their element type's
/// oid, which differs between OLD and NEW, so tables with such columns are copied as text.
/// <https://github.com/postgres/postgres/blob/master/src/include/access/transam.h>
const FIRST_NORMAL_OID: u32 = 16384;

/// One table to backfill, checked, with the pieces of SQL its chunks use.
#[derive(Debug, Clone)]
pub struct TargetTable {
    /// The table.
    pub name: TableName,
    /// Position among the tables of this run (names the staging table).
    pub index: usize,
    /// The key columns, in index order.
    pub key: Vec<String>,
    /// OLD's type of each key column, as SQL (`format_type`).
    key_types: Vec<String>,
    /// `"schema"."table"`.
    qualified: String,
    /// `"switchyard"."switchyard_keys_..."`.
    keys_table: String,
    /// The copied columns (OLD's columns that NEW stores and does not generate), quoted.
    columns: Vec<String>,
    /// `OVERRIDING SYSTEM VALUE` when NEW has an identity ALWAYS column among them.
    overriding: &'static str,
    /// COPY in binary (every copied column of a built-in type) or text.
    pub binary: bool,
    /// For a table without a key: when its capture began ([`crate::keyless`]).
    pub boundary: Option<Boundary>,
}

/// The tables a run works on: the `--table` names (each must be listed in the config and be in
/// `dual_write` or later), or every table in `dual_write` or later. Passthrough tables are left
/// out when no names are given.
pub fn select_tables(config: &Config, names: &[TableName]) -> Result<Vec<TableSettings>, BackfillError> {
    let chosen: Vec<TableSettings> = if names.is_empty() {
        let chosen: Vec<TableSettings> = config
            .tables
            .iter()
            .filter(|t| t.phase >= Phase::DualWrite)
            .cloned()
            .collect();
        for t in config.tables.iter().filter(|t| t.phase < Phase::DualWrite) {
            tracing::info!(table = %t.name, phase = %t.phase, "not backfilled: writes not mirrored yet");
        }
        chosen
    } else {
        let mut chosen = Vec::new();
        for name in names {
            let t = config
                .table(name)
                .ok_or_else(|| BackfillError::UnknownTable(name.clone()))?;
            if t.phase < Phase::DualWrite {
                return Err(BackfillError::NotMirrored {
                    table: name.clone(),
                    phase: t.phase,
                });
            }
            if !chosen.iter().any(|c: &TableSettings| &c.name == name) {
                chosen.push(t.clone());
            }
        }
        chosen
    };
    if chosen.is_empty() {
        return Err(BackfillError::NothingToDo);
    }
    Ok(chosen)
}

impl TargetTable {
    /// Loads `settings`' table on both stores and checks it can be backfilled: present on both,
    /// NEW compatible with OLD (`compare`), and either keyed with its keys table present on NEW,
    /// or without a key and with a capture boundary recorded on OLD.
    pub async fn check(
        old: &sqlx::PgPool,
        new: &sqlx::PgPool,
        settings: &TableSettings,
        index: usize,
    ) -> Result<TargetTable, BackfillError> {
        let name = &settings.name;
        let old_schema = load_table(old, name)
            .await
            .map_err(|e| e.in_store(Role::Old))?
            .ok_or_else(|| BackfillError::MissingTable {
                table: name.clone(),
                store: "OLD",
            })?;
        let new_schema = load_table(new, name)
            .await
            .map_err(|e| e.in_store(Role::New))?
            .ok_or_else(|| BackfillError::MissingTable {
                table: name.clone(),
                store: "NEW",
            })?;
        let key = effective_key(settings, &old_schema);
        let boundary = if key.is_empty() {
            Some(
                keyless::load_boundary(old, name)
                    .await?
                    .ok_or_else(|| BackfillError::NoBoundary { table: name.clone() })?,
            )
        } else {
            None
        };
        let problems = compare(&old_schema, &new_schema, &key);
        if !problems.is_empty() {
            return Err(BackfillError::Incompatible {
                table: name.clone(),
                problems,
            });
        }
        // The key columns must be copied: a key column NEW generates would leave the claims
        // without their key.
        let generated: Vec<String> = key
            .iter()
            .filter(|k| new_schema.column(k).is_some_and(|c| c.generated))
            .map(|k| format!("key column \"{k}\" is generated on NEW; the backfill copies key columns"))
            .collect();
        if !generated.is_empty() {
            return Err(BackfillError::Incompatible {
                table: name.clone(),
                problems: generated
                    .iter()
                    .map(|p| Mismatch::new(name, p.as_str()))
                    .collect(),
            });
        }
        if boundary.is_none() {
            let keys_table = keys_table_name(name);
            let fence = load_table(new, &TableName::new(SIDE_SCHEMA, keys_table.as_str()))
                .await
                .map_err(|e| e.in_store(Role::New))?;
            if fence.is_none() {
                return Err(BackfillError::NotPrepared {
                    table: name.clone(),
                    keys_table,
                });
            }
        }
        let mut target = TargetTable::new(name.clone(), index, key, &old_schema, &new_schema);
        target.boundary = boundary;
        Ok(target)
    }

    /// The SQL pieces for a checked table.
    pub fn new(
        name: TableName,
        index: usize,
        key: Vec<String>,
        old: &TableSchema,
        new: &TableSchema,
    ) -> TargetTable {
        let copied: Vec<&switchyard_store::Column> = old
            .columns
            .iter()
            .filter(|c| new.column(&c.name).is_some_and(|n| !n.generated))
            .collect();
        let overriding = if copied.iter().any(|c| {
            new.column(&c.name)
                .is_some_and(|n| matches!(n.identity, Some(Identity::Always)))
        }) {
            "OVERRIDING SYSTEM VALUE "
        } else {
            ""
        };
        let binary = copied.iter().all(|c| c.type_oid < FIRST_NORMAL_OID);
        let key_types = key
            .iter()
            .map(|k| old.column(k).map(|c| c.type_name.clone()).unwrap_or_default())
            .collect();
        TargetTable {
            qualified: quote_table(&name),
            keys_table: keys_table(&name),
            columns: copied.iter().map(|c| quote_ident(&c.name)).collect(),
            overriding,
            binary,
            key_types,
            key,
            name,
            index,
            boundary: None,
        }
    }

    /// On OLD, for a table without a key: the rows of blocks `[lo, hi)` committed before its
    /// capture began, as COPY data.
    pub fn keyless_copy_out_sql(&self, boundary: &Boundary, lo: i64, hi: i64) -> String {
        keyless::copy_out_sql(&self.qualified, &self.columns, self.format(), boundary, lo, hi)
    }

    fn key_list(&self, prefix: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{prefix}{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn order_by(&self, direction: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{}{direction}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ARRAY["a"::text, "b"::text]`: a key as its columns' text forms.
    fn key_as_text(&self) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("{}::text", quote_ident(k)))
            .collect();
        format!("ARRAY[{}]", parts.join(", "))
    }

    /// `(E'..'::bigint, E'..'::text)`: a bound as a row of typed literals.
    fn bound(&self, values: &[String]) -> String {
        let parts: Vec<String> = values
            .iter()
            .zip(&self.key_types)
            .map(|(v, t)| format!("{}::{t}", escape_literal(v)))
            .collect();
        format!("({})", parts.join(", "))
    }

    /// ` WHERE (key) > lo AND (key) <= hi`, either bound optional.
    fn range(&self, lo: Option<&[String]>, hi: Option<&[String]>) -> String {
        let key = format!("({})", self.key_list(""));
        let mut parts = Vec::new();
        if let Some(lo) = lo {
            parts.push(format!("{key} > {}", self.bound(lo)));
        }
        if let Some(hi) = hi {
            parts.push(format!("{key} <= {}", self.bound(hi)));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", parts.join(" AND "))
        }
    }

    /// On OLD: the largest key (the backfill's upper bound), as text forms.
    pub fn upper_bound_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
            self.key_as_text(),
            self.qualified,
            self.order_by(" DESC")
        )
    }

    /// On OLD: the planner's row estimate (`reltuples`, -1 when never analyzed).
    pub fn estimate_sql(&self) -> String {
        format!(
            "SELECT reltuples::int8 FROM pg_catalog.pg_class WHERE oid = {}::regclass",
            escape_literal(&self.qualified)
        )
    }

    /// On OLD: an exact count, when there is no estimate.
    pub fn count_sql(&self) -> String {
        format!("SELECT count(*) FROM {}", self.qualified)
    }

    /// On OLD: the upper bounds of the next `chunks` chunks of `rows` rows after `lo` (at most
    /// `upper`), in key order: every `rows`-th key. Fewer come back near the end.
    pub fn next_bounds_sql(&self, lo: Option<&[String]>, upper: &[String], rows: i64, chunks: i64) -> String {
        let rows = rows.max(1);
        format!(
            "SELECT b FROM (SELECT {text} AS b, row_number() OVER (ORDER BY {order}) AS n \
             FROM (SELECT {keys} FROM {table}{range} ORDER BY {order} LIMIT {limit}) AS s) AS x \
             WHERE n % {rows} = 0 ORDER BY n",
            text = self.key_as_text(),
            order = self.order_by(""),
            keys = self.key_list(""),
            table = self.qualified,
            range = self.range(lo, Some(upper)),
            limit = rows.saturating_mul(chunks.max(1)),
        )
    }

    fn format(&self) -> &'static str {
        if self.binary {
            "binary"
        } else {
            "text"
        }
    }

    /// On OLD: the chunk's rows, in key order, as COPY data.
    pub fn copy_out_sql(&self, lo: Option<&[String]>, hi: &[String]) -> String {
        self.copy_out_except_sql(lo, hi, &[])
    }

    /// `(key) IN (VALUES (..), (..))` for `keys`.
    fn key_in(&self, keys: &[Vec<String>]) -> String {
        let values: Vec<String> = keys.iter().map(|k| self.bound(k)).collect();
        format!("({}) IN (VALUES {})", self.key_list(""), values.join(", "))
    }

    /// On OLD: the chunk's rows except those of `except` (keys NEW already has records for).
    pub fn copy_out_except_sql(
        &self,
        lo: Option<&[String]>,
        hi: &[String],
        except: &[Vec<String>],
    ) -> String {
        let mut range = self.range(lo, Some(hi));
        if !except.is_empty() {
            range.push_str(&format!(" AND NOT {}", self.key_in(except)));
        }
        format!(
            "COPY (SELECT {} FROM {}{range} ORDER BY {}) TO STDOUT (FORMAT {})",
            self.columns.join(", "),
            self.qualified,
            self.order_by(""),
            self.format()
        )
    }

    /// On OLD: how many of `keys` have a row (to count what the fence skipped).
    pub fn count_keys_sql(&self, keys: &[Vec<String>]) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE {}",
            self.qualified,
            self.key_in(keys)
        )
    }

    /// On NEW: up to `limit` keys of the range that have a record, as text forms.
    pub fn records_in_range_sql(&self, lo: Option<&[String]>, hi: &[String], limit: i64) -> String {
        format!(
            "SELECT {} FROM {}{} LIMIT {limit}",
            self.key_as_text(),
            self.keys_table,
            self.range(lo, Some(hi))
        )
    }

    /// The fence: `"switchyard"."switchyard_keys_..."`.
    pub fn keys_table(&self) -> &str {
        &self.keys_table
    }

    /// `"schema"."table"`.
    pub fn qualified(&self) -> &str {
        &self.qualified
    }

    /// On NEW, fast path: COPY straight into the table.
    pub fn copy_into_table_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT {})",
            self.qualified,
            self.columns.join(", "),
            self.format()
        )
    }

    /// On NEW, fast path, after the COPY and under the fence lock: removes the rows of the
    /// range whose key has a tombstone (a mirrored delete that ran while the chunk's rows were
    /// not committed yet, and so did not see them).
    pub fn sweep_sql(&self, lo: Option<&[String]>, hi: &[String]) -> String {
        let keys = self.key_list("");
        format!(
            "DELETE FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM {fence}{range} AND sy_deleted)",
            table = self.qualified,
            fence = self.keys_table,
            range = self.range(lo, Some(hi)),
        )
    }

    /// The session's staging table for this table, `pg_temp.switchyard_staging_<index>`.
    fn staging(&self) -> String {
        format!("pg_temp.switchyard_staging_{}", self.index)
    }

    /// On NEW, once per connection: the staging table, with the copied columns of NEW's table
    /// (same types, no constraints, no indexes; temporary, so not WAL-logged), emptied at every
    /// commit.
    pub fn create_staging_sql(&self) -> String {
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS switchyard_staging_{} ON COMMIT DELETE ROWS AS \
             SELECT {} FROM {} WITH NO DATA",
            self.index,
            self.columns.join(", "),
            self.qualified
        )
    }

    /// On NEW: COPY into the staging table.
    pub fn copy_in_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT {})",
            self.staging(),
            self.columns.join(", "),
            self.format()
        )
    }

    /// On NEW, in the chunk's transaction: the fenced merge. Claims every staged key that has no
    /// record (version 0; `ON CONFLICT DO NOTHING` waits for a mirrored transaction holding an
    /// uncommitted record of the key, then skips it if that committed), then inserts the rows of
    /// the claimed keys only. Returns `(claimed, copied)`.
    pub fn merge_sql(&self) -> String {
        let keys = self.key_list("");
        let skeys = self.key_list("s.");
        let cols = self.columns.join(", ");
        let scols: Vec<String> = self.columns.iter().map(|c| format!("s.{c}")).collect();
        format!(
            "WITH claimed AS (\
               INSERT INTO {fence} ({keys}, sy_version, sy_deleted) \
               SELECT {keys}, 0, false FROM {staging} ORDER BY {order} \
               ON CONFLICT DO NOTHING RETURNING {keys}), \
             copied AS (\
               INSERT INTO {table} ({cols}) {ov}\
               SELECT {scols} FROM {staging} s WHERE ({skeys}) IN (SELECT {keys} FROM claimed) \
               ON CONFLICT ({keys}) DO NOTHING RETURNING 1) \
             SELECT (SELECT count(*) FROM claimed), (SELECT count(*) FROM copied)",
            fence = self.keys_table,
            staging = self.staging(),
            order = self.order_by(""),
            table = self.qualified,
            ov = self.overriding,
            scols = scols.join(", "),
        )
    }

    /// On NEW: removes up to `batch` tombstones (a tombstone turned back into a live record by a
    /// concurrent mirrored write is re-checked after its lock and kept).
    pub fn cleanup_sql(&self, batch: i64) -> String {
        format!(
            "DELETE FROM {fence} WHERE ({keys}) IN (SELECT {keys} FROM {fence} WHERE sy_deleted LIMIT {batch}) \
             AND sy_deleted",
            fence = self.keys_table,
            keys = self.key_list(""),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_store::Column;

    fn col(name: &str, type_name: &str, oid: u32) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid: oid,
            not_null: true,
            has_default: false,
            generated: false,
            identity: None,
        }
    }

    fn table() -> TargetTable {
        let name = TableName::new("public", "t");
        let schema = TableSchema {
            name: name.clone(),
            columns: vec![
                col("a", "bigint", 20),
                col("B b", "text", 25),
                col("v", "jsonb", 3802),
            ],
            primary_key: vec!["a".into(), "B b".into()],
            unique_keys: vec![vec!["a".into(), "B b".into()]],
        };
        TargetTable::new(name, 3, vec!["a".into(), "B b".into()], &schema, &schema)
    }

    #[test]
    fn ranges_are_row_comparisons_of_typed_literals() {
        let t = table();
        let lo = vec!["1".to_owned(), "it's".to_owned()];
        let hi = vec!["9".to_owned(), "z\\".to_owned()];
        assert_eq!(
            t.copy_out_sql(Some(&lo), &hi),
            "COPY (SELECT \"a\", \"B b\", \"v\" FROM \"public\".\"t\" WHERE (\"a\", \"B b\") > \
             (E'1'::bigint, E'it''s'::text) AND (\"a\", \"B b\") <= (E'9'::bigint, E'z\\\\'::text) \
             ORDER BY \"a\", \"B b\") TO STDOUT (FORMAT binary)"
        );
        let bounds = t.next_bounds_sql(None, &hi, 100, 4);
        assert!(
            bounds.contains("ORDER BY \"a\", \"B b\" LIMIT 400) AS s"),
            "{bounds}"
        );
        assert!(bounds.ends_with("WHERE n % 100 = 0 ORDER BY n"), "{bounds}");
        assert!(t
            .upper_bound_sql()
            .contains("ORDER BY \"a\" DESC, \"B b\" DESC LIMIT 1"));
    }

    #[test]
    fn keys_with_records_are_left_out_of_the_fast_copy() {
        let t = table();
        let hi = vec!["9".to_owned(), "z".to_owned()];
        let except = vec![vec!["5".to_owned(), "q".to_owned()]];
        let sql = t.copy_out_except_sql(None, &hi, &except);
        assert!(
            sql.contains("AND NOT (\"a\", \"B b\") IN (VALUES (E'5'::bigint, E'q'::text))"),
            "{sql}"
        );
        assert!(t
            .count_keys_sql(&except)
            .starts_with("SELECT count(*) FROM \"public\".\"t\" WHERE"));
    }

    #[test]
    fn merge_claims_then_copies_only_claimed_keys() {
        let sql = table().merge_sql();
        assert!(
            sql.contains("INSERT INTO \"switchyard\".\"switchyard_keys_public_t\""),
            "{sql}"
        );
        assert!(
            sql.contains("ON CONFLICT DO NOTHING RETURNING \"a\", \"B b\""),
            "{sql}"
        );
        assert!(sql.contains("IN (SELECT \"a\", \"B b\" FROM claimed)"), "{sql}");
        assert!(sql.contains("ON CONFLICT (\"a\", \"B b\") DO NOTHING"), "{sql}");
    }

    #[test]
    fn user_defined_types_switch_to_text_format() {
        let name = TableName::new("public", "t");
        let schema = TableSchema {
            name: name.clone(),
            columns: vec![col("a", "bigint", 20), col("m", "mood[]", 16500)],
            primary_key: vec!["a".into()],
            unique_keys: vec![vec!["a".into()]],
        };
        let t = TargetTable::new(name, 0, vec!["a".into()], &schema, &schema);
        assert!(!t.binary);
        assert!(t.copy_in_sql().ends_with("(FORMAT text)"));
    }
}
