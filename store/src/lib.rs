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
pub mod cleanup;
mod error;
pub mod intent;
pub mod mirror;
mod postgres;
pub mod prepare;
pub mod repair;
pub mod sequences;
pub mod stale_reads;
pub mod table_writes;

use std::time::Duration;

use switchyard_config::{Engine, StoreUrl, TableName};

pub use error::{ErrorKind, StoreError};
pub use postgres::catalog::{
    compare, compare_in, effective_key, keys_table, keys_table_name, load_table, quote_ident, quote_table,
    Column, Identity, Mismatch, TableSchema, SIDE_SCHEMA,
};
pub use postgres::{connect_options, wire, PgStore};
pub use prepare::{
    prepare, prepare_in, prepare_with, set_capture, set_capture_and_fence, PrepareReport, PreparedTable,
    Triggers,
};

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

    /// The store that takes a table's writes in `phase`: NEW from `cutover` on, OLD before.
    pub fn taking_writes_in(phase: switchyard_config::Phase) -> Role {
        if phase.new_takes_writes() {
            Role::New
        } else {
            Role::Old
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

    /// The roles with `authoritative` taking the writes and the other store following.
    pub fn with_authoritative(authoritative: Role) -> Roles {
        match authoritative {
            Role::Old => Roles::OLD_AUTHORITATIVE,
            Role::New => Roles::NEW_AUTHORITATIVE,
        }
    }
}

/// How a pool of connections to a store is set up (the defaults suit occasional queries).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Shown by the server (`pg_stat_activity.application_name`).
    pub application_name: &'static str,
    /// Most connections open at once.
    pub max_connections: u32,
    /// Longest wait for a connection.
    pub acquire_timeout: Duration,
    /// Session settings the server applies at connection start (`statement_timeout`, ...).
    pub server_settings: Vec<(String, String)>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            application_name: "switchyard",
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            server_settings: Vec::new(),
        }
    }
}

/// A user function or procedure as the store defines it.
#[derive(Debug, Clone)]
pub struct FunctionSource {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its whole definition (`CREATE FUNCTION ...`).
    pub definition: String,
    /// The triggers that run it, as `name on table, ...`.
    pub triggers: Option<String>,
}

/// One store, whatever its engine.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL through sqlx.
    Postgres(PgStore),
}

impl Store {
    /// Closes the pool: idle connections at once, the others as they are given back. Later
    /// operations on this handle (or its clones) fail.
    pub async fn close(&self) {
        match self {
            Store::Postgres(pg) => pg.pool().close().await,
        }
    }

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

    /// Like [`Store::connect_lazy`], with the pool set up as `settings` say.
    pub fn connect_lazy_with(
        role: Role,
        url: &StoreUrl,
        settings: &PoolSettings,
    ) -> Result<Store, StoreError> {
        match url.engine {
            Engine::Postgres => Ok(Store::Postgres(PgStore::connect_lazy_with(role, url, settings))),
            other => Err(StoreError::UnsupportedEngine {
                role: role.as_str(),
                engine: other.as_str(),
            }),
        }
    }

    /// The definition of table `name`, if it exists.
    pub async fn load_table(&self, name: &TableName) -> Result<Option<TableSchema>, StoreError> {
        match self {
            Store::Postgres(s) => load_table(s.pool(), name).await.map_err(|e| e.in_store(s.role())),
        }
    }

    /// Whether the relation `rel` (`schema.name`) exists: the side tables `prepare` creates.
    pub async fn has_relation(&self, rel: &str) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(s) => s.has_relation(rel).await,
        }
    }

    /// Which of the relations `rels` (`schema.name`) do not exist, in one round trip.
    pub async fn missing_relations(&self, rels: &[String]) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Postgres(s) => s.missing_relations(rels).await,
        }
    }

    /// Every user function and procedure, for the statement analysis (which of them write a
    /// migrated table).
    pub async fn function_sources(&self) -> Result<Vec<FunctionSource>, StoreError> {
        match self {
            Store::Postgres(s) => s.function_sources().await,
        }
    }

    /// Which of `tables` (as [`quote_table`] quotes them) lack their capture trigger.
    pub async fn uncaptured_tables(&self, tables: &[String]) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Postgres(s) => s.uncaptured_tables(tables).await,
        }
    }

    /// The stored secret of role `user`, fetched with `auth_query` (`[auth] auth_lookup`).
    pub async fn role_secret(&self, auth_query: &str, user: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Postgres(s) => s.role_secret(auth_query, user).await,
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
