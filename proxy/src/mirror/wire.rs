//! Message surgery for the dual-write session: building the messages the proxy injects, and
//! removing the row-image column from what the server answers before the client sees it.
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

/// Parse with the client's statement name and parameter types but other SQL. `rest` is the
/// part of the client's Parse body after its query string (parameter count and types).
pub(crate) fn parse_with(out: &mut BytesMut, name: &[u8], sql: &str, rest: &[u8]) {
    let mut b = Vec::with_capacity(sql.len() + name.len() + rest.len() + 2);
    cstr(&mut b, name);
    cstr(&mut b, sql.as_bytes());
    b.extend_from_slice(rest);
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

/// A Bind body with one more result-format code (text) for the image column, when the client
/// gave one code per column. With zero codes (all text) or one (applies to every column) the
/// body is returned unchanged: the image is `text`, whose binary form is its text.
pub(crate) fn bind_with_image_format(body: &[u8]) -> Option<Vec<u8>> {
    let mut p = 0;
    let skip_cstr = |p: &mut usize| -> Option<()> {
        let n = body.get(*p..)?.iter().position(|&b| b == 0)?;
        *p += n + 1;
        Some(())
    };
    let i16_at = |p: usize| -> Option<i16> { Some(i16::from_be_bytes([*body.get(p)?, *body.get(p + 1)?])) };
    let i32_at = |p: usize| -> Option<i32> {
        Some(i32::from_be_bytes([
            *body.get(p)?,
            *body.get(p + 1)?,
            *body.get(p + 2)?,
            *body.get(p + 3)?,
        ]))
    };
    skip_cstr(&mut p)?;
    skip_cstr(&mut p)?;
    let nfmt = usize::try_from(i16_at(p)?).ok()?;
    p += 2 + 2 * nfmt;
    let nparams = usize::try_from(i16_at(p)?).ok()?;
    p += 2;
    for _ in 0..nparams {
        let len = i32_at(p)?;
        p += 4;
        if len > 0 {
            p += usize::try_from(len).ok()?;
        }
    }
    let count_at = p;
    let nres = i16_at(count_at)?;
    if nres < 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(body.get(..count_at)?);
    out.extend_from_slice(&(nres + 1).to_be_bytes());
    out.extend_from_slice(body.get(count_at + 2..)?);
    out.extend_from_slice(&0i16.to_be_bytes());
    Some(out)
}

/// An Execute body with the row limit set to 0 (all rows).
pub(crate) fn execute_all_rows(body: &[u8]) -> Option<Vec<u8>> {
    let n = body.iter().position(|&b| b == 0)?;
    let mut out = Vec::with_capacity(n + 5);
    out.extend_from_slice(body.get(..=n)?);
    out.extend_from_slice(&0i32.to_be_bytes());
    Some(out)
}

/// Splits a DataRow body into the client's columns (as a new DataRow frame, unless `keep` is
/// false) and the last column's value (the row image).
pub(crate) fn split_data_row(body: &[u8], keep: bool, out: &mut BytesMut) -> Option<String> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if n < 1 {
        return None;
    }
    let mut p = 2;
    let mut last_start = 2;
    for _ in 0..n {
        last_start = p;
        let len = i32::from_be_bytes([
            *body.get(p)?,
            *body.get(p + 1)?,
            *body.get(p + 2)?,
            *body.get(p + 3)?,
        ]);
        p += 4;
        if len > 0 {
            p += usize::try_from(len).ok()?;
        }
    }
    let image_len = i32::from_be_bytes([
        *body.get(last_start)?,
        *body.get(last_start + 1)?,
        *body.get(last_start + 2)?,
        *body.get(last_start + 3)?,
    ]);
    let image = if image_len < 0 {
        None
    } else {
        Some(String::from_utf8_lossy(body.get(last_start + 4..p)?).into_owned())
    };
    if keep {
        out.reserve(last_start + 5);
        out.put_u8(b'D');
        out.put_i32(i32::try_from(last_start + 4).ok()?);
        out.put_i16(n - 1);
        out.put_slice(body.get(2..last_start)?);
    }
    image
}

/// A RowDescription frame without its last field.
pub(crate) fn trim_row_description(body: &[u8], out: &mut BytesMut) -> Option<()> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    if n < 1 {
        return None;
    }
    let mut p = 2;
    let mut last_start = 2;
    for _ in 0..n {
        last_start = p;
        let name_len = body.get(p..)?.iter().position(|&b| b == 0)?;
        p += name_len + 1 + 18;
    }
    if p > body.len() {
        return None;
    }
    out.reserve(last_start + 5);
    out.put_u8(b'T');
    out.put_i32(i32::try_from(last_start + 4).ok()?);
    out.put_i16(n - 1);
    out.put_slice(body.get(2..last_start)?);
    Some(())
}

/// NoData.
pub(crate) fn no_data(out: &mut BytesMut) {
    message(out, b'n', &[]);
}

/// The command tag of a CommandComplete body.
pub(crate) fn command_tag(body: &Bytes) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_row(cols: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for c in cols {
            match c {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    #[test]
    fn data_rows_lose_their_last_column() {
        let body = data_row(&[Some(b"1"), None, Some(b"{\"id\":1}")]);
        let mut out = BytesMut::new();
        let image = split_data_row(&body, true, &mut out);
        assert_eq!(image.as_deref(), Some("{\"id\":1}"));
        let expect = data_row(&[Some(b"1"), None]);
        assert_eq!(&out[5..], &expect[..]);
        assert_eq!(out[0], b'D');
        assert_eq!(
            i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize,
            expect.len() + 4
        );
        let mut none = BytesMut::new();
        assert!(split_data_row(&data_row(&[Some(b"x")]), false, &mut none).is_some());
        assert!(none.is_empty());
        assert!(split_data_row(&[0, 1, 0], true, &mut none).is_none());
    }

    #[test]
    fn row_descriptions_lose_their_last_field() {
        let mut body = 2i16.to_be_bytes().to_vec();
        for name in [&b"a"[..], &b"__switchyard_image"[..]] {
            body.extend_from_slice(name);
            body.push(0);
            body.extend_from_slice(&[0; 18]);
        }
        let mut out = BytesMut::new();
        trim_row_description(&body, &mut out).unwrap();
        assert_eq!(&out[5..7], &1i16.to_be_bytes());
        assert_eq!(&out[7..9], b"a\0");
        assert_eq!(out.len(), 5 + 2 + 2 + 18);
    }

    #[test]
    fn bind_gets_one_more_result_format_only_when_per_column() {
        let mut b = Vec::new();
        b.extend_from_slice(b"p\0s\0");
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        let mut two = b.clone();
        two.extend_from_slice(&2i16.to_be_bytes());
        two.extend_from_slice(&1i16.to_be_bytes());
        two.extend_from_slice(&0i16.to_be_bytes());
        let out = bind_with_image_format(&two).unwrap();
        assert_eq!(&out[out.len() - 8..], &[0, 3, 0, 1, 0, 0, 0, 0]);
        let mut one = b.clone();
        one.extend_from_slice(&1i16.to_be_bytes());
        one.extend_from_slice(&1i16.to_be_bytes());
        assert!(bind_with_image_format(&one).is_none());
    }
}
