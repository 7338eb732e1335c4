//! Large transactions through the proxy in dual_write: their row images reach NEW in chunks
//! while OLD's capture statement still sends them (`proxy/src/mirror/stream.rs`), NEW failing in
//! the middle of the stream leaves the transaction to its intent and the repair loop, and the
//! other sessions of the proxy's thread keep being served meanwhile.

use std::time::{Duration, Instant};

use switchyard_test_support::{DualEnv, DualTable, FaultProxy, TestProxy};

const ROWS: i64 = 200_000;

const SCHEMA: &str = "CREATE TABLE big (id bigint PRIMARY KEY, v bigint NOT NULL, filler text NOT NULL);";

/// OLD and NEW with the same `ROWS` rows of `big`, which count as existing before dual writes.
async fn env(label: &str) -> DualEnv {
    let env = DualEnv::new(label, SCHEMA, vec![DualTable::new("public.big")])
        .await
        .expect("dual env");
    let fill = format!("INSERT INTO big SELECT i, 0, repeat('x', 84) FROM generate_series(1, {ROWS}) i");
    env.seed_old(&fill).await.unwrap();
    env.new.execute_batch(&fill).await.unwrap();
    env
}

/// A counter of the mirror in the proxy's `/status`.
async fn mirror_stat(proxy: &TestProxy, name: &str) -> u64 {
    let (_, body) = proxy.admin_get("/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["mirror"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no mirror.{name} in {body}"))
}

/// One transaction that writes every row, some twice (in different chunks), deletes some and
/// inserts new ones: NEW gets it before the client hears COMMIT, chunk by chunk, and ends equal
/// to OLD with no repair needed.
#[tokio::test]
async fn a_large_transaction_streams_to_new_in_chunks() {
    let env = env("lt_stream").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();
    let started = Instant::now();
    // One statement per Query: a string with its own COMMIT would commit without the proxy's
    // commit sequence (the capture trigger's net would record it instead).
    for sql in [
        "BEGIN",
        "UPDATE big SET v = v + 1",
        "UPDATE big SET v = v + 10 WHERE id % 1000 = 0",
        "DELETE FROM big WHERE id % 997 = 0",
        "INSERT INTO big SELECT i, -1, 'new' FROM generate_series(1, 20000) i WHERE i % 997 = 0",
        "INSERT INTO big SELECT i, 7, 'y' FROM generate_series(300001, 301000) i",
        "COMMIT",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    eprintln!("200k-row transaction through the proxy: {:?}", started.elapsed());
    assert_eq!(mirror_stat(&proxy, "mirror_failures").await, 0);
    assert_eq!(mirror_stat(&proxy, "mirrored_transactions").await, 1);
    env.assert_converged().await.unwrap();
    env.wait_for_no_intents(Duration::from_secs(20)).await.unwrap();
}

/// NEW stops answering after the first chunks of a large transaction reached it: the client
/// still gets its COMMIT (OLD is authoritative), NEW's partial transaction is dropped, and the
/// repair loop copies the transaction's keys from its intent once NEW is back.
#[tokio::test]
async fn new_failing_in_the_middle_of_a_large_transaction_leaves_it_to_repair() {
    let env = env("lt_new_fails").await;
    let fault = FaultProxy::start(env.follower_server()).await.unwrap();
    let proxy = TestProxy::start(&env.proxy_config_with_mirror(
        &env.follower_url_via(fault.addr()),
        &[("timeout_ms", 1000), ("repair_interval_ms", 200)],
    ))
    .await
    .unwrap();
    let c = proxy.client().await.unwrap();
    let update = tokio::spawn(async move {
        c.batch_execute("UPDATE big SET v = v + 1, filler = 'updated'")
            .await
            .map(|_| c)
    });
    // Wait until NEW's mirror transaction has written (a chunk was applied), then cut NEW off.
    let new = env.new.client().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let writing: i64 = new
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'switchyard-mirror' \
                 AND backend_xid IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if writing > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no chunk reached NEW");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fault.set_blackhole(true);
    let c = update
        .await
        .unwrap()
        .expect("the client's COMMIT succeeds on OLD");
    assert_eq!(mirror_stat(&proxy, "mirror_failures").await, 1);
    // NEW committed nothing of it.
    let updated: i64 = new
        .query_one("SELECT count(*) FROM big WHERE filler = 'updated'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated, 0);
    fault.set_blackhole(false);
    fault.reset_all();
    env.assert_converged_after_repairs(Duration::from_secs(50))
        .await
        .unwrap();
    // And the proxy mirrors again.
    c.batch_execute("UPDATE big SET v = 0 WHERE id = 1")
        .await
        .unwrap();
    env.wait_for_no_intents(Duration::from_secs(10)).await.unwrap();
    env.assert_converged().await.unwrap();
}

/// While one session mirrors a large transaction, another session on the same proxy thread
/// (`worker_threads = 1`) is answered promptly: the mirror yields between chunks and builds a
/// large intent off the thread.
#[tokio::test]
async fn a_large_transaction_does_not_stall_other_sessions() {
    let env = env("lt_fair").await;
    let proxy = TestProxy::start(&env.proxy_config().with_proxy_setting("worker_threads = 1"))
        .await
        .unwrap();
    let a = proxy.client().await.unwrap();
    let b = proxy.client().await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
    let big = tokio::spawn(async move { a.batch_execute("UPDATE big SET v = v + 1").await });
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    while !big.is_finished() {
        let t = Instant::now();
        b.simple_query("SELECT 1").await.unwrap();
        worst = worst.max(t.elapsed());
        probes += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    big.await.unwrap().unwrap();
    eprintln!("{probes} probes, worst SELECT 1 latency {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "a session waited {worst:?} behind a large transaction"
    );
    env.wait_for_no_intents(Duration::from_secs(20)).await.unwrap();
    env.assert_converged().await.unwrap();
}
