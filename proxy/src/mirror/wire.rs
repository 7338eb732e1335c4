//! Messages for the dual-write session: building the ones the proxy injects, and reading the
//! few fields of the client's and the server's it acts on.
//!
//! Everything here works on whole frames (tag, length, body) and never panics on bad input: a
//! malformed server message is passed through untouched for the client to judge.

use bytes::{BufMut, Bytes, BytesMut};

/// Appends one tagged message.
pub(crate) fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(body.len() + 5);
    out.put_u8(tag);
    out.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
    out.put_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &[u8]) {
    body.extend_from_slice(s);
    body.push(0);
}

/// Query.
pub(crate) fn query(out: &mut BytesMut, sql: &str) {
    let mut b = Vec::with_capacity(sql.len() + 1);
    cstr(&mut b, sql.as_bytes());
    message(out, b'Q', &b);
}

/// Parse of a statement without parameter types.
pub(crate) fn parse(out: &mut BytesMut, name: &[u8], sql: &str) {
    let mut b = Vec::with_capacity(sql.len() + name.len() + 4);
    cstr(&mut b, name);
    cstr(&mut b, sql.as_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    message(out, b'P', &b);
}

/// Bind without parameters, text results.
pub(crate) fn bind(out: &mut BytesMut, portal: &[u8], statement: &[u8]) {
    let mut b = Vec::with_capacity(portal.len() + statement.len() + 8);
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    message(out, b'B', &b);
}

/// Execute.
pub(crate) fn execute(out: &mut BytesMut, portal: &[u8], max_rows: i32) {
    let mut b = Vec::with_capacity(portal.len() + 5);
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    message(out, b'E', &b);
}

/// Close of a statement (`b'S'`) or portal (`b'P'`).
pub(crate) fn close(out: &mut BytesMut, target: u8, name: &[u8]) {
    let mut b = Vec::with_capacity(name.len() + 2);
    b.push(target);
    cstr(&mut b, name);
    message(out, b'C', &b);
}

/// Flush.
pub(crate) fn flush(out: &mut BytesMut) {
    message(out, b'H', &[]);
}

/// ReadyForQuery with the given status byte.
pub(crate) fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', &[status]);
}

/// Splits a Parse body into (statement name, query string, the rest).
pub(crate) fn split_parse(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let n1 = body.iter().position(|&b| b == 0)?;
    let after = body.get(n1 + 1..)?;
    let n2 = after.iter().position(|&b| b == 0)?;
    Some((&body[..n1], &after[..n2], after.get(n2 + 1..)?))
}

/// The command tag of a CommandComplete body.
pub(crate) fn command_tag(body: &Bytes) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bodies_split_into_name_query_and_rest() {
        let body = b"s1\0select 1\0\0\0";
        let (name, sql, rest) = split_parse(body).unwrap();
        assert_eq!((name, sql, rest), (&b"s1"[..], &b"select 1"[..], &b"\0\0"[..]));
        assert!(split_parse(b"no terminator").is_none());
    }
}
