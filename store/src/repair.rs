//! Repairs: re-copying from OLD to NEW the keys of intents whose NEW transaction failed, was
//! lost, or is in doubt, and the queue of intents that need one.
//!
//! # Ordering a repair against live writes of the same keys
//!
//! A repair must leave on NEW the value OLD has for each key *after* every write OLD committed
//! before the repair's NEW commit, or a later write of its own must follow. It cannot rely on
//! OLD's row locks: a key the intent lists may be absent on OLD (deleted), and an absent row has
//! nothing to lock, so `SELECT ... FOR UPDATE` on OLD does not stop a client from inserting it
//! again meanwhile. So a repair locks the *key* on NEW instead, through the record every mirrored
//! write of that key also upserts (`switchyard.switchyard_keys_<table>`):
//!
//! 1. In its NEW transaction, first upsert the record of every key of the intent (`ON CONFLICT
//!    DO UPDATE`, which takes the record's row lock, also for a key NEW never had), tables in
//!    name order and keys in key order, so two repairs lock shared keys in the same order.
//! 2. Then read the keys from OLD, a plain `READ COMMITTED` read (no locks).
//! 3. Write the rows to NEW with a higher version (deleting the keys OLD lacks), commit NEW,
//!    then delete the intent on OLD.
//!
//! Why OLD's committed value of a locked key cannot move between 2 and 3 unseen: a write of the
//! key through the proxy holds the key's OLD row lock (or, for an insert, its uncommitted row),
//! applies its images to NEW (needing the key's record lock on NEW) and only then commits OLD.
//! While the repair holds the record lock, such a write cannot get past step 1 of its commit
//! sequence, so it cannot commit on OLD before the repair commits on NEW; after that, it applies
//! on NEW over the repair's row, in order. A write whose NEW apply fails or times out commits on
//! OLD without the NEW lock, but it leaves an intent of its own, repaired later (its repair
//! waits for this one's record locks and then reads OLD after this one committed). And a write
//! that held the record lock before the repair (its NEW transaction open, OLD committing)
//! commits OLD before NEW, so when the repair gets the lock, OLD's commit is already visible to
//! the read that follows.
//!
//! No deadlock is added between the proxy and the repairs: the proxy takes OLD's lock, then
//! NEW's; a repair takes NEW's and then reads OLD without waiting on any lock there, so no cycle
//! goes through OLD. On NEW alone, a proxy transaction that writes several keys of one intent in
//! another order than the repair can still deadlock with it; PostgreSQL detects that and aborts
//! one of them (a failed proxy apply leaves an intent, a failed repair is retried), and the
//! bounded statements on the mirror's connections keep any wait short.
//!
//! OLD is read in one canonical output format (UTC, all float digits, ISO dates, `postgres`
//! intervals, hex bytea), and the keys listed in the intent are matched against the rows OLD
//! has by the server, as values of the key columns' types, not as JSON text (a `timestamptz`
//! key written by a client in another time zone is the same key).

use std::collections::HashSet;

use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::mirror::{failed, json_array, push_changes, Change, ChangeOp, MirrorTable};
use crate::{quote_ident, Store, StoreError};

/// Intents that need a repair: those of this proxy listed in `mine` (its NEW commit failed),
/// anyone's older than `stale_secs` (their proxy likely died between the two commits), and every
/// one the capture trigger's net wrote (a change no proxy mirrored; [`crate::capture`]), oldest
/// first, leaving out the ids in `skip` (intents backing off after a failure, or that this proxy
/// cannot repair).
pub async fn pending_intents(
    authoritative: &Store,
    mine: &[i64],
    skip: &[i64],
    stale_secs: f64,
    limit: i64,
) -> Result<Vec<PendingIntent>, StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    let rows = sqlx::query(
        "SELECT id, pg_column_size(changes)::int8 FROM switchyard.switchyard_intents \
         WHERE (id = ANY($1) OR created_at < now() - make_interval(secs => $2) OR proxy = $5) \
         AND NOT id = ANY($4) ORDER BY created_at LIMIT $3",
    )
    .bind(mine)
    .bind(stale_secs)
    .bind(limit)
    .bind(skip)
    .bind(crate::capture::NET_PROXY)
    .fetch_all(old)
    .await
    .map_err(failed(old_role, "listing intents to repair"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(PendingIntent {
                id: r.try_get(0).ok()?,
                stored_bytes: r.try_get(1).unwrap_or(0),
            })
        })
        .collect())
}

/// An intent waiting for a repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingIntent {
    pub id: i64,
    /// The size of its key list as stored on OLD (compressed): a large one takes longer.
    pub stored_bytes: i64,
}

/// How many intents exist on OLD (transactions whose NEW side is unconfirmed or pending repair).
pub async fn count_intents(authoritative: &Store) -> Result<i64, StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    sqlx::query_scalar("SELECT count(*) FROM switchyard.switchyard_intents")
        .fetch_one(old)
        .await
        .map_err(failed(old_role, "counting intents"))
}

/// What a repair did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairOutcome {
    /// Keys re-copied (upserted or deleted on NEW) and rows appended.
    Repaired { keys: usize, appended: usize },
    /// NEW already had the transaction; the intent was removed once NEW's WAL held it.
    AlreadyApplied,
    /// Another proxy holds the intent, or it is gone.
    Skipped,
    /// The intent names a table this proxy does not mirror: it is left in place for a proxy
    /// that mirrors it.
    Unmirrored { table: String },
    /// The intent names a table whose definitions (as given) NEW cannot take OLD's rows with, or
    /// OLD's rows no longer have the columns the given definition lists (OLD's schema changed
    /// since it was read). Nothing was written; the intent stays. Read the table's definitions
    /// again ([`MirrorTable::reload`]) and retry once they match.
    SchemaChanged { table: String, problem: String },
}

/// The output settings of the repair's OLD transaction: row images in one canonical form,
/// whatever the server's or the role's defaults.
/// <https://www.postgresql.org/docs/current/runtime-config-client.html#RUNTIME-CONFIG-CLIENT-FORMAT>
const CANONICAL_OUTPUT: &str = "SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 3; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL bytea_output = 'hex'; SET LOCAL DateStyle = 'ISO, MDY'";

/// Keys read from OLD and written to NEW per statement in a repair: what the repair holds in
/// memory at a time (the rows of one batch), whatever the size of the intent.
const REPAIR_BATCH: usize = 10_000;

/// One entry of an intent: a mirrored table, its keys (the elements of JSON arrays of at most
/// [`REPAIR_BATCH`] key objects, as text) and its appended rows.
struct Entry {
    table: usize,
    keys: Vec<String>,
    rows: Batches,
}

/// An intent's entry as stored: `k` and `r` are read element by element into text batches,
/// so a million keys never become a million parsed objects at once.
#[derive(serde::Deserialize)]
struct StoredEntry {
    t: Option<String>,
    #[serde(default)]
    k: Batches,
    #[serde(default)]
    r: Batches,
}

/// A JSON array read as the texts of its elements, comma separated, [`REPAIR_BATCH`] per
/// batch.
#[derive(Default)]
struct Batches {
    texts: Vec<String>,
    elements: usize,
}

impl<'de> serde::Deserialize<'de> for Batches {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Batches, D::Error> {
        d.deserialize_seq(Batches::default())
    }
}

impl<'de> serde::de::Visitor<'de> for Batches {
    type Value = Batches;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<Batches, A::Error> {
        while let Some(element) = seq.next_element::<Value>()? {
            if self.elements.is_multiple_of(REPAIR_BATCH) {
                self.texts.push(String::new());
            }
            if let Some(batch) = self.texts.last_mut() {
                if !batch.is_empty() {
                    batch.push(',');
                }
                batch.push_str(&element.to_string());
            }
            self.elements += 1;
        }
        Ok(self)
    }
}

/// The entries of an intent's `changes`, or the name of a table no entry of `tables` is.
fn entries(tables: &[MirrorTable], changes: &str) -> Result<Vec<Entry>, String> {
    // An intent that is not what a proxy or the net writes has nothing to repair.
    let stored: Vec<StoredEntry> = serde_json::from_str(changes).unwrap_or_default();
    let mut out = Vec::new();
    for entry in stored {
        let Some(name) = entry.t else {
            continue;
        };
        let Some(table) = tables.iter().position(|t| t.name.to_string() == name) else {
            return Err(name);
        };
        out.push(Entry {
            table,
            keys: entry.k.texts,
            rows: entry.r,
        });
    }
    // Key locks are taken in one order by every repair: tables by name (keys sort in SQL).
    out.sort_by_key(|e| tables.get(e.table).map(|t| t.name.to_string()));
    Ok(out)
}

fn key_columns(table: &MirrorTable) -> Vec<String> {
    table.key.iter().map(|k| quote_ident(k)).collect()
}

/// Locks the records of the keys in `keys` (a JSON array of key objects) on NEW, in key order,
/// creating those NEW has none of (version 0, bumped by the apply that follows in the same
/// transaction).
async fn lock_keys(ntx: &mut PgConnection, table: &MirrorTable, keys: &str) -> Result<(), sqlx::Error> {
    let Some(records) = &table.keys_table else {
        return Ok(());
    };
    let cols = key_columns(table).join(", ");
    let sql = format!(
        "INSERT INTO {records} AS v ({cols}, sy_version, sy_deleted) \
         SELECT {cols}, 0, false FROM \
         (SELECT DISTINCT {cols} FROM json_populate_recordset(NULL::{q}, $1::json)) AS listed \
         ORDER BY {cols} \
         ON CONFLICT ({cols}) DO UPDATE SET sy_version = v.sy_version",
        q = table.qualified
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(keys)
        .execute(&mut *ntx)
        .await?;
    Ok(())
}

/// Reads the keys in `keys` from OLD: the rows OLD has (images to upsert) and the keys it does
/// not have (images to delete), each key once. The server matches the listed keys with the rows
/// as values of the key columns' types.
async fn read_keys(
    otx: &mut PgConnection,
    table: &MirrorTable,
    keys: &str,
) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let cols = key_columns(table);
    let on = cols
        .iter()
        .map(|c| format!("t.{c} = listed.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let sql = format!(
        "WITH listed AS (SELECT DISTINCT {list} FROM json_populate_recordset(NULL::{q}, $1::json)) \
         SELECT row_to_json(listed.*)::text, row_to_json(t.*)::text FROM listed LEFT JOIN {q} AS t ON {on}",
        list = cols.join(", "),
        q = table.qualified
    );
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(keys)
        .fetch_all(&mut *otx)
        .await?;
    let (mut found, mut gone) = (Vec::new(), Vec::new());
    for (key, row) in rows {
        match row {
            Some(row) => found.push(row),
            None => gone.push(key),
        }
    }
    Ok((found, gone))
}

/// Runs the statements applying `changes` in NEW's transaction.
async fn apply_on_new(
    ntx: &mut PgConnection,
    tables: &[MirrorTable],
    changes: &[Change],
) -> Result<(), sqlx::Error> {
    let mut sql = String::new();
    push_changes(tables, changes, &mut sql);
    if !sql.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *ntx).await?;
    }
    Ok(())
}

/// Repairs one intent: takes it (`FOR UPDATE SKIP LOCKED` on OLD), locks its keys on NEW, reads
/// them from OLD, writes them to NEW with higher versions (deleting the keys OLD no longer has)
/// and commits NEW synchronously, then deletes the intent and, after it, the applied marker.
/// See the module documentation for why this order keeps every write of those keys.
pub async fn repair_intent(
    authoritative: &Store,
    follower: &Store,
    tables: &[MirrorTable],
    id: i64,
) -> Result<RepairOutcome, StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    let Store::Postgres(new) = follower;
    let (new, new_role) = (new.pool(), new.role().as_str());
    let oerr = failed(old_role, "repairing an intent");
    let nerr = failed(new_role, "repairing an intent");
    let mut otx = old.begin().await.map_err(oerr)?;
    let changes: Option<String> = sqlx::query_scalar(
        "SELECT changes::text FROM switchyard.switchyard_intents WHERE id = $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(&mut *otx)
    .await
    .map_err(oerr)?;
    let Some(changes) = changes else {
        return Ok(RepairOutcome::Skipped);
    };
    // The rows and keys are read from `entries` from here on.
    let entries = match entries(tables, &changes) {
        Ok(entries) => entries,
        // Dropping `otx` rolls back: the intent stays as it is.
        Err(table) => return Ok(RepairOutcome::Unmirrored { table }),
    };

    let mut nconn = new.acquire().await.map_err(nerr)?;
    let mut ntx = nconn.begin().await.map_err(nerr)?;
    // The intent is deleted right after this commit: it must be on NEW's disk by then, whatever
    // NEW's own `synchronous_commit` says.
    // <https://www.postgresql.org/docs/current/wal-async-commit.html>
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *ntx)
        .await
        .map_err(nerr)?;
    let marked = sqlx::query(
        "INSERT INTO switchyard.switchyard_applied (intent_id) VALUES ($1) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .execute(&mut *ntx)
    .await
    .map_err(nerr)?
    .rows_affected();
    let outcome = if marked == 0 {
        // NEW has the transaction, but committed it with `synchronous_commit = off`: its commit
        // record may still be in NEW's WAL buffers, and a NEW crash after the intent is gone
        // would lose it for good. So this transaction writes (a no-op update of the marker) and
        // commits synchronously: a commit that wrote WAL flushes the WAL up to its own commit
        // record, so past every commit before it, including the one whose marker we just saw.
        // (A transaction that wrote nothing, even one with an id, commits without a flush: see
        // RecordTransactionCommit in src/backend/access/transam/xact.c.)
        // <https://www.postgresql.org/docs/current/wal-async-commit.html>
        sqlx::query("UPDATE switchyard.switchyard_applied SET applied_at = applied_at WHERE intent_id = $1")
            .bind(id)
            .execute(&mut *ntx)
            .await
            .map_err(nerr)?;
        ntx.commit().await.map_err(nerr)?;
        RepairOutcome::AlreadyApplied
    } else {
        drop(changes);
        // A table NEW cannot take the rows of (as the definitions were last read) is not
        // repaired: NEW would get them without the columns it lacks. Dropping `ntx` and `otx`
        // rolls both back; the intent stays.
        if let Some((table, problem)) = entries.iter().find_map(|e| {
            let t = tables.get(e.table)?;
            Some((t.name.to_string(), t.mismatch()?))
        }) {
            return Ok(RepairOutcome::SchemaChanged { table, problem });
        }
        // Step 1: the keys' records on NEW, before OLD is read: each table's keys in one
        // statement, so they are locked in key order.
        for e in &entries {
            if let (Some(table), false) = (tables.get(e.table), e.keys.is_empty()) {
                lock_keys(&mut ntx, table, &json_array(&e.keys))
                    .await
                    .map_err(nerr)?;
            }
        }
        // Step 2: OLD, read committed, canonical output.
        sqlx::raw_sql(CANONICAL_OUTPUT)
            .execute(&mut *otx)
            .await
            .map_err(oerr)?;
        // Step 3, a batch of keys at a time.
        let (mut keys_done, mut appended) = (0, 0);
        for e in &entries {
            let Some(table) = tables.get(e.table) else {
                continue;
            };
            for batch in &e.keys {
                let keys = json_array(std::slice::from_ref(batch));
                let (found, gone) = read_keys(&mut otx, table, &keys).await.map_err(oerr)?;
                // OLD's rows all have the table's current columns: the first one tells whether
                // they are still those the apply statements were built for. If not, dropping
                // `ntx` and `otx` rolls both back and the intent stays.
                if found.first().is_some_and(|row| !table.image_matches(row)) {
                    return Ok(RepairOutcome::SchemaChanged {
                        table: table.name.to_string(),
                        problem: "OLD's columns changed since the table's definition was read".to_owned(),
                    });
                }
                keys_done += found.len() + gone.len();
                let apply = [
                    Change {
                        table: e.table,
                        op: ChangeOp::Upsert,
                        rows: found,
                    },
                    Change {
                        table: e.table,
                        op: ChangeOp::Delete,
                        rows: gone,
                    },
                ];
                apply_on_new(&mut ntx, tables, &apply).await.map_err(nerr)?;
            }
            appended += e.rows.elements;
            for batch in &e.rows.texts {
                // The batch is the text of its rows, comma separated: one JSON array once
                // `json_array` puts the brackets around it.
                let apply = [Change {
                    table: e.table,
                    op: ChangeOp::Append,
                    rows: vec![batch.clone()],
                }];
                apply_on_new(&mut ntx, tables, &apply).await.map_err(nerr)?;
            }
        }
        ntx.commit().await.map_err(nerr)?;
        RepairOutcome::Repaired {
            keys: keys_done,
            appended,
        }
    };
    sqlx::query("DELETE FROM switchyard.switchyard_intents WHERE id = $1")
        .bind(id)
        .execute(&mut *otx)
        .await
        .map_err(oerr)?;
    otx.commit().await.map_err(oerr)?;
    // The marker goes only after its intent: an intent never outlives the marker that says NEW
    // has its transaction. If this fails the repair still stands; the orphaned marker (a small
    // row nothing reads again) is only logged.
    if let Err(e) = sqlx::query("DELETE FROM switchyard.switchyard_applied WHERE intent_id = $1")
        .bind(id)
        .execute(&mut *nconn)
        .await
    {
        let e = failed(new_role, "deleting the applied marker of a repaired intent")(e);
        tracing::warn!(intent = id, error = %e, "applied marker left on NEW");
    }
    Ok(outcome)
}

/// The ids among `ids` that are still intents on OLD.
pub async fn existing_intents(authoritative: &Store, ids: &[i64]) -> Result<HashSet<i64>, StoreError> {
    let Store::Postgres(old) = authoritative;
    let (old, old_role) = (old.pool(), old.role().as_str());
    let rows: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM switchyard.switchyard_intents WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(old)
            .await
            .map_err(failed(old_role, "checking which intents still exist"))?;
    Ok(rows.into_iter().collect())
}
