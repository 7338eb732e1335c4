//! Answers from the authoritative store, matched in order against what the session expects:
//! forwarded to the client or kept, transaction status tracked, errors ending a batch, the
//! capture statement's image notices taken.

use super::*;

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// Whether the statement being answered is the capture statement.
    pub(super) fn capturing(&self) -> bool {
        matches!(self.expect.front(), Some(Expect::Execute { capture: true, .. }))
    }

    pub(super) async fn server_message(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
        tracing::trace!(tag = %(tag as char), head = ?self.expect.front(), "server message");
        match tag {
            b'N' if self.capturing() => {
                if let Ok(ServerMessage::NoticeResponse(fields)) = backend::parse(tag, &frame[5..]) {
                    if fields.get(b'C') == Some(CAPTURE_SQLSTATE.as_slice()) {
                        self.captured.add(self.mirror, &fields);
                        if self.captured.problem.is_none() && self.captured.stream.chunk_full() {
                            let mirror = self.mirror;
                            mirror.send_chunk(&mut self.captured.stream).await;
                        }
                        return Ok(());
                    }
                }
                self.to_client.extend_from_slice(&frame);
                return Ok(());
            }
            // Asynchronous messages: always the client's.
            b'N' | b'A' | b'S' => {
                if tag == b'S' {
                    self.shadow_reported(&frame);
                }
                self.to_client.extend_from_slice(&frame);
                return Ok(());
            }
            b'E' => return self.server_error(frame).await,
            b'G' => {
                // COPY FROM STDIN: relay the client's data until it is done, unless the client
                // already sent all of it (pipelined after its query).
                self.to_client.extend_from_slice(&frame);
                if self.copy_ends_sent > 0 {
                    self.copy_ends_sent -= 1;
                    return Ok(());
                }
                return self.copy_in().await;
            }
            _ => {}
        }
        let body = frame.slice(5..);
        let (is_query, forward_ready) = match self.expect.front() {
            Some(Expect::Query { forward_ready, .. }) => (true, *forward_ready),
            _ => (false, false),
        };
        let Some(head) = self.expect.front_mut() else {
            // Nothing expected (a server-initiated message): pass it on.
            self.to_client.extend_from_slice(&frame);
            return Ok(());
        };
        match head {
            Expect::Parse { forward } | Expect::Bind { forward } | Expect::Close { forward } => {
                if *forward {
                    self.to_client.extend_from_slice(&frame);
                }
                self.expect.pop_front();
            }
            Expect::DescribeStatement { got_params } => {
                self.to_client.extend_from_slice(&frame);
                if tag == b't' && !*got_params {
                    *got_params = true;
                } else {
                    self.expect.pop_front();
                }
            }
            Expect::DescribePortal => {
                self.to_client.extend_from_slice(&frame);
                self.expect.pop_front();
            }
            Expect::Execute {
                forward,
                commit,
                shadow,
                ..
            }
            | Expect::Query {
                forward,
                commit,
                shadow,
                ..
            } => {
                let (forward, commit) = (*forward, *commit);
                // A shadowed read: OLD's rows are kept as relayed; once complete, compared.
                let shadowed = match (tag, shadow.as_deref_mut()) {
                    (b'D', Some(capture)) => {
                        capture.row(&frame);
                        None
                    }
                    (b'C', Some(_)) => shadow.take(),
                    _ => None,
                };
                if let Some(capture) = shadowed {
                    self.shadow_completed(capture);
                }
                match tag {
                    b'C' | b'I' | b's' if !is_query || tag == b'C' => {
                        // The statement completed.
                        if !is_query {
                            self.expect.pop_front();
                        }
                        if commit.is_some() {
                            let committed = tag == b'C' && backend::command_tag(&body) == b"COMMIT";
                            self.finish_commit(committed).await?;
                        }
                        if forward {
                            self.to_client.extend_from_slice(&frame);
                        }
                        if tag == b'C' {
                            self.track_block(&body);
                        }
                    }
                    b'Z' if is_query => {
                        self.expect.pop_front();
                        self.ready(&body);
                        if commit.is_some() && self.pending.is_some() {
                            // COMMIT never answered with CommandComplete (it failed).
                            self.finish_commit(false).await?;
                        }
                        if forward_ready {
                            self.to_client.extend_from_slice(&frame);
                        }
                    }
                    _ => {
                        if forward {
                            self.to_client.extend_from_slice(&frame);
                        }
                    }
                }
            }
            Expect::Sync { forward } => {
                let forward = *forward;
                if tag == b'Z' {
                    self.expect.pop_front();
                    self.ready(&body);
                }
                if forward {
                    self.to_client.extend_from_slice(&frame);
                }
            }
            Expect::FunctionCall => {
                if tag == b'Z' {
                    self.expect.pop_front();
                    self.ready(&body);
                }
                self.to_client.extend_from_slice(&frame);
            }
        }
        Ok(())
    }

    /// Notes BEGIN/COMMIT/ROLLBACK that completed, by command tag (covers statements the
    /// analyzer did not look at).
    pub(super) fn track_block(&mut self, body: &Bytes) {
        match backend::command_tag(body) {
            b"BEGIN" | b"START TRANSACTION" => self.txn = self.txn.opened(),
            b"COMMIT" | b"ROLLBACK" if self.pending.is_none() => self.txn = self.txn.closed(),
            _ => {}
        }
    }

    pub(super) fn ready(&mut self, body: &Bytes) {
        // An unknown status byte (the server broke the protocol) counts as a block: never idle.
        let status = body
            .first()
            .map_or(Some(TransactionStatus::Idle), |b| {
                TransactionStatus::from_byte(*b)
            })
            .unwrap_or(TransactionStatus::InTransaction);
        self.status = status;
        self.txn = self.txn.ready(status);
        if status == TransactionStatus::Idle && !self.txn.implicit() && self.pending.is_none() {
            // Whatever the transaction wrote without the commit sequence (a COMMIT inside a
            // string or a procedure) was recorded on OLD by the capture trigger's net.
            self.end_transaction();
        }
    }

    /// Passes an ErrorResponse on to the client, except that one raising the proxy's own
    /// refusal loses the CONTEXT line its DO block adds (`PL/pgSQL function inline_code_block`):
    /// the client should see the refusal as if the server itself refused the statement. Known
    /// by its SQLSTATE, hint and context together, which a client's own error does not share.
    fn forward_error(&mut self, frame: &Bytes) {
        let fields = backend::error_fields(&frame[5..]);
        let ours = fields.code() == Some(sqlstate::FEATURE_NOT_SUPPORTED)
            && fields.get(b'H') == Some(client::REFUSAL_HINT.as_bytes())
            && fields
                .get(b'W')
                .is_some_and(|w| w.starts_with(b"PL/pgSQL function inline_code_block"));
        if ours {
            backend::error_message(
                &mut self.to_client,
                b'E',
                fields.iter().filter(|(k, _)| *k != b'W'),
            );
        } else {
            self.to_client.extend_from_slice(frame);
        }
    }

    pub(super) async fn server_error(&mut self, frame: Bytes) -> Result<(), SessionError> {
        self.host.statement_error();
        self.batch_failed = true;
        self.forward_error(&frame);
        // The failing message's expectation ends here. In a simple Query the ReadyForQuery
        // still follows; in the extended protocol the server skips everything up to Sync.
        match self.expect.front() {
            Some(Expect::Query { commit, .. }) => {
                if commit.is_some() && self.pending.is_some() {
                    self.finish_commit(false).await?;
                }
            }
            Some(Expect::Sync { .. }) | Some(Expect::FunctionCall) | None => {}
            Some(_) => {
                let mut commit_failed = false;
                while let Some(e) = self.expect.front() {
                    if matches!(
                        e,
                        Expect::Sync { .. } | Expect::Query { .. } | Expect::FunctionCall
                    ) {
                        break;
                    }
                    if let Some(Expect::Execute { commit: Some(_), .. }) = self.expect.pop_front() {
                        commit_failed = true;
                    }
                }
                if !self.expect.iter().any(|e| matches!(e, Expect::Sync { .. })) {
                    self.skipping = true;
                }
                if commit_failed || (self.pending.is_some() && self.expect.is_empty()) {
                    self.finish_commit(false).await?;
                }
            }
        }
        Ok(())
    }
}
