//! Repairs of intents against real OLD and NEW databases: a repair ordered against live writes of
//! the same key (present or absent on OLD), durable before its intent goes, an abandoned apply
//! cancelled on NEW, and the health of the repair queue (failing intents, intents of tables this
//! proxy does not mirror, applied markers).

use std::time::{Duration, Instant};

use switchyard_test_support::{ClusterOptions, DualEnv, DualTable, FaultProxy, TestCluster, TestProxy};
use tokio_postgres::Client;

const KV: &str = "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);";

/// OLD and NEW with table `kv`, a [`FaultProxy`] in front of NEW, one proxy mirroring `kv` with
/// the `[mirror]` settings given.
async fn kv_with_proxy(
    label: &str,
    mirror: &[(&str, u64)],
) -> anyhow::Result<(DualEnv, FaultProxy, TestProxy)> {
    let env = DualEnv::new(label, KV, vec![DualTable::new("kv")]).await?;
    let fault = FaultProxy::start(env.follower_server()).await?;
    let proxy =
        TestProxy::start(&env.proxy_config_with_mirror(&env.follower_url_via(fault.addr()), mirror)).await?;
    Ok((env, fault, proxy))
}

/// `[mirror]` settings for a proxy that repairs at once: its own failed intents every 100 ms,
/// anyone's after a second.
fn repairing(timeout_ms: u64) -> [(&'static str, u64); 3] {
    [
        ("timeout_ms", timeout_ms),
        ("repair_interval_ms", 100),
        ("stale_intent_secs", 1),
    ]
}

/// `v` of key `k` on NEW.
async fn new_v(env: &DualEnv, k: i32) -> anyhow::Result<Option<String>> {
    let c = env.new.client().await?;
    Ok(c.query_opt("SELECT v FROM kv WHERE k = $1", &[&k])
        .await?
        .map(|r| r.get(0)))
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Backends of NEW's test database matching `filter` (an SQL condition on pg_stat_activity).
async fn new_backends(env: &DualEnv, filter: &str) -> anyhow::Result<i64> {
    env.new
        .query_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND {filter}"
        ))
        .await
}

/// Runs `sql` through the proxy while NEW is unreachable, so it commits on OLD and leaves an
/// intent for the repair loop.
async fn write_while_new_is_down(fault: &FaultProxy, c: &Client, sql: &str) -> anyhow::Result<()> {
    fault.reset_all();
    fault.set_refuse(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let result = c.batch_execute(sql).await;
    fault.set_refuse(false);
    Ok(result?)
}

/// An intent written straight into OLD's queue, created an hour ago (so it is stale and at the
/// head of the queue).
async fn plant_intent(env: &DualEnv, id: i64, changes: &str) -> anyhow::Result<()> {
    env.old
        .client()
        .await?
        .execute(
            "INSERT INTO switchyard.switchyard_intents (id, created_at, proxy, changes) \
             VALUES ($1, now() - interval '1 hour', 'planted', $2::text::jsonb)",
            &[&id, &changes],
        )
        .await?;
    Ok(())
}

async fn intent_exists(env: &DualEnv, id: i64) -> anyhow::Result<bool> {
    let n = env
        .old
        .query_i64(&format!(
            "SELECT count(*) FROM switchyard.switchyard_intents WHERE id = {id}"
        ))
        .await?;
    Ok(n > 0)
}

/// Issue 11, 2.1. A DELETE whose NEW apply failed leaves an intent; its repair finds the key
/// absent on OLD. Meanwhile the key is inserted again through the proxy and mirrored. The
/// repair used to read OLD (with `FOR UPDATE`, which locks nothing for an absent key) before that
/// insert committed and then delete the key on NEW after it: NEW lost the row for good. We hold
/// the repair between its OLD read and its NEW delete with the table's fence lock (which a
/// mirrored delete takes first), and insert the key meanwhile. Now the repair locks the key on
/// NEW before it reads OLD, so the insert's apply waits for the repair (and times out, leaving an
/// intent whose repair copies the row), and NEW keeps the re-inserted row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_never_deletes_a_key_inserted_again_meanwhile() -> anyhow::Result<()> {
    let (env, fault, proxy) = kv_with_proxy("repair_race", &repairing(1000)).await?;
    let c = proxy.client().await?;
    c.batch_execute("INSERT INTO kv VALUES (1, 'first')").await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;

    // The fence lock, exclusive: the repair's delete waits for it on NEW.
    let fence =
        switchyard_store::mirror::fence_lock_sql(&"public.kv".parse().map_err(anyhow::Error::msg)?, true);
    let mut holder = env.new.client().await?;
    let hold = holder.transaction().await?;
    hold.batch_execute(&fence).await?;

    write_while_new_is_down(&fault, &c, "DELETE FROM kv WHERE k = 1").await?;
    let failed_at = Instant::now();
    assert_eq!(env.pending_intents().await?, 1);
    let e = &env;
    wait_until(
        "the repair waits for the fence lock on NEW",
        Duration::from_secs(10),
        move || async move {
            Ok(new_backends(e, "wait_event_type = 'Lock' AND wait_event = 'advisory'").await? > 0)
        },
    )
    .await?;
    // The proxy leaves NEW alone for a second after a failure; then the insert mirrors.
    tokio::time::sleep(Duration::from_millis(1100).saturating_sub(failed_at.elapsed())).await;
    c.batch_execute("INSERT INTO kv VALUES (1, 'again')").await?;
    assert_eq!(
        env.old
            .query_i64("SELECT count(*) FROM kv WHERE v = 'again'")
            .await?,
        1
    );
    hold.commit().await?;

    env.wait_for_no_intents(Duration::from_secs(20)).await?;
    env.assert_converged().await?;
    assert_eq!(new_v(&env, 1).await?.as_deref(), Some("again"));
    Ok(())
}

/// Issue 11, 2.2. NEW commits mirrored transactions with `synchronous_commit = off`. A repair
/// that finds the transaction applied (its marker on NEW) used to delete the intent at once,
/// although NEW's commit could still be in its WAL buffers: a NEW crash then lost the write and
/// nothing was left to repair it. With NEW's WAL writer frozen (so only a backend's own flush
/// writes the WAL), the repair now makes NEW flush before the intent goes, and the row survives
/// a SIGKILL of NEW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_already_applied_repair_makes_new_flush_before_the_intent_goes() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(
        ClusterOptions::default()
            .setting("autovacuum", "off")
            .setting("checkpoint_timeout", "1h")
            .setting("bgwriter_lru_maxpages", "0"),
    )
    .await?;
    let env = DualEnv::new_with_new_admin(
        "repair_flush",
        KV,
        vec![DualTable::new("kv")],
        &cluster.url("postgres"),
    )
    .await?;
    let proxy = TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &repairing(1000))).await?;
    let c = proxy.client().await?;
    c.batch_execute("INSERT INTO kv VALUES (1, 'flushed')").await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;

    cluster.pause_wal_writer().await?;
    // Committed on NEW asynchronously: the cleanup never sees NEW's WAL flushed past it, so the
    // intent goes stale and the repair finds its marker.
    c.batch_execute("INSERT INTO kv VALUES (2, 'in doubt')").await?;
    assert_eq!(new_v(&env, 2).await?.as_deref(), Some("in doubt"));
    env.wait_for_no_intents(Duration::from_secs(15)).await?;

    cluster.kill().await?;
    cluster.start_again().await?;
    assert_eq!(
        new_v(&env, 2).await?.as_deref(),
        Some("in doubt"),
        "the intent was deleted but NEW lost the transaction in the crash"
    );
    env.assert_converged().await?;
    drop(proxy);
    Ok(())
}

/// Issue 11, 2.3. An apply that outlives `[mirror] timeout_ms` (NEW holds the key's row lock) is
/// abandoned by the proxy. It used to only drop the connection, and NEW's backend went on waiting
/// for the lock (and later deadlocked with the repair of the same key). Now the proxy sends a
/// CancelRequest first: soon after the client's COMMIT no mirror backend waits on a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_apply_is_cancelled_on_new() -> anyhow::Result<()> {
    let (env, _fault, proxy) = kv_with_proxy(
        "repair_cancel",
        &[
            ("timeout_ms", 300),
            ("repair_interval_ms", 3_600_000),
            ("stale_intent_secs", 3600),
        ],
    )
    .await?;
    let c = proxy.client().await?;
    c.batch_execute("INSERT INTO kv VALUES (1, 'v1')").await?;
    env.wait_for_no_intents(Duration::from_secs(5)).await?;

    let mut holder = env.new.client().await?;
    let lock = holder.transaction().await?;
    lock.execute("SELECT 1 FROM kv WHERE k = 1 FOR UPDATE", &[])
        .await?;
    c.batch_execute("UPDATE kv SET v = 'v2' WHERE k = 1").await?;
    let waiting = "application_name = 'switchyard-mirror' AND wait_event_type = 'Lock'";
    // Less than the server-side bound (timeout + 1 s): the cancel, not the timeout, ends it.
    let e = &env;
    wait_until(
        "no mirror backend waits on NEW",
        Duration::from_millis(600),
        move || async move { Ok(new_backends(e, waiting).await? == 0) },
    )
    .await?;
    lock.commit().await?;
    assert_eq!(
        new_v(&env, 1).await?.as_deref(),
        Some("v1"),
        "the apply was rolled back"
    );
    assert_eq!(env.pending_intents().await?, 1, "left for the repair");
    Ok(())
}

/// Issue 11, 2.4 (a). Three intents that always fail (a key NEW cannot parse) sit at the head of
/// the queue. The repair round used to retry the same three every time and give up after the
/// third failure, so no intent behind them was ever repaired. Each failing intent now backs off
/// on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_that_keep_failing_do_not_hold_up_the_others() -> anyhow::Result<()> {
    let (env, fault, proxy) = kv_with_proxy("repair_headblock", &repairing(300)).await?;
    // Planted ids far from the proxies' random ones and the capture net's negative ones.
    for id in [3_000_000_003, 3_000_000_002, 3_000_000_001] {
        plant_intent(&env, id, r#"[{"t": "public.kv", "k": [{"k": "not a number"}]}]"#).await?;
    }
    let c = proxy.client().await?;
    write_while_new_is_down(&fault, &c, "INSERT INTO kv VALUES (2, 'behind them')").await?;
    let e = &env;
    wait_until(
        "the intent behind the failing ones is repaired",
        Duration::from_secs(20),
        move || async move { Ok(new_v(e, 2).await?.is_some()) },
    )
    .await?;
    env.assert_converged().await?;
    for id in [3_000_000_003, 3_000_000_002, 3_000_000_001] {
        assert!(intent_exists(&env, id).await?, "failing intent {id} stays");
    }
    Ok(())
}

/// Issue 11, 2.4 (b). An intent for a table this proxy does not mirror used to be deleted
/// unrepaired. It now stays for a proxy that mirrors the table, which repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_of_a_table_not_mirrored_here_waits_for_a_proxy_that_mirrors_it() -> anyhow::Result<()> {
    let schema = format!("{KV} CREATE TABLE other (id int PRIMARY KEY, note text);");
    let env = DualEnv::new(
        "repair_foreign",
        &schema,
        vec![DualTable::new("kv"), DualTable::new("other")],
    )
    .await?;
    // A row that existed before dual writes (no capture).
    env.seed_old("INSERT INTO other VALUES (7, 'only on OLD')")
        .await?;
    let mirror = repairing(300);
    let fault = FaultProxy::start(env.follower_server()).await?;
    let mut config = env.proxy_config_with_mirror(&env.follower_url_via(fault.addr()), &mirror);
    config.extra_sections.retain(|s| !s.contains("name = \"other\""));
    let kv_only = TestProxy::start(&config).await?;
    plant_intent(
        &env,
        3_000_000_001,
        r#"[{"t": "public.other", "k": [{"id": 7}]}]"#,
    )
    .await?;
    let c = kv_only.client().await?;
    write_while_new_is_down(&fault, &c, "INSERT INTO kv VALUES (1, 'mirrored here')").await?;
    let e = &env;
    wait_until(
        "this proxy repaired its own table",
        Duration::from_secs(20),
        move || async move { Ok(new_v(e, 1).await?.is_some()) },
    )
    .await?;
    // A few more rounds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        intent_exists(&env, 3_000_000_001).await?,
        "the intent of `other` is left in place"
    );
    assert_eq!(env.new.query_i64("SELECT count(*) FROM other").await?, 0);

    let both = TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &mirror)).await?;
    env.wait_for_no_intents(Duration::from_secs(20)).await?;
    env.assert_converged().await?;
    drop(both);
    Ok(())
}

/// Issue 11, 2.4 (c). A repair marks its intent applied on NEW (`switchyard_applied`); the marker
/// used to stay forever. It is now removed once the intent is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_remove_their_applied_markers() -> anyhow::Result<()> {
    let (env, fault, proxy) = kv_with_proxy("repair_markers", &repairing(300)).await?;
    let c = proxy.client().await?;
    write_while_new_is_down(&fault, &c, "INSERT INTO kv VALUES (1, 'repaired')").await?;
    env.wait_for_no_intents(Duration::from_secs(20)).await?;
    env.assert_converged().await?;
    let markers = "SELECT count(*) FROM switchyard.switchyard_applied";
    let e = &env;
    wait_until(
        "no applied marker is left on NEW",
        Duration::from_secs(5),
        move || async move { Ok(e.new.query_i64(markers).await? == 0) },
    )
    .await?;
    Ok(())
}

/// When an intent counts as stale: its age is read on OLD's clock (`created_at` is OLD's
/// `clock_timestamp()` at the intent's insert, and every proxy must agree on it), so this is
/// checked with planted ages rather than with the proxy's clock or sleeps. Anyone's intent older
/// than `stale_intent_secs` is listed for repair, oldest first; a younger one only when it is
/// this proxy's own failed one; intents backing off are left out.
#[tokio::test]
async fn an_intent_is_stale_once_older_than_stale_intent_secs_on_olds_clock() -> anyhow::Result<()> {
    use switchyard_store::repair::pending_intents;

    let env = DualEnv::new("stale_intents", KV, vec![DualTable::new("kv")]).await?;
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_intents (id, created_at, proxy, changes) VALUES \
             (1, clock_timestamp() - interval '1 hour', 'gone', '[]'), \
             (2, clock_timestamp() - interval '30 seconds', 'gone', '[]'), \
             (3, clock_timestamp(), 'this one', '[]')",
        )
        .await?;
    let url = switchyard_config::StoreUrl::parse(env.old.url()).map_err(anyhow::Error::msg)?;
    let old = switchyard_store::Store::connect_lazy(switchyard_store::Role::Old, &url)?;
    let listed = |mine: &'static [i64], skip: &'static [i64], stale_secs: f64| {
        let old = old.clone();
        async move {
            let pending = pending_intents(&old, mine, skip, stale_secs, 100).await?;
            anyhow::Ok(pending.iter().map(|p| p.id).collect::<Vec<i64>>())
        }
    };
    assert_eq!(listed(&[], &[], 3600.0 * 2.0).await?, Vec::<i64>::new());
    assert_eq!(listed(&[], &[], 60.0).await?, [1]);
    assert_eq!(listed(&[], &[], 10.0).await?, [1, 2]);
    assert_eq!(listed(&[3], &[], 10.0).await?, [1, 2, 3]);
    assert_eq!(listed(&[3], &[1], 10.0).await?, [2, 3]);
    Ok(())
}
