//! Shadow reads (phase `shadow_read`) against real OLD and NEW databases: a difference injected
//! on NEW is counted with its example (in `/status` and the metrics) while equal data matches,
//! the client's answer is OLD's byte for byte, and a NEW that is slow or down adds no
//! client-visible latency.

use std::time::{Duration, Instant};

use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{server_of, DualEnv, DualTable, FaultProxy, ProxyConfig, TestProxy};

const SCHEMA: &str = "
CREATE TABLE items (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(10,2),
    at timestamptz NOT NULL
);
";

/// OLD and NEW with the same 50 rows (written on OLD without capture, as if they predated dual
/// writes, and the same on NEW).
async fn env(label: &str) -> DualEnv {
    let env = DualEnv::new(label, SCHEMA, vec![DualTable::new("public.items")])
        .await
        .expect("dual env");
    let rows = "INSERT INTO items SELECT i, 'item ' || i, i * 1.25, \
                timestamptz '2024-03-01 12:00:00+00' + i * interval '1 hour' \
                FROM generate_series(1, 50) i";
    env.seed_old(rows).await.expect("rows on OLD");
    env.new.execute_batch(rows).await.expect("rows on NEW");
    env
}

/// A config with every table in `shadow_read`, `shadow_share` 100, NEW reached at `new_url`.
fn shadow_config(env: &DualEnv, new_url: &str) -> ProxyConfig {
    let mut cfg = env.proxy_config_via(new_url);
    for s in &mut cfg.extra_sections {
        *s = s.replace(
            "phase = \"dual_write\"",
            "phase = \"shadow_read\"\nshadow_share = 100",
        );
    }
    cfg
}

/// `tables[0].shadow_reads` of the proxy's `/status`.
async fn shadow_status(proxy: &TestProxy) -> serde_json::Value {
    let (code, body) = proxy.admin_get("/status").await.expect("status");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    v["tables"][0]["shadow_reads"].clone()
}

fn count(status: &serde_json::Value, outcome: &str) -> u64 {
    status[outcome].as_u64().unwrap_or(0)
}

/// Polls `/status` until `done` holds (at most 15 s), and returns the last figures.
async fn wait_for(
    proxy: &TestProxy,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = shadow_status(proxy).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "waited 15 s for {what}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the metric line with these labels.
async fn metric(proxy: &TestProxy, labels: &[&str]) -> Option<f64> {
    let (_, text) = proxy.admin_get("/metrics").await.expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("switchyard_shadow_reads_total{"))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_difference_injected_on_new_is_counted_with_its_example_and_equal_data_matches() {
    let env = env("shadow_diff").await;
    let proxy = env
        .start_proxy(&shadow_config(&env, env.new.url()))
        .await
        .unwrap();
    let client = proxy.client().await.unwrap();

    // Equal data: simple and extended protocol, ordered and not, and a session setting that
    // changes how values print (NEW's shadow connection must run under it too).
    client
        .simple_query("SELECT * FROM items ORDER BY id")
        .await
        .unwrap();
    client
        .query("SELECT id, name, price FROM items WHERE id = $1", &[&3i32])
        .await
        .unwrap();
    client.simple_query("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    client.simple_query("SET DateStyle = 'SQL, DMY'").await.unwrap();
    client
        .simple_query("SELECT id, at FROM items WHERE id < 10")
        .await
        .unwrap();
    // Three reads, three matches (the one under Tokyo time and an SQL DateStyle matches only
    // if NEW's shadow ran under the session's settings: the server's defaults print otherwise).
    let s = wait_for(&proxy, "3 matches", |s| count(s, "match") >= 3).await;
    assert_eq!(count(&s, "match"), 3, "{s}");
    assert_eq!(count(&s, "mismatch"), 0, "{s}");
    assert_eq!(count(&s, "error"), 0, "{s}");

    // A difference injected on NEW only.
    env.new
        .execute_batch("UPDATE items SET name = 'changed on NEW' WHERE id = 7")
        .await
        .unwrap();
    let rows = client
        .simple_query("SELECT id, name FROM items WHERE id BETWEEN 5 AND 9")
        .await
        .unwrap();
    assert!(
        rows.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(1) == Some("item 7"))),
        "the client reads OLD's row"
    );
    let row = client
        .query_one("SELECT name FROM items WHERE id = $1", &[&7i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "item 7");
    let s = wait_for(&proxy, "2 mismatches", |s| count(s, "mismatch") >= 2).await;
    assert_eq!(count(&s, "mismatch"), 2, "{s}");
    let examples = s["examples"].as_array().unwrap();
    let simple = examples
        .iter()
        .find(|e| e["statement"].as_str().unwrap().contains("BETWEEN 5 AND 9"))
        .unwrap_or_else(|| panic!("no example of the simple read: {s}"));
    assert_eq!(simple["outcome"], "mismatch");
    assert_eq!(
        simple["only_old"],
        serde_json::json!([["7", "item 7"]]),
        "{simple}"
    );
    assert_eq!(
        simple["only_new"],
        serde_json::json!([["7", "changed on NEW"]]),
        "{simple}"
    );
    assert_eq!(simple["fingerprint"].as_str().unwrap().len(), 16, "{simple}");
    // The extended read asked for text results too (tokio-postgres: binary for these types is
    // its choice; whatever the format, OLD's and NEW's bytes differ and are shown).
    assert!(
        examples
            .iter()
            .any(|e| e["statement"].as_str().unwrap().contains("$1")),
        "{s}"
    );
    let m = metric(&proxy, &["outcome=\"mismatch\"", "table=\"public.items\""]).await;
    assert_eq!(m, Some(2.0));
    let m = metric(&proxy, &["outcome=\"match\"", "table=\"public.items\""]).await;
    assert_eq!(m, Some(3.0));

    // Writes are still mirrored; a read in the transaction that wrote is not shadowed.
    client.simple_query("BEGIN").await.unwrap();
    client
        .simple_query("UPDATE items SET price = 99 WHERE id = 1")
        .await
        .unwrap();
    client
        .simple_query("SELECT * FROM items WHERE id = 1")
        .await
        .unwrap();
    client.simple_query("COMMIT").await.unwrap();
    let new_price = env
        .new
        .query_i64("SELECT price::bigint FROM items WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(new_price, 99);
    let before = shadow_status(&proxy).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = shadow_status(&proxy).await;
    let total = |s: &serde_json::Value| {
        ["match", "mismatch", "error", "skipped"]
            .iter()
            .map(|o| count(s, o))
            .sum::<u64>()
    };
    assert_eq!(total(&before), total(&after), "nothing more was shadowed");
    assert_eq!(count(&after, "mismatch"), 2, "{after}");
}

/// The messages of one Query and one extended read (binary results), after login.
async fn transcript(addr: std::net::SocketAddr, db: &str) -> Vec<Msg> {
    let (mut conn, _) = RawConn::login(addr, "postgres", db).await.unwrap();
    let mut f = Frontend::new();
    f.query("SELECT * FROM items WHERE id > 40 ORDER BY id");
    f.parse("", "SELECT id, name, price, at FROM items WHERE id = $1", &[])
        .bind("", "", &[Some(b"7")], &[], &[1])
        .execute("", 0)
        .sync();
    conn.send(f.bytes()).await.unwrap();
    conn.read_until_ready(2).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_answer_is_olds_byte_for_byte() {
    let env = env("shadow_bytes").await;
    // NEW differs on the rows read, so a leak of NEW's answer would show.
    env.new
        .execute_batch("UPDATE items SET name = 'NEW', price = 0 WHERE id IN (7, 45)")
        .await
        .unwrap();
    let proxy = env
        .start_proxy(&shadow_config(&env, env.new.url()))
        .await
        .unwrap();
    let direct = transcript(server_of(env.old.url()), env.old.name()).await;
    let proxied = transcript(proxy.addr, env.old.name()).await;
    assert!(
        direct.iter().filter(|m| m.tag == b'D').count() == 11,
        "{direct:?}"
    );
    assert_eq!(proxied, direct);
    // Both reads were shadowed, and both differed.
    let s = wait_for(&proxy, "2 mismatches", |s| count(s, "mismatch") >= 2).await;
    assert_eq!(count(&s, "mismatch"), 2, "{s}");
}

/// Client latencies of `n` point reads through `proxy`, one after the other.
async fn read_latencies(proxy: &TestProxy, n: usize) -> Vec<Duration> {
    let client = proxy.client().await.unwrap();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sql = format!("SELECT * FROM items WHERE id = {}", i % 50 + 1);
        let t = Instant::now();
        client.simple_query(&sql).await.unwrap();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// The documented bound (docs/drift.md, "Shadow reads"): a NEW that is slow or down adds at
/// most 20 ms to the client's median and nothing near a shadow's 5 s timeout to any read.
fn assert_unaffected(what: &str, baseline: &[Duration], degraded: &[Duration]) {
    let p50 = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    eprintln!(
        "{what}: p50 {:?} -> {:?}, max {:?} -> {:?}",
        p50(baseline),
        p50(degraded),
        max(baseline),
        max(degraded)
    );
    assert!(
        p50(degraded) <= p50(baseline) + Duration::from_millis(20),
        "{what}: p50 {:?} vs {:?}",
        p50(degraded),
        p50(baseline)
    );
    assert!(
        max(degraded) < Duration::from_secs(1),
        "{what}: max {:?}",
        max(degraded)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_new_adds_no_client_latency() {
    let env = env("shadow_slow").await;
    let proxy = env
        .start_proxy(&shadow_config(&env, env.new.url()))
        .await
        .unwrap();
    let baseline = read_latencies(&proxy, 40).await;
    // The first reads log in the shadow connections; a read finding every slot busy is skipped.
    let s = wait_for(&proxy, "40 shadows", |s| {
        count(s, "match") + count(s, "skipped") >= 40
    })
    .await;
    assert!(count(&s, "match") >= 16, "{s}");

    // NEW is stuck: a lock on the table makes every read there wait.
    let locker = env.new.client().await.unwrap();
    locker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let slow = read_latencies(&proxy, 40).await;
    assert_unaffected("NEW locked", &baseline, &slow);
    // Past the slots the shadows were skipped; those waiting on the lock time out.
    let s = wait_for(&proxy, "timed-out shadows", |s| count(s, "error") >= 1).await;
    assert!(count(&s, "skipped") >= 1, "{s}");
    assert_eq!(count(&s, "mismatch"), 0, "{s}");
    locker.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_that_is_down_adds_no_client_latency() {
    let env = env("shadow_down").await;
    let fault = FaultProxy::start(env.follower_server()).await.unwrap();
    let new_url = env.follower_url_via(fault.addr());
    let proxy = env.start_proxy(&shadow_config(&env, &new_url)).await.unwrap();
    let baseline = read_latencies(&proxy, 40).await;
    // The first reads log in the shadow connections; a read finding every slot busy is skipped.
    let s = wait_for(&proxy, "40 shadows", |s| {
        count(s, "match") + count(s, "skipped") >= 40
    })
    .await;
    assert!(count(&s, "match") >= 16, "{s}");

    // NEW goes away: its connections are reset and new ones refused.
    fault.set_refuse(true);
    fault.reset_all();
    let down = read_latencies(&proxy, 40).await;
    assert_unaffected("NEW down", &baseline, &down);
    let s = wait_for(&proxy, "failed shadows", |s| count(s, "error") >= 10).await;
    assert_eq!(count(&s, "mismatch"), 0, "{s}");
    let example = &s["examples"][0];
    assert_eq!(example["outcome"], "error", "{s}");
    assert!(example["detail"].as_str().unwrap().starts_with("NEW:"), "{s}");
}

/// A table moved from `dual_write` to `shadow_read` by the control state (as `switchyard phase`
/// does) is shadowed from then on, by the running proxy, in a session opened before the move;
/// moved back, it no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phase_change_at_run_time_starts_and_stops_shadow_reads() {
    let env = env("shadow_live").await;
    let mut cfg = env.proxy_config();
    cfg.extra_sections
        .push("[control]\npoll_interval_ms = 200\n".to_owned());
    let config = switchyard_config::Config::from_toml_str(&cfg.to_toml(), Default::default()).unwrap();
    let old = switchyard_store::Store::connect_lazy(switchyard_store::Role::Old, &config.old.url).unwrap();
    switchyard_control::seed(&old, &config, "test").await.unwrap();
    let proxy = env.start_proxy(&cfg).await.unwrap();
    let client = proxy.client().await.unwrap();
    let read = "SELECT name FROM items WHERE id = 7";
    client.simple_query(read).await.unwrap();
    assert!(
        shadow_status(&proxy).await.is_null(),
        "not shadowed in dual_write"
    );

    let table: switchyard_config::TableName = "public.items".parse().unwrap();
    let to = |phase| switchyard_control::Request {
        table: &table,
        target: switchyard_control::Target::Phase(phase),
        by: "test",
        force: false,
    };
    let facts = || async { Ok(switchyard_control::guard::Facts::default()) };
    switchyard_control::change(
        &old,
        &to(switchyard_config::Phase::ShadowRead),
        &config.control,
        facts,
    )
    .await
    .unwrap();
    // Reads until one is shadowed (the proxy follows within its poll interval).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.simple_query(read).await.unwrap();
        let s = shadow_status(&proxy).await;
        if count(&s, "match") >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no shadow read after the move: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    switchyard_control::change(
        &old,
        &to(switchyard_config::Phase::DualWrite),
        &config.control,
        facts,
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shadow_status(&proxy).await.is_null() {
        assert!(Instant::now() < deadline, "still shadowed after moving back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Shadow reads run as the client's own role on both stores (`[auth] upstream_login =
/// "client"`): with the same row-level security policy on both, a role's read matches although
/// NEW holds a row the role may not see. Run as the stores' URL user (a superuser, whom the
/// policy does not bind), NEW would return every row, and the re-run on both stores would still
/// differ by that row: a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_reads_run_as_the_clients_own_role() {
    let role = switchyard_test_support::TestRole::create("shadow_role", "LOGIN")
        .await
        .unwrap();
    let schema = format!(
        "{SCHEMA}
         ALTER TABLE items ADD COLUMN owner text NOT NULL DEFAULT 'someone';
         ALTER TABLE items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON items USING (owner = current_user);
         GRANT SELECT ON items TO {r};",
        r = role.name
    );
    let env = DualEnv::new("shadow_role", &schema, vec![DualTable::new("public.items")])
        .await
        .expect("dual env");
    let rows = format!(
        "INSERT INTO items SELECT i, 'item ' || i, i * 1.25, now(), \
         CASE WHEN i % 2 = 0 THEN '{r}' ELSE 'someone' END FROM generate_series(1, 10) i",
        r = role.name
    );
    env.seed_old(&rows).await.unwrap();
    env.new.execute_batch(&rows).await.unwrap();
    // A row on NEW only, that the role may not see: its reads still match.
    env.new
        .execute_batch(
            "UPDATE items SET at = timestamptz '2024-01-01';
             INSERT INTO items VALUES (11, 'item 11', 1, timestamptz '2024-01-01', 'someone');",
        )
        .await
        .unwrap();
    env.old
        .execute_batch("UPDATE items SET at = timestamptz '2024-01-01'; ")
        .await
        .unwrap();
    let proxy = env
        .start_proxy(&shadow_config(&env, env.new.url()))
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(&proxy.url(&role.name), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        let rows = client
            .query("SELECT id, name FROM items ORDER BY id", &[])
            .await
            .unwrap();
        let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![2, 4, 6, 8, 10], "OLD's answer under the policy");
    }
    let s = wait_for(&proxy, "5 compared reads", |s| {
        count(s, "match") + count(s, "mismatch") + count(s, "error") >= 5
    })
    .await;
    assert_eq!(count(&s, "match"), 5, "{s}");
    assert_eq!(count(&s, "mismatch"), 0, "{s}");
}
