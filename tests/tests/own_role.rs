//! Each client reaches OLD as its own role (`[auth] upstream_login = "client"`, the default):
//! grants, row-level security, `current_user` in triggers, per-role settings and connection
//! limits behave as with a direct connection, and the server's refusals reach the client as the
//! server sent them.
//!
//! The roles live in a throwaway cluster that demands SCRAM passwords over TCP (the proxy must
//! prove each role's identity to it), so they need no cleanup; the proxy logs in as:
//! - the users file's plaintext password;
//! - SCRAM key reuse, with the role's secret from the users file or fetched from OLD with
//!   `auth_query`, so no plaintext password is anywhere in the configuration.
//!
//! Also: another database of the same server is a plain passthrough (or refused with
//! `[proxy] other_databases = "refuse"`), and a table in `dual_write` written by a client as its
//! own role is still mirrored (the mirror keeps its own login).

use std::time::Duration;

use anyhow::Context as _;
use switchyard_pgwire::auth::md5_secret;
use switchyard_test_support::{
    ClusterOptions, DualEnv, DualTable, ProxyConfig, TempDir, TestCluster, TestDb, TestProxy, TestRole,
};
use tokio_postgres::NoTls;

const WAIT: Duration = Duration::from_secs(10);
const DB: &str = "appdb";

/// Roles, a table with a row-level security policy, a table only alice may read, an audit
/// trigger and a per-role setting, in database `appdb`.
const SCHEMA: &str = "
CREATE TABLE docs (id int PRIMARY KEY, owner name NOT NULL DEFAULT current_user, body text);
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON docs USING (owner = current_user);
INSERT INTO docs VALUES (1, 'alice', 'a1'), (2, 'bob', 'b2'), (3, 'alice', 'a3'), (4, 'carol', 'c4');
CREATE TABLE secrets (v text);
INSERT INTO secrets VALUES ('for alice');
CREATE TABLE audit (id serial PRIMARY KEY, who name, session_who name, doc int);
CREATE FUNCTION audit_docs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit (who, session_who, doc) VALUES (current_user, session_user, NEW.id);
  RETURN NEW;
END $$;
CREATE TRIGGER docs_audit AFTER INSERT ON docs FOR EACH ROW EXECUTE FUNCTION audit_docs();
GRANT SELECT, INSERT ON docs TO alice, bob, carol;
GRANT INSERT ON audit TO alice, bob, carol;
GRANT USAGE ON SEQUENCE audit_id_seq TO alice, bob, carol;
GRANT SELECT ON secrets TO alice;
";

/// A cluster where every TCP login but the proxy's own (`postgres`, trusted from 127.0.0.1, so
/// no URL needs a password) proves a SCRAM password, with roles alice, bob and carol (connection
/// limit 1) and the schema above.
struct ScramOld {
    cluster: TestCluster,
    new: TestDb,
}

impl ScramOld {
    async fn start(label: &str) -> anyhow::Result<ScramOld> {
        let cluster = TestCluster::start(
            ClusterOptions::default()
                .setting("password_encryption", "scram-sha-256")
                .hba_first("host all postgres 127.0.0.1/32 trust")
                .hba_first("host all all 127.0.0.1/32 scram-sha-256"),
        )
        .await?;
        let admin = tokio_postgres::connect(&cluster.socket_conninfo("postgres"), NoTls).await?;
        tokio::spawn(admin.1);
        // One statement at a time: CREATE DATABASE cannot run in the implicit transaction of a
        // multi-statement string.
        for sql in [
            "CREATE ROLE alice LOGIN PASSWORD 'alice-pw'",
            "CREATE ROLE bob LOGIN PASSWORD 'bob-pw'",
            "CREATE ROLE carol LOGIN PASSWORD 'carol-pw' CONNECTION LIMIT 1",
            "ALTER ROLE alice SET work_mem = '7MB'",
            &format!("CREATE DATABASE {DB}"),
            "CREATE DATABASE otherdb",
        ] {
            admin.0.batch_execute(sql).await.with_context(|| sql.to_owned())?;
        }
        let app = tokio_postgres::connect(&cluster.socket_conninfo(DB), NoTls).await?;
        tokio::spawn(app.1);
        app.0.batch_execute(SCHEMA).await.context("schema")?;
        let new = TestDb::create(label).await?;
        Ok(ScramOld { cluster, new })
    }

    /// old.url: the proxy's own login, with no password.
    fn old_url(&self) -> String {
        self.cluster.url(DB)
    }

    /// A proxy with SCRAM client authentication, the `[auth]` lines given, in front of `appdb`.
    async fn proxy(&self, users: Option<&std::path::Path>, auth: &[&str]) -> anyhow::Result<TestProxy> {
        let mut config = ProxyConfig::passthrough(&self.old_url(), self.new.url());
        config.auth_method = "scram-sha-256".into();
        config.users_file = users.map(|u| u.display().to_string());
        for line in auth {
            config = config.with_auth_setting(line);
        }
        TestProxy::start(&config).await
    }

    /// The stored secret of `role` (`pg_authid.rolpassword`).
    async fn secret_of(&self, role: &str) -> anyhow::Result<String> {
        let admin = self.cluster.client("postgres").await?;
        let row = admin
            .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&role])
            .await?;
        Ok(row.get(0))
    }
}

async fn connect(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("postgres://{user}:{password}@127.0.0.1:{port}/{db}?sslmode=disable");
    let (client, conn) = tokio::time::timeout(WAIT, tokio_postgres::connect(&url, NoTls))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What a session sees: its identity, its rows, its rights and its settings, as text (an error
/// as its SQLSTATE).
async fn view(c: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT current_user::text || ' ' || session_user::text",
        "SELECT string_agg(id || ':' || owner || ':' || body, ',' ORDER BY id) FROM docs",
        "SELECT string_agg(v, ',') FROM secrets",
        "SELECT current_setting('work_mem')",
    ] {
        out.push(match c.query_one(sql, &[]).await {
            Ok(row) => row.get::<_, Option<String>>(0).unwrap_or_default(),
            Err(e) => format!("error {}", e.code().map_or("?", |c| c.code())),
        });
    }
    out
}

fn code(result: Result<tokio_postgres::Client, tokio_postgres::Error>) -> (String, String) {
    match result {
        Ok(_) => ("ok".into(), String::new()),
        Err(e) => match e.as_db_error() {
            Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
            None => ("no ErrorResponse".into(), e.to_string()),
        },
    }
}

/// alice and bob each see exactly what they see directly (port `direct`) through the proxy
/// (port `through`): identity, the rows their policy lets them see, the tables they were
/// granted, their own ALTER ROLE ... SET settings.
async fn assert_same_view_as_direct(direct: u16, through: u16) -> anyhow::Result<()> {
    for (user, password) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        let d = view(&connect(direct, user, password, DB).await?).await;
        let p = view(&connect(through, user, password, DB).await?).await;
        assert_eq!(p, d, "{user}: through the proxy vs directly");
        assert_eq!(p[0], format!("{user} {user}"));
    }
    Ok(())
}

/// Wrong passwords and unknown users get the same 28P01, whatever the proxy knows.
async fn assert_strangers_refused(port: u16) {
    for (user, password) in [("alice", "bob-pw"), ("alice", ""), ("mallory", "alice-pw")] {
        assert_eq!(
            code(connect(port, user, password, DB).await),
            (
                "28P01".to_owned(),
                format!("password authentication failed for user \"{user}\"")
            ),
            "{user} with {password:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_reaches_old_as_its_own_role_with_a_plaintext_users_file() -> anyhow::Result<()> {
    let old = ScramOld::start("own_role_plain").await?;
    let dir = TempDir::new("own-role-plain")?;
    let users = dir.write(
        "users.toml",
        "[[users]]\nname = \"alice\"\npassword = \"alice-pw\"\n\
         [[users]]\nname = \"bob\"\npassword = \"bob-pw\"\n\
         [[users]]\nname = \"carol\"\npassword = \"carol-pw\"\n",
    )?;
    let proxy = old.proxy(Some(&users), &[]).await?;
    let (direct, through) = (old.cluster.port(), proxy.port());

    assert_same_view_as_direct(direct, through).await?;
    let alice = connect(through, "alice", "alice-pw", DB).await?;
    assert_eq!(view(&alice).await[1], "1:alice:a1,3:alice:a3");
    assert_eq!(view(&alice).await[3], "7MB");
    let bob = connect(through, "bob", "bob-pw", DB).await?;
    assert_eq!(view(&bob).await[2], "error 42501", "bob has no grant on secrets");
    // No privilege escalation: the proxy's own login is a superuser, alice is not.
    let err = alice
        .batch_execute("ALTER ROLE postgres PASSWORD 'taken'")
        .await
        .expect_err("alice may not change postgres's password");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");

    // A trigger sees the client's role.
    alice
        .batch_execute("INSERT INTO docs (id, body) VALUES (10, 'by alice')")
        .await?;
    bob.batch_execute("INSERT INTO docs (id, body) VALUES (11, 'by bob')")
        .await?;
    let admin = old.cluster.client(DB).await?;
    let audit: Vec<(i32, String, String)> = admin
        .query(
            "SELECT doc, who::text, session_who::text FROM audit ORDER BY doc",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        audit,
        vec![
            (10, "alice".into(), "alice".into()),
            (11, "bob".into(), "bob".into())
        ]
    );

    // carol's CONNECTION LIMIT 1 is the server's to enforce: the second session gets the
    // server's own 53300.
    let first = connect(through, "carol", "carol-pw", DB).await?;
    let (code53300, message) = code(connect(through, "carol", "carol-pw", DB).await);
    assert_eq!(
        (code53300.as_str(), message.as_str()),
        ("53300", "too many connections for role \"carol\"")
    );
    drop(first);

    assert_strangers_refused(through).await;

    // Another database of the same server: a passthrough, as the client's own role.
    let other = connect(through, "alice", "alice-pw", "otherdb").await?;
    let row = other
        .query_one("SELECT current_database()::text, current_user::text", &[])
        .await?;
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("otherdb".into(), "alice".into())
    );
    // One the server does not have: the server's own 3D000.
    let (missing, message) = code(connect(through, "alice", "alice-pw", "no_such_db").await);
    assert_eq!(
        (missing.as_str(), message.as_str()),
        ("3D000", "database \"no_such_db\" does not exist")
    );
    Ok(())
}

/// No plaintext password anywhere: the users file is absent, old.url has none; alice's and
/// bob's secrets are fetched from OLD with `auth_query`, and the proxy logs in as them with the
/// ClientKey recovered from their own SCRAM exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_key_reuse_with_secrets_fetched_by_auth_query() -> anyhow::Result<()> {
    let old = ScramOld::start("own_role_query").await?;
    let proxy = old.proxy(None, &["auth_lookup = \"old\""]).await?;
    assert!(proxy.config.auth.users.users.is_empty());
    assert!(proxy.config.old.url.password.is_none());
    let (direct, through) = (old.cluster.port(), proxy.port());
    assert_same_view_as_direct(direct, through).await?;
    assert_strangers_refused(through).await;
    // A role changed on the server counts at the next login (nothing cached).
    let admin = old.cluster.client("postgres").await?;
    admin.batch_execute("ALTER ROLE bob PASSWORD 'bob-new'").await?;
    assert_eq!(code(connect(through, "bob", "bob-pw", DB).await).0, "28P01");
    connect(through, "bob", "bob-new", DB).await?;

    // The secrets are neither in /status nor in the resolved configuration.
    let (_, status) = proxy.admin_get("/status").await?;
    let shown: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(shown["upstream_login"], "client");
    let printed = serde_json::to_string(&proxy.config)?;
    for user in ["alice", "bob"] {
        let secret = old.secret_of(user).await?;
        let stored_key = secret.split('$').nth(2).context("secret shape")?.to_owned();
        assert!(!status.contains(&stored_key) && !printed.contains(&stored_key));
    }
    Ok(())
}

/// SCRAM key reuse with the role's secret in the users file; a secret that is not the role's
/// secret on the server (another salt), or an md5 secret the server cannot use, is refused with
/// the proxy's 28000 naming the problem, never passed off as a server outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_key_reuse_with_the_roles_secret_in_the_users_file() -> anyhow::Result<()> {
    let old = ScramOld::start("own_role_secret").await?;
    let dir = TempDir::new("own-role-secret")?;
    let alice = old.secret_of("alice").await?;
    // bob's password, but a secret of the proxy's own making: not the one OLD holds.
    let bob = switchyard_pgwire::auth::ScramSecret::generate("bob-pw")?.to_string();
    let users = dir.write(
        "users.toml",
        &format!(
            "[[users]]\nname = \"alice\"\nsecret = \"{alice}\"\n\
             [[users]]\nname = \"bob\"\nsecret = \"{bob}\"\n"
        ),
    )?;
    let proxy = old.proxy(Some(&users), &[]).await?;
    let c = connect(proxy.port(), "alice", "alice-pw", DB).await?;
    assert_eq!(view(&c).await[0], "alice alice");
    assert_strangers_refused(proxy.port()).await;
    let (refused, message) = code(connect(proxy.port(), "bob", "bob-pw", DB).await);
    assert_eq!(refused, "28000", "{message}");

    // md5 toward the client with an md5 secret: nothing that answers the server's SCRAM.
    let users = dir.write(
        "md5.toml",
        &format!(
            "[[users]]\nname = \"alice\"\nsecret = \"{}\"\n",
            md5_secret("alice-pw", "alice")
        ),
    )?;
    let mut config = ProxyConfig::passthrough(&old.old_url(), old.new.url()).with_auth("md5", &users);
    config.admin = false;
    let md5_proxy = TestProxy::start(&config).await?;
    let (refused, message) = code(connect(md5_proxy.port(), "alice", "alice-pw", DB).await);
    assert_eq!(refused, "28000", "{message}");

    // trust toward the client: the users file's password still proves the role upstream; a
    // role without one there cannot be proven.
    let users = dir.write(
        "trust.toml",
        "[[users]]\nname = \"alice\"\npassword = \"alice-pw\"\n",
    )?;
    let mut config = ProxyConfig::passthrough(&old.old_url(), old.new.url()).with_auth("trust", &users);
    config.admin = false;
    let trust_proxy = TestProxy::start(&config).await?;
    let c = connect(trust_proxy.port(), "alice", "", DB).await?;
    assert_eq!(view(&c).await[0], "alice alice");
    let (refused, message) = code(connect(trust_proxy.port(), "bob", "", DB).await);
    assert_eq!(refused, "28000", "{message}");
    Ok(())
}

/// `other_databases = "refuse"`: only the store's own database is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_databases_refused_when_configured() -> anyhow::Result<()> {
    let (old, new) = TestDb::create_pair("own_role_refuse").await?;
    let other = TestDb::create("own_role_other").await?;
    let config =
        ProxyConfig::passthrough(old.url(), new.url()).with_proxy_setting("other_databases = \"refuse\"");
    let proxy = TestProxy::start(&config).await?;
    let (refused, message) = code(connect(proxy.port(), "postgres", "x", other.name()).await);
    assert_eq!(
        (refused.as_str(), message),
        ("3D000", format!("database \"{}\" does not exist", other.name()))
    );
    connect(proxy.port(), "postgres", "x", old.name()).await?;

    // The default: a plain relay to it.
    let proxy = TestProxy::passthrough(old.url(), new.url()).await?;
    let c = connect(proxy.port(), "postgres", "x", other.name()).await?;
    let db: String = c.query_one("SELECT current_database()::text", &[]).await?.get(0);
    assert_eq!(db, other.name());
    Ok(())
}

/// A table in `dual_write` written by a client logged in as its own (unprivileged) role: OLD
/// records the role, and the mirror (its own login) still brings every change to NEW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_write_table_written_as_the_clients_role_is_mirrored() -> anyhow::Result<()> {
    let role = TestRole::create("own_role_dual", "LOGIN").await?;
    let schema = format!(
        "CREATE TABLE items (id int PRIMARY KEY, who name NOT NULL DEFAULT current_user, qty int);
         GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {r};",
        r = role.name
    );
    let env = DualEnv::new("own_role_dual", &schema, vec![DualTable::new("items")]).await?;
    let proxy =
        TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &[("repair_interval_ms", 100)]))
            .await?;
    let (c, conn) = tokio_postgres::connect(&proxy.url(&role.name), NoTls).await?;
    tokio::spawn(conn);
    let me: String = c.query_one("SELECT current_user::text", &[]).await?.get(0);
    assert_eq!(me, role.name);
    c.batch_execute(
        "INSERT INTO items (id, qty) VALUES (1, 10), (2, 20), (3, 30);
         UPDATE items SET qty = qty + 1 WHERE id = 2;
         DELETE FROM items WHERE id = 3;",
    )
    .await?;
    let rows = |db: &TestDb| {
        let url = db.url().to_owned();
        async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            let rows = client
                .query("SELECT id, who::text, qty FROM items ORDER BY id", &[])
                .await?;
            anyhow::Ok(
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, i32>(2)))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let expect = vec![(1, role.name.clone(), 10), (2, role.name.clone(), 21)];
    assert_eq!(rows(&env.old).await?, expect, "OLD");
    assert_eq!(
        rows(&env.new).await?,
        expect,
        "NEW, mirrored before COMMIT was acknowledged"
    );
    env.assert_converged_after_repairs(Duration::from_secs(30))
        .await?;
    drop(c);
    drop(proxy);
    drop(env);
    drop(role);
    Ok(())
}

/// md5 all the way: the users file holds only the role's md5 secret, and the server's md5
/// challenge is answered from it (the challenge needs md5(password || user), which the secret
/// is), so no plaintext password is stored for md5 either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_md5_secret_answers_an_md5_server() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await?;
    cluster.set_password_auth("md5", "dave", "dave-pw").await?;
    let new = TestDb::create("own_role_md5").await?;
    let dir = TempDir::new("own-role-md5")?;
    let users = dir.write(
        "users.toml",
        &format!(
            "[[users]]\nname = \"dave\"\nsecret = \"{}\"\n",
            md5_secret("dave-pw", "dave")
        ),
    )?;
    let mut config = ProxyConfig::passthrough(&cluster.url("postgres"), new.url()).with_auth("md5", &users);
    config.admin = false;
    let proxy = TestProxy::start(&config).await?;
    let c = connect(proxy.port(), "dave", "dave-pw", "postgres").await?;
    let me: String = c.query_one("SELECT current_user::text", &[]).await?.get(0);
    assert_eq!(me, "dave");
    assert_eq!(
        code(connect(proxy.port(), "dave", "nope", "postgres").await).0,
        "28P01"
    );
    Ok(())
}
