//! The commit sequence: before the authoritative store commits, the capture statement brings
//! the row images, which go to the follower; the intent is recorded; the COMMIT's outcome
//! decides the follower's.

use super::*;

/// A COMMIT sent to OLD whose outcome decides NEW's.
#[derive(Debug, Clone, Copy)]
pub(super) struct CommitWait {
    pub(super) intent_id: i64,
}

/// What the NEW side of a commit in progress holds.
pub(super) struct PendingCommit {
    pub(super) conn: Option<crate::link::LinkConn>,
    pub(super) intent_id: i64,
    pub(super) started: Instant,
}

/// The row images the capture statement brings, streamed to NEW in chunks
/// ([`crate::stream`]).
#[derive(Default)]
pub(super) struct Captured {
    pub(super) stream: ImageStream,
    /// The first image that could not be used (the commit is then refused).
    pub(super) problem: Option<String>,
}

impl Captured {
    pub(super) fn clear(&mut self) {
        self.stream.clear();
        self.problem = None;
    }

    /// Adds one image notice, or records why it cannot be used.
    pub(super) fn add(&mut self, mirror: &Mirror, fields: &backend::ErrorFields<'_>) {
        if self.problem.is_some() {
            return;
        }
        match decode_image(mirror, fields) {
            Ok((table, op, image)) => self.stream.push(table, op, image),
            Err(problem) => self.problem = Some(problem),
        }
    }
}

/// A capture notice's table, operation and image (UTF-8 JSON).
fn decode_image(
    mirror: &Mirror,
    fields: &backend::ErrorFields<'_>,
) -> Result<(usize, ChangeOp, String), String> {
    let table = String::from_utf8_lossy(fields.get(b'D').unwrap_or_default()).into_owned();
    let hint = fields.get(b'H').unwrap_or_default();
    let (op, base64) = match hint.strip_suffix(b"64") {
        Some(op) => (op, true),
        None => (hint, false),
    };
    let op = match ImageOp::from_hint(op) {
        Some(ImageOp::Upsert) => ChangeOp::Upsert,
        Some(ImageOp::Delete) => ChangeOp::Delete,
        Some(ImageOp::Append) => ChangeOp::Append,
        None => return Err(format!("a row image of table {table} has an unknown operation")),
    };
    let Some(index) = mirror.table_index(&table) else {
        return Err(format!(
            "table {table} has Switchyard's capture trigger but this proxy does not mirror it; \
             run every proxy with the same [[tables]] (and `switchyard prepare` after changing them)"
        ));
    };
    let raw = fields.get(b'M').unwrap_or_default();
    let bytes = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|e| format!("a row image of table {table} is not valid base64: {e}"))?
    } else {
        raw.to_vec()
    };
    let image = String::from_utf8(bytes).map_err(|_| format!("a row image of table {table} is not UTF-8"))?;
    Ok((index, op, image))
}

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    pub(super) async fn rollback_quietly(&mut self) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        fe::query(&mut out, "ROLLBACK");
        self.send(&out, Some(Expect::query(false, false, None)));
        self.flushed = true;
        self.flush_upstream().await?;
        self.drain().await?;
        self.end_transaction();
        self.status = TransactionStatus::Idle;
        Ok(())
    }

    /// The transaction is over (committed, rolled back or never begun).
    pub(super) fn end_transaction(&mut self) {
        self.dirty = false;
        self.txn = self.txn.closed();
        self.captured.clear();
    }

    /// Before OLD commits: waits for every earlier answer, fires the capture triggers, then
    /// applies the images on NEW. `None` when there is nothing to mirror or the transaction
    /// already failed.
    pub(super) async fn prepare_commit(&mut self) -> Result<Option<CommitWait>, SessionError> {
        self.settle().await?;
        if !self.dirty || self.status == TransactionStatus::Failed || self.batch_failed {
            self.dirty = false;
            return Ok(None);
        }
        self.dirty = false;
        self.captured.clear();
        let sql = self.mirror.capture_sql.clone();
        self.inject_statement(&sql, None, false, true);
        self.barrier().await?;
        if self.batch_failed {
            // The capture statement failed (the client has the error): the transaction is
            // aborted and its COMMIT will answer ROLLBACK.
            self.mirror.abandon_on_follower(&mut self.captured.stream).await;
            self.captured.clear();
            return Ok(None);
        }
        if let Some(problem) = self.captured.problem.take() {
            // Images the proxy cannot apply must not be committed on OLD alone without a
            // record: refuse the commit (the server raises the error and aborts).
            self.mirror.abandon_on_follower(&mut self.captured.stream).await;
            self.captured.clear();
            tracing::error!(problem, "refusing a commit whose row images cannot be mirrored");
            self.refuse_extended(&problem);
            self.barrier().await?;
            return Ok(None);
        }
        if self.captured.stream.is_empty() {
            return Ok(None);
        }
        let intent_id = (rand::random::<u64>() >> 1) as i64;
        let started = Instant::now();
        let conn = self
            .mirror
            .finish_on_follower(&mut self.captured.stream, intent_id)
            .await;
        if self.mirror.settings.fault_injection == Some(MirrorFault::BeforeOldCommit) {
            drop(conn);
            return Err(SessionError::Injected("before OLD's commit"));
        }
        self.pending = Some(PendingCommit {
            conn,
            intent_id,
            started,
        });
        Ok(Some(CommitWait { intent_id }))
    }

    /// The statement recording the transaction's intent on OLD.
    pub(super) async fn intent_sql(&mut self, intent_id: i64) -> String {
        crate::stream::intent_sql(self.mirror, &mut self.captured.stream, intent_id).await
    }

    /// OLD answered the COMMIT: finish NEW accordingly.
    pub(super) async fn finish_commit(&mut self, committed: bool) -> Result<(), SessionError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let fault = self.mirror.settings.fault_injection;
        if committed {
            if fault == Some(MirrorFault::AfterOldCommit) {
                // Die as a killed proxy would: NEW's transaction goes with its connection.
                drop(p.conn);
                return Err(SessionError::Injected("after OLD's commit"));
            }
            let cleanup = fault != Some(MirrorFault::AfterNewCommit);
            let mirrored = self
                .mirror
                .commit_on_follower(p.conn, p.intent_id, p.started, cleanup)
                .await;
            if !cleanup {
                return Err(SessionError::Injected("after NEW's commit"));
            }
            if !mirrored {
                // NEW lacks what OLD committed until the repair: while reads may be served by
                // NEW, the client hears COMMIT only once no proxy can still serve them
                // (`crate::shift`).
                if let Some(wait) = self.mirror.shift.mirror_failed(p.intent_id).await {
                    tracing::info!(
                        intent_id = p.intent_id,
                        wait_ms = wait.as_millis() as u64,
                        "mirror failed; answering COMMIT after the read lease"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        } else {
            self.mirror.rollback_on_follower(p.conn).await;
        }
        self.captured.clear();
        Ok(())
    }
}
