//! The fenced apply of row images on NEW and the intent records on OLD.
//!
//! A mirrored transaction goes like this (the session drives it; see `docs/dual-writes.md`):
//!
//! 1. While OLD still holds the row locks of the client's transaction, NEW gets one round trip:
//!    `BEGIN`, one statement per captured client statement ([`apply_sql`]), and a row in
//!    `switchyard.switchyard_applied` naming the transaction's intent id.
//! 2. OLD gets the intent record ([`intent_sql`]: the keys, or for tables without a key the
//!    rows, the transaction changed) in the client's own transaction, then `COMMIT`.
//! 3. NEW gets `COMMIT`. Only then does the client hear its COMMIT.
//!
//! The intent is durable exactly when OLD's transaction is, so whatever happens to the proxy or
//! to NEW, OLD alone says which keys may be stale on NEW: an intent still present after its
//! transaction finished means "re-copy these keys". The proxy deletes its own intents once NEW
//! committed ([`delete_intents`]); what is left is repaired ([`crate::repair`]) by locking the
//! keys on NEW, re-reading them from OLD and writing them to NEW with a higher version. The
//! `switchyard_applied` row makes a repair of an intent whose NEW transaction did commit a no-op
//! (which matters for append-only tables, where re-inserting would duplicate rows).
//!
//! Every image write bumps the key's record in the table's `switchyard_keys_*` side table
//! (version + 1, deleted flag); the backfill only writes where no record exists, so it can never
//! overwrite a mirrored row or resurrect a deleted one.

use std::fmt::Write as _;
use std::time::Duration;

use switchyard_config::TableName;

use crate::{
    compare, keys_table, quote_ident, quote_table, Identity, Store, StoreError, TableSchema, SIDE_SCHEMA,
};

/// Maps a driver error to a [`StoreError::Query`] on `role` doing `action`.
pub(crate) fn failed(role: &'static str, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    move |source| StoreError::Query {
        role,
        action: action.to_owned(),
        source,
    }
}

/// What a captured statement did to its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// The rows now look like the images (INSERT, UPDATE, upsert).
    Upsert,
    /// The rows with these keys are gone.
    Delete,
    /// New rows of a table without a key.
    Append,
}

/// The row images one statement produced: JSON objects as `row_to_json` wrote them on OLD.
#[derive(Debug, Clone)]
pub struct Change {
    /// Index into the mirrored tables.
    pub table: usize,
    pub op: ChangeOp,
    pub rows: Vec<String>,
}

/// One mirrored table: its names and the SQL to apply images to it on NEW, built from both
/// stores' definitions of it as they were when they were read ([`MirrorTable::reload`] reads
/// them again after a schema change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorTable {
    pub name: TableName,
    /// Key columns; empty = append-only.
    pub key: Vec<String>,
    /// `switchyard.switchyard_keys_...`, quoted, when the table has a key.
    pub(crate) keys_table: Option<String>,
    /// `"schema"."table"`.
    pub(crate) qualified: String,
    /// Mirrored columns, quoted, comma separated.
    columns: String,
    /// `OVERRIDING SYSTEM VALUE ` when NEW has an identity ALWAYS column among them.
    overriding: &'static str,
    /// `c = EXCLUDED.c, ...` for the non-key columns.
    set_list: String,
    keys_list: String,
    /// OLD's columns, in `attnum` order: the keys of every row image `row_to_json` makes on OLD,
    /// in that order, as long as OLD's definition is the one read.
    old_columns: Vec<String>,
    /// Why NEW's table cannot take OLD's images as the definitions stand ([`compare`]); empty
    /// when it can.
    mismatches: Vec<String>,
}

impl MirrorTable {
    /// Builds the apply statements for a table: the columns OLD has and NEW stores (generated
    /// columns on NEW compute their own values), keyed by `key`.
    pub fn new(name: TableName, key: Vec<String>, old: &TableSchema, new: &TableSchema) -> MirrorTable {
        let mirrored: Vec<&str> = old
            .columns
            .iter()
            .filter_map(|c| new.column(&c.name))
            .filter(|c| !c.generated)
            .map(|c| c.name.as_str())
            .collect();
        let overriding = if mirrored.iter().any(|c| {
            new.column(c)
                .is_some_and(|c| matches!(c.identity, Some(Identity::Always)))
        }) {
            "OVERRIDING SYSTEM VALUE "
        } else {
            ""
        };
        let quote_list = |cols: &[&str]| cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let key_refs: Vec<&str> = key.iter().map(String::as_str).collect();
        let set_list = mirrored
            .iter()
            .filter(|c| !key.iter().any(|k| k == *c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        MirrorTable {
            keys_table: (!key.is_empty()).then(|| keys_table(&name)),
            qualified: quote_table(&name),
            columns: quote_list(&mirrored),
            overriding,
            set_list,
            keys_list: quote_list(&key_refs),
            old_columns: old.columns.iter().map(|c| c.name.clone()).collect(),
            mismatches: compare(old, new, &key).into_iter().map(|m| m.problem).collect(),
            name,
            key,
        }
    }

    /// Reads the table's definition again from both stores' catalogs and builds it anew, with
    /// the same key. A table missing on either store is not an error here: the table it returns
    /// says so in its [`MirrorTable::mismatch`] (and applies nothing).
    pub async fn reload(&self, authoritative: &Store, follower: &Store) -> Result<MirrorTable, StoreError> {
        let old_schema = authoritative.load_table(&self.name).await?;
        let new_schema = follower.load_table(&self.name).await?;
        Ok(match (old_schema, new_schema) {
            (Some(o), Some(n)) => MirrorTable::new(self.name.clone(), self.key.clone(), &o, &n),
            (o, _) => {
                let mut gone = self.clone();
                let store = if o.is_none() {
                    authoritative.role().name()
                } else {
                    follower.role().name()
                };
                gone.mismatches = vec![format!("the table does not exist on {store}")];
                gone
            }
        })
    }

    /// Why NEW cannot take this table's images as the two definitions stand (every problem
    /// [`compare`] found, joined), or `None` when it can.
    pub fn mismatch(&self) -> Option<String> {
        (!self.mismatches.is_empty()).then(|| self.mismatches.join("; "))
    }

    /// Whether `image` (a row image of this table from OLD: a JSON object as `row_to_json`
    /// writes it) has exactly OLD's columns as this table knows them, in order. `false` means
    /// OLD's definition changed since it was read (a column added, dropped or renamed). Reads
    /// the keys only: values are skipped without being built, and nothing is allocated.
    pub fn image_matches(&self, image: &str) -> bool {
        let mut de = serde_json::Deserializer::from_str(image);
        serde::Deserializer::deserialize_map(&mut de, ColumnsSeen(&self.old_columns)).unwrap_or(false)
    }

    /// Whether the table has a key (else it is mirrored append-only).
    pub fn keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// The statements applying `op` with the image array `images` (an SQL literal of a JSON
    /// array) to NEW, bumping the key records: one for an upsert or an append, two for a delete
    /// (see below).
    fn apply_statements(&self, op: ChangeOp, images: &str) -> Vec<String> {
        let mut out = String::new();
        let t = &self.qualified;
        let cols = &self.columns;
        let keys = &self.keys_list;
        let ov = self.overriding;
        let img = format!("json_populate_recordset(NULL::{t}, {images}::json)");
        // A transaction's images can hold one key several times (written twice, deleted and
        // written again); one statement may touch a row only once, so each statement keeps the
        // last image of every key, in the order the images came.
        let last_per_key = {
            let keys = self
                .key
                .iter()
                .map(|c| format!("r.{}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "(SELECT DISTINCT ON ({keys}) r.* FROM json_array_elements({images}::json) WITH ORDINALITY AS e(j, n), \
                 LATERAL json_populate_record(NULL::{t}, e.j) AS r ORDER BY {keys}, e.n DESC) AS img"
            )
        };
        match (op, &self.keys_table) {
            (ChangeOp::Append, _) | (_, None) => {
                let _ = write!(out, "INSERT INTO {t} ({cols}) {ov}SELECT {cols} FROM {img}");
            }
            (ChangeOp::Upsert, Some(k)) => {
                let conflict = if self.set_list.is_empty() {
                    "DO NOTHING".to_owned()
                } else {
                    format!("DO UPDATE SET {}", self.set_list)
                };
                let _ = write!(
                    out,
                    "WITH img AS (SELECT * FROM {last_per_key}), \
                     w AS (INSERT INTO {t} AS t ({cols}) {ov}SELECT {cols} FROM img ON CONFLICT ({keys}) {conflict}), \
                     v AS (INSERT INTO {k} AS v ({keys}, sy_version, sy_deleted) SELECT {keys}, 1, false FROM img \
                     ON CONFLICT ({keys}) DO UPDATE SET sy_version = v.sy_version + 1, sy_deleted = false, sy_updated_at = now()) \
                     SELECT 1"
                );
            }
            (ChangeOp::Delete, Some(k)) => {
                // The tombstone first, in a statement of its own, and then the DELETE with a
                // snapshot taken after it: the tombstone's upsert waits for any transaction
                // that holds the key's record (a mirrored insert of the key whose NEW commit is
                // still in flight), so the DELETE sees that row and removes it. In one statement
                // the DELETE's snapshot predates that commit, misses the row, and NEW keeps a
                // row under a tombstone (found by the protocol model, model/README.md).
                let on = self
                    .key
                    .iter()
                    .map(|c| format!("t.{0} = img.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let tombstone = format!(
                    "INSERT INTO {k} AS v ({keys}, sy_version, sy_deleted) SELECT {keys}, 1, true FROM {last_per_key} \
                     ON CONFLICT ({keys}) DO UPDATE SET sy_version = v.sy_version + 1, sy_deleted = true, sy_updated_at = now()"
                );
                let delete = format!(
                    "DELETE FROM {t} AS t USING (SELECT {keys} FROM {last_per_key}) AS img WHERE {on}"
                );
                return vec![tombstone, delete];
            }
        }
        vec![out]
    }

    /// The apply statements for `op` with the image array as parameter `$1` (text, a JSON
    /// array), in order, for preparing once per connection.
    pub fn prepared_apply(&self, op: ChangeOp) -> Vec<String> {
        self.apply_statements(op, "$1")
    }
}

/// Reads a JSON object's keys and answers whether they are exactly the given columns, in order.
struct ColumnsSeen<'a>(&'a [String]);

impl<'de> serde::de::Visitor<'de> for ColumnsSeen<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a row image")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut expected = self.0.iter();
        let mut same = true;
        loop {
            let column = expected.next().map(String::as_str);
            match map.next_key_seed(KeyIs(column))? {
                Some(matched) => {
                    same &= matched;
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                // No more keys: a match if no more columns were expected either.
                None => return Ok(same && column.is_none()),
            }
        }
    }
}

/// A map key compared with the column expected at its place (`None`: no more columns).
struct KeyIs<'a>(Option<&'a str>);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a column name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(self.0 == Some(key))
    }
}

/// An SQL string literal that means the same whatever `standard_conforming_strings` says.
pub fn escape_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    push_escaped(&mut out, s);
    out.push('\'');
    out
}

/// Appends `s` escaped for the inside of an `E'...'` literal (see [`escape_literal`]).
pub fn push_escaped(out: &mut String, s: &str) {
    if !s.contains(['\'', '\\']) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
}

/// The advisory lock on NEW that orders mirrored deletes of `table` against the backfill's
/// tombstone sweep. Every transaction that deletes rows of the table on NEW takes it shared, in a
/// statement of its own before its first delete (so the delete's snapshot is taken after the
/// lock is held); a backfill chunk that copied rows without claiming their keys takes it
/// exclusive, after its COPY and before it removes the copied rows that have a tombstone. So a
/// delete that missed a chunk's uncommitted row has committed its tombstone before the chunk
/// looks for tombstones, and a delete that begins after the chunk took the lock waits for the
/// chunk's commit and then sees its rows. See docs/backfill.md, "Fencing".
/// <https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS>
pub fn fence_lock_sql(table: &TableName, exclusive: bool) -> String {
    let function = if exclusive {
        "pg_advisory_xact_lock"
    } else {
        "pg_advisory_xact_lock_shared"
    };
    format!(
        "SELECT {function}(hashtextextended({}, 0))",
        escape_literal(&format!("switchyard.fence {table}"))
    )
}

/// Whether `changes[i]` must be preceded by its table's fence lock ([`fence_lock_sql`]): it is
/// the transaction's first delete of rows of that table (the lock is held to the end of the
/// transaction, so later deletes of the same table need not take it again).
pub fn takes_fence_lock(changes: &[Change], i: usize) -> bool {
    let is_delete = |c: &Change| c.op == ChangeOp::Delete && !c.rows.is_empty();
    let Some(c) = changes.get(i).filter(|c| is_delete(c)) else {
        return false;
    };
    !changes[..i].iter().any(|d| d.table == c.table && is_delete(d))
}

/// The statements of `changes` (with their images inlined) as one simple-protocol string, each
/// table's first delete preceded by the fence lock.
pub(crate) fn push_changes(tables: &[MirrorTable], changes: &[Change], sql: &mut String) {
    for (i, c) in changes.iter().enumerate().filter(|(_, c)| !c.rows.is_empty()) {
        let Some(table) = tables.get(c.table) else {
            continue;
        };
        if takes_fence_lock(changes, i) {
            sql.push_str(&fence_lock_sql(&table.name, false));
            sql.push(';');
        }
        for statement in table.apply_statements(c.op, &escape_literal(&json_array(&c.rows))) {
            sql.push_str(&statement);
            sql.push(';');
        }
    }
}

/// The statement marking an intent as applied on NEW (parameter `$1`: the intent id).
pub const APPLIED_SQL: &str = "INSERT INTO switchyard.switchyard_applied (intent_id) VALUES ($1)";

/// The rows of a change as one JSON array (the parameter of [`MirrorTable::prepared_apply`]).
pub fn json_array(rows: &[String]) -> String {
    let mut s = String::with_capacity(rows.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
    s.push('[');
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(r);
    }
    s.push(']');
    s
}

/// The statements of step 1 on NEW, as one simple-protocol string: `BEGIN`, the changes in
/// order, and the applied marker for `intent_id`.
pub fn apply_sql(tables: &[MirrorTable], changes: &[Change], intent_id: i64) -> String {
    let mut sql = String::from("BEGIN;");
    push_changes(tables, changes, &mut sql);
    let _ = write!(
        sql,
        "INSERT INTO {}.switchyard_applied (intent_id) VALUES ({intent_id})",
        quote_ident(SIDE_SCHEMA)
    );
    sql
}

/// The intent record of a transaction, to run on OLD inside the client's transaction just
/// before its COMMIT: for keyed tables the keys changed, for the others the rows appended (see
/// [`crate::intent::IntentKeys`], which builds it image by image).
pub fn intent_sql(tables: &[MirrorTable], changes: &[Change], intent_id: i64, proxy: &str) -> String {
    let mut intent = crate::intent::IntentKeys::new();
    for c in changes {
        intent.add(tables, c);
    }
    intent.sql(tables, intent_id, proxy)
}

/// Of `ids` (intents whose NEW transaction committed, with `synchronous_commit = off`), those
/// whose NEW commit is on disk: waits (up to `wait`) until NEW's WAL is flushed past every
/// commit that had returned when this was called, then keeps the ids whose applied marker NEW
/// has. A NEW that crashed meanwhile lost the markers of the transactions it lost, so those
/// ids are left out (their intents stay and are repaired), even though a restarted NEW's WAL
/// position soon passes the old one. `None`: not flushed within `wait` (try again later).
pub async fn durable_on_follower(
    follower: &Store,
    ids: &[i64],
    wait: Duration,
) -> Result<Option<Vec<i64>>, StoreError> {
    let Store::Postgres(new) = follower;
    let (new, new_role) = (new.pool(), new.role().as_str());
    let nerr = failed(new_role, "checking that mirrored commits are on disk");
    let mut conn = new.acquire().await.map_err(nerr)?;
    // <https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-BACKUP>
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(nerr)?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let flushed: bool = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
            .bind(&target)
            .fetch_one(&mut *conn)
            .await
            .map_err(nerr)?;
        if flushed {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT intent_id FROM switchyard.switchyard_applied WHERE intent_id = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(nerr)?;
    Ok(Some(applied))
}

/// For a cutover barrier, when no mirrored transaction runs: makes the follower's WAL durable up
/// to now with one synchronous commit (every commit record before it is then on disk), and
/// deletes the intents whose applied marker the follower holds, as the engines' cleanup would a
/// moment later. Returns how many intents are left: their follower side is missing, a repair's
/// to do.
pub async fn settle_intents(authoritative: &Store, follower: &Store) -> Result<usize, StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old_pool, old_role) = (old.pool(), old.role().as_str());
    let Store::Postgres(new) = follower;
    let (new_pool, new_role) = (new.pool(), new.role().as_str());
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM switchyard.switchyard_intents")
        .fetch_all(old_pool)
        .await
        .map_err(failed(old_role, "listing intents"))?;
    if ids.is_empty() {
        return Ok(0);
    }
    let nerr = failed(new_role, "flushing the follower's WAL");
    let mut tx = new_pool.begin().await.map_err(nerr)?;
    // A transaction with an id writes a commit record; synchronous_commit makes its commit wait
    // until the WAL up to that record is flushed.
    // <https://www.postgresql.org/docs/current/wal-async-commit.html>
    sqlx::raw_sql("SET LOCAL synchronous_commit = on; SELECT pg_catalog.txid_current()")
        .execute(&mut *tx)
        .await
        .map_err(failed(new_role, "flushing the follower's WAL"))?;
    tx.commit()
        .await
        .map_err(failed(new_role, "flushing the follower's WAL"))?;
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT intent_id FROM switchyard.switchyard_applied WHERE intent_id = ANY($1)")
            .bind(&ids)
            .fetch_all(new_pool)
            .await
            .map_err(failed(new_role, "reading applied markers"))?;
    delete_intents(authoritative, follower, &applied).await?;
    Ok(ids.len() - applied.len())
}

/// Deletes intents whose NEW transaction committed (on OLD), then their applied markers (on
/// NEW). Call it only with ids [`durable_on_follower`] returned. Markers are only removed after
/// their intents, so a repair never sees an intent without its marker when the NEW transaction
/// did commit.
pub async fn delete_intents(authoritative: &Store, follower: &Store, ids: &[i64]) -> Result<(), StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    let Store::Postgres(new) = follower;
    let (new, new_role) = (new.pool(), new.role().as_str());
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM switchyard.switchyard_intents WHERE id = ANY($1)")
        .bind(ids)
        .execute(old)
        .await
        .map_err(failed(old_role, "deleting finished intents"))?;
    sqlx::query("DELETE FROM switchyard.switchyard_applied WHERE intent_id = ANY($1)")
        .bind(ids)
        .execute(new)
        .await
        .map_err(failed(new_role, "deleting applied markers"))?;
    Ok(())
}

/// Marks a table on OLD as needing a full verification (a write the proxy could not capture
/// ran there).
pub async fn mark_for_verify(
    authoritative: &Store,
    table: &TableName,
    reason: &str,
) -> Result<(), StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    sqlx::query(
        "INSERT INTO switchyard.switchyard_verify (table_name, reason) VALUES ($1, $2) \
         ON CONFLICT (table_name) DO UPDATE SET reason = EXCLUDED.reason, marked_at = now()",
    )
    .bind(table.to_string())
    .bind(reason)
    .execute(old)
    .await
    .map_err(failed(old_role, "marking a table for verification"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{escape_literal, takes_fence_lock, Change, ChangeOp, MirrorTable};
    use crate::{Column, TableSchema};
    use switchyard_config::TableName;

    fn schema(columns: &[&str]) -> TableSchema {
        TableSchema {
            name: TableName::new("public", "t"),
            columns: columns
                .iter()
                .map(|c| Column {
                    name: (*c).to_owned(),
                    type_name: "text".to_owned(),
                    type_oid: 25,
                    not_null: *c == "id",
                    has_default: false,
                    generated: false,
                    identity: None,
                })
                .collect(),
            primary_key: vec!["id".to_owned()],
            unique_keys: vec![vec!["id".to_owned()]],
        }
    }

    fn table(old: &[&str], new: &[&str]) -> MirrorTable {
        MirrorTable::new(
            TableName::new("public", "t"),
            vec!["id".to_owned()],
            &schema(old),
            &schema(new),
        )
    }

    #[test]
    fn images_match_exactly_the_columns_of_old_in_order() {
        let t = table(&["id", "v", "a\"b"], &["id", "v", "a\"b"]);
        assert!(t.mismatch().is_none());
        assert!(t.image_matches(r#"{"id":1,"v":{"x":[1,"}",null]},"a\"b":"\u0041"}"#));
        assert!(
            t.image_matches(r#"{"id":1.5e300,"v":null,"a\u0022b":true}"#),
            "escaped key"
        );
        assert!(!t.image_matches(r#"{"id":1,"v":"x"}"#), "a column dropped");
        assert!(
            !t.image_matches(r#"{"id":1,"v":"x","a\"b":1,"note":2}"#),
            "a column added"
        );
        assert!(!t.image_matches(r#"{"id":1,"a\"b":1,"v":"x"}"#), "another order");
        assert!(!t.image_matches(r#"{"id":1,"w":"x","a\"b":1}"#), "renamed");
        assert!(!t.image_matches("[1]"), "not an object");
        assert!(!t.image_matches(r#"{"id":1,"v""#), "cut short");
    }

    #[test]
    fn a_column_only_old_has_holds_the_table() {
        let t = table(&["id", "v", "note"], &["id", "v"]);
        assert!(t
            .mismatch()
            .is_some_and(|m| m.contains("\"note\" exists on OLD but not on NEW")));
        assert!(table(&["id", "v"], &["id", "v", "note"]).mismatch().is_none());
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(
            escape_literal(r#"{"a":"it's \"x\"\\"}"#),
            r#"E'{"a":"it''s \\"x\\"\\\\"}'"#
        );
    }
    #[test]
    fn each_table_takes_the_fence_lock_before_its_first_delete_only() {
        let change = |table, op, rows: usize| Change {
            table,
            op,
            rows: vec!["{}".to_owned(); rows],
        };
        let changes = [
            change(0, ChangeOp::Upsert, 1),
            change(0, ChangeOp::Delete, 0),
            change(0, ChangeOp::Delete, 2),
            change(1, ChangeOp::Delete, 1),
            change(0, ChangeOp::Delete, 1),
            change(1, ChangeOp::Append, 1),
        ];
        let locks: Vec<bool> = (0..changes.len())
            .map(|i| takes_fence_lock(&changes, i))
            .collect();
        assert_eq!(locks, [false, false, true, true, false, false]);
        assert!(!takes_fence_lock(&changes, changes.len()));
    }
}
