//! What a run has done so far, shown as it goes and summed up at the end.
//!
//! Workers add to per-table atomic counters; a reporter task shows them: an `indicatif` bar per
//! table on a terminal (rows, rows/s, ETA, fitted to the terminal's width), a log line per table
//! every few seconds otherwise. Log lines written while bars are shown must go through
//! [`MultiProgress::suspend`] (the binary's log writer does), so they appear above the bars
//! instead of breaking them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use switchyard_store::backfill_state::BackfillProgress;

/// How progress is shown while a run goes.
#[derive(Debug, Clone)]
pub enum ProgressMode {
    /// A bar per table, drawn by `indicatif` on this `MultiProgress` (on stderr when it is a
    /// terminal; `MultiProgress::new()` hides itself otherwise).
    Bar(MultiProgress),
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

    /// Rows, rate, ETA and fenced rows, for the bar and the log line.
    fn counts(&self) -> String {
        let (done, total) = self.done_and_total();
        let rate = self.rate();
        let eta = if self.finished.load(Ordering::Relaxed) {
            "done".to_owned()
        } else if rate > 0.0 {
            format!("ETA {}", secs(total.saturating_sub(done) as f64 / rate))
        } else {
            "ETA -".to_owned()
        };
        format!(
            "{done}/{total} rows  {} rows/s  {eta}  ({} fenced)",
            rate.round(),
            self.rows_skipped.load(Ordering::Relaxed),
        )
    }

    /// One log line: the name, the percentage and [`TableCounters::counts`].
    fn line(&self, width: usize) -> String {
        let (done, total) = self.done_and_total();
        let percent = if self.finished.load(Ordering::Relaxed) {
            100
        } else {
            (done * 100).checked_div(total).unwrap_or(0)
        };
        format!("{:<width$} {percent:>3}% {}", self.table, self.counts())
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
        ProgressMode::Bar(bars) => {
            // The counts go in `wide_msg`, which indicatif cuts to what the terminal's width
            // leaves after the name and the bar.
            let style = ProgressStyle::with_template(&format!(
                "{{prefix:<{width}}} [{{bar:25}}] {{percent:>3}}% {{wide_msg}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>.");
            let shown: Vec<ProgressBar> = tables
                .iter()
                .map(|t| {
                    let bar = bars.add(ProgressBar::new(0).with_style(style.clone()));
                    bar.set_prefix(t.table.clone());
                    bar
                })
                .collect();
            loop {
                let last = done.load(Ordering::Relaxed);
                for (t, bar) in tables.iter().zip(&shown) {
                    let (done, total) = t.done_and_total();
                    bar.set_length(total);
                    bar.set_position(done);
                    if t.finished.load(Ordering::Relaxed) {
                        bar.set_length(done);
                        bar.finish_with_message(t.counts());
                    } else {
                        bar.set_message(t.counts());
                    }
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = wake.notified() => {}
                }
            }
            for bar in &shown {
                if !bar.is_finished() {
                    bar.abandon();
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

#[cfg(test)]
mod tests {
    use indicatif::{InMemoryTerm, ProgressDrawTarget, TermLike};

    use super::*;

    /// The bars fit a narrow terminal, whatever the table name's length, and a log line written
    /// through `suspend` (as the binary's log writer does) stays whole, above them.
    #[tokio::test]
    async fn bars_fit_the_terminal_and_log_lines_go_above_them() {
        const COLUMNS: u16 = 80;
        let term = InMemoryTerm::new(12, COLUMNS);
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        let long = Arc::new(TableCounters::new(
            "public.a_table_with_a_rather_long_name".into(),
        ));
        let short = Arc::new(TableCounters::new("public.t".into()));
        long.rows_estimated.store(1000, Ordering::Relaxed);
        short.rows_estimated.store(10, Ordering::Relaxed);
        long.chunk_started();
        long.add(400, 390, 10, 0);
        let done = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());
        let reporter = tokio::spawn(report(
            ProgressMode::Bar(bars.clone()),
            Arc::new(vec![Arc::clone(&long), Arc::clone(&short)]),
            Arc::clone(&done),
            Arc::clone(&wake),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        bars.suspend(|| term.write_line("INFO a log line from a worker").unwrap());
        long.add(600, 600, 0, 0);
        long.finished.store(true, Ordering::Relaxed);
        short.add(10, 10, 0, 0);
        short.finished.store(true, Ordering::Relaxed);
        done.store(true, Ordering::Relaxed);
        wake.notify_one();
        reporter.await.unwrap();

        let screen = term.contents();
        let lines: Vec<&str> = screen.lines().filter(|l| !l.trim().is_empty()).collect();
        for line in &lines {
            assert!(
                line.chars().count() <= usize::from(COLUMNS),
                "wider than the terminal: {line:?}\n{screen}"
            );
        }
        let log = lines
            .iter()
            .position(|l| l.trim_end() == "INFO a log line from a worker");
        let long_bar = lines
            .iter()
            .position(|l| l.starts_with("public.a_table_with_a_rather_long_name"));
        let short_bar = lines.iter().position(|l| l.starts_with("public.t "));
        assert!(
            matches!((log, long_bar, short_bar), (Some(a), Some(b), Some(c)) if a < b && b < c),
            "log line above the bars:\n{screen}"
        );
        assert!(
            lines
                .iter()
                .all(|l| !l.starts_with("public.") || l.contains("] 100% ")),
            "both bars end full: {screen}"
        );
    }
}
