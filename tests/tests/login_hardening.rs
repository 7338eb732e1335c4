//! Connections that never finish logging in cannot crowd out real clients: the proxy bounds
//! them (`[proxy] max_pending_logins`) and closes the oldest first, and it reports the open
//! file descriptor limit it raised at start.

use std::time::{Duration, Instant};

use switchyard_test_support::{ProxyConfig, TestDb, TestProxy};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Whether the proxy closed `s` (EOF or an error message, then EOF) within `wait`.
async fn closed_by_proxy(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_logins_are_shed_oldest_first_and_clients_still_get_in() -> anyhow::Result<()> {
    let (old, new) = TestDb::create_pair("login_shed").await?;
    let mut cfg = ProxyConfig::passthrough(old.url(), new.url());
    cfg.proxy_extra.push("max_pending_logins = 50".into());
    // One accept queue, so the proxy sees the connections in the order they were made.
    cfg.proxy_extra.push("worker_threads = 1".into());
    cfg.admin = true;
    let proxy = TestProxy::start(&cfg).await?;

    // 300 connections that never send a startup packet (a slowloris).
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(proxy.addr).await?);
    }
    // A real client logs in and queries at once.
    let started = Instant::now();
    let c = tokio::time::timeout(Duration::from_secs(10), proxy.client()).await??;
    let one: i32 = c.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "a client took {took:?} to get in");

    // The oldest were shed; the newest 50 (minus the place the client took while logging in)
    // still wait.
    assert!(
        closed_by_proxy(&mut idle[0], Duration::from_secs(5)).await,
        "the oldest is closed"
    );
    let mut open_at_end = 0;
    for s in idle.iter_mut().rev().take(40) {
        if !closed_by_proxy(s, Duration::from_millis(50)).await {
            open_at_end += 1;
        }
    }
    assert_eq!(open_at_end, 40, "the newest pending logins are kept");
    let mut closed = 0;
    for s in idle.iter_mut().take(240) {
        if closed_by_proxy(s, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 240, "every login older than the newest 50 was shed");

    let (code, body) = proxy.admin_get("/status").await?;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let connections = &status["connections"];
    assert!(connections["logging_in"].as_u64().unwrap() <= 50, "{connections}");
    assert_eq!(connections["max_logging_in"], 50);
    assert!(connections["fd_limit"].as_u64().unwrap() >= 1024, "{connections}");
    Ok(())
}
