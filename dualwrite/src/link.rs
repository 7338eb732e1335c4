//! Connections to NEW for mirrored transactions, speaking the wire protocol directly.
//!
//! The mirror's hot path needs two things sqlx does not offer: pipelining (`BEGIN`, every
//! image statement and the applied marker leave in one write and are answered in one round
//! trip) and statements prepared once per connection and reused (planning the apply statements
//! for every transaction cost NEW a third of its throughput in our measurements). So the
//! mirror logs in with the same code as the session's upstream login and keeps a small pool
//! of such connections; repairs and bookkeeping, which are off the hot path, use sqlx.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_config::StoreUrl;
use switchyard_pgwire::backend;
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend as fe;
use switchyard_pgwire::startup::CancelKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use switchyard_store::wire::{send_cancel_request, LoginError, LoginOutcome, StoreStream, WireTarget};
use switchyard_store::Role;

/// Why NEW did not do what the mirror asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot connect to the follower: {0}")]
    Connect(String),
    #[error("the follower's connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the follower refused the statement: {message} (SQLSTATE {code})")]
    Statement { code: String, message: String },
    #[error("the follower sent an unexpected message ({0})")]
    Protocol(&'static str),
}

/// One statement of an apply batch: a name it is prepared under, its SQL, its text parameters.
pub(crate) struct BatchStatement<'a> {
    pub(crate) name: &'a str,
    pub(crate) sql: &'a str,
    pub(crate) params: Vec<&'a str>,
}

/// A logged-in connection to NEW.
pub(crate) struct FollowerConn {
    /// Plain or TLS, as NEW's URL says (`sslmode`).
    stream: StoreStream,
    buf: BytesMut,
    prepared: HashSet<String>,
    /// Statements parsed by batches whose answers are not read yet.
    unconfirmed: Vec<String>,
    /// The backend's pid and secret (BackendKeyData), to cancel a statement we give up on.
    cancel_key: Option<CancelKey>,
}

impl FollowerConn {
    /// The key that cancels this connection's current statement on NEW.
    pub(crate) fn cancel_key(&self) -> Option<CancelKey> {
        self.cancel_key.clone()
    }

    /// Sends `BEGIN`, the statements and a Sync in one write, and reads the answers. On success
    /// the transaction is open on NEW. `BEGIN` is an extended-protocol statement like the others
    /// (not a simple Query, whose ReadyForQuery NEW would send in a packet of its own): NEW
    /// answers the whole batch in one packet.
    pub(crate) async fn begin_batch(&mut self, stmts: &[BatchStatement<'_>]) -> Result<(), LinkError> {
        self.send_batch(stmts, true).await?;
        self.batch_answer().await
    }

    /// Sends the statements (after `BEGIN` when `begin`) and a Sync in one write, without
    /// waiting: [`Self::batch_answer`] reads the answers, so the next batch can be built while
    /// NEW runs this one. After an error the connection must be dropped, not reused (the
    /// statements prepared by batches still unanswered are not known to exist).
    pub(crate) async fn send_batch(
        &mut self,
        stmts: &[BatchStatement<'_>],
        begin: bool,
    ) -> Result<(), LinkError> {
        const BEGIN: BatchStatement<'static> = BatchStatement {
            name: "switchyard_begin",
            sql: "BEGIN",
            params: Vec::new(),
        };
        let size: usize = stmts
            .iter()
            .map(|s| 64 + s.params.iter().map(|p| p.len() + 4).sum::<usize>())
            .sum();
        let mut out = BytesMut::with_capacity(1024 + size);
        let first = if begin { Some(&BEGIN) } else { None };
        for s in first.into_iter().chain(stmts) {
            if !self.prepared.contains(s.name) && !self.unconfirmed.iter().any(|n| n == s.name) {
                fe::parse_statement(&mut out, s.name.as_bytes(), s.sql.as_bytes(), &[]);
                self.unconfirmed.push(s.name.to_owned());
            }
            let params: Vec<Option<&[u8]>> = s.params.iter().map(|p| Some(p.as_bytes())).collect();
            fe::bind(&mut out, b"", s.name.as_bytes(), &[], &params, &[]);
            fe::execute(&mut out, b"", 0);
        }
        fe::sync(&mut out);
        self.write(&out).await
    }

    /// Reads the answers of the oldest batch sent with [`Self::send_batch`]: `Ok` when it ran
    /// and the transaction is still open.
    pub(crate) async fn batch_answer(&mut self) -> Result<(), LinkError> {
        let result = self.until_ready().await;
        if result.is_ok() {
            for n in self.unconfirmed.drain(..) {
                self.prepared.insert(n);
            }
        }
        match result? {
            b'T' => Ok(()),
            _ => Err(LinkError::Protocol("batch did not leave a transaction open")),
        }
    }

    /// Runs a simple statement (`COMMIT`, `ROLLBACK`).
    pub(crate) async fn simple(&mut self, sql: &str) -> Result<u8, LinkError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        fe::query(&mut out, sql);
        self.write(&out).await?;
        self.until_ready().await
    }

    /// Writes `out` whole; a TLS stream keeps ciphertext buffered until flushed (TCP flushes
    /// nothing).
    async fn write(&mut self, out: &[u8]) -> Result<(), LinkError> {
        self.stream.write_all(out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads answers up to ReadyForQuery; returns its status, or the first error.
    async fn until_ready(&mut self) -> Result<u8, LinkError> {
        let mut error: Option<LinkError> = None;
        loop {
            while let Some((tag, body)) = self.take_frame()? {
                match tag {
                    b'E' if error.is_none() => error = Some(statement_error(&body)),
                    b'Z' => {
                        let status = body.first().copied().unwrap_or(b'I');
                        return match error {
                            Some(e) => Err(e),
                            None => Ok(status),
                        };
                    }
                    _ => {}
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8192);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    fn take_frame(&mut self) -> Result<Option<(u8, Bytes)>, LinkError> {
        let frame =
            take_frame(&mut self.buf, MessageLimits::SERVER).map_err(|_| LinkError::Protocol("bad frame"))?;
        Ok(frame.map(|f| (f.tag, f.body())))
    }
}

/// The SQLSTATE and message of an ErrorResponse body.
fn statement_error(body: &[u8]) -> LinkError {
    let fields = backend::error_fields(body);
    LinkError::Statement {
        code: String::from_utf8_lossy(fields.get(b'C').unwrap_or_default()).into_owned(),
        message: fields.message(),
    }
}

/// A pooled NEW connection; goes back to the pool with [`FollowerLink::release`].
pub(crate) struct LinkConn {
    pub(crate) conn: FollowerConn,
    /// It came from the pool (it may have died while idle).
    pub(crate) reused: bool,
    _permit: OwnedSemaphorePermit,
}

/// The pool of NEW connections shared by a proxy's sessions.
pub(crate) struct FollowerLink {
    target: WireTarget,
    idle: Mutex<Vec<FollowerConn>>,
    slots: Arc<Semaphore>,
    timeout: Duration,
    /// Server-side bound on every statement and lock wait (`statement_timeout`, `lock_timeout`).
    statement_bound: Duration,
}

impl FollowerLink {
    /// A pool of `size` connections to NEW at `url`; logins give up after `timeout`, and NEW
    /// itself ends any statement or lock wait after `statement_bound`.
    pub(crate) fn new(
        url: &StoreUrl,
        store: Role,
        size: u32,
        timeout: Duration,
        statement_bound: Duration,
    ) -> FollowerLink {
        FollowerLink {
            target: WireTarget {
                url: url.clone(),
                store,
            },
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(size as usize)),
            timeout,
            statement_bound,
        }
    }

    /// Asks NEW (in the background) to cancel the current statement of the connection `key`
    /// names. Called before an abandoned connection is dropped: a backend waiting on a lock does
    /// not notice that its client went away, and would otherwise go on waiting (and, once it has
    /// the lock, deadlock with a repair of the same keys).
    pub(crate) fn cancel(&self, key: Option<CancelKey>) {
        let Some(key) = key else { return };
        let addr = (self.target.url.host.clone(), self.target.url.port);
        let limit = self.timeout;
        let store = self.target.store.name();
        tokio::spawn(async move {
            match tokio::time::timeout(limit, send_cancel_request(addr, &key)).await {
                Ok(Ok(())) => tracing::debug!(store, pid = key.pid, "cancelled an abandoned statement"),
                Ok(Err(e)) => {
                    tracing::warn!(store, pid = key.pid, error = %e, "cannot cancel an abandoned statement")
                }
                Err(_) => tracing::warn!(
                    store,
                    pid = key.pid,
                    "cannot cancel an abandoned statement: no connection"
                ),
            }
        });
    }

    /// A connection: an idle one, or a new login. Waits for a free slot.
    pub(crate) async fn acquire(&self) -> Result<LinkConn, LinkError> {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| LinkError::Connect("pool closed".into()))?;
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        let (conn, reused) = match idle {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        Ok(LinkConn {
            conn,
            reused,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<FollowerConn, LinkError> {
        let params = [
            ("application_name".to_owned(), "switchyard-mirror".to_owned()),
            // The fencing of mirrored writes against each other, against repairs and against the
            // backfill relies on READ COMMITTED on NEW (a statement's snapshot is taken after
            // the locks the statements before it waited for), whatever NEW's default.
            // <https://www.postgresql.org/docs/current/transaction-iso.html#XACT-READ-COMMITTED>
            (
                "default_transaction_isolation".to_owned(),
                "read committed".to_owned(),
            ),
            // A mirrored transaction whose proxy vanished must not hold NEW's locks for long.
            // NEW commits without waiting for its WAL flush: the client's acknowledgement rests
            // on OLD's commit and the intent there, and an intent is only deleted once NEW's
            // WAL is flushed past the transaction (`store::mirror::durable_on_follower`), so a NEW
            // crash loses nothing that is not re-copied. The flush wait would otherwise run
            // while the transaction's rows stay locked on NEW.
            // <https://www.postgresql.org/docs/current/wal-async-commit.html>
            // Every statement and lock wait is bounded by NEW itself too, a little above the
            // mirror's own timeout, in case the CancelRequest sent for an abandoned statement is
            // lost.
            // <https://www.postgresql.org/docs/current/runtime-config-client.html#GUC-STATEMENT-TIMEOUT>
            // And no row-level security policy may filter what the mirror writes: with a login
            // a policy applies to, NEW raises an error instead (`store::connect_options`). The
            // mirror is Switchyard's own writer, which a fenced table lets through
            // (`store::capture::fence_sql`).
            (
                "options".to_owned(),
                format!(
                    "-c idle_in_transaction_session_timeout=60000 -c synchronous_commit=off \
                     -c statement_timeout={bound} -c lock_timeout={bound} -c row_security=off \
                     -c {writer}=switchyard",
                    bound = self.statement_bound.as_millis(),
                    writer = switchyard_store::capture::WRITER_SETTING
                ),
            ),
        ];
        match self
            .target
            .connect(196_608, &params, self.timeout, Some(Duration::from_secs(30)))
            .await
        {
            Ok(LoginOutcome::Ready(u)) => Ok(FollowerConn {
                stream: u.stream,
                buf: u.buf,
                prepared: HashSet::new(),
                unconfirmed: Vec::new(),
                cancel_key: u.cancel_key,
            }),
            Ok(LoginOutcome::Refused(r)) => Err(LinkError::Connect(r.message)),
            Err(LoginError::Timeout(_)) => {
                Err(LinkError::Connect(format!("no answer within {:?}", self.timeout)))
            }
            Err(e) => Err(LinkError::Connect(e.to_string())),
        }
    }

    /// Opens up to `n` connections at once and keeps them idle (a new engine about to take
    /// over: its first mirrored transactions then find them ready). Failures are left to the
    /// first use to report.
    pub(crate) async fn warm(&self, n: usize) {
        let mut logins = tokio::task::JoinSet::new();
        for _ in 0..n.min(self.slots.available_permits()) {
            let target = self.target.clone();
            let (timeout, bound) = (self.timeout, self.statement_bound);
            logins.spawn(async move {
                FollowerLink {
                    target,
                    idle: Mutex::new(Vec::new()),
                    slots: Arc::new(Semaphore::new(1)),
                    timeout,
                    statement_bound: bound,
                }
                .connect()
                .await
            });
        }
        while let Some(done) = logins.join_next().await {
            if let (Ok(Ok(conn)), Ok(mut idle)) = (done, self.idle.lock()) {
                idle.push(conn);
            }
        }
    }

    /// Closes every idle connection (after one of them turned out dead).
    pub(crate) fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// Returns a connection that is idle (its last answer said so) to the pool.
    pub(crate) fn release(&self, c: LinkConn) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(c.conn);
        }
    }
}
