//! The backfill against real OLD and NEW databases: it converges under a concurrent dual-write
//! workload through two proxies, never overwrites a mirrored row nor resurrects a deleted one
//! (also against writes in flight on NEW), handles many key types, resumes after a stop without
//! copying a chunk twice, throttles, and fails with clear errors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_backfill::progress::RunStatus;
use switchyard_backfill::{BackfillError, BackfillOptions, Summary};
use switchyard_config::Config;
use switchyard_test_support::{DualEnv, DualTable, ProxyConfig, TestDb};

/// Bounds every test: a backfill that hangs fails instead.
const LIMIT: Duration = Duration::from_secs(120);

fn options(workers: usize, chunk_rows: u64) -> BackfillOptions {
    BackfillOptions {
        workers,
        chunk_rows,
        ..BackfillOptions::default()
    }
}

async fn backfill(config: &Config, options: &BackfillOptions) -> Result<Summary, BackfillError> {
    let (_trigger, stop) = switchyard_backfill::stop_channel();
    tokio::time::timeout(LIMIT, switchyard_backfill::run(config, options, stop))
        .await
        .expect("backfill within the time limit")
}

/// Per chunk: `(rows_read, rows_copied, rows_skipped, rows_conflicting)` of every done chunk,
/// and the number of chunks not done.
async fn chunk_totals(new: &TestDb, table: &str) -> ((i64, i64, i64, i64), i64) {
    let c = new.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT coalesce(sum(rows_read), 0)::int8, coalesce(sum(rows_copied), 0)::int8, \
             coalesce(sum(rows_skipped), 0)::int8, coalesce(sum(rows_conflicting), 0)::int8, \
             count(*) FILTER (WHERE status <> 'done') \
             FROM switchyard.switchyard_backfill_chunks WHERE table_name = $1",
            &[&table],
        )
        .await
        .unwrap();
    ((row.get(0), row.get(1), row.get(2), row.get(3)), row.get(4))
}

const ITEMS: &str = "CREATE TABLE items (
    id bigint PRIMARY KEY,
    owner text NOT NULL,
    qty integer NOT NULL,
    note text,
    updated timestamptz NOT NULL DEFAULT now()
);";

/// One workload client: random updates, deletes, inserts and small transactions over the whole
/// key range (even ids exist before the backfill, odd ids are new), through a proxy. Returns
/// the ids it deleted.
async fn workload(proxy_url: String, seed: u64, stop: Arc<AtomicBool>, max_id: i64) -> (u64, Vec<i64>) {
    let (client, conn) = tokio_postgres::connect(&proxy_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let update = client
        .prepare("UPDATE items SET qty = qty + 1, note = $2 WHERE id = $1")
        .await
        .unwrap();
    let delete = client
        .prepare("DELETE FROM items WHERE id = $1 RETURNING id")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO items (id, owner, qty) VALUES ($1, $2, 0) ON CONFLICT (id) DO NOTHING")
        .await
        .unwrap();
    let mut deleted = Vec::new();
    let mut ops = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = rng.gen_range(1..=max_id);
        let roll = rng.gen_range(0..100);
        ops += 1;
        if roll < 45 {
            client
                .execute(&update, &[&id, &format!("w{seed}-{ops}")])
                .await
                .unwrap();
        } else if roll < 65 {
            if !client.query(&delete, &[&id]).await.unwrap().is_empty() {
                deleted.push(id);
            }
        } else if roll < 90 {
            client
                .execute(&insert, &[&id, &format!("new{seed}")])
                .await
                .unwrap();
        } else {
            // A transaction over three random keys.
            let (a, b, c) = (id, rng.gen_range(1..=max_id), rng.gen_range(1..=max_id));
            let sql = format!(
                "BEGIN; UPDATE items SET qty = qty - 1 WHERE id = {a}; DELETE FROM items WHERE id = {b}; \
                 INSERT INTO items (id, owner, qty) VALUES ({c}, 'tx', 1) ON CONFLICT (id) DO NOTHING; COMMIT"
            );
            client.batch_execute(&sql).await.unwrap();
            deleted.push(b);
        }
    }
    (ops, deleted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_under_concurrent_dual_writes_converges() {
    concurrent_dual_writes_and_backfill("bf_conc", None).await;
}

/// The same with NEW's database defaulting to `REPEATABLE READ`: mirrored writes, repairs and the
/// backfill rely on `READ COMMITTED` on NEW (a statement's snapshot taken after the locks before
/// it), so every connection they open sets it, whatever NEW's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_under_concurrent_dual_writes_converges_whatever_new_isolation() {
    concurrent_dual_writes_and_backfill("bf_conc_rr", Some("repeatable read")).await;
}

/// A backfill of 200,000 rows while four clients write through two proxies; then OLD and NEW
/// are identical, no deleted key is back, and every chunk was done once. `new_isolation`: NEW's
/// database default `default_transaction_isolation`.
async fn concurrent_dual_writes_and_backfill(label: &str, new_isolation: Option<&str>) {
    let env = DualEnv::new(label, ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    if let Some(level) = new_isolation {
        env.new
            .execute_batch(&format!(
                "ALTER DATABASE {} SET default_transaction_isolation = '{level}'",
                env.new.name()
            ))
            .await
            .unwrap();
    }
    // 200,000 rows that exist before dual writes: even ids 2..=400,000.
    env.seed_old(
        "INSERT INTO items (id, owner, qty, note) \
             SELECT 2 * g, 'owner' || (g % 97), g % 1000, md5(g::text) FROM generate_series(1, 200000) g; \
             ANALYZE items",
    )
    .await
    .unwrap();
    let proxies = [env.proxy().await.unwrap(), env.proxy().await.unwrap()];
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..4u64 {
        let url = proxies[(i % 2) as usize].url("postgres");
        clients.push(tokio::spawn(workload(url, 0x5eed + i, stop.clone(), 400_001)));
    }
    // Let the workload touch keys before the backfill reaches them, then backfill slowly
    // enough that writes keep landing in chunks before, during and after their copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = env.config().unwrap();
    let opts = BackfillOptions {
        max_rows_per_sec: Some(80_000),
        ..options(3, 4000)
    };
    let summary = backfill(&config, &opts).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    let mut deleted = Vec::new();
    for c in clients {
        let (n, d) = c.await.unwrap();
        ops += n;
        deleted.extend(d);
    }
    env.wait_for_no_intents(Duration::from_secs(30)).await.unwrap();

    assert_eq!(summary.status, RunStatus::Done, "{summary:?}");
    let t = &summary.tables[0];
    assert!(
        t.this_run.rows_skipped > 0,
        "the workload got to some keys first: {t:?}"
    );
    assert!(ops > 1000, "the workload ran alongside: {ops} operations");
    env.assert_converged().await.unwrap();

    // No deleted key is back: every key deleted and not inserted again is absent from NEW, and
    // no key with a tombstone has a row.
    let old = env.old.client().await.unwrap();
    let new = env.new.client().await.unwrap();
    let still_there: Vec<i64> = old
        .query("SELECT id FROM items WHERE id = ANY($1)", &[&deleted])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let gone: Vec<i64> = deleted
        .iter()
        .copied()
        .filter(|id| !still_there.contains(id))
        .collect();
    assert!(gone.len() > 100, "{} deleted keys", gone.len());
    let resurrected: i64 = new
        .query_one("SELECT count(*) FROM items WHERE id = ANY($1)", &[&gone])
        .await
        .unwrap()
        .get(0);
    assert_eq!(resurrected, 0);
    let tombstoned_rows: i64 = new
        .query_one(
            "SELECT count(*) FROM items i JOIN switchyard.switchyard_keys_public_items k USING (id) \
             WHERE k.sy_deleted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tombstoned_rows, 0);
    // Every chunk done once; the counts add up.
    let ((read, copied, skipped, conflicting), pending) = chunk_totals(&env.new, "public.items").await;
    assert_eq!(pending, 0);
    assert_eq!(read, copied + skipped + conflicting);
    assert_eq!(conflicting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_many_types_are_backfilled() {
    let schema = "
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TABLE k_big (id bigint PRIMARY KEY, v text);
        CREATE TABLE k_uuid (id uuid PRIMARY KEY, v text);
        CREATE TABLE k_text (name text PRIMARY KEY, v int);
        CREATE TABLE k_bytes (id bytea PRIMARY KEY, v int);
        CREATE TABLE k_comp (tenant int, code text, at timestamptz NOT NULL, v numeric, PRIMARY KEY (tenant, code));
        CREATE TABLE k_day (day date, seq bigint, payload jsonb, PRIMARY KEY (day, seq));
        CREATE TABLE k_enum (id int PRIMARY KEY, moods mood[], m mood);
        CREATE TABLE k_ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text NOT NULL,
                              g int GENERATED ALWAYS AS (length(v)) STORED);
        CREATE TABLE k_custom (a int NOT NULL, b text NOT NULL, v text);
        CREATE UNIQUE INDEX k_custom_ab ON k_custom (a, b);
    ";
    let mut tables: Vec<DualTable> = [
        "k_big", "k_uuid", "k_text", "k_bytes", "k_comp", "k_day", "k_enum", "k_ident",
    ]
    .iter()
    .map(|t| DualTable::new(t))
    .collect();
    tables.push(DualTable {
        key: vec!["a".into(), "b".into()],
        ..DualTable::new("k_custom")
    });
    let env = DualEnv::new("bf_types", schema, tables).await.unwrap();
    env.seed_old(
            r#"
            INSERT INTO k_big SELECT g * 7919 % 100003 - 50000, 'v' || g FROM generate_series(1, 3000) g;
            INSERT INTO k_uuid SELECT gen_random_uuid(), 'v' || g FROM generate_series(1, 3000) g;
            INSERT INTO k_text SELECT s, g FROM (
                SELECT g, CASE g % 5 WHEN 0 THEN 'it''s ' || g WHEN 1 THEN E'back\\slash ' || g
                       WHEN 2 THEN 'ünïcødé ' || g WHEN 3 THEN ' lead ' || g ELSE 'tab	' || g END AS s
                FROM generate_series(1, 3000) g) x;
            INSERT INTO k_text VALUES ('', -1);
            INSERT INTO k_bytes SELECT decode(md5(g::text), 'hex'), g FROM generate_series(1, 3000) g;
            INSERT INTO k_comp SELECT g % 13, 'code ' || g, now() - g * interval '1 minute', g / 7.0
                FROM generate_series(1, 3000) g;
            INSERT INTO k_day SELECT date '2020-01-01' + g % 40, g, jsonb_build_object('g', g, 's', 'x"y')
                FROM generate_series(1, 3000) g;
            INSERT INTO k_enum SELECT g, ARRAY['sad', 'happy']::mood[], (ARRAY['sad','ok','happy'])[1 + g % 3]::mood
                FROM generate_series(1, 3000) g;
            INSERT INTO k_ident (v) SELECT repeat('x', g % 17) FROM generate_series(1, 3000) g;
            INSERT INTO k_custom SELECT g % 50, 'b' || g, 'v' FROM generate_series(1, 3000) g;
            "#,
        )
        .await
        .unwrap();
    // Mirrored writes before the backfill: updates and deletes leave version records and
    // tombstones the backfill must respect.
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute(
        "UPDATE k_big SET v = 'mirrored' WHERE id % 10 = 0;
         DELETE FROM k_big WHERE id % 10 = 1;
         UPDATE k_text SET v = v + 1000 WHERE v % 9 = 0;
         DELETE FROM k_text WHERE v % 9 = 1;
         DELETE FROM k_comp WHERE tenant = 3;
         UPDATE k_day SET payload = '{}' WHERE seq % 11 = 0;
         UPDATE k_enum SET m = 'ok' WHERE id % 5 = 0;
         DELETE FROM k_ident WHERE id % 4 = 0;
         UPDATE k_custom SET v = 'mirrored' WHERE a = 7;
         DELETE FROM k_uuid WHERE v LIKE '%7';",
    )
    .await
    .unwrap();
    let summary = backfill(&env.config().unwrap(), &options(3, 700)).await.unwrap();
    assert_eq!(summary.status, RunStatus::Done, "{summary:?}");
    for t in &summary.tables {
        let total = t.total.as_ref().unwrap();
        assert!(total.chunks_done >= 4, "{} in several chunks: {total:?}", t.table);
    }
    env.assert_converged().await.unwrap();
    // Every table goes the COPY way (except chunks where more than a quarter of the keys have
    // records, such as k_comp's deleted tenant 3 or k_ident's every fourth id: those are claimed
    // key by key); an array of a user-defined enum is copied as text.
    let methods = env
        .new
        .client()
        .await
        .unwrap()
        .query(
            "SELECT table_name, array_agg(DISTINCT method ORDER BY method) FROM switchyard.switchyard_backfill_chunks \
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<String>>(1)))
        .collect::<Vec<_>>();
    assert_eq!(methods.len(), 9);
    for (table, m) in &methods {
        // Tables with a user-defined type (k_enum) are copied as text, the others in binary;
        // both take the fast path.
        assert!(m.iter().any(|m| m == "copy"), "{table}: {m:?}");
    }
    // Mirrored records kept their versions; the fast path wrote no records of its own.
    let v: i64 = env
        .new
        .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_k_big WHERE sy_version >= 1")
        .await
        .unwrap();
    assert!(v > 300, "{v}");
    // A second run finds everything done and copies nothing.
    let again = backfill(&env.config().unwrap(), &options(2, 700)).await.unwrap();
    assert!(again.tables.iter().all(|t| t.this_run.chunks == 0), "{again:?}");
}

/// The fence is a claim, not a read: a mirrored transaction still open on NEW (its key record
/// uncommitted) makes the chunk wait, and once it commits the backfill skips the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_flight_on_new_win_over_the_backfill() {
    let env = DualEnv::new("bf_inflight", ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (id, owner, qty) SELECT g, 'old', 0 FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    let new = env.new.client().await.unwrap();
    // Committed before the backfill: a newer version of 100 and a tombstone for 200.
    new.batch_execute(
        "INSERT INTO items (id, owner, qty) VALUES (100, 'mirrored', 3);
         INSERT INTO switchyard.switchyard_keys_public_items (id, sy_version, sy_deleted) VALUES (100, 3, false), (200, 2, true);",
    )
    .await
    .unwrap();
    // In flight: an upsert of 2500 and a delete of 4000, as a mirrored transaction leaves them
    // between its apply and its commit.
    new.batch_execute(
        "BEGIN;
         INSERT INTO items (id, owner, qty) VALUES (2500, 'in flight', 7);
         INSERT INTO switchyard.switchyard_keys_public_items (id, sy_version, sy_deleted) VALUES (2500, 1, false), (4000, 1, true);",
    )
    .await
    .unwrap();
    let config = env.config().unwrap();
    let run = tokio::spawn(async move { backfill(&config, &options(2, 1000)).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !run.is_finished(),
        "the chunks holding 2500 and 4000 wait for the open transaction"
    );
    new.batch_execute("COMMIT").await.unwrap();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Done);
    let rows = new
        .query(
            "SELECT id, owner FROM items WHERE id IN (100, 200, 2500, 4000) ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(100, "mirrored".into()), (2500, "in flight".into())]);
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM items").await.unwrap(),
        4998
    );
    let ((read, copied, skipped, _), _) = chunk_totals(&env.new, "public.items").await;
    assert_eq!((read, copied, skipped), (5000, 4996, 4));
}

/// The race a single-statement mirrored delete leaves: the delete runs while a chunk that claimed
/// the key is still open, sees no row, then turns the chunk's version-0 record into a tombstone
/// after the chunk commits. The fence trigger deletes the row then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_an_open_chunk_leaves_no_row() {
    let schema = format!("{ITEMS} CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));");
    let env = DualEnv::new(
        "bf_delrace",
        &schema,
        vec![DualTable::new("items"), DualTable::new("pairs")],
    )
    .await
    .unwrap();
    env.seed_old(
        "INSERT INTO items (id, owner, qty) VALUES (1, 'a', 1); INSERT INTO pairs VALUES (1, 'a', 'v')",
    )
    .await
    .unwrap();
    // A backfill run installs the triggers (and copies the rows, removed again below).
    backfill(&env.config().unwrap(), &options(1, 10)).await.unwrap();
    env.new
        .execute_batch(
            "DELETE FROM items; DELETE FROM switchyard.switchyard_keys_public_items; \
             DELETE FROM pairs; DELETE FROM switchyard.switchyard_keys_public_pairs;",
        )
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(env.new.url()).await.unwrap();
    let old_pool = sqlx::PgPool::connect(env.old.url()).await.unwrap();
    let cases = [
        (
            "items",
            vec!["id"],
            "INSERT INTO switchyard.switchyard_keys_public_items (id, sy_version, sy_deleted) VALUES (5, 0, false); \
             INSERT INTO items (id, owner, qty) VALUES (5, 'backfilled', 0);",
            r#"[{"id": 5, "owner": "backfilled", "qty": 0}]"#,
            "id = 5",
        ),
        (
            "pairs",
            vec!["a", "b"],
            "INSERT INTO switchyard.switchyard_keys_public_pairs (a, b, sy_version, sy_deleted) VALUES (7, 'x y', 0, false); \
             INSERT INTO pairs VALUES (7, 'x y', 'backfilled');",
            r#"[{"a": 7, "b": "x y", "v": "backfilled"}]"#,
            "a = 7 AND b = 'x y'",
        ),
    ];
    for (table, key, claim, image, which) in cases {
        // The chunk, by hand: claim the key and insert its row, not committed yet.
        let chunk = env.new.client().await.unwrap();
        chunk.batch_execute(&format!("BEGIN; {claim}")).await.unwrap();
        // The mirrored delete of that key, exactly as the proxy sends it.
        let name: switchyard_config::TableName = table.parse().unwrap();
        let schema = switchyard_store::load_table(&old_pool, &name)
            .await
            .unwrap()
            .unwrap();
        let key = key.iter().map(|k| k.to_string()).collect();
        let mirror_table = switchyard_store::mirror::MirrorTable::new(name, key, &schema, &schema);
        let mirrored = mirrored_delete(&pool, &mirror_table, image.to_owned()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !mirrored.is_finished(),
            "{table}: the delete waits for the chunk's claim"
        );
        chunk.batch_execute("COMMIT").await.unwrap();
        mirrored.await.unwrap();
        assert_deleted_on_new(&env, table, which).await;
    }
}

/// A mirrored delete of the key in `image`, exactly as the proxy sends it (the fence lock shared,
/// then the delete), in its own NEW transaction, run in the background.
async fn mirrored_delete(
    pool: &sqlx::PgPool,
    table: &switchyard_store::mirror::MirrorTable,
    image: String,
) -> tokio::task::JoinHandle<()> {
    let shared = switchyard_store::mirror::fence_lock_sql(&table.name, false);
    let delete = table.prepared_apply(switchyard_store::mirror::ChangeOp::Delete);
    let mut tx = pool.begin().await.unwrap();
    tokio::spawn(async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(shared))
            .execute(&mut *tx)
            .await
            .unwrap();
        for statement in delete {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(image.clone())
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    })
}

/// NEW has no row of `table` matching `which`, and one tombstone for it.
async fn assert_deleted_on_new(env: &DualEnv, table: &str, which: &str) {
    let rows = format!("SELECT count(*) FROM {table} WHERE {which}");
    assert_eq!(
        env.new.query_i64(&rows).await.unwrap(),
        0,
        "{table} {which}: no row under the tombstone"
    );
    let tombstones = format!(
        "SELECT count(*) FROM switchyard.switchyard_keys_public_{table} WHERE {which} AND sy_deleted"
    );
    assert_eq!(
        env.new.query_i64(&tombstones).await.unwrap(),
        1,
        "{table} {which}"
    );
}

/// The fast path writes no claims: a chunk COPYs its rows, then takes the fence lock and removes
/// the rows of its range that have a tombstone. Replayed by hand, both orders of a mirrored delete
/// (exactly the statements the proxy sends: fence lock shared, then the delete) and an open
/// chunk end with no row and one tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_racing_a_fast_path_chunk_leaves_no_row() {
    let env = DualEnv::new("bf_fastrace", ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    let name: switchyard_config::TableName = "public.items".parse().unwrap();
    let old_pool = sqlx::PgPool::connect(env.old.url()).await.unwrap();
    let new_pool = sqlx::PgPool::connect(env.new.url()).await.unwrap();
    let schema = switchyard_store::load_table(&old_pool, &name)
        .await
        .unwrap()
        .unwrap();
    let mirror_table =
        switchyard_store::mirror::MirrorTable::new(name.clone(), vec!["id".into()], &schema, &schema);
    let target =
        switchyard_backfill::target::TargetTable::new(name.clone(), 0, vec!["id".into()], &schema, &schema);
    let exclusive = switchyard_store::mirror::fence_lock_sql(&name, true);
    let sweep = target.sweep_sql(None, &["100".to_owned()]);
    for (id, delete_first) in [(5_i64, true), (6, false)] {
        let image = format!(r#"[{{"id": {id}, "owner": "o", "qty": 0}}]"#);
        // The chunk, by hand: its COPY, not committed yet.
        let chunk = env.new.client().await.unwrap();
        chunk
            .batch_execute(&format!(
                "BEGIN; INSERT INTO items (id, owner, qty) VALUES ({id}, 'backfilled', 0)"
            ))
            .await
            .unwrap();
        if !delete_first {
            chunk.batch_execute(&exclusive).await.unwrap();
        }
        let mirrored = mirrored_delete(&new_pool, &mirror_table, image).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if delete_first {
            // The delete did not see the uncommitted row and committed its tombstone; the
            // chunk's lock waits for nothing, its sweep finds the tombstone.
            assert!(
                mirrored.is_finished(),
                "id {id}: the delete had nothing to wait for"
            );
            mirrored.await.unwrap();
            chunk.batch_execute(&exclusive).await.unwrap();
            chunk.batch_execute(&sweep).await.unwrap();
            chunk.batch_execute("COMMIT").await.unwrap();
        } else {
            // The chunk holds the lock: the delete waits for its commit, then sees its row.
            assert!(!mirrored.is_finished(), "id {id}: the delete waits for the chunk");
            chunk.batch_execute(&sweep).await.unwrap();
            chunk.batch_execute("COMMIT").await.unwrap();
            mirrored.await.unwrap();
        }
        assert_deleted_on_new(&env, "items", &format!("id = {id}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backfill_resumes_without_copying_a_chunk_twice() {
    let env = DualEnv::new("bf_resume", ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (id, owner, qty) SELECT g, 'o', g FROM generate_series(1, 40000) g")
        .await
        .unwrap();
    let config = env.config().unwrap();
    let (trigger, stop) = switchyard_backfill::stop_channel();
    let opts = BackfillOptions {
        max_rows_per_sec: Some(20_000),
        ..options(2, 1000)
    };
    let started = Instant::now();
    let run = {
        let config = config.clone();
        let opts = opts.clone();
        tokio::spawn(async move { switchyard_backfill::run(&config, &opts, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    trigger.graceful();
    let first = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status, RunStatus::Interrupted, "{first:?}");
    // Throttled to 20,000 rows/s: about 14 chunks in 0.7 s, never all 40.
    let ((read, copied, _, _), pending) = chunk_totals(&env.new, "public.items").await;
    assert!(read > 0 && read < 40_000, "{read}");
    assert!(started.elapsed() >= Duration::from_millis(700));
    // Nothing half-written: NEW has exactly the rows of the chunks marked done.
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM items").await.unwrap(),
        copied
    );
    assert!(pending > 0 || read < 40_000);

    let second = backfill(&config, &options(3, 1000)).await.unwrap();
    assert_eq!(second.status, RunStatus::Done);
    let ((read, copied, skipped, _), pending) = chunk_totals(&env.new, "public.items").await;
    assert_eq!((read, copied, skipped, pending), (40_000, 40_000, 0, 0));
    assert_eq!(
        second.tables[0].this_run.rows_read + first.tables[0].this_run.rows_read,
        40_000,
        "each row read by exactly one run"
    );
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_items WHERE sy_version = 0")
            .await
            .unwrap(),
        0,
        "the fast path copies without claims"
    );
    env.assert_converged().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_limits_rows_per_second() {
    let env = DualEnv::new("bf_throttle", ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (id, owner, qty) SELECT g, 'o', g FROM generate_series(1, 12000) g")
        .await
        .unwrap();
    let opts = BackfillOptions {
        max_rows_per_sec: Some(8_000),
        ..options(4, 1000)
    };
    let started = Instant::now();
    let summary = backfill(&env.config().unwrap(), &opts).await.unwrap();
    let took = started.elapsed();
    assert_eq!(summary.status, RunStatus::Done);
    // 12,000 rows at 8,000 rows/s: at least 1.5 s less the first reservation's chunk.
    assert!(took >= Duration::from_millis(1300), "{took:?}");
    env.assert_converged().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_removed_only_after_the_backfill() {
    let env = DualEnv::new("bf_tomb", ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (id, owner, qty) SELECT g, 'o', g FROM generate_series(1, 3000) g")
        .await
        .unwrap();
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute("DELETE FROM items WHERE id % 3 = 0")
        .await
        .unwrap();
    let config = env.config().unwrap();
    let err = switchyard_backfill::cleanup_tombstones(&config, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, BackfillError::NotFinished { .. }), "{err}");
    assert!(err.to_string().contains("never started"), "{err}");

    backfill(&config, &options(2, 500)).await.unwrap();
    let removed = switchyard_backfill::cleanup_tombstones(&config, &[])
        .await
        .unwrap();
    assert_eq!(removed[0].removed, 1000);
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_items WHERE sy_deleted")
            .await
            .unwrap(),
        0
    );
    // Dual writes go on as before: a delete leaves a new tombstone, an insert of a cleaned-up
    // key gets a fresh record.
    c.batch_execute(
        "DELETE FROM items WHERE id = 1; INSERT INTO items (id, owner, qty) VALUES (3, 'back', 0)",
    )
    .await
    .unwrap();
    env.assert_converged().await.unwrap();
    let status = switchyard_backfill::status(&config).await.unwrap();
    let p = status[0].backfill.as_ref().unwrap();
    assert_eq!(p.status, "done");
    assert!(p.tombstones_cleaned_at.is_some());
    assert_eq!((p.rows_read, p.rows_copied, p.rows_skipped), (2000, 2000, 0));
}

fn config_with(old: &TestDb, new: &TestDb, tables: &str) -> Config {
    let mut cfg = ProxyConfig::passthrough(old.url(), new.url());
    cfg.extra_sections.push(tables.to_owned());
    Config::from_toml_str(&cfg.to_toml(), Default::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_table_and_what_to_do() {
    let (old, new) = TestDb::create_pair("bf_errors").await.unwrap();
    let common = "CREATE TABLE ok (id int PRIMARY KEY, v text);
                  CREATE TABLE typed (id int PRIMARY KEY, v text);
                  CREATE TABLE nokey (id int, v text);
                  CREATE TABLE early (id int PRIMARY KEY);";
    old.execute_batch(common).await.unwrap();
    old.execute_batch("CREATE TABLE only_old (id int PRIMARY KEY)")
        .await
        .unwrap();
    new.execute_batch(&common.replace(
        "typed (id int PRIMARY KEY, v text)",
        "typed (id int PRIMARY KEY, v int)",
    ))
    .await
    .unwrap();
    let table = |name: &str, phase: &str| format!("[[tables]]\nname = \"{name}\"\nphase = \"{phase}\"\n");
    let run = |tables: String, only: &'static [&'static str]| {
        let config = config_with(&old, &new, &tables);
        async move {
            let opts = BackfillOptions {
                tables: only.iter().map(|t| t.parse().unwrap()).collect(),
                ..options(1, 100)
            };
            backfill(&config, &opts).await.unwrap_err().to_string()
        }
    };

    let e = run(table("early", "passthrough"), &["early"]).await;
    assert!(
        e.contains("public.early is in phase passthrough") && e.contains("dual_write"),
        "{e}"
    );
    let e = run(table("early", "passthrough"), &[]).await;
    assert!(e.contains("none is in phase dual_write"), "{e}");
    let e = run(table("ok", "dual_write"), &["other"]).await;
    assert!(e.contains("public.other is not in the configuration"), "{e}");
    let e = run(table("only_old", "dual_write"), &[]).await;
    assert!(e.contains("public.only_old does not exist on NEW"), "{e}");
    let e = run(table("typed", "dual_write"), &[]).await;
    assert!(e.contains("has type text on OLD and integer on NEW"), "{e}");
    // Without a key: backfilled up to its capture boundary, which only prepare records.
    let e = run(table("nokey", "dual_write"), &[]).await;
    assert!(
        e.contains("no capture boundary") && e.contains("switchyard prepare"),
        "{e}"
    );
    // Not prepared: the keys table is missing.
    let e = run(table("ok", "dual_write"), &[]).await;
    assert!(e.contains("switchyard prepare"), "{e}");
    // OLD unreachable: named, password hidden.
    let mut cfg = ProxyConfig::passthrough("postgres://u:secret@127.0.0.1:1/x", new.url());
    cfg.extra_sections.push(table("ok", "dual_write"));
    let config = Config::from_toml_str(&cfg.to_toml(), Default::default()).unwrap();
    let e = backfill(&config, &options(1, 100)).await.unwrap_err().to_string();
    assert!(e.contains("old store") && !e.contains("secret"), "{e}");
}
