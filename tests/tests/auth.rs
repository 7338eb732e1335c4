//! Authentication, both sides of the proxy.
//!
//! Client side: the proxy checks clients against a users file with SCRAM-SHA-256 or MD5, using
//! plaintext passwords or PostgreSQL's stored secrets, and fails the way PostgreSQL does (28P01
//! for a wrong password and for an unknown user alike, 3D000 for a wrong database).
//!
//! Upstream side, with `[auth] upstream_login = "service"` (the client logging in as its own
//! role is in `own_role.rs`): the proxy logs in to the OLD store with the credentials of its
//! URL, whatever method the server asks for; the server's own refusal reaches the client
//! unchanged, and an unreachable server is reported as 08001.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use switchyard_pgwire::auth::{md5_secret, ScramSecret};
use switchyard_pgwire::startup::{StartupMessage, PROTOCOL_3_0};
use switchyard_test_support::wire::{Msg, RawConn};
use switchyard_test_support::{ClusterOptions, ProxyConfig, TempDir, TestCluster, TestDb, TestProxy};
use tokio_postgres::NoTls;

const WAIT: Duration = Duration::from_secs(10);

/// A proxy with client authentication in front of a fresh database.
struct AuthProxy {
    proxy: TestProxy,
    old: TestDb,
    _new: TestDb,
    _dir: TempDir,
}

impl AuthProxy {
    async fn start(label: &str, method: &str, users_toml: &str) -> anyhow::Result<AuthProxy> {
        let dir = TempDir::new(label)?;
        let users = dir.write("users.toml", users_toml)?;
        let (old, new) = TestDb::create_pair(label).await?;
        let config = ProxyConfig::passthrough(old.url(), new.url())
            .with_auth(method, &users)
            .with_service_login();
        let proxy = TestProxy::start(&config).await?;
        Ok(AuthProxy {
            proxy,
            old,
            _new: new,
            _dir: dir,
        })
    }

    fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}?sslmode=disable",
            self.proxy.port()
        )
    }

    /// Logs in as `user` and runs a query; returns `current_user` as the server sees it.
    async fn login(&self, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
        let url = self.url(user, password, self.old.name());
        let client = connect(&url).await?;
        let row = client.query_one("select current_user::text, 6 * 7", &[]).await?;
        assert_eq!(row.get::<_, i32>(1), 42);
        Ok(row.get(0))
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio::time::timeout(WAIT, tokio_postgres::connect(url, NoTls))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Asserts a login failed with `code` and exactly `message`, reported as FATAL.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, tokio_postgres::Error>, code: &str, message: &str) {
    let err = result.expect_err("login should have failed");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"));
    assert_eq!(db.code().code(), code, "{db:?}");
    assert_eq!(db.message(), message, "{db:?}");
    assert_eq!(db.severity(), "FATAL", "{db:?}");
}

fn password_failed(user: &str) -> String {
    format!("password authentication failed for user \"{user}\"")
}

/// Runs psql with a 10 s limit; returns (exit success, stdout, stderr).
async fn psql(
    port: u16,
    user: &str,
    password: &str,
    database: &str,
    sql: &str,
) -> anyhow::Result<(bool, String, String)> {
    let child = tokio::process::Command::new("psql")
        .args(["-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", port.to_string())
        .env("PGUSER", user)
        .env("PGDATABASE", database)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        // Whatever psql's defaults are, it must ask for encryption and fall back to plain text.
        .env("PGSSLMODE", "prefer")
        .env_remove("PGSERVICE")
        .env_remove("PGPASSFILE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), child)
        .await
        .context("psql did not finish within 10 s")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_password_and_stored_secret() -> anyhow::Result<()> {
    let secret = ScramSecret::generate("pw")?.to_string();
    assert!(secret.starts_with("SCRAM-SHA-256$4096:"), "{secret}");
    let users = format!(
        "[[users]]\nname = \"app\"\npassword = \"app-secret\"\n\n\
         [[users]]\nname = \"hashed\"\nsecret = \"{secret}\"\n"
    );
    let p = AuthProxy::start("auth_scram", "scram-sha-256", &users).await?;
    // The upstream session is the OLD URL's user, whoever the client is.
    assert_eq!(p.login("app", "app-secret").await?, "postgres");
    assert_eq!(p.login("hashed", "pw").await?, "postgres");

    assert_refused(p.login("app", "wrong").await, "28P01", &password_failed("app"));
    assert_refused(
        p.login("hashed", "app-secret").await,
        "28P01",
        &password_failed("hashed"),
    );
    assert_refused(p.login("app", "").await, "28P01", &password_failed("app"));
    // An unknown user gets exactly the same answer as a wrong password.
    assert_refused(
        p.login("nobody", "app-secret").await,
        "28P01",
        &password_failed("nobody"),
    );
    // The database is checked after authentication.
    let wrong_db = connect(&p.url("app", "app-secret", "no_such_db")).await;
    assert_refused(wrong_db, "3D000", "database \"no_such_db\" does not exist");
    // ... and a stranger learns nothing about it.
    let stranger = connect(&p.url("nobody", "x", "no_such_db")).await;
    assert_refused(stranger, "28P01", &password_failed("nobody"));

    // The proxy is still serving.
    assert_eq!(p.login("app", "app-secret").await?, "postgres");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_scram() -> anyhow::Result<()> {
    let users = "[[users]]\nname = \"app\"\npassword = \"app-secret\"\n";
    let p = AuthProxy::start("auth_psql", "scram-sha-256", users).await?;
    let port = p.proxy.port();
    let (ok, out, err) = psql(
        port,
        "app",
        "app-secret",
        p.old.name(),
        "select current_user, 6 * 7",
    )
    .await?;
    ensure!(ok, "psql failed: {err}");
    assert_eq!(out.trim(), "postgres|42");

    let (ok, _, err) = psql(port, "app", "nope", p.old.name(), "select 1").await?;
    ensure!(!ok, "psql logged in with a wrong password");
    ensure!(err.contains(&password_failed("app")), "psql said: {err}");
    Ok(())
}

/// A password that SASLprep changes (full-width letters and a Roman numeral, NFKC-normalised to
/// `passIX`): libpq and tokio-postgres prepare it before computing their SCRAM proof, as
/// PostgreSQL does when it stores the secret, so the proxy must derive its secret from the
/// prepared form too. The secret PostgreSQL itself stored for a role with that password must
/// work as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_a_password_saslprep_changes() -> anyhow::Result<()> {
    const PASSWORD: &str = "ｐａｓｓⅨ";
    let admin = TestDb::create("auth_saslprep_admin").await?;
    let role = format!("sy_saslprep_{}", std::process::id());
    admin
        .execute_batch(&format!(
            "SET password_encryption = 'scram-sha-256'; DROP ROLE IF EXISTS {role}; \
             CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"
        ))
        .await?;
    let stored = admin
        .client()
        .await?
        .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&role])
        .await;
    admin.execute_batch(&format!("DROP ROLE {role}")).await?;
    let stored: String = stored?.get(0);
    let users = format!(
        "[[users]]\nname = \"app\"\npassword = \"{PASSWORD}\"\n\n\
         [[users]]\nname = \"{role}\"\nsecret = \"{stored}\"\n"
    );
    let p = AuthProxy::start("auth_saslprep", "scram-sha-256", &users).await?;
    for user in ["app", role.as_str()] {
        let config = format!(
            "host=127.0.0.1 port={} user={user} dbname={} sslmode=disable",
            p.proxy.port(),
            p.old.name()
        );
        for password in [PASSWORD, "passIX"] {
            let mut config: tokio_postgres::Config = config.parse()?;
            config.password(password);
            let (client, conn) = config
                .connect(NoTls)
                .await
                .with_context(|| format!("{user} with {password}"))?;
            tokio::spawn(conn);
            let n: i32 = client.query_one("select 6 * 7", &[]).await?.get(0);
            assert_eq!(n, 42);
        }
        let (ok, _, err) = psql(p.proxy.port(), user, PASSWORD, p.old.name(), "select 1").await?;
        ensure!(ok, "psql (libpq) as {user}: {err}");
    }
    assert_refused(p.login("app", "pass").await, "28P01", &password_failed("app"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_with_password_and_stored_secret() -> anyhow::Result<()> {
    let secret = md5_secret("pw5", "hashed");
    let users = format!(
        "[[users]]\nname = \"app\"\npassword = \"app-secret\"\n\n\
         [[users]]\nname = \"hashed\"\nsecret = \"{secret}\"\n"
    );
    let p = AuthProxy::start("auth_md5", "md5", &users).await?;
    assert_eq!(p.login("app", "app-secret").await?, "postgres");
    assert_eq!(p.login("hashed", "pw5").await?, "postgres");

    assert_refused(p.login("app", "wrong").await, "28P01", &password_failed("app"));
    assert_refused(
        p.login("hashed", "app-secret").await,
        "28P01",
        &password_failed("hashed"),
    );
    assert_refused(
        p.login("nobody", "app-secret").await,
        "28P01",
        &password_failed("nobody"),
    );
    let wrong_db = connect(&p.url("hashed", "pw5", "no_such_db")).await;
    assert_refused(wrong_db, "3D000", "database \"no_such_db\" does not exist");

    assert_eq!(p.login("app", "app-secret").await?, "postgres");
    Ok(())
}

/// The OLD store asks the proxy for a password with each method PostgreSQL offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_login_with_each_password_method() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await?;
    cluster.set_password_auth("scram-sha-256", "up", "up-pw").await?;
    cluster.set_password_auth("md5", "up5", "up5-pw").await?;
    cluster.set_password_auth("password", "upc", "upc-pw").await?;
    let port = cluster.port();
    let new = TestDb::create("auth_up_new").await?;

    for (user, password) in [("up", "up-pw"), ("up5", "up5-pw"), ("upc", "upc-pw")] {
        let old = format!("postgres://{user}:{password}@127.0.0.1:{port}/postgres");
        let proxy = service_proxy(&old, new.url()).await?;
        let client = connect(&proxy.url("whoever")).await?;
        let row = client.query_one("select current_user::text", &[]).await?;
        assert_eq!(
            row.get::<_, String>(0),
            user,
            "logged in upstream as the URL's user"
        );
        drop(client);

        let wrong = format!("postgres://{user}:not-{password}@127.0.0.1:{port}/postgres");
        let proxy = service_proxy(&wrong, new.url()).await?;
        assert_refused(
            connect(&proxy.url("whoever")).await,
            "28P01",
            &password_failed(user),
        );

        // Byte level: the server's own ErrorResponse is the first and only thing the client sees.
        let err = raw_refusal(&proxy).await?;
        assert_eq!(err.code().as_deref(), Some("28P01"));
        assert_eq!(err.field(b'V').as_deref(), Some("FATAL"));
        assert_eq!(err.field(b'M'), Some(password_failed(user)));
        // Fields only PostgreSQL itself fills in: it was forwarded, not rewritten.
        assert_eq!(err.field(b'R').as_deref(), Some("auth_failed"), "{err:?}");
        assert_eq!(err.field(b'F').as_deref(), Some("auth.c"), "{err:?}");
    }
    Ok(())
}

/// A proxy with trust auth that logs every client in to `old` as the URL's user.
async fn service_proxy(old: &str, new: &str) -> anyhow::Result<TestProxy> {
    TestProxy::start(&ProxyConfig::passthrough(old, new).with_service_login()).await
}

/// Logs in with a raw client and returns the single FATAL it gets before the close.
async fn raw_refusal(proxy: &TestProxy) -> anyhow::Result<Msg> {
    let mut conn = RawConn::open(proxy.addr).await?;
    let mut out = bytes::BytesMut::new();
    StartupMessage {
        protocol: PROTOCOL_3_0,
        params: vec![
            ("user".into(), "whoever".into()),
            ("database".into(), proxy.config.old.url.database.clone()),
        ],
    }
    .encode(&mut out);
    conn.send(&out).await?;
    let msgs = tokio::time::timeout(WAIT, conn.read_to_close()).await??;
    match msgs.as_slice() {
        [err] if err.tag == b'E' => Ok(err.clone()),
        other => bail!("expected one ErrorResponse then close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_old_store_is_reported_as_08001() -> anyhow::Result<()> {
    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let new = TestDb::create("auth_unreach_new").await?;
    let old = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let proxy = TestProxy::passthrough(&old, new.url()).await?;

    let started = std::time::Instant::now();
    let err = connect(&proxy.url("postgres"))
        .await
        .expect_err("no server behind the proxy");
    let db = err
        .as_db_error()
        .with_context(|| format!("expected an ErrorResponse, got {err:?}"))?;
    assert_eq!(db.code().code(), "08001", "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    // No internal detail (address, OS error) leaks to the client.
    ensure!(
        !db.message().contains(&port.to_string()),
        "leaks the address: {}",
        db.message()
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "refused connect took {:?}",
        started.elapsed()
    );

    let err = raw_refusal(&proxy).await?;
    assert_eq!(err.code().as_deref(), Some("08001"));
    Ok(())
}
