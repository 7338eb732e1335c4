//! What can go wrong talking to a store, and what a caller may do about it.
//!
//! [`StoreError`] says where a failure happened; [`ErrorKind`] says what it was, as the one
//! classification every caller uses to decide whether to try again (the backfill's chunk
//! retries, the repair loop's re-read of table definitions). The SQLSTATE codes and driver
//! errors behind each kind are matched here and nowhere else.
//! <https://www.postgresql.org/docs/current/errcodes-appendix.html>

use std::time::Duration;

use switchyard_pgwire::sqlstate::{self, SqlState};

use crate::Role;

/// A failure talking to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine named by the URL is not implemented in this build.
    #[error("{role} store: {engine} is not supported yet (PostgreSQL only for now)")]
    UnsupportedEngine {
        /// Which store.
        role: &'static str,
        /// The engine asked for.
        engine: &'static str,
    },
    /// The store could not be reached or refused us.
    #[error("{role} store {url}: {source}")]
    Unavailable {
        /// Which store.
        role: &'static str,
        /// Redacted URL.
        url: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The store did not answer in time.
    #[error("{role} store {url}: no answer within {timeout:?}")]
    Timeout {
        /// Which store.
        role: &'static str,
        /// Redacted URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// Reading a table's definition from the system catalogs failed ([`load_table`], which does
    /// not know which store it was given; callers that do turn this into [`StoreError::Query`]).
    #[error("reading the catalog entry of {table}: {}", describe(.source))]
    Catalog {
        /// The table, `schema.table`.
        table: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A statement failed on a store (or the store could not be reached to run it).
    #[error("{role} store: {action}: {}", describe(.source))]
    Query {
        /// Which store.
        role: &'static str,
        /// What the statement was doing, e.g. `creating switchyard.switchyard_tables`.
        action: String,
        /// The driver's error.
        source: sqlx::Error,
    },
}

/// A driver error for people: a server error as its message, SQLSTATE, detail and hint (sqlx's
/// own `Display` appends the line of PostgreSQL's C source that raised it, which reads like a
/// line of the statement); anything else as sqlx words it.
fn describe(error: &sqlx::Error) -> String {
    let Some(db) = error.as_database_error() else {
        return error.to_string();
    };
    let mut text = db.message().to_owned();
    if let Some(code) = db.code() {
        text.push_str(&format!(" (SQLSTATE {code})"));
    }
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        for (label, value) in [("detail", pg.detail()), ("hint", pg.hint())] {
            if let Some(value) = value {
                text.push_str(&format!("; {label}: {value}"));
            }
        }
    }
    text
}

impl StoreError {
    /// What kind of failure this is. A connection that broke or a lock given up on while
    /// reading the catalog is the connection or the lock, not the catalog.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::UnsupportedEngine { .. } => ErrorKind::UnsupportedEngine,
            // Whatever the server said while we logged in (it is restarting, it refused us),
            // the store is not there for us right now.
            StoreError::Unavailable { .. } => ErrorKind::Connection,
            StoreError::Timeout { .. } => ErrorKind::Timeout,
            StoreError::Query { source, .. } => ErrorKind::of_driver(source),
            StoreError::Catalog { source, .. } => match ErrorKind::of_driver(source) {
                kind if kind.retry_safe() => kind,
                _ => ErrorKind::Catalog,
            },
        }
    }

    /// Whether the work that failed may simply be done again on a fresh connection
    /// ([`ErrorKind::retry_safe`]).
    pub fn retry_safe(&self) -> bool {
        self.kind().retry_safe()
    }

    /// Names the store a [`StoreError::Catalog`] came from; other errors are returned as they are.
    pub fn in_store(self, role: Role) -> StoreError {
        match self {
            StoreError::Catalog { table, source } => StoreError::Query {
                role: role.as_str(),
                action: format!("reading the catalog entry of {table}"),
                source,
            },
            other => other,
        }
    }
}

/// What a store failure was, for deciding what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The connection could not be made or was lost, or the server is shutting down or not yet
    /// accepting connections (class 08, `57P01`..`57P03`, I/O and TLS failures).
    Connection,
    /// No answer within our limit, or no pooled connection free in time.
    Timeout,
    /// The transaction lost a race with another one: a serialization failure (`40001`) or a
    /// deadlock (`40P01`). PostgreSQL rolled it back and says a retry may succeed.
    Conflict,
    /// A lock was not granted within `lock_timeout` (`55P03`).
    LockNotAvailable,
    /// A row with the same unique key exists (`23505`).
    UniqueViolation,
    /// The statement does not fit the tables as the server now defines them: a column or table
    /// gone (class 42), a plan whose row type changed (`0A000`), a `NOT NULL` column the
    /// statement does not fill (`23502`), a value the column's type no longer takes (class 22).
    /// The codes cannot tell a changed definition from a statement wrong in itself: a caller
    /// that built the statement from definitions it read reads them again.
    SchemaMismatch,
    /// Any other failed statement.
    Statement,
    /// Reading a table's definition failed for a reason other than the ones above.
    Catalog,
    /// The engine is not implemented in this build.
    UnsupportedEngine,
}

impl ErrorKind {
    /// Whether the same work may be done again on a fresh connection and could succeed: nothing
    /// was committed by the failed attempt, and the cause may be gone next time.
    pub fn retry_safe(self) -> bool {
        match self {
            ErrorKind::Connection
            | ErrorKind::Timeout
            | ErrorKind::Conflict
            | ErrorKind::LockNotAvailable => true,
            ErrorKind::UniqueViolation
            | ErrorKind::SchemaMismatch
            | ErrorKind::Statement
            | ErrorKind::Catalog
            | ErrorKind::UnsupportedEngine => false,
        }
    }

    /// The kind of an error a PostgreSQL server raised with SQLSTATE `code` (from the driver, or
    /// from an ErrorResponse read off the wire).
    pub fn of_sqlstate(code: &str) -> ErrorKind {
        let is = |state: SqlState| code.as_bytes() == state.0;
        let in_class = |class: SqlState| code.as_bytes().get(..2) == Some(&class.0[..2]);
        if in_class(sqlstate::CONNECTION_EXCEPTION)
            || is(sqlstate::ADMIN_SHUTDOWN)
            || is(sqlstate::CRASH_SHUTDOWN)
            || is(sqlstate::CANNOT_CONNECT_NOW)
        {
            ErrorKind::Connection
        } else if is(sqlstate::T_R_SERIALIZATION_FAILURE) || is(sqlstate::T_R_DEADLOCK_DETECTED) {
            ErrorKind::Conflict
        } else if is(sqlstate::LOCK_NOT_AVAILABLE) {
            ErrorKind::LockNotAvailable
        } else if is(sqlstate::UNIQUE_VIOLATION) {
            ErrorKind::UniqueViolation
        } else if in_class(sqlstate::SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION)
            || in_class(sqlstate::DATA_EXCEPTION)
            || is(sqlstate::FEATURE_NOT_SUPPORTED)
            || is(sqlstate::NOT_NULL_VIOLATION)
        {
            ErrorKind::SchemaMismatch
        } else {
            ErrorKind::Statement
        }
    }

    /// The kind of a driver error: the server's SQLSTATE when a server raised it, otherwise what
    /// sqlx says happened to the connection.
    fn of_driver(error: &sqlx::Error) -> ErrorKind {
        match error {
            sqlx::Error::Database(db) => ErrorKind::of_sqlstate(&db.code().unwrap_or_default()),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => ErrorKind::Connection,
            sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Statement,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn sqlstates_map_to_kinds() {
        for code in ["08000", "08006", "08P01", "57P01", "57P02", "57P03"] {
            assert_eq!(ErrorKind::of_sqlstate(code), ErrorKind::Connection, "{code}");
        }
        assert_eq!(ErrorKind::of_sqlstate("40001"), ErrorKind::Conflict);
        assert_eq!(ErrorKind::of_sqlstate("40P01"), ErrorKind::Conflict);
        assert_eq!(ErrorKind::of_sqlstate("55P03"), ErrorKind::LockNotAvailable);
        assert_eq!(ErrorKind::of_sqlstate("23505"), ErrorKind::UniqueViolation);
        for code in ["42703", "42P01", "22P02", "0A000", "23502"] {
            assert_eq!(ErrorKind::of_sqlstate(code), ErrorKind::SchemaMismatch, "{code}");
        }
        for code in ["57014", "23503", "XX000", "", "4", "P0001"] {
            assert_eq!(ErrorKind::of_sqlstate(code), ErrorKind::Statement, "{code}");
        }
    }

    #[test]
    fn only_transient_kinds_are_retry_safe() {
        let safe: Vec<ErrorKind> = [
            ErrorKind::Connection,
            ErrorKind::Timeout,
            ErrorKind::Conflict,
            ErrorKind::LockNotAvailable,
            ErrorKind::UniqueViolation,
            ErrorKind::SchemaMismatch,
            ErrorKind::Statement,
            ErrorKind::Catalog,
            ErrorKind::UnsupportedEngine,
        ]
        .into_iter()
        .filter(|k| k.retry_safe())
        .collect();
        assert_eq!(
            safe,
            [
                ErrorKind::Connection,
                ErrorKind::Timeout,
                ErrorKind::Conflict,
                ErrorKind::LockNotAvailable
            ]
        );
    }
}
