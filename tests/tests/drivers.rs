//! Mainstream drivers work through the proxy unchanged: tokio-postgres, sqlx, psql, pgbench
//! (simple, extended and prepared), and from Python psycopg 3 and asyncpg (tests/python).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};

async fn setup(label: &str) -> anyhow::Result<(TestDb, TestDb, TestProxy)> {
    let old = TestDb::create(label).await?;
    let new = TestDb::create(&format!("{label}_new")).await?;
    let proxy = TestProxy::passthrough(old.url(), new.url()).await?;
    Ok((old, new, proxy))
}

/// Runs a command with a time limit; returns stdout, fails with stderr on a non-zero exit.
fn run(cmd: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let started = std::time::Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_transactions_binary_copy() -> anyhow::Result<()> {
    let (_old, _new, proxy) = setup("drv_tokio").await?;
    let mut client = proxy.client().await?;
    client
        .batch_execute("create table kv (k int primary key, v text, f float8, b bytea, at timestamptz)")
        .await?;
    let insert = client
        .prepare("insert into kv values ($1, $2, $3, $4, now())")
        .await?;
    for i in 0..200i32 {
        let n = client
            .execute(
                &insert,
                &[&i, &format!("v{i}"), &(i as f64 / 3.0), &vec![i as u8; 3]],
            )
            .await?;
        assert_eq!(n, 1);
    }
    // tokio-postgres reads results in binary.
    let rows = client
        .query("select k, v, f, b from kv where k >= $1 order by k", &[&190i32])
        .await?;
    assert_eq!(rows.len(), 10);
    let f: f64 = rows[0].get(2);
    assert!((f - 190.0 / 3.0).abs() < 1e-9);
    let b: Vec<u8> = rows[9].get(3);
    assert_eq!(b, vec![199u8; 3]);

    let tx = client.transaction().await?;
    tx.execute("delete from kv where k < 100", &[]).await?;
    tx.rollback().await?;
    let tx = client.transaction().await?;
    tx.execute("update kv set v = 'changed' where k = 5", &[]).await?;
    tx.commit().await?;
    let row = client.query_one("select count(*), max(v) from kv", &[]).await?;
    assert_eq!(row.get::<_, i64>(0), 200);
    assert_eq!(row.get::<_, String>(1), "v99");

    let err = client
        .execute("insert into kv (k) values (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );

    // COPY OUT through the proxy.
    use futures_util::{pin_mut, TryStreamExt};
    let stream = client
        .copy_out("copy (select k from kv order by k) to stdout")
        .await?;
    pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        bytes.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8(bytes)?.lines().count(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_reaches_the_backend() -> anyhow::Result<()> {
    let (_old, _new, proxy) = setup("drv_cancel").await?;
    let client = proxy.client().await?;
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let started = std::time::Instant::now();
    let err = client.simple_query("select pg_sleep(20)").await.unwrap_err();
    canceller.await??;
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session survives a cancel.
    let rows = client.simple_query("select 1").await?;
    assert!(!rows.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_prepared_statements_and_transactions() -> anyhow::Result<()> {
    use sqlx::Row;
    let (_old, _new, proxy) = setup("drv_sqlx").await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&proxy.url("postgres"))
        .await?;
    sqlx::query("create table t (id bigserial primary key, name text not null, n numeric)")
        .execute(&pool)
        .await?;
    // sqlx caches prepared statements per connection: the same text is reused many times.
    for i in 0..100i64 {
        sqlx::query("insert into t (name, n) values ($1, $2::numeric)")
            .bind(format!("n{i}"))
            .bind(i.to_string())
            .execute(&pool)
            .await?;
    }
    let mut tx = pool.begin().await?;
    sqlx::query("delete from t").execute(&mut *tx).await?;
    tx.rollback().await?;
    let row = sqlx::query("select count(*) as c, sum(id)::int8 as s from t")
        .fetch_one(&pool)
        .await?;
    assert_eq!(row.get::<i64, _>("c"), 100);
    assert_eq!(row.get::<i64, _>("s"), 5050);
    let err = sqlx::query("select 1/0").execute(&pool).await.unwrap_err();
    let db_err = err.as_database_error().context("database error expected")?;
    assert_eq!(db_err.code().as_deref(), Some("22012"));
    pool.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_and_copy() -> anyhow::Result<()> {
    let (_old, _new, proxy) = setup("drv_psql").await?;
    let dir = std::env::temp_dir().join(format!("sy-psql-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("script.sql");
    let data = dir.join("data.csv");
    std::fs::write(&data, "1,one\n2,two\n3,three\n")?;
    std::fs::write(
        &script,
        format!(
            "\\set ON_ERROR_STOP 1\n\
             create table p (id int primary key, name text);\n\
             \\copy p from '{}' with (format csv)\n\
             begin;\n\
             update p set name = upper(name) where id = 2;\n\
             commit;\n\
             select name from p where id = $$2$$ \\gset\n\
             \\echo got :name\n\
             select count(*) from p \\g\n",
            data.display()
        ),
    )?;
    let out = run(
        Command::new("psql")
            .arg(proxy.url("postgres"))
            .args(["-X", "-q", "-f"])
            .arg(&script),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    assert!(out.contains("got TWO"), "{out}");
    assert!(out.contains(" 3\n"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_query_mode() -> anyhow::Result<()> {
    let (old, _new, proxy) = setup("drv_pgbench").await?;
    let port = proxy.port().to_string();
    let base = |cmd: &mut Command| {
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
    };
    let mut init = Command::new("pgbench");
    base(&mut init);
    run(
        init.args(["-i", "-s", "1", "-q"]).arg(old.name()),
        Duration::from_secs(120),
    )?;
    for mode in ["simple", "extended", "prepared"] {
        let mut bench = Command::new("pgbench");
        base(&mut bench);
        let out = run(
            bench
                .args(["-n", "-c", "4", "-j", "2", "-t", "50", "-M", mode])
                .arg(old.name()),
            Duration::from_secs(120),
        )?;
        assert!(
            out.contains("number of transactions actually processed: 200/200"),
            "pgbench -M {mode}:\n{out}"
        );
        assert!(!out.contains("number of failed transactions: 1"), "{out}");
    }
    // The transactions really reached the database.
    let client = old.client().await?;
    let n: i64 = client
        .query_one("select count(*) from pgbench_history", &[])
        .await?
        .get(0);
    assert_eq!(n, 600);
    Ok(())
}

/// psycopg 3 (pipeline mode included) and asyncpg (binary formats), comparing direct and proxy.
/// `.ci/run` installs tests/python/requirements.txt; a missing package fails this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers_psycopg_and_asyncpg() -> anyhow::Result<()> {
    let (old, _new, proxy) = setup("drv_python").await?;
    python_suite(&old, &proxy).await
}

/// The same suite through the dual-write relay (a migrated table exists, so every session runs
/// it): statements on other tables must behave exactly as in passthrough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers_through_the_dual_write_relay() -> anyhow::Result<()> {
    let env = DualEnv::new(
        "drv_py_dw",
        "create table mirror_probe (id int primary key, v text)",
        vec![DualTable::new("mirror_probe")],
    )
    .await?;
    let proxy = env.proxy().await?;
    python_suite(&env.old, &proxy).await
}

/// pgbench in every query mode through the dual-write relay, with pgbench's own tables
/// migrated: the proxy mirrors every transaction and both stores end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_query_mode_with_dual_writes() -> anyhow::Result<()> {
    let (old, new) = TestDb::create_pair("drv_pgb_dw").await?;
    for db in [&old, &new] {
        let mut init = Command::new("pgbench");
        init.args([
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-i",
            "-s",
            "1",
            "-q",
        ]);
        run(init.arg(db.name()), Duration::from_secs(120))?;
    }
    let env = DualEnv::from_dbs(
        old,
        new,
        [
            "pgbench_accounts",
            "pgbench_tellers",
            "pgbench_branches",
            "pgbench_history",
        ]
        .iter()
        .map(|t| DualTable::new(t))
        .collect(),
    )
    .await?;
    let proxy = env.proxy().await?;
    let port = proxy.port().to_string();
    for mode in ["simple", "extended", "prepared"] {
        let mut bench = Command::new("pgbench");
        bench.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"]);
        let out = run(
            bench
                .args(["-n", "-c", "4", "-j", "2", "-t", "50", "-M", mode])
                .arg(env.old.name()),
            Duration::from_secs(120),
        )?;
        assert!(
            out.contains("number of transactions actually processed: 200/200"),
            "pgbench -M {mode}:\n{out}"
        );
    }
    env.wait_for_no_intents(Duration::from_secs(20)).await?;
    env.assert_converged().await?;
    let n: i64 = env.new.query_i64("select count(*) from pgbench_history").await?;
    assert_eq!(n, 600, "every history row mirrored once");
    Ok(())
}

async fn python_suite(old: &TestDb, proxy: &TestProxy) -> anyhow::Result<()> {
    let suite = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
    let direct = format!(
        "postgres://postgres@127.0.0.1:5432/{}?sslmode=disable",
        old.name()
    );
    let out = tokio::task::spawn_blocking({
        let proxied = proxy.url("postgres");
        move || {
            run(
                Command::new("python3")
                    .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", suite])
                    .env("SWITCHYARD_TEST_DIRECT_DSN", direct)
                    .env("SWITCHYARD_TEST_PROXY_DSN", proxied),
                Duration::from_secs(300),
            )
        }
    })
    .await??;
    assert!(out.contains(" passed"), "{out}");
    assert!(!out.contains(" failed"), "{out}");
    Ok(())
}
