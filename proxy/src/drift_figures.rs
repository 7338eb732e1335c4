//! What the proxy reads from the stores for `/status`, the status page and the metrics, every
//! [`POLL`]: the latest drift results and their history (`switchyard drift sample|verify|watch`
//! record them on NEW), each table's backfill progress (with rows per second between two reads)
//! and whether the guard rails of the next phase pass. Each round also records a snapshot of
//! OLD's write counters (at most every 30 s, whichever proxy comes first) for the cutover rail
//! on tables that are not configured (`switchyard_store::table_writes`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use switchyard_control::guard;
use switchyard_drift::{HistoryPoint, LatestDrift};
use switchyard_store::backfill_state::BackfillProgress;
use switchyard_store::{table_writes, Store};

use crate::shutdown::{Shutdown, ShutdownState};

/// How often the figures are read from NEW.
pub(crate) const POLL: Duration = Duration::from_secs(10);

/// The latest results, and when they were read.
#[derive(Debug, Default)]
pub(crate) struct DriftFigures {
    latest: Mutex<Option<(Vec<LatestDrift>, Instant)>>,
    /// The last [`HISTORY`] results per table, oldest first.
    history: Mutex<Vec<HistoryPoint>>,
    /// Each table's backfill progress, with rows read per second since the previous read.
    backfill: Mutex<Vec<Backfill>>,
    /// Per table, why raising its read share would be refused now.
    guards: Mutex<BTreeMap<String, Vec<String>>>,
    /// Per table, why entering cutover would be refused now (the same, and writes to tables
    /// that are not configured).
    cutover_guards: Mutex<BTreeMap<String, Vec<String>>>,
}

/// The shortest history of write-counter snapshots kept.
const WRITES_HISTORY: Duration = Duration::from_secs(3600);

/// Results per table kept for the chart.
pub(crate) const HISTORY: i64 = 50;

/// One table's backfill as last read.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Backfill {
    #[serde(flatten)]
    pub(crate) progress: BackfillProgress,
    /// Rows read from OLD per second between the last two reads.
    pub(crate) rows_per_sec: Option<f64>,
    /// Seconds left at that rate, when the total is estimated.
    pub(crate) eta_seconds: Option<f64>,
}

/// What the poll needs to read.
pub(crate) struct Sources {
    pub(crate) old: Store,
    pub(crate) new: Store,
    pub(crate) tables: Vec<String>,
    /// The configured tables (the others' writes refuse cutover).
    pub(crate) configured: Vec<switchyard_config::TableName>,
    pub(crate) mirror_deadline: Duration,
    pub(crate) control: switchyard_config::ControlSettings,
}

impl DriftFigures {
    /// The recorded results, oldest first per table.
    pub(crate) fn history(&self) -> Vec<HistoryPoint> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Backfill progress per table.
    pub(crate) fn backfill(&self) -> Vec<Backfill> {
        self.backfill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why the guard rails of `table` refuse now (empty when they pass); `None` before the
    /// first read.
    pub(crate) fn refusals(&self, table: &str) -> Option<Vec<String>> {
        self.guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned()
    }

    /// Why entering cutover with `table` would be refused now; `None` before the first read.
    pub(crate) fn cutover_refusals(&self, table: &str) -> Option<Vec<String>> {
        self.cutover_guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned()
    }

    fn set_backfill(&self, progress: Vec<BackfillProgress>, elapsed: Option<Duration>) {
        let mut backfill = self.backfill.lock().unwrap_or_else(PoisonError::into_inner);
        let next = progress
            .into_iter()
            .map(|p| {
                let before = backfill.iter().find(|b| b.progress.table == p.table);
                let rows_per_sec = match (before, elapsed) {
                    (Some(b), Some(e)) if e.as_secs_f64() > 0.0 => {
                        Some((p.rows_read - b.progress.rows_read).max(0) as f64 / e.as_secs_f64())
                    }
                    _ => None,
                };
                let eta_seconds = match (rows_per_sec, p.rows_estimated) {
                    (Some(r), Some(total)) if r > 0.0 && p.status != "done" => {
                        Some((total - p.rows_read).max(0) as f64 / r)
                    }
                    _ => None,
                };
                Backfill {
                    progress: p,
                    rows_per_sec,
                    eta_seconds,
                }
            })
            .collect();
        *backfill = next;
    }

    fn set(&self, results: Vec<LatestDrift>) {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some((results, Instant::now()));
    }

    /// The latest results, their ages brought up to now.
    pub(crate) fn now(&self) -> Vec<LatestDrift> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((results, read_at)) = latest.as_ref() else {
            return Vec::new();
        };
        let since = read_at.elapsed().as_secs_f64();
        results
            .iter()
            .cloned()
            .map(|mut r| {
                r.age_seconds += since;
                r
            })
            .collect()
    }

    /// The most recent result of `table` of either kind.
    pub(crate) fn newest(results: &[LatestDrift], table: &str) -> Option<LatestDrift> {
        results
            .iter()
            .filter(|r| r.table == table)
            .min_by(|a, b| a.age_seconds.total_cmp(&b.age_seconds))
            .cloned()
    }
}

/// Reads the figures every [`POLL`] until shutdown; a failed read keeps the last figures
/// (drift ages keep growing, which is what an operator should see).
pub(crate) async fn poll_loop(figures: Arc<DriftFigures>, sources: Sources, mut shutdown: Shutdown) {
    let mut last_backfill: Option<Instant> = None;
    loop {
        // Read once per round for every table: the drift figures and the backfill progress
        // serve /status and the guard rails alike.
        let latest = match switchyard_drift::latest(&sources.new).await {
            Ok(results) => {
                figures.set(results.clone());
                Some(results)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the latest drift results");
                None
            }
        };
        match switchyard_drift::history(&sources.new, HISTORY).await {
            Ok(h) => *figures.history.lock().unwrap_or_else(PoisonError::into_inner) = h,
            Err(e) => tracing::debug!(error = %e, "cannot read the drift history"),
        }
        let Store::Postgres(pg) = &sources.new;
        let backfill = match switchyard_store::backfill_state::backfill_progress(pg.pool()).await {
            Ok(progress) => {
                figures.set_backfill(progress.clone(), last_backfill.map(|t| t.elapsed()));
                last_backfill = Some(Instant::now());
                Some(progress)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the backfill progress");
                None
            }
        };
        let window = sources.control.unconfigured_write_window;
        // Enough history for the window, and for a CLI whose window is longer than ours.
        let keep = (window * 2).max(WRITES_HISTORY);
        if let Err(e) = table_writes::record_table_writes(&sources.old, keep).await {
            tracing::debug!(error = %e, "cannot record the write counters");
        }
        let live = switchyard_control::barrier::live_within(&sources.control);
        let mut on_old = guard::authoritative_facts(&sources.old, sources.mirror_deadline, live).await;
        if let Ok(facts) = &mut on_old {
            match table_writes::unconfigured_writes(&sources.old, &sources.configured, window).await {
                Ok(w) => facts.unconfigured_writes = Some(w),
                Err(e) => tracing::debug!(error = %e, "cannot read the write counters"),
            }
        }
        match (latest, backfill, on_old) {
            (Some(latest), Some(backfill), Ok(on_old)) => {
                let mut guards = figures.guards.lock().unwrap_or_else(PoisonError::into_inner);
                let mut cutover = figures
                    .cutover_guards
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for table in &sources.tables {
                    let f = guard::facts(table, &backfill, &latest, &on_old);
                    guards.insert(table.clone(), guard::refusals(&f, &sources.control));
                    cutover.insert(table.clone(), guard::cutover_refusals(&f, &sources.control));
                }
            }
            (_, _, Err(e)) => tracing::debug!(error = %e, "cannot read the guard rails' facts"),
            // What NEW could not give was logged above.
            _ => {}
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed_from(ShutdownState::Running) => return,
        }
    }
}
