//! The passthrough relay: after login, frames flow both ways unchanged.
//!
//! One task drives both directions (`select!` over two pump futures), so a direction blocked on
//! a slow writer never stops the other one: a pipelining client that does not read until it has
//! written everything cannot deadlock against a server that does not read until it has written
//! its results. Each pump reads as much as is available, checks every complete frame (tag,
//! length, and the body of the messages it inspects), and writes the complete frames out in one
//! call. Bodies are never copied.
//!
//! The relay polls only the branch whose waker fired ([`Branches`]): `select!` would poll both
//! pumps and the shutdown watch on every wake-up, so each message also paid for a read attempt
//! on the idle socket and a look at the watch.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use switchyard_pgwire::backend::TransactionStatus;
use switchyard_pgwire::frame::{release, reserve_ahead, Frames, MessageLimits, LARGE_FRAME};
use switchyard_pgwire::frontend::{self, ClientMessage, Target};
use switchyard_pgwire::ProtocolError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::classify::{Protocol, StatementKind};
use crate::error::{ErrorKind, ErrorSource, SessionError};
use crate::io::reserve_for_read;
use crate::metrics::Metrics;
use crate::net::{NetRead, NetWrite};
use crate::shutdown::{Shutdown, ShutdownState};
pub(crate) use switchyard_dualwrite::session::SessionEnd;

/// How long answers to requests sent before a protocol violation may take to reach the client.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// State both directions read and write. Only this session's task touches it, so relaxed
/// atomics cost no more than plain fields while keeping the future `Send`.
struct Shared {
    status: AtomicU8,
    /// Requests (Query, Sync, FunctionCall) sent and not yet answered with ReadyForQuery.
    outstanding: AtomicUsize,
    /// The server is in COPY FROM STDIN mode: Sync and Flush are not requests there.
    copy_in: AtomicBool,
    /// Extended-protocol messages were sent since the last Sync: the session is inside an
    /// implicit transaction even though the last ReadyForQuery said idle.
    in_batch: AtomicBool,
    draining: AtomicBool,
    /// The client broke the protocol; the upstream pump stops once earlier requests are answered.
    client_failed: AtomicBool,
    /// When the session last became idle, in ns since `epoch`.
    idle_since: AtomicU64,
    /// Per-request `statement` spans (debug level), closed at their ReadyForQuery. Only touched
    /// when such spans are enabled; `open_spans` says whether any is queued.
    spans: Mutex<VecDeque<tracing::Span>>,
    open_spans: AtomicUsize,
    /// When the oldest outstanding request was sent, in ns since `epoch`.
    request_started: AtomicU64,
    epoch: Instant,
}

impl Shared {
    /// Outside any transaction block, with nothing sent and unanswered: closing the session
    /// now loses nothing.
    fn idle(&self) -> bool {
        self.status.load(Relaxed) == TransactionStatus::Idle.as_byte()
            && self.outstanding.load(Relaxed) == 0
            && !self.in_batch.load(Relaxed)
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
    /// The session's span, parent of the statement spans.
    pub(crate) span: &'a tracing::Span,
}

/// Relays until one side ends. Returns the halves so the caller can say goodbye properly.
pub(crate) async fn relay(
    params: RelayParams<'_>,
    client: (&mut NetRead, &mut NetWrite),
    client_buf: BytesMut,
    upstream: (&mut NetRead, &mut NetWrite),
    upstream_buf: BytesMut,
    mut shutdown: Shutdown,
) -> Result<SessionEnd, SessionError> {
    let shared = Shared {
        status: AtomicU8::new(TransactionStatus::Idle.as_byte()),
        outstanding: AtomicUsize::new(0),
        copy_in: AtomicBool::new(false),
        in_batch: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        client_failed: AtomicBool::new(false),
        idle_since: AtomicU64::new(0),
        spans: Mutex::new(VecDeque::new()),
        open_spans: AtomicUsize::new(0),
        request_started: AtomicU64::new(0),
        epoch: Instant::now(),
    };
    let (client_rd, client_wr) = client;
    let (upstream_rd, upstream_wr) = upstream;
    let to_upstream = client_to_upstream(&params, &shared, client_rd, upstream_wr, client_buf);
    let to_client = upstream_to_client(&params, &shared, upstream_rd, client_wr, upstream_buf);
    tokio::pin!(to_upstream, to_client);

    let mut state = shutdown.state();
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut branches = Branches::new();
    // The client sent Terminate, which went upstream: the server reads it only once the
    // statement it runs is over, and until then it says nothing and keeps the connection open.
    // So the client's socket stays open too, and whatever the server still sends reaches it,
    // until the server closes; closing it at once would wake a client thread waiting on the
    // socket before the client had closed it itself (issue 15, "a socket closed mid-query").
    let mut client_done = false;
    loop {
        if client_done && state != ShutdownState::Running {
            return Ok(SessionEnd::ClientTerminated);
        }
        if let ShutdownState::Draining { grace } = state {
            shared.draining.store(true, Relaxed);
            if shared.idle() {
                return Ok(SessionEnd::Drained);
            }
            if deadline.is_none() {
                deadline = Some(Box::pin(tokio::time::sleep(grace)));
                branches.wake(DEADLINE);
            }
        }
        if state == ShutdownState::Immediate {
            return Ok(SessionEnd::ShutdownNow);
        }
        let changed = shutdown.changed_from(state);
        tokio::pin!(changed);
        branches.wake(SHUTDOWN);
        let woke = std::future::poll_fn(|cx| {
            let mut woken = branches.begin(cx);
            // Shutdown first, so a stop is noticed even while both directions are busy.
            if woken & SHUTDOWN != 0 {
                woken &= !SHUTDOWN;
                if let Poll::Ready(next) = branches.poll(SHUTDOWN, changed.as_mut()) {
                    branches.wake(woken);
                    return Poll::Ready(Woke::Shutdown(next));
                }
            }
            if woken & DEADLINE != 0 {
                woken &= !DEADLINE;
                if let Some(d) = deadline.as_mut() {
                    if branches.poll(DEADLINE, d.as_mut()).is_ready() {
                        branches.wake(woken);
                        return Poll::Ready(Woke::Deadline);
                    }
                }
            }
            // A finished pump is never polled again.
            if woken & TO_UPSTREAM != 0 && !client_done {
                woken &= !TO_UPSTREAM;
                if let Poll::Ready(end) = branches.poll(TO_UPSTREAM, to_upstream.as_mut()) {
                    branches.wake(woken);
                    return Poll::Ready(Woke::ToUpstream(end));
                }
            }
            if woken & TO_CLIENT != 0 {
                if let Poll::Ready(end) = branches.poll(TO_CLIENT, to_client.as_mut()) {
                    return Poll::Ready(Woke::ToClient(end));
                }
            }
            Poll::Pending
        })
        .await;
        match woke {
            Woke::ToUpstream(end) => {
                return match end {
                    Err(e @ SessionError::ClientProtocol(_)) => {
                        // The complete messages before the bad one were forwarded; let their
                        // answers reach the client before it gets the FATAL, as PostgreSQL does.
                        shared.client_failed.store(true, Relaxed);
                        if shared.outstanding.load(Relaxed) > 0 {
                            let _ = tokio::time::timeout(ANSWER_GRACE, &mut to_client).await;
                        }
                        Err(e)
                    }
                    Ok(SessionEnd::ClientTerminated) => {
                        client_done = true;
                        continue;
                    }
                    other => other,
                };
            }
            // The server closed after the client's Terminate (or the client went away first).
            Woke::ToClient(_) if client_done => return Ok(SessionEnd::ClientTerminated),
            Woke::ToClient(end) => return end,
            Woke::Shutdown(next) => state = next,
            Woke::Deadline => return Ok(SessionEnd::ShutdownNow),
        }
    }
}

/// What ended one wait of the relay loop.
enum Woke {
    ToUpstream(Result<SessionEnd, SessionError>),
    ToClient(Result<SessionEnd, SessionError>),
    Shutdown(ShutdownState),
    Deadline,
}

/// The relay's branches, one bit each.
const SHUTDOWN: u8 = 1;
const DEADLINE: u8 = 2;
const TO_UPSTREAM: u8 = 4;
const TO_CLIENT: u8 = 8;
const BRANCHES: [u8; 4] = [SHUTDOWN, DEADLINE, TO_UPSTREAM, TO_CLIENT];

/// One waker per branch of the relay, so a wake-up polls only the branches that asked for it.
///
/// A future that returned `Pending` has arranged to wake the waker it was polled with, so a
/// branch whose waker has not fired has nothing to do and is skipped.
struct Branches {
    state: Arc<BranchState>,
    wakers: [Waker; 4],
    /// The task waker last stored in `state`, compared without taking its lock.
    task: Option<Waker>,
}

struct BranchState {
    /// Branches woken since they were last polled.
    woken: AtomicU8,
    /// The relay task's own waker, from its latest poll.
    task: Mutex<Option<Waker>>,
}

struct BranchWaker {
    state: Arc<BranchState>,
    bit: u8,
}

impl Wake for BranchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.state.woken.fetch_or(self.bit, AcqRel);
        let task = self.state.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Branches {
    /// Every branch starts woken, so each is polled once.
    fn new() -> Branches {
        let state = Arc::new(BranchState {
            woken: AtomicU8::new(BRANCHES.iter().fold(0, |all, b| all | b)),
            task: Mutex::new(None),
        });
        let wakers = BRANCHES.map(|bit| {
            Waker::from(Arc::new(BranchWaker {
                state: Arc::clone(&state),
                bit,
            }))
        });
        Branches {
            state,
            wakers,
            task: None,
        }
    }

    /// Remembers the task's waker and takes the set of woken branches.
    fn begin(&mut self, cx: &Context<'_>) -> u8 {
        if !self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *self.state.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            self.task = Some(task);
        }
        self.state.woken.swap(0, AcqRel)
    }

    /// Marks branches as woken: new ones, or woken ones a poll that ended early did not reach.
    fn wake(&self, bits: u8) {
        if bits != 0 {
            self.state.woken.fetch_or(bits, AcqRel);
        }
    }

    /// Polls one branch with its own waker.
    fn poll<F: Future>(&self, bit: u8, fut: Pin<&mut F>) -> Poll<F::Output> {
        let waker = &self.wakers[bit.trailing_zeros() as usize];
        fut.poll(&mut Context::from_waker(waker))
    }
}

/// Per-session memory of which statement each portal runs, for statement-kind metrics. Both
/// relays use it (the dual-write one through [`super::meter::RequestMeter`]).
#[derive(Default)]
pub(crate) struct StatementKinds {
    statements: NameMap,
    portals: NameMap,
    /// Executes since the last Sync, and the kind of the last statement (for the span).
    batch_executes: u32,
    batch_kind: Option<StatementKind>,
}

impl StatementKinds {
    /// Counts a Query or Execute by its statement's kind; remembers what Parse and Bind name.
    #[inline]
    pub(crate) fn note(&mut self, msg: &ClientMessage<'_>, metrics: &Metrics) {
        match *msg {
            ClientMessage::Query { sql } => {
                let kind = StatementKind::of(sql);
                metrics.counters.statement(Protocol::Simple, kind);
                self.batch_kind = Some(kind);
            }
            ClientMessage::Parse { statement, sql } => {
                self.statements.set(statement, StatementKind::of(sql));
            }
            ClientMessage::Bind { portal, statement } => {
                let kind = self.statements.get(statement);
                self.portals.set(portal, kind);
            }
            ClientMessage::Execute { portal, .. } => {
                let kind = self.portals.get(portal);
                metrics.counters.statement(Protocol::Extended, kind);
                self.batch_executes += 1;
                self.batch_kind = Some(kind);
            }
            ClientMessage::Close { target, name } => match target {
                Target::Statement => self.statements.remove(name),
                Target::Portal => self.portals.remove(name),
            },
            _ => {}
        }
    }
}

/// Named entries a [`NameMap`] keeps in its list before it moves them to its hash map.
const FEW_NAMES: usize = 16;

/// Statement kinds by statement or portal name.
///
/// Most drivers bind every query to the unnamed portal and many use the unnamed statement, so
/// the unnamed entry is a field. A session's first named entries are a list searched by the
/// [`fingerprint`] of each name, then its bytes: for a few names that costs less than hashing
/// one (SipHash, kept for its resistance to collisions chosen by the client). Past
/// [`FEW_NAMES`] they move to a hash map, so a session with many statements does not pay for a
/// long scan.
#[derive(Default)]
struct NameMap {
    unnamed: Option<StatementKind>,
    /// Used while `many` is empty; emptied into `many` when full.
    few: Vec<FewEntry>,
    many: HashMap<Box<[u8]>, StatementKind>,
}

struct FewEntry {
    fingerprint: u64,
    name: Box<[u8]>,
    kind: StatementKind,
}

/// A name's length and up to eight of its bytes: all of a short name, the last eight of a long
/// one (where generated names such as `P0_12` or `S_3` differ). Equal names have equal
/// fingerprints; unequal ones usually do not.
#[inline]
fn fingerprint(name: &[u8]) -> u64 {
    let n = name.len();
    let word = |b: &[u8]| b.iter().fold(0, |f, &x| f << 8 | u64::from(x));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes(name[i..i + 4].try_into().unwrap_or_default()));
    let bytes = match n {
        8.. => u64::from_le_bytes(name[n - 8..].try_into().unwrap_or_default()),
        4..=7 => u32_at(0) << 32 | u32_at(n - 4),
        _ => word(name),
    };
    bytes ^ (n as u64).rotate_right(8)
}

impl NameMap {
    /// The kind stored under `name`, `Other` if none.
    #[inline]
    fn get(&self, name: &[u8]) -> StatementKind {
        let kind = if name.is_empty() {
            self.unnamed
        } else if self.many.is_empty() {
            self.find(name).map(|i| self.few[i].kind)
        } else {
            self.many.get(name).copied()
        };
        kind.unwrap_or(StatementKind::Other)
    }

    #[inline]
    fn find(&self, name: &[u8]) -> Option<usize> {
        let fingerprint = fingerprint(name);
        self.few
            .iter()
            .position(|e| e.fingerprint == fingerprint && *e.name == *name)
    }

    fn set(&mut self, name: &[u8], kind: StatementKind) {
        if name.is_empty() {
            self.unnamed = Some(kind);
        } else if !self.many.is_empty() {
            match self.many.get_mut(name) {
                Some(slot) => *slot = kind,
                None => {
                    self.many.insert(name.into(), kind);
                }
            }
        } else if let Some(i) = self.find(name) {
            self.few[i].kind = kind;
        } else if self.few.len() < FEW_NAMES {
            self.few.push(FewEntry {
                fingerprint: fingerprint(name),
                name: name.into(),
                kind,
            });
        } else {
            self.many.extend(self.few.drain(..).map(|e| (e.name, e.kind)));
            self.many.insert(name.into(), kind);
        }
    }

    fn remove(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else if self.many.is_empty() {
            if let Some(i) = self.find(name) {
                self.few.swap_remove(i);
            }
        } else {
            self.many.remove(name);
        }
    }
}

async fn client_to_upstream(
    params: &RelayParams<'_>,
    shared: &Shared,
    rd: &mut NetRead,
    wr: &mut NetWrite,
    mut buf: BytesMut,
) -> Result<SessionEnd, SessionError> {
    let mut kinds = StatementKinds::default();
    // The buffer grew for a large message ([`release`]).
    let mut grown = false;
    loop {
        let mut frames = Frames::new(&buf, params.limits);
        let mut terminate = false;
        let mut violation = None;
        // Bytes of the frames that passed inspection: a broken frame is never forwarded.
        let mut consumed = 0;
        while let Some(frame) = frames.next() {
            match inspect_client_frame(frame, params, shared, &mut kinds) {
                Ok(true) => consumed = frames.consumed(),
                Ok(false) => {
                    consumed = frames.consumed();
                    terminate = true;
                    break;
                }
                Err(e) => {
                    violation = Some(e);
                    break;
                }
            }
        }
        let pending = match violation {
            Some(_) => Ok(None),
            None => frames.pending().map(|h| h.map(|h| h.frame_len)),
        };
        if consumed > 0 {
            write_out(wr, &buf[..consumed])
                .await
                .map_err(SessionError::UpstreamIo)?;
            buf.advance(consumed);
        }
        if let Some(e) = violation {
            return Err(e);
        }
        make_room(&mut buf, pending?, &mut grown);
        if terminate {
            // Nothing may follow Terminate: the server sees the end of the stream after it, as
            // when the client closes its socket (a server in COPY IN mode, which does not take
            // Terminate, would otherwise wait for more forever).
            let _ = wr.shutdown().await;
            return Ok(SessionEnd::ClientTerminated);
        }
        reserve_for_read(&mut buf, 4096);
        let n = match params.idle_timeout {
            None => rd.read_buf(&mut buf).await,
            Some(limit) => match read_unless_idle(rd, &mut buf, shared, limit).await {
                Some(r) => r,
                None => return Ok(SessionEnd::IdleTimeout),
            },
        }
        .map_err(SessionError::ClientIo)?;
        if n == 0 {
            return Ok(SessionEnd::ClientClosed);
        }
    }
}

/// Makes room for the rest of a partly buffered frame of `pending` bytes; with none pending,
/// gives back the memory of a buffer that `grown` says grew for a large frame.
#[inline]
fn make_room(buf: &mut BytesMut, pending: Option<usize>, grown: &mut bool) {
    match pending {
        Some(frame_len) => {
            *grown |= frame_len >= LARGE_FRAME;
            reserve_ahead(buf, frame_len.saturating_sub(buf.len()));
        }
        None if *grown => {
            release(buf);
            *grown = false;
        }
        None => {}
    }
}

/// Writes all of `bytes`: straight to the socket first, which is all it takes unless the
/// socket buffer is full, and whatever did not fit with `write_all`.
async fn write_out(wr: &mut NetWrite, bytes: &[u8]) -> std::io::Result<()> {
    let written = wr.try_write(bytes)?;
    if written < bytes.len() {
        wr.write_all(&bytes[written..]).await?;
        // A TLS write may leave ciphertext buffered; plain TCP has nothing to flush.
        wr.flush().await?;
    }
    Ok(())
}

/// Checks one client frame and updates the session state. Returns `Ok(false)` for Terminate.
#[inline]
fn inspect_client_frame(
    frame: Result<(switchyard_pgwire::FrameHeader, &[u8]), ProtocolError>,
    params: &RelayParams<'_>,
    shared: &Shared,
    kinds: &mut StatementKinds,
) -> Result<bool, SessionError> {
    let (header, body) = frame?;
    if !frontend::is_known_tag(header.tag) {
        return Err(ProtocolError::UnknownTag(header.tag).into());
    }
    match header.tag {
        b'd' => {}
        b'F' => request_sent(
            shared,
            || tracing::debug_span!(parent: params.span, "statement", protocol = "function_call"),
        ),
        tag => {
            let msg = frontend::parse(tag, body)?;
            kinds.note(&msg, params.metrics);
            match msg {
                ClientMessage::Query { sql } => request_sent(shared, || {
                    let kind = kinds.batch_kind.take().map_or("other", StatementKind::as_str);
                    tracing::debug_span!(
                        parent: params.span,
                        "statement",
                        protocol = "simple",
                        kind,
                        sql_bytes = sql.len(),
                        status = tracing::field::Empty
                    )
                }),
                ClientMessage::Sync if !shared.copy_in.load(Relaxed) => {
                    let executes = std::mem::take(&mut kinds.batch_executes);
                    let kind = kinds.batch_kind.take();
                    request_sent(shared, || {
                        tracing::debug_span!(
                            parent: params.span,
                            "statement",
                            protocol = "extended",
                            kind = kind.map_or("other", StatementKind::as_str),
                            executes,
                            status = tracing::field::Empty
                        )
                    });
                    shared.in_batch.store(false, Relaxed);
                }
                ClientMessage::Parse { .. }
                | ClientMessage::Bind { .. }
                | ClientMessage::Execute { .. }
                | ClientMessage::Describe { .. }
                | ClientMessage::Close { .. }
                | ClientMessage::Flush => shared.in_batch.store(true, Relaxed),
                ClientMessage::CopyDone | ClientMessage::CopyFail { .. } => {
                    shared.copy_in.store(false, Relaxed);
                }
                ClientMessage::Terminate => return Ok(false),
                _ => {}
            }
        }
    }
    Ok(true)
}

/// Reads from the client, or returns `None` once the session has been idle for `limit`.
/// The clock restarts whenever the session becomes idle again (`read_buf` is cancel-safe).
async fn read_unless_idle(
    rd: &mut NetRead,
    buf: &mut BytesMut,
    shared: &Shared,
    limit: Duration,
) -> Option<std::io::Result<usize>> {
    let mut deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            r = rd.read_buf(buf) => return Some(r),
            () = tokio::time::sleep_until(deadline) => {
                if shared.idle() {
                    let idle_for = Duration::from_nanos(
                        shared.now_ns().saturating_sub(shared.idle_since.load(Relaxed)),
                    );
                    if idle_for >= limit {
                        return None;
                    }
                    deadline += limit - idle_for;
                } else {
                    deadline = tokio::time::Instant::now() + limit;
                }
            }
        }
    }
}

/// A request (Query, Sync, FunctionCall) goes upstream: it will be answered by one
/// ReadyForQuery. `span` builds its `statement` span; a disabled span costs nothing further.
#[inline]
fn request_sent(shared: &Shared, span: impl FnOnce() -> tracing::Span) {
    if shared.outstanding.fetch_add(1, Relaxed) == 0 {
        shared.request_started.store(shared.now_ns(), Relaxed);
    }
    // The test the span macro starts with: below debug it builds a disabled span, which only
    // the `log` fallback (used when no tracing subscriber was ever set) would look at. Skipping
    // it saves building and dropping a span per request.
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    let debug = tracing::Level::DEBUG <= STATIC_MAX_LEVEL && tracing::Level::DEBUG <= LevelFilter::current();
    if !debug && tracing::dispatcher::has_been_set() {
        return;
    }
    let span = span();
    if !span.is_disabled() {
        if let Ok(mut spans) = shared.spans.lock() {
            spans.push_back(span);
            shared.open_spans.fetch_add(1, Relaxed);
        }
    }
}

async fn upstream_to_client(
    params: &RelayParams<'_>,
    shared: &Shared,
    rd: &mut NetRead,
    wr: &mut NetWrite,
    mut buf: BytesMut,
) -> Result<SessionEnd, SessionError> {
    let mut grown = false;
    loop {
        let mut frames = Frames::new(&buf, MessageLimits::SERVER);
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
            write_out(wr, &buf[..consumed])
                .await
                .map_err(SessionError::ClientIo)?;
            buf.advance(consumed);
        }
        make_room(&mut buf, pending, &mut grown);
        if shared.draining.load(Relaxed) && shared.idle() {
            return Ok(SessionEnd::Drained);
        }
        if shared.client_failed.load(Relaxed) && shared.outstanding.load(Relaxed) == 0 {
            return Ok(SessionEnd::ClientClosed);
        }
        reserve_for_read(&mut buf, 8192);
        if rd.read_buf(&mut buf).await.map_err(SessionError::UpstreamIo)? == 0 {
            return Ok(SessionEnd::UpstreamClosed);
        }
    }
}

#[inline]
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
    let now = shared.now_ns();
    if status == TransactionStatus::Idle.as_byte() {
        shared.idle_since.store(now, Relaxed);
    }
    let before = shared
        .outstanding
        .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)))
        .unwrap_or(0);
    if shared.open_spans.load(Relaxed) > 0 {
        if let Some(span) = shared.spans.lock().ok().and_then(|mut s| s.pop_front()) {
            shared.open_spans.fetch_sub(1, Relaxed);
            span.record("status", (status as char).encode_utf8(&mut [0; 4]) as &str);
        }
    }
    if before >= 1 {
        let started = shared.request_started.load(Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_map_behaves_like_a_map_across_its_representations() {
        let mut map = NameMap::default();
        let mut model: HashMap<Vec<u8>, StatementKind> = HashMap::new();
        let kinds = [StatementKind::Read, StatementKind::Write, StatementKind::Ddl];
        // Names of under four bytes, of four to seven, and long ones sharing their last eight.
        let names: Vec<Vec<u8>> = (0..40)
            .map(|i| match i % 3 {
                0 => format!("s{i}"),
                1 => format!("stm{i}"),
                _ => format!("stmt_{i}_same_tail"),
            })
            .map(String::into_bytes)
            .collect();
        // Grow past FEW_NAMES, overwrite, remove down to nothing, grow again.
        let mut ops = Vec::new();
        for (i, n) in names.iter().enumerate() {
            ops.push((true, n.clone(), kinds[i % 3]));
        }
        for (i, n) in names.iter().enumerate().step_by(3) {
            ops.push((true, n.clone(), kinds[(i + 1) % 3]));
        }
        for n in &names {
            ops.push((false, n.clone(), StatementKind::Other));
        }
        for (i, n) in names.iter().take(20).enumerate() {
            ops.push((true, n.clone(), kinds[i % 3]));
        }
        ops.push((true, Vec::new(), StatementKind::Transaction));
        for (set, name, kind) in ops {
            if set {
                map.set(&name, kind);
                model.insert(name, kind);
            } else {
                map.remove(&name);
                model.remove(&name);
            }
            for n in names.iter().chain([&Vec::new()]) {
                let want = model.get(n).copied().unwrap_or(StatementKind::Other);
                assert_eq!(map.get(n), want, "{}", String::from_utf8_lossy(n));
            }
            assert!(map.few.is_empty() || map.many.is_empty());
            assert!(map.few.len() <= FEW_NAMES);
        }
    }
}
