//! The backfill's errors: one enum, each variant saying what to do about it.

use switchyard_config::{Phase, TableName};
use switchyard_store::{Mismatch, StoreError};

/// Why a backfill (or a tombstone cleanup) could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// `--table` named a table that has no `[[tables]]` entry.
    #[error("table {0} is not in the configuration (no [[tables]] entry)")]
    UnknownTable(TableName),
    /// No table is in a phase that can be backfilled.
    #[error("no table to backfill: none is in phase dual_write or later")]
    NothingToDo,
    /// The table's writes are not mirrored yet, so a copy would go stale at once.
    #[error(
        "{table} is in phase {phase}: its writes are not mirrored to NEW yet, so a copy would go \
         stale; put it in dual_write on every proxy first"
    )]
    NotMirrored {
        /// The table.
        table: TableName,
        /// Its configured phase.
        phase: Phase,
    },
    /// A table without a key is backfilled up to its capture boundary, and OLD has none for it.
    #[error(
        "{table} has no key, so its backfill copies the rows committed before its capture began, but \
         OLD has no capture boundary for it (switchyard.switchyard_capture_boundary): run `switchyard \
         prepare` with the table in dual_write, which records it when it installs the capture \
         triggers. If the triggers were installed by a Switchyard that did not record boundaries, put \
         the table back in passthrough and run prepare (removes them), empty the table on NEW, then \
         dual_write and prepare again"
    )]
    NoBoundary {
        /// The table.
        table: TableName,
    },
    /// A table without a key was rewritten (`VACUUM FULL`, `CLUSTER`) since its capture began:
    /// its rows moved between blocks, so the block ranges of its chunks no longer hold.
    #[error(
        "{table} was rewritten on OLD (VACUUM FULL, CLUSTER or the like) since its capture began, so \
         its rows moved and the backfill's block ranges no longer fit: empty the table on NEW, reset \
         its backfill state, and restart its capture (passthrough, prepare, dual_write, prepare)"
    )]
    Rewritten {
        /// The table.
        table: TableName,
    },
    /// The table is missing on one of the stores.
    #[error("{table} does not exist on {store}")]
    MissingTable {
        /// The table.
        table: TableName,
        /// `OLD` or `NEW`.
        store: &'static str,
    },
    /// NEW's table cannot take OLD's rows (the checks of `switchyard prepare`).
    #[error("{table}: NEW's table cannot take OLD's rows: {}", list(.problems))]
    Incompatible {
        /// The table.
        table: TableName,
        /// Every problem found.
        problems: Vec<Mismatch>,
    },
    /// The keys table (the fence) is missing: `switchyard prepare` has not run.
    #[error(
        "{table}: its keys table switchyard.{keys_table} does not exist on NEW; run \
         `switchyard prepare --config FILE` first (and start dual writes before the backfill)"
    )]
    NotPrepared {
        /// The table.
        table: TableName,
        /// The keys table's name in schema `switchyard`.
        keys_table: String,
    },
    /// The table's key changed since its backfill began.
    #[error(
        "{table}: its backfill began with key ({was}) but the key is now ({now}); the recorded chunks \
         do not fit the new key"
    )]
    KeyChanged {
        /// The table.
        table: TableName,
        /// The key recorded in `switchyard_backfill_tables`.
        was: String,
        /// The key now.
        now: String,
    },
    /// Tombstones may only be removed once the table's backfill has finished.
    #[error(
        "{table}: tombstones kept, its backfill has not finished ({state}); they stop the backfill \
         from bringing deleted rows back"
    )]
    NotFinished {
        /// The table.
        table: TableName,
        /// What the state tables say.
        state: String,
    },
    /// A command-line option is out of range.
    #[error("{0}")]
    BadOption(String),
    /// A store could not be reached or a statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BackfillError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackfillError::UnknownTable(_) | BackfillError::BadOption(_) => "usage",
            BackfillError::NothingToDo | BackfillError::NotMirrored { .. } => "phase",
            BackfillError::NoBoundary { .. }
            | BackfillError::Rewritten { .. }
            | BackfillError::MissingTable { .. }
            | BackfillError::Incompatible { .. }
            | BackfillError::KeyChanged { .. } => "schema",
            BackfillError::NotPrepared { .. } => "not_prepared",
            BackfillError::NotFinished { .. } => "not_finished",
            BackfillError::Store(_) => "store",
        }
    }
}

fn list(problems: &[Mismatch]) -> String {
    problems
        .iter()
        .map(|m| m.problem.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}
