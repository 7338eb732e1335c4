//! Dual writes: sessions that touch migrated tables mirror their row images to NEW.
//!
//! [`Mirror`] is shared by every session of a proxy: the statement analyzer, the mirrored
//! tables' apply statements, a pool of connections to NEW, the health of NEW, and two
//! background loops: one deletes the intents of transactions NEW committed, one repairs the
//! rest. The per-session protocol work is in [`session`]; the SQL is in
//! `switchyard_store::mirror`. The mechanism and the promises it keeps are described in
//! `docs/dual-writes.md`.

mod error;
mod link;
mod reads;
mod repairs;
mod schema;
pub mod session;
pub mod shadow;
pub mod shift;
mod sql;
mod stream;
mod writers;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_config::{Config, MirrorSettings, Phase, StoreUrl, TableSettings, UncapturedPolicy};
use switchyard_store::capture as store_capture;
use switchyard_store::mirror::{self as store_mirror, Change, ChangeOp, MirrorTable};
use switchyard_store::{ErrorKind, PoolSettings, Role, Roles, Store};
use tokio::sync::mpsc;

pub use error::{SessionError, StartError};
use link::{BatchStatement, FollowerLink, LinkConn, LinkError};
use schema::{Shapes, TableShapes};
use sql::{Analyzer, MigratedTables};
use writers::{writer_functions, writer_refresh_loop, writer_set};

/// Counters and gauges of the dual-write engine, read by the metrics and `/status`.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Transactions whose images NEW committed.
    pub mirrored: AtomicU64,
    /// Transactions whose NEW side failed (left for repair).
    pub mirror_failures: AtomicU64,
    /// Intents repaired (keys re-copied).
    pub repairs: AtomicU64,
    /// Repair attempts that failed (retried with backoff).
    pub repair_failures: AtomicU64,
    /// Intents on OLD at the last count: transactions not yet confirmed on NEW.
    pub pending_intents: AtomicI64,
    /// Statements refused or marked for verification because they cannot be captured.
    pub uncaptured: AtomicU64,
    /// Sum and count of NEW apply+commit times, in microseconds, for the mean.
    pub latency_us_sum: AtomicU64,
    pub latency_count: AtomicU64,
    /// Largest NEW apply+commit time seen, in microseconds.
    pub latency_us_max: AtomicU64,
    /// NEW apply+commit times, for their quantiles.
    pub latency: LatencyHistogram,
}

/// Sub-buckets per power of two of [`LatencyHistogram`]: a quantile is known within 19%.
const SUB_BUCKETS: usize = 4;

/// Times in microseconds, counted in buckets that grow geometrically (four per power of two,
/// up to about 70 minutes), so quantiles cost a fixed amount of memory and no lock.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..32 * SUB_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    fn bucket(us: u64) -> usize {
        let us = us.max(1);
        let power = 63 - us.leading_zeros() as usize;
        // The two bits below the leading one choose the sub-bucket.
        let sub = if power >= 2 {
            ((us >> (power - 2)) & 3) as usize
        } else {
            ((us << (2 - power)) & 3) as usize
        };
        (power * SUB_BUCKETS + sub).min(32 * SUB_BUCKETS - 1)
    }

    /// The largest time bucket `i` holds, in microseconds.
    fn upper(i: usize) -> f64 {
        let (power, sub) = (i / SUB_BUCKETS, i % SUB_BUCKETS);
        (1u64 << power) as f64 * (1.0 + (sub + 1) as f64 / SUB_BUCKETS as f64)
    }

    /// Counts one time.
    pub fn record(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Relaxed);
    }

    /// The `q` quantile (0 to 1), in milliseconds (the upper end of its bucket); `None` before
    /// any time was counted.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(Self::upper(i) / 1000.0);
            }
        }
        None
    }
}

/// The dual-write engine shared by a proxy's sessions.
pub struct Mirror {
    pub(crate) analyzer: Analyzer,
    /// The mirrored tables as read at start, for their names and keys (which do not change
    /// while the proxy runs). Their columns may have: what the apply needs is in `shapes`.
    pub tables: Vec<MirrorTable>,
    /// The tables' current definitions and apply statements (`schema.rs`).
    shapes: TableShapes,
    pub(crate) policies: Vec<UncapturedPolicy>,
    /// Which store is authoritative and which follows (OLD and NEW before cutover).
    pub roles: Roles,
    /// sqlx pool to the authoritative store, for repairs and bookkeeping.
    pub(crate) authoritative: Store,
    /// sqlx pool to the follower, for repairs and bookkeeping.
    pub(crate) follower: Store,
    /// Wire-protocol connections to the follower for the mirrored transactions themselves.
    link: FollowerLink,
    pub(crate) settings: MirrorSettings,
    /// The statement that fires OLD's capture triggers before a mirrored commit
    /// ([`store_capture::capture_statement`]).
    pub(crate) capture_sql: String,
    /// Table index by `schema.table`, for the capture notices.
    by_name: std::collections::HashMap<String, usize>,
    pub(crate) proxy_id: String,
    pub stats: Arc<MirrorStats>,
    /// NEW is considered down until this instant (ns since `epoch`): transactions skip it and
    /// leave their intents for the repair loop instead of waiting on a dead store.
    pub(crate) follower_down_until: AtomicU64,
    /// On tokio's clock, so tests can pause time.
    epoch: tokio::time::Instant,
    /// Intents whose NEW commit succeeded: deleted in batches.
    done_tx: mpsc::UnboundedSender<i64>,
    /// Intents of this proxy whose NEW side failed: repaired first.
    pub(crate) failed: Mutex<Vec<i64>>,
    /// Shadow reads, when some table is in phase `shadow_read`.
    pub shadow: Option<Arc<shadow::ShadowReads>>,
    /// Reads served by the follower, for the tables in phase `read_shift`.
    pub shift: Arc<shift::ReadShift>,
}

/// The engine's pool to one store: `switchyard-repair` on the authoritative store,
/// `switchyard-mirror` on the follower, where every statement and lock wait is also bounded by
/// the server (`bound`). A transaction whose proxy vanished must not hold row locks for long.
fn engine_pool(
    role: Role,
    url: &StoreUrl,
    application_name: &'static str,
    acquire_timeout: Duration,
    bound: Option<Duration>,
) -> Result<Store, switchyard_store::StoreError> {
    let mut server_settings = vec![("idle_in_transaction_session_timeout".to_owned(), "60s".to_owned())];
    if let Some(bound) = bound {
        let ms = bound.as_millis().to_string();
        server_settings.push(("statement_timeout".to_owned(), ms.clone()));
        server_settings.push(("lock_timeout".to_owned(), ms));
    }
    let settings = PoolSettings {
        application_name,
        max_connections: 4,
        acquire_timeout,
        server_settings,
    };
    Store::connect_lazy_with(role, url, &settings)
}

/// The longest a repair may take (the repair loop gives up on it then).
pub(crate) fn repair_limit(settings: &MirrorSettings) -> Duration {
    settings.timeout * 5
}

/// `statement_timeout` and `lock_timeout` (in ms) for NEW's connections: a little above the
/// longest the proxy itself waits on them (`limit`), so NEW stops a statement the proxy gave up
/// on even if the proxy could not cancel it.
/// <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-LOCK-TIMEOUT>
fn server_bound(limit: Duration) -> Duration {
    limit + Duration::from_secs(1)
}

impl Mirror {
    /// Follows a phase change of the control state: a mirrored table moved into or out of
    /// `shadow_read` starts or stops being shadowed (with its configured `shadow_share`).
    /// Sessions started before the change shadow too: every session keeps the settings a shadow
    /// read needs.
    ///
    /// A table moved into or out of `read_shift`, or whose read share changed, has its reads
    /// served by NEW for that share of the sessions from their next read on.
    pub fn follow_phase(&self, table: &str, phase: Phase, shadow_share: u8, read_share: u8) {
        let Some(index) = self.table_index(table) else {
            return;
        };
        self.shift
            .set_share(index, (phase == Phase::ReadShift).then_some(read_share));
        if let Some(shadow) = &self.shadow {
            shadow.set_share(index, (phase == Phase::ShadowRead).then_some(shadow_share));
        }
    }

    /// Sets up mirroring for the tables in a mirrored phase, from the `roles.authoritative` store
    /// to the `roles.follower`; `None` when there are none (every session then runs the plain
    /// passthrough relay). Fails when a table's schema cannot be read, when `switchyard prepare`
    /// has not been run for these roles. Tables in `done` are not mirrored (OLD is left behind).
    pub async fn start(config: &Config, roles: Roles) -> Result<Option<Arc<Mirror>>, StartError> {
        let mirror = Self::start_unchecked(config, roles).await?;
        if let Some(m) = &mirror {
            m.check_ready().await?;
        }
        Ok(mirror)
    }

    /// Whether the stores are prepared for this engine's roles: the side tables on both, the
    /// capture trigger on the authoritative store. An engine started ahead of a cutover
    /// ([`Mirror::start_unchecked`]) is checked once the barrier moved the capture.
    pub async fn check_ready(&self) -> Result<(), StartError> {
        check_prepared(&self.authoritative, &self.follower, &self.tables).await
    }

    /// Closes the engine's pools (an engine replaced by another: its sessions have moved or
    /// will at their next transaction, and none of them uses these pools again).
    pub async fn close(&self) {
        self.link.clear_idle();
        tokio::join!(self.authoritative.close(), self.follower.close());
    }

    /// Opens up to `n` of the follower link's connections ahead of use (an engine built for a
    /// cutover: the sessions' first mirrored transactions after it find them open).
    pub async fn warm(&self, n: usize) {
        self.link.warm(n).await;
    }

    /// [`Mirror::start`] without checking that the stores are prepared for `roles`: for an
    /// engine built while a cutover barrier still moves the capture to the new authority.
    pub async fn start_unchecked(config: &Config, roles: Roles) -> Result<Option<Arc<Mirror>>, StartError> {
        // With table groups, this engine mirrors the tables whose writes its authoritative store
        // takes; the others' are the other store's, and a statement naming one runs there.
        let grouped = config.has_groups();
        let ours = |t: &TableSettings| !grouped || Role::taking_writes_in(t.phase) == roles.authoritative;
        let mirrored: Vec<&TableSettings> = config
            .tables
            .iter()
            .filter(|t| switchyard_store::prepare::captured_phase(t.phase) && ours(t))
            .collect();
        let foreign: Vec<switchyard_config::TableName> = config
            .tables
            .iter()
            .filter(|t| !ours(t))
            .map(|t| t.name.clone())
            .collect();
        if mirrored.is_empty() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let settings = config.mirror.clone();
        let (auth_url, follower_url) = (
            &roles.authoritative.settings(config).url,
            &roles.follower.settings(config).url,
        );
        let old = engine_pool(
            roles.authoritative,
            auth_url,
            "switchyard-repair",
            settings.timeout.max(Duration::from_secs(5)),
            None,
        )
        .map_err(|source| StartError::Unreachable {
            store: roles.authoritative.name(),
            source,
        })?;
        let new = engine_pool(
            roles.follower,
            follower_url,
            "switchyard-mirror",
            settings.timeout,
            Some(server_bound(repair_limit(&settings))),
        )
        .map_err(|source| StartError::Unreachable {
            store: roles.follower.name(),
            source,
        })?;

        let mut tables = Vec::new();
        let mut names = Vec::new();
        let mut policies = Vec::new();
        let shares: Vec<Option<u8>> = mirrored
            .iter()
            .map(|t| (t.phase == Phase::ShadowRead).then_some(t.shadow_share))
            .collect();
        // Every table's definition on both stores, read at once (a cutover waits for them).
        let mut loads = tokio::task::JoinSet::new();
        for (i, t) in mirrored.iter().enumerate() {
            let (old, new, name) = (old.clone(), new.clone(), t.name.clone());
            loads.spawn(async move {
                let (o, n) = tokio::join!(old.load_table(&name), new.load_table(&name));
                (i, o, n)
            });
        }
        let mut loaded = Vec::with_capacity(mirrored.len());
        while let Some(done) = loads.join_next().await {
            loaded.push(done.map_err(|e| StartError::Interrupted(e.to_string()))?);
        }
        loaded.sort_by_key(|(i, _, _)| *i);
        for (t, (_, old_loaded, new_loaded)) in mirrored.into_iter().zip(loaded) {
            let err = |store: &'static str, source: switchyard_store::StoreError| StartError::Catalog {
                table: t.name.to_string(),
                store,
                source,
            };
            let old_schema = old_loaded
                .map_err(|e| err(roles.authoritative.name(), e))?
                .ok_or_else(|| StartError::MissingTable {
                    table: t.name.to_string(),
                    store: roles.authoritative.name(),
                })?;
            let new_schema = new_loaded
                .map_err(|e| err(roles.follower.name(), e))?
                .ok_or_else(|| StartError::MissingTable {
                    table: t.name.to_string(),
                    store: roles.follower.name(),
                })?;
            let key = switchyard_store::effective_key(t, &old_schema);
            let mismatches = switchyard_store::compare_in(roles, &old_schema, &new_schema, &key);
            if !mismatches.is_empty() {
                return Err(StartError::Mismatch(
                    mismatches.iter().map(ToString::to_string).collect(),
                ));
            }
            names.push((t.name.clone(), key.clone()));
            policies.push(t.on_uncaptured);
            tables.push(MirrorTable::new(t.name.clone(), key, &old_schema, &new_schema));
        }
        let catalog = started.elapsed();
        let writers = writer_functions(&old, &names)
            .await
            .map_err(StartError::Functions)?;
        tracing::debug!(
            catalog_ms = catalog.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "dual-write engine: tables and writer functions read"
        );
        for w in &writers {
            w.log(&names);
        }

        let link = FollowerLink::new(
            follower_url,
            roles.follower,
            settings.pool_size,
            config
                .proxy
                .connect_timeout
                .min(settings.timeout.max(Duration::from_secs(1))),
            server_bound(settings.timeout),
        );
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let capture_sql = store_capture::capture_statement(tables.iter().map(|t| &t.name));
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.to_string(), i))
            .collect();
        let read_shares: Vec<Option<u8>> = config
            .tables
            .iter()
            .filter(|t| switchyard_store::prepare::captured_phase(t.phase))
            .map(|t| (t.phase == Phase::ReadShift).then_some(t.read_share))
            .collect();
        let shift = shift::ReadShift::new(
            names.iter().map(|(n, _)| n.clone()).collect(),
            config.control.read_lease,
            (old.clone(), new.clone()),
            follower_url,
            roles.follower,
            config.proxy.connect_timeout,
        );
        for (i, share) in read_shares.into_iter().enumerate() {
            shift.set_share(i, share);
        }
        let mirror = Arc::new(Mirror {
            shift,
            capture_sql,
            by_name,
            analyzer: Analyzer::new(MigratedTables::new(&names), writer_set(&writers)).with_foreign(&foreign),
            shapes: TableShapes::new(tables.clone()),
            tables,
            policies,
            roles,
            authoritative: old,
            follower: new,
            link,
            settings,
            proxy_id: format!("{}-{:08x}", std::process::id(), rand::random::<u32>()),
            stats: Arc::new(MirrorStats::default()),
            follower_down_until: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            done_tx,
            failed: Mutex::new(Vec::new()),
            shadow: shadow::ShadowReads::new(
                shares,
                names.iter().map(|(n, _)| n.to_string()).collect(),
                roles,
                (auth_url, follower_url),
            ),
        });
        tokio::spawn(cleanup_loop(Arc::downgrade(&mirror), done_rx));
        tokio::spawn(writer_refresh_loop(Arc::downgrade(&mirror)));
        tokio::spawn(repairs::repair_loop(Arc::downgrade(&mirror)));
        Ok(Some(mirror))
    }

    /// The index of the mirrored table named `schema.table`.
    pub fn table_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether NEW is believed reachable (no recent failure).
    pub fn follower_available(&self) -> bool {
        self.now_ns() >= self.follower_down_until.load(Relaxed)
    }

    /// NEW did not take a batch of images: either its tables' definitions changed (they are read
    /// again before their next use; NEW itself is fine) or NEW failed.
    fn apply_failed(&self, e: &LinkError) {
        match e {
            LinkError::Statement { code, message }
                if ErrorKind::of_sqlstate(code) == ErrorKind::SchemaMismatch =>
            {
                tracing::warn!(
                    store = self.roles.follower.name(),
                    error = %message,
                    code = %code,
                    "the follower refused row images; the tables' definitions are read again and the transaction is left for repair"
                );
                self.mark_stale();
            }
            _ => self.follower_failed(&e.to_string()),
        }
    }

    fn follower_failed(&self, why: &str) {
        tracing::warn!(
            store = self.roles.follower.name(),
            error = why,
            "the follower failed; its writes are left for repair"
        );
        let until = self.now_ns() + Duration::from_secs(1).as_nanos() as u64;
        self.follower_down_until.store(until, Relaxed);
    }

    /// Step 1 on NEW: `BEGIN`, the images and (with `marker`, the transaction's intent id) the
    /// applied marker, in one round trip, on a pooled connection. `None` when NEW is down, slow
    /// or refuses the images: the transaction then relies on its intent. `fenced` lists the
    /// tables whose fence lock the NEW transaction holds (see [`Mirror::batch`]). A large
    /// transaction sends its later images with [`Mirror::send_chunk`] (`stream.rs`).
    pub(crate) async fn begin_on_follower(
        &self,
        changes: &[Change],
        fenced: &mut Vec<usize>,
        marker: Option<i64>,
    ) -> Option<LinkConn> {
        if !self.follower_available() {
            return None;
        }
        let params = image_params(changes, marker);
        let shapes = self.shapes();
        let batch = self.batch(&shapes, changes, &params, fenced);
        // The connection whose batch is on NEW, to cancel it there if we give up on it.
        let in_use = Mutex::new(None);
        let work = async {
            let mut conn = self.link.acquire().await?;
            set_in_use(&in_use, &conn);
            match conn.conn.begin_batch(&batch).await {
                Ok(()) => Ok(conn),
                // A pooled connection that NEW (or the network) closed meanwhile: NEW rolled
                // back whatever reached it, so one retry on a fresh connection is safe. The
                // other idle connections likely died with it.
                Err(link::LinkError::Io(_)) if conn.reused => {
                    drop(conn);
                    self.link.clear_idle();
                    let mut fresh = self.link.acquire().await?;
                    set_in_use(&in_use, &fresh);
                    fresh.conn.begin_batch(&batch).await?;
                    Ok(fresh)
                }
                Err(e) => Err(e),
            }
        };
        match tokio::time::timeout(self.settings.timeout, work).await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(e)) => {
                self.apply_failed(&e);
                None
            }
            Err(_) => {
                // Dropping the connection alone would leave NEW's backend waiting (on a row lock,
                // say) until it next talks to us.
                self.link.cancel(in_use.lock().ok().and_then(|mut k| k.take()));
                self.follower_failed("timed out applying row images");
                None
            }
        }
    }

    /// The statements applying `changes` with the parameters [`image_params`] made, each
    /// table's first delete in the NEW transaction preceded by its fence lock (`fenced`: the
    /// tables whose lock the transaction already holds, updated), as
    /// [`store_mirror::takes_fence_lock`] says, and the applied marker last if `params` has it.
    fn batch<'a>(
        &self,
        shapes: &'a Shapes,
        changes: &[Change],
        params: &'a [String],
        fenced: &mut Vec<usize>,
    ) -> Vec<BatchStatement<'a>> {
        let mut batch = Vec::with_capacity(params.len() + 1);
        for (c, p) in changes.iter().zip(params) {
            let Some(st) = shapes.statements.get(c.table) else {
                continue;
            };
            if c.op == ChangeOp::Delete && !c.rows.is_empty() && !fenced.contains(&c.table) {
                fenced.push(c.table);
                let (name, sql) = &st.fence;
                batch.push(BatchStatement {
                    name,
                    sql,
                    params: Vec::new(),
                });
            }
            for (name, sql) in st.get(c.op) {
                batch.push(BatchStatement {
                    name,
                    sql,
                    params: vec![p.as_str()],
                });
            }
        }
        if let Some(id) = params.get(changes.len()) {
            batch.push(BatchStatement {
                name: "switchyard_applied",
                sql: store_mirror::APPLIED_SQL,
                params: vec![id.as_str()],
            });
        }
        batch
    }

    /// Step 3: commit NEW after OLD committed. On failure the intent stays on OLD and this
    /// proxy repairs it first.
    /// `cleanup` false leaves the intent in place (crash tests).
    pub(crate) async fn commit_on_follower(
        &self,
        conn: Option<LinkConn>,
        intent_id: i64,
        started: Instant,
        cleanup: bool,
    ) -> bool {
        let committed = match conn {
            None => false,
            Some(mut conn) => {
                let work = conn.conn.simple("COMMIT");
                match tokio::time::timeout(self.settings.timeout, work).await {
                    Ok(Ok(b'I')) => {
                        self.link.release(conn);
                        true
                    }
                    Ok(Ok(_)) => {
                        self.follower_failed("COMMIT left a transaction open");
                        false
                    }
                    Ok(Err(e)) => {
                        self.follower_failed(&e.to_string());
                        false
                    }
                    Err(_) => {
                        self.link.cancel(conn.conn.cancel_key());
                        self.follower_failed("timed out committing");
                        false
                    }
                }
            }
        };
        if committed {
            let us = started.elapsed().as_micros() as u64;
            self.stats.mirrored.fetch_add(1, Relaxed);
            self.stats.latency_us_sum.fetch_add(us, Relaxed);
            self.stats.latency_count.fetch_add(1, Relaxed);
            self.stats.latency_us_max.fetch_max(us, Relaxed);
            self.stats.latency.record(us);
            if cleanup {
                let _ = self.done_tx.send(intent_id);
            }
        } else {
            self.stats.mirror_failures.fetch_add(1, Relaxed);
            self.note_failed(intent_id);
        }
        committed
    }

    /// OLD did not commit: drop NEW's side.
    pub(crate) async fn rollback_on_follower(&self, conn: Option<LinkConn>) {
        if let Some(mut conn) = conn {
            let work = conn.conn.simple("ROLLBACK");
            match tokio::time::timeout(self.settings.timeout, work).await {
                Ok(Ok(b'I')) => self.link.release(conn),
                Err(_) => self.link.cancel(conn.conn.cancel_key()),
                Ok(_) => {}
            }
        }
    }

    /// An intent this proxy knows may be stale on NEW (its NEW commit failed, or OLD's outcome
    /// is unknown): the repair loop takes it first.
    pub(crate) fn note_failed(&self, intent_id: i64) {
        if let Ok(mut f) = self.failed.lock() {
            f.push(intent_id);
        }
    }

    /// A write the proxy cannot capture ran on OLD under `mark_for_verify`: record it on OLD.
    pub(crate) fn mark_for_verify(self: &Arc<Self>, table: usize, what: &'static str) {
        self.stats.uncaptured.fetch_add(1, Relaxed);
        let Some(t) = self.tables.get(table) else { return };
        let name = t.name.clone();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let reason = format!("{what} ran through the proxy and was not mirrored");
            if let Err(e) = store_mirror::mark_for_verify(&me.authoritative, &name, &reason).await {
                tracing::warn!(table = %name, error = %e, "cannot mark the table for verification");
            } else {
                tracing::warn!(table = %name, what, "write not mirrored; table marked for full verification");
            }
        });
    }
}

/// The parameters of a batch: each change's images as one JSON array, then the intent id of
/// the applied marker, if the batch ends with it.
fn image_params(changes: &[Change], marker: Option<i64>) -> Vec<String> {
    changes
        .iter()
        .map(|c| store_mirror::json_array(&c.rows))
        .chain(marker.map(|m| m.to_string()))
        .collect()
}

fn set_in_use(slot: &Mutex<Option<switchyard_pgwire::startup::CancelKey>>, conn: &LinkConn) {
    if let Ok(mut key) = slot.lock() {
        *key = conn.conn.cancel_key();
    }
}

/// Refuses to start when `switchyard prepare` has not created the side objects: the intents
/// and capture triggers on the authoritative store, the applied markers and key records on the
/// follower.
async fn check_prepared(old: &Store, new: &Store, tables: &[MirrorTable]) -> Result<(), StartError> {
    let missing = |store: &Store, what: String| StartError::NotPrepared {
        store: store.role().name(),
        what,
    };
    let unreachable = |store: &Store| {
        let name = store.role().name();
        move |source| StartError::Unreachable { store: name, source }
    };
    // Both stores at once, one round trip each (two on the authoritative store): an engine
    // built ahead of a cutover barrier is checked here while the writes are still held.
    let names: Vec<String> = tables
        .iter()
        .map(|t| switchyard_store::quote_table(&t.name))
        .collect();
    let on_follower: Vec<String> = std::iter::once("switchyard.switchyard_applied".to_owned())
        .chain(
            tables
                .iter()
                .filter(|t| t.keyed())
                .map(|t| switchyard_store::keys_table(&t.name)),
        )
        .collect();
    let intents = ["switchyard.switchyard_intents".to_owned()];
    let (intents, uncaptured, on_follower) = tokio::join!(
        old.missing_relations(&intents),
        old.uncaptured_tables(&names),
        new.missing_relations(&on_follower),
    );
    if let Some(rel) = intents.map_err(unreachable(old))?.into_iter().next() {
        return Err(missing(old, rel));
    }
    if let Some(rel) = on_follower.map_err(unreachable(new))?.into_iter().next() {
        let what = match tables
            .iter()
            .find(|t| t.keyed() && switchyard_store::keys_table(&t.name) == rel)
        {
            Some(t) => format!("{rel} (key records of {})", t.name),
            None => rel,
        };
        return Err(missing(new, what));
    }
    let uncaptured = uncaptured.map_err(unreachable(old))?;
    if !uncaptured.is_empty() {
        return Err(missing(
            old,
            format!("the capture trigger of {}", uncaptured.join(", ")),
        ));
    }
    Ok(())
}

/// Deletes the intents of transactions NEW committed, in batches, once NEW has them on disk
/// (its mirror connections commit asynchronously). An intent NEW lost in a crash is handed to
/// the repair loop instead.
async fn cleanup_loop(mirror: std::sync::Weak<Mirror>, mut done: mpsc::UnboundedReceiver<i64>) {
    let mut batch = Vec::new();
    while let Some(id) = done.recv().await {
        batch.push(id);
        while let Ok(id) = done.try_recv() {
            batch.push(id);
        }
        let Some(m) = mirror.upgrade() else { return };
        // Async commits reach disk within three wal_writer_delay (200 ms by default).
        let outcome =
            match store_mirror::durable_on_follower(&m.follower, &batch, Duration::from_secs(2)).await {
                Ok(Some(durable)) => {
                    let on_disk: std::collections::HashSet<i64> = durable.iter().copied().collect();
                    for id in batch.iter().filter(|id| !on_disk.contains(id)) {
                        m.note_failed(*id);
                    }
                    store_mirror::delete_intents(&m.authoritative, &m.follower, &durable)
                        .await
                        .map(|()| true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
        match outcome {
            Ok(true) => batch.clear(),
            Ok(false) => tracing::debug!("NEW's WAL flush has not reached the mirrored commits yet"),
            Err(e) => {
                // Left in place they are repaired later (a no-op, NEW has them); keep trying.
                tracing::debug!(error = %e, "cannot delete finished intents yet");
                if batch.len() > 100_000 {
                    batch.clear();
                }
            }
        }
        drop(m);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
impl Mirror {
    /// An engine for unit tests, without databases: `tables` (`schema.table`) are mirrored,
    /// each with a text key `id` and a text column `v`; the stores are unreachable (a closed
    /// loopback port) and the follower is marked down, so a commit takes the path that leaves
    /// its intent to the repair loop without waiting. No background loop runs.
    pub(crate) fn for_tests(tables: &[&str]) -> Arc<Mirror> {
        Self::for_tests_grouped(tables, &[])
    }

    /// [`Mirror::for_tests`], with `foreign` the tables whose writes the other store takes (table
    /// groups split between the stores).
    #[cfg(test)]
    pub(crate) fn for_tests_grouped(tables: &[&str], foreign: &[&str]) -> Arc<Mirror> {
        use switchyard_config::TableName;
        use switchyard_store::{Column, TableSchema};

        let url = StoreUrl::parse("postgres://test@127.0.0.1:9/unreachable").expect("test url");
        let store = |role| Store::connect_lazy(role, &url).expect("lazy store");
        let column = |name: &str| Column {
            name: name.to_owned(),
            type_name: "text".to_owned(),
            type_oid: 25,
            not_null: name == "id",
            has_default: false,
            generated: false,
            identity: None,
        };
        let mut names = Vec::new();
        let mut mirrored = Vec::new();
        for t in tables {
            let name: TableName = t.parse().expect("table name");
            let schema = TableSchema {
                name: name.clone(),
                columns: vec![column("id"), column("v")],
                primary_key: vec!["id".to_owned()],
                unique_keys: vec![vec!["id".to_owned()]],
            };
            names.push((name.clone(), vec!["id".to_owned()]));
            mirrored.push(MirrorTable::new(name, vec!["id".to_owned()], &schema, &schema));
        }
        let (done_tx, _) = mpsc::unbounded_channel();
        let settings = MirrorSettings::default();
        Arc::new(Mirror {
            capture_sql: store_capture::capture_statement(mirrored.iter().map(|t| &t.name)),
            by_name: mirrored
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.to_string(), i))
                .collect(),
            analyzer: Analyzer::new(MigratedTables::new(&names), writer_set(&[])).with_foreign(
                &foreign
                    .iter()
                    .map(|t| t.parse::<TableName>().expect("table name"))
                    .collect::<Vec<_>>(),
            ),
            shapes: TableShapes::new(mirrored.clone()),
            policies: vec![UncapturedPolicy::Refuse; mirrored.len()],
            tables: mirrored,
            roles: Roles::OLD_AUTHORITATIVE,
            authoritative: store(Role::Old),
            follower: store(Role::New),
            link: FollowerLink::new(
                &url,
                Role::New,
                1,
                Duration::from_millis(100),
                Duration::from_secs(1),
            ),
            settings,
            proxy_id: "test".to_owned(),
            stats: Arc::new(MirrorStats::default()),
            follower_down_until: AtomicU64::new(u64::MAX),
            epoch: tokio::time::Instant::now(),
            done_tx,
            failed: Mutex::new(Vec::new()),
            shadow: None,
            shift: shift::ReadShift::new(
                names.iter().map(|(n, _)| n.clone()).collect(),
                Duration::from_secs(2),
                (store(Role::Old), store(Role::New)),
                &url,
                Role::New,
                Duration::from_millis(100),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_within_a_fifth() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        for us in 1..=1000u64 {
            h.record(us * 10);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((5.0..=5.0 * 1.25).contains(&p50), "{p50}");
        assert!((9.9..=9.9 * 1.25).contains(&p99), "{p99}");
        h.record(u64::MAX);
        // Past the last bucket (about 70 minutes) times are counted in it.
        assert!(h.quantile_ms(1.0).unwrap() > 4e6);
    }

    /// After a failure the follower counts as down for a second, on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn a_failed_follower_is_skipped_for_a_second() {
        let m = Mirror::for_tests(&["public.t"]);
        m.follower_down_until.store(0, Relaxed);
        assert!(m.follower_available());
        m.follower_failed("test");
        assert!(!m.follower_available());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!m.follower_available());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(m.follower_available());
    }
}
