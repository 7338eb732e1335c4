//! Driver transcripts are the same whether a table's reads come from OLD or from NEW: the
//! driver workloads (psycopg with pipelines, asyncpg in binary, tokio-postgres with prepared
//! statements, raw protocol bytes, pgbench `-S -M prepared`) run through a proxy with the
//! tables in `read_shift` at share 0 (every read OLD's) and at share 100 (every eligible read
//! NEW's), and what the clients get is compared. The tables hold the same rows on both
//! stores; NEW's ids for the enum and the tables differ from OLD's (a padding type and table
//! are created on NEW first), and the sessions run under non-default TimeZone, DateStyle,
//! IntervalStyle and extra_float_digits. At share 100 the test checks every workload was
//! actually served by NEW, with no fallback, or it would prove nothing.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};
use tokio::process::Command;
use tokio_postgres::types::{FromSql, Type};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (
    id int PRIMARY KEY,
    name text NOT NULL,
    feeling mood NOT NULL,
    at timestamptz NOT NULL,
    d date,
    span interval,
    ratio float8,
    price numeric(12, 3),
    tags text[]
);
INSERT INTO items
SELECT i, 'item ' || i, (enum_range(NULL::mood))[1 + i % 3],
       timestamptz '2024-03-01 12:00:00.123456+00' + i * interval '1 hour 7 minutes',
       date '2024-02-27' + i, i * interval '1 day 2 hours 3.5 seconds', 1.0 / (i + 2),
       i * 1.125, ARRAY['t' || i, NULL, 'x y']
FROM generate_series(1, 40) i;
";

const ITEMS: &str = "public.items";
const ACCOUNTS: &str = "public.pgbench_accounts";

/// The balance each pgbench account holds on both stores (pgbench leaves them all 0).
const BALANCE: &str = "UPDATE pgbench_accounts SET abalance = aid % 997";

/// pgbench `-M prepared` reads an account and fails the run when its balance is not the one
/// seeded (a division by zero, planned only at execution).
const CHECK_SCRIPT: &str = "\\set aid random(1, 100000)
SELECT abalance AS got FROM pgbench_accounts WHERE aid = :aid \\gset
\\if :got != :aid % 997
SELECT 1 / (:aid - :aid);
\\endif
";

/// Runs `cmd` with a time limit; stdout on success, a failure with both outputs otherwise.
async fn run(cmd: &mut Command, limit: Duration) -> anyhow::Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("{cmd:?} did not finish within {limit:?}"))??;
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

fn pgbench(port: u16) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]);
    cmd
}

/// OLD and NEW with the same rows in `items` and pgbench's accounts, and other ids on NEW.
async fn env() -> anyhow::Result<DualEnv> {
    let (old, new) = TestDb::create_pair("shift_drv").await?;
    new.execute_batch(
        "CREATE TYPE padding AS ENUM ('x'); CREATE TABLE padding_rows (id int); DROP TABLE padding_rows",
    )
    .await?;
    for db in [&old, &new] {
        db.execute_batch(SCHEMA).await?;
        run(
            pgbench(5432).args(["-i", "-s", "1", "-q", db.name()]),
            Duration::from_secs(120),
        )
        .await?;
        db.execute_batch(BALANCE).await?;
    }
    let env = DualEnv::from_dbs(old, new, vec![DualTable::new(ITEMS), DualTable::new(ACCOUNTS)]).await?;
    let ids = "SELECT 'mood'::regtype::oid::int8 * 1000000 + 'items'::regclass::oid::int8";
    let (on_old, on_new) = (env.old.query_i64(ids).await?, env.new.query_i64(ids).await?);
    assert_ne!(
        on_old / 1_000_000,
        on_new / 1_000_000,
        "the enum needs other ids on NEW"
    );
    assert_ne!(
        on_old % 1_000_000,
        on_new % 1_000_000,
        "the table needs other ids on NEW"
    );
    Ok(env)
}

/// Every value of a row in the format the server sent it (tokio-postgres asks for binary).
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// tokio-postgres: settings by SET, prepared statements reused, binary rows, the enum's type
/// learned from the catalog by the id in the description, and simple-protocol text rows.
async fn tokio_postgres_transcript(proxy: &TestProxy) -> anyhow::Result<Vec<String>> {
    let client = proxy.client().await?;
    for set in [
        "SET TimeZone = 'Australia/Adelaide'",
        "SET DateStyle = 'Postgres, DMY'",
        "SET IntervalStyle = 'sql_standard'",
        "SET extra_float_digits = 0",
    ] {
        client.batch_execute(set).await?;
    }
    let mut out = Vec::new();
    let stmt = client
        .prepare("SELECT id, name, feeling, at, d, span, ratio, price, tags FROM items WHERE id = $1")
        .await?;
    for c in stmt.columns() {
        out.push(format!(
            "{} {} {} {:?} {:?} {:?}",
            c.name(),
            c.type_().name(),
            c.type_().oid(),
            c.type_().kind(),
            c.table_oid(),
            c.column_id()
        ));
    }
    for id in 1..=12i32 {
        let row = client.query_one(&stmt, &[&id]).await?;
        let values: Vec<Option<Vec<u8>>> = (0..row.len()).map(|i| row.get::<_, Raw>(i).0).collect();
        out.push(format!("{values:?}"));
    }
    let by_mood = client
        .prepare("SELECT id, feeling, at FROM items WHERE feeling::text = $1 ORDER BY id")
        .await?;
    for mood in ["sad", "ok", "happy", "sad"] {
        for row in client.query(&by_mood, &[&mood]).await? {
            let values: Vec<Option<Vec<u8>>> = (0..row.len()).map(|i| row.get::<_, Raw>(i).0).collect();
            out.push(format!("{values:?}"));
        }
    }
    for m in client
        .simple_query("SELECT id, feeling, at, d, span, ratio FROM items WHERE id <= 5 ORDER BY id")
        .await?
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let values: Vec<Option<&str>> = (0..r.len()).map(|i| r.get(i)).collect();
            out.push(format!("{values:?}"));
        }
    }
    Ok(out)
}

/// Raw protocol: every message the client receives after login, one batch at a time (each
/// sent once the previous one is answered, so NEW may serve it).
async fn wire_transcript(proxy: &TestProxy, db: &str) -> anyhow::Result<Vec<Msg>> {
    let addr = format!("127.0.0.1:{}", proxy.port()).parse()?;
    let (mut conn, _) = RawConn::login(addr, "postgres", db).await?;
    let mut batches: Vec<(usize, Frontend)> = Vec::new();
    let mut add = |ready: usize, build: &dyn Fn(&mut Frontend)| {
        let mut f = Frontend::new();
        build(&mut f);
        batches.push((ready, f));
    };
    add(4, &|f| {
        f.query("SET TimeZone = 'Europe/Helsinki'")
            .query("SET DateStyle = 'SQL, DMY'")
            .query("SET IntervalStyle = 'iso_8601'")
            .query("SET extra_float_digits = 0");
    });
    add(1, &|f| {
        f.query("SELECT * FROM items WHERE id BETWEEN 1 AND 4 ORDER BY id");
    });
    add(1, &|f| {
        f.parse(
            "s1",
            "SELECT id, feeling, at, span, ratio, tags FROM items WHERE feeling = $1 ORDER BY id",
            &[],
        )
        .describe(b'S', "s1")
        .sync();
    });
    add(1, &|f| {
        f.bind("", "s1", &[Some(&b"happy"[..])], &[], &[0])
            .describe(b'P', "")
            .execute("", 0)
            .sync();
    });
    add(1, &|f| {
        f.bind("", "s1", &[Some(&b"sad"[..])], &[], &[1])
            .execute("", 0)
            .sync();
    });
    add(1, &|f| {
        f.parse("", "SELECT feeling, d, price, name FROM items WHERE id = $1", &[])
            .bind("", "", &[Some(&b"7"[..])], &[], &[1, 0, 1, 0])
            .describe(b'P', "")
            .execute("", 0)
            .sync();
    });
    let mut msgs = Vec::new();
    for (ready, f) in &batches {
        conn.send(f.bytes()).await?;
        let answer = tokio::time::timeout(Duration::from_secs(30), conn.read_until_ready(*ready))
            .await
            .context("no answer within 30 s")??;
        msgs.extend(answer);
    }
    Ok(msgs)
}

/// psycopg (pipelines included) and asyncpg, by `tests/python/shift_transcript.py`.
async fn python_transcript(proxy: &TestProxy) -> anyhow::Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/shift_transcript.py");
    let out = run(
        Command::new("python3").arg(script).arg(proxy.url("postgres")),
        Duration::from_secs(120),
    )
    .await?;
    serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))
}

/// pgbench `-S -M prepared` and the balance-checking script; fails on any failed transaction.
async fn pgbench_reads(proxy: &TestProxy, db: &str) -> anyhow::Result<()> {
    let dir = tempdir()?;
    let script = dir.join("check.sql");
    std::fs::write(&script, CHECK_SCRIPT)?;
    for extra in [
        vec!["-S".to_owned()],
        vec!["-f".to_owned(), script.display().to_string()],
    ] {
        let out = run(
            pgbench(proxy.port())
                .args(["-n", "-c", "2", "-j", "2", "-t", "200", "-M", "prepared"])
                .args(&extra)
                .arg(db),
            Duration::from_secs(120),
        )
        .await?;
        anyhow::ensure!(
            out.contains("number of transactions actually processed: 400/400")
                && out.contains("number of failed transactions: 0"),
            "pgbench {extra:?}:\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("sy-shift-drv-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What each workload returned, through a proxy at `share`, and where its reads went.
struct Run {
    python: serde_json::Value,
    tokio_postgres: Vec<String>,
    wire: Vec<Msg>,
    /// Reads of `items` served by NEW during each of the three workloads above.
    items_new: [u64; 3],
    items: serde_json::Value,
    accounts: serde_json::Value,
}

async fn new_reads(proxy: &TestProxy) -> anyhow::Result<u64> {
    proxy.table_reads(ITEMS).await?["new"]
        .as_u64()
        .context("no read counts for items")
}

async fn run_at(env: &DualEnv, share: u8) -> anyhow::Result<Run> {
    let proxy = env
        .start_proxy(&env.read_shift_config(env.new.url(), share))
        .await?;
    proxy.wait_for_read_lease(ITEMS).await?;
    let n0 = new_reads(&proxy).await?;
    let python = python_transcript(&proxy).await?;
    let n1 = new_reads(&proxy).await?;
    let tokio_postgres = tokio_postgres_transcript(&proxy).await?;
    let n2 = new_reads(&proxy).await?;
    let wire = wire_transcript(&proxy, env.old.name()).await?;
    let n3 = new_reads(&proxy).await?;
    pgbench_reads(&proxy, env.old.name()).await?;
    Ok(Run {
        python,
        tokio_postgres,
        wire,
        items_new: [n1 - n0, n2 - n1, n3 - n2],
        items: proxy.table_reads(ITEMS).await?,
        accounts: proxy.table_reads(ACCOUNTS).await?,
    })
}

fn no_fallbacks(reads: &serde_json::Value) -> bool {
    reads["fallbacks"]
        .as_object()
        .is_some_and(|f| f.values().all(|v| v == 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_transcripts_are_the_same_from_old_and_from_new() -> anyhow::Result<()> {
    let env = env().await?;
    let old = run_at(&env, 0).await?;
    let new = run_at(&env, 100).await?;
    eprintln!(
        "share 0: items {} accounts {}\nshare 100: items {} (by workload {:?}) accounts {}",
        old.items, old.accounts, new.items, new.items_new, new.accounts
    );

    // At share 0 OLD served everything; at 100 NEW served reads of every workload, and
    // nothing fell back to OLD (a pipelined batch behind one in flight is OLD's, uncounted
    // as a fallback).
    assert_eq!(old.items["new"], 0, "{}", old.items);
    assert!(old.items["old"].as_u64() > Some(0), "{}", old.items);
    assert!(
        new.items_new.iter().all(|n| *n > 0),
        "{:?} {}",
        new.items_new,
        new.items
    );
    assert!(no_fallbacks(&new.items), "{}", new.items);
    assert!(new.accounts["new"].as_u64() >= Some(400), "{}", new.accounts);
    assert!(no_fallbacks(&new.accounts), "{}", new.accounts);
    // The same workload is the same number of reads, whichever store served them.
    let total = |r: &serde_json::Value| r["old"].as_u64().zip(r["new"].as_u64()).map(|(o, n)| o + n);
    assert_eq!(
        total(&old.items),
        total(&new.items),
        "{} {}",
        old.items,
        new.items
    );
    assert_eq!(total(&old.accounts), total(&new.accounts));

    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    assert_eq!(pretty(&new.python), pretty(&old.python), "psycopg / asyncpg");
    assert_eq!(new.tokio_postgres, old.tokio_postgres, "tokio-postgres");
    assert_eq!(new.wire, old.wire, "protocol bytes");

    // The transcripts show what they are meant to: the enum known to the drivers by name,
    // the session's settings in the text values.
    let python = old.python.to_string();
    assert!(python.contains("Mood.happy"), "psycopg's enum loader: {python}");
    assert!(python.contains("03.2024"), "German DateStyle: {python}");
    assert!(
        old.tokio_postgres
            .iter()
            .any(|l| l.starts_with("feeling mood ") && l.contains("Enum")),
        "{:?}",
        old.tokio_postgres
    );
    assert!(
        old.tokio_postgres
            .iter()
            .any(|l| l.contains("ACDT") || l.contains("ACST")),
        "Adelaide time: {:?}",
        old.tokio_postgres
    );
    Ok(())
}
