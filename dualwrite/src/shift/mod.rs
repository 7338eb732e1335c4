//! Read shifting (phase `read_shift`): a share of the sessions have their eligible reads served
//! by NEW. The reasoning is in `docs/read-shift.md`; in short:
//!
//! - **Which reads**: the statements shadow reads take (`crate::reads`: one `SELECT` of
//!   migrated tables only, no locking, no volatile or side-effecting built-in), of tables all in
//!   `read_shift`, outside any transaction block (a block's snapshot cannot span two servers),
//!   run to completion. Everything else stays on OLD.
//! - **Which sessions**: each session draws a number below 100 when it starts and is served by
//!   NEW for a table while the table's read share is above it. The share is counted in sessions
//!   and a session stays on one store, so its reads never go back in time by hopping between
//!   OLD and NEW within the commit window.
//! - **The same answer**: the session's own settings are applied on its NEW connection, its
//!   prepared statements are prepared there, and OLD's object ids replace NEW's in
//!   descriptions (`oids`). NEW's whole answer is collected before the client sees any of it;
//!   whatever goes wrong on NEW (an error, a timeout, a result over 8 MiB, an id that cannot be
//!   translated), the batch runs on OLD instead and the client sees OLD's answer.
//! - **Read-your-writes, strictly, across proxies**: a mirrored commit is on NEW before the
//!   client hears COMMIT, so only a failed mirror leaves NEW behind. Each proxy holds a read
//!   lease of `[control] read_lease_ms`, renewed every half of it by checking OLD for recorded
//!   mirror failures not yet repaired (`switchyard_store::stale_reads`); a proxy whose mirror
//!   failed records it and answers that COMMIT a lease later, by which time no proxy serves from
//!   NEW until the repair is done.

mod conn;
pub(crate) mod oids;

use std::sync::atomic::{AtomicI16, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use switchyard_config::{StoreUrl, TableName};
use switchyard_store::wire::{ClientLogin, WireTarget};
use switchyard_store::{Role, Store};
use tokio::sync::Mutex;

pub(crate) use conn::{Kind, ServedConn, Step};
use oids::{OidMap, Untranslatable};

use crate::reads::ReadShape;

/// How long NEW is not asked again after it could not be reached.
const BREAKER: Duration = Duration::from_secs(5);
/// The soonest the id map is read again after it lacked an id.
const MAP_REFRESH: Duration = Duration::from_secs(2);

/// Why a read NEW was to serve ran on OLD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// NEW answered with an error.
    Error,
    /// NEW could not be reached, failed mid-answer or took too long.
    Unavailable,
    /// The answer was over the size held before relaying.
    TooLarge,
    /// An object id of the answer has no counterpart on OLD, or a binary value carries ids.
    Types,
    /// NEW refused the client's role (not created there, another password or secret): the
    /// session's reads stay on OLD.
    Login,
}

impl Fallback {
    /// Every reason, for metrics.
    pub const ALL: [Fallback; 5] = [
        Self::Error,
        Self::Unavailable,
        Self::TooLarge,
        Self::Types,
        Self::Login,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Unavailable => "unavailable",
            Self::TooLarge => "too_large",
            Self::Types => "types",
            Self::Login => "login",
        }
    }
}

/// The read counts of one table in `read_shift`.
#[derive(Debug, Default)]
pub struct ReadCounts {
    /// Eligible reads served by NEW.
    pub new: AtomicU64,
    /// Eligible reads served by OLD (the session is OLD's, the lease was not held, or NEW
    /// failed them).
    pub old: AtomicU64,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
}

impl ReadCounts {
    /// Reads that NEW was to serve and OLD served, for `reason`.
    pub fn fallbacks(&self, reason: Fallback) -> u64 {
        self.fallbacks[reason as usize].load(Relaxed)
    }
}

/// Not in `read_shift`.
const OFF: i16 = -1;

/// The read shifting of one proxy.
pub struct ReadShift {
    /// The read share of each mirrored table in `read_shift` (by index), [`OFF`] otherwise.
    shares: Vec<AtomicI16>,
    names: Vec<TableName>,
    counts: Vec<ReadCounts>,
    lease: Duration,
    /// Reads may be served from NEW until this instant (ns since `epoch`).
    lease_until: AtomicU64,
    /// NEW is not asked until this instant (ns since `epoch`).
    down_until: AtomicU64,
    epoch: tokio::time::Instant,
    target: WireTarget,
    connect_timeout: Duration,
    authoritative: Store,
    follower: Store,
    map: Mutex<(Arc<OidMap>, Option<tokio::time::Instant>)>,
}

impl ReadShift {
    pub(crate) fn new(
        names: Vec<TableName>,
        lease: Duration,
        (authoritative, follower): (Store, Store),
        follower_url: &StoreUrl,
        follower_role: Role,
        connect_timeout: Duration,
    ) -> Arc<ReadShift> {
        let shift = Arc::new(ReadShift {
            shares: names.iter().map(|_| AtomicI16::new(OFF)).collect(),
            counts: names.iter().map(|_| ReadCounts::default()).collect(),
            names,
            lease,
            lease_until: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            target: WireTarget {
                url: follower_url.clone(),
                store: follower_role,
            },
            connect_timeout,
            authoritative,
            follower,
            map: Mutex::new((Arc::new(OidMap::default()), None)),
        });
        tokio::spawn(lease_loop(Arc::downgrade(&shift)));
        shift
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Puts mirrored table `index` in `read_shift` with `share` percent of the sessions, or
    /// (`None`) out of it.
    pub fn set_share(&self, index: usize, share: Option<u8>) {
        if let Some(s) = self.shares.get(index) {
            s.store(share.map_or(OFF, i16::from), Relaxed);
        }
    }

    fn share(&self, index: usize) -> Option<i16> {
        let v = self.shares.get(index)?.load(Relaxed);
        (v != OFF).then_some(v)
    }

    /// The tables in `read_shift` with their counts, by name.
    pub fn tables(&self) -> impl Iterator<Item = (String, &ReadCounts)> {
        self.names
            .iter()
            .zip(&self.counts)
            .enumerate()
            .filter(|(i, _)| self.share(*i).is_some())
            .map(|(_, (n, c))| (n.to_string(), c))
    }

    /// Whether this proxy holds the read lease now.
    pub fn lease_held(&self) -> bool {
        self.now() < self.lease_until.load(Relaxed)
    }

    /// Whether a read of `shape` by a session that drew `draw` is NEW's to serve. `None` when
    /// some table it reads is not in `read_shift` (the read is not counted here at all).
    pub(crate) fn serves(&self, shape: &ReadShape, draw: u8) -> Option<bool> {
        let mut new = true;
        for t in &shape.tables {
            let share = self.share(*t)?;
            new &= i16::from(draw) < share;
        }
        Some(new && self.lease_held() && self.now() >= self.down_until.load(Relaxed))
    }

    /// Counts `reads` reads of `shape` (executions: a Query, or a Bind of the extended
    /// protocol) served by one store (`new`), and a batch NEW was to serve that fell back to
    /// OLD.
    pub(crate) fn count(&self, shape: &ReadShape, new: bool, reads: u64, fallback: Option<Fallback>) {
        let Some(c) = shape.tables.first().and_then(|t| self.counts.get(*t)) else {
            return;
        };
        if new {
            c.new.fetch_add(reads, Relaxed);
        } else {
            c.old.fetch_add(reads, Relaxed);
        }
        if let Some(f) = fallback {
            c.fallbacks[f as usize].fetch_add(1, Relaxed);
            if f == Fallback::Unavailable {
                self.down_until
                    .store(self.now() + BREAKER.as_nanos() as u64, Relaxed);
            }
        }
    }

    /// Opens a session's connection to NEW, logged in as its client (`None`: as NEW's URL
    /// says).
    pub(crate) async fn connect(
        &self,
        login: Option<&ClientLogin>,
    ) -> Result<ServedConn, crate::shadow::conn::ReadLoginError> {
        ServedConn::connect(
            &self.target,
            login,
            self.connect_timeout.min(conn::SERVED_TIMEOUT),
        )
        .await
    }

    /// The current id map (read on first use).
    pub(crate) async fn map(&self) -> Result<Arc<OidMap>, String> {
        let mut m = self.map.lock().await;
        if m.1.is_none() {
            let fresh = OidMap::load(&self.authoritative, &self.follower, &self.names).await?;
            *m = (Arc::new(fresh), Some(tokio::time::Instant::now()));
        }
        Ok(Arc::clone(&m.0))
    }

    /// Reads the id map again (an id was missing), at most every [`MAP_REFRESH`]; `None` when
    /// it was read too recently to try again.
    pub(crate) async fn refresh_map(&self) -> Option<Arc<OidMap>> {
        let mut m = self.map.lock().await;
        if m.1.is_some_and(|at| at.elapsed() < MAP_REFRESH) {
            return None;
        }
        match OidMap::load(&self.authoritative, &self.follower, &self.names).await {
            Ok(fresh) => {
                *m = (Arc::new(fresh), Some(tokio::time::Instant::now()));
                Some(Arc::clone(&m.0))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the object ids for reads served by NEW");
                m.1 = Some(tokio::time::Instant::now());
                None
            }
        }
    }

    /// A mirrored transaction committed on OLD without NEW: no proxy may serve reads from NEW
    /// until it is repaired. The lease of this proxy ends now; the failure is recorded on OLD
    /// for the others. Returns how long the client's COMMIT must wait (a lease), or nothing
    /// when no table is in `read_shift` here.
    pub(crate) async fn mirror_failed(&self, intent_id: i64) -> Option<Duration> {
        self.lease_until.store(0, Relaxed);
        if !self.shares.iter().any(|s| s.load(Relaxed) != OFF) {
            return None;
        }
        let record = switchyard_store::stale_reads::record(&self.authoritative, intent_id);
        match tokio::time::timeout(self.lease, record).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, intent_id, "cannot record a failed mirror for the read lease")
            }
            Err(_) => tracing::error!(
                intent_id,
                "timed out recording a failed mirror for the read lease"
            ),
        }
        Some(self.lease)
    }
}

impl From<Untranslatable> for Fallback {
    fn from(_: Untranslatable) -> Fallback {
        Fallback::Types
    }
}

/// Renews the lease every half of it while some table is in `read_shift`: from the moment a
/// check is sent, if OLD has no recorded mirror failure waiting for its repair.
async fn lease_loop(shift: Weak<ReadShift>) {
    loop {
        let Some(s) = shift.upgrade() else { return };
        let half = s.lease / 2;
        if s.shares.iter().any(|v| v.load(Relaxed) != OFF) {
            let sent = s.now();
            let check = switchyard_store::stale_reads::pending(&s.authoritative);
            match tokio::time::timeout(half, check).await {
                Ok(Ok(0)) => {
                    // A failure recorded after the check began is answered to its client a
                    // lease after that (`mirror_failed`), so a lease counted from `sent` ends
                    // before that client can read again; the next check sees the record.
                    s.lease_until.store(sent + s.lease.as_nanos() as u64, Relaxed);
                }
                Ok(Ok(n)) => {
                    tracing::debug!(failures = n, "read lease withheld: mirror failures await repair");
                    s.lease_until.store(0, Relaxed);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the read lease; reads stay on OLD");
                }
                Err(_) => tracing::warn!("timed out renewing the read lease; reads stay on OLD"),
            }
        }
        drop(s);
        tokio::time::sleep(half).await;
    }
}
