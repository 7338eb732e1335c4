//! Sequences moved past the other store's before it takes writes.
//!
//! Row images carry the values OLD's sequences gave (a `serial` id, an identity column), so
//! NEW's own sequences never advance while OLD is authoritative. Before NEW takes writes
//! (cutover), each sequence the configured tables use must be set past OLD's, or NEW's first
//! insert would reuse a key; before a rollback to OLD authority, the same the other way.
//!
//! [`table_sequences`] finds the sequences of the configured tables on the source store: owned
//! ones (`serial`, `OWNED BY`; `pg_depend` type `a`), identity columns (type `i`), and any
//! column default that calls `nextval` on a sequence (a sequence shared by several tables;
//! the default's `pg_attrdef` entry depends on it, type `n`).
//! <https://www.postgresql.org/docs/current/catalog-pg-depend.html>
//!
//! [`advance_sequences`] reads each one's state on the source (`last_value`, `is_called`, its
//! increment from `pg_sequence`) and sets the same-named sequence on the target to the source's
//! `last_value` plus `margin` increments, never moving it back: a target already that far
//! along stays. A sequence that counts down (negative increment) is moved down the same way.
//! The margin covers values the source hands out between the read and the moment writes stop
//! reaching it; `setval` is not transactional, so the target should take no `nextval` calls
//! while this runs (before cutover NEW only applies row images, which carry their values).
//! <https://www.postgresql.org/docs/current/functions-sequence.html>

use serde::Serialize;
use sqlx::postgres::PgPool;
use sqlx::AssertSqlSafe;
use switchyard_config::TableName;

use crate::postgres::catalog::{quote_ident, quote_table};
use crate::{Store, StoreError};

/// The default safety margin, in increments, between the source's value and the target's.
pub const DEFAULT_MARGIN: u32 = 1000;

/// Why the sequences could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    /// A query failed, or a store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sequences the source's tables use do not exist on the target.
    #[error("{role} store: missing sequences {}: create them (with the same names) before moving authority", names.join(", "))]
    Missing {
        /// The target store (`OLD` or `NEW`).
        role: &'static str,
        /// `schema.sequence`, each with the tables that use it.
        names: Vec<String>,
    },
    /// A sequence cannot be set past the source's value on the target.
    #[error("{role} store: sequence {sequence}: {reason}")]
    Unsettable {
        /// The target store.
        role: &'static str,
        /// `schema.sequence`.
        sequence: String,
        /// Why (increments of opposite signs, the target's bound too small).
        reason: String,
    },
}

/// A sequence one or more configured tables use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSequence {
    /// `schema.sequence`, as stored (for people).
    pub sequence: String,
    /// The sequence, quoted for SQL.
    #[serde(skip)]
    pub quoted: String,
    /// The configured tables using it (`schema.table`).
    pub tables: Vec<String>,
}

/// What [`advance_sequences`] did to one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceMove {
    /// `schema.sequence`.
    pub sequence: String,
    /// The configured tables using it.
    pub tables: Vec<String>,
    /// The source's increment.
    pub increment: i64,
    /// The source's `last_value`.
    pub source_value: i64,
    /// Whether the source has handed out `source_value` (`is_called`).
    pub source_called: bool,
    /// The last value the target handed out before (its `last_value` less one increment when
    /// it was never called).
    pub target_before: i64,
    /// The target's `last_value` after (`is_called` true); `target_before` when it stayed.
    pub target_after: i64,
    /// Whether the target was moved (false: it was already past).
    pub moved: bool,
}

/// The sequences `tables` use on `store` (tables missing on it are skipped), ordered by name.
pub async fn table_sequences(store: &Store, tables: &[TableName]) -> Result<Vec<TableSequence>, StoreError> {
    let Store::Postgres(pg) = store;
    let quoted: Vec<String> = tables.iter().map(quote_table).collect();
    let rows: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "WITH t AS (SELECT to_regclass(q) AS oid, n AS name FROM unnest($1::text[], $2::text[]) AS u(q, n)), \
         used AS ( \
           SELECT d.objid AS seq, t.name FROM t JOIN pg_depend d \
             ON d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
            AND d.refobjid = t.oid AND d.deptype IN ('a', 'i') \
           UNION \
           SELECT d.refobjid, t.name FROM t JOIN pg_attrdef ad ON ad.adrelid = t.oid JOIN pg_depend d \
             ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass) \
         SELECT n.nspname::text, s.relname::text, array_agg(DISTINCT used.name ORDER BY used.name) \
         FROM used JOIN pg_class s ON s.oid = used.seq AND s.relkind = 'S' \
         JOIN pg_namespace n ON n.oid = s.relnamespace \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(&quoted)
    .bind(tables.iter().map(ToString::to_string).collect::<Vec<_>>())
    .fetch_all(pg.pool())
    .await
    .map_err(pg_failed(store, "finding the tables' sequences"))?;
    Ok(rows
        .into_iter()
        .map(|(schema, name, tables)| TableSequence {
            sequence: format!("{schema}.{name}"),
            quoted: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            tables,
        })
        .collect())
}

/// A sequence's state as read on one store.
#[derive(Debug, Clone, Copy)]
struct State {
    last_value: i64,
    is_called: bool,
    increment: i64,
    min_value: i64,
    max_value: i64,
}

impl State {
    /// The last value handed out (or, never called, the one before the first).
    fn position(&self) -> i128 {
        if self.is_called {
            i128::from(self.last_value)
        } else {
            i128::from(self.last_value) - i128::from(self.increment)
        }
    }
}

async fn state(pool: &PgPool, quoted: &str) -> Result<Option<State>, sqlx::Error> {
    let exists: Option<i64> = sqlx::query_scalar(
        "SELECT c.oid::int8 FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind = 'S'",
    )
    .bind(quoted)
    .fetch_optional(pool)
    .await?
    .flatten();
    if exists.is_none() {
        return Ok(None);
    }
    let sql = format!(
        "SELECT s.last_value, s.is_called, p.seqincrement, p.seqmin, p.seqmax \
         FROM {quoted} s, pg_sequence p WHERE p.seqrelid = {}::regclass",
        crate::mirror::escape_literal(quoted)
    );
    let (last_value, is_called, increment, min_value, max_value): (i64, bool, i64, i64, i64) =
        sqlx::query_as(AssertSqlSafe(sql)).fetch_one(pool).await?;
    Ok(Some(State {
        last_value,
        is_called,
        increment,
        min_value,
        max_value,
    }))
}

/// Sets every sequence `tables` use on `source` past it on `target`: to the source's
/// `last_value` plus `margin` increments, unless the target is already there or beyond. Every
/// sequence is checked on the target before any is moved: missing ones are reported together
/// ([`SequenceError::Missing`]) and nothing is changed.
pub async fn advance_sequences(
    source: &Store,
    target: &Store,
    tables: &[TableName],
    margin: u32,
) -> Result<Vec<SequenceMove>, SequenceError> {
    let (Store::Postgres(src), Store::Postgres(dst)) = (source, target);
    let sequences = table_sequences(source, tables).await?;
    let mut plan = Vec::new();
    let mut missing = Vec::new();
    for seq in sequences {
        let from = state(src.pool(), &seq.quoted)
            .await
            .map_err(pg_failed(source, "reading a sequence"))?;
        let to = state(dst.pool(), &seq.quoted)
            .await
            .map_err(pg_failed(target, "reading a sequence"))?;
        match (from, to) {
            (Some(from), Some(to)) => plan.push((seq, from, to)),
            (Some(_), None) => missing.push(format!("{} (used by {})", seq.sequence, seq.tables.join(", "))),
            // Dropped on the source since it was listed: nothing to carry over.
            (None, _) => {}
        }
    }
    let role = target.role().name();
    if !missing.is_empty() {
        return Err(SequenceError::Missing { role, names: missing });
    }
    let mut moves = Vec::new();
    for (seq, from, to) in plan {
        let unsettable = |reason: String| SequenceError::Unsettable {
            role,
            sequence: seq.sequence.clone(),
            reason,
        };
        if from.increment.signum() != to.increment.signum() {
            return Err(unsettable(format!(
                "it counts the other way ({} per call, the source's {}); align the two",
                to.increment, from.increment
            )));
        }
        let up = from.increment > 0;
        let want = i128::from(from.last_value) + i128::from(margin) * i128::from(from.increment);
        let before = to.position();
        let target_before = i64::try_from(before).unwrap_or(to.last_value);
        let ahead = if up { before >= want } else { before <= want };
        let bound = if up { to.max_value } else { to.min_value };
        let target_after = match i64::try_from(want) {
            _ if ahead => target_before,
            Ok(v) if (up && v <= bound) || (!up && v >= bound) => v,
            _ => {
                return Err(unsettable(format!(
                    "{want} ({} plus {margin} increments) is beyond its bound {bound}",
                    from.last_value
                )))
            }
        };
        moves.push((
            seq.quoted,
            SequenceMove {
                sequence: seq.sequence,
                tables: seq.tables,
                increment: from.increment,
                source_value: from.last_value,
                source_called: from.is_called,
                target_before,
                target_after,
                moved: !ahead,
            },
        ));
    }
    // Only once every sequence is known to be settable.
    for (quoted, m) in moves.iter().filter(|(_, m)| m.moved) {
        sqlx::query("SELECT setval($1::regclass, $2, true)")
            .bind(quoted)
            .bind(m.target_after)
            .execute(dst.pool())
            .await
            .map_err(pg_failed(target, "setting a sequence"))?;
    }
    Ok(moves.into_iter().map(|(_, m)| m).collect())
}

fn pg_failed(store: &Store, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    crate::mirror::failed(store.role().as_str(), action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_the_last_value_handed_out() {
        let s = State {
            last_value: 1,
            is_called: false,
            increment: 1,
            min_value: 1,
            max_value: i64::MAX,
        };
        assert_eq!(s.position(), 0);
        assert_eq!(State { is_called: true, ..s }.position(), 1);
        let down = State {
            last_value: -1,
            is_called: false,
            increment: -1,
            min_value: i64::MIN,
            max_value: -1,
        };
        assert_eq!(down.position(), 0);
    }
}
