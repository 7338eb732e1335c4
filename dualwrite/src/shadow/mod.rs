//! Shadow reads (phase `shadow_read`): a share of the eligible reads also run on NEW, and their
//! results are compared with what OLD answered the client. The session copies the DataRow
//! messages it relays (references to the same buffers, not copies of the bytes) into a
//! [`Capture`]; when OLD's statement completes, the capture is handed to a task of its own, so
//! the client never waits for NEW. The task runs the same statement on NEW with the session's
//! settings ([`settings`]), compares ([`compare`]), re-runs a differing read once on both
//! stores (a write may have committed between the two runs), then counts the outcome per table
//! and keeps a few examples for `/status`. At most [`MAX_IN_FLIGHT`] shadow reads run at once
//! per proxy; an eligible read that finds them all busy is skipped and counted. The reasoning
//! is in `docs/drift.md`, "Shadow reads".

mod compare;
pub(crate) mod conn;
pub(crate) mod settings;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI16, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use switchyard_config::StoreUrl;
use switchyard_store::wire::ClientLogin;
use switchyard_store::Roles;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::reads::ReadShape;
use compare::{compare, render_row};
use conn::{Answer, ShadowPool, MAX_BYTES, MAX_ROWS};

/// Shadow reads running at once per proxy, at most (each holds one connection to NEW, and one
/// to OLD while it re-runs a difference).
pub const MAX_IN_FLIGHT: usize = 16;
/// Longest a shadow read may take on one store (login included); past it, it counts as an
/// error and the statement is cancelled there.
pub const SHADOW_TIMEOUT: Duration = Duration::from_secs(5);
/// Examples kept per table (the most recent).
const EXAMPLES: usize = 5;
/// Rows shown per side in an example.
const EXAMPLE_ROWS: usize = 3;

/// How a shadow read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// NEW gave the same rows (at once, or when both stores ran it again).
    Match,
    /// NEW gave other rows, also when both ran it again.
    Mismatch,
    /// NEW (or OLD's re-run) failed, timed out or could not be reached.
    Error,
    /// Not run: every shadow slot was busy, or OLD's result was too large to compare.
    Skipped,
}

impl ShadowOutcome {
    /// Every outcome, for metrics.
    pub const ALL: [ShadowOutcome; 4] = [Self::Match, Self::Mismatch, Self::Error, Self::Skipped];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::Mismatch => "mismatch",
            Self::Error => "error",
            Self::Skipped => "skipped",
        }
    }
}

/// Counts and recent examples of one table's shadow reads.
#[derive(Debug, Default)]
pub struct ShadowTableStats {
    counts: [AtomicU64; 4],
    examples: Mutex<VecDeque<serde_json::Value>>,
}

impl ShadowTableStats {
    /// How many shadow reads ended with `outcome`.
    pub fn count(&self, outcome: ShadowOutcome) -> u64 {
        self.counts[outcome as usize].load(Relaxed)
    }

    fn add(&self, outcome: ShadowOutcome, example: Option<serde_json::Value>) {
        self.counts[outcome as usize].fetch_add(1, Relaxed);
        if let (Some(e), Ok(mut examples)) = (example, self.examples.lock()) {
            if examples.len() == EXAMPLES {
                examples.pop_front();
            }
            examples.push_back(e);
        }
    }

    /// The table's counts by outcome and its recent examples, for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        for o in ShadowOutcome::ALL {
            v.insert(o.as_str().to_owned(), self.count(o).into());
        }
        let examples: Vec<serde_json::Value> = self
            .examples
            .lock()
            .map(|e| e.iter().cloned().collect())
            .unwrap_or_default();
        v.insert("examples".to_owned(), examples.into());
        v.into()
    }
}

/// What to run again: the client's Query message, or its Parse and Bind messages (whole
/// frames, as they came).
#[derive(Debug, Clone)]
pub(crate) enum ShadowRequest {
    Simple { query: Bytes },
    Extended { parse: Bytes, bind: Bytes },
}

impl ShadowRequest {
    fn sql(&self) -> String {
        let frame = match self {
            ShadowRequest::Simple { query } => query.get(5..),
            ShadowRequest::Extended { parse, .. } => parse.get(5..).and_then(|b| {
                let name_end = b.iter().position(|&c| c == 0)?;
                b.get(name_end + 1..)
            }),
        };
        let text = frame.unwrap_or_default();
        let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
        String::from_utf8_lossy(&text[..end]).into_owned()
    }
}

/// OLD's answer to a shadowed read, collected while it is relayed to the client. Holds one of
/// the proxy's shadow slots.
pub(crate) struct Capture {
    table: usize,
    ordered: bool,
    request: ShadowRequest,
    prelude: Arc<str>,
    /// The client's login, for both stores' runs (`None`: the URLs' logins).
    login: Option<Arc<ClientLogin>>,
    rows: Vec<Bytes>,
    bytes: usize,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Capture(table {}, {} rows)", self.table, self.rows.len())
    }
}

impl Capture {
    /// A DataRow OLD sent the client. Past the limits only the size is counted.
    pub(crate) fn row(&mut self, frame: &Bytes) {
        self.bytes += frame.len();
        if self.rows.len() <= MAX_ROWS && self.bytes <= MAX_BYTES {
            self.rows.push(frame.clone());
        }
    }
}

/// The value of a table not in `shadow_read`.
const OFF: i16 = -1;

fn share_value(share: Option<u8>) -> i16 {
    share.map_or(OFF, i16::from)
}

/// The shadow reads of one proxy.
pub struct ShadowReads {
    /// `shadow_share` of each mirrored table in phase `shadow_read` (by index); [`OFF`] for a
    /// table in another phase. Changed at run time when the control state moves a table
    /// ([`ShadowReads::set_share`]).
    shares: Vec<AtomicI16>,
    names: Vec<String>,
    slots: Arc<Semaphore>,
    old: ShadowPool,
    new: ShadowPool,
    stats: Vec<ShadowTableStats>,
}

impl ShadowReads {
    /// Shadow reads for the tables whose `shares` are set (the others are not shadowed until
    /// [`ShadowReads::set_share`] says so). The connections are opened on first use.
    pub(crate) fn new(
        shares: Vec<Option<u8>>,
        names: Vec<String>,
        roles: Roles,
        urls: (&StoreUrl, &StoreUrl),
    ) -> Option<Arc<ShadowReads>> {
        let stats = shares.iter().map(|_| ShadowTableStats::default()).collect();
        Some(Arc::new(ShadowReads {
            shares: shares
                .into_iter()
                .map(|s| AtomicI16::new(share_value(s)))
                .collect(),
            names,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            old: ShadowPool::new(urls.0, roles.authoritative, SHADOW_TIMEOUT),
            new: ShadowPool::new(urls.1, roles.follower, SHADOW_TIMEOUT),
            stats,
        }))
    }

    /// The share of mirrored table `index` (`None` when it is not in `shadow_read`).
    fn share(&self, index: usize) -> Option<u8> {
        let v = self.shares.get(index)?.load(Ordering::Relaxed);
        u8::try_from(v).ok()
    }

    /// Puts mirrored table `index` in or out of shadow reads (`Some(share)` in `shadow_read`):
    /// the control state moved it. Reads already started finish as they began.
    pub fn set_share(&self, index: usize, share: Option<u8>) {
        if let Some(s) = self.shares.get(index) {
            s.store(share_value(share), Ordering::Relaxed);
        }
    }

    /// The shadow-read figures of mirrored table `index`, if it is in phase `shadow_read`.
    pub fn table(&self, index: usize) -> Option<&ShadowTableStats> {
        self.share(index)?;
        self.stats.get(index)
    }

    /// The tables in phase `shadow_read`, by index and name.
    pub fn tables(&self) -> impl Iterator<Item = (usize, &str)> {
        self.names
            .iter()
            .enumerate()
            .filter(|(i, _)| self.share(*i).is_some())
            .map(|(i, n)| (i, n.as_str()))
    }

    /// Whether to shadow a read of this shape: every table it reads is in `shadow_read`, the
    /// first one's share says yes, and a slot is free (else it is counted `skipped`).
    pub(crate) fn begin(
        &self,
        shape: &ReadShape,
        request: impl FnOnce() -> ShadowRequest,
        prelude: impl FnOnce() -> Arc<str>,
        login: Option<&Arc<ClientLogin>>,
    ) -> Option<Box<Capture>> {
        let mut shares = shape.tables.iter().map(|t| self.share(*t));
        let share = shares.next()??;
        if shares.any(|s| s.is_none()) || share == 0 {
            return None;
        }
        if share < 100 && rand::random::<u8>() % 100 >= share {
            return None;
        }
        let table = shape.tables[0];
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.stats[table].add(ShadowOutcome::Skipped, None);
            return None;
        };
        Some(Box::new(Capture {
            table,
            ordered: shape.ordered,
            request: request(),
            prelude: prelude(),
            login: login.cloned(),
            rows: Vec::new(),
            bytes: 0,
            _slot: slot,
        }))
    }

    /// OLD's statement completed: compare in the background.
    pub(crate) fn finish(self: &Arc<Self>, capture: Box<Capture>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let table = capture.table;
            let (outcome, example) = me.check(&capture).await;
            tracing::debug!(table = %me.names[table], outcome = outcome.as_str(), statement = %capture.request.sql(), "shadow read");
            me.stats[table].add(outcome, example);
        });
    }

    async fn check(&self, c: &Capture) -> (ShadowOutcome, Option<serde_json::Value>) {
        if c.rows.len() > MAX_ROWS || c.bytes > MAX_BYTES {
            return (ShadowOutcome::Skipped, None);
        }
        let new = match self.new.run(&c.prelude, c.login.as_deref(), &c.request).await {
            Ok(rows) => rows,
            Err(e) => return self.failed(c, "NEW", e),
        };
        if compare(&c.rows, &new, c.ordered).is_none() {
            return (ShadowOutcome::Match, None);
        }
        // A write may have committed between OLD's run and NEW's: both run it again, at once.
        let (old_again, new_again): (Answer, Answer) = tokio::join!(
            self.old.run(&c.prelude, c.login.as_deref(), &c.request),
            self.new.run(&c.prelude, c.login.as_deref(), &c.request)
        );
        let old_again = match old_again {
            Ok(rows) => rows,
            Err(e) => return self.failed(c, "OLD", e),
        };
        let new_again = match new_again {
            Ok(rows) => rows,
            Err(e) => return self.failed(c, "NEW", e),
        };
        match compare(&old_again, &new_again, c.ordered) {
            None => (ShadowOutcome::Match, None),
            Some(diff) => {
                let show = |rows: &[Bytes]| -> Vec<serde_json::Value> {
                    rows.iter().take(EXAMPLE_ROWS).map(render_row).collect()
                };
                let mut e = self.example(
                    c,
                    ShadowOutcome::Mismatch,
                    diff.summary(old_again.len(), new_again.len()),
                );
                e["only_old"] = show(&diff.only_old).into();
                e["only_new"] = show(&diff.only_new).into();
                (ShadowOutcome::Mismatch, Some(e))
            }
        }
    }

    fn failed(&self, c: &Capture, store: &str, why: String) -> (ShadowOutcome, Option<serde_json::Value>) {
        tracing::debug!(table = %self.names[c.table], store, error = %why, "shadow read failed");
        let e = self.example(c, ShadowOutcome::Error, format!("{store}: {why}"));
        (ShadowOutcome::Error, Some(e))
    }

    fn example(&self, c: &Capture, outcome: ShadowOutcome, detail: String) -> serde_json::Value {
        let sql = c.request.sql();
        let fingerprint = pg_query::fingerprint(&sql, 0, 0)
            .map(|f| f.hex)
            .unwrap_or_default();
        let mut statement: String = sql.chars().take(200).collect();
        if statement.len() < sql.len() {
            statement.push('…');
        }
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        json!({
            "outcome": outcome.as_str(),
            "fingerprint": fingerprint,
            "statement": statement,
            "detail": detail,
            "at_unix": at,
        })
    }
}
