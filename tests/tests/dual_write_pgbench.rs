//! pgbench's TPC-B-like workload through two dual-write proxies at once, in the simple and the
//! prepared query mode, then a full comparison of OLD and NEW.
//!
//! Both stores start from the same `pgbench -i -s 1` data (the initialisation is deterministic),
//! so no backfill is needed; `pgbench_history` has no key and is mirrored append-only.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use switchyard_test_support::{DualEnv, DualTable, TestDb, TestProxy};
use tokio::process::Command;

const SECONDS: u32 = 10;

/// `pgbench` on `PATH`, else the newest `/usr/lib/postgresql/<major>/bin/pgbench`.
fn pgbench() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path)
        .map(|d| d.join("pgbench"))
        .find(|p| p.is_file())
    {
        return Ok(p);
    }
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            Some((
                e.file_name().to_str()?.parse().ok()?,
                e.path().join("bin/pgbench"),
            ))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versioned.sort();
    versioned.pop().map(|(_, p)| p).context("pgbench not found")
}

/// Host and port of a `postgres://user@host:port/db` URL.
fn host_port(url: &str) -> (String, String) {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.to_owned()),
        None => (hostport.to_owned(), "5432".to_owned()),
    }
}

/// Runs pgbench with `args`; stdout on success, a failure with both outputs otherwise.
async fn run(args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let mut cmd = Command::new(pgbench()?);
    cmd.args(args)
        .env("PGUSER", "postgres")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .with_context(|| format!("pgbench {args:?} did not finish within {limit:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("pgbench {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    }
    Ok(format!("{stdout}\n{stderr}"))
}

async fn init(db: &TestDb) -> anyhow::Result<()> {
    let (host, port) = host_port(db.url());
    run(
        &[
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            &host,
            "-p",
            &port,
            "-U",
            "postgres",
            db.name(),
        ],
        Duration::from_secs(120),
    )
    .await
    .map(drop)
}

/// The number after `label` on the line that has it (`tps = 123.4 (...)`).
fn number_after(out: &str, label: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(label)?;
        rest.trim_start_matches([' ', '=', ':'])
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()?
            .parse()
            .ok()
    })
}

/// The TPC-B invariant: every delta went to one account, one teller, one branch and history.
async fn balances(db: &TestDb) -> anyhow::Result<[i64; 4]> {
    let c = db.client().await?;
    let row = c
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint, \
                    (SELECT sum(tbalance) FROM pgbench_tellers)::bigint, \
                    (SELECT sum(bbalance) FROM pgbench_branches)::bigint, \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::bigint",
            &[],
        )
        .await?;
    Ok([row.get(0), row.get(1), row.get(2), row.get(3)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_two_proxies_converges() -> anyhow::Result<()> {
    let started = Instant::now();
    let (old, new) = TestDb::create_pair("pgbench_dw").await?;
    init(&old).await?;
    init(&new).await?;
    let env = DualEnv::from_dbs(
        old,
        new,
        [
            "pgbench_accounts",
            "pgbench_tellers",
            "pgbench_branches",
            "pgbench_history",
        ]
        .into_iter()
        .map(DualTable::new)
        .collect(),
    )
    .await?;
    env.assert_converged().await?;
    let config = env.proxy_config_with_mirror(
        env.new.url(),
        &[
            ("timeout_ms", 2000),
            ("repair_interval_ms", 200),
            ("stale_intent_secs", 10),
        ],
    );
    let proxies = [TestProxy::start(&config).await?, TestProxy::start(&config).await?];
    println!("pgbench: setup took {:?}", started.elapsed());

    let seconds = SECONDS.to_string();
    let runs: Vec<(usize, &str)> = [(0, "simple"), (0, "prepared"), (1, "simple"), (1, "prepared")].into();
    let benches = runs.iter().map(|&(p, mode)| {
        let port = proxies[p].port().to_string();
        let (db, seconds) = (env.old.name().to_owned(), seconds.clone());
        async move {
            let args = [
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &seconds,
                "-M",
                mode,
                &db,
            ];
            let out = run(&args, Duration::from_secs(u64::from(SECONDS) + 60)).await;
            (p, mode, out)
        }
    });
    let results = futures_util::future::join_all(benches).await;

    let mut total = 0.0;
    for (p, mode, out) in results {
        let out = out?;
        let tps = number_after(&out, "tps").context("no tps line")?;
        let processed = number_after(&out, "number of transactions actually processed")
            .context("no 'transactions actually processed' line")?;
        let failed = number_after(&out, "number of failed transactions").unwrap_or(0.0);
        println!("pgbench: proxy {p} -M {mode}: {processed} transactions, {failed} failed, tps = {tps:.1}");
        assert!(processed > 0.0, "proxy {p} -M {mode} processed nothing:\n{out}");
        assert_eq!(failed, 0.0, "proxy {p} -M {mode}:\n{out}");
        assert!(!out.contains("aborted"), "proxy {p} -M {mode}:\n{out}");
        total += processed;
    }
    println!("pgbench: {total} transactions through two proxies in {SECONDS} s");

    let drain = Instant::now();
    env.wait_for_no_intents(Duration::from_secs(60)).await?;
    println!("pgbench: intents drained in {:?}", drain.elapsed());
    for (i, p) in proxies.iter().enumerate() {
        let (_, body) = p.admin_get("/status").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        println!("pgbench: proxy {i} /status mirror: {}", v["mirror"]);
    }
    env.assert_converged().await?;
    let (on_old, on_new) = (balances(&env.old).await?, balances(&env.new).await?);
    assert_eq!(on_old, on_new);
    assert!(
        on_old.iter().all(|&b| b == on_old[0]),
        "TPC-B sums disagree (accounts, tellers, branches, history): {on_old:?}"
    );
    let history: i64 = env.new.query_i64("SELECT count(*) FROM pgbench_history").await?;
    assert_eq!(history as f64, total, "one history row per committed transaction");
    println!("pgbench: whole test {:?}", started.elapsed());
    Ok(())
}
