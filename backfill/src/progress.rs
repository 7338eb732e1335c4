//! What a run has done so far, shown as it goes and summed up at the end.
//!
//! Workers add to per-table atomic counters; a reporter task shows them: a redrawn bar per
//! table on a terminal (rows, rows/s, ETA), a log line per table every few seconds otherwise.
//! The bar is a few lines of ANSI escapes (cursor up, clear line) rather than a progress-bar
//! crate: it needs no more than that, and the backfill's output stays plain text elsewhere.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use switchyard_store::backfill_state::BackfillProgress;

/// How progress is shown while a run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar per table on stderr, redrawn in place (stderr is a terminal).
    Bar,
    /// A log line per table every few seconds.
    Lines,
    /// Nothing (library callers, tests).
    Quiet,
}

/// One table's counters for this run.
#[derive(Debug)]
pub struct TableCounters {
    /// `schema.table`.
    pub table: String,
    /// Chunks copied by this run.
    pub chunks: AtomicU64,
    /// Rows read from OLD by this run.
    pub rows_read: AtomicU64,
    /// Rows written to NEW by this run.
    pub rows_copied: AtomicU64,
    /// Rows skipped by the fence.
    pub rows_skipped: AtomicU64,
    /// Keys claimed whose row NEW already had.
    pub rows_conflicting: AtomicU64,
    /// Rows read before this run (by earlier runs or other processes, as of the start).
    pub rows_before: AtomicU64,
    /// OLD's estimated row count.
    pub rows_estimated: AtomicU64,
    /// The table's backfill is complete.
    pub finished: AtomicBool,
    /// When this run copied its first chunk of the table.
    first_chunk: Mutex<Option<Instant>>,
}

impl TableCounters {
    /// Zeroed counters for `table`.
    pub fn new(table: String) -> TableCounters {
        TableCounters {
            table,
            chunks: AtomicU64::new(0),
            rows_read: AtomicU64::new(0),
            rows_copied: AtomicU64::new(0),
            rows_skipped: AtomicU64::new(0),
            rows_conflicting: AtomicU64::new(0),
            rows_before: AtomicU64::new(0),
            rows_estimated: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            first_chunk: Mutex::new(None),
        }
    }

    /// Notes that a chunk is starting (the rate is measured from the first).
    pub fn chunk_started(&self) {
        if let Ok(mut first) = self.first_chunk.lock() {
            first.get_or_insert_with(Instant::now);
        }
    }

    /// Adds a copied chunk.
    pub fn add(&self, read: u64, copied: u64, skipped: u64, conflicting: u64) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.rows_read.fetch_add(read, Ordering::Relaxed);
        self.rows_copied.fetch_add(copied, Ordering::Relaxed);
        self.rows_skipped.fetch_add(skipped, Ordering::Relaxed);
        self.rows_conflicting.fetch_add(conflicting, Ordering::Relaxed);
    }

    /// This run's rows per second for the table, since its first chunk.
    pub fn rate(&self) -> f64 {
        let started = self.first_chunk.lock().ok().and_then(|f| *f);
        let Some(started) = started else {
            return 0.0;
        };
        let secs = started.elapsed().as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.rows_read.load(Ordering::Relaxed) as f64 / secs
    }

    /// This run's counts.
    pub fn run_counts(&self) -> RunCounts {
        RunCounts {
            chunks: self.chunks.load(Ordering::Relaxed),
            rows_read: self.rows_read.load(Ordering::Relaxed),
            rows_copied: self.rows_copied.load(Ordering::Relaxed),
            rows_skipped: self.rows_skipped.load(Ordering::Relaxed),
            rows_conflicting: self.rows_conflicting.load(Ordering::Relaxed),
            rows_per_sec: self.rate().round(),
        }
    }

    /// `(done, total)` rows as far as this process knows.
    fn done_and_total(&self) -> (u64, u64) {
        let done = self.rows_before.load(Ordering::Relaxed) + self.rows_read.load(Ordering::Relaxed);
        let total = self.rows_estimated.load(Ordering::Relaxed).max(done);
        (done, total)
    }

    fn line(&self, width: usize) -> String {
        let (done, total) = self.done_and_total();
        let finished = self.finished.load(Ordering::Relaxed);
        let fraction = if finished {
            1.0
        } else if total == 0 {
            0.0
        } else {
            done as f64 / total as f64
        };
        let filled = ((fraction * 30.0) as usize).min(30);
        let rate = self.rate();
        let eta = if finished {
            "done".to_owned()
        } else if rate > 0.0 {
            format!("ETA {}", secs(total.saturating_sub(done) as f64 / rate))
        } else {
            "ETA -".to_owned()
        };
        format!(
            "{:<width$} [{}{}] {:>3}% {}/{} rows  {} rows/s  {}  ({} fenced)",
            self.table,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            (fraction * 100.0) as u64,
            done,
            total,
            rate.round(),
            eta,
            self.rows_skipped.load(Ordering::Relaxed),
        )
    }
}

fn secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Shows the counters until `done` is set, then once more.
pub async fn report(
    mode: ProgressMode,
    tables: Arc<Vec<Arc<TableCounters>>>,
    done: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let width = tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
    match mode {
        ProgressMode::Quiet => {}
        ProgressMode::Bar => {
            let mut drawn = 0;
            loop {
                let last = done.load(Ordering::Relaxed);
                let mut out = String::new();
                if drawn > 0 {
                    out.push_str(&format!("\x1b[{drawn}A"));
                }
                for t in tables.iter() {
                    out.push_str("\x1b[2K");
                    out.push_str(&t.line(width));
                    out.push('\n');
                }
                drawn = tables.len();
                {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(out.as_bytes());
                    let _ = err.flush();
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = wake.notified() => {}
                }
            }
        }
        ProgressMode::Lines => {
            let mut shown: Vec<(u64, bool)> = vec![(u64::MAX, false); tables.len()];
            let mut tick = Duration::ZERO;
            loop {
                let last = done.load(Ordering::Relaxed);
                if last || tick >= Duration::from_secs(5) {
                    tick = Duration::ZERO;
                    for (t, seen) in tables.iter().zip(shown.iter_mut()) {
                        let (rows, finished) = (
                            t.rows_read.load(Ordering::Relaxed),
                            t.finished.load(Ordering::Relaxed),
                        );
                        if (rows, finished) != *seen {
                            *seen = (rows, finished);
                            tracing::info!("backfill {}", t.line(width));
                        }
                    }
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = wake.notified() => {}
                }
                tick += Duration::from_millis(250);
            }
        }
    }
}

/// How a run ended (errors are `Err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every selected table's backfill is complete.
    Done,
    /// Stopped by a signal before the end; the state is saved, run again to resume.
    Interrupted,
}

/// One run's counts for one table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunCounts {
    /// Chunks this run copied.
    pub chunks: u64,
    /// Rows read from OLD.
    pub rows_read: u64,
    /// Rows written to NEW.
    pub rows_copied: u64,
    /// Rows skipped by the fence (a mirrored write or a tombstone was there first).
    pub rows_skipped: u64,
    /// Keys claimed whose row NEW already had (kept, not overwritten).
    pub rows_conflicting: u64,
    /// Rows read per second.
    pub rows_per_sec: f64,
}

/// A table in the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableSummary {
    /// `schema.table`.
    pub table: String,
    /// `done` or `running` (as the state tables say at the end of the run).
    pub status: String,
    /// What this run did.
    pub this_run: RunCounts,
    /// All runs together, from the state tables on NEW.
    pub total: Option<BackfillProgress>,
}

/// What `switchyard backfill --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// How the run ended.
    pub status: RunStatus,
    /// Wall time of the run.
    pub elapsed_secs: f64,
    /// Workers used.
    pub workers: usize,
    /// Rows per chunk asked for.
    pub chunk_rows: u64,
    /// The throttle, if any.
    pub max_rows_per_sec: Option<u64>,
    /// Rows read per second by this run, all tables.
    pub rows_per_sec: f64,
    /// Per table.
    pub tables: Vec<TableSummary>,
}
