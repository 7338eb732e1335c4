//! Table groups split between the stores (`docs/cutover.md`, "Table groups"): each transaction
//! runs on the store that takes the writes of the tables its first statement names.
//!
//! When a quiet session's client sends something, the session looks at the first statement of
//! what came (before any of it goes upstream): if it names a table of a group whose writes the
//! other store takes ([`Stmt::Foreign`]), the session moves there first
//! ([`SessionEnd::Reroute`] with [`Resume::to`]); the proxy keeps its connection to each store,
//! so a move only gives the other connection the session's settings and prepared statements.
//! Inside a transaction, a statement naming a table of the other store is refused (it would
//! commit on two databases).
//!
//! A lone `BEGIN` says nothing of where the transaction will run, so the session answers it
//! itself and sends it upstream just before the transaction's first statement, on the store that
//! statement decides.

use super::*;
use switchyard_pgwire::frame::Frames;

/// Where the transaction the client starts runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// On this session's store.
    Here,
    /// On the other store: the session moves first.
    There,
    /// The client sent a lone BEGIN (simple Query) and waits for its answer: answered here,
    /// sent with the next statement.
    DeferBegin,
    /// The first statement has not fully arrived.
    NeedMore,
    /// The buffer starts with this many bytes of a batch that runs no statement (Close or
    /// Describe messages and their Sync, as drivers send when they drop statements): processed
    /// first, here, then the rest is routed.
    Prefix(usize),
}

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// Where the transaction in the client's buffered messages runs (the session is quiet).
    pub(super) fn route(&self) -> Route {
        if !self.mirror.analyzer.has_foreign() {
            return Route::Here;
        }
        let decide = |stmt: &Stmt| match stmt {
            Stmt::Txn(TxnOp::Begin) => None,
            // Naming tables of both stores, it runs on neither: refused here.
            Stmt::Foreign { mixed: true, .. } => Some(Route::Here),
            Stmt::Foreign { .. } => Some(Route::There),
            _ => Some(Route::Here),
        };
        if self.deferred.is_none() && self.lone_extended_begin().is_some() {
            return Route::DeferBegin;
        }
        let mut frames = Frames::new(&self.client_buf, self.params.limits);
        let mut begun = false;
        let mut parsed: HashMap<&[u8], Stmt> = HashMap::new();
        while let Some(next) = frames.next() {
            // Malformed or too large: the usual processing refuses it.
            let Ok((header, body)) = next else {
                return Route::Here;
            };
            let tag = header.tag;
            let last = frames.consumed() == self.client_buf.len();
            match (tag, fe::parse(tag, body).ok()) {
                (b'Q', Some(ClientMessage::Query { sql })) => {
                    let analysis = self.mirror.analyzer.analyze(&String::from_utf8_lossy(sql));
                    if let Some(route) = analysis.stmts.iter().find_map(|s| decide(&s.stmt)) {
                        // A string whose statements name tables of both stores runs on neither.
                        let both = analysis
                            .stmts
                            .iter()
                            .any(|s| matches!(s.stmt, Stmt::Foreign { .. }))
                            && analysis
                                .stmts
                                .iter()
                                .any(|s| matches!(s.stmt, Stmt::Write { .. } | Stmt::Uncaptured { .. }));
                        return if both { Route::Here } else { route };
                    }
                    // Only BEGIN: alone, and the client waits for its answer.
                    if last && self.deferred.is_none() && !analysis.stmts.is_empty() && !begun {
                        return Route::DeferBegin;
                    }
                    begun = true;
                }
                (b'P', Some(ClientMessage::Parse { statement, sql })) => {
                    // A statement prepared ahead of its first use (a Parse, Describe and Sync
                    // from drivers that prepare, then a Bind and Execute) decides too: the
                    // client uses it next.
                    let analysis = self.mirror.analyzer.analyze(&String::from_utf8_lossy(sql));
                    let stmt = match analysis.stmts.as_slice() {
                        [one] => one.stmt.clone(),
                        _ => Stmt::Plain,
                    };
                    if let Some(route) = decide(&stmt) {
                        return route;
                    }
                    begun = true;
                    parsed.insert(statement, stmt);
                }
                (b'B', Some(ClientMessage::Bind { statement, .. })) => {
                    let stmt = match parsed.get(statement) {
                        Some(s) => Some(s),
                        None => self.statements.get(statement).map(|s| &**s),
                    };
                    match stmt.map(decide) {
                        Some(None) => {}
                        Some(Some(route)) => return route,
                        None => return Route::Here,
                    }
                }
                // Describe and Close start nothing; an Execute here is of a BEGIN's portal (a
                // Bind of anything else decided already).
                (b'D' | b'C' | b'E', _) => {}
                // A batch without statements, more behind it: it goes first.
                (b'S' | b'H', _) if !begun && !last => return Route::Prefix(frames.consumed()),
                // Sync, Flush, a function call, COPY data, Terminate: the client waits for
                // answers or ends; the batch runs here.
                _ => return Route::Here,
            }
        }
        // The next frame has not fully arrived.
        Route::NeedMore
    }

    /// Whether the client's buffer is exactly a lone BEGIN in the extended protocol: a Bind of a
    /// statement prepared as BEGIN, a Describe of its portal maybe, Execute and Sync (libpq's
    /// `PQsendQueryPrepared`, pgbench's prepared mode, drivers that run BEGIN as a statement).
    /// Returns the statement's text.
    fn lone_extended_begin(&self) -> Option<String> {
        let mut frames = Frames::new(&self.client_buf, self.params.limits);
        let mut tags = Vec::new();
        let mut text = None;
        for next in frames.by_ref() {
            let (header, body) = next.ok()?;
            if header.tag == b'B' {
                let Ok(ClientMessage::Bind { statement, .. }) = fe::parse(b'B', body) else {
                    return None;
                };
                if !matches!(
                    self.statements.get(statement).map(|s| &**s),
                    Some(Stmt::Txn(TxnOp::Begin))
                ) {
                    return None;
                }
                let parse = self.parses.get(statement)?;
                text = match fe::parse(b'P', parse.get(5..)?) {
                    Ok(ClientMessage::Parse { sql, .. }) => Some(String::from_utf8_lossy(sql).into_owned()),
                    _ => None,
                };
            }
            tags.push(header.tag);
        }
        if frames.consumed() != self.client_buf.len() {
            // A frame still arriving.
            return None;
        }
        matches!(tags.as_slice(), [b'B', b'E', b'S'] | [b'B', b'D', b'E', b'S'])
            .then_some(text)
            .flatten()
    }

    /// Answers the client's lone BEGIN (a simple Query, or the extended messages of
    /// [`Self::lone_extended_begin`]) as the server would, and keeps it for
    /// [`Self::send_deferred`].
    pub(super) fn defer_begin(&mut self) -> Result<(), SessionError> {
        let extended = self.lone_extended_begin();
        let mut kept = BytesMut::new();
        let mut sql = extended.clone().unwrap_or_default();
        while let Some(frame) =
            take_frame(&mut self.client_buf, self.params.limits).map_err(SessionError::ClientProtocol)?
        {
            match frame.tag {
                b'Q' => {
                    if let Ok(ClientMessage::Query { sql: q }) =
                        fe::parse(b'Q', frame.bytes.get(5..).unwrap_or_default())
                    {
                        sql = String::from_utf8_lossy(q).into_owned();
                    }
                    kept.extend_from_slice(&frame.bytes);
                }
                b'B' => {
                    backend::empty_message(&mut self.to_client, b'2');
                    kept.extend_from_slice(&frame.bytes);
                }
                // The portal of a BEGIN returns no rows; the Describe is not sent upstream.
                b'D' => backend::empty_message(&mut self.to_client, b'n'),
                b'E' | b'S' => kept.extend_from_slice(&frame.bytes),
                _ => {}
            }
            if extended.is_none() {
                break;
            }
        }
        let tag = if sql.trim_start().to_ascii_lowercase().starts_with("start") {
            "START TRANSACTION"
        } else {
            "BEGIN"
        };
        backend::command_complete(&mut self.to_client, tag);
        backend::ready_for_query(&mut self.to_client, TransactionStatus::InTransaction);
        self.deferred = Some(kept.freeze());
        Ok(())
    }

    /// Sends the BEGIN answered by [`Self::defer_begin`] ahead of the transaction's first
    /// statement; its answers were the client's already.
    pub(super) fn send_deferred(&mut self) {
        let Some(mut frames) = self.deferred.take().map(|b| BytesMut::from(&b[..])) else {
            return;
        };
        while let Ok(Some(frame)) = take_frame(&mut frames, self.params.limits) {
            let expect = match frame.tag {
                b'Q' => Expect::query(false, false, None),
                b'B' => Expect::Bind { forward: false },
                b'E' => Expect::exec(false, None),
                _ => Expect::Sync { forward: false },
            };
            self.send_frame(&frame.bytes, Some(expect));
        }
        self.flushed = true;
        // The block is the client's from here: a write that follows before the BEGIN's answer
        // is read must not get a transaction of the proxy's around it (its commit would end the
        // client's transaction early).
        self.txn = self.txn.opened();
    }
}
