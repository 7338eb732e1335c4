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
//! Every message sent upstream, the client's or our own, pushes an [`Expect`] saying what its
//! answers are and whether the client sees them. Answers are processed strictly in order. The
//! session only waits for answers it is sure to get (the last message sent was a Sync, Flush or
//! Query; before the commit sequence the proxy sends a Flush of its own), and while it waits for
//! the client it also reads the server, so notifications reach an idle listener.

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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::sql::{Analysis, Stmt, TxnOp};
use super::stream::ImageStream;
use super::Mirror;
use crate::error::SessionError;

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
}

/// Settings of one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionParams {
    /// Size limits of client messages.
    pub limits: MessageLimits,
    /// End the session after this long idle outside a transaction.
    pub idle_timeout: Option<std::time::Duration>,
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
    },
    /// Everything up to and including ReadyForQuery.
    Query {
        forward: bool,
        forward_ready: bool,
        commit: Option<CommitWait>,
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
        }
    }

    fn query(forward: bool, forward_ready: bool, commit: Option<CommitWait>) -> Expect {
        Expect::Query {
            forward,
            forward_ready,
            commit,
        }
    }
}

/// A COMMIT sent to OLD whose outcome decides NEW's.
#[derive(Debug, Clone, Copy)]
struct CommitWait {
    intent_id: i64,
}

/// What the NEW side of a commit in progress holds.
struct PendingCommit {
    conn: Option<super::newlink::LinkConn>,
    intent_id: i64,
    started: Instant,
}

/// The row images the capture statement brings, streamed to NEW in chunks
/// ([`super::stream`]).
#[derive(Default)]
struct Captured {
    stream: ImageStream,
    /// The first image that could not be used (the commit is then refused).
    problem: Option<String>,
}

impl Captured {
    fn clear(&mut self) {
        self.stream.clear();
        self.problem = None;
    }

    /// Adds one image notice, or records why it cannot be used.
    fn add(&mut self, mirror: &Mirror, fields: &backend::ErrorFields<'_>) {
        if self.problem.is_some() {
            return;
        }
        match decode_image(mirror, fields) {
            Ok((table, op, image)) => self.stream.push(table, op, image),
            Err(problem) => self.problem = Some(problem),
        }
    }
}

/// A capture notice's table, operation and image (UTF-8 JSON).
fn decode_image(
    mirror: &Mirror,
    fields: &backend::ErrorFields<'_>,
) -> Result<(usize, ChangeOp, String), String> {
    let table = String::from_utf8_lossy(fields.get(b'D').unwrap_or_default()).into_owned();
    let hint = fields.get(b'H').unwrap_or_default();
    let (op, base64) = match hint.strip_suffix(b"64") {
        Some(op) => (op, true),
        None => (hint, false),
    };
    let op = match ImageOp::from_hint(op) {
        Some(ImageOp::Upsert) => ChangeOp::Upsert,
        Some(ImageOp::Delete) => ChangeOp::Delete,
        Some(ImageOp::Append) => ChangeOp::Append,
        None => return Err(format!("a row image of table {table} has an unknown operation")),
    };
    let Some(index) = mirror.table_index(&table) else {
        return Err(format!(
            "table {table} has Switchyard's capture trigger but this proxy does not mirror it; \
             run every proxy with the same [[tables]] (and `switchyard prepare` after changing them)"
        ));
    };
    let raw = fields.get(b'M').unwrap_or_default();
    let bytes = if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|e| format!("a row image of table {table} is not valid base64: {e}"))?
    } else {
        raw.to_vec()
    };
    let image = String::from_utf8(bytes).map_err(|_| format!("a row image of table {table} is not UTF-8"))?;
    Ok((index, op, image))
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
    expect: VecDeque<Expect>,
    /// Answers to everything in `expect` are sure to come (a Sync, Flush or Query went last).
    flushed: bool,
    /// Transaction status from the last ReadyForQuery the session saw.
    status: u8,
    /// The client's own transaction block is open (BEGIN seen, not yet ended), or the proxy
    /// opened one for this batch (`implicit`).
    in_block: bool,
    implicit: bool,
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
}

/// Runs a session in dual-write mode until one side ends: `client` is the client's connection
/// (read and write halves, with what was already read from it in `client_buf`), `upstream` the
/// logged-in connection to the authoritative store (likewise).
pub async fn relay<R, W, H>(
    mirror: &Arc<Mirror>,
    params: SessionParams,
    client: (&mut R, &mut W),
    client_buf: BytesMut,
    upstream: (&mut R, &mut W),
    up_buf: BytesMut,
    host: &mut H,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
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
        expect: VecDeque::new(),
        flushed: true,
        status: b'I',
        in_block: false,
        implicit: false,
        dirty: false,
        batch_failed: false,
        skipping: false,
        copy_ends_sent: 0,
        statements: HashMap::new(),
        portals: HashMap::new(),
        captured: Captured::default(),
        pending: None,
        hold_client: false,
    };
    let result = s.run().await;
    if let Some(p) = s.pending.take() {
        // The session died inside the commit sequence: OLD's outcome is unknown here, the intent
        // (if OLD committed) is on OLD; let the repair loop decide.
        mirror.rollback_on_new(p.conn).await;
        mirror.note_failed(p.intent_id);
    }
    result
}

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    async fn run(&mut self) -> Result<SessionEnd, SessionError> {
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            // Process every complete client message already buffered.
            while let Some((tag, frame)) = take_frame(&mut self.client_buf, self.params.limits)
                .map_err(SessionError::ClientProtocol)?
                .map(|f| (f.tag, f.bytes))
            {
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
            let idle = self.status == b'I' && self.expect.is_empty() && !self.in_block;
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

    async fn flush_upstream(&mut self) -> Result<(), SessionError> {
        if !self.to_up.is_empty() {
            let chunk = self.to_up.split();
            self.up_wr
                .write_all(&chunk)
                .await
                .map_err(SessionError::UpstreamIo)?;
        }
        Ok(())
    }

    async fn flush_client(&mut self) -> Result<(), SessionError> {
        // Held answers are bounded: a huge RETURNING result goes out early.
        if self.hold_client && self.to_client.len() < (1 << 20) {
            return Ok(());
        }
        self.flush_client_now().await
    }

    async fn flush_client_now(&mut self) -> Result<(), SessionError> {
        if !self.to_client.is_empty() {
            let chunk = self.to_client.split();
            self.client_wr
                .write_all(&chunk)
                .await
                .map_err(SessionError::ClientIo)?;
        }
        Ok(())
    }

    fn send(&mut self, frame: &[u8], expect: Option<Expect>) {
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
    async fn barrier(&mut self) -> Result<(), SessionError> {
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
    async fn settle(&mut self) -> Result<(), SessionError> {
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
    async fn drain(&mut self) -> Result<(), SessionError> {
        self.drain_while(|q| !q.is_empty()).await
    }

    async fn drain_while(&mut self, pending: impl Fn(&VecDeque<Expect>) -> bool) -> Result<(), SessionError> {
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

    async fn process_server_buffer(&mut self) -> Result<(), SessionError> {
        while let Some((tag, frame)) = take_frame(&mut self.up_buf, MessageLimits::SERVER)
            .map_err(SessionError::UpstreamProtocol)?
            .map(|f| (f.tag, f.bytes))
        {
            self.server_message(tag, frame).await?;
        }
        Ok(())
    }

    // ---- client side ----

    async fn client_message(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
        tracing::trace!(tag = %(tag as char), len = frame.len(), expect = self.expect.len(), "client message");
        let body = frame.slice(5..);
        match tag {
            b'Q' => {
                let sql = String::from_utf8_lossy(cstr_bytes(&body)).into_owned();
                self.simple_query(frame, &sql).await
            }
            b'P' => {
                self.flushed = false;
                let stmt = match fe::parse(b'P', &body) {
                    Ok(ClientMessage::Parse { statement: name, sql }) => {
                        let analysis = self.mirror.analyzer.analyze(&String::from_utf8_lossy(sql));
                        let stmt = match analysis.stmts.as_slice() {
                            [one] => one.stmt.clone(),
                            _ => Stmt::Plain,
                        };
                        Some((name.to_vec(), stmt))
                    }
                    // Malformed: the server answers it.
                    _ => None,
                };
                self.send(&frame, Some(Expect::Parse { forward: true }));
                if let Some((name, stmt)) = stmt {
                    set_name(&mut self.statements, &name, Arc::new(stmt));
                }
                Ok(())
            }
            b'B' => {
                self.flushed = false;
                let (portal, statement) = two_cstrs(&body);
                let stmt = self
                    .statements
                    .get(statement)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Stmt::Plain));
                if let Stmt::Write { .. } = &*stmt {
                    self.begin_if_idle();
                }
                let portal = portal.to_vec();
                self.send(&frame, Some(Expect::Bind { forward: true }));
                set_name(&mut self.portals, &portal, stmt);
                Ok(())
            }
            b'D' => {
                self.flushed = false;
                let e = if body.first() == Some(&b'S') {
                    Expect::DescribeStatement { got_params: false }
                } else {
                    Expect::DescribePortal
                };
                self.send(&frame, Some(e));
                Ok(())
            }
            b'E' => {
                self.flushed = false;
                let portal = cstr_bytes(&body).to_vec();
                let stmt = self
                    .portals
                    .get(&portal)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Stmt::Plain));
                self.execute(frame, &stmt).await
            }
            b'C' => {
                self.flushed = false;
                let name = body.get(1..).map(cstr_bytes).unwrap_or_default().to_vec();
                match body.first() {
                    Some(b'S') => self.statements.remove(&name),
                    _ => self.portals.remove(&name),
                };
                self.send(&frame, Some(Expect::Close { forward: true }));
                Ok(())
            }
            b'S' => self.sync(frame).await,
            b'H' => {
                // The client wants its answers now, even those held for a commit in progress.
                self.hold_client = false;
                self.send(&frame, None);
                self.flushed = true;
                Ok(())
            }
            b'F' => {
                // A fast-path call that writes a migrated table is captured by the trigger's
                // net (the session cannot tell what the function does).
                self.send(&frame, Some(Expect::FunctionCall));
                self.flushed = true;
                Ok(())
            }
            // CopyData, CopyDone, CopyFail sent ahead of the server's CopyInResponse (pipelined
            // by the client), or outside COPY, where the server answers them.
            _ => {
                if tag == b'c' || tag == b'f' {
                    self.copy_ends_sent += 1;
                }
                self.send(&frame, None);
                Ok(())
            }
        }
    }

    /// Opens a transaction for an autocommit write in an extended-protocol batch.
    fn begin_if_idle(&mut self) {
        if !self.in_block && !self.implicit {
            // Only errors from here on decide whether the proxy's transaction commits: one left
            // over from an earlier simple Query (answered, and already seen by the client) must
            // not roll back this one.
            self.batch_failed = false;
            self.inject_statement("BEGIN", None, false, false);
            self.implicit = true;
            self.hold_client = true;
        }
    }

    /// Injects one statement as extended-protocol messages whose answers the client never sees
    /// (errors excepted).
    fn inject_statement(&mut self, sql: &str, commit: Option<CommitWait>, forward: bool, capture: bool) {
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
        });
        self.expect.push_back(Expect::Close { forward: false });
        self.expect.push_back(Expect::Close { forward: false });
        self.flushed = false;
    }

    async fn execute(&mut self, frame: Bytes, stmt: &Stmt) -> Result<(), SessionError> {
        match stmt {
            Stmt::Write { table } => {
                tracing::trace!(table, "a write to a migrated table");
                self.begin_if_idle();
                self.dirty = true;
                self.send(&frame, Some(Expect::exec(true, None)));
            }
            Stmt::Txn(op) => {
                match op {
                    TxnOp::Begin => self.in_block = true,
                    TxnOp::Commit => {
                        if let Some(commit) = self.prepare_commit().await? {
                            let intent = self.intent_sql(commit.intent_id).await;
                            self.inject_statement(&intent, None, false, false);
                            self.send(&frame, Some(Expect::exec(true, Some(commit))));
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
                self.send(&frame, Some(Expect::exec(true, None)));
            }
            Stmt::Uncaptured { table, what } => {
                if self.mirror.policies.get(*table) == Some(&UncapturedPolicy::MarkForVerify) {
                    self.mirror.mark_for_verify(*table, what);
                    self.send(&frame, Some(Expect::exec(true, None)));
                } else {
                    let msg = self.refusal(*table, what);
                    self.refuse_extended(&msg);
                }
            }
            Stmt::Plain => self.send(&frame, Some(Expect::exec(true, None))),
        }
        Ok(())
    }

    /// Counts a refused statement and returns the message the client gets.
    fn refusal(&self, table: usize, what: &str) -> String {
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
    fn refuse_extended(&mut self, message: &str) {
        let sql = refusal_sql(message);
        self.inject_statement(&sql, None, true, false);
    }

    async fn sync(&mut self, frame: Bytes) -> Result<(), SessionError> {
        if !self.implicit {
            self.send(&frame, Some(Expect::Sync { forward: true }));
            self.flushed = true;
            self.batch_failed = false;
            return Ok(());
        }
        // The proxy opened a transaction for this batch: finish it before the client's Sync.
        self.barrier().await?;
        self.implicit = false;
        if self.batch_failed || self.status == b'E' {
            self.send(&frame, Some(Expect::Sync { forward: false }));
            self.flushed = true;
            self.drain().await?;
            if self.status == b'I' {
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
        self.send(&frame, Some(Expect::Sync { forward: false }));
        self.flushed = true;
        self.drain().await?;
        if self.status != b'I' {
            // The intent or COMMIT failed inside the block the proxy opened: close it; the
            // client already has the error.
            self.rollback_quietly().await?;
        }
        backend::ready_for_query(&mut self.to_client, TransactionStatus::Idle);
        self.batch_failed = false;
        self.hold_client = false;
        Ok(())
    }

    async fn rollback_quietly(&mut self) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        fe::query(&mut out, "ROLLBACK");
        self.send(&out, Some(Expect::query(false, false, None)));
        self.flushed = true;
        self.flush_upstream().await?;
        self.drain().await?;
        self.end_transaction();
        self.status = b'I';
        Ok(())
    }

    /// The transaction is over (committed, rolled back or never begun).
    fn end_transaction(&mut self) {
        self.dirty = false;
        self.in_block = false;
        self.captured.clear();
    }

    /// Before OLD commits: waits for every earlier answer, fires the capture triggers, then
    /// applies the images on NEW. `None` when there is nothing to mirror or the transaction
    /// already failed.
    async fn prepare_commit(&mut self) -> Result<Option<CommitWait>, SessionError> {
        self.settle().await?;
        if !self.dirty || self.status == b'E' || self.batch_failed {
            self.dirty = false;
            return Ok(None);
        }
        self.dirty = false;
        self.captured.clear();
        let sql = self.mirror.capture_sql.clone();
        self.inject_statement(&sql, None, false, true);
        self.barrier().await?;
        if self.batch_failed {
            // The capture statement failed (the client has the error): the transaction is
            // aborted and its COMMIT will answer ROLLBACK.
            self.mirror.abandon_on_new(&mut self.captured.stream).await;
            self.captured.clear();
            return Ok(None);
        }
        if let Some(problem) = self.captured.problem.take() {
            // Images the proxy cannot apply must not be committed on OLD alone without a
            // record: refuse the commit (the server raises the error and aborts).
            self.mirror.abandon_on_new(&mut self.captured.stream).await;
            self.captured.clear();
            tracing::error!(problem, "refusing a commit whose row images cannot be mirrored");
            self.refuse_extended(&problem);
            self.barrier().await?;
            return Ok(None);
        }
        if self.captured.stream.is_empty() {
            return Ok(None);
        }
        let intent_id = (rand::random::<u64>() >> 1) as i64;
        let started = Instant::now();
        let conn = self
            .mirror
            .finish_on_new(&mut self.captured.stream, intent_id)
            .await;
        if self.mirror.settings.fault_injection == Some(MirrorFault::BeforeOldCommit) {
            drop(conn);
            return Err(SessionError::Injected("before OLD's commit"));
        }
        self.pending = Some(PendingCommit {
            conn,
            intent_id,
            started,
        });
        Ok(Some(CommitWait { intent_id }))
    }

    /// The statement recording the transaction's intent on OLD.
    async fn intent_sql(&mut self, intent_id: i64) -> String {
        super::stream::intent_sql(self.mirror, &mut self.captured.stream, intent_id).await
    }

    /// OLD answered the COMMIT: finish NEW accordingly.
    async fn finish_commit(&mut self, committed: bool) -> Result<(), SessionError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let fault = self.mirror.settings.fault_injection;
        if committed {
            if fault == Some(MirrorFault::AfterOldCommit) {
                // Die as a killed proxy would: NEW's transaction goes with its connection.
                drop(p.conn);
                return Err(SessionError::Injected("after OLD's commit"));
            }
            let cleanup = fault != Some(MirrorFault::AfterNewCommit);
            self.mirror
                .commit_on_new(p.conn, p.intent_id, p.started, cleanup)
                .await;
            if !cleanup {
                return Err(SessionError::Injected("after NEW's commit"));
            }
        } else {
            self.mirror.rollback_on_new(p.conn).await;
        }
        self.captured.clear();
        Ok(())
    }

    // ---- simple protocol ----

    /// A Query message. It always reaches OLD as the client's own bytes (or, for a refused
    /// statement, not at all); what the session adds are whole statements of its own around it.
    async fn simple_query(&mut self, frame: Bytes, sql: &str) -> Result<(), SessionError> {
        if self.expect.is_empty() {
            // Errors of earlier batches are answered and done with.
            self.batch_failed = false;
        }
        let analysis = self.mirror.analyzer.analyze(sql);
        if !analysis.matters() {
            self.send(&frame, Some(Expect::query(true, true, None)));
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
                    self.send(&frame, Some(Expect::query(true, true, Some(commit))));
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
                if self.status == b'I' {
                    return self.wrapped_query(frame).await;
                }
                self.dirty = true;
            }
            // Transaction control among other statements: the string runs as the client wrote
            // it; a COMMIT inside it fires the capture triggers at commit, which record the
            // changes durably on OLD for the repair loop (the net).
            _ => self.dirty |= writes,
        }
        self.send(&frame, Some(Expect::query(true, true, None)));
        self.flushed = true;
        Ok(())
    }

    /// The refusal message for the first uncapturable statement under policy `refuse`; marks
    /// the tables of those under `mark_for_verify`.
    fn uncaptured(&self, analysis: &Analysis) -> Option<String> {
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
    async fn wrapped_query(&mut self, frame: Bytes) -> Result<(), SessionError> {
        self.hold_client = true;
        self.queue_query("BEGIN");
        self.dirty = true;
        self.batch_failed = false;
        self.send(&frame, Some(Expect::query(true, false, None)));
        self.flushed = true;
        self.flush_upstream().await?;
        self.drain().await?;
        let failed = std::mem::take(&mut self.batch_failed);
        if failed || self.status == b'E' {
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
        let status = self.status;
        backend::ready_for_query(
            &mut self.to_client,
            TransactionStatus::from_byte(status).unwrap_or(TransactionStatus::Idle),
        );
        Ok(())
    }

    /// Queues a Query whose answers the client does not see (errors excepted); it is sent and
    /// answered together with the next [`Self::run_query`], saving a round trip.
    fn queue_query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        fe::query(&mut out, sql);
        self.send(&out, Some(Expect::query(false, false, None)));
        self.flushed = true;
    }

    /// Sends one Query of the proxy's (and any queued ones) and processes the answers, which
    /// the client does not see (errors excepted).
    async fn run_query(&mut self, sql: &str, commit: Option<CommitWait>) -> Result<(), SessionError> {
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

    // ---- server side ----

    /// Whether the statement being answered is the capture statement.
    fn capturing(&self) -> bool {
        matches!(self.expect.front(), Some(Expect::Execute { capture: true, .. }))
    }

    async fn server_message(&mut self, tag: u8, frame: Bytes) -> Result<(), SessionError> {
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
            Expect::Execute { forward, commit, .. } | Expect::Query { forward, commit, .. } => {
                let (forward, commit) = (*forward, *commit);
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
    fn track_block(&mut self, body: &Bytes) {
        match backend::command_tag(body) {
            b"BEGIN" | b"START TRANSACTION" => self.in_block = true,
            b"COMMIT" | b"ROLLBACK" if self.pending.is_none() => self.in_block = false,
            _ => {}
        }
    }

    fn ready(&mut self, body: &Bytes) {
        let status = body.first().copied().unwrap_or(b'I');
        self.status = status;
        self.in_block = status != b'I';
        if status == b'I' && !self.implicit && self.pending.is_none() {
            // Whatever the transaction wrote without the commit sequence (a COMMIT inside a
            // string or a procedure) was recorded on OLD by the capture trigger's net.
            self.end_transaction();
        }
    }

    async fn server_error(&mut self, frame: Bytes) -> Result<(), SessionError> {
        self.host.statement_error();
        self.batch_failed = true;
        self.to_client.extend_from_slice(&frame);
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

    /// Relays COPY FROM STDIN data from the client until CopyDone or CopyFail.
    async fn copy_in(&mut self) -> Result<(), SessionError> {
        // The client must see CopyInResponse now, even inside a transaction of the proxy's.
        self.flush_client_now().await?;
        loop {
            while let Some((tag, frame)) = take_frame(&mut self.client_buf, self.params.limits)
                .map_err(SessionError::ClientProtocol)?
                .map(|f| (f.tag, f.bytes))
            {
                match tag {
                    b'd' | b'c' | b'f' | b'H' | b'S' => {
                        self.to_up.extend_from_slice(&frame);
                        if tag == b'c' || tag == b'f' {
                            self.flush_upstream().await?;
                            return Ok(());
                        }
                    }
                    _ => {
                        return Err(SessionError::ClientProtocol(
                            switchyard_pgwire::ProtocolError::Malformed {
                                what: "COPY",
                                detail: "unexpected message during COPY FROM STDIN",
                            },
                        ))
                    }
                }
            }
            self.flush_upstream().await?;
            reserve(&mut self.client_buf, 64 * 1024);
            if self
                .client_rd
                .read_buf(&mut self.client_buf)
                .await
                .map_err(SessionError::ClientIo)?
                == 0
            {
                return Err(SessionError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// A statement that makes the server raise the refusal (SQLSTATE 0A000).
fn refusal_sql(message: &str) -> String {
    let msg = message.replace('\'', "''");
    let hint = "Run it directly on both databases, or set on_uncaptured = \"mark_for_verify\" for the table and verify it before cutover."
        .replace('\'', "''");
    format!(
        "DO $switchyard$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{msg}', HINT = '{hint}'; END $switchyard$",
        sqlstate::FEATURE_NOT_SUPPORTED.as_str()
    )
}

fn reserve(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(8192));
    }
}

fn cstr_bytes(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn two_cstrs(b: &[u8]) -> (&[u8], &[u8]) {
    let first = cstr_bytes(b);
    let rest = b.get(first.len() + 1..).unwrap_or_default();
    (first, cstr_bytes(rest))
}

fn set_name(map: &mut HashMap<Vec<u8>, Arc<Stmt>>, name: &[u8], stmt: Arc<Stmt>) {
    match map.get_mut(name) {
        Some(slot) => *slot = stmt,
        None => {
            map.insert(name.to_vec(), stmt);
        }
    }
}
