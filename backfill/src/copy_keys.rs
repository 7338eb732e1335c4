//! Picks the key columns out of a binary COPY stream as it passes through, and writes them as
//! the binary COPY data of the keys table (key columns, `sy_version` 0, `sy_deleted` false), so
//! the fast path claims a chunk's keys with a second COPY instead of an `INSERT ... SELECT`.
//!
//! The format: an 11-byte signature, a 32-bit flags field, a 32-bit header-extension length and
//! the extension; then per row a 16-bit field count and per field a 32-bit length (-1 = NULL)
//! and the bytes; a field count of -1 ends the data. All integers big-endian. The stream may
//! arrive split anywhere.
//! <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>

/// The binary COPY signature.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Why a stream could not be read as binary COPY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadCopyData(pub &'static str);

/// Builds the keys table's COPY data from a table's COPY data.
#[derive(Debug)]
pub struct KeyExtractor {
    /// For each key column, in key order, its position among the copied columns.
    positions: Vec<usize>,
    /// Bytes received and not yet parsed.
    pending: Vec<u8>,
    /// Offset of the first unparsed byte in `pending`.
    at: usize,
    header_done: bool,
    ended: bool,
    rows: u64,
    out: Vec<u8>,
}

impl KeyExtractor {
    /// An extractor for rows whose key columns sit at `positions` (key order).
    pub fn new(positions: Vec<usize>) -> KeyExtractor {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(SIGNATURE);
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        KeyExtractor {
            positions,
            pending: Vec::new(),
            at: 0,
            header_done: false,
            ended: false,
            rows: 0,
            out,
        }
    }

    /// Takes the next piece of the table's COPY data.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), BadCopyData> {
        if self.at > 0 && self.at == self.pending.len() {
            self.pending.clear();
            self.at = 0;
        } else if self.at > 1 << 20 {
            self.pending.drain(..self.at);
            self.at = 0;
        }
        self.pending.extend_from_slice(data);
        while self.step()? {}
        Ok(())
    }

    /// The keys table's COPY data and the rows seen; fails if the stream stopped mid-row.
    pub fn finish(mut self) -> Result<(Vec<u8>, u64), BadCopyData> {
        if !self.ended || self.at != self.pending.len() {
            return Err(BadCopyData("COPY data ended early"));
        }
        self.out.extend_from_slice(&(-1i16).to_be_bytes());
        Ok((self.out, self.rows))
    }

    fn rest(&self) -> &[u8] {
        &self.pending[self.at..]
    }

    /// Parses one unit (the header or a row) if it is complete; false when more data is needed.
    fn step(&mut self) -> Result<bool, BadCopyData> {
        if self.ended {
            return if self.rest().is_empty() {
                Ok(false)
            } else {
                Err(BadCopyData("data after the end of COPY data"))
            };
        }
        if !self.header_done {
            let rest = self.rest();
            if rest.len() < 19 {
                return Ok(false);
            }
            if &rest[..11] != SIGNATURE {
                return Err(BadCopyData("not binary COPY data"));
            }
            let ext = be_i32(&rest[15..19]);
            let Ok(ext) = usize::try_from(ext) else {
                return Err(BadCopyData("negative header extension length"));
            };
            if rest.len() < 19 + ext {
                return Ok(false);
            }
            self.at += 19 + ext;
            self.header_done = true;
            return Ok(true);
        }
        let rest = self.rest();
        if rest.len() < 2 {
            return Ok(false);
        }
        let count = i16::from_be_bytes([rest[0], rest[1]]);
        if count == -1 {
            self.at += 2;
            self.ended = true;
            return Ok(true);
        }
        let Ok(count) = usize::try_from(count) else {
            return Err(BadCopyData("negative field count"));
        };
        // Find every field's span; give up (for now) if the row is not complete.
        let mut spans: Vec<(usize, i32)> = Vec::with_capacity(count);
        let mut off = 2;
        for _ in 0..count {
            if rest.len() < off + 4 {
                return Ok(false);
            }
            let len = be_i32(&rest[off..off + 4]);
            spans.push((off, len));
            off += 4 + usize::try_from(len).unwrap_or(0);
            if rest.len() < off {
                return Ok(false);
            }
        }
        let fields =
            i16::try_from(self.positions.len() + 2).map_err(|_| BadCopyData("too many key columns"))?;
        let mut row = Vec::with_capacity(64);
        row.extend_from_slice(&fields.to_be_bytes());
        for &p in &self.positions {
            let Some(&(start, len)) = spans.get(p) else {
                return Err(BadCopyData("a row has fewer fields than the key needs"));
            };
            if len < 0 {
                return Err(BadCopyData("a key column is NULL"));
            }
            row.extend_from_slice(&rest[start..start + 4 + len as usize]);
        }
        // sy_version bigint 0, sy_deleted boolean false.
        row.extend_from_slice(&8i32.to_be_bytes());
        row.extend_from_slice(&0i64.to_be_bytes());
        row.extend_from_slice(&1i32.to_be_bytes());
        row.push(0);
        self.out.extend_from_slice(&row);
        self.at += off;
        self.rows += 1;
        Ok(true)
    }
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
        match bytes {
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    fn stream(rows: &[[Option<&[u8]>; 3]]) -> Vec<u8> {
        let mut s = SIGNATURE.to_vec();
        s.extend_from_slice(&0i32.to_be_bytes());
        s.extend_from_slice(&4i32.to_be_bytes());
        s.extend_from_slice(b"ext!");
        for r in rows {
            s.extend_from_slice(&3i16.to_be_bytes());
            for f in r {
                field(&mut s, *f);
            }
        }
        s.extend_from_slice(&(-1i16).to_be_bytes());
        s
    }

    #[test]
    fn keys_come_out_in_key_order_whatever_the_splits() {
        let data = stream(&[
            [Some(b"v1"), Some(&7i64.to_be_bytes()), Some(b"a")],
            [None, Some(&8i64.to_be_bytes()), Some(b"bb")],
        ]);
        let mut expect = SIGNATURE.to_vec();
        expect.extend_from_slice(&[0; 8]);
        for (k1, k2) in [(7i64, &b"a"[..]), (8, &b"bb"[..])] {
            expect.extend_from_slice(&4i16.to_be_bytes());
            field(&mut expect, Some(&k1.to_be_bytes()));
            field(&mut expect, Some(k2));
            field(&mut expect, Some(&0i64.to_be_bytes()));
            field(&mut expect, Some(&[0]));
        }
        expect.extend_from_slice(&(-1i16).to_be_bytes());
        for split in [1, 2, 3, 7, 19, 25, data.len()] {
            let mut x = KeyExtractor::new(vec![1, 2]);
            for piece in data.chunks(split) {
                x.feed(piece).unwrap();
            }
            let (out, rows) = x.finish().unwrap();
            assert_eq!(rows, 2);
            assert_eq!(out, expect, "split {split}");
        }
    }

    #[test]
    fn broken_streams_are_refused() {
        let data = stream(&[[Some(b"x"), Some(b"k"), Some(b"y")]]);
        let mut x = KeyExtractor::new(vec![1]);
        x.feed(&data[..data.len() - 3]).unwrap();
        assert!(x.finish().is_err(), "cut short");
        let mut x = KeyExtractor::new(vec![0]);
        assert!(x.feed(b"PGCOPY\nXXXXXXXXXXXXXXX").is_err());
        let null_key = stream(&[[None, Some(b"k"), Some(b"y")]]);
        assert!(KeyExtractor::new(vec![0]).feed(&null_key).is_err());
    }
}
