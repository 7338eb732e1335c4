//! The record that makes read-your-writes strict while reads are served by the follower
//! (`read_shift`, `docs/read-shift.md`): when a mirrored transaction committed on the
//! authoritative store but not on the follower, its proxy records the transaction's intent id
//! here before the client hears COMMIT. Every proxy renews its read lease by looking here: while
//! an intent recorded here still exists (the repair loop has not copied it), no proxy serves
//! reads from the follower. A row whose intent is gone is stale itself and is removed by the
//! next check that finds one.

use crate::mirror::failed;
use crate::prepare::{INTENTS_TABLE, STALE_READS_TABLE};
use crate::{Store, StoreError};

/// Records that intent `intent_id` committed on the authoritative store without its follower
/// side.
pub async fn record(authoritative: &Store, intent_id: i64) -> Result<(), StoreError> {
    let Store::Postgres(s) = authoritative;
    let (pool, role) = (s.pool(), s.role().as_str());
    let sql =
        format!("INSERT INTO switchyard.{STALE_READS_TABLE} (intent_id) VALUES ($1) ON CONFLICT DO NOTHING");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(intent_id)
        .execute(pool)
        .await
        .map_err(failed(role, "recording a failed mirror for the read lease"))?;
    Ok(())
}

/// How many recorded intents are still waiting for their repair. Records whose intent is gone
/// are removed on the way (only when there are some: the common check writes nothing).
pub async fn pending(authoritative: &Store) -> Result<i64, StoreError> {
    let Store::Postgres(s) = authoritative;
    let (pool, role) = (s.pool(), s.role().as_str());
    let sql = format!(
        "SELECT count(*) FILTER (WHERE i.id IS NOT NULL), count(*) FILTER (WHERE i.id IS NULL) \
         FROM switchyard.{STALE_READS_TABLE} s LEFT JOIN switchyard.{INTENTS_TABLE} i ON i.id = s.intent_id"
    );
    let (waiting, repaired): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .map_err(failed(role, "checking the read lease"))?;
    if repaired > 0 {
        let sql = format!(
            "DELETE FROM switchyard.{STALE_READS_TABLE} s WHERE NOT EXISTS \
             (SELECT 1 FROM switchyard.{INTENTS_TABLE} i WHERE i.id = s.intent_id)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(pool)
            .await
            .map_err(failed(role, "removing repaired read-lease records"))?;
    }
    Ok(waiting)
}
