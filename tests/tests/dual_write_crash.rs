//! A proxy that dies at each step of the commit sequence leaves a state another proxy resolves
//! from the stores alone: zero drift afterwards, and no acknowledged write lost.
//!
//! The death is injected with `[mirror] fault_injection`: the session drops both connections at
//! that point, as a killed process would (NEW's open transaction goes with its connection; the
//! intent, if OLD committed, stays). The dead proxy is then shut down and a fresh one repairs.
//!
//! Each test runs twice: with OLD authoritative (dual writes before cutover) and with the roles
//! swapped (NEW authoritative, OLD following, as from cutover): the engine knows only an
//! authoritative store and a follower.

use std::time::Duration;

use switchyard_store::Roles;
use switchyard_test_support::{DualEnv, DualTable, TestProxy};

const SCHEMA: &str = "
CREATE TABLE acct (id bigserial PRIMARY KEY, owner text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE events (at timestamptz NOT NULL DEFAULT clock_timestamp(), what text);
";

fn mirror_section(fault: Option<&str>) -> String {
    let mut s =
        String::from("[mirror]\nstale_intent_secs = 1\nrepair_interval_ms = 100\ntimeout_ms = 1000\n");
    if let Some(f) = fault {
        s.push_str(&format!("fault_injection = \"{f}\"\n"));
    }
    s
}

async fn proxy(env: &DualEnv, fault: Option<&str>) -> TestProxy {
    let mut cfg = env.proxy_config();
    cfg.extra_sections.push(mirror_section(fault));
    env.start_proxy(&cfg).await.expect("proxy")
}

/// Runs one autocommit insert, one explicit transaction and one keyless append through a proxy
/// that dies at `fault`; returns how many of the three the client saw committed.
async fn writes_through_dying_proxy(env: &DualEnv, fault: &str) -> usize {
    let mut acked = 0;
    let p = proxy(env, Some(fault)).await;
    let transactions: [&[&str]; 3] = [
        &["INSERT INTO acct (owner) VALUES ('autocommit')"],
        // The client's own transaction, statement by statement, so its COMMIT goes through the
        // proxy's commit sequence.
        &[
            "BEGIN",
            "UPDATE acct SET n = n + 1 WHERE id = 1",
            "INSERT INTO acct (owner) VALUES ('in txn')",
            "COMMIT",
        ],
        &["INSERT INTO events (what) VALUES ('append')"],
    ];
    for statements in transactions {
        // Each transaction on a fresh connection: the previous one died with the session.
        let c = p.client().await.expect("connect");
        let run = async {
            for sql in statements {
                c.batch_execute(sql).await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(Ok(())) => acked += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("{fault}: the client hung instead of seeing the connection die"),
        }
    }
    drop(p);
    acked
}

async fn crash_at(roles: Roles, label: &str, fault: &str) -> DualEnv {
    let env = DualEnv::new_in(
        roles,
        label,
        SCHEMA,
        vec![DualTable::new("acct"), DualTable::new("events")],
    )
    .await
    .expect("env");
    // A row both stores have, for the UPDATE.
    let healthy = proxy(&env, None).await;
    healthy
        .client()
        .await
        .unwrap()
        .batch_execute("INSERT INTO acct (owner) VALUES ('seed')")
        .await
        .unwrap();
    env.wait_for_no_intents(Duration::from_secs(10)).await.unwrap();
    drop(healthy);

    let acked = writes_through_dying_proxy(&env, fault).await;
    assert_eq!(
        acked, 0,
        "{fault}: a session that died before answering acknowledged a write"
    );
    env
}

async fn repaired_by_a_new_proxy(env: &DualEnv) {
    let fresh = proxy(env, None).await;
    env.wait_for_no_intents(Duration::from_secs(30)).await.unwrap();
    env.assert_converged().await.unwrap();
    drop(fresh);
}

async fn dies_before_authoritative_commits(roles: Roles, label: &str) {
    let env = crash_at(roles, label, "before_old_commit").await;
    // Nothing committed anywhere; nothing to repair.
    assert_eq!(env.pending_intents().await.unwrap(), 0);
    let n: i64 = env
        .authoritative()
        .query_i64("SELECT count(*) FROM acct")
        .await
        .unwrap();
    assert_eq!(n, 1, "only the seed row");
    repaired_by_a_new_proxy(&env).await;
}

async fn dies_between_the_two_commits(roles: Roles, label: &str) {
    let env = crash_at(roles, label, "after_old_commit").await;
    // The authoritative store committed all three transactions, the follower none: the intents
    // say which keys to re-copy.
    assert_eq!(env.pending_intents().await.unwrap(), 3);
    let lagging = |(only_old, only_new): (Vec<String>, Vec<String>)| match roles {
        Roles::OLD_AUTHORITATIVE => (only_old, only_new),
        _ => (only_new, only_old),
    };
    let (only_authoritative, only_follower) = lagging(env.diff("acct").await.unwrap());
    assert_eq!(
        (only_authoritative.len(), only_follower.len()),
        (3, 1),
        "the follower lags before the repair (the seed row's old version is only there): {only_authoritative:?}"
    );
    let (only_authoritative, _) = lagging(env.diff("events").await.unwrap());
    assert_eq!(only_authoritative.len(), 1);
    repaired_by_a_new_proxy(&env).await;
}

async fn dies_after_the_follower_commits(roles: Roles, label: &str) {
    let env = crash_at(roles, label, "after_new_commit").await;
    // Both stores have the data; the intents remain and must be recognised as applied (the
    // keyless append must not be inserted twice).
    assert_eq!(env.pending_intents().await.unwrap(), 3);
    env.assert_converged().await.unwrap();
    repaired_by_a_new_proxy(&env).await;
    let n: i64 = env
        .follower()
        .query_i64("SELECT count(*) FROM events")
        .await
        .unwrap();
    assert_eq!(n, 1, "the appended row is on the follower exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dies_before_old_commits() {
    dies_before_authoritative_commits(Roles::OLD_AUTHORITATIVE, "crash_before_old").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dies_between_old_and_new_commit() {
    dies_between_the_two_commits(Roles::OLD_AUTHORITATIVE, "crash_between").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dies_after_new_commits_before_cleanup() {
    dies_after_the_follower_commits(Roles::OLD_AUTHORITATIVE, "crash_after_new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_authoritative_proxy_dies_before_new_commits() {
    dies_before_authoritative_commits(Roles::NEW_AUTHORITATIVE, "crash_sw_before").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_authoritative_proxy_dies_between_new_and_old_commit() {
    dies_between_the_two_commits(Roles::NEW_AUTHORITATIVE, "crash_sw_between").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_authoritative_proxy_dies_after_old_commits_before_cleanup() {
    dies_after_the_follower_commits(Roles::NEW_AUTHORITATIVE, "crash_sw_after").await;
}
