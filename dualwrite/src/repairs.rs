//! The repair loop: re-copies the keys of intents whose NEW side failed or is in doubt
//! (`switchyard_store::repair`), this proxy's own failed ones first, then anyone's older than
//! `[mirror] stale_intent_secs`. That age is measured on OLD's clock, where every proxy reads
//! it; the backoffs below run on tokio's clock (paused in the tests).
//!
//! Each intent that fails backs off on its own (1 s, doubling to a minute), so intents that keep
//! failing at the head of the queue do not hold up the ones behind them; three failures in a
//! row end the round and back the whole loop off (a store is likely down). An intent naming a
//! table this proxy does not mirror is left for a proxy that does, and logged once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Weak;
use std::time::Duration;

use switchyard_store::repair::{self, RepairOutcome};
use switchyard_store::{ErrorKind, StoreError};
use tokio::time::Instant;

use super::Mirror;

/// The wait before a failed intent is tried again.
const INTENT_BACKOFF: Backoff = Backoff {
    first: Duration::from_secs(1),
    max: Duration::from_secs(60),
};
/// The extra wait of the whole loop while a store keeps failing.
const LOOP_BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(250),
    max: Duration::from_secs(10),
};
/// How many intents one round takes on.
const ROUND_SIZE: i64 = 500;

/// A wait that doubles with each failure in a row, from `first` up to `max`.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// The wait after `failures` failures in a row: none after none.
    fn after(self, failures: u32) -> Duration {
        match failures {
            0 => Duration::ZERO,
            n => self.first.saturating_mul(1 << (n - 1).min(16)).min(self.max),
        }
    }
}

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
        entry.1 = now + INTENT_BACKOFF.after(entry.0);
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
    let mut failures = 0u32;
    let mut queue = RepairQueue::default();
    loop {
        let interval = match mirror.upgrade() {
            Some(m) => m.settings.repair_interval,
            None => return,
        };
        tokio::time::sleep(interval + LOOP_BACKOFF.after(failures)).await;
        let Some(m) = mirror.upgrade() else { return };
        match repair_round(&m, &mut queue).await {
            Ok(()) => failures = 0,
            Err(e) => {
                m.stats.repair_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "repair round failed; retrying with backoff");
                failures = failures.saturating_add(1);
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
    let pending = repair::pending_intents(&m.authoritative, &mine, &skip, stale, ROUND_SIZE).await?;
    let (mut repaired, mut failures, mut last_error) = (0u64, 0u32, None);
    for repair::PendingIntent { id, stored_bytes } in pending {
        // A large intent (a transaction that changed many rows) takes longer: the limit grows
        // with its size, one more limit per 256 KiB stored (about 100,000 integer keys).
        let limit = super::repair_limit(&m.settings)
            * (1 + u32::try_from(stored_bytes >> 18).unwrap_or(u32::MAX).min(1000));
        let shapes = m.shapes();
        let error = match tokio::time::timeout(
            limit,
            repair::repair_intent(&m.authoritative, &m.follower, &shapes.tables, id),
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
        let still = repair::existing_intents(&m.authoritative, &remembered).await?;
        if let Ok(mut f) = m.failed.lock() {
            f.retain(|x| still.contains(x) || !mine.contains(x));
        }
        queue.keep_only(&still);
    }
    // NEW answers again: let transactions mirror directly instead of leaving intents.
    let ping = m.follower.ping(m.settings.timeout).await;
    if ping.is_ok() {
        m.follower_down_until.store(0, Relaxed);
    }
    let n = repair::count_intents(&m.authoritative).await?;
    m.stats.pending_intents.store(n, Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn backoff_doubles_from_its_first_wait_up_to_its_cap() {
        let waits: Vec<Duration> = (0..9).map(|n| LOOP_BACKOFF.after(n)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            waits,
            [
                Duration::ZERO,
                ms(250),
                ms(500),
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(10),
                secs(10)
            ]
        );
        assert_eq!(INTENT_BACKOFF.after(1), secs(1));
        assert_eq!(INTENT_BACKOFF.after(6), secs(32));
        assert_eq!(INTENT_BACKOFF.after(7), secs(60));
        assert_eq!(INTENT_BACKOFF.after(u32::MAX), secs(60));
    }

    /// The intents skipped now, in order.
    fn skipped_now(q: &RepairQueue) -> Vec<i64> {
        let mut skipped = q.skipped(Instant::now());
        skipped.sort_unstable();
        skipped
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_intent_is_skipped_longer_each_time_up_to_a_minute() {
        let mut q = RepairQueue::default();
        q.unmirrored.insert(9);
        for wait in [1, 2, 4, 8, 16, 32, 60, 60, 60] {
            q.failed(7, Instant::now());
            tokio::time::advance(secs(wait) - Duration::from_millis(1)).await;
            assert_eq!(skipped_now(&q), [7, 9], "still waiting out {wait} s");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(skipped_now(&q), [9], "{wait} s are over");
        }
        q.keep_only(&HashSet::from([9]));
        assert!(q.backoff.is_empty());
        assert_eq!(q.remembered(), [9]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_intent_backs_off_on_its_own() {
        let mut q = RepairQueue::default();
        q.failed(1, Instant::now());
        q.failed(1, Instant::now());
        q.failed(2, Instant::now());
        tokio::time::advance(secs(1)).await;
        assert_eq!(
            skipped_now(&q),
            [1],
            "the second failure of 1 waits 2 s, 2 waits 1 s"
        );
        tokio::time::advance(secs(1)).await;
        assert!(skipped_now(&q).is_empty());
    }
}
