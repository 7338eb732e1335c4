//! The passthrough relay: after login, frames flow both ways unchanged.
//!
//! One task drives both directions (`select!` over two pump futures), so a direction blocked on
//! a slow writer never stops the other one: a pipelining client that does not read until it has
//! written everything cannot deadlock against a server that does not read until it has written
//! its results. Each pump reads as much as is available, checks every complete frame (tag,
//! length, and the body of the messages it inspects), and writes the complete frames out in one
//! call. Bodies are never copied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use switchyard_pgwire::backend::TransactionStatus;
use switchyard_pgwire::frame::{Frames, MessageLimits};
use switchyard_pgwire::frontend::{self, ClientMessage, Target};
use switchyard_pgwire::ProtocolError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::io::reserve_for_read;
use crate::classify::{Protocol, StatementKind};
use crate::error::{ErrorKind, ErrorSource, SessionError};
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, ShutdownState};

/// Largest message accepted from the server: PostgreSQL's own 1 GB cap plus headroom.
const SERVER_LIMITS: MessageLimits = MessageLimits {
    max_message_bytes: (1 << 30) + 1024,
};

/// How a relayed session ended without an I/O or protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayEnd {
    /// The client sent Terminate (already forwarded upstream).
    ClientTerminated,
    /// The client closed its socket.
    ClientClosed,
    /// The server closed the connection (after a FATAL, which was forwarded).
    UpstreamClosed,
    /// A drain found the session idle.
    Drained,
    /// Immediate shutdown or the drain deadline.
    ShutdownNow,
    /// The client was idle outside a transaction for too long.
    IdleTimeout,
}

/// State both directions read and write. Only this session's task touches it, so relaxed
/// atomics cost no more than plain fields while keeping the future `Send`.
struct Shared {
    status: AtomicU8,
    /// Requests (Query, Sync, FunctionCall) sent and not yet answered with ReadyForQuery.
    outstanding: AtomicUsize,
    /// The server is in COPY FROM STDIN mode: Sync and Flush are not requests there.
    copy_in: AtomicBool,
    draining: AtomicBool,
    /// When the oldest outstanding request was sent, in ns since `epoch`.
    request_started: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn idle(&self) -> bool {
        self.status.load(Relaxed) == TransactionStatus::Idle.as_byte() && self.outstanding.load(Relaxed) == 0
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Settings of one relay.
pub(crate) struct RelayParams<'a> {
    pub(crate) limits: MessageLimits,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) metrics: &'a Metrics,
}

/// Relays until one side ends. Returns the halves so the caller can say goodbye properly.
pub(crate) async fn relay(
    params: RelayParams<'_>,
    client: (&mut OwnedReadHalf, &mut OwnedWriteHalf),
    client_buf: BytesMut,
    upstream: (&mut OwnedReadHalf, &mut OwnedWriteHalf),
    upstream_buf: BytesMut,
    mut shutdown: Shutdown,
) -> Result<RelayEnd, SessionError> {
    let shared = Shared {
        status: AtomicU8::new(TransactionStatus::Idle.as_byte()),
        outstanding: AtomicUsize::new(0),
        copy_in: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        request_started: AtomicU64::new(0),
        epoch: Instant::now(),
    };
    let (client_rd, client_wr) = client;
    let (upstream_rd, upstream_wr) = upstream;
    let to_upstream = client_to_upstream(&params, &shared, client_rd, upstream_wr, client_buf);
    let to_client = upstream_to_client(&params, &shared, upstream_rd, client_wr, upstream_buf);
    tokio::pin!(to_upstream, to_client);

    let mut state = shutdown.state();
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if let ShutdownState::Draining { grace } = state {
            shared.draining.store(true, Relaxed);
            if shared.idle() {
                return Ok(RelayEnd::Drained);
            }
            deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(grace)));
        }
        if state == ShutdownState::Immediate {
            return Ok(RelayEnd::ShutdownNow);
        }
        tokio::select! {
            end = &mut to_upstream => return end,
            end = &mut to_client => return end,
            next = shutdown.changed_from(state) => state = next,
            () = async { if let Some(d) = deadline.as_mut() { d.await } }, if deadline.is_some() => {
                return Ok(RelayEnd::ShutdownNow);
            }
        }
    }
}

/// Per-session memory of which statement each portal runs, for statement-kind metrics.
#[derive(Default)]
struct StatementKinds {
    statements: HashMap<Vec<u8>, StatementKind>,
    portals: HashMap<Vec<u8>, StatementKind>,
}

impl StatementKinds {
    fn note(&mut self, msg: &ClientMessage<'_>, params: &RelayParams<'_>) {
        match *msg {
            ClientMessage::Query { sql } => {
                params
                    .metrics
                    .counters
                    .statement(Protocol::Simple, StatementKind::of(sql));
            }
            ClientMessage::Parse { statement, sql } => {
                set(&mut self.statements, statement, StatementKind::of(sql));
            }
            ClientMessage::Bind { portal, statement } => {
                let kind = self
                    .statements
                    .get(statement)
                    .copied()
                    .unwrap_or(StatementKind::Other);
                set(&mut self.portals, portal, kind);
            }
            ClientMessage::Execute { portal, .. } => {
                let kind = self.portals.get(portal).copied().unwrap_or(StatementKind::Other);
                params.metrics.counters.statement(Protocol::Extended, kind);
            }
            ClientMessage::Close { target, name } => {
                match target {
                    Target::Statement => self.statements.remove(name),
                    Target::Portal => self.portals.remove(name),
                };
            }
            _ => {}
        }
    }
}

fn set(map: &mut HashMap<Vec<u8>, StatementKind>, name: &[u8], kind: StatementKind) {
    match map.get_mut(name) {
        Some(slot) => *slot = kind,
        None => {
            map.insert(name.to_vec(), kind);
        }
    }
}

async fn client_to_upstream(
    params: &RelayParams<'_>,
    shared: &Shared,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    mut buf: BytesMut,
) -> Result<RelayEnd, SessionError> {
    let mut kinds = StatementKinds::default();
    loop {
        let mut frames = Frames::new(&buf, params.limits);
        let mut terminate = false;
        for frame in &mut frames {
            let (header, body) = frame?;
            if !frontend::is_known_tag(header.tag) {
                return Err(ProtocolError::UnknownTag(header.tag).into());
            }
            match header.tag {
                b'Q' | b'P' | b'B' | b'E' | b'C' | b'D' | b'f' | b'S' | b'H' | b'X' | b'c' => {
                    let msg = frontend::parse(header.tag, body)?;
                    kinds.note(&msg, params);
                    match msg {
                        ClientMessage::Query { .. } => request_sent(shared),
                        ClientMessage::Sync if !shared.copy_in.load(Relaxed) => request_sent(shared),
                        ClientMessage::CopyDone | ClientMessage::CopyFail { .. } => {
                            shared.copy_in.store(false, Relaxed);
                        }
                        ClientMessage::Terminate => {
                            terminate = true;
                            break;
                        }
                        _ => {}
                    }
                }
                b'F' => request_sent(shared),
                _ => {}
            }
        }
        let consumed = frames.consumed();
        let pending = frames.pending()?.map(|h| h.frame_len);
        if consumed > 0 {
            let chunk = buf.split_to(consumed);
            wr.write_all(&chunk).await.map_err(SessionError::UpstreamIo)?;
        }
        if let Some(frame_len) = pending {
            let missing = frame_len.saturating_sub(buf.len());
            reserve_for_read(&mut buf, missing);
        }
        if terminate {
            return Ok(RelayEnd::ClientTerminated);
        }
        reserve_for_read(&mut buf, 4096);
        let read = rd.read_buf(&mut buf);
        let n = match params.idle_timeout {
            Some(limit) if shared.idle() => match tokio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) if shared.idle() => return Ok(RelayEnd::IdleTimeout),
                Err(_) => continue,
            },
            _ => read.await,
        }
        .map_err(SessionError::ClientIo)?;
        if n == 0 {
            return Ok(RelayEnd::ClientClosed);
        }
    }
}

fn request_sent(shared: &Shared) {
    if shared.outstanding.fetch_add(1, Relaxed) == 0 {
        shared.request_started.store(shared.now_ns(), Relaxed);
    }
}

async fn upstream_to_client(
    params: &RelayParams<'_>,
    shared: &Shared,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    mut buf: BytesMut,
) -> Result<RelayEnd, SessionError> {
    loop {
        let mut frames = Frames::new(&buf, SERVER_LIMITS);
        for frame in &mut frames {
            let (header, body) = frame.map_err(SessionError::UpstreamProtocol)?;
            match header.tag {
                b'Z' => ready_for_query(params, shared, body)?,
                b'E' => params
                    .metrics
                    .counters
                    .error(ErrorSource::Old, ErrorKind::Statement),
                b'G' => shared.copy_in.store(true, Relaxed),
                _ => {}
            }
        }
        let consumed = frames.consumed();
        let pending = frames
            .pending()
            .map_err(SessionError::UpstreamProtocol)?
            .map(|h| h.frame_len);
        if consumed > 0 {
            let chunk = buf.split_to(consumed);
            wr.write_all(&chunk).await.map_err(SessionError::ClientIo)?;
        }
        if let Some(frame_len) = pending {
            let missing = frame_len.saturating_sub(buf.len());
            reserve_for_read(&mut buf, missing);
        }
        if shared.draining.load(Relaxed) && shared.idle() {
            return Ok(RelayEnd::Drained);
        }
        reserve_for_read(&mut buf, 8192);
        if rd.read_buf(&mut buf).await.map_err(SessionError::UpstreamIo)? == 0 {
            return Ok(RelayEnd::UpstreamClosed);
        }
    }
}

fn ready_for_query(params: &RelayParams<'_>, shared: &Shared, body: &[u8]) -> Result<(), SessionError> {
    let status = match body {
        [b @ (b'I' | b'T' | b'E')] => *b,
        _ => {
            return Err(SessionError::UpstreamProtocol(ProtocolError::Malformed {
                what: "ReadyForQuery",
                detail: "bad status",
            }))
        }
    };
    shared.status.store(status, Relaxed);
    shared.copy_in.store(false, Relaxed);
    let before = shared
        .outstanding
        .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)))
        .unwrap_or(0);
    if before >= 1 {
        let started = shared.request_started.load(Relaxed);
        let now = shared.now_ns();
        params
            .metrics
            .old_round_trip(Duration::from_nanos(now.saturating_sub(started)));
        if before > 1 {
            // The next pipelined request has been waiting since it was sent; timing it from now
            // measures the server's share of its latency.
            shared.request_started.store(now, Relaxed);
        }
    }
    Ok(())
}
