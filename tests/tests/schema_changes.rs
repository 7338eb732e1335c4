//! Schema changes of a migrated table while the proxy runs (issue 11, section 3): DDL run
//! directly on OLD and NEW is noticed without a restart. A column both stores gained is
//! mirrored; a column only OLD has makes the mirror fail for the transactions that wrote the
//! table (their intents stay on OLD) until NEW has it too, and the repairs then converge; a column
//! both stores dropped is simply left out. Each case failed before: the proxy built its apply
//! statements once at start, so NEW got NULL in the new column, rows without the column were
//! counted as mirrored, and statements naming a dropped column failed on NEW for good.

use std::time::Duration;

use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text, extra text);";

async fn env(label: &str) -> DualEnv {
    DualEnv::new(label, SCHEMA, vec![DualTable::new("items")])
        .await
        .expect("dual env")
}

/// A proxy whose repair loop runs often. Its mirror timeout is long: the tests assert that a
/// write reached NEW before the client heard COMMIT, which a mirror that timed out on a loaded
/// machine (the default is 2 s, and the first write after a change prepares new statements on
/// NEW) would leave to a repair instead.
async fn proxy(env: &DualEnv) -> TestProxy {
    TestProxy::start(&env.proxy_config_with_mirror(
        env.new.url(),
        &[("repair_interval_ms", 100), ("timeout_ms", 30_000)],
    ))
    .await
    .expect("proxy")
}

const SETTLE: Duration = Duration::from_secs(30);

/// Runs each string through `c` (simple protocol), in order.
async fn run(c: &Client, batches: &[&str]) {
    for sql in batches {
        c.batch_execute(sql).await.expect(sql);
    }
}

/// Runs `sql` directly on each of `stores`.
async fn direct(stores: &[&TestDb], sql: &str) {
    for db in stores {
        db.execute_batch(sql).await.expect(sql);
    }
}

/// How many rows of `items` on NEW satisfy `condition`.
async fn new_rows(env: &DualEnv, condition: &str) -> i64 {
    env.new
        .query_i64(&format!("SELECT count(*) FROM items WHERE {condition}"))
        .await
        .unwrap()
}

/// `note` of row `id` on NEW (`None`: no such row; `Some(None)`: NULL).
async fn new_note(env: &DualEnv, id: i32) -> Option<Option<String>> {
    let c = env.new.client().await.unwrap();
    c.query_opt("SELECT note FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// ADD COLUMN on both stores while the proxy runs: writes through the proxy that set the new
/// column reach NEW with its value at once (not later through a repair), in both protocols, and
/// so does a change made directly on OLD (which reaches NEW through the repair loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_on_both_stores_is_mirrored() {
    let env = env("ddl_add_both").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    // The proxy mirrors the table with its first columns (and prepares its statements on NEW).
    run(
        &c,
        &["INSERT INTO items VALUES (1, 'before', 'x'), (2, 'before', 'y')"],
    )
    .await;
    direct(&[&env.old, &env.new], "ALTER TABLE items ADD COLUMN note text").await;
    // A change straight on OLD first: the capture trigger's net records it and the repair loop
    // copies it, with the new column.
    direct(&[&env.old], "UPDATE items SET note = 'direct' WHERE id = 2").await;
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    assert_eq!(new_note(&env, 2).await, Some(Some("direct".to_owned())));

    run(
        &c,
        &[
            "INSERT INTO items (id, v, note) VALUES (3, 'after', 'hello')",
            "UPDATE items SET note = 'updated' WHERE id = 1",
        ],
    )
    .await;
    c.execute(
        "UPDATE items SET note = $1 WHERE id = $2",
        &[&"bound".to_owned(), &2i32],
    )
    .await
    .unwrap();
    // The client heard COMMIT only after NEW committed the images.
    assert_eq!(new_note(&env, 3).await, Some(Some("hello".to_owned())));
    assert_eq!(new_note(&env, 1).await, Some(Some("updated".to_owned())));
    assert_eq!(new_note(&env, 2).await, Some(Some("bound".to_owned())));
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}

/// ADD COLUMN on OLD only: the client's writes still succeed, but no transaction that wrote the
/// table is taken as mirrored while NEW lacks the column (NEW does not get the rows without it,
/// and their intents stay on OLD). Once NEW has the column, the repairs converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_on_old_only_waits_for_new() {
    let env = env("ddl_add_old").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    run(&c, &["INSERT INTO items VALUES (1, 'before', 'x')"]).await;
    direct(&[&env.old], "ALTER TABLE items ADD COLUMN note text").await;
    run(
        &c,
        &[
            "INSERT INTO items (id, v, note) VALUES (2, 'after', 'only on OLD so far')",
            "BEGIN; UPDATE items SET note = 'n1', v = 'changed' WHERE id = 1; COMMIT",
        ],
    )
    .await;
    c.execute("DELETE FROM items WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    run(&c, &["INSERT INTO items (id, v, note) VALUES (1, 'again', 'n2')"]).await;
    // Give the repair loop time to (wrongly) finish them, then look.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        new_rows(&env, "id = 2").await,
        0,
        "NEW got a row without the column it lacks"
    );
    assert_eq!(
        new_rows(&env, "id = 1 AND v = 'before'").await,
        1,
        "NEW's row 1 is untouched while NEW lacks the column"
    );
    assert!(
        env.pending_intents().await.unwrap() >= 1,
        "the transactions are still recorded for repair"
    );
    direct(&[&env.new], "ALTER TABLE items ADD COLUMN note text").await;
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    assert_eq!(
        new_note(&env, 2).await,
        Some(Some("only on OLD so far".to_owned()))
    );
    assert_eq!(new_note(&env, 1).await, Some(Some("n2".to_owned())));
    // And the mirror works directly again.
    run(&c, &["UPDATE items SET note = 'direct again' WHERE id = 2"]).await;
    assert_eq!(new_note(&env, 2).await, Some(Some("direct again".to_owned())));
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}

/// DROP COLUMN on both stores: the mirror goes on without the column, through the proxy and
/// through the repairs of changes made directly on OLD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_on_both_stores_is_left_out() {
    let env = env("ddl_drop_both").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    run(&c, &["INSERT INTO items VALUES (1, 'a', 'x'), (2, 'b', 'y')"]).await;
    direct(&[&env.old, &env.new], "ALTER TABLE items DROP COLUMN extra").await;
    // Directly on OLD first: the repair must not name the dropped column.
    direct(&[&env.old], "UPDATE items SET v = 'direct' WHERE id = 2").await;
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    run(&c, &["INSERT INTO items VALUES (3, 'c')"]).await;
    c.execute(
        "UPDATE items SET v = $1 WHERE id = $2",
        &[&"bound".to_owned(), &1i32],
    )
    .await
    .unwrap();
    run(&c, &["DELETE FROM items WHERE id = 2"]).await;
    assert_eq!(
        new_rows(&env, "(id = 3 AND v = 'c') OR (id = 1 AND v = 'bound')").await,
        2,
        "mirrored before the client heard COMMIT"
    );
    assert_eq!(new_rows(&env, "id = 2").await, 0);
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}

/// DROP COLUMN on NEW first: the images still carry the column, NEW refuses them, and the mirror
/// fails (the intents stay) until OLD drops it too; then everything converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_on_new_first_is_held_until_old_drops_it() {
    let env = env("ddl_drop_new").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    run(&c, &["INSERT INTO items VALUES (1, 'a', 'x')"]).await;
    direct(&[&env.new], "ALTER TABLE items DROP COLUMN extra").await;
    run(
        &c,
        &[
            "INSERT INTO items VALUES (2, 'b', 'still on OLD')",
            "UPDATE items SET v = 'changed' WHERE id = 1",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(env.pending_intents().await.unwrap() >= 1, "kept for repair");
    direct(&[&env.old], "ALTER TABLE items DROP COLUMN extra").await;
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    run(&c, &["INSERT INTO items VALUES (3, 'c')"]).await;
    assert_eq!(new_rows(&env, "id = 3").await, 1);
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}
