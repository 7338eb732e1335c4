//! Messages a client sends after startup, and builders for the ones the proxy sends upstream.
//!
//! Parsing borrows from the frame body: nothing is copied unless the caller keeps it.

use bytes::{BufMut, BytesMut};

use crate::read::BodyReader;
use crate::startup::put_cstr;
use crate::ProtocolError;

/// Which kind of object a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement (`'S'`).
    Statement,
    /// A portal (`'P'`).
    Portal,
}

/// A message from the client, borrowed from its frame body.
///
/// Text fields are bytes: they are in the client's encoding, which need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// Simple query: one or more statements separated by semicolons.
    Query {
        /// The query text.
        sql: &'a [u8],
    },
    /// Parse: create a prepared statement (unnamed when `statement` is empty).
    Parse {
        /// Statement name.
        statement: &'a [u8],
        /// Query text.
        sql: &'a [u8],
    },
    /// Bind: create a portal from a prepared statement and parameter values.
    Bind {
        /// Portal name.
        portal: &'a [u8],
        /// Statement name.
        statement: &'a [u8],
    },
    /// Describe a statement or portal.
    Describe {
        /// Statement or portal.
        target: Target,
        /// Its name.
        name: &'a [u8],
    },
    /// Execute a portal.
    Execute {
        /// Portal name.
        portal: &'a [u8],
        /// Row limit, 0 for all.
        max_rows: i32,
    },
    /// Close a statement or portal.
    Close {
        /// Statement or portal.
        target: Target,
        /// Its name.
        name: &'a [u8],
    },
    /// End of an extended-protocol batch.
    Sync,
    /// Ask the server to flush its output.
    Flush,
    /// The client is leaving.
    Terminate,
    /// COPY FROM STDIN data.
    CopyData(&'a [u8]),
    /// End of COPY FROM STDIN data.
    CopyDone,
    /// The client aborts COPY FROM STDIN.
    CopyFail {
        /// Why.
        message: &'a [u8],
    },
    /// Fast-path function call (legacy).
    FunctionCall(&'a [u8]),
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse: which one depends on
    /// the authentication exchange in progress.
    Password(&'a [u8]),
}

/// Whether `tag` names a frontend message after startup.
pub fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'X' | b'd' | b'c' | b'f' | b'F' | b'p'
    )
}

/// Parses the body of a frontend message with the given tag.
#[inline]
pub fn parse(tag: u8, body: &[u8]) -> Result<ClientMessage<'_>, ProtocolError> {
    let msg = match tag {
        b'Q' => {
            let mut r = BodyReader::new(body, "Query");
            let sql = r.cstr()?;
            r.finish()?;
            ClientMessage::Query { sql }
        }
        b'P' => {
            let mut r = BodyReader::new(body, "Parse");
            let statement = r.cstr()?;
            let sql = r.cstr()?;
            let n = r.i16()?;
            if n < 0 {
                return Err(ProtocolError::malformed("Parse", "negative parameter count"));
            }
            r.bytes(n as usize * 4)?;
            r.finish()?;
            ClientMessage::Parse { statement, sql }
        }
        b'B' => {
            let mut r = BodyReader::new(body, "Bind");
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            ClientMessage::Bind { portal, statement }
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let mut r = BodyReader::new(body, what);
            let target = match r.u8()? {
                b'S' => Target::Statement,
                b'P' => Target::Portal,
                _ => return Err(ProtocolError::malformed(what, "target must be 'S' or 'P'")),
            };
            let name = r.cstr()?;
            r.finish()?;
            if tag == b'D' {
                ClientMessage::Describe { target, name }
            } else {
                ClientMessage::Close { target, name }
            }
        }
        b'E' => {
            let mut r = BodyReader::new(body, "Execute");
            let portal = r.cstr()?;
            let max_rows = r.i32()?;
            r.finish()?;
            ClientMessage::Execute { portal, max_rows }
        }
        b'S' | b'H' | b'X' | b'c' => {
            if !body.is_empty() {
                return Err(ProtocolError::malformed(
                    "Sync/Flush/Terminate/CopyDone",
                    "unexpected body",
                ));
            }
            match tag {
                b'S' => ClientMessage::Sync,
                b'H' => ClientMessage::Flush,
                b'X' => ClientMessage::Terminate,
                _ => ClientMessage::CopyDone,
            }
        }
        b'd' => ClientMessage::CopyData(body),
        b'f' => {
            let mut r = BodyReader::new(body, "CopyFail");
            let message = r.cstr()?;
            ClientMessage::CopyFail { message }
        }
        b'F' => ClientMessage::FunctionCall(body),
        b'p' => ClientMessage::Password(body),
        other => return Err(ProtocolError::UnknownTag(other)),
    };
    Ok(msg)
}

/// Parses a SASLInitialResponse body: mechanism name and the initial client response.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mut r = BodyReader::new(body, "SASLInitialResponse");
    let mechanism = r.str()?;
    let len = r.i32()?;
    let data = if len < 0 { &[][..] } else { r.bytes(len as usize)? };
    r.finish()?;
    Ok((mechanism, data))
}

/// Parses a PasswordMessage body (a NUL-terminated password or md5 digest).
pub fn parse_password(body: &[u8]) -> Result<&[u8], ProtocolError> {
    let mut r = BodyReader::new(body, "PasswordMessage");
    let password = r.cstr()?;
    r.finish()?;
    Ok(password)
}

fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let start = out.len();
    out.put_i32(0);
    start
}

/// Writes a simple Query message.
pub fn query(out: &mut BytesMut, sql: &str) {
    let start = begin(out, b'Q');
    put_cstr(out, sql.as_bytes());
    crate::startup::patch_len(out, start);
}

/// Writes a PasswordMessage (cleartext password or md5 digest).
pub fn password(out: &mut BytesMut, password: &[u8]) {
    let start = begin(out, b'p');
    put_cstr(out, password);
    crate::startup::patch_len(out, start);
}

/// Writes a SASLInitialResponse.
pub fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    let start = begin(out, b'p');
    put_cstr(out, mechanism.as_bytes());
    out.put_i32(data.len() as i32);
    out.put_slice(data);
    crate::startup::patch_len(out, start);
}

/// Writes a SASLResponse.
pub fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    let start = begin(out, b'p');
    out.put_slice(data);
    crate::startup::patch_len(out, start);
}

/// Writes a Terminate message.
pub fn terminate(out: &mut BytesMut) {
    out.put_slice(&[b'X', 0, 0, 0, 4]);
}

/// A count as the protocol's `int16`. Callers keep counts within it (PostgreSQL itself accepts
/// at most 65,535 parameters); a larger one saturates, and the server refuses the message.
fn count16(n: usize) -> i16 {
    i16::try_from(n).unwrap_or(i16::MAX)
}

/// Writes a Parse message: prepared statement `name` (empty = unnamed) for `sql`, with the
/// given parameter type OIDs (fewer than the parameters, or none, lets the server infer them).
pub fn parse_statement(out: &mut BytesMut, name: &[u8], sql: &[u8], param_types: &[u32]) {
    let start = begin(out, b'P');
    put_cstr(out, name);
    put_cstr(out, sql);
    out.put_i16(count16(param_types.len()));
    for t in param_types {
        out.put_u32(*t);
    }
    crate::startup::patch_len(out, start);
}

/// Writes a Bind message: portal `portal` from statement `statement`, parameter values (`None`
/// is NULL) with their format codes (none = all text, one = that format for all), and the
/// result columns' format codes (same rule).
pub fn bind(
    out: &mut BytesMut,
    portal: &[u8],
    statement: &[u8],
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
) {
    let start = begin(out, b'B');
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.put_i16(count16(param_formats.len()));
    for f in param_formats {
        out.put_i16(*f);
    }
    put_values(out, params);
    out.put_i16(count16(result_formats.len()));
    for f in result_formats {
        out.put_i16(*f);
    }
    crate::startup::patch_len(out, start);
}

/// Writes a copy of a client's Parse (`tag` `P`) or Bind (`B`) message under other names: the
/// leading names of `body` (the statement for Parse; the portal and statement for Bind) are
/// replaced by `names`, and the rest (query text and parameter types, or parameter formats,
/// values and result formats) is copied as it came. Used to run a client's statement again on
/// another connection under the unnamed statement and portal. Fails on a body that does not
/// hold that many names (the caller has seen the server accept it, so this means a bug).
pub fn renamed(out: &mut BytesMut, tag: u8, names: &[&[u8]], body: &[u8]) -> Result<(), ProtocolError> {
    let mut r = BodyReader::new(body, "Parse/Bind");
    for _ in names {
        r.cstr()?;
    }
    let start = begin(out, tag);
    for n in names {
        put_cstr(out, n);
    }
    out.extend_from_slice(r.remaining());
    crate::startup::patch_len(out, start);
    Ok(())
}

/// Writes a FunctionCall (fast path) message: function `oid`, arguments (`None` is NULL) with
/// their format codes (same rule as Bind), and the result's format.
pub fn function_call(
    out: &mut BytesMut,
    oid: u32,
    arg_formats: &[i16],
    args: &[Option<&[u8]>],
    result_format: i16,
) {
    let start = begin(out, b'F');
    out.put_u32(oid);
    out.put_i16(count16(arg_formats.len()));
    for f in arg_formats {
        out.put_i16(*f);
    }
    put_values(out, args);
    out.put_i16(result_format);
    crate::startup::patch_len(out, start);
}

/// A count and the values of Bind or FunctionCall (`-1` length for NULL).
fn put_values(out: &mut BytesMut, values: &[Option<&[u8]>]) {
    out.put_i16(count16(values.len()));
    for p in values {
        match p {
            Some(v) => {
                out.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                out.put_slice(v);
            }
            None => out.put_i32(-1),
        }
    }
}

fn target_byte(target: Target) -> u8 {
    match target {
        Target::Statement => b'S',
        Target::Portal => b'P',
    }
}

/// Writes a Describe message.
pub fn describe(out: &mut BytesMut, target: Target, name: &[u8]) {
    let start = begin(out, b'D');
    out.put_u8(target_byte(target));
    put_cstr(out, name);
    crate::startup::patch_len(out, start);
}

/// Writes an Execute message (`max_rows` 0 = all rows).
pub fn execute(out: &mut BytesMut, portal: &[u8], max_rows: i32) {
    let start = begin(out, b'E');
    put_cstr(out, portal);
    out.put_i32(max_rows);
    crate::startup::patch_len(out, start);
}

/// Writes a Close message.
pub fn close(out: &mut BytesMut, target: Target, name: &[u8]) {
    let start = begin(out, b'C');
    out.put_u8(target_byte(target));
    put_cstr(out, name);
    crate::startup::patch_len(out, start);
}

/// Writes a Sync message.
pub fn sync(out: &mut BytesMut) {
    out.put_slice(&[b'S', 0, 0, 0, 4]);
}

/// Writes a Flush message.
pub fn flush(out: &mut BytesMut) {
    out.put_slice(&[b'H', 0, 0, 0, 4]);
}

/// Writes a CopyData message.
pub fn copy_data(out: &mut BytesMut, data: &[u8]) {
    let start = begin(out, b'd');
    out.put_slice(data);
    crate::startup::patch_len(out, start);
}

/// Writes a CopyDone message.
pub fn copy_done(out: &mut BytesMut) {
    out.put_slice(&[b'c', 0, 0, 0, 4]);
}

/// Writes a CopyFail message.
pub fn copy_fail(out: &mut BytesMut, message: &[u8]) {
    let start = begin(out, b'f');
    put_cstr(out, message);
    crate::startup::patch_len(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frames, MessageLimits};

    fn one(buf: &[u8]) -> ClientMessage<'_> {
        let (h, body) = Frames::new(buf, MessageLimits::default())
            .next()
            .unwrap()
            .unwrap();
        parse(h.tag, body).unwrap()
    }

    #[test]
    fn extended_protocol_builders_round_trip_through_the_parser() {
        let mut buf = BytesMut::new();
        parse_statement(&mut buf, b"s1", b"select $1", &[23]);
        assert_eq!(
            one(&buf),
            ClientMessage::Parse {
                statement: b"s1",
                sql: b"select $1"
            }
        );
        // Byte for byte what libpq sends for PQprepare(conn, "s1", "select $1", 1, {23}).
        assert_eq!(&buf[..], b"P\0\0\0\x17s1\0select $1\0\0\x01\0\0\0\x17");
        buf.clear();
        bind(&mut buf, b"p", b"s1", &[0], &[Some(b"42"), None], &[1]);
        assert_eq!(
            one(&buf),
            ClientMessage::Bind {
                portal: b"p",
                statement: b"s1"
            }
        );
        assert_eq!(
            &buf[5..],
            b"p\0s1\0\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\x01\0\x01"
        );
        let mut renamed_bind = BytesMut::new();
        renamed(&mut renamed_bind, b'B', &[b"", b""], &buf[5..]).unwrap();
        assert_eq!(
            &renamed_bind[5..],
            b"\0\0\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\x01\0\x01"
        );
        assert!(renamed(&mut renamed_bind, b'B', &[b"", b"", b""], b"p\0s\0").is_err());
        buf.clear();
        describe(&mut buf, Target::Portal, b"p");
        assert_eq!(
            one(&buf),
            ClientMessage::Describe {
                target: Target::Portal,
                name: b"p"
            }
        );
        buf.clear();
        execute(&mut buf, b"p", 10);
        assert_eq!(
            one(&buf),
            ClientMessage::Execute {
                portal: b"p",
                max_rows: 10
            }
        );
        buf.clear();
        close(&mut buf, Target::Statement, b"s1");
        assert_eq!(
            one(&buf),
            ClientMessage::Close {
                target: Target::Statement,
                name: b"s1"
            }
        );
        for (build, want) in [
            (sync as fn(&mut BytesMut), ClientMessage::Sync),
            (flush, ClientMessage::Flush),
            (copy_done, ClientMessage::CopyDone),
        ] {
            buf.clear();
            build(&mut buf);
            assert_eq!(one(&buf), want);
        }
        buf.clear();
        copy_data(&mut buf, b"1\tx\n");
        assert_eq!(one(&buf), ClientMessage::CopyData(b"1\tx\n"));
        buf.clear();
        copy_fail(&mut buf, b"why");
        assert_eq!(one(&buf), ClientMessage::CopyFail { message: b"why" });
    }

    #[test]
    fn parses_what_the_builders_write() {
        let mut buf = BytesMut::new();
        query(&mut buf, "select 1");
        assert_eq!(one(&buf), ClientMessage::Query { sql: b"select 1" });
        buf.clear();
        sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let ClientMessage::Password(body) = one(&buf) else {
            panic!()
        };
        assert_eq!(
            parse_sasl_initial_response(body).unwrap(),
            ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
        );
        buf.clear();
        password(&mut buf, b"md5abc");
        let ClientMessage::Password(body) = one(&buf) else {
            panic!()
        };
        assert_eq!(parse_password(body).unwrap(), b"md5abc");
    }

    #[test]
    fn parses_extended_protocol_messages() {
        let parse_body = b"s1\0select $1\0\0\x01\0\0\0\x17";
        assert_eq!(
            parse(b'P', parse_body).unwrap(),
            ClientMessage::Parse {
                statement: b"s1",
                sql: b"select $1"
            }
        );
        assert_eq!(
            parse(b'E', b"p\0\0\0\0\x05").unwrap(),
            ClientMessage::Execute {
                portal: b"p",
                max_rows: 5
            }
        );
        assert_eq!(
            parse(b'C', b"Sstmt\0").unwrap(),
            ClientMessage::Close {
                target: Target::Statement,
                name: b"stmt"
            }
        );
    }

    #[test]
    fn rejects_malformed_bodies() {
        assert!(parse(b'Q', b"no terminator").is_err());
        assert!(parse(b'P', b"s\0q\0\xff\xff").is_err());
        assert!(parse(b'D', b"Xname\0").is_err());
        assert!(parse(b'S', b"x").is_err());
        assert_eq!(parse(b'!', b""), Err(ProtocolError::UnknownTag(b'!')));
        // Text in a client encoding other than UTF-8 passes through untouched.
        assert_eq!(
            parse(b'Q', b"\xff\xfe\0").unwrap(),
            ClientMessage::Query { sql: b"\xff\xfe" }
        );
    }
}
