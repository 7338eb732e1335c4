//! Connections that run shadow reads, one small pool per store, speaking the wire protocol: the
//! client's own Query message, or its Parse and Bind under the unnamed statement and portal,
//! go out as they came, so NEW answers in the formats OLD answered the client in. Every
//! connection is read only and bounded by the server itself (`default_transaction_read_only`,
//! `statement_timeout`), whatever the replayed settings say: a statement misjudged as a read
//! fails there rather than changing anything.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_config::StoreUrl;
use switchyard_pgwire::backend;
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend::{self as fe, Target};
use switchyard_pgwire::startup::CancelKey;
use switchyard_store::wire::{
    send_cancel_request, ClientLogin, LoginOutcome, StoreStream, Upstream, WireTarget,
};
use switchyard_store::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ShadowRequest;

/// Rows kept of one result; a result with more is not compared (counted `skipped`).
pub(crate) const MAX_ROWS: usize = 10_000;
/// Bytes of DataRow messages kept of one result, likewise.
pub(crate) const MAX_BYTES: usize = 8 << 20;

/// One store's answer to a shadow read: its DataRow frames, or why there are none.
pub(crate) type Answer = Result<Vec<Bytes>, String>;

struct ShadowConn {
    /// The role logged in as (`None`: the URL's).
    user: Option<String>,
    stream: StoreStream,
    buf: BytesMut,
    /// The settings prelude this connection runs under.
    prelude: Option<Arc<str>>,
    cancel_key: Option<CancelKey>,
}

/// The shadow connections to one store. Each is logged in as the client whose read it runs
/// (or as the URL's user under `upstream_login = "service"`), so grants and row-level security
/// shape NEW's answer as they shaped OLD's; idle ones are kept for any session of the same role,
/// at most [`super::MAX_IN_FLIGHT`] in all (the oldest closed first).
pub(crate) struct ShadowPool {
    target: WireTarget,
    idle: Mutex<VecDeque<ShadowConn>>,
    /// Longest a shadow read may take on this store, login included.
    timeout: Duration,
}

impl ShadowPool {
    pub(crate) fn new(url: &StoreUrl, store: Role, timeout: Duration) -> ShadowPool {
        ShadowPool {
            target: WireTarget {
                url: url.clone(),
                store,
            },
            idle: Mutex::new(VecDeque::new()),
            timeout,
        }
    }

    /// Runs `request` under the session settings `prelude`; gives up after the pool's timeout
    /// (and cancels the statement on the server).
    pub(crate) async fn run(
        &self,
        prelude: &Arc<str>,
        login: Option<&ClientLogin>,
        request: &ShadowRequest,
    ) -> Answer {
        let user = login.map(|l| l.user.as_str());
        let idle = self.idle.lock().ok().and_then(|mut v| {
            let at = v.iter().rposition(|c| c.user.as_deref() == user)?;
            v.remove(at)
        });
        let mut conn = match idle {
            Some(c) => c,
            None => match tokio::time::timeout(self.timeout, self.connect(login)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(format!("no connection within {:?}", self.timeout)),
            },
        };
        match tokio::time::timeout(self.timeout, conn.run(prelude, request)).await {
            Ok(Ok((rows, ready))) => {
                if ready == b'I' {
                    if let Ok(mut idle) = self.idle.lock() {
                        if idle.len() >= super::MAX_IN_FLIGHT {
                            idle.pop_front();
                        }
                        idle.push_back(conn);
                    }
                }
                rows
            }
            Ok(Err(e)) => Err(format!("connection failed: {e}")),
            Err(_) => {
                if let Some(key) = conn.cancel_key.take() {
                    let addr = (self.target.url.host.clone(), self.target.url.port);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), send_cancel_request(addr, &key))
                            .await;
                    });
                }
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }

    async fn connect(&self, login: Option<&ClientLogin>) -> Result<ShadowConn, String> {
        let u = read_only_login(
            &self.target,
            login,
            "switchyard-shadow",
            self.timeout,
            self.timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(ShadowConn {
            user: login.map(|l| l.user.clone()),
            stream: u.stream,
            buf: u.buf,
            prelude: None,
            cancel_key: u.cancel_key,
        })
    }
}

/// Why a read-only login failed.
#[derive(Debug)]
pub(crate) enum ReadLoginError {
    /// The server refused the role (no such role there, another password, no grant to
    /// connect): the same role will be refused again.
    Refused(String),
    /// The store could not be reached or failed during the login.
    Failed(String),
}

impl std::fmt::Display for ReadLoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadLoginError::Refused(m) => write!(f, "login refused: {m}"),
            ReadLoginError::Failed(m) => f.write_str(m),
        }
    }
}

/// Logs in to `target` for reads only, as the client `login` names (`None`: as the URL's
/// user): the server refuses writes and stops a statement a second after `bound` (the longest
/// the proxy waits for one), whatever the session's settings replayed later say (see
/// [`prelude_sql`]).
pub(crate) async fn read_only_login(
    target: &WireTarget,
    login: Option<&ClientLogin>,
    application_name: &str,
    bound: Duration,
    connect_timeout: Duration,
) -> Result<Upstream, ReadLoginError> {
    let bound_ms = bound.as_millis() + 1000;
    let params = [
        ("application_name".to_owned(), application_name.to_owned()),
        (
            "options".to_owned(),
            format!(
                "-c default_transaction_read_only=on -c statement_timeout={bound_ms} \
                 -c idle_in_transaction_session_timeout=60000"
            ),
        ),
    ];
    let as_whom = login.map_or_else(|| target.url_login(), |l| l.to(target));
    match target
        .connect_as(
            as_whom,
            196_608,
            &params,
            connect_timeout,
            Some(Duration::from_secs(30)),
        )
        .await
    {
        Ok(LoginOutcome::Ready(u)) => Ok(u),
        Ok(LoginOutcome::Refused(r)) => Err(ReadLoginError::Refused(r.message)),
        Err(e @ switchyard_store::wire::LoginError::NoCredential(_)) => {
            Err(ReadLoginError::Refused(e.to_string()))
        }
        Err(e) => Err(ReadLoginError::Failed(e.to_string())),
    }
}

/// The statement that applies a session's settings `prelude` on a read-only connection: the
/// safety settings last, as the client's own SETs may have changed them.
pub(crate) fn prelude_sql(prelude: &str) -> String {
    let mut sql = String::with_capacity(prelude.len() + 80);
    sql.push_str(prelude);
    sql.push_str("; SET default_transaction_read_only = on; SET statement_timeout = DEFAULT");
    sql
}

/// What one ReadyForQuery-terminated exchange gave: the DataRows and the first error.
#[derive(Default)]
struct Exchange {
    rows: Vec<Bytes>,
    bytes: usize,
    error: Option<String>,
}

impl ShadowConn {
    /// Sends the prelude (if this connection runs other settings) and the request in one
    /// write; returns the request's answer and the last ReadyForQuery status.
    async fn run(&mut self, prelude: &Arc<str>, request: &ShadowRequest) -> std::io::Result<(Answer, u8)> {
        let mut out = BytesMut::with_capacity(1024);
        let set_up = self.prelude.as_ref() != Some(prelude);
        if set_up {
            fe::query(&mut out, &prelude_sql(prelude));
        }
        match request {
            ShadowRequest::Simple { query } => out.extend_from_slice(query),
            ShadowRequest::Extended { parse, bind } => {
                let renamed = fe::renamed(&mut out, b'P', &[b""], &parse[5..])
                    .and_then(|()| fe::renamed(&mut out, b'B', &[b"", b""], &bind[5..]));
                if let Err(e) = renamed {
                    return Ok((Err(format!("cannot rebuild the statement: {e}")), b'I'));
                }
                fe::execute(&mut out, b"", 0);
                fe::close(&mut out, Target::Statement, b"");
                fe::sync(&mut out);
            }
        }
        self.prelude = None;
        self.stream.write_all(&out).await?;
        // A TLS stream keeps ciphertext until flushed.
        self.stream.flush().await?;
        if set_up {
            let (settings, _) = self.exchange().await?;
            if let Some(e) = settings.error {
                let (_, ready) = self.exchange().await?;
                return Ok((Err(format!("cannot apply the session's settings: {e}")), ready));
            }
        }
        let (answer, ready) = self.exchange().await?;
        self.prelude = Some(Arc::clone(prelude));
        Ok((
            match answer.error {
                Some(e) => Err(e),
                None if answer.rows.len() > MAX_ROWS || answer.bytes > MAX_BYTES => {
                    Err("result too large to compare".to_owned())
                }
                None => Ok(answer.rows),
            },
            ready,
        ))
    }

    /// Reads up to ReadyForQuery.
    async fn exchange(&mut self) -> std::io::Result<(Exchange, u8)> {
        let mut ex = Exchange::default();
        loop {
            while let Some(frame) = take_frame(&mut self.buf, MessageLimits::SERVER)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
            {
                match frame.tag {
                    // One more than the limits, so an answer over them is known as such.
                    b'D' if ex.rows.len() <= MAX_ROWS && ex.bytes <= MAX_BYTES => {
                        ex.bytes += frame.bytes.len();
                        ex.rows.push(frame.bytes);
                    }
                    b'E' if ex.error.is_none() => {
                        let fields = backend::error_fields(&frame.bytes[5..]);
                        let code = String::from_utf8_lossy(fields.get(b'C').unwrap_or_default()).into_owned();
                        ex.error = Some(format!("{} (SQLSTATE {code})", fields.message()));
                    }
                    b'Z' => return Ok((ex, frame.bytes.get(5).copied().unwrap_or(b'I'))),
                    _ => {}
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8192);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
