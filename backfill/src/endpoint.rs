//! Reaching the stores: one connection per worker and store, errors that name the store, and
//! which failures are worth another try.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection as _;
use switchyard_config::StoreUrl;
use switchyard_store::{ErrorKind, StoreError};

use crate::BackfillError;

/// How to reach one store.
#[derive(Debug, Clone)]
pub struct Endpoint {
    role: &'static str,
    options: PgConnectOptions,
    url: String,
    timeout: Duration,
}

impl Endpoint {
    /// The store at `url`; connections give up after `timeout`.
    pub fn new(role: &'static str, url: &StoreUrl, timeout: Duration) -> Endpoint {
        // READ COMMITTED by default whatever the store's default (the fence relies on it on
        // NEW); the chunk's reads of OLD ask for REPEATABLE READ themselves.
        let options = switchyard_store::connect_options(url, "switchyard-backfill");
        Endpoint {
            role,
            options,
            url: url.redacted().to_string(),
            timeout,
        }
    }

    /// The connect options (for pools).
    pub fn options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// A small pool (for the checks and the state queries), connected now so that an
    /// unreachable store is reported with its URL.
    pub async fn pool(&self, size: u32) -> Result<sqlx::PgPool, StoreError> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(self.timeout)
            .connect_with(self.options.clone())
            .await
            .map_err(|source| StoreError::Unavailable {
                role: self.role,
                url: self.url.clone(),
                source,
            })
    }

    /// A new connection, or the store named in the error.
    pub async fn connect(&self) -> Result<PgConnection, StoreError> {
        match tokio::time::timeout(self.timeout, PgConnection::connect_with(&self.options)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(source)) => Err(StoreError::Unavailable {
                role: self.role,
                url: self.url.clone(),
                source,
            }),
            Err(_) => Err(StoreError::Timeout {
                role: self.role,
                url: self.url.clone(),
                timeout: self.timeout,
            }),
        }
    }

    /// The error for a failed statement on this store.
    pub(crate) fn failed(&self, action: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
        let role = self.role;
        move |source| StoreError::Query {
            role,
            action: action.to_owned(),
            source,
        }
    }
}

/// Whether a failure is worth another try on fresh connections: what the store layer calls
/// safe to retry (lost connections, server restarts, timeouts, lock timeouts, and deadlocks and
/// serialization failures: a mirrored transaction and a chunk can wait on each other's key).
pub fn retryable(error: &BackfillError) -> bool {
    matches!(error, BackfillError::Store(e) if e.retry_safe())
}

/// Whether an error is a unique violation: on the fast path, a key got a record or a row
/// between the range check and the COPY.
pub fn unique_violation(error: &BackfillError) -> bool {
    matches!(error, BackfillError::Store(e @ StoreError::Query { .. }) if e.kind() == ErrorKind::UniqueViolation)
}
