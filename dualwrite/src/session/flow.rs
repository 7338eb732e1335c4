//! The session's loop: read the client, process its messages, wait for the answers it is sure
//! to get, flush both ways; and the primitives every other part uses to send upstream and wait.

use super::*;
use switchyard_pgwire::frame::{release, LARGE_FRAME};

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    pub(super) async fn run(&mut self) -> Result<SessionEnd, SessionError> {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            // A quiet session the client sends something: the proxy may hold it (a barrier)
            // or move it to the other store first.
            if !self.client_buf.is_empty() && !self.entered && self.is_quiet() {
                if self.host.enter().await {
                    return Ok(SessionEnd::Reroute);
                }
                self.entered = true;
                self.routed = false;
            }
            // With table groups split between the stores, the transaction starting runs where
            // its first statement's tables are written (`route`).
            let mut wait_for_more = false;
            let mut tail: Option<BytesMut> = None;
            if self.entered && !self.routed {
                match self.route() {
                    route::Route::Here => {
                        self.routed = true;
                        self.arrived = false;
                        self.send_deferred();
                    }
                    // Moved here for this very transaction: it does not go back (a statement of
                    // the other store's is then refused).
                    route::Route::There if self.arrived => {
                        self.routed = true;
                        self.arrived = false;
                        self.send_deferred();
                    }
                    route::Route::There => {
                        self.moving_to = Some(self.mirror.roles.follower);
                        return Ok(SessionEnd::Reroute);
                    }
                    route::Route::DeferBegin => self.defer_begin()?,
                    route::Route::NeedMore => wait_for_more = true,
                    route::Route::Prefix(len) => tail = Some(self.client_buf.split_off(len)),
                }
            }
            // Process every complete client message already buffered.
            while let Some((tag, frame)) = (!wait_for_more)
                .then(|| take_frame(&mut self.client_buf, self.params.limits))
                .transpose()
                .map_err(SessionError::ClientProtocol)?
                .flatten()
                .map(|f| (f.tag, f.bytes))
            {
                self.large_seen |= frame.len() >= LARGE_FRAME;
                if tag == b'X' {
                    self.flush_upstream().await?;
                    self.drain().await?;
                    self.up_wr
                        .write_all(&frame)
                        .await
                        .map_err(SessionError::UpstreamIo)?;
                    self.flush_client().await?;
                    return Ok(SessionEnd::ClientTerminated);
                }
                if !switchyard_pgwire::frontend::is_known_tag(tag) {
                    return Err(SessionError::ClientProtocol(
                        switchyard_pgwire::ProtocolError::UnknownTag(tag),
                    ));
                }
                self.host.client_message(tag, frame.get(5..).unwrap_or_default());
                self.client_message(tag, frame).await?;
            }
            self.flush_upstream().await?;
            if self.flushed {
                self.drain().await?;
                self.host.answered();
            }
            self.flush_client().await?;
            let routed_rest = tail.is_some();
            if let Some(rest) = tail.take() {
                self.client_buf.unsplit(rest);
            }
            // After a large message, give its buffers' memory back.
            if std::mem::take(&mut self.large_seen) {
                for buf in [
                    &mut self.client_buf,
                    &mut self.up_buf,
                    &mut self.to_client,
                    &mut self.to_up,
                ] {
                    release(buf);
                }
            }
            if self.entered && self.is_quiet() {
                self.host.quiet();
                self.entered = false;
            }
            if routed_rest {
                // The rest of what the client sent is routed now, without waiting for more.
                continue;
            }
            let idle = self.status == TransactionStatus::Idle
                && self.expect.is_empty()
                && !self.txn.open()
                && self.deferred.is_none();
            match self.host.stop() {
                Stop::Now => return Ok(SessionEnd::ShutdownNow),
                Stop::Drain { .. } if idle => return Ok(SessionEnd::Drained),
                Stop::Drain { grace } => {
                    // A transaction may finish within the grace period, then the session ends.
                    let deadline = *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + grace);
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(SessionEnd::ShutdownNow);
                    }
                }
                _ => {}
            }
            // Wait for the client, forwarding whatever the server says meanwhile (NOTIFY).
            reserve(&mut self.client_buf, 4096);
            let idle_timeout = self.params.idle_timeout.filter(|_| idle);
            tokio::select! {
                n = self.client_rd.read_buf(&mut self.client_buf) => {
                    if n.map_err(SessionError::ClientIo)? == 0 {
                        return Ok(SessionEnd::ClientClosed);
                    }
                }
                n = self.up_rd.read_buf(&mut self.up_buf) => {
                    if n.map_err(SessionError::UpstreamIo)? == 0 {
                        return Ok(SessionEnd::UpstreamClosed);
                    }
                    self.process_server_buffer().await?;
                    self.flush_client().await?;
                }
                () = self.host.stop_changed() => {}
                () = async {
                    match idle_timeout {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => return Ok(SessionEnd::IdleTimeout),
                () = async {
                    match drain_deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => return Ok(SessionEnd::ShutdownNow),
            }
        }
    }

    /// No transaction open, nothing unanswered or held: the session may move to another store.
    fn is_quiet(&self) -> bool {
        self.status == TransactionStatus::Idle
            && self.expect.is_empty()
            && self.to_up.is_empty()
            && self.to_up_large.is_empty()
            && self.txn == Txn::None
            && !self.dirty
            && self.held.is_none()
            && self.pending.is_none()
    }

    pub(super) async fn flush_upstream(&mut self) -> Result<(), SessionError> {
        for part in std::mem::take(&mut self.to_up_large) {
            self.up_wr
                .write_all(&part)
                .await
                .map_err(SessionError::UpstreamIo)?;
        }
        if !self.to_up.is_empty() {
            let chunk = self.to_up.split();
            self.up_wr
                .write_all(&chunk)
                .await
                .map_err(SessionError::UpstreamIo)?;
            // A TLS stream may keep ciphertext buffered until flushed; TCP flushes nothing.
            self.up_wr.flush().await.map_err(SessionError::UpstreamIo)?;
        }
        Ok(())
    }

    pub(super) async fn flush_client(&mut self) -> Result<(), SessionError> {
        // Held answers are bounded: a huge RETURNING result goes out early.
        if self.hold_client && self.to_client.len() < (1 << 20) {
            return Ok(());
        }
        self.flush_client_now().await
    }

    pub(super) async fn flush_client_now(&mut self) -> Result<(), SessionError> {
        if !self.to_client.is_empty() {
            let chunk = self.to_client.split();
            self.client_wr
                .write_all(&chunk)
                .await
                .map_err(SessionError::ClientIo)?;
            self.client_wr.flush().await.map_err(SessionError::ClientIo)?;
        }
        Ok(())
    }

    /// Sends a client's frame as it came. A large one is queued as it is, not copied: a
    /// statement or COPY row of hundreds of MB then costs its one buffer, not two.
    pub(super) fn send_frame(&mut self, frame: &Bytes, expect: Option<Expect>) {
        if frame.len() < LARGE_FRAME {
            return self.send(frame, expect);
        }
        if !self.to_up.is_empty() {
            let before = self.to_up.split().freeze();
            self.to_up_large.push(before);
        }
        self.to_up_large.push(frame.clone());
        self.send(&[], expect);
    }

    pub(super) fn send(&mut self, frame: &[u8], expect: Option<Expect>) {
        self.to_up.extend_from_slice(frame);
        if let Some(e) = expect {
            // After an error in an extended-protocol batch the server ignores everything up to
            // Sync: only the Sync will be answered.
            if matches!(e, Expect::Sync { .. }) {
                self.skipping = false;
                self.expect.push_back(e);
            } else if !self.skipping {
                self.expect.push_back(e);
            }
        }
    }

    /// Sends a Flush if needed and processes answers until none are outstanding.
    pub(super) async fn barrier(&mut self) -> Result<(), SessionError> {
        if !self.expect.is_empty() && !self.flushed {
            fe::flush(&mut self.to_up);
            self.flushed = true;
        }
        self.flush_upstream().await?;
        self.drain().await
    }

    /// Waits until every statement sent so far has completed (its errors are known). Parse,
    /// Bind, Describe and Close answers may still be outstanding: if one of them fails, the
    /// server skips what follows up to Sync, which the session sees in order (an injected
    /// COMMIT then counts as not committed).
    pub(super) async fn settle(&mut self) -> Result<(), SessionError> {
        let busy = |q: &VecDeque<Expect>| {
            q.iter().any(|e| {
                matches!(
                    e,
                    Expect::Execute { .. }
                        | Expect::Query { .. }
                        | Expect::Sync { .. }
                        | Expect::FunctionCall
                )
            })
        };
        if !busy(&self.expect) {
            return Ok(());
        }
        if !self.flushed {
            fe::flush(&mut self.to_up);
            self.flushed = true;
        }
        self.drain_while(busy).await
    }

    /// Reads and processes server messages until every expected answer has arrived.
    pub(super) async fn drain(&mut self) -> Result<(), SessionError> {
        self.drain_while(|q| !q.is_empty()).await
    }

    pub(super) async fn drain_while(
        &mut self,
        pending: impl Fn(&VecDeque<Expect>) -> bool,
    ) -> Result<(), SessionError> {
        self.flush_upstream().await?;
        loop {
            self.process_server_buffer().await?;
            if !pending(&self.expect) {
                return Ok(());
            }
            reserve(&mut self.up_buf, 8192);
            // While the server streams a result, the client may already be reading.
            self.flush_client().await?;
            if self
                .up_rd
                .read_buf(&mut self.up_buf)
                .await
                .map_err(SessionError::UpstreamIo)?
                == 0
            {
                return Err(SessionError::UpstreamIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    pub(super) async fn process_server_buffer(&mut self) -> Result<(), SessionError> {
        while let Some((tag, frame)) = take_frame(&mut self.up_buf, MessageLimits::SERVER)
            .map_err(SessionError::UpstreamProtocol)?
            .map(|f| (f.tag, f.bytes))
        {
            self.large_seen |= frame.len() >= LARGE_FRAME;
            self.server_message(tag, frame).await?;
        }
        Ok(())
    }
}
