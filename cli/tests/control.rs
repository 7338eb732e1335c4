//! `switchyard phase` and `switchyard shift` against real databases and running proxies: every
//! proxy follows a change (by notification, and by polling when a notification is missed), the
//! guard rails refuse with their reasons until the backfill and a clean drift result are in,
//! `--force` overrides and is recorded, and the admin API's actions need the token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::tempfile_path::TempPath;
use common::{cli, temp_config, text, wait_for_heartbeats};
use switchyard_test_support::{DualEnv, TestProxy};

const TOKEN: &str = "a-test-token-of-some-length";

fn config_file(env: &DualEnv) -> TempPath {
    temp_config(&format!(
        "[old]\nurl = \"{}\"\n[new]\nurl = \"{}\"\n[auth]\nmethod = \"trust\"\n\
         [telemetry]\nlog_level = \"warn\"\n\
         [[tables]]\nname = \"public.kv\"\nphase = \"dual_write\"\n",
        env.old.url(),
        env.new.url()
    ))
}

/// Waits until `proxy`'s /status shows `public.kv` at `phase` and `share`; returns the epoch.
async fn sees(proxy: &TestProxy, phase: &str, share: u64, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let (_, body) = proxy.admin_get("/status").await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        let t = &status["tables"][0];
        if t["phase"] == phase && t["read_share"].as_u64() == Some(share) && t["phase_from"] == "control" {
            return status["control"]["epoch"].as_i64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not follow to {phase}/{share} within {within:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_and_shift_reach_every_proxy_after_their_guard_rails() {
    let env = DualEnv::kv("cli_control").await.unwrap();
    env.seed_old("INSERT INTO kv SELECT i, 'v' || i FROM generate_series(1, 1000) i")
        .await
        .unwrap();
    let cfg = config_file(&env);
    let out = cli(&cfg, &["prepare"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Proxy A hears notifications only (its poll is ten minutes); proxy B polls every 200 ms
    // and has no admin token.
    let mut a_cfg = env.proxy_config();
    // Neither repairs the planted intent below (it is not stale for them).
    let mirror = "[mirror]\nstale_intent_secs = 3600\n";
    a_cfg.extra_sections.push(format!(
        "{mirror}[control]\npoll_interval_ms = 600000\n[admin]\ntoken = \"{TOKEN}\"\n"
    ));
    let mut b_cfg = env.proxy_config();
    b_cfg
        .extra_sections
        .push(format!("{mirror}[control]\npoll_interval_ms = 200\n"));
    let a = env.start_proxy(&a_cfg).await.unwrap();
    let b = env.start_proxy(&b_cfg).await.unwrap();
    let seeded = sees(&a, "dual_write", 0, Duration::from_secs(5)).await;
    sees(&b, "dual_write", 0, Duration::from_secs(5)).await;

    // Reads move to NEW only in read_shift.
    let out = cli(&cfg, &["shift", "--table", "public.kv", "--reads", "10"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("reads move to NEW only in read_shift"),
        "{}",
        text(&out)
    );

    let out = cli(&cfg, &["phase", "--table", "public.kv", "--to", "read_shift"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("phase dual_write -> read_shift"),
        "{}",
        text(&out)
    );
    let epoch = sees(&a, "read_shift", 0, Duration::from_secs(3)).await;
    assert!(epoch > seeded);
    assert_eq!(sees(&b, "read_shift", 0, Duration::from_secs(3)).await, epoch);

    // No backfill, no drift result: refused with both reasons.
    let out = cli(
        &cfg,
        &["shift", "--table", "public.kv", "--reads", "10", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let refused: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reasons = refused["refused"].to_string();
    assert!(reasons.contains("the backfill has not run"), "{reasons}");
    assert!(reasons.contains("no drift result is recorded"), "{reasons}");

    let out = cli(&cfg, &["backfill"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // Every one of the 1,000 keys drawn, none differing: still too few for a bound of 0.001.
    let out = cli(&cfg, &["drift", "sample", "--samples", "1000"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = cli(&cfg, &["shift", "--table", "public.kv", "--reads", "10"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let needed = switchyard_control::guard::keys_for_bound(0.001);
    assert!(
        text(&out).contains(&format!("about {needed} keys ({} more)", needed - 1000)),
        "{}",
        text(&out)
    );
    // A clean full verify is exact: the shift goes through.
    let out = cli(&cfg, &["drift", "verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = cli(&cfg, &["shift", "--table", "public.kv", "--reads", "10"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    sees(&a, "read_shift", 10, Duration::from_secs(3)).await;
    sees(&b, "read_shift", 10, Duration::from_secs(3)).await;

    // A repair pending (a failed mirror's intent a minute old): refused, then forced, and the
    // force recorded with what it overrode.
    env.old
        .execute_batch(
            "INSERT INTO switchyard.switchyard_intents (id, created_at, proxy, changes) \
             VALUES (1, now() - interval '1 minute', 'a test', '[]')",
        )
        .await
        .unwrap();
    let out = cli(&cfg, &["shift", "--table", "public.kv", "--reads", "50"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("1 repairs are pending"), "{}", text(&out));
    let out = cli(
        &cfg,
        &["shift", "--table", "public.kv", "--reads", "50", "--force"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("forced over: 1 repairs are pending"),
        "{}",
        text(&out)
    );
    let forced = env
        .old
        .query_i64(
            "SELECT count(*) FROM switchyard.switchyard_control_log WHERE forced \
             AND overridden[1] LIKE '1 repairs are pending%' AND changed_by LIKE 'switchyard shift%'",
        )
        .await
        .unwrap();
    assert_eq!(forced, 1);
    sees(&a, "read_shift", 50, Duration::from_secs(3)).await;

    // A change that bypasses the notification reaches the polling proxy.
    env.old
        .execute_batch(
            "UPDATE switchyard.switchyard_control SET read_share = 20, \
             epoch = (SELECT max(epoch) + 1 FROM switchyard.switchyard_control_log)",
        )
        .await
        .unwrap();
    sees(&b, "read_shift", 20, Duration::from_secs(3)).await;

    // The admin API: the token is required, and a proxy without one refuses the actions.
    let (code, _) = a
        .admin_post("/shift?table=public.kv&reads=30", None)
        .await
        .unwrap();
    assert_eq!(code, 401);
    let (code, _) = a
        .admin_post("/shift?table=public.kv&reads=30", Some("wrong-token-wrong-token"))
        .await
        .unwrap();
    assert_eq!(code, 401);
    let (code, body) = b
        .admin_post("/shift?table=public.kv&reads=30", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, body) = a
        .admin_post("/phase?table=public.kv&to=cutover", Some(TOKEN))
        .await
        .unwrap();
    // Cutover through the admin API: its guard rails refuse (the planted intent is a pending
    // repair), with the reasons.
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("repairs are pending"), "{body}");
    let (code, body) = a
        .admin_post("/shift?table=public.kv&reads=30&force=true", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    sees(&a, "read_shift", 30, Duration::from_secs(3)).await;
    sees(&b, "read_shift", 30, Duration::from_secs(3)).await;
}

/// A proxy of this version running against control tables seeded by an older one (a column its
/// heartbeat writes is missing, and no command of this version has run since) adds the column
/// and shows up in the heartbeat table at once, so a cutover barrier counts it. Fails without it:
/// every heartbeat failed (logged at debug), and a barrier would have gone on without the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_newer_than_the_control_tables_adds_what_its_heartbeat_needs() {
    let env = DualEnv::kv("cli_control_upgrade").await.unwrap();
    let cfg = config_file(&env);
    let out = cli(&cfg, &["prepare"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env.old
        .execute_batch("ALTER TABLE switchyard.switchyard_proxies DROP COLUMN plain_sessions")
        .await
        .unwrap();
    let mut proxy_cfg = env.proxy_config();
    proxy_cfg
        .extra_sections
        .push("[control]\npoll_interval_ms = 200\n".to_owned());
    let _proxy = env.start_proxy(&proxy_cfg).await.unwrap();
    wait_for_heartbeats(&env.old, 1).await;
}
