//! The engine-neutral store layer.
//!
//! A [`Store`] is one database Switchyard talks to (OLD or NEW) outside the wire-protocol relay:
//! health checks now; row images, fenced applies and version bookkeeping as dual writes and the
//! backfill arrive. Engines are variants of one enum rather than trait objects, so every engine
//! keeps native async functions and the compiler lists each place a new engine must handle.
//! PostgreSQL is implemented; MySQL/MariaDB (sqlx) and MongoDB (mongodb driver) join later.
//!
//! [`load_table`] reads a PostgreSQL table's columns and keys, [`compare`] checks NEW's copy
//! against OLD's, and [`prepare()`] creates the side tables that dual writes and the backfill use.

pub mod backfill_state;
pub mod capture;
pub mod intent;
pub mod mirror;
mod postgres;
pub mod prepare;
pub mod repair;

use std::time::Duration;

use switchyard_config::{Engine, StoreUrl};

pub use postgres::catalog::{
    compare, compare_in, effective_key, keys_table, keys_table_name, load_table, quote_ident, quote_table,
    Column, Identity, Mismatch, TableSchema, SIDE_SCHEMA,
};
pub use postgres::{connect_options, wire, PgStore};
pub use prepare::{prepare, prepare_in, PrepareReport, PreparedTable};

/// Which side of the migration a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The store the application used so far.
    Old,
    /// The store being migrated to.
    New,
}

impl Role {
    /// `"old"` or `"new"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Old => "old",
            Role::New => "new",
        }
    }

    /// `"OLD"` or `"NEW"`, as messages name the stores.
    pub fn name(self) -> &'static str {
        match self {
            Role::Old => "OLD",
            Role::New => "NEW",
        }
    }

    /// The store's settings in `config` (`[old]` or `[new]`).
    pub fn settings(self, config: &switchyard_config::Config) -> &switchyard_config::StoreSettings {
        match self {
            Role::Old => &config.old,
            Role::New => &config.new,
        }
    }
}

/// The two stores of a migration by what they do, not by their names. The authoritative store
/// runs the clients' statements first, decides what committed, and holds the capture triggers
/// and the intents; the follower receives the row images and holds the key records,
/// tombstones and applied markers that fence them. Before cutover OLD is authoritative; from
/// cutover NEW is, and OLD follows, so a rollback loses nothing. `Role` stays the config's name
/// of each store, for messages and settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Where clients' statements run and commits are decided.
    pub authoritative: Role,
    /// Where row images are mirrored to.
    pub follower: Role,
}

impl Roles {
    /// Before cutover: OLD authoritative, NEW following.
    pub const OLD_AUTHORITATIVE: Roles = Roles {
        authoritative: Role::Old,
        follower: Role::New,
    };
    /// From cutover: NEW authoritative, OLD following.
    pub const NEW_AUTHORITATIVE: Roles = Roles {
        authoritative: Role::New,
        follower: Role::Old,
    };
}

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
    /// The SQLSTATE of the server error behind this one, if a server raised it.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Query { source, .. }
            | StoreError::Catalog { source, .. }
            | StoreError::Unavailable { source, .. } => {
                source.as_database_error()?.code().map(|c| c.into_owned())
            }
            _ => None,
        }
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

/// One store, whatever its engine.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL through sqlx.
    Postgres(PgStore),
}

impl Store {
    /// Prepares a handle for the store at `url`. Connects lazily: an unreachable store is
    /// reported by the first operation, not here, so the proxy can start before its stores.
    pub fn connect_lazy(role: Role, url: &StoreUrl) -> Result<Store, StoreError> {
        match url.engine {
            Engine::Postgres => Ok(Store::Postgres(PgStore::connect_lazy(role, url))),
            other => Err(StoreError::UnsupportedEngine {
                role: role.as_str(),
                engine: other.as_str(),
            }),
        }
    }

    /// Which side this store is.
    pub fn role(&self) -> Role {
        match self {
            Store::Postgres(s) => s.role(),
        }
    }

    /// Runs a trivial query and returns how long the round trip took.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, StoreError> {
        match self {
            Store::Postgres(s) => s.ping(timeout).await,
        }
    }
}
