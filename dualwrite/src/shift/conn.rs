//! A session's connection to NEW for the reads NEW serves it. It is the session's own (a
//! session sticky to NEW keeps it for its life), so the session's settings are applied once
//! per change and its prepared statements stay prepared there, under the client's own names.
//! It is read only and bounded by the server (`default_transaction_read_only`,
//! `statement_timeout`), whatever the session's settings say: a statement misjudged as a read
//! fails there and is run on OLD instead.
//!
//! A served batch is sent whole and NEW's answers are collected whole before the client sees
//! any of them: on an error, a timeout or a result too large to hold, the batch goes to OLD as
//! if NEW had never been asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend::{self as fe, Target};
use switchyard_pgwire::startup::CancelKey;
use switchyard_store::wire::{send_cancel_request, ClientLogin, StoreStream, WireTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::oids::{OidMap, Untranslatable};
use super::Fallback;
use crate::shadow::conn::{prelude_sql, read_only_login, ReadLoginError};

/// The most of one served answer held before the client sees it; a larger one is read from
/// OLD instead.
pub(crate) const MAX_ANSWER_BYTES: usize = 8 << 20;
/// The longest a served batch may take on NEW, login included; past it the statement is
/// cancelled there and the batch runs on OLD.
pub(crate) const SERVED_TIMEOUT: Duration = Duration::from_secs(30);

/// What a message of a served batch is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Parse,
    Bind,
    Close,
    DescribePortal,
    DescribeStatement,
    Execute,
    Sync,
    Query,
}

impl Kind {
    /// Whether `tag` is the last answer to a message of this kind.
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Close => tag == b'3',
            Kind::DescribePortal | Kind::DescribeStatement => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Sync | Kind::Query => tag == b'Z',
        }
    }
}

/// One message sent to NEW: the client's own (its answers reach the client) or the proxy's.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) frame: Bytes,
    pub(crate) kind: Kind,
    pub(crate) forward: bool,
    /// A Parse: the statement name it prepares (recorded on success).
    pub(crate) prepares: Option<Vec<u8>>,
}

/// NEW's answers to a served batch, before translation: each with whether the client sees it.
#[derive(Debug, Default)]
pub(crate) struct RawAnswer {
    frames: Vec<(bool, Bytes)>,
}

impl RawAnswer {
    /// The client's part, with OLD's ids, without the final ReadyForQuery (the session writes
    /// its own). Descriptions the client does not see are checked all the same.
    pub(crate) fn translate(&self, map: &OidMap) -> Result<BytesMut, Untranslatable> {
        let size: usize = self.frames.iter().map(|(_, f)| f.len()).sum();
        let mut out = BytesMut::with_capacity(size + 64);
        for (forward, frame) in &self.frames {
            match frame[0] {
                b'T' => {
                    let mapped = map.row_description(&frame[5..])?;
                    if *forward {
                        out.extend_from_slice(&mapped);
                    }
                }
                b't' if *forward => out.extend_from_slice(&map.parameter_description(&frame[5..])?),
                _ if *forward => out.extend_from_slice(frame),
                _ => {}
            }
        }
        Ok(out)
    }
}

pub(crate) struct ServedConn {
    stream: StoreStream,
    buf: BytesMut,
    /// The settings prelude this connection runs under.
    prelude: Option<Arc<str>>,
    /// Statements prepared here, by name, with the Parse that made each.
    prepared: HashMap<Vec<u8>, Bytes>,
    cancel_key: Option<CancelKey>,
    addr: (String, u16),
}

impl ServedConn {
    pub(crate) async fn connect(
        target: &WireTarget,
        login: Option<&ClientLogin>,
        connect_timeout: Duration,
    ) -> Result<ServedConn, ReadLoginError> {
        let u = read_only_login(target, login, "switchyard-reads", SERVED_TIMEOUT, connect_timeout).await?;
        Ok(ServedConn {
            stream: u.stream,
            buf: u.buf,
            prelude: None,
            prepared: HashMap::new(),
            cancel_key: u.cancel_key,
            addr: (target.url.host.clone(), target.url.port),
        })
    }

    /// Whether statement `name` is prepared here by exactly this Parse.
    pub(crate) fn has_prepared(&self, name: &[u8], parse: &Bytes) -> bool {
        self.prepared.get(name) == Some(parse)
    }

    /// The steps that prepare statement `name` by `parse` here, its answers unseen: a named
    /// statement is closed first (PostgreSQL refuses to prepare a name twice).
    pub(crate) fn prepare_steps(name: &[u8], parse: &Bytes, steps: &mut Vec<Step>) {
        Self::close_before_parse(name, steps);
        steps.push(Step {
            frame: parse.clone(),
            kind: Kind::Parse,
            forward: false,
            prepares: Some(name.to_vec()),
        });
    }

    /// The step closing statement `name` before it is prepared again here (none for the
    /// unnamed statement, which a Parse replaces).
    pub(crate) fn close_before_parse(name: &[u8], steps: &mut Vec<Step>) {
        if !name.is_empty() {
            let mut close = BytesMut::new();
            fe::close(&mut close, Target::Statement, name);
            steps.push(Step {
                frame: close.freeze(),
                kind: Kind::Close,
                forward: false,
                prepares: None,
            });
        }
    }

    /// Runs `steps` under the session settings `prelude`. On `Err` the connection may be
    /// unusable; the caller drops it unless it says [`Fallback::Error`] (NEW answered with
    /// an error, and the connection is idle again).
    pub(crate) async fn run(&mut self, prelude: &Arc<str>, steps: &[Step]) -> Result<RawAnswer, Fallback> {
        match tokio::time::timeout(SERVED_TIMEOUT, self.exchange(prelude, steps)).await {
            Ok(result) => result,
            Err(_) => {
                if let Some(key) = self.cancel_key.take() {
                    let addr = self.addr.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), send_cancel_request(addr, &key))
                            .await;
                    });
                }
                Err(Fallback::Unavailable)
            }
        }
    }

    async fn exchange(&mut self, prelude: &Arc<str>, steps: &[Step]) -> Result<RawAnswer, Fallback> {
        let mut out = BytesMut::with_capacity(1024);
        let set_up = self.prelude.as_ref() != Some(prelude);
        if set_up {
            fe::query(&mut out, &prelude_sql(prelude));
        }
        for s in steps {
            out.extend_from_slice(&s.frame);
            if let Some(name) = &s.prepares {
                // Unknown until answered: a failure leaves it so.
                self.prepared.remove(name);
            }
        }
        self.prelude = None;
        let io = |_| Fallback::Unavailable;
        self.stream.write_all(&out).await.map_err(io)?;
        self.stream.flush().await.map_err(io)?;
        if set_up {
            let mut failed = false;
            self.read_until_ready(|tag, _| failed |= tag == b'E').await?;
            if failed {
                return Err(Fallback::Error);
            }
        }
        let mut answer = RawAnswer::default();
        let (mut at, mut failed, mut size) = (0usize, false, 0usize);
        self.read_until_ready(|tag, frame| {
            if failed {
                return;
            }
            match tag {
                b'E' => failed = true,
                // Reports of NEW's own settings and notifications are not the client's.
                b'S' | b'A' => {}
                b'N' => answer.frames.push((true, frame)),
                _ => {
                    let Some(step) = steps.get(at) else { return };
                    size += frame.len();
                    answer.frames.push((step.forward, frame));
                    if step.kind.ends_with(tag) {
                        at += 1;
                    }
                }
            }
            if size > MAX_ANSWER_BYTES {
                failed = true;
            }
        })
        .await?;
        if size > MAX_ANSWER_BYTES {
            return Err(Fallback::TooLarge);
        }
        if failed {
            return Err(Fallback::Error);
        }
        // The final ReadyForQuery is the session's to write.
        if matches!(answer.frames.last(), Some((_, f)) if f[0] == b'Z') {
            answer.frames.pop();
        }
        self.prelude = Some(Arc::clone(prelude));
        for s in steps {
            if let Some(name) = &s.prepares {
                if !name.is_empty() {
                    self.prepared.insert(name.clone(), s.frame.clone());
                }
            }
        }
        Ok(answer)
    }

    /// Reads up to ReadyForQuery, handing every frame to `each`. A result past the size limit
    /// is not read to its end (the connection is then dropped by the caller).
    async fn read_until_ready(&mut self, mut each: impl FnMut(u8, Bytes)) -> Result<(), Fallback> {
        let mut seen = 0usize;
        loop {
            while let Some(frame) =
                take_frame(&mut self.buf, MessageLimits::SERVER).map_err(|_| Fallback::Unavailable)?
            {
                let tag = frame.tag;
                seen += frame.bytes.len();
                each(tag, frame.bytes);
                if tag == b'Z' {
                    return Ok(());
                }
                if seen > MAX_ANSWER_BYTES + (1 << 20) {
                    return Err(Fallback::TooLarge);
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16384);
            }
            if self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|_| Fallback::Unavailable)?
                == 0
            {
                return Err(Fallback::Unavailable);
            }
        }
    }
}
