//! `switchyard backfill` as operators run it: killed with SIGKILL mid-run and started again it
//! completes with every chunk copied once; two processes at once split the chunks; SIGTERM
//! stops it with exit 3 and the state saved (`status` shows it); errors exit 1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchyard_test_support::{DualEnv, DualTable, ProxyConfig, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, owner text NOT NULL, qty int NOT NULL, \
                     note text, at timestamptz NOT NULL DEFAULT now());";

/// A config file that deletes itself.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(cfg: &ProxyConfig) -> TempConfig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sy-cli-backfill-{}-{n}.toml", std::process::id()));
        let mut cfg = cfg.clone();
        cfg.extra_sections
            .push("[telemetry]\nlog_level = \"info\"\n".to_owned());
        std::fs::File::create(&path)
            .unwrap()
            .write_all(cfg.to_toml().as_bytes())
            .unwrap();
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn spawn(cfg: &TempConfig, args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("backfill")
        .arg("--config")
        .arg(&cfg.0)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a child off the runtime, at most `limit`.
async fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let waited = tokio::time::timeout(
        limit,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("switchyard backfill did not finish within {limit:?}");
        }
    }
}

async fn run(cfg: &TempConfig, command: &str, args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .arg(command)
        .arg("--config")
        .arg(&cfg.0)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, Duration::from_secs(120)).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn env(label: &str, rows: i64) -> DualEnv {
    let env = DualEnv::new(label, ITEMS, vec![DualTable::new("items")])
        .await
        .unwrap();
    env.old
        .execute_batch(&format!(
            "INSERT INTO items (id, owner, qty, note) SELECT g * 3, 'o' || g % 7, g, md5(g::text) \
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    env
}

/// Waits until at least `n` chunks are done.
async fn wait_for_chunks(new: &TestDb, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = new.client().await.unwrap();
        let exists: bool = c
            .query_one(
                "SELECT to_regclass('switchyard.switchyard_backfill_chunks') IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if exists {
            let done: i64 = c
                .query_one(
                    "SELECT count(*) FROM switchyard.switchyard_backfill_chunks WHERE status = 'done'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if done >= n {
                return;
            }
        }
        assert!(Instant::now() < deadline, "fewer than {n} chunks done after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the chunk table after a complete backfill of `rows` rows with no other writes: every
/// chunk done once, ranges contiguous, each row read and copied once.
async fn assert_every_chunk_once(env: &DualEnv, rows: i64) {
    let c = env.new.client().await.unwrap();
    let chunks = c
        .query(
            "SELECT chunk_id, lo, hi, status, rows_read, rows_copied, rows_skipped \
             FROM switchyard.switchyard_backfill_chunks ORDER BY chunk_id",
            &[],
        )
        .await
        .unwrap();
    let mut previous: Option<Vec<String>> = None;
    let (mut read, mut copied) = (0, 0);
    for (i, ch) in chunks.iter().enumerate() {
        let id: i64 = ch.get(0);
        assert_eq!(id, i as i64 + 1, "chunk ids are dense");
        let lo: Option<Vec<String>> = ch.get(1);
        assert_eq!(lo, previous, "chunk {id} starts where the one before ends");
        previous = Some(ch.get(2));
        assert_eq!(ch.get::<_, String>(3), "done");
        assert_eq!(ch.get::<_, i64>(6), 0, "nothing fenced in a quiet table");
        read += ch.get::<_, i64>(4);
        copied += ch.get::<_, i64>(5);
    }
    assert_eq!(
        (read, copied),
        (rows, rows),
        "every row read and copied exactly once"
    );
    assert_eq!(
        env.new
            .query_i64("SELECT count(*) FROM switchyard.switchyard_keys_public_items WHERE sy_version = 0")
            .await
            .unwrap(),
        0,
        "the fast path copies without claims"
    );
    env.assert_converged().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_backfill_resumes_and_copies_every_chunk_once() {
    let rows = 60_000;
    let env = env("cli_bf_kill", rows).await;
    let cfg = TempConfig::new(&env.proxy_config());
    // Hold chunk 15 (ids 42003..=45000) in flight: an open transaction on NEW has inserted a
    // row with one of its keys, so the worker that copies that chunk waits for it.
    let blocker = env.new.client().await.unwrap();
    blocker
        .batch_execute("BEGIN; INSERT INTO items (id, owner, qty) VALUES (43500, 'blocker', 0)")
        .await
        .unwrap();
    let child = spawn(
        &cfg,
        &[
            "--workers",
            "3",
            "--chunk-rows",
            "1000",
            "--max-rows-per-sec",
            "15000",
        ],
    );
    wait_for_chunks(&env.new, 20).await;
    let mut child = child;
    let killed_pid = child.id();
    child.kill().unwrap(); // SIGKILL
    let killed = finish(child, Duration::from_secs(10)).await;
    assert!(!killed.status.success());
    let chunk_15 = "SELECT status FROM switchyard.switchyard_backfill_chunks WHERE chunk_id = 15";
    let c = env.new.client().await.unwrap();
    assert_eq!(
        c.query_one(chunk_15, &[]).await.unwrap().get::<_, String>(0),
        "pending"
    );
    // The dead worker's session on NEW notices its client is gone once its lock wait ends.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .new
        .query_i64("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'switchyard-backfill'")
        .await
        .unwrap()
        > 0
    {
        assert!(Instant::now() < deadline, "the killed backfill's sessions linger");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing half-written: NEW has exactly the rows of the chunks marked done (the chunks in
    // flight rolled back with their sessions).
    let done = "SELECT coalesce(sum(rows_copied), 0)::int8 FROM switchyard.switchyard_backfill_chunks WHERE status = 'done'";
    let copied = env.new.query_i64(done).await.unwrap();
    assert!(copied > 0 && copied < rows, "{copied}");
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM items").await.unwrap(),
        copied
    );
    let status = run(&cfg, "status", &[]).await;
    assert!(
        text(&status.stdout).contains("backfill running"),
        "{}",
        text(&status.stdout)
    );

    let again = finish(
        spawn(&cfg, &["--workers", "2", "--chunk-rows", "1000"]),
        Duration::from_secs(120),
    )
    .await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("backfill complete"),
        "{}",
        text(&again.stdout)
    );
    assert_every_chunk_once(&env, rows).await;
    // The chunk that was in flight when the first run died was taken over by the second.
    let worker: String = c
        .query_one(
            "SELECT worker FROM switchyard.switchyard_backfill_chunks WHERE chunk_id = 15",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!worker.contains(&format!(":{killed_pid}/")), "{worker}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backfill_processes_split_the_chunks() {
    let rows = 60_000;
    let env = env("cli_bf_two", rows).await;
    let cfg = TempConfig::new(&env.proxy_config());
    let args = [
        "--workers",
        "2",
        "--chunk-rows",
        "1000",
        "--max-rows-per-sec",
        "15000",
    ];
    let (a, b) = (spawn(&cfg, &args), spawn(&cfg, &args));
    let pids = [a.id(), b.id()];
    let (a, b) = tokio::join!(
        finish(a, Duration::from_secs(120)),
        finish(b, Duration::from_secs(120))
    );
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(b.status.success(), "{}", text(&b.stderr));
    let c = env.new.client().await.unwrap();
    let per_process: Vec<(String, i64, i64)> = c
        .query(
            "SELECT split_part(split_part(worker, '/', 1), ':', 2), count(*), sum(rows_read)::int8 \
             FROM switchyard.switchyard_backfill_chunks GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        per_process.len(),
        2,
        "both processes copied chunks: {per_process:?}"
    );
    for (pid, chunks, _) in &per_process {
        assert!(pids.iter().any(|p| p.to_string() == *pid), "{pid}");
        assert!(*chunks >= 5, "{per_process:?}");
    }
    assert_eq!(per_process.iter().map(|p| p.2).sum::<i64>(), rows);
    assert_every_chunk_once(&env, rows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_with_state_saved_and_status_shows_it() {
    let rows = 40_000;
    let env = env("cli_bf_term", rows).await;
    let cfg = TempConfig::new(&env.proxy_config());
    let child = spawn(
        &cfg,
        &[
            "--workers",
            "2",
            "--chunk-rows",
            "1000",
            "--max-rows-per-sec",
            "10000",
            "--json",
        ],
    );
    wait_for_chunks(&env.new, 5).await;
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = finish(child, Duration::from_secs(20)).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("SIGTERM"), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "interrupted");
    let read = summary["tables"][0]["this_run"]["rows_read"].as_i64().unwrap();
    assert!(read > 0 && read < rows, "{summary}");
    assert_eq!(summary["tables"][0]["total"]["rows_copied"].as_i64(), Some(read));
    assert_eq!(
        env.new.query_i64("SELECT count(*) FROM items").await.unwrap(),
        read
    );

    let status = run(&cfg, "status", &[]).await;
    let shown = text(&status.stdout);
    assert!(status.status.success());
    assert!(
        shown.contains("public.items") && shown.contains("dual_write"),
        "{shown}"
    );
    assert!(shown.contains("backfill running"), "{shown}");

    let again = run(&cfg, "backfill", &["--json"]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(summary["status"], "done");
    assert_eq!(
        summary["tables"][0]["this_run"]["rows_read"].as_i64(),
        Some(rows - read)
    );
    let status = run(&cfg, "status", &["--json"]).await;
    let tables: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(tables[0]["table"], "public.items");
    assert_eq!(tables[0]["phase"], "dual_write");
    assert_eq!(tables[0]["backfill"]["status"], "done");
    assert_eq!(tables[0]["backfill"]["rows_copied"].as_i64(), Some(rows));
    env.assert_converged().await.unwrap();

    // Tombstones of the finished table can go now.
    let cleaned = run(&cfg, "backfill", &["--cleanup-tombstones"]).await;
    assert!(cleaned.status.success(), "{}", text(&cleaned.stderr));
    assert!(text(&cleaned.stdout).contains("public.items: 0 tombstones removed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_1_with_the_reason() {
    let (old, new) = TestDb::create_pair("cli_bf_err").await.unwrap();
    old.execute_batch(ITEMS).await.unwrap();
    new.execute_batch(ITEMS).await.unwrap();
    let mut cfg = ProxyConfig::passthrough(old.url(), new.url());
    cfg.extra_sections
        .push("[[tables]]\nname = \"items\"\nphase = \"passthrough\"\n".to_owned());
    let cfg = TempConfig::new(&cfg);
    let out = run(&cfg, "backfill", &["--table", "items", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("public.items is in phase passthrough"),
        "{}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["kind"], "phase");
    let out = run(&cfg, "backfill", &["--workers", "0"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--workers must be between 1 and 64"),
        "{}",
        text(&out.stderr)
    );
    let cleanup = run(&cfg, "backfill", &["--cleanup-tombstones"]).await;
    assert_eq!(cleanup.status.code(), Some(1));
    assert!(
        text(&cleanup.stderr).contains("none is in phase dual_write"),
        "{}",
        text(&cleanup.stderr)
    );
}
