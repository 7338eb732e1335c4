//! The latest drift results (`switchyard drift sample|verify|watch` record them on NEW), read
//! every [`POLL`] by each proxy for `/status` and the metrics.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use switchyard_drift::LatestDrift;
use switchyard_store::Store;

use crate::shutdown::{Shutdown, ShutdownState};

/// How often the figures are read from NEW.
pub(crate) const POLL: Duration = Duration::from_secs(10);

/// The latest results, and when they were read.
#[derive(Debug, Default)]
pub(crate) struct DriftFigures {
    latest: Mutex<Option<(Vec<LatestDrift>, Instant)>>,
}

impl DriftFigures {
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

/// Reads the figures from `new` every [`POLL`] until shutdown; a failed read keeps the last
/// figures (their ages keep growing, which is what an operator should see).
pub(crate) async fn poll_loop(figures: Arc<DriftFigures>, new: Store, mut shutdown: Shutdown) {
    loop {
        match switchyard_drift::latest(&new).await {
            Ok(results) => figures.set(results),
            Err(e) => tracing::debug!(error = %e, "cannot read the latest drift results"),
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed_from(ShutdownState::Running) => return,
        }
    }
}
