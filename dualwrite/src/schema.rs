//! Schema changes of mirrored tables while the proxy runs: noticing them, reading both stores'
//! definitions again, and holding a table's mirror while NEW cannot take OLD's rows.
//!
//! The apply statements of a table name its columns (`MirrorTable`), so they are only right for
//! the definitions they were built from. A change is noticed three ways, none of which costs a
//! catalog read per transaction:
//!
//! - **OLD's images.** A row image is `row_to_json` of OLD's row, so its keys are OLD's columns
//!   as they are now. The first image of each table in a transaction is compared with the
//!   columns the table was built for (`MirrorTable::image_matches`, which reads the keys without
//!   building the values). A column added, dropped or renamed on OLD shows at once, before any
//!   image of that transaction reaches NEW. (OLD refuses `ALTER TABLE` on a table with pending
//!   trigger events in the same transaction, so all images of one table in one capture have one
//!   shape.)
//! - **NEW's errors.** NEW rejecting an apply with an error a changed definition explains
//!   (`switchyard_store::ErrorKind::SchemaMismatch`: a column gone, a type changed) marks every
//!   table for a re-read before its next use.
//! - **A periodic re-read** every `[mirror] function_refresh_secs` (with OLD's writer
//!   functions), for what neither shows: a column type changed on OLD whose values NEW still
//!   takes, a column added on NEW only.
//!
//! After a re-read, a table whose definitions still fit (`switchyard_store::compare`) gets new
//! apply statements, prepared on NEW's connections under new names (the names carry a
//! generation), so no connection runs a statement built for the old columns. A table whose
//! definitions do not fit (a column only OLD has: NEW would silently lose its values) is
//! **held**: the transactions that write it commit on OLD with their intents, but NEW's side is
//! dropped, so nothing is applied without the column. The repair loop retries them with backoff
//! and re-reads the table (at most once a second while it is held), and once NEW matches again
//! the repairs copy the rows from OLD. See `docs/dual-writes.md`, "Schema changes while running".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use switchyard_store::mirror::{self as store_mirror, Change, ChangeOp, MirrorTable};

use super::Mirror;

/// While a table is held, its definitions are read again at most this often.
pub(super) const HELD_REREAD: Duration = Duration::from_secs(1);

/// The prepared apply statements of one table: names and SQL per operation (a delete is two
/// statements, see `MirrorTable::prepared_apply`), and the fence lock a delete takes first.
#[derive(Clone)]
pub(crate) struct ApplyStatements {
    upsert: Vec<(String, String)>,
    delete: Vec<(String, String)>,
    append: Vec<(String, String)>,
    pub(crate) fence: (String, String),
}

impl ApplyStatements {
    /// The statements of table `index` built in `generation` (part of their names, so a
    /// connection that prepared an earlier generation's statements prepares these anew).
    fn new(index: usize, generation: u64, table: &MirrorTable) -> ApplyStatements {
        let one = |tag: &str, op| {
            table
                .prepared_apply(op)
                .into_iter()
                .enumerate()
                .map(|(i, sql)| (format!("switchyard_apply_{index}_{generation}_{tag}{i}"), sql))
                .collect()
        };
        ApplyStatements {
            upsert: one("u", ChangeOp::Upsert),
            delete: one("d", ChangeOp::Delete),
            append: one("a", ChangeOp::Append),
            fence: (
                format!("switchyard_fence_{index}"),
                store_mirror::fence_lock_sql(&table.name, false),
            ),
        }
    }

    pub(crate) fn get(&self, op: ChangeOp) -> &[(String, String)] {
        match op {
            ChangeOp::Upsert => &self.upsert,
            ChangeOp::Delete => &self.delete,
            ChangeOp::Append => &self.append,
        }
    }
}

/// The mirrored tables as their definitions were last read, with their apply statements.
pub(crate) struct Shapes {
    pub(crate) tables: Vec<MirrorTable>,
    pub(crate) statements: Vec<ApplyStatements>,
}

/// The current [`Shapes`] and what decides when they are read again.
pub(crate) struct TableShapes {
    current: RwLock<Arc<Shapes>>,
    /// Per table: held while its definitions are read, and when they last were.
    reads: Vec<tokio::sync::Mutex<Option<Instant>>>,
    /// Per table: NEW refused an apply; read the definitions again before the next use.
    stale: Vec<AtomicBool>,
    generation: AtomicU64,
}

impl TableShapes {
    /// The shapes of `tables` as read at start.
    pub(crate) fn new(tables: Vec<MirrorTable>) -> TableShapes {
        let statements = tables
            .iter()
            .enumerate()
            .map(|(i, t)| ApplyStatements::new(i, 0, t))
            .collect();
        TableShapes {
            reads: tables.iter().map(|_| tokio::sync::Mutex::new(None)).collect(),
            stale: tables.iter().map(|_| AtomicBool::new(false)).collect(),
            current: RwLock::new(Arc::new(Shapes { tables, statements })),
            generation: AtomicU64::new(0),
        }
    }

    fn is_stale(&self, table: usize) -> bool {
        self.stale.get(table).is_some_and(|s| s.load(Relaxed))
    }
}

impl Mirror {
    /// The mirrored tables as their definitions were last read.
    pub(crate) fn shapes(&self) -> Arc<Shapes> {
        match self.shapes.current.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Why table `table`'s mirror is held (OLD and NEW differ), if it is.
    pub fn held(&self, table: usize) -> Option<String> {
        self.shapes().tables.get(table).and_then(MirrorTable::mismatch)
    }

    /// Whether the images of `changes` can be applied to NEW as the tables stand: the first
    /// image of each table not in `checked` (which collects the tables checked in this
    /// transaction) is compared with what the proxy knows of OLD, and the table's definitions
    /// are read again when they changed. `false` when a table is held: NEW must not get this
    /// transaction.
    pub(crate) async fn images_fit(&self, changes: &[Change], checked: &mut Vec<usize>) -> bool {
        for c in changes {
            let Some(image) = c.rows.first() else { continue };
            if checked.contains(&c.table) {
                continue;
            }
            checked.push(c.table);
            if !self.ready_for(c.table, image).await {
                return false;
            }
        }
        true
    }

    /// Whether table `table` can take `image` (an image from OLD) now, reading its definitions
    /// again first when the image or NEW says they changed, or when the table is held (at most
    /// once every [`HELD_REREAD`]).
    async fn ready_for(&self, table: usize, image: &str) -> bool {
        let fits = |s: &Shapes| {
            s.tables
                .get(table)
                .is_some_and(|t| t.mismatch().is_none() && t.image_matches(image))
        };
        if !self.shapes.is_stale(table) && fits(&self.shapes()) {
            return true;
        }
        let Some(slot) = self.shapes.reads.get(table) else {
            return false;
        };
        let mut last = slot.lock().await;
        let current = self.shapes();
        if !self.shapes.is_stale(table) && fits(&current) {
            // Another session read them meanwhile.
            return true;
        }
        let known = current.tables.get(table).is_some_and(|t| t.image_matches(image));
        let recent = last.is_some_and(|at| at.elapsed() < HELD_REREAD);
        if !(known && recent && !self.shapes.is_stale(table)) {
            self.reread_locked(table, &mut last).await;
        }
        fits(&self.shapes())
    }

    /// Reads table `table`'s definitions again unless they were read within `min_age`; whether
    /// its mirror works (is not held) afterwards.
    pub(crate) async fn reread(&self, table: usize, min_age: Duration) -> bool {
        if let Some(slot) = self.shapes.reads.get(table) {
            let mut last = slot.lock().await;
            if !last.is_some_and(|at| at.elapsed() < min_age) {
                self.reread_locked(table, &mut last).await;
            }
        }
        self.held(table).is_none()
    }

    /// Reads table `table`'s definitions again (the slot's lock held) and installs new apply
    /// statements if they changed.
    async fn reread_locked(&self, table: usize, last: &mut Option<Instant>) {
        let Some(known) = self.shapes().tables.get(table).cloned() else {
            return;
        };
        *last = Some(Instant::now());
        if let Some(stale) = self.shapes.stale.get(table) {
            stale.store(false, Relaxed);
        }
        let read = known.reload(&self.authoritative, &self.follower);
        let fresh = match tokio::time::timeout(self.settings.timeout.max(Duration::from_secs(1)), read).await
        {
            Ok(Ok(fresh)) => fresh,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in time".to_owned(),
                };
                tracing::warn!(table = %known.name, error, "cannot read the table's definitions again; trying again on its next write");
                if let Some(stale) = self.shapes.stale.get(table) {
                    stale.store(true, Relaxed);
                }
                return;
            }
        };
        if fresh == known {
            return;
        }
        match fresh.mismatch() {
            Some(problem) => tracing::warn!(
                table = %fresh.name,
                problem,
                "the table's definitions changed and NEW cannot take OLD's rows: its transactions commit on OLD and wait for repair until the stores match"
            ),
            None => {
                tracing::info!(table = %fresh.name, "the table's definitions changed; its apply statements are rebuilt")
            }
        }
        self.install(table, fresh);
    }

    /// Replaces table `table`'s shape and statements.
    fn install(&self, table: usize, fresh: MirrorTable) {
        let generation = self.shapes.generation.fetch_add(1, Relaxed) + 1;
        let mut current = match self.shapes.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut tables = current.tables.clone();
        let mut statements = current.statements.clone();
        if let (Some(t), Some(st)) = (tables.get_mut(table), statements.get_mut(table)) {
            *st = ApplyStatements::new(table, generation, &fresh);
            *t = fresh;
        }
        *current = Arc::new(Shapes { tables, statements });
    }

    /// NEW refused an apply with an error a changed definition may explain: every table is read
    /// again before its next use.
    pub(crate) fn mark_stale(&self) {
        for s in &self.shapes.stale {
            s.store(true, Relaxed);
        }
    }

    /// Reads the definitions of the tables marked stale again.
    pub(crate) async fn reread_stale(&self) {
        for table in 0..self.shapes.stale.len() {
            if self.shapes.is_stale(table) {
                self.reread(table, Duration::ZERO).await;
            }
        }
    }

    /// Reads every table's definitions again (the periodic check).
    pub(crate) async fn reread_all(&self) {
        for table in 0..self.shapes.stale.len() {
            self.reread(table, Duration::ZERO).await;
        }
    }
}
