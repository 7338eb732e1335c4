//! Large transactions: row images go to NEW in chunks while OLD's capture statement still sends
//! them.
//!
//! The images of a transaction arrive as notices of the capture statement. [`ImageStream`]
//! holds them until a chunk is full ([`CHUNK_IMAGES`] images or [`CHUNK_BYTES`] bytes), then
//! [`Mirror::send_chunk`] folds their keys into the intent and sends them to NEW: the first
//! chunk opens NEW's transaction (`BEGIN` and the images in one round trip), the later ones run
//! on it. A chunk is sent without waiting for NEW's answer, which is read before the next chunk
//! goes, so NEW applies one chunk while the proxy collects the next; the proxy holds at most
//! one chunk of images, one in flight, and the keys of the intent. At COMMIT,
//! [`Mirror::finish_on_follower`] sends what is left with the applied marker, and the commit sequence
//! goes on as for any transaction (`docs/dual-writes.md`): intent and COMMIT on OLD, then COMMIT
//! on NEW. NEW's transaction stays uncommitted until OLD committed. If NEW fails, is slow or is
//! down at any chunk, its transaction is dropped (NEW rolls it back), the remaining images only
//! feed the intent, and the transaction is repaired from its intent like any other whose NEW
//! side failed.
//!
//! Within one chunk, each statement keeps the last image of every key; chunks run in order in
//! one NEW transaction, so a key written in several chunks ends with its last image.
//! After each chunk the session yields to the other sessions of its thread.

use std::future::Future;
use std::mem;
use std::sync::Arc;

use switchyard_store::intent::IntentKeys;
use switchyard_store::mirror::{Change, ChangeOp};

use super::link::{LinkConn, LinkError};
use super::Mirror;
use switchyard_pgwire::startup::CancelKey;

/// A chunk is sent to NEW once it holds this many images...
pub(crate) const CHUNK_IMAGES: usize = 8192;
/// ... or this many bytes of images, whichever comes first.
pub(crate) const CHUNK_BYTES: usize = 4 << 20;
/// Images whose keys are read between two yields to the other sessions of the thread.
const YIELD_IMAGES: usize = 1024;
/// Intents with more keys than this are built off the session's thread.
const BLOCKING_INTENT_KEYS: usize = 50_000;

/// Where NEW's side of the transaction is.
enum FollowerSide {
    /// Nothing sent to NEW yet.
    Idle,
    /// NEW's transaction is open; `in_flight` while the answers to the last chunk are unread.
    Open { conn: Box<LinkConn>, in_flight: bool },
    /// NEW failed, timed out or was down: the transaction relies on its intent.
    Gone,
}

/// The images of the transaction being captured, on their way to NEW, and its intent.
pub(crate) struct ImageStream {
    /// Images not sent yet, in runs of one table and operation.
    pending: Vec<Change>,
    pending_images: usize,
    pending_bytes: usize,
    /// The keys of every image so far (sent or not).
    intent: IntentKeys,
    new: FollowerSide,
    /// Tables whose fence lock NEW's transaction holds.
    fenced: Vec<usize>,
    /// Tables whose first image was checked against their known definition
    /// ([`Mirror::images_fit`]).
    checked: Vec<usize>,
    /// Images captured and chunks sent ahead of the commit.
    images: u64,
    chunks: u32,
}

impl Default for ImageStream {
    fn default() -> ImageStream {
        ImageStream {
            pending: Vec::new(),
            pending_images: 0,
            pending_bytes: 0,
            intent: IntentKeys::new(),
            new: FollowerSide::Idle,
            fenced: Vec::new(),
            checked: Vec::new(),
            images: 0,
            chunks: 0,
        }
    }
}

impl ImageStream {
    /// Adds one image of `table`.
    pub(crate) fn push(&mut self, table: usize, op: ChangeOp, image: String) {
        self.pending_images += 1;
        self.pending_bytes += image.len();
        self.images += 1;
        match self.pending.last_mut() {
            Some(c) if c.table == table && c.op == op => c.rows.push(image),
            _ => self.pending.push(Change {
                table,
                op,
                rows: vec![image],
            }),
        }
    }

    /// Whether the images held make a chunk to send now.
    pub(crate) fn chunk_full(&self) -> bool {
        self.pending_images >= CHUNK_IMAGES || self.pending_bytes >= CHUNK_BYTES
    }

    /// Whether the transaction produced no image.
    pub(crate) fn is_empty(&self) -> bool {
        self.images == 0
    }

    /// Forgets the transaction. A NEW transaction still open goes with its connection (NEW
    /// rolls it back); [`Mirror::abandon_on_follower`] ends it more politely.
    pub(crate) fn clear(&mut self) {
        self.take_pending();
        self.intent.clear();
        self.new = FollowerSide::Idle;
        self.fenced.clear();
        self.checked.clear();
        self.images = 0;
        self.chunks = 0;
    }

    fn take_pending(&mut self) -> Vec<Change> {
        self.pending_images = 0;
        self.pending_bytes = 0;
        mem::take(&mut self.pending)
    }

    /// The transaction's intent, taken out of the stream (for [`intent_sql`]).
    fn take_intent(&mut self) -> IntentKeys {
        mem::take(&mut self.intent)
    }
}

impl Mirror {
    /// Sends the images `s` holds to NEW as one chunk (opening NEW's transaction with the first),
    /// after reading the answers to the previous chunk; their keys go to the intent. Then yields,
    /// so the other sessions of this thread run.
    pub(crate) async fn send_chunk(&self, s: &mut ImageStream) {
        let changes = self.fold(s).await;
        s.chunks += 1;
        s.new = match mem::replace(&mut s.new, FollowerSide::Gone) {
            FollowerSide::Idle => match self.begin_on_follower(&changes, &mut s.fenced, None).await {
                Some(conn) => FollowerSide::Open {
                    conn: Box::new(conn),
                    in_flight: false,
                },
                None => FollowerSide::Gone,
            },
            FollowerSide::Open { mut conn, in_flight } => {
                if (!in_flight || self.chunk_answer(&mut conn).await)
                    && self.send_more(&mut conn, &changes, &mut s.fenced, None).await
                {
                    FollowerSide::Open {
                        conn,
                        in_flight: true,
                    }
                } else {
                    FollowerSide::Gone
                }
            }
            FollowerSide::Gone => FollowerSide::Gone,
        };
        drop(changes);
        tokio::task::yield_now().await;
    }

    /// Step 1 on NEW at COMMIT: the images not sent yet and the applied marker for
    /// `intent_id`; the connection whose transaction is ready to commit, or `None` when NEW's
    /// side failed (the transaction then relies on its intent).
    pub(crate) async fn finish_on_follower(&self, s: &mut ImageStream, intent_id: i64) -> Option<LinkConn> {
        let changes = self.fold(s).await;
        match mem::replace(&mut s.new, FollowerSide::Gone) {
            FollowerSide::Idle => {
                self.begin_on_follower(&changes, &mut s.fenced, Some(intent_id))
                    .await
            }
            FollowerSide::Open { mut conn, in_flight } => {
                let ok = (!in_flight || self.chunk_answer(&mut conn).await)
                    && self
                        .send_more(&mut conn, &changes, &mut s.fenced, Some(intent_id))
                        .await
                    && self.chunk_answer(&mut conn).await;
                ok.then_some(*conn)
            }
            FollowerSide::Gone => None,
        }
    }

    /// The transaction will not commit (its capture failed or its images cannot be used): ends
    /// NEW's side of it.
    pub(crate) async fn abandon_on_follower(&self, s: &mut ImageStream) {
        self.drop_new_side(s).await;
        s.clear();
    }

    /// Ends NEW's side of the transaction: the rest of it only feeds the intent.
    async fn drop_new_side(&self, s: &mut ImageStream) {
        match mem::replace(&mut s.new, FollowerSide::Gone) {
            FollowerSide::Open {
                conn,
                in_flight: false,
            } => self.rollback_on_follower(Some(*conn)).await,
            FollowerSide::Open {
                conn,
                in_flight: true,
            } => {
                // Dropped: NEW rolls back when it finds the connection closed; the cancel ends a
                // wait on a lock before that.
                self.link.cancel(conn.conn.cancel_key());
            }
            FollowerSide::Idle | FollowerSide::Gone => {}
        }
    }

    /// Takes the images `s` holds out of it, their keys added to the intent, yielding to the
    /// other sessions of the thread every [`YIELD_IMAGES`] images. A table whose mirror is held
    /// (its definitions changed and NEW cannot take OLD's rows, `schema.rs`) drops NEW's side:
    /// the transaction is then repaired from its intent once the stores match.
    async fn fold(&self, s: &mut ImageStream) -> Vec<Change> {
        let changes = s.take_pending();
        if !matches!(s.new, FollowerSide::Gone) && !self.images_fit(&changes, &mut s.checked).await {
            self.drop_new_side(s).await;
        }
        for c in &changes {
            for rows in c.rows.chunks(YIELD_IMAGES) {
                s.intent.add_rows(&self.tables, c.table, c.op, rows);
                if rows.len() == YIELD_IMAGES {
                    tokio::task::yield_now().await;
                }
            }
        }
        changes
    }

    /// Sends `changes` (and the applied marker, with `marker`) on NEW's open transaction without
    /// waiting for the answers. `false` when NEW failed (the connection is then dropped).
    async fn send_more(
        &self,
        conn: &mut LinkConn,
        changes: &[Change],
        fenced: &mut Vec<usize>,
        marker: Option<i64>,
    ) -> bool {
        let params = super::image_params(changes, marker);
        let shapes = self.shapes();
        let batch = self.batch(&shapes, changes, &params, fenced);
        let key = conn.conn.cancel_key();
        let work = conn.conn.send_batch(&batch, false);
        self.bounded(key, work, "timed out sending row images").await
    }

    /// Reads NEW's answers to the last chunk sent. `false` when it failed or NEW did not answer
    /// in time (the connection is then dropped).
    async fn chunk_answer(&self, conn: &mut LinkConn) -> bool {
        let key = conn.conn.cancel_key();
        let work = conn.conn.batch_answer();
        self.bounded(key, work, "timed out applying row images").await
    }

    /// Waits for `work` on a NEW connection at most the mirror's timeout. `false` when it failed
    /// or timed out: NEW is then marked failed, and the statement of the connection `key` names
    /// is cancelled (a backend waiting on a lock would not notice that we left).
    async fn bounded(
        &self,
        key: Option<CancelKey>,
        work: impl Future<Output = Result<(), LinkError>>,
        late: &str,
    ) -> bool {
        match tokio::time::timeout(self.settings.timeout, work).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.apply_failed(&e);
                false
            }
            Err(_) => {
                self.link.cancel(key);
                self.follower_failed(late);
                false
            }
        }
    }
}

/// The statement recording `s`'s intent on OLD (its keys are taken out of `s`). A large intent
/// is built on a blocking thread, so the other sessions of this thread are not held up; a
/// transaction that was streamed in chunks is logged.
pub(crate) async fn intent_sql(mirror: &Arc<Mirror>, s: &mut ImageStream, intent_id: i64) -> String {
    let intent = s.take_intent();
    let keys = intent.keys();
    let sql = if keys > BLOCKING_INTENT_KEYS {
        let m = Arc::clone(mirror);
        let built = tokio::task::spawn_blocking(move || intent.sql(&m.tables, intent_id, &m.proxy_id)).await;
        match built {
            Ok(sql) => sql,
            // The blocking pool is gone (the runtime is shutting down): a statement that fails
            // instead aborts the transaction, which must not commit without its intent.
            Err(_) => String::from(
                "DO $switchyard$ BEGIN RAISE EXCEPTION 'switchyard: the intent of this transaction could not be built'; END $switchyard$",
            ),
        }
    } else {
        intent.sql(&mirror.tables, intent_id, &mirror.proxy_id)
    };
    if s.chunks > 0 {
        tracing::info!(
            images = s.images,
            chunks = s.chunks + 1,
            keys,
            intent_bytes = sql.len(),
            "mirrored a large transaction"
        );
    }
    sql
}
