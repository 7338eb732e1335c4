//! Simple Query messages, which may hold several statements (a multi-statement string): run as
//! the client wrote them, wrapped in a transaction of the proxy's when they write a migrated
//! table outside one.

use super::*;

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// A Query message. It always reaches OLD as the client's own bytes (or, for a refused
    /// statement, not at all); what the session adds are whole statements of its own around it.
    pub(super) async fn simple_query(&mut self, frame: Bytes, sql: &str) -> Result<(), SessionError> {
        if self.expect.is_empty() {
            // Errors of earlier batches are answered and done with.
            self.batch_failed = false;
        }
        let analysis = self.mirror.analyzer.analyze(sql);
        if !analysis.matters() {
            if self.serve_query(&frame, &analysis).await? {
                return Ok(());
            }
            let shadow = self.shadow_query(sql, &analysis, &frame);
            let expect = Expect::Query {
                forward: true,
                forward_ready: true,
                commit: None,
                shadow,
            };
            self.send_frame(&frame, Some(expect));
            self.flushed = true;
            return Ok(());
        }
        if let Some(table) = analysis.stmts.iter().find_map(|s| match &s.stmt {
            Stmt::Foreign { table, .. } => Some(table),
            _ => None,
        }) {
            // A string that names a table whose writes the other store takes, where the session
            // could not move for it (a transaction runs here, or the string uses tables of both):
            // refused whole, as the server refuses a string whose statement fails first.
            let (msg, hint) = self.foreign_refusal(table);
            let mut out = BytesMut::new();
            fe::query(&mut out, &client::refusal_sql_with(&msg, &hint));
            self.send(&out, Some(Expect::query(true, true, None)));
            self.flushed = true;
            return Ok(());
        }
        if let Some(refusal) = self.uncaptured(&analysis) {
            // The whole string is refused: the server raises the error, as for a statement
            // that failed before anything of the string ran.
            let mut out = BytesMut::new();
            fe::query(&mut out, &refusal_sql(&refusal));
            self.send(&out, Some(Expect::query(true, true, None)));
            self.flushed = true;
            return Ok(());
        }
        let writes = analysis
            .stmts
            .iter()
            .any(|s| matches!(s.stmt, Stmt::Write { .. }));
        let txn: Vec<&TxnOp> = analysis
            .stmts
            .iter()
            .filter_map(|s| match &s.stmt {
                Stmt::Txn(op) => Some(op),
                _ => None,
            })
            .collect();
        match (analysis.stmts.len(), txn.as_slice()) {
            (1, [TxnOp::Commit]) => {
                if let Some(commit) = self.prepare_commit().await? {
                    let intent = self.intent_sql(commit.intent_id).await;
                    // If the intent fails the transaction is aborted and COMMIT answers
                    // ROLLBACK, as the server decides.
                    self.queue_query(&intent);
                    self.send_frame(&frame, Some(Expect::query(true, true, Some(commit))));
                    self.flushed = true;
                    return Ok(());
                }
            }
            (1, [TxnOp::Prepare]) if self.dirty => {
                let msg =
                    "PREPARE TRANSACTION of a transaction that wrote migrated tables cannot be mirrored";
                let mut out = BytesMut::new();
                fe::query(&mut out, &refusal_sql(msg));
                self.send(&out, Some(Expect::query(true, true, None)));
                self.flushed = true;
                return Ok(());
            }
            (_, []) if writes => {
                self.barrier().await?;
                if self.status == TransactionStatus::Idle {
                    return self.wrapped_query(frame).await;
                }
                self.dirty = true;
            }
            // Transaction control among other statements: the string runs as the client wrote
            // it; a COMMIT inside it fires the capture triggers at commit, which record the
            // changes durably on OLD for the repair loop (the net).
            _ => self.dirty |= writes,
        }
        self.send_frame(&frame, Some(Expect::query(true, true, None)));
        self.flushed = true;
        Ok(())
    }

    /// The refusal message for the first uncapturable statement under policy `refuse`; marks
    /// the tables of those under `mark_for_verify`.
    pub(super) fn uncaptured(&self, analysis: &Analysis) -> Option<String> {
        for s in &analysis.stmts {
            if let Stmt::Uncaptured { table, what } = &s.stmt {
                if self.mirror.policies.get(*table) == Some(&UncapturedPolicy::MarkForVerify) {
                    self.mirror.mark_for_verify(*table, what);
                } else {
                    return Some(self.refusal(*table, what));
                }
            }
        }
        None
    }

    /// An autocommit Query that writes a migrated table: run inside a transaction of the
    /// proxy's, then the commit sequence; the client hears its answers and ReadyForQuery once
    /// both stores committed.
    pub(super) async fn wrapped_query(&mut self, frame: Bytes) -> Result<(), SessionError> {
        self.hold_client = true;
        self.queue_query("BEGIN");
        self.dirty = true;
        self.batch_failed = false;
        self.send_frame(&frame, Some(Expect::query(true, false, None)));
        self.flushed = true;
        self.flush_upstream().await?;
        self.drain().await?;
        let failed = std::mem::take(&mut self.batch_failed);
        if failed || self.status == TransactionStatus::Failed {
            self.run_query("ROLLBACK", None).await?;
            self.end_transaction();
        } else if let Some(commit) = self.prepare_commit().await? {
            let intent = self.intent_sql(commit.intent_id).await;
            self.queue_query(&intent);
            self.run_query("COMMIT", Some(commit)).await?;
        } else {
            self.run_query("COMMIT", None).await?;
        }
        self.hold_client = false;
        backend::ready_for_query(&mut self.to_client, self.status);
        Ok(())
    }

    /// Queues a Query whose answers the client does not see (errors excepted); it is sent and
    /// answered together with the next [`Self::run_query`], saving a round trip.
    pub(super) fn queue_query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        fe::query(&mut out, sql);
        self.send(&out, Some(Expect::query(false, false, None)));
        self.flushed = true;
    }

    /// Sends one Query of the proxy's (and any queued ones) and processes the answers, which
    /// the client does not see (errors excepted).
    pub(super) async fn run_query(
        &mut self,
        sql: &str,
        commit: Option<CommitWait>,
    ) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        fe::query(&mut out, sql);
        self.batch_failed = false;
        self.send(&out, Some(Expect::query(false, false, commit)));
        self.flushed = true;
        self.flush_upstream().await?;
        self.drain().await?;
        self.batch_failed = false;
        Ok(())
    }
}
