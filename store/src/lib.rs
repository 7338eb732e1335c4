//! The engine-neutral store layer.
//!
//! A [`Store`] is one database Switchyard talks to (OLD or NEW) outside the wire-protocol relay:
//! health checks now; row images, fenced applies and version bookkeeping as dual writes and the
//! backfill arrive. Engines are variants of one enum rather than trait objects, so every engine
//! keeps native async functions and the compiler lists each place a new engine must handle.
//! PostgreSQL is implemented; MySQL/MariaDB (sqlx) and MongoDB (mongodb driver) join later.

mod postgres;

use std::time::Duration;

use switchyard_config::{Engine, StoreUrl};

pub use postgres::PgStore;

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
