//! Throwaway databases on a shared PostgreSQL server.
//!
//! Every [`TestDb`] is a fresh database named
//! `sy_<label>_<pid>_<counter>_<random>` and is dropped `WITH (FORCE)` when the
//! value is dropped, so a test may leave connections open. Set
//! `SWITCHYARD_KEEP_TEST_DBS=1` to keep the databases for inspection.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio_postgres::NoTls;

use crate::{pg_url, quote_ident};

/// PostgreSQL truncates identifiers to `NAMEDATALEN - 1` bytes.
/// <https://www.postgresql.org/docs/15/sql-syntax-lexical.html#SQL-SYNTAX-IDENTIFIERS>
const MAX_IDENT_BYTES: usize = 63;

/// Prefix of every database this module creates.
const PREFIX: &str = "sy_";

/// How long Drop waits for `DROP DATABASE` before giving up (and logging).
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A uniquely named database, dropped (with `FORCE`) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    admin_url: String,
    url: String,
}

impl TestDb {
    /// Create a fresh database on the shared server ([`crate::pg_url`]).
    ///
    /// `label` says which test owns it; it is lowercased, stripped to
    /// `[a-z0-9_]` and shortened so the name fits in 63 bytes.
    pub async fn create(label: &str) -> anyhow::Result<TestDb> {
        Self::create_at(&pg_url(), label).await
    }

    /// Create a fresh database on the server at `admin_url` (for example a
    /// [`crate::TestCluster`]'s `url("postgres")`).
    pub async fn create_at(admin_url: &str, label: &str) -> anyhow::Result<TestDb> {
        let name = database_name(label, &crate::unique_suffix(&COUNTER));
        let url = with_database(admin_url, &name)?;
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .with_context(|| format!("CREATE DATABASE {name} via {admin_url}"))?;
        tracing::debug!(database = %name, "created test database");
        Ok(TestDb {
            name,
            admin_url: admin_url.to_owned(),
            url,
        })
    }

    /// Create two databases for dual-write tests: `(old, new)`, labelled
    /// `<label>_old` and `<label>_new`.
    pub async fn create_pair(label: &str) -> anyhow::Result<(TestDb, TestDb)> {
        let old = Self::create(&format!("{label}_old")).await?;
        let new = Self::create(&format!("{label}_new")).await?;
        Ok((old, new))
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection URL for this database (the admin URL with the database swapped).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new client connected to this database; its connection task is spawned
    /// on the current tokio runtime.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    /// The first column of the one row `sql` returns, as `i64` (a count, a sum cast to bigint).
    pub async fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .client()
            .await?
            .query_one(sql, &[])
            .await
            .with_context(|| format!("{sql} on {}", self.name))?;
        Ok(row.try_get(0)?)
    }

    /// Run `sql` (one or more statements, simple query protocol) on a new connection.
    pub async fn execute_batch(&self, sql: &str) -> anyhow::Result<()> {
        self.client()
            .await?
            .batch_execute(sql)
            .await
            .with_context(|| format!("batch on {}", self.name))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("SWITCHYARD_KEEP_TEST_DBS").is_some_and(|v| v != "0") {
            eprintln!("switchyard-test-support: keeping database {}", self.name);
            return;
        }
        // Drop may run inside a runtime (where blocking on one is forbidden) or
        // outside any: a fresh thread with its own runtime works in both cases.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let joined = std::thread::Builder::new()
            .name(format!("drop-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building runtime")?;
                runtime.block_on(async {
                    tokio::time::timeout(DROP_TIMEOUT, drop_database(&admin_url, &name))
                        .await
                        .context("timed out")?
                })
            })
            .map(|handle| handle.join());
        match joined {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                eprintln!("switchyard-test-support: dropping {}: {err:#}", self.name)
            }
            Ok(Err(_)) => eprintln!("switchyard-test-support: dropping {}: thread panicked", self.name),
            Err(err) => eprintln!(
                "switchyard-test-support: dropping {}: spawn failed: {err}",
                self.name
            ),
        }
    }
}

/// Drop leftover test databases named `sy_<prefix>…` whose creating process
/// (the `<pid>` in the name) no longer runs on this machine.
///
/// Only meaningful when the server's clients run on this machine, as they do
/// for the default local server. Returns the names dropped.
pub async fn sweep_stale(prefix: &str) -> anyhow::Result<Vec<String>> {
    let admin_url = pg_url();
    let admin = connect(&admin_url).await?;
    let pattern = format!("{PREFIX}{}%", like_escape(&sanitize_label(prefix)));
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await
        .context("listing databases")?;
    let mut dropped = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        drop_database(&admin_url, &name).await?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// Build `sy_<label>_<suffix>`, shortening the label to fit in 63 bytes.
fn database_name(label: &str, suffix: &str) -> String {
    let mut label = sanitize_label(label);
    let room = MAX_IDENT_BYTES.saturating_sub(PREFIX.len() + 1 + suffix.len());
    // The label is ASCII after sanitizing, so any byte index is a char boundary.
    label.truncate(room);
    if label.is_empty() {
        format!("{PREFIX}{suffix}")
    } else {
        format!("{PREFIX}{label}_{suffix}")
    }
}

/// Lowercase and replace anything outside `[a-z0-9_]`, so the name needs no
/// quoting in psql sessions when debugging.
fn sanitize_label(label: &str) -> String {
    label
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect()
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('_', "\\_").replace('%', "\\%")
}

/// The pid in `sy_<label>_<pid>_<counter>_<random>` (the label may contain `_`).
fn creator_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplit('_');
    let _random = parts.next()?;
    let _counter = parts.next()?.parse::<u64>().ok()?;
    parts.next()?.parse().ok()
}

/// Whether `pid` names a live (non-zombie) process on this machine.
pub(crate) fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: `pid (comm) state ...`; comm may contain spaces and parens.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Replace the database in a `postgres://` URL, keeping any `?params`.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let Some(scheme_end) = url.find("://") else {
        bail!("not a postgres:// URL: {url}");
    };
    let after_scheme = scheme_end + 3;
    let (base, query) = match url.find('?') {
        Some(q) => url.split_at(q),
        None => (url, ""),
    };
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    Ok(format!("{}/{database}{query}", &base[..authority_end]))
}

/// Connect and spawn the connection task on the current runtime.
pub(crate) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "test connection ended");
        }
    });
    Ok(client)
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let admin = connect(admin_url).await?;
    // FORCE terminates sessions a test left open (PostgreSQL 13+).
    // https://www.postgresql.org/docs/15/sql-dropdatabase.html
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await
        .with_context(|| format!("DROP DATABASE {name}"))?;
    tracing::debug!(database = %name, "dropped test database");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_parse_back() {
        let name = database_name(&"Very-Long Label ".repeat(10), "123456_7_deadbeef");
        assert!(name.len() <= MAX_IDENT_BYTES, "{name}");
        assert!(name.starts_with("sy_very_long_label_"));
        assert_eq!(creator_pid(&name), Some(123456));
        assert_eq!(database_name("", "1_2_ab"), "sy_1_2_ab");
    }

    #[test]
    fn swaps_database_in_url() {
        let cases = [
            ("postgres://u@h:1/postgres", "postgres://u@h:1/x"),
            ("postgres://u@h:1", "postgres://u@h:1/x"),
            (
                "postgres://u@h:1/p?sslmode=disable",
                "postgres://u@h:1/x?sslmode=disable",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(with_database(input, "x").unwrap(), want);
        }
        assert!(with_database("host=h", "x").is_err());
    }
}
