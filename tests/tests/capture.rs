//! Every row change on OLD reaches NEW, however it was made, and exactly as the server stored it
//! (issue 11, sections 1 and 3). Each case failed with the statement-rewriting capture that came
//! before OLD's capture triggers: the change was missed, sent to the wrong table, or stored with
//! other bytes or values on NEW than on OLD.

use std::net::SocketAddr;
use std::time::Duration;

use switchyard_test_support::wire::{Frontend, RawConn};
use switchyard_test_support::{DualEnv, DualTable, FaultProxy, TestProxy};

const SCHEMA: &str = "
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE items (
    id int PRIMARY KEY,
    parent int REFERENCES parent ON DELETE CASCADE ON UPDATE CASCADE,
    owner int REFERENCES parent ON DELETE SET NULL,
    v text
);
CREATE TABLE parts (region int NOT NULL, id int NOT NULL, v text, PRIMARY KEY (region, id))
    PARTITION BY LIST (region);
CREATE TABLE parts_1 PARTITION OF parts FOR VALUES IN (1);
CREATE TABLE parts_2 PARTITION OF parts FOR VALUES IN (2);
CREATE SCHEMA s2;
CREATE TABLE s2.items (id int PRIMARY KEY, parent int, owner int, v text);
CREATE VIEW cheap_items AS SELECT id, v FROM items WHERE id < 100;
CREATE TABLE inbox (id int PRIMARY KEY, v text);
CREATE RULE inbox_to_items AS ON INSERT TO inbox DO ALSO INSERT INTO items (id, v) VALUES (NEW.id + 1000, NEW.v);
CREATE FUNCTION put_item(i int, t text) RETURNS void LANGUAGE sql AS $$ INSERT INTO items (id, v) VALUES (i, t) $$;
CREATE FUNCTION put_two(i int) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM put_item(i, 'one'); PERFORM put_item(i + 1, 'two'); END $$;
CREATE FUNCTION swallow(i int) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO items (id, v) VALUES (i, 'rolled back inside the function');
        RAISE EXCEPTION 'undo';
    EXCEPTION WHEN raise_exception THEN NULL;
    END;
END $$;
INSERT INTO parent VALUES (1, 'p1'), (2, 'p2'), (3, 'p3');
";

async fn env(label: &str) -> DualEnv {
    let env = DualEnv::new(
        label,
        SCHEMA,
        // `parent` is not migrated: the statement analysis takes its statements for plain ones.
        vec![DualTable::new("items"), DualTable::new("parts")],
    )
    .await
    .expect("dual env");
    // NEW gets its foreign keys after the migration (docs/backfill.md): `parent` is not
    // migrated, so NEW's copy never changes.
    env.new
        .execute_batch(
            "ALTER TABLE items DROP CONSTRAINT items_parent_fkey, DROP CONSTRAINT items_owner_fkey",
        )
        .await
        .expect("drop NEW's foreign keys");
    env
}

/// A proxy whose repair loop runs often, so the net's records are copied quickly.
async fn proxy(env: &DualEnv) -> TestProxy {
    TestProxy::start(&env.proxy_config_with_mirror(env.new.url(), &[("repair_interval_ms", 100)]))
        .await
        .expect("proxy")
}

const SETTLE: Duration = Duration::from_secs(20);

/// Foreign-key actions, rules, updatable views, functions calling functions, SQL-level
/// PREPARE/EXECUTE, `U&` identifiers and writes straight into a partition: none of them names the
/// migrated table the way the statement analysis can see, and every change reaches NEW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_indirectly_reach_new() {
    let env = env("cap_indirect").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    c.batch_execute(
        "INSERT INTO items (id, parent, owner, v) VALUES (1, 1, 2, 'a'), (2, 1, 2, 'b'), (3, 3, 2, 'c')",
    )
    .await
    .unwrap();
    for sql in [
        // ON DELETE CASCADE and SET NULL into items, ON UPDATE CASCADE.
        "DELETE FROM parent WHERE id = 1",
        "DELETE FROM parent WHERE id = 2",
        "UPDATE parent SET id = 30 WHERE id = 3",
        // An updatable view and a rule.
        "UPDATE cheap_items SET v = 'through the view' WHERE id = 3",
        "INSERT INTO inbox VALUES (7, 'ruled')",
        // A function calling a function, and one whose write an exception block undid.
        "SELECT put_two(40)",
        "SELECT swallow(50)",
        // SQL-level PREPARE / EXECUTE.
        "PREPARE bump_v (int) AS UPDATE items SET v = v || '+' WHERE id = $1",
        "EXECUTE bump_v(40)",
        // A Unicode-escaped identifier: U&\"\\0069tems\" is items.
        "INSERT INTO U&\"\\0069tems\" (id, v) VALUES (60, 'unicode name')",
        // Straight into a partition of the configured parent.
        "INSERT INTO parts_2 VALUES (2, 1, 'direct to the partition')",
        "INSERT INTO parts VALUES (1, 1, 'through the parent')",
        "UPDATE parts_1 SET v = 'updated in the partition' WHERE id = 1",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    // The same through a transaction with savepoints, statement by statement.
    for sql in [
        "BEGIN",
        "DELETE FROM parts_2 WHERE id = 1",
        "SAVEPOINT s",
        "SELECT put_item(70, 'undone by ROLLBACK TO')",
        "ROLLBACK TO SAVEPOINT s",
        "SELECT put_item(71, 'kept')",
        "COMMIT",
    ] {
        c.batch_execute(sql).await.expect(sql);
    }
    let old_items = env.old.query_i64("SELECT count(*) FROM items").await.unwrap();
    // 3 (cascades), 40 and 41 (put_two), 60 (U&), 71 (kept), 1007 (the rule).
    assert_eq!(
        old_items, 6,
        "items on OLD after the cascades, the rule and the functions"
    );
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    let set_null = env
        .new
        .query_i64("SELECT count(*) FROM items WHERE owner IS NULL AND id = 3")
        .await
        .unwrap();
    assert_eq!(set_null, 1, "ON DELETE SET NULL reached NEW");
    let cascaded = env
        .new
        .query_i64("SELECT count(*) FROM items WHERE parent = 30")
        .await
        .unwrap();
    assert_eq!(cascaded, 1, "ON UPDATE CASCADE reached NEW");
}

/// A temporary table, or a table of another schema earlier in the `search_path`, with the name
/// of a migrated table is not that table: nothing written there may reach NEW's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_only_share_the_name_are_not_mirrored() {
    let env = env("cap_shadow").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    c.batch_execute("INSERT INTO items (id, v) VALUES (1, 'real')")
        .await
        .unwrap();
    c.batch_execute("SET search_path = s2, public").await.unwrap();
    c.batch_execute("INSERT INTO items (id, v) VALUES (2, 'in s2')")
        .await
        .unwrap();
    c.batch_execute("UPDATE items SET v = 's2 only' WHERE id = 2")
        .await
        .unwrap();
    c.batch_execute("RESET search_path").await.unwrap();
    c.batch_execute("CREATE TEMP TABLE items (id int PRIMARY KEY, parent int, owner int, v text)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO items (id, v) VALUES (3, 'temporary')")
        .await
        .unwrap();
    c.batch_execute("DELETE FROM items WHERE id = 3").await.unwrap();
    c.batch_execute("INSERT INTO public.items (id, v) VALUES (4, 'real again')")
        .await
        .unwrap();
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    let on_new = env.new.query_i64("SELECT count(*) FROM items").await.unwrap();
    assert_eq!(on_new, 2, "only public.items' rows 1 and 4 are on NEW");
}

/// A client encoding other than UTF-8: OLD stores what a direct connection would (the proxy
/// sends the client's bytes, never a re-encoded copy), and NEW gets the same characters, also
/// ones the client's encoding cannot show (written by another session, then updated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encodings_other_than_utf8_store_the_same_characters() {
    let env = env("cap_latin1").await;
    let p = proxy(&env).await;
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], p.port()).into();
    // A row with a character LATIN1 has no code for, written in UTF-8.
    p.client()
        .await
        .unwrap()
        .batch_execute("INSERT INTO items (id, v) VALUES (9, '€ euro')")
        .await
        .unwrap();
    let (mut raw, _) = RawConn::login(proxy_addr, "postgres", env.old.name())
        .await
        .unwrap();
    let query = |sql: &[u8]| {
        let mut body = sql.to_vec();
        body.push(0);
        let mut f = Frontend::new();
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        f.raw(&msg);
        f.bytes().to_vec()
    };
    for (sql, what) in [
        (&b"SET client_encoding = 'LATIN1'"[..], "set"),
        // 'caf\xe9' is "café" in LATIN1; autocommit and in a transaction, both protocols' paths.
        (b"INSERT INTO items (id, v) VALUES (1, 'caf\xe9')", "insert"),
        (b"BEGIN", "begin"),
        (
            b"INSERT INTO items (id, v) VALUES (2, 'cr\xe8me br\xfbl\xe9e')",
            "insert 2",
        ),
        (b"COMMIT", "commit"),
        (
            b"UPDATE items SET owner = NULL WHERE id = 9",
            "update the euro row",
        ),
        (
            b"SELECT 'na\xefve'; INSERT INTO items (id, v) VALUES (3, 'na\xefve')",
            "multi",
        ),
    ] {
        raw.send(&query(sql)).await.unwrap();
        let answer = raw.read_until_ready(1).await.unwrap();
        assert!(
            !answer.iter().any(|m| m.tag == b'E'),
            "{what}: {:?}",
            answer
                .iter()
                .filter(|m| m.tag == b'E')
                .map(|m| m.field(b'M'))
                .collect::<Vec<_>>()
        );
        assert!(
            !answer.iter().any(|m| m.code().as_deref() == Some("SY001")),
            "{what}: the capture notices reached the client"
        );
    }
    let old = env.old.client().await.unwrap();
    let rows: Vec<(i32, String)> = old
        .query("SELECT id, v FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "café".to_owned()),
            (2, "crème brûlée".to_owned()),
            (3, "naïve".to_owned()),
            (9, "€ euro".to_owned())
        ]
    );
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}

/// Session settings change how values print, not what they are: a timestamptz key written under
/// another TimeZone, floats under `extra_float_digits = -3`, bytea under `bytea_output = escape`,
/// intervals under `IntervalStyle = sql_standard`. NEW gets the same values, also when the write
/// reaches it through a repair (NEW unreachable at commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_do_not_change_images_or_keys() {
    let env = DualEnv::new(
        "cap_settings",
        "CREATE TABLE t (at timestamptz PRIMARY KEY, f float8, b bytea, i interval, d date);",
        vec![DualTable::new("t")],
    )
    .await
    .unwrap();
    let new_addr: SocketAddr = {
        let url = env.new.url();
        let rest = url.split_once('@').map_or(url, |(_, r)| r);
        let port = rest
            .split('/')
            .next()
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(5432);
        ([127, 0, 0, 1], port).into()
    };
    let fault = FaultProxy::start(new_addr).await.unwrap();
    let p = TestProxy::start(&env.proxy_config_with_mirror(
        &env.follower_url_via(fault.addr()),
        &[("timeout_ms", 500), ("repair_interval_ms", 100)],
    ))
    .await
    .unwrap();
    let c = p.client().await.unwrap();
    c.batch_execute(
        "SET TimeZone = 'Europe/Berlin'; SET extra_float_digits = -3; SET bytea_output = 'escape'; \
         SET IntervalStyle = 'sql_standard'; SET DateStyle = 'German, DMY'",
    )
    .await
    .unwrap();
    let write =
        "INSERT INTO t VALUES ('2026-03-29 02:30:00+01', 0.1::float8 + 0.2::float8, '\\x00ff5c27'::bytea, \
                 interval '-1 year -2 days +03:04:05.6', '2026-12-05')";
    c.batch_execute(write).await.unwrap();
    // NEW unreachable: the next writes are repaired later from their intents' keys.
    fault.set_refuse(true);
    c.batch_execute(
        "INSERT INTO t VALUES ('2026-10-25 02:30:00+02', 1e-300, '\\x5c5c'::bytea, interval '1 day -1 second', '2026-01-02')",
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE t SET f = f * 3 WHERE at = '2026-03-29 01:30:00+00'")
        .await
        .unwrap();
    fault.set_refuse(false);
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
    let tombstones = env
        .new
        .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_t WHERE sy_deleted")
        .await
        .unwrap();
    assert_eq!(tombstones, 0, "no repair took a key for gone");
    let exact = env
        .new
        .query_i64("SELECT count(*) FROM t WHERE f = (0.1::float8 + 0.2::float8) * 3")
        .await
        .unwrap();
    assert_eq!(exact, 1, "the float kept all its digits");
}

/// TRUNCATE (also through CASCADE from another table) is refused on OLD whatever the path, since
/// row images cannot carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_of_a_migrated_table_is_refused_even_through_cascade() {
    let env = env("cap_truncate").await;
    let p = proxy(&env).await;
    let c = p.client().await.unwrap();
    c.batch_execute("INSERT INTO items (id, parent, v) VALUES (1, 1, 'a')")
        .await
        .unwrap();
    for sql in ["TRUNCATE parent CASCADE", "TRUNCATE items"] {
        let err = c.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.as_db_error().map(|e| e.code().code()),
            Some("0A000"),
            "{sql}: {err}"
        );
    }
    let direct = env.old.execute_batch("TRUNCATE parent CASCADE").await;
    assert!(direct.is_err(), "the guard refuses it on a direct connection too");
    assert_eq!(env.old.query_i64("SELECT count(*) FROM items").await.unwrap(), 1);
    env.assert_converged_after_repairs(SETTLE).await.unwrap();
}
