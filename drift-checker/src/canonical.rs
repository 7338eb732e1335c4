//! Rows as canonical values, so that equal data compares equal.
//!
//! A row is compared as `to_jsonb(row)::text`, read on a connection whose output settings are
//! fixed: `jsonb` orders object keys and prints numbers and strings one way; the settings fix how
//! the values inside print (timestamps with time zone in UTC, ISO dates, `postgres` intervals,
//! shortest exact floats, hex `bytea`). Whatever the client sessions that wrote the rows used,
//! and whatever the servers' defaults, two equal rows give the same text. Keys are read as text
//! on the same connections and bound back with a cast to the key column's type.
//!
//! Across engines (a MySQL or MongoDB NEW, later) the same role falls to each engine's adapter:
//! it must produce this same canonical JSON for equal values.

use switchyard_store::PoolSettings;

/// The session settings of every connection the drift checker reads with.
/// <https://www.postgresql.org/docs/current/runtime-config-client.html#RUNTIME-CONFIG-CLIENT-FORMAT>
pub const SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
];

/// A pool set up to read canonical values.
pub fn pool_settings() -> PoolSettings {
    PoolSettings {
        application_name: "switchyard-drift",
        // A verify's workers each hold one connection per store, and the verify lock one more.
        max_connections: crate::MAX_WORKERS as u32 + 2,
        server_settings: SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..PoolSettings::default()
    }
}

/// The two expressions a store's rows are compared by (`alias` is the row's alias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowExprs {
    /// Hashed per row when whole key ranges are compared: the row's own text (`record` output),
    /// on the fixed settings; about half the cost of `to_jsonb` per row. Equal rows give equal
    /// text when both stores list the compared columns in the same order.
    pub fast: String,
    /// The canonical text of the row: `jsonb` of the compared columns, by name.
    pub exact: String,
}

impl RowExprs {
    /// The expressions for a store whose table has `columns` (in its own order), comparing
    /// only `compared` (OLD's columns, in OLD's order), by name. When the store's columns are
    /// exactly OLD's, the whole row is used as it is (the cheapest form); otherwise the fast
    /// form lists the compared columns in OLD's order and the exact form drops the columns OLD
    /// does not have, so a NEW with extra or reordered columns compares equal when the data
    /// OLD has is equal.
    pub fn new(alias: &str, columns: &[String], compared: &[String]) -> RowExprs {
        if columns == compared {
            return RowExprs {
                fast: format!("{alias}::text"),
                exact: format!("to_jsonb({alias})::text"),
            };
        }
        let listed: Vec<String> = compared
            .iter()
            .map(|c| format!("{alias}.{}", switchyard_store::quote_ident(c)))
            .collect();
        let extra: Vec<String> = columns
            .iter()
            .filter(|c| !compared.contains(c))
            .map(|c| switchyard_store::mirror::escape_literal(c))
            .collect();
        let exact = if extra.is_empty() {
            format!("to_jsonb({alias})::text")
        } else {
            format!("(to_jsonb({alias}) - ARRAY[{}]::text[])::text", extra.join(", "))
        };
        RowExprs {
            fast: format!("ROW({})::text", listed.join(", ")),
            exact,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn same_columns_use_the_whole_row() {
        let e = RowExprs::new("t", &names(&["id", "v"]), &names(&["id", "v"]));
        assert_eq!(e.fast, "t::text");
        assert_eq!(e.exact, "to_jsonb(t)::text");
    }

    #[test]
    fn extra_and_reordered_columns_compare_by_name() {
        let e = RowExprs::new("t", &names(&["v", "added", "id"]), &names(&["id", "v"]));
        assert_eq!(e.fast, r#"ROW(t."id", t."v")::text"#);
        assert_eq!(e.exact, "(to_jsonb(t) - ARRAY[E'added']::text[])::text");
        let reordered = RowExprs::new("t", &names(&["v", "id"]), &names(&["id", "v"]));
        assert_eq!(reordered.exact, "to_jsonb(t)::text");
        assert_eq!(reordered.fast, r#"ROW(t."id", t."v")::text"#);
    }
}
