//! `switchyard prepare` as operators run it: exit 0 when ready (side tables created, or only
//! checked with `--check`), 1 with one line per mismatch, 2 when a store is unreachable, with the
//! store named and no password shown; `--json` prints the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

use switchyard_test_support::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A config file that deletes itself.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(old_url: &str, new_url: &str, tables: &str) -> TempConfig {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sy-cli-prepare-{}-{n}.toml", std::process::id()));
        let text = format!(
            "[old]\nurl = \"{old_url}\"\n[new]\nurl = \"{new_url}\"\n[auth]\nmethod = \"trust\"\n\
             [telemetry]\nlog_level = \"warn\"\n{tables}"
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

/// Runs `switchyard prepare --config CFG ARGS...` off the async runtime.
async fn run(cfg: &TempConfig, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("prepare").arg("--config").arg(&cfg.0).args(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const TABLES: &str = "[[tables]]\nname = \"public.accounts\"\nphase = \"dual_write\"\n\
                      [[tables]]\nname = \"history\"\nphase = \"passthrough\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_exits_0_when_ready_and_1_with_mismatches() {
    let old = TestDb::create("cli_prep_old").await.unwrap();
    let new = TestDb::create("cli_prep_new").await.unwrap();
    let schema = "CREATE TABLE accounts (id bigint PRIMARY KEY, email text);
                  CREATE TABLE history (at timestamptz, line text);";
    old.execute_batch(schema).await.unwrap();
    new.execute_batch(schema).await.unwrap();
    let cfg = TempConfig::new(old.url(), new.url(), TABLES);

    let out = run(&cfg, &["--check"]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        stdout,
        "public.accounts: key (id), keys table switchyard.switchyard_keys_public_accounts\n\
         public.history: no key, mirrored append-only\n\
         ready (--check: nothing was created)\n"
    );
    let client = new.client().await.unwrap();
    let side_schemas = "SELECT count(*) FROM pg_namespace WHERE nspname = 'switchyard'";
    let n: i64 = client.query_one(side_schemas, &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "--check creates nothing");

    let out = run(&cfg, &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).ends_with("ready: side tables are in place on OLD and NEW\n"));
    let n: i64 = client
        .query_one("SELECT count(*) FROM switchyard.switchyard_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    let out = run(&cfg, &["--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tables"][0]["name"], "public.accounts");
    assert_eq!(report["tables"][0]["key"][0], "id");
    assert_eq!(report["tables"][0]["new"]["columns"][1]["type_name"], "text");
    assert_eq!(report["mismatches"].as_array().unwrap().len(), 0);

    new.execute_batch("ALTER TABLE accounts ALTER COLUMN email TYPE varchar(100); DROP TABLE history")
        .await
        .unwrap();
    let out = run(&cfg, &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "public.accounts: column \"email\" has type text on OLD and character varying(100) on NEW\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("public.history: table does not exist on NEW\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("2 mismatches: nothing was created\n"),
        "{stdout}"
    );

    let out = run(&cfg, &["--json", "--check"]).await;
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mismatches"][1]["table"], "public.history");
    assert_eq!(report["mismatches"][1]["problem"], "table does not exist on NEW");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_exits_2_when_a_store_is_unreachable_or_the_config_is_invalid() {
    let old = TestDb::create("cli_prep_down").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("postgres://postgres:hunter2@127.0.0.1:{port}/nowhere");
    let cfg = TempConfig::new(old.url(), &down, TABLES);
    let out = run(&cfg, &[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}{stderr}", text(&out.stdout));
    assert!(stderr.contains("new store"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let bad = TempConfig::new(
        old.url(),
        "mysql://u@127.0.0.1/x",
        "[[tables]]\nname = \"a.b.c\"\n",
    );
    let out = run(&bad, &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
