//! OLD's object ids in the answers NEW serves. A RowDescription names, per column, the table
//! and column number it comes from and its type; a ParameterDescription names the parameters'
//! types. Built-in types have the same ids on every server, but tables, columns and user types
//! (enums, domains, composites) get their own on each, and drivers cache what they learned by
//! id (asyncpg and pgjdbc look user types up once). So every id NEW sends is translated to the
//! id of the object of the same name on OLD. A value in binary format whose encoding carries
//! type ids itself (an array or a composite of user types) cannot be translated: such a read
//! goes back to OLD.

use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use sqlx::Row;
use switchyard_config::TableName;
use switchyard_store::Store;

/// Object ids below this are built in (`FirstNormalObjectId`): the same on every server.
const FIRST_USER_OID: u32 = 16384;

/// A table's id and its columns' numbers on OLD, by NEW's numbers.
#[derive(Debug, Default, Clone)]
struct TableIds {
    old_oid: u32,
    columns: HashMap<i16, i16>,
}

/// The translation from NEW's ids to OLD's, as read at one moment.
#[derive(Debug, Default)]
pub(crate) struct OidMap {
    types: HashMap<u32, u32>,
    /// NEW's ids of user types whose binary encoding holds type ids (arrays, composites,
    /// domains: a domain may be over either).
    carries_ids: HashSet<u32>,
    tables: HashMap<u32, TableIds>,
}

/// Why an answer cannot be translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Untranslatable {
    /// An id NEW sent has no object of the same name on OLD (or the map is out of date).
    Unknown,
    /// A binary value of a type whose encoding holds type ids.
    BinaryContainer,
    /// Not a well-formed message.
    Malformed,
}

type Failed<T> = Result<T, String>;

async fn user_types(store: &Store) -> Failed<Vec<(u32, String, bool)>> {
    let Store::Postgres(s) = store;
    let rows = sqlx::query(
        "SELECT t.oid::int8, n.nspname || '.' || t.typname, \
                (t.typtype IN ('c', 'd') OR t.typcategory = 'A') \
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE t.oid >= 16384 AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast%'",
    )
    .fetch_all(s.pool())
    .await
    .map_err(|e| format!("reading the types of {}: {e}", s.role().name()))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<i64, _>(0) as u32,
                r.get::<String, _>(1),
                r.get::<bool, _>(2),
            )
        })
        .collect())
}

async fn table_columns(store: &Store, table: &TableName) -> Failed<Option<(u32, HashMap<String, i16>)>> {
    let Store::Postgres(s) = store;
    let rows = sqlx::query(
        "SELECT c.oid::int8, a.attname::text, a.attnum \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(&table.schema)
    .bind(&table.table)
    .fetch_all(s.pool())
    .await
    .map_err(|e| format!("reading the columns of {table} on {}: {e}", s.role().name()))?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let oid = first.get::<i64, _>(0) as u32;
    let columns = rows
        .iter()
        .map(|r| (r.get::<String, _>(1), r.get::<i16, _>(2)))
        .collect();
    Ok(Some((oid, columns)))
}

impl OidMap {
    /// Reads both catalogs: `old` is the store whose ids the client knows, `new` the one that
    /// answers.
    pub(crate) async fn load(old: &Store, new: &Store, tables: &[TableName]) -> Failed<OidMap> {
        let (old_types, new_types) = tokio::join!(user_types(old), user_types(new));
        let by_name: HashMap<String, u32> =
            old_types?.into_iter().map(|(oid, name, _)| (name, oid)).collect();
        let mut map = OidMap::default();
        for (oid, name, carries) in new_types? {
            if carries {
                map.carries_ids.insert(oid);
            }
            if let Some(old_oid) = by_name.get(&name) {
                map.types.insert(oid, *old_oid);
            }
        }
        for t in tables {
            let (o, n) = tokio::join!(table_columns(old, t), table_columns(new, t));
            let (Some((old_oid, old_cols)), Some((new_oid, new_cols))) = (o?, n?) else {
                continue;
            };
            let columns = new_cols
                .iter()
                .filter_map(|(name, num)| Some((*num, *old_cols.get(name)?)))
                .collect();
            map.tables.insert(new_oid, TableIds { old_oid, columns });
        }
        Ok(map)
    }

    fn type_id(&self, new: u32) -> Result<u32, Untranslatable> {
        if new < FIRST_USER_OID {
            return Ok(new);
        }
        self.types.get(&new).copied().ok_or(Untranslatable::Unknown)
    }

    /// A RowDescription body from NEW, with OLD's ids; `check_formats` refuses binary values
    /// of types whose encoding holds ids (a Describe of a statement reports format 0 for
    /// every column: the Bind decides, and the portal's description is checked then).
    pub(crate) fn row_description(&self, body: &[u8]) -> Result<Bytes, Untranslatable> {
        let mut r = Reader { b: body };
        let count = r.i16()?;
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(b'T');
        out.put_i32(0);
        out.put_i16(count);
        for _ in 0..count.max(0) {
            let name = r.cstr()?;
            let (table, column) = (r.u32()?, r.i16()?);
            let (ty, len, modifier, format) = (r.u32()?, r.i16()?, r.i32()?, r.i16()?);
            if format == 1 && self.carries_ids.contains(&ty) {
                return Err(Untranslatable::BinaryContainer);
            }
            let (table, column) = match table {
                0 => (0, column),
                t => {
                    let ids = self.tables.get(&t).ok_or(Untranslatable::Unknown)?;
                    let c = ids.columns.get(&column).copied().ok_or(Untranslatable::Unknown)?;
                    (ids.old_oid, c)
                }
            };
            out.put_slice(name);
            out.put_u8(0);
            out.put_u32(table);
            out.put_i16(column);
            out.put_u32(self.type_id(ty)?);
            out.put_i16(len);
            out.put_i32(modifier);
            out.put_i16(format);
        }
        finish(out)
    }

    /// A ParameterDescription body from NEW, with OLD's type ids.
    pub(crate) fn parameter_description(&self, body: &[u8]) -> Result<Bytes, Untranslatable> {
        let mut r = Reader { b: body };
        let count = r.i16()?;
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(b't');
        out.put_i32(0);
        out.put_i16(count);
        for _ in 0..count.max(0) {
            out.put_u32(self.type_id(r.u32()?)?);
        }
        finish(out)
    }
}

fn finish(mut out: BytesMut) -> Result<Bytes, Untranslatable> {
    let len = i32::try_from(out.len() - 1).map_err(|_| Untranslatable::Malformed)?;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Untranslatable> {
        if self.b.len() < n {
            return Err(Untranslatable::Malformed);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn i16(&mut self) -> Result<i16, Untranslatable> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| Untranslatable::Malformed)?,
        ))
    }
    fn i32(&mut self) -> Result<i32, Untranslatable> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| Untranslatable::Malformed)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, Untranslatable> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| Untranslatable::Malformed)?,
        ))
    }
    fn cstr(&mut self) -> Result<&'a [u8], Untranslatable> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or(Untranslatable::Malformed)?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_description(fields: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for (name, table, column, ty, format) in fields {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&column.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        b
    }

    fn map() -> OidMap {
        let mut m = OidMap::default();
        m.types.insert(40000, 30000);
        m.types.insert(40001, 30001);
        m.carries_ids.insert(40001);
        m.tables.insert(
            50000,
            TableIds {
                old_oid: 20000,
                columns: HashMap::from([(1, 1), (3, 2)]),
            },
        );
        m
    }

    #[test]
    fn ids_are_translated_by_name() {
        let m = map();
        let got = m
            .row_description(&row_description(&[
                ("id", 50000, 1, 23, 1),
                ("mood", 50000, 3, 40000, 0),
                ("n", 0, 0, 20, 0),
            ]))
            .unwrap();
        let want = row_description(&[
            ("id", 20000, 1, 23, 1),
            ("mood", 20000, 2, 30000, 0),
            ("n", 0, 0, 20, 0),
        ]);
        assert_eq!(&got[5..], &want[..]);
        assert_eq!(
            i32::from_be_bytes(got[1..5].try_into().unwrap()) as usize,
            got.len() - 1
        );
    }

    #[test]
    fn what_cannot_be_translated_is_said() {
        let m = map();
        let unknown_type = row_description(&[("x", 0, 0, 40404, 0)]);
        assert_eq!(m.row_description(&unknown_type), Err(Untranslatable::Unknown));
        let unknown_column = row_description(&[("x", 50000, 2, 23, 0)]);
        assert_eq!(m.row_description(&unknown_column), Err(Untranslatable::Unknown));
        let binary_array = row_description(&[("x", 0, 0, 40001, 1)]);
        assert_eq!(
            m.row_description(&binary_array),
            Err(Untranslatable::BinaryContainer)
        );
        let text_array = row_description(&[("x", 0, 0, 40001, 0)]);
        assert!(m.row_description(&text_array).is_ok());
        assert_eq!(m.row_description(&[0, 1, b'x']), Err(Untranslatable::Malformed));
    }
}
