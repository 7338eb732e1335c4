//! The session's part in read shifting (`crate::shift`): which of its reads NEW serves, and
//! how a batch is held, sent to NEW, and let go to OLD when NEW cannot answer it.
//!
//! A read is NEW's only outside a transaction: what the client sent OLD before it is answered
//! first (the client's answers stay in order), and the read sees committed data only. A simple Query is run
//! on NEW at once. In the extended protocol the messages from the Parse or Bind of an eligible
//! read up to the client's Sync are held (nothing reaches OLD meanwhile); a message that does
//! not belong in such a batch (a write, a Flush, a partial Execute, ...) lets the held ones go
//! to OLD as if they had just come, and the rest of the batch follows them there. At the Sync
//! the batch runs on NEW; when NEW answered, the client gets NEW's answers, and the Parse
//! messages of the batch are also sent to OLD (their answers unseen), so the client's
//! prepared statements exist on both.

use super::*;
use crate::shadow::conn::ReadLoginError;
use crate::shift::{Fallback, Kind, ServedConn, Step};

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// No transaction is open (as far as the answers so far tell: what is still in flight on
    /// OLD is answered before NEW is asked, and this is checked again then).
    fn shift_idle(&self) -> bool {
        self.txn == Txn::None
            && self.status == TransactionStatus::Idle
            && !self.dirty
            && self.pending.is_none()
            && !self.hold_client
            && !self.no_hold
    }

    /// Whether NEW serves this session's read of `shape` now. A read of tables in `read_shift`
    /// that stays on OLD is counted as OLD's when it is `reads` executions (a Query, a Bind: not
    /// the Parse before a Bind, or a read would count twice).
    fn new_serves(&self, shape: &ReadShape, reads: u64) -> bool {
        let shift = &self.mirror.shift;
        match shift.serves(shape, self.shift_draw) {
            None => false,
            Some(true) if self.shift_idle() => true,
            Some(_) => {
                shift.count(shape, false, reads, None);
                false
            }
        }
    }

    /// A Query message: answered by NEW when it is an eligible read NEW serves for this
    /// session (`true`); otherwise, or when NEW could not answer, it is OLD's.
    pub(super) async fn serve_query(
        &mut self,
        frame: &Bytes,
        analysis: &Analysis,
    ) -> Result<bool, SessionError> {
        let [Analyzed {
            read: Some(shape), ..
        }] = analysis.stmts.as_slice()
        else {
            return Ok(false);
        };
        let shape = Arc::clone(shape);
        if !self.new_serves(&shape, 1) {
            return Ok(false);
        }
        let steps = [Step {
            frame: frame.clone(),
            kind: Kind::Query,
            forward: true,
            prepares: None,
        }];
        self.serve(&shape, &steps).await
    }

    /// Whether the client's message starts a batch for NEW: the Parse or the Bind of an
    /// eligible read NEW serves for this session now.
    pub(super) fn may_hold(&mut self, tag: u8, frame: &Bytes) -> bool {
        if tag != b'P' && tag != b'B' {
            return false;
        }
        match self.held_read(tag, frame, &[]) {
            Some(shape) => self.new_serves(&shape, u64::from(tag == b'B')),
            None => false,
        }
    }

    /// The read a Parse prepares or a Bind binds, if it is one NEW may serve (a statement
    /// parsed earlier, or in the `held` messages).
    fn held_read(&self, tag: u8, frame: &Bytes, held: &[(u8, Bytes)]) -> Option<Arc<ReadShape>> {
        match fe::parse(tag, &frame[5..]).ok()? {
            ClientMessage::Parse { sql, .. } => {
                let sql = String::from_utf8_lossy(sql);
                let analysis = self.mirror.analyzer.analyze(&sql);
                match analysis.stmts.as_slice() {
                    [Analyzed {
                        read: Some(shape), ..
                    }] => Some(Arc::clone(shape)),
                    _ => None,
                }
            }
            ClientMessage::Bind { statement, .. } => {
                let parsed_here = held.iter().rev().find(|(t, f)| {
                    matches!(fe::parse(*t, &f[5..]), Ok(ClientMessage::Parse { statement: name, .. }) if name == statement)
                });
                match parsed_here {
                    Some((t, f)) => self.held_read(*t, f, &[]),
                    None => self.shadow_statements.get(statement).map(|(s, _)| Arc::clone(s)),
                }
            }
            _ => None,
        }
    }

    /// The next client message while a batch for NEW is held.
    pub(super) async fn hold_next(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
        let held = self.held.as_deref().unwrap_or_default();
        let fits = match fe::parse(tag, &frame[5..]) {
            Ok(ClientMessage::Parse { .. } | ClientMessage::Bind { .. }) => {
                let first = held.first().and_then(|(t, f)| self.held_read(*t, f, held));
                let this = self.held_read(tag, &frame, held);
                // Every read of one batch reads the same tables (one decision, one count).
                matches!((first, this), (Some(a), Some(b)) if a.tables == b.tables)
            }
            Ok(ClientMessage::Describe { .. }) => true,
            Ok(ClientMessage::Execute { max_rows, .. }) => max_rows == 0,
            Ok(ClientMessage::Close {
                target: Target::Portal,
                ..
            }) => true,
            Ok(ClientMessage::Sync) => {
                let mut held = self.held.take().unwrap_or_default();
                held.push((tag, frame));
                return self.serve_held(held).await;
            }
            _ => false,
        };
        if fits {
            if let Some(h) = self.held.as_mut() {
                h.push((tag, frame));
            }
            return Ok(());
        }
        self.let_go(false).await?;
        self.client_message_for_old(tag, frame).await
    }

    /// The held messages go to OLD, as if they had just come; the rest of the batch follows.
    /// Their reads are counted as OLD's unless they were (`counted`, a fallback).
    async fn let_go(&mut self, counted: bool) -> Result<(), SessionError> {
        let held = self.held.take().unwrap_or_default();
        self.no_hold = true;
        if !counted {
            if let Some(shape) = held.first().and_then(|(t, f)| self.held_read(*t, f, &held)) {
                let binds = held.iter().filter(|(t, _)| *t == b'B').count() as u64;
                self.mirror.shift.count(&shape, false, binds, None);
            }
        }
        for (tag, frame) in held {
            self.client_message_for_old(tag, frame).await?;
        }
        Ok(())
    }

    /// The client's Sync ended a held batch: NEW answers it, or OLD does.
    async fn serve_held(&mut self, held: Vec<(u8, Bytes)>) -> Result<(), SessionError> {
        let shape = held.first().and_then(|(t, f)| self.held_read(*t, f, &held));
        let Some(shape) = shape else {
            self.held = Some(held);
            return self.let_go(false).await;
        };
        // The batch's steps on NEW: what the session's connection there lacks is prepared
        // first, and every Bind is followed by a Describe of its portal (the client's own, or
        // one whose answer only the session sees) to check the types of the result.
        if let Err(reason) = self.open_served_conn().await {
            self.mirror.shift.count(&shape, false, 0, Some(reason));
            self.held = Some(held);
            return self.let_go(false).await;
        }
        let mut steps: Vec<Step> = Vec::with_capacity(held.len() + 4);
        let mut parsed: Vec<Vec<u8>> = Vec::new();
        for (i, (tag, frame)) in held.iter().enumerate() {
            let step = |kind| Step {
                frame: frame.clone(),
                kind,
                forward: true,
                prepares: None,
            };
            match fe::parse(*tag, &frame[5..]) {
                Ok(ClientMessage::Parse { statement, .. }) => {
                    let mut s = step(Kind::Parse);
                    ServedConn::close_before_parse(statement, &mut steps);
                    s.prepares = Some(statement.to_vec());
                    parsed.push(statement.to_vec());
                    steps.push(s);
                }
                Ok(ClientMessage::Bind { portal, statement }) => {
                    self.prepare_on_new(statement, &mut parsed, &mut steps);
                    steps.push(step(Kind::Bind));
                    let described = matches!(
                        held.get(i + 1).map(|(t, f)| fe::parse(*t, &f[5..])),
                        Some(Ok(ClientMessage::Describe { target: Target::Portal, name })) if name == portal
                    );
                    if !described {
                        let mut d = BytesMut::new();
                        fe::describe(&mut d, Target::Portal, portal);
                        steps.push(Step {
                            frame: d.freeze(),
                            kind: Kind::DescribePortal,
                            forward: false,
                            prepares: None,
                        });
                    }
                }
                Ok(ClientMessage::Describe {
                    target: Target::Statement,
                    name,
                }) => {
                    self.prepare_on_new(name, &mut parsed, &mut steps);
                    steps.push(step(Kind::DescribeStatement));
                }
                Ok(ClientMessage::Describe { .. }) => steps.push(step(Kind::DescribePortal)),
                Ok(ClientMessage::Execute { .. }) => steps.push(step(Kind::Execute)),
                Ok(ClientMessage::Close { .. }) => steps.push(step(Kind::Close)),
                Ok(ClientMessage::Sync) => steps.push(step(Kind::Sync)),
                _ => {
                    self.held = Some(held);
                    return self.let_go(false).await;
                }
            }
        }
        if !self.serve(&shape, &steps).await? {
            self.held = Some(held);
            return self.let_go(true).await;
        }
        // The client's statements exist on OLD too; their answers were NEW's.
        let mut sent_parse = false;
        for (tag, frame) in &held {
            if *tag == b'P' {
                self.send(frame, Some(Expect::Parse { forward: false }));
                self.note_parse(fe::parse(*tag, &frame[5..]).ok(), frame);
                sent_parse = true;
            }
        }
        if sent_parse {
            let mut sync = BytesMut::new();
            fe::sync(&mut sync);
            self.send(&sync, Some(Expect::Sync { forward: false }));
            self.flushed = true;
        }
        Ok(())
    }

    /// Adds the steps that prepare statement `name` on the session's NEW connection, unless
    /// it is prepared there already (by this batch, or earlier by the same Parse).
    fn prepare_on_new(&self, name: &[u8], parsed: &mut Vec<Vec<u8>>, steps: &mut Vec<Step>) {
        if parsed.iter().any(|p| p == name) {
            return;
        }
        let Some((_, parse)) = self.shadow_statements.get(name) else {
            return;
        };
        let ready = self
            .served_conn
            .as_ref()
            .is_some_and(|c| c.has_prepared(name, parse));
        if !ready {
            ServedConn::prepare_steps(name, parse, steps);
        }
        parsed.push(name.to_vec());
    }

    /// Runs `steps` on the session's NEW connection and queues NEW's answers, with OLD's ids,
    /// and a ReadyForQuery for the client. `false` (counted) when OLD must answer instead.
    async fn serve(&mut self, shape: &ReadShape, steps: &[Step]) -> Result<bool, SessionError> {
        let shift = Arc::clone(&self.mirror.shift);
        // The client's earlier messages are answered first, in order; they may have opened a
        // transaction (then the read is OLD's).
        self.barrier().await?;
        if !self.shift_idle() {
            shift.count(shape, false, reads(steps), None);
            return Ok(false);
        }
        Ok(match self.run_on_new(steps).await {
            Ok(answers) => {
                self.to_client.extend_from_slice(&answers);
                backend::ready_for_query(&mut self.to_client, TransactionStatus::Idle);
                shift.count(shape, true, reads(steps), None);
                true
            }
            Err(reason) => {
                tracing::debug!(reason = reason.as_str(), "a read NEW was to serve runs on OLD");
                shift.count(shape, false, reads(steps), Some(reason));
                false
            }
        })
    }

    /// Opens the session's connection to NEW, as its client, unless it has one. NEW refusing
    /// the client's role is remembered: the session's reads stay on OLD without asking again.
    async fn open_served_conn(&mut self) -> Result<(), Fallback> {
        if self.served_conn.is_some() {
            return Ok(());
        }
        if self.served_refused {
            return Err(Fallback::Login);
        }
        match self.mirror.shift.connect(self.params.login.as_deref()).await {
            Ok(c) => {
                self.served_conn = Some(c);
                Ok(())
            }
            Err(ReadLoginError::Refused(e)) => {
                tracing::warn!(error = %e, "NEW refused the client's role: the session's reads stay on OLD");
                self.served_refused = true;
                Err(Fallback::Login)
            }
            Err(ReadLoginError::Failed(e)) => {
                tracing::debug!(error = %e, "NEW cannot serve reads; they stay on OLD");
                Err(Fallback::Unavailable)
            }
        }
    }

    async fn run_on_new(&mut self, steps: &[Step]) -> Result<BytesMut, Fallback> {
        let shift = Arc::clone(&self.mirror.shift);
        let Some(prelude) = self.shadow_settings.as_mut().map(|s| s.prelude()) else {
            return Err(Fallback::Unavailable);
        };
        self.open_served_conn().await?;
        let Some(conn) = self.served_conn.as_mut() else {
            return Err(Fallback::Unavailable);
        };
        let raw = match conn.run(&prelude, steps).await {
            Ok(raw) => raw,
            Err(reason) => {
                if reason != Fallback::Error {
                    self.served_conn = None;
                }
                return Err(reason);
            }
        };
        let map = shift.map().await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read the object ids for reads served by NEW");
            Fallback::Types
        })?;
        match raw.translate(&map) {
            Ok(out) => Ok(out),
            Err(crate::shift::oids::Untranslatable::Unknown) => match shift.refresh_map().await {
                Some(map) => raw.translate(&map).map_err(Fallback::from),
                None => Err(Fallback::Types),
            },
            Err(e) => Err(e.into()),
        }
    }
}

/// The reads a batch for NEW executes: its Query, or the client's Binds.
fn reads(steps: &[Step]) -> u64 {
    steps
        .iter()
        .filter(|s| s.forward && matches!(s.kind, Kind::Query | Kind::Bind))
        .count() as u64
}
