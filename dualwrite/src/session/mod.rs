//! The dual-write relay: one client session when some table is mirrored.
//!
//! The client's messages reach OLD exactly as the client sent them: the row changes are captured
//! by OLD's own triggers (`switchyard_store::capture`), not by rewriting statements. The session
//! only acts around commits: it opens a transaction for an autocommit write (so that the images
//! can reach NEW before OLD commits), and before a transaction that may have written a migrated
//! table commits, it runs the capture statement (which fires the deferred capture triggers and
//! brings the row images as notices it keeps from the client), then the commit sequence (images
//! to NEW, intent on OLD, COMMIT on OLD, COMMIT on NEW) before the client hears COMMIT. A write
//! the session did not recognise is still captured: the trigger then records it durably on OLD
//! for the repair loop (the net).
//!
//! Every message sent upstream, the client's or our own, pushes an `Expect` saying what its
//! answers are and whether the client sees them. Answers are processed strictly in order. The
//! session only waits for answers it is sure to get (the last message sent was a Sync, Flush or
//! Query; before the commit sequence the proxy sends a Flush of its own), and while it waits for
//! the client it also reads the server, so notifications reach an idle listener.
//!
//! # State
//!
//! - `expect` (`Expect`): the answers owed, in order, each saying whether the client sees it
//!   and whether a COMMIT's outcome hangs on it.
//! - `txn` (`Txn`): no block, the client's block, or the proxy's implicit one around an
//!   autocommit write in an extended batch (`open` once its BEGIN ran). `status`: the last
//!   ReadyForQuery. `dirty`: the open transaction may have written a migrated table, so its
//!   commit runs the capture statement.
//! - The batch: `flushed` (answers to everything sent are sure to come: a Sync, Flush or Query
//!   went last), `batch_failed` (an error was answered in it), `skipping` (the server discards
//!   everything up to the client's next Sync). These three are separate facts: a failure is
//!   forgotten when the proxy opens its own transaction for a later write in the same batch,
//!   while the server may still be skipping; and being flushed is about what was sent, not
//!   about errors.
//! - Around a commit: `captured` (the row images, streamed to the follower), `pending` (the
//!   follower's side of a commit whose COMMIT on the authoritative store is in flight),
//!   `hold_client` (answers held until both stores committed).
//!
//! # Transitions, by event
//!
//! - Client Query (`simple`): a read or a string without a migrated write goes through; an
//!   autocommit write is wrapped (BEGIN, the string, capture, intent, COMMIT) and the client hears
//!   one ReadyForQuery at the end; a COMMIT of the client's runs the commit sequence first.
//! - Client Parse/Bind/Execute/Close/Sync (`client`): a write's Bind opens the proxy's
//!   transaction when none is open (`Txn::None` → `Txn::Implicit`); the client's Sync ends it
//!   with the commit sequence, or with a ROLLBACK when the batch failed (and the server's block
//!   is open), and answers one idle ReadyForQuery.
//! - Server answers (`server`): CommandComplete BEGIN/COMMIT/ROLLBACK and ReadyForQuery move
//!   `txn`; an ErrorResponse ends the failing message's expectations and, in the extended
//!   protocol, everything up to Sync; a COMMIT's outcome (CommandComplete, or an error) decides
//!   the follower's commit (`commit`).
//! - COPY FROM STDIN (`copy`): the client's data is relayed until CopyDone or CopyFail.
//! - The loop (`flow`): between client messages it waits for the client while reading the
//!   server; it ends the session on Terminate, either side closing, the stop signal (at once
//!   when idle, after the grace otherwise) or the idle timeout.

mod client;
mod commit;
mod copy;
mod flow;
mod route;
mod served;
mod server;
mod shadowed;
mod simple;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use switchyard_config::{MirrorFault, UncapturedPolicy};
use switchyard_pgwire::backend::{self, ServerMessage, TransactionStatus};
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend::{self as fe, ClientMessage, Target};
use switchyard_pgwire::sqlstate;
use switchyard_store::capture::{ImageOp, CAPTURE_SQLSTATE};
use switchyard_store::mirror::ChangeOp;
use switchyard_store::wire::ClientLogin;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reads::ReadShape;
use super::shadow::settings::SessionSettings;
use super::shadow::{Capture, ShadowRequest};
use super::sql::{Analysis, Analyzed, Stmt, TxnOp};
use super::stream::ImageStream;
use super::Mirror;
use crate::error::SessionError;
use client::refusal_sql;
use commit::{Captured, CommitWait, PendingCommit};
use switchyard_store::wire::reserve_for_read as reserve;

/// Names of the statements and portals the proxy injects (PostgreSQL reserves nothing, so these
/// are long and unlikely; they are closed again in the same batch).
const INJECTED: &[u8] = b"__switchyard_injected";

/// How a dual-write session ended without an I/O or protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
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
    /// Write authority moved to the other store: the session goes on there (what it takes
    /// along is in the relay's `resume`).
    Reroute,
}

/// Whether the proxy running the session is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Serving.
    Run,
    /// End the session once it is idle, or after `grace` at the latest.
    Drain {
        /// How long a transaction in progress may still take.
        grace: std::time::Duration,
    },
    /// End the session now.
    Now,
}

/// What the session needs from the proxy that runs it: the stop signal and the metrics. The
/// engine does no accounting of its own for these, so both relays feed the same instruments.
pub trait SessionHost: Send {
    /// The current stop state.
    fn stop(&self) -> Stop;
    /// Resolves once [`SessionHost::stop`] may have changed.
    fn stop_changed(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// A message from the client (`tag`, `body` without the header), before it is processed.
    fn client_message(&mut self, tag: u8, body: &[u8]);
    /// Every request sent so far is answered.
    fn answered(&mut self);
    /// The authoritative store answered a statement with an error.
    fn statement_error(&mut self);
    /// The session is quiet (no transaction, nothing unanswered) and the client sent
    /// something: waits while the proxy holds new transactions (the cutover barrier), then
    /// counts the session as busy until [`SessionHost::quiet`]. `true` when the session must
    /// first move to the other store ([`SessionEnd::Reroute`]; it is then not counted).
    fn enter(&mut self) -> impl std::future::Future<Output = bool> + Send {
        std::future::ready(false)
    }
    /// The session is quiet again after [`SessionHost::enter`].
    fn quiet(&mut self) {}
}

/// What a session moving to the other store takes along ([`SessionEnd::Reroute`]): the client's
/// bytes not processed yet, its settings, its prepared statements, its read-shift draw.
pub struct Resume {
    pub client_buf: BytesMut,
    settings: Option<SessionSettings>,
    parses: HashMap<Vec<u8>, Bytes>,
    shift_draw: u8,
    /// The store the session moves to for its next transaction (table groups split between
    /// the stores: its first statement names a table the other store takes); `None`: the
    /// store write authority moved to.
    pub to: Option<switchyard_store::Role>,
    /// A BEGIN the client was answered for, not sent upstream yet (`route`).
    deferred: Option<Bytes>,
    /// The move is for the transaction the client starts (not a move of write authority).
    routed: bool,
    /// The session ran a statement that may leave state on its server connection.
    may_hold_state: bool,
}

impl Resume {
    /// Whether the session ran a statement that may have left state on its server connection
    /// that a new connection would not have (an advisory lock, a temporary table, `LISTEN`,
    /// SQL `PREPARE`, a cursor `WITH HOLD`): the words, in any statement text it sent.
    pub fn may_hold_state(&self) -> bool {
        self.may_hold_state
    }

    /// The session's prepared statements: Parse message by name.
    pub fn statements(&self) -> HashMap<Vec<u8>, Bytes> {
        self.parses.clone()
    }

    /// The statement that gives a connection the session's settings (`None`: none to give),
    /// and the Parse messages that prepare there the statements it lacks, given the ones it
    /// holds (`held`: Parse message by name) from the session's last visit (none for a new
    /// connection): those the session still has, unchanged, stay (the unnamed one excepted: a
    /// simple query drops it); the others are returned by name, to be closed before the Parses.
    pub fn replay_over(
        &mut self,
        held: &HashMap<Vec<u8>, Bytes>,
    ) -> (Option<String>, Vec<Vec<u8>>, Vec<Bytes>) {
        let prelude = self
            .settings
            .as_mut()
            .map(|s| s.prelude().to_string())
            .filter(|p| !p.is_empty());
        // `f`, named `n`, is in `other` as it is: it stays on the connection.
        let kept = |n: &Vec<u8>, f: &Bytes, other: &HashMap<Vec<u8>, Bytes>| {
            !n.is_empty() && other.get(n) == Some(f)
        };
        let close = held
            .iter()
            .filter(|(n, f)| !kept(n, f, &self.parses))
            .map(|(n, _)| n.clone())
            .collect();
        let parses = self
            .parses
            .iter()
            .filter(|(n, f)| !kept(n, f, held))
            .map(|(_, f)| f.clone())
            .collect();
        (prelude, close, parses)
    }
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Size limits of client messages.
    pub limits: MessageLimits,
    /// End the session after this long idle outside a transaction.
    pub idle_timeout: Option<std::time::Duration>,
    /// The client's startup parameters (the session's settings, replayed for shadow reads).
    pub startup: Vec<(String, String)>,
    /// The client's login, for the connections opened as the client (reads served by NEW,
    /// shadow reads); `None` under `[auth] upstream_login = "service"`, where they log in as
    /// the stores' URLs say.
    pub login: Option<Arc<ClientLogin>>,
}

/// What the answers to one message sent upstream look like, and what the client sees of them.
#[derive(Debug)]
enum Expect {
    /// ParseComplete.
    Parse { forward: bool },
    /// BindComplete.
    Bind { forward: bool },
    /// CloseComplete.
    Close { forward: bool },
    /// ParameterDescription, then RowDescription or NoData.
    DescribeStatement { got_params: bool },
    /// RowDescription or NoData.
    DescribePortal,
    /// Rows, then CommandComplete, EmptyQueryResponse or PortalSuspended (or a COPY).
    Execute {
        forward: bool,
        commit: Option<CommitWait>,
        /// The capture statement: its image notices are the session's, not the client's.
        capture: bool,
        /// A shadow read: OLD's rows are collected for the comparison.
        shadow: Option<Box<Capture>>,
    },
    /// Everything up to and including ReadyForQuery.
    Query {
        forward: bool,
        forward_ready: bool,
        commit: Option<CommitWait>,
        shadow: Option<Box<Capture>>,
    },
    /// ReadyForQuery.
    Sync { forward: bool },
    /// FunctionCallResponse, then ReadyForQuery.
    FunctionCall,
}

impl Expect {
    fn exec(forward: bool, commit: Option<CommitWait>) -> Expect {
        Expect::Execute {
            forward,
            commit,
            capture: false,
            shadow: None,
        }
    }

    fn query(forward: bool, forward_ready: bool, commit: Option<CommitWait>) -> Expect {
        Expect::Query {
            forward,
            forward_ready,
            commit,
            shadow: None,
        }
    }
}

/// Whose transaction block is open on the authoritative store, as far as the session knows.
///
/// Two facts that change on their own: whether a block is open on the server, and whether the
/// proxy opened it, around an autocommit write in an extended-protocol batch (the client's Sync
/// then ends it with the commit sequence). A COMMIT of the client's inside such a batch closes
/// the server's block while the batch stays the proxy's: hence `Implicit { open }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    /// No block open.
    None,
    /// The client's own block (its BEGIN completed, or a ReadyForQuery said so).
    Client,
    /// The proxy's block around an autocommit write in this batch; `open` once its BEGIN ran
    /// (until a COMMIT or ROLLBACK inside the batch ends it).
    Implicit { open: bool },
}

impl Txn {
    /// A block is open on the server, the client's or the proxy's.
    fn open(self) -> bool {
        matches!(self, Txn::Client | Txn::Implicit { open: true })
    }

    /// The proxy opened the batch's transaction.
    fn implicit(self) -> bool {
        matches!(self, Txn::Implicit { .. })
    }

    /// The server opened a block (a BEGIN completed).
    fn opened(self) -> Txn {
        match self {
            Txn::Implicit { .. } => Txn::Implicit { open: true },
            Txn::None | Txn::Client => Txn::Client,
        }
    }

    /// The server's block ended (a COMMIT or ROLLBACK completed, or the transaction is over).
    fn closed(self) -> Txn {
        match self {
            Txn::Implicit { .. } => Txn::Implicit { open: false },
            Txn::None | Txn::Client => Txn::None,
        }
    }

    /// A ReadyForQuery said `status`.
    fn ready(self, status: TransactionStatus) -> Txn {
        if status == TransactionStatus::Idle {
            self.closed()
        } else {
            self.opened()
        }
    }

    /// The proxy's batch is over (the client's Sync): what remains is the server's state.
    fn end_implicit(self) -> Txn {
        match self {
            Txn::Implicit { open: true } => Txn::Client,
            Txn::Implicit { open: false } => Txn::None,
            other => other,
        }
    }
}

struct MirrorSession<'a, R, W, H> {
    mirror: &'a Arc<Mirror>,
    params: SessionParams,
    client_rd: &'a mut R,
    client_wr: &'a mut W,
    up_rd: &'a mut R,
    up_wr: &'a mut W,
    /// The proxy's stop signal and metrics.
    host: &'a mut H,
    client_buf: BytesMut,
    up_buf: BytesMut,
    to_client: BytesMut,
    to_up: BytesMut,
    /// Large client frames sent as they came rather than copied into `to_up`, each after the
    /// bytes `to_up` held before it ([`MirrorSession::send_frame`]).
    to_up_large: Vec<Bytes>,
    /// A frame of `LARGE_FRAME` or more went through: the buffers are given back at the next
    /// turn of the loop.
    large_seen: bool,
    expect: VecDeque<Expect>,
    /// Answers to everything in `expect` are sure to come (a Sync, Flush or Query went last).
    flushed: bool,
    /// Transaction status from the last ReadyForQuery the session saw.
    status: TransactionStatus,
    /// Whose transaction block is open.
    txn: Txn,
    /// The open transaction ran a statement that may write a migrated table: its commit runs the
    /// capture statement first. (A write not recognised is caught by the trigger's net.)
    dirty: bool,
    /// An error was answered in the current extended-protocol batch.
    batch_failed: bool,
    /// The server is skipping messages until the client's next Sync (an error came before
    /// that Sync was sent): those messages get no answers.
    skipping: bool,
    /// CopyDone/CopyFail messages forwarded before their COPY started.
    copy_ends_sent: usize,
    statements: HashMap<Vec<u8>, Arc<Stmt>>,
    portals: HashMap<Vec<u8>, Arc<Stmt>>,
    captured: Captured,
    pending: Option<PendingCommit>,
    /// Answers are held back from the client while the proxy's own transaction around an
    /// autocommit write is open: the client hears CommandComplete only once both stores
    /// committed, as it would from PostgreSQL.
    hold_client: bool,
    /// Shadow reads: the session's settings (`None` when no table is in `shadow_read`), and
    /// the eligible reads among its prepared statements and portals (their Parse, and Bind,
    /// frames).
    shadow_settings: Option<SessionSettings>,
    shadow_statements: HashMap<Vec<u8>, (Arc<ReadShape>, Bytes)>,
    shadow_portals: HashMap<Vec<u8>, (Arc<ReadShape>, Bytes, Bytes)>,
    /// Read shifting (`served`): the number this session drew (NEW serves its reads of a
    /// table whose read share is above it), its connection to NEW, the messages of a batch
    /// held for NEW, and `no_hold` after held messages were let go to OLD (until the Sync).
    shift_draw: u8,
    served_conn: Option<crate::shift::ServedConn>,
    /// NEW refused the client's role for served reads: not asked again this session.
    served_refused: bool,
    held: Option<Vec<(u8, Bytes)>>,
    no_hold: bool,
    /// Every prepared statement's Parse, by name, so a session moving to the other store can
    /// prepare them there again.
    parses: HashMap<Vec<u8>, Bytes>,
    /// The prepared statements that deallocate prepared statements when run (`DEALLOCATE`,
    /// `DISCARD ALL` prepared with Parse): a Bind of one forgets what it names.
    deallocating: HashMap<Vec<u8>, client::Deallocation>,
    /// Counted busy by the host ([`SessionHost::enter`]).
    entered: bool,
    /// The store of the transaction the client is starting is decided (`route`).
    routed: bool,
    /// A lone BEGIN answered to the client and not sent upstream yet (`route`).
    deferred: Option<Bytes>,
    /// Where the session moves on [`SessionEnd::Reroute`] (`None`: where write authority went).
    moving_to: Option<switchyard_store::Role>,
    /// The session just moved here for the transaction it starts: it does not move back for it.
    arrived: bool,
    /// See [`Resume::may_hold_state`].
    may_hold_state: bool,
}

/// Runs a session in dual-write mode until one side ends: `client` is the client's connection
/// (read and write halves, with what was already read from it in `client_buf`), `upstream` the
/// logged-in connection to the authoritative store (likewise).
///
/// `resume` carries a session across a move of write authority: given, the session goes on
/// with what it had on the other store; on [`SessionEnd::Reroute`] it is filled.
#[allow(clippy::too_many_arguments)]
pub async fn relay<R, W, H>(
    mirror: &Arc<Mirror>,
    params: SessionParams,
    client: (&mut R, &mut W),
    client_buf: BytesMut,
    upstream: (&mut R, &mut W),
    up_buf: BytesMut,
    host: &mut H,
    resume: &mut Option<Resume>,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    let resumed = resume.take();
    let deferred = resumed.as_ref().and_then(|r| r.deferred.clone());
    let arrived = resumed.as_ref().is_some_and(|r| r.routed);
    let may_hold_state = resumed.as_ref().is_some_and(|r| r.may_hold_state);
    let (client_buf, shadow_settings, parses, shift_draw) = match resumed {
        Some(r) => (r.client_buf, r.settings, r.parses, r.shift_draw),
        None => (
            client_buf,
            mirror
                .shadow
                .as_ref()
                .map(|_| SessionSettings::from_startup(&params.startup)),
            HashMap::new(),
            rand::random::<u8>() % 100,
        ),
    };
    let mut s = MirrorSession {
        mirror,
        params,
        host,
        client_rd: client.0,
        client_wr: client.1,
        up_rd: upstream.0,
        up_wr: upstream.1,
        client_buf,
        up_buf,
        to_client: BytesMut::with_capacity(8192),
        to_up: BytesMut::with_capacity(8192),
        to_up_large: Vec::new(),
        large_seen: false,
        expect: VecDeque::new(),
        flushed: true,
        status: TransactionStatus::Idle,
        txn: Txn::None,
        dirty: false,
        batch_failed: false,
        skipping: false,
        copy_ends_sent: 0,
        statements: HashMap::new(),
        portals: HashMap::new(),
        captured: Captured::default(),
        pending: None,
        hold_client: false,
        shadow_settings,
        shadow_statements: HashMap::new(),
        shadow_portals: HashMap::new(),
        shift_draw,
        served_conn: None,
        served_refused: false,
        held: None,
        no_hold: false,
        parses,
        deallocating: HashMap::new(),
        entered: false,
        routed: false,
        deferred,
        moving_to: None,
        arrived,
        may_hold_state,
    };
    // A session that moved here: what its prepared statements are (writes, reads) is known
    // again, so a Bind of one parsed on the other store is captured and served as before.
    let carried: Vec<Bytes> = s.parses.values().cloned().collect();
    for frame in &carried {
        s.note_parse(fe::parse(b'P', frame.get(5..).unwrap_or_default()).ok(), frame);
    }
    let result = s.run().await;
    if s.entered {
        s.host.quiet();
    }
    if matches!(result, Ok(SessionEnd::Reroute)) {
        *resume = Some(Resume {
            client_buf: std::mem::take(&mut s.client_buf),
            settings: s.shadow_settings.take(),
            parses: std::mem::take(&mut s.parses),
            shift_draw: s.shift_draw,
            to: s.moving_to,
            routed: s.moving_to.is_some(),
            deferred: s.deferred.take(),
            may_hold_state: s.may_hold_state,
        });
    }
    if let Some(p) = s.pending.take() {
        // The session died inside the commit sequence: OLD's outcome is unknown here, the intent
        // (if OLD committed) is on OLD; let the repair loop decide.
        mirror.rollback_on_follower(p.conn).await;
        mirror.note_failed(p.intent_id);
    }
    result
}
