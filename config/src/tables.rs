//! Per-table migration settings (`[[tables]]`): which table, which phase,
//! and how much read traffic NEW serves.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

/// Where a table is in its migration from OLD to NEW.
///
/// The phases run in the order listed, and a table may be rolled back from any
/// phase to an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// OLD serves everything; NEW is not touched.
    Passthrough,
    /// OLD is authoritative; writes are mirrored to NEW; reads from OLD.
    DualWrite,
    /// As `DualWrite`, and reads also run on NEW to compare results; clients
    /// get OLD's answer.
    ShadowRead,
    /// As `DualWrite`, and `read_share` percent of eligible reads are served
    /// by NEW.
    ReadShift,
    /// NEW is authoritative and writes are mirrored back to OLD, so a
    /// rollback loses nothing.
    Cutover,
    /// NEW serves everything; OLD is no longer written.
    Done,
}

impl Phase {
    /// Every phase, in migration order.
    pub const ALL: [Phase; 6] = [
        Phase::Passthrough,
        Phase::DualWrite,
        Phase::ShadowRead,
        Phase::ReadShift,
        Phase::Cutover,
        Phase::Done,
    ];

    /// Whether NEW takes the writes in this phase (`cutover` and `done`); OLD before.
    pub fn new_takes_writes(self) -> bool {
        matches!(self, Phase::Cutover | Phase::Done)
    }

    /// The name used in configuration files: `passthrough`, `dual_write`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::DualWrite => "dual_write",
            Self::ShadowRead => "shadow_read",
            Self::ReadShift => "read_shift",
            Self::Cutover => "cutover",
            Self::Done => "done",
        }
    }

    /// The valid names, comma separated, for error messages.
    pub(crate) fn valid_names() -> String {
        Self::ALL.map(Phase::as_str).join(", ")
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    /// Parses a phase name; the error lists the valid names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase {s:?}; expected one of {}", Self::valid_names()))
    }
}

/// A schema-qualified table name. Written `schema.table` or `table` (which
/// means `public.table`); `Display` always gives `schema.table`.
///
/// Names are kept exactly as written, so they match PostgreSQL's stored
/// (folded to lowercase, for unquoted identifiers) names only if written
/// that way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema, `public` when none was written.
    pub schema: String,
    /// The table.
    pub table: String,
}

impl TableName {
    /// Builds a name from its parts, without validation.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
        }
    }
}

impl FromStr for TableName {
    type Err = String;

    /// Parses `schema.table` or `table`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        let (schema, table) = match parts.as_slice() {
            [table] => ("public", *table),
            [schema, table] => (*schema, *table),
            _ => {
                return Err(format!(
                    "table name {s:?} has too many dots; write \"schema.table\" or \"table\""
                ))
            }
        };
        for part in [schema, table] {
            if part.is_empty() {
                return Err(format!(
                    "table name {s:?} has an empty part; write \"schema.table\" or \"table\""
                ));
            }
            if part
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"')
            {
                return Err(format!(
                    "table name {s:?} contains whitespace, control characters or quotes"
                ));
            }
        }
        Ok(Self::new(schema, table))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Serializes as the string `schema.table`.
impl Serialize for TableName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// `shadow_share` when the entry does not set it: every eligible read is compared. The shadow
/// runs are bounded per proxy (beyond the bound they are skipped and counted), so the share is
/// a cost knob for NEW, not a safety one.
pub const DEFAULT_SHADOW_SHARE: u8 = 100;

/// One `[[tables]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSettings {
    /// The table this entry is about.
    pub name: TableName,
    /// Its migration phase.
    pub phase: Phase,
    /// Percent (0..=100) of eligible reads served by NEW in
    /// [`Phase::ReadShift`].
    pub read_share: u8,
    /// Percent (0..=100) of eligible reads that also run on NEW, to compare their results, in
    /// [`Phase::ShadowRead`] (default [`DEFAULT_SHADOW_SHARE`]). The client always gets OLD's
    /// answer.
    pub shadow_share: u8,
    /// `key`: the columns that identify a row, for tables without a primary key. Empty (the
    /// default) means the table's primary key; a table with neither is mirrored append-only.
    pub key: Vec<String>,
    /// `on_uncaptured`: what happens to a write the proxy cannot capture as row images.
    pub on_uncaptured: UncapturedPolicy,
    /// `group`: the table group whose write authority moves together at cutover and rollback.
    /// Tables without one form one group ([`DEFAULT_GROUP`]); a configuration without groups
    /// moves every table together.
    pub group: Option<String>,
}

/// The group of the tables that name none.
pub const DEFAULT_GROUP: &str = "default";

impl TableSettings {
    /// The table's group ([`DEFAULT_GROUP`] when it names none).
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(DEFAULT_GROUP)
    }
}

/// What to do with a write on a migrated table that cannot be mirrored as row images (TRUNCATE,
/// COPY FROM, DDL, a data-modifying CTE, UPDATE or DELETE on a table without a key, an UPDATE
/// that changes the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UncapturedPolicy {
    /// Refuse the statement with an error naming the table (the default): nothing diverges.
    #[default]
    Refuse,
    /// Run it on OLD only and mark the table as needing a full verification before cutover.
    MarkForVerify,
}

impl UncapturedPolicy {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::MarkForVerify => "mark_for_verify",
        }
    }
}

impl FromStr for UncapturedPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "mark_for_verify" => Ok(Self::MarkForVerify),
            _ => Err(format!(
                "unknown policy {s:?}; expected refuse or mark_for_verify"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(phase.as_str().parse::<Phase>().unwrap(), phase);
        }
        let err = "dualwrite".parse::<Phase>().unwrap_err();
        assert!(err.contains("dual_write") && err.contains("done"), "{err}");
    }

    #[test]
    fn table_names() {
        let t: TableName = "accounts".parse().unwrap();
        assert_eq!(t.to_string(), "public.accounts");
        let t: TableName = "billing.invoices".parse().unwrap();
        assert_eq!((t.schema.as_str(), t.table.as_str()), ("billing", "invoices"));
        for bad in ["", ".x", "x.", "a.b.c", "a b", "\"x\""] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?}");
        }
    }
}
