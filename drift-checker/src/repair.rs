//! `drift repair`: differing keys re-copied from the authoritative store by the mirror's own
//! repair path.
//!
//! The keys are first confirmed (read again on both stores; a key that no longer differs is left
//! alone). The confirmed ones become an intent on OLD, exactly like the one a failed mirrored
//! transaction leaves, and [`switchyard_store::repair::repair_intent`] repairs it: it locks the
//! keys on NEW, reads them from OLD under their row locks, writes them to NEW with a higher
//! version, and deletes on NEW (leaving a tombstone) the keys OLD does not have. So a repair is
//! ordered against live mirrored writes and the backfill exactly as every other repair is; and if
//! this process dies after recording the intent, the proxies' repair loop finishes it.

use serde::Serialize;
use serde_json::{Map, Value};
use switchyard_store::intent::IntentKeys;
use switchyard_store::mirror::{ChangeOp, MirrorTable};
use switchyard_store::repair::{repair_intent, RepairOutcome};
use switchyard_store::{Store, StoreError};

use crate::{confirmed_differences, DifferingKey, DriftError, DriftTable, Recheck};

/// The `proxy` column of the intents a drift repair records.
pub const REPAIR_PROXY: &str = "switchyard-drift-repair";

/// What a repair did to one table.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub table: String,
    /// Keys given to repair.
    pub candidates: u64,
    /// Of those, keys that still differed when read again (the only ones touched).
    pub confirmed: u64,
    /// Keys the repair re-copied or deleted on NEW.
    pub repaired: u64,
    /// Confirmed keys that still differ after the repair (a write raced it: run again).
    pub remaining: u64,
}

/// Repairs `keys` of `table` (from a verify) on NEW. `authoritative` and `follower` are plain
/// store handles (the mirror's), `old` and `new` the drift checker's canonical ones.
pub async fn repair(
    stores: (&Store, &Store),
    canonical: (&Store, &Store),
    table: &DriftTable,
    keys: &[DifferingKey],
    recheck: Recheck,
) -> Result<RepairReport, DriftError> {
    let (authoritative, follower) = stores;
    let (old, new) = canonical;
    let candidates: Vec<Vec<String>> = keys.iter().map(|k| k.key.clone()).collect();
    let confirmed = confirmed_differences(old, new, table, &candidates, recheck).await?;
    let mut report = RepairReport {
        table: table.name.to_string(),
        candidates: candidates.len() as u64,
        confirmed: confirmed.len() as u64,
        repaired: 0,
        remaining: 0,
    };
    if confirmed.is_empty() {
        return Ok(report);
    }
    let problem = |problem: String| DriftError::Table {
        table: table.name.to_string(),
        problem,
    };
    let old_schema = authoritative
        .load_table(&table.name)
        .await?
        .ok_or_else(|| problem("it does not exist on OLD".into()))?;
    let new_schema = follower
        .load_table(&table.name)
        .await?
        .ok_or_else(|| problem("it does not exist on NEW".into()))?;
    let mirrored = [MirrorTable::new(
        table.name.clone(),
        table.key.clone(),
        &old_schema,
        &new_schema,
    )];
    if let Some(m) = mirrored[0].mismatch() {
        return Err(problem(format!("NEW cannot take OLD's rows: {m}")));
    }
    // Each key as a JSON object of its columns; the repair reads them back with the columns'
    // input functions.
    let rows: Vec<String> = confirmed
        .iter()
        .map(|d| {
            let object: Map<String, Value> = table
                .key
                .iter()
                .zip(&d.key)
                .map(|(c, v)| (c.clone(), Value::String(v.clone())))
                .collect();
            Value::Object(object).to_string()
        })
        .collect();
    let mut intent = IntentKeys::new();
    intent.add_rows(&mirrored, 0, ChangeOp::Upsert, &rows);
    let intent_id = (rand::random::<u64>() >> 1) as i64;
    let sql = intent.sql(&mirrored, intent_id, REPAIR_PROXY);
    let Store::Postgres(pg) = authoritative;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pg.pool())
        .await
        .map_err(|source| StoreError::Query {
            role: pg.role().as_str(),
            action: "recording the repair's intent".to_owned(),
            source,
        })?;
    match repair_intent(authoritative, follower, &mirrored, intent_id).await? {
        RepairOutcome::Repaired { keys, .. } => report.repaired = keys as u64,
        // A proxy's repair loop took it first: it repairs the same keys the same way.
        RepairOutcome::Skipped => {}
        other => return Err(problem(format!("the repair did not run: {other:?}"))),
    }
    let still = confirmed_differences(old, new, table, &candidates, Recheck::default()).await?;
    report.remaining = still.len() as u64;
    Ok(report)
}
