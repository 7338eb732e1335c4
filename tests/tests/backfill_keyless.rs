//! The backfill of tables without a key (an event log: append-only, duplicate rows) against real
//! OLD and NEW databases: it copies exactly the rows committed before the table's capture began,
//! once, while appends keep arriving through proxies and straight on OLD; it resumes after a stop
//! without copying a chunk twice; and a transaction that wrote the table while `prepare`
//! installed the triggers is copied exactly once, as is one that only began before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_backfill::progress::RunStatus;
use switchyard_backfill::{BackfillError, BackfillOptions, Summary};
use switchyard_config::Config;
use switchyard_test_support::{DualEnv, DualTable, TestDb};

/// Bounds every test: a backfill that hangs fails instead.
const LIMIT: Duration = Duration::from_secs(120);

const EVENTS: &str = "CREATE TABLE events (kind text NOT NULL, n integer NOT NULL, payload text);";

/// 3 copies of each of `distinct` rows, committed before the capture began.
fn triplicates(distinct: u32) -> String {
    format!(
        "INSERT INTO events (kind, n, payload) \
         SELECT 'seed', g % {distinct}, md5((g % {distinct})::text) FROM generate_series(0, {} - 1) g; \
         ANALYZE events",
        distinct * 3
    )
}

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

/// `(rows_read, rows_copied, chunks done, chunks not done)` of the table's chunks.
async fn chunk_totals(new: &TestDb) -> (i64, i64, i64, i64) {
    let c = new.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT coalesce(sum(rows_read), 0)::int8, coalesce(sum(rows_copied), 0)::int8, \
             count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status <> 'done') \
             FROM switchyard.switchyard_backfill_chunks WHERE table_name = 'public.events'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// Chunks of `public.events` marked done on NEW (0 before the backfill made its tables).
async fn done_chunks(new: &TestDb) -> i64 {
    let made = new
        .query_i64("SELECT count(*) FROM pg_tables WHERE schemaname = 'switchyard' AND tablename = 'switchyard_backfill_chunks'")
        .await
        .unwrap();
    if made == 0 {
        return 0;
    }
    chunk_totals(new).await.2
}

/// Appends until `stop`: single rows and batches of three identical rows (also identical to
/// seeded rows), through `url` (a proxy, or OLD itself: then the trigger's net records them).
async fn appender(url: String, label: &'static str, stop: Arc<AtomicBool>) -> u64 {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut ops = 0u64;
    while !stop.load(Ordering::Relaxed) {
        ops += 1;
        let n = (ops % 50) as i32;
        if ops.is_multiple_of(3) {
            client
                .execute(
                    "INSERT INTO events (kind, n, payload) SELECT 'seed', $1::int4, md5($1::int4::text) \
                     FROM generate_series(1, 3)",
                    &[&n],
                )
                .await
                .unwrap();
        } else {
            client
                .execute(
                    "INSERT INTO events (kind, n, payload) VALUES ($1, $2, 'live')",
                    &[&label, &n],
                )
                .await
                .unwrap();
        }
        if label == "direct" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ops
}

/// 30,000 pre-existing rows (each three times) backfilled while two clients append through two
/// proxies and one straight on OLD (repaired from the trigger's net): afterwards OLD and NEW hold
/// the same multiset of rows, and the chunks read exactly the pre-existing rows. A quarter of the
/// rows seeded first were deleted and vacuumed away before the capture, so the appends fill
/// holes among the pre-existing rows (inside the chunks' block ranges), not only new blocks.
/// Fails before this change: the backfill refused the table ("no primary key").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyless_table_with_duplicates_converges_under_concurrent_appends() {
    let seed = "INSERT INTO events (kind, n, payload) \
                SELECT CASE WHEN g % 4 = 3 THEN 'gone' ELSE 'seed' END, g / 4, md5((g / 4)::text) \
                FROM generate_series(0, 39999) g; DELETE FROM events WHERE kind = 'gone'";
    let env = DualEnv::new_seeded(
        "bfk_conc",
        EVENTS,
        &[seed, "VACUUM ANALYZE events"],
        vec![DualTable::new("events")],
    )
    .await
    .unwrap();
    let proxies = [env.proxy().await.unwrap(), env.proxy().await.unwrap()];
    let stop = Arc::new(AtomicBool::new(false));
    let clients = vec![
        tokio::spawn(appender(proxies[0].url("postgres"), "p0", stop.clone())),
        tokio::spawn(appender(proxies[1].url("postgres"), "p1", stop.clone())),
        tokio::spawn(appender(env.old.url().to_owned(), "direct", stop.clone())),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opts = BackfillOptions {
        max_rows_per_sec: Some(40_000),
        ..options(3, 1000)
    };
    let summary = backfill(&env.config().unwrap(), &opts).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for c in clients {
        ops += c.await.unwrap();
    }
    env.wait_for_no_intents(Duration::from_secs(30)).await.unwrap();

    assert_eq!(summary.status, RunStatus::Done, "{summary:?}");
    assert!(ops > 300, "the appends ran alongside: {ops}");
    let (read, copied, done, pending) = chunk_totals(&env.new).await;
    assert_eq!((read, copied, pending), (30_000, 30_000, 0), "{done} chunks");
    assert!(done > 5, "{done} chunks");
    let blocks: i64 = env
        .old
        .query_i64("SELECT blocks FROM switchyard.switchyard_capture_boundary")
        .await
        .unwrap();
    let appended_inside = env
        .old
        .query_i64(&format!(
            "SELECT count(*) FROM events WHERE kind <> 'seed' AND ctid < '({blocks},0)'::tid"
        ))
        .await
        .unwrap();
    assert!(
        appended_inside > 100,
        "{appended_inside} appends among the old rows"
    );
    env.assert_converged().await.unwrap();
    let status = switchyard_backfill::status(&env.config().unwrap()).await.unwrap();
    let p = status[0].backfill.as_ref().unwrap();
    assert_eq!(
        (p.status.as_str(), p.rows_read, p.chunks_done),
        ("done", 30_000, done)
    );
}

/// A backfill stopped half-way leaves NEW with exactly the rows of its done chunks; the next run
/// copies the rest, and every pre-existing row is read by exactly one of the two runs.
/// Fails before this change: the backfill refused the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_keyless_backfill_resumes_without_copying_a_chunk_twice() {
    let env = DualEnv::new_seeded(
        "bfk_resume",
        EVENTS,
        &[&triplicates(8_000)],
        vec![DualTable::new("events")],
    )
    .await
    .unwrap();
    let config = env.config().unwrap();
    let (trigger, stop) = switchyard_backfill::stop_channel();
    let opts = BackfillOptions {
        max_rows_per_sec: Some(10_000),
        ..options(2, 500)
    };
    let run = {
        let config = config.clone();
        tokio::spawn(async move { switchyard_backfill::run(&config, &opts, stop).await })
    };
    // Stop once some chunks are done (a fixed sleep raced a slow start on a loaded machine: the
    // run had read nothing yet). At 10,000 rows/s the 24,000 rows take over two seconds.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while done_chunks(&env.new).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no chunk done in {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.graceful();
    let first = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status, RunStatus::Interrupted, "{first:?}");
    let (read, copied, _, _) = chunk_totals(&env.new).await;
    assert!(read > 0 && read < 24_000, "{read}");
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM events").await.unwrap(),
        copied,
        "NEW has exactly the rows of the chunks marked done"
    );

    let second = backfill(&config, &options(3, 500)).await.unwrap();
    assert_eq!(second.status, RunStatus::Done);
    let (read, copied, _, pending) = chunk_totals(&env.new).await;
    assert_eq!((read, copied, pending), (24_000, 24_000, 0));
    assert_eq!(
        first.tables[0].this_run.rows_read + second.tables[0].this_run.rows_read,
        24_000,
        "each row read by exactly one run"
    );
    env.assert_converged().await.unwrap();
}

/// Two transactions open on OLD while `prepare` installs the capture: A inserted rows before
/// (no trigger saw them), so `prepare` waits for it, and they must come from the backfill; B
/// began before (with a subtransaction id assigned) but inserts only after the install, so its
/// rows are captured (the net, then a repair) and must not be copied again. Both exactly once.
/// Fails before this change: the backfill refused the table. With a boundary taken without the
/// subtransaction ids (`pg_current_snapshot()` alone), B's rows are duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_open_across_prepare_are_copied_exactly_once() {
    let (old, new) = TestDb::create_pair("bfk_open").await.unwrap();
    for db in [&old, &new] {
        db.execute_batch(&format!("{EVENTS} CREATE TABLE other (v int);"))
            .await
            .unwrap();
    }
    old.execute_batch(&triplicates(1_000)).await.unwrap();
    let old_url = old.url().to_owned();
    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    };
    let a = connect(old_url.clone()).await;
    a.batch_execute(
        "BEGIN; INSERT INTO events (kind, n, payload) SELECT 'open-a', g, 'a' FROM generate_series(1, 500) g",
    )
    .await
    .unwrap();
    let b = connect(old_url.clone()).await;
    b.batch_execute("BEGIN; INSERT INTO other VALUES (1); SAVEPOINT s; INSERT INTO other VALUES (2)")
        .await
        .unwrap();

    let prepared = tokio::spawn(DualEnv::from_dbs(old, new, vec![DualTable::new("events")]));
    // prepare waits for A's lock on the table.
    let watcher = connect(old_url.clone()).await;
    let mut waited = false;
    for _ in 0..100 {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(waited, "prepare waits for the open writer");
    assert!(!prepared.is_finished());
    a.batch_execute("COMMIT").await.unwrap();
    let env = tokio::time::timeout(LIMIT, prepared)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // B writes the table only now, in the subtransaction it opened before the install: the
    // trigger's net records its rows.
    b.batch_execute(
        "INSERT INTO events (kind, n, payload) SELECT 'open-b', g, 'b' FROM generate_series(1, 300) g; COMMIT",
    )
    .await
    .unwrap();
    assert!(env.pending_intents().await.unwrap() > 0, "B's rows were captured");

    let _proxy = env.proxy().await.unwrap();
    let summary = backfill(&env.config().unwrap(), &options(2, 700)).await.unwrap();
    assert_eq!(summary.status, RunStatus::Done, "{summary:?}");
    env.wait_for_no_intents(Duration::from_secs(30)).await.unwrap();
    let (read, ..) = chunk_totals(&env.new).await;
    assert_eq!(read, 3_000 + 500, "the seeded rows and A's, not B's");
    for (kind, rows) in [("open-a", 500), ("open-b", 300), ("seed", 3_000)] {
        let n = env
            .new
            .query_i64(&format!("SELECT count(*) FROM events WHERE kind = '{kind}'"))
            .await
            .unwrap();
        assert_eq!(n, rows, "{kind}");
    }
    env.assert_converged().await.unwrap();
}

/// `prepare` run again does not move a recorded boundary; a table back in passthrough loses it
/// with its triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_boundary_is_kept_by_prepare_and_dropped_with_the_triggers() {
    let env = DualEnv::new_seeded(
        "bfk_bound",
        EVENTS,
        &[&triplicates(10)],
        vec![DualTable::new("events")],
    )
    .await
    .unwrap();
    let boundary = "SELECT snapshot::text || ' ' || blocks FROM switchyard.switchyard_capture_boundary \
                    WHERE table_name = 'public.events'";
    let read = |sql: &'static str| {
        let db = &env.old;
        async move {
            let c = db.client().await.unwrap();
            c.query_opt(sql, &[])
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    };
    let first = read(boundary).await.expect("a boundary");
    env.old
        .execute_batch("SELECT txid_current(); SELECT txid_current();")
        .await
        .unwrap();
    env.prepare().await.unwrap();
    assert_eq!(read(boundary).await.as_deref(), Some(first.as_str()));

    let old = sqlx::PgPool::connect(env.old.url()).await.unwrap();
    let new = sqlx::PgPool::connect(env.new.url()).await.unwrap();
    let settings = vec![switchyard_config::TableSettings {
        name: "public.events".parse().unwrap(),
        phase: switchyard_config::Phase::Passthrough,
        read_share: 0,
        shadow_share: 0,
        key: Vec::new(),
        on_uncaptured: switchyard_config::UncapturedPolicy::Refuse,
        group: None,
    }];
    let report = switchyard_store::prepare(&old, &new, &settings, true)
        .await
        .unwrap();
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert_eq!(read(boundary).await, None);
}
