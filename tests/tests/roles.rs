//! The dual-write engine knows an authoritative store and a follower, not OLD and NEW: with the
//! roles swapped (NEW authoritative, OLD following, as from cutover on), sessions write NEW
//! first, every change reaches OLD through the same commit sequence, and a follower that was
//! down is repaired. The crash tests at each commit step run with both roles too
//! (`dual_write_crash.rs`).

use std::time::Duration;

use switchyard_store::Roles;
use switchyard_test_support::{DualEnv, DualTable, FaultProxy};

const SCHEMA: &str = "
CREATE TABLE parent (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int NOT NULL REFERENCES parent ON DELETE CASCADE, qty int NOT NULL);
CREATE TABLE events (at timestamptz NOT NULL DEFAULT clock_timestamp(), what text);
";

async fn env(label: &str) -> DualEnv {
    DualEnv::new_in(
        Roles::NEW_AUTHORITATIVE,
        label,
        SCHEMA,
        vec![
            DualTable::new("parent"),
            DualTable::new("child"),
            DualTable::new("events"),
        ],
    )
    .await
    .expect("env")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_new_authoritative_every_kind_of_write_reaches_old() {
    let env = env("roles_writes").await;
    let proxy = env.proxy().await.unwrap();
    let c = proxy.client().await.unwrap();

    // Sessions run on NEW.
    let db: String = c
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, env.new.name());

    // Autocommit writes (simple protocol), a client transaction with an update and a delete,
    // prepared statements (extended protocol), an FK cascade and a keyless append.
    c.batch_execute("INSERT INTO parent VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        .await
        .unwrap();
    let insert = c
        .prepare("INSERT INTO child (parent_id, qty) VALUES ($1, $2)")
        .await
        .unwrap();
    for (p, q) in [(1, 10), (1, 11), (2, 20), (3, 30)] {
        c.execute(&insert, &[&p, &q]).await.unwrap();
    }
    c.batch_execute(
        "BEGIN; UPDATE parent SET name = 'b2' WHERE id = 2; UPDATE child SET qty = qty + 1 WHERE parent_id = 1; \
         DELETE FROM child WHERE parent_id = 3; COMMIT",
    )
    .await
    .unwrap();
    c.batch_execute("DELETE FROM parent WHERE id = 1").await.unwrap();
    c.batch_execute("INSERT INTO events (what) VALUES ('x'), ('x')")
        .await
        .unwrap();

    // Nothing is captured on OLD: its rows come from the mirror alone.
    let intents_on_old = env
        .old
        .query_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'switchyard%'")
        .await
        .unwrap();
    assert_eq!(intents_on_old, 0, "OLD follows: it has no capture triggers");
    env.assert_converged_after_repairs(Duration::from_secs(20))
        .await
        .unwrap();
    let on_old = env.old.query_i64("SELECT count(*) FROM child").await.unwrap();
    assert_eq!(on_old, 1, "the cascade and the delete reached OLD");
    // The follower's key records fence the backfill there: one per key written.
    let records = env
        .old
        .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_parent")
        .await
        .unwrap();
    assert_eq!(records, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_new_authoritative_writes_while_old_is_down_are_repaired() {
    let env = env("roles_repair").await;
    let fault = FaultProxy::start(env.follower_server()).await.unwrap();
    let cfg = env.proxy_config_with_mirror(
        &env.follower_url_via(fault.addr()),
        &[
            ("timeout_ms", 500),
            ("repair_interval_ms", 100),
            ("stale_intent_secs", 1),
        ],
    );
    let proxy = env.start_proxy(&cfg).await.unwrap();
    let c = proxy.client().await.unwrap();
    c.batch_execute("INSERT INTO parent VALUES (1, 'a')")
        .await
        .unwrap();

    // OLD unreachable: the writes are acknowledged from NEW's commit and their intents, on NEW,
    // wait for the repair loop. (Connections already open are cut too.)
    fault.reset_all();
    fault.set_refuse(true);
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.batch_execute("INSERT INTO parent VALUES (2, 'b'); UPDATE parent SET name = 'a2' WHERE id = 1")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO events (what) VALUES ('while down')")
        .await
        .unwrap();
    assert!(env.pending_intents().await.unwrap() >= 2, "intents wait on NEW");
    let (_, only_new) = env.diff("parent").await.unwrap();
    assert!(!only_new.is_empty(), "OLD lags while it is down");

    fault.set_refuse(false);
    env.assert_converged_after_repairs(Duration::from_secs(30))
        .await
        .unwrap();
}
