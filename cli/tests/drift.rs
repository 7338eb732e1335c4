//! `switchyard drift sample` and `drift verify` as operators and scripts run them: the JSON
//! fields the issue names, the exit codes (0 clean, 1 drift found, 2 could not check), and the
//! results recorded on NEW.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

use switchyard_test_support::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A config file that deletes itself.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(old_url: &str, new_url: &str) -> TempConfig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sy-cli-drift-{}-{n}.toml", std::process::id()));
        let text = format!(
            "[old]\nurl = \"{old_url}\"\n[new]\nurl = \"{new_url}\"\n[auth]\nmethod = \"trust\"\n\
             [telemetry]\nlog_level = \"warn\"\n\
             [[tables]]\nname = \"public.items\"\nphase = \"dual_write\"\n"
        );
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn run(cfg: &TempConfig, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("drift").args(args).arg("--config").arg(&cfg.0);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// A verify's `differing_keys` as (first key column, kind), sorted.
fn differing_keys(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut got: Vec<(String, String)> = report["differing_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"][0].as_str().unwrap().to_owned(),
                k["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_and_verify_print_the_fields_exit_by_outcome_and_record_on_new() {
    let (old, new) = TestDb::create_pair("cli_drift").await.unwrap();
    let setup = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); \
                 INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 500) i";
    old.execute_batch(setup).await.unwrap();
    new.execute_batch(setup).await.unwrap();
    let cfg = TempConfig::new(old.url(), new.url());

    let out = run(&cfg, &["sample", "--json", "--seed", "3", "--samples", "1000"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v[0];
    for field in [
        "table",
        "sampled",
        "differing",
        "missing_in_new",
        "extra_in_new",
        "value_differs",
        "rate",
        "ci95_low",
        "ci95_high",
        "rows_old",
        "rows_new",
        "seconds",
        "examples",
        "seed",
    ] {
        assert!(!r[field].is_null(), "field {field} missing: {r}");
    }
    assert_eq!(r["table"], "public.items");
    assert_eq!(
        (r["sampled"].as_u64(), r["differing"].as_u64()),
        (Some(500), Some(0))
    );
    assert!(r["ci95_high"].as_f64().unwrap() < 0.01);

    new.execute_batch("UPDATE items SET name = 'changed' WHERE id = 250; DELETE FROM items WHERE id = 7")
        .await
        .unwrap();
    let out = run(&cfg, &["verify", "--json", "--table", "public.items"]).await;
    assert_eq!(out.status.code(), Some(1), "drift found: exit 1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = differing_keys(&v[0]);
    assert_eq!(
        got,
        [
            ("250".to_owned(), "value_differs".to_owned()),
            ("7".to_owned(), "missing_in_new".to_owned())
        ]
    );
    let recorded = new
        .query_i64("SELECT count(*) FROM switchyard.switchyard_drift WHERE table_name = 'public.items'")
        .await
        .unwrap();
    assert_eq!(recorded, 2, "one sample and one verify recorded");
    let keys = new
        .query_i64("SELECT count(*) FROM switchyard.switchyard_drift_keys")
        .await
        .unwrap();
    assert_eq!(keys, 2, "the verify's differing keys are recorded");

    // Repair the keys that verify recorded (prepare first: repairs need the side tables).
    let prepared = Command::new(BIN)
        .arg("prepare")
        .arg("--config")
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(
        prepared.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&prepared.stdout)
    );
    let out = run(&cfg, &["repair", "--from-verify", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v[0]["confirmed"].as_u64(), v[0]["remaining"].as_u64()),
        (Some(2), Some(0))
    );
    let out = run(&cfg, &["verify"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after repair: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = run(&cfg, &["verify", "--table", "public.nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("public.nope is not in the configuration"));
}

/// `drift watch` records a sample of every table each round and stops cleanly on SIGTERM; a
/// proxy started afterwards shows the latest figures at /status and as metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_records_rounds_until_sigterm_and_proxies_show_the_figures() {
    let (old, new) = TestDb::create_pair("cli_drift_watch").await.unwrap();
    let setup = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); \
                 INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 200) i";
    old.execute_batch(setup).await.unwrap();
    new.execute_batch(setup).await.unwrap();
    new.execute_batch("DELETE FROM items WHERE id <= 20")
        .await
        .unwrap();
    let cfg = TempConfig::new(old.url(), new.url());

    let mut child = Command::new(BIN)
        .args(["drift", "watch", "--every", "1", "--samples", "1000", "--config"])
        .arg(&cfg.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let count = "SELECT count(*) FROM switchyard.switchyard_drift WHERE kind = 'sample'";
    loop {
        let rounds = new.query_i64(count).await.unwrap_or(0);
        if rounds >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {rounds} rounds recorded in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the watch cleanly");

    // 20 of 200 keys are missing on NEW: a rate of 0.1, every key drawn.
    let mut proxy_cfg = switchyard_test_support::ProxyConfig::passthrough(old.url(), new.url());
    proxy_cfg.admin = true;
    // Passthrough: the proxy needs no prepare to read and show the figures.
    proxy_cfg
        .extra_sections
        .push("[[tables]]\nname = \"public.items\"\nphase = \"passthrough\"\n".to_owned());
    let proxy = switchyard_test_support::TestProxy::start(&proxy_cfg)
        .await
        .unwrap();
    // The proxy reads the figures in the background, at start and then every few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        let (code, body) = proxy.admin_get("/status").await.unwrap();
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if !status["tables"][0]["drift"]["sample"].is_null() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no drift figures at /status: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let sample = &status["tables"][0]["drift"]["sample"];
    assert_eq!(sample["kind"], "sample", "{status}");
    assert!((sample["rate"].as_f64().unwrap() - 0.1).abs() < 1e-9, "{sample}");
    assert!(sample["age_seconds"].as_f64().unwrap() < 60.0);
    assert!(status["tables"][0]["drift"]["verify"].is_null());
    let (_, metrics) = proxy.admin_get("/metrics").await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("switchyard_drift_rate{") && l.contains("bound=\"estimate\""))
        .unwrap_or_else(|| panic!("no drift rate in the metrics:\n{metrics}"));
    assert!(
        line.contains("table=\"public.items\"") && line.ends_with(" 0.1"),
        "{line}"
    );
    assert!(metrics.contains("switchyard_drift_age_seconds{"), "{metrics}");
}

/// A verify killed with SIGKILL halfway through a table is taken over by the next one, which
/// compares only the ranges not yet done and still finds exactly the injected keys; while the
/// first runs, a second verify of the same table is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_killed_midway_resumes_and_finds_exactly_the_injected_keys() {
    let (old, new) = TestDb::create_pair("cli_drift_kill").await.unwrap();
    let setup = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL); \
                 INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 100000) i";
    old.execute_batch(setup).await.unwrap();
    new.execute_batch(setup).await.unwrap();
    new.execute_batch(
        "UPDATE items SET name = 'changed' WHERE id IN (10, 99990); DELETE FROM items WHERE id = 50000; \
         INSERT INTO items VALUES (200000, 'extra')",
    )
    .await
    .unwrap();
    let cfg = TempConfig::new(old.url(), new.url());

    // 101 ranges of 1,000 keys, paced to about 20 ranges a second: about 5 s in all.
    let mut child = Command::new(BIN)
        .args([
            "drift",
            "verify",
            "--chunk-rows",
            "1000",
            "--max-rows-per-sec",
            "40000",
            "--config",
        ])
        .arg(&cfg.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let done = "SELECT count(*) FROM switchyard.switchyard_verify_ranges";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if new.query_i64(done).await.unwrap_or(0) >= 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the verify did not get going"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let second = run(&cfg, &["verify"]).await;
    assert_eq!(
        second.status.code(),
        Some(2),
        "a second verify of the table is refused"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another drift verify of this table is running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    let compared = new.query_i64(done).await.unwrap();
    assert!(
        (20..101).contains(&compared),
        "killed midway: {compared} of 101 ranges compared"
    );

    let out = run(&cfg, &["verify", "--chunk-rows", "1000", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v[0];
    assert_eq!(r["resumed"], true, "{r}");
    let resumed = r["resumed_ranges"].as_i64().unwrap();
    assert!(
        resumed >= compared && resumed < 101,
        "{resumed} ranges taken over, {compared} seen done"
    );
    assert_eq!(r["chunks"], 101);
    assert_eq!(
        (r["rows_old"].as_u64(), r["rows_new"].as_u64()),
        (Some(100_000), Some(100_000))
    );
    let got = differing_keys(r);
    assert_eq!(
        got,
        [
            ("10".to_owned(), "value_differs".to_owned()),
            ("200000".to_owned(), "extra_in_new".to_owned()),
            ("50000".to_owned(), "missing_in_new".to_owned()),
            ("99990".to_owned(), "value_differs".to_owned()),
        ]
    );
    // The run is finished: the next verify starts anew.
    let unfinished = new
        .query_i64("SELECT count(*) FROM switchyard.switchyard_verify_runs WHERE finished_at IS NULL")
        .await
        .unwrap();
    assert_eq!(unfinished, 0);
    assert_eq!(
        new.query_i64(done).await.unwrap(),
        0,
        "a finished run's ranges are dropped"
    );
    let out = run(&cfg, &["verify", "--chunk-rows", "1000", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v[0]["resumed"].as_bool(), v[0]["differing"].as_u64()),
        (Some(false), Some(4))
    );
}
