//! The binary as operators use it: `check-config` exit codes and messages, and `proxy` under
//! SIGTERM (graceful drain) and SIGINT (immediate stop).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_test_support::TestDb;

mod common;

use common::{signal, start_proxy_with, temp_config, Proxy, BIN};
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[test]
fn check_config_accepts_the_example() {
    let out = Command::new(BIN)
        .current_dir(WORKSPACE)
        .args(["check-config", "config/switchyard.example.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

#[test]
fn check_config_names_every_bad_key_and_exits_1() {
    let cfg = temp_config(
        "[proxy]\nlisten = \"127.0.0.1:6432\"\n[old]\nurl = \"postgres://u@127.0.0.1/a\"\n\
         [new]\nurl = \"postgres://u@127.0.0.1/b\"\n[auth]\nmethod = \"trust\"\n\
         [[tables]]\nname = \"public.t\"\nphase = \"sideways\"\nread_share = 150\n",
    );
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tables[0].phase") && err.contains("sideways"),
        "{err}"
    );
    assert!(err.contains("read_share"), "{err}");

    let cfg = temp_config("[proxy]\nlisten = \"127.0.0.1:6432\"\nlisen = \"x\"\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));

    let out = Command::new(BIN)
        .args(["check-config", "/nonexistent/switchyard.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchyard.toml"));
}

#[test]
fn proxy_refuses_an_invalid_config_with_exit_1() {
    let cfg = temp_config("[proxy]\nlisten = \"not an address\"\n");
    let out = Command::new(BIN)
        .arg("proxy")
        .arg("--config")
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.listen"));
}

fn start_proxy(old: &TestDb, new: &TestDb) -> Proxy {
    let sections = "[auth]\nmethod = \"trust\"\n[telemetry]\nlog_level = \"warn\"\n";
    start_proxy_with(old, new, "", sections, Stdio::null())
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "proxy did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(port: u16, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("postgres://postgres@127.0.0.1:{port}/{db}?sslmode=disable&connect_timeout=5");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish_then_exits_0() {
    let old = TestDb::create("cli_term").await.unwrap();
    let new = TestDb::create("cli_term_new").await.unwrap();
    old.execute_batch("create table t (id int)").await.unwrap();
    let mut proxy = start_proxy(&old, &new);

    let idle = connect(proxy.port, old.name()).await.unwrap();
    let busy = connect(proxy.port, old.name()).await.unwrap();
    busy.batch_execute("begin; insert into t values (1)")
        .await
        .unwrap();

    signal(&proxy.child, "-TERM");
    // The idle session is closed at once; the one in a transaction may finish it.
    let started = Instant::now();
    while !idle.is_closed() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "idle session not closed"
        );
        let _ = idle.simple_query("select 1").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        connect(proxy.port, old.name()).await.is_err(),
        "new sessions are refused while draining"
    );
    busy.batch_execute("insert into t values (2); commit")
        .await
        .unwrap();

    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut proxy.child, Duration::from_secs(15));
        (status, proxy)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status}");
    let n: i64 = old.query_i64("select count(*) from t").await.unwrap();
    assert_eq!(n, 2, "the transaction committed during the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once() {
    let old = TestDb::create("cli_int").await.unwrap();
    let new = TestDb::create("cli_int_new").await.unwrap();
    let mut proxy = start_proxy(&old, &new);
    let busy = connect(proxy.port, old.name()).await.unwrap();
    busy.batch_execute("begin").await.unwrap();
    signal(&proxy.child, "-INT");
    let (status, _proxy) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut proxy.child, Duration::from_secs(10));
        (status, proxy)
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(busy.simple_query("select 1").await.is_err());
}

/// The `id` of every `session` span closed in a JSON log.
fn session_ids(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["fields"]["message"] == "close" && event["span"]["name"] == "session")
        .filter_map(|event| event["span"]["id"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_unique_across_worker_threads() {
    let old = TestDb::create("cli_ids").await.unwrap();
    let new = TestDb::create("cli_ids_new").await.unwrap();
    let log_path = std::env::temp_dir().join(format!("sy-cli-ids-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let sections = "[auth]\nmethod = \"trust\"\n[telemetry]\nlog_format = \"json\"\nlog_level = \"info\"\n";
    let mut proxy = start_proxy_with(&old, &new, "worker_threads = 2\n", sections, Stdio::from(log));
    // The kernel spreads connections over the two workers' sockets by their source port: with
    // 16 of them, both workers serve some (all on one: 1 chance in 32,768).
    const SESSIONS: usize = 16;
    for _ in 0..SESSIONS {
        let client = connect(proxy.port, old.name()).await.unwrap();
        client.simple_query("select 1").await.unwrap();
        drop(client);
    }
    let started = Instant::now();
    let ids = loop {
        let ids = session_ids(&std::fs::read_to_string(&log_path).unwrap());
        if ids.len() >= SESSIONS || started.elapsed() > Duration::from_secs(10) {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    signal(&proxy.child, "-INT");
    let _ = wait_exit(&mut proxy.child, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    // The readiness probe of start_proxy_with (a bare TCP connect) may close a session span of
    // its own, so at least one per client connection, and no id twice.
    assert!(
        ids.len() >= SESSIONS,
        "one closed session span per connection: {ids:?}\n{text}"
    );
    let unique: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "session ids repeat: {ids:?}");
}

/// Waits until the log at `path` has a line containing every one of `needles`; returns the log.
async fn wait_for_log(path: &std::path::Path, needles: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return log;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no log line with {needles:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn login(port: u16, db: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let url = format!("postgres://app:{password}@127.0.0.1:{port}/{db}?sslmode=disable&connect_timeout=5");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// SIGHUP re-reads the file: the users and the log level change at run time, a change that
/// needs a restart is only reported, and a broken file leaves the proxy running as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_and_log_level_and_survives_a_bad_file() {
    let old = TestDb::create("cli_hup").await.unwrap();
    let new = TestDb::create("cli_hup_new").await.unwrap();
    let users = temp_config("[[users]]\nname = \"app\"\npassword = \"first\"\n");
    let log_path = std::env::temp_dir().join(format!("sy-cli-hup-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let sections = |level: &str| {
        format!(
            // `app` is no role on the server: every client logs in upstream as the URL's user.
            "[auth]\nmethod = \"scram-sha-256\"\nusers_file = \"{}\"\nupstream_login = \"service\"\n[telemetry]\nlog_format = \"json\"\nlog_level = \"{level}\"\n",
            users.0.display()
        )
    };
    let mut proxy = start_proxy_with(&old, &new, "", &sections("info"), Stdio::from(log));
    let db = old.name();
    login(proxy.port, db, "first").await.unwrap();
    let cfg = proxy.cfg.0.clone();
    let text = std::fs::read_to_string(&cfg).unwrap();

    // A file that does not load: an error in the log, nothing changes.
    std::fs::write(&cfg, "[proxy]\nlisen = 1\n").unwrap();
    signal(&proxy.child, "-HUP");
    wait_for_log(&log_path, &["\"ERROR\"", "SIGHUP: configuration not reloaded"]).await;
    login(proxy.port, db, "first").await.unwrap();

    // New users and log level (applied), a new grace period (only at restart).
    std::fs::write(&users.0, "[[users]]\nname = \"app\"\npassword = \"second\"\n").unwrap();
    let changed = text
        .replace("shutdown_grace_secs = 20", "shutdown_grace_secs = 21")
        .replace("log_level = \"info\"", "log_level = \"debug\"");
    assert_ne!(changed, text);
    std::fs::write(&cfg, changed).unwrap();
    signal(&proxy.child, "-HUP");
    wait_for_log(
        &log_path,
        &[
            "SIGHUP: configuration reloaded",
            "auth.users, telemetry.log_level",
        ],
    )
    .await;
    wait_for_log(&log_path, &["only when the proxy restarts", "\"keys\":\"proxy\""]).await;
    // The proxy takes the new users on its own task.
    wait_for_log(&log_path, &["users reloaded"]).await;
    let client = login(proxy.port, db, "second").await.unwrap();
    let Err(refused) = login(proxy.port, db, "first").await else {
        panic!("the old password still logs in");
    };
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{refused:?}"
    );
    // Debug lines now: a session's end is logged at debug.
    drop(client);
    wait_for_log(&log_path, &["\"DEBUG\"", "session ended"]).await;

    signal(&proxy.child, "-INT");
    let status = wait_exit(&mut proxy.child, Duration::from_secs(10));
    let _ = std::fs::remove_file(&log_path);
    assert!(status.success(), "exit status {status}");
}
