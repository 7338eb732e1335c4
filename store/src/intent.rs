//! The intent record of a mirrored transaction, built as its row images go by.
//!
//! An intent lists, per mirrored table, the keys the transaction changed (for a table without a
//! key, the rows it appended): `[{"t": "schema.table", "k": [{key}, ...], "r": [{row}, ...]}]`.
//! [`IntentKeys`] folds images in one at a time, in time linear in their size: a key is taken
//! from its image without building the whole row, and a key written several times is listed
//! once (a hash set of its canonical text), so a transaction that changed a million rows needs
//! neither its images kept nor a quadratic search. The repair reads the list back
//! (`crate::repair`), and matches keys with rows on the server, so the order of the keys and of
//! the columns within a key do not matter.

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::mirror::{escape_literal, push_escaped, Change, ChangeOp, MirrorTable};
use crate::{quote_ident, SIDE_SCHEMA};

/// One table's part of an intent: its keys (or appended rows) as the text of JSON array
/// elements, comma separated.
#[derive(Debug, Default)]
struct TableIntent {
    table: usize,
    keys: String,
    /// The canonical text of every key in `keys`: a key is listed once.
    seen: HashSet<Box<str>>,
    rows: String,
}

/// The keys (and appended rows) of one transaction, per table in order of first appearance.
#[derive(Debug, Default)]
pub struct IntentKeys {
    tables: Vec<TableIntent>,
    /// Images that had no usable key or were not JSON (left out, as before).
    skipped: u64,
}

impl IntentKeys {
    /// An empty intent.
    pub fn new() -> IntentKeys {
        IntentKeys::default()
    }

    /// Whether no key and no row was added.
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|t| t.keys.is_empty() && t.rows.is_empty())
    }

    /// Distinct keys listed, all tables together.
    pub fn keys(&self) -> usize {
        self.tables.iter().map(|t| t.seen.len()).sum()
    }

    /// Bytes of the listed keys and rows (about the size of the intent's JSON).
    pub fn bytes(&self) -> usize {
        self.tables.iter().map(|t| t.keys.len() + t.rows.len()).sum()
    }

    /// Forgets everything (the allocations are kept for the next transaction of the session).
    pub fn clear(&mut self) {
        self.tables.clear();
        self.skipped = 0;
    }

    /// Adds the keys (or, for appends, the rows) of `change`'s images.
    pub fn add(&mut self, tables: &[MirrorTable], change: &Change) {
        self.add_rows(tables, change.table, change.op, &change.rows);
    }

    /// Adds the keys (or, for appends, the rows) of `rows`, images of `op` on table `index`.
    pub fn add_rows(&mut self, tables: &[MirrorTable], index: usize, op: ChangeOp, rows: &[String]) {
        let Some(table) = tables.get(index) else {
            return;
        };
        let slot = match self.tables.iter().position(|t| t.table == index) {
            Some(i) => i,
            None => {
                self.tables.push(TableIntent {
                    table: index,
                    ..TableIntent::default()
                });
                self.tables.len() - 1
            }
        };
        let Some(entry) = self.tables.get_mut(slot) else {
            return;
        };
        for row in rows {
            if table.keyed() && op != ChangeOp::Append {
                // A key written several times in the transaction is listed once: a repair
                // re-copies its final state.
                match key_text(&table.key, row) {
                    Some(key) => {
                        if !entry.seen.contains(key.as_str()) {
                            push_element(&mut entry.keys, &key);
                            entry.seen.insert(key.into_boxed_str());
                        }
                    }
                    None => self.skipped += 1,
                }
            } else if serde_json::from_str::<IgnoredAny>(row).is_ok() {
                push_element(&mut entry.rows, row);
            } else {
                self.skipped += 1;
            }
        }
    }

    /// The statement that records the intent on OLD, to run inside the client's transaction
    /// just before its COMMIT. Consumes the intent: the key set goes first, and each table's
    /// keys as soon as they are in the statement, so the peak is about one copy of the keys.
    pub fn sql(self, tables: &[MirrorTable], intent_id: i64, proxy: &str) -> String {
        let mut parts: Vec<TableIntent> = self.tables;
        for t in &mut parts {
            t.seen = HashSet::new();
        }
        let size: usize = parts.iter().map(|t| t.keys.len() + t.rows.len() + 64).sum();
        // clock_timestamp(), not now(): the age that makes an intent stale must count from its
        // commit, not from the start of a long client transaction.
        let mut sql = String::with_capacity(size + size / 16 + 256);
        let _ = write!(
            sql,
            "INSERT INTO {}.switchyard_intents (id, created_at, proxy, changes) \
             VALUES ({intent_id}, clock_timestamp(), {}, E'[",
            quote_ident(SIDE_SCHEMA),
            escape_literal(proxy),
        );
        let mut first = true;
        for t in parts {
            let Some(table) = tables.get(t.table) else {
                continue;
            };
            if t.keys.is_empty() && t.rows.is_empty() {
                continue;
            }
            if !first {
                sql.push(',');
            }
            first = false;
            sql.push_str("{\"t\":");
            push_escaped(&mut sql, &Value::String(table.name.to_string()).to_string());
            if !t.keys.is_empty() {
                sql.push_str(",\"k\":[");
                push_escaped(&mut sql, &t.keys);
                sql.push(']');
            }
            if !t.rows.is_empty() {
                sql.push_str(",\"r\":[");
                push_escaped(&mut sql, &t.rows);
                sql.push(']');
            }
            sql.push('}');
        }
        sql.push_str("]'::jsonb)");
        sql
    }
}

fn push_element(list: &mut String, element: &str) {
    if !list.is_empty() {
        list.push(',');
    }
    list.push_str(element);
}

/// The key of a row image as the text of a JSON object of the key columns (in `key` order), or
/// `None` if the image is not a JSON object or lacks a key column. Only the key columns' values
/// are built; the others are skipped as they are read.
pub(crate) fn key_text(key: &[String], image: &str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_str(image);
    let values = KeySeed { key }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    let mut out = String::with_capacity(16 * key.len() + 2);
    out.push('{');
    for (i, (column, value)) in key.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(column.clone()).to_string());
        out.push(':');
        out.push_str(&value?.to_string());
    }
    out.push('}');
    Some(out)
}

/// Reads a JSON object, keeping the values of the `key` columns only.
struct KeySeed<'k> {
    key: &'k [String],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Vec<Option<Value>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Vec<Option<Value>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row image (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values: Vec<Option<Value>> = vec![None; self.key.len()];
        while let Some(column) = map.next_key_seed(ColumnSeed { key: self.key })? {
            match column {
                Some(i) => {
                    if let Some(slot) = values.get_mut(i) {
                        *slot = Some(map.next_value()?);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

/// Reads a member name: the index of the key column it names, if any (no allocation for the
/// usual names without escapes).
struct ColumnSeed<'k> {
    key: &'k [String],
}

impl<'de> DeserializeSeed<'de> for ColumnSeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for ColumnSeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a column name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.key.iter().position(|k| k == name))
    }
}

#[cfg(test)]
mod tests {
    use super::{key_text, IntentKeys};
    use crate::mirror::{Change, ChangeOp, MirrorTable};
    use crate::{Column, TableSchema};

    fn table(name: &str, key: &[&str]) -> MirrorTable {
        let column = |c: &str| Column {
            name: c.to_owned(),
            type_name: "text".to_owned(),
            type_oid: 25,
            not_null: false,
            has_default: false,
            generated: false,
            identity: None,
        };
        let schema = TableSchema {
            name: name.parse().unwrap(),
            columns: vec![column("id"), column("v")],
            primary_key: Vec::new(),
            unique_keys: Vec::new(),
        };
        MirrorTable::new(
            name.parse().unwrap(),
            key.iter().map(|k| (*k).to_owned()).collect(),
            &schema,
            &schema,
        )
    }

    #[test]
    fn an_intent_lists_each_key_once_and_every_appended_row() {
        let tables = [table("public.t", &["id"]), table("public.log", &[])];
        let change = |table, op, rows: &[&str]| Change {
            table,
            op,
            rows: rows.iter().map(|r| (*r).to_owned()).collect(),
        };
        let mut intent = IntentKeys::new();
        intent.add(
            &tables,
            &change(
                0,
                ChangeOp::Upsert,
                &[r#"{"id":1,"v":"a'b"}"#, r#"{"id":2,"v":null}"#],
            ),
        );
        intent.add(&tables, &change(1, ChangeOp::Append, &[r#"{"id":9,"v":"x\\y"}"#]));
        intent.add(
            &tables,
            &change(0, ChangeOp::Delete, &[r#"{"id":1,"v":"c"}"#, "not json"]),
        );
        assert_eq!(intent.keys(), 2);
        let sql = intent.sql(&tables, 7, "p'x");
        let literal = sql
            .split_once("E'[")
            .and_then(|(_, rest)| rest.split_once("'::jsonb)"))
            .map(|(json, _)| format!("[{json}").replace("''", "'").replace("\\\\", "\\"))
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&literal).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!([
                {"t": "public.t", "k": [{"id": 1}, {"id": 2}]},
                {"t": "public.log", "r": [{"id": 9, "v": "x\\y"}]}
            ])
        );
        assert!(
            sql.contains("VALUES (7, clock_timestamp(), E'p''x', E'["),
            "{sql}"
        );
    }

    #[test]
    fn keys_come_from_the_key_columns_only() {
        let key = vec!["b".to_owned(), "a".to_owned()];
        assert_eq!(
            key_text(&key, r#"{"a":1,"x":{"y":[1,2]},"b":"it's \"q\"","c":null}"#).as_deref(),
            Some(r#"{"b":"it's \"q\"","a":1}"#)
        );
        // Numbers keep their text (arbitrary precision), whatever their size.
        assert_eq!(
            key_text(&["a".to_owned()], r#"{"a":123456789012345678901234567890.50}"#).as_deref(),
            Some(r#"{"a":123456789012345678901234567890.50}"#)
        );
        assert_eq!(key_text(&key, r#"{"a":1}"#), None);
        assert_eq!(key_text(&key, r#"[1]"#), None);
        assert_eq!(key_text(&key, r#"{"a":1,"b":2} x"#), None);
    }
}
