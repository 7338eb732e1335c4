//! A raw PostgreSQL wire client for byte-level tests: it sends exactly the bytes it is given and
//! returns every message the server sent, so a test can compare a transcript run directly with
//! the same transcript run through the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use switchyard_pgwire::frame::{take_frame, MessageLimits};
use switchyard_pgwire::frontend::{self as fe, Target};
use switchyard_pgwire::startup::{StartupMessage, PROTOCOL_3_0};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for any single message, unless it says otherwise
/// ([`RawConn::set_read_timeout`]).
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// One server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Tag byte.
    pub tag: u8,
    /// Body.
    pub body: Bytes,
}

impl Msg {
    /// `'E'` or `'N'` field value.
    pub fn field(&self, kind: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&k, tail)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if k == kind {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// SQLSTATE of an ErrorResponse or NoticeResponse.
    pub fn code(&self) -> Option<String> {
        self.field(b'C')
    }
}

/// A raw connection.
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    read_timeout: Duration,
}

impl RawConn {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<RawConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            read_timeout: READ_TIMEOUT,
        })
    }

    /// How long to wait for any single message from now on (default 20 s).
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.read_timeout = timeout;
    }

    /// Opens a connection and logs in with trust auth; returns the startup replies.
    pub async fn login(addr: SocketAddr, user: &str, database: &str) -> anyhow::Result<(RawConn, Vec<Msg>)> {
        let mut conn = Self::open(addr).await?;
        let mut out = BytesMut::new();
        StartupMessage {
            protocol: PROTOCOL_3_0,
            params: vec![
                ("user".into(), user.into()),
                ("database".into(), database.into()),
                ("application_name".into(), "switchyard-tests".into()),
            ],
        }
        .encode(&mut out);
        conn.send(&out).await?;
        let greeting = conn.read_until_ready(1).await?;
        if let Some(err) = greeting.iter().find(|m| m.tag == b'E') {
            bail!("login refused: {:?}", err.field(b'M'));
        }
        Ok((conn, greeting))
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads every message until the server closes the connection (or resets it), waiting at
    /// most `wait` in all.
    pub async fn read_until_closed(&mut self, wait: Duration) -> anyhow::Result<Vec<Msg>> {
        let read = async {
            let mut msgs = Vec::new();
            loop {
                match self.read_msg().await {
                    Ok(Some(msg)) => msgs.push(msg),
                    Ok(None) => return Ok(msgs),
                    Err(e) if is_reset(&e) => return Ok(msgs),
                    Err(e) => return Err(e.context(format!("after {msgs:?}"))),
                }
            }
        };
        tokio::time::timeout(wait, read)
            .await
            .context("the connection was not closed")?
    }

    /// Reads one message; `None` when the server closed the connection.
    pub async fn read_msg(&mut self) -> anyhow::Result<Option<Msg>> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf, MessageLimits::SERVER)? {
                return Ok(Some(Msg {
                    tag: frame.tag,
                    body: frame.body(),
                }));
            }
            let n = tokio::time::timeout(self.read_timeout, self.stream.read_buf(&mut self.buf))
                .await
                .context("timed out waiting for the server")??;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                // A lone status byte (the answer to SSLRequest) is not a frame.
                if self.buf.len() < 5 {
                    let b = self.buf.split_to(self.buf.len()).freeze();
                    return Ok(Some(Msg {
                        tag: b[0],
                        body: b.slice(1..),
                    }));
                }
                bail!(
                    "connection closed inside a message ({} bytes buffered)",
                    self.buf.len()
                );
            }
        }
    }

    /// Reads a single byte (the answer to SSLRequest or GSSENCRequest).
    pub async fn read_byte(&mut self) -> anyhow::Result<Option<u8>> {
        if self.buf.is_empty() {
            let n = tokio::time::timeout(self.read_timeout, self.stream.read_buf(&mut self.buf)).await??;
            if n == 0 {
                return Ok(None);
            }
        }
        let b = self.buf.split_to(1);
        Ok(Some(b[0]))
    }

    /// Reads messages until `n` ReadyForQuery messages have arrived (or the server closes).
    pub async fn read_until_ready(&mut self, n: usize) -> anyhow::Result<Vec<Msg>> {
        let mut msgs = Vec::new();
        let mut seen = 0;
        while seen < n {
            let Some(msg) = self.read_msg().await? else {
                break;
            };
            if msg.tag == b'Z' {
                seen += 1;
            }
            let fatal = msg.tag == b'E' && msg.field(b'V').as_deref() == Some("FATAL");
            msgs.push(msg);
            if fatal {
                break;
            }
        }
        Ok(msgs)
    }

    /// Reads everything until the server closes the connection.
    pub async fn read_to_close(&mut self) -> anyhow::Result<Vec<Msg>> {
        let mut msgs = Vec::new();
        while let Some(msg) = self.read_msg().await? {
            msgs.push(msg);
        }
        Ok(msgs)
    }
}

/// Builds frontend messages for transcripts.
#[derive(Default)]
pub struct Frontend {
    out: BytesMut,
    requests: usize,
}

impl Frontend {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// FunctionCall (fast path) of function `oid` with text arguments (None = NULL) and the
    /// result in `result_format` (0 text, 1 binary).
    pub fn function_call(&mut self, oid: u32, args: &[Option<&[u8]>], result_format: i16) -> &mut Self {
        self.requests += 1;
        fe::function_call(&mut self.out, oid, &[0], args, result_format);
        self
    }

    /// Query.
    pub fn query(&mut self, sql: &str) -> &mut Self {
        self.requests += 1;
        fe::query(&mut self.out, sql);
        self
    }

    /// Parse with optional parameter type OIDs.
    pub fn parse(&mut self, name: &str, sql: &str, types: &[u32]) -> &mut Self {
        fe::parse_statement(&mut self.out, name.as_bytes(), sql.as_bytes(), types);
        self
    }

    /// Bind with text parameters (None = NULL) and result formats (0 text, 1 binary).
    pub fn bind(
        &mut self,
        portal: &str,
        stmt: &str,
        params: &[Option<&[u8]>],
        param_formats: &[i16],
        result_formats: &[i16],
    ) -> &mut Self {
        fe::bind(
            &mut self.out,
            portal.as_bytes(),
            stmt.as_bytes(),
            param_formats,
            params,
            result_formats,
        );
        self
    }

    /// Describe `'S'` or `'P'`.
    pub fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        fe::describe(&mut self.out, target(kind), name.as_bytes());
        self
    }

    /// Execute.
    pub fn execute(&mut self, portal: &str, max_rows: i32) -> &mut Self {
        fe::execute(&mut self.out, portal.as_bytes(), max_rows);
        self
    }

    /// Close `'S'` or `'P'`.
    pub fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        fe::close(&mut self.out, target(kind), name.as_bytes());
        self
    }

    /// Sync.
    pub fn sync(&mut self) -> &mut Self {
        self.requests += 1;
        fe::sync(&mut self.out);
        self
    }

    /// Flush.
    pub fn flush(&mut self) -> &mut Self {
        fe::flush(&mut self.out);
        self
    }

    /// CopyData.
    pub fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        fe::copy_data(&mut self.out, data);
        self
    }

    /// CopyDone.
    pub fn copy_done(&mut self) -> &mut Self {
        fe::copy_done(&mut self.out);
        self
    }

    /// CopyFail.
    pub fn copy_fail(&mut self, why: &str) -> &mut Self {
        fe::copy_fail(&mut self.out, why.as_bytes());
        self
    }

    /// Raw bytes, for malformed input.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.put_slice(bytes);
        self
    }

    /// How many ReadyForQuery messages the batch should produce.
    pub fn requests(&self) -> usize {
        self.requests
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.out
    }
}

/// The Describe or Close target named by `'S'` (a statement) or anything else (a portal).
fn target(kind: u8) -> Target {
    if kind == b'S' {
        Target::Statement
    } else {
        Target::Portal
    }
}

/// Whether `e` is the peer resetting the connection (or the write side of a reset one).
pub fn is_reset(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    })
}
