//! The operator's journey through the CLI under a continuous client workload through two
//! proxies, its sessions renewed as a pool does: passthrough, dual writes started at run time,
//! backfill, drift sample, shadow_read, read_shift at 10, 50 and 100%, cutover (write authority
//! moves to NEW under the barrier), rollback to read_shift (back to OLD), cutover again, done,
//! cleanup. A full `drift verify` finds 0 differing keys after every step from the backfill on;
//! no client error from any phase change; every client reads its own writes back at once and
//! never reads another client's row older than what was acknowledged before its read began; no
//! acknowledged write lost; nothing of Switchyard left after cleanup. Also: a proxy killed
//! during the barrier, a barrier aborted by a transaction held open, and dual writes started at
//! run time from passthrough while sessions from before stay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, temp_config, text, wait_for_heartbeats};
use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};

const SCHEMA: &str = "CREATE TABLE items (id bigserial PRIMARY KEY, owner int NOT NULL, v int NOT NULL);";

#[derive(Default)]
struct Tally {
    /// The phase the journey is moving to (for the errors).
    stage: Mutex<&'static str>,
    /// OLD's and NEW's URLs.
    stores: Vec<String>,
    commits: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Every acknowledged row and its last acknowledged value.
    acked: Mutex<std::collections::HashMap<i64, i32>>,
    /// Reads of other clients' rows checked.
    reads: AtomicU64,
    /// A new session every this many writes (0: one session for the client's life).
    reconnect_every: i32,
}

/// One client: inserts rows and updates its own, reading each write back at once, then reads
/// a row another client wrote and checks it is not older than what was acknowledged before the
/// read began (so reads never go back past an acknowledged write, through either proxy and from
/// either store); stops at `stop` or after 2,000 writes. With `Tally::reconnect_every`, it
/// opens a new session every that many writes, as a pool with a connection lifetime does.
async fn client(url: String, owner: i32, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut session: Option<tokio_postgres::Client> = None;
    let mut mine: Vec<i64> = Vec::new();
    let mut n: i32 = 0;
    while !stop.load(Relaxed) && n < 2_000 {
        n += 1;
        let every = tally.reconnect_every;
        if every > 0 && n % every == 0 {
            session = None;
        }
        let c = match &session {
            Some(c) => c,
            None => {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                session.insert(c)
            }
        };
        let result: Result<(), String> = async {
            let (id, v) = if mine.len() < 5 || n % 3 == 0 {
                let id: i64 = c
                    .query_one(
                        "INSERT INTO items (owner, v) VALUES ($1, $2) RETURNING id",
                        &[&owner, &n],
                    )
                    .await
                    .map_err(|e| format!("insert: {e}"))?
                    .get(0);
                mine.push(id);
                (id, n)
            } else {
                let id = mine[n as usize % mine.len()];
                let t = c
                    .execute("UPDATE items SET v = $2 WHERE id = $1", &[&id, &n])
                    .await;
                if t.map_err(|e| format!("update: {e}"))? != 1 {
                    return Err(format!("update of {id} found no row"));
                }
                (id, n)
            };
            tally.commits.fetch_add(1, Relaxed);
            tally.acked.lock().unwrap().insert(id, v);
            let back = read_v(c, id).await?;
            if back != v {
                return Err(format!(
                    "row {id}: wrote {v}, read {back}; OLD and NEW hold {:?}",
                    where_is(&tally, id).await
                ));
            }
            // Another client's row: its values only grow, so an older one is a stale read.
            let other = {
                let acked = tally.acked.lock().unwrap();
                let theirs: Vec<(i64, i32)> = acked
                    .iter()
                    .filter(|(id, _)| !mine.contains(id))
                    .map(|(id, v)| (*id, *v))
                    .take(64)
                    .collect();
                theirs.get(n as usize % theirs.len().max(1)).copied()
            };
            if let Some((id, floor)) = other {
                let seen = read_v(c, id).await?;
                tally.reads.fetch_add(1, Relaxed);
                if seen < floor {
                    return Err(format!(
                        "row {id}: read {seen} after {floor} was acknowledged; OLD and NEW hold {:?}",
                        where_is(&tally, id).await
                    ));
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let stage = *tally.stage.lock().unwrap();
            tally.errors.lock().unwrap().push(format!("{e} (around {stage})"));
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

async fn read_v(c: &tokio_postgres::Client, id: i64) -> Result<i32, String> {
    Ok(c.query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .map_err(|e| format!("read of {id}: {e}"))?
        .get(0))
}

/// Row `id`'s value on each store, to tell which store served a stale read.
async fn where_is(tally: &Tally, id: i64) -> Vec<i32> {
    let mut on = Vec::new();
    for url in &tally.stores {
        if let Ok((d, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            if let Ok(r) = d.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await {
                on.push(r.get::<_, i32>(0));
            }
        }
    }
    on
}

/// Stops the clients and checks none saw an error.
async fn stop_clients(stop: &AtomicBool, clients: Vec<tokio::task::JoinHandle<()>>, tally: &Tally) {
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
}

/// A write that changes nothing, made directly on `db` as an application or a stale proxy's
/// session would: the SQLSTATE it is refused with, if it is.
async fn direct_write(db: &TestDb) -> Option<String> {
    let c = db.client().await.unwrap();
    match c.batch_execute("UPDATE items SET v = v WHERE false").await {
        Ok(()) => None,
        Err(e) => {
            if let Some(db_error) = e.as_db_error() {
                assert!(
                    db_error
                        .message()
                        .contains("Switchyard moved its write authority"),
                    "{db_error:?}"
                );
            }
            e.code().map(|c| c.code().to_owned())
        }
    }
}

/// Waits (20 s at most) until OLD and NEW hold the same rows of `items`.
async fn stores_equal(env: &DualEnv) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match env.diff("public.items").await {
            Ok((only_old, only_new)) if only_old.is_empty() && only_new.is_empty() => return,
            other => assert!(Instant::now() < deadline, "stores differ: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn authority(proxy: &TestProxy) -> serde_json::Value {
    let (_, body) = proxy.admin_get("/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["authority"].clone()
}

/// Waits until `proxy` writes to `store`.
async fn writes_to(proxy: &TestProxy, store: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while authority(proxy).await["writes_to"] != store {
        assert!(
            Instant::now() < deadline,
            "proxy still writes elsewhere: {}",
            authority(proxy).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `switchyard drift verify`: every row of OLD compared with NEW's (keys still racing a write
/// read again); the journey requires 0 differing keys at each step.
async fn verified_equal(cfg: &common::tempfile_path::TempPath, step: &str) {
    let out = cli(cfg, &["drift", "verify", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "verify after {step}: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["differing"], 0, "verify after {step}: {v}");
    assert!(v[0]["rows_old"].as_u64().unwrap() >= 500, "{v}");
}

/// Waits until every proxy's `/status` shows `public.items` with `field` = `value`.
async fn tables_show(proxies: &[&TestProxy], field: &str, value: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in proxies {
        loop {
            let (_, body) = p.admin_get("/status").await.unwrap();
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            if status["tables"][0][field] == value {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a proxy never showed {field} = {value}: {}",
                status["tables"][0]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journey_through_cutover_rollback_cutover_again_and_done_loses_nothing() {
    let env = DualEnv::new("journey", SCHEMA, vec![DualTable::new("public.items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (owner, v) SELECT 0, i FROM generate_series(1, 500) i")
        .await
        .unwrap();
    let sections = "[auth]\nmethod = \"trust\"\n[control]\npoll_interval_ms = 200\n\
                    [telemetry]\nlog_level = \"warn\"\n";
    let cfg = temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n{sections}\
         [[tables]]\nname = \"public.items\"\nphase = \"passthrough\"\n",
        env.old.url(),
        env.new.url()
    ));
    let run = |args: &'static [&'static str]| {
        let cfg = &cfg;
        async move {
            let out = cli(cfg, args).await;
            assert_eq!(out.status.code(), Some(0), "switchyard {args:?}: {}", text(&out));
            text(&out)
        }
    };
    run(&["prepare"]).await;
    let mut proxy_cfg = env.proxy_config();
    for s in &mut proxy_cfg.extra_sections {
        *s = s.replace("phase = \"dual_write\"", "phase = \"passthrough\"");
    }
    proxy_cfg
        .extra_sections
        .push("[control]\npoll_interval_ms = 200\n[mirror]\nrepair_interval_ms = 100\n".to_owned());
    let a = env.start_proxy(&proxy_cfg).await.unwrap();
    let b = env.start_proxy(&proxy_cfg).await.unwrap();

    // The application runs from the start, through both proxies, its sessions renewed as a
    // pool does (the sessions from before dual writes relay plainly until they end).
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally {
        stores: vec![env.old.url().to_owned(), env.new.url().to_owned()],
        reconnect_every: 50,
        ..Tally::default()
    });
    let mut clients = Vec::new();
    for (i, p) in [&a, &b, &a, &b].iter().enumerate() {
        clients.push(tokio::spawn(client(
            p.url("postgres"),
            i as i32 + 1,
            Arc::clone(&stop),
            Arc::clone(&tally),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    *tally.stage.lock().unwrap() = "dual_write";
    run(&["phase", "--table", "public.items", "--to", "dual_write"]).await;
    tables_show(&[&a, &b], "mirrored", true.into()).await;
    run(&["backfill"]).await;
    verified_equal(&cfg, "backfill").await;

    // A drift sample under the workload finds nothing either.
    let out = cli(&cfg, &["drift", "sample", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "drift sample: {}", text(&out));
    let sample: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sample[0]["differing"], 0, "{sample}");

    *tally.stage.lock().unwrap() = "shadow_read";
    run(&["phase", "--table", "public.items", "--to", "shadow_read"]).await;
    tables_show(&[&a, &b], "phase", "shadow_read".into()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    verified_equal(&cfg, "shadow_read").await;

    *tally.stage.lock().unwrap() = "read_shift";
    run(&["phase", "--table", "public.items", "--to", "read_shift"]).await;
    for (share, label) in [
        ("10", "read_shift 10"),
        ("50", "read_shift 50"),
        ("100", "read_shift 100"),
    ] {
        *tally.stage.lock().unwrap() = label;
        let out = cli(&cfg, &["shift", "--table", "public.items", "--reads", share]).await;
        assert_eq!(out.status.code(), Some(0), "shift {share}: {}", text(&out));
        tables_show(&[&a, &b], "read_share", share.parse::<u64>().unwrap().into()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The verify is also the fresh drift result the next share's guard rail asks for.
        verified_equal(&cfg, label).await;
    }
    // Reads were served by NEW (sessions renewed since the share rose drew again).
    let served: u64 = {
        let mut n = 0;
        for p in [&a, &b] {
            n += p.table_reads("public.items").await.unwrap()["new"]
                .as_u64()
                .unwrap();
        }
        n
    };
    assert!(served > 0, "no read served by NEW");

    for (to, store) in [("cutover", "NEW"), ("read_shift", "OLD"), ("cutover", "NEW")] {
        *tally.stage.lock().unwrap() = to;
        let before = tally.commits.load(Relaxed);
        // Forced: the unconfigured-writes rail needs minutes of observed write counters (its
        // own test is in cutover.rs); the other rails pass.
        let out = cli(
            &cfg,
            &[
                "phase",
                "--table",
                "public.items",
                "--to",
                to,
                "--json",
                "--force",
            ],
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "phase --to {to}: {}", text(&out));
        let switched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(switched["authority"], store, "{switched}");
        assert_eq!(switched["proxies"], 2, "{switched}");
        if to == "cutover" {
            let overridden = switched["overridden"].to_string();
            assert!(
                overridden.contains("not configured") && !overridden.contains("drift"),
                "{switched}"
            );
        }
        writes_to(&a, store).await;
        writes_to(&b, store).await;
        // The workload goes on under the new authority.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tally.commits.load(Relaxed) < before + 50 {
            assert!(
                Instant::now() < deadline,
                "the workload stalled after moving to {to}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pause = authority(&a).await["last_pause_seconds"].as_f64().unwrap();
        assert!(pause > 0.0 && pause < 5.0, "pause {pause}");
        verified_equal(&cfg, to).await;
        // The store that lost the writes refuses any other writer (a proxy that missed the
        // barrier would write through a connection like this one); the other takes them.
        let (lost, kept) = if store == "NEW" {
            (&env.old, &env.new)
        } else {
            (&env.new, &env.old)
        };
        assert_eq!(
            direct_write(lost).await.as_deref(),
            Some("25006"),
            "{} after {to}",
            lost.name()
        );
        assert_eq!(direct_write(kept).await, None, "{} after {to}", kept.name());
    }
    stop_clients(&stop, clients, &tally).await;
    assert!(tally.commits.load(Relaxed) > 150);
    assert!(tally.reads.load(Relaxed) > 100, "other clients' rows read");

    // Every acknowledged write is on both stores with its value, and the stores are equal.
    stores_equal(&env).await;
    let acked = tally.acked.lock().unwrap().clone();
    for db in [&env.old, &env.new] {
        let c = db.client().await.unwrap();
        let ids: Vec<i64> = acked.keys().copied().collect();
        let rows = c
            .query("SELECT id, v FROM items WHERE id = ANY($1)", &[&ids])
            .await
            .unwrap();
        let found: std::collections::HashMap<i64, i32> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (id, v) in &acked {
            assert_eq!(found.get(id), Some(v), "row {id} on {}", db.name());
        }
    }

    // Done under a workload: NEW keeps the writes, OLD is left behind, nobody sees an error;
    // then cleanup leaves no Switchyard object on either store.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            tokio::spawn(client(
                p.url("postgres"),
                10 + i as i32,
                Arc::clone(&stop),
                Arc::clone(&tally),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = cli(&cfg, &["cleanup"]).await;
    assert_eq!(out.status.code(), Some(1), "cleanup before done: {}", text(&out));
    let out = cli(
        &cfg,
        &["phase", "--table", "public.items", "--to", "done", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "phase --to done: {}", text(&out));
    let before = tally.commits.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.commits.load(Relaxed) < before + 50 {
        assert!(Instant::now() < deadline, "the workload stalled after done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_clients(&stop, clients, &tally).await;
    let on_new = env.new.client().await.unwrap();
    let last: i64 = on_new
        .query_one("SELECT max(id) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    let on_old = env.old.client().await.unwrap();
    let last_old: i64 = on_old
        .query_one("SELECT max(id) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        last > last_old,
        "writes after done reach NEW only ({last} vs {last_old})"
    );
    assert_eq!(
        direct_write(&env.old).await.as_deref(),
        Some("25006"),
        "OLD after done"
    );
    drop(a);
    drop(b);
    let out = cli(&cfg, &["cleanup"]).await;
    assert_eq!(out.status.code(), Some(0), "cleanup: {}", text(&out));
    assert_eq!(
        direct_write(&env.old).await,
        None,
        "OLD after cleanup: fence removed"
    );
    for c in [&on_old, &on_new] {
        let left: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'switchyard'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0);
    }
}

/// OLD and NEW with `items` backfilled and verified, in `read_shift`; the config file (polls
/// every 200 ms, barriers time out after `barrier_ms`).
async fn ready_for_cutover(label: &str, barrier_ms: u64) -> (DualEnv, common::tempfile_path::TempPath) {
    let env = DualEnv::new(label, SCHEMA, vec![DualTable::new("public.items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (owner, v) SELECT 0, i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let cfg = temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"trust\"\n\
         [control]\npoll_interval_ms = 200\nbarrier_timeout_ms = {barrier_ms}\n\
         [telemetry]\nlog_level = \"warn\"\n\
         [[tables]]\nname = \"public.items\"\nphase = \"dual_write\"\n",
        env.old.url(),
        env.new.url()
    ));
    for args in [
        &["prepare"][..],
        &["backfill"],
        &["drift", "verify"],
        &["phase", "--table", "public.items", "--to", "read_shift"],
    ] {
        let out = cli(&cfg, args).await;
        assert_eq!(out.status.code(), Some(0), "switchyard {args:?}: {}", text(&out));
    }
    (env, cfg)
}

/// One proxy of `env` following the control state every 200 ms.
async fn polling_proxy(env: &DualEnv) -> TestProxy {
    let mut proxy_cfg = env.proxy_config();
    proxy_cfg
        .extra_sections
        .push("[control]\npoll_interval_ms = 200\n".to_owned());
    env.start_proxy(&proxy_cfg).await.unwrap()
}

/// `switchyard phase --to cutover --force --json` (the rails forced: the unconfigured-writes
/// window is not observed in a short test).
async fn forced_cutover(cfg: &common::tempfile_path::TempPath) -> std::process::Output {
    cli(
        cfg,
        &[
            "phase",
            "--table",
            "public.items",
            "--to",
            "cutover",
            "--force",
            "--json",
        ],
    )
    .await
}

/// `switchyard phase --to cutover --force`, which must fail: what it said.
async fn refused_cutover(cfg: &common::tempfile_path::TempPath) -> String {
    let out = cli(
        cfg,
        &["phase", "--table", "public.items", "--to", "cutover", "--force"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    text(&out)
}

/// A proxy of `env` as a process of its own (so a test can kill or pause it), following the
/// control state every 200 ms; and the URL of OLD's database through it.
fn proxy_process(env: &DualEnv) -> (common::Proxy, String) {
    let p = common::start_proxy_with(
        &env.old,
        &env.new,
        "",
        "[auth]\nmethod = \"trust\"\n[control]\npoll_interval_ms = 200\n\
         [telemetry]\nlog_level = \"warn\"\n\
         [[tables]]\nname = \"public.items\"\nphase = \"dual_write\"\n",
        std::process::Stdio::null(),
    );
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", p.port, env.old.name());
    (p, url)
}

/// A client at `url` in a transaction that wrote row 1 and stays open.
async fn hold_a_write(url: &str) -> tokio_postgres::Client {
    let (held, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    held.batch_execute("BEGIN; UPDATE items SET v = -1 WHERE id = 1")
        .await
        .unwrap();
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_during_the_barrier_does_not_hold_it_up() {
    let (env, cfg) = ready_for_cutover("journey_kill", 20_000).await;
    let a = polling_proxy(&env).await;
    // Proxy B is a process of its own, with a client holding a write transaction open: B
    // cannot confirm the barrier until it dies.
    let (mut b, b_url) = proxy_process(&env);
    let held = hold_a_write(&b_url).await;
    wait_for_heartbeats(&env.old, 2).await;

    let started = Instant::now();
    let (out, ()) = tokio::join!(forced_cutover(&cfg), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.child.kill().unwrap();
        b.child.wait().unwrap();
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let switched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(switched["authority"], "NEW", "{switched}");
    // Only A confirmed; the barrier went on once B's heartbeat was too old.
    assert_eq!(switched["proxies"], 1, "{switched}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // B's transaction died with B; A writes to NEW and the stores agree.
    assert!(held.batch_execute("COMMIT").await.is_err());
    writes_to(&a, "NEW").await;
    let c = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c.1);
    let id: i64 =
        c.0.query_one("INSERT INTO items (owner, v) VALUES (9, 9) RETURNING id", &[])
            .await
            .unwrap()
            .get(0);
    assert!(id > 100, "{id}");
    let (only_old, only_new) = env.diff("public.items").await.unwrap();
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "{only_old:?} {only_new:?}"
    );
    let v: i32 = env
        .old
        .client()
        .await
        .unwrap()
        .query_one("SELECT v FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1, "the killed proxy's uncommitted write must not be anywhere");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_not_confirmed_in_time_is_aborted_and_writes_go_on_where_they_were() {
    let (env, cfg) = ready_for_cutover("journey_abort", 1_500).await;
    let a = polling_proxy(&env).await;
    let held = hold_a_write(&a.url("postgres")).await;
    wait_for_heartbeats(&env.old, 1).await;
    let out = refused_cutover(&cfg).await;
    assert!(out.contains("did not confirm"), "{out}");
    // Nothing moved: the open transaction commits on OLD, new writes go to OLD, mirrored.
    held.batch_execute("COMMIT").await.unwrap();
    let status = authority(&a).await;
    assert_eq!(status["writes_to"], "OLD", "{status}");
    assert!(status["held_for_barrier"].is_null(), "{status}");
    held.batch_execute("INSERT INTO items (owner, v) VALUES (7, 7)")
        .await
        .unwrap();
    let (only_old, only_new) = env.diff("public.items").await.unwrap();
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "{only_old:?} {only_new:?}"
    );
    let phase: String = env
        .old
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT phase FROM switchyard.switchyard_control WHERE table_name = 'public.items'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(phase, "read_shift");
    let barriers: i64 = env
        .old
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM switchyard.switchyard_barrier", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(barriers, 0);
}

/// A proxy paused through the whole barrier (SIGSTOP: its heartbeat goes stale and the barrier
/// completes without it) wakes up still sending writes to OLD. Its sessions' writes, here one
/// the statement analysis cannot see (dynamic SQL in a function: only OLD's capture trigger
/// would have caught it, and the barrier removed it), are refused by OLD's fence, or reach NEW
/// if the proxy caught up first; none commits on OLD alone. Without the fence such a write
/// commits on OLD only: acknowledged, and missing from NEW, the authoritative store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_paused_through_the_barrier_cannot_write_behind_it() {
    let (env, cfg) = ready_for_cutover("journey_paused", 20_000).await;
    for db in [&env.old, &env.new] {
        db.client()
            .await
            .unwrap()
            .batch_execute(
                "CREATE FUNCTION nudge(i bigint) RETURNS void LANGUAGE plpgsql AS $$ BEGIN \
                 EXECUTE format('UPDATE %I SET v = v + 1000 WHERE id = $1', 'it' || 'ems') USING i; \
                 END $$",
            )
            .await
            .unwrap();
    }
    let _a = polling_proxy(&env).await;
    let (mut b, b_url) = proxy_process(&env);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (c, conn) = tokio_postgres::connect(&b_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute("SELECT 1").await.unwrap();
        clients.push(c);
    }
    let before: Vec<i32> = {
        let c = env.old.client().await.unwrap();
        let rows = c
            .query("SELECT v FROM items WHERE id BETWEEN 1 AND 4 ORDER BY id", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    wait_for_heartbeats(&env.old, 2).await;

    common::signal(&b.child, "-STOP");
    let out = forced_cutover(&cfg).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let switched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(switched["proxies"], 1, "B was paused: {switched}");
    // B's sessions send their writes while it is still paused; it reads them when it wakes.
    let writes: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                let r = c.execute("SELECT nudge($1)", &[&(i as i64 + 1)]).await;
                (
                    c,
                    r.map(|_| ()).map_err(|e| e.code().map(|c| c.code().to_owned())),
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    common::signal(&b.child, "-CONT");
    let mut outcomes = Vec::new();
    for w in writes {
        let (_c, r) = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("B answered")
            .unwrap();
        outcomes.push(r);
    }
    eprintln!("writes through the paused proxy: {outcomes:?}");
    for r in &outcomes {
        if let Err(code) = r {
            assert_eq!(code.as_deref(), Some("25006"), "{outcomes:?}");
        }
    }
    // Every acknowledged write is on NEW, the authoritative store; the stores agree.
    let on_new = env.new.client().await.unwrap();
    let rows = on_new
        .query("SELECT v FROM items WHERE id BETWEEN 1 AND 4 ORDER BY id", &[])
        .await
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        let v: i32 = r.get(0);
        let expected = before[i] + if outcomes[i].is_ok() { 1000 } else { 0 };
        assert_eq!(v, expected, "row {} on NEW; outcomes {outcomes:?}", i + 1);
    }
    stores_equal(&env).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
}

/// A barrier that fails after the capture moved and OLD was fenced (here: NEW's sequence cannot
/// go past OLD's) puts both back: OLD takes writes again, unfenced and capturing, NEW stays
/// unfenced, and nothing diverges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_failing_after_the_fence_puts_capture_and_fence_back() {
    let (env, cfg) = ready_for_cutover("journey_unfence", 5_000).await;
    env.new
        .client()
        .await
        .unwrap()
        .batch_execute("ALTER SEQUENCE items_id_seq MAXVALUE 50")
        .await
        .unwrap();
    let a = polling_proxy(&env).await;
    wait_for_heartbeats(&env.old, 1).await;
    let out = refused_cutover(&cfg).await;
    assert!(out.contains("moving the sequences"), "{out}");
    assert_eq!(direct_write(&env.old).await, None, "OLD is not left fenced");
    assert_eq!(direct_write(&env.new).await, None, "NEW is not fenced");
    // OLD still captures: a write through the proxy reaches NEW.
    let (c, conn) = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute("INSERT INTO items (owner, v) VALUES (8, 8)")
        .await
        .unwrap();
    let status = authority(&a).await;
    assert_eq!(status["writes_to"], "OLD", "{status}");
    let (only_old, only_new) = env.diff("public.items").await.unwrap();
    assert!(
        only_old.is_empty() && only_new.is_empty(),
        "{only_old:?} {only_new:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_writes_start_at_run_time_from_passthrough_and_converge() {
    let env = DualEnv::new("journey_start", SCHEMA, vec![DualTable::new("public.items")])
        .await
        .unwrap();
    env.seed_old("INSERT INTO items (owner, v) SELECT 0, i FROM generate_series(1, 300) i")
        .await
        .unwrap();
    let cfg = temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"trust\"\n\
         [control]\npoll_interval_ms = 200\nbarrier_timeout_ms = 1500\n[telemetry]\nlog_level = \"warn\"\n\
         [[tables]]\nname = \"public.items\"\nphase = \"passthrough\"\n",
        env.old.url(),
        env.new.url()
    ));
    let out = cli(&cfg, &["prepare"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut proxy_cfg = env.proxy_config();
    for s in &mut proxy_cfg.extra_sections {
        *s = s.replace("phase = \"dual_write\"", "phase = \"passthrough\"");
    }
    proxy_cfg.extra_sections.push(
        "[control]\npoll_interval_ms = 200\n[mirror]\nstale_intent_secs = 1\nrepair_interval_ms = 100\n"
            .to_owned(),
    );
    let a = env.start_proxy(&proxy_cfg).await.unwrap();
    // Clients connected before the change: their sessions relay plainly, and keep doing so.
    let (plain, conn) = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let plain_conn = tokio::spawn(conn);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally {
        stores: vec![env.old.url().to_owned(), env.new.url().to_owned()],
        ..Tally::default()
    });
    let clients: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(client(
                a.url("postgres"),
                20 + i,
                Arc::clone(&stop),
                Arc::clone(&tally),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let out = cli(&cfg, &["phase", "--table", "public.items", "--to", "dual_write"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The proxy mirrors the table from now on: a new session's write is on NEW at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = a.admin_get("/status").await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if status["tables"][0]["mirrored"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never started mirroring: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fresh, conn) = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let id: i64 = fresh
        .query_one("INSERT INTO items (owner, v) VALUES (99, 99) RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    let on_new = env.new.client().await.unwrap();
    let mirrored = on_new
        .query_opt("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(
        mirrored.map(|r| r.get::<_, i32>(0)),
        Some(99),
        "mirrored before COMMIT was answered"
    );

    // The rows from before, by the backfill; the old sessions' writes, by the trigger's net and
    // the repair loop. Then both stores are equal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = cli(&cfg, &["backfill"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    stop_clients(&stop, clients, &tally).await;
    assert!(tally.commits.load(Relaxed) > 20);
    stores_equal(&env).await;
    let out = cli(&cfg, &["drift", "verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A session that relays plainly (connected before dual writes started) cannot move to NEW:
    // a cutover waits for it and is aborted while it stays; once it is gone the cutover goes.
    plain.batch_execute("SELECT 1").await.unwrap();
    let out = cli(&cfg, &["phase", "--table", "public.items", "--to", "read_shift"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Nor may reads move to NEW while it lasts: its writes reach NEW only by repair, so a read
    // from NEW right after one could miss it. The refusal names the proxy and the count.
    let out = cli(&cfg, &["shift", "--table", "public.items", "--reads", "10"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("1 session relays plainly since before dual writes started"),
        "{}",
        text(&out)
    );
    let out = cli(
        &cfg,
        &["phase", "--table", "public.items", "--to", "cutover", "--force"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("relay plainly"), "{}", text(&out));
    drop(plain);
    let _ = plain_conn.await;
    drop(fresh);
    // Once the proxy's next heartbeat says the session is gone, reads may move.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cli(&cfg, &["shift", "--table", "public.items", "--reads", "10"]).await;
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline && text(&out).contains("plainly since before dual writes"),
            "{}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = cli(
        &cfg,
        &["phase", "--table", "public.items", "--to", "cutover", "--force"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// Sessions through a cutover with state on their server: one listening on a channel goes on
/// listening on NEW; one holding a session-level advisory lock, and one holding a temporary
/// table, are ended with a clear error at their next statement (their state cannot move, and
/// going on without it would release the lock under the client's feet); a session without such
/// state moves without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_follows_the_move_or_ends_the_session_with_a_clear_error() {
    let (env, cfg) = ready_for_cutover("journey_state", 5_000).await;
    let a = polling_proxy(&env).await;
    wait_for_heartbeats(&env.old, 1).await;
    let session = || async {
        let (c, conn) = tokio_postgres::connect(&a.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let (listener, locker, temp, plain) =
        (session().await, session().await, session().await, session().await);
    listener
        .batch_execute("LISTEN switchyard_test_channel")
        .await
        .unwrap();
    locker
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    temp.batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    plain
        .batch_execute("INSERT INTO items (owner, v) VALUES (9, 9)")
        .await
        .unwrap();

    let out = forced_cutover(&cfg).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    writes_to(&a, "NEW").await;

    for (c, what) in [(&locker, "advisory lock"), (&temp, "temporary tables")] {
        let e = c.batch_execute("SELECT 1").await.expect_err(what);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{what}: {e}"));
        assert_eq!(db.code().code(), "57P01", "{db:?}");
        assert!(
            db.message().contains(what) && db.message().contains("moved write authority to NEW"),
            "{db:?}"
        );
    }
    // The lock went with the connection that held it: anyone may take it now.
    let old = env.old.client().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let took: bool = old
            .query_one("SELECT pg_try_advisory_lock(4242)", &[])
            .await
            .unwrap()
            .get(0);
        if took {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the advisory lock is still held on OLD"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    plain
        .batch_execute("INSERT INTO items (owner, v) VALUES (9, 10)")
        .await
        .unwrap();
    let channels: Vec<String> = listener
        .query("SELECT pg_listening_channels()::text", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(channels, ["switchyard_test_channel"]);
    let on: String = listener
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on, env.new.name(), "the listener runs on NEW");
}
