//! `ErrorKind` against a real PostgreSQL: each failure is provoked for real (a duplicate key, a
//! deadlock, a lock timeout, a refused connection, a terminated backend...) and must be
//! classified as the callers that retry on it expect.
//!
//! The server is `SWITCHYARD_TEST_PG` (an admin URL, as for the other real-database tests) or
//! the local default. Only temporary tables and advisory locks are used, so nothing is left
//! behind in that database.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, Executor};
use switchyard_store::{ErrorKind, StoreError};

fn pg_url() -> String {
    std::env::var("SWITCHYARD_TEST_PG")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn connect() -> PgConnection {
    PgConnection::connect(&pg_url()).await.unwrap()
}

/// A statement's failure as the store layer reports it.
fn query_error(source: sqlx::Error) -> StoreError {
    StoreError::Query {
        role: "old",
        action: "testing".to_owned(),
        source,
    }
}

/// Checks the kind of `e` and whether it is safe to retry.
fn expect(e: &StoreError, kind: ErrorKind, retry_safe: bool) {
    assert_eq!(e.kind(), kind, "{e}");
    assert_eq!(e.retry_safe(), retry_safe, "{e}");
}

/// Advisory lock keys (class, key) no other test on the server uses: the class is "SY" and the
/// key this process's id and a counter, so parallel tests and runs never share a lock.
fn lock_key() -> (i32, i32) {
    static NEXT: AtomicI32 = AtomicI32::new(0);
    let pid = i32::try_from(std::process::id() % 1_000_000).unwrap();
    (0x5359, pid * 1000 + NEXT.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn a_duplicate_key_is_a_unique_violation_and_not_retried() {
    let mut c = connect().await;
    c.execute("CREATE TEMP TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.execute("INSERT INTO t VALUES (1)").await.unwrap();
    let e = query_error(c.execute("INSERT INTO t VALUES (1)").await.unwrap_err());
    expect(&e, ErrorKind::UniqueViolation, false);
}

#[tokio::test]
async fn a_deadlock_is_a_conflict_and_safe_to_retry() {
    let (a_key, b_key) = (lock_key(), lock_key());
    let (mut a, mut b) = (connect().await, connect().await);
    for c in [&mut a, &mut b] {
        // The victim is chosen after deadlock_timeout (1 s by default).
        c.execute("SET deadlock_timeout = '20ms'; BEGIN").await.unwrap();
    }
    let lock = |(class, key): (i32, i32)| {
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(class)
            .bind(key)
    };
    lock(a_key).execute(&mut a).await.unwrap();
    lock(b_key).execute(&mut b).await.unwrap();
    let (ra, rb) = tokio::join!(lock(b_key).execute(&mut a), lock(a_key).execute(&mut b));
    let mut errors: Vec<StoreError> = [ra.err(), rb.err()]
        .into_iter()
        .flatten()
        .map(query_error)
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one of the two is the deadlock's victim: {errors:?}"
    );
    let e = errors.remove(0);
    expect(&e, ErrorKind::Conflict, true);
}

#[tokio::test]
async fn a_lock_timeout_is_lock_not_available_and_safe_to_retry() {
    let (class, key) = lock_key();
    let (mut holder, mut waiter) = (connect().await, connect().await);
    let lock = || {
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(class)
            .bind(key)
    };
    lock().execute(&mut holder).await.unwrap();
    waiter.execute("SET lock_timeout = '20ms'").await.unwrap();
    let e = query_error(lock().execute(&mut waiter).await.unwrap_err());
    expect(&e, ErrorKind::LockNotAvailable, true);
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_failure_and_safe_to_retry() {
    // Port 1 on the loopback: nothing listens there, the kernel refuses at once.
    let refused = PgConnection::connect("postgres://postgres@127.0.0.1:1/postgres")
        .await
        .unwrap_err();
    assert!(matches!(refused, sqlx::Error::Io(_)), "{refused:?}");
    let e = query_error(refused);
    expect(&e, ErrorKind::Connection, true);

    let source = PgConnection::connect("postgres://postgres@127.0.0.1:1/postgres")
        .await
        .unwrap_err();
    let e = StoreError::Unavailable {
        role: "new",
        url: "postgres://127.0.0.1:1/postgres".to_owned(),
        source,
    };
    expect(&e, ErrorKind::Connection, true);
}

#[tokio::test]
async fn a_terminated_backend_is_a_connection_failure_and_safe_to_retry() {
    let (mut victim, mut admin) = (connect().await, connect().await);
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut victim)
        .await
        .unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(ended);
    // The server's FATAL 57P01 if the driver reads it, the closed socket if it does not.
    let e = query_error(victim.execute("SELECT 1").await.unwrap_err());
    expect(&e, ErrorKind::Connection, true);
}

#[tokio::test]
async fn no_pooled_connection_in_time_is_a_timeout_and_safe_to_retry() {
    // In plain text: the first connection must be made within the 50 ms bound too, which a TLS
    // handshake (sqlx's default, `prefer`) in a debug build may not be.
    let options: sqlx::postgres::PgConnectOptions = pg_url().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(50))
        .connect_with(options.ssl_mode(sqlx::postgres::PgSslMode::Disable))
        .await
        .unwrap();
    let _held = pool.acquire().await.unwrap();
    let e = query_error(pool.acquire().await.unwrap_err());
    expect(&e, ErrorKind::Timeout, true);
}

#[tokio::test]
async fn statement_errors_are_not_retried() {
    let mut c = connect().await;
    c.execute("CREATE TEMP TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();

    let e = query_error(c.execute("SELECT gone FROM t").await.unwrap_err());
    expect(&e, ErrorKind::SchemaMismatch, false);

    // A statement_timeout (57014) is the statement's own limit: the backfill does not retry it.
    c.execute("SET statement_timeout = '10ms'").await.unwrap();
    let e = query_error(c.execute("SELECT pg_sleep(1)").await.unwrap_err());
    expect(&e, ErrorKind::Statement, false);
}

#[tokio::test]
async fn a_catalog_read_is_classified_by_its_cause() {
    let mut c = connect().await;
    let missing = c.execute("SELECT 'no_such_table'::regclass").await.unwrap_err();
    let e = StoreError::Catalog {
        table: "public.no_such_table".to_owned(),
        source: missing,
    };
    expect(&e, ErrorKind::Catalog, false);

    let refused = PgConnection::connect("postgres://postgres@127.0.0.1:1/postgres")
        .await
        .unwrap_err();
    let e = StoreError::Catalog {
        table: "public.t".to_owned(),
        source: refused,
    };
    expect(&e, ErrorKind::Connection, true);
}
