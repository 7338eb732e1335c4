//! The repair loop: re-copies the keys of intents whose NEW side failed or is in doubt
//! (`switchyard_store::repair`), this proxy's own failed ones first, then anyone's older than
//! `[mirror] stale_intent_secs`.
//!
//! Each intent that fails backs off on its own (1 s, doubling to a minute), so intents that keep
//! failing at the head of the queue do not hold up the ones behind them; three failures in a
//! row end the round and back the whole loop off (a store is likely down). An intent naming a
//! table this proxy does not mirror is left for a proxy that does, and logged once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::{Duration, Instant};

use switchyard_store::repair::{self, RepairOutcome};
use switchyard_store::{ErrorKind, StoreError};

use super::Mirror;

/// First and longest wait before a failed intent is tried again.
const INTENT_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// First and longest extra wait of the whole loop while a store keeps failing.
const LOOP_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));
/// How many intents one round takes on.
const ROUND_SIZE: i64 = 500;

/// What the loop remembers between rounds about intents it could not repair.
#[derive(Default)]
struct RepairQueue {
    /// Failed intents: failures in a row, and when to try again.
    backoff: HashMap<i64, (u32, Instant)>,
    /// Intents naming a table this proxy does not mirror (already logged).
    unmirrored: HashSet<i64>,
}

impl RepairQueue {
    /// The intents not to take this round.
    fn skipped(&self, now: Instant) -> Vec<i64> {
        self.backoff
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(id, _)| *id)
            .chain(self.unmirrored.iter().copied())
            .collect()
    }

    fn failed(&mut self, id: i64, now: Instant) {
        let entry = self.backoff.entry(id).or_insert((0, now));
        entry.0 = entry.0.saturating_add(1);
        let wait = INTENT_BACKOFF
            .0
            .saturating_mul(1 << entry.0.saturating_sub(1).min(16))
            .min(INTENT_BACKOFF.1);
        entry.1 = now + wait;
    }

    fn remembered(&self) -> Vec<i64> {
        self.backoff
            .keys()
            .chain(self.unmirrored.iter())
            .copied()
            .collect()
    }

    /// Forgets intents that no longer exist.
    fn keep_only(&mut self, existing: &HashSet<i64>) {
        self.backoff.retain(|id, _| existing.contains(id));
        self.unmirrored.retain(|id| existing.contains(id));
    }
}

/// Runs repair rounds every `repair_interval` until the mirror is dropped, backing off while
/// NEW (or OLD) keeps failing.
pub(super) async fn repair_loop(mirror: Weak<Mirror>) {
    let mut backoff = Duration::ZERO;
    let mut queue = RepairQueue::default();
    loop {
        let interval = match mirror.upgrade() {
            Some(m) => m.settings.repair_interval,
            None => return,
        };
        tokio::time::sleep(interval + backoff).await;
        let Some(m) = mirror.upgrade() else { return };
        match repair_round(&m, &mut queue).await {
            Ok(()) => backoff = Duration::ZERO,
            Err(e) => {
                m.stats.repair_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "repair round failed; retrying with backoff");
                backoff = (backoff * 2).clamp(LOOP_BACKOFF.0, LOOP_BACKOFF.1);
            }
        }
    }
}

async fn repair_round(m: &Mirror, queue: &mut RepairQueue) -> Result<(), StoreError> {
    // Tables whose apply NEW refused are read again before anything is repaired with them.
    m.reread_stale().await;
    let mine: Vec<i64> = m.failed.lock().map(|f| f.clone()).unwrap_or_default();
    let skip = queue.skipped(Instant::now());
    let stale = m.settings.stale_intent.as_secs_f64();
    let pending = repair::pending_intents(&m.old, &mine, &skip, stale, ROUND_SIZE).await?;
    let (mut repaired, mut failures, mut last_error) = (0u64, 0u32, None);
    for repair::PendingIntent { id, stored_bytes } in pending {
        // A large intent (a transaction that changed many rows) takes longer: the limit grows
        // with its size, one more limit per 256 KiB stored (about 100,000 integer keys).
        let limit = super::repair_limit(&m.settings)
            * (1 + u32::try_from(stored_bytes >> 18).unwrap_or(u32::MAX).min(1000));
        let shapes = m.shapes();
        let error = match tokio::time::timeout(
            limit,
            repair::repair_intent(&m.old, &m.new, &shapes.tables, id),
        )
        .await
        {
            Ok(Ok(outcome)) => {
                failures = 0;
                queue.backoff.remove(&id);
                match outcome {
                    RepairOutcome::Repaired { keys, appended } => {
                        m.stats.repairs.fetch_add(1, Relaxed);
                        repaired += 1;
                        tracing::debug!(intent = id, keys, appended, "repaired");
                    }
                    RepairOutcome::Unmirrored { table } => {
                        if queue.unmirrored.insert(id) {
                            tracing::warn!(
                                intent = id,
                                table,
                                "intent names a table this proxy does not mirror; left for a proxy that mirrors it"
                            );
                        }
                        continue;
                    }
                    RepairOutcome::SchemaChanged { table, problem } => {
                        // Not a store failure: read the definitions again; the intent waits
                        // (with backoff) unless that made the table usable.
                        let usable = match m.table_index(&table) {
                            Some(i) => m.reread(i, super::schema::HELD_REREAD).await,
                            None => false,
                        };
                        if !usable {
                            queue.failed(id, Instant::now());
                            tracing::debug!(
                                intent = id,
                                table,
                                problem,
                                "repair waits until OLD and NEW match"
                            );
                        }
                        continue;
                    }
                    RepairOutcome::AlreadyApplied | RepairOutcome::Skipped => {}
                }
                if let Ok(mut f) = m.failed.lock() {
                    f.retain(|&x| x != id);
                }
                continue;
            }
            Ok(Err(e)) if e.kind() == ErrorKind::SchemaMismatch => {
                // NEW refused the rows: its definitions may have changed. Not a store failure.
                tracing::warn!(intent = id, error = %e, "repair refused by NEW; the tables' definitions are read again");
                m.mark_stale();
                m.reread_stale().await;
                queue.failed(id, Instant::now());
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => StoreError::Timeout {
                role: "old or new",
                url: format!("repair of intent {id}"),
                timeout: limit,
            },
        };
        m.stats.repair_failures.fetch_add(1, Relaxed);
        queue.failed(id, Instant::now());
        tracing::warn!(intent = id, error = %error, "repair failed; this intent is retried after a backoff");
        failures += 1;
        last_error = Some(error);
        if failures >= 3 {
            break;
        }
    }
    if repaired > 0 {
        tracing::info!(intents = repaired, "repaired keys NEW had missed");
    }
    if failures >= 3 {
        if let Some(e) = last_error {
            return Err(e);
        }
    }
    // Forget intents that are gone (OLD rolled back, or another proxy repaired them).
    let remembered: Vec<i64> = mine.iter().copied().chain(queue.remembered()).collect();
    if !remembered.is_empty() {
        let still = repair::existing_intents(&m.old, &remembered).await?;
        if let Ok(mut f) = m.failed.lock() {
            f.retain(|x| still.contains(x) || !mine.contains(x));
        }
        queue.keep_only(&still);
    }
    // NEW answers again: let transactions mirror directly instead of leaving intents.
    let ping = tokio::time::timeout(m.settings.timeout, sqlx::query("SELECT 1").execute(&m.new)).await;
    if matches!(ping, Ok(Ok(_))) {
        m.new_down_until.store(0, Relaxed);
    }
    let n = repair::count_intents(&m.old).await?;
    m.stats.pending_intents.store(n, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_intent_backs_off_longer_each_time_up_to_a_minute() {
        let mut q = RepairQueue::default();
        let t0 = Instant::now();
        q.failed(7, t0);
        assert_eq!(q.backoff[&7].1, t0 + Duration::from_secs(1));
        q.failed(7, t0);
        assert_eq!(q.backoff[&7].1, t0 + Duration::from_secs(2));
        for _ in 0..40 {
            q.failed(7, t0);
        }
        assert_eq!(q.backoff[&7].1, t0 + Duration::from_secs(60));
        q.unmirrored.insert(9);
        let mut skipped = q.skipped(t0);
        skipped.sort_unstable();
        assert_eq!(skipped, vec![7, 9]);
        assert_eq!(q.skipped(t0 + Duration::from_secs(61)), vec![9]);
        q.keep_only(&HashSet::from([9]));
        assert!(q.backoff.is_empty());
    }
}
