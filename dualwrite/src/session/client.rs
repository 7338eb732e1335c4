//! Messages from the client: the extended protocol (Parse, Bind, Describe, Execute, Close,
//! Sync, Flush), the fast-path call, and the proxy's own statements injected into a batch (its
//! implicit BEGIN around an autocommit write, refusals raised by the server).

use super::*;
use crate::sql::mentions_any;

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// A message from the client: held for NEW when it may start or continue a batch NEW
    /// serves (`served`), else processed for OLD.
    pub(super) async fn client_message(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
        if self.held.is_some() {
            return self.hold_next(tag, frame).await;
        }
        if self.may_hold(tag, &frame) {
            self.held = Some(vec![(tag, frame)]);
            return Ok(());
        }
        self.client_message_for_old(tag, frame).await
    }

    /// A message from the client, processed for OLD.
    pub(super) async fn client_message_for_old(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
        tracing::trace!(tag = %(tag as char), len = frame.len(), expect = self.expect.len(), "client message");
        let body = frame.slice(5..);
        // A malformed message is forwarded as it came: the server refuses it (and ends the
        // session), so the session only needs to expect its error.
        let msg = fe::parse(tag, &body).ok();
        match tag {
            b'Q' => {
                // Borrowed from the frame when it is UTF-8 (it always is for a server in UTF-8):
                // a copy of a statement of hundreds of MB would double what it costs.
                let sql = match msg {
                    Some(ClientMessage::Query { sql }) => String::from_utf8_lossy(sql),
                    _ => std::borrow::Cow::Borrowed(""),
                };
                self.note_state(sql.as_bytes());
                if let Some(d) = deallocation(&sql) {
                    self.forget_statements(&d);
                }
                self.simple_query(frame, &sql).await
            }
            b'P' => {
                self.flushed = false;
                self.send_frame(&frame, Some(Expect::Parse { forward: true }));
                self.note_parse(msg, &frame);
                Ok(())
            }
            b'B' => {
                self.flushed = false;
                let Some(ClientMessage::Bind { portal, statement }) = msg else {
                    self.send_frame(&frame, Some(Expect::Bind { forward: true }));
                    return Ok(());
                };
                let stmt = self
                    .statements
                    .get(statement)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Stmt::Plain));
                if let Some(d) = self.deallocating.get(statement).cloned() {
                    self.forget_statements(&d);
                }
                if let Stmt::Write { .. } = &*stmt {
                    self.begin_if_idle();
                }
                self.shadow_bind(portal, statement, &frame);
                let portal = portal.to_vec();
                self.send_frame(&frame, Some(Expect::Bind { forward: true }));
                set_name(&mut self.portals, &portal, stmt);
                Ok(())
            }
            b'D' => {
                self.flushed = false;
                let e = match msg {
                    Some(ClientMessage::Describe {
                        target: Target::Statement,
                        ..
                    }) => Expect::DescribeStatement { got_params: false },
                    _ => Expect::DescribePortal,
                };
                self.send_frame(&frame, Some(e));
                Ok(())
            }
            b'E' => {
                self.flushed = false;
                let (stmt, shadow) = match msg {
                    Some(ClientMessage::Execute { portal, max_rows }) => (
                        self.portals.get(portal).cloned(),
                        self.shadow_execute(portal, max_rows),
                    ),
                    _ => (None, None),
                };
                let stmt = stmt.unwrap_or_else(|| Arc::new(Stmt::Plain));
                self.execute(frame, &stmt, shadow).await
            }
            b'C' => {
                self.flushed = false;
                match msg {
                    Some(ClientMessage::Close {
                        target: Target::Statement,
                        name,
                    }) => {
                        self.shadow_close(Target::Statement, name);
                        self.parses.remove(name);
                        self.deallocating.remove(name);
                        self.statements.remove(name)
                    }
                    Some(ClientMessage::Close { name, .. }) => {
                        self.shadow_close(Target::Portal, name);
                        self.portals.remove(name)
                    }
                    _ => None,
                };
                self.send_frame(&frame, Some(Expect::Close { forward: true }));
                Ok(())
            }
            b'S' => {
                self.no_hold = false;
                self.sync(frame).await
            }
            b'H' => {
                // The client wants its answers now, even those held for a commit in progress.
                self.hold_client = false;
                self.send_frame(&frame, None);
                self.flushed = true;
                Ok(())
            }
            b'F' => {
                // A fast-path call that writes a migrated table is captured by the trigger's
                // net (the session cannot tell what the function does).
                self.send_frame(&frame, Some(Expect::FunctionCall));
                self.flushed = true;
                Ok(())
            }
            // CopyData, CopyDone, CopyFail sent ahead of the server's CopyInResponse (pipelined
            // by the client), or outside COPY, where the server answers them.
            _ => {
                if tag == b'c' || tag == b'f' {
                    self.copy_ends_sent += 1;
                }
                self.send_frame(&frame, None);
                Ok(())
            }
        }
    }

    /// Notes whether `sql` may leave state on the server connection (see
    /// [`Resume::may_hold_state`]).
    pub(super) fn note_state(&mut self, sql: &[u8]) {
        const WORDS: [&[u8]; 5] = [b"advisory", b"temp", b"listen", b"prepare", b"hold"];
        if !self.may_hold_state {
            self.may_hold_state = mentions_any(sql, WORDS);
        }
    }

    /// Forgets the prepared statements a `DEALLOCATE` or `DISCARD ALL` the client ran drops on
    /// the server, so a move to the other store does not prepare them there again (the client,
    /// which believes them gone, may prepare the same names anew: PostgreSQL would refuse that
    /// with 42P05). The unnamed statement is not dropped by them.
    fn forget_statements(&mut self, d: &Deallocation) {
        match d {
            Deallocation::All => {
                self.parses.retain(|name, _| name.is_empty());
                self.statements.retain(|name, _| name.is_empty());
                self.deallocating.retain(|name, _| name.is_empty());
            }
            Deallocation::Names(names) => {
                for name in names {
                    self.parses.remove(name);
                    self.statements.remove(name);
                    self.deallocating.remove(name);
                }
            }
        }
    }

    /// What the session keeps of a Parse: the statement's kind, and whether it is a read
    /// shadow reads and NEW may serve.
    pub(super) fn note_parse(&mut self, msg: Option<ClientMessage<'_>>, frame: &Bytes) {
        // Malformed: the server answers it.
        let Some(ClientMessage::Parse { statement: name, sql }) = msg else {
            return;
        };
        self.note_state(sql);
        self.parses.insert(name.to_vec(), frame.clone());
        let sql = String::from_utf8_lossy(sql);
        match deallocation(&sql) {
            Some(d) => self.deallocating.insert(name.to_vec(), d),
            None => self.deallocating.remove(name),
        };
        let analysis = self.mirror.analyzer.analyze(&sql);
        self.shadow_parse(name, &sql, &analysis, frame);
        let stmt = match analysis.stmts.as_slice() {
            [one] => one.stmt.clone(),
            _ => Stmt::Plain,
        };
        set_name(&mut self.statements, name, Arc::new(stmt));
    }

    /// Opens a transaction for an autocommit write in an extended-protocol batch.
    pub(super) fn begin_if_idle(&mut self) {
        if self.txn == Txn::None {
            // Only errors from here on decide whether the proxy's transaction commits: one left
            // over from an earlier simple Query (answered, and already seen by the client) must
            // not roll back this one.
            self.batch_failed = false;
            self.inject_statement("BEGIN", None, false, false);
            self.txn = Txn::Implicit { open: false };
            self.hold_client = true;
        }
    }

    /// Injects one statement as extended-protocol messages whose answers the client never sees
    /// (errors excepted).
    pub(super) fn inject_statement(
        &mut self,
        sql: &str,
        commit: Option<CommitWait>,
        forward: bool,
        capture: bool,
    ) {
        let mut out = BytesMut::new();
        fe::parse_statement(&mut out, INJECTED, sql.as_bytes(), &[]);
        fe::bind(&mut out, INJECTED, INJECTED, &[], &[], &[]);
        fe::execute(&mut out, INJECTED, 0);
        fe::close(&mut out, Target::Portal, INJECTED);
        fe::close(&mut out, Target::Statement, INJECTED);
        self.to_up.extend_from_slice(&out);
        self.expect.push_back(Expect::Parse { forward: false });
        self.expect.push_back(Expect::Bind { forward: false });
        self.expect.push_back(Expect::Execute {
            forward,
            commit,
            capture,
            shadow: None,
        });
        self.expect.push_back(Expect::Close { forward: false });
        self.expect.push_back(Expect::Close { forward: false });
        self.flushed = false;
    }

    /// An Execute message; `shadow` collects OLD's rows of a shadowed read.
    pub(super) async fn execute(
        &mut self,
        frame: Bytes,
        stmt: &Stmt,
        shadow: Option<Box<Capture>>,
    ) -> Result<(), SessionError> {
        match stmt {
            Stmt::Write { table } => {
                tracing::trace!(table, "a write to a migrated table");
                self.begin_if_idle();
                self.dirty = true;
                self.send_frame(&frame, Some(Expect::exec(true, None)));
            }
            Stmt::Txn(op) => {
                match op {
                    TxnOp::Begin => self.txn = self.txn.opened(),
                    TxnOp::Commit => {
                        if let Some(commit) = self.prepare_commit().await? {
                            let intent = self.intent_sql(commit.intent_id).await;
                            self.inject_statement(&intent, None, false, false);
                            self.send_frame(&frame, Some(Expect::exec(true, Some(commit))));
                            return Ok(());
                        }
                    }
                    TxnOp::Prepare if self.dirty => {
                        self.refuse_extended(
                            "PREPARE TRANSACTION of a transaction that wrote migrated tables cannot be mirrored",
                        );
                        return Ok(());
                    }
                    TxnOp::Prepare | TxnOp::Other => {}
                }
                self.send_frame(&frame, Some(Expect::exec(true, None)));
            }
            Stmt::Uncaptured { table, what } => {
                if self.mirror.policies.get(*table) == Some(&UncapturedPolicy::MarkForVerify) {
                    self.mirror.mark_for_verify(*table, what);
                    self.send_frame(&frame, Some(Expect::exec(true, None)));
                } else {
                    let msg = self.refusal(*table, what);
                    self.refuse_extended(&msg);
                }
            }
            Stmt::Foreign { table, .. } => {
                let (msg, hint) = self.foreign_refusal(table);
                let sql = refusal_sql_with(&msg, &hint);
                self.inject_statement(&sql, None, true, false);
            }
            Stmt::Plain => {
                let expect = Expect::Execute {
                    forward: true,
                    commit: None,
                    capture: false,
                    shadow,
                };
                self.send_frame(&frame, Some(expect));
            }
        }
        Ok(())
    }

    /// The refusal of a statement naming `table`, whose writes the other store takes, inside a
    /// transaction (or a batch) running here: message and hint.
    pub(super) fn foreign_refusal(&self, table: &str) -> (String, String) {
        let (here, there) = (self.mirror.roles.authoritative, self.mirror.roles.follower);
        (
            format!(
                "table {table} is written on {} (its table group cut over separately), and this transaction runs on {}: \
                 one transaction cannot use tables of groups written on different databases",
                there.name(),
                here.name()
            ),
            "Use the tables of one table group per transaction: its first statement decides the database it runs on."
                .to_owned(),
        )
    }

    /// Counts a refused statement and returns the message the client gets.
    pub(super) fn refusal(&self, table: usize, what: &str) -> String {
        self.mirror
            .stats
            .uncaptured
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = self
            .mirror
            .tables
            .get(table)
            .map(|t| t.name.to_string())
            .unwrap_or_default();
        format!("{what} on table {name} cannot be mirrored to the new database during the migration")
    }

    /// The server itself raises the refusal, so its transaction state (aborted block, skip to
    /// Sync) is exactly what a failed statement leaves.
    pub(super) fn refuse_extended(&mut self, message: &str) {
        let sql = refusal_sql(message);
        self.inject_statement(&sql, None, true, false);
    }

    pub(super) async fn sync(&mut self, frame: Bytes) -> Result<(), SessionError> {
        if !self.txn.implicit() {
            self.send_frame(&frame, Some(Expect::Sync { forward: true }));
            self.flushed = true;
            self.batch_failed = false;
            return Ok(());
        }
        // The proxy opened a transaction for this batch: finish it before the client's Sync.
        self.barrier().await?;
        self.txn = self.txn.end_implicit();
        if self.batch_failed || self.status == TransactionStatus::Failed {
            self.send_frame(&frame, Some(Expect::Sync { forward: false }));
            self.flushed = true;
            self.drain().await?;
            if self.status == TransactionStatus::Idle {
                // The error came before the proxy's BEGIN ran (the server skipped it with the
                // rest of the batch): there is nothing to roll back, and a ROLLBACK would
                // answer a warning PostgreSQL never sends here.
                self.end_transaction();
            } else {
                self.rollback_quietly().await?;
            }
            backend::ready_for_query(&mut self.to_client, TransactionStatus::Idle);
            self.batch_failed = false;
            self.hold_client = false;
            return Ok(());
        }
        if let Some(commit) = self.prepare_commit().await? {
            let intent = self.intent_sql(commit.intent_id).await;
            self.inject_statement(&intent, None, false, false);
            self.inject_statement("COMMIT", Some(commit), false, false);
        } else {
            self.inject_statement("COMMIT", None, false, false);
        }
        // The commit and the client's Sync go together; the client's ReadyForQuery is ours.
        self.send_frame(&frame, Some(Expect::Sync { forward: false }));
        self.flushed = true;
        self.drain().await?;
        if self.status != TransactionStatus::Idle {
            // The intent or COMMIT failed inside the block the proxy opened: close it; the
            // client already has the error.
            self.rollback_quietly().await?;
        }
        backend::ready_for_query(&mut self.to_client, TransactionStatus::Idle);
        self.batch_failed = false;
        self.hold_client = false;
        Ok(())
    }
}

/// The hint of the proxy's refusals.
pub(super) const REFUSAL_HINT: &str = "Run it directly on both databases, or set on_uncaptured = \"mark_for_verify\" for the table and verify it before cutover.";

/// A statement that makes the server raise the refusal (SQLSTATE 0A000).
pub(super) fn refusal_sql(message: &str) -> String {
    refusal_sql_with(message, REFUSAL_HINT)
}

/// [`refusal_sql`] with a hint of its own.
pub(super) fn refusal_sql_with(message: &str, hint: &str) -> String {
    let msg = message.replace('\'', "''");
    let hint = hint.replace('\'', "''");
    format!(
        "DO $switchyard$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{msg}', HINT = '{hint}'; END $switchyard$",
        sqlstate::FEATURE_NOT_SUPPORTED.as_str()
    )
}

fn set_name(map: &mut HashMap<Vec<u8>, Arc<Stmt>>, name: &[u8], stmt: Arc<Stmt>) {
    match map.get_mut(name) {
        Some(slot) => *slot = stmt,
        None => {
            map.insert(name.to_vec(), stmt);
        }
    }
}

/// What a statement does to the session's prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Deallocation {
    /// `DEALLOCATE ALL`, `DISCARD ALL`.
    All,
    /// `DEALLOCATE name`, for each name.
    Names(Vec<Vec<u8>>),
}

/// The prepared statements `sql` deallocates, if any (a cheap word check first: most
/// statements are not parsed).
pub(crate) fn deallocation(sql: &str) -> Option<Deallocation> {
    use pg_query::protobuf::DiscardMode;
    use pg_query::NodeEnum;
    const WORDS: [&[u8]; 2] = [b"deallocate", b"discard"];
    if !mentions_any(sql.as_bytes(), WORDS) {
        return None;
    }
    let parsed = pg_query::parse(sql, 0).ok()?;
    let mut names = Vec::new();
    for raw in &parsed.protobuf.stmts {
        match raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
            Some(NodeEnum::DeallocateStmt(d)) if d.isall || d.name.is_empty() => {
                return Some(Deallocation::All)
            }
            Some(NodeEnum::DeallocateStmt(d)) => names.push(d.name.as_bytes().to_vec()),
            Some(NodeEnum::DiscardStmt(d)) if d.target == DiscardMode::DiscardAll as i32 => {
                return Some(Deallocation::All)
            }
            _ => {}
        }
    }
    (!names.is_empty()).then_some(Deallocation::Names(names))
}

#[cfg(test)]
mod deallocation_tests {
    use super::{deallocation, Deallocation};

    #[test]
    fn deallocations_are_read_from_the_statements() {
        assert_eq!(deallocation("SELECT 1"), None);
        assert_eq!(deallocation("SELECT 'deallocate'"), None);
        assert_eq!(deallocation("DEALLOCATE ALL"), Some(Deallocation::All));
        assert_eq!(deallocation("deallocate prepare all"), Some(Deallocation::All));
        assert_eq!(deallocation("DISCARD ALL"), Some(Deallocation::All));
        assert_eq!(deallocation("DISCARD PLANS"), None);
        assert_eq!(
            deallocation(r#"DEALLOCATE "S_1"; SELECT 1; DEALLOCATE PREPARE q2"#),
            Some(Deallocation::Names(vec![b"S_1".to_vec(), b"q2".to_vec()]))
        );
        assert_eq!(
            deallocation("DEALLOCATE Mixed"),
            Some(Deallocation::Names(vec![b"mixed".to_vec()]))
        );
    }
}
