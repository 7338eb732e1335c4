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
        server_settings: SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..PoolSettings::default()
    }
}

/// The SQL expression hashed per row when whole key ranges are compared: the row's own text
/// (`record` output), on the same fixed settings. About half the cost of `to_jsonb` per row.
/// Equal rows with the same column order give the same text; a table whose columns are ordered
/// differently on the two stores makes every range differ, and the exact comparison
/// ([`row_expr`], by column name) then finds no difference: slower, never wrong.
pub fn fast_row_expr(alias: &str) -> String {
    format!("{alias}::text")
}

/// The SQL expression of the canonical text of row `alias`.
pub fn row_expr(alias: &str) -> String {
    format!("to_jsonb({alias})::text")
}
