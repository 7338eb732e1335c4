//! Dual writes statement by statement, against real OLD and NEW databases: every kind of write
//! in simple and extended protocol reaches NEW exactly as OLD has it, and the client sees what
//! it would see from PostgreSQL directly.

use std::time::Duration;

use switchyard_test_support::{DualEnv, DualTable, TestProxy};
use tokio_postgres::SimpleQueryMessage;

const SCHEMA: &str = "
CREATE TABLE accounts (
    id bigserial PRIMARY KEY,
    owner text NOT NULL,
    balance numeric(12,2) NOT NULL DEFAULT 0,
    tags text[],
    meta jsonb,
    created timestamptz NOT NULL DEFAULT now(),
    noise double precision DEFAULT random()
);
CREATE TABLE ledger (
    entry uuid NOT NULL DEFAULT gen_random_uuid(),
    account bigint NOT NULL,
    amount numeric NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE other (id int PRIMARY KEY, v text);
CREATE FUNCTION bump(i int) RETURNS void LANGUAGE sql AS $$ UPDATE pairs SET v = v || '!' WHERE a = i $$;
CREATE FUNCTION harmless(i int) RETURNS int LANGUAGE sql AS $$ SELECT i + 1 $$;
";

async fn env(label: &str) -> DualEnv {
    DualEnv::new(
        label,
        SCHEMA,
        vec![
            DualTable::new("public.accounts"),
            DualTable::new("ledger"),
            DualTable::new("pairs"),
        ],
    )
    .await
    .expect("dual env")
}

fn tags(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(format!("C{n}")),
            SimpleQueryMessage::Row(r) => Some(format!(
                "R{}:{}",
                r.len(),
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_protocol_writes_reach_new_with_old_generated_values() {
    let env = env("dw_simple").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();

    // Autocommit inserts: serial ids, DEFAULT now(), random(), arrays, jsonb.
    let m = c
        .simple_query("INSERT INTO accounts (owner, tags, meta) VALUES ('ann', '{a,b}', '{\"k\": [1, 2]}'), ('bob', NULL, NULL)")
        .await
        .unwrap();
    assert_eq!(
        tags(&m),
        vec!["C2"],
        "no rows leak to a client that asked for none"
    );
    // The client's own RETURNING: only its columns.
    let m = c
        .simple_query("INSERT INTO accounts (owner, balance) VALUES ('cy', 5) RETURNING id, owner")
        .await
        .unwrap();
    assert_eq!(tags(&m), vec!["R2:3,cy", "C1"]);
    // UPDATE with FROM, DELETE with USING.
    c.batch_execute("UPDATE accounts a SET balance = a.balance + o.v::numeric FROM (VALUES (1, '10.5')) o(id, v) WHERE a.id = o.id")
        .await
        .unwrap();
    let m = c
        .simple_query("DELETE FROM accounts a USING (VALUES (2)) d(id) WHERE a.id = d.id RETURNING a.owner")
        .await
        .unwrap();
    assert_eq!(tags(&m), vec!["R1:bob", "C1"]);
    // Upserts.
    c.batch_execute(
        "INSERT INTO pairs VALUES (1, 'x', 'first') ON CONFLICT (a, b) DO UPDATE SET v = EXCLUDED.v",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO pairs VALUES (1, 'x', 'second') ON CONFLICT (a, b) DO UPDATE SET v = pairs.v || '+' || EXCLUDED.v")
        .await
        .unwrap();
    let m = c
        .simple_query("INSERT INTO pairs VALUES (1, 'x', 'ignored') ON CONFLICT DO NOTHING")
        .await
        .unwrap();
    assert_eq!(tags(&m), vec!["C0"]);
    // A table without a primary key: append-only, OLD's generated uuid and clock_timestamp().
    c.batch_execute("INSERT INTO ledger (account, amount) VALUES (1, 10.5), (3, 5)")
        .await
        .unwrap();
    // Several statements in one string: one implicit transaction.
    let m = c
        .simple_query("INSERT INTO pairs VALUES (2, 'y', 'a'); UPDATE pairs SET v = 'b' WHERE a = 2; SELECT v FROM pairs WHERE a = 2")
        .await
        .unwrap();
    assert_eq!(tags(&m), vec!["C1", "C1", "R1:b", "C1"]);
    // A non-migrated table is untouched on NEW.
    c.batch_execute("INSERT INTO other VALUES (1, 'old only')")
        .await
        .unwrap();

    env.assert_converged().await.unwrap();
    let n: i64 = env.new.query_i64("SELECT count(*) FROM other").await.unwrap();
    assert_eq!(n, 0);
    env.wait_for_no_intents(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn transactions_savepoints_and_rollbacks() {
    let env = env("dw_txn").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();

    c.batch_execute(
        "BEGIN;
         INSERT INTO pairs VALUES (1, 'kept', 'v');
         SAVEPOINT s1;
         INSERT INTO pairs VALUES (2, 'discarded', 'v');
         UPDATE pairs SET v = 'discarded too' WHERE a = 1;
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s2;
         INSERT INTO pairs VALUES (3, 'released', 'v');
         RELEASE s2;
         COMMIT;",
    )
    .await
    .unwrap();
    c.batch_execute("BEGIN; INSERT INTO pairs VALUES (9, 'rolled back', 'v'); ROLLBACK;")
        .await
        .unwrap();
    // An error aborts the transaction: COMMIT answers ROLLBACK and nothing is mirrored.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("INSERT INTO pairs VALUES (10, 'aborted', 'v')")
        .await
        .unwrap();
    assert!(c
        .batch_execute("INSERT INTO pairs VALUES (10, 'aborted', 'dup')")
        .await
        .is_err());
    let m = c.simple_query("COMMIT").await.unwrap();
    assert_eq!(
        tags(&m),
        vec!["C0"],
        "COMMIT of an aborted transaction is ROLLBACK"
    );
    // A failing statement in an autocommit string leaves nothing behind.
    assert!(c
        .batch_execute("INSERT INTO pairs VALUES (20, 'x', 'v'); INSERT INTO pairs VALUES (20, 'x', 'dup')")
        .await
        .is_err());

    // The session is usable afterwards and reports idle.
    let m = c.simple_query("SELECT count(*) FROM pairs").await.unwrap();
    assert_eq!(tags(&m), vec!["R1:2", "C1"]);
    // A string with its own COMMIT runs as the client wrote it: OLD's capture trigger records
    // its changes for the repair loop.
    env.assert_converged_after_repairs(Duration::from_secs(20))
        .await
        .unwrap();
}

#[tokio::test]
async fn extended_protocol_prepared_statements_reused() {
    let env = env("dw_ext").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();

    let insert = c
        .prepare("INSERT INTO accounts (owner, balance) VALUES ($1, $2::text::numeric) RETURNING id")
        .await
        .unwrap();
    assert_eq!(
        insert.columns().len(),
        1,
        "Describe shows only the client's columns"
    );
    let update = c
        .prepare("UPDATE accounts SET balance = balance + $2::text::numeric WHERE id = $1")
        .await
        .unwrap();
    assert!(
        update.columns().is_empty(),
        "Describe of a write without RETURNING: NoData"
    );
    let delete = c.prepare("DELETE FROM accounts WHERE id = $1").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..50i64 {
        let row = c
            .query_one(&insert, &[&format!("user{i}"), &format!("{i}.25")])
            .await
            .unwrap();
        ids.push(row.get::<_, i64>(0));
    }
    for (i, id) in ids.iter().enumerate() {
        let n = c.execute(&update, &[id, &format!("{i}")]).await.unwrap();
        assert_eq!(n, 1);
    }
    for id in ids.iter().step_by(3) {
        assert_eq!(c.execute(&delete, &[id]).await.unwrap(), 1);
    }
    // Binary result format of the client's own RETURNING column (tokio-postgres asks binary).
    let row = c
        .query_one(
            "UPDATE accounts SET owner = owner || '!' WHERE id = $1 RETURNING id, owner, balance",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert_eq!(row.len(), 3);
    assert_eq!(row.get::<_, i64>(0), ids[1]);
    assert_eq!(row.get::<_, String>(1), "user1!");
    // An explicit transaction through the extended protocol.
    let mut c = c;
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO pairs VALUES ($1, $2, 'in tx')", &[&7i32, &"t"])
        .await
        .unwrap();
    tx.execute("UPDATE pairs SET v = 'updated in tx' WHERE a = $1", &[&7i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO pairs VALUES ($1, $2, 'rolled back')", &[&8i32, &"t"])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    env.assert_converged().await.unwrap();
    env.wait_for_no_intents(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn uncapturable_writes_are_refused_with_a_clear_error() {
    let env = env("dw_refuse").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute("INSERT INTO pairs VALUES (1, 'a', 'v')")
        .await
        .unwrap();
    for sql in [
        "TRUNCATE pairs",
        "UPDATE ledger SET amount = 0",
        "DELETE FROM ledger",
        "ALTER TABLE pairs ADD COLUMN extra int",
    ] {
        let err = c.batch_execute(sql).await.expect_err(sql);
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "0A000", "{sql}");
        assert!(
            db.message().contains("public.pairs") || db.message().contains("public.ledger"),
            "{}",
            db.message()
        );
        assert!(db.hint().is_some(), "{sql}: the refusal says what to do");
        assert_eq!(
            db.where_(),
            None,
            "{sql}: no CONTEXT line from the proxy's DO block"
        );
    }
    // The same statements on OLD directly meet the guard trigger.
    for sql in ["TRUNCATE pairs", "UPDATE ledger SET amount = 0"] {
        let err = env.old.execute_batch(sql).await.expect_err(sql);
        let msg = format!("{err:#}");
        assert!(msg.contains("cannot be mirrored"), "{sql}: {msg}");
    }
    // A function that only reads is fine.
    let m = c.simple_query("SELECT harmless(1)").await.unwrap();
    assert_eq!(tags(&m), vec!["R1:2", "C1"]);
    // Also through the extended protocol, and inside a transaction (which it aborts).
    let err = c.execute("TRUNCATE pairs", &[]).await.expect_err("extended");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("0A000"));
    assert_eq!(err.as_db_error().and_then(|e| e.where_()), None);
    // A client's own DO block keeps its CONTEXT line.
    let err = c
        .batch_execute("DO $$ BEGIN RAISE EXCEPTION 'mine' USING ERRCODE = '0A000'; END $$")
        .await
        .expect_err("the client's own exception");
    let own = err.as_db_error().and_then(|e| e.where_()).unwrap_or_default();
    assert!(own.contains("inline_code_block"), "{own}");
    c.batch_execute("BEGIN").await.unwrap();
    assert!(c.batch_execute("TRUNCATE pairs").await.is_err());
    let m = c.simple_query("COMMIT").await.unwrap();
    assert_eq!(tags(&m), vec!["C0"]);
    // Nothing changed anywhere; the session still works.
    let m = c.simple_query("SELECT count(*) FROM pairs").await.unwrap();
    assert_eq!(tags(&m), vec!["R1:1", "C1"]);
    env.assert_converged().await.unwrap();
}

/// Writes the statement analysis cannot see, or sees only as "some write": key changes, writing
/// CTEs, functions and procedures (also ones created after the proxy started, through it or
/// directly on OLD), DO blocks. OLD's capture trigger sees every row change, so all of them reach
/// NEW: before the COMMIT when the proxy recognised a write, through the trigger's net and the
/// repair loop otherwise.
#[tokio::test]
async fn writes_hidden_from_the_statement_analysis_are_mirrored() {
    let env = env("dw_hidden").await;
    let proxy = TestProxy::start(&env.proxy_config_with_mirror(
        env.new.url(),
        &[("function_refresh_secs", 3600), ("repair_interval_ms", 100)],
    ))
    .await
    .unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute("INSERT INTO pairs VALUES (1, 'a', 'v'), (2, 'b', 'v'), (3, 'c', 'v')")
        .await
        .unwrap();
    for sql in [
        "UPDATE pairs SET a = 5 WHERE a = 1",
        "WITH d AS (DELETE FROM pairs WHERE a = 2 RETURNING *) SELECT count(*) FROM d",
        "SELECT bump(3)",
        "DO $$ BEGIN UPDATE pairs SET v = 'do' WHERE a = 3; END $$",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    // Created through the proxy, and directly on OLD (unknown to the proxy until a refresh that
    // this test never lets come).
    c.batch_execute(
        "CREATE FUNCTION wipe_pairs() RETURNS void LANGUAGE sql AS $$ DELETE FROM pairs WHERE a = 5 $$",
    )
    .await
    .unwrap();
    c.batch_execute("SELECT wipe_pairs()").await.unwrap();
    env.old
        .execute_batch(
            "CREATE PROCEDURE fill_pairs() LANGUAGE plpgsql AS $$ BEGIN INSERT INTO pairs VALUES (9, 'z', 'v'); END $$",
        )
        .await
        .unwrap();
    c.batch_execute("CALL fill_pairs()").await.unwrap();
    c.batch_execute("BEGIN; DELETE FROM pairs WHERE a = 9; ROLLBACK")
        .await
        .unwrap();
    let m = c.simple_query("SELECT a FROM pairs ORDER BY a").await.unwrap();
    assert_eq!(tags(&m), vec!["R1:3", "R1:9", "C2"]);
    env.assert_converged_after_repairs(Duration::from_secs(20))
        .await
        .unwrap();
}

#[tokio::test]
async fn failed_commit_on_old_rolls_new_back_and_versions_grow_per_write() {
    let env = DualEnv::new(
        "dw_commitfail",
        "CREATE TABLE d (id int PRIMARY KEY, u int, CONSTRAINT d_u UNIQUE (u) DEFERRABLE INITIALLY DEFERRED)",
        vec![DualTable::new("d")],
    )
    .await
    .unwrap();
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    // The deferred constraint fails at COMMIT, on OLD: the client gets OLD's error, NEW keeps
    // nothing, and no intent is left behind.
    c.batch_execute("BEGIN; INSERT INTO d VALUES (1, 5); INSERT INTO d VALUES (2, 5);")
        .await
        .unwrap();
    let err = c
        .batch_execute("COMMIT")
        .await
        .expect_err("deferred unique violation");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("23505"));
    // Same through an autocommit multi-statement string.
    let err = c
        .batch_execute("INSERT INTO d VALUES (3, 7); INSERT INTO d VALUES (4, 7)")
        .await
        .expect_err("deferred unique violation");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("23505"));
    env.assert_converged().await.unwrap();
    let new = env.new.client().await.unwrap();
    let n: i64 = new.query_one("SELECT count(*) FROM d", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
    env.wait_for_no_intents(Duration::from_secs(10)).await.unwrap();

    // Versions: an insert and four updates give version 5; a delete leaves a tombstone.
    c.batch_execute("INSERT INTO d VALUES (10, 1)").await.unwrap();
    let upd = c.prepare("UPDATE d SET u = u + 1 WHERE id = 10").await.unwrap();
    for _ in 0..4 {
        c.execute(&upd, &[]).await.unwrap();
    }
    let row = new
        .query_one(
            "SELECT sy_version, sy_deleted FROM switchyard.switchyard_keys_public_d WHERE id = 10",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (5, false));
    c.batch_execute("DELETE FROM d WHERE id = 10").await.unwrap();
    let row = new
        .query_one(
            "SELECT sy_version, sy_deleted FROM switchyard.switchyard_keys_public_d WHERE id = 10",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, bool>(1)), (6, true));
    env.assert_converged().await.unwrap();
}

#[tokio::test]
async fn mark_for_verify_runs_the_write_on_old_and_records_the_table() {
    let mut t = DualTable::new("pairs");
    t.on_uncaptured = "mark_for_verify";
    let env = DualEnv::new("dw_verify", SCHEMA, vec![t]).await.unwrap();
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute("INSERT INTO pairs VALUES (1, 'a', 'v'), (2, 'b', 'v')")
        .await
        .unwrap();
    c.batch_execute("TRUNCATE pairs").await.unwrap();
    let old = env.old.client().await.unwrap();
    let n: i64 = old
        .query_one("SELECT count(*) FROM pairs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "TRUNCATE ran on OLD");
    // The mark is written in the background: wait for it, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows = old
            .query(
                "SELECT reason FROM switchyard.switchyard_verify WHERE table_name = 'public.pairs'",
                &[],
            )
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            assert!(r.get::<_, String>(0).contains("TRUNCATE"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "table not marked for verification"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = proxy.admin_get("/metrics").await.unwrap();
    assert!(body.contains("switchyard_uncaptured_writes"), "{body}");
    // NEW still has the rows: the difference is exactly what the verification must find.
    let (only_old, only_new) = env.diff("pairs").await.unwrap();
    assert_eq!((only_old.len(), only_new.len()), (0, 2));
}

/// Raw extended-protocol batches (pipelined Parse/Bind/Execute with an error in the middle, an
/// explicit transaction and savepoints inside one batch) answer exactly as PostgreSQL does, and
/// only the committed work reaches NEW.
#[tokio::test]
async fn pipelined_extended_batches_answer_like_postgres() {
    use switchyard_test_support::wire::{Frontend, RawConn};
    use switchyard_test_support::TestDb;

    let env = env("dw_pipe").await;
    let direct_db = TestDb::create("dw_pipe_direct").await.unwrap();
    direct_db.execute_batch(SCHEMA).await.unwrap();
    let proxy = env.proxy().await.unwrap();

    let batches: Vec<Frontend> = {
        let mut v = Vec::new();
        // Autocommit batch: insert, failing insert, insert; nothing survives.
        let mut f = Frontend::new();
        f.parse("", "INSERT INTO pairs VALUES ($1::int, 'a', 'v')", &[])
            .bind("", "", &[Some(b"1")], &[], &[])
            .execute("", 0)
            .parse("", "INSERT INTO pairs VALUES (1, 'a', 'dup')", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .parse("", "INSERT INTO pairs VALUES (2, 'b', 'v')", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .sync();
        v.push(f);
        // Autocommit batch that succeeds, with RETURNING and binary results.
        let mut f = Frontend::new();
        f.parse(
            "ins",
            "INSERT INTO pairs VALUES ($1::int, $2, 'w') RETURNING a, b",
            &[],
        )
        .bind("", "ins", &[Some(b"3"), Some(b"c")], &[], &[1])
        .describe(b'P', "")
        .execute("", 0)
        .bind("", "ins", &[Some(b"4"), Some(b"d")], &[], &[0, 0])
        .execute("", 0)
        .sync();
        v.push(f);
        // Explicit transaction with savepoints in one batch.
        let mut f = Frontend::new();
        f.parse("", "BEGIN", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .bind("", "ins", &[Some(b"5"), Some(b"e")], &[], &[])
            .execute("", 0)
            .parse("", "SAVEPOINT s", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .bind("", "ins", &[Some(b"6"), Some(b"f")], &[], &[])
            .execute("", 0)
            .parse("", "ROLLBACK TO SAVEPOINT s", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .parse("", "COMMIT", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .sync();
        v.push(f);
        // An error before a write in the same batch: the server skips the write (and whatever
        // the proxy would add for it) up to the Sync.
        let mut f = Frontend::new();
        f.parse("", "SELECT 1/0", &[])
            .bind("", "", &[], &[], &[])
            .execute("", 0)
            .bind("", "ins", &[Some(b"7"), Some(b"g")], &[], &[])
            .execute("", 0)
            .sync();
        v.push(f);
        let mut f = Frontend::new();
        f.query("SELECT a, b, v FROM pairs ORDER BY a");
        v.push(f);
        v
    };
    let mut answers = Vec::new();
    for (addr, db) in [
        ("127.0.0.1:5432".parse().unwrap(), direct_db.name()),
        (proxy.addr, env.old.name()),
    ] {
        let (mut conn, _) = RawConn::login(addr, "postgres", db).await.unwrap();
        let mut all = Vec::new();
        for b in &batches {
            conn.send(b.bytes()).await.unwrap();
            let msgs = conn.read_until_ready(b.requests()).await.unwrap();
            all.push(
                msgs.iter()
                    .map(|m| format!("{}:{}", m.tag as char, m.code().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            all.push(
                msgs.iter()
                    .filter(|m| m.tag == b'D' || m.tag == b'C')
                    .map(|m| format!("{:?}", m.body))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        answers.push(all);
    }
    assert_eq!(answers[0], answers[1], "proxy answers differ from PostgreSQL's");
    assert!(answers[0][0].contains("E:23505"), "{:?}", answers[0]);
    env.assert_converged().await.unwrap();
    let n: i64 = env.new.query_i64("SELECT count(*) FROM pairs").await.unwrap();
    assert_eq!(n, 3, "rows 3, 4 and 5 mirrored; 1, 2 and 6 never committed");
}

/// A drain ends idle dual-write sessions at once and one inside a transaction after the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_idle_sessions_and_cuts_open_transactions_after_the_grace() {
    let env = env("dw_drain").await;
    let proxy = env.proxy().await.unwrap();
    let idle = proxy.client().await.unwrap();
    let busy = proxy.client().await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO pairs VALUES (1, 'open', 'v')")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    proxy.drain(Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        idle.batch_execute("SELECT 1").await.is_err(),
        "idle session ended by the drain"
    );
    // The open transaction may still work within the grace period...
    busy.batch_execute("INSERT INTO pairs VALUES (2, 'open', 'v')")
        .await
        .unwrap();
    // ...and is cut after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while busy.batch_execute("SELECT 1").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "session not cut after the grace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "cut before the grace ended"
    );
    // Its uncommitted writes are nowhere.
    env.assert_converged().await.unwrap();
    let n: i64 = env.old.query_i64("SELECT count(*) FROM pairs").await.unwrap();
    assert_eq!(n, 0);
}

/// Two proxies' transactions on one key that NEW had never had: A inserts it (OLD committed, its
/// NEW commit still in flight), B deletes it. B's apply on NEW must remove A's row once A commits
/// there. With the delete and the tombstone in one statement, the DELETE's snapshot predated A's
/// commit and missed the row, the tombstone waited for A's key record and then marked the key
/// deleted: NEW kept a row OLD no longer had, under a tombstone (a race the protocol model found,
/// model/README.md). Replayed here with the exact statements the proxy prepares.
#[tokio::test]
async fn a_mirrored_delete_removes_an_insert_of_the_key_still_committing_on_new() {
    let env = env("dw_delrace").await;
    let pool = sqlx::PgPool::connect(env.new.url()).await.unwrap();
    let old_pool = sqlx::PgPool::connect(env.old.url()).await.unwrap();
    let name: switchyard_config::TableName = "public.pairs".parse().unwrap();
    let schema = switchyard_store::load_table(&old_pool, &name)
        .await
        .unwrap()
        .unwrap();
    let table = switchyard_store::mirror::MirrorTable::new(
        name.clone(),
        vec!["a".into(), "b".into()],
        &schema,
        &schema,
    );
    let image = r#"[{"a": 1, "b": "k", "v": "inserted by A"}]"#.to_owned();
    // A: the upsert applied, NEW's commit not yet sent.
    let mut a = pool.begin().await.unwrap();
    run(
        &mut a,
        table.prepared_apply(switchyard_store::mirror::ChangeOp::Upsert),
        &image,
    )
    .await;
    // B: the fence lock, then the delete's statements, in the background.
    let mut b = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(switchyard_store::mirror::fence_lock_sql(
        &name, false,
    )))
    .execute(&mut *b)
    .await
    .unwrap();
    let delete = table.prepared_apply(switchyard_store::mirror::ChangeOp::Delete);
    let b_done = tokio::spawn(async move {
        run(&mut b, delete, &image).await;
        b.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_done.is_finished(), "B waits for A's key record");
    a.commit().await.unwrap();
    b_done.await.unwrap();
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM pairs").await.unwrap(),
        0,
        "no row left under the tombstone"
    );
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_pairs WHERE sy_deleted")
            .await
            .unwrap(),
        1
    );
}

/// Runs prepared apply statements with `image` as their parameter, as the proxy binds them.
async fn run(tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, statements: Vec<String>, image: &str) {
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(image)
            .execute(&mut **tx)
            .await
            .unwrap();
    }
}

/// The value of the Prometheus sample `name` (with its labels, as rendered), 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Statement counts and store latency come from the dual-write relay too, not only from the
/// passthrough one: they must not go flat once a table is in `dual_write`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_and_latency_metrics_in_dual_write() {
    let env = env("dw_metrics").await;
    let proxy = env.proxy().await.unwrap();
    let client = proxy.client().await.unwrap();
    client
        .simple_query("INSERT INTO pairs VALUES (1, 'a', 'x')")
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    client
        .execute("UPDATE pairs SET v = $1 WHERE a = 1", &[&"y"])
        .await
        .unwrap();
    client.query("SELECT $1::int", &[&1i32]).await.unwrap();
    drop(client);

    let (code, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    for (labels, at_least) in [
        ("{kind=\"write\",protocol=\"simple\"}", 1.0),
        ("{kind=\"read\",protocol=\"simple\"}", 1.0),
        ("{kind=\"write\",protocol=\"extended\"}", 1.0),
        ("{kind=\"read\",protocol=\"extended\"}", 1.0),
    ] {
        let n = sample(&metrics, &format!("switchyard_statements_total{labels}"));
        assert!(n >= at_least, "statements {labels}: {n}\n{metrics}");
    }
    // One request per simple query, one per Sync of the extended ones (tokio-postgres prepares
    // each statement in a batch of its own first).
    let requests = sample(&metrics, "switchyard_store_latency_seconds_count{store=\"old\"}");
    assert!(requests >= 4.0, "latency samples: {requests}\n{metrics}");
    proxy.stop().await.unwrap();
}
