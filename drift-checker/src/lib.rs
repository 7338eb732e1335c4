//! The drift checker: how far NEW is from OLD, measured.
//!
//! Two measures, both on the store layer ([`switchyard_store::Store`]), both comparing rows as
//! canonical values (see [`canonical`]):
//!
//! - [`sample`]: an estimate of the share of keys that differ, with a 95% Wilson interval, from
//!   keys drawn at random over the **union** of both stores' keys. Each key of the union is
//!   included independently with the same probability (a seeded hash of the key below a
//!   threshold, on both stores), so the sample is an equal-probability sample of the union and
//!   its share of differing keys estimates the rate without bias (docs/drift.md gives the
//!   argument). Keys only NEW has (extra rows) are as likely to be drawn as keys only OLD has.
//! - [`verify`]: the exact answer. Key ranges of a few thousand rows are hashed in the databases
//!   on both sides; a range whose hashes differ is read key by key and every differing key is
//!   listed with the kind of difference.
//!
//! A key that differs may be racing a write that is being mirrored: it is read again a few
//! times, a little later each time, before it counts. Results are recorded in
//! `switchyard.switchyard_drift` on NEW ([`record`]), for proxies and operators to read.

pub mod canonical;
mod repair;
mod report;
mod table;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use switchyard_store::{Store, StoreError};

pub use repair::{repair, RepairReport, REPAIR_PROXY};
pub use report::{
    history, latest, latest_verify_keys, record, wilson, DiffKind, DifferingKey, HistoryPoint, LatestDrift,
    Recorded, SampleReport, VerifyReport,
};
pub use table::{DriftTable, RangesFrom};
pub use verify::{verify, VerifyOptions, VerifyProgress, MAX_WORKERS};

/// A seed for a sample nobody asked to repeat (printed with the result, so it can be).
pub fn random_seed() -> u64 {
    rand::random::<u64>() >> 1
}

/// A handle on one store for the drift checker: its connections read canonical values
/// ([`canonical`]).
pub fn connect(role: switchyard_store::Role, url: &switchyard_config::StoreUrl) -> Result<Store, DriftError> {
    Ok(Store::connect_lazy_with(role, url, &canonical::pool_settings())?)
}

/// Why a drift check could not run.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The table cannot be compared (no key, missing on a store, ...).
    #[error("table {table}: {problem}")]
    Table {
        /// The table.
        table: String,
        /// What is wrong.
        problem: String,
    },
}

/// How a differing key is confirmed: read again `rechecks` times, `pause` times the attempt
/// number apart (100, 200, 300 ms by default: longer than a mirrored commit takes). A key that
/// still differs then counts, unless it is still racing a write: an intent on OLD names it (its
/// mirrored write is in flight, or failed and waits for its repair), or its key record's
/// version on NEW moved while it was read. Such a key is read again up to `racing_rechecks`
/// more times, `pause` times `rechecks` apart, and counts only if it still differs after them.
#[derive(Debug, Clone, Copy)]
pub struct Recheck {
    pub rechecks: u32,
    pub pause: Duration,
    pub racing_rechecks: u32,
}

impl Default for Recheck {
    fn default() -> Self {
        Recheck {
            rechecks: 3,
            pause: Duration::from_millis(100),
            racing_rechecks: 10,
        }
    }
}

/// Up to this many example keys per report.
pub const MAX_EXAMPLES: usize = 20;

/// Estimates `table`'s drift from about `samples` keys drawn at random over the union of both
/// stores' keys, with `seed` choosing which (the same seed draws the same keys).
pub async fn sample(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    samples: u64,
    seed: u64,
    recheck: Recheck,
) -> Result<SampleReport, DriftError> {
    let started = Instant::now();
    let rows_old = table.count(old).await?;
    let rows_new = table.count(new).await?;
    // Inclusion probability: about `samples` keys of a union at least as large as either side.
    let larger = rows_old.max(rows_new).max(1);
    let fraction = (samples as f64 / larger as f64).min(1.0);
    let threshold = (fraction * table::HASH_RANGE as f64).ceil() as i64;
    let mut keys: BTreeSet<Vec<String>> = table
        .sampled_keys(old, seed, threshold)
        .await?
        .into_iter()
        .collect();
    keys.extend(table.sampled_keys(new, seed, threshold).await?);
    let keys: Vec<Vec<String>> = keys.into_iter().collect();
    let differing = confirmed_differences(old, new, table, &keys, recheck).await?;
    let mut report = SampleReport::new(table.name.to_string(), keys.len() as u64, rows_old, rows_new);
    for d in &differing {
        report.count(d);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.seed = seed;
    Ok(report)
}

/// After a verify found `table` equal on both stores (`report.differing == 0`), removes the mark
/// an uncaptured write left on it in `switchyard.switchyard_verify` on OLD, unless the mark is
/// newer than the verify's start (a write the verify may have missed). Returns whether a mark
/// was removed. Only a clean verify may clear a mark: a sample cannot vouch for every key.
pub async fn clear_verify_mark(old: &Store, report: &VerifyReport) -> Result<bool, DriftError> {
    if report.differing != 0 || !old.has_relation("switchyard.switchyard_verify").await? {
        return Ok(false);
    }
    let Store::Postgres(pg) = old;
    let removed = sqlx::query(
        "DELETE FROM switchyard.switchyard_verify WHERE table_name = $1 AND marked_at < $2::timestamptz",
    )
    .bind(&report.table)
    .bind(&report.started_on_old)
    .execute(pg.pool())
    .await
    .map_err(|source| StoreError::Query {
        role: pg.role().as_str(),
        action: "clearing a verification mark".to_owned(),
        source,
    })?;
    Ok(removed.rows_affected() > 0)
}

/// The keys whose rows differ between `old` and `new` (each a map from key to canonical row),
/// with the kind of difference.
pub(crate) fn differing_keys(
    old: &BTreeMap<Vec<String>, String>,
    new: &BTreeMap<Vec<String>, String>,
) -> Vec<(Vec<String>, DiffKind)> {
    let mut out = Vec::new();
    for (key, row) in old {
        match new.get(key) {
            None => out.push((key.clone(), DiffKind::MissingInNew)),
            Some(other) if other != row => out.push((key.clone(), DiffKind::ValueDiffers)),
            Some(_) => {}
        }
    }
    for key in new.keys() {
        if !old.contains_key(key) {
            out.push((key.clone(), DiffKind::ExtraInNew));
        }
    }
    out
}

/// Reads `keys` on both stores and returns those that differ, each read again as `recheck`
/// says, so a difference that a write in flight explains (mirrored a moment later) does not
/// count.
pub(crate) async fn confirmed_differences(
    old: &Store,
    new: &Store,
    table: &DriftTable,
    keys: &[Vec<String>],
    recheck: Recheck,
) -> Result<Vec<DifferingKey>, DriftError> {
    let mut pending: Vec<Vec<String>> = keys.to_vec();
    let mut counted = Vec::new();
    // The differing keys' record versions on NEW at the previous read.
    let mut versions = BTreeMap::new();
    let last = recheck.rechecks + recheck.racing_rechecks;
    for attempt in 0..=last {
        if pending.is_empty() {
            break;
        }
        if attempt > 0 {
            tokio::time::sleep(recheck.pause * attempt.min(recheck.rechecks.max(1))).await;
        }
        let a = table.rows_by_key(old, &pending).await?;
        let b = table.rows_by_key(new, &pending).await?;
        let found = differing_keys(&a, &b);
        pending = found.iter().map(|(k, _)| k.clone()).collect();
        let now = table.key_versions(new, &pending).await?;
        let moved: BTreeSet<Vec<String>> = pending
            .iter()
            .filter(|k| versions.get(*k) != now.get(*k))
            .cloned()
            .collect();
        versions = now;
        if attempt < recheck.rechecks {
            continue;
        }
        let in_intents = table.keys_in_intents(old, &pending).await?;
        pending.clear();
        for (key, kind) in found {
            let racing = moved.contains(&key) || in_intents.contains(&key);
            if racing && attempt < last {
                pending.push(key);
            } else {
                counted.push(DifferingKey { key, kind });
            }
        }
    }
    counted.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(pairs: &[(&str, &str)]) -> BTreeMap<Vec<String>, String> {
        pairs
            .iter()
            .map(|(k, v)| (vec![(*k).to_owned()], (*v).to_owned()))
            .collect()
    }

    #[test]
    fn differences_are_classified_by_kind() {
        let old = rows(&[("1", "a"), ("2", "b"), ("3", "c")]);
        let new = rows(&[("1", "a"), ("2", "x"), ("4", "d")]);
        let mut got = differing_keys(&old, &new);
        got.sort();
        assert_eq!(
            got,
            [
                (vec!["2".to_owned()], DiffKind::ValueDiffers),
                (vec!["3".to_owned()], DiffKind::MissingInNew),
                (vec!["4".to_owned()], DiffKind::ExtraInNew),
            ]
        );
    }
}
