//! Table groups (`docs/cutover.md`, "Table groups"): two groups moved one at a time under a
//! continuous workload through two proxies. While one group's writes are NEW's and the other's
//! OLD's, each transaction runs on the store of the tables its first statement names (sessions
//! keep one connection to each store), every client reads its writes back at once, a transaction
//! that uses tables of both groups is refused with a clear error, each store is fenced for the
//! tables whose writes it does not take, and the stores end equal with nothing acknowledged
//! lost: cutover of one group, rollback, cutover again, cutover of the other, done.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, temp_config, text, wait_for_heartbeats};
use switchyard_test_support::{
    ClusterOptions, DualEnv, DualTable, ProxyConfig, TestCluster, TestDb, TestProxy,
};

const SCHEMA: &str = "CREATE TABLE items (id bigserial PRIMARY KEY, owner int NOT NULL, v int NOT NULL); \
                      CREATE TABLE orders (id bigserial PRIMARY KEY, owner int NOT NULL, v int NOT NULL);";

const TABLES: [&str; 2] = ["items", "orders"];

#[derive(Default)]
struct Tally {
    stage: Mutex<&'static str>,
    commits: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Every acknowledged row, per table, with its last acknowledged value.
    acked: Mutex<HashMap<(&'static str, i64), i32>>,
}

/// One client on one session for its whole life: alternately a transaction on `items` opened
/// with a lone BEGIN (the driver's `transaction()`), and an autocommit write on `orders`, each
/// write read back at once; stops at `stop` or after 3,000 writes.
async fn client(url: String, owner: i32, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let (mut c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let bump = c
        .prepare("UPDATE items SET v = $2 WHERE owner = $1 AND id = $3 RETURNING id")
        .await
        .unwrap();
    let mut mine: HashMap<&'static str, Vec<i64>> = HashMap::new();
    let mut n: i32 = 0;
    while !stop.load(Relaxed) && n < 3_000 {
        n += 1;
        let table = TABLES[n as usize % 2];
        let ids = mine.entry(table).or_default();
        let result: Result<(i64, i32), String> = async {
            let id = if ids.len() < 5 || n % 4 == 0 {
                None
            } else {
                Some(ids[n as usize % ids.len()])
            };
            let sql = match id {
                None => format!("INSERT INTO {table} (owner, v) VALUES ($1, $2) RETURNING id"),
                Some(id) => format!("UPDATE {table} SET v = $2 WHERE owner = $1 AND id = {id} RETURNING id"),
            };
            let got: i64 = if table == "items" {
                let t = c.transaction().await.map_err(|e| format!("begin: {e}"))?;
                // An update bound from a statement prepared once (Bind, Execute, Sync right
                // after the BEGIN), an insert prepared each time.
                let got = match id {
                    Some(id) => t.query_one(&bump, &[&owner, &n, &id]).await,
                    None => t.query_one(&sql, &[&owner, &n]).await,
                }
                .map_err(|e| format!("{table}: {}", db_error(&e)))?
                .get(0);
                let back: i32 = t
                    .query_one(&format!("SELECT v FROM {table} WHERE id = $1"), &[&got])
                    .await
                    .map_err(|e| format!("{table} read in the transaction: {e}"))?
                    .get(0);
                if back != n {
                    return Err(format!(
                        "{table} row {got}: wrote {n}, read {back} in the transaction"
                    ));
                }
                // Still the client's one transaction (not committed early by the proxy).
                let xid: Option<String> = t
                    .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
                    .await
                    .map_err(|e| format!("xid: {e}"))?
                    .get(0);
                if xid.is_none() {
                    return Err(format!(
                        "{table} row {got}: the transaction ended before its COMMIT"
                    ));
                }
                t.commit().await.map_err(|e| format!("commit: {e}"))?;
                got
            } else {
                c.query_one(&sql, &[&owner, &n])
                    .await
                    .map_err(|e| format!("{table}: {}", db_error(&e)))?
                    .get(0)
            };
            Ok((got, n))
        }
        .await;
        match result {
            Ok((id, v)) => {
                if !ids.contains(&id) {
                    ids.push(id);
                }
                tally.commits.fetch_add(1, Relaxed);
                tally.acked.lock().unwrap().insert((table, id), v);
                // Read back at once, autocommit: from whichever store the session is on.
                let back = c
                    .query_one(&format!("SELECT v FROM {table} WHERE id = $1"), &[&id])
                    .await
                    .map(|r| r.get::<_, i32>(0));
                if back.as_ref().ok() != Some(&v) {
                    let stage = *tally.stage.lock().unwrap();
                    tally.errors.lock().unwrap().push(format!(
                        "{table} row {id}: wrote {v}, read back {back:?} (around {stage})"
                    ));
                }
            }
            Err(e) => {
                let stage = *tally.stage.lock().unwrap();
                tally.errors.lock().unwrap().push(format!("{e} (around {stage})"));
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// A write that changes nothing, made directly on `db`: the SQLSTATE it is refused with.
async fn direct_write(db: &TestDb, table: &str) -> Option<String> {
    let c = db.client().await.unwrap();
    match c
        .batch_execute(&format!("UPDATE {table} SET v = v WHERE false"))
        .await
    {
        Ok(()) => None,
        Err(e) => e.code().map(|c| c.code().to_owned()),
    }
}

/// Which store refuses a direct write to each table (`25006`) and which takes it.
async fn fences(env: &DualEnv) -> Vec<(&'static str, &'static str, Option<String>)> {
    let mut out = Vec::new();
    for table in TABLES {
        for (store, db) in [("OLD", &env.old), ("NEW", &env.new)] {
            out.push((table, store, direct_write(db, table).await));
        }
    }
    out
}

fn fenced_on(table: &str, store: &str, seen: &[(&'static str, &'static str, Option<String>)]) -> bool {
    seen.iter()
        .find(|(t, s, _)| *t == table && *s == store)
        .is_some_and(|(_, _, code)| code.as_deref() == Some("25006"))
}

async fn verified_equal(cfg: &common::tempfile_path::TempPath, step: &str) {
    let out = cli(cfg, &["drift", "verify", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "verify after {step}: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in v.as_array().unwrap() {
        assert_eq!(t["differing"], 0, "verify after {step}: {v}");
    }
}

/// The SQLSTATE and message a statement gets through `proxy`, after `first` ran in the same
/// transaction (`None`: autocommit).
async fn refused(proxy: &TestProxy, first: Option<&str>, then: &str) -> (String, String) {
    let (c, conn) = tokio_postgres::connect(&proxy.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    if let Some(first) = first {
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(first).await.unwrap();
    }
    let e = c.batch_execute(then).await.expect_err(then);
    let db = e.as_db_error().expect("a server error");
    (db.code().code().to_owned(), db.message().to_owned())
}

async fn wait_commits(tally: &Tally, more: u64, what: &str) {
    let target = tally.commits.load(Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(15);
    while tally.commits.load(Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "the workload stalled after {what}; client errors: {:?}",
            tally.errors.lock().unwrap().iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CLI's config (each table in its group) and a proxy config to match, with `proxy_extra`
/// sections added to the proxy's.
fn grouped_configs(env: &DualEnv, proxy_extra: &str) -> (common::tempfile_path::TempPath, ProxyConfig) {
    let tables = "[[tables]]\nname = \"public.items\"\nphase = \"dual_write\"\ngroup = \"catalog\"\n\
                  [[tables]]\nname = \"public.orders\"\nphase = \"dual_write\"\ngroup = \"billing\"\n";
    let cfg = temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"trust\"\n\
         [control]\npoll_interval_ms = 200\n[telemetry]\nlog_level = \"warn\"\n{tables}",
        env.old.url(),
        env.new.url()
    ));
    let mut proxy_cfg = env.proxy_config();
    for s in &mut proxy_cfg.extra_sections {
        for (table, group) in [("items", "catalog"), ("orders", "billing")] {
            if s.contains(&format!("name = \"public.{table}\"")) {
                s.push_str(&format!("\ngroup = \"{group}\"\n"));
            }
        }
    }
    proxy_cfg.extra_sections.push(proxy_extra.to_owned());
    (cfg, proxy_cfg)
}

/// `switchyard ARGS`, which must succeed.
async fn cli_ok(cfg: &common::tempfile_path::TempPath, args: &[&str]) {
    let out = cli(cfg, args).await;
    assert_eq!(out.status.code(), Some(0), "switchyard {args:?}: {}", text(&out));
}

/// `switchyard phase --table TABLE --to TO --force --json`, which must succeed with `proxies`
/// proxies confirming.
async fn forced_phase(
    cfg: &common::tempfile_path::TempPath,
    table: &str,
    to: &str,
    proxies: u64,
    label: &str,
) {
    let out = cli(cfg, &["phase", "--table", table, "--to", to, "--json", "--force"]).await;
    assert_eq!(out.status.code(), Some(0), "{label}: {}", text(&out));
    let switched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(switched["proxies"], proxies, "{label}: {switched}");
}

/// Empty tables, both groups in `read_shift`, one proxy (polling every 200 ms), and the catalog
/// group (`items`) cut over: the config file and the proxy.
async fn catalog_cut_over(env: &DualEnv) -> (common::tempfile_path::TempPath, TestProxy) {
    let (cfg, proxy_cfg) = grouped_configs(env, "[control]\npoll_interval_ms = 200\n");
    cli_ok(&cfg, &["prepare"]).await;
    cli_ok(&cfg, &["backfill"]).await;
    for table in ["public.items", "public.orders"] {
        cli_ok(
            &cfg,
            &["phase", "--table", table, "--to", "read_shift", "--force"],
        )
        .await;
    }
    let p = env.start_proxy(&proxy_cfg).await.unwrap();
    wait_for_heartbeats(&env.old, 1).await;
    forced_phase(&cfg, "public.items", "cutover", 1, "catalog to NEW").await;
    (cfg, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_table_groups_move_one_at_a_time_under_a_workload_and_lose_nothing() {
    let env = DualEnv::new(
        "groups",
        SCHEMA,
        vec![DualTable::new("public.items"), DualTable::new("public.orders")],
    )
    .await
    .unwrap();
    env.seed_old(
        "INSERT INTO items (owner, v) SELECT 0, i FROM generate_series(1, 300) i; \
         INSERT INTO orders (owner, v) SELECT 0, i FROM generate_series(1, 300) i",
    )
    .await
    .unwrap();
    let (cfg, proxy_cfg) = grouped_configs(
        &env,
        "[control]\npoll_interval_ms = 200\n[mirror]\nrepair_interval_ms = 100\n",
    );
    cli_ok(&cfg, &["prepare"]).await;
    let a = env.start_proxy(&proxy_cfg).await.unwrap();
    let b = env.start_proxy(&proxy_cfg).await.unwrap();
    cli_ok(&cfg, &["backfill"]).await;
    for table in ["public.items", "public.orders"] {
        cli_ok(&cfg, &["phase", "--table", table, "--to", "read_shift"]).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for (i, p) in [&a, &b, &a, &b].iter().enumerate() {
        clients.push(tokio::spawn(client(
            p.url("postgres"),
            i as i32 + 1,
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }
    wait_commits(&tally, 50, "the start").await;

    // Before any move, nothing is fenced.
    assert!(fences(&env).await.iter().all(|(_, _, c)| c.is_none()));

    // (table named, phase, label, [(table, the store that takes its writes after)])
    type Move = (
        &'static str,
        &'static str,
        &'static str,
        [(&'static str, &'static str); 2],
    );
    let steps: [Move; 4] = [
        (
            "public.items",
            "cutover",
            "catalog to NEW",
            [("items", "NEW"), ("orders", "OLD")],
        ),
        (
            "public.items",
            "read_shift",
            "catalog back to OLD",
            [("items", "OLD"), ("orders", "OLD")],
        ),
        (
            "public.items",
            "cutover",
            "catalog to NEW again",
            [("items", "NEW"), ("orders", "OLD")],
        ),
        (
            "public.orders",
            "cutover",
            "billing to NEW",
            [("items", "NEW"), ("orders", "NEW")],
        ),
    ];
    for (table, to, label, owners) in steps {
        *tally.stage.lock().unwrap() = label;
        forced_phase(&cfg, table, to, 2, label).await;
        wait_commits(&tally, 100, label).await;
        verified_equal(&cfg, label).await;
        // Each store refuses direct writes to the tables whose writes the other takes.
        let seen = fences(&env).await;
        for (t, takes) in owners {
            let other = if takes == "NEW" { "OLD" } else { "NEW" };
            assert!(
                !fenced_on(t, takes, &seen),
                "{label}: {t} fenced on {takes}: {seen:?}"
            );
            assert!(
                fenced_on(t, other, &seen),
                "{label}: {t} not fenced on {other}: {seen:?}"
            );
        }
        if label == "catalog to NEW" {
            // Each proxy shows both stores taking writes, each for its group's tables.
            for p in [&a, &b] {
                let (_, body) = p.admin_get("/status").await.unwrap();
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let stores = &v["authority"]["stores"];
                assert_eq!(stores[0]["store"], "OLD", "{stores}");
                assert_eq!(
                    stores[0]["mirrored_tables"],
                    serde_json::json!(["public.orders"]),
                    "{stores}"
                );
                assert_eq!(stores[1]["store"], "NEW", "{stores}");
                assert_eq!(
                    stores[1]["mirrored_tables"],
                    serde_json::json!(["public.items"]),
                    "{stores}"
                );
                // Both engines' figures: in /status per store, in /metrics labelled `from`.
                for (i, from, to) in [(0, "OLD", "NEW"), (1, "NEW", "OLD")] {
                    let m = &stores[i]["mirror"];
                    assert_eq!(
                        (m["from"].as_str(), m["to"].as_str()),
                        (Some(from), Some(to)),
                        "{m}"
                    );
                    assert!(m["mirrored_transactions"].as_u64() > Some(0), "{m}");
                    assert_eq!(m["mirror_failures"], 0, "{m}");
                }
                let (_, metrics) = p.admin_get("/metrics").await.unwrap();
                for from in ["old", "new"] {
                    let line = metrics
                        .lines()
                        .find(|l| {
                            l.starts_with("switchyard_mirrored_transactions_total{")
                                && l.contains(&format!("from=\"{from}\""))
                        })
                        .unwrap_or_else(|| panic!("no mirrored transactions from {from}:\n{metrics}"));
                    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
                    assert!(n > 0.0, "{line}");
                }
            }
            // A transaction that uses both groups' tables is refused with a clear error, in
            // either order and in one statement; the session goes on.
            for (first, then) in [
                (
                    Some("UPDATE items SET v = v WHERE false"),
                    "UPDATE orders SET v = v WHERE false",
                ),
                (Some("SELECT count(*) FROM orders"), "SELECT count(*) FROM items"),
                (None, "SELECT count(*) FROM items JOIN orders USING (id)"),
                (
                    None,
                    "UPDATE items SET v = v WHERE false; UPDATE orders SET v = v WHERE false",
                ),
            ] {
                let (code, message) = refused(&a, first, then).await;
                assert_eq!(code, "0A000", "{first:?} then {then}: {message}");
                assert!(
                    message.contains("groups written on different databases"),
                    "{message}"
                );
            }
            // `switchyard sequences` moves each group's sequences from the store that takes its
            // writes: catalog's NEW to OLD (for a rollback), billing's OLD to NEW.
            let out = cli(&cfg, &["sequences", "--json"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let runs: Vec<(String, String, Vec<String>)> = report["runs"]
                .as_array()
                .unwrap_or_else(|| panic!("{report}"))
                .iter()
                .map(|r| {
                    let seqs = r["sequences"].as_array().unwrap();
                    (
                        r["from"].as_str().unwrap().to_owned(),
                        r["to"].as_str().unwrap().to_owned(),
                        seqs.iter()
                            .map(|m| m["sequence"].as_str().unwrap().to_owned())
                            .collect(),
                    )
                })
                .collect();
            assert_eq!(
                runs,
                [
                    (
                        "new".to_owned(),
                        "old".to_owned(),
                        vec!["public.items_id_seq".to_owned()]
                    ),
                    (
                        "old".to_owned(),
                        "new".to_owned(),
                        vec!["public.orders_id_seq".to_owned()]
                    ),
                ],
                "{report}"
            );
            // `done` ends the whole migration: refused while a group is not in cutover.
            let out = cli(&cfg, &["phase", "--table", "public.items", "--to", "done"]).await;
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            assert!(text(&out).contains("public.orders"), "{}", text(&out));
        }
    }
    stop.store(true, Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let errors = tally.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} client errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(tally.commits.load(Relaxed) > 400);
    verified_equal(&cfg, "the last move").await;
    let acked = tally.acked.lock().unwrap().clone();
    for db in [&env.old, &env.new] {
        let c = db.client().await.unwrap();
        for table in TABLES {
            let rows = c.query(&format!("SELECT id, v FROM {table}"), &[]).await.unwrap();
            let found: HashMap<i64, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            for ((t, id), v) in &acked {
                if *t == table {
                    assert_eq!(found.get(id), Some(v), "{table} row {id} on {}", db.name());
                }
            }
        }
    }
    // Every table is in cutover: `done` moves them all together.
    let out = cli(
        &cfg,
        &["phase", "--table", "public.orders", "--to", "done", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "done: {}", text(&out));
    let c = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c.1);
    c.0.batch_execute(
        "BEGIN; UPDATE items SET v = v + 1 WHERE id = 1; UPDATE orders SET v = v + 1 WHERE id = 1; COMMIT",
    )
    .await
    .expect("after done one store takes every write again");
}

/// A session that moved to NEW for a table of the group cut over and back to OLD for the other
/// group's table: the client's cancel request (which names the session's first backend) stops the
/// query on the backend that runs it, on OLD after moving back and on NEW after moving there
/// again. NEW is a cluster of its own, so a cancel sent to the wrong server does nothing. Failed
/// before this change: each move registered the client's key again and then dropped the guard of
/// the earlier registration, which removed the key, so every cancel after a move (at any cutover,
/// groups or not) was dropped as unknown. (Before 8cf8dab a connection parked and taken back also
/// kept the other server's address.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_moves_between_groups_stops_the_query_where_it_runs() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let env = DualEnv::new_with_new_admin(
        "groups_cancel",
        SCHEMA,
        vec![DualTable::new("public.items"), DualTable::new("public.orders")],
        &cluster.url("postgres"),
    )
    .await
    .unwrap();
    let (_cfg, p) = catalog_cut_over(&env).await;

    let (c, conn) = tokio_postgres::connect(&p.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let old_port = env
        .old
        .query_i64("SELECT current_setting('port')::int8")
        .await
        .unwrap()
        .to_string();
    let new_port = cluster.port().to_string();
    assert_ne!(old_port, new_port);
    // OLD (the session's first backend), NEW, back to OLD: the connection parked there.
    for (table, port) in [("orders", &old_port), ("items", &new_port), ("orders", &old_port)] {
        let sql = format!("SELECT current_setting('port') FROM (SELECT count(*) FROM {table}) t");
        let row = c.query_one(&sql, &[]).await.expect(&sql);
        assert_eq!(&row.get::<_, String>(0), port, "{table}");
    }
    let token = c.cancel_token();
    for (table, store) in [("orders", "OLD"), ("items", "NEW")] {
        let sleeper = format!("SELECT pg_sleep(30) FROM (SELECT count(*) FROM {table}) t");
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                token.cancel_query(tokio_postgres::NoTls).await
            })
        };
        let started = Instant::now();
        let e = c.batch_execute(&sleeper).await.expect_err("cancelled");
        canceller.await.unwrap().unwrap();
        assert_eq!(
            e.code().map(|c| c.code()),
            Some("57014"),
            "the query on {store} was not cancelled: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}

/// A session that prepared statements and dropped them with `DEALLOCATE` (simple protocol, one
/// name) and `DEALLOCATE ALL` (prepared and bound, as pgjdbc runs it) prepares the same names
/// anew after moving to the other store, as it could on one server. Failed before this change:
/// the move prepared the dropped statements again on the other store, and the client's Parse of
/// the same name was refused there with 42P05 (prepared statement already exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_the_client_deallocated_are_not_prepared_again_by_a_move() {
    use switchyard_test_support::wire::{Frontend, RawConn};
    let env = DualEnv::new(
        "groups_dealloc",
        SCHEMA,
        vec![DualTable::new("public.items"), DualTable::new("public.orders")],
    )
    .await
    .unwrap();
    let (_cfg, p) = catalog_cut_over(&env).await;

    let (mut c, _) = RawConn::login(p.addr, "postgres", env.old.name()).await.unwrap();
    // Each step: what it is, and its messages (answered with one ReadyForQuery).
    let steps: Vec<(&str, Frontend)> = vec![
        ("prepare two on OLD", {
            let mut f = Frontend::new();
            f.parse("S_1", "SELECT count(*) FROM orders", &[])
                .parse("S_2", "SELECT count(*) FROM orders WHERE v > 0", &[])
                .sync();
            f
        }),
        ("DEALLOCATE one", {
            let mut f = Frontend::new();
            f.query(r#"DEALLOCATE "S_1""#);
            f
        }),
        ("move to NEW", {
            let mut f = Frontend::new();
            f.query("SELECT count(*) FROM items");
            f
        }),
        ("prepare S_1 again on NEW", {
            let mut f = Frontend::new();
            f.parse("S_1", "SELECT count(*) FROM items", &[]).sync();
            f
        }),
        ("DEALLOCATE ALL, prepared and bound", {
            let mut f = Frontend::new();
            f.parse("S_3", "DEALLOCATE ALL", &[])
                .bind("", "S_3", &[], &[], &[])
                .execute("", 0)
                .sync();
            f
        }),
        ("move back to OLD", {
            let mut f = Frontend::new();
            f.query("SELECT count(*) FROM orders");
            f
        }),
        ("prepare every name again on OLD", {
            let mut f = Frontend::new();
            f.parse("S_1", "SELECT 1 FROM orders", &[])
                .parse("S_2", "SELECT 2 FROM orders", &[])
                .parse("S_3", "SELECT 3 FROM orders", &[])
                .sync();
            f
        }),
        ("on to NEW", {
            let mut f = Frontend::new();
            f.parse("S_4", "SELECT 4 FROM items", &[])
                .bind("", "S_4", &[], &[], &[])
                .execute("", 0)
                .sync();
            f
        }),
    ];
    for (what, f) in steps {
        c.send(f.bytes()).await.unwrap();
        let answer = c.read_until_ready(1).await.unwrap();
        let errors: Vec<String> = answer
            .iter()
            .filter(|m| m.tag == b'E')
            .map(|m| format!("{:?} {:?}", m.code(), m.field(b'M')))
            .collect();
        assert!(errors.is_empty(), "{what}: {errors:?}");
    }
}
