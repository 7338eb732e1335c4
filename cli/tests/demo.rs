//! `switchyard demo` runs its journey to a PASS verdict against the local PostgreSQL and leaves
//! no database behind.

use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_walks_the_journey_to_pass_and_drops_its_databases() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "demo",
            "--clients",
            "6",
            "--step-secs",
            "2",
            "--customers",
            "1000",
        ])
        .output()
        .expect("run switchyard demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    for step in [
        "prepare",
        "backfill",
        "drift sample",
        "drift verify",
        "shadow_read",
        "read_shift 10%",
        "read_shift 50%",
        "read_shift 100%",
        "cutover ",
        "rollback",
        "cutover again",
        "final check",
        "done, cleanup",
    ] {
        assert!(stdout.contains(step), "no step {step:?} in\n{stdout}");
    }
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert!(
        stdout.contains(" 0 client errors; 0 differing keys; 0 acknowledged writes missing"),
        "{stdout}"
    );
    // Reads were served by NEW at 100%.
    let at_100 = stdout
        .lines()
        .find(|l| l.contains("read_shift 100%"))
        .unwrap_or_default();
    let by_new: u64 = at_100
        .split("served: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(by_new > 0, "{at_100}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );

    // Its databases are gone.
    let (client, conn) = tokio_postgres::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    let names: Vec<String> = stdout
        .split_whitespace()
        .filter(|w| w.starts_with("switchyard_demo_"))
        .map(str::to_owned)
        .collect();
    assert_eq!(names.len(), 2, "{stdout}");
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1)",
            &[&names],
        )
        .await
        .expect("query")
        .get(0);
    assert_eq!(left, 0, "the demo left {names:?}");
}
