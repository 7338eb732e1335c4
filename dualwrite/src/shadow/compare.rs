//! Comparing two result sets: the DataRow messages OLD sent the client and those NEW sent the
//! shadow connection for the same statement, parameters and result formats, on the same
//! settings. Equal values give equal bytes then, so rows are compared as they came: in order
//! when the statement has an `ORDER BY`, as multisets otherwise.

use bytes::Bytes;
use switchyard_pgwire::backend::data_row_fields;

/// How two result sets differ.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Diff {
    /// Rows OLD returned more often than NEW (DataRow frames).
    pub(crate) only_old: Vec<Bytes>,
    /// Rows NEW returned more often than OLD.
    pub(crate) only_new: Vec<Bytes>,
    /// The same rows in another order (for a statement with `ORDER BY`): the first position
    /// where they differ.
    pub(crate) order_from: Option<usize>,
}

impl Diff {
    /// One line saying how they differ.
    pub(crate) fn summary(&self, old_rows: usize, new_rows: usize) -> String {
        match self.order_from {
            Some(i) => format!("same {old_rows} rows in another order from row {}", i + 1),
            None => format!(
                "{old_rows} rows on OLD, {new_rows} on NEW: {} only on OLD, {} only on NEW",
                self.only_old.len(),
                self.only_new.len()
            ),
        }
    }
}

/// `None` when the results are equal.
pub(crate) fn compare(old: &[Bytes], new: &[Bytes], ordered: bool) -> Option<Diff> {
    if ordered && old == new {
        return None;
    }
    let mut a: Vec<&Bytes> = old.iter().collect();
    let mut b: Vec<&Bytes> = new.iter().collect();
    a.sort_unstable();
    b.sort_unstable();
    let (mut only_old, mut only_new) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_old.push((*x).clone());
                i += 1;
            }
            (Some(x), None) => {
                only_old.push((*x).clone());
                i += 1;
            }
            (_, Some(y)) => {
                only_new.push((*y).clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    if only_old.is_empty() && only_new.is_empty() {
        if !ordered {
            return None;
        }
        let first = old.iter().zip(new).position(|(x, y)| x != y).unwrap_or(0);
        return Some(Diff {
            only_old,
            only_new,
            order_from: Some(first),
        });
    }
    Some(Diff {
        only_old,
        only_new,
        order_from: None,
    })
}

/// A DataRow frame as text for an example: each field as UTF-8 text when it is printable,
/// `\x` and hex otherwise (a binary-format column), `null` for NULL.
pub(crate) fn render_row(frame: &Bytes) -> serde_json::Value {
    let Some(fields) = frame.get(5..).and_then(data_row_fields) else {
        return serde_json::Value::Null;
    };
    fields
        .into_iter()
        .map(|f| match f {
            None => serde_json::Value::Null,
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => s.into(),
                _ => {
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    format!("\\x{hex}").into()
                }
            },
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn row(fields: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.extend_from_slice(b"D\0\0\0\0");
        b.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for f in fields {
            match f {
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let len = (b.len() - 1) as u32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
        b.freeze()
    }

    #[test]
    fn multisets_orders_and_examples() {
        let (r1, r2, r3) = (
            row(&[Some("1"), Some("a")]),
            row(&[Some("2"), None]),
            row(&[Some("3"), Some("c")]),
        );
        let v = |rows: &[&Bytes]| rows.iter().map(|r| (*r).clone()).collect::<Vec<_>>();
        assert_eq!(compare(&v(&[&r1, &r2]), &v(&[&r2, &r1]), false), None);
        assert_eq!(compare(&v(&[&r1, &r2]), &v(&[&r1, &r2]), true), None);
        let d = compare(&v(&[&r1, &r2]), &v(&[&r2, &r1]), true).unwrap();
        assert_eq!(d.order_from, Some(0));
        assert!(d.summary(2, 2).contains("another order"));
        // Duplicates count: a multiset, not a set.
        let d = compare(&v(&[&r1, &r1, &r2]), &v(&[&r1, &r2, &r3]), false).unwrap();
        assert_eq!((d.only_old, d.only_new), (vec![r1.clone()], vec![r3.clone()]));
        assert_eq!(render_row(&r2), serde_json::json!(["2", null]));
        assert_eq!(
            render_row(&row(&[Some("\u{1}x")])),
            serde_json::json!(["\\x0178"])
        );
    }
}
