//! Test harness for Switchyard's real-database tests.
//!
//! Two kinds of fixture, both cleaned up on drop:
//!
//! - [`TestDb`]: a uniquely named database on a shared PostgreSQL server
//!   (`SWITCHYARD_TEST_PG`, default [`DEFAULT_PG_URL`]). Each test gets its own
//!   database, so tests run in parallel without seeing each other's tables.
//! - [`TestCluster`]: a throwaway PostgreSQL cluster (initdb + pg_ctl) that a
//!   test may stop, crash, restart or reconfigure (password authentication)
//!   without disturbing anyone else.
//!
//! Between the proxy under test and a store, a [`FaultProxy`] relays TCP and
//! injects network faults: delay, blackhole, reset, refusal.
//!
//! There is no global state beyond counters used to make names unique.

// This crate is only ever linked into tests: a failed fixture should fail the
// test loudly, so `expect`/`unwrap`/`panic` are fine here (never in Drop).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod certs;
pub mod cluster;
pub mod db;
pub mod dual;
pub mod faults;
pub mod files;
pub mod proxy;
pub mod role;
pub mod wire;

pub use certs::Certs;
pub use cluster::{ClusterOptions, TestCluster};
pub use db::{sweep_stale, TestDb};
pub use dual::{DualEnv, DualTable};
pub use faults::FaultProxy;
pub use files::TempDir;
pub use proxy::{ProxyConfig, TestProxy};
pub use role::TestRole;

/// Admin URL used when `SWITCHYARD_TEST_PG` is not set.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Name of the environment variable holding the shared server's admin URL.
pub const PG_URL_ENV: &str = "SWITCHYARD_TEST_PG";

/// Admin URL of the shared test server: `SWITCHYARD_TEST_PG` or [`DEFAULT_PG_URL`].
///
/// The URL must name a database the user may connect to (it is used to run
/// `CREATE DATABASE` / `DROP DATABASE`).
pub fn pg_url() -> String {
    std::env::var(PG_URL_ENV)
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
}

/// Install a `tracing` subscriber that writes through libtest's capture.
///
/// Safe to call from every test: only the first call installs anything. The
/// filter comes from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `try_init` fails when a subscriber is already set: that is the idempotence.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// `127.0.0.1:port` of the server a `postgres://user@host:port/db` URL names (port 5432 when it
/// names none): the address to put a [`FaultProxy`] in front of.
pub fn server_of(url: &str) -> std::net::SocketAddr {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let port = hostport
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432);
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// Unique-enough suffix parts shared by database and cluster names.
pub(crate) fn unique_suffix(counter: &std::sync::atomic::AtomicU64) -> String {
    use rand::Rng;
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let random: u32 = rand::thread_rng().gen();
    format!("{}_{}_{:08x}", std::process::id(), n, random)
}

/// Quote an SQL identifier (`"..."`, doubling embedded quotes).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quote an SQL string literal (`'...'`, doubling embedded quotes).
///
/// Assumes `standard_conforming_strings = on` (the default since PostgreSQL 9.1).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
