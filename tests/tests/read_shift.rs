//! Read shifting (phase `read_shift`) against real OLD and NEW databases: reads NEW serves look
//! like OLD's answers (OLD's ids for tables, columns and an enum, the session's TimeZone and
//! DateStyle), prepared statements work in both protocols, a NEW that fails a read or is down
//! leaves the client with OLD's answer, sessions are sticky, and a write whose mirror failed is
//! never read back stale from NEW through another proxy (the read lease).

use std::time::{Duration, Instant};

use switchyard_test_support::wire::{Frontend, Msg, RawConn};
use switchyard_test_support::{server_of, DualEnv, DualTable, FaultProxy, TestProxy};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (
    id int PRIMARY KEY,
    name text NOT NULL,
    feeling mood NOT NULL,
    at timestamptz NOT NULL
);
";

/// The marker NEW's copy of row 1 carries, so a test can tell which store answered.
const ON_NEW: &str = "served by NEW";

/// OLD and NEW with the same 20 rows, except row 1's name on NEW.
async fn env(label: &str) -> DualEnv {
    let env = DualEnv::new(label, SCHEMA, vec![DualTable::new("public.items")])
        .await
        .expect("dual env");
    let rows = "INSERT INTO items SELECT i, 'item ' || i, (enum_range(NULL::mood))[1 + i % 3], \
                timestamptz '2024-03-01 12:00:00+00' + i * interval '1 hour' \
                FROM generate_series(1, 20) i";
    env.seed_old(rows).await.expect("rows on OLD");
    env.new.execute_batch(rows).await.expect("rows on NEW");
    env.new
        .execute_batch(&format!("UPDATE items SET name = '{ON_NEW}' WHERE id = 1"))
        .await
        .expect("marker on NEW");
    env
}

/// `reads` of table `items` in the proxy's `/status`.
async fn reads(proxy: &TestProxy) -> serde_json::Value {
    proxy.table_reads("public.items").await.expect("status")
}

async fn lease(proxy: &TestProxy) {
    proxy
        .wait_for_read_lease("public.items")
        .await
        .expect("read lease");
}

async fn name_of_row_1(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT name FROM items WHERE id = $1", &[&1i32])
        .await
        .expect("read row 1")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_served_by_new_carry_olds_ids_and_the_sessions_settings() {
    let env = env("shift_ids").await;
    let proxy = env
        .start_proxy(&env.read_shift_config(env.new.url(), 100))
        .await
        .unwrap();
    lease(&proxy).await;
    let client = proxy.client().await.unwrap();

    // Extended protocol, prepared by tokio-postgres (Parse and Describe, then Bind and
    // Execute): NEW's row, with the enum's type known to the driver by OLD's id.
    assert_eq!(name_of_row_1(&client).await, ON_NEW);
    let stmt = client
        .prepare("SELECT id, feeling FROM items WHERE id = $1")
        .await
        .unwrap();
    let old = env.old.client().await.unwrap();
    let old_mood: u32 = old
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await
        .unwrap()
        .get(0);
    let new_mood: u32 = env
        .new
        .client()
        .await
        .unwrap()
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(old_mood, new_mood, "the test needs the enum's ids to differ");
    assert_eq!(stmt.columns()[1].type_().oid(), old_mood);
    assert_eq!(stmt.columns()[1].type_().name(), "mood");
    // The same prepared statement, executed again and again on the session's NEW connection.
    for id in [2i32, 3, 4] {
        let row = client.query_one(&stmt, &[&id]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), id);
    }

    // Simple protocol under the session's own settings: the text NEW sends is what OLD would.
    client
        .batch_execute("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap();
    let sql = "SELECT id, name, feeling, at FROM items WHERE id BETWEEN 2 AND 6 ORDER BY id";
    let via_proxy = text_rows(&client, sql).await;
    old.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap();
    assert_eq!(via_proxy, text_rows(&old, sql).await);
    assert!(via_proxy[0].contains("01/03/2024 23:00:00 JST"), "{via_proxy:?}");
    assert_eq!(
        text_rows(&client, "SELECT name FROM items WHERE id = 1").await,
        vec![ON_NEW.to_owned()]
    );

    // Byte for byte: a RowDescription from NEW carries OLD's table, column and type ids, so
    // the answer for an equal row equals OLD's own, in both protocols.
    let batch = |f: &mut Frontend| {
        f.query("SELECT * FROM items WHERE id = 5");
        f.parse("", "SELECT feeling, at, id FROM items WHERE id = $1", &[])
            .bind("", "", &[Some(b"6")], &[], &[1])
            .describe(b'P', "")
            .execute("", 0)
            .sync();
    };
    let transcript = |addr, db: String| async move {
        let (mut conn, _) = RawConn::login(addr, "postgres", &db).await.unwrap();
        let mut f = Frontend::new();
        batch(&mut f);
        conn.send(f.bytes()).await.unwrap();
        conn.read_until_ready(2).await.unwrap()
    };
    let direct: Vec<Msg> = transcript(server_of(env.old.url()), env.old.name().to_owned()).await;
    let served: Vec<Msg> = transcript(
        format!("127.0.0.1:{}", proxy.port()).parse().unwrap(),
        env.old.name().to_owned(),
    )
    .await;
    assert_eq!(served, direct);

    let r = reads(&proxy).await;
    assert!(r["new"].as_u64().unwrap() >= 8, "{r}");
    assert_eq!(r["fallbacks"]["types"], 0, "{r}");
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_reads_total{") && l.contains("store=\"new\"")),
        "{metrics}"
    );
}

async fn text_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_owned())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_new_cannot_answer_is_answered_by_old_and_writes_stay_on_old() {
    let env = env("shift_fallback").await;
    let fault = FaultProxy::start(env.follower_server()).await.unwrap();
    let proxy = env
        .start_proxy(&env.read_shift_config(&env.follower_url_via(fault.addr()), 100))
        .await
        .unwrap();
    lease(&proxy).await;
    let client = proxy.client().await.unwrap();
    assert_eq!(name_of_row_1(&client).await, ON_NEW);

    // A read NEW fails (a column NEW lacks) is answered by OLD.
    env.new
        .execute_batch("ALTER TABLE items RENAME COLUMN at TO at_new")
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(at) FROM items WHERE id > $1", &[&0i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20);
    env.new
        .execute_batch("ALTER TABLE items RENAME COLUMN at_new TO at")
        .await
        .unwrap();

    // Reads inside a transaction, and writes, are OLD's.
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(name_of_row_1(&client).await, "item 1");
    client.batch_execute("COMMIT").await.unwrap();

    // NEW unreachable: OLD answers, at once after the first failure.
    fault.set_refuse(true);
    let fresh = proxy.client().await.unwrap();
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(name_of_row_1(&fresh).await, "item 1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let r = reads(&proxy).await;
    assert!(r["fallbacks"]["error"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["fallbacks"]["unavailable"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["old"].as_u64().unwrap() >= 6, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_sticky_and_split_by_the_share() {
    let env = env("shift_share").await;
    let proxy = env
        .start_proxy(&env.read_shift_config(env.new.url(), 50))
        .await
        .unwrap();
    lease(&proxy).await;
    let mut on_new = 0;
    for _ in 0..40 {
        let client = proxy.client().await.unwrap();
        let first = name_of_row_1(&client).await;
        for _ in 0..3 {
            assert_eq!(name_of_row_1(&client).await, first, "a session changed stores");
        }
        on_new += usize::from(first == ON_NEW);
    }
    // 40 sessions at 50%: outside 8..=32 has a probability below 1e-4.
    assert!((8..=32).contains(&on_new), "{on_new} of 40 sessions on NEW");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_mirror_failed_is_not_read_stale_from_new_through_another_proxy() {
    let env = env("shift_lease").await;
    // Proxy A mirrors through a link that is cut for one transaction; proxy B serves every
    // read from NEW directly.
    let fault = FaultProxy::start(env.follower_server()).await.unwrap();
    let mut cfg_a = env.read_shift_config(&env.follower_url_via(fault.addr()), 0);
    cfg_a
        .extra_sections
        .push("[mirror]\ntimeout_ms = 500\n".to_owned());
    let a = env.start_proxy(&cfg_a).await.unwrap();
    // B leaves A's failed intent alone for a while (an intent is B's to repair once older
    // than B's mirror timeout), so NEW stays behind while B is read.
    let mut cfg_b = env.read_shift_config(env.new.url(), 100);
    cfg_b
        .extra_sections
        .push("[mirror]\nstale_intent_secs = 60\n".to_owned());
    let b = env.start_proxy(&cfg_b).await.unwrap();
    lease(&a).await;
    lease(&b).await;
    let writer = a.client().await.unwrap();
    let reader = b.client().await.unwrap();
    writer
        .execute("UPDATE items SET name = 'before' WHERE id = 2", &[])
        .await
        .unwrap();
    assert_eq!(name_of(&reader, 2).await, "before");

    fault.set_blackhole(true);
    let started = Instant::now();
    writer
        .execute("UPDATE items SET name = 'after' WHERE id = 2", &[])
        .await
        .unwrap();
    let waited = started.elapsed();
    // The commit was answered a lease (2 s) after its mirror failed.
    assert!(
        waited >= Duration::from_secs(2),
        "COMMIT answered after {waited:?}"
    );
    // B reads the new row: its lease was withheld, the read went to OLD.
    for _ in 0..20 {
        assert_eq!(name_of(&reader, 2).await, "after");
    }
    // NEW still had the old row meanwhile (the link A repairs through is still cut).
    let on_new = env.new.client().await.unwrap();
    assert_eq!(
        name_of(&on_new, 2).await,
        "before",
        "NEW was repaired; the test proved nothing"
    );
    let r = reads(&b).await;
    assert_eq!(r["lease_held"], false, "{r}");
    fault.set_blackhole(false);
    on_new
        .execute("UPDATE items SET name = 'item 1' WHERE id = 1", &[])
        .await
        .unwrap();
    env.assert_converged_after_repairs(Duration::from_secs(30))
        .await
        .unwrap();
}

async fn name_of(client: &tokio_postgres::Client, id: i32) -> String {
    client
        .query_one("SELECT name FROM items WHERE id = $1", &[&id])
        .await
        .expect("read")
        .get(0)
}

/// Reads NEW serves run there as the client's own role, as they do on OLD
/// (`[auth] upstream_login = "client"`): a row-level security policy on NEW lets each role see
/// only its rows, as OLD's does. A role NEW refuses (no CONNECT on NEW's database) is answered
/// by OLD, and the session does not ask NEW again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_served_by_new_run_as_the_clients_own_role() {
    let alice = switchyard_test_support::TestRole::create("shift_alice", "LOGIN")
        .await
        .unwrap();
    let bob = switchyard_test_support::TestRole::create("shift_bob", "LOGIN")
        .await
        .unwrap();
    let schema = format!(
        "CREATE TABLE docs (id int PRIMARY KEY, owner text NOT NULL, body text NOT NULL);
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON docs USING (owner = current_user);
         GRANT SELECT ON docs TO {a}, {b};",
        a = alice.name,
        b = bob.name
    );
    let env = DualEnv::new("shift_role", &schema, vec![DualTable::new("public.docs")])
        .await
        .expect("dual env");
    let rows = format!(
        "INSERT INTO docs VALUES (1, '{a}', 'a1'), (2, '{b}', 'b2'), (3, '{a}', 'a3'), (4, 'carol', 'c4')",
        a = alice.name,
        b = bob.name
    );
    env.seed_old(&rows).await.unwrap();
    env.new.execute_batch(&rows).await.unwrap();
    env.new
        .execute_batch(&format!(
            "UPDATE docs SET body = body || ' {ON_NEW}';
             REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;
             GRANT CONNECT ON DATABASE {db} TO postgres, {a};",
            db = env.new.name(),
            a = alice.name
        ))
        .await
        .unwrap();
    let proxy = env
        .start_proxy(&env.read_shift_config(env.new.url(), 100))
        .await
        .unwrap();
    proxy
        .wait_for_read_lease("public.docs")
        .await
        .expect("read lease");
    let connect = |user: &str| {
        let url = proxy.url(user);
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
        }
    };
    let a = connect(&alice.name).await;
    let before = proxy.table_reads("public.docs").await.unwrap()["new"]
        .as_u64()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            docs_seen(&a).await,
            format!("1:a1 {ON_NEW},3:a3 {ON_NEW}"),
            "alice through NEW sees her rows only"
        );
    }
    let r = proxy.table_reads("public.docs").await.unwrap();
    assert!(r["new"].as_u64().unwrap() >= before + 6, "{r}");

    // bob may not connect to NEW's database: OLD answers, with his rows only.
    let b = connect(&bob.name).await;
    for _ in 0..3 {
        assert_eq!(docs_seen(&b).await, "2:b2", "bob is answered by OLD");
    }
    let r = proxy.table_reads("public.docs").await.unwrap();
    assert!(r["fallbacks"]["login"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["fallbacks"]["unavailable"], 0, "{r}");
    // alice still reads from NEW: a refused role does not stop NEW for the others.
    assert_eq!(docs_seen(&a).await, format!("1:a1 {ON_NEW},3:a3 {ON_NEW}"));
}

/// The rows of `docs` a session sees, by the simple and the extended protocol (which agree).
async fn docs_seen(c: &tokio_postgres::Client) -> String {
    let sql = "SELECT string_agg(id || ':' || body, ',' ORDER BY id) FROM docs";
    let simple = text_rows(c, sql).await;
    let extended: Option<String> = c.query_one(sql, &[]).await.unwrap().get(0);
    assert_eq!(simple, vec![extended.unwrap_or_default()], "simple vs extended");
    simple.concat()
}
